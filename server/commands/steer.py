"""`tinymorph steer list|add|set|remove|clear|show|compare`: the steering mixing desk in the config.

Edits go to the project's tinymorph.toml when one is in effect (else to the user's config.toml), or
to `--config FILE`; every write is validated and atomic.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import UserError
from .common import add_model_options, load_engine


def register(sub) -> None:
    p = sub.add_parser("steer", help="list and edit the steering applied to completions")
    p.add_argument("--config", type=Path, default=None, help="config file to read/edit (default: found)")
    s = p.add_subparsers(dest="steer_command", metavar="ACTION")

    s.add_parser("list", help="the steering in effect").set_defaults(func=run_list)
    s.add_parser("show", help="the effective config and the files it comes from").set_defaults(func=run_show)

    a = s.add_parser("add", help="steer by a description (\"about gardening\", \"more formal\", \"less hedging\"), "
                                 "a feature or a vector (replaces an entry for the same one)")
    a.add_argument("feature", help="a description, <sae>:<index> (e.g. default:123) or vector:<name>")
    a.add_argument("--strength", type=float, default=1.0,
                   help="1 = the calibrated push: noticeable and fluent (default 1; negative = less of it)")
    a.add_argument("--mode", choices=["add", "clamp", "ablate"], default="add")
    a.add_argument("--layer", type=int, default=None, help="layer to edit (default: the feature's own)")
    a.add_argument("--no-calibrate", action="store_true",
                   help="skip loading the model to calibrate strength 1 (features and vectors)")
    add_model_options(a)
    a.set_defaults(func=run_add)

    st = s.add_parser("set", help="change an existing entry")
    st.add_argument("feature")
    st.add_argument("--strength", type=float, default=None)
    st.add_argument("--mode", choices=["add", "clamp", "ablate"], default=None)
    st.add_argument("--layer", type=int, default=None)
    st.set_defaults(func=run_set)

    rm = s.add_parser("remove", help="stop steering a feature")
    rm.add_argument("feature")
    rm.set_defaults(func=run_remove)
    s.add_parser("clear", help="remove all steering").set_defaults(func=run_clear)

    c = s.add_parser("compare", help="steered vs unsteered continuation of a text, side by side")
    c.add_argument("file", nargs="?", default=None, help="text file, or - for stdin (default: --text or stdin)")
    c.add_argument("--text", default=None)
    c.add_argument("--max-tokens", type=int, default=32)
    c.add_argument("--feature", action="append", default=None, metavar="ID=STRENGTH",
                   help="compare this steering instead of the configured one (repeatable)")
    c.add_argument("--json", action="store_true")
    c.add_argument("--quiet", action="store_true")
    add_model_options(c)
    c.set_defaults(func=run_compare)

    ev = s.add_parser("eval", help="concept hit rate, perplexity, repetition and speed cost of every steering "
                                   "method on the shipped concept set")
    ev.add_argument("--quick", action="store_true", help="6 of the 12 prompts, 3 strengths")
    ev.add_argument("--concepts", default=None, help="comma-separated concept names (default: all)")
    ev.add_argument("--concept-set", default="main", metavar="NAME|FILE",
                    help="main (the shipped set), heldout (20 other concepts, for checking a change beyond main), "
                         "strict (20 more, lexicons of concept words only) or a JSON file")
    ev.add_argument("--methods", default=None,
                    help="comma-separated: unsteered,prompting,search,described,examples (default: all), "
                         "feature (search's best feature alone)")
    ev.add_argument("--strengths", default=None, help="comma-separated strengths (default 0.5,1,2 with --quick)")
    ev.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for steer-eval.json/.png")
    add_model_options(ev)
    ev.set_defaults(func=run_eval)
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])


def _config(args):
    from ...steering.config import load_config

    return load_config(project=args.config) if args.config else load_config()


def _target(args) -> Path:
    from ...steering.config import edit_target

    return edit_target(project=args.config)


def _print_entries(entries) -> None:
    if not entries:
        print("no steering (completions are unsteered)")
    for e in entries:
        layer = "" if e.layer is None else f"  layer {e.layer}"
        print(f"{e.feature:>16}  {e.mode:<6}  {e.strength:+.3f}{layer}")


def _check_feature(args, feature: str) -> None:
    """Fail early on ids that do not exist (unknown SAE, index out of range, missing vector)."""
    from ...steering.config import library_from_config

    library_from_config(_config(args)).handle(feature)


def run_list(args: argparse.Namespace) -> int:
    _print_entries(_config(args).steer)
    return 0


def run_show(args: argparse.Namespace) -> int:
    import tomli_w

    cfg = _config(args)
    print("# files (later ones override earlier ones): " + (", ".join(map(str, cfg.sources)) or "none"))
    print(tomli_w.dumps(cfg.to_dict()))
    return 0


def run_add(args: argparse.Namespace) -> int:
    import time

    from ...steering.config import set_steer_entry
    from ...steering.steering import SteeringEntry, SteeringError, parse_feature_ref, validate_entry

    entry = SteeringEntry(feature=" ".join(args.feature.split()), strength=args.strength, mode=args.mode,
                          layer=args.layer)
    validate_entry(entry)
    source = parse_feature_ref(entry.feature)[0]
    target = _target(args)
    if source == "concept" or not args.no_calibrate:
        from ...steering.features import show_feature
        from ...steering.library import default_resolver

        engine = load_engine(args)
        library = default_resolver(engine, _config(args)).library
        started = time.perf_counter()
        try:
            if source == "concept":
                info = show_feature(library, entry.feature)
                took = time.perf_counter() - started
                print(f"concept {info['description']!r}: built and calibrated in {took:.1f} s "
                      f"(layers {', '.join(map(str, info['layers']))}; strength 1 = {info['addFraction']:.2f} "
                      "of the residual norm)")
                if info["features"]:
                    print("made of (cosine with SAE features):")
                    for f in info["features"][:5]:
                        print(f"  {f['id']:>14}  {f['cosine']:+.2f}  {f['label']}")
            elif args.mode == "add":
                fraction = library.calibrate(entry.feature)
                print(f"{entry.feature}: strength 1 = {fraction:.2f} of the residual norm "
                      f"(calibrated in {time.perf_counter() - started:.1f} s)")
            else:
                library.handles(entry.feature)
        except SteeringError as exc:
            raise UserError(str(exc)) from None
    else:
        _check_feature(args, entry.feature)
    _print_entries(set_steer_entry(target, entry))
    return 0


def run_set(args: argparse.Namespace) -> int:
    from ...steering.config import update_steer_entry

    if args.strength is None and args.mode is None and args.layer is None:
        raise UserError("nothing to change: give --strength, --mode or --layer")
    _print_entries(update_steer_entry(_target(args), args.feature, strength=args.strength, mode=args.mode,
                                      layer=args.layer))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from ...steering.config import remove_steer_entry

    _print_entries(remove_steer_entry(_target(args), args.feature))
    return 0


def run_clear(args: argparse.Namespace) -> int:
    from ...steering.config import clear_steering

    clear_steering(_target(args))
    _print_entries([])
    return 0


def parse_feature_args(items: list[str]):
    """`ID=STRENGTH[:MODE]` → SteeringPlan (used by compare's --feature)."""
    from ...steering.steering import SteeringEntry, SteeringPlan

    entries = []
    for item in items:
        ref, sep, rest = item.rpartition("=")
        if not sep:
            raise UserError(f"--feature {item!r}: expected ID=STRENGTH, e.g. default:123=2")
        strength_s, _, mode = rest.partition(":")
        try:
            strength = float(strength_s)
        except ValueError:
            raise UserError(f"--feature {item!r}: strength {strength_s!r} is not a number") from None
        entries.append(SteeringEntry(feature=ref, strength=strength, mode=mode or "add"))
    return SteeringPlan(tuple(entries))


def _side_by_side(left: str, right: str, width: int = 50) -> str:
    import textwrap

    a = textwrap.wrap(left.replace("\n", " ⏎ "), width) or [""]
    b = textwrap.wrap(right.replace("\n", " ⏎ "), width) or [""]
    rows = [f"{'unsteered':<{width}} | steered", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(len(a), len(b))):
        rows.append(f"{(a[i] if i < len(a) else ''):<{width}} | {b[i] if i < len(b) else ''}")
    return "\n".join(rows)


def run_compare(args: argparse.Namespace) -> int:
    from ...steering.engine import CompletionRequest
    from ...steering.generate import GenerationOptions

    if args.text is not None:
        text = args.text
    elif args.file is not None and args.file != "-":
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"{args.file}: no such file")
        text = path.read_text(encoding="utf-8", errors="replace")
    else:
        text = sys.stdin.read()
    if not text.strip():
        raise UserError("nothing to continue: give a file, --text or stdin")
    cfg = _config(args)
    plan = parse_feature_args(args.feature) if args.feature else cfg.plan()
    if plan.is_empty():
        raise UserError("no steering configured: add some with `tinymorph steer add` or pass --feature")
    engine = load_engine(args)
    from ...steering.library import default_resolver

    engine.set_steering_resolver(default_resolver(engine, cfg))
    opts = GenerationOptions(max_tokens=args.max_tokens, stop="paragraph")
    plain = engine.complete(CompletionRequest(text=text, doc_id="compare", options=opts)).text
    request = CompletionRequest(text=text, doc_id="compare", options=opts, steering=plan)
    steered = engine.complete(request).text
    if args.json:
        out = {"steered": steered, "unsteered": plain, "steering": plan.describe()}
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(_side_by_side(plain, steered))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ...steering import steer_eval
    from ...steering.library import default_resolver

    def csv(value):
        return [x.strip() for x in value.split(",") if x.strip()] if value else None

    try:
        strengths = [float(x) for x in csv(args.strengths)] if args.strengths else None
    except ValueError:
        raise UserError(f"--strengths {args.strengths!r}: give numbers separated by commas") from None
    try:
        known = {c.name for c in steer_eval.load_eval_set(args.concept_set).concepts}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--concept-set {args.concept_set!r}: not a concept set ({exc})") from None
    unknown = set(csv(args.concepts) or []) - known
    if unknown:
        raise UserError(f"unknown concepts: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    engine = load_engine(args)
    resolver = default_resolver(engine, _config(args))
    engine.set_steering_resolver(resolver)
    report = steer_eval.run_eval(engine, resolver.library, quick=args.quick, strengths=strengths,
                                 methods=csv(args.methods), concepts=csv(args.concepts),
                                 concept_set=args.concept_set, log=lambda m: print(m, file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "steer-eval.json").write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
    steer_eval.plot(report, args.out / "steer-eval.png")
    print(report.table())
    print(f"\n{args.out / 'steer-eval.json'}, {args.out / 'steer-eval.png'} ({report.seconds:.0f} s)")
    return 0
