"""The language server: pygls handlers that connect editors to the shared `Runtime`.

Why it looks like this: every handler is thin. Text bookkeeping lives in `documents.py`, the rules
for what a suggestion may show or insert in `suggestions.py`; this module only moves data between
the protocol, the scheduler's engine thread and those two. All suggestion state is touched on the
event-loop thread only: engine callbacks hop over with `call_soon_threadsafe`, so there are no
locks here and no half-updated suggestion can be served.

Flow: `didChange` → (debounce) → one `Job` per document on the scheduler (`replace` key: latest
wins, a stale generation stops at its next token) → tokens stream back → rate-limited
`workspace/inlayHint/refresh` → the client asks for `textDocument/inlayHint` and gets the
suggestion only if it still fits the document's current text (docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol, lsp_method

from ..steering.engine import CompletionRequest
from ..steering.generate import Completion, GenerationOptions, TokenEvent
from ..steering.steering import SteeringEntry, SteeringPlan
from .documents import Document, Documents, PositionError
from .runtime import ModelSettings, Runtime
from .scheduler import PRIORITY_EDITOR, Job
from .suggestions import (
    MODEL_KEYS,
    Settings,
    Suggestion,
    View,
    accept_part,
    label_for,
    log_line,
    metrics_payload,
    tooltip_for,
    validate_settings,
)

log = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 0.1  # at most one workspace/inlayHint/refresh per 100 ms (plus a trailing one)
INLINE_WAIT_S = 1.5  # how long textDocument/inlineCompletion waits for a running generation
APPLY_EDIT_TIMEOUT_S = 10.0
COMMANDS = (
    "tinymorph.accept", "tinymorph.acceptWord", "tinymorph.acceptLine", "tinymorph.dismiss",
    "tinymorph.toggle", "tinymorph.status", "tinymorph.features.search", "tinymorph.features.show",
    "tinymorph.steer.list", "tinymorph.steer.set", "tinymorph.steer.remove", "tinymorph.steer.clear",
    "tinymorph.steer.compare", "tinymorph.accepted",
)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tinymorph")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0.0.0"


class _Malformed:
    """A request whose params did not match the LSP types: answered with InvalidParams, not dropped."""

    def __init__(self, msg_id: Any, method: str, error: Exception):
        self.id, self.method, self.error = msg_id, method, error


def _describe_structure_error(exc: BaseException) -> str:
    """cattrs' nested exception groups as one readable line ("… @ $.params.range")."""
    try:
        from cattrs import transform_error

        return "; ".join(transform_error(exc, path="$"))[:500]
    except Exception:  # noqa: BLE001 - not a cattrs validation error
        return str(exc)[:500]


