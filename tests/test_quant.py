"""runtime.quant: every block format decoded bit for bit like gguf.quants, and the
fused dot / matvec / matmul agreeing with float64 dequantize-then-matmul.

Bit for bit means np.array_equal on the float32 bit patterns.  The one exception
is a NaN produced by arithmetic on a NaN/inf scale (random bytes in an f16 scale
field): IEEE leaves the sign/payload of such a NaN to the hardware, so there we
compare with equal_nan=True on values and bitwise on every finite result.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from runtime import quant  # noqa: E402
from runtime.quant import ir as qir, matmuls as qmm  # noqa: E402  (internals under test)

TYPES = sorted(quant._SUPPORTED)
NAMES = {t: quant.type_name(t) for t in TYPES}

# Byte offsets of the f16 fields (scales and mins) inside one block.
F16_FIELDS = {
    quant.GGML_Q4_0: (0,), quant.GGML_Q4_1: (0, 2), quant.GGML_Q5_0: (0,),
    quant.GGML_Q5_1: (0, 2), quant.GGML_Q8_0: (0,), quant.GGML_Q2_K: (80, 82),
    quant.GGML_Q3_K: (108,), quant.GGML_Q4_K: (0, 2), quant.GGML_Q5_K: (0, 2),
    quant.GGML_Q6_K: (208,), quant.GGML_IQ4_NL: (0,), quant.GGML_IQ4_XS: (0,),
}
PLAIN = (quant.GGML_F32, quant.GGML_F16, quant.GGML_BF16)

# f16 bit patterns the scales are forced to: zero, -0, smallest/largest subnormal
# (both signs), negative normals, the largest finite half, small positives.
SPECIAL_F16 = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x8001, 0x83FF, 0xBC00, 0xC500,
                        0x7BFF, 0xFBFF, 0x0400, 0x1A8F, 0x2E66, 0x3C00], dtype=np.uint16)


def _ref(raw: np.ndarray, tid: int) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(tid))


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _random_raw(tid: int, n_rows: int, blocks_per_row: int, rng, scales=None) -> np.ndarray:
    ts = quant.type_size(tid)
    raw = rng.integers(0, 256, size=(n_rows * blocks_per_row, ts), dtype=np.uint8)
    if scales is not None:
        for off in F16_FIELDS.get(tid, ()):
            pick = rng.choice(scales, size=raw.shape[0])
            raw[:, off:off + 2] = pick.astype("<u2").view(np.uint8).reshape(-1, 2)
    return raw.reshape(n_rows, blocks_per_row * ts)


def _finite_scales(rng, n=64) -> np.ndarray:
    """Small finite f16 scale patterns (so products stay well inside float32)."""
    return (rng.standard_normal(n) * 0.02).astype(np.float16).view(np.uint16)


def test_f16_conversion_all_65536_patterns():
    halves = np.arange(65536, dtype=np.uint16)
    ours = quant.dequantize(halves.view(np.uint8), quant.GGML_F16, (65536,))
    ref = halves.view(np.float16).astype(np.float32)
    assert _bits_equal(ours, ref)  # subnormals, +-0, +-inf, quiet and signalling NaN payloads


@pytest.mark.parametrize("tid", TYPES, ids=NAMES.get)
def test_random_blocks_special_scales_bit_exact(tid):
    rng = np.random.default_rng(tid)
    bpr = 3 if quant.block_size(tid) > 1 else 96
    raw = _random_raw(tid, 40, bpr, rng, scales=SPECIAL_F16)
    ref = _ref(raw, tid)
    ours = quant.dequantize(raw, tid, ref.shape)
    assert ours.dtype == np.float32
    if tid in PLAIN:
        assert _bits_equal(ours, ref)  # random bytes, NaN payloads included
    else:
        assert np.isfinite(ref).all()
        assert _bits_equal(ours, ref)
        # every special scale really occurred
        seen = set(raw.reshape(-1, quant.type_size(tid))[:, F16_FIELDS[tid][0]:][:, :2]
                   .copy().view("<u2").ravel().tolist())
        assert len(seen) == len(SPECIAL_F16)


@pytest.mark.parametrize("tid", [t for t in TYPES if t not in PLAIN], ids=NAMES.get)
def test_random_blocks_any_bytes_incl_nan_inf_scales(tid):
    rng = np.random.default_rng(1000 + tid)
    raw = _random_raw(tid, 64, 4, rng)
    # make sure inf and nan scales are in there, not left to chance
    ts = quant.type_size(tid)
    blocks = raw.reshape(-1, ts)
    off = F16_FIELDS[tid][0]
    for k, bits in enumerate((0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE00)):
        blocks[k, off:off + 2] = np.array([bits], "<u2").view(np.uint8)
    ref = _ref(raw, tid)
    ours = quant.dequantize(raw, tid, ref.shape)
    assert not np.isfinite(ref).all()
    assert np.array_equal(ours, ref, equal_nan=True)
    fin = np.isfinite(ref)
    assert _bits_equal(ours[fin], ref[fin])
    assert np.array_equal(np.isnan(ours), np.isnan(ref))


@pytest.fixture(scope="session")
def real_models(smollm2_path, gemma3_path):
    from runtime.gguf import GGUFFile

    files = [GGUFFile(smollm2_path), GGUFFile(gemma3_path)]
    yield files
    for f in files:
        f.close()


def test_every_tensor_of_both_real_models_bit_exact(real_models):
    seen_types = set()
    n_tensors = 0
    for f in real_models:
        for name, t in f.tensors.items():
            raw = f.raw(name)
            # big tensors (token embeddings) in slices of rows: bounded memory
            step = max(1, (16 << 20) // max(1, raw.shape[1]))
            for r0 in range(0, raw.shape[0], step):
                part = raw[r0:r0 + step]
                ref = _ref(part, t.type_id)
                ours = quant.dequantize(part, t.type_id, ref.shape)
                assert _bits_equal(ours, ref), (f.path.name, name, t.type_name, r0)
            seen_types.add(t.type_name)
            n_tensors += 1
    assert {"Q4_1", "Q8_0", "F32", "Q4_K", "Q6_K", "Q5_0"} <= seen_types
    assert n_tensors > 300


def test_dequantize_returns_requested_shape(real_models):
    f = real_models[0]
    name = next(n for n, t in f.tensors.items() if len(t.shape) == 1)
    t = f.tensors[name]
    out = quant.dequantize(f.raw(name), t.type_id, t.shape)
    assert out.shape == t.shape and out.dtype == np.float32


def _cols_for(tid: int) -> int:
    bs = quant.block_size(tid)
    if bs == 1:
        return 301          # not a multiple of 32 or of the 256-value chunk
    if bs == 32:
        return 32 * 11      # a partial last chunk
    return 256 * 3


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |diff| / max |ref| per output vector (row of out), worst over vectors."""
    got = np.atleast_2d(got).astype(np.float64)
    ref = np.atleast_2d(ref)
    return float((np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)).max())


