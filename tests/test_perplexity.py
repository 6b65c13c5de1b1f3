"""Perplexity: llama-perplexity's method, checked piece by piece and against llama.cpp."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from runtime.perplexity import (Running, chunk_count, kl_and_top1, perplexity_of_tokens,
                                token_nll)


# --------------------------------------------------------------------------
# a small stand-in model: logits depend on the token and on the chunk's first
# token, so skipping the BOS replacement or shifting the scored window changes
# the answer
# --------------------------------------------------------------------------

class _Tok:
    def __init__(self, add_bos, bos_id=1):
        self.add_bos, self.bos_id, self.add_eos = add_bos, bos_id, False


class FakeModel:
    def __init__(self, n_vocab=300, add_bos=True, seed=0, d=12, scale=1.0):
        rng = np.random.default_rng(seed)
        self.n_vocab = n_vocab
        self.E = rng.normal(size=(n_vocab, d)).astype(np.float32)
        self.U = (rng.normal(size=(d, n_vocab)) * scale).astype(np.float32)
        self.tokenizer = _Tok(add_bos)
        self.calls: list[list[int]] = []

    def logits(self, ids):
        ids = np.asarray(ids)
        self.calls.append(ids.tolist())
        pos = np.arange(len(ids), dtype=np.float32)[:, None] / len(ids)
        h = self.E[ids] + 0.5 * self.E[ids[0]] + pos
        return (h @ self.U).astype(np.float32)


def _reference_ppl(model, tokens, n_ctx, n_chunks):
    """Straight loop, float64 everywhere, written from the description of the method."""
    nlls = []
    for c in range(n_chunks):
        chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if model.tokenizer.add_bos:
            chunk[0] = model.tokenizer.bos_id
        lg = model.logits(chunk).astype(np.float64)
        for j in range(n_ctx // 2, n_ctx - 1):
            row = lg[j]
            lse = row.max() + math.log(np.exp(row - row.max()).sum())
            nlls.append(lse - row[tokens[c * n_ctx + j + 1]])
    nlls = np.array(nlls)
    ppl = math.exp(nlls.mean())
    return ppl, ppl * nlls.std() / math.sqrt(len(nlls) - 1), len(nlls)


def test_token_nll_matches_float64_log_softmax():
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(70, 500)) * 4).astype(np.float32)
    targets = rng.integers(0, 500, size=70)
    x = logits.astype(np.float64)
    ref = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1) - x[np.arange(70), targets]
    np.testing.assert_allclose(token_nll(logits, targets), ref, rtol=1e-6, atol=1e-6)


def test_running_mean_and_llamacpp_standard_error():
    rng = np.random.default_rng(2)
    v = rng.exponential(size=1000)
    r = Running()
    for part in np.array_split(v, 7):
        r.add(part)
    assert r.count == 1000
    assert r.mean == pytest.approx(v.mean())
    # llama.cpp: sqrt((E[x^2] - E[x]^2) / (N - 1))
    assert r.stderr == pytest.approx(v.std() / math.sqrt(999), rel=1e-9)
    assert Running().stderr == 0.0


def test_chunk_count_follows_llamacpp():
    assert chunk_count(2048, 512) == 4
    assert chunk_count(2047 + 512, 512) == 4
    assert chunk_count(5000, 512, 3) == 3
    assert chunk_count(5000, 512, 50) == 9
    with pytest.raises(ValueError, match="at least 1024 tokens"):
        chunk_count(1023, 512)


@pytest.mark.parametrize("add_bos", [True, False])
def test_method_matches_reference_loop(add_bos):
    rng = np.random.default_rng(3)
    tokens = rng.integers(2, 300, size=64 * 7 + 13)
    model = FakeModel(add_bos=add_bos)
    seen = []
    r = perplexity_of_tokens(model, tokens, n_ctx=64, n_chunks=-1, on_chunk=seen.append)
    calls = model.calls
    model.calls = []
    ppl, err, count = _reference_ppl(model, tokens, 64, 7)
    assert r.n_chunks == 7 and r.n_scored == count == 7 * 31
    assert r.ppl == pytest.approx(ppl, rel=1e-6)
    assert r.ppl_err == pytest.approx(err, rel=1e-5)
    # Every chunk is run separately, full length, BOS first only when the model uses it.
    assert len(calls) == 7 and all(len(c) == 64 for c in calls)
    for c, ids in enumerate(calls):
        expect = list(tokens[c * 64:(c + 1) * 64])
        if add_bos:
            expect[0] = 1
        assert ids == expect
    # Running values: one per chunk, the last equals the final value.
    assert [s.chunk for s in seen] == list(range(1, 8))
    assert seen[-1].ppl == pytest.approx(r.ppl)
    p2, _, _ = _reference_ppl(FakeModel(add_bos=add_bos), tokens, 64, 2)
    assert seen[1].ppl == pytest.approx(p2, rel=1e-6)


def test_bos_replacement_matters():
    """Guards the test above: the stand-in model is sensitive to the first token."""
    tokens = np.random.default_rng(4).integers(2, 300, size=64 * 3)
    a = perplexity_of_tokens(FakeModel(add_bos=True), tokens, n_ctx=64).ppl
    b = perplexity_of_tokens(FakeModel(add_bos=False), tokens, n_ctx=64).ppl
    assert abs(a - b) / a > 1e-4


def test_streaming_holds_one_chunk_of_logits():
    """40 chunks of logits would be 40 MB; the run must stay near one chunk (1 MB)."""
    model = FakeModel(n_vocab=4096, d=8)
    tokens = np.random.default_rng(5).integers(2, 4096, size=64 * 40)
    tracemalloc.start()
    try:
        perplexity_of_tokens(model, tokens, n_ctx=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_chunk = 64 * 4096 * 4
    assert peak < 8 * one_chunk, f"peak {peak / 2**20:.1f} MiB"


def test_kl_and_top1():
    rng = np.random.default_rng(6)
    a = (rng.normal(size=(40, 200)) * 3).astype(np.float32)
    kl, same = kl_and_top1(a, a.copy())
    assert np.all(kl < 1e-12) and same.all()
    b = a + rng.normal(size=a.shape).astype(np.float32)
    kl, same = kl_and_top1(a, b)
    pa = np.exp(a - a.max(1, keepdims=True)).astype(np.float64)
    pa /= pa.sum(1, keepdims=True)
    pb = np.exp(b - b.max(1, keepdims=True)).astype(np.float64)
    pb /= pb.sum(1, keepdims=True)
    np.testing.assert_allclose(kl, (pa * np.log(pa / pb)).sum(1), rtol=1e-6)
    np.testing.assert_array_equal(same, a.argmax(1) == b.argmax(1))
    assert not same.all()


def test_kl_base_statistics():
    tokens = np.random.default_rng(7).integers(2, 300, size=64 * 4)
    same = perplexity_of_tokens(FakeModel(), tokens, n_ctx=64, base=FakeModel(), base_name="b")
    assert same.kl.kl_mean < 1e-12 and same.kl.top1 == 1.0
    assert same.kl.base_ppl == pytest.approx(same.ppl)
    other = perplexity_of_tokens(FakeModel(scale=1.2), tokens, n_ctx=64, base=FakeModel())
    assert other.kl.kl_mean > 1e-3
    assert 0 < other.kl.top1 <= 1
    assert other.kl.base_ppl == pytest.approx(same.ppl)
    with pytest.raises(ValueError, match="vocabulary"):
        perplexity_of_tokens(FakeModel(), tokens, n_ctx=64, base=FakeModel(n_vocab=301))


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------

def _engine():
    # runtime/model.py is written alongside this module; until it lands these tests wait.
    return pytest.importorskip("runtime.model", reason="runtime.model (the engine) is not there yet")


def _cli(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "runtime", "perplexity", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_missing_file_is_one_line_error(tmp_path):
    p = _cli("no-such-model.gguf", tmp_path / "nope.txt")
    assert p.returncode == 1
    assert p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr


def test_cli_text_too_short(smollm2_path, tmp_path):
    _engine()
    f = tmp_path / "short.txt"
    f.write_text("just a few words")
    p = _cli(smollm2_path, f, "--ctx", "64")
    assert p.returncode == 1, p.stderr
    assert "need at least 128 tokens" in p.stderr and "Traceback" not in p.stderr


def test_cli_json_and_kl_base(smollm2_path, wikitext, tmp_path):
    _engine()
    f = tmp_path / "w.txt"
    f.write_text(wikitext[:3000])
    p = _cli(smollm2_path, f, "--ctx", "64", "--chunks", "2", "--json", "--kl-base", smollm2_path)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["n_chunks"] == 2 and d["n_ctx"] == 64 and d["n_scored"] == 2 * 31
    assert len(d["chunks"]) == 2 and d["chunks"][-1]["ppl"] == pytest.approx(d["ppl"])
    assert 1 < d["ppl"] < 1000 and d["ppl_err"] > 0 and d["tokens_per_s"] > 0
    # Against itself: no divergence, same top token everywhere.
    assert d["kl"]["kl_mean"] < 1e-6 and d["kl"]["top1"] == 1.0
    assert d["kl"]["base_ppl"] == pytest.approx(d["ppl"], rel=1e-6)
    assert "2/2" in p.stderr   # the progress bar


# --------------------------------------------------------------------------
# against llama.cpp
# --------------------------------------------------------------------------

N_CTX, N_CHUNKS = 512, 3


def _llamacpp_ppl(llama_cpp, path, text):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_batch=N_CTX, n_threads=2,
                          logits_all=True, verbose=False)
    add_bos = bool(llm._model.add_bos_token())
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    nll = []
    for c in range(N_CHUNKS):
        chunk = tokens[c * N_CTX:(c + 1) * N_CTX]
        if add_bos:
            chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        x = np.asarray(llm.scores[:N_CTX], dtype=np.float64)
        for j in range(N_CTX // 2, N_CTX - 1):
            row = x[j]
            nll.append(row.max() + math.log(np.exp(row - row.max()).sum())
                       - row[tokens[c * N_CTX + j + 1]])
    llm.close() if hasattr(llm, "close") else None
    return math.exp(float(np.mean(nll))), tokens


def test_agrees_with_llamacpp(smollm2_path, wikitext, llama_cpp):
    from runtime.perplexity import tokenize_for_perplexity

    Model = _engine().Model

    text = wikitext[:40000]
    ref, ref_tokens = _llamacpp_ppl(llama_cpp, smollm2_path, text)
    model = Model.load(smollm2_path, n_ctx=N_CTX)
    tokens = tokenize_for_perplexity(model, text)
    assert tokens[:N_CTX * N_CHUNKS] == list(ref_tokens[:N_CTX * N_CHUNKS])
    ours = perplexity_of_tokens(model, tokens, n_ctx=N_CTX, n_chunks=N_CHUNKS)
    assert ours.n_scored == N_CHUNKS * (N_CTX // 2 - 1)
    assert abs(ours.ppl - ref) / ref < 0.01, (ours.ppl, ref)
