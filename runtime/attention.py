"""``python -m runtime attention MODEL -p TEXT``: look at what the heads attend to.

The maps come from ``Model.attention(ids, layers)``: the softmax weights the
engine computed during its own forward pass, float32 [layers, heads, q, k],
rows summing to 1 and zero above the diagonal (causal mask).

Three views of them:
  terminal   one layer/head as a heatmap (256-colour cells, or shade blocks
             when colour is off), each query row labelled with its token and
             followed by its most-attended key; then the entropy of every head.
  --out X.html  one self-contained page (inline CSS/JS, no fetches): layer and
             head pickers, a canvas heatmap whose hover shows query token, key
             token and weight, and a clickable table of per-head entropy.
  --out X.html  also a head view (query tokens linked to the keys they attend
             to, bertviz-style) and a model view (every layer x head as a
             thumbnail; click one to enlarge it).
  --out X.png   the selected maps as titled tiles (layers down, heads across)
             with token labels and a colour bar, drawn with matplotlib (the
             ``plots`` extra); heatmap_rgb / write_png keep the dependency-free
             one-pixel-per-cell image.

Entropy of a query row is H = -sum_k p_k log2 p_k bits; a head's entropy is
the mean over its query rows (0 = every query looks at one key; a uniform row
over i+1 keys gives log2(i+1)).  Colours follow sqrt(weight) so that the
small weights next to an attention sink stay visible.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["row_entropy_bits", "head_entropy_bits", "most_attended", "token_labels",
           "colormap", "render_terminal", "render_entropy_table", "render_html",
           "heatmap_rgb", "png_bytes", "write_png", "read_png", "plot_png", "cli_attention"]

# A full set of maps above this size needs --layer (float32 bytes).
MAX_MAP_BYTES = 512 * 1024 * 1024

# viridis, sampled at 9 evenly spaced points (the PNG, terminal and page share it).
_VIRIDIS = np.array([
    (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
    (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)], dtype=np.float64)


# --------------------------------------------------------------------------
# measures
# --------------------------------------------------------------------------

def row_entropy_bits(w: np.ndarray) -> np.ndarray:
    """Entropy in bits of every row (last axis is the key axis), float64."""
    p = np.asarray(w, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=-1)


def head_entropy_bits(maps: np.ndarray) -> np.ndarray:
    """[layers, heads, q, k] -> [layers, heads]: mean entropy over query rows."""
    return row_entropy_bits(maps).mean(axis=-1)


def most_attended(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For one map [q, k]: index and weight of the largest key per query."""
    idx = np.asarray(w).argmax(axis=-1)
    return idx, np.take_along_axis(np.asarray(w), idx[..., None], axis=-1)[..., 0]


def token_labels(tokenizer, ids: Sequence[int], width: int | None = None) -> list[str]:
    """Printable text of each token: whitespace made visible, specials by name."""
    out = []
    for i in ids:
        try:
            piece = tokenizer.token_to_piece(int(i), special=True)
        except TypeError:
            piece = tokenizer.token_to_piece(int(i))
        out.append(_visible(piece.decode("utf-8", errors="replace"), width))
    return out


def _visible(text: str, width: int | None = None) -> str:
    text = text.replace(" ", "\u00b7").replace("\n", "\u21b5").replace("\t", "\u21e5")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text) or "\u2205"
    if width is not None and len(text) > width:
        text = text[:width - 1] + "\u2026"
    return text


# --------------------------------------------------------------------------
# colour
# --------------------------------------------------------------------------

def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (viridis, linear between the samples)."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.minimum(np.floor(v).astype(np.int64), len(_VIRIDIS) - 2)
    t = (v - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1 - t) + _VIRIDIS[lo + 1] * t
    return np.rint(rgb).astype(np.uint8)


def _display(w: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip(np.asarray(w, dtype=np.float64), 0.0, 1.0))


_CUBE = np.array([0, 95, 135, 175, 215, 255])


def _xterm256(rgb: np.ndarray) -> np.ndarray:
    """Nearest colour of xterm's 6x6x6 cube (indices 16..231)."""
    level = np.abs(rgb[..., None].astype(np.int64) - _CUBE).argmin(axis=-1)
    return 16 + 36 * level[..., 0] + 6 * level[..., 1] + level[..., 2]


