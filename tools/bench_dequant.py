"""Dequantize throughput per block format: runtime.quant vs gguf.quants, one thread.

    python tools/bench_dequant.py [--mb 16] [--threads 1]

For every supported format: random blocks (scales forced finite) decoding to
about --mb MB of float32; prints MB/s of output and blocks/s for ours and for
gguf.quants.dequantize, their ratio, and the fused matvec speed (GFLOP/s,
2 flops per weight) on those bytes as a (rows, 4096) matrix, for one activation
row (decode) and for 16 (batched prefill).  "20x needs" is the output rate a 20x
ratio takes; the last lines compare it with the rate at which one core can store
float32 at all (a loop writing a constant), which no decoder can exceed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _random_blocks(tid: int, n_blocks: int, rng) -> np.ndarray:
    from runtime import quant

    ts = quant.type_size(tid)
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    if tid in (quant.GGML_F32,):
        raw = rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8).reshape(n_blocks, 4)
    elif tid in (quant.GGML_F16,):
        raw = rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    elif tid == quant.GGML_BF16:
        raw = (rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        raw = raw.view(np.uint8).reshape(n_blocks, 2)
    else:
        # every f16 field of the format gets a small finite value
        for off in _scale_offsets(tid):
            raw[:, off:off + 2] = (rng.random(n_blocks).astype(np.float16) * np.float16(0.01)) \
                .view(np.uint8).reshape(n_blocks, 2)
    return raw


def _scale_offsets(tid: int) -> tuple[int, ...]:
    from runtime import quant as q

    return {q.GGML_Q4_0: (0,), q.GGML_Q4_1: (0, 2), q.GGML_Q5_0: (0,), q.GGML_Q5_1: (0, 2),
            q.GGML_Q8_0: (0,), q.GGML_Q2_K: (80, 82), q.GGML_Q3_K: (108,), q.GGML_Q4_K: (0, 2),
            q.GGML_Q5_K: (0, 2), q.GGML_Q6_K: (208,), q.GGML_IQ4_NL: (0,),
            q.GGML_IQ4_XS: (0,)}.get(tid, ())


def _store_ceiling(n_vals: int, repeat: int) -> float:
    """MB/s of float32 output of a loop that only stores a constant, at the
    benchmark's size: what one core can write at all, so an upper bound for any
    decoder (each has to write its output and read its input on top)."""
    from numba import njit

    @njit(cache=False)
    def fill(out):
        for i in range(out.shape[0]):
            out[i] = np.float32(1.0)

    out = np.empty(n_vals, np.float32)
    fill(out)
    return n_vals * 4 / 1e6 / _best(lambda: fill(out), repeat)


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=16.0, help="MB of float32 output per format")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)

    import gguf
    import numba

    from runtime import quant

    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads={args.threads}  output per format={args.mb:g} MB  (best of {args.repeat})")
    n_vals = int(args.mb * 1e6 / 4) // 256 * 256
    ceiling = _store_ceiling(n_vals, args.repeat)
    hdr = (f"{'format':<8}{'ours MB/s':>11}{'Mblk/s':>9}{'gguf MB/s':>11}{'ratio':>8}{'20x needs':>11}"
           f"{'matvec GF/s':>13}{'GB/s in':>9}{'mm n=16 GF/s':>14}")
    print(hdr)
    print("-" * len(hdr))
    over = []
    for tid in quant._SUPPORTED:
        name, bs, ts = quant._SUPPORTED[tid]
        cols = 4096
        rows = n_vals // cols
        n_blocks = rows * cols // bs
        raw = _random_blocks(tid, n_blocks, rng).reshape(rows, -1)
        qt = gguf.GGMLQuantizationType(tid)
        quant.dequantize(raw, tid, (rows, cols))  # compile / warm up
        t_ours = _best(lambda: quant.dequantize(raw, tid, (rows, cols)), args.repeat)
        t_ref = _best(lambda: gguf.quants.dequantize(raw, qt), max(1, args.repeat - 1))
        out_mb = rows * cols * 4 / 1e6

        # fused matvec on the same bytes (2048 rows if we have them)
        x = rng.standard_normal(cols).astype(np.float32)
        W = quant.matmuls._as_u8_readonly(raw, 2)
        quant.matvec(tid, W, x)
        t_mv = _best(lambda: quant.matvec(tid, W, x), args.repeat)
        gflops = 2 * rows * cols / t_mv / 1e9
        # batched (prefill-like) matmul, 16 activation rows
        X = rng.standard_normal((16, cols)).astype(np.float32)
        out = np.empty((16, rows), np.float32)
        quant.matmul(tid, W, X, out)
        t_mm = _best(lambda: quant.matmul(tid, W, X, out), args.repeat)
        # gguf's F32 "dequantize" is a zero-copy view: no ratio to speak of
        ratio = "view" if tid == quant.GGML_F32 else f"{t_ref / t_ours:.1f}x"
        ref_mbs = "-" if tid == quant.GGML_F32 else f"{out_mb / t_ref:.0f}"
        need = 20 * out_mb / t_ref
        if tid != quant.GGML_F32 and need > ceiling:
            over.append(name)
        print(f"{name:<8}{out_mb / t_ours:>11.0f}{n_blocks / t_ours / 1e6:>9.2f}"
              f"{ref_mbs:>11}{ratio:>8}{'-' if tid == quant.GGML_F32 else f'{need:.0f}':>11}"
              f"{gflops:>13.2f}{raw.nbytes / t_mv / 1e9:>9.2f}"
              f"{2 * 16 * rows * cols / t_mm / 1e9:>14.2f}")
    print(f"\nstoring float32 with nothing to read or decode: {ceiling:.0f} MB/s at this size, the"
          f" ceiling for any decoder.\n20x gguf.quants needs more than that for: {', '.join(over) or 'none'}")


if __name__ == "__main__":
    main()
