"""F32, F16 and BF16 rows: the decoders (f16 / bf16 through the CPU's conversion,
signalling NaNs' bits kept as numpy keeps them) and the float row dots."""

from __future__ import annotations

import llvmlite.ir as llir
import numpy as np
from numba import njit

from .formats import _FM
from .ir import (
    _F32, _I16, _I32, _I8, _U32, _bits_as_f32, _half_as_f32, _ir_decoder, _ir_store, _ir_vload, _vc,
)


_HALVES = 32  # values per step of the F16 / BF16 decoders (one 64-byte load)


def _f16_body(builder, sp, o, dp, out):
    n = _HALVES
    h = builder.bitcast(_ir_vload(builder, sp, o, llir.VectorType(_I8, 2 * n), 1), llir.VectorType(_I16, n))
    v = builder.fpext(builder.bitcast(h, llir.VectorType(llir.HalfType(), n)), llir.VectorType(_F32, n))
    u = builder.zext(h, llir.VectorType(_I32, n))
    c = lambda k: _vc(_I32, n, k)  # noqa: E731
    # the CPU's conversion quiets signalling NaNs; numpy keeps their bits
    nan = builder.and_(builder.icmp_unsigned("==", builder.and_(u, c(0x7C00)), c(0x7C00)),
                       builder.icmp_unsigned("!=", builder.and_(u, c(0x3FF)), c(0)))
    keep = builder.or_(builder.or_(builder.shl(builder.and_(u, c(0x8000)), c(16)), c(0x7F800000)),
                       builder.shl(builder.and_(u, c(0x3FF)), c(13)))
    v = builder.select(nan, builder.bitcast(keep, llir.VectorType(_F32, n)), v)
    _ir_store(builder, dp, out, 0, v)


def _bf16_body(builder, sp, o, dp, out):
    n = _HALVES
    h = builder.bitcast(_ir_vload(builder, sp, o, llir.VectorType(_I8, 2 * n), 1), llir.VectorType(_I16, n))
    u = builder.shl(builder.zext(h, llir.VectorType(_I32, n)), _vc(_I32, n, 16))
    _ir_store(builder, dp, out, 0, builder.bitcast(u, llir.VectorType(_F32, n)))


# F32: 4 bytes per value.
@njit(cache=True)
def _dec_f32(src, b0, nb, dst, doff):
    blk = src[b0 * 4:(b0 + nb) * 4]
    out = dst[doff:doff + nb]
    for i in range(nb):
        bits = (np.uint32(blk[4 * i]) | (np.uint32(blk[4 * i + 1]) << 8)
                | (np.uint32(blk[4 * i + 2]) << 16) | (np.uint32(blk[4 * i + 3]) << 24))
        out[i] = _bits_as_f32(bits)


# F16: 2 bytes per value.  The hardware conversion (vcvtph2ps, 16 values per
# instruction) is exact for every half except signalling NaNs, which it quiets
# while numpy keeps their bits; those get numpy's bits back by a select.
_dec_f16_vec = _ir_decoder(2 * _HALVES, _HALVES, _f16_body)


@njit(cache=True)
def _dec_f16(src, b0, nb, dst, doff):
    n16 = nb // _HALVES * _HALVES
    _dec_f16_vec(src[b0 * 2:], 0, n16 // _HALVES, dst[doff:], 0)
    blk = src[(b0 + n16) * 2:(b0 + nb) * 2].view(np.uint16)  # hosts are little-endian, as GGUF is
    out = dst[doff + n16:doff + nb]
    for i in range(nb - n16):
        h = _U32(blk[i])
        nan = ((h & _U32(0x7C00)) == _U32(0x7C00)) & ((h & _U32(0x3FF)) != _U32(0))
        keep = ((h & _U32(0x8000)) << _U32(16)) | _U32(0x7F800000) | ((h & _U32(0x3FF)) << _U32(13))
        out[i] = _bits_as_f32(keep) if nan else _half_as_f32(h)


# BF16: 2 bytes per value, the top half of a float32.
_dec_bf16_vec = _ir_decoder(2 * _HALVES, _HALVES, _bf16_body)


@njit(cache=True)
def _dec_bf16(src, b0, nb, dst, doff):
    n16 = nb // _HALVES * _HALVES
    _dec_bf16_vec(src[b0 * 2:], 0, n16 // _HALVES, dst[doff:], 0)
    blk = src[(b0 + n16) * 2:(b0 + nb) * 2]
    out = dst[doff + n16:doff + nb]
    for i in range(nb - n16):
        out[i] = _bits_as_f32((np.uint32(blk[2 * i]) << 16) | (np.uint32(blk[2 * i + 1]) << 24))


# F32 / F16 / BF16 rows: nb is the number of values; float32 sums per 32.
@njit(cache=True, fastmath=_FM)
def _rdot_f32(w, x, xsum, nb):
    acc = np.float32(0.0)
    for c0 in range(0, nb, 32):
        m = min(32, nb - c0)
        wb = w[4 * c0:4 * (c0 + m)]
        xs = x[c0:c0 + m]
        s = np.float32(0.0)
        for j in range(m):
            bits = (_U32(wb[4 * j]) | (_U32(wb[4 * j + 1]) << _U32(8))
                    | (_U32(wb[4 * j + 2]) << _U32(16)) | (_U32(wb[4 * j + 3]) << _U32(24)))
            s += _bits_as_f32(bits) * xs[j]
        acc += s
    return acc


@njit(cache=True, fastmath=_FM)
def _rdot_f16(w, x, xsum, nb):
    acc = np.float32(0.0)
    for c0 in range(0, nb, 32):
        m = min(32, nb - c0)
        wb = w[2 * c0:2 * (c0 + m)]
        xs = x[c0:c0 + m]
        s = np.float32(0.0)
        for j in range(m):
            s += _half_as_f32(_U32(wb[2 * j]) | (_U32(wb[2 * j + 1]) << _U32(8))) * xs[j]
        acc += s
    return acc


@njit(cache=True, fastmath=_FM)
def _rdot_bf16(w, x, xsum, nb):
    acc = np.float32(0.0)
    for c0 in range(0, nb, 32):
        m = min(32, nb - c0)
        wb = w[2 * c0:2 * (c0 + m)]
        xs = x[c0:c0 + m]
        s = np.float32(0.0)
        for j in range(m):
            s += _bits_as_f32((_U32(wb[2 * j]) << _U32(16)) | (_U32(wb[2 * j + 1]) << _U32(24))) * xs[j]
        acc += s
    return acc
