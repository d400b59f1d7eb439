"""`tinymorph lsp` driven over stdio by pytest-lsp, as a real editor would drive it.

Most tests share one server (starting one costs seconds of imports on two cores) and use their own
document URIs; tests that need a different initialization start their own. The server runs the
tiny random-weight Llama from conftest, so continuations are gibberish but every code path (engine,
scheduler, streaming, cancellation) is the real one; one test at the end uses the real model.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams
from pytest_lsp import ClientServerConfig, LanguageClient

pytestmark = pytest.mark.asyncio(loop_scope="module")

TINYMORPH = str(Path(sys.executable).parent / "tinymorph")
TIMEOUT = 60.0
# Servers must not pick up a developer's own config (its steering would apply to the tiny model).
ISOLATED = tempfile.mkdtemp(prefix="tinymorph-lsp-test-")
SERVER_ENV = {**os.environ, "TINYMORPH_CONFIG_DIR": ISOLATED}


def capabilities(refresh: bool = True) -> types.ClientCapabilities:
    """A client that supports what tinymorph uses: hint refresh, versioned edits, progress."""
    return types.ClientCapabilities(
        workspace=types.WorkspaceClientCapabilities(
            inlay_hint=types.InlayHintWorkspaceClientCapabilities(refresh_support=refresh),
            workspace_edit=types.WorkspaceEditClientCapabilities(document_changes=True),
            apply_edit=True,
        ),
        window=types.WindowClientCapabilities(work_done_progress=True),
        text_document=types.TextDocumentClientCapabilities(
            inlay_hint=types.InlayHintClientCapabilities(),
            inline_completion=types.InlineCompletionClientCapabilities(),
        ),
    )


class Recorder:
    """What the server asked of the client: refreshes, edits, notifications."""

    def __init__(self, client: LanguageClient):
        self.refreshes = 0
        self.edits: list[types.ApplyWorkspaceEditParams] = []
        self.metrics: list[dict] = []
        self.statuses: list[dict] = []

        def refresh(ls, _params):
            self.refreshes += 1

        def apply(ls, params: types.ApplyWorkspaceEditParams):
            self.edits.append(params)
            return types.ApplyWorkspaceEditResult(applied=True)

        client.feature(types.WORKSPACE_INLAY_HINT_REFRESH)(refresh)
        client.feature(types.WORKSPACE_APPLY_EDIT)(apply)
        client.feature("tinymorph/metrics")(lambda ls, params: self.metrics.append(_plain(params)))
        client.feature("tinymorph/status")(lambda ls, params: self.statuses.append(_plain(params)))


def _plain(obj):
    """Params of custom messages arrive as namedtuples (pygls), results as dicts: make plain JSON values."""
    if hasattr(obj, "_asdict"):
        return {k: _plain(v) for k, v in obj._asdict().items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


async def start(client: LanguageClient, options: dict, refresh: bool = True) -> Recorder:
    rec = Recorder(client)
    client.recorder = rec  # type: ignore[attr-defined]
    result = await client.initialize_session(types.InitializeParams(
        capabilities=capabilities(refresh), initialization_options=options,
        root_uri=Path(ISOLATED).as_uri()))
    client.init_result = result  # type: ignore[attr-defined]
    return rec


async def wait_ready(client: LanguageClient, state: str = "ready") -> dict:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        st = await command(client, "tinymorph.status")
        if st["state"] == state:
            return st
        assert st["state"] != "error" or state == "error", st
        await asyncio.sleep(0.1)
    raise AssertionError(f"server never reached {state}")


async def command(client: LanguageClient, name: str, *args):
    result = await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command=name, arguments=list(args)))
    return _plain(result) if result is not None else None


_versions: dict[str, int] = {}


def open_doc(client: LanguageClient, uri: str, text: str) -> None:
    _versions[uri] = 1
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        types.TextDocumentItem(uri=uri, language_id="markdown", version=1, text=text)))


def edit(client: LanguageClient, uri: str, line: int, char: int, text: str,
         end: tuple[int, int] | None = None) -> int:
    """Replace [line:char, end) with text (an insertion without `end`); returns the new version."""
    _versions[uri] += 1
    end_line, end_char = end or (line, char)
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=_versions[uri]),
        content_changes=[types.TextDocumentContentChangePartial(
            range=types.Range(types.Position(line, char), types.Position(end_line, end_char)), text=text)],
    ))
    return _versions[uri]


async def raw_request(client: LanguageClient, method: str, params) -> types.ResponseError | None:
    """Send a request with arbitrary (malformed) params; the JSON-RPC error it gets, or None."""
    from concurrent.futures import Future

    msg_id = f"raw-{time.monotonic_ns()}"
    future: Future = Future()
    client.protocol._request_futures[msg_id] = future
    client.protocol._send_data({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
    try:
        await asyncio.wait_for(asyncio.wrap_future(future), 10)
    except Exception as exc:  # noqa: BLE001 - pygls raises the error response as an exception
        return types.ResponseError(code=getattr(exc, "code", 0), message=str(exc))
    return None


WHOLE = types.Range(types.Position(0, 0), types.Position(100000, 0))


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.05)


async def hints(client: LanguageClient, uri: str, rng: types.Range = WHOLE) -> list[types.InlayHint]:
    return list(await client.text_document_inlay_hint_async(
        types.InlayHintParams(text_document=types.TextDocumentIdentifier(uri), range=rng)) or [])


async def wait_hint(client: LanguageClient, uri: str, version: int, timeout: float = TIMEOUT) -> types.InlayHint:
    """The first hint computed for `version` (earlier ones must never be served)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for h in await hints(client, uri):
            assert h.data["version"] == version, f"hint for version {h.data['version']} served at {version}"
            if h.label:
                return h
        await asyncio.sleep(0.05)
    raise AssertionError(f"no hint for {uri} v{version}")


