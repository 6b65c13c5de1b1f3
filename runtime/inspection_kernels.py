"""Compiled entries of runtime/inspection.py: the whole forward pass with the
residual stream and each block's outputs kept, activation patching, and the
unembedding, all with float32 activations (exact=True in model's blocks).

Kept in a module of their own: numba's cache is named after a hash of every
runtime module with compiled code, so the views in inspection.py can change
without recompiling the engine."""

from __future__ import annotations

import numpy as np
from numba import njit

from . import ops, quant
from .model import attention_block, ffn_block

__all__ = ["forward_inspect", "unembed_rows"]


@njit(cache=True)
def forward_inspect(x, pos, w, cfg, kv, inv_freq, keep, keep_sub, resid, attn_out, mlp_out,
                    patch_at, patch_rows, patch_values):
    """Every block over x[n, d] (positions pos, an empty cache), float32 activations.

    keep[r] >= 0 (r = 0 .. n_layers) stores residual point r (0: the embeddings,
    l + 1: after block l) in resid[keep[r]]; keep_sub[l] >= 0 stores block l's
    attention and FFN outputs (what each adds to the stream) in attn_out /
    mlp_out[keep_sub[l]] (arrays with 0 rows are skipped).  patch_at >= 0: at
    residual point patch_at, rows patch_rows of x are overwritten with
    patch_values before the blocks above read them (activation patching); the
    stored residual at that point is the patched one."""
    empty3 = np.zeros((0, 0, 0), np.float32)
    rope_cs = ops.rope_table(pos, inv_freq)
    rope_cs_swa = ops.rope_table(pos, cfg.inv_freq_swa)
    n_layers = w.mats.shape[0]
    for r in range(n_layers + 1):
        if r > 0:
            l = r - 1
            cs = rope_cs_swa if cfg.swa[l] else rope_cs
            a = attention_block(x, 0, w, l, cfg, kv, cs, empty3, True)
            ops.add(x, a)
            f = ffn_block(x, w, l, cfg, True)
            ops.add(x, f)
            s = keep_sub[l]
            if s >= 0:
                if attn_out.shape[0] > 0:
                    attn_out[s] = a
                if mlp_out.shape[0] > 0:
                    mlp_out[s] = f
        if r == patch_at:
            for i in range(patch_rows.shape[0]):
                x[patch_rows[i]] = patch_values[i]
        s = keep[r]
        if s >= 0 and resid.shape[0] > 0:
            resid[s] = x


def unembed_rows(h, norm, eps, type_id, wout, out):
    """out = rms_norm(h) @ W_out^T with float32 activations."""
    hn = np.empty_like(h)
    ops.rms_norm(h, norm, eps, hn)
    quant.matmul(type_id, wout, hn, out)
