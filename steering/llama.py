"""A plain Llama-family decoder with an explicit KV cache, in the spirit of gpt-fast's model.py.

Why not `transformers`' forward: for keystroke latency the per-step overhead matters more than
FLOPs (a 1–8 token forward over a 2k cache), and we want (1) logits for the last position only,
(2) a preallocated cache we can truncate to any common prefix for free, (3) fused QKV and
gate/up projections. Weights come from any HF Llama/Mistral/Qwen2-style folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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


class KVCache:
    """Keys/values of one token sequence for every layer, growable, truncatable in O(1).

    `ids` mirrors the tokens whose keys/values are stored, so a new request can find its longest
    common prefix with the cache by comparing token ids.
    """

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype, capacity: int = 256):
        self.cfg = cfg
        self.dtype = dtype
        self.ids: list[int] = []
        self.k = torch.empty(cfg.n_layers, 1, cfg.n_kv_heads, capacity, cfg.head_dim, dtype=dtype)
        self.v = torch.empty_like(self.k)

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

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

    def truncate(self, n: int) -> None:
        del self.ids[n:]

    def common_prefix(self, ids: list[int]) -> int:
        n = min(len(ids), len(self.ids))
        i = 0
        while i < n and ids[i] == self.ids[i]:
            i += 1
        return i


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(cfg: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.max_positions, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


DECODE_ATTENTION_MIN_KEYS = 512  # one-token forwards over at least this many cached tokens use `decode_attention`


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention of one new token over the KV cache, as two plain matmuls per key/value head.

    Why not SDPA here: for one query over a long cache, CPU flash attention took 71 % of a decode
    step at 2048 cached tokens (~2.6 ms per layer), and a batched matmul over the cache's head
    slices first copies them (they are strided by the cache's capacity). Each head's slice
    [tokens, head_dim] is contiguous, so 2D matmuls read it in place. Measured (1 thread, bf16,
    one process, alternating): a decode step at 2048 cached tokens 75 ms vs 150 ms with SDPA; at
    256 tokens SDPA is 10 % faster, hence `DECODE_ATTENTION_MIN_KEYS`.
    q: [1, heads, 1, d]; keys/values: [1, kv_heads, n, d] -> [1, heads, 1, d].
    """
    heads, d = q.shape[1], q.shape[3]
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    out = []
    for h in range(kv_heads):
        rows = q[0, h * group : (h + 1) * group, 0]  # the query heads that share this key/value head
        scores = (rows.float() @ keys[0, h].T.float()) * d**-0.5  # fp32 scores, as SDPA keeps them
        out.append(torch.softmax(scores, dim=-1).to(q.dtype) @ values[0, h])
    return torch.cat(out).view(1, heads, 1, d)


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
        self.sizes = (q, kv, kv)

    def forward(self, x: torch.Tensor, cache: KVCache, start: int, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | bool | None) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.qkv(self.input_norm(x)).split(self.sizes, dim=-1)
        q = apply_rope(q.view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        end = start + t
        cache.k[self.index, :, :, start:end] = k
        cache.v[self.index, :, :, start:end] = v
        keys = cache.k[self.index, :, :, :end]
        values = cache.v[self.index, :, :, :end]
        if t == 1 and b == 1 and end >= DECODE_ATTENTION_MIN_KEYS:
            attn = decode_attention(q, keys, values)
        elif mask is True:
            attn = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
        else:
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


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

    @property
    def dtype(self) -> torch.dtype:
        """Activation (and KV cache) dtype; weights may be int8 (see `quantize_int8`)."""
        return self.norm.weight.dtype

    def new_cache(self, capacity: int = 256) -> KVCache:
        return KVCache(self.cfg, self.dtype, capacity)

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
        mask: torch.Tensor | bool | None = None
        if t > 1:
            mask = True if start == 0 else torch.ones(t, start + t, dtype=torch.bool).tril(diagonal=start)
        for layer in self.layers:
            x = layer(x, cache, start, cos, sin, mask)
        cache.ids.extend(ids)
        logits = self.lm_head(self.norm(x[0, -n_logits:])).float()
        return logits if n_logits > 1 else logits.squeeze(0)


def load_llama(folder: Path, dtype: torch.dtype) -> LlamaModel:
    """Build a `LlamaModel` from an HF folder's config.json + safetensors, fusing projections."""
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
        """One tensor, converted as it is read: the full-precision copy never exists all at once."""
        return where.pop(name).get_tensor(name).to(dtype)

    new: dict[str, torch.Tensor] = {"embed.weight": take("model.embed_tokens.weight")}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        qkv = [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
        new[f"layers.{i}.qkv.weight"] = torch.cat(qkv)
        if cfg.qkv_bias:
            new[f"layers.{i}.qkv.bias"] = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        new[f"layers.{i}.o.weight"] = take(p + "self_attn.o_proj.weight")
        new[f"layers.{i}.input_norm.weight"] = take(p + "input_layernorm.weight")
        new[f"layers.{i}.post_norm.weight"] = take(p + "post_attention_layernorm.weight")
        new[f"layers.{i}.gate_up.weight"] = torch.cat(
            [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]
        )
        new[f"layers.{i}.down.weight"] = take(p + "mlp.down_proj.weight")
    new["norm.weight"] = take("model.norm.weight")
    head = take("lm_head.weight") if "lm_head.weight" in where and not cfg.tie_embeddings else None
    new["lm_head.weight"] = new["embed.weight"] if head is None else head
    model.load_state_dict(new, assign=True, strict=True)
    cos, sin = rope_tables(cfg)
    model.rope_cos, model.rope_sin = cos, sin
    model.eval()
    return model


def approx_flops_per_token(cfg: LlamaConfig) -> float:
    """Matmul FLOPs per prompt token, without attention scores (for reporting only)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = cfg.dim * (q + 2 * kv) + q * cfg.dim + 3 * cfg.dim * cfg.intermediate
    return 2.0 * cfg.n_layers * per_layer


INT8_GEMV_MAX_ROWS = 16  # up to this many tokens per forward use the int8 GEMV kernel


class Int8Linear(nn.Module):
    """Weight-only int8 linear (per-output-row scales), activations stay in the model dtype.

    Why: decode reads every weight once per token, so halving the bytes read (and resident memory)
    matters more than the extra dequantization work the fused kernel does.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype):
        super().__init__()
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(act_dtype))
        self.register_buffer("bias", None if bias is None else bias.to(act_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if rows.shape[0] > INT8_GEMV_MAX_ROWS:
            # prefill: the fused int8 kernel is a GEMV kernel; for many rows dequantize once and let
            # the bf16 GEMM (AMX/AVX512-BF16) do the work
            weight = self.weight.to(self.scales.dtype) * self.scales.unsqueeze(1)
            out = F.linear(rows, weight)
        else:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], -1)


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 rows with per-row scales; rows are dequantized on lookup."""

    def __init__(self, linear: Int8Linear):
        super().__init__()
        self.table = linear  # shared with the tied lm_head: one int8 matrix serves both

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.weight[ids].to(self.table.scales.dtype)
        return rows * self.table.scales[ids].unsqueeze(-1)


def quantize_int8(model: LlamaModel) -> LlamaModel:
    """Replace every projection (and the tied embedding/lm_head) by int8 weight-only versions."""
    act = model.dtype
    for layer in model.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            linear = getattr(layer, name)
            setattr(layer, name, Int8Linear(linear.weight.data, linear.bias, act))
    tied = model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    head = Int8Linear(model.lm_head.weight.data, None, act)
    model.lm_head = head
    if tied:
        model.embed = Int8Embedding(head)
    model.quantized = "int8"
    release_freed_memory()
    return model


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
