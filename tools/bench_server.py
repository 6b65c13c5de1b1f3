"""Aggregate generation throughput of ``python -m runtime serve`` under concurrent streams.

    python tools/bench_server.py models/SmolLM2-135M-Instruct.Q4_1.gguf --streams 1,2,4,8 -n 64

Starts the server (a subprocess on a free loopback port; or ``--url`` for one already
running), warms it up, then for each concurrency level k runs k streamed
/v1/completions at once (greedy, ``ignore_eos`` so every stream generates exactly
``-n`` tokens, ``cache_prompt`` off so each prefills its own prompt) and reports:

* aggregate tokens/s: all streams' generated tokens / wall time from the first
  request to the last stream's end (prefill included, as a client sees it);
* decode tokens/s: generated tokens / the server's own decode seconds
  (``/metrics``), i.e. the batched decode steps alone;
* time to first token, median over the streams;
* speed-up of the aggregate over one stream.

Each level runs ``--repeats`` times; the median is printed (markdown table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from serve_process import serve_url, spawn_serve  # tools/serve_process.py (the tests use it too)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time, in a small village,", "The history of the Roman Empire begins",
           "Here is a recipe for a simple tomato soup:", "def quicksort(xs):",
           "The three laws of thermodynamics are", "Dear diary, today I",
           "A short poem about the sea:", "Photosynthesis is the process by which"]


def start_server(model: str, n_parallel: int, ctx: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    """``serve`` on a free port, healthy (tests/_http_util.py, as the server tests)."""
    flags = ["-np", n_parallel, "-c", ctx] + (["-t", threads] if threads else [])
    proc = spawn_serve(model, *flags)
    try:
        return proc, serve_url(proc, health_timeout=900)
    except RuntimeError as e:
        proc.kill()
        raise SystemExit(str(e)) from None


def metrics(url: str) -> dict:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.split()
            out[k.removeprefix("gguf_runtime_")] = float(v)
    return out


def one_stream(url: str, prompt: str, n: int, t0: float, out: list) -> None:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True,
            "cache_prompt": False, "stream_options": {"include_usage": True}}
    first = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("choices") and ev["choices"][0].get("text") and first is None:
                first = time.perf_counter() - t0
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    out.append((first, tokens, time.perf_counter() - t0))


def level(url: str, k: int, n: int) -> dict:
    m0 = metrics(url)
    t0 = time.perf_counter()
    out: list = []
    threads = [threading.Thread(target=one_stream, args=(url, PROMPTS[i % len(PROMPTS)], n, t0, out))
               for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(o[2] for o in out)
    m1 = metrics(url)
    gen = sum(o[1] for o in out)
    dec_s = m1["decode_seconds_total"] - m0["decode_seconds_total"]
    steps = m1["decode_steps_total"] - m0["decode_steps_total"]
    return {"streams": k, "tokens": gen, "wall_s": wall, "aggregate_tps": gen / wall,
            "decode_tps": gen / dec_s if dec_s else float("nan"),
            "rows_per_step": (m1["decode_rows_total"] - m0["decode_rows_total"]) / steps if steps else 0,
            "ttft_s": statistics.median(o[0] for o in out if o[0] is not None)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--url", default=None, help="a running server instead of starting one")
    ap.add_argument("-np", "--parallel", type=int, default=4)
    ap.add_argument("-c", "--ctx-size", type=int, default=2048)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--streams", default="1,2,4,8", help="concurrency levels (default 1,2,4,8)")
    ap.add_argument("-n", type=int, default=64, help="tokens per stream (default 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.streams.split(",")]
    proc = None
    url = args.url
    if url is None:
        # -np must cover the largest level, else streams queue instead of batching
        proc, url = start_server(args.model, max(args.parallel, max(levels)), args.ctx_size, args.threads)
    try:
        level(url, max(levels), 8)  # warm-up: compiles every decode width used below
        for k in levels:
            level(url, k, 4)
        rows = []
        for k in levels:
            runs = [level(url, k, args.n) for _ in range(args.repeats)]
            med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            med["aggregate_range"] = (min(r["aggregate_tps"] for r in runs), max(r["aggregate_tps"] for r in runs))
            rows.append(med)
        base = rows[0]["aggregate_tps"]
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print("| streams | aggregate tok/s (median, range) | x one stream | decode tok/s | rows/step | TTFT median |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            lo, hi = r["aggregate_range"]
            print(f"| {int(r['streams'])} | {r['aggregate_tps']:.1f} ({lo:.1f}-{hi:.1f}) | "
                  f"{r['aggregate_tps'] / base:.2f}x | {r['decode_tps']:.1f} | {r['rows_per_step']:.2f} | "
                  f"{1e3 * r['ttft_s']:.0f} ms |")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
