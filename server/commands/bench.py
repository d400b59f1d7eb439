"""`tinymorph bench`: the speed and memory targets, measured (see tinymorph.steering.bench)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_options, load_engine


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure TTFT, keystroke latency, decode speed and memory vs baselines")
    p.add_argument("--quick", action="store_true", help="fewer repeats and shorter decode")
    p.add_argument("--sizes", default=None, help="comma-separated document sizes in tokens (default 64,256,1024,2048)")
    p.add_argument("--keystrokes", type=int, default=None, help="simulated keystrokes per size (default 30)")
    p.add_argument("--no-baselines", action="store_true", help="skip the transformers baseline")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even if installed")
    p.add_argument("--contention", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the largest size and decode beside a CPU-bound process (default: on)")
    p.add_argument("--text", type=Path, default=None, help="benchmark text (default: shipped prose sample)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for bench.json and bench.png")
    p.add_argument("--quiet", action="store_true")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...steering.bench import BenchConfig, format_table, run_bench, save

    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    if args.sizes:
        try:
            cfg.sizes = tuple(int(s) for s in args.sizes.split(","))
        except ValueError:
            raise ValueError(f"--sizes {args.sizes!r}: expected numbers like 64,256") from None
    if args.keystrokes:
        cfg.keystrokes = args.keystrokes
    cfg.baselines = not args.no_baselines
    cfg.llama_cpp = not args.no_llama_cpp
    cfg.contention = args.contention
    cfg.text_path = args.text
    engine = load_engine(args)
    result = run_bench(engine, cfg, log=(lambda s: None) if args.quiet else print)
    json_path, png = save(result, args.out)
    print()
    print(format_table(result))
    print(f"\nwrote {json_path}" + (f" and {png}" if png else ""))
    return 0