class TinymorphProtocol(LanguageServerProtocol):
    """pygls's protocol with two changes.

    1. Requests with malformed params get a JSON-RPC InvalidParams answer (pygls logs and drops
       them, which leaves the client waiting forever).
    2. Open/change/close skip pygls's own workspace: documents.py keeps the text (see its
       docstring for why), so every edit is applied once, not twice.
    """

    def structure_message(self, data: dict[str, Any]):
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            if isinstance(data, dict) and "id" in data and isinstance(data.get("method"), str):
                return _Malformed(data["id"], data["method"], exc)
            raise

    def handle_message(self, message):
        if isinstance(message, _Malformed):
            detail = _describe_structure_error(message.error.__cause__ or message.error)
            log.warning("malformed %s request: %s", message.method, detail)
            error = JsonRpcInvalidParams(f"invalid params for {message.method}: {detail}")
            self._send_response(message.id, error=error.to_response_error())
            return
        return super().handle_message(message)

    def _user(self, method: str, params):
        if (handler := self.fm.features.get(method)) is not None:
            yield handler, (params,), None

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams):
        yield from self._user(types.TEXT_DOCUMENT_DID_OPEN, params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
        yield from self._user(types.TEXT_DOCUMENT_DID_CHANGE, params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams):
        yield from self._user(types.TEXT_DOCUMENT_DID_CLOSE, params)


class CommandError(JsonRpcInvalidParams):
    """A command's arguments are wrong; the message goes to the user."""


class RequestFailed(JsonRpcException):
    """LSP's RequestFailed: the request was fine but cannot be served now (the message says why)."""

    CODE = -32803


class TinymorphServer(LanguageServer):
    """Editor-side state around one shared `Runtime`."""

    def __init__(self, runtime: Runtime | None = None, overrides: dict[str, Any] | None = None):
        super().__init__("tinymorph", _version(), protocol_cls=TinymorphProtocol,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.runtime = runtime or Runtime()
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}  # CLI flags win
        self.docs = Documents()
        self.suggestions: dict[str, Suggestion] = {}
        self.cursors: dict[str, int] = {}  # where the last edit of each document ended
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.explicit: dict[str, Any] = {}  # settings the client sent
        self.config_values: dict[str, Any] = {}  # settings from tinymorph.toml
        self.settings = Settings()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.refresh_support = False
        self.progress_support = False
        self.document_changes = False
        self.root: str | None = None
        self.last_edited: str | None = None
        self.last_ttft_ms: float | None = None
        self.stats = {"scheduled": 0, "finished": 0, "cancelled": 0, "failed": 0, "accepted": 0}
        self._refresh_handle: asyncio.TimerHandle | None = None
        self._last_refresh = 0.0
        self._progress_token: str | None = None
        self._last_status: dict | None = None
        self.runtime.state_listeners.append(self._state_changed_threadsafe)

    # -- settings ---------------------------------------------------------------------------
    def apply_settings(self, raw: Any) -> set[str]:
        """Merge settings from the client; returns the keys whose effective value changed."""
        values, problems = validate_settings(raw)
        for p in problems:
            self.log(p, types.MessageType.Warning)
        self.explicit.update(values)
        if "config" in values:
            self.load_config()
        return self._recompute()

    def load_config(self) -> None:
        """Read tinymorph.toml (the `config` setting, else user + project files) for defaults and steering."""
        try:
            from ..steering.config import load_config
        except ImportError:
            return
        path = self.explicit.get("config")
        try:
            cfg = load_config(start=self.root, project=path) if path else load_config(start=self.root)
        except Exception as exc:  # noqa: BLE001 - a broken config must not stop the server
            self.log(f"config ignored: {exc}", types.MessageType.Warning)
            self.config_values = {}
            return
        self.config_values = {
            "model": cfg.model.path, "dtype": cfg.model.dtype, "threads": cfg.model.threads,
            "maxTokens": cfg.completion.max_tokens, "stop": cfg.completion.stop,
            "debounceMs": cfg.completion.debounce_ms, "contextTokens": cfg.completion.context_tokens,
        }
        if cfg.steer and self.runtime.steering.is_empty():
            self.runtime.steering = cfg.plan()

    def _recompute(self) -> set[str]:
        merged = {**asdict(Settings()), **{k: v for k, v in self.config_values.items() if v is not None},
                  **self.explicit, **self.overrides}
        old = asdict(self.settings)
        self.settings = Settings(**merged)
        return {k for k, v in merged.items() if old.get(k) != v}

    def model_settings(self) -> ModelSettings:
        s = self.settings
        return ModelSettings(model=s.model, dtype=s.dtype, threads=s.threads, context_tokens=s.contextTokens)

    # -- messages to the client ---------------------------------------------------------------
    def log(self, message: str, kind: types.MessageType = types.MessageType.Info) -> None:
        log.info(message)
        try:
            self.window_log_message(types.LogMessageParams(type=kind, message=f"[tinymorph] {message}"))
        except Exception:  # noqa: BLE001 - no transport yet (before the connection)
            pass

    def status(self, state: str | None = None, message: str | None = None) -> dict[str, Any]:
        """The status object; `state`/`message` override the runtime's (a transition being reported)."""
        state = state or self.runtime.state
        if state == "idle":
            state = "loading"
        if state == "ready" and not self.settings.enabled:
            state = "disabled"
        sched = self.runtime.scheduler.stats
        return {
            "state": state, "model": self.settings.model, "lastTtftMs": self.last_ttft_ms,
            "message": self.runtime.message if message is None else message,
            "steering": self.runtime.steering.describe(),
            "stats": {**self.stats, "submitted": sched.submitted, "superseded": sched.superseded},
        }

    def notify_status(self, force: bool = False, state: str | None = None, message: str | None = None) -> None:
        payload = self.status(state, message)
        key = {k: v for k, v in payload.items() if k != "stats"}
        if force or key != self._last_status:
            self._last_status = key
            self.protocol.notify("tinymorph/status", payload)

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
        self.log(f"model {state}: {message}", types.MessageType.Error if state == "error" else types.MessageType.Info)
        self.notify_status(state=state, message=message)
        if state in ("ready", "error") and self.model_settings() != self.runtime.settings:
            self.reload_if_needed()  # settings changed while the model was loading
            return
        if state == "ready" and self.runtime.ready and self.last_edited in self.docs and self.settings.enabled:
            self.schedule(self.last_edited, delay=0.0)  # the user typed while the model loaded

    async def load_model(self) -> None:
        """Load in the background (initialize has already answered); report `$/progress`."""
        if self.runtime.state in ("loading", "ready"):
            self.notify_status(force=True)
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
        if doc is not None and doc.version == version:
            self.start(doc, self.cursors.get(uri, len(doc.text)))

    def start(self, doc: Document, cursor: int) -> Suggestion | None:
        """Submit a generation continuing `doc` at `cursor` (replacing the document's previous one)."""
        if not (self.runtime.ready and self.settings.enabled):
            return None
        plan = self.runtime.steering
        s = Suggestion(doc.uri, doc.version, doc.text[:cursor], doc.text[cursor:], steering=plan.describe())
        self.suggestions[doc.uri] = s
        options = GenerationOptions(max_tokens=self.settings.maxTokens, stop=self.settings.stop,
                                    temperature=self.settings.temperature)
        loop = self.loop
        assert loop is not None

        def on_token(_job: Job, event: TokenEvent) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._grow, s, event.text)

        def on_done(_job: Job, completion: Completion | None, error: BaseException | None) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._finish, s, completion, error)

        request = CompletionRequest(text=s.before, doc_id=doc.uri, options=options, steering=plan)
        self.runtime.scheduler.submit(Job(request, priority=PRIORITY_EDITOR, replace=("lsp", doc.uri),
                                          on_token=on_token, on_done=on_done))
        self.stats["scheduled"] += 1
        return s

    def _grow(self, s: Suggestion, text: str) -> None:
        if self.suggestions.get(s.uri) is s and not s.done:
            s.text = text
            self.refresh_hints()

    def _finish(self, s: Suggestion, completion: Completion | None, error: BaseException | None) -> None:
        current = self.suggestions.get(s.uri) is s
        if error is not None or completion is None:
            self.stats["failed"] += 1
            if current:
                del self.suggestions[s.uri]
            self.log(f"suggestion failed: {error}", types.MessageType.Error)
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
        self.protocol.notify("tinymorph/metrics", metrics)
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
            self.runtime.scheduler.cancel_key(("lsp", uri))
        return s is not None

    def view(self, uri: str) -> tuple[Document, View] | None:
        """The document and its currently valid suggestion, if any."""
        doc = self.docs.get(uri)
        s = self.suggestions.get(uri)
        if doc is None or s is None or not self.settings.enabled:
            return None
        v = s.view(doc.text, doc.version)
        return (doc, v) if v is not None else None

    def pending(self, uri: str) -> bool:
        """Whether a suggestion for `uri` is on its way (debouncing or generating)."""
        s = self.suggestions.get(uri)
        return uri in self.timers or (s is not None and not s.done)

    def on_edit(self, doc: Document, cursor: int, inserted: bool) -> None:
        """After an edit: keep a typed-ahead suggestion, otherwise drop it and schedule a new one."""
        self.last_edited = doc.uri
        s = self.suggestions.get(doc.uri)
        if s is not None and s.keeps_after_edit(doc.text):
            self.refresh_hints()
            return
        had = self.drop(doc.uri)
        self.cursors[doc.uri] = cursor
        if inserted and self.settings.enabled and self.runtime.ready:
            self.schedule(doc.uri)
        if had:  # clients may keep showing the old hint until asked to re-request
            self.refresh_hints()

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


