"""Comparison harness: llama.cpp logits, KL / top-1 stats, wikitext ids, model cache.

Import as `from _oracle import ...` (pytest puts tests/ on sys.path: no __init__.py).
    llamacpp_logits(llama_cpp, path, ids, n_ctx=None) -> float32 [n, vocab]
    kl_stats(ref_logits, q_logits) -> (mean KL(ref || q), top-1 agreement fraction)
    wikitext_ids(tokenize_fn, n=256, vocab=None) -> list[int]
    synthetic_model(arch, gqa=1, tied=False, ftype="F32", **spec) -> Path (cached build)
    smollm2_requant(src, ftype) -> Path (cached llama.cpp requantization of SmolLM2)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-test.txt"
CACHE = ROOT / "models" / "synthetic"  # git-ignored (/models/*)
sys.path.insert(0, str(ROOT / "tools"))


def llamacpp_logits(llama_cpp, path, ids, n_ctx=None) -> np.ndarray:
    ids = [int(i) for i in ids]
    n = len(ids)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(n_ctx or 0, n, 16), n_batch=n,
                          n_ubatch=n, logits_all=True, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:n], dtype=np.float32)
    finally:
        llm.close()


def _log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_stats(p_logits_ref, q_logits) -> tuple[float, float]:
    """Mean over positions of KL(softmax(ref) || softmax(q)) in float64, and top-1 agreement."""
    lp, lq = _log_softmax(p_logits_ref), _log_softmax(q_logits)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    top1 = np.argmax(p_logits_ref, -1) == np.argmax(q_logits, -1)
    return float(kl.mean()), float(top1.mean())


def wikitext_ids(tokenize_fn=None, n=256, vocab=None, offset=0) -> list[int]:
    """n token ids of WikiText-2 test text (from `offset` chars in).

    tokenize_fn(text) -> ids (e.g. a Llama's tokenize, or our Tokenizer's). For synthetic
    models with a tiny vocabulary pass vocab=V: the ids are then the text's UTF-8 bytes
    (the synthetic vocab's first 256 tokens are the bytes), taken modulo V - real text
    statistics, valid ids. Without a tokenizer and a vocab, a fixed-seed random draw."""
    text = WIKITEXT.read_text(encoding="utf-8")[offset:offset + 20 * n]
    if tokenize_fn is not None:
        ids = list(tokenize_fn(text))
    elif vocab is not None:
        ids = list(text.encode("utf-8"))
    else:
        raise ValueError("need tokenize_fn or vocab")
    if len(ids) < n:
        raise ValueError(f"only {len(ids)} tokens available")
    ids = ids[:n]
    return [int(i) % vocab for i in ids] if vocab else ids


def synthetic_model(arch="llama", gqa=1, tied=False, ftype="F32", **spec_kw) -> Path:
    """Build (once, cached under models/synthetic/, keyed by spec + generator version) a
    synthetic GGUF, quantized by llama.cpp to `ftype` unless F32."""
    from make_synthetic import default_spec, write_synthetic

    spec = default_spec(arch, gqa, tied, **spec_kw)
    CACHE.mkdir(parents=True, exist_ok=True)
    src = CACHE / f"{spec.key()}.F32.gguf"
    if not src.exists():
        tmp = src.with_suffix(".part")
        write_synthetic(tmp, spec)
        tmp.replace(src)
    if ftype.upper() == "F32":
        return src
    return _requant(src, CACHE / f"{spec.key()}.{ftype.upper()}.gguf", ftype)


def smollm2_requant(src, ftype) -> Path:
    """SmolLM2 Q4_1 requantized by llama.cpp to ftype (cached under models/synthetic/)."""
    return _requant(Path(src), CACHE / f"{Path(src).stem}-requant.{ftype.upper()}.gguf", ftype)


def _requant(src, dst, ftype) -> Path:
    from quantize import quantize

    if not dst.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        quantize(src, dst, ftype)
    return dst
