"""GGML block formats, decoded by numba kernels.

Every weight matrix of a GGUF file is a sequence of rows; every row a sequence of
fixed-size *blocks*, each holding ``block_size`` weights in ``type_size`` bytes
(one or two float16 scales plus packed small integers).  This module decodes
them in compiled code:

* ``dequantize(raw, type_id, shape)`` - float32, bit for bit what
  ``gguf.quants.dequantize`` gives: every kernel below performs the same float32
  operations, in the same order, as gguf-py's numpy code (``d * q``, then ``+ m``;
  ``(d * sc) * q - (dmin * m)`` for the k-quants ...), and numba emits no fused
  multiply-adds unless asked (the decoders are compiled without fastmath).
  f16 fields go through the CPU's conversion (F16C on x86), exact for every
  half; only a signalling NaN comes out quieted, which _dec_f16 undoes for F16
  data and which cannot matter for a scale (its products are NaN either way).
* ``matmul(type_id, W, X, out)`` - ``out = X @ dequant(W).T`` computed from the
  blocks, never materialising the dequantized matrix, by the format's own
  parallel kernels (``kernels(type_id)``: compiled for that format alone, on its
  first use; the engine's compiled code reaches them by address, ``matmul_at``).
  For one activation row (decode) it runs fused per-format row dots: each
  block's integers are dotted with x in float32 and the block scale applied
  once.  For n > 1 rows (batched prefill) each 256-weight chunk of a weight row
  is decoded once into a thread-local buffer (by the same exact decoders) and
  dotted with all n rows.  Either way: float32 within a block / chunk, float64
  across the row.
* ``matvec`` / ``dot`` - the same kernel for one activation vector / one row.
* ``matmul_q8(type_id, W, X, out)`` - the engine's variant, trading exact float
  activations for integer arithmetic as llama.cpp does: one row (decode) is
  rounded to int8 blocks and dotted with vpdpbusd-style u8 x s8 sums; many rows
  (prefill) are rounded to int16 (14 bits per 256 values, 64x finer than
  llama.cpp's int8) and multiplied by int16 weight tiles (vpmaddwd / vpdpwssd).

Layout per format is documented next to its decoder (byte offsets inside one
block; all multi-byte fields little-endian; ``f16`` = IEEE half).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import llvmlite.ir as llir
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

__all__ = [
    "UnsupportedType", "type_name", "block_size", "type_size", "row_nbytes",
    "is_supported", "dequantize", "dot", "matvec", "matmul",
    "GGML_F32", "GGML_F16", "GGML_Q4_0", "GGML_Q4_1", "GGML_Q5_0", "GGML_Q5_1",
    "GGML_Q8_0", "GGML_Q2_K", "GGML_Q3_K", "GGML_Q4_K", "GGML_Q5_K", "GGML_Q6_K",
    "GGML_IQ4_NL", "GGML_IQ4_XS", "GGML_BF16",
]

# ggml's type ids (enum ggml_type); only the ones we decode get a constant.
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1 = 0, 1, 2, 3
GGML_Q5_0, GGML_Q5_1, GGML_Q8_0 = 6, 7, 8
GGML_Q2_K, GGML_Q3_K, GGML_Q4_K, GGML_Q5_K, GGML_Q6_K = 10, 11, 12, 13, 14
GGML_IQ4_NL, GGML_IQ4_XS, GGML_BF16 = 20, 23, 30

QK_K = 256  # weights per k-quant super-block

# type id -> (name, block_size, type_size) for every type we decode
_SUPPORTED = {
    GGML_F32: ("F32", 1, 4),
    GGML_F16: ("F16", 1, 2),
    GGML_BF16: ("BF16", 1, 2),
    GGML_Q4_0: ("Q4_0", 32, 18),
    GGML_Q4_1: ("Q4_1", 32, 20),
    GGML_Q5_0: ("Q5_0", 32, 22),
    GGML_Q5_1: ("Q5_1", 32, 24),
    GGML_Q8_0: ("Q8_0", 32, 34),
    GGML_Q2_K: ("Q2_K", QK_K, 84),
    GGML_Q3_K: ("Q3_K", QK_K, 110),
    GGML_Q4_K: ("Q4_K", QK_K, 144),
    GGML_Q5_K: ("Q5_K", QK_K, 176),
    GGML_Q6_K: ("Q6_K", QK_K, 210),
    GGML_IQ4_NL: ("IQ4_NL", 32, 18),
    GGML_IQ4_XS: ("IQ4_XS", QK_K, 136),
}

# Names of the types we do not decode, so that errors can say what a file holds.
_OTHER_NAMES = {
    4: "Q4_2", 5: "Q4_3", 9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
    18: "IQ3_XXS", 19: "IQ1_S", 21: "IQ3_S", 22: "IQ2_S", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0",
    39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}

_CHUNK = 256  # weights decoded at a time per row (one k-quant super-block, 8 legacy blocks)
# Prefill decodes 1024 weights of 4 rows at a time (16 KiB, in L1): a multiple of
# every block size, and long enough that the 16 horizontal sums per tile are cheap.
_PREFILL_CHUNK = 1024


class UnsupportedType(ValueError):
    """A ggml tensor type this runtime cannot decode."""


def type_name(type_id: int) -> str:
    t = int(type_id)
    if t in _SUPPORTED:
        return _SUPPORTED[t][0]
    return _OTHER_NAMES.get(t, f"type {t}")


def is_supported(type_id: int) -> bool:
    return int(type_id) in _SUPPORTED


def _traits(type_id: int) -> tuple[str, int, int]:
    t = int(type_id)
    if t not in _SUPPORTED:
        desc = _OTHER_NAMES.get(t)
        desc = f"{desc} (ggml type {t})" if desc else f"unknown ggml type {t}"
        raise UnsupportedType(f"tensor type {desc} is not supported")
    return _SUPPORTED[t]


def block_size(type_id: int) -> int:
    return _traits(type_id)[1]


def type_size(type_id: int) -> int:
    """Bytes per block."""
    return _traits(type_id)[2]


def row_nbytes(type_id: int, n_cols: int) -> int:
    _, bs, ts = _traits(type_id)
    if n_cols % bs:
        raise ValueError(f"row of {n_cols} values is not a multiple of the "
                         f"{type_name(type_id)} block size {bs}")
    return n_cols // bs * ts


# ---------------------------------------------------------------------------
# Scalars: f16 / bf16 / f32 from bytes
# ---------------------------------------------------------------------------

@intrinsic
def _bits_as_f32(typingctx, bits):
    """Reinterpret a uint32 as float32 (a register bitcast, payloads kept)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llir.FloatType())

    return sig, codegen