# -- the server instance and its handlers -----------------------------------------------------------------


def _position(doc: Document, offset: int) -> types.Position:
    line, character = doc.position_at(offset)
    return types.Position(line=line, character=character)


def _in_range(pos: types.Position, rng: types.Range) -> bool:
    p = (pos.line, pos.character)
    return (rng.start.line, rng.start.character) <= p <= (rng.end.line, rng.end.character)


def _uri_arg(args: tuple) -> str:
    value = args[0] if args else None
    if isinstance(value, dict):
        value = value.get("uri")
    if not isinstance(value, str) or not value:
        raise CommandError("expected a document URI as the first argument ([uri] or [{\"uri\": …}])")
    return value


class _QuietUserErrors(logging.Filter):
    """pygls logs a traceback for every error answer; a user's bad argument is not a server fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, CommandError | RequestFailed)


def build_server(runtime: Runtime | None = None, overrides: dict[str, Any] | None = None) -> TinymorphServer:
    """A server with every handler registered (one per process: pygls features are per instance)."""
    server = TinymorphServer(runtime, overrides)
    logging.getLogger("pygls.protocol.json_rpc").addFilter(_QuietUserErrors())

    @server.feature(types.INITIALIZE)
    def initialize(ls: TinymorphServer, params: types.InitializeParams) -> None:
        from pygls.capabilities import ServerCapabilitiesBuilder

        ls.loop = asyncio.get_running_loop()
        caps = params.capabilities
        ls.docs.encoding = str(ServerCapabilitiesBuilder.choose_position_encoding(caps))
        ws = caps.workspace
        ls.refresh_support = bool(ws and ws.inlay_hint and ws.inlay_hint.refresh_support)
        ls.document_changes = bool(ws and ws.workspace_edit and ws.workspace_edit.document_changes)
        ls.progress_support = bool(caps.window and caps.window.work_done_progress)
        if params.workspace_folders:
            ls.root = _fs_path(params.workspace_folders[0].uri)
        elif params.root_uri:
            ls.root = _fs_path(params.root_uri)
        elif params.root_path:
            ls.root = params.root_path
        ls.load_config()
        ls.apply_settings(params.initialization_options or {})

    @server.feature(types.INITIALIZED)
    async def initialized(ls: TinymorphServer, _params: types.InitializedParams) -> None:
        await ls.load_model()

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: TinymorphServer, params: types.DidChangeConfigurationParams) -> None:
        changed = ls.apply_settings(params.settings)
        if "enabled" in changed:
            ls.enabled_changed()
        if changed & set(MODEL_KEYS):
            ls.reload_if_needed()
        ls.notify_status()

    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: TinymorphServer, params: types.DidOpenTextDocumentParams) -> None:
        td = params.text_document
        ls.drop(td.uri)
        ls.docs.open(td.uri, td.text, td.version, td.language_id)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: TinymorphServer, params: types.DidChangeTextDocumentParams) -> None:
        doc = ls.docs.get(params.text_document.uri)
        if doc is None:
            ls.log(f"didChange for a document that is not open: {params.text_document.uri}",
                   types.MessageType.Warning)
            return
        cursor, inserted = len(doc.text), False
        for change in params.content_changes:
            if isinstance(change, types.TextDocumentContentChangePartial):
                r = change.range
                start, end = (r.start.line, r.start.character), (r.end.line, r.end.character)
                cursor = doc.apply(change.text, start, end)
            else:
                cursor = doc.apply(change.text)
            inserted = inserted or bool(change.text)
        doc.version = params.text_document.version
        ls.on_edit(doc, cursor, inserted)

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: TinymorphServer, params: types.DidCloseTextDocumentParams) -> None:
        uri = params.text_document.uri
        ls.drop(uri)
        ls.docs.close(uri)
        ls.cursors.pop(uri, None)
        if (engine := ls.runtime.engine) is not None:
            engine.forget(uri)

    @server.feature(types.TEXT_DOCUMENT_INLAY_HINT, types.InlayHintOptions(resolve_provider=False))
    def inlay_hint(ls: TinymorphServer, params: types.InlayHintParams) -> list[types.InlayHint]:
        found = ls.view(params.text_document.uri)
        if found is None:
            return []
        doc, v = found
        pos = _position(doc, v.cursor)
        if not _in_range(pos, params.range):
            return []
        return [types.InlayHint(
            position=pos, label=label_for(v.rest),
            tooltip=types.MarkupContent(kind=types.MarkupKind.Markdown, value=tooltip_for(v)),
            padding_left=False, data={"uri": doc.uri, "version": doc.version, "id": v.suggestion.id},
        )]

    @server.feature(types.TEXT_DOCUMENT_HOVER)
    def hover(ls: TinymorphServer, params: types.HoverParams) -> types.Hover | None:
        found = ls.view(params.text_document.uri)
        if found is None:
            return None
        doc, v = found
        pos = _position(doc, v.cursor)
        p = params.position
        if p.line != pos.line or not pos.character - 1 <= p.character <= pos.character:
            return None
        return types.Hover(contents=types.MarkupContent(kind=types.MarkupKind.Markdown, value=tooltip_for(v)),
                           range=types.Range(start=pos, end=pos))

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(ls: TinymorphServer,
                                params: types.InlineCompletionParams) -> types.InlineCompletionList:
        return await _inline_completion(ls, params)

    _register_commands(server)
    return server


def _fs_path(uri: str) -> str | None:
    from pygls.uris import to_fs_path

    try:
        return to_fs_path(uri)
    except Exception:  # noqa: BLE001
        return None


def _inline_item(doc: Document, v: View) -> types.InlineCompletionItem:
    return types.InlineCompletionItem(
        insert_text=v.typed + v.rest,
        range=types.Range(start=_position(doc, v.anchor), end=_position(doc, v.cursor)),
        command=types.Command(title="tinymorph: accepted", command="tinymorph.accepted",
                              arguments=[doc.uri, v.suggestion.id]),
    )


async def _inline_completion(ls: TinymorphServer,
                             params: types.InlineCompletionParams) -> types.InlineCompletionList:
    """The suggestion at the requested position; waits (bounded, cancellable) for one on its way."""
    empty = types.InlineCompletionList(items=[])
    uri = params.text_document.uri
    doc = ls.docs.get(uri)
    if doc is None or not ls.runtime.ready or not ls.settings.enabled:
        return empty
    try:
        offset = doc.offset_at(params.position.line, params.position.character, strict=True)
    except PositionError:
        return empty
    version = doc.version
    context = params.context
    invoked = context is not None and context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
    deadline = time.monotonic() + INLINE_WAIT_S
    started = False
    while True:  # asyncio cancellation ($/cancelRequest) interrupts the sleep below
        doc = ls.docs.get(uri)
        if doc is None or doc.version != version:
            return empty  # the document moved on: this request is stale
        found = ls.view(uri)
        v = found[1] if found is not None and found[1].cursor == offset else None
        if not ls.pending(uri) or (v is not None and v.suggestion.done):
            if v is not None:
                return types.InlineCompletionList(items=[_inline_item(doc, v)])
            if invoked and not started and ls.runtime.ready:
                started = True
                ls.drop(uri)
                if ls.start(doc, offset) is not None:
                    continue
            return empty
        if time.monotonic() >= deadline:
            return types.InlineCompletionList(items=[_inline_item(doc, v)] if v is not None else [])
        await asyncio.sleep(0.02)


# -- workspace/executeCommand ------------------------------------------------------------------------------


def _register_commands(server: TinymorphServer) -> None:
    def command(name: str) -> Callable:
        return server.command(name)

    async def accept(ls: TinymorphServer, args: tuple, kind: str) -> dict[str, Any]:
        uri = _uri_arg(args)
        found = ls.view(uri)
        if found is None:
            return {"applied": False, "text": ""}
        doc, v = found
        part = accept_part(v.rest, kind)  # type: ignore[arg-type]
        pos = _position(doc, v.cursor)
        edit = types.TextEdit(range=types.Range(start=pos, end=pos), new_text=part)
        if ls.document_changes:
            ws_edit = types.WorkspaceEdit(document_changes=[types.TextDocumentEdit(
                text_document=types.OptionalVersionedTextDocumentIdentifier(uri=uri, version=doc.version),
                edits=[edit])])
        else:
            ws_edit = types.WorkspaceEdit(changes={uri: [edit]})
        try:
            result = await asyncio.wait_for(ls.workspace_apply_edit_async(
                types.ApplyWorkspaceEditParams(edit=ws_edit, label="tinymorph: accept suggestion")),
                APPLY_EDIT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the client refused or never answered
            ls.log(f"applyEdit failed: {exc}", types.MessageType.Warning)
            return {"applied": False, "text": part}
        applied = bool(getattr(result, "applied", False))
        if applied:
            ls.stats["accepted"] += 1
        return {"applied": applied, "text": part}

    @command("tinymorph.accept")
    async def accept_all(ls: TinymorphServer, *args):
        return await accept(ls, args, "all")

    @command("tinymorph.acceptWord")
    async def accept_word(ls: TinymorphServer, *args):
        return await accept(ls, args, "word")

    @command("tinymorph.acceptLine")
    async def accept_line(ls: TinymorphServer, *args):
        return await accept(ls, args, "line")

    @command("tinymorph.dismiss")
    def dismiss(ls: TinymorphServer, *args):
        dropped = ls.drop(_uri_arg(args))
        ls.refresh_hints()
        return {"dismissed": dropped}

    @command("tinymorph.toggle")
    def toggle(ls: TinymorphServer, *args):
        if args and not isinstance(args[0], bool):
            raise CommandError("tinymorph.toggle takes [] or [true|false]")
        ls.set_enabled(args[0] if args else not ls.settings.enabled)
        return {"enabled": ls.settings.enabled}

    @command("tinymorph.status")
    def status(ls: TinymorphServer, *args):
        return ls.status()

    @command("tinymorph.accepted")
    def accepted(ls: TinymorphServer, *args):
        ls.stats["accepted"] += 1
        return None

    @command("tinymorph.features.search")
    async def features_search(ls: TinymorphServer, *args):
        if not args or not isinstance(args[0], str):
            raise CommandError("tinymorph.features.search takes [query, limit?]")
        limit = args[1] if len(args) > 1 else 10
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 200:
            raise CommandError("limit must be an integer between 1 and 200")
        return await asyncio.to_thread(_feature_call, ls, "search_features", args[0], limit)

    @command("tinymorph.features.show")
    async def features_show(ls: TinymorphServer, *args):
        if not args or not isinstance(args[0], str):
            raise CommandError("tinymorph.features.show takes [id]")
        return await asyncio.to_thread(_feature_call, ls, "show_feature", args[0])

    @command("tinymorph.steer.list")
    def steer_list(ls: TinymorphServer, *args):
        return ls.runtime.steering.describe()

    @command("tinymorph.steer.set")
    async def steer_set(ls: TinymorphServer, *args):
        entry = _steer_entry(args[0] if args else None)
        entries = [e for e in ls.runtime.steering.entries if e.feature != entry.feature] + [entry]
        plan = SteeringPlan(tuple(entries))
        await _check_plan(ls, plan)
        return _set_plan(ls, plan)

    @command("tinymorph.steer.remove")
    def steer_remove(ls: TinymorphServer, *args):
        if not args or not isinstance(args[0], str):
            raise CommandError("tinymorph.steer.remove takes [feature id]")
        entries = [e for e in ls.runtime.steering.entries if e.feature != args[0]]
        return _set_plan(ls, SteeringPlan(tuple(entries)))

    @command("tinymorph.steer.clear")
    def steer_clear(ls: TinymorphServer, *args):
        return _set_plan(ls, SteeringPlan())

    @command("tinymorph.steer.compare")
    async def steer_compare(ls: TinymorphServer, *args):
        return await _compare(ls, args)


def _feature_call(ls: TinymorphServer, name: str, *args) -> Any:
    """Run a function of steering/features.py with the engine's feature library (or the config's)."""
    try:
        from ..steering import features
        from ..steering.steering import SteeringError
    except ImportError as exc:
        raise RequestFailed(f"feature search not available yet ({exc})") from None
    fn = getattr(features, name, None)
    if fn is None:
        raise RequestFailed("feature search not available yet")
    library = _library(ls)
    try:
        return fn(library, *args)
    except SteeringError as exc:
        raise RequestFailed(f"feature search not available: {exc}") from None
    except (OSError, KeyError, ValueError) as exc:
        raise RequestFailed(f"feature search failed: {exc}") from None


def _library(ls: TinymorphServer):
    """The feature library steering uses (so search and steering share loaded SAEs), else the config's."""
    engine = ls.runtime.engine
    if engine is not None:
        try:
            from ..steering.library import default_resolver

            if engine._resolver is None:  # noqa: SLF001 - the engine creates it lazily on first steer
                engine.set_steering_resolver(default_resolver(engine))
            library = getattr(engine._resolver, "library", None)  # noqa: SLF001
            if library is not None:
                return library
        except Exception:  # noqa: BLE001 - fall back to the config's library
            log.debug("engine feature library unavailable", exc_info=True)
    from ..steering.config import library_from_config, load_config

    try:
        return library_from_config(load_config(start=ls.root))
    except Exception as exc:  # noqa: BLE001
        raise RequestFailed(f"feature search not available: config: {exc}") from None


