"""The C kernels (attention of a few new tokens over a bf16 KV cache, the int8 lm_head, the rms norm):
built here, exact, with a fallback to PyTorch's ops."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tinymorph.steering import attention, kernels, quant
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


def test_a_bf16_model_keeps_a_bf16_cache_and_decodes_as_with_sdpa(default_model_dir):
    """The default model in bf16: the cache is bf16 and read by the kernel; one- to four-token
    forwards over a cached prefix give the logits SDPA over a float32 cache gives (bf16 rounding of
    the layers' outputs aside) and the same next token wherever it is not a near tie."""
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
    model(ids, fast)
    model(ids, plain)
    for n in (1, 2, 4, 8):
        new = tail[:n]
        a, b = model(new, fast, n).view(n, -1), model(new, plain, n).view(n, -1)
        fast.truncate(len(ids))
        plain.truncate(len(ids))
        assert (a - b).abs().max() < 0.6, n
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


def test_fused_layer_attention_gives_the_ops_bits(default_model_dir, monkeypatch):
    """Rope, cache writes and attention in one call (`KVCache.attend_new`) give the same cache and the
    same logits, bit for bit, as the PyTorch ops with the attention kernel, for 1-4 new tokens."""
    from tinymorph.steering.llama import KVCache

    _kernel_or_skip()
    model = load_llama(default_model_dir, torch.bfloat16, "auto")
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
