"""`tinymorph model info|convert`: where the model comes from and what it is."""

from __future__ import annotations

import argparse
import json

from ...steering import model as model_loading
from .common import DTYPE_CHOICES, progress_printer


def register(sub) -> None:
    p = sub.add_parser("model", help="inspect or convert a model")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    info = msub.add_parser("info", help="show where a model is, its size, dtype and speed-relevant facts")
    info.add_argument("model", nargs="?", default="default")
    info.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=run_info)
    convert = msub.add_parser("convert", help="dequantize a GGUF model once into the local cache")
    convert.add_argument("model", nargs="?", default="default")
    convert.add_argument("--quiet", action="store_true")
    convert.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    folder = model_loading.local_folder(args.model, progress_printer(args.quiet))
    print(folder)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ...steering.engine import Engine

    source = model_loading.resolve_source(args.model)
    engine = Engine.load(args.model, dtype=args.dtype, progress=progress_printer(quiet=args.json))
    facts = {
        **engine.info.to_dict(),
        "source": str(source.folder / source.gguf_file) if source.is_gguf else str(source.folder),
        "converted_cache": str(model_loading.converted_folder(source)) if source.is_gguf else None,
        "cpu_bf16": model_loading.cpu_has_bf16(),
        "context_tokens": engine.context.max_tokens,
    }
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        width = max(map(len, facts))
        for key, value in facts.items():
            print(f"{key:<{width}}  {value}")
    return 0
