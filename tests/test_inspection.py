"""Inspection (runtime/inspection.py): trace and patch against the NumPy reference,
the lens and surprise commands, their pages and pictures."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from _oracle import synthetic_model
from reference import reference_trace
from runtime.inspection import InspectionError
from runtime.model import Model

# arch, gqa, tied: the files tests/test_reference.py checks against llama.cpp
ARCHS = {"llama": ("llama", 3, False), "qwen2": ("qwen2", 8, True), "qwen3": ("qwen3", 3, False),
         "gemma3": ("gemma3", 4, False)}
# 40 positions: past gemma3's 32-token window, so its local layers really slide
IDS = [int(i) for i in np.random.default_rng(11).integers(0, 512, 40)]


def _close(ours, ref, what):
    """max |ours - ref| <= 1e-4 x max |ref|, the issue's bound per array."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert scale > 0 and err <= 1e-4 * scale, f"{what}: max error {err:.3g} vs max |ref| {scale:.3g}"


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_model(request):
    path = synthetic_model(*ARCHS[request.param])
    # f32 KV cache: the default f16 one rounds K and V (as llama.cpp does), ~1e-3
    return request.param, path, Model.load(path, n_ctx=64, kv_type="f32")


@pytest.fixture(scope="module")
def ref_acts(arch_model):
    return reference_trace(arch_model[1], IDS)


def test_trace_matches_reference(arch_model, ref_acts):
    name, _, m = arch_model
    t = m.trace(IDS, parts=("resid", "attn_out", "mlp_out", "logits"))
    L, n, d = m.args.n_layers, len(IDS), m.args.d_model
    assert t["resid"].shape == (L + 1, n, d) and t["resid"].dtype == np.float32
    assert t["attn_out"].shape == t["mlp_out"].shape == (L, n, d)
    assert t["logits"].shape == (n, m.n_vocab) and t["logits"].dtype == np.float32
    for part in ("resid", "attn_out", "mlp_out", "logits"):
        _close(t[part], ref_acts[part], f"{name} {part}")
    for l in range(L):  # the stream adds up: resid[l + 1] = resid[l] + attn_out[l] + mlp_out[l]
        np.testing.assert_allclose(t["resid"][l + 1], t["resid"][l] + t["attn_out"][l] + t["mlp_out"][l],
                                   atol=1e-5 * np.abs(t["resid"][l + 1]).max())


def test_trace_layers_select_rows(arch_model):
    _, _, m = arch_model
    L = m.args.n_layers
    full = m.trace(IDS, parts=("resid", "mlp_out"))
    sel = m.trace(IDS, layers=[L, 0, 1], parts=["mlp_out", "resid"])
    assert list(sel) == ["mlp_out", "resid"]
    np.testing.assert_array_equal(sel["resid"], full["resid"][[L, 0, 1]])
    # stream point 0 (the embeddings) has no sublayer: blocks L-1 and 0 write points L and 1
    np.testing.assert_array_equal(sel["mlp_out"], full["mlp_out"][[L - 1, 0]])


def test_trace_logits_are_exact_math(arch_model):
    """The final stream's logits: the model's own next-token logits up to activation
    rounding (the hot path rounds to 8 bits only for quantized weights; these are F32)."""
    _, _, m = arch_model
    ours = m.trace(IDS, parts="logits")["logits"]
    np.testing.assert_allclose(ours, m.logits(IDS), atol=1e-3 * np.abs(ours).max())


@pytest.mark.parametrize("kw, msg", [
    (dict(parts=("resid", "hidden")), "unknown part 'hidden'"),
    (dict(parts=()), "nothing asked for"),
    (dict(layers=[99]), "out of range"),
    (dict(layers=[1, 1]), "repeats"),
    (dict(layers=[-1]), "out of range"),
])
def test_trace_bad_arguments(kw, msg):
    m = Model.load(synthetic_model(*ARCHS["llama"]), n_ctx=64)
    with pytest.raises(InspectionError, match=msg):
        m.trace(IDS, **kw)
    with pytest.raises(InspectionError, match="no tokens"):
        m.trace([])
    with pytest.raises(InspectionError, match="do not fit in the context"):
        m.trace([1] * 65)


# --------------------------------------------------------------------------
# patching
# --------------------------------------------------------------------------

SOURCE = IDS
TARGET = [int(i) for i in np.random.default_rng(12).integers(0, 512, 40)]


