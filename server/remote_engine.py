"""The engine of `tinymorph lsp --engine http://HOST:PORT`: generation on a tinymorph HTTP API.

Documents, suggestions, debounce and the editor protocol stay in the LSP process; only the
generation goes over the wire. The LSP session talks to a `Runtime` whose scheduler is a
`RemoteScheduler` and whose engine is a `RemoteEngine`, both with the interface of the local ones
(`submit`/`cancel_key`/`stats`, `context`/`info`/`forget`/`resolve`), so its handlers do not change.

Why a scheduler of its own rather than the local one stepping a network generator: the local
scheduler owns one CPU and steps one forward pass at a time; here the server does that sharing (and
the editor-first priority), and the client's job is to keep one stream open per document and close
it the moment the user types on. Each job is an asyncio task on one background loop, streaming
`POST /v1/completions` (SSE) with the document id (so the server reuses that document's prefix
cache, and Ray Serve routes it to the replica that holds it: `x-session-id` and
`serve_multiplexed_model_id`) and
the steering plan of this request. Cancelling the task closes the connection, which cancels the
generation on the server between two tokens.

Failures are states, never crashes or hangs: an address that is not a URL, a server that does not
answer, a refused token or a server that goes away turn the runtime's state to "error" with a
sentence for the editor; a watchdog polls `/healthz` and reconnects when the server is back.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..steering.context import ContextPolicy
from ..steering.engine import CompletionRequest, EngineInfo
from ..steering.generate import Completion, Timings, TokenEvent
from ..steering.model import ModelError
from ..steering.steering import SteeringPlan
from .runtime import ModelSettings, ProgressListener, Runtime
from .scheduler import Job, SchedulerStats, supersede

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0  # a server that does not accept a connection in this long is down
READ_TIMEOUT_S = 60.0  # between two chunks of a stream (a long queue on a busy server)
LOADING_WAIT_S = 300.0  # how long `connect` waits for a server whose model is still loading
RETRY_EVERY_S = 2.0  # the watchdog's /healthz poll while the engine is unreachable
MULTIPLEX_HEADER = "serve_multiplexed_model_id"  # Ray Serve's model-multiplexing routing key
SESSION_HEADER = "x-session-id"  # Ray Serve's session id (its consistent-hash router's key)
# this editor process: its document ids never clash with another editor's on a shared engine, and stay
# the same across reconnects (the server's caches for them stay useful)
CLIENT_ID = uuid.uuid4().hex[:12]


class EngineUnreachable(ModelError):
    """The server did not answer (down, wrong host or port, network): retried by the watchdog."""


class EngineRefused(ModelError):
    """The server answered but will not serve us (bad URL, wrong token): not retried."""


@dataclass
class RemoteTimings(Timings):
    """`Timings` of a remote generation: `ttft_ms` is end to end (queued here → first text here),
    `engine_ttft_ms` the server's own (queued there → first token there), `network_ms` the rest
    (connection, HTTP, proxies, routing)."""

    engine_ttft_ms: float | None = None
    network_ms: float | None = None


def check_url(url: str) -> str:
    """`url` without a trailing slash, or `EngineRefused` saying what is wrong with it."""
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or parts.query or parts.fragment:
        raise EngineRefused(f"--engine {url!r} is not an engine address: expected http://HOST:PORT "
                            "(a `tinymorph serve` or `tinymorph serve --ray` server)")
    return url.strip().rstrip("/")


def _error_message(response: httpx.Response, body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except Exception:  # noqa: BLE001 - not tinymorph's error shape (a proxy's page, …)
        return body[:200].decode("utf-8", "replace").strip() or response.reason_phrase


class RemoteEngine:
    """What the LSP side needs of an engine, answered by a tinymorph HTTP API at `url`."""

    remote = True

    def __init__(self, url: str, token: str | None = None, *, model: str = "remote", context_tokens: int = 1024,
                 connect_s: float = 0.0):
        self.url, self.token = url, token
        self.context = ContextPolicy(max_tokens=context_tokens)
        self.info = EngineInfo(model=model, folder=url, dtype="remote", threads=0, layers=0, d_model=0, vocab=0,
                               max_positions=0, weight_bytes=0, load_s=connect_s)
        self.client_id = CLIENT_ID

    @property
    def ready_message(self) -> str:
        return f"engine {self.info.model} at {self.url} (connected in {self.info.load_s:.1f} s)"

    def headers(self, document: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if document is not None:  # Ray Serve routes a document to the replica holding its cache
            headers[MULTIPLEX_HEADER] = headers[SESSION_HEADER] = document
        return headers

    def document_id(self, doc_id: str) -> str:
        return f"{self.client_id}:{doc_id}"

    @classmethod
    def connect(cls, url: str, token: str | None = None, progress: ProgressListener | None = None,
                wait_s: float = LOADING_WAIT_S) -> RemoteEngine:
        """Reach the server, wait while its model loads, and read what it serves.

        Raises `EngineUnreachable` (retry later), or `EngineRefused` with the reason.
        """
        url = check_url(url)
        try:
            return cls._connect(url, token, progress, wait_s)
        except httpx.HTTPError as exc:
            raise EngineUnreachable(f"cannot reach the engine at {url} ({type(exc).__name__}: {exc}); "
                                    f"retrying every {RETRY_EVERY_S:g} s") from None

    @classmethod
    def _connect(cls, url: str, token: str | None, progress: ProgressListener | None, wait_s: float) -> RemoteEngine:
        started = time.perf_counter()
        timeout = httpx.Timeout(10.0, connect=CONNECT_TIMEOUT_S)
        with httpx.Client(timeout=timeout) as client:
            deadline = time.monotonic() + wait_s
            while True:
                health = client.get(f"{url}/healthz")
                if health.status_code == 200:
                    break
                state = _json(health).get("state")
                if health.status_code == 503 and state in ("idle", "loading") and time.monotonic() < deadline:
                    if progress is not None:
                        progress(f"engine at {url} is loading its model", None)
                    time.sleep(0.5)
                    continue
                message = _json(health).get("message") or health.reason_phrase
                raise EngineUnreachable(f"the engine at {url} is not ready ({state or health.status_code}: "
                                        f"{message}); retrying every {RETRY_EVERY_S:g} s")
            models = client.get(f"{url}/v1/models", headers=cls(url, token).headers())
            if models.status_code == 401:
                raise EngineRefused(f"the engine at {url} refused the token (401): "
                                    + ("set the right one with --token or $TINYMORPH_TOKEN" if token
                                       else "it needs one: pass --token or set $TINYMORPH_TOKEN"))
            if models.status_code != 200:
                raise EngineRefused(f"the engine at {url} answered {models.status_code} to /v1/models: "
                                    f"{_error_message(models, models.content)}")
            try:
                card = models.json()["data"][0]
                name = str(card["id"])
            except Exception:  # noqa: BLE001
                raise EngineRefused(f"{url} does not look like a tinymorph engine (its /v1/models is "
                                    "not an OpenAI model list)") from None
        context = card.get("context_tokens") if isinstance(card.get("context_tokens"), int) else 1024
        return cls(url, token, model=name, context_tokens=context, connect_s=time.perf_counter() - started)

    # -- the engine interface the LSP side uses ------------------------------------------------------
    def forget(self, doc_id: str) -> None:
        """Nothing to do here: the server's prefix caches live under its memory budget (LRU)."""

    def resolve(self, plan: SteeringPlan | None) -> None:
        """Check `plan` where it will run: a one-token generation with it (the server resolves
        features with its own SAEs and config). ValueError with the server's message if refused."""
        if plan is None or plan.is_empty():
            return None
        body = {"prompt": " ", "max_tokens": 1, "temperature": 0, "steering": _entries(plan)}
        try:
            response = httpx.post(f"{self.url}/v1/completions", json=body, headers=self.headers(),
                                  timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        except httpx.HTTPError as exc:
            raise EngineUnreachable(f"cannot reach the engine at {self.url} ({type(exc).__name__}: {exc})") from None
        if response.status_code == 400:
            raise ValueError(_error_message(response, response.content))
        if response.status_code != 200:
            raise RuntimeError(f"the engine at {self.url} answered {response.status_code}: "
                               f"{_error_message(response, response.content)}")
        return None


def _json(response: httpx.Response) -> dict:
    try:
        value = response.json()
    except Exception:  # noqa: BLE001
        return {}
    return value if isinstance(value, dict) else {}


def _entries(plan: SteeringPlan) -> list[dict[str, Any]]:
    return [{"feature": e.feature, "strength": float(e.strength), "mode": e.mode, "layer": e.layer}
            for e in plan.entries]


def request_body(request: CompletionRequest, document: str | None) -> dict[str, Any]:
    """The `/v1/completions` body for an engine request (the editor's options, this request's plan)."""
    o = request.options
    body: dict[str, Any] = {
        "prompt": request.text, "max_tokens": o.max_tokens, "temperature": o.temperature, "top_p": o.top_p,
        "stop_rule": o.stop, "repetition_penalty": o.repetition_penalty, "stream": True,
    }
    if o.seed is not None:
        body["seed"] = o.seed
    if o.stop_strings:
        body["stop"] = list(o.stop_strings)
    if request.steering is not None and not request.steering.is_empty():
        body["steering"] = _entries(request.steering)
    if document is not None:
        body["document"] = document
    return body


class RemoteScheduler:
    """`Scheduler`'s interface over a remote engine: each job is one streamed HTTP request.

    Same contract as the local scheduler: callbacks run on this scheduler's own thread (protocol
    layers hop back to their loop), `replace` keeps at most one job per key (the newer cancels the
    older, whose stream is closed), a cancelled job ends with a "cancelled" completion.
    """

    def __init__(self, on_unreachable: Callable[[str], None] | None = None):
        self.engine: RemoteEngine | None = None
        self.stats = SchedulerStats()
        self.on_unreachable = on_unreachable  # the runtime's "the engine went away" hook
        self._lock = threading.Lock()
        self._by_key: dict[Hashable, Job] = {}
        self._running: set[Job] = set()
        self._seq = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._client: httpx.AsyncClient | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tinymorph-remote", daemon=True)
        self._thread.start()

    # -- public (any thread) ------------------------------------------------------------------------
    def set_engine(self, engine: RemoteEngine) -> None:
        self.engine = engine

    def submit(self, job: Job) -> Job:
        if job.request.queued_at is None:
            job.request.queued_at = time.perf_counter()
        with self._lock:
            job.seq = next(self._seq)
            supersede(self._by_key, job, self.stats)
            self._running.add(job)
            self.stats.submitted += 1
        try:
            asyncio.run_coroutine_threadsafe(self._run(job), self._loop)
        except RuntimeError:  # stopped
            self._finish(job, Completion("", [], "cancelled", Timings()), None)
        return job

    def cancel_key(self, key: Hashable) -> None:
        with self._lock:
            job = self._by_key.get(key)
        if job is not None:
            job.cancel.cancel()

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._running)

    def stop(self) -> None:
        with self._lock:
            jobs = list(self._running)
        for job in jobs:
            job.cancel.cancel()
        if self._loop.is_running():
            async def close() -> None:
                await asyncio.sleep(0.05)  # let cancelled streams close their connections
                if self._client is not None:
                    await self._client.aclose()

            try:
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(3)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=3)

    # -- the loop -----------------------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
                                             limits=httpx.Limits(max_keepalive_connections=8))
        return self._client

    async def _run(self, job: Job) -> None:
        engine = self.engine
        if engine is None or job.cancel.cancelled:
            self._finish(job, _cancelled(job), None)
            return
        stream = asyncio.ensure_future(self._stream(engine, job))
        while not stream.done():  # the cancel token is set from other threads: poll it
            if job.cancel.cancelled:
                stream.cancel()
            await asyncio.wait({stream}, timeout=0.02)
        try:
            completion = stream.result()
        except asyncio.CancelledError:
            self._finish(job, _cancelled(job), None)
        except EngineUnreachable as exc:
            self._finish(job, None, exc)
            if self.on_unreachable is not None:
                self.on_unreachable(str(exc))
        except Exception as exc:  # noqa: BLE001 - reported to the job's owner
            self._finish(job, None, exc)
        else:
            self._finish(job, completion, None)

    async def _stream(self, engine: RemoteEngine, job: Job) -> Completion:
        request = job.request
        document = engine.document_id(request.doc_id) if job.replace is not None else None
        body = request_body(request, document)
        text, index, first_at, engine_ttft = "", 0, None, None
        final: dict[str, Any] | None = None
        try:
            async with self._http().stream("POST", f"{engine.url}/v1/completions", json=body,
                                           headers=engine.headers(document)) as response:
                if response.status_code != 200:
                    raise _status_error(engine, response, await response.aread())
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        message = str(chunk["error"].get("message", "generation failed"))
                        raise ValueError(message) if chunk["error"].get("type") == "invalid_request_error" \
                            else RuntimeError(f"the engine failed: {message}")
                    extension = chunk.get("tinymorph") or {}
                    if engine_ttft is None and isinstance(extension.get("ttft_ms"), int | float):
                        engine_ttft = float(extension["ttft_ms"])
                    choice = (chunk.get("choices") or [{}])[0]
                    delta = choice.get("text") or ""
                    if delta:
                        if first_at is None:
                            first_at = time.perf_counter()
                        text += delta
                        if job.on_token is not None:
                            _safe(job.on_token, job, TokenEvent(delta, text, -1, index))
                        index += 1
                    if choice.get("finish_reason") is not None:
                        final = extension
        except httpx.HTTPError as exc:
            raise EngineUnreachable(f"lost the engine at {engine.url} ({type(exc).__name__}: {exc}); "
                                    f"retrying every {RETRY_EVERY_S:g} s") from None
        if final is None:
            raise EngineUnreachable(f"the engine at {engine.url} ended a stream early; retrying every "
                                    f"{RETRY_EVERY_S:g} s")
        return _completion(job, text, final, first_at, engine_ttft)

    def _finish(self, job: Job, result: Completion | None, error: BaseException | None) -> None:
        with self._lock:
            self._running.discard(job)
            if job.replace is not None and self._by_key.get(job.replace) is job:
                del self._by_key[job.replace]
            if error is not None:
                self.stats.failed += 1
            elif result is not None and result.stop_reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.finished += 1
        job.result, job.error = result, error
        job.done.set()
        if job.on_done is not None:
            _safe(job.on_done, job, result, error)


