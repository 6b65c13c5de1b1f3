"""`quant-report`: SmolLM2-135M dequantized to F16, quantized to a few types and measured.

Sizes and bits per weight are checked against the files themselves, each type's
perplexity against a plain `runtime.perplexity` run on its kept file, and the KL
ordering of the ladder (an F16 copy at the log-prob format's floor, Q8_0 small,
Q2_K far larger).  A small text (2 chunks of 128) keeps it quick."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import quant_report as qr
from runtime import quantize as rq
from runtime.gguf import GGUFFile

ROOT = Path(__file__).resolve().parents[1]
CTX, CHUNKS = 64, 2


@pytest.fixture(scope="module")
def smollm2_f16(smollm2_path) -> Path:
    """SmolLM2-135M (Q4_1) decoded and stored as F16 by our quantizer (the file
    tests/test_quantize.py caches under the same name)."""
    path = ROOT / "models" / "synthetic" / "qtest-q1-smollm2-f16.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        rq.quantize_file(smollm2_path, tmp, "F16")
        tmp.replace(path)
    return path


@pytest.fixture(scope="module")
def text(wikitext, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("qr-text") / "wiki-head.txt"
    p.write_text(wikitext[:8000], encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def report(smollm2_f16, text, tmp_path_factory):
    keep = tmp_path_factory.mktemp("qr-keep")
    return qr.quant_report(smollm2_f16, text, ["Q8_0", "Q2_K"], n_ctx=CTX, n_chunks=CHUNKS, keep_dir=keep), keep


def test_sizes_and_bits_per_weight_are_the_files(report, smollm2_f16):
    records, keep = report
    assert [(x.type, x.base) for x in records] == [("F16", True), ("Q8_0", False), ("Q2_K", False)]
    assert Path(records[0].path) == smollm2_f16
    for x in records:
        path = Path(x.path)
        assert x.size_bytes == os.path.getsize(path)
        assert x.size_mib == x.size_bytes / 2**20
        with GGUFFile(path) as g:
            tensor_bytes = sum(t.nbytes for t in g.tensors.values())
            n_params = sum(int(np.prod(t.dims)) for t in g.tensors.values())
            types = {}
            for t in g.tensors.values():
                types[t.type_name] = types.get(t.type_name, 0) + 1
        assert (x.tensor_bytes, x.n_params, x.tensor_types) == (tensor_bytes, n_params, types)
        assert x.bpw == pytest.approx(8 * tensor_bytes / n_params, rel=1e-12)
        assert x.file_bpw == pytest.approx(8 * os.path.getsize(path) / n_params, rel=1e-12)
    f16, q8, q2 = records
    assert f16.n_params == q8.n_params == q2.n_params == 134_515_008
    # F16 matrices with F32 norms; Q8_0 is 34 bytes per 32 weights (8.5) plus those norms.
    assert 16.0 <= f16.bpw < 16.01 and 8.5 < q8.bpw < 8.52
    assert q2.bpw < q8.bpw and q2.size_bytes < q8.size_bytes < f16.size_bytes
    # llama.cpp's Q2_K mix on SmolLM2: its 576-wide rows are no multiple of 256 and fall
    # back to Q4_0, ffn_down (1536) gets Q3_K, the tied embedding Q8_0: no Q2_K block at all.
    assert q2.tensor_types == {"F32": 61, "Q3_K": 30, "Q4_0": 180, "Q8_0": 1}
    assert q8.tensor_types == {"F32": 61, "Q8_0": 211}
    assert (keep / f"{smollm2_f16.stem}.kld").is_file()  # the base's log-probs, kept for llama-perplexity


def test_perplexity_is_a_plain_perplexity_run(report, text):
    from runtime.model import Model
    from runtime.perplexity import perplexity_of_file

    records, _ = report
    for x in records:
        r = perplexity_of_file(Model.load(x.path, n_ctx=CTX), text, n_ctx=CTX, n_chunks=CHUNKS)
        assert (x.ppl, x.ppl_err, x.n_scored, x.n_chunks, x.n_ctx) == (r.ppl, r.ppl_err, r.n_scored, CHUNKS, CTX)
        assert x.n_scored == CHUNKS * (CTX - 1 - CTX // 2)


def test_kl_orders_the_ladder(report):
    (f16, q8, q2), _ = report
    assert f16.kl is None
    for x in (q8, q2):
        assert x.kl.count == x.n_scored
        # PPL(base) read back from the 16-bit log-prob file is the base's own PPL.
        assert x.kl.base_ppl == pytest.approx(f16.ppl, rel=1e-4)
        assert x.kl.ppl == pytest.approx(x.ppl, rel=1e-6)  # its NLL summed in float32 as llama.cpp's
    assert 0 < q8.kl.kl_mean < 0.01
    assert q2.kl.kl_mean > 20 * q8.kl.kl_mean
    assert q2.kl.top1 < q8.kl.top1
    assert abs(q2.kl.ln_ppl_ratio) > abs(q8.kl.ln_ppl_ratio)
    table = qr.format_report([f16, q8, q2]).splitlines()
    assert table[2].startswith("F16 (base)") and table[4].startswith("Q2_K")
    assert f"{q2.kl.kl_mean:.6f}" in table[4] and f"{q8.ppl:.4f}" in table[3]


def test_bad_input_is_one_error(smollm2_f16, smollm2_path, text, tmp_path):
    with pytest.raises(qr.QuantReportError, match="unknown quantization type 'Q7_K'"):
        qr.quant_report(smollm2_f16, text, ["Q8_0", "Q7_K"])
    with pytest.raises(qr.QuantReportError, match="not a float model .*Q4_1"):
        qr.quant_report(smollm2_path, text, ["Q8_0"])
    with pytest.raises(qr.QuantReportError, match="no such file"):
        qr.quant_report(tmp_path / "missing.gguf", text, ["Q8_0"])
    with pytest.raises(qr.QuantReportError, match="no such file"):
        qr.quant_report(smollm2_f16, tmp_path / "missing.txt", ["Q8_0"])
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(qr.QuantReportError, match="not a directory"):
        qr.quant_report(smollm2_f16, text, ["Q8_0"], keep_dir=tmp_path / "a-file")
    assert qr._normalize_types(["q4_k", "Q4_K_M", " q8_0 "]) == ["Q4_K_M", "Q8_0"]


def test_plot_needs_the_plots_extra(smollm2_f16, text, monkeypatch, capsys):
    from runtime.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["quant-report", str(smollm2_f16), str(text), "--plot", "x.png"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "plots" in err[0] and "matplotlib" in err[0]


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_cli_json_and_plot(smollm2_f16, smollm2_path, text, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    png = tmp_path / "ladder.png"
    env = dict(os.environ, TMPDIR=str(tmp))
    cmd = [sys.executable, "-m", "runtime", "quant-report", str(smollm2_f16), str(text), "--types", "F16,q8_0",
           "-c", str(CTX), "--chunks", str(CHUNKS), "--json", "--plot", str(png)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["n_ctx"], d["n_chunks"], d["n_scored"], d["plot"]) == (CTX, CHUNKS, CHUNKS * (CTX - 1 - CTX // 2), str(png))
    base, copy, q8 = d["results"]
    assert [(x["type"], x["base"]) for x in d["results"]] == [("F16", True), ("F16", False), ("Q8_0", False)]
    assert base["kl"] is None and base["path"] == str(smollm2_f16)
    assert copy["path"] is None and q8["path"] is None  # temporary files ...
    assert list(tmp.iterdir()) == []                    # ... and their directory, deleted
    # An F16 copy has the base's bytes: the same PPL, KL at the 16-bit format's floor.
    assert copy["ppl"] == base["ppl"] and copy["tensor_bytes"] == base["tensor_bytes"]
    # (From the file the floor can be a hair below zero: llama.cpp's reader does not clamp.)
    assert abs(copy["kl"]["kl_mean"]) < 1e-4 and copy["kl"]["top1"] == 1.0
    assert q8["kl"]["kl_mean"] > 10 * copy["kl"]["kl_mean"]
    assert q8["bpw"] == pytest.approx(8 * q8["tensor_bytes"] / q8["n_params"])
    assert q8["size_mib"] == pytest.approx(q8["size_bytes"] / 2**20)

    assert _png_size(png) == (1210, 506)
    rgb = (matplotlib.image.imread(png)[..., :3] * 255).round().astype(int).reshape(-1, 3)
    # The points (C0 blue), the KL squares (C2 green) and the base's dashed line (C3 red,
    # anti-aliased: near its colour) are drawn.
    for c in ((31, 119, 180), (44, 160, 44), (214, 39, 40)):
        assert np.abs(rgb - np.array(c)).max(axis=1).min() <= 12, c
