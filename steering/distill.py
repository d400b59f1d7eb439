"""Concept vectors distilled from prompting: steer plain text so it reads as if the description came first.

Why this method: writing the concept into the prompt ("The following text is about gardening.")
is what a model follows best — published comparisons (AxBench) rank prompting above every steering
method on concept and fluency together — but a prompt is text in front of the user's document that
the user did not write, it cannot be turned down or pushed the other way, and it costs a prefill of
its own. A vector can do what the prompt does from inside the model: on a few neutral sentences,
make the steered model's next-token distributions on the plain text match those the unsteered model
has with the description in front (KL(prompted ‖ steered) at every position), by gradient over one
add per concept layer, each capped at a share of that layer's typical residual norm.

Measured on `steer eval`'s 24 concepts x 6 prompts (32 tokens, the engine's decoding): the previous
method (DiffMean of the model's own texts "about X", `concepts.py`) hit 8 % of continuations at 1.25x
the unsteered perplexity and 24 % at 1.55x; distilled vectors at layers 16-28, 62 % at 1.48x and 74 %
at 1.58x (prompting itself: 60 % at 1.53x). They are nearly orthogonal to the DiffMean directions
(cosine 0.0-0.2), which is why no rescaling of those could get there. Two choices matter: train for
the push that will be used (a small cap, `CAP`: on 8 concepts, trained with a cap of 1 and used at
half of it, 35 % at 1.66x; trained and used at 0.25, 44 % at 1.50x), and the later layers (see
`concepts.concept_layers`). The teacher's distributions get a repetition penalty on tokens already in
the text: a prompted 135M model loops on its topic, and the vector should not learn the loop (on 8
concepts, 44 vs 33 % hits at equal perplexity with and without it). Tried and no better at equal
perplexity (8 concepts): a guided teacher (prompted + g x (prompted - plain), g 0.5 or 1: stronger at
the same push, on the same hit/perplexity curve), reverse KL (mode-seeking: 40 vs ~52 % at 1.41x), a
mixture of three prompt templates (56 vs ~62 % at 1.51x), and steering only the generated tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .batch import BatchRunner, Prefix
from .steering import LayerEdit

PROMPT_TEMPLATE = "The following text is {description}.\n\n"  # the teacher: the description as a preface
STEPS = 6
CAP = 0.25  # the push trained for: each layer's add at most CAP x its residual norm / number of layers
REPEAT_PENALTY = 1.5  # logit penalty on the teacher for tokens already in the text
LEARNING_RATE = 0.025  # Adam's step, as a fraction of a layer's cap
FIT_STEPS = 8  # `fit_weights`: Adam steps over a few directions' weights
FIT_LEARNING_RATE = 0.1  # its step, as a fraction of the push's budget
WORD_BONUS = 3.0  # `fit_weights`: logit bonus on the teacher for the tokens of the description's own words


def _position_logprobs(model, x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Log-probabilities [N, vocab] at the last `lengths[i]` positions of each left-padded row of `x`,
    the first position of each text left out (steering never touches it)."""
    h = torch.cat([x[i, x.shape[1] - n + 1:] for i, n in enumerate(lengths)])
    return torch.log_softmax(model.lm_head(model.norm(h)).float(), -1)


def _penalized(logp: torch.Tensor, texts: Sequence[Sequence[int]], penalty: float) -> torch.Tensor:
    """`logp` with `penalty` taken off the logit of every token already seen at each position."""
    if not penalty:
        return logp
    seen = torch.zeros_like(logp, dtype=torch.bool)
    row = 0
    for ids in texts:
        hits = torch.zeros(len(ids), logp.shape[-1], dtype=torch.bool)
        hits[torch.arange(len(ids)), torch.tensor(list(ids))] = True
        seen[row:row + len(ids) - 1] = hits.cummax(0).values[1:]
        row += len(ids) - 1
    return torch.log_softmax(logp - penalty * seen.float(), -1)


def _usable(texts: Sequence[Sequence[int]]) -> list[list[int]]:
    texts = [list(t) for t in texts if len(t) >= 2]
    if not texts:
        raise ValueError("distilling needs texts of at least two tokens")
    return texts


def _steered_logprobs(runner: BatchRunner, texts: list[list[int]], adds: dict[int, torch.Tensor] | None,
                      start: Prefix | None = None) -> torch.Tensor:
    """Log-probabilities at `texts`' positions pushed by `adds`; `start`: `texts` already run up to
    the first layer pushed (`BatchRunner.prefix`), so each step of a search runs only the rest."""
    plan = {la: LayerEdit(add=v) for la, v in adds.items()} if adds else None
    x, _ = runner.hidden_from(start, plan) if start is not None else runner.hidden(texts, plan)
    return _position_logprobs(runner.model, x, [len(t) for t in texts])


