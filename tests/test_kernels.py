"""The C kernels (attention of a few new tokens over a bf16 KV cache, the int8 lm_head, the rms norm,
the 4-bit linears, whole decoder layers): built here, exact, with a fallback to PyTorch's ops."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinymorph.steering import attention, fused_layer, kernels, llama, quant
from tinymorph.steering.llama import KV_DTYPE, RMSNorm, load_llama, rms_norm_kernel


def _kernel_or_skip() -> attention.DecodeAttention:
    kernel = attention.kernel()
    if kernel is None:
        pytest.skip(f"no attention kernel on this machine: {kernels.reason()}")
    return kernel


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 2, 16), (8, 8, 32), (6, 1, 128)])
def test_kernel_equals_sdpa_over_the_same_cache(heads, kv_heads, dim):
    """Every supported row count, cache lengths from one token up, a cache view with spare capacity
    (as `KVCache` hands it over), the offset causal mask of a forward pass over a cached prefix."""
    kernel = _kernel_or_skip()
    gen = torch.Generator().manual_seed(heads * dim)
    for t in range(1, attention.MAX_ROWS + 1):
        for length in (t, t + 1, 63, 1000):
            store = (torch.randn(2, 1, kv_heads, length + 7, dim, generator=gen) * 3).to(torch.bfloat16)
            keys, values = store[0, :, :, :length], store[1, :, :, :length]
            q = torch.randn(1, heads, t, dim, generator=gen).to(torch.bfloat16)
            mask = torch.zeros(t, length).masked_fill_(
                torch.ones(t, length, dtype=torch.bool).triu_(length - t + 1), float("-inf"))
            want = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask,
                                                  enable_gqa=True)
            got = kernel(q, keys, values)
            assert got is not None and got.dtype == torch.float32
            assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (t, length, (got - want).abs().max())


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_prefill_kernel_equals_sdpa(heads, kv_heads):
    """Causal attention of many new queries, cold (t = length) and after a cached prefix, lengths on
    and off the kernel's blocks of 64, queries laid out as the layers hand them over (transposed
    views): float32 SDPA over the same bf16 values, within the bf16 rounding of the probabilities and
    the output (what SDPA's own bf16 kernel does: its error against float32 is of the same size)."""
    prefill = attention.prefill_kernel()
    if prefill is None:
        pytest.skip(f"no prefill attention kernel on this machine (needs AVX512-BF16): {kernels.reason()}")
    gen = torch.Generator().manual_seed(heads)
    for t, length in ((5, 5), (64, 64), (65, 65), (200, 200), (7, 130), (100, 1100), (1, 1)):
        store = (torch.randn(2, 1, kv_heads, length + 9, 64, generator=gen) * 2).to(torch.bfloat16)
        keys, values = store[0, :, :, :length], store[1, :, :, :length]
        q = torch.randn(1, t, heads, 64, generator=gen).to(torch.bfloat16).transpose(1, 2)
        mask = attention.offset_causal_mask(t, length)
        want = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask,
                                              enable_gqa=True)
        bf16 = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.to(torch.bfloat16), enable_gqa=True)
        got = prefill(q, keys, values)
        assert got is not None and got.dtype == torch.bfloat16 and got.shape == (1, t, heads * 64)
        got = got.float().view(1, t, heads, 64).transpose(1, 2)
        err, sdpa_err = (got - want).abs().max(), (bf16.float() - want).abs().max()
        assert err <= max(2 * sdpa_err, 1e-2), (t, length, err, sdpa_err)
        assert (got - want).abs().mean() < 2e-3, (t, length)
    other_dim = torch.zeros(3, 1, 2, 70, 32, dtype=torch.bfloat16)  # head size 32: SDPA runs instead
    assert prefill(*other_dim) is None


