"""Turning logits into the next token, with llama.cpp's semantics and defaults.

Each stage is a small function over a *candidate set*: a pair of arrays
``(ids, logits)`` (int64 token ids, float32 logits).  The default chain is
llama.cpp's: penalties -> top-k 40 -> top-p 0.95 -> min-p 0.05 -> temperature
0.8 -> sample from the renormalised distribution.  Top-p and min-p look at the
softmax *before* temperature, as llama.cpp does, so temperature only reshapes
what is left.  A temperature <= 0 means greedy (argmax after the penalties).

Ties are broken by the lower token id everywhere (top-k's boundary, top-p's
order, greedy), so a kept set is a deterministic function of the logits.

Cost: top-k uses ``np.argpartition`` (O(V)) and then sorts only k values;
top-p without top-k partitions progressively (64, 256, ... largest) until the
nucleus is inside the partition, instead of sorting all V logits; on a large
vocabulary the sampler uses ``nucleus`` instead, which finds the same set in O(V)
through a histogram of probability mass (a flat 152k distribution would otherwise
mean sorting most of the vocabulary: 20 ms).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, fields

import numpy as np
from numba import njit

__all__ = ["SamplerParams", "Sampler", "apply_penalties", "top_k", "top_p", "min_p",
           "temperature", "softmax", "sample_categorical", "greedy", "nucleus"]


_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class SamplerParams:
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1

    def __post_init__(self):
        # NaN passes every range check below (all comparisons are False) and then
        # poisons the logits: a NaN repeat penalty made greedy decoding pick the
        # very token it penalised.  So first: every value is a finite number.
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ValueError(f"{f.name} must be a number, got {v!r}")
            if isinstance(v, (float, np.floating)) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v}")
            if f.type in (int, "int"):
                if v != int(v):
                    raise ValueError(f"{f.name} must be a whole number, got {v}")
                setattr(self, f.name, int(v))
            else:
                if abs(v) > _FLOAT32_MAX:  # penalties and logits are float32
                    raise ValueError(f"{f.name} is too large, got {v}")
                setattr(self, f.name, float(v))
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top-p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min-p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise ValueError(f"repeat-last-n must be >= -1, got {self.repeat_last_n}")

    @classmethod
    def from_args(cls, args) -> "SamplerParams":
        """From an argparse namespace carrying the llama.cpp-named flags."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- stages

def apply_penalties(logits: np.ndarray, history, last_n: int = 64, repeat: float = 1.0,
                    presence: float = 0.0, frequency: float = 0.0) -> np.ndarray:
    """llama.cpp's penalties over the last ``last_n`` tokens of ``history``
    (-1 = all of it, 0 = none).  For each token seen c > 0 times: a positive
    logit is divided by ``repeat``, a negative one multiplied (so both move
    down); then ``c * frequency + presence`` is subtracted.  Returns a copy."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if last_n == 0 or (repeat == 1.0 and presence == 0.0 and frequency == 0.0):
        return out
    window = list(history) if last_n < 0 else list(history)[-last_n:] if last_n else []
    if not window:
        return out
    counts = Counter(int(t) for t in window if 0 <= int(t) < out.shape[0])
    if not counts:
        return out
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    c = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    x = out[ids]
    x = np.where(x <= 0, x * repeat, x / repeat)
    out[ids] = x - c * np.float32(frequency) - np.float32(presence)
    return out


def _order_desc(ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Indices sorting by logit descending, ties by lower token id."""
    return np.lexsort((ids, -logits.astype(np.float64)))


