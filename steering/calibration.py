"""Calibrated strength: find the push along a direction that is noticeable and still fluent.

Why per direction: the same push along two directions does very different things (one feature
barely changes the text at a push another needs only a third of to loop "the the the"). For a
direction we try a few pushes on held-out neutral prompts, continue each as the engine does, and read
- presence: for a described concept, how much likelier the *unsteered* model finds the continuation
  with the description written in front of it; for a feature or vector, how far the continuation,
  read back by the unsteered model, lies along the direction at its layer (no lexicon needed);
- fluency: perplexity of the continuation under the unsteered model, and repeated 3-grams.
The chosen push is where the perplexity ratio, fitted over the pushes tried (log ratio a·m + b·m² in
the push m: six or eight prompts make each point noisy), reaches `MAX_PPL_RATIO`, no further than the
strongest push that keeps repetition at most unsteered's (+ a small margin) and raises presence;
presence grows with the push, so that is the most concept the fluency budget allows. A fitted
crossing instead of the strongest passing grid point: the grid's steps are ~0.1 of perplexity ratio
apart, so the strongest passing point sat on average half a step under the budget. It becomes
"strength 1". Results are stored per model/reference under the user's cache dir
(`CalibrationStore`) or in a concept vector's metadata.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .batch import BatchRunner
from .distill import PROMPT_TEMPLATE
from .files import write_atomically
from .steering import LayerEdit

GRID = (0.25, 0.5, 0.75, 1.0, 1.5)  # multiples of the default push that are tried
CONCEPT_GRID = (0.5, 0.75, 1.0, 1.25)  # for a described concept: multiples of the push it was trained at
MAX_PPL_RATIO = 1.5  # the fluency budget: perplexity under the unsteered model at most 1.5x unsteered
REP_MARGIN = 0.05  # the eval target: repetition at most unsteered + 0.05
# Fluency is judged over a continuation as long as `steer eval`'s: the perplexity ratio shrinks as a
# continuation goes on (its first tokens carry the turn to the concept; prompting's own ratio on these
# prompts is 1.82x over 24 tokens, 1.69x over 32), so a shorter window holds strength 1 below the
# budget the eval measures.
TOKENS = 40
METHOD = "curve-crossing-40"  # stored with every calibration: one made by another rule is made again
CALIBRATION_PROMPTS = [  # held out from the eval's prompts and the neutral contexts; openings of prose
    "On Saturday morning I woke up early and",
    "The first thing you notice when you walk in is",
    "Before we left the house, she",
    "Last summer my brother and I",
    "The room was quiet when",
    "I have always wanted to",
    "The bus was late again, so",
    "The best part of the trip was",
]


def rep3(text: str) -> float:
    """Share of word 3-grams that already occurred earlier in the text ("the the the" loops;
    `steer eval` reports it too)."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


@dataclass
class Calibration:
    multiplier: float  # of the default push: strength 1 becomes this many default pushes
    table: list[dict]  # per tried multiplier: ppl, ppl ratio, rep3, presence
    examples: list[str] = field(default_factory=list)  # continuations at the chosen multiplier (what it does)


def calibrate(engine, pushes: dict[int, torch.Tensor], read_layer: int | None = None,
              read_direction: torch.Tensor | None = None, description: str | None = None,
              prompts: Sequence[str] = CALIBRATION_PROMPTS, runner: BatchRunner | None = None,
              grid: Sequence[float] = GRID, tokens: int = TOKENS,
              written: dict[int, torch.Tensor] | None = None) -> Calibration:
    """Pick the multiple of `pushes` (residual delta per layer at the default strength 1; `written`:
    at the tokens the model writes, if not the same) that puts the most of the concept into the text
    while staying fluent. Presence: with a `description`, how
    much likelier the continuation is when the description is written in front of the prompt
    (nats per token; it reads what the words say, for any description); else how far the
    continuation lies along `read_direction` at `read_layer`."""
    runner = runner or BatchRunner(engine.model, engine.hooks, engine.special_ids)
    ids = [engine.tokenize(p) for p in prompts]
    multiples = [0.0, *grid]
    rows = [(m, p) for m in multiples for p in ids]
    def per_row(delta: torch.Tensor) -> torch.Tensor:
        return torch.stack([m * delta.float() for m, _ in rows])[:, None, :]

    plan = {layer: LayerEdit(add=per_row(delta), written=per_row(written[layer]) if written else None)
            for layer, delta in pushes.items()}
    outs = runner.generate([p for _, p in rows], tokens, plan, sorted(engine.eos_ids))
    outs = [[t for t in o if t not in engine.eos_ids] or [0] for o in outs]
    if description is not None:
        head = engine.tokenize(PROMPT_TEMPLATE.format(description=description))
        nll, _ = runner.score([p for _, p in rows], outs)
        prompted, _ = runner.score([head + p for _, p in rows], outs)
        presence = [a - b for a, b in zip(nll, prompted, strict=True)]
    else:
        nll, acts = runner.score([p for _, p in rows], outs, read_layer=read_layer)
        presence = [float((a @ read_direction.float()).mean()) for a in acts]
    stats = {}
    for m in multiples:
        idx = [i for i, (mm, _) in enumerate(rows) if mm == m]
        stats[m] = {
            "multiplier": m,
            "ppl": math.exp(statistics.fmean(nll[i] for i in idx)),
            "rep3": statistics.fmean(rep3(engine.detokenize(outs[i])) for i in idx),
            "presence": statistics.fmean(presence[i] for i in idx),
        }
    best = _fitted_multiplier(stats, min(grid))
    table = [{**s, "ppl_ratio": s["ppl"] / stats[0.0]["ppl"]} for s in stats.values()]
    shown = min(grid, key=lambda m: abs(m - best))  # the tried push nearest the chosen one
    examples = [prompts[j] + engine.detokenize(outs[i])
                for j, i in enumerate(i for i, (m, _) in enumerate(rows) if m == shown)][:3]
    return Calibration(best, table, examples)


