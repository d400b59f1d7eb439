"""`workspace/executeCommand`: the tinymorph.* commands (docs/protocol.md, "Commands").

Each command checks its arguments (a bad one is `CommandError`, -32602, with a message for the
user), then asks the session or the engine. Steering commands write the config file in effect
(the workspace's tinymorph.toml, else the user's config), so steering survives a restart and
every front end (CLI, other editors) sees the same mixing desk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams

from ..steering.engine import CompletionRequest
from ..steering.generate import Completion, GenerationOptions
from ..steering.steering import SteeringEntry, SteeringPlan
from .documents import Document, sanitize
from .lsp_session import TinymorphServer
from .scheduler import PRIORITY_EDITOR, Job
from .suggestions import accept_part

log = logging.getLogger(__name__)

APPLY_EDIT_TIMEOUT_S = 10.0
COMMANDS = (
    "tinymorph.accept", "tinymorph.acceptWord", "tinymorph.acceptLine", "tinymorph.dismiss",
    "tinymorph.toggle", "tinymorph.status", "tinymorph.features.search", "tinymorph.features.show",
    "tinymorph.steer.list", "tinymorph.steer.set", "tinymorph.steer.remove", "tinymorph.steer.clear",
    "tinymorph.steer.compare", "tinymorph.accepted",
)


class CommandError(JsonRpcInvalidParams):
    """A command's arguments are wrong; the message goes to the user."""


class RequestFailed(JsonRpcException):
    """LSP's RequestFailed: the request was fine but cannot be served now (the message says why)."""

    CODE = -32803


def position(doc: Document, offset: int) -> types.Position:
    line, character = doc.position_at(offset)
    return types.Position(line=line, character=character)


def uri_arg(args: tuple) -> str:
    value = args[0] if args else None
    if isinstance(value, dict):
        value = value.get("uri")
    if not isinstance(value, str) or not value:
        raise CommandError("expected a document URI as the first argument ([uri] or [{\"uri\": …}])")
    return value


def register(server: TinymorphServer) -> None:
    """Register every command on `server` (pygls features are per server instance)."""

    def command(name: str) -> Callable:
        return server.command(name)

    @command("tinymorph.accept")
    async def accept_all(ls: TinymorphServer, *args):
        return await _accept(ls, args, "all")

    @command("tinymorph.acceptWord")
    async def accept_word(ls: TinymorphServer, *args):
        return await _accept(ls, args, "word")

    @command("tinymorph.acceptLine")
    async def accept_line(ls: TinymorphServer, *args):
        return await _accept(ls, args, "line")

    @command("tinymorph.dismiss")
    def dismiss(ls: TinymorphServer, *args):
        dropped = ls.drop(uri_arg(args))
        ls.refresh_hints()
        return {"dismissed": dropped}

    @command("tinymorph.toggle")
    def toggle(ls: TinymorphServer, *args):
        if args and not isinstance(args[0], bool):
            raise CommandError("tinymorph.toggle takes [] or [true|false]")
        ls.set_enabled(args[0] if args else not ls.settings.enabled)
        return {"enabled": ls.settings.enabled}

    @command("tinymorph.status")
    def status(ls: TinymorphServer, *args):
        return ls.status()

    @command("tinymorph.accepted")
    def accepted(ls: TinymorphServer, *args):
        ls.stats["accepted"] += 1
        return None

    @command("tinymorph.features.search")
    async def features_search(ls: TinymorphServer, *args):
        if not args or not isinstance(args[0], str):
            raise CommandError("tinymorph.features.search takes [query, limit?]")
        limit = args[1] if len(args) > 1 else 10
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 200:
            raise CommandError("limit must be an integer between 1 and 200")
        return await asyncio.to_thread(ls.feature_searches.run, lambda superseded: _feature_call(
            ls, "search_features", args[0], limit, superseded=superseded))

    @command("tinymorph.features.show")
    async def features_show(ls: TinymorphServer, *args):
        if not args or not isinstance(args[0], str):
            raise CommandError("tinymorph.features.show takes [id]")
        return await asyncio.to_thread(_feature_call, ls, "show_feature", args[0])

    @command("tinymorph.steer.list")
    def steer_list(ls: TinymorphServer, *args):
        return ls.runtime.steering.describe()

    @command("tinymorph.steer.set")
    async def steer_set(ls: TinymorphServer, *args):
        entry = _steer_entry(args[0] if args else None)
        entries = [e for e in ls.runtime.steering.entries if e.feature != entry.feature] + [entry]
        plan = SteeringPlan(tuple(entries))
        await _check_plan(ls, plan)
        return await _save_plan(ls, plan, "set", entry)

    @command("tinymorph.steer.remove")
    async def steer_remove(ls: TinymorphServer, *args):
        if not args or not isinstance(args[0], str):
            raise CommandError("tinymorph.steer.remove takes [feature id]")
        entries = [e for e in ls.runtime.steering.entries if e.feature != args[0]]
        return await _save_plan(ls, SteeringPlan(tuple(entries)), "remove", args[0])

    @command("tinymorph.steer.clear")
    async def steer_clear(ls: TinymorphServer, *args):
        return await _save_plan(ls, SteeringPlan(), "clear", None)

    @command("tinymorph.steer.compare")
    async def steer_compare(ls: TinymorphServer, *args):
        return await _compare(ls, args)


