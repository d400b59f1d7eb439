"""`tinymorph lsp --engine URL`: the editor protocol here, generation on a tinymorph HTTP API.

The key LSP tests of test_lsp.py (hints, ghost text, accepting, cancel-on-edit, steering) run
unchanged against both engines: `client` is parametrized over the embedded engine and a real
`tinymorph serve` subprocess on 127.0.0.1 running the tiny random Llama. Then what only a remote
engine has: the TTFT split, streams closed on the next edit (seen from the server's counters), and
failures (not a URL, nobody listening, a refused token, a server that dies and comes back) that
must be a visible state, never a crash or a hang. Also the HTTP API's side of it (`document`,
the engine TTFT in the first chunk, a document's newer request cancelling its older one).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient
from test_lsp import (  # noqa: F401 - the imported tests run here again, against this module's `client`
    ISOLATED,
    SERVER_ENV,
    TIMEOUT,
    TINYMORPH,
    Recorder,
    capabilities,
    command,
    edit,
    hints,
    make_tiny_sae,
    open_doc,
    test_accept_word_line_and_all,
    test_burst_of_edits_is_bounded_and_never_stale,
    test_hint_after_edit_streams_with_refresh_and_metrics,
    test_inline_completion_waits_for_the_running_generation,
    test_steering_commands,
    test_typed_ahead_reuses_the_suggestion,
    wait_done,
    wait_hint,
    wait_ready,
    wait_status,
)

from tinymorph.server.lsp_session import FOCUS_HOLD_S

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "engine-s3cret"
OPTIONS = {"debounceMs": 30, "maxTokens": 12, "stop": "paragraph"}
WORKSPACE_TOML = """[[sae]]
name = "mine"
path = "{sae}"
"""


# -- processes -----------------------------------------------------------------------------------------


class EngineProcess:
    """A `tinymorph serve` subprocess on 127.0.0.1 (its stderr drained, kept for failure messages)."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, lines: list[str], drain: asyncio.Task):
        self.proc, self.url, self.lines, self.drain = proc, url, lines, drain

    @classmethod
    async def start(cls, *args: str, cwd: Path | None = None, port: int = 0, marker: str = "HTTP API on ",
                    env: dict[str, str] | None = None, timeout: float = TIMEOUT,
                    sigint_ignored: bool = False) -> EngineProcess:
        """`sigint_ignored`: start it as a script's background job is started (SIGINT inherited ignored)."""
        import signal

        proc = await asyncio.create_subprocess_exec(
            TINYMORPH, "serve", "--port", str(port), *args, cwd=cwd, env=env or SERVER_ENV,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)
        lines: list[str] = []
        url = None
        try:
            deadline = time.monotonic() + timeout
            while url is None:
                line = (await asyncio.wait_for(proc.stderr.readline(), max(1.0, deadline - time.monotonic())))
                assert line, "engine exited:\n" + "".join(lines)
                lines.append(line.decode(errors="replace"))
                if marker in lines[-1]:
                    url = lines[-1].split(marker)[1].split()[0].strip()
        except BaseException:
            await _stop(proc)
            raise

        async def drain() -> None:
            while line := await proc.stderr.readline():
                lines.append(line.decode(errors="replace"))

        return cls(proc, url, lines, asyncio.ensure_future(drain()))

    async def ready(self, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as http:
            while True:
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "engine never ready:\n" + "".join(self.lines[-20:])
                await asyncio.sleep(0.2)

    async def stop(self, timeout: float = 30.0) -> bool:
        stopped = await _stop(self.proc, timeout)
        self.drain.cancel()
        return stopped


async def _stop(proc: asyncio.subprocess.Process, timeout: float = 30.0) -> bool:
    """SIGINT (a clean shutdown), then SIGKILL for the whole process group after `timeout`.
    True when SIGINT alone ended it (or it had already ended)."""
    import signal

    if proc.returncode is None:
        try:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), timeout)
        except (TimeoutError, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def lsp_client(*args: str, workspace: Path, options: dict | None = None,
                     ready: str | None = "ready") -> LanguageClient:
    """`tinymorph lsp ARGS` over stdio, initialized in `workspace` (with a `recorder`)."""
    env = {k: v for k, v in SERVER_ENV.items() if k != "TINYMORPH_TOKEN"}  # only the flags say the token
    client = await ClientServerConfig(server_command=[TINYMORPH, "lsp", *args], server_env=env).start()
    client.recorder = Recorder(client)  # type: ignore[attr-defined]
    client.init_result = await client.initialize_session(types.InitializeParams(  # type: ignore[attr-defined]
        capabilities=capabilities(), initialization_options=options or {},
        workspace_folders=[types.WorkspaceFolder(uri=workspace.as_uri(), name="ws")]))
    if ready is not None:
        await wait_ready(client, ready)
    return client


async def close(client: LanguageClient) -> None:
    try:
        await asyncio.wait_for(client.shutdown_session(), 10)
    except Exception:  # noqa: BLE001 - a server that is already gone
        pass
    await client.stop()


async def server_metric(url: str, name: str, labels: str = "") -> float:
    """One sample of the engine's Prometheus metrics (0 when absent)."""
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + (labels or " ")) or (not labels and line.startswith(name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A workspace with a tiny SAE named "mine" (no steering yet): the LSP reads it, and the engine
    runs in it, so both resolve "mine:3" (a remote engine resolves features with its own config)."""
    folder = tmp_path_factory.mktemp("remote-ws")
    make_tiny_sae(folder / "sae")
    (folder / "tinymorph.toml").write_text(WORKSPACE_TOML.format(sae="sae"))
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_model_dir, workspace):
    """`tinymorph serve` with the tiny model, a token, running in the workspace."""
    proc = await EngineProcess.start("--model", str(tiny_model_dir), "--dtype", "float32", "--threads", "1",
                                     "--token", TOKEN, "--quiet", cwd=workspace)
    try:
        await proc.ready()
        yield proc
    finally:
        await proc.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["local", "remote"])
async def client(request, tiny_model_dir, workspace, engine):
    """The LSP server with the embedded engine, or with `--engine` on the `engine` server."""
    if request.param == "local":
        c = await lsp_client(workspace=workspace, options={"model": str(tiny_model_dir), **OPTIONS})
    else:
        c = await lsp_client("--engine", engine.url, "--token", TOKEN, workspace=workspace, options=OPTIONS)
    c.engine_kind = request.param  # type: ignore[attr-defined]
    yield c
    await close(c)


# -- the same behaviour with either engine ---------------------------------------------------------------


async def test_steering_is_applied_per_request(client: LanguageClient):
    """A plan set in the editor steers the next suggestion (the engine reports what it applied);
    cleared, the next one is unsteered."""
    uri = f"file:///tmp/steer-{client.engine_kind}.md"  # type: ignore[attr-defined]
    steered = await command(client, "tinymorph.steer.set", {"feature": "mine:3", "strength": 2.0})
    assert [e["feature"] for e in steered] == ["mine:3"]
    open_doc(client, uri, "The lighthouse keeper")
    version = edit(client, uri, 0, 21, " said")
    metrics = await wait_done(client, uri, version)
    assert [(e["feature"], e["strength"]) for e in metrics["steering"]] == [("mine:3", 2.0)], metrics
    assert await command(client, "tinymorph.steer.clear") == []
    version = edit(client, uri, 0, 26, ",")
    metrics = await wait_done(client, uri, version)
    assert metrics["steering"] == [], metrics


# -- what only a remote engine has -------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def remote(engine, workspace):
    c = await lsp_client("--engine", engine.url, "--token", TOKEN, workspace=workspace, options=OPTIONS)
    yield c
    await close(c)


async def test_ttft_is_split_into_engine_and_network(remote: LanguageClient):
    uri = f"file:///tmp/split-{id(remote)}.md"
    text = "It was the best of times"
    open_doc(remote, uri, text)
    splits = []
    for i, ch in enumerate(", it was"):  # keystrokes, each waiting for its suggestion
        await command(remote, "tinymorph.dismiss", uri)  # so no keystroke just types ahead of the last one
        version = edit(remote, uri, 0, len(text) + i, ch)
        metrics = await wait_done(remote, uri, version)
        engine_ms, network_ms = metrics["engineTtftMs"], metrics["networkMs"]
        assert engine_ms > 0 and network_ms >= 0, metrics
        assert abs(engine_ms + network_ms - metrics["ttftMs"]) < 1.0, metrics
        splits.append((metrics["ttftMs"], engine_ms, network_ms))
    hint = await wait_hint(remote, uri, version)
    assert "engine" in hint.tooltip.value and "network" in hint.tooltip.value
    assert any("network" in m.message and f"v{version}" in m.message for m in remote.log_messages)
    median = sorted(splits)[len(splits) // 2]
    print(f"\nremote TTFT per keystroke (median of {len(splits)}): {median[0]:.1f} ms = engine {median[1]:.1f} ms"
          f" + network {median[2]:.1f} ms")


async def test_the_next_edit_closes_the_stream_and_cancels_on_the_server(remote: LanguageClient, engine):
    """A long generation still streaming when the user types on: its stream is closed, the server
    stops generating (its scheduler counts the job cancelled), and its result is never shown."""
    uri = "file:///tmp/long.md"
    remote.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"tinymorph": {"maxTokens": 400, "stop": "none"}}))
    try:
        await wait_status(remote, lambda s: True, timeout=TIMEOUT)
        await asyncio.sleep(FOCUS_HOLD_S + 0.1)  # the last test's document lets go of the focus
        cancelled = await server_metric(engine.url, "tinymorph_scheduler_jobs_total", '{outcome="cancelled"}')
        open_doc(remote, uri, "A long story begins")
        v1 = edit(remote, uri, 0, 19, " here")
        await wait_hint(remote, uri, v1)  # streaming has begun
        v2 = edit(remote, uri, 0, 24, "\u00a7")  # not what was suggested: the old stream must go
        await wait_done(remote, uri, v2)
        assert not [m for m in remote.recorder.metrics if m["uri"] == uri and m["version"] == v1]
        deadline = time.monotonic() + 10
        while await server_metric(engine.url, "tinymorph_scheduler_jobs_total",
                                  '{outcome="cancelled"}') <= cancelled:
            assert time.monotonic() < deadline, "the server never cancelled the abandoned generation"
            await asyncio.sleep(0.1)
    finally:
        remote.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"tinymorph": {"maxTokens": OPTIONS["maxTokens"], "stop": OPTIONS["stop"]}}))


async def test_a_refused_token_is_shown_and_not_retried(engine, workspace):
    c = await lsp_client("--engine", engine.url, "--token", "wrong", workspace=workspace, options=OPTIONS,
                         ready="error")
    try:
        st = await command(c, "tinymorph.status")
        assert "refused the token (401)" in st["message"], st
        assert any("refused the token" in m.message and m.type == types.MessageType.Error for m in c.messages)
        await asyncio.sleep(2.5)  # a refusal is not retried: still the same error, the server alive
        assert (await command(c, "tinymorph.status"))["state"] == "error"
        open_doc(c, "file:///tmp/refused.md", "Nothing")
        assert await hints(c, "file:///tmp/refused.md") == []
    finally:
        await close(c)


async def test_not_a_url_is_an_error_state(workspace):
    c = await lsp_client("--engine", "localhost:abc", workspace=workspace, options=OPTIONS, ready="error")
    try:
        st = await command(c, "tinymorph.status")
        assert "not an engine address" in st["message"] and "http://HOST:PORT" in st["message"], st
        assert any("not an engine address" in m.message for m in c.messages)
        result = await c.text_document_inline_completion_async(types.InlineCompletionParams(
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
            text_document=types.TextDocumentIdentifier("file:///tmp/x.md"), position=types.Position(0, 0)))
        assert not result.items
    finally:
        await close(c)


async def test_engine_down_then_back_then_lost_then_back(tiny_model_dir, workspace):
    """Nobody listening: an error the editor sees, then suggestions once the server is up; the
    server dies mid-session: an error again, and suggestions again when it is back."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    c = await lsp_client("--engine", url, workspace=workspace, options=OPTIONS, ready="error")
    server = None
    try:
        st = await command(c, "tinymorph.status")
        assert "cannot reach the engine" in st["message"] and url in st["message"], st
        assert any("cannot reach the engine" in m.message for m in c.messages)
        uri = "file:///tmp/comeback.md"
        open_doc(c, uri, "The server was down")
        args = ("--model", str(tiny_model_dir), "--dtype", "float32", "--threads", "1", "--quiet")
        server = await EngineProcess.start(*args, port=port, cwd=workspace)
        await wait_status(c, lambda s: s["state"] == "ready", timeout=TIMEOUT)  # reconnected by itself
        version = edit(c, uri, 0, 19, ",")
        await wait_hint(c, uri, version)
        await server.stop()
        version = edit(c, uri, 0, 20, " and")
        st = await wait_status(c, lambda s: s["state"] == "error", timeout=20)
        assert "engine" in st["message"] and url in st["message"], st
        assert (await command(c, "tinymorph.status"))["state"] == "error"  # alive, answering
        server = await EngineProcess.start(*args, port=port, cwd=workspace)
        await wait_status(c, lambda s: s["state"] == "ready", timeout=TIMEOUT)  # reconnected by itself
        version = edit(c, uri, 0, 24, " up")
        await wait_hint(c, uri, version)
    finally:
        await close(c)
        if server is not None:
            await server.stop()


# -- the HTTP API's side -----------------------------------------------------------------------------------


def _events(response: httpx.Response) -> list[dict]:
    out = []
    for line in response.text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            out.append(json.loads(line[5:]))
    return out


async def test_document_requests_reuse_their_cache_and_report_engine_ttft(tiny_http_server):
    body = {"prompt": "Once upon a time there was a", "max_tokens": 3, "temperature": 0, "stream": True,
            "document": "editor-1:file:///a.md"}
    async with httpx.AsyncClient(base_url=tiny_http_server.url, timeout=30) as http:
        first = _events(await http.post("/v1/completions", json=body))
        body["prompt"] += " king"
        second = _events(await http.post("/v1/completions", json=body))
    for events in (first, second):
        assert events[0]["tinymorph"]["ttft_ms"] > 0  # the first text chunk says the engine's TTFT
        assert events[-1]["tinymorph"]["stop_reason"]
    assert second[-1]["tinymorph"]["timings"]["tokens_reused"] > 0, second[-1]  # the document's own cache


async def test_a_newer_request_of_a_document_cancels_the_older(tiny_http_server):
    long = {"prompt": "A long, long", "max_tokens": 400, "temperature": 0, "stop_rule": "none",
            "repetition_penalty": 1.0, "stream": True, "document": "editor-2:file:///b.md"}
    async with httpx.AsyncClient(base_url=tiny_http_server.url, timeout=60) as http:
        started = asyncio.Event()
        older: list[dict] = []

        async def run_older() -> None:
            async with http.stream("POST", "/v1/completions", json=long) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        older.append(json.loads(line[5:]))
                        started.set()

        task = asyncio.ensure_future(run_older())
        await asyncio.wait_for(started.wait(), 30)  # the older one is generating
        newer = _events(await http.post("/v1/completions", json={**long, "prompt": "A long, long way",
                                                                  "max_tokens": 2}))
        await asyncio.wait_for(task, 60)
        bad = await http.post("/v1/completions", json={"prompt": "x", "document": ""})
    assert older[-1]["tinymorph"]["stop_reason"] == "cancelled", older[-1]
    assert older[-1]["tinymorph"]["timings"]["tokens_generated"] < 400
    assert newer[-1]["tinymorph"]["stop_reason"] != "cancelled"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "document"
