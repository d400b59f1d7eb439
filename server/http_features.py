"""`GET /v1/features` and `GET /v1/features/{id}` over the steering module's feature search.

Why a separate adapter: feature search belongs to the steering package (labels, BM25 index, the
SAE library); the HTTP side only maps its outcomes to statuses. An SAE that is missing or has no
labels is a 503 "feature search not available" with the reason, never an empty or made-up result
that would look like "no feature matches".
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .http_completions import ApiError, unresolved
from .runtime import Runtime


def _unavailable(reason: object) -> ApiError:
    return ApiError(503, f"feature search not available: {reason}", "unavailable", headers={"Retry-After": "30"})


class FeatureService:
    """Feature search for one app, over the same `FeatureLibrary` steering uses when it can.

    Sharing the engine's library (the default resolver's) means an SAE is loaded once for
    steering, search, the LSP and HTTP alike; before a model is loaded the config's library is used.
    """

    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime
        self._lock = threading.Lock()
        self._library: Any = None

    def library(self):
        shared = self._engine_library()
        if shared is not None:
            return shared
        try:
            from ..steering.config import ConfigError, library_from_config, load_config
        except ImportError as exc:
            raise _unavailable(exc) from None
        with self._lock:
            if self._library is None:
                try:
                    self._library = library_from_config(load_config())
                except ConfigError as exc:
                    raise _unavailable(f"config: {exc}") from None
            return self._library

    def _engine_library(self):
        engine = self.runtime.engine if self.runtime is not None else None
        if engine is None:
            return None
        try:
            from ..steering.library import default_resolver

            with self._lock:
                if engine._resolver is None:  # noqa: SLF001 - the engine creates it lazily on first steer
                    engine.set_steering_resolver(default_resolver(engine))
            return getattr(engine._resolver, "library", None)  # noqa: SLF001 - lives on the default resolver
        except Exception:  # noqa: BLE001 - a custom resolver without a library: use the config's
            return None

    def check_sources(self, plan) -> None:
        """Raise a 503 when a configured SAE that `plan` steers cannot be loaded (400s come later)."""
        from ..steering.steering import SteeringError, parse_feature_ref

        lib = self.library()
        for entry in plan.entries:
            try:
                source, _ = parse_feature_ref(entry.feature)
            except SteeringError:
                continue  # a malformed id is the request's fault: resolving reports it as a 400
            if source not in ("vector", "concept") and source in lib.sae_names:
                try:
                    lib.sae(source)
                except SteeringError as exc:
                    raise ApiError(503, f"steering is not available: {exc}", "unavailable", "steering") from None

    async def search(self, query: str, limit: int) -> list[dict]:
        return await asyncio.to_thread(_search, self, query, limit)

    async def show(self, ref: str) -> dict:
        return await asyncio.to_thread(_show, self, ref)


def _search(service: FeatureService, query: str, limit: int) -> list[dict]:
    try:
        from ..steering.features import search_features
        from ..steering.steering import SteeringError
    except ImportError as exc:
        raise _unavailable(exc) from None
    lib = service.library()
    engine = service.runtime.engine if service.runtime is not None else None
    try:
        return search_features(lib, query, limit, model=engine)
    except SteeringError as exc:  # e.g. the default SAE is not installed
        raise _unavailable(exc) from None
    except (OSError, ValueError, KeyError) as exc:  # unreadable labels
        raise _unavailable(exc) from None


def _show(service: FeatureService, ref: str) -> dict:
    try:
        from ..steering.features import show_feature
        from ..steering.steering import SteeringError, parse_feature_ref
    except ImportError as exc:
        raise _unavailable(exc) from None
    try:
        source, key = parse_feature_ref(ref)
    except SteeringError as exc:
        raise unresolved(str(exc), "feature_id") from None
    lib = service.library()
    if source not in ("vector", "concept"):
        if source not in lib.sae_names:
            raise ApiError(404, f"unknown SAE {source!r}; configured: {', '.join(lib.sae_names)}", "not_found")
        try:
            lib.sae(source)
        except SteeringError as exc:
            raise _unavailable(exc) from None
    try:
        return show_feature(lib, ref)
    except SteeringError as exc:  # out of range, unknown vector; a description before the model loaded
        if source == "concept":
            raise _unavailable(exc) from None
        raise ApiError(404, str(exc), "not_found") from None
    except (OSError, KeyError, IndexError) as exc:
        raise _unavailable(exc) from None
