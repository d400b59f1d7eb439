"""JSON-RPC for the language server, strictly: framing, envelope checks and the LSP lifecycle.

Why not pygls's own reading loop (`pygls.io_.run_async`): a header without `Content-Length` (or
one too short) leaves it waiting for a header line that never matches, so the server goes deaf for
good; bodies that are not JSON, envelopes that are not requests and requests after `shutdown` get
no answer at all; an `id` that is an object ends in -32603 with a traceback. Here only the loop and
the envelope checks are replaced: pygls still turns params into lsprotocol types and dispatches to
the handlers (`TinymorphProtocol` overrides two of its methods, narrowly).

Answers (JSON-RPC 2.0 / LSP 3.17): -32700 for a body that is not JSON or a frame that cannot be
read (id null), -32600 for an invalid envelope (id null when the id itself is invalid) and for
requests after `shutdown`, -32002 for requests before `initialize`, -32602 for requests whose
params do not match the LSP types. A notification that cannot be used is dropped with a log line;
a `didChange` that cannot be applied marks its document out of sync (see `lsp_session.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, Protocol

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams
from pygls.protocol import LanguageServerProtocol, lsp_method

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
SERVER_NOT_INITIALIZED = -32002
DROP = 0  # not an error code: a notification that is dropped without an answer
MAX_BODY = 256 * 2**20  # a frame larger than this is refused as unreadable
_CONTENT_LENGTH = re.compile(rb"content-length:[ \t]*([^\r\n]*?)[ \t]*\r?\n?$", re.IGNORECASE)
_HEADER = re.compile(rb"^[A-Za-z0-9-]+:[^\r\n]*\r?\n$")


class AsyncReader(Protocol):
    def readline(self) -> Any: ...

    def readexactly(self, n: int) -> Any: ...


class Frames:
    """LSP base-protocol frames from a byte stream, resynchronising after bad input.

    A frame whose header is missing or unreadable is reported (the caller answers -32700) and
    reading goes on: the next `Content-Length:` header found, even at the end of a line of garbage
    (the rest of a body that was longer than announced), starts the next frame. A body that turns
    out to contain the next frame's header (a body shorter than announced) is split there.
    """

    def __init__(self, reader: AsyncReader):
        self.reader = reader
        self._pushback = b""

    async def _readline(self) -> bytes:
        if self._pushback:
            i = self._pushback.find(b"\n")
            if i >= 0:
                line, self._pushback = self._pushback[: i + 1], self._pushback[i + 1:]
                return line
            head, self._pushback = self._pushback, b""
            return head + await self.reader.readline()
        return await self.reader.readline()

    async def _read(self, n: int) -> bytes:
        head, self._pushback = self._pushback[:n], self._pushback[n:]
        if len(head) == n:
            return head
        try:
            rest = await self.reader.readexactly(n - len(head))
        except asyncio.IncompleteReadError as exc:
            rest = exc.partial
        return head + rest

    def push_back(self, data: bytes) -> None:
        self._pushback = data + self._pushback

    async def next(self) -> tuple[bytes | None, str | None]:
        """(body, None) for a frame, (None, problem) for an unreadable one, (None, None) at the end."""
        length: int | None = None
        problem: str | None = None
        seen = False
        while True:
            line = await self._readline()
            if not line:
                return None, None
            if line in (b"\r\n", b"\n"):
                if seen:
                    break
                continue  # blank lines between frames
            seen = True
            match = _CONTENT_LENGTH.search(line)
            if match is not None:
                value = match.group(1)
                if match.start() > 0 and not _HEADER.match(line):
                    log.warning("skipped %d bytes of garbage before a header", match.start())
                if value.isdigit() and int(value) <= MAX_BODY:
                    length, problem = int(value), None
                else:
                    length, problem = None, f"bad Content-Length {value[:40]!r}"
            elif not _HEADER.match(line):
                problem = problem or f"not a header line: {line[:60]!r}"
        if length is None:
            return None, problem or "missing Content-Length header"
        body = await self._read(length)
        if len(body) < length:
            return None, None  # the stream ended inside a body
        return body, None


def _error(code: int, message: str, msg_id: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


class _Malformed:
    """A request whose params did not match the LSP types: answered with InvalidParams, not dropped."""

    def __init__(self, msg_id: Any, method: str, error: Exception):
        self.id, self.method, self.error = msg_id, method, error


def describe_structure_error(exc: BaseException) -> str:
    """cattrs' nested exception groups as one readable line ("… @ $.params.range")."""
    try:
        from cattrs import transform_error

        return "; ".join(transform_error(exc, path="$"))[:500]
    except Exception:  # noqa: BLE001 - not a cattrs validation error
        return str(exc)[:500]


