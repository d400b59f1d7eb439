"""Weight-only quantized linears: 4-bit groups where that loses nothing, 8-bit rows elsewhere.

Why: decode and keystroke forwards read every weight once per token, so the bytes read decide
their speed (measured, 2 threads, all 211 matrices of the default model in a row: int8 rows
10.0 ms, 4-bit groups of 32 4.6 ms per token). The default model ships as a GGUF whose projections
are Q4_1 (groups of 32 weights sharing a scale and an offset): the same 4-bit groups hold exactly
those values, so 4-bit here is the model as published, not a further approximation (bf16
activations: relative error of a projection 2.9e-3, like dense bf16's 2.8e-3; int8 rows 8.4e-3).
Weights that are not 4-bit groups already (any bf16/fp32 HF model, the GGUF's Q8_0 embedding) stay
8-bit under `auto`; `int4` forces 4 bits on every projection (lossy for such models, as in llama.cpp).

The 4-bit kernel is PyTorch's own (`_weight_int4pack_mm_for_cpu`); for many rows (prefill) the
weight is dequantized once per forward and the bf16 GEMM does the work, as for int8.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

GROUP = 32  # inputs sharing one scale and offset (GGUF Q4_0/Q4_1 blocks)
PACK_BLOCK = 64  # output rows per block of PyTorch's CPU int4 packing (two nibbles: rows d and d+32)
INT8_KERNEL_MAX_ROWS = 16  # up to this many tokens per forward use the int8 GEMV kernel
INT4_KERNEL_MAX_ROWS = 32  # up to this many tokens the int4 kernel beats dequantize + bf16 GEMM
WEIGHT_MODES = ("auto", "int4", "int8")
# The C int8 kernel (`csrc/int8_linear.c`) runs for up to this many rows of a weight this large (the
# lm_head: 2.1 -> 1.0 ms per token); PyTorch's kernel is faster on small projections.
C_KERNEL_MAX_ROWS = 2
C_KERNEL_MIN_WEIGHTS = 1 << 22


def int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes 0..15 [N, K], scale [N, K/GROUP], offset [N, K/GROUP]) with weight ≈ code*scale + offset,
    by each group's min and max (what llama.cpp's Q4_1 does, so its values come back exactly)."""
    n, k = weight.shape
    groups = weight.float().view(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / 15
    codes = torch.round((groups - low[..., None]) / scale.clamp_min(1e-30)[..., None]).clamp(0, 15)
    return codes.view(n, k).to(torch.uint8), scale, low


def int4_shape_fits(weight: torch.Tensor) -> bool:
    """True when PyTorch's int4 packing can hold `weight`: whole packing blocks of rows, whole groups."""
    n, k = weight.shape
    return not (n % PACK_BLOCK or k % GROUP)


def int4_exact(weight: torch.Tensor, groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> bool:
    """True when `groups` (from `int4_groups(weight)`) give `weight` back, so storing it in 4 bits
    changes nothing beyond float rounding (the weight holds 4-bit group values already)."""
    n, k = weight.shape
    codes, scale, low = groups
    back = codes.view(n, k // GROUP, GROUP).float() * scale[..., None] + low[..., None]
    err = (back.view(n, k) - weight.float()).abs().amax()
    return bool(err <= 1e-5 * weight.float().abs().amax().clamp_min(1e-30))


def int4_fits(weight: torch.Tensor) -> bool:
    """True when `weight` can be stored as 4-bit groups (shape) and holds such values already."""
    return int4_shape_fits(weight) and int4_exact(weight, int4_groups(weight))


class WeightOnlyLinear(nn.Module):
    """A linear whose weight is stored quantized: a fused kernel for a few rows (decode, keystrokes),
    and for many rows (prefill) the weight dequantized once for the bf16 GEMM (AVX512-BF16/AMX),
    which the GEMV kernels cannot match there."""

    max_kernel_rows: int  # up to this many rows the fused kernel runs
    bias: torch.Tensor | None

    def kernel(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        out = F.linear(rows, self.dequantized()) if rows.shape[0] > self.max_kernel_rows else self.kernel(rows)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], -1)


class Int4Linear(WeightOnlyLinear):
    """Weight-only 4-bit linear: groups of 32 inputs with a scale and an offset per output row."""

    max_kernel_rows = INT4_KERNEL_MAX_ROWS

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype,
                 groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        """`groups`: `int4_groups(weight)` when the caller has them already."""
        super().__init__()
        n, k = weight.shape
        codes, scale, low = groups if groups is not None else int4_groups(weight)
        self.out_features, self.in_features = n, k
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1))
        # the kernel computes (code - 8) * scale + zero, so zero = offset + 8 * scale; [K/GROUP, N, 2]
        scales_zeros = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1)
        self.register_buffer("scales_zeros", scales_zeros.contiguous().to(act_dtype))
        self.register_buffer("bias", None if bias is None else bias.to(act_dtype))

    def codes(self) -> torch.Tensor:
        """The [N, K] codes back from PyTorch's packing: per block of 64 rows, byte (k, d) holds row
        d in its low nibble and row d + 32 in its high one (checked by `tests/test_engine.py`)."""
        n, k = self.out_features, self.in_features
        blocks = self.packed.view(n // PACK_BLOCK, k, PACK_BLOCK // 2)
        return torch.cat([blocks & 15, blocks >> 4], dim=-1).transpose(1, 2).reshape(n, k)

    def dequantized(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        scale, zero = self.scales_zeros.unbind(-1)  # [K/GROUP, N] each
        codes = self.codes().view(n, k // GROUP, GROUP).to(scale.dtype) - 8
        return (codes * scale.t()[..., None] + zero.t()[..., None]).view(n, k)

    def kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), self.packed, GROUP, self.scales_zeros)


class Int8Linear(WeightOnlyLinear):
    """Weight-only int8 linear (per-output-row scales), activations stay in the model dtype.
    `float_output`: return float32 (the lm_head: logits in bf16 have steps of 0.125 at 20)."""

    max_kernel_rows = INT8_KERNEL_MAX_ROWS

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype,
                 float_output: bool = False):
        super().__init__()
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(act_dtype))
        self.register_buffer("bias", None if bias is None else bias.to(act_dtype))
        self.float_output = float_output
        self._c_kernel = self.weight.numel() >= C_KERNEL_MIN_WEIGHTS
        self._scales_f32: torch.Tensor | None = None

    def dequantized(self) -> torch.Tensor:
        return self.weight.to(self.scales.dtype) * self.scales.unsqueeze(1)

    def kernel(self, rows: torch.Tensor) -> torch.Tensor:
        if self._c_kernel and rows.shape[0] <= C_KERNEL_MAX_ROWS and (gemv := int8_gemv()) is not None:
            if self._scales_f32 is None:
                self._scales_f32 = self.scales.float()
            out = gemv(rows, self.weight, self._scales_f32)
            return out if self.float_output else out.to(rows.dtype)
        out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        return out.float() if self.float_output else out


