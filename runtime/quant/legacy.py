"""The legacy 32-weight blocks: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (layouts at their
decoders below).  Per format: the exact float decoder, the float row dot, the
int8 whole-row dot of decode (one generic intrinsic, _legacy_dot_intrinsic, whose
unpack differs per format) and the int16 decoder of the prefill tiles."""

from __future__ import annotations

import llvmlite.ir as llir
import numpy as np
from numba import njit

from .formats import _FM
from .ir import (
    _F32_ZERO, _I16, _I32, _I8, _c64, _f16, _ir_abs_i8, _ir_bit_bytes, _ir_bits32, _ir_bytes,
    _ir_decoder, _ir_dot4, _ir_f16, _ir_float, _ir_nibbles, _ir_reduce_fadd8, _ir_sign_i8, _ir_splat,
    _ir_store, _ir_vload, _ir_vstore, _nibbles, _rows_dot_intrinsic, _vc,
)


def _q4_0_body(builder, sp, o, dp, out):
    q = builder.sub(builder.zext(_ir_nibbles(builder, _ir_bytes(builder, sp, o, 2, 16)),
                                 llir.VectorType(_I32, 32)), _vc(_I32, 32, 8))
    d = _ir_splat(builder, _ir_f16(builder, sp, o), 32)
    _ir_store(builder, dp, out, 0, builder.fmul(d, _ir_float(builder, q, True)))


def _q4_1_body(builder, sp, o, dp, out):
    q = _ir_nibbles(builder, _ir_bytes(builder, sp, o, 4, 16))
    d = _ir_splat(builder, _ir_f16(builder, sp, o), 32)
    m = _ir_splat(builder, _ir_f16(builder, sp, builder.add(o, _c64(2))), 32)
    _ir_store(builder, dp, out, 0, builder.fadd(builder.fmul(d, _ir_float(builder, q, False)), m))


def _q5_0_body(builder, sp, o, dp, out):
    q = builder.or_(builder.zext(_ir_nibbles(builder, _ir_bytes(builder, sp, o, 6, 16)),
                                 llir.VectorType(_I32, 32)),
                    builder.shl(_ir_bits32(builder, sp, o, 2), _vc(_I32, 32, 4)))
    d = _ir_splat(builder, _ir_f16(builder, sp, o), 32)
    _ir_store(builder, dp, out, 0, builder.fmul(d, _ir_float(builder, builder.sub(q, _vc(_I32, 32, 16)), True)))


def _q5_1_body(builder, sp, o, dp, out):
    q = builder.or_(builder.zext(_ir_nibbles(builder, _ir_bytes(builder, sp, o, 8, 16)),
                                 llir.VectorType(_I32, 32)),
                    builder.shl(_ir_bits32(builder, sp, o, 4), _vc(_I32, 32, 4)))
    d = _ir_splat(builder, _ir_f16(builder, sp, o), 32)
    m = _ir_splat(builder, _ir_f16(builder, sp, builder.add(o, _c64(2))), 32)
    _ir_store(builder, dp, out, 0, builder.fadd(builder.fmul(d, _ir_float(builder, q, True)), m))


def _q8_0_body(builder, sp, o, dp, out):
    q = _ir_float(builder, _ir_bytes(builder, sp, o, 2, 32), True)
    _ir_store(builder, dp, out, 0, builder.fmul(q, _ir_splat(builder, _ir_f16(builder, sp, o), 32)))


# Q4_0 (32 weights, 18 bytes): f16 d | u8 qs[16].
#   qs[j] low nibble -> weight j, high nibble -> weight j+16;  w = d * (q - 8)
_dec_q4_0 = _ir_decoder(18, 32, _q4_0_body)


# Q4_1 (32 weights, 20 bytes): f16 d | f16 m | u8 qs[16] (nibbles as Q4_0);
#   w = (d * q) + m
_dec_q4_1 = _ir_decoder(20, 32, _q4_1_body)


# Q5_0 (32 weights, 22 bytes): f16 d | u32 qh | u8 qs[16].
#   5-bit q: nibble as Q4_0, bit j of qh is bit 4 of weight j;  w = d * (q - 16)
_dec_q5_0 = _ir_decoder(22, 32, _q5_0_body)


# Q5_1 (32 weights, 24 bytes): f16 d | f16 m | u32 qh | u8 qs[16];  w = (d * q) + m
_dec_q5_1 = _ir_decoder(24, 32, _q5_1_body)


# Q8_0 (32 weights, 34 bytes): f16 d | i8 qs[32];  w = q * d
_dec_q8_0 = _ir_decoder(34, 32, _q8_0_body)


@njit(cache=True, fastmath=_FM)
def _rdot_q4_0(w, x, xsum, nb):
    acc = np.float32(0.0)
    n16 = min(16, x.shape[0])
    for i in range(nb):
        o = i * 18
        xo = i * 32
        s = np.float32(0.0)
        for j in range(n16):
            hi, lo = _nibbles(w[o + 2 + j])
            s += (lo - np.float32(8.0)) * x[xo + j] + (hi - np.float32(8.0)) * x[xo + 16 + j]
        acc += _f16(w, o) * s
    return acc


