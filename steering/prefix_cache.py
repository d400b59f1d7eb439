"""Per-document KV caches under one memory budget.

Each (document, steering plan) pair keeps the KV of the last sequence it ran — prompt plus the
tokens the model generated — so the next request only prefills what differs after the longest
common token prefix. That covers typing a character (a few new tokens) and typing exactly what the
model suggested (nothing new at all). Steered and unsteered states never mix because the plan's
digest is part of the key. Least recently used entries are evicted when the budget is exceeded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from .llama import KVCache

CacheKey = tuple[str, str]  # (document id, steering plan digest)


@dataclass
class CacheStats:
    hits: int = 0  # requests that reused at least one token
    misses: int = 0
    tokens_reused: int = 0
    tokens_prefilled: int = 0
    evictions: int = 0

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def token_reuse_ratio(self) -> float:
        total = self.tokens_reused + self.tokens_prefilled
        return self.tokens_reused / total if total else 0.0


class PrefixCache:
    """LRU map from (document, plan) to a `KVCache`, bounded by bytes."""

    def __init__(self, budget_bytes: int, new_cache):
        self.budget_bytes = budget_bytes
        self._new_cache = new_cache
        self._entries: OrderedDict[CacheKey, KVCache] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def checkout(self, key: CacheKey, ids: list[int], logits_after: int | None = None) -> tuple[KVCache, int]:
        """The cache for `key` truncated to its common prefix with `ids`, and that prefix length.

        At least one token is always left to run, so the caller gets fresh logits. `logits_after`:
        a prefix length whose next-token logits the caller needs too (token healing); the prefix
        is kept that long only if the cache holds them, else one more token is run.
        """
        with self._lock:
            cache = self._entries.pop(key, None)
            if cache is None:
                cache = self._new_cache()
            keep = max(0, min(cache.common_prefix(ids), len(ids) - 1))
            if logits_after is not None and keep >= logits_after and logits_after not in cache.logits_after:
                keep = max(0, logits_after - 1)
            cache.truncate(keep)
            self._entries[key] = cache
            if keep:
                self.stats.hits += 1
            else:
                self.stats.misses += 1
            self.stats.tokens_reused += keep
            self.stats.tokens_prefilled += len(ids) - keep
            return cache, keep

    def peek(self, key: CacheKey) -> KVCache | None:
        """The cache for `key` as it is (no truncation, no LRU update), for inspection."""
        with self._lock:
            return self._entries.get(key)

    def enforce_budget(self, keep: CacheKey | None = None) -> None:
        """Evict least recently used caches until the total fits (never the one in use)."""
        with self._lock:
            while self.total_bytes() > self.budget_bytes and len(self._entries) > 1:
                victim = next(k for k in self._entries if k != keep)
                del self._entries[victim]
                self.stats.evictions += 1

    def drop(self, document: str) -> None:
        """Forget every cache of a closed document."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == document]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def total_bytes(self) -> int:
        return sum(c.nbytes() for c in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
