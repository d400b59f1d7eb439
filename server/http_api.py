"""The HTTP API: OpenAI-compatible completions plus steering, features, metrics and health.

`create_app(runtime)` builds a Starlette app over a shared `Runtime` (the same engine and scheduler
the LSP uses, so editor work pre-empts HTTP work); `start_http_server` runs it on uvicorn in a
background thread (for `tinymorph lsp --http ADDR`), `serve` runs it in the foreground (for
`tinymorph serve`).

Safety, because a model server on a laptop is reachable by every web page the user opens:
- loopback by default; any other bind address needs a bearer token (compared in constant time);
- POST/PUT need ``Content-Type: application/json`` (a cross-site form post cannot send that without a
  CORS preflight, which we never grant), and a loopback server without a token only answers Host
  headers naming loopback (no DNS rebinding);
- bodies over `max_body_bytes`, `max_tokens` over the limit and more than `max_pending` queued
  requests are refused with 4xx JSON errors; a client that goes away cancels its generation.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..steering.steering import SteeringPlan
from .http_completions import (
    ApiError,
    DocSlots,
    JobBridge,
    ResponseIds,
    check_plan,
    chunk_body,
    completion_body,
    parse_completion,
    parse_steering,
)
from .http_features import FeatureService
from .http_openapi import openapi_document
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .runtime import Runtime

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_TOKENS_LIMIT = 512
MAX_PENDING = 256
PUBLIC_PATHS = frozenset({"/healthz"})  # answered without a token (liveness probes)
TOKEN_ENV = "TINYMORPH_TOKEN"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def error_response(
    status: int, message: str, type_: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(ApiError(status, message, type_, param).body(), status_code=status, headers=headers)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- middleware ---------------------------------------------------------------------------------


def route_label(path: str) -> str:
    """Bounded-cardinality route name for metrics (never the raw path: feature ids vary)."""
    if path.startswith("/v1/features/"):
        return "/v1/features/{id}"
    if path in (
        "/v1/completions",
        "/v1/models",
        "/v1/steering",
        "/v1/features",
        "/metrics",
        "/healthz",
        "/openapi.json",
    ):
        return path
    return "other"


class GuardMiddleware:
    """Auth, Host check, content type, body limit (buffered before the app sees it) and request metrics."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        max_body_bytes: int,
        allowed_hosts: tuple[str, ...] | None,
        metrics: Metrics,
    ):
        self.app = app
        self.token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = allowed_hosts
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
            self.metrics.record_request(scope["method"], route_label(scope["path"]), status_seen)

    def _refuse(self, scope: Scope) -> Response | None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if self.allowed_hosts is not None:
            host = headers.get("host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.lower() not in self.allowed_hosts:
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
        if scope["method"] in ("POST", "PUT", "PATCH"):
            kind = headers.get("content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                return error_response(415, "Content-Type must be application/json", "invalid_request_error")
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


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client has gone away (after the body, `receive` only reports that)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# -- the streaming response ---------------------------------------------------------------------


class SSEResponse(Response):
    """Server-sent events for one generation; a disconnect or a dropped connection cancels the job.

    Not `StreamingResponse`: with ASGI spec 2.3 servers it would keep generating for a client that
    left until the next token is sent, and we want the cancel to reach the engine between tokens.
    """

    media_type = "text/event-stream"

    def __init__(self, bridge: JobBridge, ids: ResponseIds, include_usage: bool):
        # no super().__init__: it would declare Content-Length: 0 for the empty initial body
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.bridge, self.ids, self.include_usage = bridge, ids, include_usage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(wait_disconnect(receive))
        watcher.add_done_callback(lambda task: task.cancelled() or self.bridge.cancel())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            while True:
                event = asyncio.ensure_future(self.bridge.next_event())
                await asyncio.wait({event, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():  # the client left (the watcher has cancelled the job): stop now
                    event.cancel()
                    return
                kind, payload, error = event.result()
                if kind == "token":
                    await self._event(send, chunk_body(self.ids, payload.delta))
                    continue
                if error is not None:
                    await self._event(send, _stream_error(error))
                else:
                    await self._event(send, chunk_body(self.ids, "", payload, self.include_usage))
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
                return
        except OSError:  # the socket went away under us
            pass
        finally:
            watcher.cancel()
            if not self.bridge.finished:
                self.bridge.cancel()

    @staticmethod
    async def _event(send: Send, data: dict) -> None:
        body = b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": body, "more_body": True})


def _stream_error(error: BaseException) -> dict:
    if isinstance(error, ValueError):
        return ApiError(400, str(error)).body()
    log.error("generation failed", exc_info=error)
    return ApiError(500, "generation failed", "server_error").body()


# -- the app ------------------------------------------------------------------------------------


@dataclass
class ApiState:
    runtime: Runtime
    metrics: Metrics
    max_tokens_limit: int
    max_pending: int
    features: FeatureService
    slots: DocSlots = field(default_factory=DocSlots)
    pending: int = 0
    started: int = field(default_factory=lambda: int(time.time()))


Handler = Callable[[Request], Awaitable[Response]]


def _api(handler: Callable[[Request, ApiState], Awaitable[Response]], state: ApiState) -> Handler:
    """Bind `state` and turn `ApiError` into its JSON answer."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request, state)
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    endpoint.__name__ = handler.__name__
    return endpoint


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # "[[[[…" a few hundred thousand deep fits in the body limit
        raise ApiError(400, "the request body is nested too deeply") from None


def _require_ready(runtime: Runtime) -> None:
    if not runtime.ready:
        state = runtime.state
        message = runtime.message or f"model is {state}"
        raise ApiError(503, f"model not ready ({state}): {message}", "unavailable", headers={"Retry-After": "2"})


async def completions(request: Request, state: ApiState) -> Response:
    runtime = state.runtime
    body = await _json_body(request)
    call = parse_completion(body, max_tokens_limit=state.max_tokens_limit, runtime=runtime)
    _require_ready(runtime)
    await check_plan(runtime, call.steering, sources_available=state.features.check_sources)
    if state.pending >= state.max_pending:
        raise ApiError(
            429,
            f"too many requests in flight (limit {state.max_pending})",
            "rate_limit_error",
            headers={"Retry-After": "1"},
        )
    engine = runtime.engine
    ids = ResponseIds.new(engine.info.model if engine is not None else (call.model or "tinymorph"))
    bridge = JobBridge(runtime, state.slots, call, stream=call.stream, on_finish=lambda: _decrement(state))
    state.pending += 1
    bridge.start()
    if call.stream:
        return SSEResponse(bridge, ids, call.include_usage)
    done = asyncio.ensure_future(bridge.next_event())
    gone = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # server shutting down: nobody will read the answer
        bridge.cancel()
        raise
    finally:
        gone.cancel()
    if not done.done():  # the client left: stop generating for nobody
        bridge.cancel()
        done.cancel()
        return Response(status_code=499)
    _, completion, error = done.result()
    if error is not None:
        if isinstance(error, ValueError):
            raise ApiError(400, str(error))
        log.error("generation failed", exc_info=error)
        raise ApiError(500, "generation failed", "server_error")
    return JSONResponse(completion_body(ids, completion))


def _decrement(state: ApiState) -> None:
    state.pending -= 1


async def get_steering(request: Request, state: ApiState) -> Response:
    return JSONResponse({"steering": state.runtime.steering.describe()})


async def put_steering(request: Request, state: ApiState) -> Response:
    body = await _json_body(request)
    if not isinstance(body, dict) or set(body) != {"steering"}:
        raise ApiError(400, 'the body must be {"steering": [entries]}', param="steering")
    if not isinstance(body["steering"], list):
        raise ApiError(400, "steering must be a list of entries", param="steering")
    plan = parse_steering(body["steering"], state.runtime, "steering") or SteeringPlan()
    await check_plan(state.runtime, plan, sources_available=state.features.check_sources)
    state.runtime.steering = plan
    return JSONResponse({"steering": plan.describe()})


async def search_features(request: Request, state: ApiState) -> Response:
    query = request.query_params.get("q", "")
    limit_text = request.query_params.get("limit", "20")
    try:
        limit = int(limit_text)
    except ValueError:
        raise ApiError(400, "limit must be an integer", param="limit") from None
    if not 1 <= limit <= 100:
        raise ApiError(400, "limit must be between 1 and 100", param="limit")
    if len(query) > 200:
        raise ApiError(400, "q is at most 200 characters", param="q")
    return JSONResponse({"features": await state.features.search(query, limit)})


async def show_feature(request: Request, state: ApiState) -> Response:
    return JSONResponse(await state.features.show(request.path_params["feature_id"]))


async def metrics(request: Request, state: ApiState) -> Response:
    text = state.metrics.render(state.runtime)
    return Response(text, media_type=None, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def list_models(request: Request, state: ApiState) -> Response:
    """OpenAI's model list (clients call it before completing): the one model this process serves."""
    runtime = state.runtime
    engine = runtime.engine
    name = engine.info.model if engine is not None else runtime.settings.model
    model = {"id": name, "object": "model", "created": state.started, "owned_by": "tinymorph", "ready": runtime.ready}
    return JSONResponse({"object": "list", "data": [model]})


async def healthz(request: Request, state: ApiState) -> Response:
    runtime = state.runtime
    body: dict[str, Any] = {"state": runtime.state, "message": runtime.message}
    if runtime.engine is not None:
        body["model"] = runtime.engine.info.model
    return JSONResponse(body, status_code=200 if runtime.ready else 503)


def create_app(
    runtime: Runtime,
    token: str | None = None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_tokens_limit: int = MAX_TOKENS_LIMIT,
    max_pending: int = MAX_PENDING,
    allowed_hosts: tuple[str, ...] | None = None,
    metrics_: Metrics | None = None,
) -> Starlette:
    """The API over `runtime`. `token`: require ``Authorization: Bearer <token>`` (not on /healthz)."""
    registry = metrics_ or Metrics()
    registry.attach(runtime)
    state = ApiState(runtime, registry, max_tokens_limit, max_pending, FeatureService(runtime))
    document = openapi_document(max_tokens_limit, max_body_bytes, secured=token is not None)

    async def openapi(_request: Request) -> Response:
        return JSONResponse(document)

    routes = [
        Route("/v1/completions", _api(completions, state), methods=["POST"]),
        Route("/v1/steering", _api(get_steering, state), methods=["GET"]),
        Route("/v1/steering", _api(put_steering, state), methods=["PUT"]),
        Route("/v1/features", _api(search_features, state), methods=["GET"]),
        Route("/v1/features/{feature_id:path}", _api(show_feature, state), methods=["GET"]),
        Route("/v1/models", _api(list_models, state), methods=["GET"]),
        Route("/metrics", _api(metrics, state), methods=["GET"]),
        Route("/healthz", _api(healthz, state), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind, headers=exc.headers)

    async def server_error(_request: Request, exc: Exception) -> Response:
        log.exception("unhandled error in the HTTP API", exc_info=exc)
        return error_response(500, "internal server error", "server_error")

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.api = state
    app.add_middleware(
        GuardMiddleware,
        token=token,
        max_body_bytes=max_body_bytes,
        allowed_hosts=allowed_hosts,
        metrics=registry,
    )
    return app


# -- running it ---------------------------------------------------------------------------------


def parse_address(address: str, default_port: int = 8765) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT`` → (host, port)."""
    address = address.strip()
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif address.count(":") == 1:
        host, _, port_text = address.partition(":")
    else:
        host, port_text = address, ""
    host = host or "127.0.0.1"
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"bad address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:8765") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port {port} in {address!r}")
    return host, port


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"binding {host} exposes the model beyond this machine: set a token (--token or TINYMORPH_TOKEN)"
        )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.create_server((host.strip("[]"), port), family=family, reuse_port=False)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app: Starlette):
    import uvicorn

    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=3, ws="none"
    )
    return uvicorn.Server(config)


@dataclass
class HttpServerHandle:
    """A running API server; `stop()` cancels its generations and shuts uvicorn down."""

    host: str
    port: int
    app: Starlette
    server: Any
    thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.app.state.api.metrics.detach()


def start_http_server(runtime: Runtime, address: str, token: str | None = None) -> HttpServerHandle:
    """Serve the API for `runtime` on `address` ("HOST:PORT"; port 0 picks one) in a daemon thread.

    `token` defaults to $TINYMORPH_TOKEN, so `tinymorph lsp --http` honours it like `tinymorph serve`.

    Binding happens here, so a busy port or a refused address raises `OSError`/`ValueError` in the
    caller instead of dying silently in the thread.
    """
    token = token or os.environ.get(TOKEN_ENV) or None
    host, port = parse_address(address)
    check_exposure(host, token)
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    allowed = LOOPBACK_NAMES if (is_loopback(host) and not token) else None
    app = create_app(runtime, token, allowed_hosts=allowed)
    server = _uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tinymorph-http", daemon=True)
    thread.start()
    handle = HttpServerHandle(host.strip("[]"), bound_port, app, server, thread)
    deadline = time.monotonic() + 15  # started within seconds even on a busy machine, or the thread died
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        handle.stop(1)
        raise OSError(f"the HTTP server on {address} did not start")
    return handle


def serve(runtime: Runtime, host: str = "127.0.0.1", port: int = 8765, token: str | None = None) -> None:
    """Serve in the foreground until Ctrl-C (uvicorn handles the signals)."""
    check_exposure(host, token)
    sock = _bind(host, port)
    allowed = LOOPBACK_NAMES if (is_loopback(host) and not token) else None
    app = create_app(runtime, token, allowed_hosts=allowed)
    server = _uvicorn_server(app)
    log.warning("tinymorph HTTP API on http://%s:%d", host, sock.getsockname()[1])
    try:
        server.run(sockets=[sock])
    finally:
        app.state.api.metrics.detach()
        sock.close()
