"""`POST /v1/completions`: OpenAI-shaped requests in, scheduler jobs out, and back again.

Kept apart from the app factory because this is where the protocol meets the engine: a request the
pydantic model has validated becomes `GenerationOptions` and a `SteeringPlan` (whose features the
engine resolves before any streaming, so an unknown one is a 400, never a 500 mid-stream), the
bridge from the engine thread to the asyncio loop, and the response/chunk shapes.

Why each request gets its own `doc_id` slot: a doc_id owns one KV cache, so two concurrent jobs must
never share one. Finished slots are pooled (a few, LIFO) rather than dropped, so a client sending
the same long prompt again reuses its prefix like an editor does.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..steering.engine import CompletionRequest
from ..steering.generate import Completion, GenerationOptions, TokenEvent
from ..steering.steering import SteeringPlan
from .http_models import DEFAULT_MAX_TOKENS, DEFAULT_REPETITION_PENALTY, AblateEntry, CompletionRequestBase
from .http_models import SteeringEntry as SteeringEntryModel
from .runtime import Runtime
from .scheduler import PRIORITY_EDITOR, PRIORITY_HTTP, Job

MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-6  # any smaller top_p means the same thing (the top token only)


UNRESOLVED_FEATURE = "unresolved_feature"  # `code` of a 400 from the engine's feature resolver


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with `status`.

    `code` is set where a client can act on it: ``unresolved_feature`` marks a request that is
    well-formed (the schema accepts any feature string) but names a feature the engine cannot resolve.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class CompletionCall:
    """A validated completion request."""

    prompt: str
    options: GenerationOptions
    steering: SteeringPlan | None
    stream: bool
    include_usage: bool
    model: str | None
    document: str | None = None  # a client's document id: its own prefix cache, latest request wins


def unresolved(message: str, param: str | None) -> ApiError:
    """The engine's resolver refused a feature: its message, as a 400."""
    return ApiError(400, message, param=param, code=UNRESOLVED_FEATURE)


def call_from_request(body: CompletionRequestBase, runtime: Runtime) -> CompletionCall:
    """A `CompletionCall` from a request the model has validated (shape and ranges)."""
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    temperature = body.temperature if body.temperature is not None else 1.0
    if temperature < MIN_TEMPERATURE:  # logits / 1e-40 overflow; the limit of sampling as t → 0 is greedy
        temperature = 0.0
    top_p = max(body.top_p if body.top_p is not None else 1.0, MIN_TOP_P)  # 5e-324 is 0 in float32
    stop = body.stop
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    repetition_penalty = body.repetition_penalty
    options = GenerationOptions(
        max_tokens=body.max_tokens if body.max_tokens is not None else DEFAULT_MAX_TOKENS,  # type: ignore[attr-defined]
        stop=body.stop_rule or "none",
        temperature=temperature,
        top_p=top_p,
        seed=body.seed,
        stop_strings=stops,
        repetition_penalty=repetition_penalty if repetition_penalty is not None else DEFAULT_REPETITION_PENALTY,
    )
    if body.steering == "editor":
        steering: SteeringPlan | None = runtime.steering
    elif body.steering is None:
        steering = None
    else:
        steering = plan_from_entries(body.steering)
    include_usage = body.stream_options.include_usage if body.stream_options is not None else False
    return CompletionCall(prompt, options, steering, bool(body.stream), include_usage, body.model, body.document)


def plan_from_entries(entries: list[SteeringEntryModel | AblateEntry], param: str = "steering") -> SteeringPlan:
    """A plan from validated entries; the engine's own entry check runs too (its message is the 400)."""
    from ..steering.steering import SteeringEntry, SteeringError, validate_entry

    plan = []
    for item in entries:
        entry = SteeringEntry(feature=item.feature, strength=float(item.strength), mode=item.mode, layer=item.layer)
        try:
            validate_entry(entry)
        except SteeringError as exc:
            raise unresolved(str(exc), param) from None
        plan.append(entry)
    return SteeringPlan(tuple(plan))


async def check_plan(
    runtime: Runtime,
    plan: SteeringPlan | None,
    param: str = "steering",
    sources_available: Callable[[SteeringPlan], None] | None = None,
) -> None:
    """Resolve `plan` against the loaded model so unknown features are a 400 before any streaming.

    `sources_available` raises an `ApiError` (503) first when an SAE the plan names cannot be
    loaded: that is the server's problem, not a bad request.
    """
    engine = runtime.engine
    if engine is None or plan is None or plan.is_empty():
        return
    if sources_available is not None:
        await asyncio.to_thread(sources_available, plan)
    try:
        await asyncio.to_thread(runtime.check_plan, plan)  # resolves, and calibrates what is new
    except ValueError as exc:  # SteeringError and friends
        raise unresolved(str(exc), param) from None
    except Exception as exc:  # noqa: BLE001 - e.g. an SAE file that cannot be read
        raise ApiError(503, f"steering is not available: {exc}", "unavailable", param) from None


