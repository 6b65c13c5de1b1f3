"""Q2_K: 256-weight super-blocks of 2-bit weights in 16 sub-blocks of 16, each with
a 4-bit scale and a 4-bit minimum (layout at _dec_q2_k).  Decoder, float row dot,
int8 decode dot and int16 decoder."""

from __future__ import annotations

import llvmlite.ir as llir
import numpy as np
from numba import njit

from .formats import _FM
from .ir import (
    _CAT64, _I16, _I32, _I8, _c64, _f16, _ir_bytes, _ir_crumbs, _ir_decoder, _ir_f16, _ir_float,
    _ir_lanes, _ir_scaled8, _ir_splat, _ir_store, _ir_sum_parts, _ir_vload, _ir_vstore, _kdot_intrinsic,
    _vc,
)


def _q2_k_body(builder, sp, o, dp, out):
    sc = _ir_bytes(builder, sp, o, 0, 16)
    d = _ir_splat(builder, _ir_f16(builder, sp, builder.add(o, _c64(80))), 16)
    dmin = _ir_splat(builder, _ir_f16(builder, sp, builder.add(o, _c64(82))), 16)
    dl = builder.fmul(d, _ir_float(builder, builder.and_(sc, _vc(_I8, 16, 15)), False))
    ml = builder.fmul(dmin, _ir_float(builder, builder.lshr(sc, _vc(_I8, 16, 4)), False))
    for h in range(2):
        qs = _ir_bytes(builder, sp, o, 16 + 32 * h, 32)
        for k in range(4):
            q = _ir_float(builder, builder.and_(builder.lshr(qs, _vc(_I8, 32, 2 * k)), _vc(_I8, 32, 3)), False)
            s0 = h * 8 + k * 2
            idx = [s0 + lane // 16 for lane in range(32)]
            v = builder.fsub(builder.fmul(_ir_lanes(builder, dl, idx), q), _ir_lanes(builder, ml, idx))
            _ir_store(builder, dp, out, h * 128 + k * 32, v)


# Q2_K (256 weights, 84 bytes): u8 scales[16] | u8 qs[64] | f16 d | f16 dmin.
#   16 sub-blocks of 16; scales[s]: low nibble scale, high nibble min.
#   Weight e = h*128 + k*32 + l (h<2, k<4, l<32) is bits 2k..2k+1 of qs[h*32 + l];
#   w = (d * sc) * q - (dmin * mn), for sub-block e // 16.
_dec_q2_k = _ir_decoder(84, 256, _q2_k_body)


@njit(cache=True, fastmath=_FM)
def _rdot_q2_k(w, x, xsum, nb):
    n16 = min(16, x.shape[0])
    acc = np.float32(0.0)
    for i in range(nb):
        o = i * 84
        xo = i * 256
        d = _f16(w, o + 80)
        dmin = _f16(w, o + 82)
        for h in range(2):
            for k in range(4):
                for half in range(2):
                    e0 = h * 128 + k * 32 + half * 16
                    sc = w[o + e0 // 16]
                    s = np.float32(0.0)
                    sx = np.float32(0.0)
                    for l0 in range(n16):
                        l = half * 16 + l0
                        q = (w[o + 16 + h * 32 + l] >> (2 * k)) & 3
                        xv = x[xo + h * 128 + k * 32 + l]
                        s += np.float32(q) * xv
                        sx += xv
                    acc += (d * np.float32(sc & 0xF)) * s - (dmin * np.float32(sc >> 4)) * sx
    return acc


def _q2_k_unpack(builder, i, wp):
    # Q2_K (layout at _rdot_q2_k): bytes 0-15 one per sub-block of 16 (low nibble its
    # scale, high nibble its minimum), qs at 16, d at 80, dmin at 82.  Bits 2k, 2k + 1
    # of qs[32h + l] are weight 128h + 32k + l: fields k = 2p, 2p + 1 side by side are
    # weights 128h + 64p + 0..63, the activations' own order.
    o = builder.mul(i, _c64(84))
    d = _ir_f16(builder, wp, builder.add(o, _c64(80)))
    dmin = _ir_f16(builder, wp, builder.add(o, _c64(82)))
    sb = _ir_bytes(builder, wp, o, 0, 16)
    sc16 = builder.zext(builder.and_(sb, _vc(_I8, 16, 15)), llir.VectorType(_I16, 16))
    mins = builder.zext(builder.lshr(sb, _vc(_I8, 16, 4)), llir.VectorType(_I32, 16))
    parts = []
    for h in range(2):
        c = _ir_crumbs(builder, _ir_bytes(builder, wp, o, 16 + 32 * h, 32))
        for p in range(2):
            parts.append((128 * h + 64 * p, builder.shuffle_vector(c[2 * p], c[2 * p + 1], _CAT64),
                          (sc16, [8 * h + 4 * p + lane // 4 for lane in range(16)])))
    return d, dmin, mins, parts


def _q2_k_dot(builder, st, i, xp, xdp, xsp):
    # d * sum(sc * q * x) - dmin * sum(m * xsum16), both in int32 (as ggml's Q2_K dot).
    d, dmin, mins, parts = st
    v16 = llir.VectorType(_I32, 16)
    tot = _ir_sum_parts(builder, parts, i, xp)
    xs = _ir_vload(builder, xsp, builder.mul(i, _c64(16)), v16, 4)
    xd = builder.load(builder.gep(xdp, [i]))
    return [_ir_scaled8(builder, tot, builder.fmul(d, xd)),
            _ir_scaled8(builder, builder.mul(mins, xs), builder.fneg(builder.fmul(dmin, xd)))]


_qdot_q2_k = _kdot_intrinsic(_q2_k_unpack, _q2_k_dot)


def _q2_k_body16(builder, sp, o, dp, out):
    """Q2_K: sc_s * q per sub-block s of 16 (|.| <= 45; the minimums go to mn)."""
    sc = builder.zext(builder.and_(_ir_bytes(builder, sp, o, 0, 16), _vc(_I8, 16, 15)), llir.VectorType(_I16, 16))
    for h in range(2):
        for k, q in enumerate(_ir_crumbs(builder, _ir_bytes(builder, sp, o, 16 + 32 * h, 32))):
            v = builder.mul(builder.zext(q, llir.VectorType(_I16, 32)),
                            _ir_lanes(builder, sc, [8 * h + 2 * k + lane // 16 for lane in range(32)]))
            _ir_vstore(builder, v, dp, builder.add(out, _c64(128 * h + 32 * k)), 2)


_d16_q2_k = _ir_decoder(84, 256, _q2_k_body16, _I16)
