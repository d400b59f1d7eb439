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
    scales: list[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, float]] = field(default_factory=list)
    # each scale: same tensors, but the feature's current value is multiplied by the last element
    # (ablate with strength s keeps (1 - s) of the feature; s = 1 removes it entirely)


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
    for w_enc, w_dec, b_enc, b_dec, factor in edit.scales:
        x = hidden.float()
        act = torch.relu((x - b_dec) @ w_enc + b_enc)
        hidden = (x + ((factor - 1.0) * act).unsqueeze(-1) * w_dec).to(hidden.dtype)
    return hidden


# -- resolving plans to tensors ------------------------------------------------------------------

MAX_STRENGTH = 20.0  # |strength| above this is surely a typo (strength 1 = the feature's max activation)


class SteeringError(ValueError):
    """A plan cannot be applied (unknown feature, bad strength, wrong layer); the message says why."""


@dataclass(frozen=True)
class FeatureHandle:
    """Everything the hooks need about one steerable direction (an SAE feature or a vector).

    `scale` is the size of "strength 1": the feature's max activation on the labelling corpus, or
    the norm of a vector's mean difference. `enc`/`b_enc`/`b_dec` read the feature's current value
    (for clamp/ablate); for vectors that value is the projection onto the unit direction.
    """

    ref: str
    layer: int
    direction: torch.Tensor  # [d_model], unit norm
    scale: float
    enc: torch.Tensor  # [d_model]
    b_enc: float
    b_dec: torch.Tensor  # [d_model]


def parse_feature_ref(ref: str) -> tuple[str, str]:
    """Split ``"<sae>:<index>"`` / ``"vector:<name>"`` into (source, key) or raise `SteeringError`."""
    source, sep, key = str(ref).rpartition(":")
    if not sep or not source or not key:
        raise SteeringError(f"bad feature id {ref!r}: use <sae>:<index> (e.g. default:123) or vector:<name>")
    if source != "vector" and not key.isdigit():
        raise SteeringError(f"bad feature id {ref!r}: the part after ':' must be a feature index")
    return source, key


class FeatureLibrary:
    """Named SAEs and steering vectors, loaded on first use and cached (an SAE is ~20 MB)."""

    def __init__(self, saes: dict[str, str] | None = None, vectors_dir=None):
        self._specs: dict[str, str] = {"default": "default", **(saes or {})}
        self._vectors_dir = vectors_dir
        self._saes: dict[str, object] = {}
        self._vectors: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def sae_names(self) -> list[str]:
        return list(self._specs)

    def sae(self, name: str):
        """The `LoadedSAE` called `name` (as configured in `[[sae]]`, or "default")."""
        from .sae import SAEError, load_sae

        with self._lock:
            if name not in self._saes:
                if name not in self._specs:
                    known = ", ".join(self._specs)
                    raise SteeringError(f"unknown SAE {name!r}; configured SAEs: {known}")
                try:
                    self._saes[name] = load_sae(self._specs[name], name=name)
                except SAEError as exc:
                    raise SteeringError(str(exc)) from exc
            return self._saes[name]

    def vector(self, name: str):
        from .vectors import VectorError, load_vector

        with self._lock:
            if name not in self._vectors:
                try:
                    self._vectors[name] = load_vector(name, self._vectors_dir)
                except VectorError as exc:
                    raise SteeringError(str(exc)) from exc
            return self._vectors[name]

    def handle(self, ref: str) -> FeatureHandle:
        source, key = parse_feature_ref(ref)
        if source == "vector":
            vec = self.vector(key)
            zero = torch.zeros_like(vec.direction)
            return FeatureHandle(ref, vec.layer, vec.direction, vec.scale, vec.direction, 0.0, zero)
        sae = self.sae(source)
        index = int(key)
        if not 0 <= index < sae.d_sae:
            raise SteeringError(f"unknown feature {ref!r}: SAE {source!r} has features 0..{sae.d_sae - 1}")
        return FeatureHandle(ref, sae.layer, sae.direction(index), sae.max_activation(index),
                             sae.encoder_column(index), sae.encoder_bias(index), sae.decoder_bias())


