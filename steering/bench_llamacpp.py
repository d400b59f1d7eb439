"""llama.cpp's column of `tinymorph bench`: a worker process that times requests it is sent.

Why a process of its own: llama.cpp and torch each bring an OpenMP runtime (two copies of libgomp
in one process), and a broken or mismatched llama.cpp build must not take the bench down. The
worker stays up for the whole bench so that tinymorph and llama.cpp measurements can alternate
(A, B, A, B on the same token ids): on a shared machine load changes over seconds, and only
alternating runs give ratios that mean something. This module must never import torch (nor
anything that does).

Protocol: one JSON object per line on stdin, one answer per line on stdout.
    {"op": "first_token", "ids": [...]}   -> {"ms": ..., "new_tokens": ...}
        prefill what the KV cache does not hold yet (longest common prefix) and sample one token
    {"op": "cold", "ids": [...]}          -> {"ms": ...}   the same with an empty cache
    {"op": "decode", "ids": [...], "n": N} -> {"tokens_per_s": ...}  N one-token steps after ids
    {"op": "quit"}

    python -m tinymorph.steering.bench_llamacpp GGUF --threads 2 --n-ctx 2300
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


class Worker:
    def __init__(self, gguf: str, threads: int | None, n_ctx: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_batch=min(n_ctx, 2048),
                                   n_threads=threads, n_threads_batch=threads, verbose=False)

    def _drop_after(self, keep: int) -> None:
        self.llm.n_tokens = keep
        self.llm._ctx.kv_cache_seq_rm(-1, keep, -1)

    def first_token(self, ids: list[int]) -> dict:
        t0 = time.perf_counter()
        llm = self.llm
        cached = llm.input_ids[: llm.n_tokens].tolist()
        common, limit = 0, min(len(cached), len(ids) - 1)
        while common < limit and cached[common] == ids[common]:
            common += 1
        self._drop_after(common)
        llm.eval(ids[common:])
        llm.sample(temp=0.0)
        return {"ms": (time.perf_counter() - t0) * 1000, "new_tokens": len(ids) - common}

    def cold(self, ids: list[int]) -> dict:
        self.llm.reset()
        self._drop_after(0)
        return {"ms": self.first_token(ids)["ms"]}

    def decode(self, ids: list[int], n: int) -> dict:
        self.first_token(ids)
        token = self.llm.sample(temp=0.0)
        t0 = time.perf_counter()
        for _ in range(n):
            self.llm.eval([token])
            token = self.llm.sample(temp=0.0)
        return {"tokens_per_s": n / (time.perf_counter() - t0)}

    def close(self) -> None:
        self.llm.close()  # explicitly: llama-cpp-python's __del__ at interpreter exit raises


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n-ctx", type=int, default=2304)
    a = p.parse_args()
    worker = Worker(a.gguf, a.threads, a.n_ctx)
    print(json.dumps({"ready": True, "model_bytes": Path(a.gguf).stat().st_size}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.get("op")
        if op == "quit":
            break
        if op == "first_token":
            answer = worker.first_token(msg["ids"])
        elif op == "cold":
            answer = worker.cold(msg["ids"])
        elif op == "decode":
            answer = worker.decode(msg["ids"], int(msg["n"]))
        else:
            answer = {"error": f"unknown op {op!r}"}
        print(json.dumps(answer), flush=True)
    worker.close()


if __name__ == "__main__":
    main()
