"""Helpers for the tokenizer tests: vocabulary-only GGUF files written with the
gguf package's GGUFWriter, so that llama.cpp (vocab_only=True) and our
Tokenizer read the very same vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The keys llama.cpp's loader reads for the architecture even with vocab_only.
_ARCH_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv",
              "attention.layer_norm_rms_epsilon", "rope.dimension_count", "rope.freq_base")


def write_vocab_gguf(path: Path, src_md: dict, *, chat_template: str | None = None,
                     drop: tuple[str, ...] = (), **overrides) -> Path:
    """Write a tensor-free GGUF holding ``src_md``'s tokenizer (and arch hparams).

    ``overrides`` replace tokenizer keys by their short name, e.g.
    ``pre="qwen2"`` -> ``tokenizer.ggml.pre``."""
    import gguf

    arch = src_md.get("general.architecture", "llama")
    w = gguf.GGUFWriter(str(path), arch)
    for k in _ARCH_KEYS:
        v = src_md.get(f"{arch}.{k}")
        if v is None:
            continue
        key = f"{arch}.{k}"
        if isinstance(v, float) or k in ("attention.layer_norm_rms_epsilon", "rope.freq_base"):
            w.add_float32(key, float(v))
        else:
            w.add_uint32(key, int(v))
    md = {k: v for k, v in src_md.items() if k.startswith("tokenizer.")}
    for k, v in overrides.items():
        md[f"tokenizer.ggml.{k}"] = v
    if chat_template is not None:
        md["tokenizer.chat_template"] = chat_template
    for k in drop:
        md.pop(k, None)
    for key, v in md.items():
        if isinstance(v, bool):
            w.add_bool(key, v)
        elif isinstance(v, str):
            w.add_string(key, v)
        elif isinstance(v, (int, np.integer)):
            w.add_uint32(key, int(v))
        elif isinstance(v, np.ndarray):
            w.add_array(key, v.tolist()) if v.dtype.kind != "f" else w.add_array(key, [float(x) for x in v])
        elif isinstance(v, (list, tuple)):
            w.add_array(key, list(v))
        else:
            raise TypeError(f"cannot write {key}: {type(v).__name__}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
