"""`imatrix`: llama-imatrix's method (sums of squared activations entering every
weight matrix over n_ctx chunks of a calibration text) and its GGUF file.

Our sums against the NumPy float64 reference forward pass (tests/reference.py) on
synthetic models; the file round-trips through quantize.load_imatrix; quantizing
with our file equals llama.cpp's quantizer given the same importances (its C API,
as tests/test_quantize.py); the CLI's errors are one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import _oracle  # noqa: F401  (puts tools/ on sys.path)
import reference
from make_synthetic import SynthSpec, write_synthetic

from runtime import imatrix as ri
from runtime import quantize as rq
from runtime.gguf import GGUFFile
from runtime.model import Model

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "models" / "synthetic"
BOS = 256  # make_synthetic's BOS id

SPECS = {
    # BOS added (the first token of every chunk becomes BOS), GQA 2
    "llama": (SynthSpec(arch="llama", n_layers=2, d_model=256, n_heads=8, gqa=2, ffn=512, vocab=512),
              {"tokenizer.ggml.add_bos_token": True}),
    # QKV biases, NEOX RoPE
    "qwen2": (SynthSpec(arch="qwen2", n_layers=2, d_model=256, n_heads=8, gqa=4, ffn=512, vocab=512), None),
    # QK norms, head dim 128 != d / heads (attn_output reads 8 x 128 = 1024 columns)
    "qwen3": (SynthSpec(arch="qwen3", n_layers=2, d_model=256, n_heads=8, gqa=2, head_dim=128, ffn=768,
                        vocab=512), None),
}


def _model_file(name: str) -> Path:
    spec, md = SPECS[name]
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"imatrix-t1-{name}.gguf"
    if not path.exists():
        tmp = path.with_suffix(".part")
        write_synthetic(tmp, spec, metadata=md)
        tmp.replace(path)
    return path


def _reference_sums(path: Path, tokens: np.ndarray, n_ctx: int, n_chunks: int, bos: bool) -> dict:
    sums = {}
    for c in range(n_chunks):
        ids = tokens[c * n_ctx:(c + 1) * n_ctx].copy()
        if bos:
            ids[0] = BOS
        for k, x in reference.reference_matmul_inputs(path, ids).items():
            sums[k] = sums.get(k, 0.0) + (x * x).sum(axis=0)
    return sums


@pytest.mark.parametrize("name", list(SPECS))
def test_matches_reference(name):
    path = _model_file(name)
    n_ctx = 40
    tokens = np.random.default_rng(1).integers(0, 512, 3 * n_ctx + 7)
    model = Model.load(path, n_ctx=n_ctx, kv_type="f32")
    r = ri.compute_imatrix(model, tokens, n_ctx, process_output=True)
    assert (r.n_chunks, r.chunk_count, r.n_tokens) == (3, 3, len(tokens))
    ref = _reference_sums(path, tokens, n_ctx, 3, SPECS[name][1] is not None)
    a = model.args
    want = {f"blk.{l}.{m}.weight" for l in range(a.n_layers) for m in ri.MATRICES} | {"output.weight"}
    assert set(r.sums) == want
    for k in sorted(want):
        assert r.counts[k] == 3 * n_ctx
        assert r.sums[k].shape == ref[k].shape, k
        np.testing.assert_allclose(r.sums[k], ref[k], rtol=1e-5, atol=0, err_msg=k)
    # --chunks N: the first N chunks only
    r1 = ri.compute_imatrix(model, tokens, n_ctx, 1)
    ref1 = _reference_sums(path, tokens, n_ctx, 1, SPECS[name][1] is not None)
    assert r1.n_chunks == 1 and "output.weight" not in r1.sums
    np.testing.assert_allclose(r1.sums["blk.1.ffn_down.weight"], ref1["blk.1.ffn_down.weight"], rtol=1e-5)


def test_collected_rows():
    """llama-imatrix ignores a ubatch of fewer than 16 rows: the tail of a call."""
    assert ri.collected_rows(512, 5).all()          # 4 chunks per call, then 1: whole ubatches
    k = ri.collected_rows(1030, 2)                  # one chunk per call: 2 x 512 + 6
    assert not k[:, 1024:].any() and k[:, :1024].all()
    k = ri.collected_rows(2056, 1)                  # calls of 2048 and 8 tokens
    assert not k[0, 2048:].any() and k[0, :2048].all()
    assert ri.collected_rows(100, 3).all()          # 300 tokens in one call: one ubatch


def test_file_round_trip(tmp_path):
    import gguf

    sums = {"blk.1.attn_q.weight": np.arange(1, 9, dtype=np.float64) * 0.5,
            "blk.0.ffn_down.weight": np.full(16, 3.0)}
    r = ri.ImatrixResult(sums, {"blk.1.attn_q.weight": 4, "blk.0.ffn_down.weight": 6}, n_ctx=64,
                         n_chunks=2, chunk_count=2, n_tokens=150, datasets=["calib.txt"])
    p = ri.write_imatrix(r, tmp_path / "im.gguf")
    assert not list(tmp_path.glob("*.part"))
    im = rq.load_imatrix(p)
    assert im.datasets == ["calib.txt"] and im.chunk_count == 2
    assert set(im.values) == set(sums)
    for k, v in r.values().items():
        np.testing.assert_allclose(im.values[k], v, rtol=1e-7)
    rd = gguf.GGUFReader(p)
    assert rd.fields["general.type"].contents() == "imatrix"
    assert rd.fields["imatrix.chunk_size"].contents() == 64
    assert "general.architecture" not in rd.fields     # llama-imatrix writes none
    names = [t.name for t in rd.tensors]
    assert names == ["blk.0.ffn_down.weight.in_sum2", "blk.0.ffn_down.weight.counts",
                     "blk.1.attn_q.weight.in_sum2", "blk.1.attn_q.weight.counts"]
    shapes = {t.name: [int(x) for x in t.shape] for t in rd.tensors}
    assert shapes["blk.0.ffn_down.weight.in_sum2"] == [16, 1] and shapes["blk.0.ffn_down.weight.counts"] == [1, 1]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=ROOT)


def _calibration_text(path: Path, n_chars: int = 600) -> Path:
    rng = np.random.default_rng(5)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "imatrix", "42", "tokens"]
    text = " ".join(words[i] for i in rng.integers(0, len(words), n_chars // 4))
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("ftype", ["Q4_K_M", "IQ4_XS"])
def test_quantize_with_our_imatrix_matches_llamacpp(llama_cpp, tmp_path_factory, ftype):
    """The CLI's file, given to our quantizer and (as its importances) to llama.cpp's."""
    from quantize import quantize  # tools/quantize.py: llama_model_quantize with params.imatrix
    from test_quantize import _assert_same_tensors

    base = tmp_path_factory.getbasetemp() / "imatrix-cli"
    src = _model_file("llama")
    im_path = base / "im.gguf"
    if not im_path.exists():
        base.mkdir(exist_ok=True)
        text = _calibration_text(base / "calib.txt")
        r = _cli("imatrix", src, text, "-o", im_path, "-c", "32")
        assert r.returncode == 0, r.stderr
        assert "chunks of 32 tokens" in r.stdout
    im = rq.load_imatrix(im_path)
    assert len(im.values) == 2 * len(ri.MATRICES) and im.chunk_count >= 2
    assert all(np.all(v > 0) for v in im.values.values())
    out = tmp_path_factory.mktemp(ftype)
    ours = rq.quantize_file(src, out / "ours.gguf", ftype, imatrix=im_path).path
    theirs = quantize(src, out / "llamacpp.gguf", ftype, llama_cpp=llama_cpp, imatrix=im.values)
    _assert_same_tensors(ours, theirs)
    # and the imatrix changed the result: without it the blocks differ
    plain = rq.quantize_file(src, out / "plain.gguf", ftype).path
    with GGUFFile(ours) as a, GGUFFile(plain) as b:
        assert not np.array_equal(a.raw("blk.0.ffn_up.weight"), b.raw("blk.0.ffn_up.weight"))


def test_cli_errors(tmp_path):
    src = _model_file("llama")
    text = _calibration_text(tmp_path / "calib.txt", 200)
    cases = [
        (("imatrix", src, tmp_path / "missing.txt", "-o", tmp_path / "o.gguf"), "no such text file"),
        (("imatrix", src, text, "-o", tmp_path / "o.gguf", "-c", "8"), "ctx must be at least 16"),
        (("imatrix", src, text, "-o", tmp_path / "o.gguf", "-c", "512"), "need at least 1024 tokens"),
        (("imatrix", src, text, "-o", tmp_path / "o.gguf", "-c", "16", "--chunks", "0"), "chunks must be positive"),
        (("imatrix", tmp_path / "nope.gguf", text, "-o", tmp_path / "o.gguf"), "error:"),
        (("imatrix", src, text, "-o", src), "refusing to overwrite the model"),
    ]
    for args, msg in cases:
        r = _cli(*args, timeout=300)
        # (a cold numba cache adds its one "compiling kernels" notice first)
        err = [line for line in r.stderr.strip().splitlines() if not line.startswith("compiling kernels")]
        assert r.returncode == 1 and len(err) == 1 and err[0].startswith("error:"), (args, r.stderr)
        assert msg in err[0], (args, err)
    assert not (tmp_path / "o.gguf").exists()


# --- against llama.cpp's own tools (llama-imatrix, llama-quantize: runtime.llamacpp_tools) ----

from test_quantize import _cached, smollm2_f16  # noqa: E402,F401  (the F16 copy, and its cache)

TOOL_CTX, TOOL_CHUNKS = 128, 4  # 4 chunks of 128 tokens: one llama_decode call of 512 rows


def _tool(path: Path, *args, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(path), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{path.name} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}"
    return r


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_path) -> Path:
    """SmolLM2-135M (Q4_1) decoded by runtime.quant and stored as F32: llama.cpp's F32
    matmuls keep float32 activations, as ours do with precision "exact" (its F16 and
    quantized ones round them first), so both sums see the same activations."""
    return _cached("smollm2-f32", lambda p: rq.quantize_file(smollm2_path, p, "F32"))


@pytest.fixture(scope="session")
def imatrix_pair(llamacpp_tools, smollm2_f32, wikitext, tmp_path_factory):
    """(text, llama-imatrix's file, ours) over the same slice of WikiText-2 on the F32
    SmolLM2, float32 KV cache on both sides (llama.cpp's F16 cache rounds the query too)
    and llama.cpp's flash attention off (with it on, measured here, attn_output's sums
    already differ by 6.6e-4 in layer 0 and 2.8e-3 at worst; off, 1.8e-5 at worst)."""
    d = tmp_path_factory.mktemp("imatrix-vs-llamacpp")
    text = d / "calib.txt"
    text.write_text(wikitext[:3000], encoding="utf-8")
    theirs = d / "llama-imatrix.gguf"
    _tool(llamacpp_tools.imatrix, "-m", smollm2_f32, "-f", text, "-o", theirs, "--output-format", "gguf",
          "-c", TOOL_CTX, "--chunks", TOOL_CHUNKS, "-ctk", "f32", "-ctv", "f32", "-fa", "off", "--no-ppl", "-t", 2)
    model = Model.load(smollm2_f32, n_ctx=TOOL_CTX, kv_type="f32", precision="exact")
    from runtime.perplexity import tokenize_for_perplexity

    tokens = tokenize_for_perplexity(model, text.read_text(encoding="utf-8"))
    r = ri.compute_imatrix(model, tokens, TOOL_CTX, TOOL_CHUNKS, datasets=[str(text)])
    ours = ri.write_imatrix(r, d / "ours.gguf")
    return text, theirs, ours


def _imatrix_tensors(path: Path) -> tuple[dict, dict]:
    import gguf

    rd = gguf.GGUFReader(path)
    t = {x.name: np.array(x.data, dtype=np.float64).reshape(-1) for x in rd.tensors}
    meta = {k: rd.fields[k].contents() for k in ("general.type", "imatrix.chunk_count", "imatrix.chunk_size",
                                                  "imatrix.datasets") if k in rd.fields}
    return t, meta


def test_imatrix_matches_llama_imatrix(imatrix_pair):
    """Every matrix's in_sum2 within 1e-5 relative of llama-imatrix's, counts equal."""
    text, theirs, ours = imatrix_pair
    tt, mt = _imatrix_tensors(theirs)
    to, mo = _imatrix_tensors(ours)
    assert sorted(to) == sorted(tt), sorted(set(to) ^ set(tt))
    assert len(tt) == 2 * 30 * len(ri.MATRICES)
    assert mo["general.type"] == mt["general.type"] == "imatrix"
    assert mo["imatrix.chunk_count"] == mt["imatrix.chunk_count"] == TOOL_CHUNKS
    assert mo["imatrix.chunk_size"] == mt["imatrix.chunk_size"] == TOOL_CTX
    assert mo["imatrix.datasets"] == mt["imatrix.datasets"] == [str(text)]
    for name in sorted(tt):
        a, b = to[name], tt[name]
        assert a.shape == b.shape, name
        if name.endswith(".counts"):
            assert np.array_equal(a, b) and a[0] == TOOL_CTX * TOOL_CHUNKS, (name, a, b)
    worst, worst_scaled = ri.worst_difference(to, tt)
    print(f"largest relative difference from llama-imatrix: {worst[0]:.2e} ({worst[1]}); "
          f"scaled {worst_scaled[0]:.2e} ({worst_scaled[1]})")
    assert worst_scaled[0] <= 1e-5, worst_scaled
    assert worst[0] <= 5e-5, worst


# IQ4_XS (IQ4_NL on SmolLM2's 576-wide rows) costs ~45 CPU s per side: llama-imatrix's file only
TOOL_QUANT_CASES = [("Q4_K_M", "theirs"), ("Q4_K_M", "ours"), ("IQ4_XS", "theirs")]


@pytest.mark.parametrize("ftype,which", TOOL_QUANT_CASES, ids=[f"{t}-{w}" for t, w in TOOL_QUANT_CASES])
def test_quantize_with_imatrix_matches_llama_quantize(llamacpp_tools, imatrix_pair, smollm2_f16, tmp_path,
                                                      ftype, which):
    """`quantize --imatrix FILE` (our CLI) and `llama-quantize --imatrix FILE`, on
    SmolLM2 in F16, given llama-imatrix's file or ours: every tensor byte-identical.
    (SmolLM2's rows of 576 are no multiple of 256: most matrices fall back to the
    legacy / IQ4_NL types, whose imatrix searches are then the ones compared.)"""
    from test_quantize import _assert_same_tensors

    _, theirs_im, ours_im = imatrix_pair
    im = theirs_im if which == "theirs" else ours_im
    theirs = tmp_path / "llama-quantize.gguf"
    _tool(llamacpp_tools.quantize, "--imatrix", im, smollm2_f16, theirs, ftype, 2)
    ours = rq.quantize_file(smollm2_f16, tmp_path / "ours.gguf", ftype, imatrix=im).path
    _assert_same_tensors(ours, theirs)
