"""LLaMA / Qwen2 / Qwen3 forward pass over memory-mapped quantized weights.

Weights stay in the GGUF file's blocks (zero-copy uint8 views); every matmul goes
through ``quant.matmul_q8`` / ``quant.matmul3_q8``, which decode blocks on the fly.
Only norms and biases (tiny, F32) and the embedding rows of the tokens being
evaluated are dequantized.

All layers run in one compiled call (``forward_layers``, which finds each weight
matrix in the memory-mapped file by offset), so Python pays one dispatch per
batch of tokens, not per layer or operation; prefill runs up to N_BATCH tokens per
call (batched matmuls, attention for a block of queries), decode one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from . import ops, quant

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
N_BATCH = 256  # tokens per prefill block: bounds scratch memory, keeps matmuls batched
_EMPTY1 = np.zeros(0, np.float32)
_EMPTY3 = np.zeros((0, 0, 0), np.float32)
_EMPTY4 = np.zeros((0, 0, 0, 0), np.float32)


@dataclass
class ModelArgs:
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # key/query head size
    head_dim_v: int
    ffn_dim: int
    n_vocab: int
    n_ctx_train: int
    rope_base: float
    rope_style: str  # "normal" (llama) | "neox" (qwen2/3)
    rms_eps: float
    n_rot: int
    rope_freq_scale: float = 1.0
    tied_output: bool = False
    qk_norm: bool = False

    @classmethod
    def from_gguf(cls, g) -> "ModelArgs":
        arch = g.arch
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

        def need(key):
            v = g.arch_get(key)
            if v is None:
                raise ValueError(f"{g.path}: missing metadata key {arch}.{key}")
            return v

        d = int(need("embedding_length"))
        n_heads = int(need("attention.head_count"))
        n_kv = int(g.arch_get("attention.head_count_kv", n_heads))
        hd = int(g.arch_get("attention.key_length", d // n_heads))
        hdv = int(g.arch_get("attention.value_length", hd))
        if n_kv <= 0 or n_heads % n_kv:
            raise ValueError(f"{g.path}: {n_heads} heads not divisible into {n_kv} KV heads")
        scale = 1.0
        if str(g.arch_get("rope.scaling.type", "none")) == "linear":
            f = float(g.arch_get("rope.scaling.factor", 1.0) or 1.0)
            scale = 1.0 / f
        if "token_embd.weight" not in g.tensors:
            raise ValueError(f"{g.path}: missing tensor 'token_embd.weight'")
        return cls(
            arch=arch, n_layers=int(need("block_count")), d_model=d, n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=hd, head_dim_v=hdv, ffn_dim=int(need("feed_forward_length")),
            n_vocab=int(g.tensors["token_embd.weight"].shape[0]),
            n_ctx_train=int(g.arch_get("context_length", 2048)),
            rope_base=float(g.arch_get("rope.freq_base", 10000.0)),
            rope_style="normal" if arch == "llama" else "neox",
            rms_eps=float(g.arch_get("attention.layer_norm_rms_epsilon", 1e-5)),
            n_rot=int(g.arch_get("rope.dimension_count", hd)), rope_freq_scale=scale,
            tied_output="output.weight" not in g.tensors, qk_norm=arch == "qwen3")


@dataclass
class Linear:
    w: np.ndarray  # uint8 (rows, row_nbytes), zero-copy view into the file
    type_id: int


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    bq: np.ndarray  # biases / QK-norm weights: empty when the model has none
    bk: np.ndarray
    bv: np.ndarray
    q_norm: np.ndarray
    k_norm: np.ndarray
    ffn_norm: np.ndarray
    w_gate: Linear
    w_up: Linear
    w_down: Linear


@njit(cache=True)
def _linear(x, w, type_id, rows, exact):
    out = np.empty((x.shape[0], rows), np.float32)
    if exact:
        quant.matmul(type_id, w, x, out)
    else:
        quant.matmul_q8(type_id, w, x, out)
    return out


@njit(cache=True)
def _linear3(t0, w0, t1, w1, t2, w2, x, out0, out1, out2, exact):
    """Three projections of one x (w2 may have zero rows).  exact: float32
    activations (quant.matmul); else rounded to integers once for all three, as
    llama.cpp does (quant.matmul3_q8)."""
    if exact:
        quant.matmul(t0, w0, x, out0)
        quant.matmul(t1, w1, x, out1)
        if w2.shape[0] > 0:
            quant.matmul(t2, w2, x, out2)
    else:
        quant.matmul3_q8(t0, w0, t1, w1, t2, w2, x, out0, out1, out2)


@njit(cache=True)
def transformer_block(x, pos, n_past, attn_norm, wq, tq, wk, tk, wv, tv, wo, to, bq, bk, bv,
                      q_norm, k_norm, ffn_norm, wg, tg, wu, tu, wd, td, k_cache, v_cache,
                      n_heads, n_kv_heads, rope_cs, neox, eps, capture, exact):
    """x[n, d] += attention(rms_norm(x)); x += ffn(rms_norm(x)), appending K/V to the cache.
    exact: float32 activations into every matmul (attention inspection)."""
    n, d = x.shape
    hdk = k_cache.shape[2]
    hdv = v_cache.shape[2]
    h = np.empty_like(x)
    ops.rms_norm(x, attn_norm, eps, h)
    q = np.empty((n, n_heads * hdk), np.float32)
    k = np.empty((n, n_kv_heads * hdk), np.float32)
    v = np.empty((n, n_kv_heads * hdv), np.float32)
    _linear3(tq, wq, tk, wk, tv, wv, h, q, k, v, exact)
    if bq.shape[0] > 0:
        ops.add_bias(q, bq)
        ops.add_bias(k, bk)
        ops.add_bias(v, bv)
    if q_norm.shape[0] > 0:
        ops.rms_norm_heads(q, n_heads, hdk, q_norm, eps)
        ops.rms_norm_heads(k, n_kv_heads, hdk, k_norm, eps)
    ops.rope_rotate(q, n_heads, hdk, rope_cs, neox)
    ops.rope_rotate(k, n_kv_heads, hdk, rope_cs, neox)
    ops.kv_write(k, v, k_cache, v_cache, n_past, n_kv_heads, hdk, hdv)
    att = np.empty((n, n_heads * hdv), np.float32)
    ops.attention(q, k_cache, v_cache, n_past, n_heads, n_kv_heads,
                  np.float32(1.0 / np.sqrt(hdk)), att, capture, not exact)
    ops.add(x, _linear(att, wo, to, d, exact))
    ops.rms_norm(x, ffn_norm, eps, h)
    gate = np.empty((n, wg.shape[0]), np.float32)
    up = np.empty((n, wu.shape[0]), np.float32)
    _linear3(tg, wg, tu, wu, tu, wu[:0], h, gate, up, up[:0], exact)
    ops.swiglu(gate, up, gate)
    ops.add(x, _linear(gate, wd, td, d, exact))


# Matrix slots of one layer in Model.mats[layer, slot] = (byte offset, rows, row bytes, type).
WQ, WK, WV, WO, WG, WU, WD = range(7)


@njit(cache=True, inline="always")
def _mat(blob, m):
    """Zero-copy (rows, row_bytes) view of one weight matrix inside the mapped file."""
    return blob[m[0]:m[0] + m[1] * m[2]].reshape((m[1], m[2]))


@njit(cache=True)
def forward_layers(x, pos, n_past, blob, mats, attn_norm, ffn_norm, bq, bk, bv, q_norm, k_norm,
                   k_cache, v_cache, n_heads, n_kv_heads, inv_freq, neox, eps, capture, cap_index):
    """Every transformer block over x[n, d] in one compiled call (no Python per layer).

    blob: the whole GGUF file (read-only uint8 memory map); mats[l, slot]: where
    each weight matrix lies in it.  Per-layer vectors are rows of 2-D arrays (zero
    columns when the model has none).  capture[cap_index[l]] receives layer l's
    attention weights when cap_index[l] >= 0; then every layer runs with float32
    activations (exact), so that the maps are the reference math's to float32.
    """
    empty3 = np.zeros((0, 0, 0), np.float32)
    exact = capture.shape[0] > 0
    rope_cs = ops.rope_table(pos, inv_freq)  # the same angles in every layer
    for l in range(mats.shape[0]):
        m = mats[l]
        ci = cap_index[l]
        cap = capture[ci] if ci >= 0 else empty3
        transformer_block(
            x, pos, n_past, attn_norm[l],
            _mat(blob, m[WQ]), m[WQ, 3], _mat(blob, m[WK]), m[WK, 3], _mat(blob, m[WV]), m[WV, 3],
            _mat(blob, m[WO]), m[WO, 3], bq[l], bk[l], bv[l], q_norm[l], k_norm[l], ffn_norm[l],
            _mat(blob, m[WG]), m[WG, 3], _mat(blob, m[WU]), m[WU, 3], _mat(blob, m[WD]), m[WD, 3],
            k_cache[l], v_cache[l], n_heads, n_kv_heads, rope_cs, neox, eps, cap, exact)


class Model:
    """A GGUF model ready to evaluate: weights mapped, config parsed, kernels shared."""

    def __init__(self, gguf, args: ModelArgs, n_ctx: int, kv_type: str):
        self.gguf = gguf
        self.args = args
        self.n_ctx = n_ctx
        self.kv_type = kv_type
        self.n_vocab = args.n_vocab
        self._tokenizer = None
        self._session = None
        a = args
        t = gguf.tensors

        def linear(name, rows, cols):
            if name not in t:
                raise ValueError(f"{gguf.path}: missing tensor {name!r}")
            info = t[name]
            if not quant.is_supported(info.type_id):
                raise ValueError(f"{gguf.path}: tensor {name!r} has type {info.type_name}, "
                                 f"which this runtime cannot compute with")
            if tuple(info.shape) != (rows, cols):
                raise ValueError(f"{gguf.path}: tensor {name!r} has shape {tuple(info.shape)}, "
                                 f"expected {(rows, cols)}")
            return Linear(gguf.raw(name), int(info.type_id))

        def vec(name, size, required=True):
            if name not in t:
                if required:
                    raise ValueError(f"{gguf.path}: missing tensor {name!r}")
                return _EMPTY1
            v = np.ascontiguousarray(gguf.dequantize(name).reshape(-1), dtype=np.float32)
            if v.shape[0] != size:
                raise ValueError(f"{gguf.path}: tensor {name!r} has {v.shape[0]} values, expected {size}")
            return v

        d, hq, hkv = a.d_model, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        hv = a.n_kv_heads * a.head_dim_v
        self.layers = []
        for i in range(a.n_layers):
            p = f"blk.{i}."
            has_bias = (p + "attn_q.bias") in t
            self.layers.append(Layer(
                attn_norm=vec(p + "attn_norm.weight", d),
                wq=linear(p + "attn_q.weight", hq, d), wk=linear(p + "attn_k.weight", hkv, d),
                wv=linear(p + "attn_v.weight", hv, d), wo=linear(p + "attn_output.weight", d, a.n_heads * a.head_dim_v),
                bq=vec(p + "attn_q.bias", hq, a.arch == "qwen2" or has_bias),
                bk=vec(p + "attn_k.bias", hkv, a.arch == "qwen2" or has_bias),
                bv=vec(p + "attn_v.bias", hv, a.arch == "qwen2" or has_bias),
                q_norm=vec(p + "attn_q_norm.weight", a.head_dim, a.qk_norm) if a.qk_norm else _EMPTY1,
                k_norm=vec(p + "attn_k_norm.weight", a.head_dim, a.qk_norm) if a.qk_norm else _EMPTY1,
                ffn_norm=vec(p + "ffn_norm.weight", d),
                w_gate=linear(p + "ffn_gate.weight", a.ffn_dim, d), w_up=linear(p + "ffn_up.weight", a.ffn_dim, d),
                w_down=linear(p + "ffn_down.weight", d, a.ffn_dim)))
        self._pack(t)
        self.embed = linear("token_embd.weight", a.n_vocab, d)
        self.output_norm = vec("output_norm.weight", d)
        self.output = self.embed if a.tied_output else linear("output.weight", a.n_vocab, d)
        self.inv_freq = ops.rope_inv_freq(a.n_rot, a.rope_base, a.rope_freq_scale)
        self.neox = a.rope_style == "neox"

    def _pack(self, t) -> None:
        """The layers as forward_layers takes them: matrix locations in the file, and
        the small per-layer vectors stacked (one compiled call then runs all layers)."""
        g = self.gguf
        self.blob = g.blob()
        names = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        self.mats = np.zeros((len(self.layers), 7, 4), np.int64)
        for i, L in enumerate(self.layers):
            for j, (nm, lin) in enumerate(zip(names, (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down))):
                info = t[f"blk.{i}.{nm}.weight"]
                self.mats[i, j] = (info.offset, lin.w.shape[0], lin.w.shape[1], lin.type_id)

        def stack(field):
            return np.ascontiguousarray(np.stack([getattr(L, field) for L in self.layers]), np.float32)

        for f in ("attn_norm", "ffn_norm", "bq", "bk", "bv", "q_norm", "k_norm"):
            setattr(self, "_" + f, stack(f))

    @classmethod
    def load(cls, path_or_name, n_ctx: int | None = None, kv_type: str = "f16",
             n_threads: int | None = None) -> "Model":
        from .gguf import GGUFFile
        from .registry import resolve_model
        from .threads import set_threads

        if kv_type not in ("f16", "f32"):
            raise ValueError(f"kv_type must be 'f16' or 'f32', got {kv_type!r}")
        path = Path(path_or_name)
        if not path.exists():
            path = resolve_model(str(path_or_name))
        g = GGUFFile(path)
        args = ModelArgs.from_gguf(g)
        if n_ctx is None or n_ctx <= 0:
            n_ctx = min(args.n_ctx_train, 4096)
        n_ctx = int(n_ctx)
        from .memory import check_host_memory
        check_host_memory(g, n_ctx, kv_type)
        if n_threads:  # else keep the current setting (all cores unless -t / set_threads said otherwise)
            set_threads(n_threads)
        return cls(g, args, n_ctx, kv_type)

    # -- tokenizer -----------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_gguf(self.gguf)
        return self._tokenizer

    def tokenize(self, *a, **kw):
        return self.tokenizer.tokenize(*a, **kw)

    def detokenize(self, *a, **kw):
        return self.tokenizer.detokenize(*a, **kw)

    # -- evaluation ----------------------------------------------------------
    def session(self, n_ctx: int | None = None) -> "Session":
        return Session(self, n_ctx or self.n_ctx)

    def _scratch_session(self, n: int) -> "Session":
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens do not fit in the context of {self.n_ctx} tokens")
        if self._session is None:
            self._session = Session(self, self.n_ctx)
        self._session.reset()
        return self._session

    def logits(self, ids) -> np.ndarray:
        """Logits of every position of a fresh causal sequence: float32 [len(ids), n_vocab]."""
        ids = list(ids)
        return self._scratch_session(len(ids)).eval(ids, all_logits=True)

    def attention(self, ids, layers=None) -> np.ndarray:
        """Softmax weights the engine computes: float32 [len(layers), n_heads, q, k] (k = q = len(ids)).

        This pass keeps float32 activations in every matmul (generation rounds
        them to integers as llama.cpp does), so the maps are the model's own to
        float32 rounding (1e-4 against the NumPy reference, tests/test_attention.py)."""
        ids = list(ids)
        a = self.args
        if layers is None:
            layers = list(range(a.n_layers))
        layers = [int(l) for l in layers]
        for l in layers:
            if not 0 <= l < a.n_layers:
                raise ValueError(f"layer {l} out of range (model has {a.n_layers} layers)")
        if len(set(layers)) != len(layers):
            raise ValueError(f"duplicate layer in {layers}")
        n = len(ids)
        out = np.zeros((len(layers), a.n_heads, n, n), np.float32)
        self._scratch_session(n).eval(ids, capture=(out, layers))
        return out

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        bad = (ids < 0) | (ids >= self.n_vocab)
        if bad.any():
            raise ValueError(f"token id {int(ids[bad][0])} out of range (vocabulary has {self.n_vocab} tokens)")
        rows = self.embed.w[ids]
        return quant.dequantize(rows, self.embed.type_id, (len(ids), self.args.d_model))

    def project_out(self, h: np.ndarray) -> np.ndarray:
        """Final RMSNorm then the output matrix: logits float32 [n, n_vocab]."""
        hn = np.empty_like(h)
        ops.rms_norm(h, self.output_norm, self.args.rms_eps, hn)
        out = np.empty((h.shape[0], self.n_vocab), np.float32)
        quant.matmul_q8(self.output.type_id, self.output.w, hn, out)
        return out


class Session:
    """A sequence being evaluated: its own KV cache, preallocated to n_ctx."""

    def __init__(self, model: Model, n_ctx: int):
        a = model.args
        self.model = model
        self.n_ctx = n_ctx
        dt = np.uint16 if model.kv_type == "f16" else np.float32  # f16 held as its bits
        self.k_cache = np.zeros((a.n_layers, n_ctx, a.n_kv_heads, a.head_dim), dt)
        self.v_cache = np.zeros((a.n_layers, n_ctx, a.n_kv_heads, a.head_dim_v), dt)
        self.n_past = 0
        self._tokens: list[int] = []
        self._last_h = None  # final hidden state of the last evaluated position

    def reset(self) -> None:
        self.n_past = 0
        self._tokens = []
        self._last_h = None

    def rewind(self, n: int) -> None:
        """Drop the last n positions (their cache entries are overwritten later)."""
        if n < 0 or n > self.n_past:
            raise ValueError(f"cannot rewind {n} positions: the session holds {self.n_past}")
        if n:
            self.n_past -= n
            del self._tokens[self.n_past:]
            self._last_h = None

    def eval(self, ids, *, all_logits: bool = False, capture=None):
        """Append tokens to the cache; with all_logits, return float32 [len(ids), n_vocab]."""
        m = self.model
        a = m.args
        ids = np.asarray(list(ids), dtype=np.int64).reshape(-1)
        n = ids.shape[0]
        if self.n_past + n > self.n_ctx:
            raise ValueError(f"context overflow: {self.n_past} + {n} tokens exceed n_ctx={self.n_ctx}")
        if n == 0:
            return np.zeros((0, m.n_vocab), np.float32) if all_logits else None
        x_all = m.embed_tokens(ids)
        outs = []
        cap_index = np.full(a.n_layers, -1, np.int64)
        cap_all = _EMPTY4
        if capture:  # (out [k, n_heads, n, n], k layer indices): all n tokens in one batch
            cap_all, cap_layers = capture
            if cap_all.shape != (len(cap_layers), a.n_heads, n, n) or cap_all.dtype != np.float32:
                raise ValueError("capture array must be float32 [len(layers), n_heads, n, n]")
            cap_index[list(cap_layers)] = np.arange(len(cap_layers))
        step = n if capture else N_BATCH
        for s in range(0, n, step):
            x = np.ascontiguousarray(x_all[s:s + step])
            pos = np.arange(self.n_past, self.n_past + x.shape[0], dtype=np.int64)
            forward_layers(x, pos, self.n_past, m.blob, m.mats, m._attn_norm, m._ffn_norm, m._bq, m._bk,
                           m._bv, m._q_norm, m._k_norm, self.k_cache, self.v_cache, a.n_heads,
                           a.n_kv_heads, m.inv_freq, m.neox, a.rms_eps, cap_all, cap_index)
            self.n_past += x.shape[0]
            self._last_h = x[-1:].copy()
            if all_logits:
                outs.append(m.project_out(x))
        self._tokens.extend(int(i) for i in ids)
        return np.concatenate(outs) if all_logits else None

    def logits(self) -> np.ndarray:
        """Logits of the last evaluated position, float32 [n_vocab]."""
        if self.n_past == 0:
            raise ValueError("no tokens evaluated yet")
        if self._last_h is None:  # after a rewind: recompute the last position
            last = self._tokens[-1]
            self.rewind(1)
            self.eval([last])
        return self.model.project_out(self._last_h)[0]
