"""LLaMA / Qwen2 / Qwen3 / Gemma 3 forward pass over memory-mapped quantized weights.

Weights stay in the GGUF file's blocks (zero-copy uint8 views); every matmul goes
through ``quant.matmul_q8_at`` / ``quant.matmul3_q8_at``, which decode blocks on the
fly in the kernels of each matrix's format (their addresses are columns of
``Weights.mats``, so this compiled code is the same for every format mix and a
model compiles the kernels of its own formats only).
Only norms and biases (tiny, F32) and the embedding rows of the tokens being
evaluated are dequantized.

All layers run in one compiled call (``forward_layers``, which finds each weight
matrix in the memory-mapped file by offset), so Python pays one dispatch per
batch of tokens, not per layer or operation; prefill runs up to N_BATCH tokens per
call (batched matmuls, attention for a block of queries), decode one.

Sliding-window layers (Gemma 3's local ones) keep their keys and values in a ring
of window + N_BATCH cells, as llama.cpp's SWA cache keeps window + one ubatch:
enough for every query of a batch, so long contexts cost what llama.cpp's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numba import njit, types
from numba.extending import overload

from . import arch, ops, quant
from .arch import HParams

N_BATCH = 256  # tokens per prefill block: bounds scratch memory, keeps matmuls batched
_EMPTY1 = np.zeros(0, np.float32)
_EMPTY3 = np.zeros((0, 0, 0), np.float32)
_EMPTY4 = np.zeros((0, 0, 0, 0), np.float32)

# The model's numbers are one arch.HParams (read and validated by arch.from_gguf).
ModelArgs = HParams


@dataclass
class Linear:
    w: np.ndarray  # uint8 (rows, row_nbytes), zero-copy view into the file
    type_id: int


# -- the structures the compiled forward pass takes ------------------------------
# numba types named tuples field by field, so each is one argument that reads like
# its name at the call site and compiles (and caches) like its arrays.

class Weights(NamedTuple):
    """Every layer's weights.  Matrices stay in the mapped file: mats[l, slot] =
    (byte offset, rows, row bytes, ggml type, then its format's kernel addresses:
    quant.kernel_addresses, in columns KERNELS:); per-layer vectors are rows of
    2-D arrays (zero columns where the model has none)."""
    blob: np.ndarray       # uint8 [file bytes], read-only memory map
    mats: np.ndarray       # int64 [n_layers, 7, 7]
    attn_norm: np.ndarray  # float32 [n_layers, d]
    ffn_norm: np.ndarray   # float32 [n_layers, d]
    bq: np.ndarray         # float32 [n_layers, n_heads * hd] (QKV biases, Qwen2)
    bk: np.ndarray
    bv: np.ndarray
    q_norm: np.ndarray     # float32 [n_layers, hd] (per-head QK RMSNorm, Qwen3, Gemma 3)
    k_norm: np.ndarray
    post_attn_norm: np.ndarray  # float32 [n_layers, d] (RMSNorm of each block's output
    post_ffn_norm: np.ndarray   # before its residual add, Gemma 3)


class Config(NamedTuple):
    """The hyperparameters the kernels use."""
    n_heads: int
    n_kv_heads: int
    eps: float             # RMSNorm epsilon
    neox: bool             # RoPE pairs (i, i + n_rot/2) instead of (2i, 2i + 1)
    attn_scale: float      # softmax(q.k * attn_scale)
    # The next two are None where the model has no such part: numba then types the
    # forward pass without it (see _gate_act, _global_window), so that a SwiGLU model
    # without sliding windows neither compiles nor links GeGLU or windowed attention.
    gelu: bool | None      # True: FFN gate activation GELU (GeGLU, Gemma); None: SiLU (SwiGLU)
    n_swa: int | None      # sliding window: query p sees keys j > p - n_swa (None: no such layers)
    swa: np.ndarray        # bool [n_layers]: layer l is a sliding-window layer
    kv_row: np.ndarray     # int64 [n_layers]: layer l's row of KVCache.k (global) / .k_swa (sliding)
    inv_freq_swa: np.ndarray  # float64 [n_rot/2]: RoPE frequencies of sliding layers (empty: none)


class KVCache(NamedTuple):
    """One sequence's keys and values (float32, or IEEE half held as uint16 bits):
    global layers [n_global, n_ctx, n_kv_heads, head dim], position t in cell t;
    sliding-window layers [n_sliding, cells, n_kv_heads, head dim], a ring of
    window + N_BATCH cells (position t in cell t % cells; zero layers where none)."""
    k: np.ndarray
    v: np.ndarray
    k_swa: np.ndarray
    v_swa: np.ndarray


# Matrix slots of one layer in Weights.mats[layer, slot].
WQ, WK, WV, WO, WG, WU, WD = range(7)
KERNELS = 4  # first column of a matrix's kernel addresses in Weights.mats


@njit(cache=True, inline="always")
def _mat(blob, m, rows=-1):
    """Zero-copy (rows, row_bytes) view of one weight matrix inside the mapped file
    (its first `rows` rows when rows >= 0: C order either way, as the kernels take)."""
    r = m[1] if rows < 0 else rows
    return blob[m[0]:m[0] + r * m[2]].reshape((r, m[2]))


@njit(cache=True, inline="always")
def _linear(x, w, m, exact):
    """x @ W^T for the matrix at m (float32 [n, rows]).  exact: float32 activations
    (quant.matmul_at); else rounded to integers as llama.cpp does (quant.matmul_q8_at)."""
    out = np.empty((x.shape[0], m[1]), np.float32)
    if exact is not None:
        quant.matmul_at(m[3], m[KERNELS:], _mat(w.blob, m), x, out)
    else:
        quant.matmul_q8_at(m[3], m[KERNELS:], _mat(w.blob, m), x, out)
    return out


@njit(cache=True, inline="always")
def _linear3(w, m0, m1, m2, x, exact, use2=True):
    """Three projections of one x, its activations rounded once for all three
    (quant.matmul3_q8_at); with use2 False only the first two."""
    n = x.shape[0]
    out0 = np.empty((n, m0[1]), np.float32)
    out1 = np.empty((n, m1[1]), np.float32)
    out2 = np.empty((n, m2[1] if use2 else 0), np.float32)
    w0, w1 = _mat(w.blob, m0), _mat(w.blob, m1)
    w2 = _mat(w.blob, m2, m2[1] if use2 else 0)  # zero rows, C order, when unused
    if exact is not None:
        quant.matmul_at(m0[3], m0[KERNELS:], w0, x, out0)
        quant.matmul_at(m1[3], m1[KERNELS:], w1, x, out1)
        if use2:
            quant.matmul_at(m2[3], m2[KERNELS:], w2, x, out2)
    else:
        quant.matmul3_q8_at(m0[3], m0[KERNELS:], w0, m1[3], m1[KERNELS:], w1, m2[3], m2[KERNELS:], w2,
                            x, out0, out1, out2)
    return out0, out1, out2


def _global_window(n_swa):
    """A global layer's window: 0 in a model with sliding-window layers, None (the
    type of its Config.n_swa) in one without."""


@overload(_global_window)
def _global_window_impl(n_swa):
    if isinstance(n_swa, types.NoneType):
        return lambda n_swa: None
    return lambda n_swa: 0


def _gate_act(gate, up, gelu, exact):
    """gate = act(gate) * up: GeGLU where Config.gelu is True, SwiGLU where it is None."""


@overload(_gate_act)
def _gate_act_impl(gate, up, gelu, exact):
    # Picked while numba types the caller: only the model's own activation compiles.
    if isinstance(gelu, types.NoneType):
        def swiglu(gate, up, gelu, exact):
            ops.swiglu(gate, up, gate)
        return swiglu

    def geglu(gate, up, gelu, exact):
        ops.geglu(gate, up, gate, exact is not None)
    return geglu


@njit(cache=True, inline="always")
def _layer_kv(k, v, k_swa, v_swa, cfg, l):
    """Layer l's K and V cache ([cells, n_kv_heads, hd]) and its window (0 or None: global)."""
    r = cfg.kv_row[l]
    if cfg.swa[l]:
        return k_swa[r], v_swa[r], cfg.n_swa
    return k[r], v[r], _global_window(cfg.n_swa)


