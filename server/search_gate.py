"""One feature search at a time per editor, the newest first in line.

Why: VS Code's picker searches again as the user types (150 ms debounce) and a search that steers the
model takes ~4 s of both cores. Run side by side, the searches for "g", "ga", … "gardening" shared
the cores and the last answer came after 37 s (one search alone: 4 s). In a row, each search that a
newer one has overtaken skips its slow stages (`search_features(superseded=...)`) and answers from
the cheap signals in a fraction of a second; the client shows only the newest answer anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class SearchGate:
    """Runs searches one at a time; each learns whether a newer one has been asked for since."""

    def __init__(self) -> None:
        self._running = threading.Lock()
        self._count = threading.Lock()
        self._latest = 0

    def run(self, search: Callable[[Callable[[], bool]], T]) -> T:
        """`search(superseded)` once the searches asked for before it are done; `superseded()` is
        true as soon as another search has been asked for."""
        with self._count:
            self._latest += 1
            ticket = self._latest
        with self._running:
            return search(lambda: self._latest != ticket)