def test_patch_everything_is_the_source_nothing_is_the_target(arch_model):
    _, _, m = arch_model
    src = m.trace(SOURCE, parts="logits")["logits"]
    tgt = m.trace(TARGET, parts="logits")["logits"]
    everywhere = list(range(len(SOURCE)))
    for layer in range(m.args.n_layers + 1):
        np.testing.assert_array_equal(m.patch(SOURCE, TARGET, layer, everywhere), src, err_msg=f"layer {layer}")
    np.testing.assert_array_equal(m.patch(SOURCE, TARGET, 1, []), tgt)
    assert not np.allclose(src, tgt)


def test_patch_matches_reference(arch_model):
    name, path, m = arch_model
    layer, positions = 1, [3, 17, 39]
    ours = m.patch(SOURCE, TARGET, layer, positions)
    src_resid = reference_trace(path, SOURCE)["resid"][layer]
    ref = reference_trace(path, TARGET, patch=(layer, positions, src_resid[positions]))["logits"]
    _close(ours, ref, f"{name} patched logits")
    # Causal: positions before the first patched one are the target's own.
    tgt = m.trace(TARGET, parts="logits")["logits"]
    np.testing.assert_array_equal(ours[:3], tgt[:3])
    assert not np.allclose(ours[3:], tgt[3:])


@pytest.mark.parametrize("args, msg", [
    ((IDS, IDS[:-1], 1, [0]), "same length"),
    ((IDS, IDS, 99, [0]), "out of range"),
    ((IDS, IDS, 1, [40]), "out of range"),
    ((IDS, IDS, 1, [2, 2]), "repeats"),
])
def test_patch_bad_arguments(args, msg):
    m = Model.load(synthetic_model(*ARCHS["llama"]), n_ctx=64)
    with pytest.raises(InspectionError, match=msg):
        m.patch(*args)


# --------------------------------------------------------------------------
# the logit lens
# --------------------------------------------------------------------------

from runtime.inspection import (logit_lens, render_lens_terminal, render_surprise_terminal,  # noqa: E402
                                surprise_json, token_surprise)

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LENS_IDS = IDS[:12]


@pytest.fixture(scope="module")
def llama():
    path = synthetic_model(*ARCHS["llama"])
    return path, Model.load(path, n_ctx=64, kv_type="f32")


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_lens_matches_reference_and_ends_in_the_output(llama):
    from reference import _rms_norm, load_weights

    path, m = llama
    lens = logit_lens(m, LENS_IDS, top=3)
    L = m.args.n_layers
    assert [e["layer"] for e in lens["layers"]] == list(range(L + 1))
    ref = reference_trace(path, LENS_IDS)
    hp, W = load_weights(str(path))
    out_w = W.get("output.weight", W["token_embd.weight"])
    for e in lens["layers"]:
        p_ref = _softmax(_rms_norm(ref["resid"][e["layer"]], W["output_norm.weight"], hp["eps"]) @ out_w.T)
        assert len(e["positions"]) == len(LENS_IDS)
        for i, pos in enumerate(e["positions"]):
            assert pos["token"] == m.tokenizer.token_to_piece(LENS_IDS[i], special=True).decode("utf-8", "replace")
            assert [t["id"] for t in pos["top"]] == list(np.argsort(-p_ref[i])[:3])
            np.testing.assert_allclose([t["p"] for t in pos["top"]], np.sort(p_ref[i])[::-1][:3], atol=1e-4)
    # the last entry is the model's own output: the trace's logits
    p_out = _softmax(m.trace(LENS_IDS, parts="logits")["logits"])
    last = lens["layers"][-1]["positions"]
    for i in range(len(LENS_IDS)):
        assert last[i]["top"][0]["id"] == int(p_out[i].argmax())
        assert last[i]["top"][0]["p"] == pytest.approx(p_out[i].max(), abs=1e-6)


def test_lens_selected_layers_and_terminal_width(llama):
    _, m = llama
    L = m.args.n_layers
    lens = logit_lens(m, LENS_IDS, layers=[L, 0], top=2)
    assert [e["layer"] for e in lens["layers"]] == [L, 0]
    text = render_lens_terminal(logit_lens(m, IDS, top=5), L, columns=100, color=True)
    for line in ANSI.sub("", text).splitlines():
        assert len(line) <= 100, line
    assert "showing the last" in text
    with pytest.raises(InspectionError, match="top"):
        logit_lens(m, LENS_IDS, top=0)


# --------------------------------------------------------------------------
# surprise
# --------------------------------------------------------------------------