@njit(cache=True, inline="always")
def _qkv(x, w, l, cfg, rope_cs, exact):
    """q, k, v of rms_norm(x) for layer l: projections, biases, QK-norm, RoPE."""
    m = w.mats[l]
    h = np.empty_like(x)
    ops.rms_norm(x, w.attn_norm[l], cfg.eps, h)
    q, k, v = _linear3(w, m[WQ], m[WK], m[WV], h, exact)
    hd = k.shape[1] // cfg.n_kv_heads  # key head dim
    if w.bq.shape[1] > 0:
        ops.add_bias(q, w.bq[l])
        ops.add_bias(k, w.bk[l])
        ops.add_bias(v, w.bv[l])
    if w.q_norm.shape[1] > 0:
        ops.rms_norm_heads(q, cfg.n_heads, hd, w.q_norm[l], cfg.eps)
        ops.rms_norm_heads(k, cfg.n_kv_heads, hd, w.k_norm[l], cfg.eps)
    ops.rope_rotate(q, cfg.n_heads, hd, rope_cs, cfg.neox)
    ops.rope_rotate(k, cfg.n_kv_heads, hd, rope_cs, cfg.neox)
    return q, k, v


@njit(cache=True, inline="always")
def attention_block(x, n_past, w, l, cfg, kv, rope_cs, capture, exact):
    """softmax(q k^T * scale) v over the cache, q, k, v from rms_norm(x); appends this
    step's k, v at n_past.  Returns the output projection, float32 [n, d]."""
    n = x.shape[0]
    kc, vc, n_swa = _layer_kv(kv.k, kv.v, kv.k_swa, kv.v_swa, cfg, l)
    hd, hdv = kc.shape[2], vc.shape[2]
    q, k, v = _qkv(x, w, l, cfg, rope_cs, exact)
    ops.kv_write(k, v, kc, vc, n_past, cfg.n_kv_heads, hd, hdv)
    att = np.empty((n, cfg.n_heads * hdv), np.float32)
    # The block attention kernel on the hot path and for --precision exact (exact
    # False); inspection (exact True) keeps one query at a time in every layer.
    blocks = True
    if exact is not None:
        blocks = not exact
    ops.attention(q, kc, vc, n_past, cfg.n_heads, cfg.n_kv_heads,
                  np.float32(cfg.attn_scale), att, capture, blocks, n_swa)
    return _post_norm(_linear(att, w, w.mats[l][WO], exact), w.post_attn_norm, l, cfg)


