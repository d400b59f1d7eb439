"""Weight-only quantized linears: 4-bit groups where that loses nothing, 8-bit rows elsewhere.

Why: decode and keystroke forwards read every weight once per token, so the bytes read decide
their speed (measured, 2 threads, all 211 matrices of the default model in a row: int8 rows
10.0 ms, 4-bit groups of 32 4.6 ms per token). The default model ships as a GGUF whose projections
are Q4_1 (groups of 32 weights sharing a scale and an offset): the same 4-bit groups hold exactly
those values, so 4-bit here is the model as published, not a further approximation (bf16
activations: relative error of a projection 2.9e-3, like dense bf16's 2.8e-3; int8 rows 8.4e-3).
Weights that are not 4-bit groups already (any bf16/fp32 HF model, the GGUF's Q8_0 embedding) stay
8-bit under `auto`; `int4` forces 4 bits on every projection (lossy for such models, as in llama.cpp).

For bf16 activations where the C kernels build (`kernels.py`), the 4-bit kernel is
`csrc/int4_linear.c` (exact bf16 products summed in float32, Q4_1's own float16 scales and offsets:
~1.6x PyTorch's `_weight_int4pack_mm_for_cpu` for one row, which rounds its output and scales to
bf16), and the C decoder layers (`fused_layer.py`) read the same packing; elsewhere it is PyTorch's.
For many rows (prefill) the weight is dequantized once per forward and the bf16 GEMM does the work,
as for int8.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

GROUP = 32  # inputs sharing one scale and offset (GGUF Q4_0/Q4_1 blocks)
PACK_BLOCK = 64  # output rows per block of PyTorch's CPU int4 packing (two nibbles: rows d and d+32)
PAIR = 2 * GROUP  # inputs per 16 words of the C kernel's packing (see `pack_pairs`)
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


def _pair_order() -> torch.Tensor:
    """[16, 4]: which of a pair of groups' 64 inputs nibble k of word w holds in the C kernel's packing
    (`csrc/int4_linear.c`: lane L = words 2L, 2L+1 belongs to group L % 2)."""
    w, k = torch.arange(16)[:, None], torch.arange(4)[None, :]
    return (w // 2 % 2) * GROUP + (w // 4) * 8 + 2 * k + w % 2


PAIR_ORDER = _pair_order()


BLOCK_ROWS = 8  # output rows the C kernel's packing stores together
SCALE_BYTES = BLOCK_ROWS * 2 * 2  # a block's float16 scales (or offsets) of one pair of groups


def pack_pairs(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """codes 0..15 [N, K], scale and offset [N, K/GROUP] → the C kernel's bytes [N/8, K/64, 320]: per
    block of 8 rows, per pair of groups, each row's 16 little-endian words of four nibbles
    (`PAIR_ORDER`), then each row's two scales, then its two offsets, in float16 (a GGUF's Q4_1 stores
    both so: its values come back exactly)."""
    n, k = codes.shape
    nibbles = codes.view(n, k // PAIR, PAIR).to(torch.int32)[..., PAIR_ORDER]  # [N, pairs, 16, 4]
    words = (nibbles << (4 * torch.arange(4))).sum(-1)
    code_bytes = torch.stack([words & 255, words >> 8], dim=-1).to(torch.uint8).view(n, k // PAIR, 32)

    def by_block(rows: torch.Tensor) -> torch.Tensor:  # [N, pairs, width] → [N/8, pairs, 8 * width]
        width = rows.shape[-1]
        blocks = rows.reshape(n // BLOCK_ROWS, BLOCK_ROWS, k // PAIR, width).transpose(1, 2)
        return blocks.reshape(n // BLOCK_ROWS, k // PAIR, -1)

    halves = [by_block(t.half().reshape(n, k // PAIR, 2).contiguous().view(torch.uint8)) for t in (scale, offset)]
    return torch.cat([by_block(code_bytes), *halves], dim=-1).contiguous()


def unpack_pairs(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack_pairs` undone: → (codes [N, K] uint8, scale, offset [N, K/GROUP] float32 (float16 values))."""
    blocks, pairs, _ = packed.shape
    n, k = blocks * BLOCK_ROWS, pairs * PAIR

    def by_row(part: torch.Tensor) -> torch.Tensor:  # [N/8, pairs, 8 * width] → [N, pairs, width]
        return part.reshape(blocks, pairs, BLOCK_ROWS, -1).transpose(1, 2).reshape(n, pairs, -1)

    code_bytes = by_row(packed[..., : BLOCK_ROWS * 32]).to(torch.int32).view(n, pairs, 16, 2)
    words = code_bytes[..., 0] | (code_bytes[..., 1] << 8)
    codes = torch.empty(n, pairs, PAIR, dtype=torch.uint8)
    codes[..., PAIR_ORDER] = ((words[..., None] >> (4 * torch.arange(4))) & 15).to(torch.uint8)
    start = BLOCK_ROWS * 32
    scale, offset = (by_row(packed[..., at: at + SCALE_BYTES]).contiguous().view(torch.float16).reshape(n, k // GROUP)
                     for at in (start, start + SCALE_BYTES))
    return codes.view(n, k), scale.float(), offset.float()


class Int4Linear(WeightOnlyLinear):
    """Weight-only 4-bit linear: groups of 32 inputs with a scale and an offset per output row.
    Stored for the C kernel (`blocks`, see `pack_pairs`: bf16 activations, where it builds) or for
    PyTorch's (`packed`, `scales_zeros`)."""

    max_kernel_rows = INT4_KERNEL_MAX_ROWS

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype,
                 groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        """`groups`: `int4_groups(weight)` when the caller has them already."""
        super().__init__()
        n, k = weight.shape
        codes, scale, low = groups if groups is not None else int4_groups(weight)
        self.out_features, self.in_features = n, k
        self.gemm = int4_gemm() if act_dtype == torch.bfloat16 and not k % PAIR and not n % BLOCK_ROWS else None
        if self.gemm is not None:
            self.register_buffer("blocks", pack_pairs(codes, scale, low))
        else:
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1))
            # the kernel computes (code - 8) * scale + zero, so zero = offset + 8 * scale; [K/GROUP, N, 2]
            scales_zeros = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1)
            self.register_buffer("scales_zeros", scales_zeros.contiguous().to(act_dtype))
        self.register_buffer("bias", None if bias is None else bias.to(act_dtype))

    def codes(self) -> torch.Tensor:
        """The [N, K] codes back from the packing. PyTorch's: per block of 64 rows, byte (k, d) holds
        row d in its low nibble and row d + 32 in its high one (checked by `tests/test_engine.py`)."""
        n, k = self.out_features, self.in_features
        if self.gemm is not None:
            return unpack_pairs(self.blocks)[0]
        blocks = self.packed.view(n // PACK_BLOCK, k, PACK_BLOCK // 2)
        return torch.cat([blocks & 15, blocks >> 4], dim=-1).transpose(1, 2).reshape(n, k)

    def dequantized(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        if self.gemm is not None:
            return self.gemm.dequantize(self.blocks)
        scale, zero = self.scales_zeros.unbind(-1)  # [K/GROUP, N] each
        codes = self.codes().view(n, k // GROUP, GROUP).to(scale.dtype) - 8
        return (codes * scale.t()[..., None] + zero.t()[..., None]).view(n, k)

    def kernel(self, rows: torch.Tensor) -> torch.Tensor:
        if self.gemm is not None:
            return self.gemm(rows, self.blocks).to(rows.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), self.packed, GROUP, self.scales_zeros)


class Int4Gemm:
    """`csrc/int4_linear.c`: bf16 rows [M, K] x a packed weight (`pack_pairs`) → float32 [M, N]."""

    def __init__(self, fn, scratch_size, dequantize):
        self._fn = fn
        self._scratch_size = scratch_size
        self._dequantize = dequantize
        self.scratch = kernels.Scratch()

    def __call__(self, rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        x = rows.to(torch.bfloat16).contiguous()
        (m, k), n = x.shape, blocks.shape[0] * BLOCK_ROWS
        out = torch.empty(m, n)
        scratch = self.scratch(self._scratch_size(m, k))
        self._fn(x.data_ptr(), blocks.data_ptr(), out.data_ptr(), m, n, k, scratch.data_ptr())
        return out

    def dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        """The packed weight as bf16 [N, K] (for the bf16 GEMM of a prefill)."""
        n, k = blocks.shape[0] * BLOCK_ROWS, blocks.shape[1] * PAIR
        out = torch.empty(n, k, dtype=torch.bfloat16)
        self._dequantize(blocks.data_ptr(), n, k, out.data_ptr())
        return out


def int4_gemm() -> Int4Gemm | None:
    """The C 4-bit kernel, built (`kernels.py`) and checked against a float matmul on first call."""
    return kernels.load("int4_linear", _wrap_int4, _int4_is_exact)


def _wrap_int4(library: ctypes.CDLL) -> Int4Gemm:
    fn = library.int4_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
    size = library.int4_pair_scratch
    size.restype = ctypes.c_int
    size.argtypes = [ctypes.c_int, ctypes.c_int]
    dequantize = library.int4_dequantize
    dequantize.restype = None
    dequantize.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return Int4Gemm(fn, size, dequantize)


def _int4_is_exact(gemm: Int4Gemm) -> bool:
    """The kernel against the dense float matmul of the same 4-bit weight (bf16 inputs: exact
    products, so only the float32 summation order differs)."""
    gen = torch.Generator().manual_seed(0)
    n, k = 72, 192
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(n, k // GROUP, generator=gen) / 10).half().float()
    low = -torch.rand(n, k // GROUP, generator=gen).half().float()
    weight = (codes.view(n, k // GROUP, GROUP).float() * scale[..., None] + low[..., None]).view(n, k)
    blocks = pack_pairs(codes, scale, low)
    back = unpack_pairs(blocks)
    if not (torch.equal(back[0], codes) and torch.equal(back[1], scale) and torch.equal(back[2], low)):
        return False
    if not torch.allclose(gemm.dequantize(blocks).float(), weight, rtol=2 ** -8, atol=0):  # bf16 rounding
        return False
    for m in (1, 3, 6):
        rows = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        want = rows.double() @ weight.double().T
        if not torch.allclose(gemm(rows, blocks).double(), want, atol=1e-4, rtol=1e-4):
            return False
    return True


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
