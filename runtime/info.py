"""``python -m runtime info MODEL``: what a GGUF file holds, from its header.

Only the header is read (the tensor data stays untouched in the mapping), so
this is instant even for large files, and works on a file whose tensor data is
not all there yet (a download in progress, the first part of a split GGUF): it
prints what the header holds and says how many of the bytes the tensors need are
present.  ``--json`` prints every field.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections import Counter

import numpy as np

from .arch import from_gguf as _hparams, rope_style
from .gguf import GGUFFile

__all__ = ["rope_style", "model_info", "format_info", "cli_info"]

_VOCAB_TYPES = {"llama": "SPM", "gpt2": "BPE", "bert": "WPM", "t5": "UGM", "rwkv": "RWKV",
                "plamo2": "PLaMo2", "no_vocab": "none", "none": "none"}

# Special-token ids in the metadata, and the texts llama.cpp recognises an
# end-of-turn token by when the file does not name one.
_SPECIAL_KEYS = [("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"),
                 ("eom", "eom_token_id"), ("pad", "padding_token_id"),
                 ("unk", "unknown_token_id"), ("sep", "seperator_token_id"),
                 ("mask", "mask_token_id")]
_EOT_TEXTS = ["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<end_of_utterance>"]


def _plain(v):
    """Metadata value -> something json can print and utf-8 can encode."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, str):
        # Undecodable bytes are kept as surrogates by the reader; show U+FFFD.
        return v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return v


def _printable(s: str) -> str:
    """Escape control characters: metadata must not drive the terminal."""
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in s)


def _file_type_name(ft) -> str | None:
    if not isinstance(ft, int):
        return None
    try:
        from gguf.constants import LlamaFileType

        return LlamaFileType(ft).name.removeprefix("MOSTLY_")
    except (ValueError, ImportError):
        return f"unknown ({ft})"


def model_info(g: GGUFFile) -> dict:
    """Every fact `info` reports, as plain JSON-able values."""
    arch = g.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    get = lambda key: _plain(g.get(key))  # noqa: E731

    def hp(key, default=None):
        return _plain(g.get(f"{arch}.{key}", default)) if arch else default

    n_params = sum(t.n_elements for t in g.tensors.values())
    weight_bytes = sum(t.nbytes for t in g.tensors.values())
    counts = Counter(t.type_name for t in g.tensors.values())
    type_bytes = Counter()
    for t in g.tensors.values():
        type_bytes[t.type_name] += t.nbytes

    n_embd = hp("embedding_length")
    n_head = hp("attention.head_count")
    n_head_kv = hp("attention.head_count_kv", n_head)
    head_dim = hp("attention.key_length")
    if head_dim is None and isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0:
        head_dim = n_embd // n_head
    head_dim_v = hp("attention.value_length", head_dim)

    tokens = g.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else []
    tok_model = g.get("tokenizer.ggml.model")

    def token_text(i):
        return _plain(tokens[i]) if isinstance(i, int) and 0 <= i < len(tokens) else None

    special = {}
    for name, key in _SPECIAL_KEYS:
        tid = g.get(f"tokenizer.ggml.{key}")
        if isinstance(tid, int) and not isinstance(tid, bool):
            special[name] = {"id": tid, "text": token_text(tid), "source": "metadata"}
    if "eot" not in special and tokens:
        index = {t: i for i, t in enumerate(tokens) if t in _EOT_TEXTS}
        for text in _EOT_TEXTS:
            if text in index:
                special["eot"] = {"id": index[text], "text": text, "source": "text"}
                break

    # The bytes the tensor table says the data needs, against the bytes present.
    data_end = max((t.offset + t.nbytes for t in g.tensors.values()), default=g.data_offset)
    split_no, split_count = g.get("split.no"), g.get("split.count")
    template = g.get("tokenizer.chat_template")
    try:  # the checks the engine and planner apply (runtime.arch); info reports, never refuses
        _hparams(g)
        problem = None
    except ValueError as e:
        problem = str(e).removeprefix(f"{g.path}: ")
    return {
        "path": _plain(str(g.path)),
        "file_size": g.file_size,
        "gguf_version": g.version,
        "alignment": g.alignment,
        "architecture": _plain(arch),
        "name": get("general.name"),
        "size_label": get("general.size_label"),
        "file_type": _file_type_name(g.get("general.file_type")),
        "n_params": n_params,
        "n_tensors": len(g.tensors),
        "weight_bytes": weight_bytes,
        "bits_per_weight": (8 * weight_bytes / n_params) if n_params else None,
        "tensor_types": dict(counts.most_common()),
        "tensor_type_bytes": {k: type_bytes[k] for k, _ in counts.most_common()},
        "context_length": hp("context_length"),
        "n_layers": hp("block_count"),
        "n_embd": n_embd,
        "n_ff": hp("feed_forward_length"),
        "n_heads": n_head,
        "n_kv_heads": n_head_kv,
        "head_dim": head_dim,
        "head_dim_v": head_dim_v,
        "rope_base": hp("rope.freq_base", 10000.0 if arch else None),
        "rope_style": rope_style(arch) if arch else None,
        "rope_dims": hp("rope.dimension_count", head_dim),
        "rope_scaling": hp("rope.scaling.type"),
        "sliding_window": hp("attention.sliding_window"),
        "rms_eps": hp("attention.layer_norm_rms_epsilon"),
        "vocab_type": _plain(_VOCAB_TYPES.get(tok_model, tok_model)) if isinstance(tok_model, str) else None,
        "tokenizer_model": _plain(tok_model),
        "tokenizer_pre": get("tokenizer.ggml.pre"),
        "vocab_size": len(tokens),
        "add_bos": get("tokenizer.ggml.add_bos_token"),
        "add_eos": get("tokenizer.ggml.add_eos_token"),
        "special_tokens": special,
        "chat_template": isinstance(template, str) and bool(template),
        "chat_template_chars": len(template) if isinstance(template, str) else 0,
        "hparams_problem": _plain(problem),
        "data_bytes_needed": int(data_end),
        "data_complete": g.file_size >= data_end,
        "split": ({"no": split_no, "count": split_count}
                  if isinstance(split_no, int) and isinstance(split_count, int) else None),
    }


