"""SessionPool: several sequences in one KV allocation, decoded in one batched step
(the server's continuous batching).  A row's logits must be bit for bit what its
own session's one-token step gives, whichever other rows share the step."""

from __future__ import annotations

import numpy as np
import pytest

import _oracle  # noqa: F401  (puts tools/ on sys.path)
from make_synthetic import write_synthetic
from runtime.model import Model

PROMPTS = [[1, 17, 5, 99, 23, 4, 8], [2, 300, 41], [9] * 12 + [77], [5, 6]]
# which slots step together at each decode step: all, a subset, one, a different order
SCHEDULE = [(0, 1, 2, 3), (0, 2, 3), (1,), (3, 1, 0, 2), (2, 0), (0, 1, 2, 3)]


def _check_batch_invariant(model: Model):
    rng = np.random.default_rng(0)
    pool = model.session_pool(len(PROMPTS), 64)
    alone = [model.session(64) for _ in PROMPTS]  # the same sequences, one at a time
    for s, a, p in zip(pool.sessions, alone, PROMPTS):
        s.eval(p)
        a.eval(p)
    for step in SCHEDULE:
        toks = [int(t) for t in rng.integers(0, model.n_vocab, len(step))]
        got = pool.decode([pool.sessions[i] for i in step], toks)
        assert got.shape == (len(step), model.n_vocab) and got.dtype == np.float32
        for row, (i, t) in enumerate(zip(step, toks)):
            alone[i].eval([t])
            want = alone[i].logits()
            assert np.array_equal(got[row], want), f"slot {i} differs at step {step}"
            assert pool.sessions[i].n_past == alone[i].n_past
    # a pool session is an ordinary session: its logits() agree with the step's rows
    assert np.array_equal(pool.sessions[0].logits(), alone[0].logits())


def test_pool_decode_is_batch_invariant_on_quantized_llama(smollm2_path):
    """SmolLM2: Q4_1 and Q8_0 matrices, the int8 multi-row path."""
    _check_batch_invariant(Model.load(smollm2_path, n_ctx=256))


@pytest.mark.parametrize("arch,kw", [("qwen2", dict(gqa=8, tied=True)),
                                     ("qwen3", dict(gqa=4, tied=False, head_dim=64))])
def test_pool_decode_is_batch_invariant_on_synthetic(tmp_path, arch, kw):
    """QKV bias (qwen2) and QK-norm (qwen3), F16 weights (the float kernels)."""
    path = write_synthetic(tmp_path / f"{arch}.gguf", arch=arch, n_layers=2, d_model=256, n_heads=8,
                           ffn=512, vocab=512, dtype=np.float16, **kw)
    _check_batch_invariant(Model.load(path, n_ctx=64))


def test_pool_more_rows_than_one_call(smollm2_path):
    """More sessions than quant.Q8_MAX_ROWS: decoded in several calls, same rows."""
    m = Model.load(smollm2_path, n_ctx=64)
    pool = m.session_pool(20, 16)
    for i, s in enumerate(pool.sessions):
        s.eval([1, 10 + i])
    toks = list(range(100, 120))
    got = pool.decode(pool.sessions, toks)
    ref = m.session(16)
    for i in (0, 7, 16, 19):
        ref.reset()
        ref.eval([1, 10 + i, toks[i]])
        assert np.array_equal(got[i], ref.logits())


def test_pool_errors(smollm2_path):
    m = Model.load(smollm2_path, n_ctx=64)
    pool = m.session_pool(2, 4)
    a, b = pool.sessions
    with pytest.raises(ValueError, match="sessions of this pool"):
        pool.decode([m.session(4)], [1])
    with pytest.raises(ValueError, match="twice"):
        pool.decode([a, a], [1, 2])
    with pytest.raises(ValueError, match="2 sessions but 1 tokens"):
        pool.decode([a, b], [1])
    with pytest.raises(ValueError, match="out of range"):
        pool.decode([a], [m.n_vocab])
    a.eval([1, 2, 3, 4])
    with pytest.raises(ValueError, match="context overflow"):
        pool.decode([a, b], [5, 6])
    assert b.n_past == 0  # a refused step changes nothing
    with pytest.raises(ValueError, match="n_slots >= 1"):
        m.session_pool(0, 4)