@njit(cache=True, inline="always")
def _post_norm(y, norm, l, cfg):
    """Gemma's RMSNorm of a block's output before the residual add (in place;
    nothing where the model has no such norm)."""
    if norm.shape[1] > 0:
        ops.rms_norm(y, norm[l], cfg.eps, y)
    return y


@njit(cache=True, inline="always")
def attention_rows(x, pos, slots, w, l, cfg, kv, rope_cs):
    """attention_block for one decode step of several sequences: row i is the
    sequence whose cache is kv.k[slots[i]] (kv: [n_slots, n_layers, ctx, heads, hd]),
    at position pos[i].  Projections are batched (each weight block read once for
    every row); each row's cache write and attention are exactly its own one-row
    step's, so a row's result does not depend on which rows share the step."""
    n = x.shape[0]
    empty3 = np.zeros((0, 0, 0), np.float32)
    q, k, v = _qkv(x, w, l, cfg, rope_cs, None)
    att = np.empty((n, cfg.n_heads * kv.v.shape[4]), np.float32)
    for i in range(n):
        s = slots[i]
        kc, vc, n_swa = _layer_kv(kv.k[s], kv.v[s], kv.k_swa[s], kv.v_swa[s], cfg, l)
        ops.kv_write(k[i:i + 1], v[i:i + 1], kc, vc, pos[i], cfg.n_kv_heads, kc.shape[2], vc.shape[2])
        if cfg.swa[l]:  # a sliding window: the ring's own one-row path
            ops.attention(q[i:i + 1], kc, vc, pos[i], cfg.n_heads, cfg.n_kv_heads,
                          np.float32(cfg.attn_scale), att[i:i + 1], empty3, True, n_swa)
    if not cfg.swa[l]:  # every row in one launch (the same per-row math)
        ops.attention_rows(q, kv.k, kv.v, slots, cfg.kv_row[l], pos, cfg.n_heads, cfg.n_kv_heads,
                           np.float32(cfg.attn_scale), att)
    return _post_norm(_linear(att, w, w.mats[l][WO], None), w.post_attn_norm, l, cfg)


@njit(cache=True, inline="always")
def ffn_block(x, w, l, cfg, exact):
    """W_down (act(W_gate h) * W_up h), h = rms_norm(x); act silu (SwiGLU) or gelu
    (GeGLU, Gemma, then its post-FFN norm).  float32 [n, d]."""
    m = w.mats[l]
    h = np.empty_like(x)
    ops.rms_norm(x, w.ffn_norm[l], cfg.eps, h)
    gate, up, _ = _linear3(w, m[WG], m[WU], m[WU], h, exact, False)
    _gate_act(gate, up, cfg.gelu, exact)
    return _post_norm(_linear(gate, w, m[WD], exact), w.post_ffn_norm, l, cfg)


@njit(cache=True, inline="always")
def transformer_block(x, n_past, w, l, cfg, kv, rope_cs, capture, exact):
    """Pre-norm residual block l over x[n, d] (in place)."""
    ops.add(x, attention_block(x, n_past, w, l, cfg, kv, rope_cs, capture, exact))
    ops.add(x, ffn_block(x, w, l, cfg, exact))