class Int8Gemv:
    """`csrc/int8_linear.c`: rows [M, K] x int8 weight [N, K] x float32 scales [N] → float32 [M, N]."""

    def __init__(self, fn):
        self._fn = fn

    def __call__(self, rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        x = rows.to(torch.float32).contiguous()
        out = torch.empty(x.shape[0], weight.shape[0])
        self._fn(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), out.data_ptr(), x.shape[0], weight.shape[0],
                 weight.shape[1])
        return out


def int8_gemv() -> Int8Gemv | None:
    """The C int8 kernel, built (`kernels.py`) and checked against a float matmul on first call."""
    return kernels.load("int8_linear", _wrap_gemv, _gemv_is_exact)


def _wrap_gemv(library: ctypes.CDLL) -> Int8Gemv:
    fn = library.int8_linear
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    return Int8Gemv(fn)


def _gemv_is_exact(gemv: Int8Gemv) -> bool:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (300, 96), generator=gen, dtype=torch.int8)
    scales, rows = torch.rand(300, generator=gen) / 100, torch.randn(2, 96, generator=gen)
    want = rows @ (weight.float() * scales[:, None]).T
    return torch.allclose(gemv(rows, weight, scales), want, atol=1e-4, rtol=1e-4)


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 rows with per-row scales; rows are dequantized on lookup."""

    def __init__(self, linear: Int8Linear):
        super().__init__()
        self.table = linear  # shared with the tied lm_head: one int8 matrix serves both

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.weight[ids].to(self.table.scales.dtype)
        return rows * self.table.scales[ids].unsqueeze(-1)


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype,
                     mode: str) -> nn.Module:
    """An `Int4Linear` or `Int8Linear` for `weight` (given in its full stored precision, so that
    4-bit values are still exact): `int8` always 8-bit; `int4` 4-bit wherever the packing can hold
    the shape; `auto` 4-bit where the weight also holds 4-bit group values already (`int4_fits`)."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, not {mode!r}")
    if mode == "int8" or not int4_shape_fits(weight):
        return Int8Linear(weight, bias, act_dtype)
    groups = int4_groups(weight)  # once: the exactness check and the 4-bit linear both use them
    if mode == "auto" and not int4_exact(weight, groups):
        return Int8Linear(weight, bias, act_dtype)
    return Int4Linear(weight, bias, act_dtype, groups)


def weight_format(model: nn.Module) -> str:
    """"int4+int8" etc.: which kinds of quantized linear the model holds ("" when none)."""
    kinds = {"int4" for m in model.modules() if isinstance(m, Int4Linear)}
    kinds |= {"int8" for m in model.modules() if isinstance(m, Int8Linear)}
    return "+".join(sorted(kinds))
