"""`tinymorph lsp`: the language server on stdio (default) or TCP, optionally with the HTTP API.

`--http ADDR` serves the HTTP API from the same process and the same `Runtime`, so editor and HTTP
clients share one loaded model, one steering plan and one scheduler (editor keystrokes first).
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..cli import UserError
from .common import add_model_options


def register(sub) -> None:
    p = sub.add_parser("lsp", help="run the language server (stdio by default)")
    p.add_argument("--stdio", action="store_true", help="speak LSP on stdin/stdout (the default; many clients pass it)")
    p.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP instead of stdio")
    p.add_argument("--http", metavar="ADDR", help="also serve the HTTP API on ADDR (HOST:PORT), same model")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="server log on stderr (default: WARNING)")
    add_model_options(p)
    p.set_defaults(func=run)


def _check_tcp(value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"--tcp {value!r}: expected HOST:PORT, e.g. 127.0.0.1:2087")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tcp:
        _check_tcp(args.tcp)
    from ..lsp import serve
    from ..runtime import Runtime

    runtime = Runtime()
    if args.http:
        try:
            from ..http_server import start_http_server
        except ImportError as exc:
            raise UserError(f"--http: the HTTP API is not available ({exc})") from None
        try:
            handle = start_http_server(runtime, args.http)
        except (OSError, ValueError) as exc:
            raise UserError(f"--http {args.http}: {exc}") from None
        print(f"[tinymorph] HTTP API on {handle.url}", file=sys.stderr, flush=True)
    return serve(args, runtime)
