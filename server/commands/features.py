"""`tinymorph features search|show|from-examples`: find SAE features to steer."""

from __future__ import annotations

import argparse
import json

from ..cli import UserError
from .common import add_model_options, load_engine


def register(sub) -> None:
    p = sub.add_parser("features", help="search, inspect and discover steerable SAE features")
    s = p.add_subparsers(dest="features_command", metavar="ACTION")

    q = s.add_parser("search", help="rank features by how well their labels match TEXT")
    q.add_argument("text", nargs="+")
    q.add_argument("--limit", type=int, default=10)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_search)

    sh = s.add_parser("show", help="everything known about one feature (e.g. default:123)")
    sh.add_argument("id")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=run_show)

    ex = s.add_parser("from-examples", help="features most active on --positive relative to --negative")
    ex.add_argument("--positive", required=True, help="text file: examples separated by blank lines")
    ex.add_argument("--negative", required=True, help="text file: counter-examples")
    ex.add_argument("--sae", default="default", help="configured SAE name (default: default)")
    ex.add_argument("--limit", type=int, default=10)
    ex.add_argument("--json", action="store_true")
    ex.add_argument("--quiet", action="store_true")
    add_model_options(ex)
    ex.set_defaults(func=run_from_examples)
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])


def library():
    """The feature library of the effective config (a broken config is reported, not ignored)."""
    from ...steering.config import library_from_config, load_config

    return library_from_config(load_config())


def run_search(args: argparse.Namespace) -> int:
    from ...steering.features import search_features

    if args.limit < 1:
        raise UserError("--limit must be at least 1")
    results = search_features(library(), " ".join(args.text), args.limit)
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
        return 0
    if not results:
        print("no matching features (try other words, or `tinymorph sae label` for unlabelled SAEs)")
        return 1
    for r in results:
        print(f"{r['id']:>14}  {r['score']:6.2f}  max {r['maxActivation']:7.2f}  {r['label']}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from ...steering.features import show_feature

    info = show_feature(library(), args.id)
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
        return 0
    print(f"{info['id']}  layer {info['layer']}")
    for key in ("label", "maxActivation", "scale", "density"):
        if key in info:
            print(f"  {key}: {info[key]}")
    for key in ("top_act_tokens", "top_tokens", "bottom_tokens"):
        if info.get(key):
            print(f"  {key}: {', '.join(repr(t) for t in info[key])}")
    for c in info.get("contexts", []):
        print(f"  [{c['act']:6.2f}] {c['text']}")
    return 0


def run_from_examples(args: argparse.Namespace) -> int:
    from ...steering.features import rank_by_examples
    from ...steering.vectors import read_examples

    positive, negative = read_examples(args.positive), read_examples(args.negative)
    lib = library()
    lib.sae(args.sae)  # fail on a bad SAE before loading the model
    engine = load_engine(args)
    results = rank_by_examples(lib, args.sae, engine.model, engine.tokenizer, positive, negative, args.limit)
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
        return 0
    for r in results:
        print(f"{r['id']:>14}  diff {r['diff']:7.3f}  "
              f"(+{r['positive']:.3f} / -{r['negative']:.3f})  {r['label']}")
    return 0