@njit(cache=True, fastmath=_FM)
def _rdot_q4_1(w, x, xsum, nb):
    n16 = min(16, x.shape[0])
    acc = np.float32(0.0)
    for i in range(nb):
        o = i * 20
        xo = i * 32
        s = np.float32(0.0)
        for j in range(n16):
            hi, lo = _nibbles(w[o + 4 + j])
            s += lo * x[xo + j] + hi * x[xo + 16 + j]
        acc += _f16(w, o) * s + _f16(w, o + 2) * xsum[i]
    return acc


@njit(cache=True, fastmath=_FM)
def _rdot_q5_0(w, x, xsum, nb):
    n16 = min(16, x.shape[0])
    acc = np.float32(0.0)
    for i in range(nb):
        o = i * 22
        xo = i * 32
        qh = (np.uint32(w[o + 2]) | (np.uint32(w[o + 3]) << 8)
              | (np.uint32(w[o + 4]) << 16) | (np.uint32(w[o + 5]) << 24))
        s = np.float32(0.0)
        for j in range(n16):
            b = np.uint32(w[o + 6 + j])
            lo = (b & 0xF) | (((qh >> j) & 1) << 4)
            hi = (b >> 4) | (((qh >> (j + 16)) & 1) << 4)
            s += (np.float32(np.int32(lo) - 16) * x[xo + j]
                  + np.float32(np.int32(hi) - 16) * x[xo + 16 + j])
        acc += _f16(w, o) * s
    return acc


@njit(cache=True, fastmath=_FM)
def _rdot_q5_1(w, x, xsum, nb):
    n16 = min(16, x.shape[0])
    acc = np.float32(0.0)
    for i in range(nb):
        o = i * 24
        xo = i * 32
        qh = (np.uint32(w[o + 4]) | (np.uint32(w[o + 5]) << 8)
              | (np.uint32(w[o + 6]) << 16) | (np.uint32(w[o + 7]) << 24))
        s = np.float32(0.0)
        for j in range(n16):
            b = np.uint32(w[o + 8 + j])
            lo = (b & 0xF) | (((qh >> j) & 1) << 4)
            hi = (b >> 4) | (((qh >> (j + 16)) & 1) << 4)
            s += np.float32(lo) * x[xo + j] + np.float32(hi) * x[xo + 16 + j]
        acc += _f16(w, o) * s + _f16(w, o + 2) * xsum[i]
    return acc


@njit(cache=True, fastmath=_FM)
def _rdot_q8_0(w, x, xsum, nb):
    n32 = min(32, x.shape[0])
    acc = np.float32(0.0)
    for i in range(nb):
        o = i * 34
        xo = i * 32
        s = np.float32(0.0)
        for j in range(n32):
            q = np.int32(np.int8(w[o + 2 + j]))
            s += np.float32(q) * x[xo + j]
        acc += _f16(w, o) * s
    return acc


