"""The language server's handlers and transports: thin, like jedi-language-server's.

Every handler fetches the document, asks the session (`lsp_session.py`) or the engine, and turns
the answer into LSP types. Commands live in `lsp_commands.py`, JSON-RPC framing and strictness in
`lsp_protocol.py`. Over stdio one session owns the process; over TCP every connection gets its own
session (documents, suggestions, settings) over the one shared `Runtime`, and an editor's `exit`
closes only its connection (the HTTP API and other editors go on).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
import time
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcException

from . import lsp_commands
from .documents import Document, PositionError
from .lsp_commands import COMMANDS, CommandError, RequestFailed, position
from .lsp_session import TinymorphServer
from .runtime import Runtime
from .suggestions import View, label_for, tooltip_for

log = logging.getLogger(__name__)

INLINE_WAIT_S = 1.5  # how long textDocument/inlineCompletion waits for a running generation
__all__ = ["COMMANDS", "TinymorphServer", "build_server", "serve"]


class InvalidToken(JsonRpcException):
    """The connection needs `initializationOptions.token` (a TCP server reachable beyond loopback)."""

    CODE = -32001


def _in_range(pos: types.Position, rng: types.Range) -> bool:
    p = (pos.line, pos.character)
    return (rng.start.line, rng.start.character) <= p <= (rng.end.line, rng.end.character)


def _fs_path(uri: str) -> str | None:
    from pygls.uris import to_fs_path

    try:
        return to_fs_path(uri)
    except Exception:  # noqa: BLE001
        return None


class _QuietUserErrors(logging.Filter):
    """pygls logs a traceback for every error answer; a user's bad argument is not a server fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, CommandError | RequestFailed | InvalidToken)


logging.getLogger("pygls.protocol.json_rpc").addFilter(_QuietUserErrors())


