"""Attention of a few new tokens over a bfloat16 KV cache: a small C kernel (`csrc/decode_attention.c`).

Why: a keystroke or a decode step attends 1-4 new queries over the whole cache, and PyTorch's CPU
attention does that slowly: over 2,048 cached tokens its float32 kernel took 270-320 µs per layer
for one query and 390-470 µs for two (~10 GB/s of cache read), its bf16 kernel 4-7x longer. The
kernel reads a bf16 cache once per head group on torch's two threads: ~73 µs for one query and ~100
µs for two (AVX-512: four keys' dot products reduced together, the value sums in registers; plain C
loops elsewhere), and the cache is half the size.
Built with the other kernels (`kernels.py`) and checked against `scaled_dot_product_attention`
before first use; where either fails, `kernel()` is None and the model keeps a float32 cache with
PyTorch's attention.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from . import kernels

MAX_ROWS = 4  # new tokens per forward up to which the kernel runs (at 5 it only matched SDPA)


def offset_causal_mask(t: int, length: int) -> torch.Tensor:
    """Additive float32 mask [t, length] of the last t of `length` positions: query j sees keys up to
    length - t + j. The kernel applies this mask itself; SDPA is given it."""
    return torch.zeros(t, length).masked_fill_(torch.ones(t, length, dtype=torch.bool).triu_(length - t + 1),
                                               float("-inf"))


class DecodeAttention:
    """The built kernel: `__call__(q, keys, values)` → attention output like SDPA's;
    `rope_store_attend` → a decoder layer's whole attention for the new tokens from its q|k|v."""

    def __init__(self, fn, fused):
        self._fn = fn
        self._fused = fused
        self.scratch = kernels.Scratch()

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
        """q [1, H, T, Dh] (any float dtype), keys/values [1, KV, L, Dh] bf16 views of a cache whose
        rows are contiguous per head → float32 [1, H, T, Dh], or None for shapes it does not hold."""
        _, heads, t, dim = q.shape
        kv_heads, length = keys.shape[1], keys.shape[2]
        if keys.stride(-1) != 1 or keys.stride(-2) != dim or keys.stride() != values.stride():
            return None
        q = q.to(torch.float32).contiguous()
        out = torch.zeros_like(q)
        scratch = self.scratch(heads * t * length)
        status = self._fn(q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), scratch.data_ptr(),
                          heads, kv_heads, t, length, dim, keys.stride(1), dim ** -0.5)
        return out if status == 0 else None

    def rope_store_attend(self, qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, keys: torch.Tensor,
                          values: torch.Tensor, start: int, heads: int) -> torch.Tensor | None:
        """qkv [1, T, (H + 2 KV) Dh] bf16 (a layer's fused projection of T new tokens), cos/signed_sin
        [T, Dh] bf16 (`llama.rope_tables` at their positions), keys/values [1, KV, capacity, Dh] (the
        layer's bf16 cache): rope, the new keys and values written at start..start+T, attention over
        all start+T → bf16 [1, T, H Dh], the values PyTorch's ops give on the same path; None for
        shapes the kernel does not hold."""
        _, t, width = qkv.shape
        kv_heads, dim = keys.shape[1], keys.shape[-1]
        if (qkv.dtype != torch.bfloat16 or cos.dtype != torch.bfloat16 or width != (heads + 2 * kv_heads) * dim
                or not (keys.is_contiguous() and values.is_contiguous() and cos.is_contiguous()
                        and signed_sin.is_contiguous())):
            return None
        qkv = qkv.contiguous()
        out = torch.empty(1, t, heads * dim, dtype=torch.bfloat16)
        work = torch.empty(2 * heads * t * dim)
        scratch = self.scratch(heads * t * (start + t))
        status = self._fused(qkv.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), keys.data_ptr(),
                             values.data_ptr(), work.data_ptr(), work.data_ptr() + 4 * heads * t * dim,
                             out.data_ptr(), scratch.data_ptr(), heads, kv_heads, t, start, dim, keys.stride(1))
        return out if status == 0 else None


class PrefillAttention:
    """The built prefill kernel (`csrc/prefill_attention.c`): causal attention of many new queries over
    a bf16 cache, flash-style with AVX512-BF16 dot products (a cold prefill of 2,048 tokens: ~40 ms
    per layer in SDPA, see the C file for this one's figure)."""

    def __init__(self, fn):
        self._fn = fn
        self.scratch = kernels.Scratch()

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
        """q [1, H, T, 64] bf16 (rows contiguous, any head/row strides; the last T of L positions),
        keys/values [1, KV, L, 64] bf16 views of a cache (rows contiguous) → bf16 [1, T, H*64], or None
        for what it does not hold."""
        _, heads, t, dim = q.shape
        kv_heads, length = keys.shape[1], keys.shape[2]
        if (q.dtype != torch.bfloat16 or keys.dtype != torch.bfloat16 or q.stride(-1) != 1
                or keys.stride(-1) != 1 or keys.stride(-2) != dim or keys.stride() != values.stride()):
            return None
        out = torch.empty(1, t, heads * dim, dtype=torch.bfloat16)
        padded = -(-length // 64) * 64
        packed = self.scratch(kv_heads * padded * dim)  # float32 elements: room for bf16 keys and values
        status = self._fn(q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), packed.data_ptr(),
                          heads, kv_heads, t, length, dim, q.stride(1), q.stride(2), keys.stride(1), dim ** -0.5)
        return out if status == 0 else None


