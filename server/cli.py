"""The one `tinymorph` command. Subcommands live in `tinymorph.server.commands.*`.

Every handler returns an exit code; expected failures (missing model, bad path, bad position,
bad config) are printed as one line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinymorph", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..steering.model import ModelError

    try:
        return int(args.func(args) or 0)
    except (UserError, ModelError, FileNotFoundError, ValueError) as exc:
        print(f"tinymorph: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # run the imported module's main, so exception classes are the ones the subcommands raise
    from tinymorph.server.cli import main as _main

    sys.exit(_main())
