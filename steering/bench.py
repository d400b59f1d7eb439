"""`tinymorph bench`: TTFT, keystroke latency, decode speed and memory, against baselines.

Everything is measured in one run on the same text so the columns compare:
- tinymorph: the engine (plain model, prefix KV cache, window policy off so sizes are exact);
- transformers: `model.generate` on the same weights and dtype, no reuse between requests;
- llama.cpp: the same GGUF through `llama_cpp`, only if it is importable (never required).
"Bandwidth achieved" = bytes of weights read per forward pass x forward passes per second; it shows
how far decode is from the machine's memory bandwidth.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .engine import CompletionRequest, Engine
from .generate import GenerationOptions
from .steering import LayerEdit


@dataclass
class BenchConfig:
    sizes: tuple[int, ...] = (64, 256, 1024, 2048)
    keystrokes: int = 30
    cold_repeats: int = 3
    decode_tokens: int = 32
    baselines: bool = True
    llama_cpp: bool = True
    steering: bool = True
    text_path: Path | None = None

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(keystrokes=30, cold_repeats=1, decode_tokens=16)


@dataclass
class BenchResult:
    machine: dict
    model: dict
    rows: list[dict] = field(default_factory=list)  # one per (backend, size)
    decode: dict = field(default_factory=dict)  # backend -> tokens/s and bandwidth
    steering: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return self.__dict__


def bench_text(path: Path | None = None) -> str:
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    ref = resources.files("tinymorph.steering") / "data" / "bench" / "paradise-lost-book1.txt"
    return ref.read_text(encoding="utf-8").split("\n", 1)[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def proc_status_mb(field: str = "VmRSS") -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in MB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:  # not Linux
        pass
    return 0.0


class TextAtTokens:
    """Prefixes of the bench text that tokenize to about N tokens, and what gets typed next."""

    def __init__(self, text: str, tokenize: Callable[[str], list[int]], detokenize):
        self.text = text
        self.ids = tokenize(text)
        self.detokenize = detokenize

    def prefix(self, n: int) -> str:
        return self.detokenize(self.ids[:n])

    def typing(self, n: int, keystrokes: int) -> list[str]:
        """Texts after each of `keystrokes` characters typed after the N-token prefix."""
        base = self.prefix(n)
        ahead = self.text[len(base): len(base) + keystrokes]
        return [base + ahead[: k + 1] for k in range(keystrokes)]


def _engine_rows(engine: Engine, corpus: TextAtTokens, cfg: BenchConfig, log) -> list[dict]:
    rows = []
    for n in cfg.sizes:
        prefix = corpus.prefix(n)
        colds = []
        for _ in range(cfg.cold_repeats):
            engine.forget("bench")
            res = engine.complete(CompletionRequest(prefix, "bench", GenerationOptions(max_tokens=1, stop="none")))
            colds.append(res.timings.ttft_ms)
        keys, new_tokens = [], []
        for text in corpus.typing(n, cfg.keystrokes):
            res = engine.complete(CompletionRequest(text, "bench", GenerationOptions(max_tokens=1, stop="none")))
            keys.append(res.timings.ttft_ms)
            new_tokens.append(res.timings.tokens_prefilled)
        row = {"backend": "tinymorph", "tokens": n, "cold_ttft_ms": statistics.median(colds),
               "keystroke_p50_ms": percentile(keys, 0.5), "keystroke_p95_ms": percentile(keys, 0.95),
               "keystroke_new_tokens": [min(new_tokens), max(new_tokens)]}
        log(f"tinymorph     {n:5d} tokens: cold {row['cold_ttft_ms']:7.1f} ms  keystroke p50 "
            f"{row['keystroke_p50_ms']:6.1f} ms p95 {row['keystroke_p95_ms']:6.1f} ms")
        rows.append(row)
    engine.forget("bench")
    return rows


def _engine_decode(engine: Engine, corpus: TextAtTokens, cfg: BenchConfig, plan=None) -> dict:
    prefix = corpus.prefix(min(256, max(cfg.sizes)))
    engine.forget("bench-decode")
    # warm the prompt so only decode is timed
    engine.complete(CompletionRequest(prefix, "bench-decode", GenerationOptions(max_tokens=1, stop="none")))
    opts = GenerationOptions(max_tokens=cfg.decode_tokens, stop="none")
    res = engine.complete(CompletionRequest(prefix, "bench-decode", opts))
    engine.forget("bench-decode")
    tps = res.timings.decode_tokens_per_s
    return {"tokens_per_s": tps, "bandwidth_gb_s": tps * engine.info.weight_bytes / 1e9,
            "ttft_ms_warm": res.timings.ttft_ms}


def _steering_overhead(engine: Engine, corpus: TextAtTokens, cfg: BenchConfig, log) -> dict:
    """TTFT and decode with an `add` edit on the middle layer vs none (same hooks path as real plans)."""
    layer = engine.model.cfg.n_layers // 2
    direction = torch.randn(engine.model.cfg.dim)
    resolved = {layer: LayerEdit(add=direction / direction.norm() * 4.0)}
    n = min(1024, max(cfg.sizes))
    results = {}
    for label, plan in (("unsteered", None), ("steered", resolved)):
        colds, tps = [], []
        for _ in range(max(2, cfg.cold_repeats)):
            cache = engine.model.new_cache(2048)
            ids = corpus.ids[:n]
            with engine.hooks.active(plan):
                t0 = time.perf_counter()
                logits = engine.model(ids, cache)
                colds.append((time.perf_counter() - t0) * 1000)
                token = int(logits.argmax())
                t0 = time.perf_counter()
                for _ in range(cfg.decode_tokens):
                    token = int(engine.model([token], cache).argmax())
                tps.append(cfg.decode_tokens / (time.perf_counter() - t0))
        results[label] = {"prefill_ms": statistics.median(colds), "prefill_tokens": n,
                          "decode_tokens_per_s": statistics.median(tps)}
    un, st = results["unsteered"], results["steered"]
    results["prefill_overhead_pct"] = 100 * (st["prefill_ms"] / un["prefill_ms"] - 1)
    results["decode_overhead_pct"] = 100 * (un["decode_tokens_per_s"] / st["decode_tokens_per_s"] - 1)
    log(f"steering overhead: prefill {results['prefill_overhead_pct']:+.1f} %  decode "
        f"{results['decode_overhead_pct']:+.1f} %")
    return results


def _transformers_rows(engine: Engine, corpus: TextAtTokens, cfg: BenchConfig, log) -> tuple[list[dict], dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine.info.folder, dtype=engine.model.dtype)
    model.eval()
    pad = engine.tokenizer.eos_token_id
    rows = []

    def ttft(ids: list[int]) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False, pad_token_id=pad)
        return (time.perf_counter() - t0) * 1000

    ttft(corpus.ids[:16])  # warm-up
    for n in cfg.sizes:
        colds = [ttft(corpus.ids[:n]) for _ in range(cfg.cold_repeats)]
        # without reuse a keystroke costs a full prefill; sample a few instead of all keystrokes
        keys = [ttft(engine.tokenize(t)) for t in corpus.typing(n, cfg.keystrokes)[:: max(1, cfg.keystrokes // 5)]]
        row = {"backend": "transformers", "tokens": n, "cold_ttft_ms": statistics.median(colds),
               "keystroke_p50_ms": percentile(keys, 0.5), "keystroke_p95_ms": percentile(keys, 0.95)}
        log(f"transformers  {n:5d} tokens: cold {row['cold_ttft_ms']:7.1f} ms  keystroke p50 "
            f"{row['keystroke_p50_ms']:6.1f} ms p95 {row['keystroke_p95_ms']:6.1f} ms")
        rows.append(row)
    ids = torch.tensor([corpus.ids[: min(256, max(cfg.sizes))]])
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=pad)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=cfg.decode_tokens, min_new_tokens=cfg.decode_tokens,
                       do_sample=False, pad_token_id=pad)
        total = time.perf_counter() - t0
    tps = (cfg.decode_tokens - 1) / max(total - prefill, 1e-6)
    decode = {"tokens_per_s": tps, "bandwidth_gb_s": tps * engine.info.weight_bytes / 1e9}
    model.to("meta")  # release the baseline's weights before the next backend runs
    gc.collect()
    return rows, decode


def _llama_cpp_rows(corpus_text: str, cfg: BenchConfig, log) -> tuple[list[dict], dict] | None:
    """llama.cpp on the same GGUF, measured by `bench_llamacpp` in its own process (see there why)."""
    import importlib.util
    import subprocess
    import sys
    import tempfile

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from .model import default_gguf_path

    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as text_file:
        text_file.write(corpus_text)
        text_file.flush()
        args = [sys.executable, "-m", "tinymorph.steering.bench_llamacpp", str(default_gguf_path()), text_file.name,
                "--sizes", ",".join(map(str, cfg.sizes)), "--keystrokes", str(cfg.keystrokes),
                "--cold-repeats", str(cfg.cold_repeats), "--decode-tokens", str(cfg.decode_tokens),
                "--threads", str(torch.get_num_threads())]
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            log("llama.cpp: skipped (timed out)")
            return None
    if done.returncode != 0:
        log(f"llama.cpp: skipped (exit status {done.returncode}: {done.stderr.strip()[-200:]})")
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for row in result["rows"]:
        log(f"llama.cpp     {row['tokens']:5d} tokens: cold {row['cold_ttft_ms']:7.1f} ms  keystroke p50 "
            f"{row['keystroke_p50_ms']:6.1f} ms p95 {row['keystroke_p95_ms']:6.1f} ms")
    return result["rows"], result["decode"]


def run_bench(engine: Engine, cfg: BenchConfig, log: Callable[[str], None] = print) -> BenchResult:
    """Run every measurement; `engine` must have been loaded by the caller (its load time is reported)."""
    engine.context = type(engine.context)(max_tokens=max(cfg.sizes) + 64)  # exact sizes, no windowing
    corpus = TextAtTokens(bench_text(cfg.text_path), engine.tokenize, engine.detokenize)
    if len(corpus.ids) < max(cfg.sizes) + cfg.keystrokes * 2:
        raise ValueError(f"bench text has {len(corpus.ids)} tokens; need more than {max(cfg.sizes)}")
    result = BenchResult(
        machine={"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        model=engine.info.to_dict(),
    )
    result.memory["rss_after_load_mb"] = proc_status_mb()
    # warm-up: first calls allocate and pick kernels
    engine.complete(CompletionRequest(corpus.prefix(64), "warm", GenerationOptions(max_tokens=2, stop="none")))
    engine.forget("warm")
    result.rows += _engine_rows(engine, corpus, cfg, log)
    result.decode["tinymorph"] = _engine_decode(engine, corpus, cfg)
    log(f"tinymorph decode: {result.decode['tinymorph']['tokens_per_s']:.1f} tok/s, bandwidth achieved "
        f"{result.decode['tinymorph']['bandwidth_gb_s']:.2f} GB/s")
    result.memory["rss_after_engine_bench_mb"] = proc_status_mb()
    result.memory["peak_rss_engine_mb"] = proc_status_mb("VmHWM")
    if cfg.steering:
        result.steering = _steering_overhead(engine, corpus, cfg, log)
    if cfg.baselines:
        rows, decode = _transformers_rows(engine, corpus, cfg, log)
        result.rows += rows
        result.decode["transformers"] = decode
        log(f"transformers decode: {decode['tokens_per_s']:.1f} tok/s")
    if cfg.llama_cpp:
        found = _llama_cpp_rows(corpus.text, cfg, log)
        if found is not None:
            result.rows += found[0]
            result.decode["llama.cpp"] = found[1]
            log(f"llama.cpp decode: {found[1]['tokens_per_s']:.1f} tok/s")
        else:
            log("llama.cpp: not installed (pip install llama-cpp-python to add it as a column)")
    return result


def format_table(result: BenchResult) -> str:
    """The side-by-side table: one line per size, one column group per backend, plus ratios."""
    backends = list(dict.fromkeys(r["backend"] for r in result.rows))
    by = {(r["backend"], r["tokens"]): r for r in result.rows}
    sizes = sorted({r["tokens"] for r in result.rows})
    lines = []
    head = f"{'tokens':>6} | " + " | ".join(f"{b:^29}" for b in backends)
    lines.append(head)
    lines.append(f"{'':>6} | " + " | ".join(f"{'cold':>9} {'key p50':>9} {'key p95':>9}" for _ in backends))
    for n in sizes:
        cells = []
        for b in backends:
            r = by.get((b, n))
            cells.append(f"{r['cold_ttft_ms']:9.1f} {r['keystroke_p50_ms']:9.1f} {r['keystroke_p95_ms']:9.1f}"
                         if r else " " * 29)
        lines.append(f"{n:>6} | " + " | ".join(cells))
    lines.append("(milliseconds to the first token; key = keystroke on a cached prefix)")
    for b in backends[1:]:
        ratios = []
        for n in sizes:
            ours, other = by.get(("tinymorph", n)), by.get((b, n))
            if ours and other:
                ratios.append(f"{n}: cold x{other['cold_ttft_ms'] / ours['cold_ttft_ms']:.2f}, "
                              f"keystroke x{other['keystroke_p50_ms'] / ours['keystroke_p50_ms']:.2f}")
        lines.append(f"{b} / tinymorph (higher = tinymorph faster): " + "; ".join(ratios))
    for b, d in result.decode.items():
        lines.append(f"decode {b:<12} {d['tokens_per_s']:7.1f} tok/s   bandwidth achieved "
                     f"{d['bandwidth_gb_s']:6.2f} GB/s")
    if result.steering:
        s = result.steering
        lines.append(f"steering overhead (add on layer {result.model['layers'] // 2}): prefill "
                     f"{s['prefill_overhead_pct']:+.1f} %, decode {s['decode_overhead_pct']:+.1f} %")
    m = result.memory
    lines.append(f"memory: RSS after load {m['rss_after_load_mb']:.0f} MB, peak during tinymorph runs "
                 f"{m['peak_rss_engine_mb']:.0f} MB")
    return "\n".join(lines)


def save(result: BenchResult, out_dir: Path) -> tuple[Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "bench.json"
    json_path.write_text(json.dumps(result.to_dict(), indent=2))
    png = out_dir / "bench.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return json_path, None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for backend in dict.fromkeys(r["backend"] for r in result.rows):
        rows = [r for r in result.rows if r["backend"] == backend]
        xs = [r["tokens"] for r in rows]
        axes[0].plot(xs, [r["cold_ttft_ms"] for r in rows], marker="o", label=backend)
        axes[1].plot(xs, [r["keystroke_p50_ms"] for r in rows], marker="o", label=backend)
    for ax, title in zip(axes, ("cold TTFT", "keystroke TTFT p50"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("document tokens")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"tinymorph bench — {result.model['model']} {result.model['dtype']}, "
                 f"{result.machine['torch_threads']} threads")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return json_path, png
