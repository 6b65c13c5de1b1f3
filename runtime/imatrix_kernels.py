"""Compiled entry of runtime/imatrix.py: the forward pass with float32 activations
(model's exact path) that also sums the square of every value entering each
weight matrix.

Kept in a module of its own, as inspection_kernels is: numba's cache is named after
a hash of every runtime module with compiled code, and the hot path
(``model.forward_layers``) neither compiles nor pays for this one."""

from __future__ import annotations

import numpy as np
from numba import njit

from . import ops
from .model import WD, WG, WO, WQ, _gate_act, _layer_kv, _linear, _linear3, _post_norm, _qkv

__all__ = ["forward_sq"]


@njit(cache=True)
def _add_sq(acc, x, keep):
    """acc[j] += sum over kept rows i of x[i, j]^2 (float64 sums: the order of
    accumulation then does not matter to float32 precision)."""
    for i in range(x.shape[0]):
        if keep[i]:
            for j in range(x.shape[1]):
                v = np.float64(x[i, j])
                acc[j] += v * v


@njit(cache=True)
def forward_sq(x, pos, n_past, w, cfg, kv, inv_freq, keep, sq):
    """Every block over x[n, d] at positions pos (cache filled up to n_past), float32
    activations, the block attention kernel (precision "exact": exact=False).

    sq[l, slot, :cols] += the squares of the input of layer l's matrix in that slot,
    summed over the rows i with keep[i] (slots WQ: what attn_q / attn_k / attn_v
    read, rms_norm(x) * attn_norm; WO: the heads' attention output; WG: what
    ffn_gate / ffn_up read; WD: act(gate) * up).  Each block is model's
    attention_block / ffn_block with those inputs taken on the way."""
    rope_cs = ops.rope_table(pos, inv_freq)
    rope_cs_swa = ops.rope_table(pos, cfg.inv_freq_swa)
    empty3 = np.zeros((0, 0, 0), np.float32)
    for l in range(w.mats.shape[0]):
        cs = rope_cs_swa if cfg.swa[l] else rope_cs
        m = w.mats[l]
        n = x.shape[0]
        # attention: the same normed input reaches Q, K and V
        h = np.empty_like(x)
        ops.rms_norm(x, w.attn_norm[l], cfg.eps, h)
        _add_sq(sq[l, WQ], h, keep)
        kc, vc, n_swa = _layer_kv(kv.k, kv.v, kv.k_swa, kv.v_swa, cfg, l)
        q, k, v = _qkv(x, w, l, cfg, cs, False)
        ops.kv_write(k, v, kc, vc, n_past, cfg.n_kv_heads, kc.shape[2], vc.shape[2])
        att = np.empty((n, cfg.n_heads * vc.shape[2]), np.float32)
        ops.attention(q, kc, vc, n_past, cfg.n_heads, cfg.n_kv_heads, np.float32(cfg.attn_scale), att,
                      empty3, True, n_swa)
        _add_sq(sq[l, WO], att, keep)
        ops.add(x, _post_norm(_linear(att, w, m[WO], False), w.post_attn_norm, l, cfg))
        # FFN: the same normed input reaches gate and up; down reads act(gate) * up
        h = np.empty_like(x)
        ops.rms_norm(x, w.ffn_norm[l], cfg.eps, h)
        _add_sq(sq[l, WG], h, keep)
        gate, up, _ = _linear3(w, m[WG], m[WG + 1], m[WG + 1], h, False, False)
        _gate_act(gate, up, cfg.gelu, True)
        _add_sq(sq[l, WD], gate, keep)
        ops.add(x, _post_norm(_linear(gate, w, m[WD], False), w.post_ffn_norm, l, cfg))
