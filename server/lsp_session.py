"""One editor's session: its documents, suggestions, settings and config, over the shared `Runtime`.

Why it looks like this: text bookkeeping lives in `documents.py`, the rules for what a suggestion
may show or insert in `suggestions.py`, the workspace's config files in `workspace_config.py`;
this class only moves data between the protocol, the scheduler's engine thread and those. All
suggestion state is touched on the event-loop thread only: engine callbacks hop over with
`call_soon_threadsafe`, so there are no locks here and no half-updated suggestion can be served.

Flow: `didChange` → (debounce) → one `Job` for the *focused* document on the scheduler (`replace`
key: latest wins, a stale generation stops at its next token) → tokens stream back → rate-limited
`workspace/inlayHint/refresh` → the client asks for `textDocument/inlayHint` and gets the
suggestion only if it still fits the document's current version (docs/protocol.md).

Focus: the document the user types in comes first. Edits in other documents (a replace-all, a
formatter, a second window) start nothing; such a document gets one background job when the
client asks for its hints, or becomes the focus when it gets an inline-completion request or when
it is typed in after the focused one has been quiet for `FOCUS_HOLD_S`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from dataclasses import asdict
from typing import Any

from lsprotocol import types
from pygls.lsp.server import LanguageServer

from ..steering.config import Config
from ..steering.engine import CompletionRequest
from ..steering.generate import Completion, GenerationOptions, TokenEvent
from ..steering.steering import SteeringPlan
from .documents import Document, Documents, sanitize
from .lsp_protocol import TinymorphProtocol
from .runtime import ModelSettings, Runtime
from .scheduler import PRIORITY_BACKGROUND, PRIORITY_EDITOR, Job
from .search_gate import SearchGate
from .suggestions import MODEL_KEYS, Settings, Suggestion, View, log_line, metrics_payload, validate_settings
from .workspace_config import WorkspaceConfig

log = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 0.1  # at most one workspace/inlayHint/refresh per 100 ms (plus a trailing one)
CONFIG_POLL_S = 1.0  # how often the config files' stat fingerprint is compared
FOCUS_HOLD_S = 0.5  # an edit elsewhere takes the focus only after the focused document was quiet this long
BACKGROUND_MAX_TOKENS = 8  # a background document's one job is cheap: a short suggestion
_sessions = itertools.count(1)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tinymorph")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0.0.0"


class TinymorphServer(LanguageServer):
    """Editor-side state of one connection around the shared `Runtime`."""

    def __init__(self, runtime: Runtime | None = None, overrides: dict[str, Any] | None = None,
                 owns_process: bool = True, token: str | None = None):
        super().__init__("tinymorph", _version(), protocol_cls=TinymorphProtocol,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.runtime = runtime or Runtime()
        self.owns_process = owns_process  # stdio: `exit` ends the process; TCP: only this connection
        self.token = token  # required in initializationOptions.token (TCP beyond loopback)
        self.session = next(_sessions)
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}  # CLI flags win
        self.docs = Documents()
        self.suggestions: dict[str, Suggestion] = {}
        self.cursors: dict[str, int] = {}  # where the last edit of each document ended
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.wanted: set[str] = set()  # background documents that would get a suggestion when focused
        self.desynced: dict[str, str] = {}  # documents whose text we lost track of → why
        self.focus: str | None = None
        self._last_edit_uri: str | None = None
        self._focus_edit_at = 0.0
        self.explicit: dict[str, Any] = {}  # settings the client sent
        self.config_values: dict[str, Any] = {}  # settings from tinymorph.toml (last good file)
        self.settings = Settings()
        self.workspace_config = WorkspaceConfig()
        self.config: Config | None = None  # the last config that loaded
        self.config_error: str | None = None
        self.steering_error: str | None = None
        self._config_fp: tuple | None = None
        self._config_plan: SteeringPlan | None = None
        self._pending_plan: tuple[SteeringPlan, str] | None = None
        self._config_task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.refresh_support = False
        self.progress_support = False
        self.document_changes = False
        self.last_ttft_ms: float | None = None
        self.stats = {"scheduled": 0, "finished": 0, "cancelled": 0, "failed": 0, "accepted": 0}
        self.feature_searches = SearchGate()  # one at a time, a picker's stale ones cut short
        self._refresh_handle: asyncio.TimerHandle | None = None
        self._last_refresh = 0.0
        self._progress_token: str | None = None
        self._last_status: dict | None = None
        self._shown: set[str] = set()
        self.runtime.state_listeners.append(self._state_changed_threadsafe)

    @property
    def root(self) -> str | None:
        return self.workspace_config.roots[0] if self.workspace_config.roots else None

    def key(self, uri: str) -> tuple:
        """The scheduler's replace key of a document's generation (per session: two editors may
        have the same file open)."""
        return ("lsp", self.session, uri)

    def close_session(self) -> None:
        """The connection ended: stop this session's work; the runtime carries on for others."""
        for uri in list(self.suggestions) + list(self.timers):
            self.drop(uri)
        if self._config_task is not None:
            self._config_task.cancel()
        if self._state_changed_threadsafe in self.runtime.state_listeners:
            self.runtime.state_listeners.remove(self._state_changed_threadsafe)

    # -- settings and config ----------------------------------------------------------------
    def apply_settings(self, raw: Any) -> set[str]:
        """Merge settings from the client; returns the keys whose effective value changed."""
        values, problems = validate_settings(raw)
        for p in problems:
            self.log(p, types.MessageType.Warning)
        self.explicit.update(values)
        if "config" in values:
            self.workspace_config.explicit = values["config"]
            self._config_fp = None
        return self._recompute()

    def reload_config(self, force: bool = False) -> set[str]:
        """Read the config files again if they changed (or `force`); returns changed setting keys.

        A broken file is reported once and changes nothing: the previous values (and steering)
        stay in effect until the file is valid again.
        """
        fingerprint = self.workspace_config.fingerprint()
        if not force and fingerprint == self._config_fp:
            return set()
        self._config_fp = fingerprint
        try:
            cfg = self.workspace_config.load()
        except Exception as exc:  # noqa: BLE001 - a broken config must not stop the server
            message = f"config ignored (previous values stay in effect): {exc}"
            if message != self.config_error:
                self.config_error = message
                self.show(message, types.MessageType.Warning)
                self.notify_status()
            return set()
        if self.config_error is not None:
            self.log("config is valid again")
        self.config_error = None
        self.config_values = {
            "model": cfg.model.path, "dtype": cfg.model.dtype, "threads": cfg.model.threads,
            "maxTokens": cfg.completion.max_tokens, "stop": cfg.completion.stop,
            "debounceMs": cfg.completion.debounce_ms, "contextTokens": cfg.completion.context_tokens,
        }
        self.config = cfg
        if self.runtime.engine is not None:
            self._use_library()
        plan = cfg.plan()
        if plan != self._config_plan or self.steering_error is not None:
            self._config_plan = plan
            origin = str(cfg.sources[-1]) if cfg.sources else "config"
            self.adopt_plan(plan, origin)
        changed = self._recompute()
        self.settings_changed(changed)
        return changed

    def _use_library(self) -> None:
        """Resolve features with the SAEs this workspace's config names."""
        from ..steering.config import library_from_config

        if self.config is None:
            return
        specs = self.config.sae_specs()
        current = self.runtime.feature_library()
        if current is not None and getattr(current, "specs", None) == {"default": "default", **specs}:
            return  # same SAEs: keep the loaded ones
        self.runtime.use_feature_library(library_from_config(self.config))

    def settings_changed(self, changed: set[str]) -> None:
        if "enabled" in changed:
            self.enabled_changed()
        if changed & set(MODEL_KEYS):
            self.reload_if_needed()
        if changed:
            self.notify_status()

    async def watch_config(self) -> None:
        """Poll the config files' fingerprint (editors without file watching get reloads too)."""
        while True:
            await asyncio.sleep(CONFIG_POLL_S)
            try:
                self.reload_config()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad reload
                log.exception("config reload failed")

    def _recompute(self) -> set[str]:
        merged = {**asdict(Settings()), **{k: v for k, v in self.config_values.items() if v is not None},
                  **self.explicit, **self.overrides}
        old = asdict(self.settings)
        self.settings = Settings(**merged)
        return {k for k, v in merged.items() if old.get(k) != v}

    def model_settings(self) -> ModelSettings:
        s = self.settings
        return ModelSettings(model=s.model, dtype=s.dtype, threads=s.threads, context_tokens=s.contextTokens)

    # -- steering -----------------------------------------------------------------------------
    def adopt_plan(self, plan: SteeringPlan, origin: str) -> None:
        """Use `plan` once the engine's resolver accepts it; until then (or if it never does) the
        last good plan stays in effect and the problem is reported once."""
        self._pending_plan = (plan, origin)
        if self.runtime.ready and self.loop is not None:
            self.loop.create_task(self._adopt_pending())

    async def _adopt_pending(self) -> None:
        if self._pending_plan is None or not self.runtime.ready:
            return
        plan, origin = self._pending_plan
        self._pending_plan = None
        try:
            await asyncio.to_thread(self.runtime.check_plan, plan)
        except Exception as exc:  # noqa: BLE001 - unknown feature, bad layer, missing SAE, …
            self.steering_failed(f"{origin}: {exc}")
            return
        if self.steering_error is not None:
            self.log("steering error resolved")
        self.steering_error = None
        self.set_plan(plan)

    def note_config_plan(self, plan: SteeringPlan) -> None:
        """A steering command wrote `plan` to the config: adopt it without waiting for the watcher."""
        self._config_plan = plan
        self._config_fp = self.workspace_config.fingerprint()
        self._pending_plan = None
        self.steering_error = None

    def steering_failed(self, message: str) -> None:
        """Report a plan that cannot be applied once; suggestions go on with the last good plan."""
        if message == self.steering_error:
            return
        self.steering_error = message
        fallback = self.runtime.steering.describe()
        using = "unsteered" if not fallback else "with the previous steering"
        self.show(f"steering error: {message} (suggestions continue {using})", types.MessageType.Error)
        self.notify_status()

    def set_plan(self, plan: SteeringPlan) -> None:
        """Steer with `plan` from now on; suggestions made with the old one are dropped."""
        changed = plan != self.runtime.steering
        self.runtime.steering = plan
        if changed:
            for uri in list(self.suggestions):
                self.drop(uri)
                if uri == self.focus:
                    self.schedule(uri, delay=0.0)
            self.refresh_hints()
        self.notify_status()

    # -- messages to the client ---------------------------------------------------------------
    def log(self, message: str, kind: types.MessageType = types.MessageType.Info) -> None:
        log.info(message)
        try:
            self.window_log_message(types.LogMessageParams(type=kind, message=f"[tinymorph] {message}"))
        except Exception:  # noqa: BLE001 - no transport yet (before the connection)
            pass

    def show(self, message: str, kind: types.MessageType = types.MessageType.Warning) -> None:
        """A message the user sees (showMessage) and the log keeps."""
        self.log(message, kind)
        try:
            self.window_show_message(types.ShowMessageParams(type=kind, message=f"tinymorph: {message}"))
        except Exception:  # noqa: BLE001
            pass

    def report_server_error(self, error: Exception, source) -> None:
        """pygls shows every failed notification as an error popup; log it, and show each kind once."""
        from pygls.exceptions import FeatureRequestError

        if source is FeatureRequestError:  # the request's own error answer already says it
            log.debug("request failed: %s", error)
            return
        log.error("server error (%s): %s", getattr(source, "__name__", source), error)
        text = f"{type(error).__name__}: {error}"[:300]
        if text not in self._shown:
            self._shown.add(text)
            self.log(f"internal error: {text}", types.MessageType.Error)

    def status(self, state: str | None = None, message: str | None = None) -> dict[str, Any]:
        """The status object; `state`/`message` override the runtime's (a transition being reported)."""
        state = state or self.runtime.state
        if state == "idle":
            state = "loading"
        if state == "ready" and not self.settings.enabled:
            state = "disabled"
        message = self.runtime.message if message is None else message
        if self.steering_error is not None and state == "ready":
            message = f"steering error: {self.steering_error}"
        sched = self.runtime.scheduler.stats
        return {
            "state": state, "model": self.settings.model, "lastTtftMs": self.last_ttft_ms,
            "message": message, "steering": self.runtime.steering.describe(),
            "steeringError": self.steering_error, "configError": self.config_error,
            "stats": {**self.stats, "submitted": sched.submitted, "superseded": sched.superseded},
        }

    def notify_status(self, force: bool = False, state: str | None = None, message: str | None = None) -> None:
        payload = self.status(state, message)
        key = {k: v for k, v in payload.items() if k != "stats"}
        if force or key != self._last_status:
            self._last_status = key
            try:
                self.protocol.notify("tinymorph/status", payload)
            except Exception:  # noqa: BLE001 - the connection is gone
                log.debug("status not sent", exc_info=True)

    def refresh_hints(self) -> None:
        """Ask the client to re-request inlay hints, at most once per REFRESH_INTERVAL_S; a request
        inside the interval is coalesced into one trailing refresh, so the last state always shows."""
        if not self.refresh_support or self.loop is None or self._refresh_handle is not None:
            return
        delay = max(0.0, self._last_refresh + REFRESH_INTERVAL_S - self.loop.time())
        self._refresh_handle = self.loop.call_later(delay, self._send_refresh)

    def _send_refresh(self) -> None:
        self._refresh_handle = None
        self._last_refresh = self.loop.time() if self.loop else 0.0
        if self.protocol.closed:
            return
        try:
            self.workspace_inlay_hint_refresh(None)
        except Exception:  # noqa: BLE001 - e.g. the connection is closing
            log.debug("inlay hint refresh failed", exc_info=True)

    # -- model loading --------------------------------------------------------------------------
    def _state_changed_threadsafe(self, runtime: Runtime) -> None:
        # read the state now, in the thread that set it: a fast failing load would otherwise be
        # "error" again before the loop runs, and clients would never see it was "loading"
        state, message = runtime.state, runtime.message
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._state_changed, state, message)

    def reload_if_needed(self) -> None:
        """Load the model again when its settings differ from the loaded (or loading) ones.

        While a load is in flight (or before the first one started) nothing happens now: the first
        load reads the settings when it starts, and `_state_changed` calls this again at its end.
        """
        if self.runtime.state not in ("ready", "error") or self.model_settings() == self.runtime.settings:
            return
        self.log(f"model settings changed: reloading {self.settings.model}")
        for uri in list(self.suggestions):
            self.drop(uri)
        self.runtime.load(self.model_settings())

    def _state_changed(self, state: str, message: str) -> None:
        if state in ("ready", "error") and self._progress_token is not None:
            token, self._progress_token = self._progress_token, None
            self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))
        if state == "error":  # the user must see why nothing is suggested (a model or an engine that failed)
            self.show(message, types.MessageType.Error)
        else:
            self.log(f"model {state}: {message}")
        self.notify_status(state=state, message=message)
        if state in ("ready", "error") and self.model_settings() != self.runtime.settings:
            self.reload_if_needed()  # settings changed while the model was loading
            return
        if state == "ready" and self.runtime.ready:
            self._use_library()
            if self._pending_plan is None and self.steering_error is None and self._config_plan is not None \
                    and self._config_plan != self.runtime.steering and self.runtime.steering.is_empty():
                self._pending_plan = (self._config_plan, "config")
            if self._pending_plan is not None and self.loop is not None:
                self.loop.create_task(self._adopt_pending())
            if self.focus in self.docs and self.settings.enabled:
                self.schedule(self.focus, delay=0.0)  # the user typed while the model loaded

    async def load_model(self) -> None:
        """Load in the background (initialize has already answered); report `$/progress`."""
        if self.runtime.state in ("loading", "ready"):
            self.notify_status(force=True)
            if self.runtime.state == "ready":
                self._state_changed("ready", self.runtime.message)
            return
        if self.progress_support:
            token = f"tinymorph-load-{uuid.uuid4().hex[:8]}"
            try:
                await asyncio.wait_for(self.work_done_progress.create_async(token), 5)
                self.work_done_progress.begin(token, types.WorkDoneProgressBegin(
                    title="tinymorph", message=f"loading {self.settings.model}", percentage=0))
                self._progress_token = token
            except Exception:  # noqa: BLE001 - a client that refuses the token just gets no progress
                log.debug("work done progress refused", exc_info=True)
        loop = self.loop

        def progress(message: str, fraction: float | None) -> None:
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._report_progress, message, fraction)

        self.runtime.load(self.model_settings(), progress=progress)
        self.notify_status()

    def _report_progress(self, message: str, fraction: float | None) -> None:
        if self._progress_token is None:
            return
        pct = None if fraction is None else max(0, min(100, int(fraction * 100)))
        self.work_done_progress.report(self._progress_token,
                                       types.WorkDoneProgressReport(message=message, percentage=pct))

    # -- focus ----------------------------------------------------------------------------------
    def edited(self, uri: str) -> None:
        """An edit in `uri`: it takes the focus unless another document is being typed in."""
        now = self.loop.time() if self.loop is not None else 0.0
        self._last_edit_uri = uri
        if self.focus in (None, uri) or self.focus not in self.docs or now - self._focus_edit_at >= FOCUS_HOLD_S:
            self.focus = uri
        if self.focus == uri:
            self._focus_edit_at = now

    def focused(self, uri: str) -> None:
        """The client asked for `uri`'s inline completion: the user is there."""
        if uri == self.focus or uri not in self.docs:
            return
        self.focus = uri
        if uri in self.wanted:
            self.wanted.discard(uri)
            self.schedule(uri, delay=0.0)

    def _maybe_refocus(self) -> None:
        """The focused document went quiet: the most recently edited one takes the focus (the user
        switched documents), if it is still waiting for its suggestion."""
        if self.loop is None or self.loop.time() - self._focus_edit_at < FOCUS_HOLD_S:
            return
        uri = self._last_edit_uri
        if uri is not None and uri != self.focus and uri in self.wanted:
            self.focused(uri)

    def shown(self, uri: str) -> None:
        """The client asked for `uri`'s hints: a background document that missed its suggestion
        gets one job now, behind the focused document's."""
        if uri in self.wanted and uri not in self.suggestions and uri not in self.timers:
            self.wanted.discard(uri)
            doc = self.docs.get(uri)
            if doc is not None:
                self.start(doc, self.cursors.get(uri, len(doc)), priority=PRIORITY_BACKGROUND)

    # -- suggestions ------------------------------------------------------------------------------
    def schedule(self, uri: str, delay: float | None = None) -> None:
        """(Re)start the debounce timer for `uri`; when it fires a generation starts."""
        if self.loop is None:
            return
        if (old := self.timers.pop(uri, None)) is not None:
            old.cancel()
        doc = self.docs.get(uri)
        if doc is None:
            return
        wait = self.settings.debounceMs / 1000 if delay is None else delay
        self.timers[uri] = self.loop.call_later(wait, self._debounced, uri, doc.version)

    def _debounced(self, uri: str, version: int) -> None:
        self.timers.pop(uri, None)
        doc = self.docs.get(uri)
        if doc is None or doc.version != version:
            return
        if uri != self.focus:
            self.wanted.add(uri)  # a background document: nothing until it is focused or shown
            if self.loop is not None:
                wait = max(0.0, self._focus_edit_at + FOCUS_HOLD_S - self.loop.time())
                self.loop.call_later(wait + 0.01, self._maybe_refocus)
            return
        self.start(doc, self.cursors.get(uri, len(doc)))

    def context_before(self, doc: Document, cursor: int) -> str:
        """The text before `cursor` that the engine needs: a window, not the document.

        It starts at a multiple of the engine's stride at least one window back, so the engine
        picks exactly the window it would pick from the whole text (its prefix cache stays valid).
        """
        engine = self.runtime.engine
        if engine is None:
            return doc.slice(0, cursor)
        policy = engine.context
        keep = policy.max_chars() + 1
        base = max(0, (cursor - keep) // policy.stride_chars * policy.stride_chars)
        return sanitize(doc.slice(base, cursor))

    def start(self, doc: Document, cursor: int, priority: int = PRIORITY_EDITOR) -> Suggestion | None:
        """Submit a generation continuing `doc` at `cursor` (replacing the document's previous one)."""
        if not (self.runtime.ready and self.settings.enabled) or doc.uri in self.desynced:
            return None
        plan = self.runtime.steering
        context = self.context_before(doc, cursor)
        s = Suggestion(doc.uri, doc.version, cursor, context, steering=plan.describe())
        self.suggestions[doc.uri] = s
        self.wanted.discard(doc.uri)
        max_tokens = self.settings.maxTokens
        if priority != PRIORITY_EDITOR:
            max_tokens = min(max_tokens, BACKGROUND_MAX_TOKENS)
        options = GenerationOptions(max_tokens=max_tokens, stop=self.settings.stop,
                                    temperature=self.settings.temperature)
        loop = self.loop
        assert loop is not None

        def on_token(_job: Job, event: TokenEvent) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._grow, s, event.text)

        def on_done(_job: Job, completion: Completion | None, error: BaseException | None) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._finish, s, plan, completion, error)

        request = CompletionRequest(text=context, doc_id=doc.uri, options=options, steering=plan)
        self.runtime.scheduler.submit(Job(request, priority=priority, replace=self.key(doc.uri),
                                          on_token=on_token, on_done=on_done))
        self.stats["scheduled"] += 1
        return s

    def _grow(self, s: Suggestion, text: str) -> None:
        if self.suggestions.get(s.uri) is s and not s.done:
            s.text = text
            self.refresh_hints()

    def _finish(self, s: Suggestion, plan: SteeringPlan, completion: Completion | None,
                error: BaseException | None) -> None:
        current = self.suggestions.get(s.uri) is s
        if error is not None or completion is None:
            self.stats["failed"] += 1
            if current:
                del self.suggestions[s.uri]
            if isinstance(error, ValueError) and not plan.is_empty() and plan == self.runtime.steering:
                # the steering stopped working (an SAE file went away…): go on unsteered, say so once
                self.steering_failed(str(error))
                self.set_plan(SteeringPlan())
                return
            text = f"suggestion failed: {error}"
            if text not in self._shown:  # once per distinct failure, not once per keystroke
                self._shown.add(text)
                self.log(text, types.MessageType.Error)
            else:
                log.debug(text)
            self.refresh_hints()
            return
        if completion.stop_reason == "cancelled":
            self.stats["cancelled"] += 1
            if current:  # cancelled without a successor (dismiss, toggle): nothing more will come
                del self.suggestions[s.uri]
            return
        self.stats["finished"] += 1
        s.text, s.done, s.completion = completion.text, True, completion
        self.last_ttft_ms = round(completion.timings.ttft_ms, 2)
        metrics = metrics_payload(s, completion)
        try:
            self.protocol.notify("tinymorph/metrics", metrics)
        except Exception:  # noqa: BLE001 - the connection is gone
            pass
        self.log(log_line(metrics))
        self.runtime.completed(completion, "lsp")
        if current:
            self.refresh_hints()

    def drop(self, uri: str) -> bool:
        """Forget the document's suggestion and stop its generation and pending timer."""
        if (timer := self.timers.pop(uri, None)) is not None:
            timer.cancel()
        s = self.suggestions.pop(uri, None)
        if s is not None and not s.done:
            self.runtime.scheduler.cancel_key(self.key(uri))
        return s is not None

    def view(self, uri: str) -> tuple[Document, View] | None:
        """The document and its currently valid suggestion, if any."""
        doc = self.docs.get(uri)
        s = self.suggestions.get(uri)
        if doc is None or s is None or not self.settings.enabled or uri in self.desynced:
            return None
        v = s.view(doc.version)
        return (doc, v) if v is not None else None

    def pending(self, uri: str) -> bool:
        """Whether a suggestion for `uri` is on its way (debouncing or generating)."""
        s = self.suggestions.get(uri)
        return uri in self.timers or (s is not None and not s.done)

    def on_edit(self, doc: Document, cursor: int, inserted: bool) -> None:
        """After an edit: keep a typed-ahead suggestion, otherwise drop it and schedule a new one."""
        self.edited(doc.uri)
        s = self.suggestions.get(doc.uri)
        if s is not None and s.keeps_after_edit():
            self.refresh_hints()
            return
        had = self.drop(doc.uri)
        self.cursors[doc.uri] = cursor
        if inserted and self.settings.enabled and self.runtime.ready and doc.uri not in self.desynced:
            self.schedule(doc.uri)
        if had:  # clients may keep showing the old hint until asked to re-request
            self.refresh_hints()

    def desync(self, uri: str, reason: str) -> None:
        """A change to `uri` could not be applied: its text here is no longer the client's.

        Nothing is suggested for it until the client sends the whole text again (didOpen or a
        full-document didChange); the client is told once, and asked with `tinymorph/resync`.
        """
        first = uri not in self.desynced
        self.desynced[uri] = reason
        if self.drop(uri):
            self.refresh_hints()
        if first:
            self.show(f"a change to {uri} could not be applied ({reason}); suggestions for it pause "
                      "until the editor sends the whole text again", types.MessageType.Warning)
            try:
                self.protocol.notify("tinymorph/resync", {"uri": uri, "reason": reason})
            except Exception:  # noqa: BLE001
                pass

    def resynced(self, uri: str) -> None:
        if self.desynced.pop(uri, None) is not None:
            self.log(f"{uri} is in sync again")

    def set_enabled(self, enabled: bool) -> None:
        before = self.settings.enabled
        self.explicit["enabled"] = enabled
        self._recompute()
        if self.settings.enabled != before:
            self.enabled_changed()

    def enabled_changed(self) -> None:
        """Turning suggestions off stops all work at once; hints disappear after the refresh."""
        if not self.settings.enabled:
            for uri in list(self.suggestions) + list(self.timers):
                self.drop(uri)
        self.refresh_hints()
        self.notify_status()