class TinymorphProtocol(LanguageServerProtocol):
    """pygls's protocol with a strict envelope check in front and three narrow changes.

    1. Requests with malformed params get a JSON-RPC InvalidParams answer (pygls logs and drops
       them, which leaves the client waiting forever); a malformed `didChange` is handed to the
       server's `desync` hook instead of being dropped silently.
    2. Open/change/close skip pygls's own workspace: documents.py keeps the text, so every edit
       is applied once, not twice.
    3. `exit` ends the process only when the process belongs to this one connection (stdio); a TCP
       session just closes its connection (`server.owns_process`).
    """

    initialized_seen = False
    closed = False

    # -- reading ----------------------------------------------------------------------------
    async def serve(self, reader: AsyncReader) -> None:
        """Read frames until the stream ends or the session closes."""
        frames = Frames(reader)
        while not self.closed:
            body, problem = await frames.next()
            if body is None and problem is None:
                return
            if problem is not None:
                log.warning("unreadable frame: %s", problem)
                self._send_data(_error(PARSE_ERROR, f"unreadable message: {problem}"))
                continue
            assert body is not None
            self.receive(body, frames)

    def receive(self, body: bytes, frames: Frames | None = None) -> None:
        """Check one frame's body and hand it to pygls."""
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            split = body.find(b"Content-Length:", 1)
            if frames is not None and split > 0:  # a body shorter than its Content-Length said
                frames.push_back(body[split:])
                body = body[:split]
            log.warning("parse error: %s", exc)
            self._send_data(_error(PARSE_ERROR, f"parse error: {exc}"))
            return
        problem = self._envelope_problem(data)
        if problem is not None:
            code, message, msg_id = problem
            log.warning("%s", message)
            if code != DROP:
                self._send_data(_error(code, message, msg_id))
            return
        try:
            message = self.structure_message(data)
        except JsonRpcException as exc:  # a notification whose params do not fit
            log.warning("dropped %s notification: %s", data.get("method"),
                        describe_structure_error(exc.__cause__ or exc))
            return
        if data.get("method") == types.INITIALIZE and "id" in data:
            self.initialized_seen = True
        try:
            self.handle_message(message)
        except SystemExit:
            raise
        except Exception:  # noqa: BLE001 - one bad message must not end the session
            log.exception("failed to handle %s", data.get("method"))

    def _envelope_problem(self, data: Any) -> tuple[int, str, Any] | None:
        """(code, message, id to answer) when `data` is not a usable JSON-RPC message; else None."""
        if isinstance(data, list):
            return INVALID_REQUEST, "invalid request: batches are not supported by LSP", None
        if not isinstance(data, dict):
            return INVALID_REQUEST, "invalid request: a message must be a JSON object", None
        has_id = "id" in data
        msg_id = data.get("id")
        if has_id and msg_id is not None and not _valid_id(msg_id):
            return INVALID_REQUEST, "invalid request: id must be a string or an integer", None
        answer = msg_id if has_id else None
        if data.get("jsonrpc") != "2.0":
            return INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"', answer
        method = data.get("method")
        if "method" not in data:
            if has_id and ("result" in data or "error" in data):
                return None  # a response to one of our requests
            return INVALID_REQUEST, "invalid request: no method", answer
        if not isinstance(method, str):
            return INVALID_REQUEST, "invalid request: method must be a string", answer
        if "params" in data and data["params"] is not None and not isinstance(data["params"], dict | list):
            if has_id:
                return JsonRpcInvalidParams.CODE, "invalid params: params must be an object or array", answer
            return INVALID_REQUEST, f"invalid {method} notification: params must be an object or array", None
        if not has_id:
            if method == types.EXIT:
                return None
            if not self.initialized_seen:
                return DROP, f"dropped {method} notification before initialize", None
            return None
        if msg_id is None:
            return INVALID_REQUEST, "invalid request: id must not be null", None
        if self._shutdown:
            return INVALID_REQUEST, f"{method}: the server is shutting down (shutdown was requested)", msg_id
        if not self.initialized_seen and method != types.INITIALIZE:
            return SERVER_NOT_INITIALIZED, f"{method}: the server is not initialized yet", msg_id
        return None

    # -- pygls overrides ----------------------------------------------------------------------
    def structure_message(self, data: dict[str, Any]):
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            if isinstance(data, dict) and "id" in data and isinstance(data.get("method"), str):
                return _Malformed(data["id"], data["method"], exc)
            if isinstance(data, dict) and data.get("method") == types.TEXT_DOCUMENT_DID_CHANGE:
                desync = getattr(self._server, "desync", None)
                params = data.get("params")
                uri = (params.get("textDocument") or {}).get("uri") if isinstance(params, dict) else None
                if desync is not None and isinstance(uri, str):
                    desync(uri, describe_structure_error(exc.__cause__ or exc))
            raise

    def handle_message(self, message):
        if isinstance(message, _Malformed):
            detail = describe_structure_error(message.error.__cause__ or message.error)
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

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args):
        if getattr(self._server, "owns_process", True):
            yield from super().lsp_exit(*args)
            return
        if (user_handler := self.fm.features.get(types.EXIT)) is not None:
            yield user_handler, args, None
        self.close()

    def close(self) -> None:
        """End this connection (TCP): stop reading and close the writer; the process lives on."""
        self.closed = True
        writer = self.writer
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already closed
                pass
