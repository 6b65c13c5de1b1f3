"""Q4_K and Q5_K: 256-weight super-blocks in 8 sub-blocks of 32, each with a 6-bit
scale and a 6-bit minimum (12 packed bytes, _k_scale_min); Q5_K adds a fifth bit
per weight.  The two share every piece but that bit.  Decoders, float row dots,
int8 decode dots and int16 decoders."""

from __future__ import annotations

import llvmlite.ir as llir
import numpy as np
from numba import njit

from .formats import _FM
from .ir import (
    _I16, _I32, _I8, _c64, _f16, _ir_bytes, _ir_decoder, _ir_f16, _ir_float, _ir_lanes, _ir_nibbles,
    _ir_scaled8, _ir_splat, _ir_store, _ir_sum_parts, _ir_vload, _ir_vstore, _kdot_intrinsic, _nibbles,
    _vc,
)


def _ir_k_scale_bytes(builder, sp, o):
    """Q4_K / Q5_K: the 8 six-bit scales and the 8 mins (<8 x i8> each) from the 12
    packed bytes at sp + o + 4 (layout at _k_scale_min), unpacked as three u32s."""
    u = [builder.load(builder.bitcast(builder.gep(sp, [builder.add(o, _c64(4 + 4 * k))]), _I32.as_pointer()),
                      align=1) for k in range(3)]
    k3f, k0f, k03 = (llir.Constant(_I32, 0x3F3F3F3F), llir.Constant(_I32, 0x0F0F0F0F),
                     llir.Constant(_I32, 0x03030303))
    hi2 = lambda x: builder.shl(builder.and_(builder.lshr(x, llir.Constant(_I32, 6)), k03),  # noqa: E731
                                llir.Constant(_I32, 4))
    sc = [builder.and_(u[0], k3f), builder.or_(builder.and_(u[2], k0f), hi2(u[0]))]
    mi = [builder.and_(u[1], k3f),
          builder.or_(builder.and_(builder.lshr(u[2], llir.Constant(_I32, 4)), k0f), hi2(u[1]))]

    def bytes8(pair):
        v = builder.insert_element(llir.Constant(llir.VectorType(_I32, 2), None), pair[0], llir.Constant(_I32, 0))
        v = builder.insert_element(v, pair[1], llir.Constant(_I32, 1))
        return builder.bitcast(v, llir.VectorType(_I8, 8))

    return bytes8(sc), bytes8(mi)


def _ir_k_scales(builder, sp, o, d, dmin):
    """Q4_K / Q5_K: <8 x float> d * sc_j and dmin * mn_j."""
    sc, mi = _ir_k_scale_bytes(builder, sp, o)
    return (builder.fmul(_ir_splat(builder, d, 8), _ir_float(builder, sc, False)),
            builder.fmul(_ir_splat(builder, dmin, 8), _ir_float(builder, mi, False)))


def _ir_k_quants(builder, sp, o, g, qh):
    """Q4_K / Q5_K: q (<64 x i8>, 0..15 or 0..31) of sub-blocks 2g and 2g + 1, the
    nibbles of qs[32g .. 32g + 31] with, for Q5_K (qh: its 32 high-bit bytes, else
    None), bits 2g and 2g + 1 of qh on top."""
    q = _ir_nibbles(builder, _ir_bytes(builder, sp, o, (16 if qh is None else 48) + 32 * g, 32))
    if qh is None:
        return q
    hb = builder.shuffle_vector(builder.lshr(qh, _vc(_I8, 32, 2 * g)), builder.lshr(qh, _vc(_I8, 32, 2 * g + 1)),
                                _vc(_I32, 64, list(range(64))))
    return builder.or_(q, builder.shl(builder.and_(hb, _vc(_I8, 64, 1)), _vc(_I8, 64, 4)))