def top_k(ids: np.ndarray | None, logits: np.ndarray, k: int, min_keep: int = 1):
    """Keep the k largest logits (k <= 0 or k >= n: keep all).  At the boundary
    equal logits are kept by lower token id.  Returns candidates sorted
    descending.  ``ids=None`` means ``arange(n)`` (saves building it for V)."""
    n = logits.shape[0]
    if k <= 0 or k >= n:
        ids = np.arange(n, dtype=np.int64) if ids is None else ids
        o = _order_desc(ids, logits)
        return ids[o], logits[o]
    k = max(k, min_keep)
    # The k-th largest of any subset is <= the k-th largest of all, so every
    # logit >= that value is a superset of the answer: a strided subset of
    # ~64*k values gives a threshold that leaves ~V/64 candidates or so,
    # far cheaper than partitioning all V (one comparison pass instead).
    stride = n // (64 * k)
    if stride >= 4:
        sub = logits[::stride]
        t = np.partition(sub, sub.size - k)[sub.size - k]
        pos = np.flatnonzero(logits >= t)
    else:
        pos = np.arange(n)
    x = logits[pos]
    sel = np.argpartition(x, x.size - k)[x.size - k:] if x.size > k else np.arange(x.size)
    kth = x[sel].min()
    # argpartition breaks ties arbitrarily: redo the boundary when some value
    # equal to the k-th largest was left out.
    if np.count_nonzero(x == kth) != np.count_nonzero(x[sel] == kth):
        above = np.flatnonzero(x > kth)
        ties = np.flatnonzero(x == kth)
        if ids is not None:
            ties = ties[np.argsort(ids[pos[ties]], kind="stable")]
        sel = np.concatenate([above, ties[: k - above.size]])
    pos = pos[sel]
    cand_ids = pos if ids is None else ids[pos]
    o = _order_desc(cand_ids, logits[pos])
    return cand_ids[o], logits[pos][o]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Stable softmax in float64 (max subtracted, float64 sum)."""
    x = logits.astype(np.float64) - np.max(logits)
    e = np.exp(x)
    return e / e.sum()


def top_p(ids: np.ndarray, logits: np.ndarray, p: float, min_keep: int = 1, sorted_desc: bool = False):
    """Nucleus: the smallest prefix (by probability, descending) whose
    cumulative probability reaches p, at least ``min_keep``; the result is
    sorted descending.  p >= 1 keeps all, unchanged (no O(V log V) sort)."""
    n = logits.shape[0]
    if p >= 1.0 or n <= 1:
        return ids, logits
    if sorted_desc:
        cand = np.arange(n)
        probs = softmax(logits)
    else:
        # Partition progressively: find the m most likely tokens, widen m until
        # they hold mass >= p (the nucleus then lies inside them); only those
        # m get sorted.
        mx = np.max(logits)
        e = np.exp(logits - mx)
        total = e.sum(dtype=np.float64)
        m = min(n, 64)
        while True:
            cand = np.argpartition(logits, n - m)[n - m:] if m < n else np.arange(n)
            if m == n or e[cand].sum(dtype=np.float64) >= p * total:
                break
            m = min(n, m * 8)
        if m < n:  # the partition took an arbitrary part of any tie at its boundary: take all of it
            cand = np.nonzero(logits >= logits[cand].min())[0]
        cand = cand[_order_desc(ids[cand], logits[cand])]
        probs = np.zeros(n)
        probs[cand] = np.exp(logits[cand].astype(np.float64) - mx) / total
    cum = np.cumsum(probs[cand])
    # first index where the cumulative sum reaches p; llama.cpp keeps it too
    last = int(np.searchsorted(cum, p, side="left")) + 1
    last = min(max(last, min_keep), cand.size)
    keep = cand[:last]
    return ids[keep], logits[keep]


@njit(cache=True)
def nucleus(logits, p):
    """Token ids (ascending) of top-p's set: the smallest prefix of the order
    (logit descending, ties by lower id) whose probability reaches p, at least one.

    O(V) without sorting: the mass exp(l - max) is summed into 4096 bins of
    logit value (bin order is value order), the bin where the running mass
    crosses p is found, and only that bin's tokens are sorted to place the cut.
    """
    n = logits.shape[0]
    mx = np.float64(logits.max())
    mn = np.float64(logits.min())
    nbins = 4096
    scale = (nbins - 1) / (mx - mn) if mx > mn else 0.0
    e = np.empty(n, np.float32)  # exp in float32 (expf), masses summed in float64
    bins = np.empty(n, np.int32)
    hist = np.zeros(nbins)
    total = 0.0
    mx32 = np.float32(mx)
    for i in range(n):
        v = np.float32(math.exp(logits[i] - mx32))
        e[i] = v
        total += v
        b = min(nbins - 1, int((mx - np.float64(logits[i])) * scale))
        bins[i] = b
        hist[b] += v
    target = p * total
    before = 0.0
    cut = nbins - 1
    for b in range(nbins):
        if before + hist[b] >= target:
            cut = b
            break
        before += hist[b]
    # the boundary bin, sorted by (logit desc, id asc), taken until the mass reaches p
    nb = 0
    for i in range(n):
        if bins[i] == cut:
            nb += 1
    bidx = np.empty(nb, np.int64)
    bval = np.empty(nb)
    j = 0
    for i in range(n):
        if bins[i] == cut:
            bidx[j] = i
            bval[j] = -np.float64(logits[i])
            j += 1
    order = np.argsort(bval, kind="mergesort")  # stable: ties keep ascending ids
    take = 0
    cum = before
    for k in range(nb):
        take += 1
        cum += e[bidx[order[k]]]
        if cum >= target:
            break
    keep = np.zeros(n, np.bool_)
    for i in range(n):
        if bins[i] < cut:
            keep[i] = True
    for k in range(take):
        keep[bidx[order[k]]] = True
    return np.nonzero(keep)[0]


def min_p(ids: np.ndarray, logits: np.ndarray, p: float, min_keep: int = 1):
    """Keep tokens whose probability is at least p times the top one's
    (compared in log space: logit >= max + log p); p <= 0 keeps all."""
    if p <= 0.0 or logits.shape[0] <= 1:
        return ids, logits
    thresh = np.float64(np.max(logits)) + np.log(p)
    keep = logits.astype(np.float64) >= thresh
    if keep.sum() < min_keep:
        o = _order_desc(ids, logits)[:min_keep]
        return ids[o], logits[o]
    return ids[keep], logits[keep]


def temperature(logits: np.ndarray, temp: float) -> np.ndarray:
    """Divide by temp (temp <= 0 is handled by the caller as greedy)."""
    return logits / np.float32(temp) if temp != 1.0 else logits


def greedy(logits: np.ndarray) -> int:
    """Argmax; ties go to the lower id (np.argmax returns the first)."""
    return int(np.argmax(logits))


def sample_categorical(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn from a normalised float64 distribution by inverse CDF."""
    cum = np.cumsum(probs)
    u = rng.random() * cum[-1]
    return int(min(np.searchsorted(cum, u, side="right"), probs.shape[0] - 1))


