"""What the LSP server and the HTTP API share inside one process.

One engine (loaded in the background so `initialize` answers at once), one scheduler (so editor
keystrokes pre-empt HTTP batch work), the editor's steering plan, and completion listeners (the
metrics). Both protocol layers talk only to a `Runtime`; neither knows the other exists.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ..steering.engine import Engine
from ..steering.generate import Completion
from ..steering.steering import SteeringPlan
from .scheduler import Scheduler

State = Literal["idle", "loading", "ready", "error"]
ProgressListener = Callable[[str, float | None], None]
CompletionListener = Callable[[Completion, str], None]  # (completion, source: "lsp" | "http")
StateListener = Callable[["Runtime"], None]
Connector = Callable[["ModelSettings", "ProgressListener | None"], Engine]  # an engine from elsewhere


@dataclass
class ModelSettings:
    model: str = "default"
    dtype: str = "auto"
    threads: int | None = None
    context_tokens: int = 1024
    cache_budget_mb: int = 256


@dataclass
class Runtime:
    scheduler: Scheduler = field(default_factory=Scheduler)
    steering: SteeringPlan = field(default_factory=SteeringPlan)
    state: State = "idle"
    message: str = ""
    settings: ModelSettings = field(default_factory=ModelSettings)
    completion_listeners: list[CompletionListener] = field(default_factory=list)
    state_listeners: list[StateListener] = field(default_factory=list)
    connect: Connector | None = None  # how `load` gets its engine instead (a remote engine); None: load here
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loader: threading.Thread | None = None

    @property
    def engine(self) -> Engine | None:
        return self.scheduler.engine

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.engine is not None

    def load(self, settings: ModelSettings | None = None, progress: ProgressListener | None = None,
             engine: Engine | None = None) -> threading.Thread:
        """Load the model in a background thread (or adopt `engine`); state goes loading → ready|error."""
        with self._lock:
            if settings is not None:
                self.settings = settings
            self._set_state("loading", f"loading {self.settings.model}")

        def work() -> None:
            from ..steering.model import ModelError

            try:
                connected = self.connect(self.settings, progress) if engine is None and self.connect else None
                loaded = engine or connected or Engine.load(
                    self.settings.model, dtype=self.settings.dtype, threads=self.settings.threads,
                    context_tokens=self.settings.context_tokens,
                    cache_budget_mb=self.settings.cache_budget_mb, progress=progress,
                )
            except ModelError as exc:
                self._set_state("error", str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - any load failure becomes a visible state
                self._set_state("error", f"loading {self.settings.model} failed: {exc}")
                return
            self.scheduler.set_engine(loaded)
            message = getattr(loaded, "ready_message", None)
            self._set_state("ready", message or f"{loaded.info.model} ({loaded.info.dtype}) loaded in "
                                                f"{loaded.info.load_s:.1f} s")

        self._loader = threading.Thread(target=work, name="tinymorph-load", daemon=True)
        self._loader.start()
        return self._loader

    def lost(self, message: str) -> None:
        """The engine stopped answering (a remote one went away): state error until it is back."""
        self._set_state("error", message)

    def check_plan(self, plan: SteeringPlan) -> None:
        """Resolve `plan` with the loaded engine's resolver (raises ValueError/SteeringError if it
        cannot be applied): the same check every generation makes, done once, up front. Directions
        that `add` pushes and that have no calibration yet get one now (`calibrate_missing`), so
        strength 1 is the calibrated push wherever the plan was set."""
        engine = self.engine
        if engine is None:
            raise RuntimeError("the model is not loaded yet")
        engine.resolve(plan)
        library = self.feature_library()
        if library is not None:
            library.calibrate_missing(plan)

    def use_feature_library(self, library) -> None:
        """Resolve feature references with `library` (the SAEs of the workspace's config) from now on.

        Why here: an editor's workspace config names its own `[[sae]]`s; the engine's default
        resolver only knows the process's working directory.
        """
        engine = self.engine
        if engine is None or getattr(engine, "remote", False):  # a remote engine resolves with its own SAEs
            return
        from ..steering.library import default_resolver

        engine.set_steering_resolver(default_resolver(engine, library=library))

    def feature_library(self):
        """The library steering resolves features with (set by `use_feature_library`), if any."""
        engine = self.engine
        return getattr(getattr(engine, "_resolver", None), "library", None) if engine is not None else None

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.ready

    def completed(self, completion: Completion, source: str) -> None:
        """Tell the listeners (metrics, logs) about a finished generation."""
        for listener in list(self.completion_listeners):
            try:
                listener(completion, source)
            except Exception:  # noqa: BLE001 - a listener must not break generation
                import logging

                logging.getLogger(__name__).exception("completion listener failed")

    def _set_state(self, state: State, message: str) -> None:
        self.state, self.message = state, message
        for listener in list(self.state_listeners):
            try:
                listener(self)
            except Exception:  # noqa: BLE001
                import logging

                logging.getLogger(__name__).exception("state listener failed")
