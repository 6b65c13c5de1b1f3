"""`quantize`: our numba quantizer against llama.cpp's (llama_cpp.llama_model_quantize),
tensor by tensor, byte for byte: the per-tensor type choices of every mix and the block
bytes of every format, on synthetic llama / qwen2 / qwen3 files (F32, F16 and BF16
inputs; GQA 1 and 4; tied and untied output; row lengths that are and are not
multiples of 256) and on SmolLM2-135M dequantized to F16 by our own decoder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import _oracle  # noqa: F401  (puts tools/ on sys.path)
from make_synthetic import SynthSpec, write_synthetic

from runtime import quantize as rq
from runtime.gguf import GGUFFile

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "models" / "synthetic"
TEST_VERSION = "q1"  # bump when the inputs below change (their files are cached)


def _llamacpp_quantize(llama_cpp, src: Path, dst: Path, ftype: str) -> Path:
    from quantize import quantize  # tools/quantize.py

    if not dst.exists():
        quantize(src, dst, ftype, llama_cpp=llama_cpp, n_threads=2)
    return dst


def _cached(name: str, build) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"qtest-{TEST_VERSION}-{name}.gguf"
    if not path.exists():
        tmp = path.with_suffix(".part")
        build(tmp)
        tmp.replace(path)
    return path


def _patch_rows(path: Path, name: str, rows: dict) -> None:
    """Overwrite whole rows of an F32 tensor in place (edge cases for the searches)."""
    with GGUFFile(path) as g:
        t = g.tensors[name]
        off, shape = t.offset, t.shape
    mm = np.memmap(path, dtype=np.float32, mode="r+", offset=off, shape=shape)
    for r, values in rows.items():
        mm[r] = values
    mm.flush()
    del mm


def _edge_rows(n: int) -> dict:
    """Rows that hit every branch of the block searches: all zero, constant, one
    outlier among tiny values, all negative, tiny (denormal-range) values, a row
    whose first block is zero and the rest not, ties at quantization midpoints."""
    rng = np.random.default_rng(7)
    outlier = rng.standard_normal(n).astype(np.float32) * 1e-4
    outlier[5] = 30.0
    half = rng.standard_normal(n).astype(np.float32)
    half[:32] = 0.0
    half[256:288] = 0.0
    ties = (np.arange(n) % 17 - 8).astype(np.float32) * 0.25
    return {0: np.zeros(n, np.float32), 1: np.full(n, 0.5, np.float32), 2: outlier,
            3: -np.abs(rng.standard_normal(n)).astype(np.float32), 4: np.full(n, 3e-39, np.float32) *
            rng.standard_normal(n).astype(np.float32), 5: half, 6: ties,
            7: np.full(n, -2.0, np.float32)}


@pytest.fixture(scope="session")
def llama8() -> Path:
    """F32 llama, 8 layers (the per-layer rules of the mixes), GQA 1, untied, edge rows."""
    spec = SynthSpec(arch="llama", n_layers=8, d_model=256, n_heads=8, gqa=1, ffn=512, vocab=512)

    def build(p):
        write_synthetic(p, spec)
        _patch_rows(p, "blk.0.ffn_up.weight", _edge_rows(256))
        _patch_rows(p, "blk.1.ffn_down.weight", _edge_rows(512))

    return _cached("llama8-f32", build)


@pytest.fixture(scope="session")
def qwen2_f16() -> Path:
    """F16 qwen2, 4 layers, GQA 4 (the n_gqa >= 4 rules), tied output."""
    spec = SynthSpec(arch="qwen2", n_layers=4, d_model=256, n_heads=8, gqa=4, ffn=512, vocab=512,
                     tied=True)
    return _cached("qwen2-gqa4-tied-f16", lambda p: write_synthetic(p, spec, dtype=np.float16))


@pytest.fixture(scope="session")
def qwen3_bf16(llama_cpp) -> Path:
    """BF16 qwen3 (key_length 128 != d / heads), written by llama.cpp from F32."""
    spec = SynthSpec(arch="qwen3", n_layers=3, d_model=512, n_heads=8, gqa=2, head_dim=128,
                     ffn=768, vocab=512)
    f32 = _cached("qwen3-f32", lambda p: write_synthetic(p, spec))
    return _cached("qwen3-bf16", lambda p: _llamacpp_quantize(llama_cpp, f32, p, "BF16"))


@pytest.fixture(scope="session")
def odd_rows() -> Path:
    """F32 llama whose row lengths (d 384, ffn 640) are not multiples of 256: the
    fallbacks Q4_K -> Q5_0, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL ... and Q8_0 output."""
    spec = SynthSpec(arch="llama", n_layers=2, d_model=384, n_heads=6, gqa=3, ffn=640, vocab=320)
    return _cached("llama-odd-rows-f32", lambda p: write_synthetic(p, spec, any_rows=True))


@pytest.fixture(scope="session")
def smollm2_f16(smollm2_path) -> Path:
    """SmolLM2-135M (Q4_1) decoded by runtime.quant and stored as F16 by our quantizer."""
    return _cached("smollm2-f16", lambda p: rq.quantize_file(smollm2_path, p, "F16"))


def _assert_same_tensors(ours: Path, theirs: Path) -> None:
    with GGUFFile(ours) as a, GGUFFile(theirs) as b:
        assert list(a.tensors) == list(b.tensors), "tensor order differs from llama.cpp's"
        assert a.metadata["general.file_type"] == b.metadata["general.file_type"]
        assert a.metadata["general.quantization_version"] == b.metadata["general.quantization_version"]
        bad = []
        for name, tb in b.tensors.items():
            ta = a.tensors[name]
            if ta.type_id != tb.type_id:
                bad.append(f"{name}: ours {ta.type_name}, llama.cpp {tb.type_name}")
                continue
            assert ta.dims == tb.dims
            ra, rb = a.raw(name), b.raw(name)
            if not np.array_equal(ra, rb):
                from gguf.constants import GGML_QUANT_SIZES

                ts = GGML_QUANT_SIZES[tb.type_id][1]
                blocks = (ra.reshape(-1, ts) != rb.reshape(-1, ts)).any(axis=1)
                bad.append(f"{name} ({tb.type_name}): {int(blocks.sum())} of {blocks.size} blocks "
                           f"differ, first at block {int(np.argmax(blocks))}")
        assert not bad, f"{len(bad)} tensors differ:\n" + "\n".join(bad[:25])


# Every TYPE on the 8-layer llama; a subset on each other file (the full cross
# product would take minutes), chosen for the rules each file exercises.
CASES = [("llama8", t) for t in rq.FTYPES] + [
    ("qwen2_f16", t) for t in ("Q2_K", "Q3_K_M", "Q4_K_S", "Q5_K_M", "IQ4_NL", "IQ4_XS", "Q8_0",
                               "Q4_1", "BF16", "F32")
] + [
    ("qwen3_bf16", t) for t in ("Q3_K_L", "Q4_K_M", "Q5_K_S", "Q6_K", "Q5_0", "F16")
] + [
    ("odd_rows", t) for t in ("Q2_K", "Q3_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS")
] + [
    ("smollm2_f16", "Q4_K_M"),
]


@pytest.mark.parametrize("model,ftype", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_identical_to_llamacpp(request, llama_cpp, tmp_path, model, ftype):
    src = request.getfixturevalue(model)
    ours = rq.quantize_file(src, tmp_path / f"ours.{ftype}.gguf", ftype).path
    theirs = _llamacpp_quantize(llama_cpp, src, tmp_path / f"llamacpp.{ftype}.gguf", ftype)
    _assert_same_tensors(ours, theirs)


def test_pure_keeps_default_type_but_falls_back(odd_rows):
    with GGUFFile(odd_rows) as g:
        mixed = {p.name: p.dst_type for p in rq.plan(g, "Q4_K_M")}
        pure = {p.name: p.dst_type for p in rq.plan(g, "Q4_K_M", pure=True)}
    # d = 384: every Q4_K matrix falls back to Q5_0, the mix's Q6_K choices (output;
    # attn_v and ffn_down of the last layer of 2) to Q8_0; pure makes no Q6_K choices
    assert mixed["output.weight"] == rq.T_Q8_0 and pure["output.weight"] == rq.T_Q5_0
    assert mixed["blk.0.attn_v.weight"] == rq.T_Q5_0 == pure["blk.0.attn_v.weight"]
    assert mixed["blk.1.attn_v.weight"] == rq.T_Q8_0 and pure["blk.1.attn_v.weight"] == rq.T_Q5_0
    assert mixed["blk.1.ffn_down.weight"] == rq.T_Q8_0 and pure["blk.1.ffn_down.weight"] == rq.T_Q5_0
    assert pure["blk.0.attn_norm.weight"] == rq.T_F32 == mixed["blk.0.attn_norm.weight"]


@pytest.mark.parametrize("model,ftype", [("odd_rows", "Q4_K_M"), ("qwen2_f16", "Q3_K_M")])
def test_pure_identical_to_llamacpp(request, llama_cpp, tmp_path, model, ftype):
    from quantize import quantize

    src = request.getfixturevalue(model)
    ours = rq.quantize_file(src, tmp_path / "ours.gguf", ftype, pure=True).path
    theirs = quantize(src, tmp_path / "llamacpp.gguf", ftype, llama_cpp=llama_cpp, pure=True)
    _assert_same_tensors(ours, theirs)


def test_plan_rules_of_q4_k_m(llama8):
    """The documented Q4_K_M mix on 8 layers: Q6_K output, attn_v and ffn_down of
    layers 0, 3, 6, 7 (use_more_bits: the first and last eighth, every third between),
    Q4_K elsewhere, norms untouched."""
    with GGUFFile(llama8) as g:
        t = {p.name: p.dst_type for p in rq.plan(g, "Q4_K_M")}
    more = [i for i in range(8) if t[f"blk.{i}.attn_v.weight"] == rq.T_Q6_K]
    assert more == [0, 3, 6, 7]
    assert [i for i in range(8) if t[f"blk.{i}.ffn_down.weight"] == rq.T_Q6_K] == more
    assert t["output.weight"] == rq.T_Q6_K and t["token_embd.weight"] == rq.T_Q4_K
    assert t["blk.3.attn_q.weight"] == rq.T_Q4_K and t["blk.3.ffn_norm.weight"] == rq.T_F32


def test_round_trip_error_is_small():
    """Every format decodes (runtime.quant) to within its resolution of the input."""
    from runtime import quant

    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    # worst-case relative RMS error per format (generous: these are sanity bounds)
    bound = {rq.T_Q4_0: 0.15, rq.T_Q4_1: 0.12, rq.T_Q5_0: 0.07, rq.T_Q5_1: 0.06, rq.T_Q8_0: 0.01,
             rq.T_Q2_K: 0.45, rq.T_Q3_K: 0.25, rq.T_Q4_K: 0.12, rq.T_Q5_K: 0.06, rq.T_Q6_K: 0.03,
             rq.T_IQ4_NL: 0.12, rq.T_IQ4_XS: 0.12, rq.T_F16: 1e-3, rq.T_BF16: 8e-3, rq.T_F32: 0.0}
    for t, b in bound.items():
        q = rq.quantize_rows(x, t)
        y = quant.dequantize(q, t, x.shape)
        err = float(np.sqrt(np.mean((y - x) ** 2)))
        assert err <= b, f"{quant.type_name(t)}: RMS error {err:.4f} > {b}"


def test_bad_row_length_and_type():
    with pytest.raises(rq.QuantizeError, match="multiple of"):
        rq.quantize_rows(np.zeros((2, 100), np.float32), rq.T_Q4_K)
    with pytest.raises(rq.QuantizeError, match="unknown quantization type"):
        rq.quantize_file("x.gguf", "y.gguf", "Q7_K")


def test_refuses_to_overwrite_input(qwen2_f16, tmp_path):
    src = tmp_path / "in.gguf"
    src.write_bytes(qwen2_f16.read_bytes())
    before = src.read_bytes()
    link = tmp_path / "link.gguf"
    link.symlink_to(src)
    for dst in (src, link, tmp_path / "." / "in.gguf"):
        with pytest.raises(rq.QuantizeError, match="overwrite the input"):
            rq.quantize_file(src, dst, "Q8_0")
    assert src.read_bytes() == before


def test_interrupted_run_leaves_no_file(qwen2_f16, tmp_path):
    dst = tmp_path / "out.gguf"

    def stop(i, n, p):
        if i == n // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rq.quantize_file(qwen2_f16, dst, "Q4_0", progress=stop)
    assert list(tmp_path.iterdir()) == []
    dst.write_bytes(b"old")  # an existing OUT is replaced only by a complete file
    with pytest.raises(KeyboardInterrupt):
        rq.quantize_file(qwen2_f16, dst, "Q4_0", progress=stop)
    assert dst.read_bytes() == b"old" and list(tmp_path.iterdir()) == [dst]


def test_cli(qwen2_f16, tmp_path):
    out = tmp_path / "q.gguf"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "runtime", "quantize", str(qwen2_f16), str(out), "q4_k_m"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Q4_K_M" in r.stdout and out.exists()
    with GGUFFile(out) as g:
        assert g.metadata["general.file_type"] == 15
    r = subprocess.run([sys.executable, "-m", "runtime", "quantize", str(out), str(out), "Q8_0"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: refusing to overwrite")
    assert len(r.stderr.strip().splitlines()) == 1


# --- with an importance matrix (llama.cpp's quantize_row_*_impl paths) -------------

def _random_imatrix(path: Path, seed: int = 3) -> dict:
    """Positive per-column importances for every weight matrix but one (which is then
    quantized without), and a token_embd entry of the wrong size (llama.cpp ignores it)."""
    rng = np.random.default_rng(seed)
    out = {}
    with GGUFFile(path) as g:
        for name, t in g.tensors.items():
            if len(t.dims) >= 2 and name.endswith(".weight") and "norm" not in name:
                out[name] = np.exp(rng.standard_normal(t.dims[0])).astype(np.float32)
    out.pop("blk.2.attn_q.weight", None)
    if "token_embd.weight" in out:
        out["token_embd.weight"] = out["token_embd.weight"][:-1]
    return out


IMATRIX_CASES = [("llama8", t) for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S",
                                          "Q4_K_M", "Q5_K_S", "Q6_K", "IQ4_NL", "IQ4_XS")] + [
    ("odd_rows", t) for t in ("Q3_K_M", "IQ4_XS")]


@pytest.mark.parametrize("model,ftype", IMATRIX_CASES, ids=[f"{m}-{t}" for m, t in IMATRIX_CASES])
def test_imatrix_identical_to_llamacpp(request, llama_cpp, tmp_path, model, ftype):
    src = request.getfixturevalue(model)
    im = _random_imatrix(src)
    ours = rq.quantize_file(src, tmp_path / "ours.gguf", ftype, imatrix=im).path
    from quantize import quantize

    theirs = quantize(src, tmp_path / "llamacpp.gguf", ftype, llama_cpp=llama_cpp, imatrix=im)
    _assert_same_tensors(ours, theirs)


def test_imatrix_gguf_file(tmp_path):
    """llama-imatrix's GGUF format: <name>.in_sum2 (sums of x^2 per column and matrix) and
    <name>.counts (activations summed per matrix); the importance is their ratio, 1 where
    a matrix was never seen."""
    import gguf

    sums = np.arange(1, 17, dtype=np.float32).reshape(2, 8)  # 2 experts x 8 columns
    counts = np.array([[4.0, 0.0]], dtype=np.float32)
    p = tmp_path / "imatrix.gguf"
    w = gguf.GGUFWriter(p, "llama")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["wiki.txt"])
    w.add_uint32("imatrix.chunk_count", 7)
    w.add_tensor("blk.0.ffn_down_exps.weight.in_sum2", sums)
    w.add_tensor("blk.0.ffn_down_exps.weight.counts", counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = rq.load_imatrix(p)
    v = im.values["blk.0.ffn_down_exps.weight"]
    assert np.array_equal(v[:8], sums[0] / np.float32(4)) and np.all(v[8:] == 1)
    assert im.datasets == ["wiki.txt"] and im.chunk_count == 7
    bad = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(bad, "llama")
    w.add_tensor("a", sums)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(rq.QuantizeError, match="not a GGUF imatrix file"):
        rq.load_imatrix(bad)
