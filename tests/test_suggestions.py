"""The pure rules behind the LSP server: typed-ahead matching, accept splitting, labels, settings,
and LSP document positions (UTF-16, CRLF, edits out of range)."""

from __future__ import annotations

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


def make(text: str = " the old king said.", before: str = "Once upon a time,", after: str = "",
         done: bool = True) -> Suggestion:
    return Suggestion("file:///a.md", 3, before, after, text=text, done=done)


# -- visibility -------------------------------------------------------------------------------------


def test_view_for_its_own_version():
    s = make()
    v = s.view("Once upon a time,", 3)
    assert v is not None and v.typed == "" and v.rest == " the old king said." and v.cursor == 17


def test_typed_ahead_keeps_the_rest():
    s = make()
    v = s.view("Once upon a time, the o", 4)
    assert v is not None and v.typed == " the o" and v.rest == "ld king said." and v.cursor == 23
    assert s.keeps_after_edit("Once upon a time, the o")


def test_typed_ahead_with_text_after_the_cursor():
    s = make(before="A", after="\nB")
    assert s.view("A the\nB", 9).rest == " old king said."
    assert s.view("A the\nBx", 9) is None  # the text after the cursor changed too


def test_divergent_typing_or_other_edits_hide_it():
    s = make()
    assert s.view("Once upon a time, thx", 4) is None
    assert s.view("Once upon a time", 4) is None  # deletion
    assert s.view("Xnce upon a time,", 4) is None  # edit elsewhere, same length
    assert not s.keeps_after_edit("Once upon a time, thx")


def test_fully_typed_suggestion_is_gone_unless_still_generating():
    s = make()
    full = "Once upon a time, the old king said."
    assert s.view(full, 9) is None
    assert not s.keeps_after_edit(full)
    s.done = False  # the model may still add more: keep the generation running
    assert s.keeps_after_edit(full)


def test_stale_version_with_other_text_is_never_shown():
    s = make()
    assert s.view("Totally different", 3 + 1) is None


def test_empty_suggestion_shows_nothing():
    assert make(text="").view("Once upon a time,", 3) is None


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
    v = s.view("Once upon a time,", 3)
    tip = tooltip_for(v)
    assert "````text\n a ```fenced``` bit\n````" in tip  # the fence is longer than any backtick run
    assert "TTFT 25 ms" in tip and "100.0 tokens/s" in tip and "default:12 add +0.8" in tip
    m = metrics_payload(s, s.completion)
    assert m["ttftMs"] == 25 and m["tokensPerSecond"] == 100.0 and m["stopReason"] == "stop-rule"
    assert m["tokensReused"] == 40 and m["steering"] == s.steering and m["version"] == 3


def test_tooltip_while_streaming():
    s = make(done=False)
    assert "generating" in tooltip_for(s.view("Once upon a time,", 3))


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
