"""Steering runtime: what to steer (`SteeringPlan`) and the forward hooks that do it.

A plan is pure data (feature references, modes, strengths) so it can travel through the config,
the LSP and the HTTP API and be part of the KV-cache key. `SteeringHooks` turns a resolved plan into
residual-stream edits on the decoder layers; it is installed once per model and reads the active
plan on every forward, so steering applies to the prompt and to every generated token.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

SteeringMode = Literal["add", "clamp", "ablate"]
MODES: tuple[str, ...] = ("add", "clamp", "ablate")


@dataclass(frozen=True)
class SteeringEntry:
    """One knob on the mixing desk: a feature (``"<sae>:<index>"`` or ``"vector:<name>"``)."""

    feature: str
    strength: float = 0.0
    mode: SteeringMode = "add"
    layer: int | None = None  # None: the SAE's (or vector's) own hook layer

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class SteeringPlan:
    """An ordered set of steering entries; empty means the unsteered model."""

    entries: tuple[SteeringEntry, ...] = ()

    def cache_key(self) -> str:
        """Stable digest of everything that changes hidden states (part of the KV-cache key)."""
        if not self.entries:
            return "none"
        blob = json.dumps([e.to_dict() for e in self.entries], sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def is_empty(self) -> bool:
        return not self.entries

    def describe(self) -> list[dict]:
        return [e.to_dict() for e in self.entries]


@dataclass
class LayerEdit:
    """Residual edits for one layer, already resolved to tensors."""

    add: torch.Tensor | None = None  # [d_model], summed `add` directions
    clamps: list[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, float]] = field(default_factory=list)
    # each clamp: (encoder column [d], decoder row [d], encoder bias, decoder bias [d], target value)


ResolvedPlan = dict[int, LayerEdit]


class SteeringHooks:
    """Forward hooks on decoder layers that apply the active `ResolvedPlan` to their output."""

    def __init__(self, layers: nn.ModuleList):
        self._layers = layers
        self._local = threading.local()
        self._handles = [layer.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(layers)]

    def _make_hook(self, index: int):
        def hook(_module, _inputs, output):
            plan: ResolvedPlan | None = getattr(self._local, "plan", None)
            if not plan or index not in plan:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = apply_layer_edit(hidden, plan[index])
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    @contextmanager
    def active(self, plan: ResolvedPlan | None) -> Iterator[None]:
        previous = getattr(self._local, "plan", None)
        self._local.plan = plan
        try:
            yield
        finally:
            self._local.plan = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def apply_layer_edit(hidden: torch.Tensor, edit: LayerEdit) -> torch.Tensor:
    """Apply one layer's edits to the residual stream `hidden` [batch, seq, d_model]."""
    if edit.add is not None:
        hidden = hidden + edit.add.to(hidden.dtype)
    for w_enc, w_dec, b_enc, b_dec, target in edit.clamps:
        x = hidden.float()
        act = torch.relu((x - b_dec) @ w_enc + b_enc)  # current feature activation
        hidden = (x + (target - act).unsqueeze(-1) * w_dec).to(hidden.dtype)
    return hidden
