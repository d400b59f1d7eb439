"""Everything a steering entry can point at: SAE features, saved vectors, and described concepts.

`FeatureLibrary.handle(ref)` turns a reference into a `FeatureHandle` in one strength unit for all
three: `add` at strength 1 pushes by `ADD_FRACTION` of the layer's typical residual norm (or by the
fraction a calibration found for that direction, see `calibration.py`), so "1" means "noticeable
and fluent" whatever the direction came from. SAEs load on first use (~20 MB each); concept
vectors are built from the description on first use when a model is attached (`attach_model`) and
cached on disk.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from .steering import (
    FeatureHandle,
    ResolvedPlan,
    SteeringError,
    SteeringPlan,
    feature_indices,
    feature_weights,
    parse_feature_ref,
    resolve_plan,
)

ADD_FRACTION = 0.5  # strength 1 = this fraction of the typical residual norm (eval-tuned default)
FALLBACK_NORM = 170.0  # a typical mid-layer residual norm of a small model, when nothing was measured


# An SAE feature's `add` pushes the tokens the model writes with this share of the push it gives the
# text it reads (the document before the cursor): a push on the context turns what follows to the
# feature the way text about it would, while the same push on each written token bends that token's
# own prediction, which reads as disfluency. Measured (`steer eval` harness, 12 prompts, the search
# groups, prompt push x2 and written x0.75 of strength 1 against both x1, hit rate at equal perplexity
# ratio): held-out concepts +10 points (+13 with fitted member weights), main set -3 (+5 with them).
WRITTEN_SHARE = 0.375


def feature_span(n_layers: int) -> int:
    """How many layers an SAE feature's `add` is shared out over, from the SAE's layer on: a sixth
    of the model's depth (5 of SmolLM2's 30 layers). A direction written into the residual stream
    stays readable for a few layers, and a push split over them changes the text less per hit than the
    same push at one layer (as a described concept's push over four layers does). Measured with
    search's groups on the held-out concepts (`steer eval`, 6 prompts, 40 tokens; hit rate at a
    perplexity ratio to unsteered): one layer 36 % at 1.31x, 40 % at 1.53x; three 45 % at 1.52x;
    five 39 % at 1.39x, 48 % at 1.53x, 57 % at 1.77x; seven 38 % at 1.42x, 46 % at 1.56x; nine 37 %
    at 1.38x, 48 % at 1.64x; the layer before and after 41 % at 1.54x."""
    return max(1, round(n_layers / 6))


class FeatureLibrary:
    """Named SAEs, saved vectors and described concepts, loaded on first use and cached."""

    def __init__(self, saes: dict[str, str] | None = None, vectors_dir=None, calibrations=None):
        self._specs: dict[str, str] = {"default": "default", **(saes or {})}
        self._vectors_dir = vectors_dir
        self._saes: dict[str, object] = {}
        self._vectors: dict[str, object] = {}
        self._concepts: dict[str, object] = {}
        self._lock = threading.RLock()
        self._engine = None
        self.model_key = "default"
        self.concept_layers: list[int] = []
        self.feature_span = 1  # layers an SAE feature's add is shared over (`feature_span`, set with a model)
        self.calibrations = calibrations

    # -- model (needed for concepts) ------------------------------------------------------------
    def attach_engine(self, engine) -> None:
        """Let the library build (and calibrate) concept vectors with this engine's model."""
        from .concepts import concept_layers

        self._engine, self.model_key = engine, str(engine.info.model)
        self.concept_layers = concept_layers(int(engine.info.layers))
        self.feature_span = feature_span(int(engine.info.layers))

    @property
    def sae_names(self) -> list[str]:
        return list(self._specs)

    @property
    def specs(self) -> dict[str, str]:
        """SAE name -> where it comes from (as configured)."""
        return dict(self._specs)

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
                except Exception as exc:  # noqa: BLE001 - a broken SAE must not break the others
                    raise SteeringError(f"SAE {name!r} could not be loaded: {type(exc).__name__}: {exc}") from exc
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

    def concept(self, description: str):
        """The `ConceptVector` of `description` (sign words like "less" stripped), built and
        calibrated on first use, then read from the user's cache."""
        from .calibration import CONCEPT_GRID, METHOD, calibrate
        from .concepts import cached_concept, save_concept, split_sign
        from .distill import CAP

        core, _ = split_sign(description)
        key = core.lower()
        with self._lock:
            if key not in self._concepts:
                engine = self._engine
                if engine is None:
                    raise SteeringError(f"steering by a description ({core!r}) needs the model: it is not "
                                        "loaded yet (try again when the model is ready)")
                try:
                    vec, path = cached_concept(engine.model, engine.tokenizer, self.model_key, core,
                                               self.concept_layers, engine.special_ids)
                    if vec.add_fraction is None or vec.meta.get("calibration_method") != METHOD:
                        cal = calibrate(engine, vec.pushes(CAP), description=core, grid=CONCEPT_GRID)
                        vec.add_fraction = CAP * cal.multiplier
                        vec.meta["calibration_method"] = METHOD
                        vec.meta["calibration"] = cal.table
                        vec.meta["examples"] = cal.examples
                        save_concept(vec, path)
                    self._concepts[key] = vec
                except (ValueError, RuntimeError) as exc:
                    raise SteeringError(f"cannot build a concept vector for {core!r}: {exc}") from exc
            return self._concepts[key]

    # -- handles ----------------------------------------------------------------------------
    def _calibration_ref(self, ref: str) -> str:
        """`ref` as calibrations are stored: an SAE feature (or group) with its SAE's fingerprint.

        A group is calibrated along its own summed direction, like a feature. Until now it took its
        lead (best-ranked) feature's calibrated push, but the fit often gives the lead a small weight
        (`insects`: 0.15 of the largest), and the push calibrated for one feature then drives a
        direction made mostly of others: per concept, 1.19x to 2.27x unsteered perplexity at strength 1
        on the held-out set. Calibrated on its own (`steer eval`, search, strength 1, one run each):
        held-out 50 % at 1.37x (lead's push: 52 % at 1.54x), main 55 % at 1.35x (59 % at 1.48x), strict
        30 % at 1.37x (34 % at 1.48x), repeating 9, 5, 6 % (10, 9, 8 %; unsteered 8 %): a few points of
        hits for a strength 1 that stays inside the fluency budget for every group."""
        source, _ = parse_feature_ref(ref)
        if source in ("concept", "vector"):
            return ref
        spread = f"/{self.feature_span}" if self.feature_span > 1 else ""  # a push over other layers
        written = f"/w{WRITTEN_SHARE:g}" if WRITTEN_SHARE != 1 else ""  # written tokens pushed less
        return f"{ref}@{self.sae(source).fingerprint()}{spread}{written}"

    def _stored_fraction(self, ref: str, layer: int) -> float | None:
        if self.calibrations is None:
            return None
        return self.calibrations.get(self.model_key, self._calibration_ref(ref), layer)

    def add_fraction(self, ref: str, layer: int) -> float:
        """The calibrated push of `ref` as a fraction of the residual norm (default `ADD_FRACTION`)."""
        found = self._stored_fraction(ref, layer)
        return ADD_FRACTION if found is None else found

    def calibrate(self, ref: str) -> float:
        """Calibrate `add` strength 1 of a feature or vector on the attached engine, remember it in
        the calibration store and return it (a fraction of the residual norm; see calibration.py)."""
        from .calibration import CalibrationStore, calibrate

        if self._engine is None:
            raise SteeringError(f"calibrating {ref!r} needs the model: it is not loaded yet")
        handle = self.handle(ref)
        push = ADD_FRACTION / self.add_fraction(ref, handle.layer)  # the default push, in strength
        n_layers = int(self._engine.info.layers)
        cal = calibrate(self._engine, handle.add_deltas(push, n_layers=n_layers), handle.layer, handle.direction,
                        written=handle.add_deltas(push, n_layers=n_layers, writing=True))
        fraction = ADD_FRACTION * cal.multiplier
        if self.calibrations is None:
            self.calibrations = CalibrationStore()
        self.calibrations.set(self.model_key, self._calibration_ref(ref), handle.layer, fraction)
        return fraction

    def calibrate_missing(self, plan) -> None:
        """Make sure each SAE feature, group or saved vector that `plan` (a `SteeringPlan`) adds has
        its strength 1 calibrated (`calibrated`: the stored one, else a new one, as `steer add` makes
        it). Why: an editor or the HTTP API sets steering without the CLI, and its strength prompt
        promises that 1 is the calibrated push (before, a feature picked in VS Code pushed the
        uncalibrated default, `ADD_FRACTION`); descriptions calibrate when they are built. ~18 s per
        new direction on 2 cores for the default model, once: it is kept with the user's calibrations."""
        if self._engine is None or plan is None:
            return
        for entry in plan.entries:
            if entry.mode == "add" and entry.strength and parse_feature_ref(entry.feature)[0] != "concept":
                self.calibrated(entry.feature)

    def calibrated(self, ref: str) -> float:
        """`add` strength 1 of a feature or vector as a fraction of the residual norm: the stored
        calibration, or a new one (as `steer add` makes it) when there is none yet."""
        found = self._stored_fraction(ref, self.handle(ref).layer)
        return self.calibrate(ref) if found is None else found

    def handles(self, ref: str) -> list[FeatureHandle]:
        """The directions `ref` steers: one for a feature or vector, one per member of a feature group,
        one per layer for a concept."""
        from .concepts import split_sign
        from .distill import CAP

        source, key = parse_feature_ref(ref)
        if _is_group(source, key):
            return self._group_members(ref)
        if source != "concept":
            return [self.handle(ref)]
        vec = self.concept(key)
        sign = split_sign(key)[1]
        fraction = vec.add_fraction if vec.add_fraction is not None else CAP
        pushes = vec.pushes(fraction)
        return [FeatureHandle(ref, layer, sign * unit, float(pushes[layer].norm()), vec.resid_norms[layer],
                              _projection(sign * unit))
                for layer, unit in vec.unit_directions().items()]

    def handle(self, ref: str) -> FeatureHandle:
        """One direction: an SAE feature, a feature group (its summed direction) or a saved vector (a
        concept: its middle layer)."""
        source, key = parse_feature_ref(ref)
        if source == "concept":
            found = self.handles(ref)
            return found[len(found) // 2]
        if source == "vector":
            vec = self.vector(key)
            norm = float(vec.meta.get("resid_norm") or FALLBACK_NORM)
            fraction = self.add_fraction(ref, vec.layer)
            return FeatureHandle(ref, vec.layer, vec.direction, fraction * norm, float(vec.scale),
                                 _projection(vec.direction))
        sae, indices, add_scale = self._sae_push(ref)
        if len(indices) == 1:
            return FeatureHandle(ref, sae.layer, sae.direction(indices[0]), add_scale,
                                 sae.max_activation(indices[0]), sae.feature_reader(indices[0]), self.feature_span,
                                 WRITTEN_SHARE)
        summed = _summed_direction(sae, ref)
        unit = summed / summed.norm()  # a group: its members' directions summed (what `add` pushes along)
        value = sum(sae.max_activation(i) * float(sae.direction(i).float() @ unit) for i in indices)
        return FeatureHandle(ref, sae.layer, unit, add_scale, value, _projection(unit), self.feature_span,
                             WRITTEN_SHARE)

    def sae_features(self, ref: str) -> tuple:
        """The SAE of an SAE feature reference and its feature indices (one, or a group's), checked."""
        source, key = parse_feature_ref(ref)
        sae = self.sae(source)
        indices = feature_indices(key, ref)
        for index in indices:
            if not 0 <= index < sae.d_sae:
                raise SteeringError(f"unknown feature {ref!r}: SAE {source!r} has features 0..{sae.d_sae - 1}")
        return sae, indices

    def _sae_push(self, ref: str) -> tuple:
        """An SAE reference's SAE, feature indices and `add` push at strength 1 (its calibrated share
        of the layer's residual norm)."""
        sae, indices = self.sae_features(ref)
        return sae, indices, self.add_fraction(ref, sae.layer) * float(sae.resid_norm or FALLBACK_NORM)

    def _group_members(self, ref: str) -> list[FeatureHandle]:
        """A group's members, each read by the SAE's own encoder (`clamp`/`ablate` act on each) and
        pushed so that together they add the group's calibrated push along its summed direction."""
        sae, indices, add_scale = self._sae_push(ref)
        summed_norm = float(_summed_direction(sae, ref).norm())
        weights = feature_weights(parse_feature_ref(ref)[1], ref)
        return [FeatureHandle(ref, sae.layer, sae.direction(i), add_scale * w / summed_norm,
                              sae.max_activation(i), sae.feature_reader(i), self.feature_span, WRITTEN_SHARE)
                for i, w in zip(indices, weights, strict=True)]


def _is_group(source: str, key: str) -> bool:
    """Whether a parsed reference names a feature group ("default", "12+40")."""
    return source not in ("concept", "vector") and "+" in key


def _summed_direction(sae, ref: str) -> torch.Tensor:
    """A feature group's members' unit decoder directions, each times its weight, summed (an error
    where they cancel out)."""
    key = parse_feature_ref(ref)[1]
    summed = sum(w * sae.direction(i).float() for i, w in zip(feature_indices(key, ref), feature_weights(key, ref),
                                                              strict=True))
    if float(summed.norm()) < 1e-3:
        raise SteeringError(f"the features of {ref!r} cancel out: their directions sum to nothing")
    return summed


def _projection(direction: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    unit = direction.float()

    def read(x: torch.Tensor) -> torch.Tensor:
        return x @ unit

    return read


def default_resolver(engine, config=None, library: FeatureLibrary | None = None
                     ) -> Callable[[SteeringPlan], ResolvedPlan | None]:
    """The engine's plan resolver over `library` (default: one from `config`, default: the user's).

    The library gets the engine's model so descriptions become concept vectors, and the user's
    calibrations so strength 1 is each direction's calibrated push.
    """
    from .calibration import CalibrationStore
    from .config import library_from_config, load_config

    if library is None:
        if config is None:
            try:
                config = load_config()
            except Exception:  # noqa: BLE001 - a broken config must not stop completions; use the defaults
                config = None
        library = library_from_config(config)
    if library.calibrations is None:
        library.calibrations = CalibrationStore()
    d_model, n_layers = int(engine.info.d_model), int(engine.info.layers)
    library.attach_engine(engine)

    def resolve(plan: SteeringPlan) -> ResolvedPlan | None:
        return resolve_plan(plan, library, d_model, n_layers)

    resolve.library = library  # type: ignore[attr-defined]
    return resolve