async def wait_done(client: LanguageClient, uri: str, version: int) -> dict:
    """The metrics notification of the suggestion made for `version`."""
    rec: Recorder = client.recorder  # type: ignore[attr-defined]
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for m in rec.metrics:
            if m["uri"] == uri and m["version"] == version:
                return m
        await asyncio.sleep(0.05)
    raise AssertionError(f"no metrics for {uri} v{version}")


async def typed_suggestion(client: LanguageClient, uri: str, text: str) -> tuple[int, dict]:
    """Open `uri` with `text`, type one more character at the end, wait for the finished suggestion."""
    open_doc(client, uri, text)
    lines = text.split("\n")
    version = edit(client, uri, len(lines) - 1, len(lines[-1].encode("utf-16-le")) // 2, " ")
    return version, await wait_done(client, uri, version)


# -- the shared server ----------------------------------------------------------------------------------


@pytest_lsp.fixture(scope="module", config=ClientServerConfig(server_command=[TINYMORPH, "lsp"], server_env=SERVER_ENV))
async def client(lsp_client: LanguageClient, tiny_model_dir):
    await start(lsp_client, {"model": str(tiny_model_dir), "debounceMs": 30, "maxTokens": 12, "stop": "paragraph"})
    # while the model loads (imports alone take seconds): empty answers, not errors
    early = lsp_client.early = {}  # type: ignore[attr-defined]
    early["status"] = (await command(lsp_client, "tinymorph.status"))["state"]
    uri = "file:///tmp/early.md"
    open_doc(lsp_client, uri, "Typed before the model was ready")
    early["version"] = edit(lsp_client, uri, 0, 32, ",")
    early["hints"] = await hints(lsp_client, uri)
    early["inline"] = (await lsp_client.text_document_inline_completion_async(types.InlineCompletionParams(
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(0, 33)))).items
    early["accept"] = await command(lsp_client, "tinymorph.accept", uri)
    await wait_ready(lsp_client)
    yield
    await lsp_client.shutdown_session()


async def test_capabilities_progress_and_status(client: LanguageClient):
    caps = client.init_result.capabilities  # type: ignore[attr-defined]
    assert caps.inlay_hint_provider
    assert caps.inline_completion_provider
    assert caps.hover_provider
    sync = caps.text_document_sync
    assert sync.change == types.TextDocumentSyncKind.Incremental and sync.open_close
    commands = set(caps.execute_command_provider.commands)
    assert {"tinymorph.accept", "tinymorph.status", "tinymorph.steer.set"} <= commands
    # the model loaded in the background with work-done progress: begin … end
    kinds = [type(v).__name__ for reports in client.progress_reports.values() for v in reports]
    assert kinds[0] == "WorkDoneProgressBegin" and kinds[-1] == "WorkDoneProgressEnd", kinds
    statuses = client.recorder.statuses  # type: ignore[attr-defined]
    assert statuses and statuses[-1]["state"] == "ready", statuses
    st = await command(client, "tinymorph.status")
    assert st["model"].endswith("tiny-llama0") or "tiny-llama" in st["model"]
    assert set(st) >= {"state", "model", "lastTtftMs", "message", "steering"}


async def test_before_ready_answers_are_empty_and_typing_is_not_lost(client: LanguageClient):
    early = client.early  # type: ignore[attr-defined]
    assert early["status"] == "loading"
    assert not early["hints"] and not early["inline"]
    assert early["accept"] == {"applied": False, "text": ""}
    # what the user typed while the model loaded gets its suggestion once it is ready
    await wait_hint(client, "file:///tmp/early.md", early["version"])


async def test_hint_after_edit_streams_with_refresh_and_metrics(client: LanguageClient):
    rec: Recorder = client.recorder  # type: ignore[attr-defined]
    refreshes = rec.refreshes
    uri = "file:///tmp/story.md"
    open_doc(client, uri, "Once upon a time")
    version = edit(client, uri, 0, 16, ",")
    metrics = await wait_done(client, uri, version)
    hint = await wait_hint(client, uri, version)
    for _ in range(50):  # the refresh request may arrive just after the metrics notification
        if rec.refreshes > refreshes:
            break
        await asyncio.sleep(0.1)
    assert rec.refreshes > refreshes  # the server asked the client to re-request hints
    assert hint.position == types.Position(0, 17)
    assert "\n" not in hint.label and hint.padding_left is False and hint.kind is None
    assert hint.data == {"uri": uri, "version": version, "id": hint.data["id"]}
    assert hint.tooltip.kind == types.MarkupKind.Markdown
    assert "TTFT" in hint.tooltip.value and "tokens/s" in hint.tooltip.value and "steering: none" in hint.tooltip.value
    first_line = metrics["text"].lstrip("\n").split("\n")[0]
    assert first_line.rstrip("\r") in hint.label
    assert set(metrics) >= {"uri", "version", "ttftMs", "prefillMs", "queueMs", "tokensPerSecond", "tokensReused",
                            "tokensPrefilled", "tokensGenerated", "stopReason", "steering", "text"}
    assert metrics["ttftMs"] > 0 and metrics["tokensGenerated"] > 0
    assert any("suggestion v" in m.message for m in client.log_messages)
    # hover on the hint position shows the same tooltip; elsewhere nothing
    hover = await client.text_document_hover_async(types.HoverParams(
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(0, 17)))
    assert hover is not None and hover.contents.value == hint.tooltip.value
    assert await client.text_document_hover_async(types.HoverParams(
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(0, 3))) is None
    # a range that does not contain the hint gets nothing
    assert await hints(client, uri, types.Range(types.Position(0, 0), types.Position(0, 5))) == []
    st = await command(client, "tinymorph.status")
    assert st["lastTtftMs"] is not None


async def test_typed_ahead_reuses_the_suggestion(client: LanguageClient):
    uri = "file:///tmp/typed.md"
    version, metrics = await typed_suggestion(client, uri, "The weather today is")
    text = metrics["text"]
    assert len(text) >= 3, metrics
    before = await command(client, "tinymorph.status")
    # the user types the first two characters of the suggestion
    v2 = edit(client, uri, 0, 21, text[:2]) if "\n" not in text[:2] else None
    if v2 is None:
        pytest.skip("continuation starts with a line break")
    hint = await wait_hint(client, uri, v2, timeout=5)
    assert hint.position == types.Position(0, 23)
    # inline completion: range covers what was typed since the anchor, insertText is the whole suggestion
    result = await client.text_document_inline_completion_async(types.InlineCompletionParams(
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(0, 23)))
    item = result.items[0]
    assert item.insert_text == text
    assert item.range == types.Range(types.Position(0, 21), types.Position(0, 23))
    assert item.command.command == "tinymorph.accepted" and item.command.arguments[0] == uri
    after = await command(client, "tinymorph.status")
    assert after["stats"]["scheduled"] == before["stats"]["scheduled"]  # no new generation ran
    # typing something else invalidates it at once: the stale hint is never served
    v3 = edit(client, uri, 0, 23, "\u00a7")
    assert all(h.data["version"] == v3 for h in await hints(client, uri))


async def test_burst_of_edits_is_bounded_and_never_stale(client: LanguageClient):
    uri = "file:///tmp/burst.md"
    open_doc(client, uri, "")
    before = await command(client, "tinymorph.status")
    text = "It was a bright cold day in April, and the clocks were striking thirteen. " * 3
    text = text[:200]
    version = 0
    for i, ch in enumerate(text):
        version = edit(client, uri, 0, i, ch)
        if i % 20 == 0:  # a client asking for hints mid-burst must never see an older version's hint
            for h in await hints(client, uri):
                assert h.data["version"] == version
    hint = await wait_hint(client, uri, version)
    assert hint.position == types.Position(0, 200)
    await wait_done(client, uri, version)
    after = await command(client, "tinymorph.status")
    scheduled = after["stats"]["scheduled"] - before["stats"]["scheduled"]
    assert 1 <= scheduled <= 20, scheduled  # debounce + latest-wins: far fewer than 200 generations


async def test_accept_word_line_and_all(client: LanguageClient):
    rec: Recorder = client.recorder  # type: ignore[attr-defined]
    uri = "file:///tmp/accept.md"
    version, metrics = await typed_suggestion(client, uri, "Dear diary,")
    text = metrics["text"]
    cursor = 12
    doc_line = 0
    accepted = ""
    for kind in ("tinymorph.acceptWord", "tinymorph.acceptLine", "tinymorph.accept"):
        if accepted == text:
            break
        n = len(rec.edits)
        result = await command(client, kind, uri)
        assert result["applied"] is True and result["text"], (kind, result)
        assert text[len(accepted):].startswith(result["text"])
        params = rec.edits[n]
        doc_edit = params.edit.document_changes[0]
        assert doc_edit.text_document.uri == uri and doc_edit.text_document.version == version
        te = doc_edit.edits[0]
        assert te.range.start == te.range.end == types.Position(doc_line, cursor)
        assert te.new_text == result["text"]
        # the client applies the edit and reports it, like an editor does
        version = edit(client, uri, doc_line, cursor, te.new_text)
        accepted += te.new_text
        lines = te.new_text.split("\n")
        doc_line += len(lines) - 1
        cursor = (cursor if len(lines) == 1 else 0) + len(lines[-1].encode("utf-16-le")) // 2
        if accepted != text:  # the rest stays suggested (typed ahead), without a new generation
            hint = await wait_hint(client, uri, version, timeout=5)
            assert hint.position == types.Position(doc_line, cursor)
    assert accepted == text
    # nothing left to accept of that suggestion: a new one is on its way for the new text
    await wait_done(client, uri, version)


async def test_dismiss_toggle_and_configuration(client: LanguageClient):
    uri = "file:///tmp/dismiss.md"
    version, _ = await typed_suggestion(client, uri, "Call me Ishmael.")
    await wait_hint(client, uri, version)
    assert (await command(client, "tinymorph.dismiss", {"uri": uri}))["dismissed"] is True
    assert await hints(client, uri) == []
    assert await command(client, "tinymorph.toggle", False) == {"enabled": False}
    assert (await command(client, "tinymorph.status"))["state"] == "disabled"
    v2 = edit(client, uri, 0, 17, "x")
    await asyncio.sleep(0.3)
    assert await hints(client, uri) == []
    assert await command(client, "tinymorph.toggle") == {"enabled": True}
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"tinymorph": {"enabled": False, "maxTokens": "lots"}}))
    await asyncio.sleep(0.2)
    assert (await command(client, "tinymorph.status"))["state"] == "disabled"
    assert any("maxTokens" in m.message for m in client.log_messages)  # a bad value is reported, not fatal
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"enabled": True}))
    await wait_ready(client)
    v3 = edit(client, uri, 0, 18, "y")
    assert v3 == v2 + 1
    await wait_hint(client, uri, v3)