async def _accept(ls: TinymorphServer, args: tuple, kind: str) -> dict[str, Any]:
    uri = uri_arg(args)
    found = ls.view(uri)
    if found is None:
        return {"applied": False, "text": ""}
    doc, v = found
    part = accept_part(v.rest, kind)  # type: ignore[arg-type]
    pos = position(doc, v.cursor)
    edit = types.TextEdit(range=types.Range(start=pos, end=pos), new_text=part)
    if ls.document_changes:
        ws_edit = types.WorkspaceEdit(document_changes=[types.TextDocumentEdit(
            text_document=types.OptionalVersionedTextDocumentIdentifier(uri=uri, version=doc.version),
            edits=[edit])])
    else:
        ws_edit = types.WorkspaceEdit(changes={uri: [edit]})
    try:
        result = await asyncio.wait_for(ls.workspace_apply_edit_async(
            types.ApplyWorkspaceEditParams(edit=ws_edit, label="tinymorph: accept suggestion")),
            APPLY_EDIT_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - the client refused or never answered
        ls.log(f"applyEdit failed: {exc}", types.MessageType.Warning)
        return {"applied": False, "text": part}
    applied = bool(getattr(result, "applied", False))
    if applied:
        ls.stats["accepted"] += 1
    return {"applied": applied, "text": part}


def _feature_call(ls: TinymorphServer, name: str, *args, **kwargs) -> Any:
    """Run a function of steering/features.py with the session's feature library."""
    try:
        from ..steering import features
        from ..steering.steering import SteeringError
    except ImportError as exc:
        raise RequestFailed(f"feature search not available yet ({exc})") from None
    fn = getattr(features, name, None)
    if fn is None:
        raise RequestFailed("feature search not available yet")
    library = _library(ls)
    engine = ls.runtime.engine
    local = engine is not None and not getattr(engine, "remote", False)  # a remote engine cannot read activations
    extra = {"model": engine} if name == "search_features" and local else {}
    try:
        return fn(library, *args, **extra, **kwargs)
    except SteeringError as exc:
        raise RequestFailed(f"feature search not available: {exc}") from None
    except (OSError, KeyError, ValueError) as exc:
        raise RequestFailed(f"feature search failed: {exc}") from None


def _library(ls: TinymorphServer):
    """The library steering uses (so search and steering share loaded SAEs), else one from the
    workspace's config (never the process's working directory)."""
    library = ls.runtime.feature_library()
    if library is not None:
        return library
    from ..steering.config import library_from_config

    try:
        return library_from_config(ls.workspace_config.load())
    except Exception as exc:  # noqa: BLE001
        raise RequestFailed(f"feature search not available: config: {exc}") from None


def _steer_entry(raw: Any) -> SteeringEntry:
    """A validated steering entry from `{"feature", "strength", "mode"?, "layer"?}`."""
    if not isinstance(raw, dict) or not isinstance(raw.get("feature"), str):
        raise CommandError('tinymorph.steer.set takes [{"feature": id, "strength": number, '
                           '"mode"?, "layer"?}]')
    from ..steering.config import ConfigError, entry_from_dict

    if isinstance(raw.get("strength"), bool) or not isinstance(raw.get("strength"), int | float):
        raise CommandError(f"strength for {raw['feature']} must be a number")
    try:
        return entry_from_dict(raw, "tinymorph.steer.set")
    except (ConfigError, ValueError) as exc:
        raise CommandError(str(exc)) from None


async def _check_plan(ls: TinymorphServer, plan: SteeringPlan) -> None:
    """Resolve with the loaded engine, so an unknown feature is refused now rather than breaking
    every later suggestion."""
    if not ls.runtime.ready:
        return
    try:
        await asyncio.to_thread(ls.runtime.check_plan, plan)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - e.g. an unreadable SAE file
        raise RequestFailed(f"steering not available: {exc}") from None


async def _save_plan(ls: TinymorphServer, plan: SteeringPlan, op: str, arg: Any) -> list[dict]:
    """Write the change to the config file in effect, then steer with `plan`."""
    from ..steering import config

    target = ls.workspace_config.edit_target()

    def write() -> None:
        if op == "set":
            config.set_steer_entry(target, arg)
        elif op == "remove":
            try:
                config.remove_steer_entry(target, arg)
            except config.ConfigError:
                if target.is_file() and any(e.feature == arg for e in config.load_config(project=target).steer):
                    raise
        else:
            config.clear_steering(target)

    def write_and_read() -> SteeringPlan:
        write()
        return ls.workspace_config.load().plan()  # the file is the source of truth (layering included)

    try:
        plan = await asyncio.to_thread(write_and_read)
    except (config.ConfigError, OSError) as exc:
        raise RequestFailed(f"steering not saved to {target}: {exc}") from None
    ls.note_config_plan(plan)
    ls.steering_error = None
    ls.set_plan(plan)
    ls.log(f"steering saved to {target}")
    return plan.describe()


async def _compare(ls: TinymorphServer, args: tuple) -> dict[str, str]:
    """Continue the same text with and without the current steering."""
    if not ls.runtime.ready:
        raise RequestFailed("the model is not loaded yet")
    arg = args[0] if args else None
    if isinstance(arg, dict) and isinstance(arg.get("text"), str):
        text = sanitize(arg["text"])
        doc_id = "compare"
    else:
        uri = arg if isinstance(arg, str) else (arg.get("uri") if isinstance(arg, dict) else ls.focus)
        doc = ls.docs.get(uri) if uri else None
        if doc is None:
            raise CommandError("tinymorph.steer.compare takes [uri] of an open document or [{\"text\": …}]")
        text = ls.context_before(doc, ls.cursors.get(doc.uri, len(doc)))
        doc_id = doc.uri
    options = GenerationOptions(max_tokens=max(ls.settings.maxTokens, 32), stop=ls.settings.stop,
                                temperature=ls.settings.temperature)
    steered, unsteered = await asyncio.gather(
        _run_job(ls, CompletionRequest(text, doc_id, options, steering=ls.runtime.steering)),
        _run_job(ls, CompletionRequest(text, doc_id, options, steering=SteeringPlan())),
    )
    return {"steered": steered.text, "unsteered": unsteered.text}


async def _run_job(ls: TinymorphServer, request: CompletionRequest) -> Completion:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Completion] = loop.create_future()

    def done(_job: Job, completion: Completion | None, error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is not None or completion is None:
                future.set_exception(RequestFailed(f"generation failed: {error}"))
            else:
                future.set_result(completion)

        loop.call_soon_threadsafe(settle)

    job = ls.runtime.scheduler.submit(Job(request, priority=PRIORITY_EDITOR, on_done=done))
    try:
        return await future
    except asyncio.CancelledError:
        job.cancel.cancel()
        raise
