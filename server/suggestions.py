"""Per-document suggestion state and the rules around it, free of any LSP or threading code.

Why a separate module: whether a hint may be shown, what counts as "typed ahead", how much an
accept-word inserts and what the label says are the decisions users notice; they are easiest to
get right (and to test) as plain functions over strings. `server/lsp.py` only moves data between
the protocol, the scheduler and these functions.

Vocabulary: a suggestion is computed for one document *version*; its *anchor* is the cursor
offset it continues from. When the user later types exactly the start of the suggestion at the
anchor, the suggestion stays valid for the new version: the typed part is *typed ahead* and the
*rest* is what remains to show. Validity is followed edit by edit (`Suggestion.track`), never by
comparing whole texts, so a keystroke in a 10 MB document costs what it costs in a small one.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ..steering.config import DTYPES
from ..steering.generate import STOP_RULES, Completion

AcceptKind = Literal["all", "word", "line"]
_ids = itertools.count(1)


@dataclass
class Suggestion:
    """A continuation (possibly still streaming) computed for one version of one document.

    It follows the document's edits one at a time (`track`), so checking it costs what the edit
    costs, not what the document costs: typing the next characters of the suggestion at its cursor
    (or deleting what was typed of it) keeps it; any other edit leaves it behind for good.
    """

    uri: str
    version: int
    anchor: int  # offset the suggestion continues from
    context: str = ""  # the text before the anchor that went to the engine (a window, not the document)
    text: str = ""
    done: bool = False
    completion: Completion | None = None
    steering: list[dict] = field(default_factory=list)
    id: int = field(default_factory=lambda: next(_ids))
    typed: str = ""  # typed ahead since `version`
    seen: int | None = None  # the document version `typed` is up to date with; None: left behind

    def __post_init__(self) -> None:
        if self.seen is None:
            self.seen = self.version

    @property
    def cursor(self) -> int:
        return self.anchor + len(self.typed)

    def track(self, start: int, end: int, inserted: str) -> bool:
        """Follow one edit ([start, end) of the previous text became `inserted`); False, and left
        behind for good, unless it types the next part of the suggestion or deletes typed text."""
        cursor = self.cursor
        if self.seen is not None:
            if start == end == cursor and inserted and self.text[len(self.typed):].startswith(inserted):
                self.typed += inserted
                return True
            if not inserted and end == cursor and self.anchor <= start < end:
                self.typed = self.typed[: start - self.anchor]
                return True
        self.seen = None
        return False

    def follow(self, version: int) -> None:
        """The edits of `version` were all tracked."""
        if self.seen is not None:
            self.seen = version

    def view(self, version: int) -> View | None:
        """What to show for the document's current version, or None if nothing is valid."""
        if self.seen != version:
            return None
        rest = self.text[len(self.typed):]
        if not rest:
            return None
        return View(self, self.typed, rest)

    def keeps_after_edit(self) -> bool:
        """Whether the tracked edits leave this suggestion useful: something is left to show or
        the model is still producing more."""
        if self.seen is None:
            return False
        return not self.done or len(self.typed) < len(self.text)


@dataclass(frozen=True)
class View:
    """A suggestion as it applies to the current text: `typed` is already in the document."""

    suggestion: Suggestion
    typed: str
    rest: str

    @property
    def anchor(self) -> int:
        return self.suggestion.anchor

    @property
    def cursor(self) -> int:
        """Where the rest would be inserted."""
        return self.suggestion.anchor + len(self.typed)


# -- accepting part of a suggestion ----------------------------------------------------------------

_WORD = re.compile(r"[^\S\n]*(?:\r?\n|\S+)")


def accept_part(rest: str, kind: AcceptKind) -> str:
    """The part of `rest` that accept / accept-word / accept-line inserts.

    A word is optional leading spaces plus the following run of non-space characters, so prose
    punctuation travels with its word ("king," then " said"); a line break is a word of its own, so
    accepting word by word never jumps over the end of a line. A line runs up to and including the
    next line break (all of the rest when there is none).
    """
    if kind == "all":
        return rest
    if kind == "word":
        m = _WORD.match(rest)
        return m.group(0) if m else rest
    nl = rest.find("\n")
    return rest if nl == -1 else rest[: nl + 1]


# -- presentation -----------------------------------------------------------------------------------

ELLIPSIS = "…"
NEWLINE_MARK = "↵"


def label_for(rest: str) -> str:
    """One-line inlay-hint label: the first line, with "…" when more lines follow.

    A rest that starts with a line break would otherwise have an empty first line: it shows as "↵"
    followed by its first non-empty line.
    """
    body = rest.lstrip("\r\n")
    lead = NEWLINE_MARK if len(body) < len(rest) else ""
    first, sep, more = body.partition("\n")
    first = first.rstrip("\r")
    return lead + first + (ELLIPSIS if sep and more.strip() else "")


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def format_steering(steering: list[dict]) -> str:
    if not steering:
        return "none"
    parts = []
    for e in steering:
        layer = f" @L{e['layer']}" if e.get("layer") is not None else ""
        parts.append(f"{e.get('feature')} {e.get('mode', 'add')} {float(e.get('strength', 0.0)):+g}{layer}")
    return ", ".join(parts)