@intrinsic
def _f32_as_bits(typingctx, v):
    """Reinterpret a float32 as uint32."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llir.IntType(32))

    return sig, codegen


_U32 = np.uint32


@intrinsic
def _half_as_f32(typingctx, bits):
    """IEEE half (low 16 bits of an integer) -> float32 by LLVM's ``fpext half``.

    Exact for every half (subnormals too) except that x86's vcvtph2ps quiets
    a signalling NaN; one instruction per 16 values, and loops over it vectorise.
    """
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        h = builder.trunc(args[0], llir.IntType(16))
        return builder.fpext(builder.bitcast(h, llir.HalfType()), llir.FloatType())

    return sig, codegen


@intrinsic
def _scale_f16(typingctx, src, o):
    """The float16 at src[o:o+2] (a uint8 array) as float32, by _ir_f16: one block
    scale in a loop with a scalar accumulator, where a plain ``fpext half`` would
    chain each block to the last (see _ir_f16); exact for every half but a
    signalling NaN (quieted)."""
    sig = types.float32(src, o)

    def codegen(context, builder, signature, args):
        ptr = _ir_data(context, builder, signature.args[0], args[0], llir.IntType(8))
        return _ir_f16(builder, ptr, builder.sext(args[1], _I64) if args[1].type.width < 64 else args[1])

    return sig, codegen


@njit(cache=True, inline="always")
def _f16(src, o):
    """float16 at src[o:o+2] as float32 via the hardware conversion: exact for every
    half but a signalling NaN (quieted; numpy keeps its bits), so the decoders use it
    for scales, whose products are NaN either way, and _dec_f16 patches NaNs."""
    return _scale_f16(src, o)


# ---------------------------------------------------------------------------
# LLVM vector IR helpers, for the kernels that numba's own loops do not
# vectorise well (block decoders, integer dots, int16 tiles).
# ---------------------------------------------------------------------------

def _ir_data(context, builder, arr_ty, arr, elem):
    """The array's data pointer as elem*."""
    return builder.bitcast(context.make_array(arr_ty)(context, builder, arr).data, elem.as_pointer())


def _ir_vload(builder, ptr, off, vty, align):
    return builder.load(builder.bitcast(builder.gep(ptr, [off]), vty.as_pointer()), align=align)


def _ir_vstore(builder, v, ptr, off, align):
    builder.store(v, builder.bitcast(builder.gep(ptr, [off]), v.type.as_pointer()), align=align)


def _ir_splat(builder, v, n):
    vt = llir.VectorType(v.type, n)
    x = builder.insert_element(llir.Constant(vt, None), v, llir.Constant(llir.IntType(32), 0))
    return builder.shuffle_vector(x, llir.Constant(vt, None),
                                  llir.Constant(llir.VectorType(llir.IntType(32), n), [0] * n))


def _ir_reduce_add(builder, v):
    fn = cgutils.get_or_insert_function(builder.module, llir.FunctionType(v.type.element, [v.type]),
                                        f"llvm.vector.reduce.add.v{v.type.count}i32")
    return builder.call(fn, [v])


def _ir_lanes(builder, v, idx):
    """<len(idx) x T>: v's elements at idx."""
    return builder.shuffle_vector(v, v, llir.Constant(llir.VectorType(llir.IntType(32), len(idx)), idx))


def _vector_reg_constraint():
    import llvmlite.binding as llvm
    return "=w,0" if llvm.get_default_triple().startswith(("aarch64", "arm64")) else "=x,0"


_VREG = _vector_reg_constraint()


def _ir_f16(builder, ptr, off):
    """The float16 at byte ptr + off as float.  The half is moved into a zeroed
    vector register (a zero-extending 32-bit move) and converted there, behind an
    empty inline-asm barrier: LLVM otherwise folds it back to a scalar ``fpext
    half``, which x86 lowers to vpinsrw into whatever register it picks, and where
    that was a loop's accumulator the insert made every block wait for the
    previous block's sum (the Q5_0 decode dot ran at half speed inside matmul)."""
    h = builder.load(builder.bitcast(builder.gep(ptr, [off]), llir.IntType(16).as_pointer()), align=1)
    v4 = llir.VectorType(_I32, 4)
    v = builder.insert_element(llir.Constant(v4, [0] * 4), builder.zext(h, _I32), _c64(0))
    v = builder.asm(llir.FunctionType(v4, [v4]), "", _VREG, [v], False)
    vh = builder.bitcast(v, llir.VectorType(llir.HalfType(), 8))
    f4 = builder.fpext(builder.shuffle_vector(vh, vh, _vc(_I32, 4, [0, 1, 2, 3])), llir.VectorType(_F32, 4))
    return builder.extract_element(f4, _c64(0))


