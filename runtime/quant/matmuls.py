"""Matmuls over quantized rows: dispatch on the type id (inlined chains over the
formats' decoders and dots), the fused decode kernels, the chunked float prefill,
the int16 prefill tiles, each format's own compiled kernels (kernels(T)) and the
engine's calls to them by address, and the checked Python API."""

from __future__ import annotations

import functools
from typing import NamedTuple

import llvmlite.ir as llir
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from .formats import (
    GGML_BF16, GGML_F16, GGML_F32, GGML_IQ4_NL, GGML_IQ4_XS, GGML_Q2_K, GGML_Q3_K, GGML_Q4_0, GGML_Q4_1,
    GGML_Q4_K, GGML_Q5_0, GGML_Q5_1, GGML_Q5_K, GGML_Q6_K, GGML_Q8_0, _FM, _traits, type_name,
)
from .ir import (
    Q8_MAX_ROWS, _I32, _I64, _c64, _f16, _ir_data, _ir_splat, _ir_vload, _ir_vstore, _target_has, _vc,
)
from .floats import _dec_bf16, _dec_f16, _dec_f32, _rdot_bf16, _rdot_f16, _rdot_f32
from .legacy import (
    _d16_q4_0, _d16_q4_1, _d16_q5_0, _d16_q5_1, _d16_q8_0, _dec_q4_0, _dec_q4_1, _dec_q5_0, _dec_q5_1,
    _dec_q8_0, _qdot_q4_0, _qdot_q4_1, _qdot_q5_0, _qdot_q5_1, _qdot_q8_0, _rdot_q4_0, _rdot_q4_1,
    _rdot_q5_0, _rdot_q5_1, _rdot_q8_0,
)
from .iq4 import (
    _d16_iq4_nl, _d16_iq4_xs, _dec_iq4_nl, _dec_iq4_xs, _qdot_iq4_nl, _qdot_iq4_xs, _rdot_iq4_nl,
    _rdot_iq4_xs,
)
from .q2_k import _d16_q2_k, _dec_q2_k, _qdot_q2_k, _rdot_q2_k
from .q3_k import _d16_q3_k, _dec_q3_k, _qdot_q3_k, _rdot_q3_k
from .q4_k import (
    _d16_q4_k, _d16_q5_k, _dec_q4_k, _dec_q5_k, _k_scale_min, _qdot_q4_k, _qdot_q5_k, _rdot_q4_k,
    _rdot_q5_k,
)
from .q6_k import _d16_q6_k, _dec_q6_k, _qdot_q6_k, _rdot_q6_k
from .activations import _activation_q8, _block_sums, quantize_x16


_CHUNK = 256  # weights decoded at a time per row (one k-quant super-block, 8 legacy blocks)
# Prefill decodes 1024 weights of 4 rows at a time (16 KiB, in L1): a multiple of
# every block size, and long enough that the 16 horizontal sums per tile are cheap.
_PREFILL_CHUNK = 1024


# ---------------------------------------------------------------------------
# Dispatch on the type id, in compiled code.  These chains are inlined
# ("always") into each format's own kernels (kernels() below), where type_id is
# a constant: numba then drops every other format's branch before it compiles
# anything, so a format's kernels hold that format's code only.
# ---------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _block_size_nb(type_id):
    if type_id == GGML_F32 or type_id == GGML_F16 or type_id == GGML_BF16:
        return 1
    if (type_id == GGML_Q2_K or type_id == GGML_Q3_K or type_id == GGML_Q4_K
            or type_id == GGML_Q5_K or type_id == GGML_Q6_K or type_id == GGML_IQ4_XS):
        return 256
    return 32


@njit(cache=True, inline="always")
def _decode(type_id, src, b0, nb, dst, doff):
    """Decode blocks b0..b0+nb-1 of src into dst[doff:]; False for an unknown type."""
    if type_id == GGML_Q4_0:
        _dec_q4_0(src, b0, nb, dst, doff)
    elif type_id == GGML_Q4_1:
        _dec_q4_1(src, b0, nb, dst, doff)
    elif type_id == GGML_Q8_0:
        _dec_q8_0(src, b0, nb, dst, doff)
    elif type_id == GGML_Q4_K:
        _dec_q4_k(src, b0, nb, dst, doff)
    elif type_id == GGML_Q6_K:
        _dec_q6_k(src, b0, nb, dst, doff)
    elif type_id == GGML_Q5_0:
        _dec_q5_0(src, b0, nb, dst, doff)
    elif type_id == GGML_Q5_1:
        _dec_q5_1(src, b0, nb, dst, doff)
    elif type_id == GGML_Q5_K:
        _dec_q5_k(src, b0, nb, dst, doff)
    elif type_id == GGML_Q3_K:
        _dec_q3_k(src, b0, nb, dst, doff)
    elif type_id == GGML_Q2_K:
        _dec_q2_k(src, b0, nb, dst, doff)
    elif type_id == GGML_IQ4_NL:
        _dec_iq4_nl(src, b0, nb, dst, doff)
    elif type_id == GGML_IQ4_XS:
        _dec_iq4_xs(src, b0, nb, dst, doff)
    elif type_id == GGML_F32:
        _dec_f32(src, b0, nb, dst, doff)
    elif type_id == GGML_F16:
        _dec_f16(src, b0, nb, dst, doff)
    elif type_id == GGML_BF16:
        _dec_bf16(src, b0, nb, dst, doff)
    else:
        return False
    return True


