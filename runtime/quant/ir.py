"""Building blocks shared by every format's kernels: scalar f16 / bf16 / f32 bit
casts, LLVM vector IR helpers (loads, lanes, splats, the block-decoder loop), and
the integer dot machinery of decode: the u8 x s8 dot-of-four (vpdpbusd on
AVX-512 VNNI, vpmaddubsw + vpmaddwd on AVX2, plain IR elsewhere) and the
whole-row dot loop that every format's int8 dot plugs its unpack / dot halves into.
What differs per format lives in that format's module."""

from __future__ import annotations

import llvmlite.ir as llir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


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


def _ir_lane_scales(builder, src, lanes):
    """<16 x i16> with lane k = src[lanes[k]]: the multipliers vpmaddwd takes on AVX2.
    Where the lanes read one aligned window of 8 (every k-quant's sub-block scales
    for a 32-weight half), the window is first copied into both 128-bit halves
    behind an opaque barrier, so that the lanes come from it by one in-lane vpshufb
    (LLVM otherwise moved each scale to lane 0 and broadcast it: two instructions
    per sub-block, 8 of the 106 in Q4_K's block loop)."""
    lo = min(lanes) // 8 * 8
    if max(lanes) >= lo + 8 or src.type.count < lo + 8:
        return builder.shuffle_vector(src, src, _vc(_I32, 16, lanes))
    cache = builder.__dict__.setdefault("_scale_windows", {})  # one window per block and source
    key = (id(src), lo)
    if key not in cache:
        win = builder.shuffle_vector(src, src, _vc(_I32, 16, [lo + j % 8 for j in range(16)]))
        v16 = llir.VectorType(_I16, 16)
        cache[key] = (src, builder.asm(llir.FunctionType(v16, [v16]), "", _VREG, [win], False))
    win = cache[key][1]
    return builder.shuffle_vector(win, win, _vc(_I32, 16, [lanes[k] - lo + 8 * (k // 8) for k in range(16)]))


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
                mult = _ir_lane_scales(builder, src, [idx[8 * h + k // 2] for k in range(16)])
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


def _ir_sum_parts(builder, parts, i, xp):
    """<16 x i32>: the scaled int8 dots of a 256-block's unpacked parts, each
    (offset, u, scale): 64 unsigned weights u against activations offset .. offset + 63."""
    v64 = llir.VectorType(_I8, 64)
    xo = builder.mul(i, _c64(256))
    tot = llir.Constant(llir.VectorType(_I32, 16), [0] * 16)
    for off, u, scale in parts:
        tot = _ir_dot4(builder, tot, u, _ir_vload(builder, xp, builder.add(xo, _c64(off)), v64, 1), scale)
    return tot


_CAT64 = _vc(_I32, 64, list(range(64)))


def _ir_crumbs(builder, qs):
    """<32 x i8> bytes -> the four 2-bit fields of each: [(qs >> 2k) & 3 for k < 4]."""
    return [builder.and_(builder.lshr(qs, _vc(_I8, 32, 2 * k)), _vc(_I8, 32, 3)) for k in range(4)]


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