def test_surprise_is_the_per_token_view_of_perplexity(llama):
    from runtime.perplexity import kl_and_top1, token_nll

    path, m = llama
    ids = np.array(IDS)
    res = token_surprise(m, ids)
    logits = m.logits(IDS)[:-1]
    prob = _softmax(logits)
    rows = np.arange(len(ids) - 1)
    np.testing.assert_allclose(res["p"], prob[rows, ids[1:]], rtol=1e-6)
    np.testing.assert_allclose(res["surprisal"], token_nll(logits, ids[1:]) / np.log(2), rtol=1e-9)
    np.testing.assert_array_equal(res["rank"], 1 + (prob > prob[rows, ids[1:]][:, None]).sum(1))
    np.testing.assert_allclose(res["entropy"], -(prob * np.log2(prob)).sum(1), rtol=1e-6)
    assert np.exp(np.log(2) * res["surprisal"].mean()) > 1
    # with a base model: perplexity's kl_and_top1 on the same positions
    base = Model.load(synthetic_model("llama", 3, False, "Q4_K_M"), n_ctx=64)
    res2 = token_surprise(m, ids, base)
    kl, same = kl_and_top1(base.logits(IDS)[:-1], logits)
    np.testing.assert_allclose(res2["kl"], kl, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(res2["same_top"], same)
    assert res2["kl"].max() > 0
    assert np.all(token_surprise(m, ids, m)["kl"] == 0)
    js = surprise_json(m, IDS, res2)
    assert js["tokens"][0]["p"] is None and js["tokens"][1]["p"] == pytest.approx(res["p"][0])
    assert js["kl_mean"] == pytest.approx(kl.mean()) and js["n_tokens"] == len(IDS)


# a text of a few hundred tokens: longer than the 64-token context the windowed tests use
LONG_TEXT = (
    "The lighthouse at the end of the harbour was built in 1871 from granite quarried on the island. "
    "For almost a century its keepers climbed one hundred and twelve steps every evening to light the lamp, "
    "wind the clockwork that turned the lens, and write the weather into a leather-bound log. The log books "
    "survive: they record storms that tore slates from the roof, a winter when the harbour froze solid, and "
    "the night in 1923 when a fishing boat ran aground on the rocks below and the keeper rowed out alone "
    "to bring its crew of four ashore. In 1958 the lamp was electrified and the last keeper left; since then "
    "the light has been switched on by a timer and checked once a month by an engineer from the mainland. "
    "Today the keeper's cottage is a small museum. Visitors can see the original lens, a brass telescope, "
    "the keepers' uniforms and a model of the boat, and on a clear day the view from the gallery reaches "
    "the mountains on the far side of the bay.")


def test_surprise_windows_cover_every_token_once():
    from runtime.inspection import surprise_windows

    assert surprise_windows(10, 64) == [(0, 10, 1)] and surprise_windows(64, 64) == [(0, 64, 1)]
    assert surprise_windows(200, 64) == [(0, 64, 1), (32, 96, 64), (64, 128, 96), (96, 160, 128),
                                         (128, 192, 160), (160, 200, 192)]
    for n, c in [(200, 64), (65, 64), (1000, 7), (129, 5), (300, 33)]:
        w = surprise_windows(n, c)
        assert [t for _, end, first in w for t in range(first, end)] == list(range(1, n))  # each token once, in order
        assert all(0 <= start < first < end <= start + c for start, end, first in w)
        # each later window's first scored token is predicted from >= c/2 positions (start .. first - 1)
        assert all(first - start >= c / 2 for start, _, first in w[1:])
    with pytest.raises(InspectionError, match="at least 4"):
        surprise_windows(10, 3)
    with pytest.raises(InspectionError, match="two tokens"):
        surprise_windows(1, 64)


def _scored_like(logits, targets):
    """p, rank and entropy (bits) of targets under float32 logits, with NumPy."""
    prob = _softmax(logits)
    rows = np.arange(len(targets))
    picked = prob[rows, targets]
    ent = -np.where(prob > 0, prob * np.log2(np.where(prob > 0, prob, 1.0)), 0.0).sum(1)
    return picked, 1 + (prob > picked[:, None]).sum(1), ent


@pytest.fixture(scope="module")
def smol_long(smollm2_path):
    """SmolLM2 at a 64-token context and LONG_TEXT scored in windows."""
    m = Model.load(smollm2_path, n_ctx=64)
    ids = np.array(m.tokenize(LONG_TEXT))
    return m, ids, token_surprise(m, ids)


def test_surprise_scores_a_long_text_in_windows(smol_long):
    from runtime.inspection import surprise_windows

    m, ids, res = smol_long
    n = len(ids)
    assert 200 <= n <= 400 and not m.tokenizer.add_bos
    for k in ("p", "rank", "surprisal", "entropy"):
        assert res[k].shape == (n - 1,)
    assert res["n_ctx"] == 64 and res["stride"] == 32
    assert res["windows"].tolist() == [list(w) for w in surprise_windows(n, 64)] and len(res["windows"]) >= 6
    js = surprise_json(m, ids, res)
    assert [t["pos"] for t in js["tokens"]] == list(range(n)) and [t["id"] for t in js["tokens"]] == ids.tolist()
    assert js["tokens"][0]["p"] is None and all(t["p"] is not None for t in js["tokens"][1:])
    assert js["n_ctx"] == 64 and js["windows"] == res["windows"].tolist()
    # the first window: exactly a short run of its own 64 tokens
    short = token_surprise(m, ids[:64])
    for k in ("p", "rank", "surprisal", "entropy"):
        np.testing.assert_array_equal(res[k][:63], short[k])
    # every later window: the model's logits over that window alone, from a fresh cache
    # (the window's last token is only a target: its row is dropped), for the tokens past
    # the previous window
    for start, end, first in res["windows"][1:]:
        p, rank, ent = _scored_like(m.logits(ids[start:end])[first - 1 - start:-1], ids[first:end])
        sl = slice(first - 1, end - 1)
        np.testing.assert_allclose(res["p"][sl], p, rtol=1e-6)
        np.testing.assert_array_equal(res["rank"][sl], rank)
        np.testing.assert_allclose(res["entropy"][sl], ent, rtol=1e-6)
    assert "scored in" in render_surprise_terminal(js).splitlines()[0]


def test_surprise_windows_start_with_bos_and_window_the_base_alike(llama, monkeypatch):
    """A model that adds BOS gets BOS at the start of every later window (as perplexity's
    chunks); the base model is scored in the very same windows, KL by perplexity's code."""
    from runtime.perplexity import kl_and_top1

    _, m = llama
    base = Model.load(synthetic_model("llama", 3, False, "Q4_K_M"), n_ctx=64)
    ids = np.random.default_rng(5).integers(0, 512, 100)
    bos = m.tokenizer.bos_id
    monkeypatch.setattr(m.tokenizer, "add_bos", True)
    res = token_surprise(m, ids, base, n_ctx=32)
    assert res["n_ctx"] == 32 and len(res["windows"]) == 6 and res["kl"].shape == (99,)
    for start, end, first in res["windows"]:
        w = ids[start:end].copy()
        if start:
            w[0] = bos
        logits, base_logits = m.logits(w)[first - 1 - start:-1], base.logits(w)[first - 1 - start:-1]
        sl = slice(first - 1, end - 1)
        p, rank, _ = _scored_like(logits, ids[first:end])
        np.testing.assert_allclose(res["p"][sl], p, rtol=1e-6)
        np.testing.assert_array_equal(res["rank"][sl], rank)
        kl, same = kl_and_top1(base_logits, logits)
        np.testing.assert_allclose(res["kl"][sl], kl, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(res["same_top"][sl], same)
    assert res["kl"].max() > 0
    # the BOS is really there: the window's own first token gives other numbers
    start, end, first = res["windows"][2]
    p, _, _ = _scored_like(m.logits(ids[start:end])[first - 1 - start:-1], ids[first:end])
    assert np.abs(res["p"][first - 1:end - 1] - p).max() > 1e-4
    with pytest.raises(InspectionError, match="out of range"):
        token_surprise(m, ids, n_ctx=65)
    with pytest.raises(InspectionError, match="at least 4"):
        token_surprise(m, ids, n_ctx=3)


# --------------------------------------------------------------------------
# the commands
# --------------------------------------------------------------------------

def _cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, argv)], capture_output=True, text=True,
                          timeout=600, env=env)


