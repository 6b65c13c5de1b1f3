"""precision "exact": float32 activations in every matmul (Model / Session / SessionPool,
and the --precision flag of generate, chat, perplexity and serve)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from _oracle import kl_stats
from reference import reference_logits
from runtime.model import Model

IDS = [1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 3458, 282, 4649, 314, 7042, 30, 1909]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return smollm2_path


def test_exact_is_the_reference_math(smol):
    """Exact activations land on the float64 reference over the same weights; the
    default (llama.cpp's integer activations) is measurably further away."""
    ref = reference_logits(str(smol), IDS)
    fast = Model.load(smol, n_ctx=64).logits(IDS)
    m = Model.load(smol, n_ctx=64, precision="exact")
    assert m.precision == "exact"
    exact = m.logits(IDS)
    kl_exact, top_exact = kl_stats(ref, exact)
    kl_fast, _ = kl_stats(ref, fast)
    assert kl_exact < 1e-5 and top_exact == 1.0, kl_exact
    assert kl_fast > 10 * kl_exact, (kl_fast, kl_exact)
    # prefill in blocks and one token at a time: the same math, float32 apart
    s = m.session(64)
    rows = [s.eval([t], all_logits=True)[0] for t in IDS]
    assert kl_stats(exact, np.array(rows))[0] < 1e-6
    # a session can differ from its model
    assert m.session(64, precision="fast").precision == "fast"
    m.precision = "fast"
    assert m.session(64).precision == "fast"
    assert np.array_equal(m.logits(IDS), fast)


def test_exact_pool_decode_is_each_rows_own_step(smol):
    """The server's batched decode in exact precision: each row is its own one-token
    eval, so a row's logits do not depend on which rows share the step."""
    m = Model.load(smol, n_ctx=64, precision="exact")
    pool = m.session_pool(3, 32)
    assert pool.precision == "exact" and all(s.precision == "exact" for s in pool.sessions)
    alone = [m.session(32) for _ in range(3)]
    prompts = [[1, 17, 5, 99], [2, 300], [9, 9, 9, 77, 8]]
    for s, a, p in zip(pool.sessions, alone, prompts):
        s.eval(p)
        a.eval(p)
    rng = np.random.default_rng(0)
    for step in [(0, 1, 2), (2, 0), (1,)]:
        toks = [int(t) for t in rng.integers(0, m.n_vocab, len(step))]
        got = pool.decode([pool.sessions[i] for i in step], toks)
        for row, (i, t) in enumerate(zip(step, toks)):
            alone[i].eval([t])
            assert np.array_equal(got[row], alone[i].logits()), (step, i)
    # and it is the exact path: not the fast pool's rows
    fast = Model.load(smol, n_ctx=64).session_pool(1, 32)
    fast.sessions[0].eval(prompts[0])
    exact = m.session_pool(1, 32)
    exact.sessions[0].eval(prompts[0])
    assert not np.array_equal(fast.decode(fast.sessions, [5]), exact.decode(exact.sessions, [5]))


def test_precision_is_validated(smol):
    with pytest.raises(ValueError, match="precision must be 'fast' or 'exact'"):
        Model.load(smol, n_ctx=16, precision="int8")
    m = Model.load(smol, n_ctx=16)
    assert m.precision == "fast"
    with pytest.raises(ValueError, match="precision"):
        m.session(16, precision="float16")
    with pytest.raises(ValueError, match="precision"):
        m.precision = "slow"


def test_every_command_takes_the_flag():
    from runtime.cli import build_parser

    parser = build_parser()
    for argv in (["generate", "m", "-p", "x"], ["chat"], ["perplexity", "m", "f"], ["serve"]):
        assert parser.parse_args(argv).precision == "fast"
        assert parser.parse_args(argv + ["--precision", "exact"]).precision == "exact"


def test_generate_exact_cli(smol):
    p = subprocess.run([sys.executable, "-m", "runtime", "generate", str(smol), "-p", "The capital of France is",
                        "-n", "6", "--temp", "0", "-c", "64", "--precision", "exact", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["tokens_predicted"] == 6 and d["content"].strip()