def validate_entry(entry: SteeringEntry) -> None:
    """Check mode and strength (not the feature: that needs the library)."""
    if entry.mode not in MODES:
        raise SteeringError(f"unknown mode {entry.mode!r} for {entry.feature}; use one of {', '.join(MODES)}")
    try:
        strength = float(entry.strength)
    except (TypeError, ValueError):
        raise SteeringError(f"strength for {entry.feature} must be a number, "
                            f"not {entry.strength!r}") from None
    if strength != strength or abs(strength) > MAX_STRENGTH:
        raise SteeringError(f"strength {entry.strength} for {entry.feature} is out of range "
                            f"[-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}] (1 = the feature's max activation)")
    if entry.mode == "ablate" and not 0.0 <= strength <= 1.0:
        raise SteeringError(f"ablate strength for {entry.feature} must be in [0, 1] (the fraction removed)")
    parse_feature_ref(entry.feature)


def resolve_plan(plan: SteeringPlan | None, library: FeatureLibrary, d_model: int,
                 n_layers: int | None = None) -> ResolvedPlan | None:
    """Turn a plan into per-layer tensors; None when nothing changes the model.

    Semantics (strength s, feature max activation m, unit decoder direction u):
    - add: the residual gets ``s·m·u`` at every position;
    - clamp: the feature's value is set to ``s·m`` (the rest of the residual, i.e. the SAE's error
      and every other feature, is kept);
    - ablate: the feature's value is multiplied by ``1 - s`` (s = 1 removes it).
    Entries with strength 0 are skipped, so strength 0 is exactly the unsteered model.
    """
    if plan is None or plan.is_empty():
        return None
    resolved: ResolvedPlan = {}
    for entry in plan.entries:
        validate_entry(entry)
        strength = float(entry.strength)
        if strength == 0.0:
            continue
        h = library.handle(entry.feature)
        if h.direction.shape[-1] != d_model:
            raise SteeringError(f"{entry.feature} has {h.direction.shape[-1]} dims but the model has "
                                f"{d_model}: "
                                "it was made for a different model")
        layer = h.layer if entry.layer is None else int(entry.layer)
        if n_layers is not None and not 0 <= layer < n_layers:
            raise SteeringError(f"layer {layer} for {entry.feature} is out of range 0..{n_layers - 1}")
        edit = resolved.setdefault(layer, LayerEdit())
        if entry.mode == "add":
            delta = (strength * h.scale) * h.direction.float()
            edit.add = delta if edit.add is None else edit.add + delta
        elif entry.mode == "clamp":
            target = strength * h.scale
            edit.clamps.append((h.enc.float(), h.direction.float(), h.b_enc, h.b_dec.float(), target))
        else:
            edit.scales.append((h.enc.float(), h.direction.float(), h.b_enc, h.b_dec.float(), 1.0 - strength))
    return resolved or None


def default_resolver(engine):
    """The engine's plan resolver: a `FeatureLibrary` from the user's config (SAEs + vectors dir)."""
    from .config import library_from_config, load_config

    try:
        config = load_config()
    except Exception:  # noqa: BLE001 - a broken config must not stop completions; use the defaults
        config = None
    library = library_from_config(config)
    d_model, n_layers = _model_dims(engine)

    def resolve(plan: SteeringPlan) -> ResolvedPlan | None:
        return resolve_plan(plan, library, d_model, n_layers)

    resolve.library = library  # type: ignore[attr-defined]
    return resolve


def _model_dims(engine) -> tuple[int, int]:
    info = getattr(engine, "info", None)
    if info is not None:
        return int(info.d_model), int(info.layers)
    cfg = engine.model.config
    return int(cfg.hidden_size), int(cfg.num_hidden_layers)