def _status_error(engine: RemoteEngine, response: httpx.Response, body: bytes) -> Exception:
    message = _error_message(response, body)
    if response.status_code == 400:
        return ValueError(message)  # e.g. a steering feature the server cannot resolve
    if response.status_code == 401:
        return EngineUnreachable(f"the engine at {engine.url} refused the token (401)")
    if response.status_code in (429, 502, 503, 504):
        return EngineUnreachable(f"the engine at {engine.url} is unavailable ({response.status_code}: {message})")
    return RuntimeError(f"the engine at {engine.url} answered {response.status_code}: {message}")


def _completion(job: Job, text: str, final: dict[str, Any], first_at: float | None,
                engine_ttft: float | None) -> Completion:
    server = final.get("timings") or {}
    known = {k: server[k] for k in asdict(Timings()) if isinstance(server.get(k), int | float)}
    timings = RemoteTimings(**known)
    if engine_ttft is None and "ttft_ms" in known:
        engine_ttft = float(known["ttft_ms"])
    queued = job.request.queued_at
    if first_at is not None and queued is not None:
        timings.ttft_ms = (first_at - queued) * 1000
        if engine_ttft is not None:
            timings.engine_ttft_ms = engine_ttft
            timings.network_ms = max(0.0, timings.ttft_ms - engine_ttft)
    if queued is not None:
        timings.total_ms = (time.perf_counter() - queued) * 1000
    steering = final.get("steering") if isinstance(final.get("steering"), list) else []
    return Completion(text, [], str(final.get("stop_reason") or "eos"), timings, steering)