def build_server(runtime: Runtime | None = None, overrides: dict[str, Any] | None = None, *,
                 owns_process: bool = True, token: str | None = None) -> TinymorphServer:
    """A session with every handler registered (pygls features are per server instance)."""
    server = TinymorphServer(runtime, overrides, owns_process=owns_process, token=token)

    @server.feature(types.INITIALIZE)
    def initialize(ls: TinymorphServer, params: types.InitializeParams) -> None:
        from pygls.capabilities import ServerCapabilitiesBuilder

        options = params.initialization_options if isinstance(params.initialization_options, dict) else {}
        if ls.token and not hmac.compare_digest(str(options.get("token", "")), ls.token):
            ls.protocol.initialized_seen = False
            asyncio.get_running_loop().call_later(0.2, ls.protocol.close)
            raise InvalidToken("this tinymorph server needs initializationOptions.token")
        ls.loop = asyncio.get_running_loop()
        caps = params.capabilities
        ls.docs.encoding = str(ServerCapabilitiesBuilder.choose_position_encoding(caps))
        ws = caps.workspace
        ls.refresh_support = bool(ws and ws.inlay_hint and ws.inlay_hint.refresh_support)
        ls.document_changes = bool(ws and ws.workspace_edit and ws.workspace_edit.document_changes)
        ls.progress_support = bool(caps.window and caps.window.work_done_progress)
        roots = [_fs_path(f.uri) for f in params.workspace_folders or []]
        if not roots and params.root_uri:
            roots = [_fs_path(params.root_uri)]
        if not roots and params.root_path:
            roots = [params.root_path]
        ls.workspace_config.roots = [r for r in roots if r]
        ls.apply_settings(options)
        ls.reload_config(force=True)

    @server.feature(types.INITIALIZED)
    async def initialized(ls: TinymorphServer, _params: types.InitializedParams) -> None:
        caps = ls.client_capabilities.workspace
        watch = caps.did_change_watched_files if caps else None
        if watch is not None and watch.dynamic_registration:
            try:
                await ls.client_register_capability_async(types.RegistrationParams(registrations=[
                    types.Registration(id="tinymorph-config", method=types.WORKSPACE_DID_CHANGE_WATCHED_FILES,
                                       register_options=types.DidChangeWatchedFilesRegistrationOptions(
                                           watchers=[types.FileSystemWatcher(glob_pattern="**/tinymorph.toml")]))]))
            except Exception:  # noqa: BLE001 - polling covers clients that refuse
                log.debug("file watching not registered", exc_info=True)
        ls._config_task = asyncio.ensure_future(ls.watch_config())  # noqa: SLF001
        await ls.load_model()

    @server.feature(types.WORKSPACE_DID_CHANGE_WORKSPACE_FOLDERS)
    def did_change_workspace_folders(ls: TinymorphServer, params: types.DidChangeWorkspaceFoldersParams) -> None:
        removed = {_fs_path(f.uri) for f in params.event.removed}
        roots = [r for r in ls.workspace_config.roots if r not in removed]
        roots += [p for f in params.event.added if (p := _fs_path(f.uri)) and p not in roots]
        ls.workspace_config.roots = roots
        ls.settings_changed(ls.reload_config(force=True))

    @server.feature(types.WORKSPACE_DID_CHANGE_WATCHED_FILES)
    def did_change_watched_files(ls: TinymorphServer, _params: types.DidChangeWatchedFilesParams) -> None:
        ls.reload_config(force=True)

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: TinymorphServer, params: types.DidChangeConfigurationParams) -> None:
        changed = ls.apply_settings(params.settings)
        changed |= ls.reload_config(force=True)
        ls.settings_changed(changed)
        ls.notify_status()

    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: TinymorphServer, params: types.DidOpenTextDocumentParams) -> None:
        td = params.text_document
        ls.drop(td.uri)
        ls.resynced(td.uri)
        ls.docs.open(td.uri, td.text, td.version, td.language_id)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: TinymorphServer, params: types.DidChangeTextDocumentParams) -> None:
        uri = params.text_document.uri
        doc = ls.docs.get(uri)
        if doc is None:
            ls.log(f"didChange for a document that is not open: {uri}", types.MessageType.Warning)
            return
        s = ls.suggestions.get(uri)
        cursor, inserted = ls.cursors.get(uri, len(doc)), False
        for change in params.content_changes:
            if isinstance(change, types.TextDocumentContentChangePartial):
                if uri in ls.desynced:
                    continue  # cannot apply a range to text we lost track of: wait for the whole text
                r = change.range
                applied = doc.apply_change(change.text, (r.start.line, r.start.character),
                                           (r.end.line, r.end.character))
            else:
                applied = doc.apply_change(change.text)
                ls.resynced(uri)
            cursor = applied.cursor
            inserted = inserted or bool(change.text)
            if s is not None:
                s.track(applied.start, applied.end, applied.text)
        doc.version = params.text_document.version
        if s is not None:
            s.follow(doc.version)
        ls.on_edit(doc, cursor, inserted)

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: TinymorphServer, params: types.DidCloseTextDocumentParams) -> None:
        uri = params.text_document.uri
        ls.drop(uri)
        ls.docs.close(uri)
        ls.cursors.pop(uri, None)
        ls.wanted.discard(uri)
        ls.desynced.pop(uri, None)
        if (engine := ls.runtime.engine) is not None:
            engine.forget(uri)

    @server.feature(types.TEXT_DOCUMENT_INLAY_HINT, types.InlayHintOptions(resolve_provider=False))
    def inlay_hint(ls: TinymorphServer, params: types.InlayHintParams) -> list[types.InlayHint]:
        ls.shown(params.text_document.uri)
        found = ls.view(params.text_document.uri)
        if found is None:
            return []
        doc, v = found
        pos = position(doc, v.cursor)
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
        pos = position(doc, v.cursor)
        p = params.position
        if p.line != pos.line or not pos.character - 1 <= p.character <= pos.character:
            return None
        return types.Hover(contents=types.MarkupContent(kind=types.MarkupKind.Markdown, value=tooltip_for(v)),
                           range=types.Range(start=pos, end=pos))

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(ls: TinymorphServer,
                                params: types.InlineCompletionParams) -> types.InlineCompletionList:
        return await _inline_completion(ls, params)

    lsp_commands.register(server)
    return server


