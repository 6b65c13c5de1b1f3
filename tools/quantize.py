"""Requantize a GGUF with llama.cpp (llama-cpp-python's llama_model_quantize).

    python tools/quantize.py SRC DST TYPE      # TYPE: F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K
                                               #       Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S
                                               #       Q5_K_M Q6_K IQ4_NL IQ4_XS
allow_requantize is on, so a quantized source (SmolLM2 Q4_1) works too (with its rounding).
No imatrix is used unless quantize(..., imatrix={tensor name: values}) passes one (through
llama_model_quantize_params.imatrix, the C struct array this llama.cpp takes); llama.cpp
only *requires* one for IQ2/IQ1 types.  This is the oracle of tests/test_quantize.py; our
own quantizer is ``python -m runtime quantize``.

    python tools/quantize.py --compare SRC TYPE... [-t 2]   # both quantizers: time, equality
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M",
         "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS"]


def quantize(src, dst, ftype: str, llama_cpp=None, n_threads: int = 2, imatrix=None,
             pure: bool = False) -> Path:
    if llama_cpp is None:
        from runtime import llamacpp

        llama_cpp = llamacpp.load()
    name = ftype.upper()
    const = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if const is None:
        raise ValueError(f"unknown llama.cpp ftype {ftype!r} (known: {', '.join(TYPES)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = const
    params.allow_requantize = True
    params.nthread = n_threads
    params.pure = bool(pure)
    keep = []  # the ctypes buffers must outlive the call
    if imatrix:
        import ctypes

        import numpy as np

        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (tname, values) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
            keep.append(v)
            entries[i].name = tname.encode()
            entries[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = v.size
        entries[len(imatrix)].name = None  # terminator
        params.imatrix = entries
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


def compare(src, types, n_threads: int = 2, workdir=None) -> list[dict]:
    """Quantize `src` to each type with llama.cpp and with ours (runtime.quantize), both
    on n_threads threads, timing each (wall and process CPU seconds: all threads), and
    check that every tensor is byte-identical.  Our kernels are warmed up first (one
    quantization to each type of a small slice of `src`) so that numba's compile time
    is not counted."""
    import tempfile
    import time

    import numpy as np

    from runtime import llamacpp
    from runtime import quantize as rq
    from runtime.gguf import GGUFFile
    from runtime.threads import set_threads

    llama_cpp = llamacpp.load()
    set_threads(n_threads)
    for tid in rq._BLOCK:  # compile (or load from numba's cache) every format before timing
        rq.quantize_rows(np.ones((2, 256), np.float32), tid)
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        for t in types:
            ours, theirs = Path(d) / f"ours.{t}.gguf", Path(d) / f"llamacpp.{t}.gguf"
            w0, c0 = time.perf_counter(), time.process_time()
            quantize(src, theirs, t, llama_cpp=llama_cpp, n_threads=n_threads)
            w1, c1 = time.perf_counter(), time.process_time()
            rq.quantize_file(src, ours, t)
            w2, c2 = time.perf_counter(), time.process_time()
            with GGUFFile(ours) as a, GGUFFile(theirs) as b:
                same = all(a.tensors[n].type_id == tb.type_id and np.array_equal(a.raw(n), b.raw(n))
                           for n, tb in b.tensors.items())
            rows.append(dict(type=t, llamacpp_wall=w1 - w0, llamacpp_cpu=c1 - c0,
                             ours_wall=w2 - w1, ours_cpu=c2 - c1, identical=same))
            ours.unlink()
            theirs.unlink()
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 3 and argv[0] == "--compare":
        threads = 2
        if "-t" in argv:
            i = argv.index("-t")
            threads = int(argv[i + 1])
            argv = argv[:i] + argv[i + 2:]
        src, types = argv[1], argv[2:]
        print(f"{'type':8s} {'llama.cpp wall':>14s} {'CPU':>7s} {'ours wall':>10s} {'CPU':>7s}  identical")
        for r in compare(src, types, threads):
            print(f"{r['type']:8s} {r['llamacpp_wall']:13.2f}s {r['llamacpp_cpu']:6.2f}s "
                  f"{r['ours_wall']:9.2f}s {r['ours_cpu']:6.2f}s  {r['identical']}", flush=True)
        return 0
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    out = quantize(*argv)
    print(out, dict(tensor_types(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