def _fitted_multiplier(stats: dict[float, dict], floor: float) -> float:
    """Where the fitted log perplexity ratio reaches the budget, capped at the strongest push that
    keeps repetition and raises presence; `floor` when no push does both.

    The fit is ``a·m + b·m²`` (no push, no change): the ratio grows faster than linearly with the
    push (SAE features' tables, 8 prompts: ~1.1x at half the default push, ~1.5x at three quarters,
    ~2x at the full one, 3-5x at 1.25), so the straight line fitted before (with a free intercept)
    crossed the budget early: strength 1 sat ~13 % short of the push where the curve crosses, and at
    1.35x unsteered perplexity instead of the budget in `steer eval`."""
    base = stats[0.0]
    tried = sorted(m for m in stats if m > 0)
    usable = [m for m in tried if stats[m]["rep3"] <= base["rep3"] + REP_MARGIN
              and stats[m]["presence"] > base["presence"]]
    if not usable:
        return floor
    if len(tried) < 2:  # no curve through one point: the one push tried
        return max(usable)
    target = math.log(MAX_PPL_RATIO)
    log_ratio = [math.log(max(stats[m]["ppl"], 1e-9) / base["ppl"]) for m in tried]
    crossing = _crossing(tried, log_ratio, target)
    if crossing is None:  # perplexity does not grow with the push over the range tried
        return max(usable)
    return max(floor, min(crossing, max(usable)))


def _crossing(pushes: Sequence[float], log_ratio: Sequence[float], target: float) -> float | None:
    """The push where the least-squares ``a·m + b·m²`` through the points reaches `target` (a
    straight line through the origin when the fit curves down), None where it never grows."""
    s2, s3, s4 = (sum(m**k for m in pushes) for k in (2, 3, 4))
    t1, t2 = sum(m * y for m, y in zip(pushes, log_ratio, strict=True)), sum(
        m * m * y for m, y in zip(pushes, log_ratio, strict=True))
    det = s2 * s4 - s3 * s3
    a, b = ((t1 * s4 - t2 * s3) / det, (s2 * t2 - s3 * t1) / det) if det > 1e-12 else (t1 / s2, 0.0)
    if b > 1e-9:
        return (-a + math.sqrt(a * a + 4 * b * target)) / (2 * b)
    slope = t1 / s2
    return target / slope if slope > 0 else None


class CalibrationStore:
    """Calibrated pushes (fractions of the residual norm) per model, reference and layer, in a JSON file."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else _default_path()
        self._data: dict[str, float] | None = None

    def _load(self) -> dict[str, float]:
        if self._data is None:
            try:
                data = json.loads(self.path.read_text())
                self._data = {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}
            except (OSError, ValueError, AttributeError):
                self._data = {}
        return self._data

    @staticmethod
    def key(model: str, ref: str, layer: int) -> str:
        return f"{METHOD}|{model}|{ref}|{layer}"

    def get(self, model: str, ref: str, layer: int) -> float | None:
        return self._load().get(self.key(model, ref, layer))

    def set(self, model: str, ref: str, layer: int, fraction: float) -> None:
        data = self._load()
        data[self.key(model, ref, layer)] = float(fraction)
        text = json.dumps(data, indent=1, sort_keys=True)
        write_atomically(self.path, lambda tmp: tmp.write_text(text))


def _default_path() -> Path:
    env = os.environ.get("TINYMORPH_CACHE_DIR")
    if env:
        return Path(env) / "calibrations.json"
    import platformdirs

    return Path(platformdirs.user_cache_dir("tinymorph")) / "calibrations.json"
