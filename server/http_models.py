"""The HTTP API's request and response shapes as pydantic models.

These models are the single source of truth for both validation and the OpenAPI 3.1 document
(FastAPI derives `/openapi.json` from them), so the document cannot drift from what the server
accepts. Request models are strict (`"5"` is not a number, `true` is not an integer) and forbid
unknown keys, because a silently ignored or coerced field would do what the client did not ask.

Only the shape is checked here. Whether a steering `feature` exists (an SAE index, a vector, or a
free-text concept) is the engine resolver's call: the schema accepts any non-empty string and the
resolver's message becomes the 400.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..steering.generate import STOP_RULES, GenerationOptions
from ..steering.steering import MAX_STRENGTH

MAX_STOP_STRINGS = 4
MAX_STEERING_ENTRIES = 32
MAX_FEATURE_CHARS = 200
MAX_SEED = 2**53 - 1
MAX_DOCUMENT_CHARS = 512
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_REPETITION_PENALTY = GenerationOptions().repetition_penalty  # the engine's and the editor's default


def _integral(value: Any) -> Any:
    """5.0 counts as 5 (JSON Schema's notion of integer); anything else is left to strict validation."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _well_formed(value: str) -> str:
    """Refuse lone surrogates ("\\ud800" in JSON): they are not text, and no tokenizer can encode them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise ValueError(f"contains a lone surrogate ({bad!r} at index {exc.start}); send valid UTF-16 pairs") from None
    return value


def _not_bool(value: Any) -> Any:
    """`true` is not 1 (Python's bool is an int, JSON's is not)."""
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


def _bool_only(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError("Input should be a boolean")
    return value


def Integer(**constraints: Any) -> Any:  # noqa: N802 - used like a type
    """A strict integer with `constraints` (ge, le); models holding one convert 5.0 to 5 first.

    (A validator inside the annotation would turn the bounds into floats in the JSON Schema.)
    """
    return Annotated[int, Field(**constraints)]


Text = Annotated[str, AfterValidator(_well_formed)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_well_formed)]
Number = Annotated[float, Field(allow_inf_nan=False)]


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    integer_fields: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers(cls, data: Any) -> Any:
        """5.0 counts as 5 in integer fields (JSON Schema's notion of integer); true does not."""
        if isinstance(data, dict) and any(isinstance(data.get(k), float) for k in cls.integer_fields):
            data = {k: _integral(v) if k in cls.integer_fields else v for k, v in data.items()}
        return data


FeatureRef = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_FEATURE_CHARS,
        description='"<sae>:<index>" (e.g. "default:123"), "vector:<name>", or a short description of a '
        "concept; the engine resolves it (an unknown feature is a 400 naming the problem)",
        examples=["default:123"],
    ),
    AfterValidator(_well_formed),
]
Layer = Annotated[Integer(ge=0), Field(description="residual layer; null or absent: the feature's own layer")]


class SteeringEntry(StrictModel):
    """Add to or clamp one feature (`strength` 1 = the feature's max activation)."""

    integer_fields = frozenset({"layer"})
    feature: FeatureRef
    strength: Annotated[Number, Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH)] = 0.0
    mode: Literal["add", "clamp"] = "add"
    layer: Layer | None = None


class AblateEntry(StrictModel):
    """Remove a fraction `strength` (0..1) of one feature."""

    integer_fields = frozenset({"layer"})
    feature: FeatureRef
    strength: Annotated[Number, Field(ge=0, le=1)] = 0.0
    mode: Literal["ablate"]
    layer: Layer | None = None


def _entry_kind(value: Any) -> str | None:
    """Which entry model validates `value`: ablate entries have their own strength range."""
    mode = value.get("mode", "add") if isinstance(value, dict) else getattr(value, "mode", None)
    if not isinstance(mode, str):
        return None
    return {"add": "SteeringEntry", "clamp": "SteeringEntry", "ablate": "AblateEntry"}.get(mode)


Entry = Annotated[
    Annotated[SteeringEntry, Tag("SteeringEntry")] | Annotated[AblateEntry, Tag("AblateEntry")],
    Discriminator(
        _entry_kind,
        custom_error_type="invalid_mode",
        custom_error_message="mode must be one of add, clamp, ablate",
    ),
]


DUPLICATE_FEATURE = "duplicate_feature"  # a rule JSON Schema cannot state (unique by one key)


def _distinct_features(entries: list[SteeringEntry | AblateEntry]) -> list[SteeringEntry | AblateEntry]:
    """One entry per feature: two would silently sum (or fight, for clamps)."""
    features = [e.feature for e in entries]
    dupes = sorted({f for f in features if features.count(f) > 1})
    if dupes:
        raise PydanticCustomError(
            DUPLICATE_FEATURE, "feature(s) {dupes} steered more than once", {"dupes": ", ".join(map(repr, dupes))}
        )
    return entries