async def test_inline_completion_waits_for_the_running_generation(client: LanguageClient):
    uri = "file:///tmp/inline.md"
    open_doc(client, uri, "Hello")
    version = edit(client, uri, 0, 5, " world")
    # asked right after the keystroke (inside the debounce): waits instead of answering empty
    result = await client.text_document_inline_completion_async(types.InlineCompletionParams(
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(0, 11)))
    assert len(result.items) == 1, result
    item = result.items[0]
    assert item.range == types.Range(types.Position(0, 11), types.Position(0, 11))
    metrics = await wait_done(client, uri, version)
    # all of it, or (on a machine too busy to finish within the wait) the part streamed so far
    assert item.insert_text and metrics["text"].startswith(item.insert_text)
    # explicitly invoked somewhere without a suggestion: starts one and waits for it
    result = await client.text_document_inline_completion_async(types.InlineCompletionParams(
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(0, 5)))
    assert len(result.items) == 1 and result.items[0].range.start == types.Position(0, 5)


async def test_cancel_request_is_honoured(client: LanguageClient):
    uri = "file:///tmp/cancel.md"
    open_doc(client, uri, "Slow")
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"debounceMs": 5000}))
    await asyncio.sleep(0.1)
    edit(client, uri, 0, 4, " and steady")
    params = types.InlineCompletionParams(
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(0, 15))
    msg_id = "cancel-me"
    future = asyncio.ensure_future(
        client.protocol.send_request_async(types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=msg_id))
    await asyncio.sleep(0.2)
    client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=msg_id))
    started = time.monotonic()
    with pytest.raises(JsonRpcException) as info:
        await asyncio.wait_for(future, 5)
    assert "cancel" in str(info.value).lower()
    assert time.monotonic() - started < 1.0  # answered at once, not after the 1.5 s wait
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"debounceMs": 30}))
    await asyncio.sleep(0.1)


