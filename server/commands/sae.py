"""`tinymorph sae train|label|eval|info`: build, describe and measure sparse autoencoders."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import UserError


def register(sub) -> None:
    p = sub.add_parser("sae", help="train, label, evaluate and inspect sparse autoencoders")
    s = p.add_subparsers(dest="sae_command", metavar="ACTION")

    t = s.add_parser("train", help="train a TopK SAE on text files (restartable)")
    t.add_argument("files", nargs="+", type=Path, help="UTF-8 text files (an equal share of tokens each)")
    t.add_argument("--out", type=Path, required=True, help="output folder (sae-lens format)")
    t.add_argument("--layer", type=int, default=15, help="decoder layer whose output is read (default 15)")
    t.add_argument("--tokens", type=int, default=4_000_000, help="training tokens (default 4M, as the shipped SAE)")
    t.add_argument("--d-sae", type=int, default=4096, help="number of features (default 4096)")
    t.add_argument("--k", type=int, default=64, help="active features per token (default 64)")
    t.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy machine)")
    t.add_argument("--model", default="default")
    t.add_argument("--device", default="cpu", help='torch device: "cpu" (default) or "cuda"')
    t.add_argument("--fresh", action="store_true", help="ignore checkpoints in OUT and start over")
    t.set_defaults(func=run_train)

    lab = s.add_parser("label", help="compute labels (max activation, contexts, promoted tokens)")
    lab.add_argument("sae", nargs="?", default="default",
                     help='"default", an SAE folder, or a configured name')
    lab.add_argument("--files", nargs="+", type=Path, required=True, help="text files to read")
    lab.add_argument("--tokens", type=int, default=300_000)
    lab.add_argument("--model", default="default")
    lab.set_defaults(func=run_label)

    ev = s.add_parser("eval", help="FVU, L0 and CE loss with/without the SAE on held-out text")
    ev.add_argument("sae", nargs="?", default="default")
    ev.add_argument("--files", nargs="+", type=Path, required=True)
    ev.add_argument("--tokens", type=int, default=40_000)
    ev.add_argument("--model", default="default")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=run_eval)

    info = s.add_parser("info", help="show an SAE's shape, layer and label status")
    info.add_argument("sae", nargs="?", default="default")
    info.set_defaults(func=run_info)
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])


def _check_files(files: list[Path]) -> list[Path]:
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: no such file")
    return files


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch sees no CUDA GPU on this machine")
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: only cpu and cuda are supported")


def _sae(spec: str):
    """An SAE by configured name, folder, or "default"."""
    from ...steering.config import load_config
    from ...steering.sae import load_sae

    try:
        specs = load_config().sae_specs()
    except ValueError:
        specs = {}
    return load_sae(specs.get(spec, spec), name=spec if spec in specs else None)


def _bar(label: str):
    def report(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(1, total))
        print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr,
              flush=True)
        if done >= total:
            print(file=sys.stderr)

    return report


def run_train(args: argparse.Namespace) -> int:
    from ...steering.sae_train import TrainSettings, train_sae

    if args.tokens < 10_000:
        raise UserError("--tokens must be at least 10000")
    _check_device(args.device)
    settings = TrainSettings(layer=args.layer, tokens=args.tokens, d_sae=args.d_sae, k=args.k,
                             model=args.model, threads=args.threads, device=args.device)
    out = train_sae(_check_files(args.files), args.out, settings, resume=not args.fresh,
                    log=lambda m: print(f"[tinymorph] {m}", file=sys.stderr))
    print(out)
    return 0


def _rows(files: list[Path], tokenizer, tokens: int, context: int, holdout: bool) -> list[list[int]]:
    from ...steering.sae_train import make_rows

    n_rows = max(1, tokens // (context - 1))
    return make_rows(_check_files(files), tokenizer, n_rows, context, seed=7, holdout=holdout)


def run_label(args: argparse.Namespace) -> int:
    import torch

    from ...steering.labels import compute_labels, save_labels
    from ...steering.sae_train import load_model_for_training

    sae = _sae(args.sae)
    if sae.path is None:
        raise UserError(f"SAE {args.sae!r} comes from the registry cache; copy it to a folder to label it")
    model, tok = load_model_for_training(args.model, torch.bfloat16)
    rows = _rows(args.files, tok, args.tokens, 128, holdout=False)
    labels = compute_labels(sae, model, tok, rows, progress=_bar("labelling"))
    path = save_labels(labels, sae.path)
    print(path)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ...steering.sae_train import evaluate_sae, load_model_for_training

    sae = _sae(args.sae)
    model, tok = load_model_for_training(args.model, torch.float32)
    rows = _rows(args.files, tok, args.tokens, 256, holdout=True)
    result = evaluate_sae(sae, model, rows)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"FVU {result['fvu']:.4f}  L0 {result['l0']:.1f}  "
              f"CE {result['ce']:.4f} -> {result['ce_with_sae']:.4f} "
              f"with the SAE spliced in ({result['tokens']} tokens)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    sae = _sae(args.sae)
    print(json.dumps({"name": sae.name, "path": str(sae.path) if sae.path else None, "hook": sae.hook_name,
                      "layer": sae.layer, "d_in": sae.d_in, "d_sae": sae.d_sae,
                      "architecture": sae.architecture,
                      "k": sae.k, "labelled": sae.has_stats, "model": sae.model_name}, indent=2))
    return 0