def _prompted_targets(runner: BatchRunner, head: list[int], texts: list[list[int]], penalty: float,
                      word_ids: Sequence[int] = (), word_bonus: float = 0.0) -> torch.Tensor:
    """The teacher: the model's next-token log-probabilities on `texts` with `head` in front, less
    `penalty` on tokens already seen, plus `word_bonus` on the logits of `word_ids`."""
    with torch.no_grad():
        x, _ = runner.hidden([head + t for t in texts])
        logp = _penalized(_position_logprobs(runner.model, x, [len(t) for t in texts]), texts, penalty)
        if word_ids and word_bonus:
            bonus = torch.zeros(logp.shape[-1])
            bonus[list(word_ids)] = word_bonus
            logp = torch.log_softmax(logp + bonus, -1)
        return logp


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def _head(tokenizer, description: str) -> list[int]:
    return tokenizer(PROMPT_TEMPLATE.format(description=description), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def kl_to_prompted(model, tokenizer, description: str, texts: Sequence[Sequence[int]],
                   adds: dict[int, torch.Tensor] | None = None, special_ids: Sequence[int] = ()) -> float:
    """Mean KL(prompted ‖ plain, steered by `adds`) over the positions of `texts`: how far steering
    is from doing what writing the description in front does (no repetition penalty)."""
    texts = _usable(texts)
    runner = BatchRunner(model, special_ids=special_ids)
    teacher = _prompted_targets(runner, _head(tokenizer, description), texts, 0.0)
    return float(_kl(teacher, _steered_logprobs(runner, texts, adds)))


@torch.inference_mode(False)  # gradients, whatever mode the caller is in
def distill_pushes(model, tokenizer, description: str, texts: Sequence[Sequence[int]],
                   resid_norms: dict[int, float], special_ids: Sequence[int] = (),
                   steps: int = STEPS, cap: float = CAP,
                   penalty: float = REPEAT_PENALTY, lr: float = LEARNING_RATE) -> dict[int, torch.Tensor]:
    """Residual adds per layer (keys of `resid_norms`) that make plain `texts` (token ids, each ≥ 2)
    continue as the model does after `PROMPT_TEMPLATE` with `description`, starting from nothing."""
    texts = _usable(texts)
    runner = BatchRunner(model, special_ids=special_ids)
    teacher = _prompted_targets(runner, _head(tokenizer, description), texts, penalty)
    layers = sorted(resid_norms)
    budget = {la: cap * resid_norms[la] / len(layers) for la in layers}
    adds = {la: torch.zeros(model.cfg.dim, requires_grad=True) for la in layers}
    opt = torch.optim.Adam([adds[la] for la in layers], lr=lr * min(budget.values()))
    start = runner.prefix(texts, layers[0])
    for _ in range(steps):
        with torch.enable_grad():
            loss = _kl(teacher, _steered_logprobs(runner, texts, adds, start))
            opt.zero_grad()
            loss.backward()
        opt.step()
        with torch.no_grad():
            for la, v in adds.items():
                v.mul_(min(1.0, budget[la] / max(float(v.norm()), 1e-12)))
    return {la: v.detach() for la, v in adds.items()}


@torch.inference_mode(False)  # gradients, whatever mode the caller is in
def fit_weights(model, tokenizer, description: str, texts: Sequence[Sequence[int]], directions: torch.Tensor,
                layers: Sequence[int], budget: float, special_ids: Sequence[int] = (), steps: int = FIT_STEPS,
                penalty: float = REPEAT_PENALTY, lr: float = FIT_LEARNING_RATE,
                word_ids: Sequence[int] = (), word_bonus: float = WORD_BONUS,
                stop: Callable[[], bool] = lambda: False) -> tuple[torch.Tensor | None, list[float]]:
    """Non-negative weights w [n] for `directions` [n, d] such that pushing plain `texts` by
    ``w @ directions``, shared out evenly over `layers`, makes them continue as the model does after
    `PROMPT_TEMPLATE` with `description` (the `distill_pushes` objective, over a few chosen directions
    instead of a free vector per layer; the push's norm at most `budget`), and the divergence at each
    step (the weights returned are those where it was lowest). Why: it says how much of the push
    each of a few SAE features should get, where pointing the same way as the gradient says only
    which ones help at all. The teacher also gets `word_bonus` on `word_ids`, the tokens that begin
    the description's own words (`features._query_tokens`): a
    135M model told "about history" rarely writes "history", and weights fitted to the prompt alone
    favour features that make any text a story over the one that writes the concept (`steer eval
    --quick`, strength 1, without / with a bonus of 3: main set 49 % at 1.50x / 58 % at 1.50x,
    held-out 51 % at 1.54x / 49 % at 1.49x, 20 concepts neither has 27 % at 1.46x / 37 % at 1.49x;
    a bonus of 6: 34 % at 1.48x there). `stop` is asked before every step: once true, the fit ends
    with no weights (None; a search that a newer one has overtaken)."""
    texts = _usable(texts)
    runner = BatchRunner(model, special_ids=special_ids)
    teacher = _prompted_targets(runner, _head(tokenizer, description), texts, penalty, word_ids, word_bonus)
    directions = directions.float()
    w = torch.zeros(directions.shape[0], requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr * budget)
    losses: list[float] = []
    best = (float("inf"), w.detach().clone())
    start = runner.prefix(texts, min(layers))
    for step in range(steps + 1):
        if stop():
            return None, losses
        with torch.enable_grad() if step < steps else torch.no_grad():
            push = (w @ directions) / len(layers)
            loss = _kl(teacher, _steered_logprobs(runner, texts, dict.fromkeys(layers, push), start))
        losses.append(float(loss.detach()))
        if losses[-1] < best[0]:  # Adam overshoots now and then: keep the weights that did best
            best = (losses[-1], w.detach().clone())
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            w.clamp_(min=0.0)
            w.mul_(min(1.0, budget / max(float((w @ directions).norm()), 1e-12)))
    return best[1], losses
