"""Scalar math used inside the compiled kernels."""

from __future__ import annotations

import numpy as np
from numba import njit

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
