"""The HTTP API: OpenAI-compatible completions plus steering, features, metrics and health, on FastAPI.

`create_app(runtime)` builds the app over a shared `Runtime` (the same engine and scheduler the LSP
uses, so editor work pre-empts HTTP work); `http_server` runs it on uvicorn. The pydantic models in
`http_models` validate requests and generate `/openapi.json`, so the document and the server cannot
disagree. Errors keep OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and a
malformed request is a 400 (FastAPI's 422 is translated).

Safety, because a model server on a laptop is reachable by every web page the user opens:
- loopback by default; any other bind address needs a bearer token (compared in constant time);
- POST/PUT need ``Content-Type: application/json`` (a cross-site form post cannot send that without a
  CORS preflight, which we never grant), and a loopback server without a token only answers Host
  headers naming loopback (no DNS rebinding);
- bodies over `max_body_bytes` or slower than `body_timeout_s`, `max_tokens` over the limit and more
  than `max_pending` queued requests are refused with 4xx JSON errors;
- a client that goes away, or stops reading a stream for `send_timeout_s`, cancels its generation.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.exceptions import HTTPException
from starlette.types import Receive, Send

from .http_completions import (
    ApiError,
    DocSlots,
    JobBridge,
    ResponseIds,
    call_from_request,
    check_plan,
    chunk_body,
    completion_body,
    plan_from_entries,
)
from .http_features import FeatureService
from .http_guard import GuardMiddleware, error_response
from .http_models import (
    DUPLICATE_FEATURE,
    CompletionResponse,
    ErrorBody,
    FeatureDetail,
    FeatureSearch,
    Health,
    ModelList,
    SteeringBody,
    SteeringState,
    completion_request_model,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .runtime import Runtime

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_TOKENS_LIMIT = 512
MAX_PENDING = 256
BODY_TIMEOUT_S = 30.0
SEND_TIMEOUT_S = 30.0  # a stream whose client has not taken a chunk for this long is abandoned
TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "entries", "editor"})
ERROR_CODES = frozenset({DUPLICATE_FEATURE})  # validation errors a client can act on get them as `code`


# -- the streaming response ---------------------------------------------------------------------


class _Stalled(Exception):
    """A send did not complete within the send timeout."""


class GenerationStream(EventSourceResponse):
    """Server-sent events for one generation.

    Starlette's streaming already cancels the body iterator (and so the job) when the client
    disconnects. What it cannot see is a client that stays connected but stops reading: uvicorn's
    `send` then waits forever on a full socket while the engine keeps generating. Each send gets
    `send_timeout_s`; past that the job is cancelled and the connection dropped.
    """

    def __init__(self, content: AsyncIterator[bytes], *, send_timeout_s: float, on_stall: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.send_timeout_s, self.on_stall = send_timeout_s, on_stall

    async def stream_response(self, send: Send) -> None:
        async def timed_send(message: Any) -> None:
            try:
                async with asyncio.timeout(self.send_timeout_s):
                    await send(message)
            except TimeoutError:
                raise _Stalled from None

        try:
            await super().stream_response(timed_send)
        except _Stalled:
            log.warning("a streaming client stopped reading for %g s: generation cancelled", self.send_timeout_s)
            self.on_stall()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _sse(data: dict | str) -> bytes:
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data, ensure_ascii=False))


async def _events(bridge: JobBridge, ids: ResponseIds, include_usage: bool) -> AsyncIterator[bytes]:
    first = True
    try:
        while True:
            kind, payload, error = await bridge.next_event()
            if kind == "token":
                yield _sse(chunk_body(ids, payload.delta, first_token_ms=bridge.first_token_ms if first else None))
                first = False
                continue
            if error is not None:
                yield _sse(_stream_error(error))
            else:
                yield _sse(chunk_body(ids, "", payload, include_usage))
            yield _sse("[DONE]")
            return
    finally:  # the client left (the task was cancelled) or stalled: stop generating for nobody
        if not bridge.finished:
            bridge.cancel()


def _stream_error(error: BaseException) -> dict:
    if isinstance(error, ValueError):
        return ApiError(400, str(error)).body()
    log.error("generation failed", exc_info=error)
    return ApiError(500, "generation failed", "server_error").body()


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client has gone away (after the body, `receive` only reports that)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# -- the app ------------------------------------------------------------------------------------


@dataclass
class ApiState:
    runtime: Runtime
    metrics: Metrics
    max_tokens_limit: int
    max_pending: int
    send_timeout_s: float
    features: FeatureService
    slots: DocSlots = field(default_factory=DocSlots)
    pending: int = 0
    started: int = field(default_factory=lambda: int(time.time()))


def require_json(request: Request) -> None:
    """POST/PUT bodies must say JSON: a cross-site form post cannot, without a preflight we never grant."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, "Content-Type must be application/json")