async def test_inline_completion_is_never_answered_for_older_text(client: LanguageClient):
    """A client that does not check versions (Neovim 0.12's inline completion) must never get a
    suggestion for text the user no longer has: an edit while the request waits empties the answer."""
    uri = "file:///tmp/inline-stale.md"
    open_doc(client, uri, "Slow")
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"debounceMs": 800}))
    await asyncio.sleep(0.1)
    edit(client, uri, 0, 4, " and")
    request = asyncio.ensure_future(client.text_document_inline_completion_async(types.InlineCompletionParams(
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(0, 8))))
    await asyncio.sleep(0.2)
    edit(client, uri, 0, 8, " steady")  # the user typed on while the request waited
    result = await asyncio.wait_for(request, 10)
    assert not result.items
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"debounceMs": 30}))
    await asyncio.sleep(0.1)


async def test_bad_input_never_kills_the_server(client: LanguageClient):
    unknown = types.TextDocumentIdentifier("file:///tmp/never-opened.md")
    assert not await client.text_document_inlay_hint_async(types.InlayHintParams(unknown, WHOLE))
    result = await client.text_document_inline_completion_async(types.InlineCompletionParams(
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
        text_document=unknown, position=types.Position(0, 0)))
    assert not result.items
    client.text_document_did_change(types.DidChangeTextDocumentParams(  # change to an unknown document
        text_document=types.VersionedTextDocumentIdentifier(uri=unknown.uri, version=3),
        content_changes=[types.TextDocumentContentChangeWholeDocument(text="x")]))
    uri = "file:///tmp/bad.md"
    open_doc(client, uri, "short")
    result = await client.text_document_inline_completion_async(types.InlineCompletionParams(  # outside the text
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(40, 2)))
    assert not result.items
    edit(client, uri, 99, 99, "!")  # an edit past the end lands at the end, as the spec says
    # malformed params: an error answer, not silence
    for method, bad in ((types.TEXT_DOCUMENT_INLAY_HINT, {"textDocument": {"uri": 5}, "range": "everything"}),
                        (types.TEXT_DOCUMENT_INLINE_COMPLETION, {"textDocument": {"uri": uri}}),
                        (types.TEXT_DOCUMENT_HOVER, None)):
        error = await raw_request(client, method, bad)
        assert error is not None and error.code == -32602, (method, error)
    client.protocol._send_data({"jsonrpc": "2.0", "method": types.TEXT_DOCUMENT_DID_CHANGE,  # bad notification
                                "params": {"textDocument": {"uri": uri}, "contentChanges": 7}})
    # the server lost track of bad.md's text: it says so once and waits for the whole text again
    await wait_for(lambda: any("could not be applied" in m.message for m in client.messages))
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=_versions[uri] + 10),
        content_changes=[types.TextDocumentContentChangeWholeDocument(text="short!")]))
    _versions[uri] += 10
    with pytest.raises(JsonRpcInvalidParams):
        await command(client, "tinymorph.accept", 42)
    with pytest.raises(JsonRpcInvalidParams):
        await command(client, "tinymorph.no-such-command")
    with pytest.raises(JsonRpcInvalidParams):
        await command(client, "tinymorph.steer.set", {"feature": "default:1", "strength": "very"})
    with pytest.raises(JsonRpcInvalidParams):
        await command(client, "tinymorph.steer.set", {"feature": "default:1", "strength": 1.0, "mode": "shout"})
    assert await command(client, "tinymorph.accept", "file:///tmp/never-opened.md") == {"applied": False, "text": ""}
    assert await command(client, "tinymorph.steer.clear") == []
    # the server is alive and well
    assert (await command(client, "tinymorph.status"))["state"] == "ready"
    version = edit(client, uri, 0, 6, " ok")
    await wait_hint(client, uri, version)


async def test_surrogate_pairs_and_crlf(client: LanguageClient):
    uri = "file:///tmp/emoji.md"
    text = "Title 😀\r\nThe cat 🐈 sat"
    open_doc(client, uri, text)
    # line 1 is "The cat 🐈 sat": 🐈 is two UTF-16 units, so the end of the line is character 14
    version = edit(client, uri, 1, 14, " down")
    hint = await wait_hint(client, uri, version)
    assert hint.position == types.Position(1, 19)
    # an edit between the halves of a surrogate pair does not crash the server
    version = edit(client, uri, 0, 7, "x")
    await wait_hint(client, uri, version)


