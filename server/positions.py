"""Line/column ↔ offset conversion, in UTF-16 code units (LSP's default) or code points."""

from __future__ import annotations

from typing import Literal

Units = Literal["utf-16", "codepoints"]


def _column_to_index(line: str, column: int, units: Units) -> int:
    if units == "codepoints":
        return column
    count = 0
    for index, char in enumerate(line):
        if count >= column:
            return index
        count += 2 if ord(char) > 0xFFFF else 1
    if count == column:
        return len(line)
    raise ValueError(f"column {column} is past the end of the line ({count} UTF-16 units)")


def offset_at(text: str, line: int, column: int, units: Units = "utf-16") -> int:
    """Offset into `text` of the 0-based (line, column); ValueError when it is outside the text.

    Lines end at "\\n" (a preceding "\\r" belongs to the line break, not the line).
    """
    if line < 0 or column < 0:
        raise ValueError(f"position {line}:{column} is negative")
    start = 0
    for _ in range(line):
        nl = text.find("\n", start)
        if nl == -1:
            raise ValueError(f"line {line + 1} is past the end of the text ({text.count(chr(10)) + 1} lines)")
        start = nl + 1
    end = text.find("\n", start)
    content = text[start: len(text) if end == -1 else end].removesuffix("\r")
    if units == "codepoints" and column > len(content):
        raise ValueError(f"column {column + 1} is past the end of line {line + 1} ({len(content)} characters)")
    return start + _column_to_index(content, column, units)


def position_at(text: str, offset: int, units: Units = "utf-16") -> tuple[int, int]:
    """0-based (line, column) of `offset` in `text`."""
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset)
    line_start = text.rfind("\n", 0, offset) + 1
    prefix = text[line_start:offset]
    if units == "codepoints":
        return line, len(prefix)
    return line, sum(2 if ord(c) > 0xFFFF else 1 for c in prefix)
