"""perplexity --ray: chunks scored on a Ray cluster give the single-process results exactly.

One local Ray cluster (2 CPUs -> 2 workers of 1 thread) serves the whole module;
it is shut down at the end even when a test fails, and every wait on it has a
timeout, so a stuck worker fails a test instead of hanging the suite.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from runtime.distributed import DistributedError, plan_workers

N_CTX, N_CHUNKS = 128, 4
TIMEOUT = 600   # seconds: a cold numba cache in the workers compiles the engine first


def test_plan_workers_fits_the_nodes():
    assert plan_workers([2]) == (2, 1)
    assert plan_workers([8, 4], threads=4) == (3, 4)
    assert plan_workers([8, 4], workers=2) == (2, 4)      # the most threads that still fit both
    assert plan_workers([8, 4], workers=3) == (3, 4)
    assert plan_workers([8, 4], workers=5) == (5, 2)
    with pytest.raises(DistributedError, match="no Ray node has 16 CPUs"):
        plan_workers([8, 4], threads=16)
    with pytest.raises(DistributedError, match="hold 3 such workers"):
        plan_workers([8, 4], workers=4, threads=4)
    with pytest.raises(DistributedError, match="13 CPUs"):
        plan_workers([8, 4, 1], workers=14)


def test_cli_without_ray_names_the_extra(monkeypatch, capsys, tmp_path):
    from runtime.cli import main

    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` raises ImportError
    # refused before the model is opened: no model needed
    assert main(["perplexity", str(tmp_path / "m.gguf"), str(text), "--ray"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("compiling kernels")]
    assert len(err) == 1 and err[0].startswith("error: --ray needs Ray, the 'distributed' extra: pip install")


# --------------------------------------------------------------------------
# on a local cluster
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray (the 'distributed' extra) is not installed")
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ctx.address_info["address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def smol(smollm2_path):
    from runtime.model import Model

    return Model.load(smollm2_path, n_ctx=N_CTX)


@pytest.fixture(scope="module")
def tokens(smol, wikitext):
    from runtime.perplexity import tokenize_for_perplexity

    return tokenize_for_perplexity(smol, wikitext[:40000])[:N_CTX * N_CHUNKS + 7]


def _scorer(path, base=None, **kw):
    from runtime.distributed import RayScorer, model_ref

    return RayScorer(model_ref(path), None if base is None else model_ref(base), n_ctx=N_CTX,
                     timeout=TIMEOUT, limit=N_CHUNKS, **kw)


def _lines(r):
    """What the command prints for a result: per-chunk lines and the summary, speed left out."""
    from runtime.perplexity import _chunk_line, _format

    out = [_chunk_line(c) for c in r.chunks] + _format(r, "m", "f").splitlines()
    return [ln for ln in out if not ln.startswith("speed")]


def _same_numbers(a, b):
    assert (a.ppl, a.ppl_err, a.nll_mean, a.n_scored, a.n_chunks) == (b.ppl, b.ppl_err, b.nll_mean, b.n_scored,
                                                                      b.n_chunks)
    for x, y in zip(a.chunks, b.chunks, strict=True):
        assert (x.chunk, x.ppl, x.ppl_err, x.chunk_ppl, x.kl_mean, x.top1, x.ln_ppl_ratio, x.dp_rms) == \
               (y.chunk, y.ppl, y.ppl_err, y.chunk_ppl, y.kl_mean, y.top1, y.ln_ppl_ratio, y.dp_rms)
    assert a.kl == b.kl   # every field of the KL table (None without a base)


def test_ray_ppl_equals_local(ray_cluster, smollm2_path, smol, tokens):
    from runtime.perplexity import perplexity_of_tokens

    local = perplexity_of_tokens(smol, tokens, n_ctx=N_CTX, n_chunks=N_CHUNKS)
    with _scorer(smollm2_path) as sc:
        assert (sc.workers, sc.threads) == (2, 1)
        assert len({w["pid"] for w in sc.info}) == 2          # two worker processes, one model each
        dist = perplexity_of_tokens(smol, tokens, n_ctx=N_CTX, n_chunks=N_CHUNKS, scorer=sc)
    assert dist.n_chunks == N_CHUNKS and dist.n_scored == N_CHUNKS * (N_CTX - 1 - N_CTX // 2)
    _same_numbers(dist, local)
    assert _lines(dist) == _lines(local)


def test_ray_kl_table_equals_local(ray_cluster, smollm2_path, smol, tokens):
    """A base that differs from the model (the same weights, float32 activations)
    so that every row of the KL table is a real number."""
    from runtime.model import Model
    from runtime.perplexity import format_kl_table, perplexity_of_tokens

    base = Model.load(smollm2_path, n_ctx=N_CTX, precision="exact")
    local = perplexity_of_tokens(smol, tokens, n_ctx=N_CTX, n_chunks=N_CHUNKS, base=base, base_name="b")
    assert local.kl.kl_mean > 0 and local.kl.top1 > 0.8  # 1.9e-6 and 1.0 on AVX-512 Zen 4
    with _scorer(smollm2_path, smollm2_path, base_precision="exact") as sc:
        dist = perplexity_of_tokens(smol, tokens, n_ctx=N_CTX, n_chunks=N_CHUNKS, base=base, base_name="b",
                                    scorer=sc)
    _same_numbers(dist, local)
    assert format_kl_table(dist.kl) == format_kl_table(local.kl)
    assert _lines(dist) == _lines(local)


def test_ray_log_prob_file_written_and_read(ray_cluster, smollm2_path, smol, tokens, tmp_path):
    """--kl-divergence-base written by workers is byte for byte the local file, and
    --kl-divergence against it on workers gives the local statistics."""
    from runtime.perplexity import kl_divergence_of_file, perplexity_of_tokens

    a, b = tmp_path / "local.kld", tmp_path / "ray.kld"
    perplexity_of_tokens(smol, tokens, n_ctx=N_CTX, n_chunks=N_CHUNKS, kl_base_out=a)
    with _scorer(smollm2_path) as sc:
        perplexity_of_tokens(smol, tokens, n_ctx=N_CTX, n_chunks=N_CHUNKS, kl_base_out=b, scorer=sc)
        dist = kl_divergence_of_file(smol, a, scorer=sc)
    assert a.read_bytes() == b.read_bytes()
    local = kl_divergence_of_file(smol, a)
    _same_numbers(dist, local)


def test_ray_model_missing_on_the_workers(ray_cluster, tmp_path):
    with pytest.raises(DistributedError, match="shared filesystem"):
        _scorer(tmp_path / "nowhere" / "m.gguf")


def test_cli_ray_prints_what_the_local_run_prints(ray_cluster, smollm2_path, tokens, smol, tmp_path):
    """The command itself, connecting to the module's cluster by its address."""
    text = tmp_path / "t.txt"
    text.write_text(smol.detokenize(tokens), encoding="utf-8")
    cmd = [sys.executable, "-m", "runtime", "perplexity", str(smollm2_path), str(text),
           "-c", str(N_CTX), "--chunks", "3"]
    runs = [subprocess.run(c, capture_output=True, text=True, timeout=TIMEOUT)
            for c in (cmd, cmd + ["--ray", ray_cluster])]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert "ray: 2 workers x 1 threads on 1 node" in runs[1].stderr
    out = [[ln for ln in r.stdout.splitlines() if not ln.startswith("speed")] for r in runs]
    assert out[0] == out[1]
    assert sum(ln.startswith("[") for ln in out[0]) == 3 and "Final estimate: PPL = " in out[0][-1]
