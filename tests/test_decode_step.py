"""The decode step's native ops (`csrc/decode_step.c`) against torch on fresh random inputs: the residual add
+ norm (RMS and LayerNorm), and one new token's attention (rotary, KV-cache write, grouped-query heads,
per-sequence starts, sliding window)."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_convert.inference import native

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no native kernel here: {native.why_unavailable()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layernorm"])
def test_residual_norm_equals_torch(dtype, rms):
    x, delta = torch.randn(5, 48).to(dtype), torch.randn(5, 48).to(dtype)
    w, b = torch.randn(48).to(dtype), None if rms else torch.randn(48).to(dtype)
    summed = x + delta
    if rms:
        h = summed.float()
        ref = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    else:
        ref = F.layer_norm(summed, (48,), w, b, 1e-5)
    got = native.residual_norm(x, delta, w, b, rms, 1e-5)
    assert torch.equal(x, summed)  # the add, in place
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # bf16: one rounding of the same value may differ
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def _rope(positions: int, hd: int):
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] / 100.0 ** (torch.arange(0, hd, 2) / hd)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def _rotate(t, cos, sin):
    hd = t.shape[-1]
    return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("rotary", [True, False])
def test_attend_one_equals_sdpa_over_each_sequences_keys(dtype, window, rotary):
    B, H, H_kv, hd, slot, capacity = 3, 6, 2, 16, 9, 12
    start = torch.tensor([0, 4, 9])  # sequence 2's only key is its new one
    pos = slot - start
    k_cache, v_cache = torch.randn(B, H_kv, capacity, hd), torch.randn(B, H_kv, capacity, hd)
    qkv = torch.randn(B, (H + 2 * H_kv) * hd).to(dtype)
    rope = _rope(16, hd) if rotary else None
    k_before = k_cache.clone()
    got = native.attend_one(qkv, H, rope, pos, k_cache, v_cache, slot, start, window, 0.3)
    q, k, v = (t.float().view(B, -1, hd) for t in qkv.split([H * hd, H_kv * hd, H_kv * hd], -1))
    if rotary:
        q, k = (_rotate(t, rope[0][pos][:, None], rope[1][pos][:, None]) for t in (q, k))
    torch.testing.assert_close(k_cache[:, :, slot], k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_cache[:, :, slot], v)
    assert torch.equal(k_cache[:, :, :slot], k_before[:, :, :slot])
    for b in range(B):
        lo = max(int(start[b]), slot + 1 - window) if window else int(start[b])
        keys, values = k_cache[b, :, lo:slot + 1], v_cache[b, :, lo:slot + 1]  # (H_kv, n, hd)
        ref = F.scaled_dot_product_attention(q[b][:, None], keys, values, scale=0.3, enable_gqa=True)  # (H, 1, hd)
        tol = 1e-5 if dtype == torch.float32 else 1.6e-2
        torch.testing.assert_close(got[b].float(), ref.reshape(-1), rtol=tol, atol=tol)
    assert got.dtype == dtype and math.isfinite(float(got.float().sum()))


def test_attend_one_refuses_what_it_cannot_read():
    qkv, cache = torch.randn(1, 4 * 8), torch.zeros(1, 1, 4, 8)
    one = torch.tensor([0])
    assert native.attend_one(qkv.double(), 2, None, one, cache, cache.clone(), 0, one, None, 1.0) is None
    assert native.attend_one(qkv, 2, None, one, cache, cache.clone(), 4, one, None, 1.0) is None  # slot past capacity
    with pytest.raises(ValueError):  # a position past the rotary tables
        native.attend_one(qkv, 2, _rope(2, 8), torch.tensor([5]), cache, cache.clone(), 0, one, None, 1.0)
