"""The pure rules behind the LSP server: typed-ahead matching, accept splitting, labels, settings,
and LSP document positions (UTF-16, CRLF, edits out of range)."""

from __future__ import annotations

import time

import pytest

from tinymorph.server.documents import Document, PositionError
from tinymorph.server.suggestions import (
    Suggestion,
    accept_part,
    label_for,
    metrics_payload,
    tooltip_for,
    validate_settings,
)
from tinymorph.steering.generate import Completion, Timings


def make(text: str = " the old king said.", anchor: int = 17, done: bool = True) -> Suggestion:
    return Suggestion("file:///a.md", 3, anchor, "Once upon a time,", text=text, done=done)


def typed(s: Suggestion, *chunks: str, version: int = 4) -> Suggestion:
    """The user types `chunks` one edit each at the suggestion's cursor."""
    for chunk in chunks:
        s.track(s.cursor, s.cursor, chunk)
    s.follow(version)
    return s


# -- visibility -------------------------------------------------------------------------------------


def test_view_for_its_own_version():
    s = make()
    v = s.view(3)
    assert v is not None and v.typed == "" and v.rest == " the old king said." and v.cursor == 17


def test_typed_ahead_keeps_the_rest():
    s = typed(make(), " th", "e o")
    v = s.view(4)
    assert v is not None and v.typed == " the o" and v.rest == "ld king said." and v.cursor == 23
    assert s.keeps_after_edit()
    assert s.view(3) is None  # never for another version than the one it follows


def test_backspace_over_typed_text_keeps_it():
    s = typed(make(), " the o")
    assert s.track(22, 23, "")  # delete the "o"
    s.follow(5)
    assert s.view(5).rest == "old king said."


def test_divergent_typing_or_other_edits_hide_it_for_good():
    for start, end, text in ((17, 17, "x"), (16, 17, ""), (0, 1, "X"), (20, 20, " ")):
        s = make()
        assert not s.track(start, end, text)
        s.follow(4)
        assert s.view(4) is None and not s.keeps_after_edit()
        assert not s.track(s.cursor, s.cursor, " ")  # and it stays left behind


def test_fully_typed_suggestion_is_gone_unless_still_generating():
    s = typed(make(), " the old king said.")
    assert s.view(4) is None
    assert not s.keeps_after_edit()
    s.done = False  # the model may still add more: keep the generation running
    assert s.keeps_after_edit()


def test_empty_suggestion_shows_nothing():
    assert make(text="").view(3) is None


# -- accept -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rest", "word"), [
    (" the old king", " the"),
    ("king, said he", "king,"),
    ("\nNext line", "\n"),
    ("  \r\nNext", "  \r\n"),
    ("   ", "   "),
    ("", ""),
    ("naïve café", "naïve"),
    ("😀 emoji", "😀"),
])
def test_accept_word(rest, word):
    assert accept_part(rest, "word") == word


def test_accept_line_and_all():
    assert accept_part(" one\ntwo\nthree", "line") == " one\n"
    assert accept_part(" no break", "line") == " no break"
    assert accept_part(" one\ntwo", "all") == " one\ntwo"


def test_word_by_word_reassembles_the_text():
    rest, parts = " The king,\n\n said: 'no'.", []
    while rest:
        part = accept_part(rest, "word")
        assert part, rest
        parts.append(part)
        rest = rest[len(part):]
    assert "".join(parts) == " The king,\n\n said: 'no'."


# -- presentation ------------------------------------------------------------------------------------


def test_label_is_one_line():
    assert label_for(" the end.") == " the end."
    assert label_for(" first\nsecond") == " first…"
    assert label_for(" first\r\nsecond") == " first…"
    assert label_for(" first\n") == " first"
    assert label_for("\n\nNew paragraph\nmore") == "↵New paragraph…"


