"""Attention maps: the engine's own softmax weights, and the three ways to look at them."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from _browser import browser_fixture
from runtime.attention import (colormap, head_entropy_bits, heatmap_rgb, most_attended,
                               render_entropy_table, render_html, render_terminal,
                               row_entropy_bits, write_png)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def causal_maps(layers=2, heads=3, n=9, seed=0, sharp=2.0):
    """Random causal softmax maps [layers, heads, n, n], float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(layers, heads, n, n)) * sharp
    x[..., np.triu(np.ones((n, n), bool), 1)] = -np.inf
    w = np.exp(x - x.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)).astype(np.float32)


LABELS = ["<|im_start|>", "The", " cat", " sat", "\n", " on", " the", " mat", "."]


# --------------------------------------------------------------------------
# measures
# --------------------------------------------------------------------------

def test_entropy_in_bits():
    n = 8
    uniform = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    np.testing.assert_allclose(row_entropy_bits(uniform), np.log2(np.arange(1, n + 1)), atol=1e-12)
    onehot = np.eye(n)
    assert np.all(row_entropy_bits(onehot) == 0)
    maps = np.stack([np.stack([uniform, onehot])])          # [1, 2, n, n]
    ent = head_entropy_bits(maps)
    assert ent.shape == (1, 2)
    assert ent[0, 0] == pytest.approx(np.mean(np.log2(np.arange(1, n + 1))))
    assert ent[0, 1] == 0


def test_most_attended():
    w = causal_maps(1, 1, 9)[0, 0]
    idx, top = most_attended(w)
    for q in range(9):
        assert idx[q] == int(np.argmax(w[q])) and idx[q] <= q
        assert top[q] == w[q].max()


# --------------------------------------------------------------------------
# terminal
# --------------------------------------------------------------------------

def _rows(text):
    return [line for line in text.splitlines() if re.match(r"^\s+\d+  ", line) and "->" in line]


@pytest.mark.parametrize("color", [False, True])
def test_terminal_heatmap(color):
    w = causal_maps(1, 1, 9, seed=3)[0, 0]
    text = render_terminal(w, LABELS, color=color, columns=120, title="layer 0 head 0")
    assert ("\x1b[48;5;" in text) == color
    plain = ANSI.sub("", text)
    rows = _rows(plain)
    assert len(rows) == 9
    idx, top = most_attended(w)
    ent = row_entropy_bits(w)
    for q, line in enumerate(rows):
        assert line.split()[0] == str(q)
        m = re.search(r"-> +(\d+) (\S+) +([0-9.]+)  H=([0-9.]+)$", line)
        assert m, line
        assert int(m.group(1)) == idx[q]
        assert float(m.group(3)) == pytest.approx(top[q], abs=6e-4)
        assert float(m.group(4)) == pytest.approx(ent[q], abs=6e-3)
    # Whitespace made visible in the labels: " cat" and the newline.
    assert "\u00b7cat" in plain and "\u21b5" in plain
    if not color:
        # Shade blocks: row 0 attends only to itself with weight 1 -> full blocks, then blanks.
        cells = rows[0][19:19 + 18]
        assert cells.startswith("\u2588\u2588") and cells[2:].strip() == ""


def test_terminal_fits_width_on_long_prompts():
    n = 300
    w = causal_maps(1, 1, n, seed=4)[0, 0]
    labels = [f"t{i}" for i in range(n)]
    text = render_terminal(w, labels, color=True, columns=100)
    for line in ANSI.sub("", text).splitlines():
        assert len(line) <= 100, line
    assert "showing keys and queries" in text
    assert _rows(ANSI.sub("", text))[-1].split()[0] == str(n - 1)


def test_entropy_table():
    maps = causal_maps(2, 3, 9)
    ent = head_entropy_bits(maps)
    text = render_entropy_table(ent, [4, 7], 9, mark=(7, 1))
    lines = text.splitlines()
    assert lines[1].split() == ["layer", "h0", "h1", "h2"]
    row7 = lines[3].split()
    assert row7[0] == "7" and row7[2] == f"{ent[1, 1]:.2f}*"
    assert float(lines[2].split()[1]) == pytest.approx(ent[0, 0], abs=0.006)


# --------------------------------------------------------------------------
# PNG: decoded here with zlib + struct, independently of the writer
# --------------------------------------------------------------------------