def _steer_entry(raw: Any) -> SteeringEntry:
    """A validated steering entry from `{"feature", "strength", "mode"?, "layer"?}`."""
    if not isinstance(raw, dict) or not isinstance(raw.get("feature"), str):
        raise CommandError('tinymorph.steer.set takes [{"feature": id, "strength": number, '
                           '"mode"?, "layer"?}]')
    strength = raw.get("strength")
    if isinstance(strength, bool) or not isinstance(strength, int | float):
        raise CommandError(f"strength for {raw['feature']} must be a number")
    layer = raw.get("layer")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise CommandError("layer must be an integer")
    entry = SteeringEntry(feature=raw["feature"], strength=float(strength), mode=raw.get("mode", "add"),
                          layer=layer)
    try:
        from ..steering.steering import validate_entry
    except ImportError:
        return entry
    try:
        validate_entry(entry)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return entry


async def _check_plan(ls: TinymorphServer, plan: SteeringPlan) -> None:
    """Resolve against the loaded model, so an unknown feature is refused now rather than breaking
    every later suggestion."""
    engine = ls.runtime.engine
    if engine is None:
        return
    try:
        await asyncio.to_thread(engine.resolve, plan)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - e.g. an unreadable SAE file
        raise RequestFailed(f"steering not available: {exc}") from None


