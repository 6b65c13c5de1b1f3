"""Engine speed vs llama.cpp (llama-cpp-python) in one process, same file and threads.

    python tools/bench_engine.py [MODEL] [-t 2] [-p 512] [-n 64] [--ctx 2048]

Prints prefill (pp) and decode (tg) tokens/s for both and the ratios, and our peak
resident memory while generating at n_ctx (measured before llama.cpp is loaded)
against the issue's bound: 2 x file size + KV cache.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=2048)
    a = ap.parse_args()

    from runtime.model import Model

    base_rss = _rss_now()  # interpreter + numpy + numba/llvmlite, before any model

    m = Model.load(a.model, n_ctx=a.ctx, n_threads=a.threads)
    rng = np.random.default_rng(0)
    prompt = [int(i) for i in rng.integers(100, m.n_vocab - 100, a.prompt)]
    s = m.session()
    s.eval(prompt[:8])  # warm-up: numba cache load / compile for both paths
    s.eval([prompt[8]])
    s.logits()
    s.reset()
    t = time.perf_counter()
    s.eval(prompt)
    s.logits()
    pp_ours = a.prompt / (time.perf_counter() - t)
    s.reset()
    s.eval(prompt[:16])
    t = time.perf_counter()
    for _ in range(a.n_gen):
        s.eval([int(np.argmax(s.logits()))])
    tg_ours = a.n_gen / (time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kv = sum(a.nbytes for a in s.kv)  # global layers and sliding-window rings
    fsize = os.path.getsize(m.gguf.path)
    bound = 2 * fsize + kv

    from runtime import llamacpp

    llama_cpp = llamacpp.load()
    print(llamacpp.mitigation().describe())
    llm = llama_cpp.Llama(model_path=str(m.gguf.path), n_ctx=a.ctx, n_batch=512, n_threads=a.threads,
                          n_threads_batch=a.threads, verbose=False)
    llm.eval(prompt[:8])
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    pp_lc = a.prompt / (time.perf_counter() - t)
    llm.reset()
    llm.eval(prompt[:16])
    t = time.perf_counter()
    for _ in range(a.n_gen):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    tg_lc = a.n_gen / (time.perf_counter() - t)

    print(f"model {m.gguf.path.name}, {a.threads} threads")
    print(f"pp{a.prompt}: ours {pp_ours:8.1f} tok/s  llama.cpp {pp_lc:8.1f} tok/s  ratio {pp_ours / pp_lc:.3f}")
    print(f"tg{a.n_gen}:  ours {tg_ours:8.1f} tok/s  llama.cpp {tg_lc:8.1f} tok/s  ratio {tg_ours / tg_lc:.3f}")
    model_rss = rss - base_rss
    print(f"peak RSS (ours, n_ctx {a.ctx}): {rss / 2**20:.0f} MiB, of which {base_rss / 2**20:.0f} MiB is the "
          f"interpreter + numba before loading; model part {model_rss / 2**20:.0f} MiB vs bound 2 x file + KV = "
          f"{bound / 2**20:.0f} MiB ({'ok' if model_rss <= bound else 'OVER'})")


if __name__ == "__main__":
    main()
