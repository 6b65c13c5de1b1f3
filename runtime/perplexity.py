"""``python -m runtime perplexity MODEL FILE``: llama-perplexity's method.

The whole file is tokenized once (BOS in front only when the model's
tokenizer adds one), cut into chunks of ``ctx`` tokens, and each chunk is run
from an empty cache.  The first token of a chunk is replaced by BOS when the
model uses BOS, so every chunk starts the way the model saw its training data.
Only the second half of each chunk is scored - the logits at positions
``ctx/2 .. ctx-2`` predicting tokens ``ctx/2+1 .. ctx-1`` - so every scored
token has at least ``ctx/2`` tokens of context.

    PPL = exp(mean NLL),  +/- PPL * sqrt((E[NLL^2] - E[NLL]^2) / (count - 1))

which is llama.cpp's standard error (delta method on exp).

Comparing with a base model (the usual way to judge a quantization against
its F16 parent), at the same scored positions, with llama-perplexity's
statistics (``KLStats``, its ``kl_divergence()`` table, same names and
formulas): PPL(Q), PPL(base), their correlation, ln(PPL(Q)/PPL(base)) and the
ratio with uncertainties, KL(base || Q) mean +/- uncertainty and percentiles,
Delta-p = p_Q(token) - p_base(token) mean, percentiles and RMS, and how often
the two argmaxes agree ("same top p").  The base is either

- a live model (``--kl-base MODEL``): both evaluated chunk by chunk, the base's
  log-probabilities in float64, KL over the whole vocabulary; or
- llama-perplexity's log-prob file (``--kl-divergence-base FILE``): a run
  without ``--kl-divergence`` writes the model's log-probabilities there, a run
  with it compares another model against them, with llama.cpp's reader math
  (the file's 16-bit log-probs, KL over the tokens the format keeps).  The file
  is byte for byte llama.cpp's (``KLBaseWriter``, ``KLBaseFile``), so either
  tool can write it and either read it.

Streaming: only one chunk's logits exist at a time; what grows with the file
is its token ids and, with a base, two floats per scored token for the
percentiles.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

__all__ = ["ChunkStats", "KLStats", "KLRows", "KLAccumulator", "PerplexityResult", "Running",
           "token_nll", "kl_and_top1", "kl_rows", "kl_rows_from_records", "log_prob_records",
           "decode_log_prob_records", "record_width", "KLBaseWriter", "KLBaseFile", "KLBaseFileError",
           "KL_MAGIC", "chunk_count", "perplexity_of_tokens", "perplexity_of_text", "perplexity_of_file",
           "kl_divergence_of_file", "format_kl_table", "tokenize_for_perplexity", "cli_perplexity",
           "ChunkJob", "ChunkScore", "chunk_jobs", "score_chunk", "LocalScorer"]

# Rows of logits converted to float64 at a time: bounds the temporary memory
# independently of ctx and vocabulary size (32 x 262144 x 8 B = 64 MiB).
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


class KLRows(NamedTuple):
    """Per scored token: what llama-perplexity's KL mode accumulates."""
    nll: np.ndarray       # float64: -log p_Q(token)
    nll_base: np.ndarray  # float64: -log p_base(token)
    kl: np.ndarray        # float64: KL(base || Q) of the whole next-token distribution
    same: np.ndarray      # bool: argmax_Q == argmax_base
    p_diff: np.ndarray    # float64: p_Q(token) - p_base(token)


