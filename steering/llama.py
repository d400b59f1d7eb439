"""A plain Llama-family decoder with an explicit KV cache, in the spirit of gpt-fast's model.py.

Why not `transformers`' forward: for keystroke latency the per-step overhead matters more than
FLOPs (a 1–8 token forward over a 2k cache), and we want (1) logits for the last position only,
(2) a preallocated cache we can truncate to any common prefix for free, (3) fused QKV and
gate/up projections. Weights come from any HF Llama/Mistral/Qwen2-style folder.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import attention, fused_layer, kernels, quant

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    norm_eps: float
    rope_theta: float
    max_positions: int
    tie_embeddings: bool
    qkv_bias: bool

    @classmethod
    def from_hf(cls, cfg: dict) -> LlamaConfig:
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"rope type {rope.get('rope_type')!r} is not supported by the plain backend")
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            max_positions=cfg.get("max_position_embeddings", 4096),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=cfg.get("attention_bias", False) or cfg.get("model_type") == "qwen2",
        )


KV_DTYPE = torch.float32  # the cache's dtype where the attention kernel is not used
KEPT_LOGITS = 2  # next-token logits a KV cache keeps (see `KVCache`)


class KVCache:
    """Keys/values of one token sequence for every layer, growable, truncatable in O(1).

    A bf16 model's cache is bf16 (its keys and values are computed in bf16: storing them so loses
    nothing) and few new tokens attend over it with the `attention` kernel, which reads it at twice
    the speed PyTorch's float32 attention reads a float32 cache; more than `attention.MAX_ROWS` new
    tokens (a prefill, a paste) with the prefill kernel where the CPU has AVX512-BF16
    (`attend_prefill`). Otherwise (a float32 model, no kernel on this machine) attention is
    PyTorch's SDPA in float32: its bf16 CPU attention is several times slower than its float32 one for
    a few new tokens (one new token, 2 threads, one layer: 31 vs 156 µs over 256 cached tokens, 157 vs
    1,140 µs over 2,048); a cold prefill runs its bf16 is_causal SDPA.

    `ids` mirrors the tokens whose keys/values are stored, so a new request can find its longest
    common prefix with the cache by comparing token ids. `logits_after` keeps next-token logits by
    prefix length (the engine keeps those of a prompt's last positions): a keystroke that heals the
    prompt's last token needs the logits before that token, and finds them here instead of running
    it again.
    """

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype = KV_DTYPE, capacity: int = 256,
                 kernel: attention.DecodeAttention | None = None):
        self.cfg = cfg
        self.dtype = dtype
        self.kernel = kernel  # attention over this (bf16) cache for a few new tokens
        self.ids: list[int] = []
        self.logits_after: dict[int, torch.Tensor] = {}
        self.k = torch.empty(cfg.n_layers, 1, cfg.n_kv_heads, capacity, cfg.head_dim, dtype=dtype)
        self.v = torch.empty_like(self.k)

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def capacity(self) -> int:
        return self.v.shape[3]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reserve(self, n: int) -> None:
        """Make room for `n` tokens (grows geometrically, keeping what is stored)."""
        if n <= self.capacity:
            return
        new_cap = max(n, self.capacity * 2)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.empty(*old.shape[:3], new_cap, old.shape[4], dtype=old.dtype)
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write a layer's keys and values [1, kv_heads, t, head_dim] of positions start..start+t."""
        self.k[layer, :, :, start:start + k.shape[2]] = k
        self.v[layer, :, :, start:start + v.shape[2]] = v

    def attend_new(self, layer: int, qkv: torch.Tensor, start: int, cos: torch.Tensor,
                   signed_sin: torch.Tensor) -> torch.Tensor | None:
        """A layer's attention for a few new tokens in one kernel call: rope, cache writes and
        attention from the fused q|k|v projection [1, t, ...] → [1, t, heads*head_dim] (bf16), or None
        where the kernel does not run (then `store` and `attend`)."""
        if self.kernel is None or qkv.shape[1] > attention.MAX_ROWS or qkv.shape[0] != 1:
            return None
        return self.kernel.rope_store_attend(qkv, cos, signed_sin, self.k[layer], self.v[layer], start,
                                             self.cfg.n_heads)

    def attend(self, layer: int, q: torch.Tensor, end: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q [1, heads, t, head_dim] (the last t of `end` positions) over the layer's
        first `end` keys with `mask` (the offset causal mask; None for one query) → float32. The
        kernel applies that mask itself."""
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        if self.kernel is not None and q.shape[2] <= attention.MAX_ROWS:
            out = self.kernel(q, keys, values)
            if out is not None:
                return out
        return F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask,
                                              enable_gqa=True)

    def attend_prefill(self, layer: int, q: torch.Tensor, end: int) -> torch.Tensor | None:
        """Attention of many new queries q [1, heads, t, head_dim] (the last t of `end` positions, causal)
        over the layer's bf16 cache with the prefill kernel → bf16 [1, t, heads*head_dim]; None where
        it does not run (no kernel on this machine, a float32 cache)."""
        if self.kernel is None or q.shape[0] != 1:
            return None
        prefill = attention.prefill_kernel()
        return None if prefill is None else prefill(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end])

    def truncate(self, n: int) -> None:
        del self.ids[n:]
        self.logits_after = {k: v for k, v in self.logits_after.items() if k <= n}

    def keep_logits(self, logits: torch.Tensor) -> None:
        """Remember the logits ([vocab] or [n, vocab]) of the last positions; the cache holds those of
        the last `KEPT_LOGITS` prefix lengths it was given."""
        flat = logits.view(-1, logits.shape[-1])
        rows = flat[-KEPT_LOGITS:]
        if rows.shape[0] < flat.shape[0]:
            rows = rows.clone()  # do not hold a long prompt's logits alive
        end = self.length
        self.logits_after.update({end - rows.shape[0] + 1 + i: row for i, row in enumerate(rows)})
        for n in sorted(self.logits_after)[:-KEPT_LOGITS]:
            del self.logits_after[n]

    def common_prefix(self, ids: list[int]) -> int:
        n = min(len(ids), len(self.ids))
        i = 0
        while i < n and ids[i] == self.ids[i]:
            i += 1
        return i


class RMSNorm(nn.Module):
    """`F.rms_norm`, or for bf16 rows the C kernel (`csrc/rms_norm.c`: one call instead of ~8 ops for a
    few rows; a prefill's 2,048 rows 0.98 -> 0.15 ms, its rows split over the threads)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            kernel = rms_norm_kernel()
            if kernel is not None and self.weight.dtype == torch.bfloat16:
                return kernel(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one op (the sum in fp32)


class RmsNormKernel:
    def __init__(self, fn):
        self._fn = fn

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        self._fn(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
        return out


def rms_norm_kernel() -> RmsNormKernel | None:
    """The C rms norm, built (`kernels.py`) and checked against `F.rms_norm` on first call."""
    return kernels.load("rms_norm", _wrap_rms_norm, _rms_norm_agrees)


def _wrap_rms_norm(library) -> RmsNormKernel:
    fn = library.rms_norm_bf16
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_float]
    return RmsNormKernel(fn)


def _rms_norm_agrees(kernel: RmsNormKernel) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 576, generator=gen) * 20).to(torch.bfloat16)
    weight = torch.rand(576, generator=gen).to(torch.bfloat16)
    want = F.rms_norm(x, weight.shape, weight, 1e-5).float()
    return bool(((kernel(x, weight, 1e-5).float() - want).abs() <= 0.01 * want.abs() + 1e-3).all())


def rope_tables(cfg: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin per position: the first half of sin is negated, so that `apply_rope`
    rotates halves with one roll instead of two slices, a negation and a cat."""
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.max_positions, dtype=torch.float32), inv)
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF Llama's rotate-half rope: x*cos + cat(-x2, x1)*sin == x*cos + roll(x, half)*signed_sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class DecoderLayer(nn.Module):
    """One block. Its output is the residual stream, which is where steering hooks attach."""

    def __init__(self, cfg: LlamaConfig, index: int):
        super().__init__()
        self.cfg = cfg
        self.index = index
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.input_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.qkv = nn.Linear(cfg.dim, q + 2 * kv, bias=cfg.qkv_bias)
        self.o = nn.Linear(q, cfg.dim, bias=False)
        self.post_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.intermediate, bias=False)
        self.down = nn.Linear(cfg.intermediate, cfg.dim, bias=False)
        self.fused: fused_layer.FusedStack | None = None  # the layer in C for a few tokens (`load_llama`)

    def forward(self, x: torch.Tensor, cache: KVCache, start: int, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | bool | None) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        if self.fused is not None and fused_layer_fits(x, cache):
            out = self.fused(self.index, self.index + 1, x, cache.k, cache.v, start, cos, sin)
            if out is not None:
                return out
        qkv = self.qkv(self.input_norm(x))
        # decode steps and keystrokes: rope, cache writes and attention in one kernel call
        attn = cache.attend_new(self.index, qkv, start, cos, sin)
        if attn is None:
            heads = cfg.n_heads + cfg.n_kv_heads  # queries and keys rotate together: one rope, not two
            qk = apply_rope(qkv[..., : heads * cfg.head_dim].view(b, t, heads, cfg.head_dim).transpose(1, 2), cos, sin)
            q, k = qk[:, : cfg.n_heads], qk[:, cfg.n_heads :]
            v = qkv[..., heads * cfg.head_dim :].view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
            cache.store(self.index, start, k, v)
            attn = cache.attend_prefill(self.index, q, start + t) if t > attention.MAX_ROWS else None
            if attn is None:
                if start == 0 and mask is True:  # cold prefill: the new keys are all there is
                    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                else:  # over the cache (see `KVCache.attend`)
                    attn = cache.attend(self.index, q, start + t, mask).to(x.dtype)
                attn = attn.transpose(1, 2).reshape(b, t, -1)
        x = x + self.o(attn)
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def fused_layer_fits(x: torch.Tensor, cache: KVCache) -> bool:
    """Whether the C layers (`fused_layer.py`) can run this forward: a few tokens of one sequence over
    a cache the attention kernel reads, without autograd."""
    return (x.shape[0] == 1 and x.shape[1] <= fused_layer.DecoderLayerKernel.MAX_ROWS and isinstance(cache, KVCache)
            and cache.kernel is not None and not torch.is_grad_enabled())


class LlamaModel(nn.Module):
    """Embedding → decoder layers → final norm → logits of the last position."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.fused: fused_layer.FusedStack | None = None  # every layer in C for a few tokens (`load_llama`)

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (the KV cache's: see `KVCache`; weights may be quantized, see `quant.py`)."""
        return self.norm.weight.dtype

    def new_cache(self, capacity: int = 256) -> KVCache:
        """A bf16 cache read by the attention kernel for a bf16 model where the kernel builds here,
        else a float32 one (see `KVCache`)."""
        kernel = attention.kernel() if self.dtype == torch.bfloat16 else None
        return KVCache(self.cfg, torch.bfloat16 if kernel else KV_DTYPE, capacity, kernel)

    def weight_bytes(self) -> int:
        """Bytes read per forward pass (tied embeddings counted once: the lm_head reads them)."""
        seen, total = set(), 0
        tensors = [*self.parameters(), *(b for n, b in self.named_buffers() if not n.startswith("rope_"))]
        for p in tensors:
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total

    @torch.inference_mode()
    def forward(self, ids: list[int], cache: KVCache, n_logits: int = 1) -> torch.Tensor:
        """Append `ids` to `cache`; return the float32 logits of the last new position ([vocab]),
        or of the last `n_logits` positions ([n, vocab]) when n_logits > 1."""
        start, t = cache.length, len(ids)
        if start + t > self.cfg.max_positions:
            raise ValueError(f"{start + t} tokens exceed the model's window of {self.cfg.max_positions}")
        cache.reserve(start + t)
        x = self.embed(torch.tensor([ids], dtype=torch.long))
        cos = self.rope_cos[start : start + t].to(x.dtype)
        sin = self.rope_sin[start : start + t].to(x.dtype)
        # Causal attention: with no cached prefix SDPA's own is_causal (2.5x faster on CPU than an
        # explicit mask: it skips the masked blocks); with a prefix is_causal would align wrongly,
        # so the mask is offset by the prefix length.
        # The offset mask is additive float32 (the attention's dtype over the cache): a boolean one is
        # converted again in every layer.
        mask: torch.Tensor | bool | None = None
        if t > 1:
            mask = True if start == 0 else attention.offset_causal_mask(t, start + t)
        fused = self.fused if self.fused is not None and fused_layer_fits(x, cache) else None
        i, layers = 0, self.layers
        while i < len(layers):
            j = i  # layers i..j-1 run in one C call where no hook needs to see them
            while fused is not None and j < len(layers) and not (layers[j]._forward_hooks
                                                                  or layers[j]._forward_pre_hooks):
                j += 1
            out = fused(i, j, x, cache.k, cache.v, start, cos, sin) if j > i else None
            if out is None:
                x, j = layers[i](x, cache, start, cos, sin, mask), i + 1
            else:
                x = out
            i = j
        cache.ids.extend(ids)
        logits = self.lm_head(self.norm(x[0, -n_logits:])).float()
        return logits if n_logits > 1 else logits.squeeze(0)


def load_llama(folder: Path, dtype: torch.dtype, weights: str | None = None) -> LlamaModel:
    """Build a `LlamaModel` from an HF folder's config.json + safetensors, fusing projections.

    `weights`: None keeps every weight in `dtype`; "auto", "int4" or "int8" store the projections
    and the lm_head quantized (see `quant.py`), each made from the file's own precision, one
    layer at a time (a full-precision copy of the model never exists at once).
    """
    from safetensors import safe_open

    cfg_dict = json.loads((folder / "config.json").read_text())
    archs = cfg_dict.get("architectures") or ["LlamaForCausalLM"]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {archs[0]} is not a Llama-style decoder")
    cfg = LlamaConfig.from_hf(cfg_dict)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors weights in {folder}")
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {name: h for h in handles for name in h.keys()}
    with torch.device("meta"):
        model = LlamaModel(cfg)

    def take(name: str) -> torch.Tensor:
        """One tensor, as stored (quantization needs the stored values; see `quant.py`)."""
        return where.pop(name).get_tensor(name)

    new: dict[str, torch.Tensor] = {}
    quantized: dict[str, nn.Module] = {}

    def projection(name: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if weights:
            quantized[name] = quant.quantized_linear(weight, bias, dtype, weights)
            return
        new[f"{name}.weight"] = weight.to(dtype)
        if bias is not None:
            new[f"{name}.bias"] = bias.to(dtype)

    embed = take("model.embed_tokens.weight")
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        bias = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]) if cfg.qkv_bias else None
        projection(f"layers.{i}.qkv", torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]), bias)
        projection(f"layers.{i}.o", take(p + "self_attn.o_proj.weight"))
        projection(f"layers.{i}.gate_up",
                   torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]))
        projection(f"layers.{i}.down", take(p + "mlp.down_proj.weight"))
        new[f"layers.{i}.input_norm.weight"] = take(p + "input_layernorm.weight").to(dtype)
        new[f"layers.{i}.post_norm.weight"] = take(p + "post_attention_layernorm.weight").to(dtype)
    new["norm.weight"] = take("model.norm.weight").to(dtype)
    head = take("lm_head.weight") if "lm_head.weight" in where and not cfg.tie_embeddings else None
    if weights:
        # the lm_head is 8-bit even under "int4" (as llama.cpp's Q4 files keep token_embd at 8 bits)
        quantized["lm_head"] = quant.Int8Linear(embed if head is None else head, None, dtype, float_output=True)
        if head is None:
            quantized["embed"] = quant.Int8Embedding(quantized["lm_head"])
        else:
            new["embed.weight"] = embed.to(dtype)
    else:
        new["embed.weight"] = embed.to(dtype)
        new["lm_head.weight"] = new["embed.weight"] if head is None else head.to(dtype)
    for name, module in quantized.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    missing, unexpected = model.load_state_dict(new, assign=True, strict=False)
    missing = [k for k in missing if not any(k.startswith(f"{name}.") for name in quantized)]
    if unexpected or missing:
        raise ValueError(f"weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    cos, sin = rope_tables(cfg)
    model.rope_cos, model.rope_sin = cos, sin
    model.quantized = quant.weight_format(model)
    model.eval()
    if dtype == torch.bfloat16:  # build (once per machine) and check the C kernels now, not in a first request
        attention.kernel()
        quant.int8_gemv()
        rms_norm_kernel()
        if (layer_kernel := decoder_layer_kernel()) is not None:
            model.fused = layer_kernel.bind(list(model.layers))
            for layer in model.layers:
                layer.fused = model.fused
    release_freed_memory()
    return model


def decoder_layer_kernel() -> fused_layer.DecoderLayerKernel | None:
    """The C decoder layer (`fused_layer.py`), built and checked against `DecoderLayer`'s PyTorch path
    on first call (None where the attention or 4-bit kernels it calls are not there either)."""
    if attention.kernel() is None or quant.int4_gemm() is None:
        return None
    return kernels.load("decoder_layer", fused_layer.wrap, _decoder_layer_agrees)


def _decoder_layer_agrees(kernel: fused_layer.DecoderLayerKernel) -> bool:
    """Two small random layers with 4-bit projections, both ways over the same cache: outputs and
    cache writes within bf16 rounding of each other."""
    gen = torch.Generator().manual_seed(2)
    cfg = LlamaConfig(vocab_size=64, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, intermediate=256,
                      norm_eps=1e-5, rope_theta=10000.0, max_positions=64, tie_embeddings=False, qkv_bias=False)
    layers = [DecoderLayer(cfg, i) for i in range(cfg.n_layers)]
    for layer in layers:
        for name in ("qkv", "o", "gate_up", "down"):
            n, k = getattr(layer, name).weight.shape
            codes = torch.randint(0, 16, (n, k), generator=gen).float()
            scale = torch.rand(n, k // quant.GROUP, 1, generator=gen) / 40
            low = -torch.rand(n, k // quant.GROUP, 1, generator=gen) / 5
            weight = (codes.view(n, k // quant.GROUP, quant.GROUP) * scale + low).view(n, k)
            setattr(layer, name, quant.Int4Linear(weight, None, torch.bfloat16))
        for norm in (layer.input_norm, layer.post_norm):
            weight = (torch.rand(cfg.dim, generator=gen) + 0.5).to(torch.bfloat16)
            norm.weight = nn.Parameter(weight, requires_grad=False)
    stack = kernel.bind(layers)
    cos, sin = (table.to(torch.bfloat16) for table in rope_tables(cfg))
    start = 7
    for t in (1, 3):
        caches = [KVCache(cfg, torch.bfloat16, 16, attention.kernel()) for _ in range(2)]
        prefix = torch.randn(2, cfg.n_layers, 1, cfg.n_kv_heads, start, cfg.head_dim, generator=gen).to(torch.bfloat16)
        for cache in caches:
            cache.k[:, :, :, :start], cache.v[:, :, :, :start] = prefix
        x = (torch.randn(1, t, cfg.dim, generator=gen) * 3).to(torch.bfloat16)
        mask = attention.offset_causal_mask(t, start + t) if t > 1 else None
        rope = cos[start:start + t], sin[start:start + t]
        with torch.inference_mode():
            want = x
            for layer in layers:
                want = layer(want, caches[0], start, *rope, mask)
            got = None if stack is None else stack(0, len(layers), x, caches[1].k, caches[1].v, start, *rope)
        end = start + t
        fused_cache, ops_cache = caches[1], caches[0]
        pairs = [(got, want), (fused_cache.k[..., :end, :], ops_cache.k[..., :end, :]),
                 (fused_cache.v[..., :end, :], ops_cache.v[..., :end, :])]
        if got is None or not all(_close(a, b) for a, b in pairs):
            return False
    return True


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Within a few bf16 steps of each other, relative to the tensor's scale."""
    return bool((got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max())


def approx_flops_per_token(cfg: LlamaConfig) -> float:
    """Matmul FLOPs per prompt token, without attention scores (for reporting only)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = cfg.dim * (q + 2 * kv) + q * cfg.dim + 3 * cfg.dim * cfg.intermediate
    return 2.0 * cfg.n_layers * per_layer


def release_freed_memory() -> None:
    """Hand memory freed by replaced weights back to the OS (glibc keeps it in its arenas otherwise,
    and resident memory would still count the bf16 copies)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
