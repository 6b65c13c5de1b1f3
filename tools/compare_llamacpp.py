"""llama.cpp vs the float64 reference vs runtime.Model (if importable) on one GGUF.

    python tools/compare_llamacpp.py MODEL.gguf [-n 256]

Prints mean KL and top-1 agreement for each pair on N WikiText-2 tokens (llama.cpp's
tokenizer; for tiny-vocab synthetic files (< 1000 tokens) the text's bytes mod vocab).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _oracle import kl_stats, llamacpp_logits, wikitext_ids  # noqa: E402
from reference import reference_logits  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-n", type=int, default=256)
    a = ap.parse_args(argv)
    from runtime import llamacpp

    llama_cpp = llamacpp.load()
    print(llamacpp.mitigation().describe())
    voc = llama_cpp.Llama(model_path=a.model, vocab_only=True, verbose=False)
    n_vocab = voc.n_vocab()
    if n_vocab < 1000:
        ids = wikitext_ids(n=a.n, vocab=n_vocab)
    else:
        ids = wikitext_ids(lambda t: voc.tokenize(t.encode(), add_bos=False), n=a.n)
    res = {}
    t = time.time(); res["llama.cpp"] = llamacpp_logits(llama_cpp, a.model, ids); print(f"llama.cpp {time.time()-t:.1f}s")
    t = time.time(); res["reference"] = reference_logits(a.model, ids); print(f"reference {time.time()-t:.1f}s")
    try:
        from runtime.model import Model

        t = time.time()
        res["runtime"] = Model.load(a.model, n_ctx=max(256, a.n)).logits(ids)
        print(f"runtime   {time.time()-t:.1f}s")
    except Exception as e:  # the engine may not exist / support this file yet
        print(f"runtime: unavailable ({type(e).__name__}: {e})")
    names = list(res)
    for i, p in enumerate(names):
        for q in names[i + 1:]:
            kl, top1 = kl_stats(res[p], res[q])
            print(f"KL({p} || {q}) = {kl:.3g}   top-1 = {100 * top1:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
