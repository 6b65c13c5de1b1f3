"""Transformer math as numba kernels, named after the math (see dnn-math-reference.txt).

Activations are float32 row-major [n_tokens, features]; reductions accumulate in
float64 (as ggml does for norms and softmax sums).  The KV cache is either float32
or IEEE half stored as uint16 bits (numba has no CPU float16); the ``_kv_f32`` /
``_kv_store`` overloads pick the conversion at compile time, so one attention
kernel serves both cache types.
"""

from __future__ import annotations

import math

import llvmlite.ir as llir
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .quant.ir import _bits_as_f32, _f32_as_bits, _half_as_f32, _ir_data, _ir_splat, _ir_vload, _ir_vstore

__all__ = ["rms_norm", "rope", "attention", "swiglu", "geglu", "softmax", "add", "rope_inv_freq",
           "f32_to_f16_bits"]


@njit(cache=True, inline="always")
def f32_to_f16_bits(v):
    """float32 -> IEEE half bits, round to nearest even (numpy's astype(float16))."""
    x = _f32_as_bits(np.float32(v))
    sign = (x >> np.uint32(16)) & np.uint32(0x8000)
    a = x & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):  # inf / nan
        return np.uint16(sign | np.uint32(0x7C00) | (np.uint32(0x200) if a > np.uint32(0x7F800000) else np.uint32(0)))
    if a >= np.uint32(0x477FF000):  # rounds past 65504
        return np.uint16(sign | np.uint32(0x7C00))
    if a < np.uint32(0x38800000):  # half subnormal: multiples of 2**-24, exact scaling
        h = np.uint32(np.int64(np.rint(np.float64(_bits_as_f32(a)) * 16777216.0)))
        return np.uint16(sign | h)
    mant = a & np.uint32(0x7FFFFF)
    h = ((((a >> np.uint32(23)) - np.uint32(112)) << np.uint32(10)) | (mant >> np.uint32(13)))
    rem = mant & np.uint32(0x1FFF)
    if rem > np.uint32(0x1000) or (rem == np.uint32(0x1000) and (h & np.uint32(1))):
        h += np.uint32(1)
    return np.uint16(sign | h)


_FM = {"reassoc", "contract", "nsz", "arcp", "afn"}


@njit(cache=True, inline="always", fastmath=_FM)
def exp_f32(x):
    """e^x in float32 from arithmetic alone, so that loops over it vectorise
    (math.exp is a scalar libm call: 3.2 ns per value against 0.1 ns here).

    x = n ln2 + r, |r| <= ln2/2 (ln2 split in two for an exact n ln2), e^r by its
    degree-6 Taylor polynomial, 2^n written into the exponent bits.  Relative
    error <= 2.3e-7 (2 ulp); x is clamped to [-87, 88], the normal float range.
    """
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _bits_as_f32(np.uint32((np.int32(n) + np.int32(127)) << np.int32(23)))


def _kv_f32(v):
    pass


@overload(_kv_f32)
def _kv_f32_impl(v):
    """One cache element as float32: half bits by the hardware conversion
    (exact, and it vectorises), float32 as it is."""
    if v == types.uint16:
        return lambda v: _half_as_f32(v)
    return lambda v: np.float32(v)


def _kv_store(cache, t, g, j, v):
    pass


@overload(_kv_store)
def _kv_store_impl(cache, t, g, j, v):
    if cache.dtype == types.uint16:
        def impl(cache, t, g, j, v):
            cache[t, g, j] = f32_to_f16_bits(v)
        return impl

    def impl32(cache, t, g, j, v):
        cache[t, g, j] = v
    return impl32


# rms_norm / swiglu are O(n*d), tiny next to the matmuls: serial, because every
# parallel region costs a thread wake-up per layer per token in decode.
@njit(cache=True)
def rms_norm(x, w, eps, out):
    """out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w   (x, out: [n, d])."""
    n, d = x.shape
    for i in range(n):
        ss = 0.0
        for j in range(d):
            ss += np.float64(x[i, j]) * x[i, j]
        r = np.float32(1.0 / math.sqrt(ss / d + eps))
        for j in range(d):
            out[i, j] = (x[i, j] * r) * w[j]