@pytest.mark.parametrize("tid", TYPES, ids=NAMES.get)
def test_fused_kernels_match_float64_reference(tid):
    rng = np.random.default_rng(2000 + tid)
    cols = _cols_for(tid)
    rows = 37
    bs = quant.block_size(tid)
    if tid in PLAIN:
        vals = rng.standard_normal((rows, cols)).astype(np.float32)
        if tid == quant.GGML_F32:
            W = vals.view(np.uint8)
        elif tid == quant.GGML_F16:
            W = vals.astype(np.float16).view(np.uint8)
        else:
            W = (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        W = _random_raw(tid, rows, cols // bs, rng, scales=_finite_scales(rng))
    Wd = _ref(W, tid).astype(np.float64)
    assert Wd.shape == (rows, cols) and np.isfinite(Wd).all()

    for n in (1, 3, 17):
        X = rng.standard_normal((n, cols)).astype(np.float32)
        out = np.full((n, rows), np.nan, np.float32)
        quant.matmul(tid, qmm._as_u8_readonly(W, 2), X, out)
        ref = X.astype(np.float64) @ Wd.T
        assert _rel_err(out, ref) < 1e-5, (n, _rel_err(out, ref))

    x = rng.standard_normal(cols).astype(np.float32)
    ref = Wd @ x.astype(np.float64)
    mv = quant.matvec(tid, W, x)
    assert mv.shape == (rows,) and mv.dtype == np.float32
    assert _rel_err(mv, ref) < 1e-5
    d = quant.dot(tid, W[5], x)
    assert abs(d - ref[5]) <= 1e-5 * np.abs(Wd[5] * x).sum()


def _weights_for(tid, rows, cols, rng):
    if tid in PLAIN:
        vals = rng.standard_normal((rows, cols)).astype(np.float32)
        if tid == quant.GGML_F32:
            return vals.view(np.uint8)
        if tid == quant.GGML_F16:
            return vals.astype(np.float16).view(np.uint8)
        return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    return _random_raw(tid, rows, cols // quant.block_size(tid), rng, scales=_finite_scales(rng))


def _q8_blocks(x, bs, with_s=False):
    """numpy model of quant.quantize_q8: per bs values d = amax/127, q = rint(x*127/amax);
    blocks of 32 keep ggml's fp16 d (Q8_0 / Q8_1) and s = half(d * sum(q)) (Q8_1)."""
    xb = x.reshape(-1, bs)
    amax = np.abs(xb).max(1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(xb * inv[:, None])
    d = (amax / np.float32(127)).astype(np.float32)
    s = (d * q.sum(1).astype(np.float32)).astype(np.float16).astype(np.float32)
    if bs == 32:
        d = d.astype(np.float16).astype(np.float32)
    return (q, d, s) if with_s else (q, d)


def _q8_model(W, tid, x):
    """float64 model of the int8 product W . x as ggml computes it: x in int8 blocks
    (of 256 for k-quants, Q8_K; of 32 for the legacy formats, Q8_0 / Q8_1), the Q4_1 /
    Q5_1 minimums multiplied by Q8_1's fp16 s instead of d * sum(q)."""
    bs = 256 if qmm._is_k(tid) else 32
    qx, d, s = _q8_blocks(x, bs, with_s=True)
    Wd = _ref(W, tid).astype(np.float64)
    model = Wd @ (qx * d[:, None].astype(np.float64)).reshape(-1)
    if tid in (quant.GGML_Q4_1, quant.GGML_Q5_1):
        bsz = quant.type_size(tid)
        blocks = np.asarray(W).reshape(W.shape[0], -1, bsz)
        m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)  # [rows, blocks]
        model += m @ (s.astype(np.float64) - d.astype(np.float64) * qx.sum(1))
    return model


@pytest.mark.parametrize("tid", TYPES, ids=NAMES.get)
def test_matmul_q8_decode_path(tid):
    """The engine's decode matvec (8-bit activations for Q4_0/Q4_1/Q8_0/Q4_K/Q6_K):
    exact on activations that int8 blocks represent exactly, equal to a numpy model
    of the rounding otherwise, and within Q8 rounding of the float result."""
    rng = np.random.default_rng(3000 + tid)
    cols = _cols_for(tid)
    rows = 37
    W = qmm._as_u8_readonly(_weights_for(tid, rows, cols, rng), 2)
    Wd = _ref(W, tid).astype(np.float64)
    out = np.full((1, rows), np.nan, np.float32)

    # integers in [-127, 127] with one of them +-127 per 32 (so per 256), times a power of two
    q = rng.integers(-127, 128, cols).astype(np.float32)
    q[::32] = 127 * np.sign(q[::32] + 0.5)
    x = (q * np.float32(2.0 ** -7)).reshape(1, cols)
    quant.matmul_q8(tid, W, x, out)
    exact_model = _q8_model(W, tid, x[0]) if qmm._has_q8_dot(tid) else Wd @ x[0].astype(np.float64)
    assert _rel_err(out, exact_model[None]) < 1e-5
    if tid not in (quant.GGML_Q4_1, quant.GGML_Q5_1):  # only Q8_1's fp16 s rounds these
        assert _rel_err(out, x.astype(np.float64) @ Wd.T) < 1e-5

    x = rng.standard_normal((1, cols)).astype(np.float32)
    quant.matmul_q8(tid, W, x, out)
    exact = x.astype(np.float64) @ Wd.T
    assert _rel_err(out, exact) < 3e-2
    if qmm._has_q8_dot(tid):
        # the whole product with x rounded to int8 blocks: of 256 for k-quants (llama.cpp's
        # Q8_K), of 32 for the legacy formats (Q8_0 / Q8_1)
        assert _rel_err(out, _q8_model(W, tid, x[0])[None]) < 1e-5


@pytest.mark.parametrize("tid", [t for t in TYPES if qmm._has_q8_dot(t)], ids=NAMES.get)
def test_multi_row_decode_is_batch_invariant(tid):
    """Decode of several sequences in one step (2..16 activation rows): each weight
    block unpacked once for all rows, and every row's result bit for bit what it is
    alone - the server's batching must not change what a sequence computes."""
    rng = np.random.default_rng(6000 + tid)
    cols = _cols_for(tid)
    rows = 45
    W = qmm._as_u8_readonly(_weights_for(tid, rows, cols, rng), 2)
    X = (rng.standard_normal((quant.Q8_MAX_ROWS, cols)) * rng.uniform(0.1, 10, (quant.Q8_MAX_ROWS, 1))).astype(np.float32)
    alone = np.empty((quant.Q8_MAX_ROWS, rows), np.float32)
    for r in range(quant.Q8_MAX_ROWS):
        quant.matmul_q8(tid, W, X[r:r + 1], alone[r:r + 1])
    for n in (2, 3, 7, quant.Q8_MAX_ROWS):
        out = np.full((n, rows), np.nan, np.float32)
        quant.matmul_q8(tid, W, np.ascontiguousarray(X[:n]), out)
        np.testing.assert_array_equal(out, alone[:n])
    # and it is the int8 model of the product, not another path's float result
    for r in (0, quant.Q8_MAX_ROWS - 1):
        assert _rel_err(alone[r:r + 1], _q8_model(W, tid, X[r])[None]) < 1e-5


I16_TYPES = [t for t in TYPES if qmm._has_i16(t)]


@pytest.mark.parametrize("tid", I16_TYPES, ids=NAMES.get)
def test_matmul_q8_prefill_path(tid):
    """The engine's batched matmul (int16 tiles, activations rounded to 14 bits per
    256): exact where int16 represents x exactly, within that rounding otherwise;
    a short last tile (37 rows), batch sizes off the 8-row tile, a partial chunk."""
    rng = np.random.default_rng(4000 + tid)
    cols = _cols_for(tid)
    rows = 37
    W = qmm._as_u8_readonly(_weights_for(tid, rows, cols, rng), 2)
    Wd = _ref(W, tid).astype(np.float64)
    def int16_matmul(X, out):  # matmul_q8 takes this path from I16_MIN_N rows on
        if X.shape[0] >= quant.I16_MIN_N:
            quant.matmul_q8(tid, W, X, out)
        else:
            quant.kernels(tid).i16(tid, W, *quant.quantize_x16_rows(X), out)

    for n in (2, 9, 17, quant.I16_MIN_N + 9):
        # integers with |q| <= 16383, one +-16383 per 256-value chunk, times 2^-14
        q = rng.integers(-16383, 16384, (n, cols)).astype(np.float32)
        q[:, ::256] = 16383 * np.sign(q[:, ::256] + 0.5)
        X = q * np.float32(2.0 ** -14)
        out = np.full((n, rows), np.nan, np.float32)
        int16_matmul(X, out)
        assert _rel_err(out, X.astype(np.float64) @ Wd.T) < 1e-5, n
        X = rng.standard_normal((n, cols)).astype(np.float32)
        int16_matmul(X, out)
        assert _rel_err(out, X.astype(np.float64) @ Wd.T) < 3e-4, n


Q8_KERNELS = {quant.GGML_Q4_0: quant.legacy._qdot_q4_0, quant.GGML_Q4_1: quant.legacy._qdot_q4_1,
              quant.GGML_Q5_0: quant.legacy._qdot_q5_0, quant.GGML_Q5_1: quant.legacy._qdot_q5_1,
              quant.GGML_Q8_0: quant.legacy._qdot_q8_0, quant.GGML_Q4_K: quant.q4_k._qdot_q4_k,
              quant.GGML_Q5_K: quant.q4_k._qdot_q5_k, quant.GGML_Q6_K: quant.q6_k._qdot_q6_k,
              quant.GGML_IQ4_NL: quant.iq4._qdot_iq4_nl, quant.GGML_IQ4_XS: quant.iq4._qdot_iq4_xs,
              quant.GGML_Q2_K: quant.q2_k._qdot_q2_k, quant.GGML_Q3_K: quant.q3_k._qdot_q3_k}


@pytest.mark.parametrize("tid", sorted(Q8_KERNELS), ids=NAMES.get)
def test_q8_dot_without_vnni(tid, monkeypatch):
    """The whole-row int8 dots use vpdpbusd on AVX-512 VNNI CPUs, vpmaddubsw on AVX2
    ones; the plain IR they fall back to elsewhere must give the same integers (same
    result bits) - each branch the host can run is forced in turn."""
    from numba import njit

    rng = np.random.default_rng(5000 + tid)
    bs = 256 if quant.block_size(tid) == 256 else 32
    cols = 256 * 3
    w = qmm._as_u8_readonly(_weights_for(tid, 1, cols, rng), 2)[0]
    xq = np.empty(cols, np.int8)
    xd = np.empty(cols // bs, np.float32)
    xs = np.empty(cols // 16, np.int32)
    xsd = np.empty(cols // 32 if bs == 32 else 0, np.float32)
    x = rng.standard_normal(cols).astype(np.float32)
    quant.quantize_q8(x, bs, xq, xd, xs, xsd)
    if tid in (quant.GGML_Q4_1, quant.GGML_Q5_1):
        xs = xsd  # the minimums' kernels take Q8_1's s per block
    kernel = Q8_KERNELS[tid]
    nb = cols // quant.block_size(tid)

    def build():
        def one(w, xq, xd, xs):
            out = np.empty((1, 1), np.float32)
            kernel(w.reshape((1, -1)), 0, 1, xq.reshape((1, -1)), xd.reshape((1, -1)), xs.reshape((1, -1)), nb, out)
            return out[0, 0]
        return njit(one)

    branches = [(False, False)]  # plain IR
    if qir._target_has("avx2"):
        branches.append((False, True))
    if qir._VNNI512:
        branches.append((True, False))
    results = []
    for vnni, maddubs in branches:
        monkeypatch.setattr(qir, "_VNNI512", vnni)
        monkeypatch.setattr(qir, "_MADDUBS", maddubs)
        results.append(build()(w, xq, xd, xs))
    assert len(set(results)) == 1, dict(zip(branches, results))
    # the extreme operands a saturating int16 pair sum would get wrong
    if tid == quant.GGML_Q8_0:
        w2 = w.copy()
        for b in range(nb):
            w2[34 * b + 2:34 * b + 34] = 0x80  # q = -128: |q| = 128 as the unsigned operand
        xq2 = np.full(cols, -127, np.int8)
        extremes = []
        for vnni, maddubs in branches:
            monkeypatch.setattr(qir, "_VNNI512", vnni)
            monkeypatch.setattr(qir, "_MADDUBS", maddubs)
            extremes.append(build()(w2, xq2, xd, xs))
        assert len(set(extremes)) == 1, extremes
    Wd = _ref(w.reshape(1, -1), tid).astype(np.float64)[0]
    model = _q8_model(w.reshape(1, -1), tid, x)[0]
    assert abs(results[1] - model) <= 1e-5 * np.abs(Wd).sum() * np.abs(xd).max() * 127


def test_fused_kernels_on_real_weights(real_models):
    """matvec (fused) and batched matmul on 64 rows of one real matrix per type and file."""
    rng = np.random.default_rng(11)
    checked = set()
    for f in real_models:
        for name, t in f.tensors.items():
            if len(t.shape) != 2 or (f.path.name, t.type_id) in checked:
                continue
            checked.add((f.path.name, t.type_id))
            W = f.raw(name)[:64]
            Wd = _ref(W, t.type_id).astype(np.float64)
            X = rng.standard_normal((3, t.shape[1])).astype(np.float32)
            out = np.empty((3, W.shape[0]), np.float32)
            quant.matmul(t.type_id, W, X, out)
            assert _rel_err(out, X.astype(np.float64) @ Wd.T) < 1e-5, (name, t.type_name)
            mv = quant.matvec(t.type_id, W, X[0])
            assert _rel_err(mv, Wd @ X[0].astype(np.float64)) < 1e-5, (name, t.type_name)
    assert {t for _, t in checked} >= {3, 6, 8, 12, 14}  # Q4_1 Q5_0 Q8_0 Q4_K Q6_K


def test_matmul_callable_from_other_njit_code():
    """The engine's compiled forward pass calls a format's kernels through their
    addresses (quant.matmul_at / matmul_q8_at): every path (fused row dots, decoded
    chunks, int16 tiles) gives what the Python entry gives for the same input."""
    from numba import njit

    @njit
    def project(t, k, W, X, out, exact):
        if exact:
            quant.matmul_at(t, k, W, X, out)
        else:
            quant.matmul_q8_at(t, k, W, X, out)
        return out.sum()

    rng = np.random.default_rng(7)
    for t in (quant.GGML_Q4_0, quant.GGML_Q4_K):
        cols = 256
        W = qmm._as_u8_readonly(_random_raw(t, 9, cols // quant.block_size(t), rng, _finite_scales(rng)), 2)
        k = np.array(quant.kernel_addresses(t), np.int64)
        for n in (1, 2, quant.I16_MIN_N + 1):
            X = rng.standard_normal((n, cols)).astype(np.float32)
            for exact in (True, False):
                out = np.zeros((n, 9), np.float32)
                want = np.zeros((n, 9), np.float32)
                project(t, k, W, X, out, exact)
                (quant.matmul if exact else quant.matmul_q8)(t, W, X, want)
                np.testing.assert_array_equal(out, want)
                if exact:
                    ref = X.astype(np.float64) @ _ref(W, t).astype(np.float64).T
                    assert _rel_err(out, ref) < 1e-5


def test_kernel_call_checks_its_types():
    """A call through a kernel's address with other argument types than the kernel
    was compiled for is a typing error, not a wrong call."""
    from numba import njit
    from numba.core.errors import TypingError

    @njit
    def wrong(k, W, X, out):
        qmm._call_fused(k[0], quant.GGML_Q4_0, W, X, out, True)

    W = np.zeros((2, 18), np.uint8)
    W.flags.writeable = False
    with pytest.raises(TypingError, match="the kernel takes"):
        wrong(np.zeros(3, np.int64), W, np.zeros((1, 32), np.float64), np.zeros((1, 2), np.float32))


def test_traits():
    assert quant.type_name(12) == "Q4_K" and quant.block_size(12) == 256
    assert quant.type_size(12) == 144 and quant.row_nbytes(12, 512) == 288
    for tid in TYPES:
        bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tid)]
        assert (quant.block_size(tid), quant.type_size(tid)) == (bs, ts)
        assert quant.type_name(tid) == gguf.GGMLQuantizationType(tid).name
        assert quant.is_supported(tid)
    with pytest.raises(ValueError, match="multiple"):
        quant.row_nbytes(quant.GGML_Q8_0, 33)


@pytest.mark.parametrize("tid,name", [(16, "IQ2_XXS"), (9, "Q8_1"), (35, "TQ2_0"), (99, "99")])
def test_unsupported_type_is_a_clear_error(tid, name):
    assert not quant.is_supported(tid)
    with pytest.raises(quant.UnsupportedType, match=name):
        quant.dequantize(np.zeros(64, np.uint8), tid, (32,))
    with pytest.raises(ValueError, match=name):
        quant.matvec(tid, np.zeros((1, 64), np.uint8), np.zeros(32, np.float32))


def test_size_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="bytes"):
        quant.dequantize(np.zeros(17, np.uint8), quant.GGML_Q4_0, (32,))
    with pytest.raises(ValueError, match="multiple"):
        quant.dequantize(np.zeros(18, np.uint8), quant.GGML_Q4_0, (31,))
    with pytest.raises(ValueError, match="bytes"):
        quant.matvec(quant.GGML_Q4_0, np.zeros((2, 17), np.uint8), np.zeros(32, np.float32))


def test_tile_transpose():
    """The int16 tile's column-pair transpose: wb[p, a] (as int32 pairs) = tmp[a, p]
    for the first P pairs, nothing past them touched."""
    from numba import njit

    transpose = njit(lambda tmp, wb, P: qmm._tile_transpose(tmp, wb, P))
    rng = np.random.default_rng(6000)
    tmp = rng.integers(-2**15, 2**15, 16 * 256).astype(np.int16)
    for P in (16, 48, 128):
        wb = np.full((128, 16, 2), 7, np.int16)
        transpose(tmp, wb, P)
        want = tmp.view(np.int32).reshape(16, 128).T
        got = wb.view(np.int32).reshape(128, 16)
        assert np.array_equal(got[:P], want[:P]), P
        assert np.all(wb[P:] == 7), P