@njit(cache=True, inline="always")
def _dequantize_body(type_id, src, n_blocks, dst):
    bs = _block_size_nb(type_id)
    per_task = max(1, 16384 // bs)  # blocks per parallel task
    n_tasks = (n_blocks + per_task - 1) // per_task
    for t in prange(n_tasks):
        b0 = t * per_task
        nb = min(per_task, n_blocks - b0)
        _decode(type_id, src, b0, nb, dst, b0 * bs)


# ---------------------------------------------------------------------------
# Fused row dots: dequant(row) . x straight from the blocks, nothing stored.
# Each block's integer part is dotted with x in float32 and the block's scale
# applied once (d * sum(q * x) + m * sum(x)), so these are not bit-identical to
# dequantize-then-dot, only as accurate (float32 per block, float64 per row).
# fastmath (reassociation) is what lets LLVM vectorise the inner reductions.
# ---------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _row_dot(type_id, w, x, xsum, nb):
    """dequant(w) . x for one row of nb blocks; NaN for an unknown type.

    xsum[k] = sum(x[32k:32k+32]) (see _block_sums): the formats with a per-block
    minimum need sum(x) per block, which is the same for every row.
    """
    if type_id == GGML_Q4_0:
        return _rdot_q4_0(w, x, xsum, nb)
    if type_id == GGML_Q4_1:
        return _rdot_q4_1(w, x, xsum, nb)
    if type_id == GGML_Q8_0:
        return _rdot_q8_0(w, x, xsum, nb)
    if type_id == GGML_Q4_K:
        return _rdot_q4_k(w, x, xsum, nb)
    if type_id == GGML_Q6_K:
        return _rdot_q6_k(w, x, xsum, nb)
    if type_id == GGML_Q5_0:
        return _rdot_q5_0(w, x, xsum, nb)
    if type_id == GGML_Q5_1:
        return _rdot_q5_1(w, x, xsum, nb)
    if type_id == GGML_Q5_K:
        return _rdot_q5_k(w, x, xsum, nb)
    if type_id == GGML_Q3_K:
        return _rdot_q3_k(w, x, xsum, nb)
    if type_id == GGML_Q2_K:
        return _rdot_q2_k(w, x, xsum, nb)
    if type_id == GGML_IQ4_NL:
        return _rdot_iq4_nl(w, x, xsum, nb)
    if type_id == GGML_IQ4_XS:
        return _rdot_iq4_xs(w, x, xsum, nb)
    if type_id == GGML_F32:
        return _rdot_f32(w, x, xsum, nb)
    if type_id == GGML_F16:
        return _rdot_f16(w, x, xsum, nb)
    if type_id == GGML_BF16:
        return _rdot_bf16(w, x, xsum, nb)
    return np.nan


@njit(cache=True, inline="always")
def _has_q8_dot(type_id):
    return (type_id == GGML_Q4_0 or type_id == GGML_Q4_1 or type_id == GGML_Q5_0
            or type_id == GGML_Q5_1 or type_id == GGML_Q8_0 or type_id == GGML_Q4_K
            or type_id == GGML_Q5_K or type_id == GGML_Q6_K or type_id == GGML_IQ4_NL
            or type_id == GGML_IQ4_XS or type_id == GGML_Q2_K or type_id == GGML_Q3_K)


@njit(cache=True, inline="always")
def _rows_dot_q8(type_id, W, i0, i1, a32, ak, nb, out):
    """out[r, i] = weight row W[i] . activation row r for i0 <= i < i1 and every row
    of a32 / ak (x as int8 blocks of 32 / 256: xq, xd, xs16, see _activation_q8)."""
    if type_id == GGML_Q4_K:
        _qdot_q4_k(W, i0, i1, ak[0], ak[1], ak[2], nb, out)
    elif type_id == GGML_Q5_K:
        _qdot_q5_k(W, i0, i1, ak[0], ak[1], ak[2], nb, out)
    elif type_id == GGML_IQ4_XS:
        _qdot_iq4_xs(W, i0, i1, ak[0], ak[1], ak[2], nb, out)
    elif type_id == GGML_Q6_K:
        _qdot_q6_k(W, i0, i1, ak[0], ak[1], ak[2], nb, out)
    elif type_id == GGML_Q2_K:
        _qdot_q2_k(W, i0, i1, ak[0], ak[1], ak[2], nb, out)
    elif type_id == GGML_Q3_K:
        _qdot_q3_k(W, i0, i1, ak[0], ak[1], ak[2], nb, out)
    else:
        xq, xd, xs16, xsd = a32
        if type_id == GGML_Q4_0:
            _qdot_q4_0(W, i0, i1, xq, xd, xs16, nb, out)
        elif type_id == GGML_Q8_0:
            _qdot_q8_0(W, i0, i1, xq, xd, xs16, nb, out)
        elif type_id == GGML_Q5_0:
            _qdot_q5_0(W, i0, i1, xq, xd, xs16, nb, out)
        elif type_id == GGML_IQ4_NL:
            _qdot_iq4_nl(W, i0, i1, xq, xd, xs16, nb, out)
        elif type_id == GGML_Q5_1:
            _qdot_q5_1(W, i0, i1, xq, xd, xsd, nb, out)  # minimums take Q8_1's s
        elif type_id == GGML_Q4_1:
            _qdot_q4_1(W, i0, i1, xq, xd, xsd, nb, out)


# ---------------------------------------------------------------------------
# matmul: fused row dots for few activation rows, decode-once-per-chunk for many
# ---------------------------------------------------------------------------

@njit(cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _dot_chunk(buf, x, c0, m):
    """sum_j buf[j] * x[c0 + j] for j < m (m <= 256), in float32.

    Reassociation lets LLVM vectorise it (16 lanes of partial sums); the caller
    adds the chunk sums in float64.  The slice matters: indexing x[c0 + j]
    directly makes numba's negative-index wraparound turn the loads into
    gathers (8x slower).
    """
    xs = x[c0:c0 + m]
    s = np.float32(0.0)
    for j in range(m):
        s += buf[j] * xs[j]
    return s


@njit(cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _dot_chunk4(buf, X, r, c0, m):
    """_dot_chunk for rows r..r+3 of X at once: each decoded weight is loaded
    once for four activation rows (four independent vector accumulators)."""
    x0 = X[r, c0:c0 + m]
    x1 = X[r + 1, c0:c0 + m]
    x2 = X[r + 2, c0:c0 + m]
    x3 = X[r + 3, c0:c0 + m]
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    s3 = np.float32(0.0)
    for j in range(m):
        b = buf[j]
        s0 += b * x0[j]
        s1 += b * x1[j]
        s2 += b * x2[j]
        s3 += b * x3[j]
    return s0, s1, s2, s3


@njit(cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _dot_chunk4x4(buf, X, r, c0, m):
    """4 decoded weight rows (buf[0..3, :m]) times rows r..r+3 of X: 16 sums.

    A register tile: every loaded weight vector meets four activation vectors and
    every activation vector four weight vectors (8 loads per 16 multiply-adds, 16
    vector accumulators), so prefill runs near the FMA units' rate instead of
    waiting on loads as one weight row at a time does."""
    w0 = buf[0, :m]
    w1 = buf[1, :m]
    w2 = buf[2, :m]
    w3 = buf[3, :m]
    x0 = X[r, c0:c0 + m]
    x1 = X[r + 1, c0:c0 + m]
    x2 = X[r + 2, c0:c0 + m]
    x3 = X[r + 3, c0:c0 + m]
    z = np.float32(0.0)
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = z
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = z
    for j in range(m):
        a0 = w0[j]
        a1 = w1[j]
        a2 = w2[j]
        a3 = w3[j]
        b0 = x0[j]
        b1 = x1[j]
        b2 = x2[j]
        b3 = x3[j]
        s00 += a0 * b0
        s01 += a0 * b1
        s02 += a0 * b2
        s03 += a0 * b3
        s10 += a1 * b0
        s11 += a1 * b1
        s12 += a1 * b2
        s13 += a1 * b3
        s20 += a2 * b0
        s21 += a2 * b1
        s22 += a2 * b2
        s23 += a2 * b3
        s30 += a3 * b0
        s31 += a3 * b1
        s32 += a3 * b2
        s33 += a3 * b3
    return (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)


# With this many activation rows or fewer (token-by-token decode), matmul runs the
# fused row dots; with more (batched prefill), each 256-weight chunk of a row is
# decoded once into a thread-local buffer and dotted with every row of X.
# Measured on one Zen 4 core (tools/bench_dequant.py): fused 4-18 GFLOP/s vs
# 3-8 via the buffer at n=1; at n=2 the buffer already wins for most formats.
FUSED_MAX_N = 1


@njit(cache=True, inline="always")
def _is_k(type_id):
    """Formats whose int8 dots take activations in blocks of 256 (ggml's Q8_K)."""
    return (type_id == GGML_Q4_K or type_id == GGML_Q5_K or type_id == GGML_Q6_K or type_id == GGML_IQ4_XS
            or type_id == GGML_Q2_K or type_id == GGML_Q3_K)


# A fixed task count (not get_num_threads(), which would stop numba caching these
# functions): enough tasks to balance 16+ threads, few enough that per-task
# buffers cost nothing.
_N_TASKS = 128


@njit(cache=True)
def _shares(n_tasks, n):
    """bounds[t]:bounds[t + 1] is task t's share of n equal units, sizes differing
    by at most one and spread evenly.  numba's parallel loops give each thread an
    equal contiguous run of tasks, so ceil(n / n_tasks) units per task with the
    rest left empty handed one of two threads up to twice the other's work (192
    tiles in 128 tasks: 128 tiles against 64, a third of the time lost).  Computed
    before the parallel loop: the same division inside it (with its zero check)
    made the decode row loop 2x slower."""
    bounds = np.empty(n_tasks + 1, np.int64)
    for t in range(n_tasks + 1):
        bounds[t] = t * n // n_tasks if n_tasks > 0 else 0
    return bounds


@njit(cache=True, inline="always")
def _fused_body(type_id, W, X, out, act_q8):
    rows = W.shape[0]
    n = X.shape[0]
    cols = X.shape[1]
    nb = cols // _block_size_nb(type_id)
    q8 = act_q8 and n <= Q8_MAX_ROWS and _has_q8_dot(type_id)
    a32 = _activation_q8(X, cols if q8 and not _is_k(type_id) else 0, 32)
    ak = _activation_q8(X, cols if q8 and _is_k(type_id) else 0, 256)
    xsum = np.empty((0 if q8 else n, cols // 32), np.float32)  # the float kernels' x sums
    _block_sums(X, xsum)
    n_tasks = min(rows, _N_TASKS)
    bounds = _shares(n_tasks, rows)
    for t in prange(n_tasks):
        if q8:
            _rows_dot_q8(type_id, W, bounds[t], bounds[t + 1], a32, ak, nb, out)
            continue
        for i in range(bounds[t], bounds[t + 1]):
            w = W[i]
            for r in range(n):
                out[r, i] = _row_dot(type_id, w, X[r], xsum[r], nb)


@njit(cache=True, inline="always")
def _chunked_body(type_id, W, X, out):
    rows = W.shape[0]
    n = X.shape[0]
    cols = X.shape[1]
    bs = _block_size_nb(type_id)
    n_quads = (rows + 3) // 4  # tasks share out 4-row tiles
    n_tasks = min(n_quads, _N_TASKS)
    bounds = _shares(n_tasks, n_quads)
    n4 = n - n % 4
    for t in prange(n_tasks):
        buf = np.empty((4, _PREFILL_CHUNK), np.float32)
        acc = np.empty((4, n), np.float64)
        i0 = 4 * bounds[t]
        i_end = min(rows, 4 * bounds[t + 1])
        while i0 < i_end:
            k = min(4, i_end - i0)  # weight rows in this tile
            acc[:, :] = 0.0
            for c0 in range(0, cols, _PREFILL_CHUNK):
                m = min(_PREFILL_CHUNK, cols - c0)
                for a in range(k):
                    _decode(type_id, W[i0 + a], c0 // bs, m // bs, buf[a], 0)
                if k == 4:
                    for r in range(0, n4, 4):
                        s = _dot_chunk4x4(buf, X, r, c0, m)
                        for a in range(4):
                            for b in range(4):
                                acc[a, r + b] += s[4 * a + b]
                else:
                    for a in range(k):
                        for r in range(0, n4, 4):
                            s0, s1, s2, s3 = _dot_chunk4(buf[a], X, r, c0, m)
                            acc[a, r] += s0
                            acc[a, r + 1] += s1
                            acc[a, r + 2] += s2
                            acc[a, r + 3] += s3
                for a in range(k):
                    for r in range(n4, n):
                        acc[a, r] += _dot_chunk(buf[a], X[r], c0, m)
            for a in range(k):
                for r in range(n):
                    out[r, i0 + a] = acc[a, r]
            i0 += k


# ---------------------------------------------------------------------------
# Prefill in 16-bit integers.  Weights decode to int16 with the sub-block scales
# folded in (Q4_K: sc * q, |.| <= 945; Q6_K: sc * (q - 32), |.| <= 4096), the
# activations are rounded to int16 (14 bits per 256-value block, one float scale
# each), and the products are summed exactly in int32 per scale block; the float
# scales (weight d x activation scale) and the minimums come after, once per block.
# The int16 dot is LLVM vector IR of the form sum(sext(a_2k) * sext(b_2k) +
# sext(a_2k+1) * sext(b_2k+1)), which x86 lowers to vpmaddwd (vpdpwssd with
# AVX-512 VNNI / AVX-VNNI): 32 multiply-adds per instruction, twice float32 FMA.
# The weight tile is 16 rows interleaved by column pairs, [pair][row][2], so one
# vector holds a column pair of 16 rows and meets a broadcast activation pair:
# each lane is one output row, and the tile needs no horizontal sums at all.
# Activations at 14 bits are 64x finer than llama.cpp's int8 (Q8_K) ones.
# ---------------------------------------------------------------------------

_I16_ROWS = 16  # weight rows per tile (lanes of one int32 vector)
# Batches larger than the int8 decode path's take the int16 tiles.  Decoding a
# weight into the interleaved int16 tile costs more than the float decode, which
# pays off only when enough rows share it: on SmolLM2's small matrices the two
# crossed at 16-32 rows (2 threads, us, int16 vs float: Q4_K 1536 x 512 at n = 16
# 142 vs 107, n = 24 163 vs 156, n = 32 184 vs 224), on the 0.5B-3B models users
# run the tiles win from 17 rows on (Qwen2.5-1.5B shapes, ms, int16 vs float: Q4_K
# 8960 x 1536 n = 17 3.89 vs 3.85, n = 24 3.93 vs 5.25; Q6_K 1536 x 8960 n = 17
# 4.57 vs 5.69, n = 31 5.10 vs 9.00).  So the integer path never takes the float
# chunked kernel where a format has tiles, and a fast-precision model neither
# compiles nor loads it (kernel_addresses): a quarter of a fresh install's
# kernel compile time.
I16_MIN_N = Q8_MAX_ROWS + 1
# Activation rows per tile: each holds a 16-lane int32 accumulator, one register
# with AVX-512; AVX2's sixteen 256-bit registers fit six such rows beside the
# weight pair and the broadcast (eight spilled to the stack: 79 instructions per
# column pair instead of 34).  The sums do not depend on it.
_I16_T = 8 if _target_has("avx512f") else 6


def _i16_tile_intrinsic(T):
    """f(wb, wo, P, xq, xo, xstride, dsc, do, xd, xdo, xdstride, acc, ao): for t < T
    and lanes a < 16, with wb16 / xq16 the arrays' data as int16,
      isum[t, a] = sum over p < P of wb16[wo + 32p + 2a + {0,1}] * xq16[xo + t*xstride + 2p + {0,1}]
    exactly in int32, then
      acc[ao + 16t + a] += float(isum[t, a]) * (dsc[do + a] * xd[xdo + t*xdstride])."""

    @intrinsic
    def tile(typingctx, wb, wo, P, xq, xo, xstride, dsc, do, xd, xdo, xdstride, acc, ao):
        sig = types.void(wb, wo, P, xq, xo, xstride, dsc, do, xd, xdo, xdstride, acc, ao)

        def codegen(context, builder, signature, args):
            wa, wo_, p_n, xa, xo_, xs_, da, do_, xda, xdo_, xds_, aa, ao_ = args
            aty = signature.args
            i16, i32, i64, f32 = llir.IntType(16), llir.IntType(32), llir.IntType(64), llir.FloatType()
            v32i16, v16i32, v32i32 = (llir.VectorType(i16, 32), llir.VectorType(i32, 16),
                                      llir.VectorType(i32, 32))
            v16f = llir.VectorType(f32, 16)
            c64 = lambda k: llir.Constant(i64, k)  # noqa: E731
            wp = _ir_data(context, builder, aty[0], wa, i16)
            xp = _ir_data(context, builder, aty[3], xa, i16)
            accs = [cgutils.alloca_once_value(builder, llir.Constant(v16i32, None)) for _ in range(T)]
            even = llir.Constant(v16i32, list(range(0, 32, 2)))
            odd = llir.Constant(v16i32, list(range(1, 32, 2)))
            xrow = [builder.add(xo_, builder.mul(xs_, c64(t))) for t in range(T)]
            with cgutils.for_range(builder, p_n) as loop:
                p = loop.index
                ws = builder.sext(_ir_vload(builder, wp, builder.add(wo_, builder.mul(p, c64(32))),
                                            v32i16, 2), v32i32)
                p2 = builder.mul(p, c64(2))
                for t in range(T):
                    xv = builder.load(builder.bitcast(builder.gep(xp, [builder.add(xrow[t], p2)]),
                                                      i32.as_pointer()), align=2)
                    xx = builder.sext(builder.bitcast(_ir_splat(builder, xv, 16), v32i16), v32i32)
                    prod = builder.mul(ws, xx)
                    pair = builder.add(builder.shuffle_vector(prod, prod, even),
                                       builder.shuffle_vector(prod, prod, odd))
                    builder.store(builder.add(builder.load(accs[t]), pair), accs[t])
            dv = _ir_vload(builder, _ir_data(context, builder, aty[6], da, f32), do_, v16f, 4)
            xdp = _ir_data(context, builder, aty[8], xda, f32)
            ap = _ir_data(context, builder, aty[11], aa, f32)
            for t in range(T):
                xdt = builder.load(builder.gep(xdp, [builder.add(xdo_, builder.mul(xds_, c64(t)))]))
                scale = builder.fmul(dv, _ir_splat(builder, xdt, 16))
                ao_t = builder.add(ao_, c64(16 * t))
                old = _ir_vload(builder, ap, ao_t, v16f, 4)
                new = builder.fadd(old, builder.fmul(builder.sitofp(builder.load(accs[t]), v16f), scale))
                _ir_vstore(builder, new, ap, ao_t, 4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


def _min_tile_intrinsic(T):
    """f(mn, G, xs, xso, xsstride, acc, ao): for t < T, lanes a < 16,
    acc[ao + 16t + a] += sum over g < G of mn[16g + a] * xs[xso + t*xsstride + g]
    (float32; the formats' minimums).  The T row sums are T independent chains in
    registers: one chain per row, g by g, was a latency-bound serial sum that
    cost Q4_K a third of its int16 matmul speed (216 vs Q6_K's 300 GMAC/s)."""

    @intrinsic
    def tile(typingctx, mn, G, xs, xso, xsstride, acc, ao):
        sig = types.void(mn, G, xs, xso, xsstride, acc, ao)

        def codegen(context, builder, signature, args):
            ma, g_n, xa, xso_, xss_, aa, ao_ = args
            aty = signature.args
            i64, f32 = llir.IntType(64), llir.FloatType()
            v16f = llir.VectorType(f32, 16)
            c64 = lambda k: llir.Constant(i64, k)  # noqa: E731
            mp = _ir_data(context, builder, aty[0], ma, f32)
            xp = _ir_data(context, builder, aty[2], xa, f32)
            ap = _ir_data(context, builder, aty[5], aa, f32)
            sums = [cgutils.alloca_once_value(builder, _ir_vload(builder, ap, builder.add(ao_, c64(16 * t)), v16f, 4))
                    for t in range(T)]
            xrow = [builder.add(xso_, builder.mul(xss_, c64(t))) for t in range(T)]
            with cgutils.for_range(builder, g_n) as gl:
                g = gl.index
                mv = _ir_vload(builder, mp, builder.mul(g, c64(16)), v16f, 4)
                for t in range(T):
                    xg = _ir_splat(builder, builder.load(builder.gep(xp, [builder.add(xrow[t], g)])), 16)
                    builder.store(builder.fadd(builder.load(sums[t]), builder.fmul(mv, xg)), sums[t])
            for t in range(T):
                _ir_vstore(builder, builder.load(sums[t]), ap, builder.add(ao_, c64(16 * t)), 4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_i16_tile = _i16_tile_intrinsic(_I16_T)
_min_tile = _min_tile_intrinsic(_I16_T)


_I16_TYPES = frozenset({GGML_Q4_0, GGML_Q4_1, GGML_Q5_0, GGML_Q5_1, GGML_Q8_0, GGML_Q4_K,
                        GGML_Q5_K, GGML_Q6_K, GGML_IQ4_NL, GGML_IQ4_XS, GGML_Q2_K,
                        GGML_Q3_K})  # _has_i16, for Python


@njit(cache=True, inline="always")
def _has_i16(type_id):
    return (type_id == GGML_Q4_0 or type_id == GGML_Q4_1 or type_id == GGML_Q5_0
            or type_id == GGML_Q5_1 or type_id == GGML_Q8_0 or type_id == GGML_Q4_K
            or type_id == GGML_Q5_K or type_id == GGML_Q6_K or type_id == GGML_IQ4_NL
            or type_id == GGML_IQ4_XS or type_id == GGML_Q2_K or type_id == GGML_Q3_K)


# Weight tiles.  Each of the tile's rows is decoded into a row-major scratch
# tmp[row][256] by vector IR (one block body per format, integers with the
# sub-block scales folded in), then tmp, seen as int32 column pairs [16][128], is
# transposed into the tile's [pair][row] order 16 x 16 at a time with shuffles.
# The float block scales and the minimums come from the numba part (_dec16).

@intrinsic
def _tile_transpose(typingctx, tmp, wb, P):
    """wb as int32 [pair][16 rows] <- tmp as int32 [16 rows][128 pairs], pairs < P
    (a multiple of 16): 16 x 16 blocks, each transposed in registers by four rounds
    of two-vector shuffles (round b swaps the off-diagonal b x b sub-blocks)."""
    sig = types.void(tmp, wb, P)

    def codegen(context, builder, signature, args):
        ta, wa, p_n = args
        v16 = llir.VectorType(_I32, 16)
        tp = _ir_data(context, builder, signature.args[0], ta, _I32)
        wp = _ir_data(context, builder, signature.args[1], wa, _I32)
        with cgutils.for_range(builder, builder.udiv(p_n, llir.Constant(p_n.type, 16))) as loop:
            p0 = builder.mul(builder.sext(loop.index, _I64) if loop.index.type.width < 64 else loop.index, _c64(16))
            r = [_ir_vload(builder, tp, builder.add(_c64(128 * a), p0), v16, 4) for a in range(16)]
            for b in (8, 4, 2, 1):
                lo = _vc(_I32, 16, [l if not l & b else 16 + (l ^ b) for l in range(16)])
                hi = _vc(_I32, 16, [l ^ b if not l & b else 16 + l for l in range(16)])
                for i in range(16):
                    if not i & b:
                        r[i], r[i | b] = (builder.shuffle_vector(r[i], r[i | b], lo),
                                          builder.shuffle_vector(r[i], r[i | b], hi))
            for a in range(16):
                _ir_vstore(builder, r[a], wp, builder.mul(builder.add(p0, _c64(a)), _c64(16)), 4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def _dec16(type_id, w, c0, m, tmp, a, dsc, mn):
    """Columns c0..c0+m-1 (c0 a multiple of 256) of weight row w into tmp[256a:]
    as int16 with sub-block scales folded in; dsc[s, a] = float scale of the s-th
    32 (legacy) or 256 (k-quant) columns; mn[g, a] = float offset added to every
    weight of the g-th 16 columns (0 for formats without a minimum)."""
    o = 256 * a
    if type_id == GGML_Q4_K or type_id == GGML_Q5_K:
        five = type_id == GGML_Q5_K
        bsz = 176 if five else 144
        blk = w[(c0 // 256) * bsz:(c0 // 256) * bsz + bsz]
        dsc[0, a] = _f16(blk, 0)
        dmin = _f16(blk, 2)
        for j in range(8):
            mi = _k_scale_min(blk, 4, j)[1]
            mn[2 * j, a] = mn[2 * j + 1, a] = -(dmin * np.float32(mi))
        if five:
            _d16_q5_k(w, c0 // 256, 1, tmp, o)
        else:
            _d16_q4_k(w, c0 // 256, 1, tmp, o)
    elif type_id == GGML_Q6_K:
        dsc[0, a] = _f16(w, (c0 // 256) * 210 + 208)
        _d16_q6_k(w, c0 // 256, 1, tmp, o)
    elif type_id == GGML_IQ4_XS:
        dsc[0, a] = _f16(w, (c0 // 256) * 136)
        _d16_iq4_xs(w, c0 // 256, 1, tmp, o)
    elif type_id == GGML_Q2_K:
        b = (c0 // 256) * 84
        dsc[0, a] = _f16(w, b + 80)
        dmin = _f16(w, b + 82)
        for g in range(16):
            mn[g, a] = -(dmin * np.float32(w[b + g] >> 4))
        _d16_q2_k(w, c0 // 256, 1, tmp, o)
    elif type_id == GGML_Q3_K:
        dsc[0, a] = _f16(w, (c0 // 256) * 110 + 108)
        _d16_q3_k(w, c0 // 256, 1, tmp, o)
    else:  # legacy blocks of 32
        b0 = c0 // 32
        nb = m // 32
        if type_id == GGML_Q8_0:
            for b in range(nb):
                dsc[b, a] = _f16(w, (b0 + b) * 34)
            _d16_q8_0(w, b0, nb, tmp, o)
        elif type_id == GGML_Q4_1:
            for b in range(nb):
                dsc[b, a] = _f16(w, (b0 + b) * 20)
                mn[2 * b, a] = mn[2 * b + 1, a] = _f16(w, (b0 + b) * 20 + 2)
            _d16_q4_1(w, b0, nb, tmp, o)
        elif type_id == GGML_Q5_0:
            for b in range(nb):
                dsc[b, a] = _f16(w, (b0 + b) * 22)
            _d16_q5_0(w, b0, nb, tmp, o)
        elif type_id == GGML_Q5_1:
            for b in range(nb):
                dsc[b, a] = _f16(w, (b0 + b) * 24)
                mn[2 * b, a] = mn[2 * b + 1, a] = _f16(w, (b0 + b) * 24 + 2)
            _d16_q5_1(w, b0, nb, tmp, o)
        elif type_id == GGML_IQ4_NL:
            for b in range(nb):
                dsc[b, a] = _f16(w, (b0 + b) * 18)
            _d16_iq4_nl(w, b0, nb, tmp, o)
        else:
            for b in range(nb):
                dsc[b, a] = _f16(w, (b0 + b) * 18)
            _d16_q4_0(w, b0, nb, tmp, o)


@njit(cache=True, inline="always")
def _has_min(type_id):
    return (type_id == GGML_Q4_K or type_id == GGML_Q5_K or type_id == GGML_Q4_1 or type_id == GGML_Q5_1
            or type_id == GGML_Q2_K)


@njit(cache=True, inline="always")
def _i16_tile_rows(type_id, W, i0, k, xq, xd, xs, n_pad, tmp, wb, dsc, mn, acc):
    """acc[:n_pad, :k] = xq-rounded X @ dequant(W[i0:i0+k]).T: one tile of k <= 16 rows."""
    cols = xq.shape[1]
    n_chunks = xd.shape[1]
    T = _I16_T
    sb = _block_size_nb(type_id)  # columns per float scale: 32 or 256
    acc[:, :] = 0.0
    for ch in range(n_chunks):
        c0 = 256 * ch
        m = min(256, cols - c0)
        for a in range(k):
            _dec16(type_id, W[i0 + a], c0, m, tmp, a, dsc, mn)
        if k < _I16_ROWS:  # a short last tile: zero rows, outputs dropped
            tmp[256 * k:] = 0
            dsc[:, k:] = 0.0
            mn[:, k:] = 0.0
        _tile_transpose(tmp, wb, m // 2)  # m is a multiple of 32
        for t0 in range(0, n_pad, T):
            for s in range(m // sb):
                _i16_tile(wb, s * (sb // 2) * 2 * _I16_ROWS, sb // 2, xq, t0 * cols + c0 + s * sb,
                          cols, dsc, s * _I16_ROWS, xd, t0 * n_chunks + ch, n_chunks,
                          acc, t0 * _I16_ROWS)
            if _has_min(type_id):
                _min_tile(mn, m // 16, xs, t0 * (cols // 16) + c0 // 16, cols // 16,
                          acc, t0 * _I16_ROWS)


@njit(parallel=True, cache=True, fastmath=_FM)
def quantize_x16_rows(X):
    """X [n, cols] rounded for the int16 tiles (quantize_x16 per row), padded with zero
    rows to a multiple of the tile's _I16_T rows: (xq, xd, xs).  Once per X, however
    many matrices then multiply it (Q, K and V; gate and up)."""
    n = X.shape[0]
    cols = X.shape[1]
    n_pad = (n + _I16_T - 1) // _I16_T * _I16_T
    xq = np.zeros((n_pad, cols), np.int16)
    xd = np.zeros((n_pad, (cols + 255) // 256), np.float32)
    xs = np.zeros((n_pad, cols // 16), np.float32)
    for r in prange(n):
        quantize_x16(X[r], xq[r], xd[r], xs[r])
    return xq, xd, xs


@njit(cache=True, inline="always")
def _i16_body(type_id, W, xq, xd, xs, out):
    """out = X @ dequant(W).T through int16 tiles (see above), X as quantize_x16_rows
    gave it (out has X's n rows); 16-row tiles shared out over the threads."""
    n = out.shape[0]
    n_pad = xq.shape[0]
    R = _I16_ROWS
    n_tiles = (W.shape[0] + R - 1) // R
    n_tasks = min(n_tiles, _N_TASKS)
    bounds = _shares(n_tasks, n_tiles)
    for task in prange(n_tasks):
        tmp = np.zeros(R * 256, np.int16)
        wb = np.zeros((128, R, 2), np.int16)
        dsc = np.zeros((8, R), np.float32)
        mn = np.zeros((16, R), np.float32)
        acc = np.empty((n_pad, R), np.float32)
        for tile in range(bounds[task], bounds[task + 1]):
            i0 = tile * R
            k = min(R, W.shape[0] - i0)
            _i16_tile_rows(type_id, W, i0, k, xq, xd, xs, n_pad, tmp, wb, dsc, mn, acc)
            out[:, i0:i0 + k] = acc[:n, :k]


# ---------------------------------------------------------------------------
# Each format's own compiled kernels.  kernels(T) builds them for one type id
# T: closures over the constant T around the format-generic bodies above, so
# that numba compiles T's branch of every dispatch chain and nothing else (a
# model in Q4_1 never compiles the k-quants).  numba caches each closure under
# its captured T.
#
# The engine's compiled forward pass calls them through their addresses (the
# KERNEL_* columns of a matrix's entry, see kernel_addresses), not by name: a
# call by name would link every format's code into the forward pass and compile
# it there again, once per entry.  So the forward pass compiles once, whatever
# the formats, and a format's kernels compile when a model first uses them.
# Their signatures are fixed (SIG_*) and checked where the calls are typed.
# ---------------------------------------------------------------------------

class Kernels(NamedTuple):
    dequantize: object   # (type_id, src, n_blocks, dst): n_blocks blocks to float32
    fused: object        # (type_id, W, X, out, act_q8): one fused row dot per output
    chunked: object      # (type_id, W, X, out): each weight chunk decoded once for all rows
    i16: object          # (type_id, W, xq, xd, xs, out): int16 tiles (quantize_x16_rows)


@functools.cache
def kernels(type_id: int) -> Kernels:
    """The compiled kernels of one format (built on first use, compiled on first call).
    Every kernel takes the type id first (unused: it is T) so that all formats'
    kernels have one signature."""
    T = int(type_id)
    _traits(T)

    def jit(f, **options):
        # One name per format.  numba names a compiled function after its qualified
        # name and a per-process counter (fusedB2v1...), and a cached one keeps the
        # name it was compiled under: two formats' kernels compiled first in two
        # processes (one helper each, a model each) got the same symbol, and a
        # process that loaded both from the cache called one format's code for the
        # other (the first definition of a symbol wins).
        f.__qualname__ = f"{f.__qualname__}_{type_name(T).lower()}"
        return njit(parallel=True, cache=True, **options)(f)

    def dequantize(type_id, src, n_blocks, dst):
        _dequantize_body(T, src, n_blocks, dst)

    def fused(type_id, W, X, out, act_q8):
        _fused_body(T, W, X, out, act_q8)

    def chunked(type_id, W, X, out):
        _chunked_body(T, W, X, out)

    def i16(type_id, W, xq, xd, xs, out):
        _i16_body(T, W, xq, xd, xs, out)

    return Kernels(jit(dequantize), jit(fused), jit(chunked),
                   jit(i16, fastmath=_FM) if T in _I16_TYPES else None)


_W2 = types.Array(types.uint8, 2, "C", readonly=True)  # weight rows in the mapped file
_F2 = types.Array(types.float32, 2, "C")
SIG_FUSED = types.void(types.int64, _W2, _F2, _F2, types.boolean)
SIG_CHUNKED = types.void(types.int64, _W2, _F2, _F2)
SIG_I16 = types.void(types.int64, _W2, types.Array(types.int16, 2, "C"), _F2, _F2, _F2)

# Columns of kernel_addresses (and of the engine's per-matrix kernel table).
KERNEL_FUSED, KERNEL_CHUNKED, KERNEL_I16 = range(3)


def _address(kernel, sig) -> int:
    """Entry address of kernel compiled for sig (numba's C-callable wrapper of it)."""
    kernel.compile(sig)
    cres = kernel.overloads[sig.args]
    return cres.library.get_pointer_to_function(cres.fndesc.llvm_cfunc_wrapper_name)


@functools.cache
def kernel_addresses(type_id: int, chunked: bool = True) -> tuple[int, int, int]:
    """(fused, chunked, i16) entry addresses of one format's kernels, compiling them
    (or loading them from numba's cache) on first use; i16 is 0 for a format
    without int16 tiles.  chunked False: 0 in its place where the format has
    tiles (integer activations never take it then; float32 ones, precision
    "exact" and inspection, do).  The kernels stay alive in kernels()'s cache."""
    k = kernels(type_id)
    return (_address(k.fused, SIG_FUSED),
            _address(k.chunked, SIG_CHUNKED) if chunked or k.i16 is None else 0,
            _address(k.i16, SIG_I16) if k.i16 is not None else 0)


def _cached(kernel, sig) -> bool:
    """Whether numba's disk cache already holds kernel compiled for sig (so that
    kernel_addresses would load it, not compile it)."""
    try:
        return sig.args in kernel.overloads or kernel._cache.load_overload(sig, kernel.targetctx) is not None
    except Exception:  # numba internals moved: say "not cached", which only costs time
        return False


def _jobs(type_ids):
    """(kernel, signature) of every kernel kernel_addresses(t, chunked=False)
    compiles for these formats (what a fast-precision model links)."""
    out = []
    for t in sorted({int(t) for t in type_ids}):
        k = kernels(t)
        out += [(k.fused, SIG_FUSED)] + ([(k.i16, SIG_I16)] if k.i16 else [(k.chunked, SIG_CHUNKED)])
    return out


def uncompiled(type_ids) -> list[int]:
    """The formats among type_ids whose kernel_addresses are not in numba's cache yet."""
    return [t for t in sorted({int(t) for t in type_ids}) if not all(_cached(f, s) for f, s in _jobs([t]))]


_SIG_DEQUANTIZE = types.void(types.int64, types.Array(types.uint8, 1, "C", readonly=True), types.int64,
                             types.Array(types.float32, 1, "C"))  # dequantize()'s call


def dequantize_cached(type_id: int) -> bool:
    return int(type_id) == GGML_F32 or _cached(kernels(type_id).dequantize, _SIG_DEQUANTIZE)


def compile_kernels(type_ids, dequantize_ids=(), reverse: bool = False) -> None:
    """Compile these formats' kernels (and dequantize for dequantize_ids) into
    numba's cache, skipping what is there already; two processes sharing the work
    go in opposite orders (reverse) and so duplicate at most the kernel where they
    meet."""
    jobs = [(kernels(t).dequantize, _SIG_DEQUANTIZE) for t in dequantize_ids] + _jobs(type_ids)
    for kernel, sig in reversed(jobs) if reverse else jobs:
        if not _cached(kernel, sig):
            kernel.compile(sig)


def compile_in_background(type_ids, dequantize_ids=()):
    """Start a process that compiles these formats' kernels into numba's cache (the
    same directory as ours) and return it (a subprocess.Popen), or None on a
    one-core machine.  numba compiles on one thread; with this, the kernels
    compile while this process compiles the forward pass that calls them (and
    then takes the rest of them from the other end: compile_kernels)."""
    import os
    import subprocess
    import sys

    import numba.core.config

    if not (type_ids or dequantize_ids) or (os.cpu_count() or 1) < 2:
        return None
    ids, deq = sorted(int(t) for t in type_ids), [int(t) for t in dequantize_ids]
    code = f"from runtime import quant; quant.compile_kernels({ids}, {deq})"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(numba.core.config.CACHE_DIR))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        return subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None


def _pointer_call(sig):
    """An intrinsic f(address, *args) that calls the kernel compiled for sig at that
    address.  The arguments must have sig's types exactly (a mismatch is a typing
    error here, never a wrong call at run time)."""

    def typer(addr, args):
        got = tuple(types.unliteral(a) for a in args)
        if got != sig.args:
            raise errors.TypingError(f"kernel call with {got}, the kernel takes {sig.args}")
        return types.void(types.int64, *sig.args)

    def codegen(context, builder, signature, args):
        fnty = llir.FunctionType(context.get_value_type(sig.return_type),
                                 [context.get_value_type(t) for t in sig.args])
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), args[1:])
        return context.get_dummy_value()

    return typer, codegen


_fused_typer, _fused_codegen = _pointer_call(SIG_FUSED)
_chunked_typer, _chunked_codegen = _pointer_call(SIG_CHUNKED)
_i16_typer, _i16_codegen = _pointer_call(SIG_I16)


@intrinsic
def _call_fused(typingctx, addr, type_id, W, X, out, act_q8):
    return _fused_typer(addr, (type_id, W, X, out, act_q8)), _fused_codegen


@intrinsic
def _call_chunked(typingctx, addr, type_id, W, X, out):
    return _chunked_typer(addr, (type_id, W, X, out)), _chunked_codegen


@intrinsic
def _call_i16(typingctx, addr, type_id, W, xq, xd, xs, out):
    return _i16_typer(addr, (type_id, W, xq, xd, xs, out)), _i16_codegen


# ---------------------------------------------------------------------------
# matmul: out = X @ dequant(W).T, from the engine's compiled code (the *_at
# forms, given the matrix's type id and kernel addresses k = kernel_addresses)
# and from Python (any supported type id).  W: uint8 (rows, row_nbytes) of
# type_id blocks, C order, read-only (as GGUFFile.raw gives it); X: float32
# (n, cols), C order; out: float32 (n, rows).  Nothing is validated here (the
# Python wrappers below do).
#
# matmul keeps float32 activations: for n <= FUSED_MAX_N every product is a
# fused row dot straight from the blocks; for larger n (batched prefill) each
# 256-weight chunk of a row is decoded once into a thread-local buffer and
# dotted with all n rows.  matmul_q8 rounds them as llama.cpp does: products of
# up to Q8_MAX_ROWS rows (decode, one row per sequence) use 8-bit activations
# where the format has an integer kernel (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
# Q5_K, Q6_K, IQ4_NL, IQ4_XS), each row rounded and summed exactly as it would
# be alone, each weight block unpacked once for all of them.  Formats without
# one also take every row of such a product through the one-row kernel, so
# that a row's result never depends on how many rows share the step (the
# server's batch invariance).  Batches of I16_MIN_N rows or more go through the
# int16 tiles.  Two separate parallel kernels, not one loop body with both
# paths: with the chunked path's buffers in the same parallel region the decode
# matvecs ran at half speed on two threads (measured, tools/PERF.md).
# ---------------------------------------------------------------------------

@njit(cache=True)
def matmul_at(type_id, k, W, X, out):
    if X.shape[0] <= FUSED_MAX_N:
        _call_fused(k[KERNEL_FUSED], type_id, W, X, out, False)
    else:
        _call_chunked(k[KERNEL_CHUNKED], type_id, W, X, out)


@njit(cache=True)
def matmul_q8_at(type_id, k, W, X, out):
    n = X.shape[0]
    if n <= max(FUSED_MAX_N, Q8_MAX_ROWS):
        _call_fused(k[KERNEL_FUSED], type_id, W, X, out, True)
    elif _has_i16(type_id) and n >= I16_MIN_N:
        xq, xd, xs = quantize_x16_rows(X)
        _call_i16(k[KERNEL_I16], type_id, W, xq, xd, xs, out)
    else:
        _call_chunked(k[KERNEL_CHUNKED], type_id, W, X, out)


@njit(cache=True)
def matmul3_q8_at(t0, k0, W0, t1, k1, W1, t2, k2, W2, X, out0, out1, out2):
    """matmul_q8 of one X by three matrices (Q, K, V; or gate and up with W2 of zero
    rows): batches through the int16 tiles round X once for all three.  A single
    row takes three launches: one loop over the rows of all three matrices ran
    1.4-2.3x slower per row, even on one thread (SmolLM2 gate + up 82 us vs
    2 x 19 us), and a launch costs about 1 us."""
    if _has_i16(t0) and _has_i16(t1) and _has_i16(t2) and X.shape[0] >= I16_MIN_N:
        xq, xd, xs = quantize_x16_rows(X)
        _call_i16(k0[KERNEL_I16], t0, W0, xq, xd, xs, out0)
        _call_i16(k1[KERNEL_I16], t1, W1, xq, xd, xs, out1)
        if W2.shape[0] > 0:
            _call_i16(k2[KERNEL_I16], t2, W2, xq, xd, xs, out2)
    else:
        matmul_q8_at(t0, k0, W0, X, out0)
        matmul_q8_at(t1, k1, W1, X, out1)
        if W2.shape[0] > 0:
            matmul_q8_at(t2, k2, W2, X, out2)


def matmul(type_id: int, W: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    """out = X @ dequant(W).T with float32 activations (see above; unchecked)."""
    k = kernels(type_id)
    if X.shape[0] <= FUSED_MAX_N:
        k.fused(type_id, W, X, out, False)
    else:
        k.chunked(type_id, W, X, out)


def matmul_q8(type_id: int, W: np.ndarray, X: np.ndarray, out: np.ndarray) -> None:
    """out = X @ dequant(W).T with integer activations as llama.cpp (see above; unchecked)."""
    k = kernels(type_id)
    n = X.shape[0]
    if n <= max(FUSED_MAX_N, Q8_MAX_ROWS):
        k.fused(type_id, W, X, out, True)
    elif k.i16 is not None and n >= I16_MIN_N:
        k.i16(type_id, W, *quantize_x16_rows(X), out)
    else:
        k.chunked(type_id, W, X, out)


# ---------------------------------------------------------------------------
# Python API (validation lives here, the kernels trust their input)
# ---------------------------------------------------------------------------

def _as_u8_readonly(a: np.ndarray, ndim: int) -> np.ndarray:
    """uint8, C-contiguous, read-only: the one array type the kernels are compiled
    for (GGUFFile.raw gives exactly this, so the engine shares the specialisation)."""
    a = np.ascontiguousarray(a)
    if a.dtype != np.uint8:
        a = a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(np.uint8).reshape(a.shape[:-1] + (-1,))
    if a.ndim != ndim:
        a = a.reshape(-1) if ndim == 1 else a.reshape(a.shape[0] if a.ndim else 1, -1)
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def dequantize(raw: np.ndarray, type_id: int, shape) -> np.ndarray:
    """Decode `raw` (the tensor's bytes, any shape) into float32 of `shape`."""
    name, bs, ts = _traits(type_id)
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if shape and shape[-1] % bs:
        raise ValueError(f"{name}: row length {shape[-1]} is not a multiple of the block size {bs}")
    n_blocks = n // bs
    src = _as_u8_readonly(raw, 1)
    if src.size != n_blocks * ts:
        raise ValueError(f"{name}: {src.size} bytes given, {n_blocks * ts} needed for shape {shape}")
    if int(type_id) == GGML_F32:  # the bytes are the values: no kernel to compile
        return src.view("<f4").astype(np.float32).reshape(shape)
    out = np.empty(n, np.float32)
    if n_blocks:
        kernels(type_id).dequantize(int(type_id), src, n_blocks, out)
    return out.reshape(shape)


def _check_matrix(type_id: int, W: np.ndarray, cols: int) -> np.ndarray:
    name, bs, ts = _traits(type_id)
    if cols % bs:
        raise ValueError(f"{name}: {cols} columns is not a multiple of the block size {bs}")
    W = _as_u8_readonly(W, 2)
    if W.shape[1] != cols // bs * ts:
        raise ValueError(f"{name}: weight rows have {W.shape[1]} bytes, "
                         f"{cols // bs * ts} expected for {cols} columns")
    return W


def matvec(type_id: int, W: np.ndarray, x: np.ndarray) -> np.ndarray:
    """dequant(W) @ x for W uint8 (rows, row_nbytes), x float32 (cols,)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(1, -1)
    W = _check_matrix(type_id, W, x.shape[1])
    out = np.empty((1, W.shape[0]), np.float32)
    matmul(int(type_id), W, x, out)
    return out[0]


def dot(type_id: int, block_row: np.ndarray, x: np.ndarray) -> float:
    """dequant(block_row) . x for one row of blocks (uint8 1-D)."""
    return float(matvec(type_id, np.asarray(block_row).reshape(1, -1), x)[0])