def _require_ready(runtime: Runtime) -> None:
    if not runtime.ready:
        state = runtime.state
        message = runtime.message or f"model is {state}"
        raise ApiError(503, f"model not ready ({state}): {message}", "unavailable", headers={"Retry-After": "2"})


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "Invalid request: the message names the field.",
        403: "Host header not allowed (DNS-rebinding protection).",
        404: "No such feature or SAE.",
        408: "The request body arrived too slowly.",
        413: "Request body too large.",
        415: "Content-Type is not application/json.",
        429: "Too many requests in flight.",
        503: "Not available (model loading, or an SAE cannot be loaded); see Retry-After.",
    }
    return {code: {"model": ErrorBody, "description": described[code]} for code in codes}


BODY_ERRORS = (400, 403, 408, 413, 415)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str | None]:
    """A readable sentence and the top-level field it is about (OpenAI's `param`).

    Locations keep field names and list indexes only (pydantic adds union-member tags such as
    `str` or `SteeringEntry`); an error whose location is a prefix of a more specific one is
    dropped, so a union says what was wrong inside the member that applied.
    """
    found: list[tuple[tuple, str]] = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            return f"the request body is not valid JSON: {detail}", None, None
        loc = tuple(
            p
            for p in error.get("loc", ())
            if isinstance(p, int) or (p.isidentifier() and p not in TYPE_TAGS and not p[:1].isupper())
        )
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "string_unicode":  # pydantic's wording for a lone surrogate in a constrained string
            message = "contains a lone surrogate; send valid UTF-16 pairs"
        found.append((loc, message))
    specific = [(loc, m) for loc, m in found if not any(len(o) > len(loc) and o[: len(loc)] == loc for o, _ in found)]
    parts: list[str] = []
    param: str | None = None
    for loc, message in specific:
        where, names = (loc[0], loc[1:]) if loc else (None, ())
        if param is None and names and isinstance(names[0], str):
            param = names[0]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in names).lstrip(".")
        text = f"{path or ('the request body' if where == 'body' else where)}: {message}"
        if text not in parts:
            parts.append(text)
    codes = [e["type"] for e in exc.errors() if e.get("type") in ERROR_CODES]
    return "; ".join(parts[:3]) or "invalid request", param, codes[0] if codes else None


def create_app(
    runtime: Runtime,
    token: str | None = None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_tokens_limit: int = MAX_TOKENS_LIMIT,
    max_pending: int = MAX_PENDING,
    body_timeout_s: float = BODY_TIMEOUT_S,
    send_timeout_s: float = SEND_TIMEOUT_S,
    check_host: bool = False,
    metrics_: Metrics | None = None,
) -> FastAPI:
    """The API over `runtime`. `token`: require ``Authorization: Bearer <token>`` (not on /healthz).

    `check_host`: answer only Host headers naming loopback (for a loopback server without a token).
    """
    registry = metrics_ or Metrics()
    registry.attach(runtime)
    state = ApiState(runtime, registry, max_tokens_limit, max_pending, send_timeout_s, FeatureService(runtime))
    app = FastAPI(
        title="tinymorph",
        version="0.1.0",
        description="Local prose continuation with SAE steering. OpenAI-compatible /v1/completions.",
        openapi_url=None,  # served by the route below, so it is listed, guarded and documented like the rest
        docs_url=None,
        redoc_url=None,
    )
    app.state.api = state
    _add_routes(app, state, completion_request_model(max_tokens_limit))
    _add_error_handlers(app)
    document: dict[str, Any] | None = None

    @app.get("/openapi.json", summary="This document (OpenAPI 3.1)", operation_id="openapi", responses=_errors(403))
    async def openapi() -> dict[str, Any]:
        nonlocal document
        if document is None:
            document = _document(app, secured=token is not None)
        return document

    app.add_middleware(
        GuardMiddleware,
        token=token,
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout_s,
        check_host=check_host,
        metrics=registry,
    )
    return app