def test_tooltip_and_metrics():
    timings = Timings(queue_ms=1, prefill_ms=20, ttft_ms=25, decode_ms=100, tokens_generated=11,
                      tokens_prefilled=5, tokens_reused=40)
    s = make(text=" a ```fenced``` bit")
    s.steering = [{"feature": "default:12", "strength": 0.8, "mode": "add"}]
    s.completion = Completion(s.text, [1] * 11, "stop-rule", timings, s.steering)
    v = s.view(3)
    tip = tooltip_for(v)
    assert "````text\n a ```fenced``` bit\n````" in tip  # the fence is longer than any backtick run
    assert "TTFT 25 ms" in tip and "100.0 tokens/s" in tip and "default:12 add +0.8" in tip
    m = metrics_payload(s, s.completion)
    assert m["ttftMs"] == 25 and m["tokensPerSecond"] == 100.0 and m["stopReason"] == "stop-rule"
    assert m["tokensReused"] == 40 and m["steering"] == s.steering and m["version"] == 3


def test_tooltip_while_streaming():
    s = make(done=False)
    assert "generating" in tooltip_for(s.view(3))


# -- settings -------------------------------------------------------------------------------------------


def test_settings_validation():
    values, problems = validate_settings({"tinymorph": {
        "debounceMs": 50, "maxTokens": 0, "stop": "line", "enabled": "yes", "temperature": 0.7,
        "model": "default", "server.command": "x", "threads": None}})
    assert values == {"debounceMs": 50, "stop": "line", "temperature": 0.7, "model": "default", "threads": None}
    assert len(problems) == 2 and any("maxTokens" in p for p in problems) and any("enabled" in p for p in problems)
    assert validate_settings({"settings": {"tinymorph": {"dtype": "float32"}}})[0] == {"dtype": "float32"}
    assert validate_settings(None) == ({}, [])
    assert validate_settings({"debounceMs": True})[1]  # a bool is not an integer here


# -- documents -----------------------------------------------------------------------------------------


def test_utf16_positions_with_surrogate_pairs_and_crlf():
    doc = Document("u", "Title 😀\r\nThe cat 🐈 sat", encoding="utf-16")
    assert doc.offset_at(0, 8) == 7  # after the emoji: 6 + 2 units
    assert doc.offset_at(0, 7) == 6  # inside the pair: rounds down to the emoji's start
    assert doc.offset_at(1, 14) == len(doc.text)
    assert doc.position_at(len(doc.text)) == (1, 14)
    assert doc.position_at(7) == (0, 8)
    assert doc.offset_at(0, 99) == 7  # past the end of a line: the line's end, before "\r\n"
    assert doc.offset_at(7, 0) == len(doc.text)
    with pytest.raises(PositionError):
        doc.offset_at(0, 99, strict=True)
    with pytest.raises(PositionError):
        doc.offset_at(5, 0, strict=True)


def test_utf8_and_utf32_encodings():
    text = "é😀x"
    assert Document("u", text, encoding="utf-8").offset_at(0, 6) == 2
    assert Document("u", text, encoding="utf-8").position_at(3) == (0, 7)
    assert Document("u", text, encoding="utf-32").offset_at(0, 2) == 2


def test_only_lsp_line_breaks_count():
    doc = Document("u", "a\u2028b\x0cc\rd\ne")
    assert doc.line_starts == [0, 6, 8]
    assert doc.offset_at(2, 1) == 9


def test_incremental_and_full_edits_report_the_cursor():
    doc = Document("u", "Hello world")
    assert doc.apply(",", (0, 5), (0, 5)) == 6
    assert doc.text == "Hello, world"
    assert doc.apply("there", (0, 7), (0, 12)) == 12
    assert doc.text == "Hello, there"
    assert doc.apply("!", (9, 9), (9, 9)) == len("Hello, there!")  # out of range: clamped to the end
    assert doc.apply("Hello, big there!") == len("Hello, big ")  # full text: end of the inserted "big "
    assert doc.apply("x\ny", (0, 0), (0, 0)) == 3
    assert doc.line_starts == [0, 2]


def test_lone_surrogates_count_as_one_utf16_unit():
    doc = Document("u", "abc \ud800 d", encoding="utf-16")
    assert doc.position_at(len("abc \ud800")) == (0, 5)
    assert doc.offset_at(0, 5) == 5
    assert doc.apply(" x", (0, 7), (0, 7)) == 9
    assert doc.text == "abc \ud800 d x"


