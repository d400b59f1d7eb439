"""`tinymorph serve --ray`: the engine as a Ray Serve deployment behind the same HTTP API.

Every replica is what `tinymorph serve` is in one process: a `Runtime` (engine, scheduler, prefix
caches) with the FastAPI app of `http_api.create_app` in front, wrapped by `@serve.ingress`; Ray
Serve's proxy listens on HOST:PORT and routes each request to a replica. So the API, its
validation, its token and its errors are the same, and steering stays per request.

Document affinity: a request's prefix cache lives in one replica, so the requests of one document
must keep landing there. The remote engine sends the document id twice: as Ray Serve's session id
(`x-session-id`) and as its model-multiplexing key (`serve_multiplexed_model_id`). Two routers:

- `hash` (default): Ray Serve's consistent-hash request router over the session id. A document's
  replica is a function of its id and the replica set, the same in every proxy from the first
  request on; scaling moves only the documents of the replicas that came or went.
- `multiplex`: Serve's default router with model multiplexing. Each replica registers the documents
  it serves (the `@serve.multiplexed` loader below) and the router prefers the replica that
  reports a document, new documents going to the replica holding the fewest (better balance), but
  a document's next request can race the report and land elsewhere (measured: docs/scaling.md).

Either way every replica keeps an LRU of its documents through the multiplexed loader (the "model"
is a lease on the document's caches, dropped with them), and every answer names its replica
(`x-tinymorph-replica`), so affinity can be measured from outside (tests/test_ray_serve.py).

Health: Serve calls `check_health` (a failed engine restarts the replica); `/healthz` answers for
the replica it reaches. Metrics: each replica pushes a snapshot (its Prometheus text and cache and
scheduler counters) to a small named actor every second; `/metrics` on any replica serves all
replicas' series with a `replica` label plus `tinymorph_cluster_*` aggregates, `/v1/cluster` the
same as JSON. Scale-down drains: a replica that Serve stops gets no new requests and finishes the
streams it has (graceful_shutdown_timeout_s) before it goes.

Deployed like `serve run config.yaml` (a declarative config whose `import_path` is `build_app`),
so changing `num_replicas` later is a light update (no restart of the other replicas), and the same
config runs on a multi-node cluster (docs/scaling.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from ray import serve

from .addresses import is_loopback
from .http_api import create_app
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .runtime import ModelSettings, Runtime

log = logging.getLogger(__name__)

APP_NAME = "tinymorph"
DEPLOYMENT_NAME = "TinymorphReplica"
NAMESPACE = "tinymorph"
STATS_ACTOR = "tinymorph-replica-stats"
MULTIPLEX_HEADER = b"serve_multiplexed_model_id"
HASH_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
ROUTERS = ("hash", "multiplex")
REPLICA_HEADER = b"x-tinymorph-replica"
DOCUMENTS_PER_REPLICA = 512  # documents a replica keeps registered (and cached) before its LRU drops one
PUSH_EVERY_S = 1.0
STALE_AFTER_S = 15.0  # a replica that has not reported for this long is gone (killed, not drained)


@dataclass
class ReplicaOptions(ModelSettings):
    """What every replica loads (the model settings) and how it serves (JSON, so it can travel in a
    Serve config)."""

    token: str | None = None
    check_host: bool = False  # loopback proxy without a token: answer only Host headers naming loopback
    loopback: bool = True  # served on loopback: nothing of a replica listens beyond it


@dataclass
class ScaleOptions:
    """How many replicas, with what resources, and how they leave."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas: Serve's autoscaler decides
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    max_ongoing_requests: int = 64  # a replica's own scheduler queues; Serve must not bounce requests
    graceful_shutdown_timeout_s: float = 30.0
    graceful_shutdown_wait_loop_s: float = 1.0
    health_check_period_s: float = 5.0
    target_ongoing_requests: float = 4.0  # autoscaling: streams per replica before another one is added
    downscale_delay_s: float = 60.0
    router: str = "hash"  # how a document finds its replica: "hash" (session id) or "multiplex"


# -- per-replica statistics, shared through one small actor ---------------------------------------------