def test_a_bf16_model_keeps_a_bf16_cache_and_decodes_as_with_sdpa(default_model_dir):
    """The default model in bf16: the cache is bf16 and read by the kernel; one- to four-token
    forwards over a cached prefix give the logits SDPA over a float32 cache gives (bf16 rounding of
    the layers' outputs aside) and the same next token wherever it is not a near tie. The cached
    prefix itself comes from two attentions (the prefill kernel, SDPA), whose logits each lie ~1.0 (max)
    from the float32 model's, with the same KL divergence from it (0.004), so their difference is
    bounded by bf16 noise only."""
    from tinymorph.steering.tokenizer import load_fast_tokenizer

    _kernel_or_skip()
    model = load_llama(default_model_dir, torch.bfloat16, "auto")
    tokenizer = load_fast_tokenizer(default_model_dir)
    text = ("The harbour was quiet in the early morning. Fishing boats rocked gently against the pier, and "
            "gulls circled above the masts, calling to one another over the sound of the waves. ") * 3
    ids = tokenizer.encode(text)[:-20]
    tail = tokenizer.encode(text)[-20:]
    fast = model.new_cache(400)
    assert fast.dtype == torch.bfloat16 and fast.kernel is not None
    plain = type(fast)(model.cfg, KV_DTYPE, 400)
    a, b = model(ids, fast), model(ids, plain)  # cold: the prefill kernel where the machine has one, SDPA
    assert (a - b).abs().max() < 0.8 and a.argmax() == b.argmax()
    for n in (1, 2, 4, 8, 20):  # 8 and 20 new tokens: the prefill kernel over the cached prefix
        new = tail[:n]
        a, b = model(new, fast, n).view(n, -1), model(new, plain, n).view(n, -1)
        fast.truncate(len(ids))
        plain.truncate(len(ids))
        assert (a - b).abs().max() < 0.8, n
        top2 = b.topk(2).values
        clear = top2[:, 0] - top2[:, 1] > 0.5  # bf16 noise can swap a near tie
        assert clear.any() and torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear]), n
    assert fast.nbytes() * 2 == plain.nbytes()  # half the memory


def test_loading_the_kernels_leaves_floating_point_alone():
    """A library built with -ffast-math turns on flush-to-zero for the whole process when loaded:
    then `5e-324 > 0` is False and the HTTP API refused top_p=5e-324 as "not greater than 0"."""
    if kernels.library() is None:
        pytest.skip(f"no kernels on this machine: {kernels.reason()}")
    assert 5e-324 > 0.0 and 2.2250738585072014e-308 / 2 > 0.0


def _without_c_layers(model) -> None:
    model.fused = None
    for layer in model.layers:
        layer.fused = None


def test_fused_layer_attention_gives_the_ops_bits(default_model_dir, monkeypatch):
    """Rope, cache writes and attention in one call (`KVCache.attend_new`) give the same cache and the
    same logits, bit for bit, as the PyTorch ops with the attention kernel, for 1-4 new tokens."""
    from tinymorph.steering.llama import KVCache

    _kernel_or_skip()
    model = load_llama(default_model_dir, torch.bfloat16, "auto")
    _without_c_layers(model)  # the layers' own PyTorch path (the C layers: the next test)
    ids = list(range(3000, 3150))
    fused, ops = model.new_cache(200), model.new_cache(200)
    model(ids, fused)
    model(ids, ops)
    for n in (1, 2, 4):
        new = list(range(7, 7 + n))
        a = model(new, fused, n)
        with monkeypatch.context() as patch:
            patch.setattr(KVCache, "attend_new", lambda self, *args: None)
            b = model(new, ops, n)
        end = len(ids) + n
        assert torch.equal(a, b), n
        assert torch.equal(fused.k[:, :, :, :end], ops.k[:, :, :, :end]), n
        assert torch.equal(fused.v[:, :, :, :end], ops.v[:, :, :, :end]), n
        fused.truncate(len(ids))
        ops.truncate(len(ids))


