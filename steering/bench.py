"""`tinymorph bench`: TTFT, keystroke latency, decode speed and memory, against baselines.

Everything is measured in one run on the same text so the columns compare:
- tinymorph: the engine (plain model, prefix KV cache, window policy off so sizes are exact);
- transformers: `model.generate` on the same weights and dtype, no reuse between requests;
- llama.cpp: the same GGUF through `llama_cpp`, only if it is importable (never required), in a
  worker process; its requests alternate with tinymorph's on the same token ids and thread count,
  so the ratios hold even on a machine whose load changes during the run.
"Bandwidth achieved" = bytes of weights read per forward pass x forward passes per second; it shows
how far decode and keystrokes are from the machine's memory bandwidth. `contention` repeats the
largest size and decode beside one CPU-bound process.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .engine import CompletionRequest, Engine
from .generate import GenerationOptions
from .steering import FeatureHandle, LayerEdit


@dataclass
class BenchConfig:
    sizes: tuple[int, ...] = (64, 256, 1024, 2048)
    keystrokes: int = 30
    cold_repeats: int = 3
    decode_tokens: int = 32
    baselines: bool = True
    llama_cpp: bool = True
    steering: bool = True
    contention: bool = True  # repeat the largest size and decode beside a CPU-bound process
    text_path: Path | None = None
    # a pause before each timed request of either engine: keystrokes come at a typist's pace, not
    # back to back, and neither engine's request runs while the other's threads still spin
    settle_s: float = 0.05

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
    contention: dict = field(default_factory=dict)  # decode rates beside a CPU-bound process

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


class LlamaCppWorker:
    """The llama.cpp column: a `bench_llamacpp` worker process driven one request at a time."""

    def __init__(self, proc: subprocess.Popen, model_bytes: int):
        self.proc = proc
        self.model_bytes = model_bytes

    @classmethod
    def start(cls, threads: int, n_ctx: int, log) -> LlamaCppWorker | None:
        """None (and a log line saying why) when llama-cpp-python is missing or does not start."""
        if importlib.util.find_spec("llama_cpp") is None:
            log("llama.cpp: not installed (pip install 'tinymorph[llamacpp]' adds it as a column; see README)")
            return None
        from .model import default_gguf_path

        args = [sys.executable, "-m", "tinymorph.steering.bench_llamacpp", str(default_gguf_path()),
                "--threads", str(threads), "--n-ctx", str(n_ctx)]
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        worker = cls(proc, 0)
        try:
            worker.model_bytes = worker._answer()["model_bytes"]
        except RuntimeError as exc:
            log(f"llama.cpp: skipped ({exc})")
            return None
        return worker

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"worker exited with status {self.proc.returncode}: "
                               f"{self.proc.stderr.read().strip()[-300:]}")
        return json.loads(line)

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class Competitor:
    """One CPU-bound process beside the bench (`--contention`): what a build or a browser tab does."""

    def __enter__(self) -> Competitor:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()


def _tinymorph_first_token(engine: Engine, text: str, doc: str = "bench") -> tuple[float, int]:
    res = engine.complete(CompletionRequest(text, doc, GenerationOptions(max_tokens=1, stop="none")))
    return res.timings.ttft_ms, res.timings.tokens_prefilled


def _latency_rows(engine: Engine, worker: LlamaCppWorker | None, corpus: TextAtTokens, sizes: tuple[int, ...],
                  cfg: BenchConfig, log, load: str = "quiet") -> list[dict]:
    """Cold TTFT and keystroke latency per size; tinymorph and llama.cpp alternate request by request
    on the same token ids, so both see the same machine."""
    rows = []
    for n in sizes:
        prefix = corpus.prefix(n)
        prefix_ids = engine.tokenize(prefix)
        colds: dict[str, list[float]] = {"tinymorph": [], "llama.cpp": []}
        keys: dict[str, list[float]] = {"tinymorph": [], "llama.cpp": []}
        new_tokens = []
        for _ in range(cfg.cold_repeats):
            engine.forget("bench")
            time.sleep(cfg.settle_s)
            colds["tinymorph"].append(_tinymorph_first_token(engine, prefix)[0])
            if worker is not None:
                time.sleep(cfg.settle_s)
                colds["llama.cpp"].append(worker.ask(op="cold", ids=prefix_ids)["ms"])
        for text in corpus.typing(n, cfg.keystrokes):
            time.sleep(cfg.settle_s)
            ms, prefilled = _tinymorph_first_token(engine, text)
            keys["tinymorph"].append(ms)
            new_tokens.append(prefilled)
            if worker is not None:
                ids = engine.tokenize(text)
                time.sleep(cfg.settle_s)
                keys["llama.cpp"].append(worker.ask(op="first_token", ids=ids)["ms"])
        for backend, weight_bytes in (("tinymorph", engine.info.weight_bytes),
                                      ("llama.cpp", worker.model_bytes if worker else 0)):
            if not keys[backend]:
                continue
            p50 = percentile(keys[backend], 0.5)
            row = {"backend": backend, "tokens": n, "load": load, "cold_ttft_ms": statistics.median(colds[backend]),
                   "keystroke_p50_ms": p50, "keystroke_p95_ms": percentile(keys[backend], 0.95),
                   # a keystroke forward reads every weight once: how close it comes to memory bandwidth
                   "keystroke_gb_s": weight_bytes / (p50 / 1000) / 1e9}
            if backend == "tinymorph":
                row["keystroke_new_tokens"] = [min(new_tokens), max(new_tokens)]
                row["threads_last"] = engine.threads.threads  # what the thread policy chose last
                row["others_busy_cores"] = round(engine.threads.others_busy, 2)
            log(f"{backend:<12} {load:<10} {n:5d} tokens: cold {row['cold_ttft_ms']:7.1f} ms  keystroke p50 "
                f"{p50:6.1f} ms p95 {row['keystroke_p95_ms']:6.1f} ms ({row['keystroke_gb_s']:.2f} GB/s)")
            rows.append(row)
    engine.forget("bench")
    return rows


def _decode_rates(engine: Engine, worker: LlamaCppWorker | None, corpus: TextAtTokens,
                  cfg: BenchConfig, rounds: int = 3) -> dict:
    """Greedy decode tokens/s after a 256-token prompt, tinymorph and llama.cpp in alternating rounds.

    tinymorph runs as users get it (prompt-lookup drafts included); `per_pass` is its rate of forward
    passes, which is what the bandwidth figure is about."""
    prefix = corpus.prefix(min(256, max(cfg.sizes)))
    ids = engine.tokenize(prefix)
    ours, theirs, accepted = [], [], []
    opts = GenerationOptions(max_tokens=cfg.decode_tokens, stop="none")
    for _ in range(rounds):
        engine.forget("bench-decode")
        _tinymorph_first_token(engine, prefix, "bench-decode")  # warm the prompt: only decode is timed
        res = engine.complete(CompletionRequest(prefix, "bench-decode", opts))
        ours.append(res.timings.decode_tokens_per_s)
        accepted.append(res.timings.drafts_accepted)
        if worker is not None:
            theirs.append(worker.ask(op="decode", ids=ids, n=cfg.decode_tokens)["tokens_per_s"])
    engine.forget("bench-decode")
    tps = statistics.median(ours)
    steps = cfg.decode_tokens - 1
    passes_per_s = tps * (steps - statistics.median(accepted)) / steps
    out = {"tinymorph": {"tokens_per_s": tps, "drafts_accepted": statistics.median(accepted),
                         "passes_per_s": passes_per_s,
                         "bandwidth_gb_s": passes_per_s * engine.info.weight_bytes / 1e9}}
    if theirs:
        tps = statistics.median(theirs)
        out["llama.cpp"] = {"tokens_per_s": tps, "passes_per_s": tps, "bandwidth_gb_s": tps * worker.model_bytes / 1e9}
    return out


def _steering_overhead(engine: Engine, corpus: TextAtTokens, cfg: BenchConfig, log) -> dict:
    """TTFT and decode with an `add` edit as an SAE feature's (from the middle layer over
    `feature_span` layers) vs none (same hooks path as real plans).

    Decode is timed in short alternating bursts on one cache (each burst's tokens are dropped
    again), so both plans see the same machine and the same cache length: one long run per plan
    measured the machine's drift more than steering (+8..13 % one run, -1 % the next)."""
    from .library import feature_span

    n_layers = engine.model.cfg.n_layers
    direction = torch.randn(engine.model.cfg.dim)
    feature = FeatureHandle("bench", n_layers // 2, direction / direction.norm(), 4.0, 0.0, lambda x: x,
                            feature_span(n_layers))
    written = feature.add_deltas(1.0, n_layers=n_layers, writing=True)
    resolved = {la: LayerEdit(add=delta, written=written[la])
                for la, delta in feature.add_deltas(1.0, n_layers=n_layers).items()}
    n = min(1024, max(cfg.sizes))
    plans = (("unsteered", None), ("steered", resolved))
    colds: dict[str, list[float]] = {label: [] for label, _ in plans}
    step_ms: dict[str, list[float]] = {label: [] for label, _ in plans}
    for _ in range(max(3, cfg.cold_repeats)):
        for label, plan in plans:  # alternating, so both see the same machine
            cache = engine.model.new_cache(n + 16)
            with engine.hooks.active(plan):
                t0 = time.perf_counter()
                engine.model(corpus.ids[:n], cache)
                colds[label].append((time.perf_counter() - t0) * 1000)
    burst = 8  # both plans decode on the last prefilled cache, each burst truncated back to `n` tokens
    for _ in range(max(6, cfg.decode_tokens // 2)):
        for label, plan in plans:
            token = corpus.ids[n]
            with engine.hooks.active(plan):
                t0 = time.perf_counter()
                for _ in range(burst):
                    token = int(engine.model([token], cache).argmax())
                step_ms[label].append((time.perf_counter() - t0) * 1000 / burst)
            cache.truncate(n)
    results = {label: {"prefill_ms": statistics.median(colds[label]), "prefill_tokens": n,
                       "decode_tokens_per_s": 1000 / statistics.median(step_ms[label])} for label, _ in plans}
    un, st = results["unsteered"], results["steered"]
    results["prefill_overhead_pct"] = 100 * (st["prefill_ms"] / un["prefill_ms"] - 1)
    results["decode_overhead_pct"] = 100 * (un["decode_tokens_per_s"] / st["decode_tokens_per_s"] - 1)
    results["layers"] = f"{min(resolved)}-{max(resolved)}"
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


def run_bench(engine: Engine, cfg: BenchConfig, log: Callable[[str], None] = print) -> BenchResult:
    """Run every measurement; `engine` must have been loaded by the caller (its load time is reported)."""
    engine.context = type(engine.context)(max_tokens=max(cfg.sizes) + 64)  # exact sizes, no windowing
    corpus = TextAtTokens(bench_text(cfg.text_path), engine.tokenize, engine.detokenize)
    if len(corpus.ids) < max(cfg.sizes) + cfg.keystrokes * 2:
        raise ValueError(f"bench text has {len(corpus.ids)} tokens; need more than {max(cfg.sizes)}")
    threads = torch.get_num_threads()
    result = BenchResult(
        machine={"cpu_count": os.cpu_count(), "torch_threads": threads,
                 "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        model=engine.info.to_dict(),
    )
    result.memory["rss_after_load_mb"] = proc_status_mb()
    # warm-up: first calls allocate and pick kernels
    engine.complete(CompletionRequest(corpus.prefix(64), "warm", GenerationOptions(max_tokens=2, stop="none")))
    engine.forget("warm")
    worker = None
    if cfg.llama_cpp:
        worker = LlamaCppWorker.start(threads, max(cfg.sizes) + cfg.keystrokes * 4 + 256, log)
    if worker is not None:  # its turns between ours are not load from other processes
        engine.threads.own_pids = (worker.proc.pid,)
    try:
        result.rows += _latency_rows(engine, worker, corpus, cfg.sizes, cfg, log)
        result.decode = _decode_rates(engine, worker, corpus, cfg)
        for backend, d in result.decode.items():
            log(f"decode {backend}: {d['tokens_per_s']:.1f} tok/s, bandwidth achieved {d['bandwidth_gb_s']:.2f} GB/s")
        result.memory["rss_after_engine_bench_mb"] = proc_status_mb()
        result.memory["peak_rss_engine_mb"] = proc_status_mb("VmHWM")
        if cfg.contention:
            with Competitor():
                result.rows += _latency_rows(engine, worker, corpus, (max(cfg.sizes),), cfg, log, "contention")
                result.contention = _decode_rates(engine, worker, corpus, cfg)
            for backend, d in result.contention.items():
                log(f"decode {backend} (contention): {d['tokens_per_s']:.1f} tok/s")
    finally:
        if worker is not None:
            worker.close()
            engine.threads.own_pids = ()
    if cfg.steering:
        result.steering = _steering_overhead(engine, corpus, cfg, log)
    if cfg.baselines:
        rows, decode = _transformers_rows(engine, corpus, cfg, log)
        result.rows += rows
        result.decode["transformers"] = decode
        log(f"transformers decode: {decode['tokens_per_s']:.1f} tok/s")
    return result


def format_table(result: BenchResult) -> str:
    """The side-by-side table: one line per size, one column group per backend, plus ratios."""
    backends = list(dict.fromkeys(r["backend"] for r in result.rows))
    by = {(r["backend"], r["tokens"], r.get("load", "quiet")): r for r in result.rows}
    sizes = sorted({r["tokens"] for r in result.rows})
    lines = []
    head = f"{'tokens':>6} | " + " | ".join(f"{b:^29}" for b in backends)
    lines.append(head)
    lines.append(f"{'':>6} | " + " | ".join(f"{'cold':>9} {'key p50':>9} {'key p95':>9}" for _ in backends))
    for n in sizes:
        for load in ("quiet", "contention"):
            if not any((b, n, load) in by for b in backends):
                continue
            cells = []
            for b in backends:
                r = by.get((b, n, load))
                cells.append(f"{r['cold_ttft_ms']:9.1f} {r['keystroke_p50_ms']:9.1f} {r['keystroke_p95_ms']:9.1f}"
                             if r else " " * 29)
            label = f"{n:>6}" if load == "quiet" else f"{'+busy':>6}"
            lines.append(f"{label} | " + " | ".join(cells))
    lines.append("(milliseconds to the first token; key = keystroke on a cached prefix; "
                 "+busy = the size above with one CPU-bound process beside it)")
    for b in backends:
        gbs = [f"{n}: {by[(b, n, 'quiet')]['keystroke_gb_s']:.2f}" for n in sizes
               if "keystroke_gb_s" in by.get((b, n, "quiet"), {})]
        if gbs:
            lines.append(f"bandwidth achieved by a keystroke forward, {b} (GB/s of weights): " + ", ".join(gbs))
    for b in backends[1:]:
        ratios = []
        for n in sizes:
            ours, other = by.get(("tinymorph", n, "quiet")), by.get((b, n, "quiet"))
            if ours and other:
                ratios.append(f"{n}: cold x{other['cold_ttft_ms'] / ours['cold_ttft_ms']:.2f}, "
                              f"keystroke x{other['keystroke_p50_ms'] / ours['keystroke_p50_ms']:.2f}")
        lines.append(f"{b} / tinymorph (higher = tinymorph faster): " + "; ".join(ratios))
    for b in backends:
        quiet = [r for r in result.rows if r["backend"] == b and r.get("load", "quiet") == "quiet"]
        busy = [r for r in result.rows if r["backend"] == b and r.get("load") == "contention"]
        for r in busy:
            q = next((x for x in quiet if x["tokens"] == r["tokens"]), None)
            if q:
                lines.append(f"contention, {b} @{r['tokens']}: keystroke p50 {r['keystroke_p50_ms']:.1f} ms = "
                             f"x{r['keystroke_p50_ms'] / q['keystroke_p50_ms']:.2f} its quiet figure")
    for b, d in result.decode.items():
        busy = result.contention.get(b)
        extra = f"   beside a busy process {busy['tokens_per_s']:7.1f} tok/s" if busy else ""
        drafts = f" ({d['drafts_accepted']:.0f} drafted tokens accepted)" if "drafts_accepted" in d else ""
        lines.append(f"decode {b:<12} {d['tokens_per_s']:7.1f} tok/s   bandwidth achieved "
                     f"{d['bandwidth_gb_s']:6.2f} GB/s{extra}{drafts}")
    if "llama.cpp" in result.decode and "tinymorph" in result.decode:
        ratio = result.decode["tinymorph"]["tokens_per_s"] / result.decode["llama.cpp"]["tokens_per_s"]
        lines.append(f"decode tinymorph / llama.cpp: x{ratio:.2f}")
    if result.steering:
        s = result.steering
        lines.append(f"steering overhead (add on layers {s.get('layers', '?')}): prefill "
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
        rows = [r for r in result.rows if r["backend"] == backend and r.get("load", "quiet") == "quiet"]
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
