"""`POST /v1/completions`: OpenAI-shaped requests in, scheduler jobs out, and back again.

Kept apart from the app factory because this is where the protocol meets the engine: request
validation (every bad field is a 400 naming the field, never a 500 from deep in the engine), the
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
from ..steering.generate import STOP_RULES, Completion, GenerationOptions, TokenEvent
from ..steering.steering import SteeringPlan
from .runtime import Runtime
from .scheduler import PRIORITY_HTTP, Job

MAX_STOP_STRINGS = 4
MAX_STEERING_ENTRIES = 32
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-6  # any smaller top_p means the same thing (the top token only)
DEFAULT_REPETITION_PENALTY = GenerationOptions().repetition_penalty  # the engine's and the editor's default
IGNORED_FIELDS = {"user"}
# accepted only with their neutral value: anything else would silently do what the client did not ask
NEUTRAL_FIELDS: dict[str, tuple[Any, ...]] = {
    "n": (1, None),
    "best_of": (1, None),
    "echo": (False, None),
    "logprobs": (None, 0),
    "suffix": (None,),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
}
KNOWN_FIELDS = (
    {
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "stream",
        "stream_options",
        "seed",
        "steering",
        "stop_rule",
        "repetition_penalty",
        "logit_bias",
    }
    | IGNORED_FIELDS
    | set(NEUTRAL_FIELDS)
)


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param"}}`` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


@dataclass
class CompletionCall:
    """A validated completion request."""

    prompt: str
    options: GenerationOptions
    steering: SteeringPlan | None
    stream: bool
    include_usage: bool
    model: str | None


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise _bad(f"{key} must be a number", key)
    if value > hi or value < lo or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise _bad(f"{key} must be in {left}{lo:g}, {hi:g}]", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None) -> int | None:
    """An integer field; 5.0 counts as 5 (JSON Schema's notion of integer), true does not."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{key} must be an integer", key)
    return value


def parse_completion(body: Any, *, max_tokens_limit: int, runtime: Runtime) -> CompletionCall:
    """Validate an OpenAI completions body (plus tinymorph's `steering` and `stop_rule`)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise _bad(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
    for key, allowed in NEUTRAL_FIELDS.items():
        value = body.get(key)
        if value is not None and not any(
            value == v and isinstance(value, bool) == isinstance(v, bool) for v in allowed if v is not None
        ):
            raise _bad(f"{key}={value!r} is not supported by tinymorph", key)
    if body.get("logit_bias"):
        raise _bad("logit_bias is not supported by tinymorph", "logit_bias")

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model must be a string", "model")

    if "prompt" not in body:
        raise _bad("prompt is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise _bad("prompt must be a string or a list of exactly one string", "prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt must be a string or a list of exactly one string", "prompt")

    max_tokens = _integer(body, "max_tokens", DEFAULT_MAX_TOKENS)
    if not 1 <= max_tokens <= max_tokens_limit:
        raise _bad(f"max_tokens must be between 1 and {max_tokens_limit}", "max_tokens")

    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    if temperature < MIN_TEMPERATURE:  # logits / 1e-40 overflow; the limit of sampling as t → 0 is greedy
        temperature = 0.0
    top_p = max(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), MIN_TOP_P)  # 5e-324 is 0 in float32

    repetition_penalty = _number(body, "repetition_penalty", DEFAULT_REPETITION_PENALTY, 1.0, 2.0)
    seed = _integer(body, "seed", None)
    if seed is not None and not 0 <= seed < 2**63:
        raise _bad("seed must be an integer in [0, 2^63)", "seed")

    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise _bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise _bad(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", "stop")

    stop_rule = body.get("stop_rule", "none")
    if stop_rule is None:
        stop_rule = "none"
    if stop_rule not in STOP_RULES:
        raise _bad(f"stop_rule must be one of {', '.join(STOP_RULES)}", "stop_rule")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if (
            not isinstance(stream_options, dict)
            or set(stream_options) - {"include_usage"}
            or not isinstance(stream_options.get("include_usage", False), bool)
        ):
            raise _bad('stream_options must be {"include_usage": bool}', "stream_options")
        include_usage = stream_options.get("include_usage", False)

    options = GenerationOptions(
        max_tokens=max_tokens,
        stop=stop_rule,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_strings=stops,
        repetition_penalty=repetition_penalty,
    )
    return CompletionCall(
        prompt,
        options,
        parse_steering(body.get("steering"), runtime, "steering"),
        stream,
        include_usage,
        model,
    )


def parse_steering(value: Any, runtime: Runtime, param: str) -> SteeringPlan | None:
    """A plan from a list of config-schema entries; "editor" means the runtime's current plan.

    Only the shape is checked here; whether the features exist is checked by resolving the plan
    (which may load an SAE) in `check_plan`.
    """
    if value is None:
        return None
    if value == "editor":
        return runtime.steering
    if not isinstance(value, list):
        raise _bad(f'{param} must be a list of steering entries or "editor"', param)
    if len(value) > MAX_STEERING_ENTRIES:
        raise _bad(f"{param} takes at most {MAX_STEERING_ENTRIES} entries", param)
    from ..steering.config import ConfigError, entry_from_dict

    entries = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _bad(f'{param}[{i}] must be an object like {{"feature": "default:123", "strength": 4}}', param)
        unknown = sorted(set(item) - {"feature", "strength", "mode", "layer"})
        if unknown:
            raise _bad(f"{param}[{i}]: unknown key(s) {', '.join(unknown)}", param)
        try:
            entries.append(entry_from_dict(item, f"{param}[{i}]"))
        except (ConfigError, ValueError) as exc:
            raise _bad(str(exc), param) from None
    features = [e.feature for e in entries]
    dupes = sorted({f for f in features if features.count(f) > 1})
    if dupes:
        raise _bad(f"{param}: feature(s) {', '.join(dupes)} steered more than once", param)
    return SteeringPlan(tuple(entries))


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
        await asyncio.to_thread(engine.resolve, plan)
    except ValueError as exc:  # SteeringError and friends
        raise _bad(str(exc), param) from None
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


class JobBridge:
    """Runs one request on the scheduler and delivers its events to an asyncio queue.

    Scheduler callbacks run on the engine thread; they only ever hop to the loop with
    `call_soon_threadsafe` (and give up quietly if the loop has gone away at shutdown).
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
        self.doc_id = slots.acquire()
        request = CompletionRequest(text=call.prompt, doc_id=self.doc_id, options=call.options, steering=call.steering)
        self.job = Job(request, priority=priority, on_token=self._on_token if stream else None, on_done=self._on_done)
        self.finished = False
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

    def _on_token(self, _job: Job, event: TokenEvent) -> None:
        self._post(("token", event, None))

    def _on_done(self, _job: Job, completion: Completion | None, error: BaseException | None) -> None:
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
    ids: ResponseIds, text: str, completion: Completion | None = None, include_usage: bool = False
) -> dict[str, Any]:
    """One SSE chunk; the last one (with `completion`) carries finish_reason and the extension."""
    reason = finish_reason(completion) if completion is not None else None
    body = ids.envelope([{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}])
    if completion is not None:
        body["tinymorph"] = extension(completion)
        if include_usage:
            body["usage"] = usage(completion)
    return body