def _inline_item(doc: Document, v: View) -> types.InlineCompletionItem:
    return types.InlineCompletionItem(
        insert_text=v.typed + v.rest,
        range=types.Range(start=position(doc, v.anchor), end=position(doc, v.cursor)),
        command=types.Command(title="tinymorph: accepted", command="tinymorph.accepted",
                              arguments=[doc.uri, v.suggestion.id]),
    )


async def _inline_completion(ls: TinymorphServer,
                             params: types.InlineCompletionParams) -> types.InlineCompletionList:
    """The suggestion at the requested position; waits (bounded, cancellable) for one on its way.

    Never a suggestion for older text: the answer is computed for the document version the
    request was sent against, and if the document changes while waiting the answer is empty
    (clients such as Neovim 0.12's built-in inline completion do not check versions themselves).
    """
    empty = types.InlineCompletionList(items=[])
    uri = params.text_document.uri
    doc = ls.docs.get(uri)
    if doc is None or not ls.runtime.ready or not ls.settings.enabled or uri in ls.desynced:
        return empty
    try:
        offset = doc.offset_at(params.position.line, params.position.character, strict=True)
    except PositionError:
        return empty
    ls.focused(uri)
    version = doc.version
    context = params.context
    invoked = context is not None and context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
    deadline = time.monotonic() + INLINE_WAIT_S
    started = False
    while True:  # asyncio cancellation ($/cancelRequest) interrupts the sleep below
        doc = ls.docs.get(uri)
        if doc is None or doc.version != version or uri in ls.desynced:
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


# -- transports ------------------------------------------------------------------------------------


def _overrides(args: Any) -> dict[str, Any]:
    return {"model": getattr(args, "model", None), "dtype": getattr(args, "dtype", None),
            "threads": getattr(args, "threads", None)}


def serve(args: Any, runtime: Runtime | None = None, token: str | None = None, http_url: str | None = None) -> int:
    """Run the server on stdio or TCP (used by `tinymorph lsp`).

    With an HTTP API in the process (`http_url`), an editor's `exit` (or its end of stdin) ends
    only the LSP session: the HTTP API goes on until the process is stopped.
    """
    runtime = runtime or Runtime()
    if getattr(args, "tcp", None):
        host, _, port = args.tcp.rpartition(":")
        try:
            asyncio.run(serve_tcp(runtime, _overrides(args), host.strip("[]") or "127.0.0.1", int(port), token))
        except KeyboardInterrupt:
            pass
        return 0
    server = build_server(runtime, _overrides(args), owns_process=http_url is None)
    serve_stdio(server)
    if http_url is not None:
        print(f"[tinymorph] the editor left; the HTTP API stays on {http_url} (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        try:
            import threading

            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


def serve_stdio(server: TinymorphServer) -> None:
    """One session on stdin/stdout; it owns the process (`exit` ends it)."""
    from threading import Event

    from pygls.io_ import StdinAsyncReader, StdoutWriter

    server._stop_event = Event()  # noqa: SLF001 - pygls's shutdown() expects it
    server.protocol.set_writer(StdoutWriter(sys.stdout.buffer))
    reader = StdinAsyncReader(sys.stdin.buffer, server.thread_pool)
    try:
        asyncio.run(server.protocol.serve(reader))
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        server.close_session()
        server.shutdown()


async def serve_tcp(runtime: Runtime, overrides: dict[str, Any], host: str, port: int,
                    token: str | None = None, ready: asyncio.Future | None = None) -> None:
    """Accept editors until cancelled: each connection is its own session over `runtime`."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = build_server(runtime, overrides, owns_process=False, token=token)
        session.protocol.set_writer(writer)
        peer = writer.get_extra_info("peername")
        log.info("editor connected from %s (session %d)", peer, session.session)
        try:
            await session.protocol.serve(reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            log.info("editor %s disconnected (session %d)", peer, session.session)
            session.close_session()
            session.protocol.close()

    server = await asyncio.start_server(connection, host, port)
    bound = server.sockets[0].getsockname()
    print(f"[tinymorph] LSP on tcp://{host}:{bound[1]}", file=sys.stderr, flush=True)
    if ready is not None:
        ready.set_result(bound[1])
    async with server:
        await server.serve_forever()