def _legacy_dot_intrinsic(kind, lookup=None):
    """Whole-row dots of a legacy-format row (kind q4_0, q4_1, q5_0, q5_1, q8_0 or
    iq4_nl, whose nibbles look up int8 weights in IQ4's table: lookup(builder, q),
    which the iq4 module passes in)
    with int8 activation blocks of 32.  Per block the 32 integer products go
    through one u8 x s8 dot-of-four (8 int32 lanes), whose lanes are scaled by
    d * xd and added to a vector float accumulator: one horizontal sum per row,
    not per block.  Q4_0 / Q5_0 / Q8_0 weights are signed (q - 8, q - 16, q): they
    and IQ4_NL's table values meet the unsigned operand as |w| against sign(w) * x (|x| <= 127, so no
    overflow), two instructions (vpabsb once per block, vpsignb per row), as
    ggml's mul_sum_i8_pairs does.  Q4_1 / Q5_1 weights are unsigned (0..31) and
    their minimums use the activation blocks' sums (Q8_1's fp16 s)."""
    bsz = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34, "iq4_nl": 18}[kind]
    qoff = {"q4_0": 2, "q4_1": 4, "q5_0": 6, "q5_1": 8, "q8_0": 2, "iq4_nl": 2}[kind]
    qhoff = {"q5_0": 2, "q5_1": 4}.get(kind)  # the u32 of 5th bits
    signed = kind in ("q4_0", "q5_0", "q8_0", "iq4_nl")
    has_min = kind in ("q4_1", "q5_1")          # w = d * q + m
    i8, i32, f32 = llir.IntType(8), llir.IntType(32), llir.FloatType()
    v32 = llir.VectorType(i8, 32)
    v8i = llir.VectorType(i32, 8)
    v8f = llir.VectorType(f32, 8)

    def unpack(builder, i, wp):
        o = builder.mul(i, _c64(bsz))
        if kind == "q8_0":
            q = _ir_vload(builder, wp, builder.add(o, _c64(qoff)), v32, 1)
        else:
            q = _ir_nibbles(builder, _ir_vload(builder, wp, builder.add(o, _c64(qoff)), llir.VectorType(i8, 16), 1))
        if kind == "q4_0":
            q = builder.sub(q, _vc(_I8, 32, 8))
        elif kind == "iq4_nl":  # nibbles index the non-linear table (int8 values)
            q = lookup(builder, q)
        elif kind == "q5_0":  # bit j of qh is bit 4 of weight j: q - 16 = nibble | (0xF0 where it is clear)
            q = builder.or_(q, builder.xor(_ir_bit_bytes(builder, wp, o, qhoff, -16), _vc(_I8, 32, -16)))
        elif qhoff is not None:  # Q5_1: the 5th bit sets 16 (q <= 31 fits a u8)
            q = builder.or_(q, _ir_bit_bytes(builder, wp, o, qhoff, 16))
        u = _ir_abs_i8(builder, q) if signed else q
        d = _ir_f16(builder, wp, o)
        m = _ir_f16(builder, wp, builder.add(o, _c64(2))) if has_min else None
        return u, q, d, m

    def dot(builder, st, i, xp, xdp, xsp):
        u, q, d, m = st
        x = _ir_vload(builder, xp, builder.mul(i, _c64(32)), v32, 1)
        if signed:
            x = _ir_sign_i8(builder, x, q)
        v = _ir_dot4(builder, llir.Constant(v8i, [0] * 8), u, x)
        xdi = builder.load(builder.gep(xdp, [i]))
        vec = (builder.sitofp(v, v8f), _ir_splat(builder, builder.fmul(d, xdi), 8))  # fused into the sum
        if not has_min:
            return [vec]
        # the minimum times Q8_1's s = half(d * sum of the block's xq), as ggml does
        xsd = builder.load(builder.bitcast(builder.gep(xsp, [i]), f32.as_pointer()))
        return [vec, builder.fmul(m, xsd)]

    accs = [(v8f, llir.Constant(v8f, [0.0] * 8))] + ([(f32, _F32_ZERO)] if has_min else [])

    def finish(builder, vals):
        return _ir_reduce_fadd8(builder, vals[0], vals[1] if has_min else _F32_ZERO)

    return _rows_dot_intrinsic(unpack, dot, accs, finish)


_qdot_q4_0 = _legacy_dot_intrinsic("q4_0")
_qdot_q4_1 = _legacy_dot_intrinsic("q4_1")
_qdot_q5_0 = _legacy_dot_intrinsic("q5_0")
_qdot_q5_1 = _legacy_dot_intrinsic("q5_1")
_qdot_q8_0 = _legacy_dot_intrinsic("q8_0")


# int16 decoders for the prefill tiles (matmuls._dec16: sub-block scales folded in)
def _q4_0_body16(builder, sp, o, dp, out):
    q = builder.zext(_ir_nibbles(builder, _ir_bytes(builder, sp, o, 2, 16)), llir.VectorType(_I16, 32))
    _ir_vstore(builder, builder.sub(q, _vc(_I16, 32, 8)), dp, out, 2)


def _q4_1_body16(builder, sp, o, dp, out):
    q = builder.zext(_ir_nibbles(builder, _ir_bytes(builder, sp, o, 4, 16)), llir.VectorType(_I16, 32))
    _ir_vstore(builder, q, dp, out, 2)


def _q8_0_body16(builder, sp, o, dp, out):
    _ir_vstore(builder, builder.sext(_ir_bytes(builder, sp, o, 2, 32), llir.VectorType(_I16, 32)), dp, out, 2)


def _q5_body16(signed):
    """Q5_0 (signed: q - 16) / Q5_1: the 4 low bits from qs, the 5th from qh."""
    qoff, qhoff = (6, 2) if signed else (8, 4)

    def body(builder, sp, o, dp, out):
        q = builder.or_(_ir_nibbles(builder, _ir_bytes(builder, sp, o, qoff, 16)),
                        _ir_bit_bytes(builder, sp, o, qhoff, 16))
        q = builder.zext(q, llir.VectorType(_I16, 32))
        if signed:
            q = builder.sub(q, _vc(_I16, 32, 16))
        _ir_vstore(builder, q, dp, out, 2)

    return body


_d16_q4_0 = _ir_decoder(18, 32, _q4_0_body16, _I16)
_d16_q5_0 = _ir_decoder(22, 32, _q5_body16(True), _I16)
_d16_q5_1 = _ir_decoder(24, 32, _q5_body16(False), _I16)


_d16_q4_1 = _ir_decoder(20, 32, _q4_1_body16, _I16)
_d16_q8_0 = _ir_decoder(34, 32, _q8_0_body16, _I16)
