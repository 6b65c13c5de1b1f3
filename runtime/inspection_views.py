"""Pages and pictures of the logit lens and of token surprise (runtime/inspection.py).

Pages are self-contained (inline CSS and JS, the data as JSON in the page, no
fetches); every cell or token answers a hover or click with its numbers.
Pictures are drawn with matplotlib (the ``plots`` extra): token labels on the
axes, titles, a colour bar.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .attention import PAGE_HEAD

__all__ = ["lens_html", "surprise_html", "lens_png", "surprise_png", "require_matplotlib",
           "PlotsMissing"]


class PlotsMissing(ImportError):
    """matplotlib is not installed: PNG output needs the ``plots`` extra."""


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or PlotsMissing naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise PlotsMissing("PNG output needs matplotlib: pip install 'gguf-runtime[plots]' "
                           "(or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _blob(obj) -> str:
    """JSON for a <script type="application/json"> element: no text can close it."""
    return json.dumps(obj, ensure_ascii=True).replace("<", "\\u003c")


def _visible(text: str, width: int | None = None) -> str:
    from .attention import _visible as vis

    return vis(text, width)


# --------------------------------------------------------------------------
# lens page
# --------------------------------------------------------------------------

def lens_html(lens: dict, n_layers: int, *, title: str = "logit lens", prompt: str = "") -> str:
    """Layers down, positions across, each cell the top token shaded by its probability;
    hover or click a cell for its top-k list."""
    data = {"n_layers": int(n_layers), "layers": lens["layers"]}
    head = (f"{len(lens['layers'][0]['positions'])} positions &middot; {len(lens['layers'])} layers"
            + (f" &middot; <span class=prompt>{html.escape(prompt[:200])}</span>" if prompt else ""))
    return (_LENS_PAGE.replace("@@TITLE@@", html.escape(title)).replace("@@HEAD@@", head)
            .replace("@@LAST@@", str(int(n_layers))).replace("@@DATA@@", _blob(data)))


_LENS_PAGE = PAGE_HEAD + r""".prompt { font-family: monospace; }
.wrap { display: flex; gap: 18px; align-items: flex-start; }
.scroll { overflow: auto; max-width: 75vw; max-height: 80vh; border: 1px solid #ddd; background: #fff; }
table.lens { border-collapse: collapse; font: 11px monospace; }
table.lens th { position: sticky; top: 0; background: #f0f0f0; padding: 2px 4px; font-weight: normal; }
table.lens th.row { position: sticky; left: 0; background: #f0f0f0; text-align: right; }
table.lens td { padding: 2px 4px; border: 1px solid #eee; cursor: pointer; white-space: pre;
                max-width: 90px; overflow: hidden; text-overflow: ellipsis; }
table.lens td.cur { outline: 2px solid #e33; }
#detail { font: 12px monospace; min-width: 260px; }
#detail table td { padding: 1px 6px; }
.bar { display: inline-block; height: 9px; background: #3b6fc8; vertical-align: middle; }
.note { color: #666; font-size: 12px; margin-top: 6px; }
</style></head>
<body>
<h1>@@TITLE@@</h1>
<div class="sub">@@HEAD@@</div>
<div class="wrap">
  <div class="scroll"><table class="lens" id="lens"></table></div>
  <div id="detail">hover or click a cell</div>
</div>
<div class="note">row 0: the embeddings; row @@LAST@@: the last layer's output (the model's own prediction).
Each cell: the top token decoded from that layer's residual stream at that position, shaded by its probability.</div>
<script type="application/json" id="data">@@DATA@@</script>
<script>
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("data").textContent);
  const table = document.getElementById("lens"), detail = document.getElementById("detail");
  const n = D.layers[0].positions.length;
  function vis(t) { return t.replace(/ /g, "\u00b7").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5") || "\u2205"; }
  const hr = table.insertRow();
  hr.appendChild(document.createElement("th")).textContent = "layer";
  for (let i = 0; i < n; i++) {
    const th = hr.appendChild(document.createElement("th"));
    th.textContent = i + " " + vis(D.layers[0].positions[i].token);
    th.title = "position " + i + ": " + JSON.stringify(D.layers[0].positions[i].token);
  }
  let cur = null;
  function show(li, i) {
    const e = D.layers[li], p = e.positions[i];
    let h = "<b>layer " + e.layer + (e.layer === 0 ? " (embeddings)" : e.layer === D.n_layers ? " (output)" : "") +
            ", position " + i + "</b><br>input token " + esc(JSON.stringify(p.token)) + "<table>";
    p.top.forEach((t, r) => {
      h += "<tr><td>" + (r + 1) + "</td><td>" + esc(JSON.stringify(t.token)) + "</td><td class=p>" +
           t.p.toFixed(4) + "</td><td><span class=bar style='width:" + Math.round(120 * t.p) + "px'></span></td></tr>";
    });
    detail.innerHTML = h + "</table>";
    detail.dataset.layer = e.layer; detail.dataset.pos = i;
  }
  function esc(s) { return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
  function select(li, i) {
    if (cur) cur.classList.remove("cur");
    cur = document.getElementById("c" + li + "_" + i);
    cur.classList.add("cur");
    show(li, i);
  }
  D.layers.forEach((e, li) => {
    const tr = table.insertRow();
    const th = tr.appendChild(document.createElement("th"));
    th.className = "row"; th.textContent = String(e.layer);
    e.positions.forEach((p, i) => {
      const td = tr.insertCell(), t = p.top[0];
      td.id = "c" + li + "_" + i;
      td.textContent = vis(t.token);
      td.style.background = "rgba(59,111,200," + (0.05 + 0.9 * t.p).toFixed(3) + ")";
      if (t.p > 0.55) td.style.color = "#fff";
      td.addEventListener("mouseenter", () => show(li, i));
      td.addEventListener("click", () => select(li, i));
    });
  });
  window.lensPage = {
    select: select, show: show, n: n, layers: D.layers.map(e => e.layer),
    cellCenter: function (li, i) {
      const td = document.getElementById("c" + li + "_" + i);
      td.scrollIntoView({ block: "center", inline: "center" });
      const r = td.getBoundingClientRect();
      return { x: r.left + r.width / 2, y: r.top + r.height / 2 };
    }
  };
})();
</script>
</body></html>
"""


# --------------------------------------------------------------------------
# surprise page
# --------------------------------------------------------------------------

def windows_note(js: dict) -> str:
    """"scored in k windows of n_ctx tokens (stride s)" for a surprise document whose
    text did not fit one context, else "" (the console, HTML and PNG views all say it)."""
    k = len(js.get("windows") or ())
    return f"scored in {k} windows of {js['n_ctx']} tokens (stride {js['stride']})" if k > 1 else ""


def surprise_html(js: dict, *, title: str = "surprise") -> str:
    """The text, each token shaded by surprisal (or by KL against the base model,
    or by entropy: a picker); hover a token for its numbers."""
    kl = "kl_mean" in js
    head = (f"{js['n_tokens']} tokens &middot; perplexity {js['ppl']:.3f} &middot; mean surprisal "
            f"{js['mean_surprisal']:.2f} bits"
            + (f" &middot; base {html.escape(str(js.get('base', '')))}: mean KL {js['kl_mean']:.5f}, "
               f"same top token {100 * js['top1']:.1f}%" if kl else "")
            + (f" &middot; {windows_note(js)}" if windows_note(js) else ""))
    return (_SURPRISE_PAGE.replace("@@TITLE@@", html.escape(title)).replace("@@HEAD@@", head)
            .replace("@@DATA@@", _blob(js)))


_SURPRISE_PAGE = PAGE_HEAD + r"""#text { font: 14px/1.9 monospace; background: #fff; border: 1px solid #ddd; padding: 10px; white-space: pre-wrap;
        max-width: 980px; }
#text span { border-radius: 2px; cursor: default; }
#tip { position: fixed; pointer-events: none; display: none; background: rgba(20,20,20,.92); color: #fff;
       padding: 4px 7px; border-radius: 4px; font: 12px monospace; white-space: pre; }
.controls { margin: 8px 0; }
.legend span { display: inline-block; width: 18px; height: 10px; }
table.worst { border-collapse: collapse; font: 12px monospace; margin-top: 12px; }
table.worst td, table.worst th { padding: 1px 8px; text-align: right; }
</style></head>
<body>
<h1>@@TITLE@@</h1>
<div class="sub">@@HEAD@@</div>
<div class="controls"><label>colour by <select id="by"></select></label>
  <span class="legend" id="legend"></span></div>
<div id="text"></div>
<div id="tip"></div>
<table class="worst" id="worst"></table>
<script type="application/json" id="data">@@DATA@@</script>
<script>
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("data").textContent);
  const hasKL = D.kl_mean !== undefined;
  const text = document.getElementById("text"), tip = document.getElementById("tip");
  const by = document.getElementById("by"), legend = document.getElementById("legend");
  const scales = { surprisal: [16, "bits"], entropy: [16, "bits"], kl: [1, "nats"] };
  ["surprisal", "entropy"].concat(hasKL ? ["kl"] : []).forEach(k => by.add(new Option(k, k)));
  if (hasKL) by.value = "kl";
  const viridis = [[68,1,84],[71,44,122],[59,81,139],[44,113,142],[33,144,141],[39,173,129],[92,200,99],[170,220,50],[253,231,37]];
  function colour(v) {
    const s = Math.min(1, Math.max(0, v)) * (viridis.length - 1);
    const lo = Math.min(Math.floor(s), viridis.length - 2), t = s - lo, a = viridis[lo], b = viridis[lo + 1];
    return [0, 1, 2].map(i => Math.round(a[i] * (1 - t) + b[i] * t));
  }
  const spans = D.tokens.map((t, i) => {
    const s = document.createElement("span");
    s.textContent = t.token;
    s.id = "t" + i;
    s.addEventListener("mousemove", ev => {
      let h = "pos " + t.pos + "  id " + t.id + "  " + JSON.stringify(t.token);
      if (t.p === null) h += "\n(first token: not predicted)";
      else {
        h += "\np " + t.p.toFixed(6) + "\nrank " + t.rank + "\nsurprisal " + t.surprisal.toFixed(3) +
             " bits\nentropy " + t.entropy.toFixed(3) + " bits";
        if (hasKL) h += "\nKL " + t.kl.toFixed(6) + " nats\nbase p " + t.base_p.toFixed(6);
      }
      tip.textContent = h;
      tip.dataset.pos = t.pos;
      tip.style.display = "block";
      tip.style.left = (ev.clientX + 14) + "px";
      tip.style.top = (ev.clientY + 14) + "px";
    });
    s.addEventListener("mouseleave", () => { tip.style.display = "none"; });
    text.appendChild(s);
    return s;
  });
  function paint() {
    const k = by.value, full = scales[k][0];
    D.tokens.forEach((t, i) => {
      if (t.p === null) { spans[i].style.background = "#ddd"; return; }
      const c = colour(t[k] / full);
      spans[i].style.background = "rgb(" + c.join(",") + ")";
      spans[i].style.color = t[k] / full > 0.6 ? "#000" : "#fff";
    });
    legend.innerHTML = "0 " + [0, .11, .22, .33, .44, .55, .66, .77, .88, 1].map(v =>
      "<span style='background:rgb(" + colour(v).join(",") + ")'></span>").join("") + " " + full + "+ " + scales[k][1];
    const worst = document.getElementById("worst");
    worst.innerHTML = "";
    const hr = worst.insertRow();
    ["pos", "token", "p", "rank", "surprisal", "entropy"].concat(hasKL ? ["KL", "base p"] : []).forEach(h => {
      hr.appendChild(document.createElement("th")).textContent = h; });
    D.tokens.filter(t => t.p !== null).sort((a, b) => b[k] - a[k]).slice(0, 10).forEach(t => {
      const tr = worst.insertRow();
      [t.pos, JSON.stringify(t.token), t.p.toFixed(4), t.rank, t.surprisal.toFixed(2), t.entropy.toFixed(2)]
        .concat(hasKL ? [t.kl.toFixed(5), t.base_p.toFixed(4)] : []).forEach(v => { tr.insertCell().textContent = v; });
    });
  }
  by.addEventListener("change", paint);
  paint();
  window.surprisePage = {
    colourBy: k => { by.value = k; paint(); },
    tokenCenter: i => {
      spans[i].scrollIntoView({ block: "center" });
      const r = spans[i].getBoundingClientRect();
      return { x: r.left + r.width / 2, y: r.top + r.height / 2 };
    }
  };
})();
</script>
</body></html>
"""


# --------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------

def lens_png(path, lens: dict, n_layers: int, *, title: str = "logit lens", max_positions: int = 40) -> Path:
    """Heatmap of the top token's probability, layers up the y axis, positions along
    x (labelled with the input tokens), each cell annotated with its top token."""
    plt = require_matplotlib()
    rows = lens["layers"]
    n = len(rows[0]["positions"])
    first = max(0, n - max_positions)
    cols = range(first, n)
    prob = np.array([[e["positions"][i]["top"][0]["p"] for i in cols] for e in rows])
    words = [[_visible(e["positions"][i]["top"][0]["token"], 8) for i in cols] for e in rows]
    w = min(40.0, 2.0 + 0.85 * len(cols))
    h = min(40.0, 1.6 + 0.32 * len(rows))
    fig, ax = plt.subplots(figsize=(w, h), dpi=100, layout="constrained")
    im = ax.imshow(prob, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{_visible(rows[0]['positions'][i]['token'], 12)}" for i in cols], rotation=60,
                       ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([str(e["layer"]) + (" (emb)" if e["layer"] == 0 else " (out)" if e["layer"] == n_layers
                                           else "") for e in rows], fontsize=7)
    ax.set_xlabel("input token (each column predicts the next one)" + (f"; last {len(cols)} of {n}" if first else ""))
    ax.set_ylabel("residual stream after layer")
    for yi in range(len(rows)):
        for xi in range(len(cols)):
            ax.text(xi, yi, words[yi][xi], ha="center", va="center", fontsize=6.5,
                    color="black" if prob[yi, xi] > 0.6 else "white")
    ax.set_title(title)
    cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    cb.set_label("probability of the top token")
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# the surprise picture: tokens per strip, strips at most (longer texts: the first ones)
SURPRISE_PNG_ROW = 100
SURPRISE_PNG_ROWS = 10


def surprise_png(path, js: dict, *, title: str = "surprise", per_row: int = SURPRISE_PNG_ROW,
                 max_rows: int = SURPRISE_PNG_ROWS) -> Path:
    """Bars of every token's surprisal (bits), labelled with the tokens, coloured by
    the entropy of the prediction; with a base model, under each strip a strip of
    per-token KL.  The text wraps into strips of per_row tokens (one y scale for all
    strips, so they compare), at most max_rows of them: a longer text shows its
    first per_row x max_rows scored tokens and says so in the title."""
    plt = require_matplotlib()
    scored = [t for t in js["tokens"] if t["p"] is not None]
    toks = scored[:per_row * max_rows]
    kl = "kl_mean" in js
    rows = [toks[a:a + per_row] for a in range(0, len(toks), per_row)] or [[]]
    widest = max(len(r) for r in rows)
    w = min(40.0, max(8.0, 3.0 + 0.16 * widest))  # at least the width of the titles
    strip = [2.4] + ([1.7] if kl else [])
    fig, axes = plt.subplots(len(rows) * len(strip), 1, figsize=(w, min(40.0, 0.9 + sum(strip) * len(rows))),
                             dpi=100, squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": strip * len(rows)})
    ent = np.array([t["entropy"] for t in toks])
    cmap = plt.get_cmap("viridis")
    vmax = max(1.0, float(ent.max()) if len(ent) else 1.0)
    top = max([1.0] + [t["surprisal"] for t in toks]) * 1.05
    top_kl = max([1e-6] + [t["kl"] for t in toks]) * 1.05 if kl else 1.0
    shown = (f"; scored tokens {toks[0]['pos']}-{toks[-1]['pos']} of {js['n_tokens']} shown"
             if len(toks) < len(scored) else "")
    head = (f"{title}: {js['n_tokens']} tokens, perplexity {js['ppl']:.2f}, mean surprisal "
            f"{js['mean_surprisal']:.2f} bits" + shown)
    if kl:
        head += (f"\nagainst {js.get('base', 'the base model')}: mean KL {js['kl_mean']:.5f} nats, "
                 f"same top token {100 * js['top1']:.1f}%")
    if windows_note(js):
        head += f"\n{windows_note(js)}"
    fig.suptitle(head, fontsize=11)
    for r, row in enumerate(rows):
        x = np.arange(len(row))
        ax = axes[r * len(strip), 0]
        ax.bar(x, [t["surprisal"] for t in row], color=cmap(np.array([t["entropy"] for t in row]) / vmax),
               width=0.85)
        ax.set_ylim(0, top)
        ax.set_ylabel("surprisal, bits", fontsize=8)
        if row:
            ax.set_title(f"tokens {row[0]['pos']}-{row[-1]['pos']}", fontsize=8, loc="left")
        last = ax
        if kl:
            ax.set_xticks(x, [""] * len(x))
            last = axes[r * len(strip) + 1, 0]
            last.bar(x, [t["kl"] for t in row], color="#c8553b", width=0.85)
            last.set_ylim(0, top_kl)
            last.set_ylabel("KL, nats", fontsize=8)
        last.set_xticks(x, [_visible(t["token"], 12) for t in row], rotation=70, ha="right", fontsize=7)
        for a in (ax, last):
            a.set_xlim(-0.6, per_row - 0.4 if len(rows) > 1 else len(row) - 0.4)
            a.tick_params(axis="y", labelsize=7)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, vmax))
    cb = fig.colorbar(sm, ax=list(axes[:, 0]), fraction=0.03, pad=0.01, shrink=min(1.0, 6.0 / len(axes)))
    cb.set_label("entropy of the prediction (bar colour), bits")
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
