"""Looking inside the forward pass: residual streams, block outputs, the logit lens,
activation patching, per-token surprise.

Every number here comes from the engine's own transformer blocks
(``model.attention_block`` / ``model.ffn_block``), run with float32 activations
(exact=True: ``quant.matmul``, not the 8-bit rounding generation does, as
``Model.attention`` runs them), over one batch holding the whole prompt.  The
compiled entry ``forward_inspect`` (runtime/inspection_kernels.py, kept apart so
that edits here leave numba's cache alone) is inspection's own: the hot path
(``model.forward_layers`` with exact None) neither compiles nor pays for it.

Residual stream indexing: ``resid[0]`` is the embedding (what block 0 reads),
``resid[l + 1]`` what block l writes (x + attn_out[l] + mlp_out[l]); the last one
is what the final norm and the unembedding turn into the logits.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .inspection_kernels import forward_inspect, unembed_rows

__all__ = ["PARTS", "InspectionError", "trace", "patch", "unembed"]

PARTS = ("resid", "attn_out", "mlp_out", "logits")


class InspectionError(ValueError):
    """Bad arguments to an inspection call (a layer out of range, an unknown part...)."""


# Rows unembedded per call: bounds the float32 logits held at once
# (64 x 262144 x 4 B = 64 MiB on Gemma's vocabulary).
UNEMBED_ROWS = 64


def unembed(model, h: np.ndarray) -> np.ndarray:
    """The final RMSNorm and the output matrix with float32 activations:
    residual rows float32 [n, d] -> logits float32 [n, n_vocab]."""
    h = np.ascontiguousarray(h, dtype=np.float32)
    if h.ndim != 2 or h.shape[1] != model.args.d_model:
        raise InspectionError(f"unembed needs rows of {model.args.d_model} values, got shape {h.shape}")
    out = np.empty((h.shape[0], model.n_vocab), np.float32)
    for a in range(0, h.shape[0], UNEMBED_ROWS):
        unembed_rows(h[a:a + UNEMBED_ROWS], model.output_norm, model.config.eps, model.output.type_id,
                 model.output.w, out[a:a + UNEMBED_ROWS])
    return out


# --------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------

def _ids(model, ids, what="ids", fit=True) -> np.ndarray:
    ids = np.asarray(list(ids), dtype=np.int64).reshape(-1)
    if ids.shape[0] == 0:
        raise InspectionError(f"{what}: no tokens")
    if fit and ids.shape[0] > model.n_ctx:
        raise InspectionError(f"{what}: {ids.shape[0]} tokens do not fit in the context of {model.n_ctx} tokens")
    return ids


def _run(model, ids, keep, keep_sub, resid, attn_out, mlp_out, patch_at=-1, patch_rows=None,
         patch_values=None) -> np.ndarray:
    """forward_inspect over a fresh cache of exactly len(ids) cells (sliding-window
    layers keep every position: the whole prompt is one batch); the final stream."""
    x = np.ascontiguousarray(model.embed_tokens(ids))
    n, d = x.shape
    kv = model.session(n_ctx=n, swa_full=True).kv
    pos = np.arange(n, dtype=np.int64)
    if patch_rows is None:
        patch_rows = np.zeros(0, np.int64)
        patch_values = np.zeros((0, d), np.float32)
    forward_inspect(x, pos, model.weights, model.config, kv, model.inv_freq, keep, keep_sub, resid,
                    attn_out, mlp_out, int(patch_at), patch_rows,
                    np.ascontiguousarray(patch_values, dtype=np.float32))
    return x


def _stream_points(model, layers, what="layers") -> list[int]:
    """Indices into the residual stream 0 .. n_layers (no negatives, no repeats)."""
    top = model.args.n_layers
    if layers is None:
        return list(range(top + 1))
    if isinstance(layers, (int, np.integer)):
        layers = [layers]
    out = []
    for v in layers:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise InspectionError(f"{what}: {v!r} is not a layer index")
        if not 0 <= int(v) <= top:
            raise InspectionError(f"{what}: {int(v)} is out of range (the residual stream has points "
                                  f"0..{top}: 0 = embeddings, l + 1 = after layer l)")
        out.append(int(v))
    if len(set(out)) != len(out):
        raise InspectionError(f"{what}: {out} repeats a layer")
    if not out:
        raise InspectionError(f"{what}: no layers")
    return out


def _empty3() -> np.ndarray:
    return np.zeros((0, 0, 0), np.float32)


def trace(model, ids, layers=None, parts=("resid",)) -> dict:
    """The activations of one causal sequence, float32, from a fresh cache.

    "resid": [len(layers), n, d_model], rows of the residual stream (index 0 the
    embedding output, after any embedding scale; index l + 1 the stream after
    layer l; layers None: all n_layers + 1 of them, in order).
    "attn_out" / "mlp_out": [.., n, d_model], what layer l's attention and FFN add
    to the stream (after Gemma's post-norms), for the layers l whose output l + 1
    is among ``layers`` (all n_layers when None), in that order.
    "logits": [n, n_vocab] of the final stream (final norm, output matrix).
    Float32 activations in every matmul, as Model.attention() computes."""
    if isinstance(parts, str):
        parts = (parts,)
    parts = tuple(parts)
    for p in parts:
        if p not in PARTS:
            raise InspectionError(f"unknown part {p!r} (parts are {', '.join(PARTS)})")
    if len(set(parts)) != len(parts):
        raise InspectionError(f"parts {parts} repeat one")
    if not parts:
        raise InspectionError("parts: nothing asked for")
    ids = _ids(model, ids)
    n, d, top = ids.shape[0], model.args.d_model, model.args.n_layers
    points = _stream_points(model, layers)
    keep = np.full(top + 1, -1, np.int64)
    keep[points] = np.arange(len(points))
    blocks = [r - 1 for r in points if r > 0]
    keep_sub = np.full(top, -1, np.int64)
    keep_sub[blocks] = np.arange(len(blocks))
    resid = np.zeros((len(points), n, d), np.float32) if "resid" in parts else _empty3()
    attn_out = np.zeros((len(blocks), n, d), np.float32) if "attn_out" in parts else _empty3()
    mlp_out = np.zeros((len(blocks), n, d), np.float32) if "mlp_out" in parts else _empty3()
    final = _run(model, ids, keep, keep_sub, resid, attn_out, mlp_out)
    out = {}
    for p in parts:
        out[p] = {"resid": resid, "attn_out": attn_out, "mlp_out": mlp_out}[p] if p != "logits" \
            else unembed(model, final)
    return out


def patch(model, source_ids, target_ids, layer: int, positions: Sequence[int]) -> np.ndarray:
    """Activation patching: run target_ids with the residual stream at point ``layer``
    (as trace indexes it: 0 the embeddings, l + 1 after layer l) and ``positions``
    taken from the run of source_ids (same length); the patched run's logits,
    float32 [n, n_vocab].  Every position at any point gives the source run's
    logits; no position, the target's."""
    src = _ids(model, source_ids, "source_ids")
    tgt = _ids(model, target_ids, "target_ids")
    if src.shape != tgt.shape:
        raise InspectionError(f"patching needs sequences of the same length "
                              f"(source {src.shape[0]} tokens, target {tgt.shape[0]})")
    (point,) = _stream_points(model, [layer], "layer")
    n, d, top = src.shape[0], model.args.d_model, model.args.n_layers
    if isinstance(positions, (int, np.integer)):
        positions = [positions]
    rows = []
    for p in positions:
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, np.integer)):
            raise InspectionError(f"positions: {p!r} is not a position")
        if not 0 <= int(p) < n:
            raise InspectionError(f"positions: {int(p)} is out of range (the sequences have {n} tokens)")
        rows.append(int(p))
    if len(set(rows)) != len(rows):
        raise InspectionError(f"positions: {rows} repeats a position")
    rows = np.array(rows, np.int64)
    no_sub = np.full(top, -1, np.int64)
    keep = np.full(top + 1, -1, np.int64)
    keep[point] = 0
    resid = np.zeros((1, n, d), np.float32)
    if rows.size:
        _run(model, src, keep, no_sub, resid, _empty3(), _empty3())
    final = _run(model, tgt, np.full(top + 1, -1, np.int64), no_sub, _empty3(), _empty3(), _empty3(),
                 point if rows.size else -1, rows, resid[0][rows])
    return unembed(model, final)