def _set_plan(ls: TinymorphServer, plan: SteeringPlan) -> list[dict]:
    ls.runtime.steering = plan
    for uri in list(ls.suggestions):  # suggestions made with the old steering are not what the user asked for
        ls.drop(uri)
        if uri in ls.docs and uri == ls.last_edited:
            ls.schedule(uri, delay=0.0)
    ls.refresh_hints()
    ls.notify_status()
    return plan.describe()


async def _compare(ls: TinymorphServer, args: tuple) -> dict[str, str]:
    """Continue the same text with and without the current steering."""
    if not ls.runtime.ready:
        raise RequestFailed("the model is not loaded yet")
    arg = args[0] if args else None
    if isinstance(arg, dict) and isinstance(arg.get("text"), str):
        text = arg["text"]
        doc_id = "compare"
    else:
        uri = arg if isinstance(arg, str) else (arg.get("uri") if isinstance(arg, dict) else ls.last_edited)
        doc = ls.docs.get(uri) if uri else None
        if doc is None:
            raise CommandError("tinymorph.steer.compare takes [uri] of an open document or [{\"text\": …}]")
        text = doc.text[: ls.cursors.get(doc.uri, len(doc.text))]
        doc_id = doc.uri
    options = GenerationOptions(max_tokens=max(ls.settings.maxTokens, 32), stop=ls.settings.stop,
                                temperature=ls.settings.temperature)
    steered, unsteered = await asyncio.gather(
        _run_job(ls, CompletionRequest(text, doc_id, options, steering=ls.runtime.steering)),
        _run_job(ls, CompletionRequest(text, doc_id, options, steering=SteeringPlan())),
    )
    return {"steered": steered.text, "unsteered": unsteered.text}


async def _run_job(ls: TinymorphServer, request: CompletionRequest) -> Completion:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Completion] = loop.create_future()

    def done(_job: Job, completion: Completion | None, error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is not None or completion is None:
                future.set_exception(RequestFailed(f"generation failed: {error}"))
            else:
                future.set_result(completion)

        loop.call_soon_threadsafe(settle)

    job = ls.runtime.scheduler.submit(Job(request, priority=PRIORITY_EDITOR, on_done=done))
    try:
        return await future
    except asyncio.CancelledError:
        job.cancel.cancel()
        raise


def serve(args: Any, runtime: Runtime | None = None) -> int:
    """Run the server on stdio or TCP (used by `tinymorph lsp`)."""
    overrides = {"model": args.model, "dtype": args.dtype, "threads": getattr(args, "threads", None)}
    server = build_server(runtime, overrides)
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        server.start_tcp(host or "127.0.0.1", int(port))
    else:
        server.start_io()
    return 0