# ---------------------------------------------------------------------------
# Block decoders.  Each decodes blocks b0 .. b0+nb-1 of `src` (flat uint8) into
# dst[doff : doff + nb*block_size].
# ---------------------------------------------------------------------------

# Every quantized format is decoded by LLVM vector IR (_ir_decoder below, one
# block body per format): a block's bytes are loaded as vectors, unpacked with
# shifts and masks, converted and scaled 16-64 lanes at a time, and stored; 1.3-3x
# the speed numba's loops reached.  Each body performs the float32 operations of
# gguf-py's numpy code in the same order (no fused multiply-adds: the IR has no
# 'contract' flags), so the results stay bit for bit; tests/test_quant.py checks
# every format on random bytes, special scales and both real models.
# F16 / BF16 run 32 values per step, with a numba loop for the tail; F32 stays numba.

_I8, _I16, _I32, _I64, _F32 = llir.IntType(8), llir.IntType(16), llir.IntType(32), llir.IntType(64), llir.FloatType()


def _c64(k):
    return llir.Constant(_I64, k)


def _vc(ty, n, v):
    """<n x ty> constant, v a scalar or a list."""
    return llir.Constant(llir.VectorType(ty, n), v if isinstance(v, list) else [v] * n)


def _ir_decoder(bsize, bvals, body, elem=_F32):
    """An intrinsic f(src, b0, nb, dst, doff) decoding blocks b0..b0+nb-1 (bsize bytes
    each) of src into dst[doff:] (bvals values of type elem each, float32 unless
    said); body(builder, sp, o, dp, out) emits one block: bytes at sp + o, values to
    dp + out."""

    @intrinsic
    def dec(typingctx, src, b0, nb, dst, doff):
        sig = types.void(src, b0, nb, dst, doff)

        def codegen(context, builder, signature, args):
            sa, b0_, nb_, da, doff_ = args
            w = lambda v: builder.sext(v, _I64) if v.type.width < 64 else v  # noqa: E731
            b0_, nb_, doff_ = w(b0_), w(nb_), w(doff_)
            sp = _ir_data(context, builder, signature.args[0], sa, _I8)
            dp = _ir_data(context, builder, signature.args[3], da, elem)
            with cgutils.for_range(builder, nb_) as loop:
                i = loop.index
                body(builder, sp, builder.mul(builder.add(b0_, i), _c64(bsize)), dp,
                     builder.add(doff_, builder.mul(i, _c64(bvals))))
            return context.get_dummy_value()

        return sig, codegen

    return dec


def _ir_bytes(builder, sp, o, off, n):
    return _ir_vload(builder, sp, builder.add(o, _c64(off)), llir.VectorType(_I8, n), 1)


def _ir_nibbles(builder, b):
    """<n x i8> bytes -> <2n x i8>: the n low nibbles, then the n high ones."""
    n = b.type.count
    return builder.shuffle_vector(builder.and_(b, _vc(_I8, n, 15)), builder.lshr(b, _vc(_I8, n, 4)),
                                  _vc(_I32, 2 * n, list(range(2 * n))))


def _ir_float(builder, v, signed):
    """Integer vector -> float32 vector (through i32, as numba's np.float32(int) does)."""
    n = v.type.count
    if v.type.element.width < 32:
        v = (builder.sext if signed else builder.zext)(v, llir.VectorType(_I32, n))
    return builder.sitofp(v, llir.VectorType(_F32, n))


def _ir_store(builder, dp, out, off, v):
    _ir_vstore(builder, v, dp, builder.add(out, _c64(off)), 4)


def _ir_bits32(builder, sp, o, off):
    """<32 x i32>: bit j of the little-endian u32 at sp + o + off in lane j (0 or 1)."""
    u = builder.load(builder.bitcast(builder.gep(sp, [builder.add(o, _c64(off))]), _I32.as_pointer()),
                     align=1)
    return builder.and_(builder.lshr(_ir_splat(builder, u, 32), _vc(_I32, 32, list(range(32)))),
                        _vc(_I32, 32, 1))


