"""`tinymorph serve --ray`: the engine as a Ray Serve deployment, tested on a real local Ray cluster.

One `tinymorph serve --ray --replicas 2 --replica-cpus 0.5` subprocess starts a Ray cluster on
127.0.0.1 (2 CPUs) with two replicas of the tiny random Llama. Against it: the key LSP tests through
`tinymorph lsp --engine`, health and the cluster's metrics, a typing run over several documents
that must spread over both replicas while every document stays on one (its prefix cache), and a
scale-down to one replica (`--detach` on the same cluster) that must let running streams finish,
after which the cache hit ratio of the same typing run is compared with two replicas' (the goal:
two replicas within 10 % of one). The numbers are printed (`pytest -s`).

Skipped only when the `cluster` extra (ray[serve]) is not installed; CI installs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from pytest_lsp import LanguageClient
from test_lsp import (  # noqa: F401 - the imported tests run here again, against this module's `client`
    SERVER_ENV,
    TINYMORPH,
    command,
    test_burst_of_edits_is_bounded_and_never_stale,
    test_hint_after_edit_streams_with_refresh_and_metrics,
    test_inline_completion_waits_for_the_running_generation,
    test_steering_commands,
    test_typed_ahead_reuses_the_suggestion,
)
from test_remote_engine import (  # noqa: F401 - `workspace` is a fixture, the test runs here again
    OPTIONS,
    TOKEN,
    EngineProcess,
    close,
    free_port,
    lsp_client,
    test_steering_is_applied_per_request,
    test_ttft_is_split_into_engine_and_network,
    workspace,
)

pytest.importorskip("ray.serve", reason="the `cluster` extra (pip install 'tinymorph[cluster]') is not installed")

pytestmark = pytest.mark.asyncio(loop_scope="module")

START_TIMEOUT_S = 240.0  # a Ray cluster and two replicas on two busy cores
MULTIPLEX = "serve_multiplexed_model_id"
PROSE = [
    "The harbour was quiet that morning, and the fishing boats lay still on the grey water",
    "She counted the steps twice before she opened the door to the attic and went in",
    "Nobody in the village remembered when the old mill had last turned its wheel",
    "Rain came in from the west and the roads to the valley were closed by noon",
]


# -- the cluster ---------------------------------------------------------------------------------------


class RayEngine(EngineProcess):
    gcs: str
    port: int
    env: dict[str, str]
    temp: str
    args: tuple[str, ...]
    cwd: Path


def _ray_args(tiny_model_dir) -> tuple[str, ...]:
    return ("--ray", "--replica-cpus", "0.5", "--model", str(tiny_model_dir), "--dtype", "float32",
            "--threads", "1", "--token", TOKEN)


def _kill_leftovers(temp: str) -> list[int]:
    """Processes of this test's Ray session (their command lines name its temp dir), by pid."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if temp.encode() in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except ProcessLookupError:
                pass
    return killed


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ray_engine(tiny_model_dir, workspace):  # noqa: F811 - the imported fixture
    temp = tempfile.mkdtemp(prefix="tmray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**SERVER_ENV, "RAY_TMPDIR": temp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    port = free_port()
    args = _ray_args(tiny_model_dir)
    started = time.monotonic()
    proc = await EngineProcess.start(*args, "--replicas", "2", "--ray-cpus", "2", port=port, cwd=workspace,
                                     env=env, timeout=START_TIMEOUT_S, sigint_ignored=True)
    engine = RayEngine(proc.proc, proc.url, proc.lines, proc.drain)
    try:
        engine.gcs = next(line.split("Ray cluster at ")[1].strip() for line in engine.lines
                          if "Ray cluster at " in line)
        engine.port, engine.env, engine.temp, engine.args, engine.cwd = port, env, temp, args, workspace
        await engine.ready(START_TIMEOUT_S)
        print(f"\nRay cluster with 2 replicas serving after {time.monotonic() - started:.1f} s")
        yield engine
    finally:
        # started as a script's background job (SIGINT inherited ignored): `kill -INT` must still stop it
        stopped = await engine.stop(timeout=60)
        leftovers = _kill_leftovers(temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert stopped, "`tinymorph serve --ray` did not stop within 60 s of SIGINT (killed)"
        assert not leftovers, f"Ray processes outlived `tinymorph serve --ray`: {leftovers}"


async def rescale(engine: RayEngine, replicas: int) -> float:
    """`tinymorph serve --ray --ray-address … --replicas N --detach`: the same deployment, resized."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        TINYMORPH, "serve", "--port", str(engine.port), *engine.args, "--replicas", str(replicas),
        "--ray-address", engine.gcs, "--detach", cwd=engine.cwd, env=engine.env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return time.monotonic() - started


def http(engine: EngineProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=engine.url, headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=httpx.Timeout(60, connect=5))


async def cluster(engine: EngineProcess) -> dict:
    async with http(engine) as h:
        response = await h.get("/v1/cluster")
    assert response.status_code == 200, response.text
    return response.json()


async def stream(h: httpx.AsyncClient, document: str, prompt: str, max_tokens: int = 4,
                 read_delay: float = 0.0) -> dict:
    """One streamed completion of `document`, as `lsp --engine` sends it; what came back."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "document": document,
            "stop_rule": "none", "repetition_penalty": 1.0}
    chunks, done, final = 0, False, None
    headers = {MULTIPLEX: document, "x-session-id": document}  # what `lsp --engine` sends
    async with h.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        replica = response.headers["x-tinymorph-replica"]
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            chunks += 1
            if chunk["choices"][0]["finish_reason"] is not None:
                final = chunk["tinymorph"]
            if read_delay:
                await asyncio.sleep(read_delay)
    return {"document": document, "replica": replica, "done": done, "final": final, "chunks": chunks}


async def typing_run(engine: EngineProcess, tag: str, documents: int = 8, keystrokes: int = 10,
                     writers: int = 4) -> dict:
    """`writers` people type into `documents` documents (each switching between its documents every
    keystroke); every keystroke is one streamed completion of that document."""
    texts = {f"{tag}-doc{i}": f"{i}. {PROSE[i % len(PROSE)]}" for i in range(documents)}
    names = list(texts)
    results: list[dict] = []

    async def writer(mine: list[str]) -> None:
        async with http(engine) as h:
            for k in range(keystrokes):
                for name in mine:
                    text = texts[name]
                    results.append(await stream(h, name, text[: len(text) - keystrokes + k + 1]))

    started = time.monotonic()
    await asyncio.gather(*(writer(names[w::writers]) for w in range(writers)))
    seconds = time.monotonic() - started
    replicas = defaultdict(list)
    for r in results:
        replicas[r["document"]].append(r["replica"])
    kept = sum(1 for seen in replicas.values() for replica in seen[1:] if replica == seen[0])
    follow_ups = sum(len(seen) - 1 for seen in replicas.values())
    hits = sum(1 for r in results if r["final"]["timings"]["tokens_reused"] > 0)
    return {
        "requests": len(results), "seconds": round(seconds, 2),
        "per_replica": dict(Counter(r["replica"] for r in results)),
        "documents_per_replica": dict(Counter(seen[0] for seen in replicas.values())),
        "affinity": kept / follow_ups, "hit_ratio": hits / len(results),
        "split": {d: sorted(set(seen)) for d, seen in replicas.items() if len(set(seen)) > 1},
    }


# -- the LSP through --engine ----------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(ray_engine, workspace):  # noqa: F811 - the imported fixture
    c = await lsp_client("--engine", ray_engine.url, "--token", TOKEN, workspace=workspace, options=OPTIONS)
    c.engine_kind = "ray"  # type: ignore[attr-defined]
    yield c
    await close(c)


@pytest.fixture
def remote(client):
    """The TTFT test's client: here the LSP on the Ray deployment (the network part includes the proxy)."""
    return client


# -- the deployment itself -------------------------------------------------------------------------------


async def test_health_and_metrics_per_replica_and_aggregated(ray_engine):
    async with http(ray_engine) as h:
        assert (await h.get("/healthz")).status_code == 200
        assert (await h.get("/v1/models")).json()["data"][0]["ready"] is True
        assert (await h.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
        for i in range(16):  # some traffic so every replica has series (16 documents: both get some)
            await stream(h, f"metrics-doc{i}", "Metrics for everyone")
    deadline = time.monotonic() + 20
    while True:  # replicas report every second
        state = await cluster(ray_engine)
        if state["total"]["replicas"] == 2 and state["total"]["requests"] >= 16:
            break
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.5)
    assert state["total"]["ready"] == 2 and {r["state"] for r in state["replicas"]} == {"ready"}
    async with http(ray_engine) as h:
        text = (await h.get("/metrics")).text
    names = {r["replica"] for r in state["replicas"]}
    for name in names:
        assert f'tinymorph_model_ready{{replica="{name}"}} 1.0' in text
    assert "tinymorph_cluster_replicas 2.0" in text
    assert "tinymorph_cluster_prefix_cache_hit_ratio" in text
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    served = {r["replica"] for r in state["replicas"] if r["requests"]}
    assert served == names, state  # the documents spread over both replicas
    for name in served:  # each replica's own series, labelled with it
        assert any(s.name == "tinymorph_http_requests_total" and s.labels.get("replica") == name
                   and s.labels.get("route") == "/v1/completions" for s in samples), name
        assert any(s.name == "tinymorph_replica_completion_requests" and s.labels == {"replica": name}
                   and s.value >= 1 for s in samples), name


async def test_typing_run_spreads_documents_and_keeps_each_on_its_replica(ray_engine):
    run = await typing_run(ray_engine, "spread", documents=16, keystrokes=6)
    print(f"\n2 replicas, typing run: {run}")
    assert len(run["per_replica"]) == 2, run  # both replicas served: documents spread over them
    assert run["affinity"] == 1.0 and not run["split"], run  # every document stayed on its replica
    assert run["hit_ratio"] >= 0.8, run  # 5 of 6 keystrokes of a document reuse its cache


async def test_scale_down_drains_streams_and_one_replica_matches_two(ray_engine):
    """Streams running on both replicas when the deployment shrinks to one finish in full; then the
    hit ratio of the typing run on one replica is compared with two replicas'."""
    two = await typing_run(ray_engine, "two")
    async with http(ray_engine) as h:
        placed: dict[str, str] = {}
        for i in range(24):  # one document on each replica
            r = await stream(h, f"drain-doc{i}", "Placed")
            placed.setdefault(r["replica"], r["document"])
            if len(placed) == 2:
                break
        assert len(placed) == 2, placed

        async def long_story(document: str) -> dict:
            async with http(ray_engine) as own:
                return await stream(own, document, "Placed and then a long, long story", max_tokens=300,
                                    read_delay=0.01)

        long = [asyncio.ensure_future(long_story(doc)) for doc in placed.values()]
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in long), "streams ended before the scale-down began"
        rescale_s = await rescale(ray_engine, 1)
        finished = await asyncio.wait_for(asyncio.gather(*long), 120)
    for r in finished:  # drained, not cut: every stream ended normally with its last chunk and [DONE]
        assert r["done"] and r["final"] is not None, r
        assert r["final"]["stop_reason"] != "cancelled", r
        assert r["chunks"] >= r["final"]["timings"]["tokens_generated"] > 0, r
    deadline = time.monotonic() + 60
    while (state := await cluster(ray_engine))["total"]["replicas"] != 1:
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.5)
    one = await typing_run(ray_engine, "one")
    print(f"\nrescaled to 1 replica in {rescale_s:.1f} s; stream tokens during the drain: "
          f"{[r['final']['timings']['tokens_generated'] for r in finished]}")
    print(f"cache hit ratio: 1 replica {one['hit_ratio']:.3f}, 2 replicas {two['hit_ratio']:.3f} "
          f"(affinity with 2: {two['affinity']:.3f}); requests per replica with 2: {two['per_replica']}")
    assert len(one["per_replica"]) == 1
    assert two["hit_ratio"] >= 0.9 * one["hit_ratio"], (one, two)


