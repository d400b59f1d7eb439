"""50 concurrent streaming clients on loopback for a bounded time, with editor work mixed in.

What must hold under load: no crash and no lost or failed request, every client served (round robin
among HTTP jobs, nobody starved), the queue drains afterwards, and the editor's priority path stays
fast: an editor job submitted while 50 streams run finishes in a fraction of an HTTP stream's TTFT.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:  # the client subprocess runs this file too: it must not pay for importing torch
    from tinymorph.server.runtime import Runtime

CLIENTS = 50
DURATION_S = 15.0
MAX_REQUESTS_PER_CLIENT = 200  # bound the loops even if generation were instant
EDITOR_EVERY_S = 0.4


@pytest.fixture(scope="module")
def runtime(tiny_runtime):
    return tiny_runtime


@pytest.fixture(scope="module")
def server(tiny_http_server):
    return tiny_http_server


@dataclass
class ClientLog:
    ttft_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started: int = 0


async def stream_once(client: httpx.AsyncClient, prompt: str, log: ClientLog) -> None:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "stop_rule": "none", "stream": True}
    sent = time.perf_counter()
    first: float | None = None
    events: list[str] = []
    log.started += 1
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                log.errors.append(f"status {response.status_code}: {(await response.aread())[:200]!r}")
                return
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    if first is None:
                        first = time.perf_counter()
                    events.append(line.removeprefix("data: "))
    except httpx.HTTPError as exc:
        log.errors.append(f"{type(exc).__name__}: {exc}")
        return
    if not events or events[-1] != "[DONE]":
        log.errors.append(f"stream ended without [DONE]: {events[-2:]}")
        return
    last = json.loads(events[-2])
    if last["choices"][0]["finish_reason"] is None or "error" in last:
        log.errors.append(f"bad final chunk {last}")
        return
    log.ttft_s.append((first or sent) - sent)
    log.total_s.append(time.perf_counter() - sent)


async def client_loop(url: str, index: int, deadline: float, log: ClientLog) -> None:
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        for i in range(MAX_REQUESTS_PER_CLIENT):
            if time.perf_counter() >= deadline:
                return
            await stream_once(client, f"Client {index} asks question number {i}:", log)


async def run_clients(url: str, clients: int, duration: float) -> dict:
    """The client side (run in its own process, like real clients): per-client results as JSON."""
    deadline = time.perf_counter() + duration
    logs = [ClientLog() for _ in range(clients)]
    await asyncio.gather(*(client_loop(url, i, deadline, logs[i]) for i in range(clients)))
    return {
        "clients": [
            {"ttft_s": log.ttft_s, "total_s": log.total_s, "errors": log.errors, "started": log.started} for log in logs
        ]
    }


def editor_probe(runtime: Runtime, until: Callable[[], bool]) -> list[tuple[float, float]]:
    """Editor-priority jobs on the same scheduler: (latency submit→done, engine-reported TTFT) in s."""
    from tinymorph.server.scheduler import PRIORITY_EDITOR, Job
    from tinymorph.steering.engine import CompletionRequest
    from tinymorph.steering.generate import GenerationOptions

    results: list[tuple[float, float]] = []
    for i in range(1000):
        time.sleep(EDITOR_EVERY_S)
        if until():
            break
        request = CompletionRequest(
            f"The editor's document, keystroke {i}",
            doc_id="editor-probe",
            options=GenerationOptions(max_tokens=4, stop="none"),
        )
        job = Job(request, priority=PRIORITY_EDITOR, replace="editor-probe")
        started = time.perf_counter()
        runtime.scheduler.submit(job)
        completion = job.wait(60)
        assert completion is not None and completion.stop_reason == "max-tokens", completion
        results.append((time.perf_counter() - started, completion.timings.ttft_ms / 1000))
    return results


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def test_fifty_streaming_clients(server, runtime):
    served: list[float] = []  # server-side TTFT of every HTTP completion
    runtime.completion_listeners.append(lambda c, source: source == "http" and served.append(c.timings.ttft_ms))
    start = time.perf_counter()
    # the clients' report goes to files, not pipes: read only after the probe, a report over a pipe's
    # 64 KiB (a fast machine's many requests) would block the clients until the probe gave up (~400 s)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        clients = subprocess.Popen([sys.executable, __file__, server.url, str(CLIENTS), str(DURATION_S)],
                                   stdout=stdout, stderr=stderr, text=True)
        try:
            editor = editor_probe(runtime, lambda: clients.poll() is not None)
            clients.wait(timeout=DURATION_S + 120)
        finally:
            if clients.poll() is None:
                clients.kill()
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    elapsed = time.perf_counter() - start
    assert clients.returncode == 0, err[-2000:]
    logs = [ClientLog(c["ttft_s"], c["total_s"], c["errors"], c["started"]) for c in json.loads(out)["clients"]]

    errors = [e for log in logs for e in log.errors]
    started = sum(log.started for log in logs)
    done = [len(log.total_s) for log in logs]
    ttft = [t for log in logs for t in log.ttft_s]
    editor_latency = [lat for lat, _ in editor]
    editor_ttft = [t for _, t in editor]
    summary = {
        "clients": CLIENTS,
        "seconds": round(elapsed, 1),
        "requests": started,
        "completed": sum(done),
        "errors": len(errors),
        "per_client_min": min(done),
        "per_client_max": max(done),
        "http_ttft_p50_ms": round(pct(ttft, 0.5) * 1000),
        "http_ttft_p95_ms": round(pct(ttft, 0.95) * 1000),
        # the first wave (50 connections at once) vs steady state
        "http_ttft_first_p95_ms": round(pct([log.ttft_s[0] for log in logs if log.ttft_s], 0.95) * 1000),
        "http_ttft_later_p95_ms": round(pct([t for log in logs for t in log.ttft_s[1:]] or [0.0], 0.95) * 1000),
        "server_ttft_p50_ms": round(pct(served, 0.5)),
        "server_ttft_p95_ms": round(pct(served, 0.95)),
        "editor_jobs": len(editor),
        "editor_latency_p50_ms": round(pct(editor_latency, 0.5) * 1000),
        "editor_latency_p95_ms": round(pct(editor_latency, 0.95) * 1000),
        "editor_ttft_p50_ms": round(pct(editor_ttft, 0.5) * 1000),
        "editor_ttft_p95_ms": round(pct(editor_ttft, 0.95) * 1000),
    }
    print("\nload:", json.dumps(summary))

    assert not errors, errors[:5]
    assert sum(done) == started  # nothing lost: every request started was answered in full
    assert min(done) >= 1  # nobody starved
    assert max(done) <= 2 * statistics.median(done) + 2  # round robin keeps clients within a small factor
    assert len(editor) >= 5
    # the editor path pre-empts HTTP work: a whole editor job beats the first token of a typical stream
    assert pct(editor_latency, 0.95) < pct(ttft, 0.5), summary
    assert pct(editor_ttft, 0.5) < 0.25 * pct(ttft, 0.5), summary
    time.sleep(0.2)
    assert runtime.scheduler.queue_depth() == 0
    assert runtime.scheduler.stats.failed == 0
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # still serving afterwards


if __name__ == "__main__":  # the client side of the load test: URL CLIENTS SECONDS
    result = asyncio.run(run_clients(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
    print(json.dumps(result))
