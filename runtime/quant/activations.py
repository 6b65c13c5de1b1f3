"""Activations rounded to integers as the engine's matmuls take them: int8 blocks
of 32 or 256 with their scales and sums for decode (quantize_q8, ggml's Q8_0 /
Q8_1 / Q8_K), int16 at 14 bits per 256 for the prefill tiles (quantize_x16)."""

from __future__ import annotations

import llvmlite.ir as llir
import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from .formats import _FM
from .ir import _U32, _bits_as_f32, _f32_as_bits


# ---------------------------------------------------------------------------
# Decode with 8-bit activations, as llama.cpp does: x is quantized once per
# matvec to int8 with one float scale per 32 values (like Q8_0; per 256 for the
# k-quants, like Q8_K), and each block becomes an integer dot product,
# sum(q_w * q_x), then one float multiply.  The integer dots are LLVM vector IR
# (below): with AVX-512 VNNI they are vpdpbusd (64 u8 x s8 products per
# instruction), elsewhere the same sums in plain IR; numba's own integer
# arithmetic widens everything to int64 and cannot get there.  Only the engine
# (matmul_q8) uses this; matvec / dot keep float32 activations.
# ---------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _abs_max(x):
    """max |x| by the float bits with the sign cleared: for non-negative floats the
    integer order is the float order, and an integer max reduction vectorises
    (LLVM keeps a float max as a scalar chain, 4 cycles a value)."""
    m = _U32(0)
    for j in range(x.shape[0]):
        m = max(m, _f32_as_bits(x[j]) & _U32(0x7FFFFFFF))
    return _bits_as_f32(m)


@intrinsic
def _round_f16(typingctx, v):
    """float32 rounded to the nearest IEEE half (even on ties), back as float32:
    what storing it in a ggml fp16 field does (the hardware conversion)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], llir.HalfType()), llir.FloatType())
    return types.float32(types.float32), codegen


@njit(cache=True, fastmath=_FM)
def quantize_q8(x, bs, xq, xd, xs16, xsd):
    """x[cols] -> int8 blocks of bs values (32 for the legacy formats, like llama.cpp's
    Q8_0/Q8_1; 256 for the k-quants, like its Q8_K): x ~ xd[k] * xq, xq rounded to
    nearest with |xq| <= 127 (the block's largest |x| maps to 127), and xs16[j] =
    sum of xq over each 16 values (the offset terms: sum((q - c) * xq) = dot - c * sum).
    Blocks of 32 keep ggml's fp16 fields: xd rounded to half, and xsd[k] = half(d *
    sum of block k's xq) (Q8_1's s, which the Q4_1 / Q5_1 minimums multiply)."""
    for k in range(x.shape[0] // bs):
        xb = x[bs * k:bs * k + bs]
        amax = _abs_max(xb)
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        t = 0
        for j in range(bs):
            q = np.int32(np.rint(xb[j] * inv))
            xq[bs * k + j] = q
            t += q
        d = amax / np.float32(127.0)
        if bs == 32:
            xd[k] = _round_f16(d)
            xsd[k] = _round_f16(d * np.float32(t))
        else:
            xd[k] = d
    for k in range(x.shape[0] // 16):
        t = 0
        for j in range(16):
            t += np.int32(xq[16 * k + j])
        xs16[k] = t


@njit(cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _block_sums(X, xsum):
    """xsum[r, k] = sum(X[r, 32k:32k+32]), float32 (the row-independent part of
    the dot with blocks that carry a minimum: d*sum(q*x) + m*sum(x))."""
    for r in range(xsum.shape[0]):
        for k in range(xsum.shape[1]):
            xr = X[r, 32 * k:32 * k + 32]
            s = np.float32(0.0)
            for j in range(32):
                s += xr[j]
            xsum[r, k] = s


@njit(cache=True)
def _activation_q8(X, cols, bs):
    """Each row of X[:, :cols] as int8 blocks of bs for _rows_dot_q8: (xq [n, cols],
    xd [n, cols/bs], xs16 [n, cols/16]), every row rounded on its own (as a one-row
    call rounds it); empty when cols is 0 or not a multiple of bs."""
    if cols % bs:
        cols = 0
    n = X.shape[0] if cols > 0 else 0
    xq = np.empty((n, cols), np.int8)
    xd = np.empty((n, cols // bs), np.float32)
    xs16 = np.empty((n, cols // 16), np.int32)
    xsd = np.empty((n, cols // 32 if bs == 32 else 0), np.float32)
    for r in range(n):
        quantize_q8(X[r, :cols], bs, xq[r], xd[r], xs16[r], xsd[r])
    return xq, xd, xs16, xsd


_X16_MAX = 16383.0  # |x| <= 2^14 - 1: 8 products of |w| <= 4096 per int32 lane stay < 2^31


@njit(cache=True, fastmath=_FM)
def quantize_x16(x, xq, xd, xs16):
    """x[cols] -> int16 per chunk of 256 (the last may be shorter, a multiple of 32):
    x ~ xd[k] * xq, |xq| <= 16383 (the chunk's largest |x| maps to 16383), and
    xs16[g] = xd[k] * sum(xq) over each 16 values (for the formats' minimums)."""
    cols = x.shape[0]
    for k in range((cols + 255) // 256):
        c0 = 256 * k
        m = min(256, cols - c0)
        xb = x[c0:c0 + m]
        qb = xq[c0:c0 + m]
        amax = _abs_max(xb)
        inv = np.float32(_X16_MAX) / amax if amax > 0 else np.float32(0.0)
        d = amax / np.float32(_X16_MAX)
        xd[k] = d
        for j in range(m):
            qb[j] = np.int16(np.rint(xb[j] * inv))
        for g in range(m // 16):
            s = np.int32(0)
            for j in range(16 * g, 16 * g + 16):
                s += np.int32(qb[j])
            xs16[c0 // 16 + g] = d * np.float32(s)
