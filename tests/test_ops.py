"""Math used inside the compiled kernels: exp, the max trick, attention."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from runtime import ops
from runtime.ops import exp_f32


@njit(cache=True)
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = exp_f32(x[i])


def test_exp_f32_is_within_two_ulp_of_exp():
    x = np.concatenate([np.linspace(-87, 88, 2_000_001, dtype=np.float32),
                        np.array([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5], np.float32)])
    out = np.empty_like(x)
    _exp_all(x, out)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out / ref - 1)) < 3e-7
    assert out[-6] == 1.0 and out[-5] == 1.0


def test_exp_f32_clamps_to_the_normal_range():
    x = np.array([-1000, -88, 89, 1000], np.float32)
    out = np.empty_like(x)
    _exp_all(x, out)
    assert np.all(np.isfinite(out)) and np.all(out > 0)
    assert out[0] == out[1] and out[0] < 2e-38  # e^-87: the smallest value given
    assert out[2] == out[3] and out[2] > 1e38   # e^88


@njit(cache=True)
def _max_all(x):
    return ops._max_f32(x, x.shape[0])


def test_max_f32_matches_numpy_on_signs_zeros_and_infinities():
    rng = np.random.default_rng(1)
    cases = [rng.standard_normal(37).astype(np.float32), -np.abs(rng.standard_normal(9)).astype(np.float32),
             np.array([-np.inf, -3.0], np.float32), np.array([-0.0, -1e-30], np.float32),
             np.array([1e-40, -2e-40], np.float32), np.array([-5.0], np.float32),
             np.array([np.inf, 1.0], np.float32)]
    for x in cases:
        assert _max_all(x) == x.max(), x


def _attention_ref(q, kc, vc, n_past, n_heads, n_kv, scale):
    n = q.shape[0]
    hd = kc.shape[2]
    K = kc.astype(np.float64)
    V = vc.astype(np.float64)
    out = np.zeros((n, n_heads * hd))
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        for i in range(n):
            L = n_past + i + 1
            s = scale * (K[:L, g] @ q[i, h * hd:(h + 1) * hd].astype(np.float64))
            p = np.exp(s - s.max())
            out[i, h * hd:(h + 1) * hd] = (p / p.sum()) @ V[:L, g]
    return out


@pytest.mark.parametrize("n,n_past,hd", [(4, 0, 64), (16, 0, 64), (20, 5, 64), (36, 37, 64),
                                         (64, 200, 64), (36, 37, 128), (20, 45, 80)])
@pytest.mark.parametrize("kv16", [False, True], ids=["f32-cache", "f16-cache"])
def test_attention_matches_numpy(n, n_past, hd, kv16):
    """Causal GQA attention, per-query path (n < 16) and the 4-query blocks with
    score tiles of 32 keys (key counts off multiples of 32, a cache already holding
    keys; head dims of one and two 64-column value tiles, and 80, which the value
    tiles do not cover), against float64 NumPy on the same cache values."""
    rng = np.random.default_rng(n + n_past)
    n_heads, n_kv = 6, 2
    ctx = n_past + n + 7
    k = rng.standard_normal((ctx, n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((ctx, n_kv, hd)).astype(np.float32)
    if kv16:
        kc, vc = k.astype(np.float16).view(np.uint16), v.astype(np.float16).view(np.uint16)
        kref, vref = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    else:
        kc, vc, kref, vref = k, v, k, v
    q = rng.standard_normal((n, n_heads * hd)).astype(np.float32)
    out = np.full((n, n_heads * hd), np.nan, np.float32)
    scale = np.float32(1 / np.sqrt(hd))
    ops.attention(q, kc, vc, n_past, n_heads, n_kv, scale, out, np.zeros((0, 0, 0), np.float32))
    ref = _attention_ref(q, kref, vref, n_past, n_heads, n_kv, float(scale))
    assert np.abs(out - ref).max() < 2e-5
