"""`tinymorph complete`: continue a file (or stdin) at a position and print the timings."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ...steering.generate import STOP_RULES, GenerationOptions
from ..cli import UserError
from ..documents import Document, PositionError
from .common import add_model_options, load_engine


def register(sub) -> None:
    p = sub.add_parser("complete", help="continue text at a position and print it with its timings")
    p.add_argument("file", nargs="?", default="-", help="text file, or - for standard input")
    p.add_argument("--at", metavar="LINE:COL", help="1-based line and column (default: end of text)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--stop", choices=STOP_RULES, default="sentence")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_model_options(p)
    p.set_defaults(func=run)


def read_text(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    path = Path(name)
    if not path.is_file():
        raise UserError(f"{name}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{name}: not UTF-8 text ({exc.reason})") from None


def parse_position(text: str, at: str | None) -> int:
    if at is None:
        return len(text)
    try:
        line_s, _, col_s = at.partition(":")
        line, col = int(line_s), int(col_s or 1)
    except ValueError:
        raise UserError(f"--at {at!r}: expected LINE:COL, e.g. 3:10") from None
    try:
        return Document("cli", text, encoding="utf-32").offset_at(line - 1, col - 1, strict=True)
    except PositionError:
        lines = text.count("\n") + 1
        raise UserError(f"--at {at} is past the end of the text ({lines} lines)") from None


def run(args: argparse.Namespace) -> int:
    from ...steering.engine import CompletionRequest

    text = read_text(args.file)
    offset = parse_position(text, args.at)
    options = GenerationOptions(max_tokens=args.max_tokens, stop=args.stop, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    options.validate()
    engine = load_engine(args)
    request = CompletionRequest(text=text[:offset], doc_id=str(args.file), options=options)
    if args.json:
        result = engine.complete(request)
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return 0
    result = engine.complete(request, on_token=lambda e: print(e.delta, end="", flush=True))
    t = result.timings
    print(file=sys.stdout)
    print(f"[ttft {t.ttft_ms:.0f} ms | prefill {t.prefill_ms:.0f} ms ({t.tokens_prefilled} tokens, "
          f"{t.tokens_reused} reused) | {t.decode_tokens_per_s:.1f} tok/s | {t.tokens_generated} tokens | "
          f"stop: {result.stop_reason}]", file=sys.stderr)
    return 0
