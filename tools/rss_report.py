"""Peak resident memory vs file size, ours and llama.cpp's, one fresh process per engine.

    python tools/rss_report.py FILE [FILE ...] [-c 2048] [-p 512] [-n 32] [-t 2]

Each engine runs in its own child process (so neither's pages count for the other):
load FILE with n_ctx -c, prefill -p random tokens, decode -n tokens greedily, then
report the child's peak RSS (ru_maxrss).  Weights are memory-mapped by both engines, so
the pages of the file that were read count in RSS; llama.cpp's is about
file + KV cache + compute buffer.  Printed per file: file size, KV cache size (ours),
both peaks, and each peak minus the file size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys


def _child(engine: str, path: str, ctx: int, n_prompt: int, n_gen: int, threads: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    if engine == "ours":
        from runtime.model import Model

        m = Model.load(path, n_ctx=ctx, n_threads=threads)
        prompt = [int(i) for i in rng.integers(100, m.n_vocab - 100, n_prompt)]
        s = m.session()
        s.eval(prompt)
        for _ in range(n_gen):
            s.eval([int(np.argmax(s.logits()))])
        kv = int(sum(a.nbytes for a in s.kv))
    else:
        from runtime import llamacpp

        llama_cpp = llamacpp.load()
        llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=512, n_threads=threads,
                              n_threads_batch=threads, verbose=False)
        prompt = [int(i) for i in rng.integers(100, llm.n_vocab() - 100, n_prompt)]
        llm.eval(prompt)
        for _ in range(n_gen):
            llm.eval([int(np.argmax(llm.eval_logits[-1]))])
        kv = None
    return {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kv": kv}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("-c", "--ctx-size", type=int, default=2048)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--child", choices=("ours", "llamacpp"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a.child, a.files[0], a.ctx_size, a.n_prompt, a.n_gen, a.threads)))
        return 0
    mib = 2 ** 20
    print(f"n_ctx {a.ctx_size}, pp{a.n_prompt} + tg{a.n_gen}, {a.threads} threads; MiB")
    print(f"{'file':34s} {'size':>7s} {'KV':>6s} {'ours':>7s} {'llama.cpp':>9s} {'ours-file':>9s} {'l.cpp-file':>10s}")
    for f in a.files:
        res = {}
        for engine in ("ours", "llamacpp"):
            out = subprocess.run([sys.executable, __file__, f, "--child", engine, "-c", str(a.ctx_size),
                                  "-p", str(a.n_prompt), "-n", str(a.n_gen), "-t", str(a.threads)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{f}: {engine} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                return 1
            res[engine] = json.loads(out.stdout.strip().splitlines()[-1])
        size = os.path.getsize(f)
        o, l = res["ours"]["rss"], res["llamacpp"]["rss"]
        print(f"{os.path.basename(f):34s} {size / mib:7.0f} {res['ours']['kv'] / mib:6.0f} {o / mib:7.0f} "
              f"{l / mib:9.0f} {(o - size) / mib:9.0f} {(l - size) / mib:10.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