async def test_huge_document(client: LanguageClient):
    """A 10 MB document: keystrokes cost what they cost in a small one (no whole-text copy or
    re-split per edit; only the context window goes to the engine)."""
    uri = "file:///tmp/huge.md"
    line = "All work and no play makes Jack a dull boy. " * 4 + "\n"
    text = line * (10_000_000 // len(line))
    open_doc(client, uri, text)
    n = text.count("\n")
    await command(client, "tinymorph.status")  # the open is processed
    started = time.monotonic()
    for i, ch in enumerate("And so it went on"):  # typed mid-document, then at the end
        edit(client, uri, n // 2, i, ch)
    await command(client, "tinymorph.status")  # answered after all 17 edits were applied
    typing_s = time.monotonic() - started
    assert typing_s < 2.0, f"17 keystrokes in a 10 MB document took {typing_s:.2f} s of server time"
    version = edit(client, uri, n, 0, "And so")
    hint = await wait_hint(client, uri, version)
    assert hint.position == types.Position(n, 6)
    assert time.monotonic() - started < 30
    assert (await command(client, "tinymorph.status"))["state"] == "ready"


async def test_steering_commands(client: LanguageClient):
    assert await command(client, "tinymorph.steer.list") == []
    try:
        hits = await command(client, "tinymorph.features.search", "weather", 3)
    except JsonRpcException as exc:  # no SAE with labels installed: a clear error, never made-up results
        assert "not available" in str(exc)
    else:
        assert isinstance(hits, list) and all({"id", "label", "topTokens", "maxActivation"} <= set(h) for h in hits)
    # a feature the tiny model cannot use is refused up front instead of breaking every suggestion
    with pytest.raises(JsonRpcInvalidParams):
        await command(client, "tinymorph.steer.set", {"feature": "nosuchsae:1", "strength": 1.0})
    assert await command(client, "tinymorph.steer.list") == []
    compare = await command(client, "tinymorph.steer.compare", {"text": "The sea was"})
    assert set(compare) == {"steered", "unsteered"}


# -- servers of their own ----------------------------------------------------------------------------------


@pytest_lsp.fixture(scope="module",
                    config=ClientServerConfig(server_command=[TINYMORPH, "lsp", "--model", "/nonexistent/model"],
                                              server_env=SERVER_ENV))
async def broken(lsp_client: LanguageClient):
    await start(lsp_client, {"model": "ignored: the --model flag wins"})
    yield
    await lsp_client.shutdown_session()


async def test_model_error_is_a_state_not_a_crash(broken: LanguageClient):
    st = await wait_ready(broken, "error")
    assert "/nonexistent/model" in st["model"] and st["message"]
    uri = "file:///tmp/err.md"
    open_doc(broken, uri, "Nothing")
    edit(broken, uri, 0, 7, " here")
    assert await hints(broken, uri) == []
    result = await broken.text_document_inline_completion_async(types.InlineCompletionParams(
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(0, 12)))
    assert not result.items
    assert (await command(broken, "tinymorph.status"))["state"] == "error"
    # a model setting changed: the server tries again (and fails again, the --model flag still wins)
    statuses = broken.recorder.statuses  # type: ignore[attr-defined]
    seen = len(statuses)
    broken.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"tinymorph": {"contextTokens": 512, "model": "also ignored"}}))
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and [s["state"] for s in statuses[seen:]][-2:] != ["loading", "error"]:
        await asyncio.sleep(0.1)
    assert [s["state"] for s in statuses[seen:]][-2:] == ["loading", "error"], statuses[seen:]
    assert statuses[-1]["model"] == "/nonexistent/model"


@pytest_lsp.fixture(scope="module", config=ClientServerConfig(server_command=[TINYMORPH, "lsp"], server_env=SERVER_ENV))
async def real(lsp_client: LanguageClient):
    await start(lsp_client, {"maxTokens": 16, "stop": "sentence"})
    yield
    await lsp_client.shutdown_session()


@pytest.mark.slow
async def test_real_default_model_continues_english(real: LanguageClient):
    st = await wait_ready(real)
    assert st["model"] == "default"
    uri = "file:///tmp/real.md"
    open_doc(real, uri, "The quick brown fox jumps over the lazy dog. The dog")
    version = edit(real, uri, 0, 52, " was")
    metrics = await wait_done(real, uri, version)
    hint = await wait_hint(real, uri, version)
    words = [w for w in metrics["text"].split() if w.isalpha()]
    assert words and hint.label.strip(), metrics
    print(f"real model: {metrics['text']!r} ttft {metrics['ttftMs']} ms, {metrics['tokensPerSecond']} tok/s")


# -- config from the workspace, reloaded; bad steering falls back (issue 11 items 1-3) -------------------


def make_tiny_sae(folder: Path, d_in: int = 64, d_sae: int = 32, layer: int = 1) -> Path:
    """A random sae-lens TopK SAE that fits the tiny Llama's residual stream."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=4)
    cfg.metadata.hook_name = f"model.layers.{layer}"
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    sae.save_model(str(folder))
    return folder


WORKSPACE_TOML = """# the writer's own notes: must survive steering edits
[[sae]]
name = "mine"
path = "{sae}"

[completion]
max_tokens = 3  # short on purpose
stop = "none"

[[steer]]
feature = "mine:3"
strength = {strength}
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("workspace")
    make_tiny_sae(folder / "sae")
    (folder / "tinymorph.toml").write_text(WORKSPACE_TOML.format(sae="sae", strength=0.5))
    return folder


