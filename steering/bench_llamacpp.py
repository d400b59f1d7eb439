"""llama.cpp's column of `tinymorph bench`, run as a separate process.

Why a process of its own: llama.cpp and torch each bring an OpenMP runtime, and with torch loaded
first llama.cpp crashes in its first decode here. This module must therefore never import torch
(nor anything that does). It prints one JSON object: {"rows": [...], "decode": {...}}.

    python -m tinymorph.steering.bench_llamacpp GGUF TEXT_FILE --sizes 64,256 --keystrokes 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(gguf: str, text: str, sizes: list[int], keystrokes: int, cold_repeats: int, decode_tokens: int,
            threads: int | None) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=max(sizes) + keystrokes * 4 + 64,
                          n_threads=threads, verbose=False)
    all_ids = llm.tokenize(text.encode(), add_bos=False)

    def first_token(ids: list[int]) -> float:
        """Prefill what the KV cache does not hold yet (longest common prefix), sample one token."""
        t0 = time.perf_counter()
        cached = llm.input_ids[: llm.n_tokens].tolist()
        common = 0
        limit = min(len(cached), len(ids) - 1)
        while common < limit and cached[common] == ids[common]:
            common += 1
        llm.n_tokens = common
        llm._ctx.kv_cache_seq_rm(-1, common, -1)
        llm.eval(ids[common:])
        llm.sample()
        return (time.perf_counter() - t0) * 1000

    rows = []
    for n in sizes:
        base = llm.detokenize(all_ids[:n]).decode(errors="ignore")
        ids = llm.tokenize(base.encode(), add_bos=False)
        colds = []
        for _ in range(cold_repeats):
            llm.reset()
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            colds.append(first_token(ids))
        ahead = text[len(base): len(base) + keystrokes]
        keys = [first_token(llm.tokenize((base + ahead[: k + 1]).encode(), add_bos=False))
                for k in range(keystrokes)]
        rows.append({"backend": "llama.cpp", "tokens": n, "cold_ttft_ms": statistics.median(colds),
                     "keystroke_p50_ms": percentile(keys, 0.5), "keystroke_p95_ms": percentile(keys, 0.95)})
    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    llm.eval(all_ids[:256])
    token = llm.sample()
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        llm.eval([token])
        token = llm.sample()
    tps = decode_tokens / (time.perf_counter() - t0)
    size = Path(gguf).stat().st_size
    return {"rows": rows, "decode": {"tokens_per_s": tps, "bandwidth_gb_s": tps * size / 1e9}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("text")
    p.add_argument("--sizes", default="64,256,1024,2048")
    p.add_argument("--keystrokes", type=int, default=30)
    p.add_argument("--cold-repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    result = measure(a.gguf, Path(a.text).read_text(encoding="utf-8"), [int(s) for s in a.sizes.split(",")],
                     a.keystrokes, a.cold_repeats, a.decode_tokens, a.threads)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
