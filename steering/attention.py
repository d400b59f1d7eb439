"""Attention of a few new tokens over a bfloat16 KV cache: a small C kernel, built on this machine.

Why: a keystroke or a decode step attends 1-4 new queries over the whole cache, and PyTorch's CPU
attention does that slowly: over 2,048 cached tokens its float32 kernel took 270-320 µs per layer
for one query and 390-470 µs for two (~10 GB/s of cache read), its bf16 kernel 4-7x longer. The loop
in `csrc/decode_attention.c` reads a bf16 cache once per head group: 120-150 µs and 180-250 µs, on
one thread (the same for an AVX2-only build), so the cache can also be half the size.

It is compiled once per machine with the C compiler found (`cc`, `gcc` or `clang`; `-O3
-march=native`) into the user cache dir, loaded with ctypes, and checked against
`scaled_dot_product_attention` before first use. Without a compiler, or when the build or the check
fails, `kernel()` is None and the model keeps a float32 cache with PyTorch's attention. Set
`TINYMORPH_ATTENTION_KERNEL=0` to never use it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_ROWS = 4  # new tokens per forward up to which the kernel runs (at 5 it only matched SDPA)
_SOURCE = "decode_attention.c"
_lock = threading.Lock()
_loaded: dict[str, object] = {}


class DecodeAttention:
    """The built kernel: `__call__(q, keys, values)` → attention output like SDPA's."""

    def __init__(self, fn):
        self._fn = fn
        self._scratch = torch.empty(0)

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
        """q [1, H, T, Dh] (any float dtype), keys/values [1, KV, L, Dh] bf16 views of a cache whose
        rows are contiguous per head → float32 [1, H, T, Dh], or None for shapes it does not hold."""
        _, heads, t, dim = q.shape
        kv_heads, length = keys.shape[1], keys.shape[2]
        if keys.stride(-1) != 1 or keys.stride(-2) != dim or keys.stride() != values.stride():
            return None
        q = q.to(torch.float32).contiguous()
        out = torch.zeros_like(q)
        need = heads * t * length
        if self._scratch.numel() < need:
            self._scratch = torch.empty(max(need, 2 * self._scratch.numel()))
        status = self._fn(q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), self._scratch.data_ptr(),
                          heads, kv_heads, t, length, dim, keys.stride(1), dim ** -0.5)
        return out if status == 0 else None


def kernel() -> DecodeAttention | None:
    """The kernel for this machine, built and checked on first call (None where it cannot be)."""
    with _lock:
        if "kernel" not in _loaded:
            _loaded["kernel"] = _build_and_check()
        return _loaded["kernel"]  # type: ignore[return-value]


def disabled_reason() -> str | None:
    """Why `kernel()` is None (after it was called), for logs and `tinymorph bench`."""
    return _loaded.get("reason")  # type: ignore[return-value]


def _build_and_check() -> DecodeAttention | None:
    if os.environ.get("TINYMORPH_ATTENTION_KERNEL", "1") == "0":
        _loaded["reason"] = "TINYMORPH_ATTENTION_KERNEL=0"
        return None
    try:
        library = _build()
        fn = library.decode_attention
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _loaded["reason"] = f"not built: {exc}"
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5 + [ctypes.c_int64, ctypes.c_float]
    attention = DecodeAttention(fn)
    if not _agrees_with_sdpa(attention):
        _loaded["reason"] = "its output differs from scaled_dot_product_attention on this machine"
        return None
    return attention


def _build() -> ctypes.CDLL:
    source = (resources.files("tinymorph.steering") / "csrc" / _SOURCE).read_bytes()
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    tag = hashlib.sha256(source + _machine_id().encode()).hexdigest()[:16]
    target = _cache_dir() / f"decode_attention-{tag}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / _SOURCE
            src.write_bytes(source)
            built = Path(tmp) / target.name
            errors = ""
            # -fopenmp links libgomp.so.1, which is torch's own copy once torch is loaded (one thread pool);
            # -march=native and OpenMP are not known to every compiler
            for flags in (["-fopenmp", "-march=native"], ["-fopenmp"], ["-march=native"], []):
                cmd = [compiler, "-O3", "-ffast-math", *flags, "-shared", "-fPIC", str(src), "-o", str(built), "-lm"]
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if run.returncode == 0:
                    break
                errors = run.stderr.strip()[-300:]
            else:
                raise RuntimeError(f"{compiler} failed: {errors}")
            os.replace(built, target)  # atomic: another process may be building it too
    return ctypes.CDLL(str(target))


def _machine_id() -> str:
    """What a -march=native build depends on: a cache dir shared by machines with other CPUs must not
    hand one of them a build with instructions it lacks."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = "".join(line for line in fh if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    return f"{platform.machine()}|{platform.node()}|{platform.processor()}|{cpu}"


def _cache_dir() -> Path:
    env = os.environ.get("TINYMORPH_CACHE_DIR")
    if env:
        return Path(env) / "kernels"
    import platformdirs

    return Path(platformdirs.user_cache_dir("tinymorph")) / "kernels"


def _agrees_with_sdpa(attention: DecodeAttention) -> bool:
    """The kernel against SDPA over the same bf16 values, causal offset mask included."""
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads, t, length, dim in ((9, 3, 1, 37, 64), (9, 3, 4, 300, 64), (4, 2, 3, 20, 16)):
        store = torch.randn(2, 1, kv_heads, length + 5, dim, generator=gen).to(torch.bfloat16)
        keys, values = store[0, :, :, :length], store[1, :, :, :length]
        q = torch.randn(1, heads, t, dim, generator=gen)
        mask = torch.zeros(t, length).masked_fill_(torch.ones(t, length, dtype=torch.bool).triu_(length - t + 1),
                                                   float("-inf"))
        want = F.scaled_dot_product_attention(q, keys.float(), values.float(), attn_mask=mask, enable_gqa=True)
        got = attention(q, keys, values)
        if got is None or not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            return False
    return True