@pytest_lsp.fixture(scope="module", config=ClientServerConfig(server_command=[TINYMORPH, "lsp"], server_env=SERVER_ENV))
async def ws_client(lsp_client: LanguageClient, tiny_model_dir, workspace: Path):
    """A server started outside the workspace (the test's cwd), told the workspace at initialize."""
    rec = Recorder(lsp_client)
    lsp_client.recorder = rec  # type: ignore[attr-defined]
    await lsp_client.initialize_session(types.InitializeParams(
        capabilities=capabilities(), initialization_options={"model": str(tiny_model_dir), "debounceMs": 30},
        workspace_folders=[types.WorkspaceFolder(uri=workspace.as_uri(), name="ws")]))
    await wait_ready(lsp_client)
    yield
    await lsp_client.shutdown_session()


async def wait_status(client: LanguageClient, check, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = await command(client, "tinymorph.status")
        if check(st):
            return st
        assert time.monotonic() < deadline, st
        await asyncio.sleep(0.1)


async def test_workspace_config_is_used_wherever_the_server_started(ws_client: LanguageClient, workspace: Path):
    assert Path.cwd() != workspace
    # the workspace's [[sae]] resolves: its [[steer]] entry is in effect
    st = await wait_status(ws_client, lambda s: s["steering"])
    assert [e["feature"] for e in st["steering"]] == ["mine:3"] and st["steeringError"] is None
    # steer.set and features.show know the workspace's SAE too
    calibrations = Path(os.environ["TINYMORPH_CACHE_DIR"]) / "calibrations.json"

    def calibrated(feature: str) -> list[float]:
        data = json.loads(calibrations.read_text()) if calibrations.is_file() else {}
        return [v for k, v in data.items() if f"|{feature}@" in k]

    assert not calibrated("mine:4")
    assert [e["feature"] for e in await command(ws_client, "tinymorph.steer.set",
                                                {"feature": "mine:4", "strength": 1.0})] == ["mine:3", "mine:4"]
    # strength 1 is the calibrated push in the editor too: setting it calibrated the feature (once)
    assert len(calibrated("mine:4")) == 1 and len(calibrated("mine:3")) == 1  # mine:3: when the config was read
    try:
        await command(ws_client, "tinymorph.features.show", "mine:4")
    except JsonRpcException as exc:  # no labels for a random SAE is fine; not knowing "mine" is not
        assert "unknown SAE" not in str(exc)
    # the change went to the workspace's file, comments and all
    text = (workspace / "tinymorph.toml").read_text()
    assert "mine:4" in text and "# the writer's own notes" in text and "# short on purpose" in text
    assert not list(workspace.glob(".*.tmp"))
    # and the [completion] values apply: 3 tokens, no stop rule
    uri = "file:///tmp/ws.md"
    version, metrics = await typed_suggestion(ws_client, uri, "The garden was")
    assert metrics["tokensGenerated"] == 3 and [e["feature"] for e in metrics["steering"]] == ["mine:3", "mine:4"]


async def test_config_edits_are_picked_up_and_a_broken_file_changes_nothing(ws_client: LanguageClient,
                                                                            workspace: Path):
    path = workspace / "tinymorph.toml"
    path.write_text(WORKSPACE_TOML.format(sae="sae", strength=0.25))
    st = await wait_status(ws_client, lambda s: [e["strength"] for e in s["steering"]] == [0.25], timeout=8)
    shown = len(ws_client.messages)
    path.write_text("[completion\nmax_tokens = ")  # half-way through an edit
    client_settings = types.DidChangeConfigurationParams(settings={"tinymorph": {}})
    ws_client.workspace_did_change_configuration(client_settings)  # a forced reload
    st = await wait_status(ws_client, lambda s: s["configError"])
    assert "not valid TOML" in st["configError"] and [e["strength"] for e in st["steering"]] == [0.25]
    await asyncio.sleep(2.5)  # polled again meanwhile: reported once, not once per poll
    assert len([m for m in ws_client.messages[shown:] if "config ignored" in m.message]) == 1
    _, metrics = await typed_suggestion(ws_client, "file:///tmp/ws-broken.md", "Still")
    assert metrics["tokensGenerated"] == 3  # the last good [completion] values, not the defaults
    path.write_text(WORKSPACE_TOML.format(sae="sae", strength=0.5))
    ws_client.workspace_did_change_watched_files(types.DidChangeWatchedFilesParams(
        changes=[types.FileEvent(uri=path.as_uri(), type=types.FileChangeType.Changed)]))
    await wait_status(ws_client, lambda s: s["configError"] is None and [e["strength"] for e in s["steering"]] == [0.5])


async def test_bad_steer_entry_is_reported_once_and_suggestions_go_on(ws_client: LanguageClient, workspace: Path):
    path = workspace / "tinymorph.toml"
    shown = len(ws_client.messages)
    path.write_text(WORKSPACE_TOML.format(sae="sae", strength=0.5).replace("mine:3", "mine:999"))
    st = await wait_status(ws_client, lambda s: s["steeringError"])
    assert "mine:999" in st["steeringError"] and st["message"].startswith("steering error:")
    assert st["state"] == "ready" and [e["feature"] for e in st["steering"]] == ["mine:3"]  # last good plan
    uri = "file:///tmp/ws-steer.md"
    open_doc(ws_client, uri, "Once")
    for i in range(3):  # keystrokes keep getting suggestions (made with the last good plan)
        version = edit(ws_client, uri, 0, 4 + i, "!")
        metrics = await wait_done(ws_client, uri, version)
        assert [e["feature"] for e in metrics["steering"]] == ["mine:3"]
    errors = [m for m in ws_client.messages[shown:] if "steering error" in m.message]
    assert len(errors) == 1 and errors[0].type == types.MessageType.Error, ws_client.messages[shown:]
    # fixing the file recovers without a restart
    path.write_text(WORKSPACE_TOML.format(sae="sae", strength=0.5).replace("mine:3", "mine:5"))
    st = await wait_status(ws_client, lambda s: s["steeringError"] is None and s["steering"][0]["feature"] == "mine:5")


async def test_workspace_folders_can_change(ws_client: LanguageClient, workspace: Path, tmp_path: Path):
    """A folder added in front with its own tinymorph.toml: its config takes over (it comes first)."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "tinymorph.toml").write_text(f'[[sae]]\nname = "mine"\npath = "{workspace / "sae"}"\n\n'
                                         '[[steer]]\nfeature = "mine:6"\nstrength = 0.5\n')
    ws_client.workspace_did_change_workspace_folders(types.DidChangeWorkspaceFoldersParams(
        event=types.WorkspaceFoldersChangeEvent(
            added=[types.WorkspaceFolder(uri=other.as_uri(), name="other")],
            removed=[types.WorkspaceFolder(uri=workspace.as_uri(), name="ws")])))
    await wait_status(ws_client, lambda s: [e["feature"] for e in s["steering"]] == ["mine:6"])


# -- JSON-RPC strictness (issue 11 item 9), raw bytes on the server's stdin ------------------------------


class RawServer:
    """A server subprocess spoken to in raw bytes, to send what no well-behaved client would."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    @classmethod
    async def start(cls, *args: str, stderr=asyncio.subprocess.DEVNULL) -> RawServer:
        proc = await asyncio.create_subprocess_exec(
            TINYMORPH, "lsp", *(args or ("--model", "/nonexistent/model")), env=SERVER_ENV,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr)
        return cls(proc)

    def send_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data)

    def send(self, message) -> None:
        import json

        body = json.dumps(message).encode()
        self.send_raw(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    async def receive(self, timeout: float = 20.0) -> dict:
        """The next message that is not a notification or a request from the server."""
        import json

        while True:
            length = None
            while True:
                line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
                assert line, "server closed its output"
                if line == b"\r\n":
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            message = json.loads(await asyncio.wait_for(self.proc.stdout.readexactly(length), timeout))
            if "method" not in message:
                return message

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}, "processId": None}}


