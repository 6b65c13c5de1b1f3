"""A slow, obviously-correct NumPy float64 forward pass for llama / qwen2 / qwen3 / gemma3 GGUFs.

A second oracle, independent of runtime/ on purpose: weights come from gguf-py's
GGUFReader + gguf.quants.dequantize, the math is straight-line float64.
RoPE style follows llama.cpp (llama_model_rope_type): llama -> "normal" (adjacent pairs,
the converter permutes Q/K rows so this matches HF), qwen2 / qwen3 / gemma3 -> NEOX (halves).

Gemma 3, as Google's gemma_pytorch and llama.cpp's gemma3 graph compute it (read from
the paper and HF's Gemma3 config, not from runtime/arch.py): embeddings times
sqrt(d_model); RMSNorm before and after attention and after the FFN (the GGUF's
norm weights already hold HF's 1 + w); per-head QK RMSNorm; GELU (tanh form) gated
FFN; every 6th layer (l % 6 == 5) global with rope.freq_base, the others local:
RoPE base 10000 and a sliding window (key j visible to query i when i - j < window);
scores scaled by 1/sqrt(head dim) (1/sqrt(d / heads) for the 62-layer 27B).

    reference_logits(path, ids) -> float64 [len(ids), n_vocab]
    reference_attention(path, ids) -> float64 [layers, heads, q, k] softmax weights
    reference_trace(path, ids, patch=None) -> float64 residual stream, block outputs, logits
    reference_matmul_inputs(path, ids) -> float64 rows entering each weight matrix
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

NEOX_ARCHS = {"qwen2", "qwen3", "gemma3"}
GEMMA3_PERIOD = 6          # layers per (5 local + 1 global) group
GEMMA3_LOCAL_BASE = 10000.0


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


@lru_cache(maxsize=2)  # float64 SmolLM2 is ~1.1 GB
def load_weights(path: str):
    """(hparams dict, {name: float64 array in numpy shape}) - cached per path in-process."""
    import gguf

    r = gguf.GGUFReader(path)
    arch = _field(r, "general.architecture")
    if arch not in ("llama", "qwen2", "qwen3", "gemma3"):
        raise ValueError(f"reference forward does not support arch {arch!r}")
    g = lambda k, d=None: _field(r, f"{arch}.{k}", d)  # noqa: E731
    d = int(g("embedding_length"))
    H = int(g("attention.head_count"))
    hp = dict(arch=arch, n_layers=int(g("block_count")), d=d, H=H,
              KV=int(g("attention.head_count_kv", H)),
              eps=float(g("attention.layer_norm_rms_epsilon")),
              base=float(g("rope.freq_base", 10000.0)))
    hd = d // H
    if arch != "qwen2":  # llama.cpp's qwen2 loader ignores key_length
        hd = int(g("attention.key_length", hd))
    hp["hd"] = hd
    hp["n_rot"] = int(g("rope.dimension_count", hd))
    scale_type = g("rope.scaling.type", "none")
    factor = float(g("rope.scaling.factor", 0.0) or 0.0)
    hp["freq_scale"] = 1.0 / factor if scale_type == "linear" and factor > 0 else 1.0
    hp["scale"] = 1.0 / np.sqrt(hd)
    hp["window"] = [0] * hp["n_layers"]      # 0: the layer attends to every earlier key
    if arch == "gemma3":
        n_swa = int(g("attention.sliding_window"))
        hp["window"] = [n_swa if il % GEMMA3_PERIOD < GEMMA3_PERIOD - 1 else 0 for il in range(hp["n_layers"])]
        if hp["n_layers"] == 62:  # Gemma 3 27B: query_pre_attn_scalar = d_model / heads
            hp["scale"] = 1.0 / np.sqrt(d // H)
    W = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        W[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(shape)
    return hp, W


def _rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, n_rot, base, freq_scale, neox, factors=None):
    """x [n, heads, hd]: rotate the first n_rot dims by pos * freq_scale * base^(-2i/n_rot),
    divided by factors[i] where the file has rope_freqs.weight (llama3-style scaling)."""
    half = n_rot // 2
    theta = (pos[:, None] * freq_scale) * base ** (-2.0 * np.arange(half) / n_rot)  # [n, half]
    if factors is not None:
        theta = theta / factors[None, :]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    out = x.copy()
    if neox:
        a, b = x[..., :half], x[..., half:n_rot]
        out[..., :half], out[..., half:n_rot] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2], out[..., 1:n_rot:2] = a * cos - b * sin, a * sin + b * cos
    return out


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _forward(path, ids, patch=None, inputs=None):
    """(logits, attention maps, {resid, attn_out, mlp_out}) of one causal sequence.

    inputs: a dict that receives, per weight matrix name, the rows entering it
    (float64 [n, cols]; reference_matmul_inputs).

    resid[0] is the embedding, resid[l + 1] the stream after block l.  patch =
    (r, positions, values): after residual point r the rows at positions are
    replaced by values (activation patching), the stored resid[r] is the patched one."""
    hp, W = load_weights(str(path))
    ids = np.asarray(ids, dtype=np.int64)
    n, H, KV, hd, eps = len(ids), hp["H"], hp["KV"], hp["hd"], hp["eps"]
    gemma = hp["arch"] == "gemma3"
    neox = hp["arch"] in NEOX_ARCHS
    pos = np.arange(n, dtype=np.float64)
    causal = np.triu(np.ones((n, n), dtype=bool), 1)
    x = W["token_embd.weight"][ids]
    if gemma:
        x = x * np.sqrt(hp["d"])
    attn_all = []
    resid, attn_out, mlp_out = [], [], []

    def point(r, x):
        if patch is not None and patch[0] == r:
            x = x.copy()
            x[list(patch[1])] = patch[2]
        resid.append(x)
        return x

    x = point(0, x)
    for i in range(hp["n_layers"]):
        p = f"blk.{i}."
        window = hp["window"][i]
        base, freq_scale = hp["base"], hp["freq_scale"]
        if window:  # gemma3's local layers: their own RoPE base, no scaling
            base, freq_scale = GEMMA3_LOCAL_BASE, 1.0
        h = _rms_norm(x, W[p + "attn_norm.weight"], eps)
        if inputs is not None:
            for m in ("attn_q", "attn_k", "attn_v"):
                inputs[p + m + ".weight"] = h
        q = h @ W[p + "attn_q.weight"].T
        k = h @ W[p + "attn_k.weight"].T
        v = h @ W[p + "attn_v.weight"].T
        if p + "attn_q.bias" in W:
            q, k, v = q + W[p + "attn_q.bias"], k + W[p + "attn_k.bias"], v + W[p + "attn_v.bias"]
        q, k, v = q.reshape(n, H, hd), k.reshape(n, KV, hd), v.reshape(n, KV, -1)
        if p + "attn_q_norm.weight" in W:  # qwen3: per-head RMSNorm before RoPE
            q = _rms_norm(q, W[p + "attn_q_norm.weight"], eps)
            k = _rms_norm(k, W[p + "attn_k_norm.weight"], eps)
        ff = W.get("rope_freqs.weight")
        q = _rope(q, pos, hp["n_rot"], base, freq_scale, neox, ff)
        k = _rope(k, pos, hp["n_rot"], base, freq_scale, neox, ff)
        group = H // KV  # query head j uses KV head j // group
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) * hp["scale"]
        mask = causal
        if window:  # query i sees keys j with i - j < window
            mask = causal | (pos[:, None] - pos[None, :] >= window)
        scores[:, mask] = -np.inf
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        attn_all.append(probs)
        o = np.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)
        if inputs is not None:
            inputs[p + "attn_output.weight"] = o
        o = o @ W[p + "attn_output.weight"].T
        if gemma:
            o = _rms_norm(o, W[p + "post_attention_norm.weight"], eps)
        attn_out.append(o)
        x = x + o
        h = _rms_norm(x, W[p + "ffn_norm.weight"], eps)
        gate, up = h @ W[p + "ffn_gate.weight"].T, h @ W[p + "ffn_up.weight"].T
        act = _gelu_tanh(gate) if gemma else gate / (1.0 + np.exp(-gate))
        if inputs is not None:
            inputs[p + "ffn_gate.weight"] = inputs[p + "ffn_up.weight"] = h
            inputs[p + "ffn_down.weight"] = act * up
        f = (act * up) @ W[p + "ffn_down.weight"].T
        if gemma:
            f = _rms_norm(f, W[p + "post_ffw_norm.weight"], eps)
        mlp_out.append(f)
        x = point(i + 1, x + f)
    x = _rms_norm(x, W["output_norm.weight"], eps)
    if inputs is not None:
        inputs["output.weight"] = x
    out = W.get("output.weight", W["token_embd.weight"])  # absent: tied to the embeddings
    return x @ out.T, np.stack(attn_all), dict(resid=np.stack(resid), attn_out=np.stack(attn_out),
                                               mlp_out=np.stack(mlp_out))


def reference_logits(path, ids) -> np.ndarray:
    """float64 [len(ids), n_vocab] logits of a fresh causal sequence."""
    return _forward(path, ids)[0]


def reference_attention(path, ids) -> np.ndarray:
    """float64 [layers, heads, q, k] causal softmax attention weights."""
    return _forward(path, ids)[1]


def reference_matmul_inputs(path, ids) -> dict:
    """{weight name: float64 [len(ids), cols]}: the rows entering every matrix of a
    fresh causal sequence (attn_q/k/v, attn_output, ffn_gate/up/down of each block,
    and "output.weight", the final normed stream, whichever matrix the file uses)."""
    inputs = {}
    _forward(path, ids, inputs=inputs)
    return inputs


def reference_trace(path, ids, patch=None) -> dict:
    """float64 activations: resid [layers + 1, n, d] (0: embeddings, l + 1: after block l),
    attn_out / mlp_out [layers, n, d] (each block's two residual updates, after Gemma's
    post-norms), logits [n, n_vocab].  patch = (r, positions, values [len(positions), d])
    overwrites the stream at residual point r before the blocks above it read it."""
    logits, _, acts = _forward(path, ids, patch)
    acts["logits"] = logits
    return acts