_SHADES = " \u2591\u2592\u2593\u2588"   # space, light, medium, dark, full block


# --------------------------------------------------------------------------
# terminal
# --------------------------------------------------------------------------

def render_terminal(w: np.ndarray, labels: Sequence[str], *, color: bool = True,
                    columns: int | None = None, title: str = "") -> str:
    """Heatmap of one map [q, k] with token labels and the most-attended key per row."""
    w = np.asarray(w, dtype=np.float32)
    n_q, n_k = w.shape
    if len(labels) != n_k:
        raise ValueError(f"{len(labels)} labels for {n_k} keys")
    columns = columns or shutil.get_terminal_size((120, 40)).columns
    label_w = 12
    right_w = 34   # "  -> 123 token·····  0.123  H=1.23"
    room = max(8, columns - (7 + label_w + right_w))
    # Long prompts: show the last rows/columns that fit, 1 character per cell.
    cell = 2 if n_k * 2 <= room else 1
    first = max(0, n_k - room // cell)
    keys = range(first, n_k)
    idx, top = most_attended(w)
    ent = row_entropy_bits(w)
    shade = _display(w)

    out = []
    if title:
        out.append(title)
    if first:
        out.append(f"(prompt too wide for the terminal: showing keys and queries {first}..{n_k - 1})")
    # Column header: key positions, one digit per cell (tens on a line above when wide).
    pad = " " * (7 + label_w)
    if cell == 2:
        out.append(pad + "".join(f"{k % 100:>2}" for k in keys))
    else:
        out.append(pad + "".join(str((k // 10) % 10) if k % 10 == 0 else " " for k in keys))
        out.append(pad + "".join(str(k % 10) for k in keys))
    if color:
        rgb = colormap(shade)
        codes = _xterm256(rgb)
    for q in range(max(first, n_q - (n_k - first)), n_q):
        row = [f"{q:>4}  {_visible(labels[q], label_w):<{label_w}} "]
        for k in keys:
            if k > q:
                row.append(("\x1b[49m" if color else "") + " " * cell)
            elif color:
                row.append(f"\x1b[48;5;{codes[q, k]}m{' ' * cell}")
            else:
                level = min(len(_SHADES) - 1, int(math.ceil(shade[q, k] * (len(_SHADES) - 1))))
                row.append(_SHADES[level] * cell)
        if color:
            row.append("\x1b[0m")
        kk = int(idx[q])
        row.append(f"  -> {kk:>3} {_visible(labels[kk], 10):<10} {top[q]:.3f}  H={ent[q]:.2f}")
        out.append("".join(row))
    legend = "colour ~ sqrt(weight): " if color else "shade ~ sqrt(weight): "
    if color:
        ramp = _xterm256(colormap(np.linspace(0, 1, 10)))
        legend += "0 " + "".join(f"\x1b[48;5;{c}m  " for c in ramp) + "\x1b[0m 1"
    else:
        legend += "0 '" + _SHADES + "' 1"
    out.append(legend)
    out.append("-> most-attended key, its weight; H = row entropy in bits")
    return "\n".join(out)


def render_entropy_table(ent: np.ndarray, layer_ids: Sequence[int], n_tokens: int,
                         mark: tuple[int, int] | None = None) -> str:
    """Per-head mean entropy (bits), layers down, heads across."""
    n_heads = ent.shape[1]
    uniform = float(np.mean(np.log2(np.arange(1, n_tokens + 1))))
    out = [f"entropy per head, bits (mean over {n_tokens} queries; uniform attention would give "
           f"{uniform:.2f}, * = shown above)",
           "layer " + "".join(f"{'h' + str(h):>7}" for h in range(n_heads))]
    for li, layer in enumerate(layer_ids):
        cells = []
        for h in range(n_heads):
            star = "*" if mark == (layer, h) else " "
            cells.append(f"{ent[li, h]:6.2f}{star}")
        out.append(f"{layer:>5} " + "".join(cells))
    return "\n".join(out)


# --------------------------------------------------------------------------
# PNG (no dependency: zlib + struct)
# --------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(rgb: np.ndarray) -> bytes:
    """uint8 [height, width, 3] -> a PNG file (8-bit RGB, no interlace)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"need a non-empty [height, width, 3] image, got {rgb.shape}")
    h, w, _ = rgb.shape
    # Every scanline starts with its filter type; 0 = none.
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)
    return (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + _png_chunk(b"IEND", b""))


def read_png(data: bytes) -> np.ndarray:
    """Decode what png_bytes writes (8-bit RGB, filter 0): for checks and tests."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"bad CRC in {kind!r} chunk")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise ValueError("PNG without IHDR")
    w, h, depth, ctype = header[:4]
    if (depth, ctype) != (8, 2):
        raise ValueError("only 8-bit RGB PNGs are read here")
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    if np.any(raw[:, 0] != 0):
        raise ValueError("only filter type 0 is read here")
    return raw[:, 1:].reshape(h, w, 3)


_MASKED = np.array([24, 24, 24], np.uint8)     # above the diagonal
_GAP = np.array([255, 255, 255], np.uint8)     # between tiles


def heatmap_rgb(maps: np.ndarray, *, max_width: int = 2048, max_cell: int = 16) -> np.ndarray:
    """[layers, heads, q, k] -> one image: a tile per (layer, head), layers down."""
    maps = np.asarray(maps, dtype=np.float32)
    n_layers, n_heads, n_q, n_k = maps.shape
    gap = 2 if n_layers * n_heads > 1 else 0
    cell = max(1, min(max_cell, (max_width - gap * (n_heads - 1)) // max(1, n_heads * n_k)))
    tile_h, tile_w = n_q * cell, n_k * cell
    img = np.empty((n_layers * tile_h + gap * (n_layers - 1),
                    n_heads * tile_w + gap * (n_heads - 1), 3), np.uint8)
    img[:] = _GAP
    above = np.triu(np.ones((n_q, n_k), bool), k=1 + (n_k - n_q))
    for li in range(n_layers):
        for h in range(n_heads):
            rgb = colormap(_display(maps[li, h]))
            rgb[above] = _MASKED
            tile = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
            y, x = li * (tile_h + gap), h * (tile_w + gap)
            img[y:y + tile_h, x:x + tile_w] = tile
    return img


def write_png(path, maps: np.ndarray) -> Path:
    path = Path(path)
    path.write_bytes(png_bytes(heatmap_rgb(maps)))
    return path


def plot_png(path, maps: np.ndarray, labels: Sequence[str], layer_ids: Sequence[int],
             head_ids: Sequence[int] | None = None, *, title: str = "") -> Path:
    """The maps as a matplotlib figure (the ``plots`` extra): a tile per (layer, head),
    layers down, titled, token labels on both axes where they fit, one colour bar
    (viridis on sqrt(weight), as the other views), size growing with the tokens."""
    from .inspection_views import require_matplotlib

    plt = require_matplotlib()
    from matplotlib.colors import PowerNorm

    maps = np.asarray(maps, dtype=np.float32)
    n_layers, n_heads, n_q, n_k = maps.shape
    head_ids = list(range(n_heads)) if head_ids is None else list(head_ids)
    if len(layer_ids) != n_layers or len(head_ids) != n_heads or len(labels) != n_k:
        raise ValueError("layer ids / head ids / labels do not match the maps")
    tiles = n_layers * n_heads
    # inches per tile: readable token labels for one or a few maps, thumbnails for many
    tile = (min(9.0, max(2.5, 0.2 * n_k + 1.0)) if tiles <= 4 else
            min(4.0, max(1.2, 0.09 * n_k + 0.6)) if tiles <= 16 else min(2.0, max(0.9, 0.03 * n_k + 0.6)))
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(n_heads * tile + 1.6, n_layers * tile + 1.0),
                             squeeze=False, layout="constrained", dpi=100)
    cmap = plt.get_cmap("viridis").with_extremes(bad=tuple(_MASKED / 255))
    above = np.triu(np.ones((n_q, n_k), bool), k=1 + (n_k - n_q))
    fs = max(5.0, min(9.0, 220.0 / max(n_k, 1) * tile / 6))
    every = tiles <= 4 and n_k <= 64
    edge = tiles > 4 and 0.12 * n_k <= tile  # labels on the outer tiles where ~9 pt each fit
    shown = [_visible(t, 12) for t in labels]
    im = None
    for li in range(n_layers):
        for h in range(n_heads):
            ax = axes[li, h]
            im = ax.imshow(np.ma.masked_array(maps[li, h], above), cmap=cmap,
                           norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
            name = f"layer {layer_ids[li]} head {head_ids[h]}" if tile >= 1.5 else f"L{layer_ids[li]} h{head_ids[h]}"
            ax.set_title(name, fontsize=max(6.0, min(11.0, 3 * tile)))
            if every or (edge and li == n_layers - 1):
                ax.set_xticks(range(n_k))
                ax.set_xticklabels(shown, rotation=90, fontsize=fs)
            else:
                ax.set_xticks([])
            if every or (edge and h == 0):
                ax.set_yticks(range(n_q))
                ax.set_yticklabels(shown[n_k - n_q:], fontsize=fs)
            else:
                ax.set_yticks([])
            if every or (li == n_layers - 1 and h == 0):
                ax.set_xlabel("key", fontsize=8)
                ax.set_ylabel("query", fontsize=8)
    # a bar about three tiles tall however many layers there are
    cb = fig.colorbar(im, ax=axes, shrink=min(0.9, 3.0 / n_layers), aspect=20, pad=0.01)
    cb.set_label("attention weight (colour ~ sqrt)")
    cb.set_ticks([0, 0.02, 0.1, 0.25, 0.5, 1.0])
    if title:
        fig.suptitle(title)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------

def _pack_lower(maps: np.ndarray) -> str:
    """Rows of the lower triangle (k <= q), float32 little-endian, base64."""
    maps = np.asarray(maps, dtype=np.float32)
    n = maps.shape[-1]
    rows, cols = np.tril_indices(n)
    return base64.b64encode(maps[..., rows, cols].astype("<f4").tobytes()).decode("ascii")


def render_html(maps: np.ndarray, labels: Sequence[str], layer_ids: Sequence[int], *,
                title: str = "attention", model_name: str = "", prompt: str = "") -> str:
    """One self-contained page: pickers, hover heatmap, entropy table."""
    maps = np.asarray(maps, dtype=np.float32)
    n_layers, n_heads, n_q, n_k = maps.shape
    if n_q != n_k:
        raise ValueError("the page shows square (self-attention over the prompt) maps")
    if len(layer_ids) != n_layers or len(labels) != n_k:
        raise ValueError("layer ids / labels do not match the maps")
    data = {
        "tokens": list(labels), "layers": [int(x) for x in layer_ids], "heads": n_heads,
        "n": n_k, "weights": _pack_lower(maps),
        "entropy": np.round(head_entropy_bits(maps), 4).tolist(),
        "viridis": _VIRIDIS.astype(int).tolist(),
    }
    # JSON inside <script>: "<" escaped so no token can close the element.
    blob = json.dumps(data, ensure_ascii=True).replace("<", "\\u003c")
    head = (f"{html.escape(model_name)} &middot; {n_k} tokens"
            + (f" &middot; <span class=prompt>{html.escape(prompt[:200])}</span>" if prompt else ""))
    return (_PAGE.replace("@@TITLE@@", html.escape(title)).replace("@@HEAD@@", head)
            .replace("@@DATA@@", blob))


# The opening every self-contained page shares (the lens and surprise pages of
# inspection_views.py too): charset, no favicon request, the title slot, base styles.
PAGE_HEAD = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<link rel="icon" href="data:,">
<title>@@TITLE@@</title>
<style>
body { font: 13px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #fafafa; }
h1 { font-size: 17px; margin: 0 0 4px; }
.sub { color: #666; margin-bottom: 10px; }
"""

_PAGE = PAGE_HEAD + r""".prompt { font-family: monospace; }
.controls { margin: 8px 0; }
.controls label { margin-right: 14px; }
#wrap { position: relative; display: inline-block; }
#map { background: #fff; border: 1px solid #ddd; }
#tip { position: absolute; pointer-events: none; display: none; background: rgba(20,20,20,.92);
       color: #fff; padding: 4px 7px; border-radius: 4px; font: 12px monospace; white-space: pre; }
table.ent { border-collapse: collapse; margin-top: 12px; font: 11px monospace; }
table.ent td, table.ent th { padding: 2px 5px; text-align: right; }
table.ent td { cursor: pointer; border: 1px solid #eee; }
table.ent td.cur { outline: 2px solid #e33; }
.note { color: #666; font-size: 12px; margin-top: 6px; }
h2 { font-size: 14px; margin: 16px 0 2px; }
#hv { background: #fff; border: 1px solid #ddd; }
#hv text { font: 11px monospace; fill: #333; cursor: default; }
#hv text.on { fill: #e33; font-weight: bold; }
#hvinfo { font: 12px monospace; white-space: pre; margin-top: 4px; min-height: 3em; }
#mv { display: grid; gap: 3px; margin-top: 6px; }
#mv canvas { image-rendering: pixelated; border: 1px solid #ccc; cursor: pointer; }
#mv canvas.cur { outline: 2px solid #e33; }
#mv .lab { font: 10px monospace; color: #666; align-self: center; text-align: right; padding-right: 3px; }
</style></head>
<body>
<h1>@@TITLE@@</h1>
<div class="sub">@@HEAD@@</div>
<div class="controls">
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <span id="hent"></span>
</div>
<div id="wrap"><canvas id="map"></canvas><div id="tip"></div></div>
<div class="note">rows: query tokens, columns: key tokens; colour ~ sqrt(weight); hover a cell for its weight.</div>
<h2 style="font-size:14px;margin:14px 0 0">entropy per head (bits, mean over queries; click to show)</h2>
<table class="ent" id="ent"></table>
<h2>head view</h2>
<div class="note">the selected layer and head: each query token (left) linked to the keys it attends to (right),
line opacity ~ weight; hover a token on the left for its row.</div>
<svg id="hv"></svg>
<div id="hvinfo"></div>
<h2>model view</h2>
<div class="note">every layer (down) x head (across); click a thumbnail to enlarge it above.</div>
<div id="mv"></div>
<script type="application/json" id="data">@@DATA@@</script>
<script>
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("data").textContent);
  const n = D.n, H = D.heads, L = D.layers.length, tri = n * (n + 1) / 2;
  const raw = atob(D.weights), buf = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) buf[i] = raw.charCodeAt(i);
  const W = new Float32Array(buf.buffer);
  const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
  const canvas = document.getElementById("map"), tip = document.getElementById("tip");
  const ctx = canvas.getContext("2d");
  let cur = { l: 0, h: 0 };
  D.layers.forEach((id, i) => layerSel.add(new Option(String(id), String(i))));
  for (let h = 0; h < H; h++) headSel.add(new Option(String(h), String(h)));

  function weight(l, h, q, k) {
    if (k > q) return 0;
    return W[(l * H + h) * tri + q * (q + 1) / 2 + k];
  }
  function colour(v) {
    const s = Math.sqrt(Math.min(1, Math.max(0, v))) * (D.viridis.length - 1);
    const lo = Math.min(Math.floor(s), D.viridis.length - 2), t = s - lo;
    const a = D.viridis[lo], b = D.viridis[lo + 1];
    return "rgb(" + [0, 1, 2].map(i => Math.round(a[i] * (1 - t) + b[i] * t)).join(",") + ")";
  }
  const cell = Math.max(3, Math.min(26, Math.floor(760 / n)));
  const showLabels = cell >= 9;
  ctx.font = "11px monospace";
  const labelW = showLabels ? Math.min(130, 12 + Math.max(...D.tokens.map(t => ctx.measureText(t).width))) : 4;
  const left = labelW, top = labelW;
  canvas.width = left + n * cell + 4;
  canvas.height = top + n * cell + 4;

  function draw() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.font = "11px monospace";
    for (let q = 0; q < n; q++) {
      for (let k = 0; k <= q; k++) {
        ctx.fillStyle = colour(weight(cur.l, cur.h, q, k));
        ctx.fillRect(left + k * cell, top + q * cell, cell, cell);
      }
    }
    if (showLabels) {
      ctx.fillStyle = "#333";
      ctx.textBaseline = "middle";
      ctx.textAlign = "right";
      for (let q = 0; q < n; q++) ctx.fillText(D.tokens[q], left - 4, top + q * cell + cell / 2, labelW - 8);
      for (let k = 0; k < n; k++) {
        ctx.save();
        ctx.translate(left + k * cell + cell / 2, top - 4);
        ctx.rotate(-Math.PI / 2);
        ctx.textAlign = "left";
        ctx.fillText(D.tokens[k], 0, 0, labelW - 8);
        ctx.restore();
      }
    }
    layerSel.value = String(cur.l);
    headSel.value = String(cur.h);
    document.getElementById("hent").textContent =
      "entropy " + D.entropy[cur.l][cur.h].toFixed(3) + " bits";
    document.querySelectorAll("#ent td.cur").forEach(td => td.classList.remove("cur"));
    const td = document.getElementById("e" + cur.l + "_" + cur.h);
    if (td) td.classList.add("cur");
  }
  function select(l, h) { cur = { l: l, h: h }; tip.style.display = "none"; draw(); drawHead(null); markThumb(); }

  // Head view: queries left, keys right, a line per (query, key) weighted by opacity.
  const hv = document.getElementById("hv"), hvinfo = document.getElementById("hvinfo");
  const SVG = "http://www.w3.org/2000/svg", rowH = 16, colL = 150, colR = 330;
  hv.setAttribute("width", String(colR + 160));
  hv.setAttribute("height", String(n * rowH + 8));
  const hvLines = document.createElementNS(SVG, "g");
  hv.appendChild(hvLines);
  const hvLeft = [], hvRight = [];
  for (let i = 0; i < n; i++) {
    for (const side of [0, 1]) {
      const t = document.createElementNS(SVG, "text");
      t.setAttribute("x", String(side ? colR + 4 : colL - 4));
      t.setAttribute("y", String(8 + i * rowH + rowH / 2 + 4));
      t.setAttribute("text-anchor", side ? "start" : "end");
      t.textContent = D.tokens[i];
      hv.appendChild(t);
      (side ? hvRight : hvLeft).push(t);
    }
    hvLeft[i].addEventListener("mouseenter", () => drawHead(i));
    hvLeft[i].addEventListener("mouseleave", () => drawHead(null));
  }
  function drawHead(focus) {
    while (hvLines.firstChild) hvLines.removeChild(hvLines.firstChild);
    hvLeft.forEach((t, i) => t.classList.toggle("on", i === focus));
    for (let q = 0; q < n; q++) {
      if (focus !== null && q !== focus) continue;
      for (let k = 0; k <= q; k++) {
        const w = weight(cur.l, cur.h, q, k);
        if (w < (focus === null ? 0.02 : 0.001)) continue;
        const ln = document.createElementNS(SVG, "line");
        ln.setAttribute("x1", String(colL)); ln.setAttribute("x2", String(colR));
        ln.setAttribute("y1", String(8 + q * rowH + rowH / 2)); ln.setAttribute("y2", String(8 + k * rowH + rowH / 2));
        ln.setAttribute("stroke", "rgb(" + colourRGB(1).join(",") + ")");
        ln.setAttribute("stroke-opacity", w.toFixed(4));
        ln.setAttribute("stroke-width", "2");
        ln.dataset.q = q; ln.dataset.k = k; ln.dataset.weight = String(w);
        hvLines.appendChild(ln);
      }
    }
    if (focus === null) { hvinfo.textContent = ""; return; }
    const row = [];
    for (let k = 0; k <= focus; k++) row.push([weight(cur.l, cur.h, focus, k), k]);
    row.sort((a, b) => b[0] - a[0]);
    hvinfo.textContent = "layer " + D.layers[cur.l] + " head " + cur.h + ", query " + focus + " " +
      JSON.stringify(D.tokens[focus]) + " attends to:\n" + row.slice(0, 5).map(r =>
        "  key " + r[1] + " " + JSON.stringify(D.tokens[r[1]]) + "  weight " + r[0].toFixed(6)).join("\n");
  }
  function colourRGB(v) {
    const s = Math.sqrt(Math.min(1, Math.max(0, v))) * (D.viridis.length - 1);
    const lo = Math.min(Math.floor(s), D.viridis.length - 2), t = s - lo;
    const a = D.viridis[lo], b = D.viridis[lo + 1];
    return [0, 1, 2].map(i => Math.round(a[i] * (1 - t) + b[i] * t));
  }

  // Model view: a thumbnail per (layer, head), one pixel per cell, scaled up.
  const mv = document.getElementById("mv");
  const thumb = Math.max(36, Math.min(96, Math.floor(900 / Math.max(1, H))));
  mv.style.gridTemplateColumns = "auto repeat(" + H + ", " + (thumb + 2) + "px)";
  mv.appendChild(document.createElement("div"));
  for (let h = 0; h < H; h++) {
    const lab = mv.appendChild(document.createElement("div"));
    lab.className = "lab"; lab.style.textAlign = "center"; lab.textContent = "h" + h;
  }
  const thumbs = [];
  D.layers.forEach((id, l) => {
    const lab = mv.appendChild(document.createElement("div"));
    lab.className = "lab"; lab.textContent = "L" + id;
    for (let h = 0; h < H; h++) {
      const c = document.createElement("canvas");
      c.width = n; c.height = n; c.id = "th" + l + "_" + h;
      c.style.width = thumb + "px"; c.style.height = thumb + "px";
      c.title = "layer " + id + " head " + h + ": click to enlarge";
      const g = c.getContext("2d"), img = g.createImageData(n, n);
      for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) {
        const o = 4 * (q * n + k), rgb = k <= q ? colourRGB(weight(l, h, q, k)) : [24, 24, 24];
        img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2]; img.data[o + 3] = 255;
      }
      g.putImageData(img, 0, 0);
      c.addEventListener("click", () => { select(l, h); canvas.scrollIntoView({ block: "nearest" }); });
      mv.appendChild(c);
      thumbs.push(c);
    }
  });
  function markThumb() {
    thumbs.forEach(c => c.classList.remove("cur"));
    const c = document.getElementById("th" + cur.l + "_" + cur.h);
    if (c) c.classList.add("cur");
  }

  // Entropy table: layers down, heads across, shaded by entropy.
  const table = document.getElementById("ent");
  let maxE = 1e-9;
  D.entropy.forEach(r => r.forEach(v => { maxE = Math.max(maxE, v); }));
  const hr = table.insertRow();
  hr.appendChild(document.createElement("th")).textContent = "layer";
  for (let h = 0; h < H; h++) hr.appendChild(document.createElement("th")).textContent = "h" + h;
  D.layers.forEach((id, l) => {
    const tr = table.insertRow();
    tr.appendChild(document.createElement("th")).textContent = String(id);
    for (let h = 0; h < H; h++) {
      const td = tr.insertCell();
      td.id = "e" + l + "_" + h;
      td.textContent = D.entropy[l][h].toFixed(2);
      td.style.background = "rgba(60,110,200," + (0.08 + 0.6 * D.entropy[l][h] / maxE).toFixed(3) + ")";
      td.title = "layer " + id + " head " + h;
      td.addEventListener("click", () => select(l, h));
    }
  });

  function cellAt(ev) {
    const r = canvas.getBoundingClientRect();
    const x = (ev.clientX - r.left) * canvas.width / r.width - left;
    const y = (ev.clientY - r.top) * canvas.height / r.height - top;
    if (x < 0 || y < 0) return null;
    const k = Math.floor(x / cell), q = Math.floor(y / cell);
    return q < n && k < n && k <= q ? { q: q, k: k } : null;
  }
  canvas.addEventListener("mousemove", ev => {
    const c = cellAt(ev);
    if (!c) { tip.style.display = "none"; return; }
    const w = weight(cur.l, cur.h, c.q, c.k);
    tip.textContent = "query " + c.q + " " + JSON.stringify(D.tokens[c.q]) + "\n" +
                      "key   " + c.k + " " + JSON.stringify(D.tokens[c.k]) + "\n" +
                      "weight " + w.toFixed(6);
    tip.dataset.q = c.q; tip.dataset.k = c.k; tip.dataset.weight = String(w);
    tip.style.display = "block";
    const wr = document.getElementById("wrap").getBoundingClientRect();
    tip.style.left = (ev.clientX - wr.left + 14) + "px";
    tip.style.top = (ev.clientY - wr.top + 14) + "px";
  });
  canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  layerSel.addEventListener("change", () => select(+layerSel.value, cur.h));
  headSel.addEventListener("change", () => select(cur.l, +headSel.value));

  // For automated checks: where a cell is on screen, what it holds.
  window.attentionPage = {
    select: select, weight: weight, n: n, heads: H, layers: D.layers,
    current: () => ({ l: cur.l, h: cur.h }),
    thumbCenter: function (l, h) {
      const c = document.getElementById("th" + l + "_" + h);
      c.scrollIntoView({ block: "center" });
      const r = c.getBoundingClientRect();
      return { x: r.left + r.width / 2, y: r.top + r.height / 2 };
    },
    headViewToken: function (q) {
      hvLeft[q].scrollIntoView({ block: "center" });
      const r = hvLeft[q].getBoundingClientRect();
      return { x: r.left + r.width / 2, y: r.top + r.height / 2 };
    },
    cellCenter: function (q, k) {
      const r = canvas.getBoundingClientRect();
      return { x: r.left + (left + (k + 0.5) * cell) * r.width / canvas.width,
               y: r.top + (top + (q + 0.5) * cell) * r.height / canvas.height };
    }
  };
  draw();
  drawHead(null);
  markThumb();
})();
</script>
</body></html>
"""


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------

def _pick(value: int | None, count: int, what: str) -> int | None:
    from .cli import CLIError

    if value is None:
        return None
    v = value + count if value < 0 else value
    if not 0 <= v < count:
        raise CLIError(f"--{what} {value} is out of range (the model has {count} {what}s: 0..{count - 1})")
    return v


def _use_color(stream) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def cli_attention(args) -> int:
    from .cli import CLIError
    from .model import Model

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".html", ".htm", ".png"):
        raise CLIError(f"--out must end in .html or .png (got {args.out})")
    if out is not None and out.suffix.lower() == ".png":
        from .inspection_views import require_matplotlib

        require_matplotlib()  # before the model runs: a missing extra is a one-line error
    model = Model.load(args.model)
    n_layers, n_heads = model.args.n_layers, model.args.n_heads
    layer = _pick(args.layer, n_layers, "layer")
    head = _pick(args.head, n_heads, "head")

    ids = list(model.tokenize(args.prompt))
    if not ids:
        raise CLIError("the prompt tokenizes to nothing")
    if len(ids) > model.n_ctx:
        raise CLIError(f"the prompt has {len(ids)} tokens, more than the context ({model.n_ctx})")
    layers = [layer] if layer is not None else list(range(n_layers))
    need = len(layers) * n_heads * len(ids) ** 2 * 4
    if need > MAX_MAP_BYTES:
        # the longest prompt whose maps of one layer fit (the maps grow as tokens^2)
        one_layer = math.isqrt(MAX_MAP_BYTES // (n_heads * 4))
        size = (f"maps of {len(layers)} layer{'s' if len(layers) > 1 else ''} x {n_heads} heads x "
                f"{len(ids)}^2 tokens would take {need / 2**20:.0f} MiB, over the "
                f"{MAX_MAP_BYTES // 2**20} MiB limit")
        if layer is None and len(ids) <= one_layer:
            raise CLIError(f"{size}; pick one layer with --layer")
        raise CLIError(f"{size}: even one layer's maps hold at most {one_layer} tokens "
                       f"(the prompt has {len(ids)}); shorten the prompt")
    maps = np.asarray(model.attention(ids, layers=layers), dtype=np.float32)
    labels = token_labels(model.tokenizer, ids)
    name = Path(str(args.model)).name

    if out is not None and out.suffix.lower() == ".png":
        sel = maps if head is None else maps[:, head:head + 1]
        heads = list(range(n_heads)) if head is None else [head]
        plot_png(out, sel, labels, layers, heads, title=f"attention: {name}")
        print(f"wrote {out} ({len(layers)} layer(s) x {sel.shape[1]} head(s), {len(ids)} tokens)")
        return 0
    if out is not None:
        page = render_html(maps, labels, layers, title=f"attention: {name}", model_name=name,
                           prompt=args.prompt)
        out.write_text(page, encoding="utf-8")
        print(f"wrote {out} ({len(layers)} layer(s) x {n_heads} heads, {len(ids)} tokens)")
        return 0

    li, h = 0, head if head is not None else 0
    ent = head_entropy_bits(maps)
    title = (f"layer {layers[li]} head {h}: {len(ids)} tokens, mean entropy {ent[li, h]:.3f} bits"
             + ("" if args.head is not None else "  (pick another with --layer/--head)"))
    print(render_terminal(maps[li, h], labels, color=_use_color(sys.stdout), title=title))
    print()
    print(render_entropy_table(ent, layers, len(ids), mark=(layers[li], h)))
    return 0
