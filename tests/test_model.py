"""Engine correctness on tiny synthetic F32 models: exact-math reference, incremental
evaluation, sessions, errors, attention capture."""

from __future__ import annotations

import numpy as np
import pytest

from _oracle import kl_stats
from make_synthetic import write_synthetic  # tools/, put on sys.path by _oracle
from reference import reference_logits
from runtime.model import Model

IDS = [int(i) for i in np.random.default_rng(7).integers(0, 512, 48)]

# arch, GQA ratio of 8 query heads (4 / 1 / 8 / 4), tied output, head_dim override, rope scale
CASES = {
    "llama": dict(arch="llama", gqa=4, tied=False),
    "llama_tied_ropescale": dict(arch="llama", gqa=1, tied=True, rope_scale=4.0),
    "qwen2": dict(arch="qwen2", gqa=8, tied=True),
    "qwen3": dict(arch="qwen3", gqa=4, tied=False, head_dim=64),
}


def _write(path, **kw):
    """A tiny 2-layer model: d 256, 8 heads, ffn 512, vocab 512."""
    return write_synthetic(path, n_layers=kw.pop("n_layers", 2), d_model=256, n_heads=8, ffn=512,
                           vocab=512, **kw)


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    return {k: _write(d / f"{k}.gguf", seed=i, **kw) for i, (k, kw) in enumerate(CASES.items())}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_numpy_reference(synth, case):
    m = Model.load(synth[case], n_ctx=64, kv_type="f32")
    ours = m.logits(IDS)
    ref = reference_logits(synth[case], IDS)
    assert ours.shape == (len(IDS), 512) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 2e-3 * np.abs(ref).max()
    kl, top1 = kl_stats(ref, ours)
    assert kl < 1e-6 and top1 == 1.0


def test_incremental_equals_full_pass(synth):
    m = Model.load(synth["qwen3"], n_ctx=64, kv_type="f32")
    full = m.logits(IDS)
    s = m.session()
    got = [s.eval(IDS[:5], all_logits=True), s.eval(IDS[5:17], all_logits=True)]
    for t in IDS[17:]:
        s.eval([t])
        got.append(s.logits()[None])
    assert s.n_past == len(IDS)
    assert np.abs(np.concatenate(got) - full).max() <= 1e-4


def test_f16_cache_close_to_f32(synth):
    a = Model.load(synth["llama"], n_ctx=64, kv_type="f32").logits(IDS)
    b = Model.load(synth["llama"], n_ctx=64).logits(IDS)
    assert kl_stats(a, b)[0] < 1e-4


def test_rewind_and_reset(synth):
    m = Model.load(synth["llama"], n_ctx=64, kv_type="f32")
    s = m.session()
    s.eval(IDS[:20])
    want = s.logits().copy()
    s.eval(IDS[20:30])
    s.rewind(10)
    assert s.n_past == 20
    # recomputed after the rewind, as one token instead of inside a batch: float32
    # sums in another order, so equal to float32 rounding, not bit for bit
    np.testing.assert_allclose(s.logits(), want, atol=1e-4)
    s.eval([IDS[40]])
    other = Model.load(synth["llama"], n_ctx=64, kv_type="f32").session()
    other.eval(IDS[:20] + [IDS[40]])
    np.testing.assert_allclose(s.logits(), other.logits(), atol=1e-4)
    with pytest.raises(ValueError):
        s.rewind(s.n_past + 1)
    s.reset()
    assert s.n_past == 0
    s.eval(IDS[:20])
    np.testing.assert_allclose(s.logits(), want, atol=1e-5)


def test_context_overflow_is_a_clear_error(synth):
    m = Model.load(synth["llama"], n_ctx=16)
    s = m.session()
    with pytest.raises(ValueError, match="context"):
        s.eval(IDS[:17])
    s.eval(IDS[:16])
    with pytest.raises(ValueError, match="context"):
        s.eval([1])
    with pytest.raises(ValueError, match="context"):
        m.logits(IDS[:17])


def test_bad_token_id(synth):
    s = Model.load(synth["llama"], n_ctx=16).session()
    with pytest.raises(ValueError, match="out of range"):
        s.eval([512])


def test_missing_tensor_and_unsupported_arch(tmp_path):
    p = _write(tmp_path / "m.gguf", arch="qwen3", n_layers=1, drop=("blk.0.attn_k_norm.weight",))
    with pytest.raises(ValueError, match="blk.0.attn_k_norm.weight"):
        Model.load(p, n_ctx=16)
    p = _write(tmp_path / "m2.gguf", arch="llama", n_layers=1, drop=("blk.0.ffn_up.weight",))
    with pytest.raises(ValueError, match="blk.0.ffn_up.weight"):
        Model.load(p, n_ctx=16)
    p = _write(tmp_path / "m3.gguf", arch="falcon", n_layers=1)
    with pytest.raises(ValueError, match="falcon"):
        Model.load(p, n_ctx=16)


def test_attention_capture(synth):
    m = Model.load(synth["qwen2"], n_ctx=64, kv_type="f32")
    ids = IDS[:12]
    before = m.logits(ids)
    maps = m.attention(ids, layers=[1])
    assert maps.shape == (1, 8, 12, 12)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(maps[0, 0], 1) == 0)  # causal
    assert np.all(maps[0, :, 0, 0] == pytest.approx(1.0))
    np.testing.assert_allclose(m.logits(ids), before, atol=1e-5)


def test_attention_of_one_layer_stores_one_layer(tmp_path):
    """Maps of a selected layer cost that layer's [heads, n, n], not every layer's."""
    import tracemalloc

    path = _write(tmp_path / "deep.gguf", arch="llama", n_layers=8, gqa=4)
    n = 256
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 512, n)]
    m = Model.load(path, n_ctx=n)
    m.attention(ids[:8], layers=[5])  # compile / warm up outside the measurement
    one_layer = 8 * n * n * 4  # heads x n x n float32
    tracemalloc.start()
    maps = m.attention(ids, layers=[5])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert maps.shape == (1, 8, n, n)
    assert peak < 2 * one_layer, (peak, one_layer)  # all 8 layers would be 8 x one_layer
    all_maps = m.attention(ids)
    np.testing.assert_allclose(all_maps[5], maps[0], atol=1e-6)