def kernel() -> DecodeAttention | None:
    """The kernel for this machine, built and checked on first call (None where it cannot be)."""
    return kernels.load("decode_attention", _wrap, _agrees_with_sdpa)


def prefill_kernel() -> PrefillAttention | None:
    """The prefill kernel where the machine has AVX512-BF16, built and checked on first call."""
    return kernels.load("prefill_attention", _wrap_prefill, _prefill_agrees_with_sdpa)


def _wrap_prefill(library: ctypes.CDLL) -> PrefillAttention:
    fn = library.prefill_attention
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int] * 3 + [ctypes.c_int64, ctypes.c_int]
                   + [ctypes.c_int64] * 3 + [ctypes.c_float])
    return PrefillAttention(fn)


def _prefill_agrees_with_sdpa(attention: PrefillAttention) -> bool:
    """The prefill kernel against float32 SDPA over the same bf16 values (cold and after a prefix):
    within what rounding the probabilities and the output to bf16 allows."""
    gen = torch.Generator().manual_seed(2)
    for heads, kv_heads, t, length in ((9, 3, 70, 70), (9, 3, 37, 200), (4, 2, 130, 131)):
        store = torch.randn(2, 1, kv_heads, length + 5, 64, generator=gen).to(torch.bfloat16)
        keys, values = store[0, :, :, :length], store[1, :, :, :length]
        q = torch.randn(1, t, heads, 64, generator=gen).to(torch.bfloat16).transpose(1, 2)
        want = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(),
                                              attn_mask=offset_causal_mask(t, length), enable_gqa=True)
        got = attention(q, keys, values)
        if got is None:
            return False
        got = got.float().view(1, t, heads, 64).transpose(1, 2)
        if not ((got - want).abs() <= 2e-2 + want.abs() * 2 ** -7).all():
            return False
    return True


def _wrap(library: ctypes.CDLL) -> DecodeAttention:
    fn = library.decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5 + [ctypes.c_int64, ctypes.c_float]
    fused = library.rope_store_attend
    fused.restype = ctypes.c_int
    fused.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int] * 5 + [ctypes.c_int64]
    return DecodeAttention(fn, fused)


def _agrees_with_sdpa(attention: DecodeAttention) -> bool:
    """The kernel against SDPA over the same bf16 values, causal offset mask included."""
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads, t, length, dim in ((9, 3, 1, 37, 64), (9, 3, 4, 300, 64), (4, 2, 3, 20, 16)):
        store = torch.randn(2, 1, kv_heads, length + 5, dim, generator=gen).to(torch.bfloat16)
        keys, values = store[0, :, :, :length], store[1, :, :, :length]
        q = torch.randn(1, heads, t, dim, generator=gen)
        want = F.scaled_dot_product_attention(q, keys.float(), values.float(), attn_mask=offset_causal_mask(t, length),
                                              enable_gqa=True)
        got = attention(q, keys, values)
        if got is None or not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            return False
    return _fused_agrees(attention)


def _fused_agrees(attention: DecodeAttention) -> bool:
    """rope_store_attend against the same steps in PyTorch (bf16 rope, cache writes, attention): the
    same cache contents and output but for the attention's last float bits."""
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, start, t, capacity = 9, 3, 64, 40, 3, 50
    qkv = torch.randn(1, t, (heads + 2 * kv_heads) * dim, generator=gen).to(torch.bfloat16)
    cos = torch.rand(t, dim, generator=gen).to(torch.bfloat16)
    sin = torch.rand(t, dim, generator=gen).to(torch.bfloat16)
    cache = torch.randn(2, 1, kv_heads, capacity, dim, generator=gen).to(torch.bfloat16)
    mine = cache.clone()
    rows = qkv.view(1, t, heads + 2 * kv_heads, dim).transpose(1, 2)
    qk = rows[:, : heads + kv_heads] * cos + rows[:, : heads + kv_heads].roll(dim // 2, dims=-1) * sin
    cache[0, :, :, start:start + t] = qk[:, heads:]
    cache[1, :, :, start:start + t] = rows[:, heads + kv_heads:]
    end = start + t
    want = attention(qk[:, :heads], cache[0, :, :, :end], cache[1, :, :, :end])
    got = attention.rope_store_attend(qkv, cos, sin, mine[0], mine[1], start, heads)
    if want is None or got is None or not torch.equal(mine, cache):
        return False
    want = want.to(torch.bfloat16).transpose(1, 2).reshape(1, t, -1)
    return bool(((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all())
