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

from .steering import FeatureHandle, ResolvedPlan, SteeringError, SteeringPlan, parse_feature_ref, resolve_plan

ADD_FRACTION = 0.5  # strength 1 = this fraction of the typical residual norm (eval-tuned default)
FALLBACK_NORM = 170.0  # a typical mid-layer residual norm of a small model, when nothing was measured


class FeatureLibrary:
    """Named SAEs, saved vectors and described concepts, loaded on first use and cached."""

    def __init__(self, saes: dict[str, str] | None = None, vectors_dir=None, calibrations=None):
        self._specs: dict[str, str] = {"default": "default", **(saes or {})}
        self._vectors_dir = vectors_dir
        self._saes: dict[str, object] = {}
        self._vectors: dict[str, object] = {}
        self._concepts: dict[str, object] = {}
        self._lock = threading.RLock()
        self._model = None
        self._tokenizer = None
        self.model_key = "default"
        self.concept_layer: int | None = None
        self.calibrations = calibrations

    # -- model (needed for concepts) ------------------------------------------------------------
    def attach_model(self, model, tokenizer, model_key: str, n_layers: int) -> None:
        """Let the library build concept vectors with this model (the engine's or a transformers one)."""
        self._model, self._tokenizer, self.model_key = model, tokenizer, model_key
        if self.concept_layer is None:
            self.concept_layer = default_concept_layer(n_layers)

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
        """The concept vector of `description` (sign words like "less" stripped), built on first use."""
        from .concepts import cached_concept_vector, split_sign

        core, _ = split_sign(description)
        key = core.lower()
        with self._lock:
            if key not in self._concepts:
                if self._model is None:
                    raise SteeringError(f"steering by a description ({core!r}) needs the model: it is not "
                                        "loaded yet (try again when the model is ready)")
                try:
                    self._concepts[key] = cached_concept_vector(self._model, self._tokenizer, self.model_key,
                                                                core, int(self.concept_layer or 0))
                except (ValueError, RuntimeError) as exc:
                    raise SteeringError(f"cannot build a concept vector for {core!r}: {exc}") from exc
            return self._concepts[key]

    # -- handles ----------------------------------------------------------------------------
    def add_fraction(self, ref: str, layer: int) -> float:
        """The calibrated push of `ref` as a fraction of the residual norm (default `ADD_FRACTION`)."""
        if self.calibrations is not None:
            found = self.calibrations.get(self.model_key, ref, layer)
            if found is not None:
                return found
        return ADD_FRACTION

    def handle(self, ref: str) -> FeatureHandle:
        from .concepts import split_sign

        source, key = parse_feature_ref(ref)
        if source in ("vector", "concept"):
            vec = self.vector(key) if source == "vector" else self.concept(key)
            sign = split_sign(key)[1] if source == "concept" else 1.0
            direction = vec.direction * sign
            norm = float(vec.meta.get("resid_norm") or FALLBACK_NORM)
            cal_ref = f"concept:{split_sign(key)[0].lower()}" if source == "concept" else ref
            fraction = float(vec.meta.get("add_fraction") or self.add_fraction(cal_ref, vec.layer))
            return FeatureHandle(ref, vec.layer, direction, fraction * norm, float(vec.scale),
                                 _projection(direction))
        sae = self.sae(source)
        index = int(key)
        if not 0 <= index < sae.d_sae:
            raise SteeringError(f"unknown feature {ref!r}: SAE {source!r} has features 0..{sae.d_sae - 1}")
        norm = float(sae.resid_norm or FALLBACK_NORM)
        return FeatureHandle(ref, sae.layer, sae.direction(index), self.add_fraction(ref, sae.layer) * norm,
                             sae.max_activation(index), sae.feature_reader(index))


def _projection(direction: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    unit = direction.float()

    def read(x: torch.Tensor) -> torch.Tensor:
        return x @ unit

    return read


def default_concept_layer(n_layers: int) -> int:
    """Where described concepts are added: a little before the middle (topic lives there)."""
    return max(0, round(n_layers * 0.4))


def default_resolver(engine, config=None) -> Callable[[SteeringPlan], ResolvedPlan | None]:
    """The engine's plan resolver over a `FeatureLibrary` from `config` (default: the user's config).

    The library gets the engine's model so descriptions become concept vectors.
    """
    from .calibration import CalibrationStore
    from .config import library_from_config, load_config

    if config is None:
        try:
            config = load_config()
        except Exception:  # noqa: BLE001 - a broken config must not stop completions; use the defaults
            config = None
    library = library_from_config(config)
    library.calibrations = CalibrationStore()
    d_model, n_layers = int(engine.info.d_model), int(engine.info.layers)
    library.attach_model(engine.model, engine.tokenizer, engine.info.model, n_layers)

    def resolve(plan: SteeringPlan) -> ResolvedPlan | None:
        return resolve_plan(plan, library, d_model, n_layers)

    resolve.library = library  # type: ignore[attr-defined]
    return resolve