@ray.remote(num_cpus=0)
class ReplicaStats:
    """The latest snapshot of every replica (what `/metrics` and `/v1/cluster` aggregate)."""

    def __init__(self) -> None:
        self.snapshots: dict[str, dict[str, Any]] = {}

    def report(self, replica: str, snapshot: dict[str, Any]) -> None:
        self.snapshots[replica] = snapshot

    def drop(self, replica: str) -> None:
        self.snapshots.pop(replica, None)

    def all(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        self.snapshots = {r: s for r, s in self.snapshots.items() if now - s.get("at", now) < STALE_AFTER_S}
        return dict(self.snapshots)


def stats_actor():
    return ReplicaStats.options(name=STATS_ACTOR, namespace=NAMESPACE, get_if_exists=True,
                                lifetime="detached").remote()


def cluster_summary(snapshots: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Totals over replicas; ratios from summed counts (not averages of ratios)."""
    hits = sum(s["cache"]["hits"] for s in snapshots.values())
    misses = sum(s["cache"]["misses"] for s in snapshots.values())
    reused = sum(s["cache"]["tokens_reused"] for s in snapshots.values())
    prefilled = sum(s["cache"]["tokens_prefilled"] for s in snapshots.values())
    return {
        "replicas": len(snapshots),
        "ready": sum(1 for s in snapshots.values() if s["state"] == "ready"),
        "requests": sum(s["requests"] for s in snapshots.values()),
        "documents": sum(s["documents"] for s in snapshots.values()),
        "queue_depth": sum(s["queue_depth"] for s in snapshots.values()),
        "cache_hits": hits, "cache_misses": misses,
        "cache_hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
        "token_reuse_ratio": reused / (reused + prefilled) if reused + prefilled else 0.0,
    }


def render_cluster_metrics(snapshots: dict[str, dict[str, Any]]) -> bytes:
    """Every replica's Prometheus series with a `replica` label, plus `tinymorph_cluster_*` totals."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for replica, snap in sorted(snapshots.items()):
        for family in text_string_to_metric_families(snap.get("metrics", "")):
            if family.name.endswith("_created"):  # per-process creation times: nothing to aggregate
                continue
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value)
    summary = cluster_summary(snapshots)
    extra = [
        GaugeMetricFamily("tinymorph_cluster_replicas", "Replicas reporting.", value=summary["replicas"]),
        GaugeMetricFamily("tinymorph_cluster_replicas_ready", "Replicas with a loaded model.", value=summary["ready"]),
        GaugeMetricFamily("tinymorph_cluster_prefix_cache_hit_ratio",
                          "Share of generations on any replica that reused cached tokens.",
                          value=summary["cache_hit_ratio"]),
        GaugeMetricFamily("tinymorph_cluster_prefix_cache_token_reuse_ratio",
                          "Share of prompt tokens on any replica served from a prefix cache.",
                          value=summary["token_reuse_ratio"]),
        GaugeMetricFamily("tinymorph_cluster_documents", "Documents registered on the replicas.",
                          value=summary["documents"]),
    ]
    replica_requests = GaugeMetricFamily("tinymorph_replica_completion_requests",
                                         "Completion requests a replica answered.", labels=["replica"])
    for replica, snap in sorted(snapshots.items()):
        replica_requests.add_metric([replica], snap["requests"])
    extra.append(replica_requests)

    class Snapshot:
        def collect(self):
            yield from families.values()
            yield from extra

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry)


# -- the replica ---------------------------------------------------------------------------------------


class DocumentLease:
    """What the multiplexed loader hands out for a document: dropping it drops the document's caches."""

    def __init__(self, runtime: Runtime, document: str):
        self.runtime, self.document = runtime, document

    def __del__(self) -> None:
        from .http_completions import DOCUMENT_PREFIX

        engine = self.runtime.engine
        if engine is not None:
            engine.forget(DOCUMENT_PREFIX + self.document)


@dataclass
class _Counters:
    requests: int = 0
    documents: set[str] = field(default_factory=set)


