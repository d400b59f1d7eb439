"""`tinymorph features search|show|from-examples`: find SAE features to steer."""

from __future__ import annotations

import argparse
import json

from ..cli import UserError
from .common import add_model_options, load_engine


def register(sub) -> None:
    p = sub.add_parser("features", help="search, inspect and discover steerable SAE features")
    s = p.add_subparsers(dest="features_command", metavar="ACTION")

    q = s.add_parser("search", help="features for a concept: how they fire on TEXT, what they make the model say, "
                                    "their labels")
    q.add_argument("text", nargs="+")
    q.add_argument("--limit", type=int, default=10)
    q.add_argument("--labels-only", action="store_true", help="rank by label words only (no model needed)")
    q.add_argument("--json", action="store_true")
    add_model_options(q)
    q.set_defaults(func=run_search)

    sh = s.add_parser("show", help="everything known about one feature (e.g. default:123)")
    sh.add_argument("id", help="<sae>:<index>, vector:<name>, or a description (shows the SAE features it is made of)")
    sh.add_argument("--json", action="store_true")
    add_model_options(sh)
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
    from ...steering.concepts import split_sign
    from ...steering.features import search_features

    if args.limit < 1:
        raise UserError("--limit must be at least 1")
    lib = library()
    lib.sae_names  # noqa: B018 - a broken config fails before the model loads
    engine = None if args.labels_only else load_engine(args)
    query = " ".join(args.text)
    results = search_features(lib, query, args.limit, model=engine)
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
        return 0
    if not results:
        print("no matching features (try other words, or `tinymorph sae label` for unlabelled SAEs)")
        return 1
    for r in results:
        print(f"{r['id']:>14}  {r['score']:5.2f}  {r['label']}")
    strength = results[0].get("suggestedStrength", 1.0)
    flag = f" --strength {strength:g}" if strength != 1.0 else ""
    if results[0].get("kind") == "group":
        print(f"\nthe first line steers its {len(results[0]['members'])} features together "
              f"(tinymorph steer add {results[0]['id']}{flag}); the others one by one")
    if strength < 0:  # "less hedging": these are the features of "hedging", turned down
        print(f"\n{json.dumps(query.split()[0])} turns these down: steer them at a negative strength ({strength:g})")
    if engine is not None and all(r.get("readsQuery") is False for r in results):  # as the editors' pickers
        print(f"\nnone of these fires on {json.dumps(split_sign(query)[0])} itself: the SAE likely has no "
              "feature for it, and these are its nearest neighbours; a description will steer it more surely")
    print(f"\nor steer by the description itself: tinymorph steer add {json.dumps(query)}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from ...steering.features import show_feature
    from ...steering.steering import parse_feature_ref

    lib = library()
    if parse_feature_ref(args.id)[0] == "concept":  # a description: needs the model to build it
        from ...steering.library import default_resolver

        resolver = default_resolver(load_engine(args))
        lib = resolver.library
    info = show_feature(lib, args.id)
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
    for m in info.get("members", []):  # a group: what each of its features is
        print(f"  {m['id']:>14}  {m.get('label', '')}")
    for c in info.get("contexts", []):
        print(f"  [{c['act']:6.2f}] {c['text']}")
    for f in info.get("features", []):
        print(f"  {f['id']:>14}  cos {f['cosine']:+.2f}  {f['label']}")
    for t in info.get("examples", []):
        print(f"  example: {t[:100]!r}")
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
