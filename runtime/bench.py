"""`python -m runtime bench`: prompt processing (pp) and generation (tg) speed, like llama-bench.

pp N: N token ids evaluated in one call from an empty cache, plus the logits of the
last position (what a prompt costs).  tg N: N single-token steps from an empty cache,
each ending with that token's logits (what generation costs, sampling excluded).
Each test runs after an untimed warm-up (numba loads or compiles its kernels there;
that time is reported as `load_s`), is repeated -r times, and is reported as the
median tokens/s with min and max.  `--vs-llamacpp` runs llama-cpp-python on the same
file, threads, token ids and context in the same process, alternating repetitions
with ours, and prints ours / llama.cpp.
The token ids are pseudo-random (fixed seed), as llama-bench's are: speed does not
depend on them, and no tokenizer or sampler time is measured.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _sum_part(b):
    acc = np.uint64(0)
    for i in range(b.shape[0]):
        acc += b[i]
    return acc


@njit(parallel=True, cache=True)
def _stream_sum(a):
    """Sum of a uint64 array in 64 equal parts: a streaming read (integer adds
    vectorise; a float sum would be bound by its add latency, not the memory).
    Each part is summed by its own function over a contiguous slice: written inline
    in the prange body the loop was not vectorised, and the probe read 8.7 GB/s on a
    Zen 4 VM whose DRAM streams 55 GB/s to two threads (numpy's sum: 28 on one)."""
    n = a.shape[0]
    parts = np.zeros(64, np.uint64)
    for t in prange(64):
        parts[t] = _sum_part(a[t * n // 64:(t + 1) * n // 64])
    return parts.sum()


def read_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Bytes/s this machine streams from DRAM with the current threads: best of reps
    sums over nbytes (8x a typical L3), after one untimed pass faults the pages in."""
    a = np.ones(nbytes // 8, np.uint64)
    _stream_sum(a)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        _stream_sum(a)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def decode_bytes_per_token(g) -> int:
    """Weight bytes one decode step reads: every tensor but the token embedding,
    of which only one row is read (the embedding is the output matrix too when the
    model has no output.weight, and then it is read whole)."""
    tied = "output.weight" not in g.tensors
    return sum(t.nbytes for name, t in g.tensors.items() if name != "token_embd.weight" or tied)


def _ids(n: int, n_vocab: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(0, n_vocab, n)]


def _stats(tps: list[float]) -> dict:
    return {"median": statistics.median(tps), "min": min(tps), "max": max(tps), "samples": tps}


class _Ours:
    name = "ours"

    def __init__(self, path, n_ctx, threads, precision="fast"):
        from .model import Model

        self.model = Model.load(path, n_ctx=n_ctx, n_threads=threads, precision=precision)
        self.session = self.model.session()
        self.n_vocab = self.model.n_vocab

    def reset(self):
        self.session.reset()

    def prompt(self, ids):
        self.session.eval(ids)
        self.session.logits()

    def step(self, tok):
        self.session.eval([tok])
        self.session.logits()


class _LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path, n_ctx, threads, n_batch):
        llama_cpp = _import_llama_cpp()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                   n_threads=threads, n_threads_batch=threads, logits_all=False,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def reset(self):
        self.llm.reset()

    def prompt(self, ids):
        self.llm.eval(ids)  # computes the last position's logits

    def step(self, tok):
        self.llm.eval([tok])


def _import_llama_cpp():
    """llama_cpp through runtime.llamacpp (AMX mitigation where CPU and build need it)."""
    from . import llamacpp

    try:
        return llamacpp.load()
    except llamacpp.LlamaCppMissing:
        raise RuntimeError("--vs-llamacpp needs llama-cpp-python (pip install -e '.[test]')") from None


def _probe_llama_cpp(path) -> None:
    """One batched evaluation of the file in a child process first: a llama.cpp that
    crashes on it gives one clear error instead of killing the benchmark."""
    from . import llamacpp

    r = llamacpp.probe(path)
    if not r.ok:
        raise RuntimeError(r.describe())


def _check_args(n_prompt: int, n_gen: int, reps: int) -> None:
    if n_prompt < 0 or n_gen < 0:
        raise ValueError("-p and -n must be >= 0")
    if n_prompt == 0 and n_gen == 0:
        raise ValueError("nothing to measure: -p and -n are both 0")
    if reps < 1:
        raise ValueError("-r/--repetitions must be >= 1")


def _warm(engine, n_prompt: int, seed: int) -> float:
    """Untimed warm-up of both code paths (a batch, single tokens); its seconds."""
    t0 = time.perf_counter()
    engine.reset()
    engine.prompt(_ids(min(max(n_prompt, 2), 16), engine.n_vocab, seed + 2))
    for t in _ids(2, engine.n_vocab, seed + 3):
        engine.step(t)
    return time.perf_counter() - t0


def _pp(engine, ids) -> float:
    engine.reset()
    t = time.perf_counter()
    engine.prompt(ids)
    return len(ids) / (time.perf_counter() - t)


def _tg(engine, ids) -> float:
    engine.reset()
    t = time.perf_counter()
    for tok in ids:
        engine.step(tok)
    return len(ids) / (time.perf_counter() - t)


def _run(engines, n_prompt: int, n_gen: int, reps: int, seed: int) -> dict:
    """tokens/s per engine, test and repetition.  With two engines the repetitions
    alternate between them (ours, llama.cpp, ours, ...), so that a slow phase of a
    shared machine falls on both and the ratio stays fair."""
    n_vocab = min(e.n_vocab for e in engines)
    p_ids = _ids(n_prompt, n_vocab, seed)
    g_ids = _ids(n_gen, n_vocab, seed + 1)
    out = {e.name: {"load_s": _warm(e, n_prompt, seed)} for e in engines}
    for test, n, fn, ids in ((f"pp{n_prompt}", n_prompt, _pp, p_ids), (f"tg{n_gen}", n_gen, _tg, g_ids)):
        if n == 0:
            continue
        samples = {e.name: [] for e in engines}
        for _ in range(reps):
            for e in engines:
                samples[e.name].append(fn(e, ids))
        for e in engines:
            out[e.name][test] = _stats(samples[e.name])
    return out


def _commit() -> str | None:
    """The source's git commit (+"-dirty" with uncommitted changes), for PERF.md records."""
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                           capture_output=True, text=True, timeout=5)
        if r.returncode != 0 or not r.stdout.strip():
            return None
        d = subprocess.run(["git", "status", "--porcelain", "-uno", "--", "."], cwd=here,
                           capture_output=True, text=True, timeout=5)
        return r.stdout.strip() + ("-dirty" if d.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# The flags that choose a kernel path here or in llama.cpp (ggml's AVX-512 / VNNI /
# AMX builds), as /proc/cpuinfo spells them.
_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi",
              "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp")


def _cpu_model(cpuinfo: str | None = None) -> str:
    """/proc/cpuinfo's model name, with family and model numbers on x86 (a VM's
    name can be as vague as 'AMD EPYC': family 25 model 17 says Zen 4)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block only
            continue
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def ggml_features(system_info: str) -> list[str]:
    """The features llama_print_system_info() reports on ('AVX2 = 1 | ... | REPACK = 1'):
    which of its kernels this build runs."""
    return [m.group(1) for m in re.finditer(r"([A-Za-z0-9_]+)\s*=\s*1\b", system_info)]


def machine() -> dict:
    """What a figure was measured on: the CPU (model, the vector-ISA flags that pick
    kernel paths), the target numba compiles for (NUMBA_CPU_NAME / _FEATURES when set:
    an AVX2-only run on an AVX-512 machine says so) and the int8 dot path it selects."""
    import llvmlite.binding as llvm
    from numba.core import config

    from .llamacpp import cpu_flags
    from .quant import ir

    flags = cpu_flags()
    forced = config.CPU_NAME is not None and config.CPU_NAME != "host"
    return {
        "cpu": _cpu_model(), "cpu_flags": [f for f in _ISA_FLAGS if f in flags],
        "numba_cpu": config.CPU_NAME if forced else llvm.get_host_cpu_name(),
        "numba_cpu_features": config.CPU_FEATURES,  # None: the host's
        "int8_path": "avx512-vnni" if ir._VNNI512 else "avx2-maddubs" if ir._MADDUBS else "portable",
    }


def _engine(name: str, path, n_prompt: int, n_gen: int, threads: int, precision: str = "fast"):
    """"ours" or "llama.cpp" on the file, with a context that holds the longer test
    (each test starts from an empty cache) and the prompt in one llama.cpp batch."""
    n_ctx = max(n_prompt, n_gen + 1, 16) + 16
    if name == "ours":
        return _Ours(path, n_ctx, threads, precision)
    return _LlamaCpp(path, n_ctx, threads, max(n_prompt, 32))


def bench(path, n_prompt=512, n_gen=128, threads=None, reps=3, vs_llamacpp=False, seed=1234,
          progress=None, precision="fast") -> dict:
    """Run the benchmark; returns every number (the --json document).  precision
    "exact" times our float32-activation matmuls (llama.cpp has no such mode)."""
    from .gguf import GGUFFile
    from .threads import default_threads, set_threads

    _check_args(n_prompt, n_gen, reps)
    llama_cpp = _import_llama_cpp() if vs_llamacpp else None  # fail before any timing
    threads = set_threads(threads or default_threads())
    path = Path(path)
    say = progress or (lambda msg: None)
    g = GGUFFile(path)
    doc = {
        "model": path.name, "path": str(path), "file_size": path.stat().st_size,
        "architecture": g.arch, "n_params": int(sum(int(np.prod(t.shape)) for t in g.tensors.values())),
        "threads": threads, "precision": precision, "n_prompt": n_prompt, "n_gen": n_gen, "repetitions": reps,
        "commit": _commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "tests": {},
    }
    say(f"ours: {path.name}, {threads} threads" + (", precision exact" if precision == "exact" else ""))
    engines = [_engine("ours", path, n_prompt, n_gen, threads, precision)]
    if vs_llamacpp:
        from .llamacpp import _system_info, mitigation

        m = mitigation()
        info = _system_info(llama_cpp).strip()
        doc["llamacpp"] = {"version": getattr(llama_cpp, "__version__", None), "system_info": info,
                           "features": ggml_features(info)}
        doc["llamacpp_mitigation"] = {"active": m.active, "cpu_amx": m.cpu_amx, "build_amx": m.build_amx,
                                      "note": m.describe()}
        say(m.describe())
        _probe_llama_cpp(path)
        say("llama.cpp: same file, threads and token ids, repetitions interleaved with ours")
        engines.append(_engine("llama.cpp", path, n_prompt, n_gen, threads))
    res = _run(engines, n_prompt, n_gen, reps, seed)
    ours = res["ours"]
    doc["load_s"] = ours.pop("load_s")
    for test, st in ours.items():
        doc["tests"][test] = {"ours": st}
    doc["decode_bytes_per_token"] = decode_bytes_per_token(g)
    doc["dram_read_bytes_per_s"] = read_bandwidth()
    if vs_llamacpp:
        lc = res["llama.cpp"]
        doc["llamacpp_load_s"] = lc.pop("load_s")
        for test, st in lc.items():
            doc["tests"][test]["llamacpp"] = st
            doc["tests"][test]["ratio"] = doc["tests"][test]["ours"]["median"] / st["median"]
    return doc


def _one(path, n_prompt, n_gen, n_threads, reps, engine: str, seed=1234) -> dict:
    from .threads import default_threads, set_threads

    _check_args(n_prompt, n_gen, reps)
    n_threads = set_threads(n_threads or default_threads())
    e = _engine(engine, path, n_prompt, n_gen, n_threads)
    res = _run([e], n_prompt, n_gen, reps, seed)[e.name]
    return {"load_s": res.pop("load_s"), "threads": n_threads, "tests": res}


def bench_ours(model_path, n_prompt=512, n_gen=128, n_threads=None, reps=3, seed=1234) -> dict:
    """This runtime alone: {"load_s", "threads", "tests": {"pp512": {median, min, max,
    samples}, "tg128": {...}}} in tokens/s (a test with 0 tokens is left out)."""
    return _one(model_path, n_prompt, n_gen, n_threads, reps, "ours", seed)


def bench_llamacpp(model_path, n_prompt=512, n_gen=128, n_threads=None, reps=3, seed=1234) -> dict:
    """llama-cpp-python alone, same method, token ids and result layout as bench_ours.
    (`bench(..., vs_llamacpp=True)` runs both with interleaved repetitions: fairer ratio.)"""
    _import_llama_cpp()
    return _one(model_path, n_prompt, n_gen, n_threads, reps, "llama.cpp", seed)


def format_table(doc: dict) -> str:
    """llama-bench style table, under 80 columns."""
    size = doc["file_size"] / 2**20
    name = doc["model"] if len(doc["model"]) <= 79 else doc["model"][:38] + "~" + doc["model"][-40:]
    exact = ", precision exact" if doc.get("precision") == "exact" else ""
    lines = [name, f"{size:.1f} MiB, {doc['n_params'] / 1e6:.1f} M params, {doc['threads']} threads{exact}, "
                   f"warm-up {doc['load_s']:.2f} s"]
    vs = any("llamacpp" in t for t in doc["tests"].values())
    head = f"{'test':>7} | {'ours t/s (min..max)':>25}"
    if vs:
        head += f" | {'llama.cpp t/s':>14} | {'ratio':>5}"
    lines += [head, "-" * len(head)]
    for test, t in doc["tests"].items():
        o = t["ours"]
        row = f"{test:>7} | " + f"{o['median']:.1f} ({o['min']:.1f}..{o['max']:.1f})".rjust(25)
        if vs:
            row += f" | {t['llamacpp']['median']:14.1f} | {t['ratio']:5.2f}"
        lines.append(row)
    bw = doc.get("dram_read_bytes_per_s")
    for test, t in doc["tests"].items():
        if test.startswith("tg") and bw:
            per = doc["decode_bytes_per_token"]
            ours = per * t["ours"]["median"]
            lines.append(f"{test}: {per / 2**20:.0f} MiB of weights a token; this machine reads "
                         f"{bw / 1e9:.1f} GB/s")
            line = f"  roofline: ours {ours / 1e9:.1f} GB/s ({100 * ours / bw:.0f} %)"
            if "llamacpp" in t:
                theirs = per * t["llamacpp"]["median"]
                line += f", llama.cpp {theirs / 1e9:.1f} GB/s ({100 * theirs / bw:.0f} %)"
            lines.append(line)
    mit = doc.get("llamacpp_mitigation")
    if mit and mit["active"]:
        lines.append("llama.cpp ran with use_extra_bufts=False (AMX CPU + AMX build): no REPACK")
    mach = doc.get("machine")
    if mach:
        lines += textwrap.wrap(f"CPU: {mach['cpu']}, {' '.join(mach['cpu_flags']) or 'no AVX2'}; "
                               f"numba target {mach['numba_cpu']}, int8 path {mach['int8_path']}",
                               80, subsequent_indent="  ")
    lc = doc.get("llamacpp")
    if lc:
        lines += textwrap.wrap(f"llama.cpp {lc['version']}: {' '.join(lc['features'])}", 80,
                               subsequent_indent="  ")
    lines.append(f"median of {doc['repetitions']} repetitions (min..max)"
                 + (f"; commit {doc['commit']}" if doc.get("commit") else ""))
    return "\n".join(lines)


def cli_bench(args) -> int:
    from .registry import resolve_model

    _check_args(args.n_prompt, args.n_gen, args.repetitions)  # before any download
    if args.vs_llamacpp:
        _import_llama_cpp()
    path = resolve_model(args.model)
    quiet = args.json

    def progress(msg):
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    doc = bench(path, n_prompt=args.n_prompt, n_gen=args.n_gen, threads=args.threads,
                reps=args.repetitions, vs_llamacpp=args.vs_llamacpp, progress=progress,
                precision=args.precision)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(format_table(doc))
    return 0