def kl_rows(base_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> KLRows:
    """KLRows against a live base: both log-softmaxes in float64, KL over the whole vocabulary."""
    base_logits = np.asarray(base_logits, dtype=np.float32)
    logits = np.asarray(logits, dtype=np.float32)
    if base_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {base_logits.shape} vs {logits.shape}")
    targets = np.asarray(targets, dtype=np.int64)
    n = len(logits)
    if targets.shape != (n,):
        raise ValueError(f"{n} rows of logits but {targets.shape} targets")
    out = KLRows(*(np.empty(n, np.float64) for _ in range(3)), np.empty(n, bool), np.empty(n, np.float64))
    for a in range(0, n, _ROWS):
        b = min(a + _ROWS, n)
        lp_base = _log_softmax64(base_logits[a:b])
        lp = _log_softmax64(logits[a:b])
        ar = np.arange(b - a)
        t = targets[a:b]
        out.nll[a:b] = -lp[ar, t]
        out.nll_base[a:b] = -lp_base[ar, t]
        out.kl[a:b] = (np.exp(lp_base) * (lp_base - lp)).sum(axis=1)
        out.same[a:b] = base_logits[a:b].argmax(axis=1) == logits[a:b].argmax(axis=1)
        out.p_diff[a:b] = np.exp(-out.nll[a:b]) - np.exp(-out.nll_base[a:b])
    # Rounding can leave a hair below zero when the distributions are equal.
    np.maximum(out.kl, 0.0, out=out.kl)
    return out


def kl_and_top1(base_logits: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: KL(base || model) in nats (float64) and whether the argmaxes agree."""
    if base_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {base_logits.shape} vs {logits.shape}")
    r = kl_rows(base_logits, logits, np.zeros(len(logits), np.int64))
    return r.kl, r.same


def _mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """llama-perplexity's mean_and_uncertainty: the mean and its standard error,
    the error 0 unless the variance is positive and there are more than 10 values."""
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


def _covariance(ta: float, tb: float, tab: float, count: int) -> float:
    """llama-perplexity's covariance of the two means (0 under 10 values)."""
    if count < 10:
        return 0.0
    return (tab / count - (ta / count) * (tb / count)) / (count - 1)


def _percentile(values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile of sorted float32 values: linear between the
    two nearest ranks of fraction * (n - 1), in float32 as it computes it."""
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    p = np.float32(fraction) * np.float32(len(values) - 1)
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    hi = values[min(ip + 1, len(values) - 1)]
    return float((np.float32(1) - p) * values[ip] + p * hi)


def _median(values: np.ndarray) -> float:
    n = len(values)
    if n % 2 == 0:
        return float(np.float32(0.5) * (values[n // 2] + values[n // 2 - 1]))
    return float(values[n // 2])


# The percentile rows of llama-perplexity's table: (field suffix, fraction).
_KL_PCT = (("p99_9", 0.999), ("p99", 0.990), ("p95", 0.950), ("p90", 0.900),
           ("p10", 0.100), ("p5", 0.050), ("p1", 0.010), ("p0_1", 0.001))
_DP_PCT = (("p99_9", 0.999), ("p99", 0.990), ("p95", 0.950), ("p90", 0.900), ("p75", 0.750),
           ("p25", 0.250), ("p10", 0.100), ("p5", 0.050), ("p1", 0.010), ("p0_1", 0.001))


@dataclass
class KLStats:
    """llama-perplexity's KL-divergence statistics (fractions, not percent).

    Uncertainties are its standard errors (0 with 10 values or fewer);
    ``ppl_cor`` is None where either log-PPL has no uncertainty."""
    base: str               # the base model, or the --kl-divergence-base file
    source: str             # "model" (live base) or "file" (llama.cpp's uint16 log-probs)
    count: int
    ppl: float              # Mean PPL(Q)
    ppl_err: float
    base_ppl: float         # Mean PPL(base)
    base_ppl_err: float
    ppl_cor: float | None   # Cor(ln(PPL(Q)), ln(PPL(base)))
    ln_ppl_ratio: float     # Mean ln(PPL(Q)/PPL(base))
    ln_ppl_ratio_err: float
    ppl_ratio: float        # Mean PPL(Q)/PPL(base)
    ppl_ratio_err: float
    ppl_diff: float         # Mean PPL(Q)-PPL(base)
    ppl_diff_err: float
    kl_mean: float          # Mean KLD
    kl_err: float
    kl_max: float
    kl_p99_9: float
    kl_p99: float
    kl_p95: float
    kl_p90: float
    kl_median: float
    kl_p10: float
    kl_p5: float
    kl_p1: float
    kl_p0_1: float
    kl_min: float
    dp_mean: float          # Mean Δp
    dp_err: float
    dp_max: float
    dp_p99_9: float
    dp_p99: float
    dp_p95: float
    dp_p90: float
    dp_p75: float
    dp_median: float
    dp_p25: float
    dp_p10: float
    dp_p5: float
    dp_p1: float
    dp_p0_1: float
    dp_min: float
    dp_rms: float           # RMS Δp
    dp_rms_err: float
    top1: float             # Same top p
    top1_err: float


class KLAccumulator:
    """llama-perplexity's kl_divergence_result: running sums over KLRows, plus the
    per-token KL and Delta-p values (float32, as it keeps them) for the percentiles."""

    def __init__(self):
        self.sum_nll = self.sum_nll2 = 0.0
        self.sum_nll_base = self.sum_nll_base2 = self.sum_nll_nll_base = 0.0
        self.sum_kld = self.sum_kld2 = 0.0
        self.sum_p_diff = self.sum_p_diff2 = self.sum_p_diff4 = 0.0
        self.n_same_top = 0
        self.count = 0
        self._kl: list[np.ndarray] = []
        self._dp: list[np.ndarray] = []

    def add(self, rows: KLRows) -> None:
        nll, nb, kl, dp = (np.asarray(x, np.float64) for x in (rows.nll, rows.nll_base, rows.kl, rows.p_diff))
        self.sum_nll += float(nll.sum())
        self.sum_nll2 += float(np.dot(nll, nll))
        self.sum_nll_base += float(nb.sum())
        self.sum_nll_base2 += float(np.dot(nb, nb))
        self.sum_nll_nll_base += float(np.dot(nll, nb))
        self.sum_kld += float(kl.sum())
        self.sum_kld2 += float(np.dot(kl, kl))
        dp2 = dp * dp
        self.sum_p_diff += float(dp.sum())
        self.sum_p_diff2 += float(dp2.sum())
        self.sum_p_diff4 += float(np.dot(dp2, dp2))
        self.n_same_top += int(np.count_nonzero(rows.same))
        self.count += len(nll)
        self._kl.append(kl.astype(np.float32))
        self._dp.append(dp.astype(np.float32))

    # -- the numbers of llama-perplexity's table, same formulas ------------------
    def log_ppl(self):
        return _mean_and_uncertainty(self.sum_nll, self.sum_nll2, self.count)

    def log_ppl_base(self):
        return _mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, self.count)

    def ln_ratio(self) -> tuple[float, float]:
        (lq, dq), (lb, db) = self.log_ppl(), self.log_ppl_base()
        cov = _covariance(self.sum_nll, self.sum_nll_base, self.sum_nll_nll_base, self.count)
        # The same model against itself: the difference of two equal variances
        # can round below zero, where llama.cpp's sqrt would print nan.
        return lq - lb, math.sqrt(max(0.0, dq * dq + db * db - 2.0 * cov))

    def kl_mean(self):
        return _mean_and_uncertainty(self.sum_kld, self.sum_kld2, self.count)

    def dp_rms(self) -> tuple[float, float]:
        mse, mse_err = _mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, self.count)
        rms = math.sqrt(mse)
        return rms, (0.5 / rms * mse_err if rms > 0 else 0.0)

    def same_top(self) -> tuple[float, float]:
        p = self.n_same_top / self.count if self.count else 0.0
        return p, (math.sqrt(p * (1 - p) / (self.count - 1)) if self.count > 1 else 0.0)

    def stats(self, base: str, source: str) -> KLStats:
        if self.count == 0:
            raise ValueError("no scored tokens to compare")
        lq, dq = self.log_ppl()
        lb, db = self.log_ppl_base()
        ppl, ppl_base = math.exp(lq), math.exp(lb)
        ppl_err, ppl_base_err = ppl * dq, ppl_base * db
        cov = _covariance(self.sum_nll, self.sum_nll_base, self.sum_nll_nll_base, self.count)
        cor = cov / (dq * db) if dq > 0 and db > 0 else None
        ln_r, ln_r_err = self.ln_ratio()
        ratio = math.exp(ln_r)
        ppl_cov = ppl * ppl_base * cov
        diff_err = math.sqrt(max(0.0, ppl_err * ppl_err + ppl_base_err * ppl_base_err - 2.0 * ppl_cov))
        kl_m, kl_e = self.kl_mean()
        dp_m, dp_e = _mean_and_uncertainty(self.sum_p_diff, self.sum_p_diff2, self.count)
        rms, rms_e = self.dp_rms()
        top, top_e = self.same_top()
        kls = np.sort(np.concatenate(self._kl))
        dps = np.sort(np.concatenate(self._dp))
        kw = {f"kl_{k}": _percentile(kls, f) for k, f in _KL_PCT}
        kw.update({f"dp_{k}": _percentile(dps, f) for k, f in _DP_PCT})
        return KLStats(base=base, source=source, count=self.count,
                       ppl=ppl, ppl_err=ppl_err, base_ppl=ppl_base, base_ppl_err=ppl_base_err, ppl_cor=cor,
                       ln_ppl_ratio=ln_r, ln_ppl_ratio_err=ln_r_err, ppl_ratio=ratio, ppl_ratio_err=ratio * ln_r_err,
                       ppl_diff=ppl - ppl_base, ppl_diff_err=diff_err,
                       kl_mean=kl_m, kl_err=kl_e, kl_max=float(kls[-1]), kl_median=_median(kls),
                       kl_min=float(kls[0]),
                       dp_mean=dp_m, dp_err=dp_e, dp_max=float(dps[-1]), dp_median=_median(dps),
                       dp_min=float(dps[0]), dp_rms=rms, dp_rms_err=rms_e, top1=top, top1_err=top_e, **kw)


# --------------------------------------------------------------------------
# llama-perplexity's log-prob file (--kl-divergence-base)
#
#   "_logits_"                       8 bytes
#   n_ctx, n_vocab, n_chunk          int32 each (little-endian, as x86 writes them)
#   tokens                           int32 [n_chunk * n_ctx], the text's tokens
#                                    (before any BOS replacement)
#   per chunk, per scored position   n_ctx - 1 - n_ctx/2 records of nv uint16,
#                                    nv = 2 * ceil(n_vocab / 2) + 4:
#     float32 scale, float32 min_log_prob   (the first 4 uint16)
#     uint16 q[n_vocab] (+ one 0 when n_vocab is odd)
#
# log p(token i) = scale * q[i] + min_log_prob, quantized over the top 16 nats:
# min = max(min logit, max logit - 16), scale = (max - min) / 65535, and
# q[i] = round-to-nearest-even((logit_i - min) / scale) where logit_i > min,
# else 0.  Everything below the window reads back as the window's floor.
# --------------------------------------------------------------------------

KL_MAGIC = b"_logits_"
_HEADER = struct.Struct("<8siii")


class KLBaseFileError(ValueError):
    """A --kl-divergence-base file that is not llama-perplexity's format, or does not fit the model."""


def record_width(n_vocab: int) -> int:
    """uint16 values per scored position: the two float32 header values, then n_vocab rounded up to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def log_prob_records(logits: np.ndarray) -> np.ndarray:
    """llama-perplexity's 16-bit log-probabilities of logits [n, n_vocab] (its
    log_softmax(..., uint16_t *)): uint16 [n, record_width(n_vocab)], float32
    arithmetic in its order, so the bytes are the ones it writes."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    n, n_vocab = logits.shape
    out = np.zeros((n, record_width(n_vocab)), np.uint16)
    f32 = np.float32
    for a in range(0, n, _ROWS):
        block = logits[a:a + _ROWS]
        mx = block.max(axis=1)
        mn = np.maximum(block.min(axis=1), mx - f32(16))
        sum_exp = np.exp(block - mx[:, None]).sum(axis=1, dtype=np.float64)
        lse = np.log(sum_exp).astype(f32)
        min_log_prob = (mn - mx) - lse
        scale = (mx - mn) / f32(65535)
        head = np.stack([scale, min_log_prob], axis=1).astype("<f4")
        out[a:a + _ROWS, :4] = head.view("<u2")
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(scale != 0, f32(1) / scale, f32(0)).astype(f32)
            # nearest_int(): float32 product, rounded half to even (np.rint)
            q = np.rint(inv[:, None] * (block - mn[:, None]))
        q = np.where(block > mn[:, None], q, f32(0))
        out[a:a + _ROWS, 4:4 + n_vocab] = q.astype(np.uint16)
    return out


def _record_head(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    head = np.ascontiguousarray(records[:, :4]).view("<f4")
    return head[:, 0].astype(np.float32), head[:, 1].astype(np.float32)


def decode_log_prob_records(records: np.ndarray, n_vocab: int) -> np.ndarray:
    """The base log-probabilities a record holds, float32 [n, n_vocab], as llama.cpp reads them."""
    records = np.asarray(records, dtype=np.uint16)
    scale, min_log_prob = _record_head(records)
    return scale[:, None] * records[:, 4:4 + n_vocab].astype(np.float32) + min_log_prob[:, None]


def kl_rows_from_records(records: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> KLRows:
    """KLRows against base log-probs from the file, llama-perplexity's reader math:
    the model's log-softmax in float32 (exponentials summed in float64), KL over
    the tokens whose stored log-prob is above -16 (the others, rounded to the
    window's floor, are left out as llama.cpp leaves them out), argmaxes first
    index first."""
    logits = np.asarray(logits, dtype=np.float32)
    n, n_vocab = logits.shape
    records = np.asarray(records, dtype=np.uint16)
    if records.shape != (n, record_width(n_vocab)):
        raise ValueError(f"{records.shape} records for {n} rows of {n_vocab} logits")
    targets = np.asarray(targets, dtype=np.int64)
    out = KLRows(*(np.empty(n, np.float64) for _ in range(3)), np.empty(n, bool), np.empty(n, np.float64))
    f32 = np.float32
    for a in range(0, n, _ROWS):
        b = min(a + _ROWS, n)
        block = logits[a:b]
        ar = np.arange(b - a)
        t = targets[a:b]
        mx = block.max(axis=1)
        lse = np.log(np.exp(block - mx[:, None]).sum(axis=1, dtype=np.float64)).astype(f32)
        nll = (mx + lse) - block[ar, t]
        lp_base = decode_log_prob_records(records[a:b], n_vocab)
        nll_base = -lp_base[ar, t]
        top = mx + lse  # log p_Q(i) = logit_i - top
        kept = lp_base > f32(-16)
        terms = np.where(kept, np.exp(lp_base) * (lp_base - block + top[:, None]), f32(0))
        out.nll[a:b] = nll
        out.nll_base[a:b] = nll_base
        out.kl[a:b] = terms.sum(axis=1, dtype=np.float64)
        out.same[a:b] = block.argmax(axis=1) == lp_base.argmax(axis=1)
        out.p_diff[a:b] = np.exp(-nll) - np.exp(-nll_base)
    return out


def _scored_rows(n_ctx: int) -> int:
    return n_ctx - 1 - n_ctx // 2


class KLBaseWriter:
    """Writes llama-perplexity's log-prob file chunk by chunk, to a temporary file
    in the same directory that replaces ``path`` only when every chunk is in
    (an interrupted run leaves no half-written file)."""

    def __init__(self, path, n_ctx: int, n_vocab: int, tokens: np.ndarray):
        tokens = np.asarray(tokens, dtype="<i4").reshape(-1)
        if n_ctx < 4 or len(tokens) == 0 or len(tokens) % n_ctx:
            raise ValueError(f"{len(tokens)} tokens are not whole chunks of {n_ctx}")
        self.path = Path(path)
        self.n_ctx, self.n_vocab, self.n_chunk = int(n_ctx), int(n_vocab), len(tokens) // int(n_ctx)
        self._written = 0
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._f = open(self._tmp, "wb")
        try:
            self._f.write(_HEADER.pack(KL_MAGIC, self.n_ctx, self.n_vocab, self.n_chunk))
            self._f.write(tokens.tobytes())
        except BaseException:
            self.abort()
            raise

    def write_records(self, records: np.ndarray) -> None:
        """The next chunk as log_prob_records of its scored logits (computed where the chunk was scored)."""
        shape = (_scored_rows(self.n_ctx), record_width(self.n_vocab))
        if records is None or records.shape != shape:
            raise ValueError(f"a chunk has {shape} records, got {None if records is None else records.shape}")
        if self._written >= self.n_chunk:
            raise ValueError(f"all {self.n_chunk} chunks are written")
        self._f.write(np.asarray(records, dtype="<u2").tobytes())
        self._written += 1

    def close(self) -> None:
        if self._written != self.n_chunk:
            self.abort()
            raise RuntimeError(f"only {self._written} of {self.n_chunk} chunks written; {self.path} not written")
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


class KLBaseFile:
    """A llama-perplexity log-prob file, read as its kl_divergence() reads it:
    ``tokens`` (int32 [n_chunk * n_ctx]) and ``chunk(i)``, the scored positions'
    records (uint16 [n_ctx - 1 - n_ctx/2, record_width(n_vocab)], memory-mapped)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(_HEADER.size)
        except OSError as e:
            raise KLBaseFileError(f"cannot read {path}: {e.strerror or e}") from None
        if len(head) < 8 or head[:8] != KL_MAGIC:
            raise KLBaseFileError(f"{path} does not look like a file containing log-probabilities "
                                  f"(no {KL_MAGIC.decode()!r} at the start)")
        if len(head) < _HEADER.size:
            raise KLBaseFileError(f"{path} is truncated: {size} bytes, the header alone takes {_HEADER.size}")
        _, n_ctx, n_vocab, n_chunk = _HEADER.unpack(head)
        if n_ctx < 4 or n_vocab < 1 or n_chunk < 1:
            raise KLBaseFileError(f"{path}: implausible header (n_ctx {n_ctx}, n_vocab {n_vocab}, "
                                  f"n_chunk {n_chunk})")
        self.n_ctx, self.n_vocab, self.n_chunk = n_ctx, n_vocab, n_chunk
        self.n_rows = _scored_rows(n_ctx)
        self.nv = record_width(n_vocab)
        tok_bytes = 4 * n_ctx * n_chunk
        expect = _HEADER.size + tok_bytes + 2 * n_chunk * self.n_rows * self.nv
        if size != expect:
            raise KLBaseFileError(f"{path} has {size} bytes; a log-prob file of {n_chunk} chunks of {n_ctx} "
                                  f"tokens over {n_vocab} tokens of vocabulary has {expect}"
                                  + (" (truncated)" if size < expect else ""))
        self.tokens = np.fromfile(self.path, dtype="<i4", count=n_ctx * n_chunk, offset=_HEADER.size)
        self._records = np.memmap(self.path, dtype="<u2", mode="r", offset=_HEADER.size + tok_bytes,
                                  shape=(n_chunk, self.n_rows, self.nv))

    def chunk(self, i: int) -> np.ndarray:
        return self._records[i]


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
    kl_mean: float | None = None   # running, with a base (model or file)
    top1: float | None = None
    ln_ppl_ratio: float | None = None
    dp_rms: float | None = None


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
    precision: str = "fast"          # the model's matmul activations (Model.precision)
    kl_base_written: str | None = None  # the --kl-divergence-base file this run wrote

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


def _check_bos(model) -> bool:
    tok = model.tokenizer
    add_bos = bool(tok.add_bos)
    if add_bos and tok.bos_id is None:
        raise ValueError("the model adds BOS but has no BOS token")
    return add_bos


class ChunkJob(NamedTuple):
    """One chunk to score: everything its scoring needs besides the model(s)."""
    index: int                              # 0-based chunk number
    ids: np.ndarray                         # int32 [n_ctx], as evaluated (BOS first where the model uses it)
    targets: np.ndarray                     # int32 [n_ctx - 1 - n_ctx/2]: what the scored positions predict
    base_records: np.ndarray | None = None  # uint16: this chunk's records of a --kl-divergence-base file


class ChunkScore(NamedTuple):
    """What one chunk contributes to the statistics: per scored token, in position order."""
    index: int
    nll: np.ndarray               # float64: -log p(token)
    kl: KLRows | None             # against the base (model or file), when there is one
    records: np.ndarray | None    # uint16 log-prob records, when a --kl-divergence-base file is written
    eval_seconds: float           # the forward pass(es)
    seconds: float                # the whole scoring
    evaluated: int                # tokens run through a model: n_ctx, 2 n_ctx with a live base


def chunk_jobs(tokens: np.ndarray, n_ctx: int, total: int, bos_id: int | None = None,
               base_file: KLBaseFile | None = None) -> Iterator[ChunkJob]:
    """The first ``total`` chunks of ``tokens``, the first token replaced by ``bos_id`` when given."""
    first = n_ctx // 2
    for i in range(total):
        start = i * n_ctx
        ids = np.array(tokens[start:start + n_ctx], dtype=np.int32)
        if bos_id is not None:
            ids[0] = bos_id
        targets = np.array(tokens[start + first + 1:start + n_ctx], dtype=np.int32)
        yield ChunkJob(i, ids, targets, None if base_file is None else base_file.chunk(i))


def score_chunk(model, job: ChunkJob, *, base=None, want_records: bool = False) -> ChunkScore:
    """One chunk's per-token statistics; a pure function of the model(s) and the job.

    The local loop and the Ray workers (runtime/distributed.py) both call it, so
    a distributed run computes the very same float64 values per token."""
    n_ctx = len(job.ids)
    first = n_ctx // 2
    ids = job.ids.tolist()
    t_chunk = t = time.perf_counter()
    logits = _chunk_logits(model, ids)
    t_eval = time.perf_counter() - t
    if logits.shape[0] != n_ctx:
        raise RuntimeError(f"model returned {logits.shape[0]} rows of logits for {n_ctx} tokens")
    scored = logits[first:n_ctx - 1]
    nll = token_nll(scored, job.targets)
    records = log_prob_records(scored) if want_records else None
    kl = None
    if base is not None:
        t = time.perf_counter()
        base_logits = _chunk_logits(base, ids)
        t_eval += time.perf_counter() - t
        kl = kl_rows(base_logits[first:n_ctx - 1], scored, job.targets)
        del base_logits
    elif job.base_records is not None:
        kl = kl_rows_from_records(job.base_records, scored, job.targets)
    return ChunkScore(job.index, nll, kl, records, t_eval, time.perf_counter() - t_chunk,
                      n_ctx * (2 if base is not None else 1))


class LocalScorer:
    """Scores chunks one after the other in this process."""

    parallel = False   # speed from the forward passes' time, not the wall clock

    def __init__(self, model, base=None):
        self.model, self.base = model, base

    @property
    def with_base(self) -> bool:
        return self.base is not None

    def scores(self, jobs: Iterable[ChunkJob], want_records: bool = False) -> Iterator[ChunkScore]:
        for job in jobs:
            yield score_chunk(self.model, job, base=self.base, want_records=want_records)


class _Merge:
    """The running statistics over ChunkScores taken in chunk order.  Local and
    distributed runs both go through it: the same sums, added in the same order,
    so the results agree to the last bit, not only to the printed digits."""

    def __init__(self, total: int, with_kl: bool, writer: KLBaseWriter | None,
                 on_chunk: Callable[[ChunkStats], None] | None, wall_clock: bool):
        self.total, self.writer, self.on_chunk, self.wall_clock = total, writer, on_chunk, wall_clock
        self.nll = Running()
        self.kld = KLAccumulator() if with_kl else None
        self.chunks: list[ChunkStats] = []
        self.t_eval = 0.0
        self.evaluated = 0
        self.t0 = time.perf_counter()

    def add(self, s: ChunkScore) -> None:
        i = len(self.chunks)
        if s.index != i:
            raise RuntimeError(f"chunk {s.index + 1} arrived where chunk {i + 1} was due")
        self.nll.add(s.nll)
        if self.writer is not None:
            self.writer.write_records(s.records)
        if self.kld is not None:
            self.kld.add(s.kl)
        self.evaluated += s.evaluated
        if self.wall_clock:
            # workers run chunks side by side: the speed is what the cluster delivers
            elapsed = time.perf_counter() - self.t0
            seconds = elapsed / (i + 1)
        else:
            self.t_eval += s.eval_seconds
            elapsed, seconds = self.t_eval, s.seconds
        extra = {}
        if self.kld is not None:
            kld = self.kld
            extra = dict(kl_mean=kld.kl_mean()[0], top1=kld.same_top()[0], ln_ppl_ratio=kld.ln_ratio()[0],
                         dp_rms=kld.dp_rms()[0])
        nll = self.nll
        stats = ChunkStats(chunk=i + 1, n_chunks=self.total, ppl=math.exp(nll.mean),
                           ppl_err=math.exp(nll.mean) * nll.stderr,
                           chunk_ppl=float(math.exp(s.nll.mean())), seconds=seconds,
                           tokens_per_s=self.evaluated / elapsed if elapsed > 0 else float("inf"), **extra)
        self.chunks.append(stats)
        if self.on_chunk is not None:
            self.on_chunk(stats)


def _run(model, tokens: np.ndarray, n_ctx: int, total: int, *, base=None, base_file: KLBaseFile | None = None,
         writer: KLBaseWriter | None = None, base_name: str = "",
         on_chunk: Callable[[ChunkStats], None] | None = None, scorer=None) -> PerplexityResult:
    """The chunk loop: the model's PPL, and KL statistics against a live base or a base file.

    ``scorer`` (default: a LocalScorer of model and base) turns ChunkJobs into
    ChunkScores in chunk order; runtime.distributed.RayScorer is the other one."""
    add_bos = _check_bos(model)
    if scorer is None:
        scorer = LocalScorer(model, base)
    elif scorer.with_base != (base is not None):
        raise ValueError("the scorer's live base and the run's do not match")
    merge = _Merge(total, base is not None or base_file is not None, writer, on_chunk,
                   wall_clock=bool(getattr(scorer, "parallel", False)))
    jobs = chunk_jobs(tokens, n_ctx, total, model.tokenizer.bos_id if add_bos else None, base_file)
    for s in scorer.scores(jobs, want_records=writer is not None):
        merge.add(s)
    if len(merge.chunks) != total:
        raise RuntimeError(f"{len(merge.chunks)} of {total} chunks were scored")

    chunks, nll, kld = merge.chunks, merge.nll, merge.kld
    seconds = time.perf_counter() - merge.t0
    ppl = math.exp(nll.mean)
    result = PerplexityResult(
        ppl=ppl, ppl_err=ppl * nll.stderr, nll_mean=nll.mean, n_ctx=n_ctx, n_chunks=total,
        n_tokens=len(tokens), n_scored=nll.count, add_bos=add_bos, seconds=seconds,
        tokens_per_s=chunks[-1].tokens_per_s, chunks=chunks,
        precision=str(getattr(model, "precision", "fast")))
    if kld is not None:
        result.kl = kld.stats(base_name, "model" if base is not None else "file")
    return result


def perplexity_of_tokens(model, tokens: Sequence[int], *, n_ctx: int = 512, n_chunks: int = -1,
                         base=None, base_name: str = "", kl_base_out=None,
                         on_chunk: Callable[[ChunkStats], None] | None = None, scorer=None) -> PerplexityResult:
    """Run llama-perplexity's method on already tokenized text.

    ``model`` (and ``base``) need ``.logits(ids) -> [len(ids), n_vocab]`` and a
    ``.tokenizer`` with ``add_bos``/``bos_id``.  ``base``: a live base model
    (``result.kl``, llama-perplexity's KL statistics).  ``kl_base_out``: write
    the model's log-probs there in llama-perplexity's --kl-divergence-base
    format (for ``kl_divergence_of_file`` or llama.cpp).  ``on_chunk``
    receives the running statistics after every chunk.  ``scorer``: who
    evaluates the chunks (default here, one after the other; a
    ``runtime.distributed.RayScorer`` over a Ray cluster, holding its own
    copies of model and base: ``model``/``base`` are then only checked).
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    total = chunk_count(len(tokens), n_ctx, n_chunks)
    add_bos = _check_bos(model)
    tok = model.tokenizer
    if base is not None:
        if base.n_vocab != model.n_vocab:
            raise ValueError(f"--kl-base has a different vocabulary ({base.n_vocab} vs {model.n_vocab} tokens)")
        if bool(base.tokenizer.add_bos) != add_bos or (add_bos and base.tokenizer.bos_id != tok.bos_id):
            raise ValueError("--kl-base uses a different BOS convention than the model")
    if kl_base_out is None:
        return _run(model, tokens, n_ctx, total, base=base, base_name=base_name, on_chunk=on_chunk,
                    scorer=scorer)
    writer = KLBaseWriter(kl_base_out, n_ctx, model.n_vocab, tokens[:total * n_ctx])
    try:
        result = _run(model, tokens, n_ctx, total, base=base, base_name=base_name, writer=writer,
                      on_chunk=on_chunk, scorer=scorer)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    result.kl_base_written = str(kl_base_out)
    return result


def kl_divergence_of_file(model, path, *, n_chunks: int = -1,
                          on_chunk: Callable[[ChunkStats], None] | None = None, scorer=None) -> PerplexityResult:
    """llama-perplexity --kl-divergence: the model on the tokens of a log-prob file
    (its chunks, BOS as this model's tokenizer wants it), compared position by
    position with the base's stored log-probs.  ``n_chunks`` > 0 uses only the
    first chunks.  Raises KLBaseFileError when the file does not fit the model."""
    f = path if isinstance(path, KLBaseFile) else KLBaseFile(path)
    if f.n_vocab != model.n_vocab:
        raise KLBaseFileError(f"{f.path} holds log-probs over {f.n_vocab} tokens; the model has "
                              f"{model.n_vocab} (inconsistent vocabulary)")
    n_ctx_model = getattr(model, "n_ctx", None)
    if n_ctx_model is not None and n_ctx_model < f.n_ctx:
        raise KLBaseFileError(f"{f.path} has been computed with a context of {f.n_ctx}, the model's is "
                              f"{n_ctx_model}: load it with n_ctx >= {f.n_ctx}")
    bad = (f.tokens < 0) | (f.tokens >= model.n_vocab)
    if bad.any():
        raise KLBaseFileError(f"{f.path}: token id {int(f.tokens[bad][0])} out of range "
                              f"(vocabulary has {model.n_vocab} tokens)")
    total = f.n_chunk if n_chunks is None or n_chunks < 0 else min(n_chunks, f.n_chunk)
    return _run(model, f.tokens.astype(np.int32), f.n_ctx, total, base_file=f, base_name=str(f.path),
                on_chunk=on_chunk, scorer=scorer)


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


def format_kl_table(k: KLStats) -> str:
    """llama-perplexity's closing tables, its labels and number formats."""
    pm = "\u00b1"
    dp = "\u0394p"
    cor = "nan" if k.ppl_cor is None else f"{100 * k.ppl_cor:6.2f}"
    lines = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {k.ppl:10.6f} {pm} {k.ppl_err:10.6f}",
             f"Mean PPL(base)                : {k.base_ppl:10.6f} {pm} {k.base_ppl_err:10.6f}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {cor}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {k.ln_ppl_ratio:10.6f} {pm} {k.ln_ppl_ratio_err:10.6f}",
             f"Mean PPL(Q)/PPL(base)         : {k.ppl_ratio:10.6f} {pm} {k.ppl_ratio_err:10.6f}",
             f"Mean PPL(Q)-PPL(base)         : {k.ppl_diff:10.6f} {pm} {k.ppl_diff_err:10.6f}",
             "",
             "====== KL divergence statistics ======",
             f"Mean    KLD: {k.kl_mean:10.6f} {pm} {k.kl_err:10.6f}",
             f"Maximum KLD: {k.kl_max:10.6f}"]
    label = {"p99_9": "99.9%", "p99": "99.0%", "p95": "95.0%", "p90": "90.0%", "p75": "75.0%", "p25": "25.0%",
             "p10": "10.0%", "p5": " 5.0%", "p1": " 1.0%", "p0_1": " 0.1%"}
    for key, _ in _KL_PCT:
        lines.append(f"{label[key]}   KLD: {getattr(k, 'kl_' + key):10.6f}")
        if key == "p90":
            lines.append(f"Median  KLD: {k.kl_median:10.6f}")
    lines += [f"Minimum KLD: {k.kl_min:10.6f}",
              "",
              "====== Token probability statistics ======",
              f"Mean    {dp}: {100 * k.dp_mean:6.3f} {pm} {100 * k.dp_err:5.3f} %",
              f"Maximum {dp}: {100 * k.dp_max:6.3f}%"]
    for key, _ in _DP_PCT:
        lines.append(f"{label[key]}   {dp}: {100 * getattr(k, 'dp_' + key):6.3f}%")
        if key == "p75":
            lines.append(f"Median  {dp}: {100 * k.dp_median:6.3f}%")
    lines += [f"Minimum {dp}: {100 * k.dp_min:6.3f}%",
              f"RMS {dp}    : {100 * k.dp_rms:6.3f} {pm} {100 * k.dp_rms_err:5.3f} %",
              f"Same top p: {100 * k.top1:6.3f} {pm} {100 * k.top1_err:5.3f} %"]
    return "\n".join(lines)


def _for_stream(text: str, stream) -> str:
    """llama.cpp prints ± and Δ; a terminal whose encoding has no such characters gets +/- and d."""
    try:
        text.encode(getattr(stream, "encoding", None) or "utf-8")
        return text
    except (UnicodeEncodeError, LookupError):
        return text.replace("\u00b1", "+/-").replace("\u0394", "d")


def _chunk_line(s: ChunkStats) -> str:
    """The running line printed after each chunk."""
    extra = "" if s.kl_mean is None else (f"  ln(PPL(Q)/PPL(base)) {s.ln_ppl_ratio:.5f}  KLD "
                                          f"{s.kl_mean:.6f}  RMS dp {100 * s.dp_rms:.3f}%  "
                                          f"same top {100 * s.top1:.2f}%")
    return f"[{s.chunk}/{s.n_chunks}] ppl {s.ppl:.4f} +/- {s.ppl_err:.4f}  (chunk {s.chunk_ppl:.4f}){extra}"


def _format(r: PerplexityResult, model_name: str, file_name: str) -> str:
    lines = [f"model   {model_name} (precision {r.precision})",
             f"file    {file_name}: {r.n_tokens} tokens, {r.n_chunks} chunks of {r.n_ctx}"
             f" ({r.n_scored} scored, BOS {'on' if r.add_bos else 'off'})",
             f"speed   {r.tokens_per_s:.1f} tokens/s, {r.seconds:.1f} s",
             f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}"]
    if r.kl_base_written:
        lines.append(f"log-probs written to {r.kl_base_written} (llama-perplexity --kl-divergence-base format)")
    if r.kl is not None:
        what = "model" if r.kl.source == "model" else "log-prob file"
        lines += ["", f"base    {what} {r.kl.base}", "", format_kl_table(r.kl)]
    return "\n".join(lines)


def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _check_output(out: str, *keep) -> None:
    """The --kl-divergence-base file to write: never the model or the text, never
    an existing file that is not a log-prob file (llama.cpp would overwrite it)."""
    for k in keep:
        if k is not None and _same_file(out, k):
            raise ValueError(f"--kl-divergence-base {out} is an input of this run; refusing to overwrite it")
    p = Path(out)
    if p.is_dir():
        raise ValueError(f"--kl-divergence-base {out} is a directory")
    if p.exists() and p.stat().st_size > 0:
        with open(p, "rb") as f:
            if f.read(8) != KL_MAGIC:
                raise ValueError(f"{out} exists and is not a log-prob file; refusing to overwrite it")
    if not p.parent.exists():
        raise ValueError(f"--kl-divergence-base {out}: no such directory {p.parent}")


def _ray_scorer(args, model, n_ctx: int, precision: str, n_chunks: int):
    """--ray: a RayScorer holding the model (and --kl-base) on the cluster's workers; None without --ray."""
    from .cli import CLIError
    from .distributed import RayScorer, model_ref

    scorer = RayScorer(model_ref(args.model), model_ref(args.kl_base) if args.kl_base else None, n_ctx=n_ctx,
                       precision=precision, address=args.ray or None, workers=args.ray_workers,
                       threads=args.threads, limit=n_chunks)
    if scorer.n_vocab != model.n_vocab:
        scorer.close()
        raise CLIError(f"the Ray workers' {args.model} has {scorer.n_vocab} tokens of vocabulary, this "
                       f"machine's {model.n_vocab}: the nodes do not hold the same file")
    nodes = sorted({w["node"] for w in scorer.info})
    print(f"ray: {scorer.workers} workers x {scorer.threads} threads on {len(nodes)} node"
          f"{'s' if len(nodes) != 1 else ''}", file=sys.stderr, flush=True)
    return scorer


def cli_perplexity(args) -> int:
    from .cli import CLIError
    from .model import Model

    precision = getattr(args, "precision", None) or "fast"
    kl_file = getattr(args, "kl_divergence_base", None)
    kl_mode = bool(getattr(args, "kl_divergence", False))
    if kl_mode and not kl_file:
        raise CLIError("--kl-divergence needs --kl-divergence-base FILE (the base's log-probs, "
                       "written by a run without --kl-divergence)")
    if args.kl_base and kl_file:
        raise CLIError("--kl-base compares against a live model, --kl-divergence-base against (or into) "
                       "a log-prob file: use one of them")
    if args.ctx is not None and args.ctx < 4:
        raise CLIError(f"--ctx must be at least 4 (got {args.ctx})")
    if args.chunks == 0 or args.chunks < -1:
        raise CLIError(f"--chunks must be positive or -1 (got {args.chunks})")
    if args.file is not None and not Path(args.file).is_file():
        raise CLIError(f"no such file: {args.file}")
    use_ray = getattr(args, "ray", None) is not None
    if getattr(args, "ray_workers", None) is not None and not use_ray:
        raise CLIError("--ray-workers needs --ray")
    if use_ray:
        from .distributed import require_ray

        require_ray()   # before loading anything: one line naming the extra
    scorer = None

    progress = _Progress()

    def on_chunk(s: ChunkStats) -> None:
        if not args.json:
            print(_chunk_line(s), flush=True)
        progress.update(s)

    if kl_mode:
        base_file = KLBaseFile(kl_file)
        if args.ctx is not None and args.ctx != base_file.n_ctx:
            raise CLIError(f"{kl_file} was written with chunks of {base_file.n_ctx} tokens; "
                           f"drop --ctx or pass --ctx {base_file.n_ctx}")
        model = Model.load(args.model, n_ctx=base_file.n_ctx, precision=precision)
        if args.file is not None:
            # llama.cpp ignores the text here; we check that it is the text the file was made from.
            text = Path(args.file).read_text(encoding="utf-8", errors="replace")
            mine = tokenize_for_perplexity(model, text)[:len(base_file.tokens)]
            if mine != base_file.tokens.tolist():
                raise CLIError(f"{args.file} does not tokenize to the tokens stored in {kl_file} "
                               f"(another text, or another tokenizer)")
        if use_ray:
            scorer = _ray_scorer(args, model, base_file.n_ctx, precision,
                                 base_file.n_chunk if args.chunks < 0 else min(args.chunks, base_file.n_chunk))
        try:
            r = kl_divergence_of_file(model, base_file, n_chunks=args.chunks, on_chunk=on_chunk, scorer=scorer)
        finally:
            if scorer is not None:
                scorer.close()
        file_name = f"{kl_file} (tokens)"
    else:
        if args.file is None:
            raise CLIError("give a text file (or --kl-divergence with --kl-divergence-base FILE)")
        n_ctx = args.ctx or 512
        model = Model.load(args.model, n_ctx=n_ctx, precision=precision)
        base = Model.load(args.kl_base, n_ctx=n_ctx, precision=precision) if args.kl_base else None
        if kl_file:
            _check_output(kl_file, model.gguf.path, args.file)
        text = Path(args.file).read_text(encoding="utf-8", errors="replace")
        tokens = tokenize_for_perplexity(model, text)
        del text
        try:
            total = chunk_count(len(tokens), n_ctx, args.chunks)
        except ValueError as e:
            raise CLIError(str(e)) from None
        if use_ray:
            scorer = _ray_scorer(args, model, n_ctx, precision, total)
        try:
            r = perplexity_of_tokens(model, tokens, n_ctx=n_ctx, n_chunks=args.chunks, base=base,
                                     base_name=str(args.kl_base or ""), kl_base_out=kl_file, on_chunk=on_chunk,
                                     scorer=scorer)
        finally:
            if scorer is not None:
                scorer.close()
        file_name = str(args.file)
    if args.json:
        d = r.to_dict()
        d["model"], d["file"] = str(args.model), (str(args.file) if args.file is not None else None)
        print(json.dumps(d, indent=2))
    else:
        print(_for_stream(_format(r, str(args.model), file_name), sys.stdout))
    return 0