def _k_body(five):
    def body(builder, sp, o, dp, out):
        dl, ml = _ir_k_scales(builder, sp, o, _ir_f16(builder, sp, o), _ir_f16(builder, sp, builder.add(o, _c64(2))))
        qh = _ir_bytes(builder, sp, o, 16, 32) if five else None
        for g in range(4):
            q = builder.zext(_ir_k_quants(builder, sp, o, g, qh), llir.VectorType(_I32, 64))
            idx = [2 * g + lane // 32 for lane in range(64)]
            v = builder.fsub(builder.fmul(_ir_lanes(builder, dl, idx), _ir_float(builder, q, True)),
                             _ir_lanes(builder, ml, idx))
            _ir_store(builder, dp, out, 64 * g, v)

    return body


@njit(cache=True, inline="always")
def _k_scale_min(src, o, j):
    """6-bit scale and min of sub-block j (0..7) from the 12 packed bytes at src[o].

    bytes 0-3: low 6 bits scale j<4 (top 2 bits: high bits of scale j+4)
    bytes 4-7: low 6 bits min j<4   (top 2 bits: high bits of min j+4)
    bytes 8-11: low nibble scale j+4, high nibble min j+4 (their low 4 bits)
    """
    if j < 4:
        return src[o + j] & 0x3F, src[o + 4 + j] & 0x3F
    b = src[o + 4 + j]
    return (b & 0xF) | ((src[o + j - 4] >> 2) & 0x30), (b >> 4) | ((src[o + j] >> 2) & 0x30)


# Q4_K (256 weights, 144 bytes): f16 d | f16 dmin | u8 scales[12] | u8 qs[128].
#   8 sub-blocks of 32 (scales/mins per _k_scale_min).  Weight e = g*64 + s*32 + l
#   is nibble s of qs[g*32 + l];  w = (d * sc) * q - (dmin * mn)
_dec_q4_k = _ir_decoder(144, 256, _k_body(False))


# Q5_K (256 weights, 176 bytes): f16 d | f16 dmin | u8 scales[12] | u8 qh[32] | u8 qs[128].
#   As Q4_K, plus bit j of qh[l] is bit 4 of weight j*32 + l.
_dec_q5_k = _ir_decoder(176, 256, _k_body(True))


@njit(cache=True, fastmath=_FM)
def _rdot_q4_k(w, x, xsum, nb):
    n32 = min(32, x.shape[0])
    acc = np.float32(0.0)
    for i in range(nb):
        blk = w[i * 144:i * 144 + 144]
        d = _f16(blk, 0)
        dmin = _f16(blk, 2)
        for g in range(4):
            qs = blk[16 + g * 32:16 + g * 32 + 32]
            xg = x[i * 256 + g * 64:i * 256 + g * 64 + 64]
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            for l in range(n32):
                hi, lo = _nibbles(qs[l])
                x0 = xg[l]
                x1 = xg[32 + l]
                s0 += lo * x0
                s1 += hi * x1
            sc0, mn0 = _k_scale_min(blk, 4, 2 * g)
            sc1, mn1 = _k_scale_min(blk, 4, 2 * g + 1)
            acc += (d * np.float32(sc0)) * s0 - (dmin * np.float32(mn0)) * xsum[i * 8 + 2 * g]
            acc += (d * np.float32(sc1)) * s1 - (dmin * np.float32(mn1)) * xsum[i * 8 + 2 * g + 1]
    return acc


@njit(cache=True, fastmath=_FM)
def _rdot_q5_k(w, x, xsum, nb):
    n32 = min(32, x.shape[0])
    acc = np.float32(0.0)
    for i in range(nb):
        blk = w[i * 176:i * 176 + 176]
        d = _f16(blk, 0)
        dmin = _f16(blk, 2)
        qh = blk[16:48]
        for g in range(4):
            qs = blk[48 + g * 32:48 + g * 32 + 32]
            xg = x[i * 256 + g * 64:i * 256 + g * 64 + 64]
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            for l in range(n32):
                b = qs[l]
                hb = qh[l]
                x0 = xg[l]
                x1 = xg[32 + l]
                s0 += np.float32((b & 0xF) | (((hb >> (2 * g)) & 1) << 4)) * x0
                s1 += np.float32((b >> 4) | (((hb >> (2 * g + 1)) & 1) << 4)) * x1
            sc0, mn0 = _k_scale_min(blk, 4, 2 * g)
            sc1, mn1 = _k_scale_min(blk, 4, 2 * g + 1)
            acc += (d * np.float32(sc0)) * s0 - (dmin * np.float32(mn0)) * xsum[i * 8 + 2 * g]
            acc += (d * np.float32(sc1)) * s1 - (dmin * np.float32(mn1)) * xsum[i * 8 + 2 * g + 1]
    return acc


def _k4_unpack(five):
    """Q4_K (five False) or Q5_K unpack.  Q4_K (layout at _dec_q4_k): qs bytes
    32g .. 32g + 31 hold sub-blocks 2g (low nibbles) and 2g + 1 (high).  Each group's
    32 bytes are loaded into both halves of a 64-byte vector and the upper half
    shifted by 4 (one variable word shift), so that after masking its 64 lanes are
    weights 64g .. 64g + 63 in the activations' own order: the unpack, done once per
    block, puts the nibbles where the activations are, and no row pays a shuffle of
    its activations per block (four vpermt2b per block and row before).  Q5_K is the
    same block with qs 32 bytes later and a fifth bit per weight: bit 2g (low
    nibbles) / 2g + 1 (high) of qh[l], l < 32 the lane within the group, adds 16
    (q <= 31, still a valid unsigned operand)."""
    bsz, qs_off = (176, 48) if five else (144, 16)
    dup = _vc(_I32, 64, [lane % 32 for lane in range(64)])
    shift = _vc(_I16, 32, [0] * 16 + [4] * 16)

    def unpack(builder, i, wp):
        i32 = llir.IntType(32)
        v32 = llir.VectorType(_I8, 32)
        o = builder.mul(i, _c64(bsz))
        d = _ir_f16(builder, wp, o)
        dmin = _ir_f16(builder, wp, builder.add(o, _c64(2)))
        sc, mi = _ir_k_scale_bytes(builder, wp, o)
        sc16 = builder.zext(sc, llir.VectorType(_I16, 8))
        mi8 = builder.zext(mi, llir.VectorType(i32, 8))
        if five:
            qh = _ir_vload(builder, wp, builder.add(o, _c64(16)), v32, 1)
            qh64 = builder.shuffle_vector(qh, qh, dup)
        nibs = []
        for g in range(4):
            b = _ir_vload(builder, wp, builder.add(o, _c64(qs_off + 32 * g)), v32, 1)
            b2 = builder.bitcast(builder.shuffle_vector(b, b, dup), llir.VectorType(_I16, 32))
            nib = builder.and_(builder.bitcast(builder.lshr(b2, shift), llir.VectorType(_I8, 64)), _vc(_I8, 64, 15))
            if five:
                bit = _vc(_I8, 64, [1 << (2 * g + lane // 32) for lane in range(64)])
                on = builder.icmp_unsigned("!=", builder.and_(qh64, bit), _vc(_I8, 64, 0))
                nib = builder.or_(nib, builder.select(on, _vc(_I8, 64, 16), _vc(_I8, 64, 0)))
            nibs.append((64 * g, nib, (sc16, [2 * g] * 8 + [2 * g + 1] * 8)))
        return d, dmin, mi8, nibs

    return unpack


def _q4_k_dot(builder, st, i, xp, xdp, xsp):
    # d * sum_j sc_j * sum(q * x) - dmin * sum_j m_j * xsum32_j (ints, as ggml's Q4_K
    # dot), added to the row's accumulator by two fused multiply-adds.
    d, dmin, mi8, nibs = st
    v16 = llir.VectorType(_I32, 16)
    tot = _ir_sum_parts(builder, nibs, i, xp)
    # minimums against the rounded activations' sums per 32 (as _qdot_q4_1)
    xs = _ir_vload(builder, xsp, builder.mul(i, _c64(16)), v16, 4)
    xs32 = builder.add(_ir_lanes(builder, xs, list(range(0, 16, 2))), _ir_lanes(builder, xs, list(range(1, 16, 2))))
    xd = builder.load(builder.gep(xdp, [i]))
    return [_ir_scaled8(builder, tot, builder.fmul(d, xd)),
            _ir_scaled8(builder, builder.mul(mi8, xs32), builder.fneg(builder.fmul(dmin, xd)))]


_qdot_q4_k = _kdot_intrinsic(_k4_unpack(False), _q4_k_dot)
_qdot_q5_k = _kdot_intrinsic(_k4_unpack(True), _q4_k_dot)  # same dot: 5-bit q, same scales


def _k_body16(five):
    """Q4_K / Q5_K: sc_j * q for the 8 sub-blocks j (the minimums go to mn)."""

    def body(builder, sp, o, dp, out):
        sc = builder.zext(_ir_k_scale_bytes(builder, sp, o)[0], llir.VectorType(_I16, 8))
        qh = _ir_bytes(builder, sp, o, 16, 32) if five else None
        for g in range(4):
            v = builder.mul(builder.zext(_ir_k_quants(builder, sp, o, g, qh), llir.VectorType(_I16, 64)),
                            _ir_lanes(builder, sc, [2 * g + lane // 32 for lane in range(64)]))
            _ir_vstore(builder, v, dp, builder.add(out, _c64(64 * g)), 2)

    return body


_d16_q4_k = _ir_decoder(144, 256, _k_body16(False), _I16)
_d16_q5_k = _ir_decoder(176, 256, _k_body16(True), _I16)
