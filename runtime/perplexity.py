"""``python -m runtime perplexity MODEL FILE``: llama-perplexity's method.

The whole file is tokenized once (BOS in front only when the model's
tokenizer adds one), cut into chunks of ``ctx`` tokens, and each chunk is run
from an empty cache.  The first token of a chunk is replaced by BOS when the
model uses BOS, so every chunk starts the way the model saw its training data.
Only the second half of each chunk is scored - the logits at positions
``ctx/2 .. ctx-2`` predicting tokens ``ctx/2+1 .. ctx-1`` - so every scored
token has at least ``ctx/2`` tokens of context.

    PPL = exp(mean NLL),  +/- PPL * sqrt((E[NLL^2] - E[NLL]^2) / (count - 1))

which is llama.cpp's standard error (delta method on exp).  With a base model
(``--kl-base``) the same positions also give KL(base || model) and top-1
agreement, the usual way to judge a quantization against its F16 parent.

Streaming: only one chunk's logits exist at a time; what grows with the file
is its token ids (and, with a base model, one float per scored token for the
KL percentiles).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = ["ChunkStats", "KLStats", "PerplexityResult", "Running", "token_nll",
           "kl_and_top1", "chunk_count", "perplexity_of_tokens", "perplexity_of_text",
           "perplexity_of_file", "cli_perplexity"]

# Rows of logits converted to float64 at a time: bounds the temporary memory
# independently of ctx and vocabulary size (64 x 262144 x 8 B = 128 MiB).
_ROWS = 32


# --------------------------------------------------------------------------
# the statistics
# --------------------------------------------------------------------------

@dataclass
class Running:
    """Sum, sum of squares and count of a per-token quantity."""

    total: float = 0.0
    total2: float = 0.0
    count: int = 0

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        self.total += float(v.sum())
        self.total2 += float(np.dot(v, v))
        self.count += int(v.size)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def stderr(self) -> float:
        """Standard error of the mean, as llama.cpp computes it (0 when undefined)."""
        if self.count < 2:
            return 0.0
        var = self.total2 / self.count - self.mean ** 2
        return math.sqrt(var / (self.count - 1)) if var > 0 else 0.0


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets[i]`` under ``logits[i]``, float64.

    Like llama.cpp: max subtracted in float32, exponentials summed in float64.
    """
    logits = np.asarray(logits, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    out = np.empty(len(targets), dtype=np.float64)
    for a in range(0, len(targets), _ROWS):
        block = logits[a:a + _ROWS]
        m = block.max(axis=1, keepdims=True)
        sum_exp = np.exp(block - m).sum(axis=1, dtype=np.float64)
        picked = block[np.arange(len(block)), targets[a:a + _ROWS]] - m[:, 0]
        out[a:a + _ROWS] = np.log(sum_exp) - picked.astype(np.float64)
    return out


def _log_softmax64(block: np.ndarray) -> np.ndarray:
    x = block.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def kl_and_top1(base_logits: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: KL(base || model) in nats (float64) and whether the argmaxes agree."""
    if base_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {base_logits.shape} vs {logits.shape}")
    n = len(logits)
    kl = np.empty(n, dtype=np.float64)
    same = np.empty(n, dtype=bool)
    for a in range(0, n, _ROWS):
        lp_base = _log_softmax64(base_logits[a:a + _ROWS])
        lp = _log_softmax64(logits[a:a + _ROWS])
        kl[a:a + _ROWS] = (np.exp(lp_base) * (lp_base - lp)).sum(axis=1)
        same[a:a + _ROWS] = lp_base.argmax(axis=1) == lp.argmax(axis=1)
    # Rounding can leave a hair below zero when the distributions are equal.
    np.maximum(kl, 0.0, out=kl)
    return kl, same


# --------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------

@dataclass
class ChunkStats:
    chunk: int              # 1-based
    n_chunks: int
    ppl: float              # running value over chunks 1..chunk
    ppl_err: float
    chunk_ppl: float        # this chunk alone
    seconds: float          # wall time of this chunk's forward pass(es)
    tokens_per_s: float     # evaluated tokens per second so far
    kl_mean: float | None = None   # running, with a base model
    top1: float | None = None


@dataclass
class KLStats:
    base: str
    kl_mean: float
    kl_err: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1: float             # fraction of scored positions with the same argmax
    top1_err: float
    base_ppl: float
    base_ppl_err: float


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float
    nll_mean: float
    n_ctx: int
    n_chunks: int
    n_tokens: int           # tokens in the whole file
    n_scored: int
    add_bos: bool
    seconds: float
    tokens_per_s: float
    chunks: list[ChunkStats] = field(default_factory=list)
    kl: KLStats | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def chunk_count(n_tokens: int, n_ctx: int, n_chunks: int = -1) -> int:
    """How many chunks llama.cpp evaluates: whole chunks only, at least two needed."""
    if n_ctx < 4:
        raise ValueError(f"ctx must be at least 4 (got {n_ctx})")
    if n_tokens < 2 * n_ctx:
        raise ValueError(f"need at least {2 * n_ctx} tokens for a context of {n_ctx}; "
                         f"the text tokenizes to only {n_tokens}")
    most = n_tokens // n_ctx
    return most if n_chunks is None or n_chunks < 0 else min(n_chunks, most)


# --------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------

def _chunk_logits(model, ids: list[int]) -> np.ndarray:
    return np.asarray(model.logits(ids), dtype=np.float32)


def perplexity_of_tokens(model, tokens: Sequence[int], *, n_ctx: int = 512, n_chunks: int = -1,
                         base=None, base_name: str = "",
                         on_chunk: Callable[[ChunkStats], None] | None = None) -> PerplexityResult:
    """Run llama-perplexity's method on already tokenized text.

    ``model`` (and ``base``) need ``.logits(ids) -> [len(ids), n_vocab]`` and a
    ``.tokenizer`` with ``add_bos``/``bos_id``.  ``on_chunk`` receives the
    running statistics after every chunk.
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    total = chunk_count(len(tokens), n_ctx, n_chunks)
    tok = model.tokenizer
    add_bos = bool(tok.add_bos)
    if add_bos and tok.bos_id is None:
        raise ValueError("the model adds BOS but has no BOS token")
    if base is not None:
        if base.n_vocab != model.n_vocab:
            raise ValueError(f"--kl-base has a different vocabulary ({base.n_vocab} vs {model.n_vocab} tokens)")
        if bool(base.tokenizer.add_bos) != add_bos or (add_bos and base.tokenizer.bos_id != tok.bos_id):
            raise ValueError("--kl-base uses a different BOS convention than the model")

    first = n_ctx // 2
    nll, nll_base, kl_run = Running(), Running(), Running()
    kl_values: list[np.ndarray] = []
    n_same = 0
    chunks: list[ChunkStats] = []
    t_eval = 0.0
    t0 = time.perf_counter()
    for i in range(total):
        start = i * n_ctx
        ids = tokens[start:start + n_ctx].tolist()
        if add_bos:
            ids[0] = tok.bos_id
        targets = tokens[start + first + 1:start + n_ctx]

        t_chunk = t = time.perf_counter()
        logits = _chunk_logits(model, ids)
        t_eval += time.perf_counter() - t
        if logits.shape[0] != n_ctx:
            raise RuntimeError(f"model returned {logits.shape[0]} rows of logits for {n_ctx} tokens")
        scored = logits[first:n_ctx - 1]
        v = token_nll(scored, targets)
        nll.add(v)
        kl_mean = top1 = None
        if base is not None:
            t = time.perf_counter()
            base_logits = _chunk_logits(base, ids)
            t_eval += time.perf_counter() - t
            base_scored = base_logits[first:n_ctx - 1]
            nll_base.add(token_nll(base_scored, targets))
            kl, same = kl_and_top1(base_scored, scored)
            kl_run.add(kl)
            kl_values.append(kl.astype(np.float32))
            n_same += int(same.sum())
            kl_mean, top1 = kl_run.mean, n_same / kl_run.count
            del base_logits, base_scored
        del logits, scored

        evaluated = (i + 1) * n_ctx * (2 if base is not None else 1)
        stats = ChunkStats(chunk=i + 1, n_chunks=total, ppl=math.exp(nll.mean),
                           ppl_err=math.exp(nll.mean) * nll.stderr,
                           chunk_ppl=float(math.exp(v.mean())), seconds=time.perf_counter() - t_chunk,
                           tokens_per_s=evaluated / t_eval if t_eval > 0 else float("inf"),
                           kl_mean=kl_mean, top1=top1)
        chunks.append(stats)
        if on_chunk is not None:
            on_chunk(stats)

    seconds = time.perf_counter() - t0
    ppl = math.exp(nll.mean)
    result = PerplexityResult(
        ppl=ppl, ppl_err=ppl * nll.stderr, nll_mean=nll.mean, n_ctx=n_ctx, n_chunks=total,
        n_tokens=len(tokens), n_scored=nll.count, add_bos=add_bos, seconds=seconds,
        tokens_per_s=chunks[-1].tokens_per_s, chunks=chunks)
    if base is not None:
        allkl = np.concatenate(kl_values)
        p = n_same / kl_run.count
        base_ppl = math.exp(nll_base.mean)
        result.kl = KLStats(
            base=base_name, kl_mean=kl_run.mean, kl_err=kl_run.stderr,
            kl_median=float(np.median(allkl)), kl_p99=float(np.percentile(allkl, 99)),
            kl_max=float(allkl.max()), top1=p,
            top1_err=math.sqrt(p * (1 - p) / (kl_run.count - 1)) if kl_run.count > 1 else 0.0,
            base_ppl=base_ppl, base_ppl_err=base_ppl * nll_base.stderr)
    return result


def tokenize_for_perplexity(model, text: str) -> list[int]:
    """The whole text, BOS first only if the model adds one (llama.cpp's common_tokenize(.., true))."""
    tok = model.tokenizer
    if getattr(tok, "add_eos", False):
        # llama-perplexity refuses these too: an EOS would land mid-stream.
        raise ValueError("the model's tokenizer appends EOS; perplexity over a stream is not defined")
    return list(tok.tokenize(text, add_special=True, parse_special=False))


def perplexity_of_text(model, text: str, **kw) -> PerplexityResult:
    return perplexity_of_tokens(model, tokenize_for_perplexity(model, text), **kw)


def perplexity_of_file(model, path, **kw) -> PerplexityResult:
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return perplexity_of_text(model, text, **kw)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------

class _Progress:
    """One redrawn line on stderr (a line per chunk when stderr is not a terminal)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def update(self, s: ChunkStats) -> None:
        width = 24
        done = int(width * s.chunk / s.n_chunks)
        eta = (s.n_chunks - s.chunk) * s.seconds
        line = (f"[{'#' * done}{'.' * (width - done)}] {s.chunk}/{s.n_chunks} "
                f"ppl {s.ppl:.4f}  {s.tokens_per_s:.0f} tok/s  eta {eta:.0f}s")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            if s.chunk == s.n_chunks:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _format(r: PerplexityResult, model_name: str, file_name: str) -> str:
    lines = [f"model   {model_name}",
             f"file    {file_name}: {r.n_tokens} tokens, {r.n_chunks} chunks of {r.n_ctx}"
             f" ({r.n_scored} scored, BOS {'on' if r.add_bos else 'off'})",
             f"speed   {r.tokens_per_s:.1f} tokens/s, {r.seconds:.1f} s",
             f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}"]
    if r.kl is not None:
        k = r.kl
        lines += [f"base    {k.base}: PPL = {k.base_ppl:.4f} +/- {k.base_ppl_err:.5f}",
                  f"Mean    KLD: {k.kl_mean:.6f} +/- {k.kl_err:.6f}   "
                  f"(median {k.kl_median:.6f}, 99% {k.kl_p99:.6f}, max {k.kl_max:.6f})",
                  f"Same top p: {100 * k.top1:.3f} +/- {100 * k.top1_err:.3f} %"]
    return "\n".join(lines)


def cli_perplexity(args) -> int:
    from .cli import CLIError
    from .model import Model

    path = Path(args.file)
    if not path.is_file():
        raise CLIError(f"no such file: {args.file}")
    if args.ctx < 4:
        raise CLIError(f"--ctx must be at least 4 (got {args.ctx})")
    if args.chunks == 0 or args.chunks < -1:
        raise CLIError(f"--chunks must be positive or -1 (got {args.chunks})")
    model = Model.load(args.model, n_ctx=args.ctx)
    base = Model.load(args.kl_base, n_ctx=args.ctx) if args.kl_base else None

    text = path.read_text(encoding="utf-8", errors="replace")
    tokens = tokenize_for_perplexity(model, text)
    del text
    try:
        chunk_count(len(tokens), args.ctx, args.chunks)
    except ValueError as e:
        raise CLIError(str(e)) from None

    progress = _Progress()

    def on_chunk(s: ChunkStats) -> None:
        if not args.json:
            extra = "" if s.kl_mean is None else f"  KLD {s.kl_mean:.6f}  top-1 {100 * s.top1:.2f}%"
            print(f"[{s.chunk}/{s.n_chunks}] ppl {s.ppl:.4f} +/- {s.ppl_err:.4f}  "
                  f"(chunk {s.chunk_ppl:.4f}){extra}", flush=True)
        progress.update(s)

    r = perplexity_of_tokens(model, tokens, n_ctx=args.ctx, n_chunks=args.chunks, base=base,
                             base_name=str(args.kl_base or ""), on_chunk=on_chunk)
    if args.json:
        d = r.to_dict()
        d["model"], d["file"] = str(args.model), str(args.file)
        print(json.dumps(d, indent=2))
    else:
        print(_format(r, str(args.model), str(args.file)))
    return 0