LENS_PROMPT = "The capital of France is"


def test_cli_lens_json_and_terminal(smollm2_path):
    p = _cli("lens", smollm2_path, "-p", LENS_PROMPT, "--top", "3", "--layers", "0,15", "-1", "--json")
    assert p.returncode == 0, p.stderr
    js = json.loads(p.stdout)
    assert list(js) == ["layers"] and [e["layer"] for e in js["layers"]] == [0, 15, 30]
    for e in js["layers"]:
        assert list(e) == ["layer", "positions"]
        for pos in e["positions"]:
            assert list(pos) == ["token", "top"] and len(pos["top"]) == 3
            assert all(list(t) == ["id", "token", "p"] for t in pos["top"])
            ps = [t["p"] for t in pos["top"]]
            assert ps == sorted(ps, reverse=True) and 0 < ps[0] <= 1
    m = Model.load(smollm2_path, n_ctx=64)
    ids = m.tokenize(LENS_PROMPT)
    assert [pos["token"] for pos in js["layers"][0]["positions"]] == \
        [m.tokenizer.token_to_piece(i, special=True).decode() for i in ids]
    out = m.trace(ids, parts="logits")["logits"][-1]
    assert js["layers"][-1]["positions"][-1]["top"][0]["id"] == int(out.argmax())

    p = _cli("lens", smollm2_path, "-p", LENS_PROMPT)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert all(len(line) <= 100 for line in lines)
    assert sum(1 for line in lines if re.match(r"^ +\d+  ", line)) == 2 * 31  # table + last position


