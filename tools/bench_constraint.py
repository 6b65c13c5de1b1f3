"""What constrained sampling costs per token (runtime.constraint, llguidance).

    python tools/bench_constraint.py [--model SMOLLM2.gguf] [--vocab GGUF ...] [-t THREADS]

1. For each vocabulary (any GGUF whose tokenizer loads; the architecture need not run):
   building the LLTokenizer (once per tokenizer), compiling a schema, and the mask
   per token while a realistic JSON document is walked through the matcher, split
   into llguidance's own mask computation and our unpacking of it into token ids,
   for structural positions and positions inside strings.
2. On the model: a constrained generation (the same schema, temperature 1.0), timing
   for every token the forward step, the unconstrained sampler on the same logits, and
   the constrained sampler; the constraint's cost is the difference of the two
   samplers, and its share is that over the step plus the unconstrained sampler.

Masks and samplers run on the calling thread, so they are timed in that thread's CPU
time (time.thread_time: what they cost, unmoved by other processes taking the CPU,
which on a shared VM inflates wall-clock figures several-fold); the decode step is
timed in wall time and in the process's CPU time (all its threads; with -t 1 that is
the step's work).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9.]+$"},
        "address": {"type": "object", "properties": {"street": {"type": "string"},
                                                     "city": {"type": "string"}},
                    "required": ["street", "city"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "address", "tags"],
}
DOC = json.dumps({
    "name": "Ada Lovelace, Countess of Lovelace", "age": 36, "email": "ada.lovelace@example.org",
    "address": {"street": "12 St James's Square", "city": "London"},
    "tags": ["mathematician", "writer", "analytical engine", "poetical science"], "score": 98.25,
}, indent=2)


def _ms(xs):
    return f"{1e3 * statistics.mean(xs):.3f} ms mean, {1e3 * statistics.median(xs):.3f} median, " \
           f"{1e3 * max(xs):.3f} max"


def bench_vocab(path: str) -> dict:
    from runtime.constraint import Constraint, ll_tokenizer
    from runtime.gguf import GGUFFile
    from runtime.tokenizer import Tokenizer

    with GGUFFile(path) as g:
        tok = Tokenizer.from_gguf(g)
    t0 = time.perf_counter()
    ll_tokenizer(tok)
    t_llt = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = Constraint.json_schema(tok, SCHEMA)
    t_compile = time.perf_counter() - t0
    ids = tok.tokenize(DOC, add_special=False)
    m = c.matcher()
    rust, unpack, n_allowed = [], [], []
    clock = time.thread_time
    for tid in ids + [None]:
        t0 = clock()
        m._compute()
        t1 = clock()
        allowed = m.allowed_ids()   # computes again, then unpacks: subtract the compute
        t2 = clock()
        rust.append(t1 - t0)
        unpack.append(max(0.0, (t2 - t1) - (t1 - t0)))
        n_allowed.append(allowed.size)
        if tid is not None:
            assert tid in set(allowed.tolist()), "the document must stay allowed"
            m.consume(tid)
    assert m.finished or m.accepting
    big = [i for i, k in enumerate(n_allowed) if k > tok.n_vocab // 2]
    small = [i for i, k in enumerate(n_allowed) if k <= tok.n_vocab // 2]
    total = [r + u for r, u in zip(rust, unpack)]
    return {
        "path": path, "n_vocab": tok.n_vocab, "type": tok.vocab_type, "tokens": len(ids),
        "lltokenizer_s": t_llt, "compile_s": t_compile,
        "mask": _ms(total), "rust": _ms(rust), "unpack": _ms(unpack),
        "in_strings": _ms([total[i] for i in big]) if big else "-",
        "structural": _ms([total[i] for i in small]) if small else "-",
        "n_string_positions": len(big), "mean_total_ms": 1e3 * statistics.mean(total),
    }


def bench_model(path: str, n_predict: int, seed: int) -> dict:
    from runtime.chat_template import render_chat
    from runtime.constraint import Constraint
    from runtime.model import Model
    from runtime.sampling import Sampler, SamplerParams

    model = Model.load(path, n_ctx=1024)
    tok = model.tokenizer
    c = Constraint.json_schema(tok, SCHEMA)
    text = render_chat(model.gguf.get("tokenizer.chat_template"),
                       [{"role": "user", "content": "Describe a famous scientist in JSON: name, age, email, "
                                                    "address, tags, score."}],
                       add_generation_prompt=True, bos_token="", eos_token="")
    ids = tok.tokenize(text, add_special=True, parse_special=True)
    s = model.session()
    s.eval(ids)
    for _ in range(3):  # warm: compiled kernels, caches
        s.eval([ids[-1]])
        s.logits()
        s.rewind(1)
    constrained = Sampler(SamplerParams(temp=1.0, seed=seed), constraint=c)
    plain = Sampler(SamplerParams(temp=1.0, seed=seed))
    history = list(ids)
    step, step_cpu, t_plain, t_con = [], [], [], []
    clock = time.thread_time
    logits = s.logits()
    out = []
    while len(out) < n_predict:
        t0 = clock()
        plain.sample(logits, history)
        t1 = clock()
        tid = constrained.sample(logits, history)
        t2 = clock()
        t_plain.append(t1 - t0)
        t_con.append(t2 - t1)
        if tok.is_eog(tid) or constrained.finished:
            out.append(tid)
            break
        out.append(tid)
        history.append(tid)
        t0, c0 = time.perf_counter(), time.process_time()
        s.eval([tid])
        logits = s.logits()
        step.append(time.perf_counter() - t0)
        step_cpu.append(time.process_time() - c0)
    overhead = statistics.mean(t_con) - statistics.mean(t_plain)
    base = statistics.median(step) + statistics.mean(t_plain)
    base_cpu = statistics.median(step_cpu) + statistics.mean(t_plain)
    return {"tokens": len(out), "text": tok.detokenize(out), "step": _ms(step), "step_cpu": _ms(step_cpu),
            "share_cpu": overhead / base_cpu,
            "sampler_plain": _ms(t_plain), "sampler_constrained": _ms(t_con),
            "overhead_ms": 1e3 * overhead, "share": overhead / base}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--vocab", nargs="*", default=None,
                    help="GGUFs whose vocabularies to time (default: the model's, "
                         "models/shapes/qwen2.5-0.5b.Q8_0.gguf, models/gemma-3-270m-q4_k_m.gguf where present)")
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-t", "--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        from runtime.threads import set_threads

        set_threads(a.threads)
    vocabs = a.vocab if a.vocab is not None else [a.model] + [
        str(p) for p in (ROOT / "models/shapes/qwen2.5-0.5b.Q8_0.gguf", ROOT / "models/gemma-3-270m-q4_k_m.gguf")
        if p.exists()]
    for v in vocabs:
        r = bench_vocab(v)
        print(f"{Path(v).name}: {r['type']} {r['n_vocab']} tokens; LLTokenizer {r['lltokenizer_s']:.2f} s "
              f"(once), schema compile {1e3 * r['compile_s']:.1f} ms")
        print(f"  mask per token over {r['tokens']} tokens of a JSON document: {r['mask']}")
        print(f"    llguidance {r['rust']}; unpacking to ids {r['unpack']}")
        print(f"    inside strings ({r['n_string_positions']} positions): {r['in_strings']}; "
              f"structure: {r['structural']}")
    if a.model:
        r = bench_model(a.model, a.n, a.seed)
        print(f"{Path(a.model).name}: constrained generation, {r['tokens']} tokens "
              f"(temperature 1.0, seed {a.seed})")
        print(f"  decode step: wall {r['step']}; process CPU {r['step_cpu']}")
        print(f"  sampler: unconstrained {r['sampler_plain']}; constrained {r['sampler_constrained']}")
        print(f"  constraint cost {r['overhead_ms']:.3f} ms per token (mean) = {100 * r['share']:.1f} % of a "
              f"decode step (median wall step + unconstrained sampling), {100 * r['share_cpu']:.1f} % of "
              f"its CPU time")
        print(f"  output: {r['text']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
