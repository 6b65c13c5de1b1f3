"""``python -m runtime generate MODEL -p PROMPT``: stream a completion.

The loop is llama.cpp's: evaluate the prompt in one batch, then sample a
token, print its text (through the tokenizer's streaming decoder, so a
character split over tokens is never printed half), evaluate it, repeat,
until an end-of-generation token, ``-n`` tokens or a full context.  Timings
go to stderr at the end, prompt and generation separately, as llama.cpp's
``llama_perf_context_print`` does.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from .chat_template import MAX_CHARS_PER_TOKEN
from .cli import CLIError
from .sampling import Sampler, SamplerParams

__all__ = ["Timings", "stream_reply", "load_model", "finish_reason", "cut_short_message", "cli_generate"]


@dataclass
class Timings:
    n_prompt: int = 0
    t_prompt: float = 0.0
    n_gen: int = 0
    t_gen: float = 0.0
    stop: str = ""          # "eog" (also: a constraint's grammar completed), "limit", "context", "interrupted"
    complete: bool | None = None  # with a constraint: the output satisfies it (None: no constraint)

    @staticmethod
    def _rate(n, t):
        return n / t if t > 0 else float("nan")

    @property
    def prompt_tps(self) -> float:
        return self._rate(self.n_prompt, self.t_prompt)

    @property
    def gen_tps(self) -> float:
        return self._rate(self.n_gen, self.t_gen)

    def lines(self) -> list[str]:
        def line(label, n, t):
            ms = 1e3 * t / n if n else 0.0
            return (f"{label:>17} = {1e3 * t:10.2f} ms / {n:5d} tokens "
                    f"({ms:8.2f} ms per token, {self._rate(n, t):8.2f} tokens per second)")
        return [line("prompt eval time", self.n_prompt, self.t_prompt),
                line("eval time", self.n_gen, self.t_gen)]


def stream_reply(session, tokenizer, sampler: Sampler, *, n_predict: int, n_ctx: int,
                 history: list[int], evaluated: list[int] | None = None,
                 should_stop=lambda: False, timings: Timings | None = None):
    """Yield text pieces of a reply whose prompt is already in ``session``.

    Each sampled token is appended to ``history`` (the penalty window); the
    ones fed back into the KV cache to ``evaluated`` too (the last sampled
    token is not evaluated: nothing needs its logits yet).  ``timings.stop``
    says why it ended."""
    timings = timings if timings is not None else Timings()
    decoder = tokenizer.decoder()
    t0 = time.perf_counter()
    logits = session.logits()
    n = 0
    stop = "limit"
    try:
        while True:
            if should_stop():
                stop = "interrupted"
                break
            tok = sampler.sample(logits, history)
            if tokenizer.is_eog(tok):
                stop = "eog"
                break
            history.append(tok)
            n += 1
            piece = decoder.feed(tok)
            if piece:
                yield piece
            if sampler.finished:
                # the constraint's grammar is complete: EOS is forced, so stop here
                # rather than evaluate the token only to sample that EOS
                stop = "eog"
                break
            if 0 <= n_predict <= n:
                stop = "limit"
                break
            if session.n_past >= n_ctx:
                stop = "context"
                break
            if should_stop():
                stop = "interrupted"
                break
            session.eval([tok])
            if evaluated is not None:
                evaluated.append(tok)
            logits = session.logits()
        tail = decoder.flush()
        if tail:
            yield tail
    finally:
        timings.n_gen = n
        timings.t_gen = time.perf_counter() - t0
        timings.stop = stop
        timings.complete = sampler.complete if sampler.constraint is not None else None


def load_model(name_or_path, n_ctx=None, precision: str = "fast"):
    """Model.load with a one-line error for the user when the file is bad.
    precision: "fast" (llama.cpp's integer activations) or "exact" (float32 in every matmul)."""
    from .model import Model
    from .registry import resolve_model

    path = resolve_model(name_or_path)
    return Model.load(path, n_ctx=n_ctx, precision=precision)


def finish_reason(timings: Timings) -> str:
    """OpenAI's name for why a completion ended: "stop" (EOS, or a constraint's
    grammar complete) or "length" (-n or the context ran out)."""
    return {"eog": "stop", "limit": "length", "context": "length"}.get(timings.stop, timings.stop)


def cut_short_message(timings: Timings, constraint, n_predict: int, n_ctx: int) -> str | None:
    """One line saying that a constrained output stopped before its grammar was
    complete (so it will not parse), or None when it is complete or unconstrained."""
    if constraint is None or timings.complete is not False:
        return None
    what = {"json_schema": "the JSON schema", "json_object": "the JSON object"}.get(
        constraint.kind, "the grammar")
    why = {"limit": f"-n {n_predict} tokens ran out", "context": f"the context ({n_ctx} tokens) filled up",
           "interrupted": "it was interrupted"}.get(timings.stop, timings.stop)
    hint = " (raise -n/--n-predict)" if timings.stop == "limit" else ""
    return f"the output is cut off: {why} before {what} was complete{hint}"


def _finite(x: float):
    return round(x, 3) if x == x and abs(x) != float("inf") else None


def cli_generate(args) -> int:
    params = SamplerParams.from_args(args)
    model = load_model(args.model, n_ctx=args.ctx_size, precision=getattr(args, "precision", "fast"))
    tok = model.tokenizer
    if len(args.prompt) > MAX_CHARS_PER_TOKEN * model.n_ctx:  # refused before paying to tokenize it
        raise CLIError(f"the prompt has {len(args.prompt)} characters, more than can fit in the "
                       f"{model.n_ctx}-token context ({MAX_CHARS_PER_TOKEN} per token at most; "
                       f"raise -c/--ctx-size, at most the model's training context)")
    ids = tok.tokenize(args.prompt, add_special=True, parse_special=True)
    if not ids:
        raise CLIError("the prompt is empty (no tokens)")
    if len(ids) >= model.n_ctx:
        raise CLIError(f"the prompt has {len(ids)} tokens but the context holds {model.n_ctx} "
                       f"(raise -c/--ctx-size, at most the model's training context)")
    from .constraint import from_args

    constraint = from_args(args, tok)   # compiled before any work: a bad schema fails fast
    sampler = Sampler(params, constraint=constraint)
    session = model.session()

    out = sys.stdout
    as_json = getattr(args, "json", False)
    if not as_json:
        out.write(tok.detokenize(ids))  # echo the prompt, as llama.cpp does
        out.flush()
    timings = Timings(n_prompt=len(ids))
    t0 = time.perf_counter()
    session.eval(ids)
    timings.t_prompt = time.perf_counter() - t0
    history = list(ids)
    pieces = []
    for piece in stream_reply(session, tok, sampler, n_predict=args.n_predict, n_ctx=model.n_ctx,
                              history=history, timings=timings):
        if as_json:
            pieces.append(piece)
        else:
            out.write(piece)
            out.flush()
    cut = cut_short_message(timings, constraint, args.n_predict, model.n_ctx)
    if as_json:
        import json

        result = {
            "content": "".join(pieces),
            "finish_reason": finish_reason(timings),
            "stop_type": timings.stop,
            "tokens_evaluated": timings.n_prompt,
            "tokens_predicted": timings.n_gen,
            "timings": {"prompt_n": timings.n_prompt, "prompt_ms": _finite(1e3 * timings.t_prompt),
                        "prompt_per_second": _finite(timings.prompt_tps),
                        "predicted_n": timings.n_gen, "predicted_ms": _finite(1e3 * timings.t_gen),
                        "predicted_per_second": _finite(timings.gen_tps)},
        }
        if constraint is not None:
            result["constraint"] = constraint.kind
            result["complete"] = bool(timings.complete)
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
        out.flush()
        if cut:
            print(f"generate: {cut}", file=sys.stderr)
        return 0
    out.write("\n")
    out.flush()
    if timings.stop == "context":
        print(f"generate: stopped: the context ({model.n_ctx} tokens) is full", file=sys.stderr)
    if cut:
        print(f"generate: {cut}", file=sys.stderr)
    print(file=sys.stderr)
    for line in timings.lines():
        print(line, file=sys.stderr)
    return 0