@pytest.mark.parametrize("argv, msg", [(["--layers", "31"], "out of range"), (["--top", "0"], "at least 1"),
                                       (["--layers", "x"], "not a layer number"), (["--out", "a.txt"], ".html or .png")])
def test_cli_lens_bad_input(smollm2_path, argv, msg):
    p = _cli("lens", smollm2_path, "-p", "hi", *argv)
    assert p.returncode == 1 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_cli_surprise(smollm2_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.", encoding="utf-8")
    p = _cli("surprise", smollm2_path, text, "--json")
    assert p.returncode == 0, p.stderr
    js = json.loads(p.stdout)
    m = Model.load(smollm2_path, n_ctx=64)
    ids = m.tokenize(text.read_text())
    assert [t["id"] for t in js["tokens"]] == ids
    res = token_surprise(m, ids)
    assert [t["rank"] for t in js["tokens"][1:]] == res["rank"].tolist()
    np.testing.assert_allclose([t["p"] for t in js["tokens"][1:]], res["p"], rtol=1e-6)
    p = _cli("surprise", smollm2_path, "-p", text.read_text())
    assert p.returncode == 0, p.stderr
    rows = [line for line in p.stdout.splitlines() if re.match(r"^ +\d+ ", line)]
    assert len(rows) == len(ids) and all(len(line) <= 100 for line in p.stdout.splitlines())
    # against another quantization of the same model: perplexity's KL per token
    base = smollm2_path.parent / "synthetic" / "SmolLM2-135M-Instruct.Q4_1-requant.Q8_0.gguf"
    if base.exists():
        p = _cli("surprise", smollm2_path, text, "--kl-base", base, "--json")
        assert p.returncode == 0, p.stderr
        js = json.loads(p.stdout)
        assert js["base"] == str(base) and js["kl_mean"] > 0
        assert all(t["kl"] >= 0 for t in js["tokens"][1:])


@pytest.mark.parametrize("argv, msg", [([], "give a FILE or -p TEXT"), (["nofile.txt", "-p", "x"], "one of them"),
                                       (["nofile.txt"], "no such file")])
def test_cli_surprise_bad_input(smollm2_path, argv, msg):
    p = _cli("surprise", smollm2_path, *argv)
    assert p.returncode == 1 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr


# --------------------------------------------------------------------------
# pages
# --------------------------------------------------------------------------

from _browser import browser_fixture  # noqa: E402

browser = pytest.fixture(scope="module")(browser_fixture)


def _self_contained(page: str):
    low = page.lower()
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in low.replace("http://www.w3.org/2000/svg", "") and "https://" not in low
    assert not re.search(r"<script[^>]*\bsrc=", low) and "<link rel=\"stylesheet\"" not in low


def test_lens_page_in_chromium(browser, llama, tmp_path):
    from runtime.inspection_views import lens_html

    _, m = llama
    lens = logit_lens(m, LENS_IDS, top=4)
    page = lens_html(lens, m.args.n_layers, title="lens test", prompt="</script><b>x")
    _self_contained(page)
    path = tmp_path / "lens.html"
    path.write_text(page, encoding="utf-8")
    browser.events.clear()
    s = browser.open(path.as_uri())
    assert browser.errors() == []
    assert browser.eval(s, "document.querySelectorAll('#lens td').length") == len(lens["layers"]) * len(LENS_IDS)
    for li, i in [(0, 0), (2, 11), (1, 5)]:
        pt = browser.eval(s, f"lensPage.cellCenter({li}, {i})")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            browser.send("Input.dispatchMouseEvent", {"type": kind, "x": pt["x"], "y": pt["y"], "button": "left",
                                                      "clickCount": 1}, session=s)
        d = browser.eval(s, "[detail.dataset.layer, detail.dataset.pos, "
                            "Array.from(detail.querySelectorAll('td.p')).map(td => +td.textContent)]")
        assert (int(d[0]), int(d[1])) == (lens["layers"][li]["layer"], i)
        np.testing.assert_allclose(d[2], [t["p"] for t in lens["layers"][li]["positions"][i]["top"]], atol=6e-5)
    assert browser.errors() == []


def test_surprise_page_in_chromium(browser, llama, tmp_path):
    from runtime.inspection_views import surprise_html

    _, m = llama
    base = Model.load(synthetic_model("llama", 3, False, "Q4_K_M"), n_ctx=64)
    js = surprise_json(m, IDS, token_surprise(m, np.array(IDS), base), {"base": "q4km"})
    page = surprise_html(js, title="surprise test")
    _self_contained(page)
    path = tmp_path / "s.html"
    path.write_text(page, encoding="utf-8")
    browser.events.clear()
    s = browser.open(path.as_uri())
    assert browser.errors() == []
    assert browser.eval(s, "document.querySelectorAll('#text span').length") == len(IDS)
    for i in (1, 17, 39):
        pt = browser.eval(s, f"surprisePage.tokenCenter({i})")
        browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": pt["x"], "y": pt["y"]}, session=s)
        tip = browser.eval(s, "[getComputedStyle(tip).display, tip.dataset.pos, tip.textContent]")
        assert tip[0] == "block" and int(tip[1]) == i
        t = js["tokens"][i]
        assert float(re.search(r"\np ([0-9.]+)", tip[2]).group(1)) == pytest.approx(t["p"], abs=1e-6)
        assert int(re.search(r"\nrank (\d+)", tip[2]).group(1)) == t["rank"]
        assert float(re.search(r"\nKL ([0-9.]+)", tip[2]).group(1)) == pytest.approx(t["kl"], abs=1e-6)
    # the table of the worst positions follows the colouring
    worst = browser.eval(s, "Array.from(document.querySelectorAll('#worst tr')).slice(1).map(r => +r.cells[0].textContent)")
    assert worst == sorted(range(1, len(IDS)), key=lambda i: -js["tokens"][i]["kl"])[:10]
    assert browser.errors() == []


def _png_size(path):
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_cli_lens_and_surprise_pictures_and_pages(smollm2_path, tmp_path):
    """--out x.png / x.html through the commands themselves: real, non-blank pictures
    whose size follows the text, and self-contained pages carrying the JSON's numbers."""
    import matplotlib.image

    short, long_ = "The capital of France is", "The capital of France is Paris. " * 12
    for cmd, argv in (("lens", ["-p", short]), ("surprise", ["-p", short]), ("surprise", ["-p", long_])):
        stem = f"{cmd}{len(argv[1])}"
        for ext in ("png", "html"):
            p = _cli(cmd, smollm2_path, *argv, "--out", tmp_path / f"{stem}.{ext}")
            assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        w, h = _png_size(tmp_path / f"{stem}.png")
        assert 400 <= w <= 4000 and 200 <= h <= 4000, (w, h)
        img = matplotlib.image.imread(tmp_path / f"{stem}.png")
        assert img.shape[:2] == (h, w) and img[..., :3].std() > 0.05  # not blank
        page = (tmp_path / f"{stem}.html").read_text(encoding="utf-8")
        assert page.lstrip().lower().startswith("<!doctype html>")
        assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", page, re.I)  # no CDN, nothing fetched
        assert "France" in page
    # the surprise page carries the JSON's own numbers; a longer text draws a taller picture
    js = json.loads(_cli("surprise", smollm2_path, "-p", short, "--json").stdout)
    page = (tmp_path / f"surprise{len(short)}.html").read_text(encoding="utf-8")
    assert f"{js['ppl']:.2f}" in page or f"{js['ppl']:.3f}" in page
    assert _png_size(tmp_path / f"surprise{len(long_)}.png")[1] >= _png_size(tmp_path / f"surprise{len(short)}.png")[1]
