"""Decode matvec kernels, ours against llama.cpp's, one thread, the same weight bytes.

    python tools/bench_dots.py [q5_0,q8_0,q4_k,...] [--rows 512,8192,131072] [--cols 896]

For each format: a random weight matrix (valid scales) of rows x cols, one float32
activation row; ours is quant.matmul_q8 (the decode path: activation rounding,
task split and the int8 row dots, run on one thread); llama.cpp's is ggml's own
`ggml_vec_dot_<type>_<vec dot type>` from llama-cpp-python's libggml-cpu, called
once per weight row from a numba loop (as ggml's mul_mat calls it), on an
activation row that ggml's `quantize_row_<vec dot type>` rounded.  Row counts
choose where the matrix lives: 512 rows sit in L2, 8192 in L3, 131072 in DRAM.
Prints cycles per block (at the clock /proc/cpuinfo reports) and GB/s of weights
per thread, and the largest relative difference of the two results.  Times are
process CPU seconds (numba limited to one thread), so that other work on the
machine disturbs them less than wall-clock figures.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time

import numpy as np

# name: (block bytes, block values, ggml's activation type, byte offsets of f16 scales)
FORMATS = {
    "q4_0": (18, 32, "q8_0", (0,)), "q4_1": (20, 32, "q8_1", (0, 2)), "q5_0": (22, 32, "q8_0", (0,)),
    "q5_1": (24, 32, "q8_1", (0, 2)), "q8_0": (34, 32, "q8_0", (0,)), "iq4_nl": (18, 32, "q8_0", (0,)),
    "q4_k": (144, 256, "q8_K", (0, 2)), "q5_k": (176, 256, "q8_K", (0, 2)), "q6_k": (210, 256, "q8_K", (208,)),
    "iq4_xs": (136, 256, "q8_K", (0,)), "q2_k": (84, 256, "q8_K", (80, 82)), "q3_k": (110, 256, "q8_K", (108,)),
}
ACT = {"q8_0": (34, 32), "q8_1": (36, 32), "q8_K": (292, 256)}


def _clock_hz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) * 1e6
    except OSError:
        pass
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("formats", nargs="?", default="q4_0,q4_1,q5_0,q5_1,q8_0,iq4_nl,q2_k,q3_k,q4_k,q5_k,q6_k,iq4_xs")
    ap.add_argument("--rows", default="512,8192,131072")
    ap.add_argument("--cols", type=int, default=0, help="default 896 (legacy) / 1024 (256-blocks)")
    ap.add_argument("--float", action="store_true", help="also time our float-activation kernel (quant.matmul)")
    a = ap.parse_args()

    os.environ["NUMBA_NUM_THREADS"] = "1"  # no idle pool threads spinning into the CPU time
    import llama_cpp
    from numba import njit

    from runtime import quant
    from runtime.threads import set_threads

    set_threads(1)
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so"))
    lib.ggml_cpu_init()
    P = ctypes.c_void_p
    hz = _clock_hz()
    rng = np.random.default_rng(0)
    print(f"one thread, clock {hz / 1e9:.2f} GHz; cycles per block, GB/s of weights")
    print(f"{'format':7s} {'where':5s} {'ggml cyc':>9s} {'GB/s':>6s} {'ours cyc':>9s} {'GB/s':>6s} {'ours/ggml':>9s}  rel.diff")
    for name in a.formats.split(","):
        bsz, bs, act, scales = FORMATS[name]
        cols = a.cols or (896 if bs == 32 else 1024)
        nb = cols // bs
        tid = getattr(quant, "GGML_" + name.upper())
        x = rng.standard_normal((1, cols)).astype(np.float32)
        asz, abs_ = ACT[act]
        y = np.zeros(cols // abs_ * asz, np.uint8)
        qrow = getattr(lib, f"quantize_row_{act}")
        qrow.argtypes = [P, P, ctypes.c_int64]
        qrow(x.ctypes.data, y.ctypes.data, cols)
        vdot = getattr(lib, f"ggml_vec_dot_{name.replace('_k', '_K')}_{act}")
        vdot.argtypes = [ctypes.c_int, P, ctypes.c_size_t, P, ctypes.c_size_t, P, ctypes.c_size_t, ctypes.c_int]
        vdot.restype = None

        @njit
        def ggml_rows(W, y, s, reps):
            for _ in range(reps):
                for i in range(W.shape[0]):
                    vdot(cols, s[i:].ctypes.data, 0, W[i].ctypes.data, 0, y.ctypes.data, 0, 1)

        for rows in (int(r) for r in a.rows.split(",")):
            W = rng.integers(0, 256, (rows, nb * bsz), dtype=np.uint8)
            blocks = W.reshape(rows, nb, bsz)
            for o in scales:  # scales of about 2^-4: no inf / NaN
                blocks[:, :, o] = rng.integers(0, 256, (rows, nb), dtype=np.uint8)
                blocks[:, :, o + 1] = 0x2c
            s = np.zeros(rows, np.float32)
            out = np.zeros((1, rows), np.float32)
            reps = max(1, int(2e8 // W.nbytes))
            out_f = np.zeros((1, rows), np.float32)
            runs = [lambda: ggml_rows(W, y, s, reps),
                    lambda: [quant.matmul_q8(tid, W, x, out) for _ in range(reps)]]
            if a.float:  # our float-activation kernel (quant.matmul), the path before an int8 dot
                runs.append(lambda: [quant.matmul(tid, W, x, out_f) for _ in range(reps)])
            best = [1e9] * len(runs)
            for f in runs:
                f()
            for _ in range(5):  # interleaved, best of 5
                for k, f in enumerate(runs):
                    t = time.process_time()
                    f()
                    best[k] = min(best[k], (time.process_time() - t) / reps)
            cyc = [b * hz / (rows * nb) for b in best]
            gbs = [W.nbytes / b / 1e9 for b in best]
            where = {512: "L2", 8192: "L3", 131072: "DRAM"}.get(rows, str(rows))
            diff = np.max(np.abs(s - out[0])) / max(np.max(np.abs(s)), 1e-30)
            fl = f"  float {cyc[2]:.1f} cyc, {gbs[2]:.2f} GB/s" if a.float else ""
            print(f"{name:7s} {where:5s} {cyc[0]:9.1f} {gbs[0]:6.2f} {cyc[1]:9.1f} {gbs[1]:6.2f} {best[1] / best[0]:9.2f}  {diff:.1e}{fl}")


if __name__ == "__main__":
    main()