def _ir_bit_bytes(builder, sp, o, off, value):
    """<32 x i8>: `value` in lane j where bit j of the little-endian u32 at sp + o + off
    is set, else 0.  Byte j // 8 goes to lane j (a byte shuffle), then one mask, one
    compare and one select: the byte-wide form of _ir_bits32, 4x fewer lanes' work."""
    b4 = _ir_bytes(builder, sp, o, off, 4)
    spread = builder.shuffle_vector(b4, b4, _vc(_I32, 32, [j // 8 for j in range(32)]))
    bit = builder.and_(spread, _vc(_I8, 32, [1 << (j % 8) for j in range(32)]))
    on = builder.icmp_unsigned("!=", bit, _vc(_I8, 32, 0))
    return builder.select(on, _vc(_I8, 32, value), _vc(_I8, 32, 0))


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
    if _MADDUBS:
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


# Q2_K (256 weights, 84 bytes): u8 scales[16] | u8 qs[64] | f16 d | f16 dmin.
#   16 sub-blocks of 16; scales[s]: low nibble scale, high nibble min.
#   Weight e = h*128 + k*32 + l (h<2, k<4, l<32) is bits 2k..2k+1 of qs[h*32 + l];
#   w = (d * sc) * q - (dmin * mn), for sub-block e // 16.
_dec_q2_k = _ir_decoder(84, 256, _q2_k_body)


# Q3_K (256 weights, 110 bytes): u8 hmask[32] | u8 qs[64] | u8 scales[12] | f16 d.
#   16 sub-blocks of 16 with 6-bit signed scales: low 4 bits of scale s are
#   nibble s//8 of scales[s%8], high 2 bits are bits 2*(s//4).. of scales[8 + s%4];
#   sc = that - 32.  Weight e = h*128 + k*32 + l: low 2 bits from qs as Q2_K,
#   bit (h*4+k) of hmask[l] set means +0, clear means -4;  w = (d * sc) * q
_dec_q3_k = _ir_decoder(110, 256, _q3_k_body)


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


# Q6_K (256 weights, 210 bytes): u8 ql[128] | u8 qh[64] | i8 scales[16] | f16 d.
#   Weight e = h*128 + t*32 + l (h<2, t<4, l<32): low nibble (t<2) or high nibble
#   (t>=2) of ql[h*64 + (t&1)*32 + l], bits 2t..2t+1 of qh[h*32 + l] on top;
#   w = (d * scales[e // 16]) * (q - 32)
_dec_q6_k = _ir_decoder(210, 256, _q6_k_body)


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

_FM = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, inline="always")
def _nibbles(b):
    """(high, low) nibble of a byte as float32, in float arithmetic.

    numba widens integer ops on bytes to int64, which halves the vector width
    (8 lanes of i64 instead of 16 of f32); floor(b / 16) and b - 16 * floor
    are exact in float32 and keep the whole loop in 16-lane float vectors.
    """
    f = np.float32(b)
    hi = np.floor(f * np.float32(0.0625))
    return hi, f - np.float32(16.0) * hi


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


# Whole-row k-quant dots with 8-bit activations, one loop over super-blocks in
# vector IR.  Each 64-byte vector of unsigned weights meets 64 int8 activations
# in one u8 x s8 dot-of-four (vpdpbusd with AVX-512 VNNI): 16 int32 lanes, each
# inside one sub-block, so the sub-block scales multiply whole lanes and a
# super-block needs one horizontal sum instead of one per sub-block.

def _target_has(feature):
    """Whether numba compiles for a CPU with this LLVM feature (numba's
    NUMBA_CPU_NAME / NUMBA_CPU_FEATURES settings win over the host's)."""
    from numba.core import config
    if config.CPU_FEATURES is not None:
        return ("+" + feature) in config.CPU_FEATURES.split(",")
    if config.CPU_NAME is not None and config.CPU_NAME != "host":
        return False
    import llvmlite.binding as llvm
    return bool(llvm.get_host_cpu_features().get(feature, False))


_VNNI512 = _target_has("avx512vnni") and _target_has("avx512bw") and _target_has("avx512vl")
# Without VNNI, x86's u8 x s8 multiply-add pairs (vpmaddubsw, then vpmaddwd by ones)
# give the same sums in two instructions per 32 bytes; plain IR widens to int32
# first (four vpmulld and shuffles), about 3x the work.  vpmaddubsw saturates its
# int16 pair sums, which no caller reaches: |u| <= 128 (Q8_0's |w|), |x| <= 127,
# 2 * 128 * 127 = 32512 < 32767.
_MADDUBS = _target_has("avx2")


def _ir_dot4(builder, acc, u8, s8, scale=None):
    """acc (<n/4 x i32>) + the sums of four adjacent zext(u8) * sext(s8) (<n x i8>
    each, n = 32 or 64; u8 <= 128), each sum times its lane of scale where given
    (<n/4 x i32> within int16, or (<k x i16> source, n/4 source lanes): the form
    AVX2 builds each multiplier from with one shuffle): vpdpbusd where the CPU has it (scaled
    sums of 64: vpmaddubsw + vpmaddwd at 512 bits, the scale in the second operand, as
    measured faster than vpdpbusd + vpmulld on Zen 4), vpmaddubsw + vpmaddwd on AVX2, else
    the same sums in plain IR.  On AVX2 the scale rides in
    vpmaddwd's second operand (ggml's k-quant dots do the same), which saves the
    vpmulld a separate multiply costs; the integers are the same either way."""
    n = u8.type.count
    i32 = llir.IntType(32)
    vq = llir.VectorType(i32, n // 4)
    if _VNNI512 and n == 64 and scale is not None:
        # A scaled sum: vpmaddubsw + vpmaddwd with the scale in the second operand
        # (the AVX2 form at 512 bits), not vpdpbusd then vpmulld.  Exact either way:
        # a pair of products is at most 2 * 128 * 127 < 2^15.
        v64 = llir.VectorType(llir.IntType(8), 64)
        v32s = llir.VectorType(llir.IntType(16), 32)
        maddubs = cgutils.get_or_insert_function(builder.module, llir.FunctionType(v32s, [v64, v64]),
                                                 "llvm.x86.avx512.pmaddubs.w.512")
        maddwd = cgutils.get_or_insert_function(builder.module, llir.FunctionType(vq, [v32s, v32s]),
                                                "llvm.x86.avx512.pmaddw.d.512")
        if isinstance(scale, tuple):
            src, idx = scale
        else:
            src, idx = builder.trunc(scale, llir.VectorType(llir.IntType(16), n // 4)), list(range(n // 4))
        mult = builder.shuffle_vector(src, src, _vc(_I32, 32, [idx[k // 2] for k in range(32)]))
        return builder.add(acc, builder.call(maddwd, [builder.call(maddubs, [u8, s8]), mult]))
    if isinstance(scale, tuple) and not (_MADDUBS and not _VNNI512):
        src, idx = scale  # <k x i16> and the source lane of each int32 lane
        scale = builder.sext(builder.shuffle_vector(src, src, _vc(_I32, n // 4, idx)), vq)
    if _MADDUBS and not _VNNI512:
        v32 = llir.VectorType(llir.IntType(8), 32)
        v16s = llir.VectorType(llir.IntType(16), 16)
        v8 = llir.VectorType(i32, 8)
        maddubs = cgutils.get_or_insert_function(builder.module, llir.FunctionType(v16s, [v32, v32]),
                                                 "llvm.x86.avx2.pmadd.ub.sw")
        maddwd = cgutils.get_or_insert_function(builder.module, llir.FunctionType(v8, [v16s, v16s]),
                                                "llvm.x86.avx2.pmadd.wd")
        if scale is None or isinstance(scale, tuple):
            src, idx = scale if scale is not None else (None, None)
        else:
            src, idx = builder.trunc(scale, llir.VectorType(llir.IntType(16), n // 4)), list(range(n // 4))
        parts = []
        for h in range(n // 32):
            half = llir.Constant(llir.VectorType(i32, 32), list(range(32 * h, 32 * h + 32)))
            uh = u8 if n == 32 else builder.shuffle_vector(u8, u8, half)
            sh = s8 if n == 32 else builder.shuffle_vector(s8, s8, half)
            if src is None:
                mult = llir.Constant(v16s, [1] * 16)
            else:  # int16 lanes 2k and 2k + 1 make int32 lane k: both take its scale
                mult = builder.shuffle_vector(src, src, _vc(_I32, 16, [idx[8 * h + k // 2] for k in range(16)]))
            parts.append(builder.call(maddwd, [builder.call(maddubs, [uh, sh]), mult]))
        out = parts[0] if n == 32 else builder.shuffle_vector(parts[0], parts[1],
                                                              llir.Constant(llir.VectorType(i32, 16), list(range(16))))
        return builder.add(acc, out)
    if _VNNI512:
        fn = cgutils.get_or_insert_function(builder.module, llir.FunctionType(vq, [vq, vq, vq]),
                                            f"llvm.x86.avx512.vpdpbusd.{8 * n}")
        if scale is not None:
            zero = llir.Constant(vq, [0] * (n // 4))
            return builder.add(acc, builder.mul(builder.call(fn, [zero, builder.bitcast(u8, vq), builder.bitcast(s8, vq)]), scale))
        return builder.call(fn, [acc, builder.bitcast(u8, vq), builder.bitcast(s8, vq)])
    vn = llir.VectorType(i32, n)
    prod = builder.mul(builder.zext(u8, vn), builder.sext(s8, vn))
    parts = [builder.shuffle_vector(prod, prod, llir.Constant(vq, list(range(j, n, 4)))) for j in range(4)]
    sums = builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))
    return builder.add(acc, sums if scale is None else builder.mul(sums, scale))


# Every int8 dot is written as two halves per block: `unpack` turns a block's bytes
# into integer vectors and scales (once), `dot` meets them with one activation row.
# _rows_dot_intrinsic loops over blocks and, inside, over up to Q8_MAX_ROWS rows
# of activations, each with accumulators of its own: a weight block is read and
# unpacked once for every row of a multi-sequence decode step, and each row sees
# exactly the operations, in the order, that a one-row call performs (one-row
# calls are the same kernel with R = 1), so a row's result does not depend on how
# many rows share the step.

Q8_MAX_ROWS = 16
# Rows per register group inside _rows_dot_intrinsic (see there).
_ROW_GROUP = 4


def _rows_dot_intrinsic(unpack, dot, accs, finish):
    """An intrinsic f(W, i0, i1, xq[R, c], xd[R, c/bs], xs16[R, c/16], nb, out) writing
    out[r, i] = the dot of weight row W[i] (nb blocks) with activation row r, for
    every i0 <= i < i1 and r < R <= Q8_MAX_ROWS.  The loop over weight rows is part
    of the kernel: a numba call per row (views, reference counts, the call) cost as
    much as the 28 blocks of a 896-wide row.  accs: [(llvm type, init constant)] per
    row; dot(builder, st, i, xp, xdp, xsp) returns one value to add to each (or a
    pair (a, b) to add as a * b, fused); finish(builder, values) -> f32."""

    @intrinsic
    def rows_dot(typingctx, W, i0, i1, xq, xd, xs16, nb, out):
        sig = types.none(W, i0, i1, xq, xd, xs16, nb, out)

        def codegen(context, builder, signature, args):
            wa, i0_, i1_, xa, xda, xsa, nb_, oa = args
            aty = signature.args
            i8, i32, i64, f32 = llir.IntType(8), llir.IntType(32), llir.IntType(64), llir.FloatType()
            w_arr = context.make_array(aty[0])(context, builder, wa)
            o_arr = context.make_array(aty[7])(context, builder, oa)
            wp0 = builder.bitcast(w_arr.data, i8.as_pointer())
            op0 = builder.bitcast(o_arr.data, i8.as_pointer())
            w_stride = cgutils.unpack_tuple(builder, w_arr.strides, 2)[0]
            o_strides = cgutils.unpack_tuple(builder, o_arr.strides, 2)
            xp0 = _ir_data(context, builder, aty[3], xa, i8)
            xdp0 = _ir_data(context, builder, aty[4], xda, f32)
            xsp0 = _ir_data(context, builder, aty[5], xsa, i32)

            def row_len(k, a):
                return cgutils.unpack_tuple(builder, context.make_array(aty[k])(context, builder, a).shape, 2)

            def as_i64(v):
                return builder.sext(v, i64) if v.type.width < 64 else v

            n_rows, x_len = row_len(3, xa)
            _, xd_len = row_len(4, xda)
            _, xs_len = row_len(5, xsa)
            n = as_i64(nb_)
            lo, hi = as_i64(i0_), as_i64(i1_)

            def out_ptr(r, i):
                off = builder.add(builder.mul(r, o_strides[0]), builder.mul(i, o_strides[1]))
                return builder.bitcast(builder.gep(op0, [off]), f32.as_pointer())

            def group(wi, wp, r0, k):
                # Rows r0 .. r0 + k - 1 against weight row wi, each row's
                # accumulators in registers (a row-indexed stack array, as before,
                # made every extra row cost as much as a whole one-row call) and its
                # activation pointers computed once per weight row, not per block.
                rows = [as_i64(builder.add(r0, llir.Constant(r0.type, j))) for j in range(k)]
                ptrs = [(builder.gep(xp0, [builder.mul(r, x_len)]), builder.gep(xdp0, [builder.mul(r, xd_len)]),
                         builder.gep(xsp0, [builder.mul(r, xs_len)])) for r in rows]
                regs = [[cgutils.alloca_once(builder, ty) for ty, _ in accs] for _ in range(k)]
                for row_regs in regs:
                    for slot, (_, init) in zip(row_regs, accs):
                        builder.store(init, slot)
                with cgutils.for_range(builder, n) as blk:
                    i = blk.index
                    st = unpack(builder, i, wp)
                    for row_regs, (xp, xdp, xsp) in zip(regs, ptrs):
                        for slot, v in zip(row_regs, dot(builder, st, i, xp, xdp, xsp)):
                            builder.store(_ir_accumulate(builder, builder.load(slot), v), slot)
                for r, row_regs in zip(rows, regs):
                    builder.store(finish(builder, [builder.load(slot) for slot in row_regs]), out_ptr(r, wi))

            # Rows go in groups of up to _ROW_GROUP, each group one pass over the
            # weight row (unpacked once per group, from L1 after the first): the
            # same operations for a row whatever group it is in, so its result
            # does not depend on how many rows share the step.
            n_groups = builder.sdiv(builder.add(n_rows, llir.Constant(n_rows.type, _ROW_GROUP - 1)),
                                    llir.Constant(n_rows.type, _ROW_GROUP))
            with cgutils.for_range_slice(builder, lo, hi, llir.Constant(i64, 1)) as (wi, _):
                wp = builder.gep(wp0, [builder.mul(wi, w_stride)])
                with cgutils.for_range(builder, n_groups) as g:
                    r0 = builder.mul(g.index, llir.Constant(g.index.type, _ROW_GROUP))
                    left = builder.sub(n_rows, r0)

                    def sizes(k):
                        if k == 1:
                            group(wi, wp, r0, 1)
                            return
                        at_least = builder.icmp_signed(">=", left, llir.Constant(left.type, k))
                        with builder.if_else(at_least) as (full, fewer):
                            with full:
                                group(wi, wp, r0, k)
                            with fewer:
                                sizes(k - 1)

                    sizes(_ROW_GROUP)
            return context.get_dummy_value()

        return sig, codegen

    return rows_dot


_F32_ZERO = llir.Constant(llir.FloatType(), 0.0)


def _ir_accumulate(builder, acc, v):
    """acc + v, or acc + a * b in one fused multiply-add where a dot returns the
    pair (a, b): one rounding, as ggml's AVX2 dots (_mm256_fmadd_ps), and one
    instruction fewer per block and row."""
    if isinstance(v, list):  # several terms, fused in order
        for term in v:
            acc = _ir_accumulate(builder, acc, term)
        return acc
    if isinstance(v, tuple):
        a, b = v
        fn = cgutils.get_or_insert_function(builder.module, llir.FunctionType(a.type, [a.type] * 3),
                                            f"llvm.fma.v{a.type.count}f32")
        return builder.call(fn, [a, b, acc])
    return builder.fadd(acc, v)


_V8F = llir.VectorType(_F32, 8)


def _ir_reduce_fadd8(builder, v, start=_F32_ZERO):
    fn = cgutils.get_or_insert_function(builder.module, llir.FunctionType(_F32, [_F32, _V8F]),
                                        "llvm.vector.reduce.fadd.v8f32")
    return builder.call(fn, [start, v], fastmath=("reassoc",))


def _ir_scaled8(builder, isum, scale):
    """The term (<8 x float> integer lanes, <8 x float> splat of the scalar scale) that
    _ir_accumulate adds to a row's accumulator in one fused multiply-add (isum
    <8 or 16 x i32>, 16 folded to 8 by adding halves, exact).  k-quant dots keep
    one vector accumulator per row and reduce it once at the row's end, as ggml's
    do: a horizontal sum per 256-block cost two reductions' worth of shuffles."""
    if isum.type.count == 16:
        isum = builder.add(_ir_lanes(builder, isum, list(range(8))), _ir_lanes(builder, isum, list(range(8, 16))))
    return builder.sitofp(isum, _V8F), _ir_splat(builder, scale, 8)


def _kdot_intrinsic(unpack, dot):
    """k-quants (and IQ4_XS): one <8 x float> accumulator per row; dot returns the
    block's contribution as a term of _ir_scaled8 (or a list of them)."""
    return _rows_dot_intrinsic(unpack, lambda *a: [dot(*a)], [(_V8F, llir.Constant(_V8F, [0.0] * 8))],
                               lambda builder, vals: _ir_reduce_fadd8(builder, vals[0]))


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


def _ir_sum_parts(builder, parts, i, xp):
    """<16 x i32>: the scaled int8 dots of a 256-block's unpacked parts, each
    (offset, u, scale): 64 unsigned weights u against activations offset .. offset + 63."""
    v64 = llir.VectorType(_I8, 64)
    xo = builder.mul(i, _c64(256))
    tot = llir.Constant(llir.VectorType(_I32, 16), [0] * 16)
    for off, u, scale in parts:
        tot = _ir_dot4(builder, tot, u, _ir_vload(builder, xp, builder.add(xo, _c64(off)), v64, 1), scale)
    return tot


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


_CAT64 = _vc(_I32, 64, list(range(64)))


def _ir_crumbs(builder, qs):
    """<32 x i8> bytes -> the four 2-bit fields of each: [(qs >> 2k) & 3 for k < 4]."""
    return [builder.and_(builder.lshr(qs, _vc(_I8, 32, 2 * k)), _vc(_I8, 32, 3)) for k in range(4)]


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


def _q3_k_unpack(builder, i, wp):
    # Q3_K (layout at _rdot_q3_k): hmask[32], qs[64] at 32, scales at 96, d at 108.
    # q = (2-bit field of qs, as Q2_K) + 4 * (bit 4h + k of hmask[l]) - 4: the
    # unsigned u = q + 4 (0..7) meets the activations, the 4 comes off with xsum16.
    o = builder.mul(i, _c64(110))
    d = _ir_f16(builder, wp, builder.add(o, _c64(108)))
    sc8 = _ir_q3_k_scales(builder, wp, o)
    hm = _ir_bytes(builder, wp, o, 0, 32)
    parts = []
    for h in range(2):
        c = _ir_crumbs(builder, _ir_bytes(builder, wp, o, 32 + 32 * h, 32))
        u = [builder.or_(c[k], builder.shl(builder.and_(builder.lshr(hm, _vc(_I8, 32, 4 * h + k)), _vc(_I8, 32, 1)),
                                           _vc(_I8, 32, 2))) for k in range(4)]
        for p in range(2):
            parts.append((128 * h + 64 * p, builder.shuffle_vector(u[2 * p], u[2 * p + 1], _CAT64),
                          (builder.sext(sc8, llir.VectorType(_I16, 16)), [8 * h + 4 * p + lane // 4 for lane in range(16)])))
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


def _ir_abs_i8(builder, q):
    """|q| of <32 x i8>; -128 stays 0x80, which the unsigned operand reads as 128."""
    fn = cgutils.get_or_insert_function(builder.module, llir.FunctionType(q.type, [q.type, llir.IntType(1)]),
                                        "llvm.abs.v32i8")
    return builder.call(fn, [q, llir.Constant(llir.IntType(1), 0)])


def _ir_sign_i8(builder, x, q):
    """x with the sign of q lane by lane (0 where q is 0): vpsignb on x86, else a
    select (lanes where q is 0 meet |q| = 0, so either value is right there)."""
    if _MADDUBS:
        fn = cgutils.get_or_insert_function(builder.module, llir.FunctionType(x.type, [x.type, x.type]),
                                            "llvm.x86.avx2.psign.b")
        return builder.call(fn, [x, q])
    neg = builder.icmp_signed("<", q, _vc(_I8, 32, 0))
    return builder.select(neg, builder.sub(_vc(_I8, 32, 0), x), x)


def _legacy_dot_intrinsic(kind):
    """Whole-row dots of a legacy-format row (kind q4_0, q4_1, q5_0, q5_1, q8_0 or
    iq4_nl, whose nibbles look up int8 weights in IQ4's table)
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
            q = _ir_kvalues_i8(builder, q)
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
_qdot_iq4_nl = _legacy_dot_intrinsic("iq4_nl")
_qdot_iq4_xs = _kdot_intrinsic(_iq4_xs_unpack, _iq4_xs_dot)
_qdot_q4_k = _kdot_intrinsic(_k4_unpack(False), _q4_k_dot)
_qdot_q5_k = _kdot_intrinsic(_k4_unpack(True), _q4_k_dot)  # same dot: 5-bit q, same scales
_qdot_q6_k = _kdot_intrinsic(_q6_k_unpack, _q6_k_dot)
_qdot_q2_k = _kdot_intrinsic(_q2_k_unpack, _q2_k_dot)
_qdot_q3_k = _kdot_intrinsic(_q3_k_unpack, _q3_k_dot)


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


# With this many activation rows or fewer (token-by-token decode), matmul runs the
# fused row dots; with more (batched prefill), each 256-weight chunk of a row is
# decoded once into a thread-local buffer and dotted with every row of X.
# Measured on one Zen 4 core (tools/bench_dequant.py): fused 4-18 GFLOP/s vs
# 3-8 via the buffer at n=1; at n=2 the buffer already wins for most formats.
FUSED_MAX_N = 1


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
# Batches this large or larger take the int16 tiles.  Decoding a weight into the
# interleaved int16 tile costs more than the float decode, which pays off only
# when enough rows share it.  Single matmuls cross over at 16-32 rows (2 threads,
# us, int16 vs float: Q4_K 1536 x 512 at n = 16 142 vs 107, n = 24 163 vs 156,
# n = 32 184 vs 224); whole prefills of the Q4_K_M bench model at 32 (pp24 float
# 1099 vs int16 938 t/s, pp32 int16 1080 vs float 1022).
I16_MIN_N = 32
# Activation rows per tile: each holds a 16-lane int32 accumulator, one register
# with AVX-512; AVX2's sixteen 256-bit registers fit six such rows beside the
# weight pair and the broadcast (eight spilled to the stack: 79 instructions per
# column pair instead of 34).  The sums do not depend on it.
_I16_T = 8 if _target_has("avx512f") else 6
_X16_MAX = 16383.0  # |x| <= 2^14 - 1: 8 products of |w| <= 4096 per int32 lane stay < 2^31


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


# Weight tiles.  Each of the tile's rows is decoded into a row-major scratch
# tmp[row][256] by vector IR (one block body per format, integers with the
# sub-block scales folded in), then tmp, seen as int32 column pairs [16][128], is
# transposed into the tile's [pair][row] order 16 x 16 at a time with shuffles.
# The float block scales and the minimums come from the numba part (_dec16).

def _q4_0_body16(builder, sp, o, dp, out):
    q = builder.zext(_ir_nibbles(builder, _ir_bytes(builder, sp, o, 2, 16)), llir.VectorType(_I16, 32))
    _ir_vstore(builder, builder.sub(q, _vc(_I16, 32, 8)), dp, out, 2)


def _q4_1_body16(builder, sp, o, dp, out):
    q = builder.zext(_ir_nibbles(builder, _ir_bytes(builder, sp, o, 4, 16)), llir.VectorType(_I16, 32))
    _ir_vstore(builder, q, dp, out, 2)


def _q8_0_body16(builder, sp, o, dp, out):
    _ir_vstore(builder, builder.sext(_ir_bytes(builder, sp, o, 2, 32), llir.VectorType(_I16, 32)), dp, out, 2)


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


def _q6_k_body16(builder, sp, o, dp, out):
    sc = builder.sext(_ir_bytes(builder, sp, o, 192, 16), llir.VectorType(_I16, 16))
    for h in range(2):
        for s_, u in enumerate(_ir_q6_k_half(builder, sp, o, h)):
            q = builder.sub(builder.zext(u, llir.VectorType(_I16, 64)), _vc(_I16, 64, 32))
            v = builder.mul(q, _ir_lanes(builder, sc, [8 * h + 4 * s_ + lane // 16 for lane in range(64)]))
            _ir_vstore(builder, v, dp, builder.add(out, _c64(128 * h + 64 * s_)), 2)


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


def _q2_k_body16(builder, sp, o, dp, out):
    """Q2_K: sc_s * q per sub-block s of 16 (|.| <= 45; the minimums go to mn)."""
    sc = builder.zext(builder.and_(_ir_bytes(builder, sp, o, 0, 16), _vc(_I8, 16, 15)), llir.VectorType(_I16, 16))
    for h in range(2):
        for k, q in enumerate(_ir_crumbs(builder, _ir_bytes(builder, sp, o, 16 + 32 * h, 32))):
            v = builder.mul(builder.zext(q, llir.VectorType(_I16, 32)),
                            _ir_lanes(builder, sc, [8 * h + 2 * k + lane // 16 for lane in range(32)]))
            _ir_vstore(builder, v, dp, builder.add(out, _c64(128 * h + 32 * k)), 2)


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


_d16_q4_0 = _ir_decoder(18, 32, _q4_0_body16, _I16)
_d16_q5_0 = _ir_decoder(22, 32, _q5_body16(True), _I16)
_d16_q5_1 = _ir_decoder(24, 32, _q5_body16(False), _I16)
_d16_iq4_nl = _ir_decoder(18, 32, _iq4_nl_body16, _I16)
_d16_iq4_xs = _ir_decoder(136, 256, _iq4_xs_body16, _I16)
_d16_q4_1 = _ir_decoder(20, 32, _q4_1_body16, _I16)
_d16_q8_0 = _ir_decoder(34, 32, _q8_0_body16, _I16)
_d16_q4_k = _ir_decoder(144, 256, _k_body16(False), _I16)
_d16_q5_k = _ir_decoder(176, 256, _k_body16(True), _I16)
_d16_q6_k = _ir_decoder(210, 256, _q6_k_body16, _I16)
_d16_q2_k = _ir_decoder(84, 256, _q2_k_body16, _I16)
_d16_q3_k = _ir_decoder(110, 256, _q3_k_body16, _I16)


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

    @njit(parallel=True, cache=True)
    def dequantize(type_id, src, n_blocks, dst):
        _dequantize_body(T, src, n_blocks, dst)

    @njit(parallel=True, cache=True)
    def fused(type_id, W, X, out, act_q8):
        _fused_body(T, W, X, out, act_q8)

    @njit(parallel=True, cache=True)
    def chunked(type_id, W, X, out):
        _chunked_body(T, W, X, out)

    @njit(parallel=True, cache=True, fastmath=_FM)
    def i16(type_id, W, xq, xd, xs, out):
        _i16_body(T, W, xq, xd, xs, out)

    return Kernels(dequantize, fused, chunked, i16 if T in _I16_TYPES else None)


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
def kernel_addresses(type_id: int) -> tuple[int, int, int]:
    """(fused, chunked, i16) entry addresses of one format's kernels, compiling them
    (or loading them from numba's cache) on first use; i16 is 0 for a format
    without int16 tiles.  The kernels stay alive in kernels()'s cache."""
    k = kernels(type_id)
    return (_address(k.fused, SIG_FUSED), _address(k.chunked, SIG_CHUNKED),
            _address(k.i16, SIG_I16) if k.i16 is not None else 0)


def _cached(kernel, sig) -> bool:
    """Whether numba's disk cache already holds kernel compiled for sig (so that
    kernel_addresses would load it, not compile it)."""
    try:
        return sig.args in kernel.overloads or kernel._cache.load_overload(sig, kernel.targetctx) is not None
    except Exception:  # numba internals moved: say "not cached", which only costs time
        return False


def _jobs(type_ids):
    """(kernel, signature) of every kernel kernel_addresses compiles for these formats."""
    out = []
    for t in sorted({int(t) for t in type_ids}):
        k = kernels(t)
        out += [(k.fused, SIG_FUSED), (k.chunked, SIG_CHUNKED)] + ([(k.i16, SIG_I16)] if k.i16 else [])
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
