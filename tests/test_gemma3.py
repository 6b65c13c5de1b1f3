"""Gemma 3 (gemma3): the engine against llama.cpp and the NumPy reference, the
sliding-window KV ring, rewinds past it, the session pool, the CLI on the real file.

The real file is gemma-3-270m Q4_K_M (18 layers, window 512, every 6th layer global);
the synthetic ones (tools/make_synthetic.py) have 7 layers (layer 5 global) and a
32-token window, so that a few hundred tokens run far past the window and around
the engine's ring of window + N_BATCH cells.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _oracle import ROOT, kl_stats, llamacpp_logits, synthetic_model, wikitext_ids
from make_synthetic import write_synthetic  # tools/, put on sys.path by _oracle
from reference import reference_logits
from runtime import arch
from runtime.model import N_BATCH, Model

N_REAL = 704  # past the 512-token window, and more than one 256-token batch past it


def _kl_top1(ref, q, rows=64):
    """kl_stats in chunks of rows: [704, 262144] float64 copies would need gigabytes."""
    kls, tops = [], []
    for a in range(0, len(ref), rows):
        kl, top1 = kl_stats(ref[a:a + rows], q[a:a + rows])
        n = len(ref[a:a + rows])
        kls.append(kl * n)
        tops.append(top1 * n)
    return sum(kls) / len(ref), sum(tops) / len(ref)


# ---------------------------------------------------------------- hyperparameters

def test_family_row_and_hparams_of_the_real_file(gemma3_path):
    from runtime.gguf import GGUFFile

    h = arch.from_gguf(GGUFFile(gemma3_path, header_only=True), for_engine=True)
    assert h.family.runs and h.rope_style == "neox" and h.qk_norm
    assert (h.n_layers, h.d_model, h.n_heads, h.n_kv_heads, h.head_dim) == (18, 640, 4, 1, 256)
    assert h.n_swa == 512 and h.rope_base == 1e6 and h.rope_base_local == 10000.0
    # layer l is global when l % 6 == 5 (llama.cpp's set_swa_pattern(6))
    assert [il for il, s in enumerate(h.swa_layers) if not s] == [5, 11, 17]
    assert h.attn_scale == pytest.approx(1 / 16)  # 1/sqrt(key_length 256), not 1/sqrt(640/4)


@pytest.mark.parametrize("meta,match", [
    ({".attention.sliding_window": None}, "sliding_window is missing"),
    ({".attention.sliding_window": 0}, "sliding_window is missing or 0"),
    ({".attention.sliding_window": [32, 32]}, "sliding_window must be one integer"),
    ({".attention.sliding_window": 1 << 30}, "sliding_window = 1073741824 is out of range"),
])
def test_bad_window_refused_naming_the_key(tmp_path, meta, match):
    import gguf

    spec = dict(arch="gemma3", n_layers=6, d_model=256, n_heads=4, head_dim=64, ffn=512, vocab=512)
    md = {k: (v, gguf.GGUFValueType.UINT32) if isinstance(v, int) else v for k, v in meta.items() if v is not None}
    path = write_synthetic(tmp_path / "g.gguf", sliding_window=None if None in meta.values() else 32,
                           metadata=md, **spec)
    with pytest.raises(ValueError, match=match):
        Model.load(path, n_ctx=16)


def test_missing_post_norm_refused(tmp_path):
    path = write_synthetic(tmp_path / "g.gguf", arch="gemma3", n_layers=6, d_model=256, n_heads=4,
                           head_dim=64, ffn=512, vocab=512, sliding_window=8,
                           drop=("blk.2.post_ffw_norm.weight",))
    with pytest.raises(ValueError, match="missing tensor 'blk.2.post_ffw_norm.weight'"):
        Model.load(path, n_ctx=16)


# ---------------------------------------------------------------- math

@pytest.fixture(scope="module")
def synth_ids():
    return wikitext_ids(n=300, vocab=512)


@pytest.mark.parametrize("gqa,tied", [(1, True), (4, False)])
def test_synthetic_f32_reference_engine_and_llamacpp_agree(llama_cpp, synth_ids, gqa, tied):
    """Exact weights: the reference and the engine both match llama.cpp to float
    rounding, over 300 positions (window 32, the engine's ring wraps at 288)."""
    path = synthetic_model("gemma3", gqa, tied)
    lc = llamacpp_logits(llama_cpp, path, synth_ids)
    ref = reference_logits(path, synth_ids)
    m = Model.load(path, n_ctx=400)
    assert m.session().kv.k_swa.shape[1] == 32 + N_BATCH < 300  # the ring really wraps
    ours = m.logits(synth_ids)
    for name, got in (("reference", ref), ("engine", ours)):
        kl, top1 = kl_stats(lc, got)
        print(f"\ngemma3 synthetic F32 gqa{gqa}: llama.cpp vs {name} KL {kl:.3g} top1 {top1:.3f}")
        assert kl <= 1e-4 and top1 >= 0.99, (name, kl, top1)
    kl, top1 = kl_stats(ref, ours)
    assert kl <= 1e-5 and top1 >= 0.99


def test_synthetic_q4_k_m_within_the_reference_bar(llama_cpp, synth_ids):
    """Quantized: ours no further from llama.cpp than the exact reference, prefill and decode."""
    path = synthetic_model("gemma3", 4, False, "Q4_K_M")
    lc = llamacpp_logits(llama_cpp, path, synth_ids)
    kl_ref, top1_ref = kl_stats(lc, reference_logits(path, synth_ids))
    m = Model.load(path, n_ctx=400)
    kl, top1 = kl_stats(lc, m.logits(synth_ids))
    s = m.session()
    dec = []
    for t in synth_ids[:96]:
        s.eval([t])
        dec.append(s.logits())
    kl_d, top1_d = kl_stats(lc[:96], np.stack(dec))
    kl_rd, top1_rd = kl_stats(lc[:96], reference_logits(path, synth_ids[:96]))
    print(f"\ngemma3 synthetic Q4_K_M: KL {kl:.3g} top1 {top1:.3f} | decode {kl_d:.3g} {top1_d:.3f} "
          f"| reference {kl_ref:.3g} {top1_ref:.3f} / {kl_rd:.3g} {top1_rd:.3f}")
    assert kl <= 1.5 * kl_ref + 1e-5 and top1 >= top1_ref - 0.02
    assert kl_d <= 1.5 * kl_rd + 1e-5 and top1_d >= top1_rd - 0.02


@pytest.fixture(scope="module")
def real(gemma3_path):
    return Model.load(gemma3_path, n_ctx=1024)


@pytest.fixture(scope="module")
def real_ids(real, wikitext):
    return [real.tokenizer.bos_id] + wikitext_ids(lambda t: real.tokenize(t, add_special=False), n=N_REAL - 1)


def test_real_file_kl_to_llamacpp_within_the_reference_bar(llama_cpp, gemma3_path, real, real_ids):
    """704 WikiText-2 tokens of the real Q4_K_M file (192 past the window): ours is
    no further from llama.cpp than the exact float64 reference is."""
    lc = llamacpp_logits(llama_cpp, gemma3_path, real_ids)
    ours = real.logits(real_ids)
    kl, top1 = _kl_top1(lc, ours)
    ref = reference_logits(gemma3_path, real_ids)
    kl_ref, top1_ref = _kl_top1(lc, ref)
    kl_late, _ = _kl_top1(lc[512:], ours[512:])
    kl_late_ref, _ = _kl_top1(lc[512:], ref[512:])
    del ref
    print(f"\ngemma3-270m Q4_K_M, {len(real_ids)} tokens: KL {kl:.4g} top1 {top1:.3f} | reference "
          f"KL {kl_ref:.4g} top1 {top1_ref:.3f} | past the window: {kl_late:.4g} vs {kl_late_ref:.4g}")
    assert kl <= 1.5 * kl_ref + 1e-5 and top1 >= top1_ref - 0.02, (kl, kl_ref, top1, top1_ref)
    assert kl_late <= 1.5 * kl_late_ref + 1e-5, (kl_late, kl_late_ref)


# ---------------------------------------------------------------- the ring, rewinds

def test_ring_sizes(real):
    s = real.session(4096)
    ring = real.args.n_swa + N_BATCH  # 768: window + one batch, as llama.cpp's n_swa + n_ubatch
    assert s.kv.k_swa.shape[:2] == (15, ring) and s.kv.v_swa.shape[:2] == (15, ring)
    assert s.kv.k.shape[:2] == (3, 4096)
    assert real.session(4096, swa_full=True).kv.k_swa.shape[1] == 4096
    assert real.session(300).kv.k_swa.shape[1] == 300  # never more than n_ctx


@pytest.fixture(scope="module")
def synth_f32():
    return Model.load(synthetic_model("gemma3", 4, False), n_ctx=400)


def _close(a, b):
    """Equal up to float32 summation order (the ring splits a window into two runs
    of cells where a full cache has one): a wrong key would move logits by O(1)."""
    assert np.abs(a - b).max() < 3e-3, np.abs(a - b).max()
    assert kl_stats(b, a)[0] < 1e-6


def test_decode_around_the_ring_matches_a_full_cache(synth_f32, synth_ids):
    """Token by token past the ring's 288 cells: the ring and a full-size cache
    (swa_full) give the same logits."""
    m = synth_f32
    ring, full = m.session(), m.session(swa_full=True)
    assert ring.kv.k_swa.shape[1] == 288 and full.kv.k_swa.shape[1] == 400
    ring.eval(synth_ids[:250])
    full.eval(synth_ids[:250])
    for t in synth_ids[250:300] + synth_ids[:40]:
        ring.eval([t])
        full.eval([t])
        if ring.n_past <= 288:  # the same cells, the same sums
            assert np.array_equal(ring.logits(), full.logits())
        else:                   # the ring has wrapped
            _close(ring.logits(), full.logits())
    assert ring.n_past == 340


def test_rewind_within_the_ring_keeps_the_cache(synth_f32, synth_ids):
    m = synth_f32
    s = m.session()
    s.eval(synth_ids[:300])
    s.rewind(150)  # back to 150: keys 119.. are still in the ring (it holds 12..299)
    assert s.reprocessed == 0 and s.n_past == 150
    got = s.eval(synth_ids[150:200], all_logits=True)
    fresh = m.session().eval(synth_ids[:200], all_logits=True)[150:]
    _close(got, fresh)


def test_rewind_past_the_ring_reprocesses_from_the_start(synth_f32, synth_ids):
    """Back to 40 after 300: the window of position 40 needs keys 9.., overwritten in
    the ring (it holds 12..299); the kept 40 tokens are evaluated again, as
    llama.cpp's server does, and what follows equals a fresh evaluation exactly."""
    m = synth_f32
    s = m.session()
    s.eval(synth_ids[:300])
    s.rewind(260)
    assert s.reprocessed == 40 and s.n_past == 40
    cont = synth_ids[100:160]
    got = s.eval(cont, all_logits=True)
    f = m.session()
    f.eval(synth_ids[:40])
    assert np.array_equal(got, f.eval(cont, all_logits=True))
    # a full-size cache never needs it
    full = m.session(swa_full=True)
    full.eval(synth_ids[:300])
    full.rewind(260)
    assert full.reprocessed == 0
    _close(full.eval(cont, all_logits=True), got)


def test_real_rewind_past_the_ring_equals_fresh(real, real_ids):
    """The real file: 700 tokens, 400 dropped (the ring of 768 cells holds them all:
    no replay); then 800 tokens (the ring wraps) back to 100: replayed, equal to fresh."""
    s = real.session()
    s.eval(real_ids[:700])
    s.rewind(400)
    assert s.reprocessed == 0
    s.reset()
    ids = (real_ids * 2)[:800]
    s.eval(ids)
    s.rewind(700)
    assert s.reprocessed == 100
    got = s.eval(real_ids[200:210], all_logits=True)
    f = real.session()
    f.eval(ids[:100])
    assert np.array_equal(got, f.eval(real_ids[200:210], all_logits=True))


# ---------------------------------------------------------------- the pool

def test_pool_decode_is_batch_invariant_around_the_ring(tmp_path):
    """SessionPool.decode on gemma3 (F16 weights, window 4): rows past the window
    and around the ring, bit for bit their own sessions' one-token steps."""
    path = write_synthetic(tmp_path / "g.gguf", arch="gemma3", n_layers=7, d_model=256, n_heads=4,
                           head_dim=64, gqa=2, ffn=512, vocab=512, sliding_window=4, dtype=np.float16)
    m = Model.load(path, n_ctx=300)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 512, n)) for n in (255, 3, 40, 258)]
    pool = m.session_pool(len(prompts), 300)
    alone = [m.session(300) for _ in prompts]
    assert pool.sessions[0].kv.k_swa.shape[1] == 4 + N_BATCH == alone[0].kv.k_swa.shape[1]
    for s, a, p in zip(pool.sessions, alone, prompts):
        s.eval(p)
        a.eval(p)
    for step in [(0, 1, 2, 3), (3, 0), (1,), (2, 3, 1, 0), (0, 3), (3, 0, 1)]:
        toks = [int(t) for t in rng.integers(0, 512, len(step))]
        got = pool.decode([pool.sessions[i] for i in step], toks)
        for row, (i, t) in enumerate(zip(step, toks)):
            alone[i].eval([t])
            assert np.array_equal(got[row], alone[i].logits()), (i, step)
    assert pool.sessions[3].n_past == 258 + 5 > 4 + N_BATCH  # slot 3 went around its ring


