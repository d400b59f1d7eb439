"""Prometheus text exposition for the shared runtime, without a client library.

Why hand-rolled: the handful of series we export (TTFT, decode speed, prefix-cache reuse, queue
depth, requests by status) fits in one small module, and a dependency would be the only reason to
pull in `prometheus_client`. Generations are recorded through `Runtime.completion_listeners`, so
completions from the LSP and from HTTP land in the same histograms (labelled by `source`); gauges
(queue depth, cache stats, model state) are read at scrape time, so they are never stale.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence

from ..steering.generate import Completion
from .runtime import Runtime

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKENS_PER_S_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


class Histogram:
    """Cumulative-bucket histogram keyed by a label set (one series per label combination)."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = defaultdict(float)

    def observe(self, labels: Labels, value: float) -> None:
        counts = self._counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1  # +Inf
        self._sums[labels] += value

    def lines(self, name: str) -> Iterable[str]:
        for labels, counts in sorted(self._counts.items()):
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                le = "+Inf" if bound == math.inf else _number(bound)
                yield f"{name}_bucket{_labels((*labels, ('le', le)))} {count}"
            yield f"{name}_sum{_labels(labels)} {_number(self._sums[labels])}"
            yield f"{name}_count{_labels(labels)} {counts[-1]}"


class Metrics:
    """Everything `/metrics` reports. Thread-safe: completions arrive on the engine thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.decode_speed = Histogram(TOKENS_PER_S_BUCKETS)
        self.completions: dict[Labels, int] = defaultdict(int)
        self.tokens_generated: dict[Labels, int] = defaultdict(int)
        self.requests: dict[Labels, int] = defaultdict(int)
        self._attached: list[Runtime] = []

    # -- recording ------------------------------------------------------------------------------
    def attach(self, runtime: Runtime) -> None:
        """Listen to `runtime`'s finished generations (LSP and HTTP alike)."""
        runtime.completion_listeners.append(self.record_completion)
        self._attached.append(runtime)

    def detach(self) -> None:
        for runtime in self._attached:
            try:
                runtime.completion_listeners.remove(self.record_completion)
            except ValueError:
                pass
        self._attached.clear()

    def record_completion(self, completion: Completion, source: str) -> None:
        t = completion.timings
        src = (("source", source),)
        with self._lock:
            self.completions[(*src, ("stop_reason", completion.stop_reason))] += 1
            self.tokens_generated[src] += t.tokens_generated
            if t.tokens_generated > 0:  # a cancelled-before-start job has no first token
                self.ttft.observe(src, t.ttft_ms / 1000)
            if t.decode_tokens_per_s > 0:
                self.decode_speed.observe(src, t.decode_tokens_per_s)

    def record_request(self, method: str, route: str, status: int) -> None:
        with self._lock:
            self.requests[(("method", method), ("route", route), ("status", str(status)))] += 1

    # -- exposition -----------------------------------------------------------------------------
    def render(self, runtime: Runtime) -> str:
        """The Prometheus text format (version 0.0.4) for this process."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, lines: Iterable[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)

        with self._lock:
            family(
                "tinymorph_ttft_seconds",
                "histogram",
                "Time to first token, from queueing to the first sampled token.",
                list(self.ttft.lines("tinymorph_ttft_seconds")),
            )
            family(
                "tinymorph_decode_tokens_per_second",
                "histogram",
                "Decode speed of one generation (tokens after the first / decode time).",
                list(self.decode_speed.lines("tinymorph_decode_tokens_per_second")),
            )
            family(
                "tinymorph_completions_total",
                "counter",
                "Finished generations by source and stop reason.",
                _counter_lines("tinymorph_completions_total", self.completions),
            )
            family(
                "tinymorph_generated_tokens_total",
                "counter",
                "Tokens generated, by source.",
                _counter_lines("tinymorph_generated_tokens_total", self.tokens_generated),
            )
            family(
                "tinymorph_http_requests_total",
                "counter",
                "HTTP requests by method, route and status.",
                _counter_lines("tinymorph_http_requests_total", self.requests),
            )

        scheduler = runtime.scheduler
        family(
            "tinymorph_queue_depth",
            "gauge",
            "Jobs queued or running on the engine thread.",
            [f"tinymorph_queue_depth {scheduler.queue_depth()}"],
        )
        stats = scheduler.stats
        family(
            "tinymorph_scheduler_jobs_total",
            "counter",
            "Scheduler jobs by outcome.",
            [f'tinymorph_scheduler_jobs_total{{outcome="{k}"}} {v}' for k, v in sorted(vars(stats).items())],
        )
        family(
            "tinymorph_model_ready",
            "gauge",
            "1 when the model is loaded and serving.",
            [f"tinymorph_model_ready {1 if runtime.ready else 0}"],
        )

        engine = runtime.engine
        if engine is not None:
            cache = engine.caches.stats
            family(
                "tinymorph_prefix_cache_hit_ratio",
                "gauge",
                "Share of generations that reused at least one cached token.",
                [f"tinymorph_prefix_cache_hit_ratio {_number(cache.hit_ratio)}"],
            )
            family(
                "tinymorph_prefix_cache_token_reuse_ratio",
                "gauge",
                "Share of prompt tokens served from the prefix cache instead of prefilled.",
                [f"tinymorph_prefix_cache_token_reuse_ratio {_number(cache.token_reuse_ratio)}"],
            )
            family(
                "tinymorph_prefix_cache_lookups_total",
                "counter",
                "Prefix-cache lookups by result.",
                [
                    f'tinymorph_prefix_cache_lookups_total{{result="hit"}} {cache.hits}',
                    f'tinymorph_prefix_cache_lookups_total{{result="miss"}} {cache.misses}',
                ],
            )
            family(
                "tinymorph_prefix_cache_evictions_total",
                "counter",
                "Caches evicted to fit the budget.",
                [f"tinymorph_prefix_cache_evictions_total {cache.evictions}"],
            )
        return "\n".join(out) + "\n"


def _counter_lines(name: str, values: dict[Labels, int]) -> list[str]:
    return [f"{name}{_labels(labels)} {value}" for labels, value in sorted(values.items())]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value))