async def test_scale_flags_are_checked():
    import subprocess

    for args, message in ((["--replicas", "2"], "only with --ray"),
                          (["--ray", "--autoscale", "3:1"], "MIN:MAX"),
                          (["--ray", "--detach"], "--detach needs --ray-address"),
                          (["--ray", "--replicas", "0"], "at least 1")):
        done = subprocess.run([TINYMORPH, "serve", *args], env=SERVER_ENV, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode != 0 and message in done.stderr, (args, done.stderr[-500:])


async def test_autoscale_config_is_ray_serves():
    from tinymorph.server import ray_serve

    config = ray_serve.serve_config(ray_serve.ReplicaOptions(), ray_serve.ScaleOptions(autoscale=(1, 4)),
                                    "127.0.0.1", 8000)
    from ray.serve.schema import ServeDeploySchema

    deployment = ServeDeploySchema.model_validate(config).applications[0].deployments[0]
    assert deployment.request_router_config["request_router_class"] == ray_serve.HASH_ROUTER
    assert deployment.autoscaling_config["min_replicas"] == 1
    assert deployment.autoscaling_config["max_replicas"] == 4
    assert deployment.graceful_shutdown_timeout_s == 30.0
    assert "num_replicas" not in config["applications"][0]["deployments"][0]


async def test_status_names_the_remote_engine(client: LanguageClient, ray_engine):
    st = await command(client, "tinymorph.status")
    assert st["state"] == "ready" and ray_engine.url in st["message"], st


async def test_a_model_that_cannot_load_is_one_clear_error():
    """Replicas that cannot load their model: Serve retries them, then the command says why in one
    line (exit 2) and its local cluster is gone."""
    temp = tempfile.mkdtemp(prefix="tmray-", dir="/tmp")
    env = {**SERVER_ENV, "RAY_TMPDIR": temp}
    proc = await asyncio.create_subprocess_exec(
        TINYMORPH, "serve", "--ray", "--replica-cpus", "0.5", "--ray-cpus", "2", "--port", str(free_port()),
        "--model", "/nonexistent/model", "--quiet", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), START_TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        leftovers = _kill_leftovers(temp)
        shutil.rmtree(temp, ignore_errors=True)
    errors = [line for line in err.decode(errors="replace").splitlines() if line.startswith("tinymorph: error:")]
    assert proc.returncode == 2 and len(errors) == 1, err.decode(errors="replace")[-3000:]
    assert "could not start" in errors[0] and "/nonexistent/model" in errors[0] and "Traceback" not in errors[0]
    assert not leftovers, leftovers