@njit(cache=True)
def rms_norm_heads(x, n_heads, head_dim, w, eps):
    """In place RMSNorm of every head slice x[i, h*hd:(h+1)*hd] with weights w[hd] (Qwen3 QK-norm)."""
    n = x.shape[0]
    for i in range(n):
        for h in range(n_heads):
            o = h * head_dim
            ss = 0.0
            for j in range(head_dim):
                ss += np.float64(x[i, o + j]) * x[i, o + j]
            r = np.float32(1.0 / math.sqrt(ss / head_dim + eps))
            for j in range(head_dim):
                x[i, o + j] = (x[i, o + j] * r) * w[j]


def rope_inv_freq(n_rot: int, base: float, freq_scale: float = 1.0) -> np.ndarray:
    """theta_i = pos * freq_scale * base^(-2i/n_rot), i < n_rot/2 (linear scaling = freq_scale)."""
    i = np.arange(n_rot // 2, dtype=np.float64)
    return freq_scale * base ** (-2.0 * i / n_rot)


@njit(cache=True)
def rope_table(pos, inv_freq):
    """cos and sin of theta = pos[t] * inv_freq[i] as float32 [2, n, n_rot/2]
    (angles in float64).  Every layer rotates by the same angles, so the engine
    builds this once per step instead of calling cos and sin in each layer."""
    n = pos.shape[0]
    half = inv_freq.shape[0]
    cs = np.empty((2, n, half), np.float32)
    for t in range(n):
        p = np.float64(pos[t])
        for i in range(half):
            th = p * inv_freq[i]
            cs[0, t, i] = np.float32(math.cos(th))
            cs[1, t, i] = np.float32(math.sin(th))
    return cs


@njit(cache=True)
def rope_rotate(x, n_heads, head_dim, cs, neox):
    """Rotate pairs of each head of x[n, n_heads*head_dim] in place by the angles
    of cs = rope_table(pos, inv_freq).

    "normal" (llama) style pairs (2i, 2i+1); NEOX (qwen) style pairs (i, i + n_rot/2).
    Dimensions past n_rot = 2*len(inv_freq) are left as they are.
    """
    n = x.shape[0]
    half = cs.shape[2]
    # The rotary width comes from the file: never index past a head or the row.
    if 2 * half > head_dim or n_heads * head_dim > x.shape[1] or cs.shape[1] < n:
        raise ValueError("rope: rotary width or head layout does not fit the activations")
    for t in range(n):
        for i in range(half):
            c = cs[0, t, i]
            s = cs[1, t, i]
            for h in range(n_heads):
                o = h * head_dim
                if neox:
                    ia = o + i
                    ib = o + i + half
                else:
                    ia = o + 2 * i
                    ib = ia + 1
                a = x[t, ia]
                b = x[t, ib]
                x[t, ia] = a * c - b * s
                x[t, ib] = a * s + b * c


@njit(cache=True)
def rope(x, n_heads, head_dim, pos, inv_freq, neox):
    """Rotate the heads of x[n, n_heads*head_dim] in place by pos * inv_freq
    (rope_table, then rope_rotate)."""
    rope_rotate(x, n_heads, head_dim, rope_table(pos, inv_freq), neox)


@njit(cache=True)
def kv_write(k, v, k_cache, v_cache, n_past, n_kv_heads, head_dim_k, head_dim_v):
    """Append rows k[n, kvh*hdk], v[n, kvh*hdv] at positions n_past.. of the layer's cache.

    Position t lives in cell t % cells: a full-context cache (cells = n_ctx > every
    position) is indexed by position; a sliding-window layer's ring of window +
    one batch cells overwrites the positions no later query can see."""
    cells = k_cache.shape[0]
    for i in range(k.shape[0]):
        t = (n_past + i) % cells
        for g in range(n_kv_heads):
            for j in range(head_dim_k):
                _kv_store(k_cache, t, g, j, k[i, g * head_dim_k + j])
            for j in range(head_dim_v):
                _kv_store(v_cache, t, g, j, v[i, g * head_dim_v + j])


@njit(cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _score_row(qv, k_cache, g, L, scale, sc):
    """sc[t] = scale * (q . K[t]) for t < L."""
    hdk = qv.shape[0]
    for t in range(L):
        kr = k_cache[t, g]
        s = np.float32(0.0)
        for j in range(hdk):
            s += qv[j] * _kv_f32(kr[j])
        sc[t] = s * scale


@njit(cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _weighted_values(p, v_cache, g, L, acc):
    """acc = sum_t p[t] * V[t] (acc zeroed here)."""
    hdv = acc.shape[0]
    for j in range(hdv):
        acc[j] = 0.0
    for t in range(L):
        vr = v_cache[t, g]
        pt = p[t]
        for j in range(hdv):
            acc[j] += pt * _kv_f32(vr[j])


@njit(cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _weighted_values4(p, v_cache, g, L, acc):
    """acc[a] = sum_t p[a, t] * V[t] for four queries (p[a, t] = 0 past query a's end)."""
    hdv = acc.shape[1]
    acc[:, :] = 0.0
    a0 = acc[0]
    a1 = acc[1]
    a2 = acc[2]
    a3 = acc[3]
    for t in range(L):
        vr = v_cache[t, g]
        p0 = p[0, t]
        p1 = p[1, t]
        p2 = p[2, t]
        p3 = p[3, t]
        for j in range(hdv):
            v = _kv_f32(vr[j])
            a0[j] += p0 * v
            a1[j] += p1 * v
            a2[j] += p2 * v
            a3[j] += p3 * v


@njit(cache=True, inline="always")
def _max_f32(x, L):
    """max(x[:L]) (L >= 1) through float bits mapped to order-preserving int32
    (negatives get their magnitude bits flipped): an integer max vectorises,
    LLVM leaves a float max a scalar chain of 4 cycles per value."""
    m = np.int32(-2147483648)
    for t in range(L):
        b = np.int32(_f32_as_bits(x[t]))
        m = max(m, b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF)))
    return _bits_as_f32(np.uint32(m ^ ((m >> np.int32(31)) & np.int32(0x7FFFFFFF))))


@njit(cache=True, fastmath=_FM)
def _softmax_causal(sc, L):
    """In place softmax of sc[:L] (max subtracted; float64 normaliser); sc[L:] = 0."""
    mx = _max_f32(sc, L)
    tot = 0.0
    for t in range(L):
        e = exp_f32(sc[t] - mx)
        sc[t] = e
        tot += e
    inv = np.float32(1.0 / tot)
    for t in range(L):
        sc[t] *= inv
    for t in range(L, sc.shape[0]):
        sc[t] = 0.0


@njit(cache=True, inline="always")
def _zigzag(k, n):
    """The k-th of 0, n-1, 1, n-2, 2, ...: causal queries in an order whose every
    contiguous run of even length holds as many keys early as late.  numba's
    parallel loops give each thread an equal contiguous run of tasks; in query
    order the thread with the last queries did three times the other's work."""
    return k // 2 if k % 2 == 0 else n - 1 - k // 2


_SCORE_KEYS = 32  # keys per score tile: 4 queries x 2 vectors = 8 independent FMA chains


@intrinsic
def _score_tile(typingctx, kt, kto, kts, q, qo, qs, hd, scale, out, oo, os):
    """Scores of 4 queries x 32 keys as a register tile: for a < 4, l < 32,
    out[oo + a*os + l] = scale * sum over j < hd of q[qo + a*qs + j] * kt[kto + j*kts + l]
    (flat float32 offsets; kt holds K transposed, keys along the vector lanes), so
    no horizontal sum per key: two key-vector loads per 8 multiply-adds, and 8
    accumulators, enough to cover the FMA latency (4 left half of it idle)."""
    sig = types.void(kt, kto, kts, q, qo, qs, hd, scale, out, oo, os)

    def codegen(context, builder, signature, args):
        kta, kto_, kts_, qa, qo_, qs_, hd_, sc_, oa, oo_, os_ = args
        aty = signature.args
        f32, i64 = llir.FloatType(), llir.IntType(64)
        v16 = llir.VectorType(f32, 16)
        kp = _ir_data(context, builder, aty[0], kta, f32)
        qp = _ir_data(context, builder, aty[3], qa, f32)
        op = _ir_data(context, builder, aty[8], oa, f32)
        fm = ("contract", "reassoc")
        accs = [[cgutils.alloca_once_value(builder, llir.Constant(v16, [0.0] * 16)) for _ in range(2)]
                for _ in range(4)]
        qrow = [builder.add(qo_, builder.mul(qs_, llir.Constant(i64, a))) for a in range(4)]
        with cgutils.for_range(builder, hd_) as loop:
            j = loop.index
            krow = builder.add(kto_, builder.mul(j, kts_))
            kv = [_ir_vload(builder, kp, builder.add(krow, llir.Constant(i64, 16 * h)), v16, 4) for h in range(2)]
            for a in range(4):
                qj = _ir_splat(builder, builder.load(builder.gep(qp, [builder.add(qrow[a], j)])), 16)
                for h in range(2):
                    prod = builder.fmul(kv[h], qj, flags=fm)
                    builder.store(builder.fadd(builder.load(accs[a][h]), prod, flags=fm), accs[a][h])
        sv = _ir_splat(builder, sc_, 16)
        for a in range(4):
            for h in range(2):
                _ir_vstore(builder, builder.fmul(builder.load(accs[a][h]), sv), op,
                           builder.add(oo_, builder.add(builder.mul(os_, llir.Constant(i64, a)),
                                                        llir.Constant(i64, 16 * h))), 4)
        return context.get_dummy_value()

    return sig, codegen


_PV_COLS = 64  # value columns per _pv_tile call: 4 queries x 4 vectors = 16 accumulators


@intrinsic
def _pv_tile(typingctx, p, po, ps, v, vo, vs, L, out, oo, os):
    """Weighted sums of value rows for 4 queries x 64 columns, as a register tile:
    for a < 4, c < 64, out[oo + a*os + c] = sum over t < L of
    p[po + a*ps + t] * v[vo + t*vs + c] (flat offsets; v float32 or f16 bits).
    The 16 accumulators stay in registers across all L rows; numba's loop kept
    them in memory, a load and a store per multiply-add."""
    sig = types.void(p, po, ps, v, vo, vs, L, out, oo, os)
    half = v.dtype == types.uint16

    def codegen(context, builder, signature, args):
        pa, po_, ps_, va, vo_, vs_, l_n, oa, oo_, os_ = args
        aty = signature.args
        f32, i16, i64 = llir.FloatType(), llir.IntType(16), llir.IntType(64)
        v16 = llir.VectorType(f32, 16)
        c64 = lambda k: llir.Constant(i64, k)  # noqa: E731
        pp = _ir_data(context, builder, aty[0], pa, f32)
        vp = _ir_data(context, builder, aty[3], va, i16 if half else f32)
        op = _ir_data(context, builder, aty[7], oa, f32)
        fm = ("contract", "reassoc")
        accs = [[cgutils.alloca_once_value(builder, llir.Constant(v16, [0.0] * 16)) for _ in range(4)]
                for _ in range(4)]
        prow = [builder.add(po_, builder.mul(ps_, c64(a))) for a in range(4)]
        with cgutils.for_range(builder, l_n) as loop:
            t = loop.index
            row = builder.add(vo_, builder.mul(t, vs_))
            vv = []
            for k in range(4):
                if half:
                    h = _ir_vload(builder, vp, builder.add(row, c64(16 * k)), llir.VectorType(i16, 16), 2)
                    vv.append(builder.fpext(builder.bitcast(h, llir.VectorType(llir.HalfType(), 16)), v16))
                else:
                    vv.append(_ir_vload(builder, vp, builder.add(row, c64(16 * k)), v16, 4))
            for a in range(4):
                pt = _ir_splat(builder, builder.load(builder.gep(pp, [builder.add(prow[a], t)])), 16)
                for k in range(4):
                    prod = builder.fmul(pt, vv[k], flags=fm)
                    builder.store(builder.fadd(builder.load(accs[a][k]), prod, flags=fm), accs[a][k])
        for a in range(4):
            for k in range(4):
                _ir_vstore(builder, builder.load(accs[a][k]), op,
                           builder.add(oo_, builder.add(builder.mul(os_, c64(a)), c64(16 * k))), 4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def _attend_one(qv, k_cache, v_cache, g, L, scale, sc, out):
    """One query over keys 0..L-1 of KV head g: scores into sc (softmax weights after),
    the weighted values into out.  attention()'s one-query path and attention_rows
    both run it, so a decode row's numbers do not depend on which of them ran it."""
    _score_row(qv, k_cache, g, L, scale, sc)
    _softmax_causal(sc, L)
    acc = np.empty(out.shape[0], np.float32)
    _weighted_values(sc, v_cache, g, L, acc)
    out[:] = acc


@njit(cache=True, parallel=True)
def _attention_blocks(q, k_cache, v_cache, n_past, n_heads, n_kv_heads, scale, out):
    """Prefill attention, four queries per task (n % 4 == 0, no capture): same
    math as attention(), with K converted once per call to float32 and transposed
    (kt[g, j, t]) for 4 x 32 score tiles, and the weighted values as 4 x 64
    register tiles (_pv_tile) that read each V cache row once per four queries."""
    n = q.shape[0]
    hdk = k_cache.shape[2]
    hdv = v_cache.shape[2]
    group = n_heads // n_kv_heads
    nq = n // 4
    n_keys = n_past + n
    kp = (n_keys + _SCORE_KEYS - 1) // _SCORE_KEYS * _SCORE_KEYS
    kt = np.zeros((n_kv_heads, hdk, kp), np.float32)
    for gj in prange(n_kv_heads * hdk):
        g = gj // hdk
        j = gj % hdk
        for t in range(n_keys):
            kt[g, j, t] = _kv_f32(k_cache[t, g, j])
    qcols = q.shape[1]
    for task in prange(nq * n_heads):
        b = _zigzag(task // n_heads, nq)
        h = task % n_heads
        g = h // group
        i0 = 4 * b
        L = n_past + i0 + 4  # keys the last of the four queries sees
        lp = (L + _SCORE_KEYS - 1) // _SCORE_KEYS * _SCORE_KEYS
        sc = np.empty((4, lp), np.float32)
        for t0 in range(0, L, _SCORE_KEYS):
            _score_tile(kt, g * hdk * kp + t0, kp, q, i0 * qcols + h * hdk, qcols, hdk,
                        np.float32(scale), sc, t0, lp)
        for a in range(4):
            _softmax_causal(sc[a], n_past + i0 + a + 1)
        if hdv % _PV_COLS == 0 and v_cache.flags.c_contiguous and out.flags.c_contiguous:
            for c0 in range(0, hdv, _PV_COLS):
                _pv_tile(sc, 0, lp, v_cache, g * hdv + c0, v_cache.shape[1] * hdv, L,
                         out, i0 * out.shape[1] + h * hdv + c0, out.shape[1])
        else:
            acc = np.empty((4, hdv), np.float32)
            _weighted_values4(sc, v_cache, g, L, acc)
            for a in range(4):
                out[i0 + a, h * hdv:(h + 1) * hdv] = acc[a]


@njit(cache=True, parallel=True)
def _attention_window(q, k_cache, v_cache, n_past, n_heads, n_kv_heads, scale, out, capture, n_swa):
    """attention() of a sliding-window layer once some query's window excludes keys:
    the query at position p sees keys p - n_swa < j <= p (llama.cpp's
    is_masked_swa: masked when p - j >= n_swa), found in the ring cache at cell
    j % cells, which is one or two contiguous runs of cells.  One query per task."""
    n = q.shape[0]
    hdk = k_cache.shape[2]
    hdv = v_cache.shape[2]
    cells = k_cache.shape[0]
    group = n_heads // n_kv_heads
    do_capture = capture.shape[0] > 0
    for task in prange(n * n_heads):
        i = _zigzag(task // n_heads, n)
        h = task % n_heads
        g = h // group
        p = n_past + i
        lo = max(0, p - n_swa + 1)
        L = p - lo + 1
        c0 = lo % cells
        run = min(L, cells - c0)  # keys before the ring wraps to cell 0
        sc = np.empty(L, np.float32)
        qv = q[i, h * hdk:(h + 1) * hdk]
        _score_row(qv, k_cache[c0:c0 + run], g, run, scale, sc)
        if run < L:
            _score_row(qv, k_cache[:L - run], g, L - run, scale, sc[run:])
        _softmax_causal(sc, L)
        if do_capture:  # capture columns are key positions
            for t in range(L):
                capture[h, i, lo + t] = sc[t]
        acc = np.empty(hdv, np.float32)
        _weighted_values(sc, v_cache[c0:c0 + run], g, run, acc)
        if run < L:
            acc2 = np.empty(hdv, np.float32)
            _weighted_values(sc[run:], v_cache[:L - run], g, L - run, acc2)
            for j in range(hdv):
                acc[j] += acc2[j]
        out[i, h * hdv:(h + 1) * hdv] = acc


@njit(cache=True, parallel=True)
def attention(q, k_cache, v_cache, n_past, n_heads, n_kv_heads, scale, out, capture, blocks=True, n_swa=0):
    """Causal GQA attention of n queries at positions n_past.. over the cache.

    q: [n, n_heads*hdk]; caches [ctx, n_kv_heads, hd]; out: [n, n_heads*hdv].
    Query head h reads KV head h // (n_heads / n_kv_heads).  When capture has
    n_heads rows, capture[h, i, t] receives the softmax weights (else pass (0,0,0)).
    Scores and the weighted sum of values are float32 vector loops (cache rows
    converted on load); the softmax normaliser is summed in float64.  blocks=False
    keeps the one-query-at-a-time path (what capture uses) even for long batches,
    so that every layer of an inspection pass sums its scores in the same order.
    n_swa > 0: a sliding-window layer (query p sees keys p - n_swa < j <= p; None:
    a model without such layers, whose compile leaves the windowed kernel out); while
    every window still reaches position 0 (n_past + n <= n_swa) that is plain causal
    attention over cells 0.., and the paths below serve it unchanged.
    """
    n = q.shape[0]
    if n_swa is not None and n_swa > 0 and n_past + n > n_swa:  # None: compiled without windows
        _attention_window(q, k_cache, v_cache, n_past, n_heads, n_kv_heads, scale, out, capture, n_swa)
        return
    hdk = k_cache.shape[2]
    hdv = v_cache.shape[2]
    group = n_heads // n_kv_heads
    do_capture = capture.shape[0] > 0
    if blocks and n >= 16 and n % 4 == 0 and not do_capture:
        _attention_blocks(q, k_cache, v_cache, n_past, n_heads, n_kv_heads, scale, out)
        return
    for task in prange(n * n_heads):
        i = _zigzag(task // n_heads, n)
        h = task % n_heads
        g = h // group
        L = n_past + i + 1
        sc = np.empty(L, np.float32)
        _attend_one(q[i, h * hdk:(h + 1) * hdk], k_cache, v_cache, g, L, scale, sc, out[i, h * hdv:(h + 1) * hdv])
        if do_capture:
            for t in range(L):
                capture[h, i, t] = sc[t]


@njit(cache=True, parallel=True)
def attention_rows(q, k_all, v_all, slots, kv_row, pos, n_heads, n_kv_heads, scale, out):
    """One decode step of several sequences in one parallel region: query row i (at
    position pos[i]) attends over its own cache k_all[slots[i], kv_row] (caches
    [n_slots, n_layers, ctx, n_kv_heads, hd]), every (row, head) one task.  Each
    task is attention()'s one-query path, the same operations in the same order,
    so a row's output is what its own one-row call gives; one launch instead of
    one per row (a launch and its barrier cost about as much as a short row's
    heads).  Global layers only: sliding-window rows go through attention()."""
    n = q.shape[0]
    hdk = k_all.shape[4]
    hdv = v_all.shape[4]
    group = n_heads // n_kv_heads
    for task in prange(n * n_heads):
        i = task // n_heads
        h = task % n_heads
        g = h // group
        L = pos[i] + 1
        sc = np.empty(L, np.float32)
        _attend_one(q[i, h * hdk:(h + 1) * hdk], k_all[slots[i], kv_row], v_all[slots[i], kv_row], g, L, scale, sc,
                    out[i, h * hdv:(h + 1) * hdv])


# error_model="numpy": with Python's (the default) every float division checks for
# zero and may raise, which keeps LLVM from vectorising the loop (2.2 ns -> 0.3 ns
# per value; the results are the same bits).
@njit(cache=True, fastmath=_FM, error_model="numpy")
def _swiglu_row(g, u, o):
    for j in range(g.shape[0]):
        x = g[j]
        o[j] = x / (np.float32(1.0) + exp_f32(-x)) * u[j]


@njit(cache=True, parallel=True)
def _swiglu_rows(gate, up, out):
    for i in prange(gate.shape[0]):
        _swiglu_row(gate[i], up[i], out[i])


@njit(cache=True)
def swiglu(gate, up, out):
    """out = silu(gate) * up, silu(g) = g / (1 + exp(-g)).

    One exp per hidden unit: ~7% of a prefill step, so many rows go parallel;
    one row (decode) stays serial, where a parallel launch would cost more."""
    if gate.shape[0] > 1:
        _swiglu_rows(gate, up, out)
    else:
        _swiglu_row(gate[0], up[0], out[0])


# GELU (tanh form) as llama.cpp's CPU backend computes it (ggml-cpu vec.h with
# GGML_GELU_FP16): x rounded to IEEE half, the result looked up in a table of
# half-precision GELU values; x <= -10 gives 0 and x >= 10 gives x.  The table is
# built here the way ggml builds it: 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))
# in float32 at every half value, rounded to half.
_SQRT_2_OVER_PI = 0.79788456080286535587989211986876
_GELU_COEF_A = 0.044715


def _gelu_f16_table() -> np.ndarray:
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):
        g = np.float32(0.5) * x * (np.float32(1.0) + np.tanh(
            np.float32(_SQRT_2_OVER_PI) * x * (np.float32(1.0) + np.float32(_GELU_COEF_A) * x * x)))
    return g.astype(np.float16).astype(np.float32)


GELU_F16 = _gelu_f16_table()  # float32 [65536], indexed by the half bits of x


@njit(cache=True, inline="always")
def gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), float32 (the exact form)."""
    return np.float32(0.5) * x * (np.float32(1.0) + np.float32(math.tanh(
        np.float32(_SQRT_2_OVER_PI) * x * (np.float32(1.0) + np.float32(_GELU_COEF_A) * x * x))))


@njit(cache=True, error_model="numpy")
def _geglu_row(g, u, o, table, exact):
    for j in range(g.shape[0]):
        x = g[j]
        if exact:
            o[j] = gelu_tanh(x) * u[j]
        elif x <= np.float32(-10.0):
            o[j] = np.float32(0.0)
        elif x >= np.float32(10.0):
            o[j] = x * u[j]
        else:
            o[j] = table[f32_to_f16_bits(x)] * u[j]


@njit(cache=True, parallel=True)
def _geglu_rows(gate, up, out, table, exact):
    for i in prange(gate.shape[0]):
        _geglu_row(gate[i], up[i], out[i], table, exact)


@njit(cache=True)
def geglu(gate, up, out, exact=False):
    """out = gelu(gate) * up (GeGLU, Gemma's FFN), gelu in llama.cpp's half-precision
    table form; exact: the float32 formula (the inspection passes' float32 math)."""
    if gate.shape[0] > 1:
        _geglu_rows(gate, up, out, GELU_F16, exact)
    else:
        _geglu_row(gate[0], up[0], out[0], GELU_F16, exact)


@njit(cache=True)
def softmax(x):
    """Numerically stable softmax of a 1-D float32 vector (max subtracted first)."""
    m = x.max()
    e = np.exp(x - m)
    return (e / e.sum()).astype(np.float32)


@njit(cache=True)
def add(x, y):
    """x += y (residual connection), x, y: [n, d]."""
    n, d = x.shape
    for i in range(n):
        for j in range(d):
            x[i, j] += y[i, j]


@njit(cache=True)
def add_bias(x, b):
    """x[i] += b for every row (QKV biases)."""
    n, d = x.shape
    for i in range(n):
        for j in range(d):
            x[i, j] += b[j]
