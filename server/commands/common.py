"""Options and helpers shared by the subcommands that load a model."""

from __future__ import annotations

import argparse
import sys

from ...steering.config import DTYPES

DTYPE_CHOICES = list(DTYPES)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help='"default" (embedded SmolLM2-135M), an HF folder, a .gguf file or a cached HF id')
    group.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                       help="auto: where the CPU has bf16, bf16 compute with 4-bit weights where the model is "
                       "4-bit already (the default GGUF) and 8-bit elsewhere; else fp32")
    group.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def progress_printer(quiet: bool = False):
    """A progress callback that prints one line per stage on stderr."""

    def report(message: str, fraction: float | None) -> None:
        if not quiet:
            pct = f"{fraction * 100:3.0f}% " if fraction is not None else ""
            print(f"[tinymorph] {pct}{message}", file=sys.stderr, flush=True)

    return report


def load_engine(args: argparse.Namespace, **kwargs):
    """An `Engine` for the model options in `args` (config file values fill what flags leave out)."""
    from ...steering.engine import Engine

    return Engine.load(args.model or "default", dtype=args.dtype or "auto", threads=args.threads,
                       progress=progress_printer(getattr(args, "quiet", False)), **kwargs)