@njit(cache=True)
def forward_layers(x, pos, n_past, w, cfg, kv, inv_freq, capture, cap_index, exact):
    """Every transformer block over x[n, d] at positions pos, in one compiled call
    (no Python per layer).

    capture[cap_index[l]] receives layer l's attention weights when cap_index[l] >= 0;
    then every layer runs with float32 activations (exact True), so that the maps are
    the reference math's to float32.  exact is None on the hot path: numba then
    compiles none of the float-activation branches (each `exact is not None` is
    decided at compile time), so generation neither pays for nor compiles the
    inspection path, and inspection is its own compiled entry.  exact False is
    Model precision "exact": the same float32 activations (the same compiled
    entry: True and False are one numba type), with the block attention kernel."""
    empty3 = np.zeros((0, 0, 0), np.float32)
    rope_cs = ops.rope_table(pos, inv_freq)  # the same angles in every (global) layer
    rope_cs_swa = ops.rope_table(pos, cfg.inv_freq_swa)  # sliding layers' own base (Gemma)
    for l in range(w.mats.shape[0]):
        ci = cap_index[l]
        cs = rope_cs_swa if cfg.swa[l] else rope_cs
        transformer_block(x, n_past, w, l, cfg, kv, cs, capture[ci] if ci >= 0 else empty3, exact)


@njit(cache=True)
def forward_rows(x, pos, slots, w, cfg, kv, inv_freq):
    """One decode step of x.shape[0] sequences (row i: sequence slots[i], its token
    at position pos[i]) through every block, in one compiled call."""
    rope_cs = ops.rope_table(pos, inv_freq)
    rope_cs_swa = ops.rope_table(pos, cfg.inv_freq_swa)
    for l in range(w.mats.shape[0]):
        cs = rope_cs_swa if cfg.swa[l] else rope_cs
        ops.add(x, attention_rows(x, pos, slots, w, l, cfg, kv, cs))
        ops.add(x, ffn_block(x, w, l, cfg, None))


# Called with the type ids whose kernels a model is about to compile (not cached
# yet; the CLI sets it to say so on stderr).
COMPILE_NOTICE = None

_WEIGHTS = object()  # the weights' place in _compile_for's arguments


def _compile_for(entry, args, w):
    """Compile the jitted entry for these arguments (w in the place of _WEIGHTS)
    without running it: numba picks the same specialisation for the call."""
    import numba

    entry.compile(tuple(numba.typeof(w if a is _WEIGHTS else a) for a in args))


