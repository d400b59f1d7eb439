"""`tinymorph vector from-examples|list|show|remove`: contrastive steering vectors (`vector:NAME`)."""

from __future__ import annotations

import argparse
import json

from ..cli import UserError
from .common import add_model_options, load_engine


def register(sub) -> None:
    p = sub.add_parser("vector", help="build and manage contrastive steering vectors")
    s = p.add_subparsers(dest="vector_command", metavar="ACTION")

    b = s.add_parser("from-examples", help="mean activation difference positive − negative at a layer")
    b.add_argument("name")
    b.add_argument("--positive", required=True, help="text file: examples separated by blank lines")
    b.add_argument("--negative", required=True, help="text file: counter-examples")
    b.add_argument("--layer", type=int, default=15)
    b.add_argument("--force", action="store_true", help="overwrite an existing vector")
    b.add_argument("--quiet", action="store_true")
    add_model_options(b)
    b.set_defaults(func=run_build)

    ls = s.add_parser("list", help="saved vectors")
    ls.set_defaults(func=run_list)
    sh = s.add_parser("show", help="one vector's layer, scale and provenance")
    sh.add_argument("name")
    sh.set_defaults(func=run_show)
    rm = s.add_parser("remove", help="delete a vector")
    rm.add_argument("name")
    rm.set_defaults(func=run_remove)
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])


def run_build(args: argparse.Namespace) -> int:
    from ...steering.vectors import check_name, list_vectors, read_examples, save_vector, vector_from_examples

    check_name(args.name)
    if args.name in list_vectors() and not args.force:
        raise UserError(f"vector {args.name!r} exists; pass --force to replace it")
    positive, negative = read_examples(args.positive), read_examples(args.negative)
    engine = load_engine(args)
    if not 0 <= args.layer < engine.info.layers:
        raise UserError(f"--layer {args.layer} out of range 0..{engine.info.layers - 1}")
    vec = vector_from_examples(args.name, engine.model, engine.tokenizer, positive, negative, args.layer,
                               model_name=engine.info.model)
    path = save_vector(vec)
    print(f"vector:{vec.name}  layer {vec.layer}  scale {vec.scale:.2f}  -> {path}")
    return 0


def run_list(_args: argparse.Namespace) -> int:
    from ...steering.vectors import list_vectors, load_vector

    names = list_vectors()
    if not names:
        print("no vectors yet: build one with "
              "`tinymorph vector from-examples NAME --positive F --negative F`")
    for n in names:
        v = load_vector(n)
        print(f"vector:{n}  layer {v.layer}  scale {v.scale:.2f}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from ...steering.vectors import load_vector

    v = load_vector(args.name)
    print(json.dumps({"id": f"vector:{v.name}", "layer": v.layer, "scale": v.scale, **v.meta}, indent=2))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from ...steering.vectors import check_name, vectors_dir

    path = vectors_dir() / f"{check_name(args.name)}.safetensors"
    if not path.is_file():
        raise UserError(f"unknown vector {args.name!r}")
    path.unlink()
    return 0
