"""IQ4_NL (blocks of 32) and IQ4_XS (256-weight super-blocks): 4-bit indices into
one non-linear table of int8 values (_IQ4_KVALUES).  Decoders, float row dots,
int8 decode dots and int16 decoders."""

from __future__ import annotations

import llvmlite.ir as llir
import numpy as np
from numba import njit
from numba.core import cgutils

from . import ir
from .formats import _FM
from .ir import (
    _F32, _I16, _I32, _I64, _I8, _c64, _f16, _ir_abs_i8, _ir_bytes, _ir_decoder, _ir_dot4, _ir_f16,
    _ir_lanes, _ir_nibbles, _ir_scaled8, _ir_sign_i8, _ir_splat, _ir_store, _ir_vload, _ir_vstore,
    _kdot_intrinsic, _vc,
)
from .legacy import _legacy_dot_intrinsic


def _ir_kvalues(builder, q):
    """IQ4's non-linear table looked up for every lane of q (<n x i8>, 0..15) by a
    tree of selects on the index bits (vector code; a table load per value is not)."""
    n = q.type.count
    vals = [_vc(_F32, n, float(v)) for v in _IQ4_KVALUES]
    for bit in range(4):
        m = builder.icmp_unsigned("!=", builder.and_(q, _vc(_I8, n, 1 << bit)), _vc(_I8, n, 0))
        vals = [builder.select(m, vals[2 * k + 1], vals[2 * k]) for k in range(len(vals) // 2)]
    return vals[0]


def _ir_kvalues_i8(builder, q):
    """IQ4's table as int8 weights for every lane of q (<32 x i8>, 0..15): one
    vpshufb on x86 (the 16 values in each 128-bit half), else the select tree."""
    if ir._MADDUBS:  # read at code generation (tests force each branch)
        fn = cgutils.get_or_insert_function(builder.module, llir.FunctionType(q.type, [q.type, q.type]),
                                            "llvm.x86.avx2.pshuf.b")
        return builder.call(fn, [_vc(_I8, 32, [int(v) for v in _IQ4_KVALUES] * 2), q])
    vals = [_vc(_I8, 32, int(v)) for v in _IQ4_KVALUES]
    for bit in range(4):
        m = builder.icmp_unsigned("!=", builder.and_(q, _vc(_I8, 32, 1 << bit)), _vc(_I8, 32, 0))
        vals = [builder.select(m, vals[2 * k + 1], vals[2 * k]) for k in range(len(vals) // 2)]
    return vals[0]


def _iq4_nl_body(builder, sp, o, dp, out):
    kv = _ir_kvalues(builder, _ir_nibbles(builder, _ir_bytes(builder, sp, o, 2, 16)))
    _ir_store(builder, dp, out, 0, builder.fmul(_ir_splat(builder, _ir_f16(builder, sp, o), 32), kv))


def _iq4_xs_body(builder, sp, o, dp, out):
    d = _ir_f16(builder, sp, o)
    shp = builder.bitcast(builder.gep(sp, [builder.add(o, _c64(2))]), _I16.as_pointer())
    sh = builder.zext(builder.load(shp, align=1), _I32)
    for j in range(8):
        sl = builder.zext(builder.load(builder.gep(sp, [builder.add(o, _c64(4 + j // 2))])), _I32)
        lo = builder.and_(builder.lshr(sl, llir.Constant(_I32, 4 * (j & 1))), llir.Constant(_I32, 15))
        hi = builder.and_(builder.lshr(sh, llir.Constant(_I32, 2 * j)), llir.Constant(_I32, 3))
        ls = builder.sub(builder.or_(lo, builder.shl(hi, llir.Constant(_I32, 4))), llir.Constant(_I32, 32))
        dl = builder.fmul(d, builder.sitofp(ls, _F32))
        kv = _ir_kvalues(builder, _ir_nibbles(builder, _ir_bytes(builder, sp, o, 8 + 16 * j, 16)))
        _ir_store(builder, dp, out, 32 * j, builder.fmul(_ir_splat(builder, dl, 32), kv))


# IQ4_NL (32 weights, 18 bytes): f16 d | u8 qs[16], nibbles as Q4_0 but each
#   indexes a non-linear table;  w = d * KVALUES[q]
_IQ4_KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10,
                         1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
_dec_iq4_nl = _ir_decoder(18, 32, _iq4_nl_body)


# IQ4_XS (256 weights, 136 bytes): f16 d | u16 scales_h | u8 scales_l[4] | u8 qs[128].
#   8 sub-blocks of 32: 6-bit scale j = nibble (j&1) of scales_l[j//2] | bits 2j..2j+1
#   of scales_h << 4, minus 32.  Sub-block j: nibble s of qs[j*16 + l] is weight
#   j*32 + s*16 + l;  w = (d * sc) * KVALUES[q]
_dec_iq4_xs = _ir_decoder(136, 256, _iq4_xs_body)


@njit(cache=True, fastmath=_FM)
def _rdot_iq4_nl(w, x, xsum, nb):
    n16 = min(16, x.shape[0])
    kv = _IQ4_KVALUES
    acc = np.float32(0.0)
    for i in range(nb):
        o = i * 18
        xo = i * 32
        s = np.float32(0.0)
        for j in range(n16):
            b = w[o + 2 + j]
            s += kv[b & 0xF] * x[xo + j] + kv[b >> 4] * x[xo + 16 + j]
        acc += _f16(w, o) * s
    return acc


@njit(cache=True, fastmath=_FM)
def _rdot_iq4_xs(w, x, xsum, nb):
    n16 = min(16, x.shape[0])
    kv = _IQ4_KVALUES
    acc = np.float32(0.0)
    for i in range(nb):
        blk = w[i * 136:i * 136 + 136]
        d = _f16(blk, 0)
        sh = np.int32(blk[2]) | (np.int32(blk[3]) << 8)
        for j in range(8):
            qs = blk[8 + j * 16:8 + j * 16 + 16]
            xs = x[i * 256 + j * 32:i * 256 + j * 32 + 32]
            s = np.float32(0.0)
            for l in range(n16):
                b = qs[l]
                s += kv[b & 0xF] * xs[l] + kv[b >> 4] * xs[16 + l]
            lo = (blk[4 + (j >> 1)] >> (4 * (j & 1))) & 0xF
            hi = (sh >> (2 * j)) & 3
            acc += (d * np.float32(np.int32(lo | (hi << 4)) - 32)) * s
    return acc


def _iq4_xs_unpack(builder, i, wp):
    # IQ4_XS (layout at _dec_iq4_xs): 8 sub-blocks of 32, each a 6-bit scale minus
    # 32 and 16 bytes of nibbles (low: weights 0-15, high: 16-31) into the table.
    o = builder.mul(i, _c64(136))
    d = _ir_f16(builder, wp, o)
    sh = builder.zext(builder.load(builder.bitcast(builder.gep(wp, [builder.add(o, _c64(2))]), _I16.as_pointer()),
                                   align=1), _I32)
    subs = []
    for j in range(8):
        sl = builder.zext(builder.load(builder.gep(wp, [builder.add(o, _c64(4 + j // 2))])), _I32)
        lo = builder.and_(builder.lshr(sl, llir.Constant(_I32, 4 * (j & 1))), llir.Constant(_I32, 15))
        hi = builder.and_(builder.lshr(sh, llir.Constant(_I32, 2 * j)), llir.Constant(_I32, 3))
        ls = builder.sub(builder.or_(lo, builder.shl(hi, llir.Constant(_I32, 4))), llir.Constant(_I32, 32))
        q = _ir_kvalues_i8(builder, _ir_nibbles(builder, _ir_vload(
            builder, wp, builder.add(o, _c64(8 + 16 * j)), llir.VectorType(_I8, 16), 1)))
        subs.append((_ir_abs_i8(builder, q), q, _ir_splat(builder, ls, 8)))
    return d, subs


def _iq4_xs_dot(builder, st, i, xp, xdp, xsp):
    # sum_j (sc_j - 32) * sum(kv[q] * x) in int32 (|kv|, |x| <= 127), then d * xd.
    d, subs = st
    v8 = llir.VectorType(_I32, 8)
    v32 = llir.VectorType(_I8, 32)
    xo = builder.mul(i, _c64(256))
    zero = llir.Constant(v8, [0] * 8)
    tot = zero
    for j, (u, q, ls) in enumerate(subs):
        x = _ir_sign_i8(builder, _ir_vload(builder, xp, builder.add(xo, _c64(32 * j)), v32, 1), q)
        tot = _ir_dot4(builder, tot, u, x, ls)
    xd = builder.load(builder.gep(xdp, [i]))
    return _ir_scaled8(builder, tot, builder.fmul(d, xd))


_qdot_iq4_nl = _legacy_dot_intrinsic("iq4_nl", _ir_kvalues_i8)
_qdot_iq4_xs = _kdot_intrinsic(_iq4_xs_unpack, _iq4_xs_dot)


def _iq4_nl_body16(builder, sp, o, dp, out):
    q = _ir_kvalues_i8(builder, _ir_nibbles(builder, _ir_bytes(builder, sp, o, 2, 16)))
    _ir_vstore(builder, builder.sext(q, llir.VectorType(_I16, 32)), dp, out, 2)


def _iq4_xs_body16(builder, sp, o, dp, out):
    """(sc_j - 32) * KVALUES[q] per sub-block j: |w| <= 32 * 127 = 4064 < 4096."""
    _, subs = _iq4_xs_unpack(builder, llir.Constant(_I64, 0), builder.gep(sp, [o]))
    for j, (_, q, ls) in enumerate(subs):
        ls16 = builder.trunc(_ir_lanes(builder, ls, [0] * 32), llir.VectorType(_I16, 32))
        v = builder.mul(builder.sext(q, llir.VectorType(_I16, 32)), ls16)
        _ir_vstore(builder, v, dp, builder.add(out, _c64(32 * j)), 2)


_d16_iq4_nl = _ir_decoder(18, 32, _iq4_nl_body16, _I16)
_d16_iq4_xs = _ir_decoder(136, 256, _iq4_xs_body16, _I16)
