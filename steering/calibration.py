"""Calibrated strength: find the push along a direction that is noticeable and still fluent.

Why per direction: the same push along two directions does very different things (one feature
barely changes the text at a push another needs only a third of to loop "the the the"). For a
direction we try a few pushes on held-out neutral prompts, continue each as the engine does, and read
- presence: for a described concept, how much likelier the *unsteered* model finds the continuation
  with the description written in front of it; for a feature or vector, how far the continuation,
  read back by the unsteered model, lies along the direction at its layer (no lexicon needed);
- fluency: perplexity of the continuation under the unsteered model, and repeated 3-grams.
The chosen push is the strongest one that still raises presence, keeps perplexity within
`MAX_PPL_RATIO` of unsteered and repetition at most unsteered's (+ a small margin); presence grows
with the push, so that is the most concept the fluency budget allows. It becomes "strength 1".
Results are stored per model/reference under the user's cache dir (`CalibrationStore`) or in a
concept vector's metadata.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .batch import BatchRunner
from .files import write_atomically
from .steering import LayerEdit

GRID = (0.25, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5)  # multiples of the default push that are tried
MAX_PPL_RATIO = 1.5  # the fluency budget: perplexity under the unsteered model at most 1.5x unsteered
REP_MARGIN = 0.05  # the eval target: repetition at most unsteered + 0.05
TOKENS = 24
CALIBRATION_PROMPTS = [  # held out from the eval's prompts; full sentences, as in a real document
    "Yesterday afternoon I finally had some time to myself, so I",
    "The plan for next week is simple: first we finish the report, and then",
    "He put down his cup, looked at the clock on the wall and",
    "We arrived a few minutes early, so we sat in the car and",
    "When I think back on that summer, what I remember most is",
    "The email from my manager came in just before lunch. It said that",
]


@dataclass
class Calibration:
    multiplier: float  # of the default push: strength 1 becomes this many default pushes
    table: list[dict]  # per tried multiplier: ppl, ppl ratio, rep3, presence
    examples: list[str] = field(default_factory=list)  # continuations at the chosen multiplier (what it does)


def calibrate(engine, pushes: dict[int, torch.Tensor], read_layer: int | None = None,
              read_direction: torch.Tensor | None = None, description: str | None = None,
              prompts: Sequence[str] = CALIBRATION_PROMPTS, runner: BatchRunner | None = None,
              grid: Sequence[float] = GRID) -> Calibration:
    """Pick the multiple of `pushes` (residual delta per layer at the default strength 1) that puts
    the most of the concept into the text while staying fluent. Presence: with a `description`, how
    much likelier the continuation is when the description is written in front of the prompt
    (nats per token; it reads what the words say, for any description); else how far the
    continuation lies along `read_direction` at `read_layer`."""
    from .distill import PROMPT_TEMPLATE
    from .steer_eval import rep3

    runner = runner or BatchRunner(engine.model, engine.hooks, engine.special_ids)
    ids = [engine.tokenize(p) for p in prompts]
    multiples = [0.0, *grid]
    rows = [(m, p) for m in multiples for p in ids]
    plan = {layer: LayerEdit(add=torch.stack([m * delta.float() for m, _ in rows])[:, None, :])
            for layer, delta in pushes.items()}
    outs = runner.generate([p for _, p in rows], TOKENS, plan, sorted(engine.eos_ids))
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
    base = stats[0.0]
    ok = [s for m, s in stats.items() if m > 0 and s["ppl"] <= MAX_PPL_RATIO * base["ppl"]
          and s["rep3"] <= base["rep3"] + REP_MARGIN and s["presence"] > base["presence"]]
    # presence grows with the push (on 6 prompts it is noisy step to step): the strongest fluent push
    best = max(ok, key=lambda s: s["multiplier"]) if ok else stats[min(grid)]
    table = [{**s, "ppl_ratio": s["ppl"] / base["ppl"]} for s in stats.values()]
    examples = [prompts[j] + engine.detokenize(outs[i])
                for j, i in enumerate(i for i, (m, _) in enumerate(rows) if m == best["multiplier"])][:3]
    return Calibration(best["multiplier"], table, examples)


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
        return f"{model}|{ref}|{layer}"

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