def _document(app: FastAPI, secured: bool) -> dict[str, Any]:
    """FastAPI's document, minus its 422 answers (validation errors are 400s here), plus the token."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.get("components", {}).get("schemas", {})
    for item in doc["paths"].values():
        for operation in item.values():
            operation["responses"].pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
        for path, item in doc["paths"].items():
            for operation in item.values():
                if path == "/healthz":
                    operation["security"] = []  # probes need no token
                    continue
                operation["responses"]["401"] = {
                    "description": "Missing or wrong bearer token.",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                }
    return doc


def _add_routes(app: FastAPI, state: ApiState, completion_model: type) -> None:
    runtime = state.runtime
    json_body = [Depends(require_json)]

    @app.post(
        "/v1/completions",
        operation_id="createCompletion",
        summary="Continue a prompt (OpenAI completions; `stream: true` answers with server-sent events)",
        response_model=CompletionResponse,
        dependencies=json_body,
        responses={
            200: {
                "description": "The completion, or SSE chunks (`data: {chunk}`) ending with `data: [DONE]`",
                "content": {
                    "text/event-stream": {
                        "schema": {
                            "type": "object",
                            "required": ["data"],
                            "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                        }
                    }
                },
            },
            **_errors(*BODY_ERRORS, 429, 503),
        },
    )
    async def completions(body: completion_model, request: Request) -> Response:  # type: ignore[valid-type]
        call = call_from_request(body, runtime)
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
            return GenerationStream(
                _events(bridge, ids, call.include_usage), send_timeout_s=state.send_timeout_s, on_stall=bridge.cancel
            )
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

    @app.get(
        "/v1/steering",
        operation_id="getSteering",
        summary="The editor's steering plan",
        response_model=SteeringState,
        response_model_exclude_unset=True,
        responses=_errors(403),
    )
    async def get_steering() -> dict:
        return {"steering": runtime.steering.describe()}

    @app.put(
        "/v1/steering",
        operation_id="putSteering",
        summary="Replace the editor's steering plan (validated against the loaded model; kept in memory)",
        response_model=SteeringState,
        response_model_exclude_unset=True,
        dependencies=json_body,
        responses={
            200: {"description": "The new plan", "links": {"getSteering": {"operationId": "getSteering"}}},
            **_errors(*BODY_ERRORS, 503),
        },
    )
    async def put_steering(body: SteeringBody) -> dict:
        plan = plan_from_entries(body.steering)
        await check_plan(runtime, plan, sources_available=state.features.check_sources)
        runtime.steering = plan
        return {"steering": plan.describe()}

    @app.get(
        "/v1/features",
        operation_id="searchFeatures",
        summary="Search features by their labels",
        response_model=FeatureSearch,
        responses=_errors(400, 403, 503),
    )
    async def search_features(q: str = Query("", max_length=200), limit: int = Query(20, ge=1, le=100)) -> dict:
        return {"features": await state.features.search(q, limit)}

    @app.get(
        "/v1/features/{feature_id:path}",
        operation_id="showFeature",
        summary="Everything known about one feature",
        response_model=FeatureDetail,
        responses=_errors(400, 403, 404, 503),
    )
    async def show_feature(
        feature_id: str = Path(min_length=1, max_length=200, examples=["default:123"]),
    ) -> dict:
        return await state.features.show(feature_id)

    @app.get(
        "/v1/models",
        operation_id="listModels",
        summary="The model this server runs (OpenAI model list; `ready` is false while it loads)",
        response_model=ModelList,
        responses=_errors(403),
    )
    async def list_models() -> dict:
        engine = runtime.engine
        name = engine.info.model if engine is not None else runtime.settings.model
        card = {
            "id": name,
            "object": "model",
            "created": state.started,
            "owned_by": "tinymorph",
            "ready": runtime.ready,
            "context_tokens": engine.context.max_tokens if engine is not None else runtime.settings.context_tokens,
        }
        return {"object": "list", "data": [card]}

    @app.get(
        "/metrics",
        operation_id="metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors(403),
        },
    )
    async def metrics() -> Response:
        return Response(state.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    @app.get(
        "/healthz",
        operation_id="health",
        summary="Liveness and model state (no token needed); 503 while loading or after a failed load",
        response_model=Health,
        responses={503: {"model": Health, "description": "Loading or failed"}, **_errors(403)},
    )
    async def healthz() -> JSONResponse:
        body: dict[str, Any] = {"state": runtime.state, "message": runtime.message}
        if runtime.engine is not None:
            body["model"] = runtime.engine.info.model
        return JSONResponse(body, status_code=200 if runtime.ready else 503)


def _decrement(state: ApiState) -> None:
    state.pending -= 1


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def invalid(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message, param, code = _validation_message(exc)
        return JSONResponse(ApiError(400, message, param=param, code=code).body(), status_code=400)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # the router names only the first route's methods; a path may have several
            path = request.scope["path"]
            allowed = {
                m
                for r in app.router.routes
                if getattr(r, "path_regex", None) and r.path_regex.match(path)
                for m in (getattr(r, "methods", None) or ())
            }
            headers["Allow"] = ", ".join(sorted(allowed))
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind, headers=headers)

    async def server_error(_request: Request, exc: Exception) -> Response:
        log.exception("unhandled error in the HTTP API", exc_info=exc)
        return error_response(500, "internal server error", "server_error")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
