"""The sampler's math: kept sets, renormalisation, temperature limits,
penalties, seeding, and a chi-square test of the sampled frequencies."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.sampling import (Sampler, SamplerParams, apply_penalties, min_p, softmax,
                              temperature, top_k, top_p)


def _cand(logits):
    x = np.asarray(logits, dtype=np.float32)
    return np.arange(x.size, dtype=np.int64), x


def _from_probs(probs):
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


# ---------------------------------------------------------------- top-k

def test_top_k_keeps_largest_sorted():
    ids, x = top_k(*_cand([0.1, 5.0, -1.0, 3.0, 4.0]), 3)
    assert ids.tolist() == [1, 4, 3]
    assert x.tolist() == [5.0, 4.0, 3.0]


def test_top_k_ties_at_boundary_go_to_lower_id():
    ids, _ = top_k(*_cand([1.0, 3.0, 3.0, 3.0, 0.0]), 2)
    assert ids.tolist() == [1, 2]
    ids, _ = top_k(*_cand([3.0, 1.0, 2.0, 2.0, 2.0]), 3)
    assert ids.tolist() == [0, 2, 3]


def test_top_k_all_equal_and_k_beyond_vocab():
    ids, _ = top_k(*_cand(np.zeros(6)), 3)
    assert ids.tolist() == [0, 1, 2]
    ids, _ = top_k(*_cand([1.0, 2.0, 0.0]), 10)
    assert sorted(ids.tolist()) == [0, 1, 2]
    ids, _ = top_k(*_cand([1.0, 2.0, 0.0]), 0)  # 0 = off
    assert sorted(ids.tolist()) == [0, 1, 2]


def test_top_k_matches_full_sort_on_random_logits():
    rng = np.random.default_rng(1)
    x = rng.normal(size=5000).astype(np.float32)
    ids, _ = top_k(*_cand(x), 40)
    assert ids.tolist() == np.argsort(-x, kind="stable")[:40].tolist()


# ---------------------------------------------------------------- top-p

PROBS = [0.05, 0.5, 0.15, 0.3]


def test_top_p_smallest_set_reaching_p():
    assert top_p(*_cand(_from_probs(PROBS)), 0.75)[0].tolist() == [1, 3]     # 0.5+0.3 >= 0.75
    assert top_p(*_cand(_from_probs(PROBS)), 0.81)[0].tolist() == [1, 3, 2]  # needs 0.95
    assert top_p(*_cand(_from_probs(PROBS)), 0.3)[0].tolist() == [1]         # one already covers it
    assert top_p(*_cand(_from_probs(PROBS)), 0.0)[0].tolist() == [1]         # min_keep = 1


def test_top_p_one_keeps_all_and_all_equal():
    assert sorted(top_p(*_cand(_from_probs(PROBS)), 1.0)[0].tolist()) == [0, 1, 2, 3]
    # five equal tokens: 0.2, 0.4, 0.6 -> three reach 0.5, lowest ids first
    assert top_p(*_cand(np.zeros(5)), 0.5)[0].tolist() == [0, 1, 2]


def test_top_p_progressive_partition_matches_full_sort():
    rng = np.random.default_rng(2)
    for scale, p in [(0.5, 0.95), (3.0, 0.9), (8.0, 0.5), (0.01, 0.99)]:
        x = (rng.normal(size=20000) * scale).astype(np.float32)
        ids, _ = top_p(*_cand(x), p)
        order = np.argsort(-x.astype(np.float64), kind="stable")
        cum = np.cumsum(softmax(x)[order])
        n = int(np.argmax(cum >= p)) + 1
        assert ids.tolist() == order[:n].tolist()
        # on an already sorted top-k set the result is the same prefix
        kid, kx = top_k(*_cand(x), 500)
        sid, _ = top_p(kid, kx, p, sorted_desc=True)
        cum_k = np.cumsum(softmax(kx))
        assert sid.tolist() == kid[: int(np.argmax(cum_k >= p)) + 1 if cum_k[-1] >= p else 500].tolist()


# ---------------------------------------------------------------- min-p

def test_min_p_relative_to_max():
    x = _from_probs(PROBS)
    assert sorted(min_p(*_cand(x), 0.2)[0].tolist()) == [1, 2, 3]   # >= 0.1
    assert sorted(min_p(*_cand(x), 0.5)[0].tolist()) == [1, 3]      # >= 0.25
    assert sorted(min_p(*_cand(x), 1.0)[0].tolist()) == [1]
    assert sorted(min_p(*_cand(x), 0.0)[0].tolist()) == [0, 1, 2, 3]  # off
    assert sorted(min_p(*_cand(np.zeros(4)), 0.9)[0].tolist()) == [0, 1, 2, 3]  # all equal


# ---------------------------------------------------------------- distribution

def test_renormalised_distribution_over_kept_set():
    s = Sampler(SamplerParams(temp=1.0, top_k=3, top_p=1.0, min_p=0.0))
    ids, probs = s.probs(_from_probs([0.4, 0.1, 0.3, 0.2]))
    assert ids.tolist() == [0, 2, 3]
    np.testing.assert_allclose(probs, np.array([0.4, 0.3, 0.2]) / 0.9, rtol=1e-6)
    assert abs(probs.sum() - 1.0) < 1e-12


def test_softmax_is_stable_for_huge_logits():
    p = softmax(np.array([1e30, 1e30 - 1e24, -1e30], dtype=np.float32))
    assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-12


def test_temperature_limits():
    x = _from_probs([0.1, 0.2, 0.4, 0.3])
    # temp <= 0: greedy, no randomness
    s = Sampler(SamplerParams(temp=0.0, seed=1))
    assert {s.sample(x) for _ in range(50)} == {2}
    # tiny temperature: effectively greedy
    _, probs = Sampler(SamplerParams(temp=1e-3, top_k=0, top_p=1.0, min_p=0.0)).probs(x)
    assert probs.max() > 1 - 1e-12
    # huge temperature: uniform over the kept set (top-k 3 keeps 3 tokens)
    ids, probs = Sampler(SamplerParams(temp=1e6, top_k=3, top_p=1.0, min_p=0.0)).probs(x)
    assert ids.tolist() == [2, 3, 1]
    np.testing.assert_allclose(probs, 1 / 3, atol=1e-6)
    # temperature does not change which tokens top-p / min-p keep (applied after them)
    hot = Sampler(SamplerParams(temp=5.0, top_k=0, top_p=0.65, min_p=0.0)).probs(x)[0]
    cold = Sampler(SamplerParams(temp=0.2, top_k=0, top_p=0.65, min_p=0.0)).probs(x)[0]
    assert hot.tolist() == cold.tolist() == [2, 3]
    np.testing.assert_allclose(temperature(np.float32([2.0, -4.0]), 2.0), [1.0, -2.0])


def test_penalties_llama_cpp_semantics():
    x = np.float32([2.0, -2.0, 1.0, 0.5])
    out = apply_penalties(x, [0, 1, 1], last_n=64, repeat=2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, 0.5])
    out = apply_penalties(x, [0, 1, 1], last_n=64, repeat=2.0, presence=0.25, frequency=0.5)
    np.testing.assert_allclose(out, [1.0 - 0.5 - 0.25, -4.0 - 1.0 - 0.25, 1.0, 0.5])
    # only the last_n window counts; 0 disables; -1 = all history
    np.testing.assert_allclose(apply_penalties(x, [0, 1, 1], last_n=1, repeat=2.0), [2.0, -4.0, 1.0, 0.5])
    np.testing.assert_allclose(apply_penalties(x, [0, 1], last_n=0, repeat=2.0), x)
    np.testing.assert_allclose(apply_penalties(x, [0] * 100 + [2], last_n=-1, repeat=2.0), [1.0, -2.0, 0.5, 0.5])
    assert x.tolist() == [2.0, -2.0, 1.0, 0.5]  # input untouched


def test_penalty_changes_greedy_choice():
    x = np.float32([3.0, 2.0, 1.0])
    s = Sampler(SamplerParams(temp=0.0, repeat_penalty=2.0))
    assert s.sample(x, history=[]) == 0
    assert s.sample(x, history=[0]) == 1


def test_seed_reproducibility():
    x = np.random.default_rng(3).normal(size=1000).astype(np.float32)
    a = Sampler(SamplerParams(seed=42, top_k=0, top_p=1.0, min_p=0.0, temp=1.0))
    b = Sampler(SamplerParams(seed=42, top_k=0, top_p=1.0, min_p=0.0, temp=1.0))
    c = Sampler(SamplerParams(seed=43, top_k=0, top_p=1.0, min_p=0.0, temp=1.0))
    sa = [a.sample(x) for _ in range(30)]
    assert sa == [b.sample(x) for _ in range(30)]
    assert sa != [c.sample(x) for _ in range(30)]
    a.reseed(42)
    assert sa == [a.sample(x) for _ in range(30)]


def test_chi_square_sampled_frequencies_follow_filtered_distribution():
    # 10 tokens; the default-like chain keeps some of them and renormalises.
    x = _from_probs([0.02, 0.25, 0.01, 0.18, 0.12, 0.005, 0.22, 0.08, 0.06, 0.055])
    s = Sampler(SamplerParams(temp=0.9, top_k=8, top_p=0.95, min_p=0.05, seed=1234))
    ids, probs = s.probs(x)
    # by hand: top-k 8 drops ids 2, 5; top-p 0.95 over the 8 (renormalised)
    # keeps all but id 0, min-p 0.05 (>= 0.0125 of 0.25) keeps the rest.
    assert sorted(ids.tolist()) == [1, 3, 4, 6, 7, 8, 9]
    n = 20000
    draws = np.array([s.sample(x) for _ in range(n)])
    assert set(np.unique(draws).tolist()) <= set(ids.tolist())
    observed = np.array([(draws == i).sum() for i in ids])
    expected = probs * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # 7 categories -> 6 degrees of freedom; the 0.999 quantile of chi2(6) is 22.458
    assert chi2 < 22.458, chi2
    # and the same statistic rejects the unfiltered distribution (all 10 tokens)
    p_raw = softmax(x / np.float32(0.9))
    obs_all = np.bincount(draws, minlength=10)
    assert ((obs_all - p_raw * n) ** 2 / (p_raw * n)).sum() > 27.877  # chi2(9) 0.999


def test_params_validation():
    with pytest.raises(ValueError):
        SamplerParams(top_p=1.5)
    with pytest.raises(ValueError):
        SamplerParams(min_p=-0.1)
    with pytest.raises(ValueError):
        SamplerParams(repeat_penalty=0.0)


def test_fast_path_without_top_k_equals_sequential_chain():
    # with top-k off the sampler runs min-p before top-p (they commute); the
    # kept set must equal llama.cpp's order: top-p, then min-p.
    rng = np.random.default_rng(5)
    for scale, tp, mp in [(3.0, 0.9, 0.05), (1.0, 0.95, 0.2), (6.0, 0.5, 0.01), (0.2, 0.99, 0.9)]:
        x = (rng.normal(size=30000) * scale).astype(np.float32)
        got, _ = Sampler(SamplerParams(temp=1.0, top_k=0, top_p=tp, min_p=mp)).filter(x)
        ids, xs = top_p(np.arange(x.size), x, tp)
        want, _ = min_p(ids, xs, mp)
        assert sorted(got.tolist()) == sorted(want.tolist())


def test_top_k_large_vocab_prefilter_exact_with_ties():
    # V large enough for the strided-threshold prefilter; many ties at the boundary
    rng = np.random.default_rng(6)
    x = rng.integers(0, 50, size=152064).astype(np.float32)
    ids, _ = top_k(None, x, 40)
    assert ids.tolist() == np.lexsort((np.arange(x.size), -x))[:40].tolist()
    # arbitrary ids: ties still resolved by lower id
    perm = rng.permutation(x.size)
    ids, _ = top_k(perm, x, 40)
    assert ids.tolist() == perm[np.lexsort((perm, -x))][:40].tolist()
    # sorted ascending input (worst case for a strided sample) is still exact
    y = np.sort(rng.normal(size=152064)).astype(np.float32)
    assert top_k(None, y, 40)[0].tolist() == list(range(152063, 152023, -1))


def test_nucleus_is_top_p_set_in_linear_time():
    from runtime.sampling import nucleus

    rng = np.random.default_rng(9)
    cases = [(rng.normal(size=152064) * sc).astype(np.float32) for sc in (0.01, 0.5, 3.0, 10.0)]
    cases.append(rng.integers(0, 30, size=50000).astype(np.float32))  # many ties across the cut
    for x in cases:
        for p in (0.0, 0.3, 0.9, 0.95, 0.999):
            want, _ = top_p(np.arange(x.size), x, p)
            got = nucleus(x, p)
            assert got.tolist() == sorted(want.tolist()), (p, got.size, want.size)
    # all equal: p * V tokens (to the rounding of the running sum), lowest ids first
    got = nucleus(np.zeros(10000, np.float32), 0.3)
    assert got.size in (3000, 3001) and got.tolist() == list(range(got.size))
    # and the sampler uses it when top-k and min-p are off
    x = cases[1]
    got, _ = Sampler(SamplerParams(temp=1.0, top_k=0, top_p=0.9, min_p=0.0)).filter(x)
    want, _ = top_p(np.arange(x.size), x, 0.9)
    assert sorted(got.tolist()) == sorted(want.tolist())