def _decode_png(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, ctype, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype, comp, filt, inter) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    assert len(raw) == h * (1 + 3 * w)
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)
    assert np.all(rows[:, 0] == 0)
    return rows[:, 1:].reshape(h, w, 3)


def test_png_single_map(tmp_path):
    w = causal_maps(1, 1, 9, seed=5)
    path = write_png(tmp_path / "m.png", w)
    img = _decode_png(path.read_bytes())
    cell = img.shape[0] // 9
    assert img.shape == (9 * cell, 9 * cell, 3) and cell >= 1
    expect = colormap(np.sqrt(w[0, 0]))
    for q in range(9):
        for k in range(9):
            px = img[q * cell + cell // 2, k * cell + cell // 2]
            if k <= q:
                np.testing.assert_array_equal(px, expect[q, k])
            else:
                np.testing.assert_array_equal(px, [24, 24, 24])


def test_png_tiles_layers_by_heads():
    maps = causal_maps(2, 3, 5, seed=6)
    img = heatmap_rgb(maps, max_cell=4)
    # 2 rows of tiles, 3 columns, 2-pixel gaps.
    assert img.shape == (2 * 20 + 2, 3 * 20 + 2 * 2, 3)
    expect = colormap(np.sqrt(maps[1, 2]))
    np.testing.assert_array_equal(img[22 + 4 * 4 + 1, 2 * 22 + 3 * 4 + 1], expect[4, 3])


# --------------------------------------------------------------------------
# HTML page
# --------------------------------------------------------------------------

def test_html_is_self_contained():
    maps = causal_maps(2, 3, 9)
    page = render_html(maps, LABELS[:8] + ["</script><b>x"], [3, 5], title="t", prompt="p")
    assert page.startswith("<!DOCTYPE html>")
    low = page.lower()
    # the SVG namespace name (createElementNS) is an identifier, not a fetch
    low_urls = low.replace("http://www.w3.org/2000/svg", "")
    assert "http://" not in low_urls and "https://" not in low and "@import" not in low
    assert not re.search(r"<script[^>]*\bsrc=", low) and "<link rel=\"stylesheet\"" not in low
    # A token cannot close the data element.
    assert low.count("</script>") == 2


browser = pytest.fixture(scope="module")(browser_fixture)


def test_browser_harness_sees_errors(browser, tmp_path):
    """Guards the page test: a broken page must be reported."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>notDefinedAnywhere();</script></body></html>")
    browser.events.clear()
    browser.open(bad.as_uri())
    assert any("notDefinedAnywhere" in str(e) or "Uncaught" in str(e) for e in browser.errors())


def test_html_page_in_chromium(browser, tmp_path):
    maps = causal_maps(2, 3, 9, seed=7)
    layer_ids = [4, 11]
    page = tmp_path / "attn.html"
    page.write_text(render_html(maps, LABELS, layer_ids, title="attention test"), encoding="utf-8")
    browser.events.clear()
    s = browser.open(page.as_uri())
    assert browser.errors() == []
    assert browser.eval(s, "document.querySelectorAll('#layer option').length") == 2
    assert browser.eval(s, "document.querySelectorAll('#head option').length") == 3
    # Entropy per head, as printed in the table.
    ent = head_entropy_bits(maps)
    assert float(browser.eval(s, "document.getElementById('e1_2').textContent")) == \
        pytest.approx(ent[1, 2], abs=0.006)
    for li, h, q, k in [(0, 0, 0, 0), (1, 2, 7, 3), (0, 1, 8, 8), (1, 0, 5, 1)]:
        browser.eval(s, f"attentionPage.select({li}, {h})")
        pt = browser.eval(s, f"attentionPage.cellCenter({q}, {k})")
        browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": pt["x"], "y": pt["y"]},
                     session=s)
        tip = browser.eval(s, "[getComputedStyle(tip).display, tip.textContent]")
        assert tip[0] == "block"
        m = re.search(r"query (\d+) (.*)\nkey +(\d+) (.*)\nweight ([0-9.]+)", tip[1])
        assert m, tip[1]
        assert (int(m.group(1)), int(m.group(3))) == (q, k)
        assert json.loads(m.group(2)) == LABELS[q] and json.loads(m.group(4)) == LABELS[k]
        assert float(m.group(5)) == pytest.approx(float(maps[li, h, q, k]), abs=1e-6)
    # Above the diagonal there is nothing to show.
    pt = browser.eval(s, "attentionPage.cellCenter(2, 6)")
    browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": pt["x"], "y": pt["y"]}, session=s)
    assert browser.eval(s, "getComputedStyle(tip).display") == "none"
    assert browser.errors() == []


# --------------------------------------------------------------------------
# the engine's maps
# --------------------------------------------------------------------------

PROMPT = "The quick brown fox jumps over the lazy dog. It was not amused."


def _engine():
    # runtime/model.py is written alongside this module; until it lands these tests wait.
    return pytest.importorskip("runtime.model", reason="runtime.model (the engine) is not there yet")


@pytest.fixture(scope="module")
def smol(smollm2_path):
    """Default settings, as the CLI runs."""
    return _engine().Model.load(smollm2_path, n_ctx=128)


@pytest.fixture(scope="module")
def smol_f32kv(smollm2_path):
    # The default f16 KV cache rounds K and V (as llama.cpp does), which moves
    # weights by ~1e-3; the 1e-4 comparison with exact math needs an f32 cache.
    return _engine().Model.load(smollm2_path, n_ctx=128, kv_type="f32")


def _check_causal_rows(maps):
    n = maps.shape[-1]
    assert maps.dtype == np.float32
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.all(maps[..., np.triu(np.ones((n, n), bool), 1)] == 0)
    assert np.all(maps >= 0)


def test_smollm2_maps_match_reference(smol_f32kv, smollm2_path):
    reference_attention = pytest.importorskip(
        "reference", reason="tests/reference.py (NumPy reference forward) is not there yet").reference_attention

    smol = smol_f32kv
    ids = smol.tokenize(PROMPT)
    n = len(ids)
    maps = np.asarray(smol.attention(ids))
    assert maps.shape == (smol.args.n_layers, smol.args.n_heads, n, n)
    _check_causal_rows(maps)
    ref = np.asarray(reference_attention(smollm2_path, ids))
    assert ref.shape == maps.shape
    np.testing.assert_allclose(maps, ref, atol=1e-4, rtol=0)
    # Selected layers: exactly those maps, nothing else stored.
    sel = np.asarray(smol.attention(ids, layers=[2, 17]))
    assert sel.shape == (2, smol.args.n_heads, n, n)
    np.testing.assert_array_equal(sel, maps[[2, 17]])


def _attention_cli(*argv):
    return subprocess.run([sys.executable, "-m", "runtime", "attention", *map(str, argv)],
                          capture_output=True, text=True, timeout=900)


def test_default_kv_maps_are_causal_softmax(smol):
    ids = smol.tokenize(PROMPT)
    maps = np.asarray(smol.attention(ids, layers=[0, 29]))
    assert maps.shape == (2, smol.args.n_heads, len(ids), len(ids))
    _check_causal_rows(maps)


def test_cli_terminal_png_html(smol, smollm2_path, tmp_path):
    ids = smol.tokenize(PROMPT)
    maps = np.asarray(smol.attention(ids, layers=[5]))
    p = _attention_cli(smollm2_path, "-p", PROMPT, "--layer", "5", "--head", "3")
    assert p.returncode == 0, p.stderr
    rows = _rows(ANSI.sub("", p.stdout))
    assert len(rows) == len(ids)
    idx, _ = most_attended(maps[0, 3])
    assert [int(r.split("->")[1].split()[0]) for r in rows] == idx.tolist()
    assert "entropy per head" in p.stdout and f"{head_entropy_bits(maps)[0, 3]:.2f}*" in p.stdout

    png = tmp_path / "m.png"
    p = _attention_cli(smollm2_path, "-p", PROMPT, "--layer", "5", "--head", "3", "--out", png)
    assert p.returncode == 0, p.stderr
    _check_plot(png, maps[0, 3])

    page = tmp_path / "p.html"
    p = _attention_cli(smollm2_path, "-p", PROMPT, "--layer", "-1", "--out", page)
    assert p.returncode == 0, p.stderr
    assert "attentionPage" in page.read_text()


def _check_plot(png, w):
    """A matplotlib figure of one map: the tile's cells are the map's colours (sqrt scale)."""
    Image = pytest.importorskip("PIL.Image", reason="matplotlib (the plots extra) brings Pillow")
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[0] >= 250 and img.shape[1] >= 250
    # the darkest cell of the map (viridis at sqrt(min weight)) and the brightest both appear
    lo = colormap(np.sqrt([w[np.tril_indices(len(w))].min()]))[0]
    hi = colormap(np.sqrt([w.max()]))[0]
    for c in (lo, hi):
        assert (np.abs(img - c).sum(-1) <= 12).sum() > 4, c


def test_plot_png_tiles(tmp_path):
    pytest.importorskip("matplotlib", reason="PNGs need the plots extra")
    from PIL import Image

    from runtime.attention import plot_png

    maps = causal_maps(2, 3, 9, seed=9)
    out = plot_png(tmp_path / "t.png", maps, LABELS, [4, 11], title="tiles")
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 300
    with pytest.raises(ValueError, match="do not match"):
        plot_png(tmp_path / "u.png", maps, LABELS[:3], [4, 11])


def test_png_without_matplotlib_names_the_extra(smollm2_path, tmp_path):
    """Where matplotlib is missing, a PNG request is one line naming the extra."""
    code = ("import sys; sys.modules['matplotlib'] = None; from runtime.cli import main; "
            f"sys.exit(main(['attention', {str(smollm2_path)!r}, '-p', 'hi', '--out', {str(tmp_path / 'x.png')!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "plots" in errors[0] and "matplotlib" in errors[0], p.stderr


@pytest.mark.parametrize("argv, msg", [(["--layer", "99"], "out of range"),
                                       (["--head", "9"], "out of range"),
                                       (["--out", "x.txt"], ".html or .png")])
def test_cli_bad_input(smollm2_path, argv, msg):
    _engine()
    p = _attention_cli(smollm2_path, "-p", "hi", *argv)
    assert p.returncode == 1 and msg in p.stderr and "Traceback" not in p.stderr


def test_html_model_view_and_head_view(browser, tmp_path):
    """Thumbnails of every layer x head (click: that map, enlarged above) and the
    head view (hover a query token: its strongest keys and weights)."""
    maps = causal_maps(2, 3, 9, seed=8)
    page = tmp_path / "views.html"
    page.write_text(render_html(maps, LABELS, [4, 11], title="views"), encoding="utf-8")
    browser.events.clear()
    s = browser.open(page.as_uri())
    assert browser.errors() == []
    assert browser.eval(s, "document.querySelectorAll('#mv canvas').length") == 6
    # a thumbnail shows its own map: pixel (q, k) of layer 1 head 2
    px = browser.eval(s, "Array.from(document.getElementById('th1_2').getContext('2d')"
                         ".getImageData(3, 7, 1, 1).data.slice(0, 3))")
    np.testing.assert_allclose(px, colormap(np.sqrt(maps[1, 2, 7, 3])), atol=1)
    pt = browser.eval(s, "attentionPage.thumbCenter(1, 2)")
    for kind in ("mousePressed", "mouseReleased"):
        browser.send("Input.dispatchMouseEvent", {"type": kind, "x": pt["x"], "y": pt["y"], "button": "left",
                                                  "clickCount": 1}, session=s)
    assert browser.eval(s, "attentionPage.current()") == {"l": 1, "h": 2}
    assert browser.eval(s, "[layer.value, head.value]") == ["1", "2"]
    assert browser.eval(s, "document.getElementById('th1_2').classList.contains('cur')")
    # the enlarged map is that one: hover a cell
    pt = browser.eval(s, "attentionPage.cellCenter(6, 2)")
    browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": pt["x"], "y": pt["y"]}, session=s)
    assert float(browser.eval(s, "tip.dataset.weight")) == pytest.approx(float(maps[1, 2, 6, 2]), abs=1e-6)
    # head view: hovering query 8 lists its strongest keys
    pt = browser.eval(s, "attentionPage.headViewToken(8)")
    browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": pt["x"], "y": pt["y"]}, session=s)
    info = browser.eval(s, "document.getElementById('hvinfo').textContent")
    m = re.search(r"key (\d+) .*  weight ([0-9.]+)", info)
    assert m, info
    assert int(m.group(1)) == int(np.argmax(maps[1, 2, 8]))
    assert float(m.group(2)) == pytest.approx(float(maps[1, 2, 8].max()), abs=1e-6)
    lines = browser.eval(s, "Array.from(document.querySelectorAll('#hv line')).map(l => [+l.dataset.q, +l.dataset.k, "
                            "+l.getAttribute('stroke-opacity')])")
    assert lines and all(q == 8 for q, _, _ in lines)
    for q, k, w in lines:
        assert w == pytest.approx(float(maps[1, 2, q, k]), abs=1e-4)
    assert browser.errors() == []