@serve.deployment(name=DEPLOYMENT_NAME, max_constructor_retry_count=3)
@serve.ingress()
class TinymorphReplica:
    """One engine and its HTTP API; Serve runs as many as configured."""

    def __init__(self, options: dict[str, Any]):
        self.options = ReplicaOptions(**options)
        o = self.options
        if o.loopback:
            _bind_internal_grpc_to_loopback()
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.runtime = Runtime()
        self.runtime.load(o)
        if not self.runtime.wait_ready() or self.runtime.engine is None:
            message = self.runtime.message
            self.runtime.scheduler.stop()
            raise RuntimeError(f"replica {self.replica}: {message}")  # Serve retries, then reports DEPLOY_FAILED
        self.metrics = Metrics()
        self.counters = _Counters()
        self.stats = stats_actor()
        self._stop = threading.Event()
        self._pusher = threading.Thread(target=self._push_loop, name="tinymorph-replica-stats", daemon=True)
        self._pusher.start()
        log.info("replica %s ready: %s", self.replica, self.runtime.message)

    def __serve_build_asgi_app__(self):
        """The tinymorph API of this replica, with the cluster's `/metrics` and `/v1/cluster`."""
        o = self.options
        app = create_app(self.runtime, o.token, check_host=o.check_host, metrics_=self.metrics)
        app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/metrics"]

        @app.get("/metrics", include_in_schema=False)
        async def metrics():
            from fastapi.responses import Response

            return Response(render_cluster_metrics(await self._snapshots()),
                            headers={"Content-Type": METRICS_CONTENT_TYPE})

        @app.get("/v1/cluster", include_in_schema=False)
        async def cluster() -> dict[str, Any]:
            snapshots = await self._snapshots()
            replicas = [{k: v for k, v in s.items() if k != "metrics"} for s in snapshots.values()]
            return {"replica": self.replica, "replicas": sorted(replicas, key=lambda s: s["replica"]),
                    "total": cluster_summary(snapshots)}

        return _ReplicaAsgi(app, self)

    @serve.multiplexed(max_num_models_per_replica=DOCUMENTS_PER_REPLICA)
    async def document(self, document: str) -> DocumentLease:
        """Register `document` on this replica (Serve's router then sends its requests here)."""
        self.counters.documents.add(document)
        return _Lease(self, document)

    def check_health(self) -> None:
        if self.runtime.state != "ready":
            raise RuntimeError(f"engine {self.runtime.state}: {self.runtime.message}")

    def __del__(self) -> None:
        """Serve drained this replica (scale-down, redeploy, shutdown): stop reporting, stop the engine."""
        stop = getattr(self, "_stop", None)
        if stop is None:
            return
        stop.set()
        try:
            self.stats.drop.remote(self.replica)
        except Exception:  # noqa: BLE001 - the cluster is going away too
            pass
        self.runtime.scheduler.stop()

    # -- statistics -------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        engine = self.runtime.engine
        cache = engine.caches.stats if engine is not None else None
        return {
            "replica": self.replica, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "state": self.runtime.state, "model": engine.info.model if engine is not None else self.options.model,
            "requests": self.counters.requests, "documents": len(self.counters.documents),
            "queue_depth": self.runtime.scheduler.queue_depth(),
            "scheduler": asdict(self.runtime.scheduler.stats),
            "cache": {
                "hits": cache.hits if cache else 0, "misses": cache.misses if cache else 0,
                "tokens_reused": cache.tokens_reused if cache else 0,
                "tokens_prefilled": cache.tokens_prefilled if cache else 0,
                "evictions": cache.evictions if cache else 0,
                "hit_ratio": cache.hit_ratio if cache else 0.0,
                "entries": len(engine.caches) if engine is not None else 0,
            },
            "metrics": self.metrics.render().decode(), "at": time.time(),
        }

    async def _snapshots(self) -> dict[str, dict[str, Any]]:
        snapshots = await self.stats.all.remote()
        snapshots[self.replica] = self.snapshot()  # this replica's own numbers are never stale
        return snapshots

    def _push_loop(self) -> None:
        while not self._stop.wait(PUSH_EVERY_S):
            try:
                self.stats.report.remote(self.replica, self.snapshot())
            except Exception:  # noqa: BLE001 - statistics must never take a replica down
                log.debug("replica stats not pushed", exc_info=True)


def _bind_internal_grpc_to_loopback() -> None:
    """Ray Serve 2.60 starts each replica's inter-deployment gRPC server on `[::]:0` (hard-coded in
    ray/serve/_private/replica.py, after the constructor); a deployment served on loopback keeps
    it on loopback too (this project's rule: nothing it starts listens beyond loopback unasked)."""
    from ray.serve._private import replica as serve_replica

    original = serve_replica.add_port_to_grpc_server
    if getattr(original, "loopback_only", False):
        return

    def loopback(server, address: str):
        return original(server, "127.0.0.1:0" if address == "[::]:0" else address)

    loopback.loopback_only = True  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = loopback


class _Lease(DocumentLease):
    def __init__(self, replica: TinymorphReplica, document: str):
        super().__init__(replica.runtime, document)
        self.counters = replica.counters

    def __del__(self) -> None:
        self.counters.documents.discard(self.document)
        super().__del__()