# ---------------------------------------------------------------- the CLI on the real file

def _cli(*args, stdin=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_generate_greedy_matches_llamacpp(llama_cpp, gemma3_path, real):
    r = _cli("generate", "gemma3-270m", "-p", "The capital of France is", "-n", "8", "--temp", "0",
             "-c", "256", "-t", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is") and len(r.stdout) > 30, r.stdout
    # the same greedy tokens as llama.cpp's argmax, token by token
    prompt = real.tokenize("The capital of France is")
    want = []
    ids = list(prompt)
    for _ in range(8):
        t = int(np.argmax(llamacpp_logits(llama_cpp, gemma3_path, ids)[-1]))
        want.append(t)
        ids.append(t)
    s = real.session(256)
    s.eval(prompt)
    got = []
    for _ in range(8):
        t = int(np.argmax(s.logits()))
        got.append(t)
        s.eval([t])
    assert got == want, (real.detokenize(got), real.detokenize(want))


def test_perplexity_runs_and_matches_llamacpp_logits(llama_cpp, gemma3_path, real, wikitext):
    """Two chunks of 512 (the window: every position of a chunk sees its whole prefix)
    against the same method over llama.cpp's logits."""
    from runtime.perplexity import perplexity_of_tokens, tokenize_for_perplexity

    text = wikitext[:12000]
    toks = tokenize_for_perplexity(real, text)
    ours = perplexity_of_tokens(real, toks, n_ctx=512, n_chunks=2)

    class LC:  # llama.cpp behind the interface perplexity_of_tokens takes
        tokenizer, n_vocab = real.tokenizer, real.n_vocab

        @staticmethod
        def logits(ids):
            return llamacpp_logits(llama_cpp, gemma3_path, ids)

    theirs = perplexity_of_tokens(LC, toks, n_ctx=512, n_chunks=2)
    print(f"\ngemma3-270m perplexity, 2 x 512: ours {ours.ppl:.4f}, llama.cpp {theirs.ppl:.4f}")
    assert np.isfinite(ours.ppl) and 1 < ours.ppl < 200
    assert abs(ours.ppl / theirs.ppl - 1) < 0.02
    r = _cli("perplexity", "gemma3-270m", str(Path(ROOT).parent / "shared/data/wikitext-2-test.txt"),
             "--chunks", "1", "-c", "512", "-t", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert 1 < json.loads(r.stdout)["ppl"] < 200, r.stdout


def test_chat_uses_chatml_since_the_file_has_no_template(gemma3_path):
    """gemma-3-270m (a base model) carries no tokenizer.chat_template: chat says so and
    uses ChatML (llama.cpp's fallback too), and answers."""
    from runtime.gguf import GGUFFile

    assert GGUFFile(gemma3_path, header_only=True).get("tokenizer.chat_template") is None
    r = _cli("chat", "gemma3-270m", "--temp", "0", "-n", "16", "-c", "512", "-t", "2",
             stdin="What is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    assert "ChatML" in r.stderr, r.stderr
    assert r.stdout.strip(), r.stdout


# ---------------------------------------------------------------- a file still downloading

def test_info_on_a_truncated_file_says_the_data_is_incomplete(tmp_path, gemma3_path):
    """The first 40 MB of the file: info prints the whole header and says how many of
    the bytes the tensors need are there; loading it for inference is one clear error."""
    part = tmp_path / "gemma-3-270m.part.gguf"
    with open(gemma3_path, "rb") as f:
        part.write_bytes(f.read(40_000_000))
    full = json.loads(_cli("info", gemma3_path, "--json").stdout)
    r = _cli("info", part, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert full["data_complete"] and not info["data_complete"]
    assert info["data_bytes_needed"] == full["data_bytes_needed"] == full["file_size"]
    assert info["file_size"] == 40_000_000
    for key in ("architecture", "n_params", "n_tensors", "tensor_types", "n_layers", "head_dim",
                "sliding_window", "vocab_size", "special_tokens", "hparams_problem"):
        assert info[key] == full[key], key
    text = _cli("info", part)
    assert text.returncode == 0, text.stderr
    flat = " ".join(text.stdout.split())
    assert f"the file has 40,000,000 of the {full['file_size']:,} bytes" in flat, text.stdout
    assert "gemma3" in text.stdout and "262144 tokens" in text.stdout
    r = _cli("generate", part, "-p", "hi", "-n", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "outside the file" in lines[0], r.stderr
    with pytest.raises(ValueError, match="outside the file"):
        Model.load(part)
