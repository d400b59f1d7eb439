"""Open documents as the client sees them, with LSP's line and column rules.

Why not pygls's workspace documents: they split lines with `str.splitlines` (which also breaks on
U+2028, form feeds and other characters LSP does not count as line breaks, so a pasted paragraph
separator would desynchronise every later position), clamp out-of-range columns off by one, and
re-split the whole text on every conversion (slow for multi-megabyte documents). Here a document
keeps its text and lazily computed line starts; columns are converted with C-speed encode/decode
in the negotiated position encoding ("utf-16" by default, "utf-8" or "utf-32" if the client
prefers them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LINE_BREAK = re.compile(r"\r\n|\r|\n")


class PositionError(ValueError):
    """A position lies outside the document."""


def _index_in_line(line: str, column: int, encoding: str) -> int:
    """Code-point index of a column given in `encoding` units (rounded down inside a character)."""
    if column <= 0:
        return 0
    if line.isascii() or encoding == "utf-32":
        return min(column, len(line))
    if encoding == "utf-8":
        return len(line.encode("utf-8")[:column].decode("utf-8", "ignore"))
    return len(line.encode("utf-16-le")[: column * 2].decode("utf-16-le", "ignore"))


def units(text: str, encoding: str) -> int:
    """Length of `text` in `encoding` code units."""
    if text.isascii() or encoding == "utf-32":
        return len(text)
    if encoding == "utf-8":
        return len(text.encode("utf-8"))
    return len(text.encode("utf-16-le")) // 2


@dataclass
class Document:
    """One open text document: its URI, version and text."""

    uri: str
    text: str
    version: int = 0
    language_id: str = ""
    encoding: str = "utf-16"
    _starts: list[int] | None = field(default=None, repr=False)

    # -- lines ------------------------------------------------------------------------------
    @property
    def line_starts(self) -> list[int]:
        """Offset of the first character of every line (computed once per text)."""
        if self._starts is None:
            self._starts = [0, *(m.end() for m in LINE_BREAK.finditer(self.text))]
        return self._starts

    def _line_bounds(self, line: int) -> tuple[int, int]:
        """(start, end) of a line's content, without its line break."""
        starts = self.line_starts
        start = starts[line]
        end = starts[line + 1] if line + 1 < len(starts) else len(self.text)
        while end > start and self.text[end - 1] in "\r\n":
            end -= 1
        return start, end

    # -- positions --------------------------------------------------------------------------
    def offset_at(self, line: int, character: int, *, strict: bool = False) -> int:
        """Offset of an LSP position.

        Lenient by default, as the spec asks of edits: a column past the end of its line means the
        line's end, a line past the end of the text means the end of the text. With `strict`, a
        position outside the text raises `PositionError` instead.
        """
        if line < 0 or character < 0:
            raise PositionError(f"position {line}:{character} is negative")
        starts = self.line_starts
        if line >= len(starts):
            if strict:
                raise PositionError(f"line {line} is past the end of the document ({len(starts)} lines)")
            return len(self.text)
        start, end = self._line_bounds(line)
        content = self.text[start:end]
        index = _index_in_line(content, character, self.encoding)
        if strict and index == len(content) and character > units(content, self.encoding):
            raise PositionError(f"character {character} is past the end of line {line}")
        return start + index

    def position_at(self, offset: int) -> tuple[int, int]:
        """LSP (line, character) of an offset, in the document's encoding."""
        from bisect import bisect_right

        offset = max(0, min(offset, len(self.text)))
        starts = self.line_starts
        line = bisect_right(starts, offset) - 1
        # an offset between "\r" and "\n" belongs to the end of the line
        start = starts[line]
        return line, units(self.text[start:offset], self.encoding)

    # -- edits ------------------------------------------------------------------------------
    def apply(self, text: str, start: tuple[int, int] | None = None,
              end: tuple[int, int] | None = None) -> int:
        """Replace the range (or everything, without a range); returns the offset after the new text."""
        if start is None or end is None:
            old = self.text
            self.text, self._starts = text, None
            return _end_of_change(old, text)
        a = self.offset_at(*start)
        b = self.offset_at(*end)
        if b < a:
            a, b = b, a
        self.text = self.text[:a] + text + self.text[b:]
        self._starts = None
        return a + len(text)


def _common_prefix(a: str, b: str, limit: int) -> int:
    """Length of the common prefix of a and b (at most `limit`), compared in chunks for speed."""
    n, step = 0, 4096
    while n < limit:
        k = min(step, limit - n)
        if a[n:n + k] == b[n:n + k]:
            n += k
            continue
        while a[n] == b[n]:
            n += 1
        return n
    return n


def _end_of_change(old: str, new: str) -> int:
    """Where a whole-document replacement's changed region ends in `new` (the likely cursor)."""
    prefix = _common_prefix(old, new, min(len(old), len(new)))
    suffix = _common_prefix(old[::-1], new[::-1], min(len(old), len(new)) - prefix)
    return len(new) - suffix


class Documents:
    """The open documents, by URI."""

    def __init__(self, encoding: str = "utf-16"):
        self.encoding = encoding
        self._docs: dict[str, Document] = {}

    def open(self, uri: str, text: str, version: int, language_id: str = "") -> Document:
        doc = Document(uri, text, version, language_id, self.encoding)
        self._docs[uri] = doc
        return doc

    def get(self, uri: str) -> Document | None:
        return self._docs.get(uri)

    def close(self, uri: str) -> Document | None:
        return self._docs.pop(uri, None)

    def __contains__(self, uri: str) -> bool:
        return uri in self._docs

    def __len__(self) -> int:
        return len(self._docs)