def _cancelled(job: Job) -> Completion:
    timings = Timings()
    if job.request.queued_at is not None:
        timings.queue_ms = (time.perf_counter() - job.request.queued_at) * 1000
    return Completion("", [], "cancelled", timings)


def _safe(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - a broken callback must not kill the stream
        log.exception("remote scheduler callback failed")


# -- wiring a runtime to a remote engine -----------------------------------------------------------------


class Watchdog:
    """Reconnects the runtime when its unreachable engine answers `/healthz` again."""

    def __init__(self, runtime: Runtime, url: str, every_s: float = RETRY_EVERY_S):
        self.runtime, self.url, self.every_s = runtime, url, every_s
        self.retry = False  # set when the last failure was "unreachable" (not a refusal)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tinymorph-remote-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if not self.retry or self.runtime.state != "error":
                continue
            try:
                healthy = httpx.get(f"{self.url}/healthz", timeout=CONNECT_TIMEOUT_S).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy and self.runtime.state == "error":
                log.info("the engine at %s is back: reconnecting", self.url)
                self.retry = False
                self.runtime.load()


def remote_runtime(url: str, token: str | None = None) -> Runtime:
    """A `Runtime` whose engine is the tinymorph HTTP API at `url` (nothing is loaded here).

    `runtime.load()` connects (state loading → ready, or error with the reason); a generation that
    finds the server gone turns the state to error; the watchdog reconnects when it is back.
    """
    scheduler = RemoteScheduler()
    runtime = Runtime(scheduler=scheduler)  # type: ignore[arg-type] - the Scheduler interface
    try:
        clean = check_url(url)
    except EngineRefused:
        clean = url
    watchdog = Watchdog(runtime, clean)

    def connect(_settings: ModelSettings, progress: ProgressListener | None) -> RemoteEngine:
        try:
            return RemoteEngine.connect(url, token, progress=progress)
        except EngineUnreachable:
            watchdog.retry = True
            raise

    def unreachable(message: str) -> None:
        if runtime.state == "ready":
            watchdog.retry = True
            runtime.lost(message)

    scheduler.on_unreachable = unreachable
    runtime.connect = connect
    runtime.watchdog = watchdog  # type: ignore[attr-defined]
    return runtime
