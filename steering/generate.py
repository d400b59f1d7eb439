"""Token generation: sampling, stop rules, cancellation and timings, as one plain loop.

`generate` is a generator: each `next()` runs at most one forward pass, so a caller (the server's
scheduler) can interleave several generations token by token, cancel between any two tokens, and
stream text as it appears.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

StopRule = Literal["word", "line", "sentence", "paragraph", "none"]
GREEDY_BELOW = 1e-3  # temperatures under this sample greedily
STOP_RULES: tuple[str, ...] = ("word", "line", "sentence", "paragraph", "none")

# Where each stop rule ends a continuation: the match's start is the cut point. Matching needs
# one character past the boundary, so "3.14" or "e.g. this" does not end a sentence at ".".
_STOP_PATTERNS: dict[str, re.Pattern[str]] = {
    "word": re.compile(r"(?<=\w)(?=[^\w'’-])"),
    "line": re.compile(r"\n"),
    "sentence": re.compile(r"(?<=[^\s.]{2}[.!?])(?=[\"'’”)\]]*\s)|(?<=[.!?][\"'’”)\]])(?=\s)|\n"),
    "paragraph": re.compile(r"\n[ \t]*\n"),
}


@dataclass(frozen=True)
class GenerationOptions:
    """What one request wants from the generator."""

    max_tokens: int = 24
    stop: StopRule = "sentence"
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    repetition_penalty: float = 1.1  # llama.cpp-style, over the last `repetition_window` tokens
    repetition_window: int = 64

    def validate(self) -> None:
        if not 1 <= self.max_tokens <= 1024:
            raise ValueError("max_tokens must be between 1 and 1024")
        if self.stop not in STOP_RULES:
            raise ValueError(f"stop must be one of {', '.join(STOP_RULES)}")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError("temperature must be between 0 and 5")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 1.0 <= self.repetition_penalty <= 2.0:
            raise ValueError("repetition_penalty must be between 1 and 2")


@dataclass
class Timings:
    """Where the time of one generation went. TTFT counts from when the request was queued."""

    queue_ms: float = 0.0
    prepare_ms: float = 0.0  # tokenizing, token healing, finding the cached prefix
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    tokens_reused: int = 0
    tokens_prefilled: int = 0
    tokens_generated: int = 0
    drafts_accepted: int = 0  # generated tokens that came from checked prompt-lookup drafts

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.tokens_generated - 1  # the first token comes from the prefill pass
        return steps / (self.decode_ms / 1000) if steps > 0 and self.decode_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}


@dataclass
class Completion:
    """The finished continuation and how it was made."""

    text: str
    token_ids: list[int]
    stop_reason: str  # "stop-rule", "max-tokens", "eos", "stop-string", "cancelled", "window"
    timings: Timings
    steering: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"text": self.text, "stop_reason": self.stop_reason, "timings": self.timings.to_dict(),
                "steering": self.steering}


@dataclass(frozen=True)
class TokenEvent:
    """One streamed step: `delta` is the new visible text (may be empty mid-character)."""

    delta: str
    text: str
    token_id: int
    index: int


class CancelToken:
    """Set from any thread; checked by the generator between forward passes."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def cut_at_stop(text: str, options: GenerationOptions) -> str | None:
    """The continuation cut at its stop point, or None if no stop point has been reached yet."""
    cuts = [text.find(s) for s in options.stop_strings if s and s in text]
    pattern = _STOP_PATTERNS.get(options.stop)
    if pattern is not None:
        # A continuation that starts with a line break (or, for words, whitespace) must not end
        # before it has said anything.
        lead = len(text) - len(text.lstrip() if options.stop == "word" else text.lstrip("\n"))
        match = pattern.search(text, lead)
        if match is not None and match.start() > 0:
            cuts.append(match.start())
    return text[: min(cuts)] if cuts else None


