"""What runs before any route: the Host rule, the bearer token, the body limits, and request metrics.

A plain ASGI middleware, because these rules must hold for every path (unknown ones included) and
before a body is parsed: a 2 GB upload or a never-finished body is refused while it is read, not
after. Everything a route can express (content type, shapes, ranges) lives in the FastAPI app.
"""

from __future__ import annotations

import asyncio
import hmac
from urllib.parse import urlsplit

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .addresses import is_loopback
from .http_completions import ApiError
from .metrics import Metrics

PUBLIC_PATHS = frozenset({"/healthz"})  # answered without a token (liveness probes)


def host_name(header: str) -> str | None:
    """The host part of a Host header ("[::1]:8765" → "::1"); None when it is not a host[:port]."""
    try:
        parts = urlsplit("//" + header)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return None
    return parts.hostname


def error_response(
    status: int, message: str, type_: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(ApiError(status, message, type_, param).body(), status_code=status, headers=headers)


def route_label(scope: Scope) -> str:
    """Bounded-cardinality route name for metrics: the matched route's template, never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "other"


class GuardMiddleware:
    """Host check, bearer token, body size and body read time (buffered before the app sees it), metrics."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        max_body_bytes: int,
        body_timeout_s: float,
        check_host: bool,
        metrics: Metrics,
    ):
        self.app = app
        self.token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.check_host = check_host
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status_seen = 500

        async def send_counted(message: Message) -> None:
            nonlocal status_seen
            if message["type"] == "http.response.start":
                status_seen = message["status"]
            await send(message)

        try:
            refusal = self._refuse(scope)
            if refusal is None:
                body, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, send_counted)
                return
            await self.app(scope, _replay(body, receive), send_counted)
        finally:
            self.metrics.record_request(scope["method"], route_label(scope), status_seen)

    def _refuse(self, scope: Scope) -> Response | None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if self.check_host:
            host = headers.get("host", b"").decode("latin-1")
            name = host_name(host)
            if name is None or not is_loopback(name):
                return error_response(403, f"Host {host!r} is not allowed", "forbidden")
        if self.token is not None and scope["path"] not in PUBLIC_PATHS:
            auth = headers.get("authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                return error_response(
                    401,
                    "missing or wrong bearer token",
                    "authentication_error",
                    headers={"WWW-Authenticate": 'Bearer realm="tinymorph"'},
                )
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                return error_response(400, "bad Content-Length", "invalid_request_error")
            if too_big:
                return self._too_big()
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, Response | None]:
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return b"", Response(status_code=499)
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        return b"", self._too_big()
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks), None
        except TimeoutError:
            message = f"the request body took longer than {self.body_timeout_s:g} s to arrive"
            return b"", error_response(408, message, "invalid_request_error", headers={"Connection": "close"})

    def _too_big(self) -> Response:
        return error_response(413, f"request body larger than {self.max_body_bytes} bytes", "invalid_request_error")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that returns the buffered body once, then the real channel (for disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