SteeringEntries = Annotated[
    list[Entry],
    Field(max_length=MAX_STEERING_ENTRIES),
    AfterValidator(_distinct_features),
]


def _plan_kind(value: Any) -> str | None:
    if isinstance(value, list):
        return "entries"
    return "editor" if value == "editor" else None


PlanChoice = Annotated[
    Annotated[SteeringEntries, Tag("entries")] | Annotated[Literal["editor"], Tag("editor")],
    Discriminator(
        _plan_kind,
        custom_error_type="invalid_steering",
        custom_error_message='steering must be a list of entries or "editor"',
    ),
]


DocumentId = Annotated[str, Field(min_length=1, max_length=MAX_DOCUMENT_CHARS), AfterValidator(_well_formed)]


class StreamOptions(StrictModel):
    include_usage: bool = False


Zero = Annotated[Number, Field(ge=0, le=0)]


class CompletionRequestBase(StrictModel):
    """OpenAI's `/v1/completions` body plus tinymorph's `steering`, `stop_rule` and `repetition_penalty`.

    `max_tokens` is added per app (its limit is a server setting), see `completion_request_model`.
    """

    integer_fields = frozenset({"max_tokens", "seed"})

    model: Text | None = Field(None, description="accepted for compatibility; the loaded model answers")
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = Field(1.0, description="below 0.001 means greedy")
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = 1.0
    stop: NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # 2^53 - 1: the largest integer every JSON client (and the OpenAPI document's float bounds) keeps exact
    seed: Integer(ge=0, le=MAX_SEED) | None = None
    # accepted only with their neutral value: anything else would silently do what the client did not ask
    n: Annotated[Literal[1], BeforeValidator(_not_bool)] | None = None
    best_of: Annotated[Literal[1], BeforeValidator(_not_bool)] | None = None
    echo: Annotated[Literal[False], BeforeValidator(_bool_only)] | None = None
    logprobs: Annotated[Literal[0], BeforeValidator(_not_bool)] | None = None
    suffix: None = None
    presence_penalty: Zero | None = None
    frequency_penalty: Zero | None = None
    logit_bias: Annotated[dict[str, Number], Field(max_length=0)] | None = None
    user: Text | None = Field(None, description="ignored")
    steering: PlanChoice | None = Field(
        None, description='steering entries for this request, or "editor" for the editor\'s current plan'
    )
    repetition_penalty: Annotated[Number, Field(ge=1, le=2)] | None = Field(
        DEFAULT_REPETITION_PENALTY,
        description="tinymorph extension: damp the logits of recently generated tokens (1 = off)",
    )
    stop_rule: Literal[STOP_RULES] | None = Field(  # type: ignore[valid-type]
        "none", description="tinymorph extension: also stop at a word/line/sentence/paragraph boundary"
    )
    document: DocumentId | None = Field(
        None,
        description="tinymorph extension: the id of the document this prompt continues (an editor's "
        "remote engine sends it). Its prefix cache is kept and reused by the next request for the same "
        "document, a newer request for it (same steering) cancels an older one still running, and it "
        "runs at editor priority. Without it every request gets a pooled cache of its own.",
    )


def completion_request_model(max_tokens_limit: int) -> type[CompletionRequestBase]:
    """The request model for an app whose `max_tokens` limit is `max_tokens_limit`."""
    return create_model(
        "CompletionRequest",
        __base__=CompletionRequestBase,
        max_tokens=(Integer(ge=1, le=max_tokens_limit) | None, DEFAULT_MAX_TOKENS),
    )


class SteeringBody(StrictModel):
    steering: SteeringEntries


# -- responses (lenient: they are ours) -----------------------------------------------------------


class Timings(BaseModel):
    model_config = ConfigDict(extra="allow")
    queue_ms: float
    prepare_ms: float = 0.0  # tokenizing, token healing, finding the cached prefix
    prefill_ms: float
    ttft_ms: float
    decode_ms: float
    total_ms: float
    tokens_reused: int
    tokens_prefilled: int
    tokens_generated: int
    decode_tokens_per_s: float


class AppliedSteering(BaseModel):
    model_config = ConfigDict(extra="allow")
    feature: str
    strength: float
    mode: str
    layer: int | None = None


class Extension(BaseModel):
    """tinymorph's own fields: why it stopped, where the time went, what steered it."""

    stop_reason: str
    timings: Timings
    steering: list[AppliedSteering]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: Annotated[list[Choice], Field(min_length=1)]
    usage: Usage
    tinymorph: Extension


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    ready: bool
    context_tokens: int | None = Field(
        None, description="tinymorph extension: the prompt window in tokens (editors cut their context to match)"
    )


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    state: Literal["idle", "loading", "ready", "error"]
    message: str
    model: str | None = None


class FeatureDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str


class FeatureSearch(BaseModel):
    features: list[dict[str, Any]]


class SteeringState(BaseModel):
    steering: list[AppliedSteering]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail
