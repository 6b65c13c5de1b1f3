"""One description of each architecture: its facts, its hyperparameters, their checks.

Two halves, read by the engine (model.py), the planner (memory.py) and `info` alike:

* ``FAMILIES``: per-architecture facts that are not in the file (how llama.cpp's
  llama-model.cpp builds each graph): RoPE pairing, QKV biases, QK-norm, the FFN's
  activation, norms after attention / FFN, embedding scale, sliding-window pattern,
  the RoPE base of local layers.  A llama-family architecture is a row here plus
  whatever is really new in its math.
* ``HParams``: the numbers of one model, read from a GGUF header by ``from_gguf``
  and validated before any kernel sees them: a file is a stranger's input, and
  a head dimension, rotary width or layer count that disagrees with the tensors
  would make a kernel index past its buffers.  Every refusal is one ``ValueError``
  line naming the key.

The tests' NumPy reference (tests/reference.py) reads the metadata on its own, so
that it stays an independent oracle of this module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = ["Family", "FAMILIES", "HParams", "from_gguf", "rope_style", "RUNNABLE"]


@dataclass(frozen=True)
class Family:
    name: str
    rope_style: str = "normal"     # "normal": pairs (2i, 2i+1); "neox": pairs (i, i + n_rot/2)
    qkv_bias: bool = False         # biases on q, k, v required (Qwen2)
    qk_norm: bool = False          # RMSNorm of each q / k head (Qwen3, Gemma 3)
    ffn_act: str = "silu"          # gate activation: silu (SwiGLU) | gelu_tanh (GeGLU)
    post_norms: bool = False       # RMSNorm of the attention and FFN outputs before the residual add
    embed_scale: bool = False      # token embeddings times sqrt(d_model)
    swa_period: int = 0            # sliding window on layers l with l % p < p - 1 (0: none)
    rope_base_local: float = 0.0   # RoPE base of sliding-window layers (0: rope.freq_base)
    # llama.cpp model types (by layer count) whose scores are scaled by 1/sqrt(d / heads)
    # instead of 1/sqrt(head dim): Gemma 3 27B's query_pre_attn_scalar (gemma_pytorch's config)
    attn_scale_d_per_head_layers: tuple = ()
    runs: bool = True              # the engine computes it (else: planner and info only)


FAMILIES = {
    "llama": Family("llama"),
    "qwen2": Family("qwen2", rope_style="neox", qkv_bias=True),
    "qwen3": Family("qwen3", rope_style="neox", qk_norm=True),
    # llama.cpp's gemma3 (llama-model.cpp, models/gemma3.cpp): 5 sliding-window layers
    # then one global, local layers rotate with base 10000 (and no RoPE scaling).
    "gemma3": Family("gemma3", rope_style="neox", qk_norm=True, ffn_act="gelu_tanh", post_norms=True,
                     embed_scale=True, swa_period=6, rope_base_local=10000.0,
                     attn_scale_d_per_head_layers=(62,)),
    "gemma2": Family("gemma2", rope_style="neox", ffn_act="gelu_tanh", post_norms=True,
                     embed_scale=True, swa_period=2, runs=False),
    "cohere2": Family("cohere2", swa_period=4, runs=False),
}
RUNNABLE = tuple(k for k, f in FAMILIES.items() if f.runs)

# llama.cpp's llama_model_rope_type() for architectures this runtime only describes.
_ROPE_NONE = {
    "clip", "gpt2", "gptj", "mpt", "refact", "bloom", "mamba", "mamba2", "jamba",
    "jina-bert-v2", "t5", "t5encoder", "jais", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7",
    "wavtokenizer-dec", "nemotron_h", "nemotron_h_moe", "kimi-linear",
}
_ROPE_NORMAL = {
    "llama", "llada", "llama4", "deci", "baichuan", "starcoder", "internlm2", "minicpm",
    "xverse", "command-r", "cohere2", "olmo", "arctic", "deepseek", "deepseek2",
    "deepseek2-ocr", "plm", "chatglm", "granite", "granitemoe", "granitehybrid",
    "chameleon", "bailingmoe", "neo-bert", "smollm3", "arcee", "ernie4_5", "ernie4_5-moe",
    "mistral3", "mistral4", "llama-embed", "maincoder", "glm-dsa", "glm4",
}
_ROPE_NEOX = {
    "falcon", "falcon-h1", "grok", "dbrx", "bert", "jina-bert-v3", "modern-bert",
    "nomic-bert", "nomic-bert-moe", "eurobert", "stablelm", "bitnet", "qwen", "qwen2",
    "dream", "qwen2moe", "qwen3", "qwen3moe", "llada-moe", "rnd1", "olmo2", "olmoe", "phi2",
    "phi3", "phimoe", "plamo", "plamo2", "plamo3", "gemma", "gemma2", "gemma3", "gemma3n",
    "gemma4", "gemma-embedding", "starcoder2", "openelm", "gptneox", "codeshell", "orion",
    "nemotron", "exaone", "exaone4", "exaone-moe", "minicpm3", "bailingmoe2", "dots1",
    "hunyuan-moe", "hunyuan-dense", "jais2", "gpt-oss", "lfm2", "lfm2moe", "smallthinker",
    "seed_oss", "grovemoe", "apertus", "minimax-m2", "cogvlm", "pangu-embedded", "afmoe",
    "qwen3next", "mimo2", "step35", "glm4moe",
}
_ROPE_MROPE = {"qwen2vl", "paddleocr"}
_ROPE_IMROPE = {"qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe"}


def rope_style(arch: str) -> str | None:
    """'normal', 'neox', 'mrope', 'imrope' or 'none' as llama.cpp would use for this
    architecture; None when it is unknown."""
    if arch in FAMILIES:
        return FAMILIES[arch].rope_style
    for style, archs in (("normal", _ROPE_NORMAL), ("neox", _ROPE_NEOX), ("none", _ROPE_NONE),
                         ("mrope", _ROPE_MROPE), ("imrope", _ROPE_IMROPE)):
        if arch in archs:
            return style
    return None


# Sane bounds (far above any released model; a value past them is a hostile or broken file).
MAX_LAYERS = 1024
MAX_D = 1 << 16
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_FFN = 1 << 20
MAX_CTX = 1 << 24
MAX_VOCAB = 1 << 22


@dataclass
class HParams:
    """The numbers of one model (a GGUF header, a preset, or `plan --arch`).

    The leading fields are what memory planning needs; the rest what the engine
    computes with.  Per-layer values, where a file gives them, are tuples of length
    n_layers (empty when uniform)."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    n_vocab: int
    head_dim_v: int = 0          # 0: same as head_dim
    tied: bool = False           # output head shares the token embedding
    n_ctx_train: int = 0
    qkv_bias: bool = False
    qk_norm: bool = False
    n_swa: int = 0               # sliding-window length (0: none)
    swa_layers: tuple = ()       # per layer: True where the layer uses the window
    n_kv_heads_per_layer: tuple = ()
    ffn_dim_per_layer: tuple = ()
    n_heads_per_layer: tuple = ()
    arch: str = "llama"
    rope_style: str = "normal"
    rope_base: float = 10000.0
    rope_base_local: float = 0.0  # sliding-window layers' base (0: rope_base)
    rope_freq_scale: float = 1.0  # linear scaling: positions times this
    rope_scaling: str = "none"
    n_rot: int = 0               # rotated dimensions per head (0: head_dim)
    rms_eps: float = 1e-5
    attn_scale: float = 0.0      # softmax(q.k * attn_scale) (0: 1/sqrt(head_dim))
    family: Family = field(default_factory=lambda: FAMILIES["llama"])

    def __post_init__(self):
        if not self.head_dim_v:
            self.head_dim_v = self.head_dim
        if not self.n_rot:
            self.n_rot = self.head_dim
        if not self.attn_scale:
            self.attn_scale = 1.0 / math.sqrt(self.head_dim)

    @property
    def n_swa_layers(self) -> int:
        return sum(self.swa_layers)

    def kv_heads(self, il: int) -> int:
        return self.n_kv_heads_per_layer[il] if self.n_kv_heads_per_layer else self.n_kv_heads

    def heads(self, il: int) -> int:
        return self.n_heads_per_layer[il] if self.n_heads_per_layer else self.n_heads

    def ffn(self, il: int) -> int:
        return self.ffn_dim_per_layer[il] if self.ffn_dim_per_layer else self.ffn_dim


class _Reader:
    """Typed, bounded reads of `{arch}.key` values; errors name the key."""

    def __init__(self, g):
        self.g = g
        self.arch = g.arch

    def where(self, key):
        return f"{self.g.path}: {self.arch}.{key}"

    def raw(self, key):
        return self.g.arch_get(key)

    def int(self, key, default=None, lo=0, hi=None, required=False):
        v = self.raw(key)
        if v is None:
            if required:
                raise ValueError(f"{self.where(key)} is missing")
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{self.where(key)} must be one integer, got {_kind(v)}")
        return self._bounded(key, v, lo, hi)

    def int_or_layers(self, key, n_layers, default=None, lo=0, hi=None, required=False):
        """An integer, or one per layer (llama.cpp's get_key_or_arr): (value, per_layer)."""
        v = self.raw(key)
        if v is None or isinstance(v, int) and not isinstance(v, bool):
            return self.int(key, default, lo, hi, required), ()
        vals = _as_list(v)
        if vals is None or not all(isinstance(x, int) and not isinstance(x, bool) for x in vals):
            raise ValueError(f"{self.where(key)} must be an integer or one integer per layer, got {_kind(v)}")
        if len(vals) != n_layers:
            raise ValueError(f"{self.where(key)} has {len(vals)} values for {n_layers} layers")
        for x in vals:
            self._bounded(key, x, lo, hi)
        if len(set(vals)) == 1:
            return vals[0], ()
        return max(vals), tuple(vals)

    def float(self, key, default, lo=0.0, hi=math.inf, lo_open=True):
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{self.where(key)} must be one number, got {_kind(v)}")
        v = float(v)
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
            raise ValueError(f"{self.where(key)} = {v!r} is out of range")
        return v

    def str(self, key, default):
        v = self.raw(key)
        if v is None:
            return default
        if not isinstance(v, str):
            raise ValueError(f"{self.where(key)} must be a string, got {_kind(v)}")
        return v

    def _bounded(self, key, v, lo, hi):
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"{self.where(key)} = {v} is out of range [{lo}, {hi}]")
        return v


def _as_list(v):
    if isinstance(v, (list, tuple)):
        return list(v)
    if hasattr(v, "tolist") and getattr(v, "ndim", 0) == 1:
        return v.tolist()
    return None


def _kind(v) -> str:
    if isinstance(v, (list, tuple)) or hasattr(v, "shape"):
        return f"an array of {len(v)}"
    return type(v).__name__


_BLK = re.compile(r"blk\.(\d+)\.")


def _layers_in_tensors(tensors) -> int:
    """1 + the highest blk.N index among the tensors (0 without any)."""
    top = -1
    for name in tensors:
        m = _BLK.match(name)
        if m:
            top = max(top, int(m.group(1)))
    return top + 1


def from_gguf(g, *, for_engine: bool = False) -> HParams:
    """Read and validate the architecture numbers of an open GGUFFile (its header is
    enough).  for_engine: also require what the engine needs to compute (a supported
    architecture, RoPE scaling it implements, uniform head counts)."""
    arch = g.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"{g.path}: general.architecture is missing or not a string")
    fam = FAMILIES.get(arch, Family(arch, rope_style=rope_style(arch) or "normal", runs=False))
    if for_engine and not fam.runs:
        raise ValueError(f"unsupported architecture {arch!r} (supported: {', '.join(RUNNABLE)})")
    r = _Reader(g)
    tensors = g.tensors

    n_layers = r.int("block_count", lo=1, hi=MAX_LAYERS, required=True)
    have = _layers_in_tensors(tensors)
    if tensors and n_layers > have:
        raise ValueError(f"{r.where('block_count')} = {n_layers}, but the file has tensors for {have} layers")
    d = r.int("embedding_length", lo=1, hi=MAX_D, required=True)
    n_heads, heads_pl = r.int_or_layers("attention.head_count", n_layers, lo=1, hi=MAX_HEADS, required=True)
    n_kv, kv_pl = r.int_or_layers("attention.head_count_kv", n_layers, default=n_heads, lo=1, hi=MAX_HEADS)
    for il in range(n_layers):
        h = heads_pl[il] if heads_pl else n_heads
        kv = kv_pl[il] if kv_pl else n_kv
        if kv > h or h % kv:
            raise ValueError(f"{r.where('attention.head_count_kv')}: {h} query heads cannot share "
                             f"{kv} KV heads (layer {il})")
    has_key_length = r.raw("attention.key_length") is not None
    if heads_pl and not has_key_length:
        raise ValueError(f"{r.where('attention.head_count')}: per-layer head counts need "
                         f"{arch}.attention.key_length (the head size)")
    if has_key_length or d % n_heads == 0:
        hd = r.int("attention.key_length", default=d // n_heads, lo=1, hi=MAX_HEAD_DIM)
    else:
        raise ValueError(f"{r.where('embedding_length')} = {d} is not a multiple of "
                         f"{n_heads} heads and {arch}.attention.key_length is missing")
    hdv = r.int("attention.value_length", default=hd, lo=1, hi=MAX_HEAD_DIM)
    n_rot = r.int("rope.dimension_count", default=hd, lo=0, hi=MAX_HEAD_DIM)
    if n_rot % 2 or n_rot > hd or (n_rot == 0 and fam.rope_style != "none"):
        raise ValueError(f"{r.where('rope.dimension_count')} = {n_rot}: must be even, > 0 and at most "
                         f"the head dimension {hd}")
    ffn, ffn_pl = r.int_or_layers("feed_forward_length", n_layers, lo=1, hi=MAX_FFN, required=for_engine)
    ffn = ffn or 0
    eps = r.float("attention.layer_norm_rms_epsilon", 1e-5, lo=0.0, hi=1.0)
    base = r.float("rope.freq_base", 10000.0)
    n_ctx_train = r.int("context_length", default=0, lo=0, hi=MAX_CTX) or 0
    n_swa = r.int("attention.sliding_window", default=0, lo=0, hi=MAX_CTX) or 0
    if for_engine and fam.swa_period and not n_swa:
        # the local layers' window: without it llama.cpp builds another graph
        # (no sliding window, final-logit softcapping) that this engine does not
        raise ValueError(f"{r.where('attention.sliding_window')} is missing or 0: {arch} needs the "
                         f"window of its sliding-window layers")

    scaling = r.str("rope.scaling.type", "none")
    freq_scale = 1.0
    if scaling == "linear":
        freq_scale = 1.0 / r.float("rope.scaling.factor", 1.0)
    elif for_engine and scaling not in ("none", "") and not (scaling == "llama3" and "rope_freqs.weight" in tensors):
        raise ValueError(f"{r.where('rope.scaling.type')} = {scaling!r}: this engine implements "
                         f"none, linear and llama3 (rope_freqs.weight) RoPE scaling")

    if for_engine:
        # llama.cpp reads these as one value or one per layer, but its llama / qwen2 /
        # qwen3 graphs take every layer's tensor shapes from layer 0: arrays that
        # differ between layers are refused there, and here, naming the key.
        for key, pl in (("attention.head_count", heads_pl), ("attention.head_count_kv", kv_pl),
                        ("feed_forward_length", ffn_pl)):
            if pl:
                raise ValueError(f"{r.where(key)}: per-layer values that differ ({list(pl)[:8]}) are "
                                 f"not supported for {arch} (llama.cpp refuses them too)")
    n_vocab = _vocab_size(g, r, d, for_engine)
    swa_layers: tuple = ()
    if n_swa and fam.swa_period:
        p = fam.swa_period
        swa_layers = tuple(il % p < p - 1 for il in range(n_layers))
    attn_scale = 1.0 / math.sqrt(hd)
    if n_layers in fam.attn_scale_d_per_head_layers:
        attn_scale = 1.0 / math.sqrt(d // n_heads)
    name = g.get("general.name")
    return HParams(
        name=name if isinstance(name, str) else arch, n_layers=n_layers, d_model=d, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=hd, ffn_dim=ffn, n_vocab=n_vocab, head_dim_v=hdv,
        tied="output.weight" not in tensors, n_ctx_train=n_ctx_train,
        qkv_bias=fam.qkv_bias or "blk.0.attn_q.bias" in tensors, qk_norm=fam.qk_norm,
        n_swa=n_swa, swa_layers=swa_layers, n_kv_heads_per_layer=kv_pl, ffn_dim_per_layer=ffn_pl,
        n_heads_per_layer=heads_pl,
        arch=arch, rope_style=fam.rope_style, rope_base=base, rope_base_local=fam.rope_base_local,
        rope_freq_scale=freq_scale, rope_scaling=scaling, n_rot=n_rot, rms_eps=eps,
        attn_scale=attn_scale, family=fam)


def _vocab_size(g, r: _Reader, d: int, strict: bool) -> int:
    """Rows of token_embd (the engine's vocabulary); the tokenizer and vocab_size agree."""
    emb = g.tensors.get("token_embd.weight")
    toks = g.get("tokenizer.ggml.tokens")
    n_toks = len(toks) if hasattr(toks, "__len__") and not isinstance(toks, (str, bytes)) else 0
    declared = r.int("vocab_size", default=0, lo=0, hi=MAX_VOCAB) or 0
    if emb is None:
        if strict:
            raise ValueError(f"{g.path}: missing tensor 'token_embd.weight'")
        return declared or n_toks
    dims = tuple(emb.dims)
    if len(dims) != 2 or dims[0] != d:
        raise ValueError(f"{g.path}: token_embd.weight has dims {dims}, expected ({d}, n_vocab) "
                         f"for embedding_length {d}")
    n_vocab = int(dims[1])
    if not 0 < n_vocab <= MAX_VOCAB:
        raise ValueError(f"{g.path}: token_embd.weight has {n_vocab} rows")
    if strict and n_toks and n_toks != n_vocab:
        raise ValueError(f"{g.path}: tokenizer.ggml.tokens has {n_toks} tokens, token_embd.weight "
                         f"{n_vocab} rows")
    if declared and declared != n_vocab:
        raise ValueError(f"{r.where('vocab_size')} = {declared}, token_embd.weight has {n_vocab} rows")
    return n_vocab
