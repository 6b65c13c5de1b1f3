"""Engine test helpers: tiny synthetic llama / qwen2 / qwen3 GGUF files (F32, written
with gguf-py's GGUFWriter, no vocabulary: llama.cpp's "no_vocab" model) and a plain
NumPy float64 forward pass over the dequantized weights as the exact-math reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_synthetic(path: Path, arch: str = "llama", *, n_layers: int = 2, d: int = 256,
                    n_heads: int = 8, n_kv_heads: int = 2, head_dim: int | None = None,
                    ffn: int = 512, vocab: int = 512, tied: bool = False, seed: int = 0,
                    rope_scale: float | None = None, drop: tuple = ()) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    hd = head_dim or d // n_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if arch == "qwen3" or head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if rope_scale:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scale)
    w.add_tokenizer_model("no_vocab")
    w.add_vocab_size(vocab)

    def mat(rows, cols, s=1.0):
        return (rng.standard_normal((rows, cols)) * s / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    add = w.add_tensor

    def add_tensor(name, arr):  # `drop` leaves tensors out (missing-tensor tests)
        if name not in drop:
            add(name, arr)
    w.add_tensor = add_tensor
    # std 4/sqrt(d): tied output logits get a spread like a trained model's, not one-hot
    w.add_tensor("token_embd.weight", (rng.standard_normal((vocab, d)) * 4 / np.sqrt(d)).astype(np.float32))
    for i in range(n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(d))
        w.add_tensor(p + "attn_q.weight", mat(n_heads * hd, d, 2.0))
        w.add_tensor(p + "attn_k.weight", mat(n_kv_heads * hd, d, 2.0))
        w.add_tensor(p + "attn_v.weight", mat(n_kv_heads * hd, d))
        if arch == "qwen2":
            w.add_tensor(p + "attn_q.bias", (0.1 * rng.standard_normal(n_heads * hd)).astype(np.float32))
            w.add_tensor(p + "attn_k.bias", (0.1 * rng.standard_normal(n_kv_heads * hd)).astype(np.float32))
            w.add_tensor(p + "attn_v.bias", (0.1 * rng.standard_normal(n_kv_heads * hd)).astype(np.float32))
        if arch == "qwen3":
            w.add_tensor(p + "attn_q_norm.weight", norm(hd))
            w.add_tensor(p + "attn_k_norm.weight", norm(hd))
        w.add_tensor(p + "attn_output.weight", mat(d, n_heads * hd))
        w.add_tensor(p + "ffn_norm.weight", norm(d))
        w.add_tensor(p + "ffn_gate.weight", mat(ffn, d))
        w.add_tensor(p + "ffn_up.weight", mat(ffn, d))
        w.add_tensor(p + "ffn_down.weight", mat(d, ffn))
    w.add_tensor("output_norm.weight", norm(d))
    if not tied:
        w.add_tensor("output.weight", mat(vocab, d, 4.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def reference_logits(path, ids) -> np.ndarray:
    """Exact-math forward (float64) over the file's dequantized weights: [len(ids), n_vocab]."""
    from runtime.gguf import GGUFFile
    from runtime.model import ModelArgs

    g = GGUFFile(path)
    a = ModelArgs.from_gguf(g)
    W = lambda n: g.dequantize(n).astype(np.float64)  # noqa: E731
    has = lambda n: n in g.tensors  # noqa: E731
    ids = np.asarray(ids)
    n = len(ids)
    x = W("token_embd.weight")[ids]
    pos = np.arange(n, dtype=np.float64)
    half = a.n_rot // 2
    inv = a.rope_freq_scale * a.rope_base ** (-2.0 * np.arange(half) / a.n_rot)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rms(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + a.rms_eps) * w

    def rope(v):  # v [n, heads, hd]
        v = v.copy()
        if a.rope_style == "neox":
            x0, x1 = v[..., :half].copy(), v[..., half:2 * half].copy()
            v[..., :half] = x0 * cos - x1 * sin
            v[..., half:2 * half] = x0 * sin + x1 * cos
        else:
            x0, x1 = v[..., 0:2 * half:2].copy(), v[..., 1:2 * half:2].copy()
            v[..., 0:2 * half:2] = x0 * cos - x1 * sin
            v[..., 1:2 * half:2] = x0 * sin + x1 * cos
        return v

    H, KV, hd = a.n_heads, a.n_kv_heads, a.head_dim
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(a.n_layers):
        p = f"blk.{i}."
        h = rms(x, W(p + "attn_norm.weight"))
        q, k, v = h @ W(p + "attn_q.weight").T, h @ W(p + "attn_k.weight").T, h @ W(p + "attn_v.weight").T
        if has(p + "attn_q.bias"):
            q, k, v = q + W(p + "attn_q.bias"), k + W(p + "attn_k.bias"), v + W(p + "attn_v.bias")
        q, k, v = q.reshape(n, H, hd), k.reshape(n, KV, hd), v.reshape(n, KV, a.head_dim_v)
        if has(p + "attn_q_norm.weight"):
            q, k = rms(q, W(p + "attn_q_norm.weight")), rms(k, W(p + "attn_k_norm.weight"))
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        att = np.einsum("hqk,khd->qhd", s, v).reshape(n, -1)
        x = x + att @ W(p + "attn_output.weight").T
        h = rms(x, W(p + "ffn_norm.weight"))
        gt, up = h @ W(p + "ffn_gate.weight").T, h @ W(p + "ffn_up.weight").T
        x = x + (gt / (1 + np.exp(-gt)) * up) @ W(p + "ffn_down.weight").T
    x = rms(x, W("output_norm.weight"))
    out = W("output.weight" if has("output.weight") else "token_embd.weight")
    g.close()
    return x @ out.T


def llamacpp_logits(llama_cpp, path, ids, n_threads: int = 2) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(ids)), n_batch=512, n_threads=n_threads,
                          logits_all=True, verbose=False)
    llm.eval(list(ids))
    out = np.array(llm.scores[:len(ids)], dtype=np.float64)
    llm.close() if hasattr(llm, "close") else None
    return out


def log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_top1(base, other):
    """Mean KL(base || other) over positions and top-1 agreement (fraction)."""
    lp, lq = log_softmax(base), log_softmax(other)
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    return float(kl), float((base.argmax(-1) == other.argmax(-1)).mean())


def quantize(llama_cpp, src, dst, ftype_name: str) -> Path:
    """Requantize with llama.cpp (ftype like 'Q4_K_M', 'BF16')."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype_name}) failed: {rc}")
    return Path(dst)
