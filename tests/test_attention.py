"""Attention maps: the engine's own softmax weights, and the three ways to look at them."""

from __future__ import annotations

import json
import os
import re
import select
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from runtime.attention import (colormap, head_entropy_bits, heatmap_rgb, most_attended,
                               render_entropy_table, render_html, render_terminal,
                               row_entropy_bits, write_png)

CHROMIUM = Path("/usr/bin/chromium")
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
    assert "http://" not in low and "https://" not in low and "@import" not in low
    assert not re.search(r"<script[^>]*\bsrc=", low) and "<link rel=\"stylesheet\"" not in low
    # A token cannot close the data element.
    assert low.count("</script>") == 2


def _onto_3_and_4(r, w):
    # Copies first: r or w may already be fd 3 or 4 (and close-on-exec).
    r2, w2 = os.dup(r), os.dup(w)
    os.dup2(r2, 3)
    os.dup2(w2, 4)


class DevTools:
    """The Chrome DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out)."""

    def __init__(self, exe=CHROMIUM, timeout=30.0):
        self.timeout = timeout
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        self._profile = tempfile.TemporaryDirectory()
        self.proc = subprocess.Popen(
            [str(exe), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--remote-debugging-pipe",
             f"--user-data-dir={self._profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=lambda: _onto_3_and_4(cmd_r, res_w))
        os.close(cmd_r)
        os.close(res_w)
        self._buf, self._id, self.events = b"", 0, []

    def _next(self, deadline):
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer")
            if select.select([self._res_r], [], [], left)[0]:
                data = os.read(self._res_r, 1 << 20)
                if not data:
                    raise EOFError("chromium closed the pipe")
                self._buf += data
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method, params=None, session=None):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._next(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method):
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._next(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)

    def open(self, url):
        """A new page at url, loaded; returns its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for m in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.send(m, session=s)
        self.send("Page.navigate", {"url": url}, session=s)
        self.wait_for("Page.loadEventFired")
        return s

    def eval(self, session, expr):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def errors(self):
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"].get("text", "exception"))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(str(p.get("args")))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text"))
        return out

    def close(self):
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._res_r)
        self._profile.cleanup()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("headless test needs Debian's chromium at /usr/bin/chromium "
                    "(apt-get install chromium)")
    b = DevTools()
    yield b
    b.close()


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
                          capture_output=True, text=True, timeout=300)


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
    p = _attention_cli(smollm2_path, "-p", PROMPT, "--layer", "5", "--out", png)
    assert p.returncode == 0, p.stderr
    img = _decode_png(png.read_bytes())
    np.testing.assert_array_equal(img, heatmap_rgb(maps))

    page = tmp_path / "p.html"
    p = _attention_cli(smollm2_path, "-p", PROMPT, "--layer", "-1", "--out", page)
    assert p.returncode == 0, p.stderr
    assert "attentionPage" in page.read_text()


@pytest.mark.parametrize("argv, msg", [(["--layer", "99"], "out of range"),
                                       (["--head", "9"], "out of range"),
                                       (["--out", "x.txt"], ".html or .png")])
def test_cli_bad_input(smollm2_path, argv, msg):
    _engine()
    p = _attention_cli(smollm2_path, "-p", "hi", *argv)
    assert p.returncode == 1 and msg in p.stderr and "Traceback" not in p.stderr
