"""Choosing the window of text before the cursor that the model sees.

A window that slid by one token per keystroke would change the first token of the prompt on every
keystroke and so invalidate the whole prefix cache. Instead the window's start only moves in big
quantized steps: it sits at a multiple of `stride` characters (snapped forward to a line or word
start), so it stays put for `stride` characters of typing, and every character typed in between
reuses the cache. When the window would overflow the token budget it jumps forward by whole
blocks of tokens, again rarely.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ContextWindow:
    start: int  # character offset of the window in the text before the cursor
    ids: list[int]
    truncated: bool  # True when text before `start` was left out


@dataclass(frozen=True)
class ContextPolicy:
    max_tokens: int = 1024  # token budget of the window
    stride_chars: int = 2048  # how far the start jumps when it moves
    chars_per_token_floor: float = 2.5  # conservative estimate: windows are at most this many chars/token
    block_tokens: int = 128  # granularity of token-level trimming when the estimate was wrong

    def max_chars(self) -> int:
        return int(self.max_tokens * self.chars_per_token_floor * 1.6)


def snap_forward(text: str, pos: int, limit: int = 200) -> int:
    """Move `pos` to just after the next newline (or space) so the window starts cleanly."""
    if pos <= 0:
        return 0
    newline = text.find("\n", pos, pos + limit)
    if newline != -1:
        return newline + 1
    space = text.find(" ", pos, pos + limit)
    return space + 1 if space != -1 else pos


def select_window(before: str, tokenize, policy: ContextPolicy) -> ContextWindow:
    """The token ids of a stable window ending at the cursor (`before` = text before the cursor)."""
    start = 0
    overflow = len(before) - policy.max_chars()
    if overflow > 0:
        start = snap_forward(before, -(-overflow // policy.stride_chars) * policy.stride_chars)
    ids = tokenize(before[start:])
    if len(ids) > policy.max_tokens:
        excess = len(ids) - policy.max_tokens
        drop = -(-excess // policy.block_tokens) * policy.block_tokens
        ids = ids[drop:]
        return ContextWindow(start, ids, True)
    return ContextWindow(start, ids, start > 0)