# --------------------------------------------------------------------------
# the logit lens
# --------------------------------------------------------------------------

def _softmax64(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _piece(tokenizer, tid: int) -> str:
    try:
        b = tokenizer.token_to_piece(int(tid), special=True)
    except TypeError:
        b = tokenizer.token_to_piece(int(tid))
    return b.decode("utf-8", errors="replace")


def logit_lens(model, ids, layers=None, top: int = 5) -> dict:
    """The final norm and output matrix applied to each residual point (trace's
    indexing: 0 the embeddings, l + 1 after layer l; all when layers is None):

        {"layers": [{"layer": L, "positions": [{"token": TEXT, "top": [{"id": ID,
          "token": TEXT, "p": P}, ... top]}, ... n]}, ...]}

    Position i's distribution is the prediction of token i + 1.  The entry of
    point n_layers (the last layer's output) is the model's own output."""
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise InspectionError(f"top must be a positive number of tokens, got {top!r}")
    top = min(int(top), model.n_vocab)
    ids = _ids(model, ids)
    points = _stream_points(model, layers)
    resid = trace(model, ids, points, ("resid",))["resid"]
    tok = model.tokenizer
    pieces: dict[int, str] = {}

    def piece(t):
        if t not in pieces:
            pieces[t] = _piece(tok, t)
        return pieces[t]

    out = []
    for r, rows in zip(points, resid):
        prob = _softmax64(unembed(model, rows))
        best = np.argsort(-prob, axis=-1, kind="stable")[:, :top]
        positions = []
        for i, t in enumerate(ids):
            positions.append({"token": piece(int(t)),
                              "top": [{"id": int(j), "token": piece(int(j)), "p": float(prob[i, j])}
                                      for j in best[i]]})
        out.append({"layer": int(r), "positions": positions})
    return {"layers": out}


def render_lens_terminal(lens: dict, n_layers: int, *, columns: int = 100, color: bool = False) -> str:
    """Layers down, positions across: each cell the top token and its probability;
    then the top tokens of every layer at the last position.  Fits ``columns``."""
    from .attention import _visible

    rows = lens["layers"]
    n = len(rows[0]["positions"])
    label_w, cell = 6, 12
    fit = max(1, (columns - label_w) // cell)
    first = max(0, n - fit)
    out = [f"logit lens: top token and its probability after each layer (row 0 = embeddings, "
           f"{n_layers} = output)"[:columns]]
    if first:
        out.append(f"(showing the last {n - first} of {n} positions; --json or --out for all)")
    out.append(" " * label_w + "".join(f"{'@' + str(i):<{cell}}" for i in range(first, n)))
    out.append(" " * label_w + "".join(f"{_visible(rows[0]['positions'][i]['token'], cell - 2):<{cell}}"
                                       for i in range(first, n)))
    for e in rows:
        cells = []
        for i in range(first, n):
            best = e["positions"][i]["top"][0]
            pct = f"{100 * best['p']:.0f}"
            text = _visible(best["token"], cell - 2 - len(pct))
            body = f"{text} {pct}"
            if color:
                shade = 232 + min(23, int(best["p"] * 23.999))
                fg = 16 if best["p"] > 0.55 else 255
                body = f"\x1b[48;5;{shade}m\x1b[38;5;{fg}m{body:<{cell - 1}}\x1b[0m "
            else:
                body = f"{body:<{cell}}"
            cells.append(body)
        out.append(f"{e['layer']:>4}  " + "".join(cells))
    last = n - 1
    out.append("")
    out.append(f"top tokens at the last position ({last}, {_visible(rows[0]['positions'][last]['token'], 20)}):")
    for e in rows:
        parts = []
        width = label_w
        for t in e["positions"][last]["top"]:
            item = f"{_visible(t['token'], 14)} {t['p']:.3f}"
            if width + len(item) + 2 > columns:
                break
            parts.append(item)
            width += len(item) + 2
        out.append(f"{e['layer']:>4}  " + "  ".join(parts))
    return "\n".join(line if "\x1b" in line else line[:columns] for line in out)


# --------------------------------------------------------------------------
# surprise: the per-token view of perplexity
# --------------------------------------------------------------------------

# Tokens evaluated per call: bounds the logits held at once, as perplexity's chunks do.
SURPRISE_BATCH = 256


def surprise_windows(n_tokens: int, n_ctx: int) -> list[tuple[int, int, int]]:
    """The windows a text of n_tokens is scored in with a context of n_ctx:
    (start, end, first), each run from an empty cache over tokens start .. end - 1,
    keeping the predictions of tokens first .. end - 1, so that every token from 1
    on is scored exactly once, in order.

    A text that fits is one window (0, n_tokens, 1).  A longer one is HF's strided
    perplexity: windows of n_ctx tokens starting every stride = n_ctx // 2 tokens
    (the last one ends at the text's end, so it may be shorter); the first scores
    tokens 1 .. n_ctx - 1, each later one the tokens past the previous window's end,
    so every one of those is predicted from at least n_ctx - stride >= n_ctx / 2
    positions.  (perplexity's non-overlapping chunks score only their second half;
    here every token needs a row, so the windows overlap by half instead.)"""
    n_tokens, n_ctx = int(n_tokens), int(n_ctx)
    if n_tokens < 2:
        raise InspectionError("surprise needs at least two tokens (the first one is not predicted)")
    if n_tokens <= n_ctx:
        return [(0, n_tokens, 1)]
    if n_ctx < 4:
        raise InspectionError(f"scoring {n_tokens} tokens in windows needs a context of at least 4 (got {n_ctx})")
    stride = n_ctx // 2
    out = [(0, n_ctx, 1)]
    while out[-1][1] < n_tokens:
        start = out[-1][0] + stride
        out.append((start, min(start + n_ctx, n_tokens), out[-1][1]))
    return out


def _window_logits(session, ids: np.ndarray, skip: int):
    """The engine's own logits (as generation and perplexity compute them) of one
    window from an empty cache, a block at a time, from position ``skip`` on: yields
    (window position, float32 [rows, n_vocab]).  The positions before skip (whose
    predictions belong to the previous window) go through the same blocks rather
    than a cache-filling call of their own: splitting the batches moves the engine's
    logits by up to ~1e-2 in p (keys rounded into the f16 cache vs kept in the
    batch), and a window's numbers should be exactly those of that window run alone."""
    session.reset()
    for a in range(0, len(ids), SURPRISE_BATCH):
        block = session.eval(ids[a:a + SURPRISE_BATCH], all_logits=True)
        if a + block.shape[0] > skip:
            lo = max(0, skip - a)
            yield a + lo, block[lo:]


def token_surprise(model, ids, base=None, *, n_ctx: int | None = None) -> dict:
    """Every token i >= 1 of ids under the model's prediction at position i - 1:
    p, rank (1 = the model's top choice), surprisal -log2 p and the entropy of the
    predicted distribution (bits); with a base model (the same vocabulary), each
    position's KL(base || model) in nats and whether the top choices agree, by
    perplexity's own kl_and_top1.  Arrays of length len(ids) - 1 (position i - 1
    predicting token i), float64 / int64 / bool.

    A text longer than n_ctx (default the model's context) is scored in the
    overlapping windows of ``surprise_windows``, the base in the same windows; a
    window after the first starts with BOS in place of its first token when the
    model adds BOS, as perplexity's chunks do (the models' attention expects it).
    "n_ctx", "stride" and "windows" (int64 [k, 3]: start, end, first scored token)
    say how."""
    from .perplexity import kl_and_top1, token_nll

    ids = _ids(model, ids, fit=False)
    if base is not None and base.n_vocab != model.n_vocab:
        raise InspectionError(f"--kl-base has a different vocabulary ({base.n_vocab} vs {model.n_vocab} tokens)")
    limit = model.n_ctx if base is None else min(model.n_ctx, base.n_ctx)
    n_ctx = limit if n_ctx is None else int(n_ctx)
    if not 2 <= n_ctx <= limit:
        raise InspectionError(f"n_ctx {n_ctx} is out of range (2 .. {limit}, the models' context)")
    windows = surprise_windows(ids.shape[0], n_ctx)
    tok = model.tokenizer
    bos = tok.bos_id if tok.add_bos and tok.bos_id is not None else None
    m = ids.shape[0] - 1
    res = {"p": np.empty(m), "rank": np.empty(m, np.int64), "surprisal": np.empty(m),
           "entropy": np.empty(m)}
    if base is not None:
        res.update(kl=np.empty(m), same_top=np.empty(m, bool), base_p=np.empty(m))
    span = min(n_ctx, ids.shape[0])
    sess = model.session(n_ctx=span)
    bsess = base.session(n_ctx=span) if base is not None else None
    for start, end, first in windows:
        w = ids[start:end].copy()
        if start > 0 and bos is not None:
            w[0] = bos
        # positions start .. end - 2 predict tokens start + 1 .. end - 1; the last token is
        # only a target, but it is evaluated too (its row dropped) so that a window's
        # batches are the ones a whole-text run of the same tokens uses
        skip = first - 1 - start
        n_rows = end - 1 - start
        blocks = _window_logits(sess, w, skip)
        bblocks = _window_logits(bsess, w, skip) if base is not None else None
        for a, block in blocks:
            block = block[:n_rows - a]
            if block.shape[0] == 0:
                break
            targets = ids[start + a + 1:start + a + 1 + block.shape[0]]
            sl = slice(start + a, start + a + block.shape[0])
            nll = token_nll(block, targets)
            res["p"][sl] = np.exp(-nll)
            res["surprisal"][sl] = nll / np.log(2.0)
            picked = block[np.arange(len(block)), targets]
            res["rank"][sl] = 1 + (block > picked[:, None]).sum(axis=1)
            prob = _softmax64(block)
            with np.errstate(divide="ignore", invalid="ignore"):
                res["entropy"][sl] = -(np.where(prob > 0, prob * np.log2(np.where(prob > 0, prob, 1.0)),
                                                0.0)).sum(1)
            if base is not None:
                _, bblock = next(bblocks)
                bblock = bblock[:block.shape[0]]
                kl, same = kl_and_top1(bblock, block)
                res["kl"][sl], res["same_top"][sl] = kl, same
                res["base_p"][sl] = np.exp(-token_nll(bblock, targets))
    res.update(n_ctx=n_ctx, stride=n_ctx // 2, windows=np.array(windows, np.int64).reshape(-1, 3))
    return res


def surprise_json(model, ids, res: dict, extra: dict | None = None) -> dict:
    """{**extra, "tokens": [{"pos", "id", "token", "p", "rank", "surprisal", "entropy"[, "kl",
    "same_top", "base_p"]}], "n_tokens", "ppl", "mean_surprisal"[, "kl_mean", "top1"],
    "n_ctx", "stride", "windows": [[start, end, first scored token], ...]};
    the first token has no prediction (its numbers are null)."""
    tok = model.tokenizer
    keys = [k for k in ("p", "rank", "surprisal", "entropy", "kl", "same_top", "base_p") if k in res]
    rows = []
    for i, t in enumerate(ids):
        row = {"pos": i, "id": int(t), "token": _piece(tok, int(t))}
        for k in keys:
            v = None if i == 0 else res[k][i - 1]
            row[k] = None if v is None else (int(v) if k == "rank" else bool(v) if k == "same_top" else float(v))
        rows.append(row)
    nats = res["surprisal"] * np.log(2.0)
    out = {**(extra or {}), "n_tokens": len(ids), "ppl": float(np.exp(nats.mean())),
           "mean_surprisal": float(res["surprisal"].mean()), "tokens": rows}
    if "kl" in res:
        out["kl_mean"] = float(res["kl"].mean())
        out["top1"] = float(res["same_top"].mean())
    if "windows" in res:
        out.update(n_ctx=int(res["n_ctx"]), stride=int(res["stride"]),
                   windows=[[int(v) for v in w] for w in res["windows"]])
    return out


def _windows_note(js: dict) -> str:
    """", scored in k windows of n_ctx tokens (stride s)" when the text did not fit."""
    from .inspection_views import windows_note

    note = windows_note(js)
    return f", {note}" if note else ""


# surprisal (bits) at which the colour scale saturates; KL (nats) likewise
SURPRISAL_FULL = 16.0
KL_FULL = 1.0


def _heat(v: float, full: float) -> int:
    """xterm-256 background for v on [0, full]: the attention views' viridis."""
    from .attention import _xterm256, colormap

    return int(_xterm256(colormap(np.array([min(1.0, max(0.0, v / full))])))[0])


def render_surprise_terminal(js: dict, *, color: bool = False, columns: int = 100, worst: int = 10) -> str:
    """The text with each token coloured by its surprisal (or, with a base model, by
    KL), then the positions that stand out; without colour, a row per token."""
    from .attention import _visible

    toks = js["tokens"]
    kl = "kl_mean" in js
    key, full = ("kl", KL_FULL) if kl else ("surprisal", SURPRISAL_FULL)
    out = [f"{js['n_tokens']} tokens{_windows_note(js)}: perplexity {js['ppl']:.3f}, "
           f"mean surprisal {js['mean_surprisal']:.2f} bits"
           + (f", mean KL(base || model) {js['kl_mean']:.5f}, same top token {100 * js['top1']:.1f}%" if kl else "")]
    head = f"{'pos':>5} {'token':<16} {'p':>8} {'rank':>6} {'bits':>6} {'H bits':>6}" + (
        f" {'KL':>8} {'base p':>8}" if kl else "")

    def row(t):
        line = f"{t['pos']:>5} {_visible(t['token'], 16):<16} "
        if t["p"] is None:
            return line + f"{'-':>8} {'-':>6} {'-':>6} {'-':>6}" + (f" {'-':>8} {'-':>8}" if kl else "")
        line += f"{t['p']:8.4f} {t['rank']:>6} {t['surprisal']:6.2f} {t['entropy']:6.2f}"
        if kl:
            line += f" {t['kl']:8.5f} {t['base_p']:8.4f}"
        return line

    if color:
        lines, cur, width = [], [], 0
        for t in toks:
            text = _visible(t["token"])
            if width + len(text) > columns and cur:
                lines.append("".join(cur) + "\x1b[0m")
                cur, width = [], 0
            bg = 236 if t["p"] is None else _heat(t[key], full)
            fg = 16 if t["p"] is not None and t[key] / full > 0.6 else 255
            cur.append(f"\x1b[48;5;{bg}m\x1b[38;5;{fg}m{text}")
            width += len(text)
        if cur:
            lines.append("".join(cur) + "\x1b[0m")
        out += [""] + lines + [""]
        ramp = "".join(f"\x1b[48;5;{_heat(v, 1.0)}m  " for v in np.linspace(0, 1, 10)) + "\x1b[0m"
        unit = "KL(base || model), nats" if kl else "surprisal, bits"
        out.append(f"colour ~ {unit}: 0 {ramp} {full:g}+")
        scored = [t for t in toks if t["p"] is not None]
        worst_rows = sorted(scored, key=lambda t: -t[key])[:worst]
        out += ["", ("where the two models disagree most:" if kl else "the most surprising tokens:"), head]
        out += [row(t) for t in worst_rows]
    else:
        out += [head] + [row(t) for t in toks]
    return "\n".join(out)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------

def _parse_points(specs, n_layers: int) -> list[int] | None:
    """--layers 0,10,-1 (or space separated): residual points, negatives from the end."""
    from .cli import CLIError

    if not specs:
        return None
    out = []
    for spec in specs:
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                v = int(part)
            except ValueError:
                raise CLIError(f"--layers: {part!r} is not a layer number") from None
            r = v + n_layers + 1 if v < 0 else v
            if not 0 <= r <= n_layers:
                raise CLIError(f"--layers {v} is out of range (0..{n_layers}: 0 = embeddings, "
                               f"{n_layers} = the last layer's output; negatives count from the end)")
            out.append(r)
    if len(set(out)) != len(out):
        raise CLIError(f"--layers repeats a layer ({out})")
    return out or None


def _out_path(args, kinds=(".html", ".htm", ".png")):
    from pathlib import Path

    from .cli import CLIError

    if not getattr(args, "out", None):
        return None
    out = Path(args.out)
    if out.suffix.lower() not in kinds:
        raise CLIError(f"--out must end in .html or .png (got {args.out})")
    if out.suffix.lower() == ".png":
        from .inspection_views import require_matplotlib

        require_matplotlib()  # before the model runs: a missing extra is a one-line error
    return out


def _prompt_ids(model, text: str, what: str, fit: bool = True) -> np.ndarray:
    from .cli import CLIError

    ids = list(model.tokenize(text))
    if not ids:
        raise CLIError(f"the {what} tokenizes to nothing")
    if fit and len(ids) > model.n_ctx:
        raise CLIError(f"the {what} has {len(ids)} tokens, more than the context ({model.n_ctx}); "
                       f"raise it with -c or shorten the text")
    return np.array(ids, np.int64)


def cli_lens(args) -> int:
    import json
    import sys
    from pathlib import Path

    from .attention import _use_color
    from .cli import CLIError
    from .model import Model

    out = _out_path(args)
    if args.top < 1:
        raise CLIError(f"--top must be at least 1 (got {args.top})")
    model = Model.load(args.model, n_ctx=args.ctx_size)
    points = _parse_points(args.layers, model.args.n_layers)
    ids = _prompt_ids(model, args.prompt, "prompt")
    lens = logit_lens(model, ids, points, args.top)
    name = Path(str(args.model)).name
    if out is not None:
        from . import inspection_views as views

        if out.suffix.lower() == ".png":
            views.lens_png(out, lens, model.args.n_layers, title=f"logit lens: {name}")
        else:
            out.write_text(views.lens_html(lens, model.args.n_layers, title=f"logit lens: {name}",
                                           prompt=args.prompt), encoding="utf-8")
        print(f"wrote {out} ({len(lens['layers'])} layers x {len(ids)} positions, top {args.top})")
        return 0
    if args.json:
        print(json.dumps(lens, ensure_ascii=False))
        return 0
    print(render_lens_terminal(lens, model.args.n_layers, color=_use_color(sys.stdout)))
    return 0


def cli_surprise(args) -> int:
    import json
    import sys
    from pathlib import Path

    from .attention import _use_color
    from .cli import CLIError
    from .model import Model

    if (args.file is None) == (args.prompt is None):
        raise CLIError("give a FILE or -p TEXT (one of them)")
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise CLIError(f"no such file: {args.file}")
        text = path.read_text(encoding="utf-8", errors="replace")
    else:
        text = args.prompt
    out = _out_path(args)
    model = Model.load(args.model, n_ctx=args.ctx_size)
    base = Model.load(args.kl_base, n_ctx=model.n_ctx) if args.kl_base else None
    # a text longer than the context is scored in overlapping windows (surprise_windows)
    ids = _prompt_ids(model, text, "file" if args.file is not None else "prompt", fit=False)
    if base is not None and list(base.tokenize(text)) != ids.tolist():
        raise CLIError("--kl-base tokenizes the text differently: the models must share a vocabulary")
    res = token_surprise(model, ids, base)
    js = surprise_json(model, ids, res, {"model": str(args.model),
                                         **({"base": str(args.kl_base)} if base is not None else {})})
    name = Path(str(args.model)).name
    if out is not None:
        from . import inspection_views as views

        if out.suffix.lower() == ".png":
            views.surprise_png(out, js, title=f"surprise: {name}")
        else:
            out.write_text(views.surprise_html(js, title=f"surprise: {name}"), encoding="utf-8")
        print(f"wrote {out} ({len(ids)} tokens{_windows_note(js)})")
        return 0
    if args.json:
        print(json.dumps(js, ensure_ascii=False))
        return 0
    print(render_surprise_terminal(js, color=_use_color(sys.stdout), worst=args.worst))
    return 0