def _si(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g} {unit}".rstrip()


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        if v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            lo, hi = min(v), max(v)  # a per-layer value
            return _fmt(lo) if lo == hi else f"{_fmt(lo)}..{_fmt(hi)} (per layer)"
        text = str(v)
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:g}"
    return str(v)


def format_info(info: dict, width: int = 80) -> str:
    label_w = 14
    lines = []

    def row(label, value):
        wrapped = textwrap.wrap(_printable(str(value)), width - label_w,
                                break_on_hyphens=False) or ["-"]
        lines.append(f"{label:<{label_w}}{wrapped[0]}")
        lines.extend(" " * label_w + w for w in wrapped[1:])

    row("file", info["path"])
    row("", f"{_si(info['file_size'], 'B')}, GGUF v{info['gguf_version']}, "
            f"{info['n_tensors']} tensors")
    row("architecture", _fmt(info["architecture"]))
    name = info["name"] or "-"
    if info["size_label"]:
        name += f" ({info['size_label']})"
    row("name", name)
    row("file type", _fmt(info["file_type"]))
    row("parameters", f"{_si(info['n_params'])} ({info['n_params']:,})")
    bpw = info["bits_per_weight"]
    row("weights", f"{_si(info['weight_bytes'], 'B')}, "
                   f"{bpw:.2f} bits per weight" if bpw else "-")
    row("tensor types", ", ".join(f"{k} x{v}" for k, v in info["tensor_types"].items()) or "-")
    row("context", _fmt(info["context_length"]))
    row("layers", _fmt(info["n_layers"]))
    row("embedding", f"{_fmt(info['n_embd'])}, feed-forward {_fmt(info['n_ff'])}")
    row("heads", f"{_fmt(info['n_heads'])}, KV heads {_fmt(info['n_kv_heads'])}")
    hd = _fmt(info["head_dim"])
    if info["head_dim_v"] != info["head_dim"]:
        hd += f" (value {_fmt(info['head_dim_v'])})"
    row("head dim", hd)
    rope = f"base {_fmt(info['rope_base'])}, style {_fmt(info['rope_style'])}, dims {_fmt(info['rope_dims'])}"
    if info["rope_scaling"]:
        rope += f", scaling {info['rope_scaling']}"
    row("rope", rope)
    if info["sliding_window"]:
        row("sliding win.", _fmt(info["sliding_window"]))
    vocab = f"{_fmt(info['vocab_type'])}, {info['vocab_size']} tokens"
    if info["tokenizer_model"] or info["tokenizer_pre"]:
        vocab += f" (model {_fmt(info['tokenizer_model'])}, pre {_fmt(info['tokenizer_pre'])})"
    row("vocab", vocab)
    for name, tok in info["special_tokens"].items():
        text = json.dumps(tok["text"], ensure_ascii=False) if tok["text"] is not None else "(out of range)"
        if len(text) > 40:
            text = text[:37] + "...\""
        note = " (found by text)" if tok["source"] == "text" else ""
        row(f"{name} token", f"{tok['id']} {text}{note}")
    flags = [f"add_{k}={_fmt(info[f'add_{k}'])}" for k in ("bos", "eos")
             if info[f"add_{k}"] is not None]
    if flags:
        row("tokenizer", ", ".join(flags))
    row("chat template", f"yes ({info['chat_template_chars']} chars)" if info["chat_template"] else "no")
    if info.get("hparams_problem"):
        row("PROBLEM", info["hparams_problem"])
    split = info.get("split")
    if split and split["count"] > 1:
        row("split", f"part {split['no'] + 1} of {split['count']} (llama.cpp's gguf-split)")
    if not info.get("data_complete", True):
        have, need = info["file_size"], info["data_bytes_needed"]
        row("INCOMPLETE", f"tensor data incomplete: the file has {have:,} of the {need:,} bytes its "
                          f"tensors need ({100 * have / need:.1f} %), a download in progress or the "
                          f"first part of a split file; `plan` works on it, inference needs the rest")
    return "\n".join(lines)


def cli_info(args) -> int:
    from .registry import resolve_model

    path = resolve_model(args.model)
    with GGUFFile(path, header_only=True) as g:  # the data may not all be there yet
        info = model_info(g)
    if getattr(args, "json", False):
        print(json.dumps(info, indent=2, ensure_ascii=False, default=str))
    else:
        print(format_info(info))
    sys.stdout.flush()
    return 0
