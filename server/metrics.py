"""Prometheus metrics for the shared runtime, on `prometheus_client`.

Each `Metrics` owns its own `CollectorRegistry` (never the process-global one), so two runtimes in
one process (tests, or an LSP plus a `serve`) each export their own series without clashing.
Generations are recorded through `Runtime.completion_listeners`, so completions from the LSP and
from HTTP land in the same histograms (labelled by `source`); queue depth, cache stats and model
state are read at scrape time by a custom collector, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..steering.generate import Completion
from .runtime import Runtime

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKENS_PER_S_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class RuntimeCollector(Collector):
    """Scrape-time gauges and counters read from the runtime (queue, scheduler, prefix cache)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        scheduler = runtime.scheduler
        yield GaugeMetricFamily(
            "tinymorph_queue_depth", "Jobs queued or running on the engine thread.", value=scheduler.queue_depth()
        )
        jobs = CounterMetricFamily("tinymorph_scheduler_jobs", "Scheduler jobs by outcome.", labels=["outcome"])
        for outcome, count in sorted(vars(scheduler.stats).items()):
            jobs.add_metric([outcome], count)
        yield jobs
        yield GaugeMetricFamily(
            "tinymorph_model_ready", "1 when the model is loaded and serving.", value=1 if runtime.ready else 0
        )
        engine = runtime.engine
        if engine is None:
            return
        cache = engine.caches.stats
        yield GaugeMetricFamily(
            "tinymorph_prefix_cache_hit_ratio",
            "Share of generations that reused at least one cached token.",
            value=cache.hit_ratio,
        )
        yield GaugeMetricFamily(
            "tinymorph_prefix_cache_token_reuse_ratio",
            "Share of prompt tokens served from the prefix cache instead of prefilled.",
            value=cache.token_reuse_ratio,
        )
        lookups = CounterMetricFamily(
            "tinymorph_prefix_cache_lookups", "Prefix-cache lookups by result.", labels=["result"]
        )
        lookups.add_metric(["hit"], cache.hits)
        lookups.add_metric(["miss"], cache.misses)
        yield lookups
        yield CounterMetricFamily(
            "tinymorph_prefix_cache_evictions", "Caches evicted to fit the budget.", value=cache.evictions
        )


class Metrics:
    """Everything `/metrics` reports for one runtime. Thread-safe (prometheus_client is)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram(
            "tinymorph_ttft_seconds",
            "Time to first token, from queueing to the first sampled token.",
            ["source"],
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.decode_speed = Histogram(
            "tinymorph_decode_tokens_per_second",
            "Decode speed of one generation (tokens after the first / decode time).",
            ["source"],
            buckets=TOKENS_PER_S_BUCKETS,
            registry=self.registry,
        )
        self.completions = Counter(
            "tinymorph_completions",
            "Finished generations by source and stop reason.",
            ["source", "stop_reason"],
            registry=self.registry,
        )
        self.tokens_generated = Counter(
            "tinymorph_generated_tokens", "Tokens generated, by source.", ["source"], registry=self.registry
        )
        self.requests = Counter(
            "tinymorph_http_requests",
            "HTTP requests by method, route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self._attached: list[tuple[Runtime, RuntimeCollector]] = []

    def attach(self, runtime: Runtime) -> None:
        """Listen to `runtime`'s finished generations (LSP and HTTP alike) and export its state."""
        collector = RuntimeCollector(runtime)
        self.registry.register(collector)
        runtime.completion_listeners.append(self.record_completion)
        self._attached.append((runtime, collector))

    def detach(self) -> None:
        for runtime, collector in self._attached:
            try:
                runtime.completion_listeners.remove(self.record_completion)
            except ValueError:
                pass
            self.registry.unregister(collector)
        self._attached.clear()

    def record_completion(self, completion: Completion, source: str) -> None:
        t = completion.timings
        self.completions.labels(source, completion.stop_reason).inc()
        self.tokens_generated.labels(source).inc(t.tokens_generated)
        if t.tokens_generated > 0:  # a cancelled-before-start job has no first token
            self.ttft.labels(source).observe(t.ttft_ms / 1000)
        if t.decode_tokens_per_s > 0:
            self.decode_speed.labels(source).observe(t.decode_tokens_per_s)

    def record_request(self, method: str, route: str, status: int) -> None:
        self.requests.labels(method, route, str(status)).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
