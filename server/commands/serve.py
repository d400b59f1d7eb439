"""`tinymorph serve`: the HTTP API (OpenAI-compatible completions, steering, metrics) on uvicorn."""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import UserError
from .common import add_model_options, progress_printer


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the HTTP API (POST /v1/completions, /v1/steering, /metrics, ...)")
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1; anything else requires a token)"
    )
    p.add_argument("--port", type=int, default=8765)
    p.add_argument(
        "--token", default=None, help="require 'Authorization: Bearer TOKEN' (default: $TINYMORPH_TOKEN)"
    )
    p.add_argument("--context-tokens", type=int, default=1024, help="prompt window in tokens")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..http_server import TOKEN_ENV, check_exposure, serve
    from ..runtime import ModelSettings, Runtime

    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be 0..65535")
    try:
        check_exposure(args.host, token)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    runtime = Runtime()
    settings = ModelSettings(
        model=args.model or "default",
        dtype=args.dtype or "auto",
        threads=args.threads,
        context_tokens=args.context_tokens,
    )
    # load in the background: /healthz answers 503 "loading" until the model is ready
    runtime.load(settings, progress=progress_printer(args.quiet))
    try:
        serve(runtime, args.host, args.port, token)
    except OSError as exc:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    finally:
        runtime.scheduler.stop()
        if runtime.state == "loading":
            # Ctrl-C mid-load: interpreter shutdown under a torch loader thread aborts the process
            # ("terminate called without an active exception"); leave without finalizing instead.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
    return 0
