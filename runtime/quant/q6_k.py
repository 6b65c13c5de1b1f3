"""Q6_K: 256-weight super-blocks of 6-bit weights (4 low bits in ql, 2 high in qh)
in 16 sub-blocks of 16 with int8 scales (layout at _dec_q6_k).  Decoder, float
row dot, int8 decode dot and int16 decoder."""

from __future__ import annotations

import llvmlite.ir as llir
import numpy as np
from numba import njit

from .formats import _FM
from .ir import (
    _I16, _I32, _I8, _c64, _f16, _ir_bytes, _ir_decoder, _ir_f16, _ir_float, _ir_lanes, _ir_scaled8,
    _ir_splat, _ir_store, _ir_sum_parts, _ir_vload, _ir_vstore, _kdot_intrinsic, _vc,
)


def _ir_q6_k_half(builder, sp, o, h):
    """Q6_K: the 6-bit q (<64 x i8>, 0..63) of weights 128h + 0..63 and 128h + 64..127."""
    cat = _vc(_I32, 64, list(range(64)))
    ql = _ir_bytes(builder, sp, o, 64 * h, 64)
    qh = _ir_bytes(builder, sp, o, 128 + 32 * h, 32)
    hb = [builder.and_(builder.lshr(qh, _vc(_I8, 32, 2 * t)), _vc(_I8, 32, 3)) for t in range(4)]
    u_lo = builder.or_(builder.and_(ql, _vc(_I8, 64, 15)), builder.shl(builder.shuffle_vector(hb[0], hb[1], cat), _vc(_I8, 64, 4)))
    u_hi = builder.or_(builder.lshr(ql, _vc(_I8, 64, 4)), builder.shl(builder.shuffle_vector(hb[2], hb[3], cat), _vc(_I8, 64, 4)))
    return u_lo, u_hi


def _q6_k_body(builder, sp, o, dp, out):
    sc = _ir_float(builder, _ir_bytes(builder, sp, o, 192, 16), True)
    dl = builder.fmul(_ir_splat(builder, _ir_f16(builder, sp, builder.add(o, _c64(208))), 16), sc)
    for h in range(2):
        for s, u in enumerate(_ir_q6_k_half(builder, sp, o, h)):
            q = builder.sub(builder.zext(u, llir.VectorType(_I32, 64)), _vc(_I32, 64, 32))
            idx = [8 * h + 4 * s + lane // 16 for lane in range(64)]
            _ir_store(builder, dp, out, 128 * h + 64 * s, builder.fmul(_ir_lanes(builder, dl, idx), _ir_float(builder, q, True)))


# Q6_K (256 weights, 210 bytes): u8 ql[128] | u8 qh[64] | i8 scales[16] | f16 d.
#   Weight e = h*128 + t*32 + l (h<2, t<4, l<32): low nibble (t<2) or high nibble
#   (t>=2) of ql[h*64 + (t&1)*32 + l], bits 2t..2t+1 of qh[h*32 + l] on top;
#   w = (d * scales[e // 16]) * (q - 32)
_dec_q6_k = _ir_decoder(210, 256, _q6_k_body)


@njit(cache=True, fastmath=_FM)
def _rdot_q6_k(w, x, xsum, nb):
    n16 = min(16, x.shape[0])
    acc = np.float32(0.0)
    for i in range(nb):
        blk = w[i * 210:i * 210 + 210]
        d = _f16(blk, 208)
        for h in range(2):
            for half in range(2):
                # 16 weights from each of the four 32-runs t = 0..3 of this half;
                # slices so that every load below is provably contiguous
                p = h * 64 + half * 16
                qa = blk[p:p + 16]
                qb = blk[p + 32:p + 48]
                qc = blk[128 + h * 32 + half * 16:128 + h * 32 + half * 16 + 16]
                xs = x[i * 256 + h * 128 + half * 16:i * 256 + h * 128 + 128]
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                for l in range(n16):
                    a = qa[l]
                    b = qb[l]
                    c = qc[l]
                    s0 += np.float32(np.int32((a & 0xF) | ((c & 3) << 4)) - 32) * xs[l]
                    s1 += np.float32(np.int32((b & 0xF) | (((c >> 2) & 3) << 4)) - 32) * xs[32 + l]
                    s2 += np.float32(np.int32((a >> 4) | (((c >> 4) & 3) << 4)) - 32) * xs[64 + l]
                    s3 += np.float32(np.int32((b >> 4) | ((c >> 6) << 4)) - 32) * xs[96 + l]
                so = 192 + h * 8 + half
                acc += (d * np.float32(np.int8(blk[so]))) * s0
                acc += (d * np.float32(np.int8(blk[so + 2]))) * s1
                acc += (d * np.float32(np.int8(blk[so + 4]))) * s2
                acc += (d * np.float32(np.int8(blk[so + 6]))) * s3
    return acc


def _q6_k_unpack(builder, i, wp):
    # Q6_K (layout at _dec_q6_k): for each half h, ql bytes h*64 + 0..63 give
    # weights h*128 + 0..63 (low nibbles) and h*128 + 64..127 (high nibbles),
    # each topped by 2 bits of qh[h*32 + l]; every 4 lanes share one scale.
    i32 = llir.IntType(32)
    v16 = llir.VectorType(i32, 16)
    o = builder.mul(i, _c64(210))
    d = _ir_f16(builder, wp, builder.add(o, _c64(208)))
    sc8 = _ir_vload(builder, wp, builder.add(o, _c64(192)), llir.VectorType(llir.IntType(8), 16), 1)
    sc = builder.sext(sc8, v16)
    sc16 = builder.sext(sc8, llir.VectorType(_I16, 16))
    parts = []
    for h in range(2):
        for s, u6 in enumerate(_ir_q6_k_half(builder, wp, o, h)):
            parts.append((128 * h + 64 * s, u6, (sc16, [8 * h + 4 * s + lane // 4 for lane in range(16)])))
    return d, sc, parts


def _q6_k_dot(builder, st, i, xp, xdp, xsp):
    # sum(sc * (q - 32) * x) = sum(sc * q * x) - 32 * sum(sc * xsum16).
    d, sc, parts = st
    v16 = llir.VectorType(_I32, 16)
    tot = _ir_sum_parts(builder, parts, i, xp)
    xs = _ir_vload(builder, xsp, builder.mul(i, _c64(16)), v16, 4)
    isum = builder.sub(tot, builder.shl(builder.mul(sc, xs), _vc(_I32, 16, 5)))  # lane-wise; the total is what counts
    xd = builder.load(builder.gep(xdp, [i]))
    return _ir_scaled8(builder, isum, builder.fmul(d, xd))


_qdot_q6_k = _kdot_intrinsic(_q6_k_unpack, _q6_k_dot)


def _q6_k_body16(builder, sp, o, dp, out):
    sc = builder.sext(_ir_bytes(builder, sp, o, 192, 16), llir.VectorType(_I16, 16))
    for h in range(2):
        for s_, u in enumerate(_ir_q6_k_half(builder, sp, o, h)):
            q = builder.sub(builder.zext(u, llir.VectorType(_I16, 64)), _vc(_I16, 64, 32))
            v = builder.mul(q, _ir_lanes(builder, sc, [8 * h + 4 * s_ + lane // 16 for lane in range(64)]))
            _ir_vstore(builder, v, dp, builder.add(out, _c64(128 * h + 64 * s_)), 2)


_d16_q6_k = _ir_decoder(210, 256, _q6_k_body16, _I16)