def tooltip_for(view: View) -> str:
    """Markdown: the full remaining text, its timings and the steering it was made with."""
    s = view.suggestion
    fence = _fence(view.rest)
    lines = ["**tinymorph suggestion**", "", f"{fence}text", view.rest, fence, ""]
    if s.completion is not None:
        t = s.completion.timings
        parts = _ttft_split(t)
        split = f" (engine {parts[0]:.0f} ms + network {parts[1]:.0f} ms)" if parts else ""
        lines.append(f"TTFT {t.ttft_ms:.0f} ms{split} · {t.decode_tokens_per_s:.1f} tokens/s · "
                     f"{t.tokens_generated} tokens ({t.tokens_reused} cached, {t.tokens_prefilled} prefilled)"
                     f" · stop: {s.completion.stop_reason}")
    else:
        lines.append("generating…")
    lines.append("")
    lines.append(f"steering: {format_steering(s.steering)}")
    return "\n".join(lines)


def _ttft_split(t) -> tuple[float, float] | None:
    """(engine, network) ms of a remote generation's TTFT (`RemoteTimings`); None for a local one."""
    engine, network = getattr(t, "engine_ttft_ms", None), getattr(t, "network_ms", None)
    return (engine, network) if engine is not None and network is not None else None


def metrics_payload(s: Suggestion, completion: Completion) -> dict[str, Any]:
    """The `tinymorph/metrics` notification for a finished suggestion (docs/protocol.md).

    With a remote engine `ttftMs` is end to end and `engineTtftMs` + `networkMs` split it."""
    t = completion.timings
    payload = {
        "uri": s.uri, "version": s.version, "id": s.id,
        "ttftMs": round(t.ttft_ms, 2), "prefillMs": round(t.prefill_ms, 2), "queueMs": round(t.queue_ms, 2),
        "prepareMs": round(t.prepare_ms, 2),
        "tokensPerSecond": round(t.decode_tokens_per_s, 2), "tokensReused": t.tokens_reused,
        "tokensPrefilled": t.tokens_prefilled, "tokensGenerated": t.tokens_generated,
        "stopReason": completion.stop_reason, "steering": list(completion.steering or s.steering),
        "text": completion.text,
    }
    if (split := _ttft_split(t)) is not None:
        payload["engineTtftMs"], payload["networkMs"] = round(split[0], 2), round(split[1], 2)
    return payload


def log_line(metrics: dict[str, Any]) -> str:
    split = (f" (engine {metrics['engineTtftMs']:.0f} + network {metrics['networkMs']:.0f})"
             if "engineTtftMs" in metrics else "")
    return (f"suggestion v{metrics['version']}: ttft {metrics['ttftMs']:.0f} ms{split}, "
            f"prefill {metrics['prefillMs']:.0f} ms"
            f" ({metrics['tokensPrefilled']} tokens, {metrics['tokensReused']} reused), "
            f"{metrics['tokensPerSecond']:.1f} tok/s, {metrics['tokensGenerated']} tokens, "
            f"stop {metrics['stopReason']}: {metrics['text']!r}")


# -- settings -----------------------------------------------------------------------------------------


@dataclass
class Settings:
    """The client-facing settings (docs/protocol.md, "Settings")."""

    model: str = "default"
    dtype: str = "auto"
    threads: int | None = None
    debounceMs: int = 120  # noqa: N815 - the protocol's key names
    maxTokens: int = 24  # noqa: N815
    stop: str = "sentence"
    enabled: bool = True
    temperature: float = 0.0
    contextTokens: int = 1024  # noqa: N815
    config: str | None = None


MODEL_KEYS = ("model", "dtype", "threads", "contextTokens")  # changing these reloads the model


def _check(key: str, value: Any) -> Any:
    """The validated value for `key`, or ValueError with a message for the user."""
    if key in ("model", "config"):
        if value is None and key == "config":
            return None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{key} must be a non-empty string")
        return value
    if key == "dtype":
        if value not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        return value
    if key == "stop":
        if value not in STOP_RULES:
            raise ValueError(f"stop must be one of {', '.join(STOP_RULES)}")
        return value
    if key == "enabled":
        if not isinstance(value, bool):
            raise ValueError("enabled must be true or false")
        return value
    if key == "temperature":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 5:
            raise ValueError("temperature must be a number between 0 and 5")
        return float(value)
    limits = {"threads": (1, 256), "debounceMs": (0, 10_000), "maxTokens": (1, 1024),
              "contextTokens": (16, 8192)}
    lo, hi = limits[key]
    if value is None and key == "threads":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{key} must be an integer between {lo} and {hi}")
    return value


KEYS = tuple(f.name for f in fields(Settings))


def settings_object(raw: Any) -> dict[str, Any]:
    """The tinymorph settings inside `raw`: `{"tinymorph": {...}}`, `{"settings": {"tinymorph": …}}`
    or the object itself."""
    if not isinstance(raw, dict):
        return {}
    if isinstance(raw.get("settings"), dict):
        raw = raw["settings"]
    if isinstance(raw.get("tinymorph"), dict):
        raw = raw["tinymorph"]
    return raw


def validate_settings(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """Known, valid keys of a settings object, and one message per rejected key."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in settings_object(raw).items():
        if key not in KEYS:
            continue  # unknown keys belong to clients (e.g. server.command); ignore quietly
        try:
            values[key] = _check(key, value)
        except ValueError as exc:
            problems.append(f"setting {key}={value!r} ignored: {exc}")
    return values, problems