async def test_json_rpc_errors_are_answered_and_the_server_never_goes_deaf():
    server = await RawServer.start()
    try:
        server.send({"jsonrpc": "2.0", "id": 0, "method": "textDocument/hover", "params": {
            "textDocument": {"uri": "file:///x"}, "position": {"line": 0, "character": 0}}})
        assert (await server.receive())["error"]["code"] == -32002  # before initialize
        server.send(INIT)
        assert "capabilities" in (await server.receive())["result"]
        server.send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
        status = {"jsonrpc": "2.0", "method": "workspace/executeCommand",
                  "params": {"command": "tinymorph.status", "arguments": []}}
        # a frame without Content-Length, then a good request: an error, and the good one is answered
        server.send_raw(b'Content-Type: application/json\r\n\r\n{"jsonrpc": "2.0", "id": 2, "method": "x"}')
        server.send({**status, "id": 3})
        answers = [await server.receive(), await server.receive()]
        assert answers[0]["error"]["code"] == -32700 and answers[0]["id"] is None
        assert answers[1]["id"] == 3 and "state" in answers[1]["result"]
        # a Content-Length that is too short
        body = b'{"jsonrpc": "2.0", "id": 4, "method": "workspace/executeCommand", "params": {}}'
        server.send_raw(b"Content-Length: 20\r\n\r\n" + body)
        server.send({**status, "id": 5})
        answers = [await server.receive(), await server.receive()]
        assert answers[0]["error"]["code"] == -32700 and answers[1]["id"] == 5
        # not JSON; not a request; an id that is an object; params that are a string
        server.send_raw(b"Content-Length: 9\r\n\r\n{not json")
        assert (await server.receive())["error"]["code"] == -32700
        server.send({"id": 6, "method": "workspace/executeCommand"})
        answer = await server.receive()
        assert answer["id"] == 6 and answer["error"]["code"] == -32600 and "jsonrpc" in answer["error"]["message"]
        server.send({"jsonrpc": "2.0", "id": {"n": 7}, "method": "workspace/executeCommand", "params": {}})
        answer = await server.receive()
        assert answer["error"]["code"] == -32600 and answer["id"] is None
        server.send({"jsonrpc": "2.0", "id": 8, "method": "textDocument/hover", "params": "everything"})
        assert (await server.receive())["error"]["code"] == -32602
        # after shutdown: -32600 for requests
        server.send({"jsonrpc": "2.0", "id": 9, "method": "shutdown"})
        assert (await server.receive())["id"] == 9
        server.send({**status, "id": 10})
        answer = await server.receive()
        assert answer["id"] == 10 and answer["error"]["code"] == -32600
        server.send({"jsonrpc": "2.0", "method": "exit"})
        assert await asyncio.wait_for(server.proc.wait(), 10) == 0
    finally:
        await server.close()


# -- lone surrogates (issue 11 item 8) --------------------------------------------------------------------


async def test_lone_surrogates_are_applied_without_error_popups(client: LanguageClient):
    uri = "file:///tmp/surrogate.md"
    open_doc(client, uri, "abc")
    shown = len(client.messages)
    _versions[uri] += 1
    # what a client sends for a JS string with a lone surrogate: "\ud800" in the JSON
    client.protocol._send_data({"jsonrpc": "2.0", "method": types.TEXT_DOCUMENT_DID_CHANGE, "params": {
        "textDocument": {"uri": uri, "version": _versions[uri]},
        "contentChanges": [{"range": {"start": {"line": 0, "character": 3}, "end": {"line": 0, "character": 3}},
                            "text": " \ud800"}]}})
    for i in range(3):  # keystrokes after it: applied where the client has them
        version = edit(client, uri, 0, 5 + i, "x")
    hint = await wait_hint(client, uri, version)
    assert hint.position == types.Position(0, 8)  # "abc " + 1 unit for the lone surrogate + "xxx"
    assert client.messages[shown:] == []  # no error popups


