"""Requantize a GGUF with llama.cpp (llama-cpp-python's llama_model_quantize).

    python tools/quantize.py SRC DST TYPE      # TYPE: F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K
                                               #       Q3_K_M Q3_K_S Q4_K_M Q5_K_M Q6_K IQ4_NL IQ4_XS
allow_requantize is on, so a quantized source (SmolLM2 Q4_1) works too (with its rounding).
No imatrix is used: llama.cpp only *requires* one for IQ2/IQ1 types; Q2_K and IQ4_XS
quantize without one (llama.cpp may print a quality warning).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

TYPES = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q3_K_S",
         "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS"]


def quantize(src, dst, ftype: str, llama_cpp=None, n_threads: int = 2) -> Path:
    if llama_cpp is None:
        from runtime import llamacpp

        llama_cpp = llamacpp.load()
    name = ftype.upper()
    const = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if const is None:
        raise ValueError(f"unknown llama.cpp ftype {ftype!r} (known: {', '.join(TYPES)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = const
    params.allow_requantize = True
    params.nthread = n_threads
    tmp = Path(str(dst) + ".part")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.exists():
        raise RuntimeError(f"llama_model_quantize({src} -> {name}) failed with {rc}")
    tmp.replace(dst)
    return Path(dst)


def tensor_types(path) -> Counter:
    """Count tensor types in a GGUF file: Counter({'Q4_K': 10, 'F32': 5, ...})."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return Counter(t.tensor_type.name for t in r.tensors)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    out = quantize(*argv)
    print(out, dict(tensor_types(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
