"""The engine: one loaded model, its tokenizer, per-document prefix caches and steering.

Usable without any editor:

    engine = Engine.load("default")
    result = engine.complete(CompletionRequest(doc_id="notes.md", text="The sea was"))
    print(result.text, result.timings.ttft_ms)

`stream()` yields `TokenEvent`s and returns the `Completion`; it runs one forward pass per
`next()`, so callers can interleave or cancel generations between tokens. Calls are serialized by
a lock: two cores are better spent on one generation at a time.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import model as model_loading
from .context import ContextPolicy, select_window
from .generate import CancelToken, Completion, GenerationOptions, Healing, Timings, TokenEvent, generate
from .llama import LlamaModel, load_llama
from .prefix_cache import PrefixCache
from .steering import SteeringHooks, SteeringPlan, steer_mask, writes_differently
from .threads import ThreadPolicy
from .tokenizer import TypingTokenizer, load_fast_tokenizer

# Prompt-lookup draft tokens checked per decode pass (0: no speculative decoding). Off: with the C
# layers a one-token pass is cheap and a four-token one costs ~1.6x, so rejected drafts cost more
# than accepted ones save (greedy decode, 48 tokens: bench prose 185 tok/s without drafts, 145 with
# 3; repeated names 211 vs 203; code 206 vs 197).
DRAFT_TOKENS = 0


@dataclass
class CompletionRequest:
    """Continue `text` (everything before the cursor) for document `doc_id`."""

    text: str
    doc_id: str = "default"
    options: GenerationOptions = field(default_factory=GenerationOptions)
    steering: SteeringPlan | None = None
    queued_at: float | None = None  # time.perf_counter() when the request was queued (for queue_ms)


@dataclass(frozen=True)
class EngineInfo:
    model: str
    folder: str
    dtype: str
    threads: int
    layers: int
    d_model: int
    vocab: int
    max_positions: int
    weight_bytes: int
    load_s: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Engine:
    """Model + tokenizer + prefix caches + steering hooks."""

    def __init__(self, model: LlamaModel, tokenizer, *, name: str = "custom", folder: Path | None = None,
                 context: ContextPolicy | None = None, cache_budget_mb: int = 256, load_s: float = 0.0):
        self.model = model
        self.tokenizer = tokenizer
        self.context = context or ContextPolicy()
        self.caches = PrefixCache(cache_budget_mb * 2**20, lambda: model.new_cache(256))
        self.hooks = SteeringHooks(model.layers)
        self.draft_tokens = DRAFT_TOKENS
        self.threads = ThreadPolicy(torch.get_num_threads())
        self._lock = threading.RLock()
        self._resolver: Callable[[SteeringPlan], object] | None = None
        self._vocab_text: list[str] | None = None
        self._vocab_by_text: tuple[list[str], torch.Tensor] | None = None
        self.typing = TypingTokenizer(self.tokenize)  # per document: re-tokenizes only the end
        # tokens steering leaves alone (BOS/EOS and the chat markers)
        self.special_ids = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        self.eos_ids = frozenset(
            i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>"))
            if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id
        )
        cfg = model.cfg
        self.info = EngineInfo(
            model=name, folder=str(folder or ""),
            dtype="+".join(filter(None, (model_loading.dtype_name(model.dtype), getattr(model, "quantized", "")))),
            threads=torch.get_num_threads(), layers=cfg.n_layers, d_model=cfg.dim, vocab=cfg.vocab_size,
            max_positions=cfg.max_positions, weight_bytes=model.weight_bytes(), load_s=load_s,
        )

    @classmethod
    def load(cls, model: str | None = "default", *, dtype: str | None = "auto", threads: int | None = None,
             context_tokens: int = 1024, cache_budget_mb: int = 256,
             progress: model_loading.ProgressFn | None = None) -> Engine:
        """Load a model by name ("default", a folder, a GGUF file or a cached HF id)."""
        started = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        torch_dtype = model_loading.pick_dtype(dtype)
        folder = model_loading.local_folder(model, progress)
        if progress:
            progress("loading weights", 0.9)
        weights = model_loading.weight_mode(dtype)
        try:
            llama = load_llama(folder, torch_dtype, weights)
        except (ValueError, KeyError) as exc:
            raise model_loading.ModelError(f"cannot load {model}: {exc}") from exc
        tokenizer = load_fast_tokenizer(folder)
        engine = cls(llama, tokenizer, name=str(model or "default"), folder=folder,
                     context=ContextPolicy(max_tokens=context_tokens), cache_budget_mb=cache_budget_mb,
                     load_s=time.perf_counter() - started)
        if progress:
            progress("ready", 1.0)
        return engine

    # -- tokens -----------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # -- steering ---------------------------------------------------------------------------
    def set_steering_resolver(self, resolver: Callable[[SteeringPlan], object]) -> None:
        """How plans become tensors (a `FeatureLibrary`-backed function from the steering module)."""
        self._resolver = resolver

    def resolve(self, plan: SteeringPlan | None):
        if plan is None or plan.is_empty():
            return None
        if self._resolver is None:
            from .library import default_resolver

            self._resolver = default_resolver(self)
        return self._resolver(plan)

    # -- generation -------------------------------------------------------------------------
    def stream(self, request: CompletionRequest,
               cancel: CancelToken | None = None) -> Generator[TokenEvent, None, Completion]:
        """Continue `request.text`, yielding text as it appears; returns the `Completion`.

        TTFT counts from here (tokenizing, token healing and the cache lookup included): it is
        what the user waits for."""
        started = time.perf_counter()
        request.options.validate()
        plan = request.steering or SteeringPlan()
        resolved = self.resolve(plan)  # validate before any work, errors reach the caller
        timings = Timings()
        if request.queued_at is not None:
            timings.queue_ms = (started - request.queued_at) * 1000
        window = select_window(request.text, lambda text: self.typing(request.doc_id, text), self.context)
        ids = window.ids
        if not ids:  # empty document: start from the beginning-of-text token
            ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else 0]
        heal, heal_mask = self.healing(ids)
        key = (request.doc_id, plan.cache_key())
        with self._lock:
            cache, reused = self.caches.checkout(key, ids, logits_after=len(ids) - 1 if heal else None)
        timings.tokens_reused = reused
        room = self.model.cfg.max_positions - len(ids)
        self.threads.update()  # fewer threads while other processes keep cores busy

        # Once the prompt is in the cache every later forward runs tokens the model writes (steering
        # may push those less, `LayerEdit.written`); `read_end`: where the text it read ends in the cache.
        writing, read_end = False, len(ids)

        def step(chunk: list[int], n_logits: int) -> torch.Tensor:
            nonlocal writing
            # logits of positions before `chunk` (healing after a one-token edit) are in the cache
            held = [cache.logits_after[cache.length + 1 - i] for i in range(n_logits - len(chunk), 0, -1)]
            mask = None if resolved is None else steer_mask(chunk, cache.length, self.special_ids)
            with self._lock, self.hooks.active(resolved, mask, writing):
                self.threads.apply()
                logits = self.model(chunk, cache, n_logits - len(held))
            if cache.length == len(ids):  # the prompt's end: the next keystroke may heal from here
                cache.keep_logits(logits)
            writing = writing or cache.length >= len(ids)
            return torch.cat([torch.stack(held), logits.view(-1, logits.shape[-1])]) if held else logits

        def rewind(n: int) -> None:
            nonlocal read_end
            cache.truncate(cache.length - n)
            read_end = min(read_end, cache.length)  # healing re-chose the prompt's last token: written now

        healing = Healing(ids[-1], heal, heal_mask, rewind) if heal else None
        try:
            completion = yield from generate(
                step, ids[reused:], decode=self.detokenize, options=request.options, eos_ids=self.eos_ids,
                timings=timings, history=ids, healing=healing, cancel=cancel, max_new=max(room, 1),
                rewind=rewind, max_draft=self.draft_tokens, started=started,
            )
        finally:  # (also when the caller stops reading) the KV of written tokens is not what reading
            if writes_differently(resolved):  # them would give: keep only the text read for reuse
                cache.truncate(min(cache.length, read_end))
        completion.steering = plan.describe()
        self.caches.enforce_budget(keep=key)
        return completion

    def complete(self, request: CompletionRequest, cancel: CancelToken | None = None,
                 on_token: Callable[[TokenEvent], None] | None = None) -> Completion:
        """Run `stream` to the end."""
        gen = self.stream(request, cancel)
        while True:
            try:
                event = next(gen)
            except StopIteration as done:
                return done.value
            if on_token is not None:
                on_token(event)

    # -- token healing ----------------------------------------------------------------------
    def healing(self, ids: list[int]) -> tuple[str, torch.Tensor | None]:
        """("text of the last token", mask of tokens starting with it) when the last token should heal.

        Why: a prompt that ends inside a word or with a space ("She opened the door and ") ends
        on a token the model rarely saw in that position ("▁" alone), and it continues badly
        ("10 feet."). Dropping that token and letting the model re-choose a token that starts with
        the same text fixes it. Line breaks and special tokens are left alone.
        """
        if len(ids) < 2 or ids[-1] in self.eos_ids or ids[-1] == self.tokenizer.bos_token_id:
            return "", None
        text = self.vocab_text()[ids[-1]]
        if not text or "\ufffd" in text or "\n" in text or text.strip() and not text.strip().isalnum():
            return "", None
        texts, order = self._vocab_sorted()
        # every token whose text starts with `text` sits in one run of the sorted texts
        lo = bisect.bisect_left(texts, text, key=lambda t: t[: len(text)])
        hi = bisect.bisect_right(texts, text, lo, key=lambda t: t[: len(text)])
        mask = torch.zeros(len(texts), dtype=torch.bool)
        mask[order[lo:hi]] = True
        return text, mask

    def _vocab_sorted(self) -> tuple[list[str], torch.Tensor]:
        """The token texts in sorted order and their ids: the tokens that start with a given text
        are one run of it, found by bisection (a scan of the vocabulary took 3-6 ms per keystroke)."""
        if self._vocab_by_text is None:
            texts = self.vocab_text()
            order = sorted(range(len(texts)), key=texts.__getitem__)
            self._vocab_by_text = ([texts[i] for i in order], torch.tensor(order, dtype=torch.long))
        return self._vocab_by_text

    def vocab_text(self) -> list[str]:
        """The text of every token id, decoded once (for token healing)."""
        if self._vocab_text is None:
            size = self.model.cfg.vocab_size
            self._vocab_text = [self.tokenizer.decode([i], skip_special_tokens=False) for i in range(size)]
        return self._vocab_text

    def forget(self, doc_id: str) -> None:
        self.caches.drop(doc_id)
        self.typing.forget(doc_id)