class DocSlots:
    """A pool of `http:<id>` document ids: distinct while in use, a few kept warm for reuse."""

    def __init__(self, keep_idle: int = 4):
        self.keep_idle = keep_idle
        self._idle: list[str] = []
        self._lock = threading.Lock()

    def acquire(self) -> str:
        with self._lock:
            return self._idle.pop() if self._idle else f"http:{uuid.uuid4().hex}"

    def release(self, doc_id: str, runtime: Runtime) -> None:
        """Return a slot; beyond `keep_idle` its KV cache is dropped (called on the engine thread)."""
        with self._lock:
            if len(self._idle) < self.keep_idle:
                self._idle.append(doc_id)
                return
        engine = runtime.engine
        if engine is not None:
            engine.forget(doc_id)


DOCUMENT_PREFIX = "doc:"  # engine doc ids of client-named documents (never clash with pooled `http:` slots)


class JobBridge:
    """Runs one request on the scheduler and delivers its events to an asyncio queue.

    Scheduler callbacks run on the engine thread; they only ever hop to the loop with
    `call_soon_threadsafe` (and give up quietly if the loop has gone away at shutdown).

    A request naming a `document` (an editor's remote engine) uses that document's own cache and
    the scheduler's replace key for it, like the in-process editor: the newest request of a
    document (and plan) cancels an older one that is still running, so the two never share a
    cache even when the old stream's disconnect is noticed after the new request arrived.
    """

    def __init__(
        self,
        runtime: Runtime,
        slots: DocSlots,
        call: CompletionCall,
        *,
        stream: bool,
        priority: int = PRIORITY_HTTP,
        on_finish: Callable[[], None] | None = None,
    ):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any, Any]] = asyncio.Queue()
        self.runtime, self.slots = runtime, slots
        replace = None
        if call.document is not None:
            self.doc_id, self.pooled = DOCUMENT_PREFIX + call.document, False
            plan_key = call.steering.cache_key() if call.steering is not None else ""
            replace, priority = ("http-document", self.doc_id, plan_key), PRIORITY_EDITOR
        else:
            self.doc_id, self.pooled = slots.acquire(), True
        request = CompletionRequest(text=call.prompt, doc_id=self.doc_id, options=call.options, steering=call.steering)
        self.job = Job(request, priority=priority, replace=replace, on_token=self._on_token if stream else None,
                       on_done=self._on_done)
        self.finished = False
        self.first_token_ms: float | None = None  # engine TTFT (queued → first token), for the first chunk
        self.on_finish = on_finish  # runs on the loop once the job is over, even if nobody waits

    def start(self) -> Job:
        return self.runtime.scheduler.submit(self.job)

    def cancel(self) -> None:
        self.job.cancel.cancel()

    def _post(self, item: tuple[str, Any, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # loop closed: the server is gone, nobody is listening
            pass

    def _on_token(self, job: Job, event: TokenEvent) -> None:
        if self.first_token_ms is None and job.request.queued_at is not None:
            self.first_token_ms = (time.perf_counter() - job.request.queued_at) * 1000
        self._post(("token", event, None))

    def _on_done(self, _job: Job, completion: Completion | None, error: BaseException | None) -> None:
        if self.pooled:
            self.slots.release(self.doc_id, self.runtime)
        if completion is not None:
            self.runtime.completed(completion, "http")
        self._post(("done", completion, error))
        if self.on_finish is not None:
            try:
                self.loop.call_soon_threadsafe(self.on_finish)
            except RuntimeError:
                pass

    async def next_event(self) -> tuple[str, Any, Any]:
        item = await self.queue.get()
        if item[0] == "done":
            self.finished = True
        return item


def finish_reason(completion: Completion) -> str:
    return "length" if completion.stop_reason in ("max-tokens", "window") else "stop"


def usage(completion: Completion) -> dict[str, int]:
    t = completion.timings
    prompt_tokens = t.tokens_reused + t.tokens_prefilled
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": t.tokens_generated,
        "total_tokens": prompt_tokens + t.tokens_generated,
    }


def extension(completion: Completion) -> dict[str, Any]:
    """tinymorph's own fields: why it stopped, where the time went, what steered it."""
    return {
        "stop_reason": completion.stop_reason,
        "timings": completion.timings.to_dict(),
        "steering": completion.steering,
    }


@dataclass
class ResponseIds:
    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> ResponseIds:
        return cls(f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), model)

    def envelope(self, choices: list[dict]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


def completion_body(ids: ResponseIds, completion: Completion) -> dict[str, Any]:
    body = ids.envelope(
        [{"text": completion.text, "index": 0, "logprobs": None, "finish_reason": finish_reason(completion)}]
    )
    body["usage"] = usage(completion)
    body["tinymorph"] = extension(completion)
    return body


def chunk_body(
    ids: ResponseIds,
    text: str,
    completion: Completion | None = None,
    include_usage: bool = False,
    first_token_ms: float | None = None,
) -> dict[str, Any]:
    """One SSE chunk; the last one (with `completion`) carries finish_reason and the extension.

    The first text chunk carries `tinymorph.ttft_ms`, the engine's time to first token (queued →
    first token), so a client can split its own end-to-end TTFT into engine and network time
    without waiting for the end of the stream.
    """
    reason = finish_reason(completion) if completion is not None else None
    body = ids.envelope([{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}])
    if first_token_ms is not None:
        body["tinymorph"] = {"ttft_ms": round(first_token_ms, 3)}
    if completion is not None:
        body["tinymorph"] = extension(completion)
        if include_usage:
            body["usage"] = usage(completion)
    return body