# ---------------------------------------------------------------- the chain

class Sampler:
    """The default llama.cpp chain with a seeded numpy Generator (seed -1 = random).

    With a ``constraint`` (``runtime.constraint.Constraint``: a JSON schema or a
    grammar) the sampler holds its own parse state, and every token it draws keeps
    the output inside the grammar: after the penalties, the tokens the grammar
    does not allow are removed (as llama.cpp's grammar sampler sets them to
    -inf), and top-k, top-p, min-p and temperature see only the allowed ones,
    renormalised.  ``sample`` feeds the drawn token to the parse state;
    ``finished`` turns True when the grammar is complete (then ``sample`` only
    returns EOS: the caller stops)."""

    def __init__(self, params: SamplerParams | None = None, constraint=None):
        self.params = params or SamplerParams()
        self.constraint = constraint
        self.matcher = constraint.matcher() if constraint is not None else None
        self.reseed(self.params.seed)

    def reseed(self, seed: int) -> None:
        self.params.seed = int(seed)
        self.rng = np.random.default_rng(None if seed < 0 else seed)

    def reset(self) -> None:
        """Start a new output: the constraint's parse state goes back to the start
        of the grammar (the random stream goes on; ``reseed`` restarts it)."""
        if self.matcher is not None:
            self.matcher.reset()

    @property
    def finished(self) -> bool:
        """The constraint's grammar is complete: nothing but EOS may follow."""
        return self.matcher is not None and self.matcher.finished

    @property
    def complete(self) -> bool:
        """The output so far satisfies the constraint (True without one): False
        after a cut-off (``-n``, a full context) means the output is unfinished."""
        return self.matcher is None or self.matcher.accepting

    def _masked(self, logits: np.ndarray, history):
        """Penalised logits, restricted to the tokens the constraint allows:
        (ids, x) where x[j] is token ids[j]'s logit; ids None means all tokens,
        x[j] token j.  The allowed ids are ascending, so every later tie-break
        by lower id still holds."""
        p = self.params
        x = apply_penalties(logits, history, p.repeat_last_n, p.repeat_penalty,
                            p.presence_penalty, p.frequency_penalty)
        if self.matcher is None:
            return None, x
        ids = self.matcher.allowed_ids()
        if ids.size == x.shape[0]:
            return None, x
        return ids, x[ids]

    def filter(self, logits: np.ndarray, history=()):
        """The candidate set after penalties, the constraint's mask, top-k, top-p,
        min-p and temperature: (ids, logits) sorted descending (top-p alone on a
        vocabulary over 4096: ascending ids)."""
        p = self.params
        base, x = self._masked(logits, history)

        def all_ids():
            return np.arange(x.shape[0], dtype=np.int64) if base is None else base

        if p.top_k > 0:
            ids, x = top_k(base, x, p.top_k)
            ids, x = top_p(ids, x, p.top_p, sorted_desc=True)
            ids, x = min_p(ids, x, p.min_p)
        elif p.min_p > 0 and p.top_p < 1:
            # Top-p and min-p each keep a prefix of the descending order, so
            # they commute: min-p first is an O(V) mask that leaves top-p only
            # a small set to sort.  If that set holds mass < p, top-p's prefix
            # is longer and min-p's set is the answer; else the nucleus lies
            # inside it, at threshold p / mass relative to the set.
            ids, xs = min_p(all_ids(), x, p.min_p)
            mx = np.max(x)
            mass = np.exp(xs - mx).sum(dtype=np.float64) / np.exp(x - mx).sum(dtype=np.float64)
            x = xs
            if mass >= p.top_p:
                ids, x = top_p(ids, x, p.top_p / mass)
        elif p.top_p < 1 and x.shape[0] > 4096:
            # top-p alone on a large vocabulary: the same set in O(V), ascending ids
            # (the order does not change the distribution drawn from)
            pos = nucleus(np.ascontiguousarray(x, dtype=np.float32), float(p.top_p))
            x = x[pos]
            ids = pos if base is None else base[pos]
        else:
            ids, x = top_p(all_ids(), x, p.top_p)
            ids, x = min_p(ids, x, p.min_p)
        return ids, temperature(x, p.temp)

    def probs(self, logits: np.ndarray, history=()):
        """(ids, probabilities) the next token is drawn from."""
        ids, x = self.filter(logits, history)
        return ids, softmax(x)

    def sample(self, logits: np.ndarray, history=()) -> int:
        m = self.matcher
        if m is not None and m.finished:
            return m.eos_id  # the grammar is complete: EOS is all that may follow
        p = self.params
        if p.temp <= 0:
            base, x = self._masked(logits, history)
            i = greedy(x)
            tok = i if base is None else int(base[i])
        else:
            ids, probs = self.probs(logits, history)
            tok = int(ids[sample_categorical(probs, self.rng)])
        if m is not None:
            m.consume(tok)
        return tok