def test_int8_kernel_equals_a_float_matmul():
    """The lm_head's int8 kernel: float32 logits of the dequantized weight, one and two rows."""
    gen = torch.Generator().manual_seed(1)
    layer = quant.Int8Linear(torch.randn(4096, 1100, generator=gen), None, torch.bfloat16, float_output=True)
    assert layer.weight.numel() >= quant.C_KERNEL_MIN_WEIGHTS
    if quant.int8_gemv() is None:
        pytest.skip(f"no int8 kernel on this machine: {kernels.reason()}")
    for n in (1, 2):
        rows = torch.randn(n, 1100, generator=gen).to(torch.bfloat16)
        want = rows.float() @ (layer.weight.float() * layer.scales.float()[:, None]).T
        got = layer(rows)
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-3, rtol=1e-4)


def test_rms_norm_kernel_equals_torch():
    """The C rms norm gives F.rms_norm's bf16 values (the sum of squares in another order may move
    one value by one bf16 step); the module uses it for a few bf16 rows only."""
    if rms_norm_kernel() is None:
        pytest.skip(f"no rms norm kernel on this machine: {kernels.reason()}")
    gen = torch.Generator().manual_seed(2)
    norm = RMSNorm(576, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576, generator=gen) * 3)
    for scale in (1e-3, 1.0, 300.0):
        x = (torch.randn(1, 3, 576, generator=gen) * scale).to(torch.bfloat16)
        with torch.inference_mode():
            got = norm(x)
        want = F.rms_norm(x, (576,), norm.weight, 1e-5)
        assert got.dtype == torch.bfloat16 and got.shape == x.shape
        ulp = want.float().abs().clamp_min(1e-30) * 2 ** -7
        assert ((got.float() - want.float()).abs() <= ulp).all() and (got != want).float().mean() < 0.01