class Model:
    """A GGUF model ready to evaluate: weights mapped, config parsed, kernels shared."""

    def __init__(self, gguf, args: HParams, n_ctx: int, kv_type: str, precision: str = "fast"):
        self.gguf = gguf
        self.args = args
        self.n_ctx = n_ctx
        self.kv_type = kv_type
        self.precision = precision
        self.n_vocab = args.n_vocab
        self._tokenizer = None
        self._session = None
        self._session_full = None
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
            if not np.isfinite(v).all():
                raise ValueError(f"{gguf.path}: tensor {name!r} holds NaN or infinite values")
            return v

        d, hq, hkv = a.d_model, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        hv = a.n_kv_heads * a.head_dim_v
        bias = a.qkv_bias
        names = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        mats = np.zeros((a.n_layers, 7, KERNELS + 3), np.int64)
        rows: dict[str, list] = {k: [] for k in ("attn_norm", "ffn_norm", "bq", "bk", "bv", "q_norm", "k_norm",
                                                 "post_attn_norm", "post_ffn_norm")}
        post = a.family.post_norms
        for i in range(a.n_layers):
            p = f"blk.{i}."
            ffn = a.ffn(i)
            shapes = ((hq, d), (hkv, d), (hv, d), (d, a.n_heads * a.head_dim_v), (ffn, d), (ffn, d), (d, ffn))
            for j, (nm, (r, c)) in enumerate(zip(names, shapes)):
                lin = linear(p + nm + ".weight", r, c)
                mats[i, j, :KERNELS] = (t[p + nm + ".weight"].offset, lin.w.shape[0], lin.w.shape[1], lin.type_id)
            rows["attn_norm"].append(vec(p + "attn_norm.weight", d))
            rows["ffn_norm"].append(vec(p + "ffn_norm.weight", d))
            for b, size in (("bq", hq), ("bk", hkv), ("bv", hv)):
                rows[b].append(vec(p + f"attn_{b[1]}.bias", size, bias) if bias else _EMPTY1)
            for qk in ("q_norm", "k_norm"):
                rows[qk].append(vec(p + f"attn_{qk}.weight", a.head_dim) if a.qk_norm else _EMPTY1)
            rows["post_attn_norm"].append(vec(p + "post_attention_norm.weight", d) if post else _EMPTY1)
            rows["post_ffn_norm"].append(vec(p + "post_ffw_norm.weight", d) if post else _EMPTY1)

        def stack(vs):
            return np.ascontiguousarray(np.stack(vs), np.float32)

        self._weights = Weights(blob=gguf.blob(), mats=mats, **{k: stack(v) for k, v in rows.items()})
        self._linked = False
        self._linked_exact = False  # the float chunked kernels' addresses too
        # Sliding-window layers (arch.HParams.swa_layers) rotate with their own base
        # (Gemma 3: 10000 and no RoPE scaling, llama.cpp's rope_freq_*_train_swa) and
        # keep their cache in KVCache.k_swa; the others in KVCache.k, in layer order.
        swa = np.array(a.swa_layers if a.swa_layers else [False] * a.n_layers, np.bool_)
        kv_row = np.zeros(a.n_layers, np.int64)
        kv_row[swa] = np.arange(int(swa.sum()))
        kv_row[~swa] = np.arange(int((~swa).sum()))
        inv_freq_swa = np.zeros(0, np.float64)
        if swa.any():
            inv_freq_swa = (ops.rope_inv_freq(a.n_rot, a.rope_base_local) if a.rope_base_local
                            else ops.rope_inv_freq(a.n_rot, a.rope_base, a.rope_freq_scale))
        self.config = Config(n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, eps=float(a.rms_eps),
                             neox=a.rope_style == "neox", attn_scale=float(a.attn_scale),
                             gelu=True if a.family.ffn_act == "gelu_tanh" else None,
                             n_swa=int(a.n_swa) if swa.any() else None,
                             swa=swa, kv_row=kv_row, inv_freq_swa=inv_freq_swa)
        # Gemma scales token embeddings by sqrt(d_model), in float32 as llama.cpp's ggml_scale
        self.embed_scale = np.float32(np.sqrt(np.float32(d))) if a.family.embed_scale else None
        self.embed = linear("token_embd.weight", a.n_vocab, d)
        self.output_norm = vec("output_norm.weight", d)
        self.output = self.embed if a.tied else linear("output.weight", a.n_vocab, d)
        self.inv_freq = ops.rope_inv_freq(a.n_rot, a.rope_base, a.rope_freq_scale)
        if "rope_freqs.weight" in t:
            # llama3-style RoPE scaling: a factor per rotated pair divides its frequency
            # (llama.cpp's freq_factors: theta_i = pos * base^(-2i/n_rot) / f_i).
            f = vec("rope_freqs.weight", a.n_rot // 2).astype(np.float64)
            if (f <= 0).any():
                raise ValueError(f"{gguf.path}: rope_freqs.weight holds a factor <= 0")
            self.inv_freq = self.inv_freq / f

    @classmethod
    def load(cls, path_or_name, n_ctx: int | None = None, kv_type: str = "f16",
             n_threads: int | None = None, precision: str = "fast") -> "Model":
        from .gguf import GGUFFile
        from .registry import resolve_model
        from .threads import set_threads

        if kv_type not in ("f16", "f32"):
            raise ValueError(f"kv_type must be 'f16' or 'f32', got {kv_type!r}")
        _check_precision(precision)
        path = Path(path_or_name)
        if not path.exists():
            path = resolve_model(str(path_or_name))
        g = GGUFFile(path)
        args = arch.from_gguf(g, for_engine=True)
        if n_ctx is None or n_ctx <= 0:
            n_ctx = min(args.n_ctx_train, 4096)
        n_ctx = int(n_ctx)
        from .memory import check_host_memory
        check_host_memory(g, n_ctx, kv_type)
        if n_threads:  # else keep the current setting (all cores unless -t / set_threads said otherwise)
            set_threads(n_threads)
        return cls(g, args, n_ctx, kv_type, precision)

    @property
    def precision(self) -> str:
        """Activations entering the matmuls: "fast" rounds them to integers as
        llama.cpp does (int8 at decode, int16 in prefill), "exact" keeps float32
        in every matmul, output projection included (slower; separates the
        weights' quantization error from the activations').  Sessions made
        without a precision of their own follow this one."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = _check_precision(value)

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
    @property
    def weights(self) -> Weights:
        """The layers' weights for the compiled forward pass, each matrix's kernel
        addresses filled in: the first use compiles (or loads from numba's cache)
        the kernels of the formats this model holds, and those only."""
        return self.linked_weights()

    @property
    def linked(self) -> bool:
        """Whether the matrices' kernel addresses are filled in (weights was used)."""
        return self._linked

    def linked_weights(self, compile_entry=None, exact: bool = True) -> Weights:
        """weights; on first use, with compile_entry(unlinked weights) compiling the
        forward entry about to run while another process compiles the formats'
        kernels (when numba's cache has neither: a fresh install).  exact False:
        the integer-activation path's kernels only (the float chunked kernels,
        which only float32 activations take, are linked on the first exact use)."""
        if self._linked and exact and not self._linked_exact:
            mats = self._weights.mats
            for t in np.unique(mats[:, :, 3]):
                mats[mats[:, :, 3] == t, KERNELS:] = quant.kernel_addresses(int(t))
            self._linked_exact = True
        if not self._linked:
            mats = self._weights.mats
            types_ = [int(t) for t in np.unique(mats[:, :, 3])]
            if self.output.type_id not in types_:
                types_.append(self.output.type_id)
            todo = quant.uncompiled(types_)
            deq = [self.embed.type_id] if compile_entry and not quant.dequantize_cached(self.embed.type_id) else []
            if todo and COMPILE_NOTICE is not None:
                COMPILE_NOTICE(todo)
            helper = quant.compile_in_background(todo, deq) if compile_entry else None
            if compile_entry is not None:
                compile_entry(self._weights)  # its addresses are data: not needed to compile it
            if helper is not None:
                quant.compile_kernels(todo, deq, reverse=True)  # what the helper has not reached yet
                helper.wait()
            for t in types_:  # the output's too (Python calls it): compiled by the helper, loaded here
                mats[mats[:, :, 3] == t, KERNELS:] = quant.kernel_addresses(t, chunked=exact)
            self._linked, self._linked_exact = True, exact
        return self._weights

    def session(self, n_ctx: int | None = None, swa_full: bool = False, precision: str | None = None) -> "Session":
        return Session(self, n_ctx or self.n_ctx, swa_full=swa_full, precision=precision)

    def session_pool(self, n_slots: int, n_ctx: int | None = None, precision: str | None = None) -> "SessionPool":
        """n_slots sequences of n_ctx positions each in one KV allocation, decoded
        together by SessionPool.decode (the server's continuous batching)."""
        return SessionPool(self, n_slots, n_ctx or self.n_ctx, precision=precision)

    def _scratch_session(self, n: int, swa_full: bool = False) -> "Session":
        """The model's own session for logits() (sliding-window rings as generation
        has them) and attention() (swa_full: one batch of n tokens needs them all)."""
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens do not fit in the context of {self.n_ctx} tokens")
        full = swa_full and self.args.n_swa_layers > 0
        s = self._session_full if full else self._session
        if s is None:
            s = Session(self, self.n_ctx, swa_full=full)
            if full:
                self._session_full = s
            else:
                self._session = s
        s.reset()
        return s

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
        self._scratch_session(n, swa_full=True).eval(ids, capture=(out, layers))
        return out

    def trace(self, ids, layers=None, parts=("resid",)) -> dict:
        """Activations of a fresh causal sequence with float32 activations, as attention():
        {"resid": [len(layers), n, d] (stream point 0 = embeddings, l + 1 = after layer l),
        "attn_out", "mlp_out": what each layer adds, "logits": [n, n_vocab]}; see
        runtime/inspection.py (its own compiled entry; the hot path is untouched)."""
        from .inspection import trace
        return trace(self, ids, layers, parts)

    def patch(self, source_ids, target_ids, layer: int, positions) -> np.ndarray:
        """Activation patching: the target run's logits with the residual stream at
        point ``layer`` (trace's indexing) and ``positions`` taken from the source run."""
        from .inspection import patch
        return patch(self, source_ids, target_ids, layer, positions)

    def check_ids(self, ids: np.ndarray) -> None:
        bad = (ids < 0) | (ids >= self.n_vocab)
        if bad.any():
            raise ValueError(f"token id {int(ids[bad][0])} out of range (vocabulary has {self.n_vocab} tokens)")

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        self.check_ids(ids)
        rows = self.embed.w[ids]
        x = quant.dequantize(rows, self.embed.type_id, (len(ids), self.args.d_model))
        if self.embed_scale is not None:
            x *= self.embed_scale
        return x

    def project_out(self, h: np.ndarray, exact: bool = False) -> np.ndarray:
        """Final RMSNorm then the output matrix: logits float32 [n, n_vocab];
        exact: float32 activations (quant.matmul) instead of llama.cpp's rounding."""
        hn = np.empty_like(h)
        ops.rms_norm(h, self.output_norm, self.config.eps, hn)
        out = np.empty((h.shape[0], self.n_vocab), np.float32)
        if exact:
            quant.matmul(self.output.type_id, self.output.w, hn, out)
        else:
            quant.matmul_q8(self.output.type_id, self.output.w, hn, out)
        return out


PRECISIONS = ("fast", "exact")


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'fast' or 'exact', got {precision!r}")
    return precision


def swa_cells(args: HParams, n_ctx: int, swa_full: bool = False) -> int:
    """Cells of a sliding-window layer's ring: the window plus one batch (llama.cpp's
    n_swa + n_ubatch), so that no query of a batch of up to N_BATCH tokens loses a
    key it sees to a write of that batch (it needs cells >= window + batch - 1);
    never more than n_ctx.  swa_full: n_ctx, every position kept (llama.cpp's
    swa_full), which a rewind to any point needs."""
    if not args.n_swa_layers:
        return 0
    return n_ctx if swa_full else min(n_ctx, args.n_swa + N_BATCH)


def _kv_alloc(model: Model, lead: tuple, n_ctx: int, swa_full: bool = False) -> KVCache:
    """Zeroed KV arrays [*lead, layers, cells, n_kv_heads, head dim] in the model's
    KV type (f16 held as its uint16 bits): global layers n_ctx cells, sliding-window
    layers swa_cells()."""
    a = model.args
    dt = np.uint16 if model.kv_type == "f16" else np.float32
    n_sl = a.n_swa_layers
    n_gl = a.n_layers - n_sl
    ring = swa_cells(a, n_ctx, swa_full)
    return KVCache(k=np.zeros(lead + (n_gl, n_ctx, a.n_kv_heads, a.head_dim), dt),
                   v=np.zeros(lead + (n_gl, n_ctx, a.n_kv_heads, a.head_dim_v), dt),
                   k_swa=np.zeros(lead + (n_sl, ring, a.n_kv_heads, a.head_dim), dt),
                   v_swa=np.zeros(lead + (n_sl, ring, a.n_kv_heads, a.head_dim_v), dt))


class Session:
    """A sequence being evaluated: its own KV cache, preallocated to n_ctx (sliding-
    window layers: a ring of swa_cells(); swa_full keeps every position there too)."""

    def __init__(self, model: Model, n_ctx: int, kv: KVCache | None = None, swa_full: bool = False,
                 precision: str | None = None):
        self.model = model
        self.n_ctx = n_ctx
        self._precision = None if precision is None else _check_precision(precision)
        self.kv = kv if kv is not None else _kv_alloc(model, (), n_ctx, swa_full)
        self.n_past = 0
        self._tokens: list[int] = []
        self._last_h = None  # final hidden state of the last evaluated position
        self._written = 0    # 1 + the highest position ever written since reset
        self.reprocessed = 0  # tokens the last rewind had to evaluate again (see rewind)

    @property
    def precision(self) -> str:
        """"fast" or "exact" (Model.precision); the model's unless given to this session."""
        return self._precision or self.model.precision

    def reset(self) -> None:
        self.n_past = 0
        self._tokens = []
        self._last_h = None
        self._written = 0

    def can_resume_at(self, n_past: int) -> bool:
        """Can evaluation continue at position n_past (after a rewind) from this
        cache, without replaying the tokens before it?  True unless a sliding-window
        ring has overwritten keys that queries from n_past on still see (positions
        n_past - n_swa + 1 .. n_past - 1).
        A ring of C cells holds positions >= written - C intact (a later write to a
        cell is a position C further on)."""
        ring = self.kv.k_swa.shape[1]
        if ring == 0 or ring >= self.n_ctx:
            return True
        need = max(0, n_past - self.model.args.n_swa + 1)
        return need >= self._written - ring

    def rewind(self, n: int) -> None:
        """Drop the last n positions (their cache entries are overwritten later).

        Where a sliding-window ring has already overwritten keys that the window of
        position n_past - n still sees, the kept tokens are evaluated again from
        the start, as llama.cpp's server re-processes the whole prompt when its SWA
        cache lacks the data ("forcing full prompt re-processing"): a local layer's
        keys at a position depend on every earlier position through the layers
        below, so no shorter replay is exact.  ``reprocessed`` says how many tokens
        that took (0: none)."""
        if n < 0 or n > self.n_past:
            raise ValueError(f"cannot rewind {n} positions: the session holds {self.n_past}")
        self.reprocessed = 0
        if n:
            self.n_past -= n
            del self._tokens[self.n_past:]
            self._last_h = None
            if not self.can_resume_at(self.n_past):
                kept = self._tokens
                self.reset()
                self.eval(kept)
                self.reprocessed = len(kept)

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
        outs = []
        cap_index = np.full(a.n_layers, -1, np.int64)
        cap_all = _EMPTY4
        if capture:  # (out [k, n_heads, n, n], k layer indices): all n tokens in one batch
            cap_all, cap_layers = capture
            if cap_all.shape != (len(cap_layers), a.n_heads, n, n) or cap_all.dtype != np.float32:
                raise ValueError("capture array must be float32 [len(layers), n_heads, n, n]")
            cap_index[list(cap_layers)] = np.arange(len(cap_layers))
        step = n if capture else N_BATCH
        # None: the hot path (integer activations); True: inspection; False: precision "exact".
        exact = True if capture else (False if self.precision == "exact" else None)
        ring = self.kv.k_swa.shape[1]
        if capture and 0 < ring < self.n_past + n and ring < n + a.n_swa - 1:
            raise ValueError(f"capturing {n} tokens in one batch needs a full sliding-window cache "
                             f"(Session(..., swa_full=True)), this one has {ring} cells")
        if not m.linked:  # the first forward pass: compiled here while the kernels compile elsewhere
            m.check_ids(ids)  # (embed_tokens checks them too: a bad id fails before a long compile)
            args = (np.zeros((1, a.d_model), np.float32), np.zeros(1, np.int64), self.n_past, _WEIGHTS, m.config,
                    self.kv, m.inv_freq, cap_all, cap_index, exact)
            m.linked_weights(lambda w: _compile_for(forward_layers, args, w), exact is not None)
        x_all = m.embed_tokens(ids)
        for s in range(0, n, step):
            x = np.ascontiguousarray(x_all[s:s + step])
            pos = np.arange(self.n_past, self.n_past + x.shape[0], dtype=np.int64)
            forward_layers(x, pos, self.n_past, m.linked_weights(exact=exact is not None), m.config, self.kv, m.inv_freq, cap_all, cap_index,
                           exact)
            self.n_past += x.shape[0]
            self._written = max(self._written, self.n_past)
            self._last_h = x[-1:].copy()
            if all_logits:
                outs.append(m.project_out(x, exact is not None))
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
        return self.model.project_out(self._last_h, self.precision == "exact")[0]


class SessionPool:
    """Several sequences sharing one KV allocation ([n_slots, n_layers, n_ctx, ...]),
    so that one compiled call can step all of them: llama.cpp's parallel slots.

    Each of ``sessions`` is an ordinary Session over its slice of the pool (prefill
    with eval, rewind, reset, logits as usual).  ``decode`` evaluates one token for
    each of several of them at once: every weight block is decoded once for all
    rows (quant.matmul_q8's multi-row path), and each row's activations are
    rounded, attended and projected exactly as that session's own one-token eval
    would, so a row's logits do not depend on which rows share the step."""

    def __init__(self, model: Model, n_slots: int, n_ctx: int, precision: str | None = None):
        n_slots, n_ctx = int(n_slots), int(n_ctx)
        if n_slots < 1 or n_ctx < 1:
            raise ValueError(f"a session pool needs n_slots >= 1 and n_ctx >= 1 (got {n_slots}, {n_ctx})")
        from .memory import check_host_memory
        check_host_memory(model.gguf, n_slots * n_ctx, model.kv_type)
        self.model = model
        self.n_ctx = n_ctx
        self.kv = _kv_alloc(model, (n_slots,), n_ctx)
        self._precision = None if precision is None else _check_precision(precision)
        self.sessions = [Session(model, n_ctx, KVCache(k=self.kv.k[i], v=self.kv.v[i],
                                                       k_swa=self.kv.k_swa[i], v_swa=self.kv.v_swa[i]),
                                 precision=precision)
                         for i in range(n_slots)]
        self._slot = {id(s): i for i, s in enumerate(self.sessions)}

    @property
    def precision(self) -> str:
        """"fast" or "exact" (Model.precision); the model's unless given to the pool."""
        return self._precision or self.model.precision

    def decode(self, sessions, tokens) -> np.ndarray:
        """Append tokens[i] to sessions[i] (distinct sessions of this pool), all in
        one step; returns each one's next-token logits, float32 [len(sessions), n_vocab]."""
        m = self.model
        sessions = list(sessions)
        ids = np.asarray(list(tokens), dtype=np.int64).reshape(-1)
        if len(sessions) != ids.shape[0]:
            raise ValueError(f"{len(sessions)} sessions but {ids.shape[0]} tokens")
        slots = []
        for s in sessions:
            i = self._slot.get(id(s))
            if i is None or self.sessions[i] is not s:
                raise ValueError("decode takes sessions of this pool only")
            if s.n_past + 1 > s.n_ctx:
                raise ValueError(f"context overflow: slot {i} holds {s.n_past} of n_ctx={s.n_ctx} tokens")
            slots.append(i)
        if len(set(slots)) != len(slots):
            raise ValueError("a session appears twice in one decode step")
        out = np.empty((len(sessions), m.n_vocab), np.float32)
        if self.precision == "exact":
            # No batched exact step: quant.matmul's multi-row kernel sums in another
            # order than its one-row kernel, so rows batched together would not get
            # their own one-token step's logits (batch invariance).  Each row is its
            # own one-token eval instead (every weight block decoded once per row).
            for j, s in enumerate(sessions):
                s.eval([int(ids[j])])
                out[j] = s.logits()
            return out
        step = quant.Q8_MAX_ROWS  # rows per call that keep matmul_q8 on its per-row path
        for a in range(0, len(sessions), step):
            b = min(a + step, len(sessions))
            x = np.ascontiguousarray(m.embed_tokens(ids[a:b]))
            pos = np.array([sessions[j].n_past for j in range(a, b)], np.int64)
            forward_rows(x, pos, np.array(slots[a:b], np.int64), m.linked_weights(exact=False), m.config,
                         self.kv, m.inv_freq)
            out[a:b] = m.project_out(x)
            for j in range(a, b):
                s = sessions[j]
                s.n_past += 1
                s._written = max(s._written, s.n_past)
                s._tokens.append(int(ids[j]))
                s._last_h = x[j - a:j - a + 1].copy()
        return out