def test_edits_keep_line_blocks_consistent_with_a_plain_string():
    """Random edits (line breaks of every kind included) on a document with tiny blocks agree with
    the same edits on a plain string: text, line starts, positions and slices."""
    import random
    import re

    import tinymorph.server.documents as documents

    def reference(text: str, line: int, ch: int) -> int:
        starts = [0] + [m.end() for m in re.finditer(r"\r\n|\r|\n", text)]
        if line >= len(starts):
            return len(text)
        s, e = starts[line], starts[line + 1] if line + 1 < len(starts) else len(text)
        while e > s and text[e - 1] in "\r\n":
            e -= 1
        return s + min(ch, e - s)

    rng = random.Random(7)
    pieces = ["a", "b", "\n", "\r", "\r\n", "é", "x y"]
    old = documents.BLOCK_LINES
    documents.BLOCK_LINES = 3
    try:
        for _ in range(300):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
            doc = Document("u", text, encoding="utf-32")
            for _ in range(8):
                n = text.count("\n") + text.count("\r") + 2
                a = (rng.randint(0, n), rng.randint(0, 5))
                b = (rng.randint(0, n), rng.randint(0, 5))
                a, b = min(a, b), max(a, b)
                new = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))
                x, y = reference(text, *a), reference(text, *b)
                change = doc.apply_change(new, a, b)
                assert (change.start, change.end) == (x, y)
                text = text[:x] + new + text[y:]
                assert doc.text == text
                assert doc.line_starts == [0] + [m.end() for m in re.finditer(r"\r\n|\r|\n", text)]
                i, j = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
                assert doc.slice(i, j) == text[i:j]
                off = rng.randint(0, len(text))
                if not (0 < off < len(text) and text[off - 1:off + 1] == "\r\n"):
                    assert doc.offset_at(*doc.position_at(off)) == off
    finally:
        documents.BLOCK_LINES = old


def test_keystroke_cost_does_not_grow_with_the_document():
    """A keystroke in a 10 MB document costs about what it costs in a small one (no whole-text
    copy or re-split): generous bound, 20 ms per edit on a slow shared machine."""
    import time

    line = "All work and no play makes Jack a dull boy. " * 4 + "\n"
    doc = Document("u", line * (10_000_000 // len(line)))
    n = doc.line_count - 1
    started = time.perf_counter()
    for i in range(200):
        change = doc.apply_change("x", (n // 2, i), (n // 2, i))
        doc.position_at(change.cursor)
    per_edit = (time.perf_counter() - started) / 200
    assert per_edit < 0.02, f"{per_edit * 1000:.1f} ms per keystroke"


def test_searches_run_one_at_a_time_and_learn_when_overtaken() -> None:
    """A picker searches again as the user types: the first search is told once the second has been
    asked for (so it can skip its slow stages), and the second starts only after the first is done."""
    import threading

    from tinymorph.server.search_gate import SearchGate

    gate = SearchGate()
    first_running, second_asked = threading.Event(), threading.Event()
    log: list[tuple[str, bool]] = []

    def first(superseded) -> str:
        log.append(("first starts", superseded()))
        first_running.set()
        assert second_asked.wait(5)
        deadline = time.monotonic() + 5
        while not superseded() and time.monotonic() < deadline:
            time.sleep(0.01)
        log.append(("first ends", superseded()))
        return "first"

    def second(superseded) -> str:
        log.append(("second runs", superseded()))
        return "second"

    answers: dict[str, str] = {}
    thread = threading.Thread(target=lambda: answers.update(a=gate.run(first)))
    thread.start()
    assert first_running.wait(5)
    other = threading.Thread(target=lambda: answers.update(b=gate.run(second)))
    other.start()
    second_asked.set()
    thread.join(10)
    other.join(10)
    assert answers == {"a": "first", "b": "second"}
    assert log == [("first starts", False), ("first ends", True), ("second runs", False)]