def penalize_repeats(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    """llama.cpp's repetition penalty: the logits of the token ids in `recent` ([..., k], one row of
    ids per row of `logits`; repeats allowed) move towards "less likely" by `penalty` (divided when
    positive, multiplied when negative). Touches k entries, not the vocabulary."""
    picked = logits.gather(-1, recent)
    return logits.scatter(-1, recent, torch.where(picked > 0, picked / penalty, picked * penalty))


def sample(logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator | None,
           recent: list[int] | None = None, allowed: torch.Tensor | None = None) -> int:
    """Greedy when temperature is 0, else temperature + nucleus sampling.

    A mild repetition penalty on `recent` tokens keeps a 135M model out of "and he'd be there,
    and he'd be there" loops, which greedy decoding otherwise falls into quickly.
    """
    if recent and options.repetition_penalty != 1.0:
        logits = penalize_repeats(logits, torch.tensor(recent, dtype=torch.long), options.repetition_penalty)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if options.temperature < GREEDY_BELOW:  # tiny temperatures overflow the softmax: same as greedy
        return int(logits.argmax())
    probs = torch.softmax(logits / options.temperature, dim=-1)
    if options.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < options.top_p
        keep[0] = True  # the most likely token always survives, however small top_p is
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


StepFn = Callable[[list[int], int], torch.Tensor]  # (tokens, how many last positions' logits)


@dataclass(frozen=True)
class Healing:
    """Token healing: the prompt's last token (`token_id`, text `text`) may be re-chosen.

    The engine prefills the whole prompt and asks for the logits of the last two positions: the
    first token is sampled from the logits *before* the healed token, restricted to `mask` (tokens
    starting with `text`). When the model picks the prompt's own token (the usual case) the logits
    after it are already there, so healing costs no extra forward pass; otherwise `rewind(1)` drops
    it from the KV cache and the chosen token is run instead.
    """

    token_id: int
    text: str
    mask: torch.Tensor
    rewind: Callable[[int], None]


def _prefill_pieces(tail: list[int], chunk: int, last_needed: int) -> list[list[int]]:
    """Chunks of `tail` (chunks keep cancellation responsive); the last holds `last_needed` tokens."""
    pieces = [tail[i : i + chunk] for i in range(0, len(tail), chunk)]
    if len(pieces) > 1 and len(pieces[-1]) < last_needed:
        move = last_needed - len(pieces[-1])
        pieces[-2:] = [pieces[-2][:-move], pieces[-2][-move:] + pieces[-1]]
    return pieces


class PromptLookup:
    """Draft tokens for speculative decoding, looked up in the text itself ("prompt lookup").

    Prose and code repeat names and phrases: when the last `ngram` tokens occurred before, the
    tokens that followed them then are a good guess for what follows now. The guess is only a
    draft: `generate` checks every drafted token against the model's own choice, so the output is
    exactly what one-token-at-a-time greedy decoding gives. An index from each n-gram to where it
    last occurred keeps a lookup O(1).
    """

    def __init__(self, tokens: list[int], ngrams: tuple[int, ...] = (3, 2)):
        self.ngrams = ngrams
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        # the n-grams that end just before the previous last token now have a continuation
        tokens, end = self.tokens, len(self.tokens)
        tokens.append(token)
        for n in self.ngrams:
            if end >= n:
                self.index[tuple(tokens[end - n: end])] = end

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the current tail."""
        if limit <= 0:
            return []
        for n in self.ngrams:
            if len(self.tokens) >= n:
                found = self.index.get(tuple(self.tokens[-n:]))
                if found is not None:
                    return self.tokens[found: found + limit]
        return []


def generate(step: StepFn, prompt_tail: list[int], *, decode: Callable[[list[int]], str],
             options: GenerationOptions, eos_ids: frozenset[int], timings: Timings,
             history: list[int] | None = None, healing: Healing | None = None,
             cancel: CancelToken | None = None, max_new: int | None = None,
             prefill_chunk: int = 2048, rewind: Callable[[int], None] | None = None,
             max_draft: int = 0, started: float | None = None) -> Iterator[TokenEvent]:
    """Prefill `prompt_tail` through `step` (which appends to the KV cache), then decode.

    Returns (as the generator's return value) the `Completion`. `timings` is filled in place;
    its queue_ms must already be set by the caller, `tokens_reused` too; `started` is when the
    caller began on the request (TTFT counts from there; default: now). `history` is the prompt's
    token ids (for the repetition penalty and draft lookup). With `healing`, the last prefill step
    asks for the logits of two positions (before and after the healed token) whatever the length of
    `prompt_tail`, and the healed token's text is not part of the returned text.

    With `max_draft` > 0 and `rewind` (drops the last n tokens from the KV cache), greedy decoding
    is speculative: each forward pass also runs up to `max_draft` tokens drafted by `PromptLookup`
    and keeps those the model agrees with, so one pass can yield several tokens. A pass over a few
    tokens costs little more than over one (decode is bound by reading the weights), and the
    tokens are the same as without drafts. When generation ends the KV cache holds the prompt and
    every generated token but the last, with or without drafts.
    """
    began = time.perf_counter()
    started = began if started is None else started
    timings.prepare_ms = (began - started) * 1000
    rng = None
    if options.temperature > 0 and options.seed is not None:
        rng = torch.Generator().manual_seed(options.seed)
    budget = options.max_tokens if max_new is None else min(options.max_tokens, max_new)
    n_last = 2 if healing is not None else 1
    pieces = _prefill_pieces(prompt_tail, prefill_chunk, n_last)
    logits = None
    for i, piece in enumerate(pieces):
        if cancel is not None and cancel.cancelled:
            return _finish([], "", "cancelled", timings, started, started)
        logits = step(piece, n_last if i == len(pieces) - 1 else 1)
    assert logits is not None, "prompt_tail must not be empty"
    timings.tokens_prefilled = len(prompt_tail)
    timings.prefill_ms = (time.perf_counter() - began) * 1000
    first_token_at = time.perf_counter()
    heal = healing.text if healing is not None else ""
    ids: list[int] = []
    text = ""
    reason = "max-tokens"
    need_forward = False
    speculate = max_draft > 0 and rewind is not None and options.temperature < GREEDY_BELOW
    lookup: PromptLookup | None = None  # built at the first decode pass (a keystroke may need none)
    recent_history = (history or [])[-options.repetition_window:]
    drafted: list[int] = []  # drafted tokens in the KV cache whose check is still to come
    ready: list[torch.Tensor] = []  # the logits after each of them
    fed = 0  # generated tokens (and drafts) fed to the KV cache
    for index in range(budget):
        if need_forward:
            if cancel is not None and cancel.cancelled:
                reason = "cancelled"
                break
            if speculate and lookup is None:
                lookup = PromptLookup((history or prompt_tail) + ids)
            drafted = lookup.draft(min(max_draft, budget - index - 1)) if lookup is not None else []
            logits = step(ids[-1:] + drafted, 1 + len(drafted))
            fed += 1 + len(drafted)
            if drafted:
                logits, *ready = logits
        recent = (recent_history + ids)[-options.repetition_window:]
        if index == 0 and healing is not None:
            token = sample(logits[0], options, rng, recent, healing.mask)
            if token == healing.token_id:
                logits, need_forward = logits[1], False  # its successor's logits are ready
            else:
                healing.rewind(1)
                need_forward = True
        else:
            token = sample(logits, options, rng, recent)
            need_forward = True
            if drafted and token == drafted[0]:  # the draft was right: the next logits are ready
                drafted.pop(0)
                timings.drafts_accepted += 1
                logits, need_forward = ready.pop(0), False
            elif drafted:  # wrong from here on: forget the rest of the draft
                rewind(len(drafted))
                fed -= len(drafted)
                drafted, ready = [], []
        if lookup is not None:
            lookup.append(token)
        if index == 0:
            first_token_at = time.perf_counter()
            timings.ttft_ms = timings.queue_ms + (first_token_at - started) * 1000
        if token in eos_ids:
            reason = "eos"
            break
        ids.append(token)
        new_text = decode(ids)
        new_text = new_text[len(heal):] if new_text.startswith(heal) else new_text
        if new_text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            continue
        cut = cut_at_stop(new_text, options)
        if cut is not None:
            if len(cut) > len(text):
                yield TokenEvent(cut[len(text):], cut, token, index)
            text = cut
            reason = "stop-rule"
            break
        if len(new_text) > len(text):
            yield TokenEvent(new_text[len(text):], new_text, token, index)
        text = new_text
    else:
        if budget < options.max_tokens:
            reason = "window"
    surplus = fed - max(len(ids) - 1, 0)  # unchecked drafts, or a checked one after the last token
    if surplus > 0 and rewind is not None:
        rewind(surplus)
    return _finish(ids, text, reason, timings, started, first_token_at)


def _finish(ids: list[int], text: str, reason: str, timings: Timings, started: float,
            first_token_at: float) -> Completion:
    now = time.perf_counter()
    timings.tokens_generated = len(ids)
    timings.decode_ms = (now - first_token_at) * 1000 if ids else 0.0
    timings.total_ms = timings.queue_ms + (now - started) * 1000
    return Completion(text.rstrip("\ufffd"), ids, reason, timings)
