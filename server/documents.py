"""Open documents as the client sees them, with LSP's line and column rules, edited in place.

Why not pygls's workspace documents: they split lines with `str.splitlines` (which also breaks on
U+2028, form feeds and other characters LSP does not count as line breaks, so a pasted paragraph
separator would desynchronise every later position), clamp out-of-range columns off by one, and
copy and re-split the whole text on every edit.

Why a line array in blocks: a keystroke in a 10 MB document must cost what the keystroke costs,
not what the document costs. The text is kept as lines (each with its own line break) grouped in
blocks of a few hundred lines, each block knowing its character count; an edit re-splits only the
lines it touches, and offset ↔ position conversions walk block totals, then one block. Nothing on
the keystroke path joins the whole text (`text` does, for the rare callers that need all of it).

Columns are converted with C-speed encode/decode in the negotiated position encoding ("utf-16" by
default, "utf-8" or "utf-32" if the client prefers them). Lone surrogates (which JSON can carry and
Python keeps) count as one UTF-16 unit, as they do in the client's own string.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate

LINE_BREAK = re.compile(r"\r\n|\r|\n")
_OTHER_BREAKS = re.compile("[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")  # str.splitlines breaks on these too
BLOCK_LINES = 256  # lines per block (a block is split when it doubles)


class PositionError(ValueError):
    """A position lies outside the document."""


def _encode(text: str, encoding: str) -> bytes:
    return text.encode("utf-8" if encoding == "utf-8" else "utf-16-le", "surrogatepass")


def _index_in_line(line: str, column: int, encoding: str) -> int:
    """Code-point index of a column given in `encoding` units (rounded down inside a character)."""
    if column <= 0:
        return 0
    if line.isascii() or encoding == "utf-32":
        return min(column, len(line))
    if encoding == "utf-8":
        data = _encode(line, "utf-8")[:column]
        while True:  # a column inside a multi-byte character: drop the partial bytes
            try:
                return len(data.decode("utf-8", "surrogatepass"))
            except UnicodeDecodeError:
                data = data[:-1]
    decoded = _encode(line, "utf-16")[: column * 2].decode("utf-16-le", "surrogatepass")
    n = len(decoded)
    if n and decoded[-1] != line[n - 1]:
        n -= 1  # the column cut a surrogate pair in half: round down to the pair's start
    return n


def units(text: str, encoding: str) -> int:
    """Length of `text` in `encoding` code units."""
    if text.isascii() or encoding == "utf-32":
        return len(text)
    if encoding == "utf-8":
        return len(_encode(text, "utf-8"))
    return len(_encode(text, "utf-16")) // 2


def split_lines(text: str) -> list[str]:
    """Lines with their LSP line breaks ("\\r\\n", "\\r", "\\n"); the last item has none (maybe "")."""
    if not _OTHER_BREAKS.search(text):
        lines = text.splitlines(keepends=True)  # C speed; same breaks as LSP for this text
    else:
        lines, start = [], 0
        for m in LINE_BREAK.finditer(text):
            lines.append(text[start:m.end()])
            start = m.end()
        if start < len(text):
            lines.append(text[start:])
    if not lines or lines[-1].endswith(("\n", "\r")):
        lines.append("")
    return lines


def _content(line: str) -> str:
    """A line without its line break."""
    if line.endswith("\r\n"):
        return line[:-2]
    if line.endswith(("\n", "\r")):
        return line[:-1]
    return line


def sanitize(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD: what a tokenizer or a UTF-8 stream can take."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


@dataclass(frozen=True)
class Change:
    """One applied edit in offsets of the text before it: [start, end) became `text`."""

    start: int
    end: int
    text: str

    @property
    def cursor(self) -> int:
        """Where the edit ended in the new text (the likely cursor)."""
        return self.start + len(self.text)


class Document:
    """One open text document: its URI, version and text (as blocks of lines)."""

    def __init__(self, uri: str, text: str, version: int = 0, language_id: str = "", encoding: str = "utf-16"):
        self.uri, self.version, self.language_id, self.encoding = uri, version, language_id, encoding
        self._blocks: list[list[str]] = []
        self._chars: list[int] = []
        self._set_lines(split_lines(text))

    def _set_lines(self, lines: list[str]) -> None:
        self._blocks = [lines[i:i + BLOCK_LINES] for i in range(0, len(lines), BLOCK_LINES)] or [[""]]
        self._chars = [sum(map(len, b)) for b in self._blocks]

    # -- whole text (O(n): not for the keystroke path) ----------------------------------------
    @property
    def text(self) -> str:
        return "".join(line for block in self._blocks for line in block)

    def __len__(self) -> int:
        return sum(self._chars)

    @property
    def line_count(self) -> int:
        return sum(map(len, self._blocks))

    @property
    def line_starts(self) -> list[int]:
        """Offset of the first character of every line (O(n); for tests and tools)."""
        lengths = [len(line) for block in self._blocks for line in block]
        return [0, *accumulate(lengths[:-1])]

    # -- locating -------------------------------------------------------------------------------
    def _find_line(self, line: int) -> tuple[int, int, int]:
        """(block, index in block, offset of the line's start) of an existing line."""
        counts = list(accumulate(map(len, self._blocks)))
        b = bisect_right(counts, line)
        before_lines = counts[b - 1] if b else 0
        block = self._blocks[b]
        i = line - before_lines
        start = sum(self._chars[:b]) + sum(map(len, block[:i]))
        return b, i, start

    def _find_offset(self, offset: int) -> tuple[int, int, int]:
        """(line number, offset of its start, its text) of the line that contains `offset`."""
        offset = max(0, min(offset, len(self)))
        ends = list(accumulate(self._chars))
        b = min(bisect_right(ends, offset), len(self._blocks) - 1)
        start = ends[b - 1] if b else 0
        line_no = sum(map(len, self._blocks[:b]))
        block = self._blocks[b]
        for i, line in enumerate(block):
            if offset < start + len(line) or (i == len(block) - 1 and b == len(self._blocks) - 1):
                return line_no + i, start, line
            start += len(line)
        return line_no + len(block) - 1, start - len(block[-1]), block[-1]  # pragma: no cover

    def line(self, line: int) -> str:
        """The text of line `line` without its line break ("" past the end)."""
        if not 0 <= line < self.line_count:
            return ""
        b, i, _ = self._find_line(line)
        return _content(self._blocks[b][i])

    # -- positions --------------------------------------------------------------------------
    def offset_at(self, line: int, character: int, *, strict: bool = False) -> int:
        """Offset of an LSP position.

        Lenient by default, as the spec asks of edits: a column past the end of its line means the
        line's end, a line past the end of the text means the end of the text. With `strict`, a
        position outside the text raises `PositionError` instead.
        """
        if line < 0 or character < 0:
            raise PositionError(f"position {line}:{character} is negative")
        n = self.line_count
        if line >= n:
            if strict:
                raise PositionError(f"line {line} is past the end of the document ({n} lines)")
            return len(self)
        b, i, start = self._find_line(line)
        content = _content(self._blocks[b][i])
        index = _index_in_line(content, character, self.encoding)
        if strict and index == len(content) and character > units(content, self.encoding):
            raise PositionError(f"character {character} is past the end of line {line}")
        return start + index

    def position_at(self, offset: int) -> tuple[int, int]:
        """LSP (line, character) of an offset, in the document's encoding."""
        line_no, start, line = self._find_offset(offset)
        offset = max(0, min(offset, len(self)))
        return line_no, units(line[: offset - start], self.encoding)

    def slice(self, start: int, end: int) -> str:
        """The text between two offsets, in time proportional to its length (plus the block walk)."""
        start, end = max(0, start), min(end, len(self))
        if end <= start:
            return ""
        line_no, line_start, _ = self._find_offset(start)
        b, i, _ = self._find_line(line_no)
        parts: list[str] = []
        pos = line_start
        while pos < end and b < len(self._blocks):
            line = self._blocks[b][i]
            parts.append(line[max(0, start - pos): end - pos])
            pos += len(line)
            i += 1
            if i == len(self._blocks[b]):
                b, i = b + 1, 0
        return "".join(parts)

    # -- edits ------------------------------------------------------------------------------
    def apply(self, text: str, start: tuple[int, int] | None = None,
              end: tuple[int, int] | None = None) -> int:
        """Replace the range (or everything, without a range); returns the offset after the new text."""
        return self.apply_change(text, start, end).cursor

    def apply_change(self, text: str, start: tuple[int, int] | None = None,
                     end: tuple[int, int] | None = None) -> Change:
        """Apply one content change; returns it in offsets of the text before it."""
        if start is None or end is None:
            old = self.text
            self._set_lines(split_lines(text))
            return _whole_change(old, text)
        if end < start:
            start, end = end, start
        a = self.offset_at(*start)
        b = self.offset_at(*end)
        self._replace(a, b, text)
        return Change(a, b, text)

    def _replace(self, a: int, b: int, text: str) -> None:
        """Re-split only the lines around [a, b): one line before and after too, so a "\\r" and a
        "\\n" meeting across the edit become one line break, as they are in the client's text."""
        n_lines = self.line_count
        first = max(0, self._find_offset(a)[0] - 1)
        last = min(n_lines - 1, self._find_offset(b)[0] + 1)
        b1, i1, region_start = self._find_line(first)
        b2, i2, _ = self._find_line(last)
        lines = [line for k in range(b1, b2 + 1) for line in self._blocks[k]]
        tail = len(self._blocks[b2]) - i2 - 1  # lines of block b2 after the region
        region = "".join(lines[i1: len(lines) - tail])
        new_lines = split_lines(region[: a - region_start] + text + region[b - region_start:])
        if last < n_lines - 1:
            new_lines.pop()  # the region ends with a line break; the next line is not part of it
        merged = lines[:i1] + new_lines + lines[len(lines) - tail:]
        if len(merged) <= 2 * BLOCK_LINES:
            pieces = [merged] if merged else []
        else:
            pieces = [merged[k:k + BLOCK_LINES] for k in range(0, len(merged), BLOCK_LINES)]
        self._blocks[b1:b2 + 1] = pieces
        self._chars[b1:b2 + 1] = [sum(map(len, p)) for p in pieces]


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


def _whole_change(old: str, new: str) -> Change:
    """A whole-document replacement as the smallest equivalent range edit."""
    prefix = _common_prefix(old, new, min(len(old), len(new)))
    suffix = _common_prefix(old[::-1], new[::-1], min(len(old), len(new)) - prefix)
    return Change(prefix, len(old) - suffix, new[prefix:len(new) - suffix])


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

    def __iter__(self):
        return iter(list(self._docs.values()))
