"""`tinymorph lsp`: the language server on stdio (default) or TCP, optionally with the HTTP API.

`--http ADDR` serves the HTTP API from the same process and the same `Runtime`, so editor and HTTP
clients share one loaded model, one steering plan and one scheduler (editor keystrokes first); with
`--http` the model loads at start, so the API is usable before any editor connects.

`--tcp HOST:PORT` accepts any number of editors, one session each, and goes on accepting after
they disconnect. Like `--http`, it listens beyond loopback only with a token (`--token` or
$TINYMORPH_TOKEN), which editors send as `initializationOptions.token`.

`--engine http://HOST:PORT` keeps documents, suggestions and the editor protocol here and sends
generation to a tinymorph HTTP API (`tinymorph serve`, `tinymorph serve --ray`); the token, if
any, goes to it as `Authorization: Bearer` (server/remote_engine.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..addresses import is_loopback
from ..cli import UserError
from .common import add_model_options

TOKEN_ENV = "TINYMORPH_TOKEN"


def register(sub) -> None:
    p = sub.add_parser("lsp", help="run the language server (stdio by default)")
    p.add_argument("--stdio", action="store_true", help="speak LSP on stdin/stdout (the default; many clients pass it)")
    p.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP instead of stdio (one session per editor)")
    p.add_argument("--http", metavar="ADDR", help="also serve the HTTP API on ADDR (HOST:PORT), same model")
    p.add_argument("--engine", metavar="URL", default=None,
                   help="generate on a tinymorph HTTP API (http://HOST:PORT of `tinymorph serve [--ray]`) "
                        "instead of a model in this process")
    p.add_argument("--token", default=None,
                   help="required beyond loopback, for --tcp (initializationOptions.token) and --http "
                        "(Authorization: Bearer); with --engine also sent to the engine; default: $TINYMORPH_TOKEN")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="server log on stderr (default: WARNING)")
    add_model_options(p)
    p.set_defaults(func=run)


def _check_tcp(value: str, token: str | None) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"--tcp {value!r}: expected HOST:PORT, e.g. 127.0.0.1:2087")
    if not is_loopback(host or "127.0.0.1") and not token:
        raise UserError(f"--tcp {value}: listening on {host} exposes the model and your documents beyond this "
                        f"machine: set a token (--token or ${TOKEN_ENV}); editors send it as "
                        "initializationOptions.token")


def _startup_settings(args: argparse.Namespace):
    """Model settings for a load at start: flags, else the config found from the working directory."""
    from ...steering.config import load_config
    from ..runtime import ModelSettings

    try:
        cfg = load_config()
        model, dtype, threads = cfg.model.path, cfg.model.dtype, cfg.model.threads
        context = cfg.completion.context_tokens
    except Exception:  # noqa: BLE001 - a broken config: defaults (the editor's session reports it)
        model, dtype, threads, context = "default", "auto", None, 1024
    return ModelSettings(model=args.model or model, dtype=args.dtype or dtype, threads=args.threads or threads,
                         context_tokens=context)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.tcp:
        _check_tcp(args.tcp, token)
    from ..lsp import serve
    from ..runtime import Runtime

    if args.engine:
        if args.http:
            raise UserError("--http serves a model in this process; with --engine, clients use the engine's own "
                            "HTTP API (tinymorph serve)")
        if args.model or args.dtype or args.threads:
            raise UserError("--model/--dtype/--threads choose a model in this process; with --engine the "
                            "engine's model answers")
        from ..remote_engine import remote_runtime

        return serve(args, remote_runtime(args.engine, token), token=token)
    runtime = Runtime()
    http_url = None
    if args.http:
        try:
            from ..http_server import start_http_server
        except ImportError as exc:
            raise UserError(f"--http: the HTTP API is not available ({exc})") from None
        try:
            handle = start_http_server(runtime, args.http, token)
        except (OSError, ValueError) as exc:
            raise UserError(f"--http {args.http}: {exc}") from None
        print(f"[tinymorph] HTTP API on {handle.url}", file=sys.stderr, flush=True)
        http_url = handle.url
        runtime.load(_startup_settings(args))  # HTTP clients must not wait for an editor
    return serve(args, runtime, token=token, http_url=http_url)
