"""Decoder layers for the 1-4 new tokens of a decode step or a keystroke in one C call
(`csrc/decoder_layer.c`): all of a forward's layers, or the runs between the layers a hook watches.

Why: at decode sizes a layer's ~15 PyTorch ops and their module and view calls cost more than the
work (measured for the default model: ~6 ms of dispatch in an ~11 ms token). The C layer computes
the same values (bf16 rounding where PyTorch rounds; bit-equal on the development machine, while
elsewhere silu's exp may differ from PyTorch's in a last float bit) from the same buffers: the
`Int4Linear` packing the C 4-bit kernel reads and the bf16 KV cache the attention kernel reads. It
serves layers whose four projections are such 4-bit linears without bias (the default model); any
other layer, or more tokens, takes the PyTorch path. `llama.py` checks it against that path before
first use. One call for all layers saves ~25 µs of Python per layer (module call, views, ctypes
arguments): ~0.6 ms of a ~4.8 ms token.
"""

from __future__ import annotations

import ctypes

import torch

from . import attention, kernels, quant


class _Int4Weight(ctypes.Structure):
    _fields_ = [("packed", ctypes.c_void_p), ("N", ctypes.c_int), ("K", ctypes.c_int)]


class _DecoderWeights(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", _Int4Weight),
                ("o", _Int4Weight), ("gate_up", _Int4Weight), ("down", _Int4Weight), ("D", ctypes.c_int),
                ("H", ctypes.c_int), ("KV", ctypes.c_int), ("Dh", ctypes.c_int), ("I", ctypes.c_int),
                ("eps", ctypes.c_float)]


def _int4_weight(linear: quant.Int4Linear) -> _Int4Weight:
    return _Int4Weight(linear.blocks.data_ptr(), linear.out_features, linear.in_features)


class DecoderLayerKernel:
    """The built kernel; `bind(layers)` → a `FusedStack` for a model's `llama.DecoderLayer`s."""

    MAX_ROWS = attention.MAX_ROWS  # new tokens per forward (csrc/decoder_layer.c holds up to 4)

    def __init__(self, layers_fn, scratch_size):
        self.layers_fn = layers_fn
        self.scratch_size = scratch_size
        self.scratch = kernels.Scratch()

    def bind(self, layers) -> FusedStack | None:
        """None unless every layer is one the kernel computes (see the module's docstring)."""
        weights = [self._weights(layer) for layer in layers]
        if not weights or any(w is None for w in weights):
            return None
        return FusedStack(self, weights, layers)

    @staticmethod
    def _weights(layer) -> _DecoderWeights | None:
        projections = (layer.qkv, layer.o, layer.gate_up, layer.down)
        norms = (layer.input_norm.weight, layer.post_norm.weight)
        if not all(isinstance(p, quant.Int4Linear) and p.gemm is not None and p.bias is None for p in projections):
            return None
        if any(n.dtype != torch.bfloat16 or not n.is_contiguous() for n in norms):
            return None
        cfg = layer.cfg
        return _DecoderWeights(norms[0].data_ptr(), norms[1].data_ptr(), *(_int4_weight(p) for p in projections),
                               cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate,
                               layer.input_norm.eps)


class FusedStack:
    """A model's layers bound to the kernel: `__call__(first, last, ...)` is the forward of layers
    first..last-1 for a few tokens in one call (they must have no hooks: Python sees no layer between)."""

    def __init__(self, kernel: DecoderLayerKernel, weights: list[_DecoderWeights], layers):
        self._kernel = kernel
        self._weights = (_DecoderWeights * len(weights))(*weights)
        self._address = ctypes.addressof(self._weights)
        self._keep = [(layer.qkv.blocks, layer.o.blocks, layer.gate_up.blocks, layer.down.blocks,  # what
                       layer.input_norm.weight, layer.post_norm.weight) for layer in layers]  # `weights` points into
        self._cfg = layers[0].cfg

    def __call__(self, first: int, last: int, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                 cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor | None:
        """x [1, T, D] bf16; keys/values the whole bf16 cache [layers, 1, KV, capacity, Dh] (contiguous);
        cos/signed_sin [T, Dh] bf16 → the output of layer last-1 [1, T, D], or None for what it does
        not hold (then nothing is to be trusted of the call but the input: run the layers in PyTorch)."""
        t = x.shape[1]
        if t > DecoderLayerKernel.MAX_ROWS or x.dtype != torch.bfloat16:
            return None
        cfg, kernel = self._cfg, self._kernel
        x = x.contiguous()
        out = torch.empty_like(x)
        size = kernel.scratch_size(t, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate)
        residual = (t * cfg.dim + 1) // 2  # floats for the bf16 residual between layers
        scratch = kernel.scratch(size + residual + cfg.n_heads * t * (start + t)).data_ptr()
        status = kernel.layers_fn(self._address + first * ctypes.sizeof(_DecoderWeights), last - first,
                                   x.data_ptr(), out.data_ptr(), scratch + 4 * size, t, cos.data_ptr(),
                                   signed_sin.data_ptr(), keys[first].data_ptr(), values[first].data_ptr(),
                                   keys.stride(0), keys.stride(2), start, scratch, scratch + 4 * (size + residual))
        return out if status == 0 else None


def wrap(library: ctypes.CDLL) -> DecoderLayerKernel:
    layers = library.decoder_layers
    layers.restype = ctypes.c_int
    layers.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 4 \
        + [ctypes.c_int64] * 2 + [ctypes.c_int] + [ctypes.c_void_p] * 2
    size = library.decoder_layer_scratch
    size.restype = ctypes.c_int
    size.argtypes = [ctypes.c_int] * 6
    return DecoderLayerKernel(layers, size)
