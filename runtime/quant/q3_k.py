"""Q3_K: 256-weight super-blocks of 3-bit weights (2 low bits in qs, the third in
hmask) in 16 sub-blocks of 16 with 6-bit signed scales (layout at _dec_q3_k).
Decoder, float row dot, int8 decode dot and int16 decoder."""

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


def _ir_q3_k_scales(builder, sp, o):
    """Q3_K: the 16 six-bit sub-block scales minus 32 (<16 x i8>, -32..31) from the 12
    bytes at 96: low nibbles of bytes 0-7 (scales 0-7) then their high nibbles (8-15),
    and bits 2j, 2j + 1 of byte 8 + (s % 4) on top, j = s // 4.  One 16-byte load at
    94 (the scales are lanes 2-13): it ends at the block's last byte, where a load at
    96 reads two bytes past the block (past the file, for the last block of a file)."""
    v = _ir_bytes(builder, sp, o, 94, 16)
    lo = builder.and_(builder.lshr(_ir_lanes(builder, v, list(range(2, 10)) * 2), _vc(_I8, 16, [0] * 8 + [4] * 8)),
                      _vc(_I8, 16, 15))
    hi = builder.and_(builder.lshr(_ir_lanes(builder, v, [10, 11, 12, 13] * 4),
                                   _vc(_I8, 16, [0] * 4 + [2] * 4 + [4] * 4 + [6] * 4)), _vc(_I8, 16, 3))
    return builder.sub(builder.or_(lo, builder.shl(hi, _vc(_I8, 16, 4))), _vc(_I8, 16, 32))


