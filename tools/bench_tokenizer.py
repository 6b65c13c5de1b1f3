"""Tokenizer speed against llama.cpp on the whole WikiText-2 test file.

    /work/venv/bin/python tools/bench_tokenizer.py [--repeat 3] [model.gguf ...]

For each model: our Tokenizer (built fresh, so its word cache starts cold) and
llama.cpp (llama-cpp-python, vocab-only) tokenize the 1.2 MB file as one text;
the best of --repeat runs is reported, with the ratio ours / llama.cpp and
whether the ids are identical.  The issue's bar is ratio <= 3.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.gguf import GGUFFile  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-test.txt"
MODELS = [ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
          ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", type=Path, default=MODELS)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--text", type=Path, default=WIKITEXT)
    args = ap.parse_args(argv)

    from runtime import llamacpp

    llama_cpp = llamacpp.load()  # vocab only: no matmul, but one way in for every script

    text = args.text.read_text(encoding="utf-8")
    data = text.encode("utf-8")
    print(f"text: {args.text.name}, {len(data) / 1e6:.2f} MB")
    for path in args.models:
        with GGUFFile(path) as g:
            md = g.metadata
            t0 = time.perf_counter()
            Tokenizer.from_metadata(md)
            t_build = time.perf_counter() - t0
            ours_t, ours = float("inf"), None
            for _ in range(args.repeat):
                tok = Tokenizer.from_metadata(md)  # cold word cache every run
                t0 = time.perf_counter()
                ours = tok.tokenize(text, add_special=False)
                ours_t = min(ours_t, time.perf_counter() - t0)
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        ref_t, ref = float("inf"), None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ref = llm.tokenize(data, add_bos=False, special=False)
            ref_t = min(ref_t, time.perf_counter() - t0)
        llm.close()
        print(f"{path.name}: {len(ours)} tokens, ids identical: {ours == ref}; "
              f"ours {ours_t:.3f} s (+ {t_build:.2f} s build), llama.cpp {ref_t:.3f} s, "
              f"ratio {ours_t / ref_t:.2f}")


if __name__ == "__main__":
    main()