def test_without_the_kernels_the_cache_is_float32(default_model_dir, tmp_path):
    """TINYMORPH_KERNELS=0 (or a machine where they do not build) keeps PyTorch's attention on a
    float32 cache; a fresh cache dir builds the kernels again (a process of its own, as a user's)."""
    code = ("import pathlib, torch; from tinymorph.steering import kernels; from tinymorph.steering.llama import "
            f"load_llama; m = load_llama(pathlib.Path({str(default_model_dir)!r}), torch.bfloat16, 'auto'); "
            "c = m.new_cache(); print(c.dtype, c.kernel is not None, kernels.reason())")
    cases = (("0", "torch.float32 False TINYMORPH_KERNELS=0"), ("1", "torch.bfloat16 True None"))
    for flag, expected in cases:
        env = {"TINYMORPH_KERNELS": flag, "TINYMORPH_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-500:]
        if flag == "1" and "True" not in out.stdout:
            pytest.skip(f"no C compiler here: {out.stdout.strip()}")
        assert out.stdout.strip() == expected
    assert list((tmp_path / "kernels").glob("tinymorph-kernels-*.so"))


def _random_4bit(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, codes, scale, offset) of a 4-bit weight whose scales and offsets are float16 values."""
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(n, k // quant.GROUP, generator=gen) / 20).half().float()
    offset = (-torch.rand(n, k // quant.GROUP, generator=gen) / 3).half().float()
    weight = (codes.view(n, k // quant.GROUP, quant.GROUP).float() * scale[..., None] + offset[..., None]).view(n, k)
    return weight, codes, scale, offset


def test_int4_kernel_equals_a_float_matmul():
    """The C 4-bit linear: its packing holds the codes, scales and offsets exactly; 1-32 bf16 rows give
    the dense float64 matmul of the same weight to float32 rounding (bf16 x 4-bit products are exact);
    its dequantized weight is that weight rounded to bf16; an `Int4Linear` of a bf16 model uses it."""
    if quant.int4_gemm() is None:
        pytest.skip(f"no int4 kernel on this machine: {kernels.reason()}")
    gen = torch.Generator().manual_seed(3)
    for n, k in ((960, 576), (576, 1536), (64, 128)):
        weight, codes, scale, offset = _random_4bit(n, k, gen)
        layer = quant.Int4Linear(weight, None, torch.bfloat16, (codes, scale, offset))
        assert layer.gemm is not None
        back = quant.unpack_pairs(layer.blocks)
        assert torch.equal(back[0], codes) and torch.equal(back[1], scale) and torch.equal(back[2], offset)
        assert torch.equal(layer.codes(), codes)
        assert torch.allclose(layer.dequantized().float(), weight, rtol=2 ** -8, atol=0)
        for m in (1, 2, 3, 4, 5, 8, 32):
            rows = (torch.randn(m, k, generator=gen) * 4).to(torch.bfloat16)
            want = rows.double() @ weight.double().T
            got = layer.gemm(rows, layer.blocks)
            assert got.dtype == torch.float32
            assert ((got.double() - want).abs() <= 1e-5 * want.abs().max()).all(), (n, k, m)
            assert torch.equal(layer(rows), got.to(torch.bfloat16))  # the module: the kernel's output in bf16


def test_c_layers_give_the_pytorch_layers_bits(default_model_dir):
    """All layers of a forward in one C call (`fused_layer.py`) give the logits and the KV cache of the
    layers' PyTorch path (same 4-bit kernel), for 1-4 new tokens; with a forward hook on a layer, the
    layers before and after it run in C and the hook sees and steers that layer's output.
    Tolerance: bit-equal on the development machine; elsewhere PyTorch's exp in silu may differ from
    the kernel's in a last float bit, which can move a bf16 rounding: the logits within 0.05 and the
    cache within one bf16 step."""
    model = load_llama(default_model_dir, torch.bfloat16, "auto")
    if model.fused is None:
        pytest.skip(f"no C layers on this machine: {kernels.reason()}")
    plain = load_llama(default_model_dir, torch.bfloat16, "auto")
    _without_c_layers(plain)
    ids = list(range(2000, 2150))
    push = torch.randn(model.cfg.dim, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16) * 8
    seen: list[int] = []

    def steer(module, args, output):
        seen.append(output.shape[1])
        return output + push

    for hooked in (False, True):
        handles = [m.layers[15].register_forward_hook(steer) for m in (model, plain)] if hooked else []
        caches = [model.new_cache(200), plain.new_cache(200)]
        model(ids, caches[0])
        plain(ids, caches[1])
        for n in (1, 2, 4):
            new = list(range(7, 7 + n))
            seen.clear()
            got, want = model(new, caches[0], n), plain(new, caches[1], n)
            end = len(ids) + n
            assert (got - want).abs().max() <= 0.05, (hooked, n)
            for name in "kv":
                a, b = (getattr(c, name)[:, :, :, :end].float() for c in caches)
                assert ((a - b).abs() <= b.abs() * 2 ** -7 + 1e-6).all(), (hooked, n, name)
            assert seen == ([n, n] if hooked else [])  # each model's hook ran once, on this forward's tokens
            for cache in caches:
                cache.truncate(len(ids))
        for handle in handles:
            handle.remove()
    unhooked = model(list(range(7, 9)), model.new_cache(8), 2)
    with_hook = model.layers[15].register_forward_hook(steer)
    assert not torch.equal(unhooked, model(list(range(7, 9)), model.new_cache(8), 2))  # the push did steer
    with_hook.remove()


def test_the_plain_c_versions_of_the_4bit_kernels_agree(tmp_path):
    """On a machine without AVX512-BF16 the 4-bit linear and the layers run plain C loops over the same
    packing: built here without -march=native (so without the intrinsics), they pass the same checks."""
    compiler = kernels.compiler()
    if compiler is None or quant.int4_gemm() is None:
        pytest.skip("no C compiler or no native kernels here")
    sources = [str(p) for p in Path(kernels.__file__).parent.joinpath("csrc").glob("*.c")]
    target = tmp_path / "plain.so"
    build = kernels.compile_library(compiler, sources, ["-fopenmp"], target)
    assert build.returncode == 0, build.stderr[-500:]
    library = ctypes.CDLL(str(target))
    assert quant._int4_is_exact(quant._wrap_int4(library))
    assert llama._decoder_layer_agrees(fused_layer.wrap(library))
    q = torch.zeros(1, 9, 70, 64, dtype=torch.bfloat16)  # the prefill kernel declines: PyTorch's SDPA runs
    assert attention._wrap_prefill(library)(q, *torch.zeros(2, 1, 3, 70, 64, dtype=torch.bfloat16)) is None
