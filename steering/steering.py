"""Steering runtime: what to steer (`SteeringPlan`) and the forward hooks that do it.

A plan is pure data (feature references, modes, strengths) so it can travel through the config,
the LSP and the HTTP API and be part of the KV-cache key. `SteeringHooks` turns a resolved plan into
residual-stream edits on the decoder layers; it is installed once per model and reads the active
plan on every forward, so steering applies to the prompt and to every generated token.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

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
class FeatureEdit:
    """A clamp or ablate of one direction, reading its current value the way its source encodes it.

    `read(x)` gives the value at every position (an SAE feature: the SAE's own encoder with its
    TopK / JumpReLU / gate, so positions where the feature is off read exactly 0 and stay as they
    are; a vector: the projection on its unit direction). Clamp sets the value to `value`; ablate
    multiplies it by ``1 - value`` (value = the fraction removed).
    """

    read: Callable[[torch.Tensor], torch.Tensor]
    direction: torch.Tensor  # [d_model] unit
    kind: Literal["clamp", "ablate"]
    value: float


@dataclass
class LayerEdit:
    """Residual edits for one layer, already resolved to tensors.

    `add` is added at the positions of the text the model reads (the document, a prompt); `written`
    at the tokens it writes (a completion's own tokens), None: the same as `add`. They differ where
    a handle's `written_share` is not 1 (SAE features, see `library.WRITTEN_SHARE`)."""

    add: torch.Tensor | None = None  # [d_model] (or [batch, 1, d_model]): the summed `add` directions
    features: list[FeatureEdit] = field(default_factory=list)
    written: torch.Tensor | None = None  # like `add`, at written positions


ResolvedPlan = dict[int, LayerEdit]


def writes_differently(plan: ResolvedPlan | None) -> bool:
    """Whether `plan` pushes the tokens a model writes otherwise than the text it reads (then the KV
    of written tokens must not be reused as read text)."""
    return any(e.written is not None and (e.add is None or not torch.equal(e.written, e.add))
               for e in (plan or {}).values())


class SteeringHooks:
    """Forward hooks on decoder layers that apply the active `ResolvedPlan` to their output.

    `active(plan, mask, writing)` sets the plan (and the positions it may touch) for the forwards run
    in this thread; the engine passes a mask that leaves out special tokens and a text's first
    position (its residual norm is ~100x the rest: an attention sink that steering must not move),
    and `writing=True` for forwards over the tokens it generates (`LayerEdit.written`).
    Hooks exist only on the plan's layers and only while it is active: a module with any forward
    hook takes PyTorch's slow call path, which cost every unsteered decode step ~3 % (30 layers).
    """

    def __init__(self, layers: nn.ModuleList):
        self._layers = layers
        self._local = threading.local()

    def _make_hook(self, index: int, plan: ResolvedPlan, activation: object, writing: bool):
        def hook(_module, _inputs, output):
            if getattr(self._local, "activation", None) is not activation:
                return None  # another thread's plan, or an outer plan while a nested one is active
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = apply_layer_edit(hidden, plan[index], getattr(self._local, "mask", None), writing)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    @contextmanager
    def active(self, plan: ResolvedPlan | None, mask: torch.Tensor | None = None, writing: bool = False
               ) -> Iterator[None]:
        previous = getattr(self._local, "activation", None), getattr(self._local, "mask", None)
        activation = object()  # this call's identity: its hooks act only while it is the innermost
        self._local.activation, self._local.mask = activation, mask
        handles = [self._layers[i].register_forward_hook(self._make_hook(i, plan, activation, writing))
                   for i in (plan or ())]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._local.activation, self._local.mask = previous


def steer_mask(ids: Sequence[int], start: int, special_ids: frozenset[int]) -> torch.Tensor | None:
    """Which positions of a forward over `ids` (from absolute position `start`) steering may edit.

    None (= all) in the common case: a decode step, or a chunk after the first position with no
    special token in it.
    """
    if start > 0 and not special_ids.intersection(ids):
        return None
    keep = torch.tensor([i not in special_ids for i in ids], dtype=torch.bool)
    if start == 0 and len(ids):
        keep[0] = False
    return keep


def apply_layer_edit(hidden: torch.Tensor, edit: LayerEdit, mask: torch.Tensor | None = None,
                     writing: bool = False) -> torch.Tensor:
    """Apply one layer's edits to the residual stream `hidden` [batch, seq, d_model].

    `mask` ([seq] or [batch, seq], True = steer) leaves the other positions bit-identical;
    `writing`: the positions are tokens the model writes (`LayerEdit.written` is added there).
    """
    keep = None if mask is None else mask.to(hidden.device).unsqueeze(-1)
    add = edit.written if writing and edit.written is not None else edit.add
    if add is not None:
        delta = add.to(hidden.dtype)
        hidden = hidden + (delta if keep is None else delta * keep)
    if edit.features:
        x = hidden.float()
        for fe in edit.features:
            value = fe.read(x)
            change = (fe.value - value) if fe.kind == "clamp" else (-fe.value * value)
            if keep is not None:
                change = change * keep.squeeze(-1)
            x = x + change.unsqueeze(-1) * fe.direction
        hidden = x.to(hidden.dtype)
    return hidden


# -- feature references --------------------------------------------------------------------------

MAX_STRENGTH = 20.0  # |strength| above this is surely a typo (strength 1 = the calibrated push)
MAX_DESCRIPTION = 200
_MEMBER = r"\d+(?:\*\d*\.?\d+)?"  # a feature index, with a group member's weight: 12*0.5
SAE_REF_RE = re.compile(rf"^([A-Za-z0-9_.-]+):({_MEMBER}(?:\+{_MEMBER})*)$")
MAX_GROUP = 8  # features steered together under one reference ("default:12+40+7")
MAX_WEIGHT = 100.0  # a member's weight is relative to the others' (search writes them with the largest at 1)
ID_LIKE_RE = re.compile(r"^[A-Za-z0-9_.-]+:\S*$")


class SteeringError(ValueError):
    """A plan cannot be applied (unknown feature, bad strength, wrong layer); the message says why."""


@dataclass(frozen=True)
class FeatureHandle:
    """Everything the hooks need about one steerable direction (an SAE feature or a vector).

    `add_scale` is what `add` at strength 1 adds along `direction` (a calibrated fraction of the
    layer's typical residual norm, so a strength means the same for features and vectors);
    `value_scale` is what `clamp` at strength 1 sets the value to (an SAE feature's max activation,
    a vector's typical projection); `read` gives the current value (see `FeatureEdit`).
    `add_layers`: `add` is shared out evenly over this many consecutive layers from `layer` on (an
    SAE feature's push, see `library.feature_span`); `clamp` and `ablate` act at `layer` alone.
    `written_share`: the part of the push `add` gives the tokens the model writes, relative to the
    text it reads (an SAE feature's, see `library.WRITTEN_SHARE`).
    """

    ref: str
    layer: int
    direction: torch.Tensor  # [d_model], unit norm
    add_scale: float
    value_scale: float
    read: Callable[[torch.Tensor], torch.Tensor]
    add_layers: int = 1
    written_share: float = 1.0

    def add_deltas(self, strength: float, layer: int | None = None, n_layers: int | None = None,
                   writing: bool = False) -> dict[int, torch.Tensor]:
        """Residual delta per layer of `add` at `strength`, from `layer` (default: the handle's) over
        `add_layers` layers, the model's last layer (of `n_layers`) being the furthest; `writing`:
        at the tokens the model writes (`written_share` of it)."""
        if writing:
            strength *= self.written_share
        start = self.layer if layer is None else layer
        end = start + max(1, self.add_layers)
        if n_layers is not None:
            end = max(start + 1, min(end, n_layers))
        layers = range(start, end)
        delta = (strength * self.add_scale / len(layers)) * self.direction.float()
        return dict.fromkeys(layers, delta)


def parse_feature_ref(ref: str) -> tuple[str, str]:
    """Split a feature reference into (source, key) or raise `SteeringError`.

    ``"<sae>:<index>"`` → (sae, index); a group of features steered together, ``"<sae>:<i>+<j>+<k>"``
    (members may carry weights: ``"<sae>:<i>+<j>*0.5"``) → (sae, "i+j+k") (see `feature_indices`,
    `feature_weights`); ``"vector:<name>"`` → ("vector", name);
    ``"concept:<text>"`` or free text such as ``"about gardening"`` / ``"less hedging"`` →
    ("concept", text): a concept vector the engine builds from the description.
    """
    text = " ".join(str(ref).split())
    if not text:
        raise SteeringError("empty feature: give <sae>:<index>, vector:<name> or a description")
    m = SAE_REF_RE.match(text)
    if m:
        feature_indices(m.group(2), text)
        return m.group(1), m.group(2)
    if text.startswith("vector:"):
        name = text[len("vector:"):].strip()
        if not name:
            raise SteeringError(f"bad feature id {ref!r}: vector:<name> needs a name")
        return "vector", name
    if text.startswith("concept:"):
        text = text[len("concept:"):].strip()
    elif ID_LIKE_RE.match(text):
        raise SteeringError(f"bad feature id {ref!r}: use <sae>:<index> (e.g. default:123), vector:<name>, "
                            "or a description such as \"about the sea\"")
    if not any(c.isalpha() for c in text):
        raise SteeringError(f"bad feature {ref!r}: a description needs words (e.g. \"more formal\")")
    if len(text) > MAX_DESCRIPTION:
        raise SteeringError(f"description too long ({len(text)} characters, at most {MAX_DESCRIPTION})")
    return "concept", text


def _members(key: str, ref: str | None) -> list[tuple[int, float]]:
    """(index, weight) of each member of a reference's key, checked (see `feature_indices`)."""
    members = []
    for part in key.split("+"):
        index, star, weight = part.partition("*")
        try:
            members.append((int(index), float(weight) if star else 1.0))
        except ValueError:
            raise SteeringError(f"bad feature id {ref or key!r}: use <sae>:<index> or <sae>:<i>+<j>") from None
    indices = [i for i, _ in members]
    if len(set(indices)) != len(indices):
        raise SteeringError(f"feature group {ref or key!r} names a feature twice")
    if len(indices) > MAX_GROUP:
        raise SteeringError(f"feature group {ref or key!r} has {len(indices)} features; at most {MAX_GROUP}")
    if len(members) == 1 and "*" in key:
        raise SteeringError(f"bad feature id {ref or key!r}: a weight is a group member's share "
                            "(<sae>:<i>+<j>*0.5); a single feature's strength is the entry's strength")
    for _, w in members:
        if not 0.0 < w <= MAX_WEIGHT:
            raise SteeringError(f"feature group {ref or key!r}: member weights must be in (0, {MAX_WEIGHT:g}]")
    return members


def feature_indices(key: str, ref: str | None = None) -> list[int]:
    """The SAE feature indices of a reference's key: [12] for "12", [12, 40, 7] for a group "12+40+7".

    A group is one knob over several features of one SAE (a concept is often split over a few: a
    word feature, a topic feature, what the model says next); `add` pushes along the sum of their
    decoder directions, each times its weight (``"12+40*0.5"``: 40 counts half; default 1), and
    `clamp`/`ablate` act on each member.
    """
    return [i for i, _ in _members(key, ref)]


def feature_weights(key: str, ref: str | None = None) -> list[float]:
    """The members' weights of a reference's key, in `feature_indices` order (1 where none is given)."""
    return [w for _, w in _members(key, ref)]


def validate_entry(entry: SteeringEntry) -> None:
    """Check mode, strength and the shape of the feature reference (not its existence)."""
    if entry.mode not in MODES:
        raise SteeringError(f"unknown mode {entry.mode!r} for {entry.feature}; use one of {', '.join(MODES)}")
    try:
        strength = float(entry.strength)
    except (TypeError, ValueError):
        raise SteeringError(f"strength for {entry.feature} must be a number, "
                            f"not {entry.strength!r}") from None
    if strength != strength or abs(strength) > MAX_STRENGTH:
        raise SteeringError(f"strength {entry.strength} for {entry.feature} is out of range "
                            f"[-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}] (1 = a noticeable, fluent push)")
    if entry.mode == "ablate" and not 0.0 <= strength <= 1.0:
        raise SteeringError(f"ablate strength for {entry.feature} must be in [0, 1] (the fraction removed)")
    parse_feature_ref(entry.feature)


class HandleSource(Protocol):
    def handles(self, ref: str) -> list[FeatureHandle]: ...


def resolve_plan(plan: SteeringPlan | None, library: HandleSource, d_model: int,
                 n_layers: int | None = None) -> ResolvedPlan | None:
    """Turn a plan into per-layer tensors; None when nothing changes the model.

    Semantics (strength s, unit direction u):
    - add: the residual gets ``s · add_scale · u`` at every steered position of the text the model
      reads (negative s: less of it) and `written_share` of that at the tokens it writes, shared out
      over the handle's `add_layers` layers;
    - clamp: the feature's value is set to ``s · value_scale`` (s = 0 switches it off); the rest of
      the residual (the SAE's error and every other feature) is kept;
    - ablate: the feature's value is multiplied by ``1 - s`` (s = 1 removes it), only where it is on.
    `add` and `ablate` with strength 0 are skipped, so they are exactly the unsteered model.
    """
    if plan is None or plan.is_empty():
        return None
    resolved: ResolvedPlan = {}
    for entry in plan.entries:
        validate_entry(entry)
        strength = float(entry.strength)
        if strength == 0.0 and entry.mode != "clamp":
            continue
        for h in library.handles(entry.feature):
            if h.direction.shape[-1] != d_model:
                raise SteeringError(f"{entry.feature} has {h.direction.shape[-1]} dims but the model has "
                                    f"{d_model}: it was made for a different model")
            layer = h.layer if entry.layer is None else int(entry.layer)
            if n_layers is not None and not 0 <= layer < n_layers:
                raise SteeringError(f"layer {layer} for {entry.feature} is out of range 0..{n_layers - 1}")
            if entry.mode == "add":
                written = h.add_deltas(strength, layer, n_layers, writing=True)
                for at, delta in h.add_deltas(strength, layer, n_layers).items():
                    edit = resolved.setdefault(at, LayerEdit())
                    edit.add = delta if edit.add is None else edit.add + delta
                    edit.written = written[at] if edit.written is None else edit.written + written[at]
                continue
            edit = resolved.setdefault(layer, LayerEdit())
            direction = h.direction.float()
            if entry.mode == "clamp":
                edit.features.append(FeatureEdit(h.read, direction, "clamp", strength * h.value_scale))
            else:
                edit.features.append(FeatureEdit(h.read, direction, "ablate", strength))
    return resolved or None