def _q3_k_body(builder, sp, o, dp, out):
    sc = builder.sext(_ir_q3_k_scales(builder, sp, o), llir.VectorType(_I32, 16))
    dl = builder.fmul(_ir_splat(builder, _ir_f16(builder, sp, builder.add(o, _c64(108))), 16),
                      _ir_float(builder, sc, True))
    hm = _ir_bytes(builder, sp, o, 0, 32)
    for h in range(2):
        qs = _ir_bytes(builder, sp, o, 32 + 32 * h, 32)
        for k in range(4):
            ql = builder.zext(builder.and_(builder.lshr(qs, _vc(_I8, 32, 2 * k)), _vc(_I8, 32, 3)),
                              llir.VectorType(_I32, 32))
            mb = builder.zext(builder.and_(builder.lshr(hm, _vc(_I8, 32, h * 4 + k)), _vc(_I8, 32, 1)),
                              llir.VectorType(_I32, 32))
            q = builder.sub(ql, builder.shl(builder.xor(mb, _vc(_I32, 32, 1)), _vc(_I32, 32, 2)))
            s0 = h * 8 + k * 2
            v = builder.fmul(_ir_lanes(builder, dl, [s0 + lane // 16 for lane in range(32)]), _ir_float(builder, q, True))
            _ir_store(builder, dp, out, h * 128 + k * 32, v)


# Q3_K (256 weights, 110 bytes): u8 hmask[32] | u8 qs[64] | u8 scales[12] | f16 d.
#   16 sub-blocks of 16 with 6-bit signed scales: low 4 bits of scale s are
#   nibble s//8 of scales[s%8], high 2 bits are bits 2*(s//4).. of scales[8 + s%4];
#   sc = that - 32.  Weight e = h*128 + k*32 + l: low 2 bits from qs as Q2_K,
#   bit (h*4+k) of hmask[l] set means +0, clear means -4;  w = (d * sc) * q
_dec_q3_k = _ir_decoder(110, 256, _q3_k_body)


@njit(cache=True, fastmath=_FM)
def _rdot_q3_k(w, x, xsum, nb):
    n16 = min(16, x.shape[0])
    acc = np.float32(0.0)
    for i in range(nb):
        blk = w[i * 110:i * 110 + 110]
        d = _f16(blk, 108)
        for h in range(2):
            for k in range(4):
                hb = h * 4 + k
                for half in range(2):
                    e0 = h * 128 + k * 32 + half * 16
                    sidx = e0 // 16
                    lo = (blk[96 + (sidx & 7)] >> (4 * (sidx >> 3))) & 0xF
                    hi = (blk[104 + (sidx & 3)] >> (2 * (sidx >> 2))) & 3
                    qs = blk[32 + h * 32 + half * 16:32 + h * 32 + half * 16 + 16]
                    hm = blk[half * 16:half * 16 + 16]
                    xs = x[i * 256 + e0:i * 256 + e0 + 16]
                    s = np.float32(0.0)
                    for l in range(n16):
                        ql = np.int32((qs[l] >> (2 * k)) & 3)
                        mbit = np.int32((hm[l] >> hb) & 1)
                        s += np.float32(ql - ((mbit ^ 1) << 2)) * xs[l]
                    acc += (d * np.float32(np.int32(lo | (hi << 4)) - 32)) * s
    return acc


def _q3_k_unpack(builder, i, wp):
    # Q3_K (layout at _rdot_q3_k): hmask[32], qs[64] at 32, scales at 96, d at 108.
    # q = (2-bit field of qs, as Q2_K) + 4 * (bit 4h + k of hmask[l]) - 4: the
    # unsigned u = q + 4 (0..7) meets the activations, the 4 comes off with xsum16.
    o = builder.mul(i, _c64(110))
    d = _ir_f16(builder, wp, builder.add(o, _c64(108)))
    sc8 = _ir_q3_k_scales(builder, wp, o)
    sc16 = builder.sext(sc8, llir.VectorType(_I16, 16))  # one value for all parts (AVX2 builds
    hm = _ir_bytes(builder, wp, o, 0, 32)                  # its scale window once per source)
    parts = []
    for h in range(2):
        c = _ir_crumbs(builder, _ir_bytes(builder, wp, o, 32 + 32 * h, 32))
        u = [builder.or_(c[k], builder.shl(builder.and_(builder.lshr(hm, _vc(_I8, 32, 4 * h + k)), _vc(_I8, 32, 1)),
                                           _vc(_I8, 32, 2))) for k in range(4)]
        for p in range(2):
            parts.append((128 * h + 64 * p, builder.shuffle_vector(u[2 * p], u[2 * p + 1], _CAT64),
                          (sc16, [8 * h + 4 * p + lane // 4 for lane in range(16)])))
    return d, builder.sext(sc8, llir.VectorType(_I32, 16)), parts


def _q3_k_dot(builder, st, i, xp, xdp, xsp):
    # sum(sc * (u - 4) * x) = sum(sc * u * x) - 4 * sum(sc * xsum16), as _q6_k_dot's 32.
    d, sc, parts = st
    v16 = llir.VectorType(_I32, 16)
    tot = _ir_sum_parts(builder, parts, i, xp)
    xs = _ir_vload(builder, xsp, builder.mul(i, _c64(16)), v16, 4)
    isum = builder.sub(tot, builder.shl(builder.mul(sc, xs), _vc(_I32, 16, 2)))
    xd = builder.load(builder.gep(xdp, [i]))
    return _ir_scaled8(builder, isum, builder.fmul(d, xd))


_qdot_q3_k = _kdot_intrinsic(_q3_k_unpack, _q3_k_dot)


def _q3_k_body16(builder, sp, o, dp, out):
    """Q3_K: (sc_s - 32) * q per sub-block s of 16, q in -4..3 (|.| <= 128)."""
    sc = builder.sext(_ir_q3_k_scales(builder, sp, o), llir.VectorType(_I16, 16))
    hm = _ir_bytes(builder, sp, o, 0, 32)
    for h in range(2):
        for k, c in enumerate(_ir_crumbs(builder, _ir_bytes(builder, sp, o, 32 + 32 * h, 32))):
            mb = builder.and_(builder.lshr(hm, _vc(_I8, 32, 4 * h + k)), _vc(_I8, 32, 1))
            q = builder.sub(builder.zext(builder.or_(c, builder.shl(mb, _vc(_I8, 32, 2))), llir.VectorType(_I16, 32)),
                            _vc(_I16, 32, 4))
            v = builder.mul(q, _ir_lanes(builder, sc, [8 * h + 2 * k + lane // 16 for lane in range(32)]))
            _ir_vstore(builder, v, dp, builder.add(out, _c64(128 * h + 32 * k)), 2)


_d16_q3_k = _ir_decoder(110, 256, _q3_k_body16, _I16)