# -- TCP: one session per editor, token beyond loopback, HTTP lives on (issue 11 item 4, issue 12) --------


async def _read_addresses(proc: asyncio.subprocess.Process, want: tuple[str, ...]) -> dict[str, str]:
    found: dict[str, str] = {}
    while set(found) != set(want):
        line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
        assert line, "server exited"
        for key, marker in (("http", "HTTP API on "), ("tcp", "LSP on tcp://")):
            if marker in line:
                found[key] = line.split(marker)[1].strip()
    return found


async def tcp_client(port: int, recorder: bool = True) -> LanguageClient:
    c = LanguageClient()
    if recorder:
        c.recorder = Recorder(c)  # type: ignore[attr-defined]
    await c.start_tcp("127.0.0.1", port)
    return c


async def test_tcp_sessions_are_separate_and_http_outlives_editors(tiny_model_dir):
    import httpx

    proc = await asyncio.create_subprocess_exec(
        TINYMORPH, "lsp", "--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--model", str(tiny_model_dir),
        env=SERVER_ENV, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        addrs = await _read_addresses(proc, ("http", "tcp"))
        port = int(addrs["tcp"].rsplit(":", 1)[1])
        # with --http the model loads at start: the API is ready before any editor connects
        deadline = time.monotonic() + TIMEOUT
        async with httpx.AsyncClient(base_url=addrs["http"]) as http:
            while (await http.get("/healthz")).status_code != 200:
                assert time.monotonic() < deadline, "HTTP API never became ready without an editor"
                await asyncio.sleep(0.2)
        a, b = await tcp_client(port), await tcp_client(port)
        for c in (a, b):
            await c.initialize_session(types.InitializeParams(
                capabilities=capabilities(), initialization_options={"debounceMs": 10, "maxTokens": 4},
                root_uri=Path(ISOLATED).as_uri()))
        uri = "file:///tmp/shared-name.md"
        for c, text in ((a, "Alpha text"), (b, "Bravo text is longer")):
            c.text_document_did_open(types.DidOpenTextDocumentParams(
                types.TextDocumentItem(uri=uri, language_id="markdown", version=1, text=text)))
        for c, col in ((a, 10), (b, 20)):
            c.text_document_did_change(types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
                content_changes=[types.TextDocumentContentChangePartial(
                    range=types.Range(types.Position(0, col), types.Position(0, col)), text="!")]))
        ha, hb = await wait_hint(a, uri, 2), await wait_hint(b, uri, 2)
        assert ha.position == types.Position(0, 11) and hb.position == types.Position(0, 21)  # each its own text
        assert all(m["uri"] == uri for m in a.recorder.metrics + b.recorder.metrics)
        # B leaves (shutdown + exit): A, a newcomer and the HTTP API go on
        await b.shutdown_session()
        c = await tcp_client(port)
        await c.initialize_session(types.InitializeParams(capabilities=capabilities(),
                                                          root_uri=Path(ISOLATED).as_uri()))
        assert (await command(c, "tinymorph.status"))["state"] == "ready"
        assert (await command(a, "tinymorph.status"))["state"] == "ready"
        await a.shutdown_session()
        await c.shutdown_session()
        await asyncio.sleep(0.3)
        assert proc.returncode is None
        async with httpx.AsyncClient(base_url=addrs["http"]) as http:
            assert (await http.get("/healthz")).status_code == 200
    finally:
        proc.kill()
        await proc.wait()


async def test_stdio_exit_leaves_the_http_api_running(tiny_model_dir):
    import httpx

    server = await RawServer.start("--http", "127.0.0.1:0", "--model", str(tiny_model_dir),
                                   stderr=asyncio.subprocess.PIPE)
    try:
        url = (await _read_addresses(server.proc, ("http",)))["http"]
        server.send(INIT)
        await server.receive()
        server.send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
        server.send({"jsonrpc": "2.0", "id": 2, "method": "shutdown"})
        assert (await server.receive())["id"] == 2
        server.send({"jsonrpc": "2.0", "method": "exit"})
        server.proc.stdin.close()
        await asyncio.sleep(1.0)
        assert server.proc.returncode is None
        deadline = time.monotonic() + TIMEOUT
        async with httpx.AsyncClient(base_url=url) as http:
            while (await http.get("/healthz")).status_code != 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
    finally:
        await server.close()


async def test_tcp_beyond_loopback_needs_a_token(tiny_model_dir):
    env = {k: v for k, v in SERVER_ENV.items() if k != "TINYMORPH_TOKEN"}
    refused = await asyncio.create_subprocess_exec(
        TINYMORPH, "lsp", "--tcp", "0.0.0.0:0", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(refused.communicate(), 60)
    finally:  # a server that did not refuse must not outlive the test
        if refused.returncode is None:
            refused.kill()
            await refused.wait()
    assert refused.returncode != 0 and b"token" in err
    proc = await asyncio.create_subprocess_exec(
        TINYMORPH, "lsp", "--tcp", "127.0.0.1:0", "--token", "s3cret", "--model", str(tiny_model_dir),
        env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        port = int((await _read_addresses(proc, ("tcp",)))["tcp"].rsplit(":", 1)[1])
        stranger = await tcp_client(port, recorder=False)
        with pytest.raises(JsonRpcException, match="token"):
            await stranger.initialize_session(types.InitializeParams(capabilities=capabilities()))
        friend = await tcp_client(port)
        await friend.initialize_session(types.InitializeParams(
            capabilities=capabilities(), initialization_options={"token": "s3cret"}))
        assert (await command(friend, "tinymorph.status"))["state"] in ("loading", "ready")
        await friend.shutdown_session()
    finally:
        proc.kill()
        await proc.wait()