class _ReplicaAsgi:
    """Registers a completion's document with the multiplexed loader, counts it, and names the
    replica in every answer (`x-tinymorph-replica`), before the tinymorph app sees the request."""

    def __init__(self, app, replica: TinymorphReplica):
        self.app, self.replica = app, replica
        self.name = replica.replica.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/v1/completions" and scope["method"] == "POST":
            self.replica.counters.requests += 1
            document = dict(scope["headers"]).get(MULTIPLEX_HEADER)
            if document:
                await self.replica.document(document.decode("utf-8", "replace"))

        async def named(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.name)]}
            await send(message)

        await self.app(scope, receive, named)


def build_app(args: dict[str, Any]):
    """The Serve application (the `import_path` of the config): one deployment of replicas."""
    return TinymorphReplica.bind(asdict(ReplicaOptions(**args)))


# -- deploying -------------------------------------------------------------------------------------------


def serve_config(options: ReplicaOptions, scale: ScaleOptions, host: str, port: int) -> dict[str, Any]:
    """The declarative Serve config (what `serve deploy` takes) for this deployment."""
    deployment: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": scale.max_ongoing_requests,
        "graceful_shutdown_timeout_s": scale.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": scale.graceful_shutdown_wait_loop_s,
        "health_check_period_s": scale.health_check_period_s,
        "ray_actor_options": {"num_cpus": scale.replica_cpus, "num_gpus": scale.replica_gpus},
    }
    if scale.router == "hash":  # one fallback replica, only when the document's own one refuses (full queue)
        deployment["request_router_config"] = {
            "request_router_class": HASH_ROUTER,
            "request_router_kwargs": {"num_virtual_nodes": 100, "num_fallback_replicas": 1},
        }
    if scale.autoscale is not None:
        lo, hi = scale.autoscale
        deployment["autoscaling_config"] = {
            "min_replicas": lo, "initial_replicas": lo, "max_replicas": hi,
            "target_ongoing_requests": scale.target_ongoing_requests,
            "downscale_delay_s": scale.downscale_delay_s, "upscale_delay_s": 5.0,
        }
    else:
        deployment["num_replicas"] = scale.replicas
    return {
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": f"{__name__}:build_app",
            "args": asdict(options), "deployments": [deployment],
        }],
    }


def replica_options(settings: ModelSettings, token: str | None, host: str, replica_cpus: float) -> ReplicaOptions:
    """Options for replicas serving on `host`; torch threads default to the replica's whole CPUs."""
    threads = settings.threads or max(1, int(replica_cpus))
    return ReplicaOptions(**{**asdict(settings), "threads": threads}, token=token,
                          check_host=is_loopback(host) and not token, loopback=is_loopback(host))


def deploy(config: dict[str, Any], timeout_s: float = 600.0, progress=None) -> None:
    """Apply `config` to the connected Ray cluster and wait until the app runs (or failed).

    Like `serve run config.yaml`; a second call with other replica counts is a light update
    (Serve drains the replicas it removes)."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    stats_actor()  # before any replica needs it
    client = serve_start(http_options=config["http_options"])
    before = serve.status().applications.get(APP_NAME)
    deployed_before = before.last_deployed_time_s if before is not None else None
    client.deploy_apps(schema, _blocking=False)
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        app = serve.status().applications.get(APP_NAME)
        status = str(app.status.value if app is not None else "NOT_STARTED")
        if status == "RUNNING" and app.last_deployed_time_s != deployed_before:  # this config, not the last
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            reasons = [_last_line(d.message) for d in app.deployments.values() if d.message]
            raise RuntimeError(f"the replicas could not start ({status}): {'; '.join(reasons) or app.message}")
        if progress is not None and status != last:
            progress(f"Ray Serve: {status.lower()}", None)
        last = status
        if time.monotonic() > deadline:
            raise RuntimeError(f"the deployment is not running after {timeout_s:g} s (status {status})")
        time.sleep(0.5)


def _last_line(message: str) -> str:
    """The reason at the end of Serve's message (the replica's exception), without the traceback."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else message
    return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith(("Error", "Exception")) else last


def undeploy() -> None:
    """Delete the app and the statistics actor (the cluster itself stays)."""
    try:
        serve.delete(APP_NAME)
    except Exception:  # noqa: BLE001 - already gone
        log.debug("serve.delete failed", exc_info=True)
    try:
        ray.kill(ray.get_actor(STATS_ACTOR, namespace=NAMESPACE))
    except Exception:  # noqa: BLE001
        pass
