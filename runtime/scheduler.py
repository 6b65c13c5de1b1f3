"""Continuous batching: many generation requests over one model, one step at a time.

``Scheduler`` owns the model and a ``SessionPool`` of ``n_slots`` sequences and runs
on a thread of its own (the engine is not thread-safe; nothing else touches it).
Callers ``submit`` a ``GenerationRequest`` with a *sink*, a callable that receives the
request's events (``Delta``, then one ``Finished`` or ``Failed``) on the scheduler's
thread; ``server.py`` forwards them into asyncio queues.

Each iteration of the loop:

1. admits waiting requests into free slots (the slot whose cache holds the longest
   reusable prefix of the prompt, else the least recently used one);
2. samples the next token of every slot whose logits are ready, turns it into text
   (stop strings held back until they cannot match, never emitted), and finishes
   requests that hit EOS, a stop string, ``max_tokens`` or the slot's context;
3. evaluates the sampled tokens of every running slot in ONE ``pool.decode`` call
   (each weight block decoded once for all rows);
4. prefills at most one chunk (``model.N_BATCH`` = 256 tokens) of one admitted
   prompt, so that running streams keep flowing while a long prompt arrives.

Batch invariance.  ``pool.decode`` gives each row exactly the logits of that
sequence's own one-token step, and prompts are always prefilled in chunks aligned
to multiples of 256 positions (the chunks ``Session.eval`` uses on a whole prompt),
so a request's tokens do not depend on what else is running: a greedy request
gives the same text alone or among others, and the same text as ``generate``.

Prompt cache.  The kernels' rounding depends on how many rows a call evaluates, so
a cached position is only bit-identical to a fresh prefill's if it was computed in
the same chunk of the same tokens.  The default policy (``cache_reuse="exact"``)
reuses only such positions: whole 256-token chunks of a previous prompt that the
new prompt repeats, or the whole prompt when it is repeated exactly (its final
logits are kept for that).  ``cache_reuse="prefix"`` is llama-server's
``cache_prompt``: the longest common prefix of whatever the slot holds (earlier
replies included, so a follow-up in a conversation prefills only the new message),
at the price of results that may differ in the last bits from a fresh run.  A
request's ``cache_prompt=False`` disables reuse for it.  A sliding-window model's
slot (Gemma 3) reuses a prefix only while its ring still holds every key that the
prefix's end needs (``Session.can_resume_at``); otherwise the prompt is prefilled
from the start, in chunks, and gives exactly a fresh slot's reply.
"""

from __future__ import annotations

import collections
import math
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from .chat import _common_prefix
from .sampling import Sampler, SamplerParams

__all__ = ["GenerationRequest", "TokenLogprob", "Delta", "Finished", "Failed", "Scheduler",
           "Handle", "QueueFullError", "PromptTooLongError", "SchedulerStopped", "log_softmax"]


class QueueFullError(RuntimeError):
    """More requests are waiting for a slot than the queue allows."""


class PromptTooLongError(ValueError):
    """The prompt does not fit in one slot's context."""


class SchedulerStopped(RuntimeError):
    """The scheduler is shutting down (or its thread died) and takes no requests."""


@dataclass
class GenerationRequest:
    prompt: list[int]                       # token ids, already templated and tokenized
    params: SamplerParams = field(default_factory=SamplerParams)
    max_tokens: int | None = None           # None: until EOS or the slot's context is full
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None             # None: off; k >= 0: chosen token + k alternatives
    logit_bias: dict[int, float] = field(default_factory=dict)
    cache_prompt: bool = True
    ignore_eos: bool = False
    constraint: object | None = None        # runtime.constraint.Constraint (response_format)

    def __post_init__(self):
        self.prompt = [int(t) for t in self.prompt]
        self.stop = [str(s) for s in (self.stop or [])]
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]            # (token id, logprob), most likely first


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob]            # tokens whose text ends in this delta


@dataclass
class Finished:
    reason: str               # "stop" (EOS or a stop string), "length", "cancelled", "shutdown"
    n_prompt: int             # prompt tokens
    n_cached: int             # of which reused from the slot's cache
    n_gen: int                # tokens sampled (an EOS that ended the reply is not counted)
    t_prompt: float           # seconds: admission to first logits (prefill)
    t_gen: float              # seconds: first logits to the end
    t_queue: float            # seconds waiting for a slot
    slot: int


@dataclass
class Failed:
    message: str


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p of every token (float64): the model's distribution before any sampler
    stage, which is what OpenAI's logprobs report."""
    x = logits.astype(np.float64)
    m = x.max()
    return x - (m + math.log(np.exp(x - m).sum()))


class Handle:
    """A submitted request: ``cancel()`` frees its slot at the next step."""

    def __init__(self, req: GenerationRequest, sink):
        self.req = req
        self.sink = sink
        self.cancelled = False
        self.t_submit = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True  # read by the scheduler thread; a bool store is atomic


# ---------------------------------------------------------------- text out

class _TextOut:
    """Turns sampled tokens into text deltas: a streaming UTF-8 decoder, stop strings
    held back while they might still match (so they are never emitted), and each
    token's logprobs released with the delta that completes its text."""

    def __init__(self, tokenizer, stop: list[str]):
        self.decoder = tokenizer.decoder()
        self.stop = [s for s in stop if s]
        self.held = ""                # decoded text not yet emitted
        self.emitted = 0              # characters emitted so far
        self.pending: collections.deque = collections.deque()  # (start, end, TokenLogprob)
        self.stopped = False

    def _hold_back(self) -> int:
        """Length of the longest suffix of held that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.held)), best, -1):
                if self.held.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, upto: int, cut: bool = False) -> list[TokenLogprob]:
        out = []
        while self.pending and (self.pending[0][1] <= upto or (cut and self.pending[0][0] < upto)):
            out.append(self.pending.popleft()[2])
        return out

    def feed(self, tok: int, lp: TokenLogprob | None) -> Delta | None:
        start = self.emitted + len(self.held)
        self.held += self.decoder.feed(tok)
        if lp is not None:
            self.pending.append((start, self.emitted + len(self.held), lp))
        if self.stop:
            hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                text = self.held[:cut]
                self.emitted += cut
                self.held = ""
                self.stopped = True
                out = self._release(self.emitted, cut=True)
                self.pending.clear()  # tokens wholly inside or after the stop string
                return Delta(text, out) if text or out else None
        keep = self._hold_back()
        n = len(self.held) - keep
        text, self.held = self.held[:n], self.held[n:]
        self.emitted += n
        out = self._release(self.emitted)
        return Delta(text, out) if text or out else None

    def flush(self) -> Delta | None:
        """At the end (EOS, length): whatever was held back is text after all."""
        self.held += self.decoder.flush()
        text, self.held = self.held, ""
        self.emitted += len(text)
        out = [p[2] for p in self.pending]
        self.pending.clear()
        return Delta(text, out) if text or out else None


# ---------------------------------------------------------------- slots

class _Slot:
    """One sequence of the pool and the request it is serving (if any)."""

    def __init__(self, index: int, session):
        self.index = index
        self.session = session
        self.cached: list[int] = []       # tokens whose KV the session holds (len == n_past)
        self.prompt: list[int] = []       # the last prompt prefilled here (positions 0..)
        self.prompt_logits = None         # logits after that whole prompt, if it completed
        self.last_used = 0.0
        self.job: _Job | None = None


class _Job:
    """A request while it holds a slot."""

    def __init__(self, handle: Handle, slot: _Slot, n_cached: int, tokenizer):
        req = handle.req
        self.handle = handle
        self.req = req
        self.slot = slot
        self.todo = list(req.prompt[n_cached:])   # prompt tokens still to prefill
        self.n_cached = n_cached
        params = SamplerParams(**req.params.as_dict())  # its own copy: reseeding writes to it
        self.sampler = Sampler(params, constraint=req.constraint) if req.constraint is not None else Sampler(params)
        self.history = list(req.prompt)           # the penalties' window
        self.text = _TextOut(tokenizer, req.stop)
        self.logits = None                        # next-token logits, once ready
        self.feed: int | None = None              # sampled token to evaluate next step
        self.n_gen = 0
        self.t_admit = time.perf_counter()
        self.t_first = None
        self.bias_ids = np.fromiter(req.logit_bias.keys(), np.int64, len(req.logit_bias))
        self.bias_vals = np.fromiter(req.logit_bias.values(), np.float32, len(req.logit_bias))


class Scheduler:
    """Continuous batching over ``n_slots`` sequences of ``n_ctx`` tokens each.

    ``chunk`` is the prefill chunk (tokens per scheduler iteration for one prompt);
    it is the engine's N_BATCH so that a prompt is prefilled in the same chunks as
    ``Session.eval`` of the whole prompt would use."""

    def __init__(self, model, n_slots: int, n_ctx: int, *, max_queue: int = 64,
                 cache_reuse: str = "exact", n_threads: int | None = None):
        import numba

        from .model import N_BATCH

        if cache_reuse not in ("exact", "prefix", "off"):
            raise ValueError(f"cache_reuse must be 'exact', 'prefix' or 'off', got {cache_reuse!r}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.n_slots = int(n_slots)
        self.n_ctx = int(n_ctx)
        self.max_queue = int(max_queue)
        self.cache_reuse = cache_reuse
        self.chunk = N_BATCH
        # numba's thread count is per Python thread (a new thread starts with all
        # NUMBA_NUM_THREADS): the engine thread takes the creator's (the -t flag)
        self.n_threads = int(n_threads) if n_threads else numba.get_num_threads()
        self.pool = model.session_pool(self.n_slots, self.n_ctx)
        self.slots = [_Slot(i, s) for i, s in enumerate(self.pool.sessions)]
        self._eog = set(self.tokenizer.eog_ids)
        self._waiting: collections.deque[Handle] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: str | None = None
        # statistics (read by /metrics from other threads; ints and floats only)
        self.n_requests = 0
        self.n_finished = 0
        self.n_prompt_tokens = 0       # prompt tokens evaluated (cache hits excluded)
        self.n_cached_tokens = 0
        self.n_gen_tokens = 0
        self.t_prompt = 0.0            # seconds spent in prefill calls
        self.t_decode = 0.0            # seconds spent in decode calls
        self.n_decode_steps = 0
        self.n_decode_rows = 0

    # ------------------------------------------------------------ public
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
            self._thread.start()
        return self

    def submit(self, req: GenerationRequest, sink) -> Handle:
        """Queue a request; its events go to ``sink`` (called on the scheduler thread).
        Raises PromptTooLongError, QueueFullError or SchedulerStopped at once."""
        n = len(req.prompt)
        if n == 0:
            raise ValueError("the prompt is empty (no tokens)")
        if n >= self.n_ctx:
            raise PromptTooLongError(
                f"the prompt has {n} tokens but a slot's context holds {self.n_ctx} "
                f"(at least one more is needed to generate)")
        bad = [t for t in req.prompt if not 0 <= t < self.model.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range (vocabulary has {self.model.n_vocab} tokens)")
        h = Handle(req, sink)
        with self._cond:
            if self._stopping or self._dead:
                raise SchedulerStopped(self._dead or "the server is shutting down")
            if len(self._waiting) + 1 > self.max_queue + self._free_slots():
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting for "
                                     f"one of the {self.n_slots} slots (the queue holds {self.max_queue})")
            self._waiting.append(h)
            self.n_requests += 1
            self._cond.notify()
        return h

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Finish every request (running ones with reason "shutdown", their text so
        far delivered) and stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    def stats(self) -> dict:
        active = [s for s in self.slots if s.job is not None]
        return {
            "requests_total": self.n_requests,
            "requests_finished": self.n_finished,
            "requests_active": len(active),
            "requests_waiting": len(self._waiting),
            "prompt_tokens_total": self.n_prompt_tokens,
            "prompt_tokens_cached_total": self.n_cached_tokens,
            "generated_tokens_total": self.n_gen_tokens,
            "prompt_seconds_total": self.t_prompt,
            "decode_seconds_total": self.t_decode,
            "decode_steps_total": self.n_decode_steps,
            "decode_rows_total": self.n_decode_rows,
            "kv_cells_used": sum(s.session.n_past for s in self.slots),
            "kv_cells_active": sum(s.session.n_past for s in active),
            "kv_cells_total": self.n_slots * self.n_ctx,
            "slots_total": self.n_slots,
            "slots_busy": len(active),
        }

    # ------------------------------------------------------------ the loop
    def _free_slots(self) -> int:
        return sum(1 for s in self.slots if s.job is None)

    def _run(self) -> None:
        try:
            import numba

            numba.set_num_threads(self.n_threads)
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._busy():
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._admit()
                self._step()
        except BaseException as e:  # the engine failed: no request may wait forever
            self._dead = f"the engine stopped: {type(e).__name__}: {e}"
            traceback.print_exc()
            for s in self.slots:
                if s.job is not None:
                    self._fail(s, self._dead)
        finally:
            with self._cond:
                waiting = list(self._waiting)
                self._waiting.clear()
            for h in waiting:
                self._send(h, Failed(self._dead or "the server is shutting down"))
            for s in self.slots:
                if s.job is not None:
                    self._finish(s, "shutdown")

    def _busy(self) -> bool:
        return any(s.job is not None for s in self.slots)

    def _reusable(self, slot: _Slot, prompt: list[int], cache_prompt: bool) -> int:
        """Prompt positions this slot's cache can give a new request (see the module
        docstring); the last prompt position is only reused with its logits.

        A sliding-window cache (Gemma 3) may no longer hold what a shorter prefix
        needs: its ring has overwritten keys that the window of the first new
        position still sees (``Session.can_resume_at``).  Such a slot offers
        nothing, and the request is prefilled from position 0 in the usual chunks
        (between decode steps, so running streams keep flowing), as llama.cpp's
        server re-processes the whole prompt when its SWA cache lacks the data;
        ``Session.rewind`` would replay the prefix in one blocking call."""
        n = self._prefix_offer(slot, prompt, cache_prompt)
        if 0 < n < slot.session.n_past and not slot.session.can_resume_at(n):
            return 0
        return n

    def _prefix_offer(self, slot: _Slot, prompt: list[int], cache_prompt: bool) -> int:
        if not cache_prompt or self.cache_reuse == "off" or not slot.cached:
            return 0
        if self.cache_reuse == "prefix":
            return min(_common_prefix(prompt, slot.cached), len(prompt) - 1)
        if slot.prompt_logits is not None and slot.prompt == prompt:
            return len(prompt)
        n = _common_prefix(prompt, slot.prompt)
        n = min(n, len(prompt) - 1) // self.chunk * self.chunk
        return n

    def _admit(self) -> None:
        """Waiting requests into free slots, oldest first (called under the lock)."""
        while self._waiting:
            h = self._waiting[0]
            if h.cancelled:
                self._waiting.popleft()
                continue
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            self._waiting.popleft()
            req = h.req
            best = max(free, key=lambda s: (self._reusable(s, req.prompt, req.cache_prompt), -s.last_used))
            n = self._reusable(best, req.prompt, req.cache_prompt)
            try:
                job = _Job(h, best, n, self.tokenizer)
            except Exception as e:  # e.g. a constraint that cannot start: this request only
                self._send(h, Failed(f"cannot start the request: {type(e).__name__}: {e}"))
                continue
            sess = best.session
            if n == 0:
                sess.reset()    # a fresh sequence (and a fresh sliding-window ring)
            else:
                sess.rewind(sess.n_past - n)    # _reusable checked: nothing to replay
            del best.cached[n:]
            if n == len(req.prompt):        # the same prompt again: its logits are kept
                job.logits = best.prompt_logits
                job.t_first = time.perf_counter()
            else:
                best.prompt = list(req.prompt[:n])
                best.prompt_logits = None
            best.job = job
            best.last_used = time.perf_counter()
            self.n_cached_tokens += n

    def _step(self) -> None:
        # 0. requests whose client went away free their slot before any work
        for s in self.slots:
            if s.job is not None and (s.job.handle.cancelled or self._stopping):
                self._finish(s, "cancelled" if s.job.handle.cancelled else "shutdown")
        # 1. sample wherever logits are ready
        for s in self.slots:
            j = s.job
            if j is not None and j.logits is not None:
                self._sample(s)
        # 2. one decode step for every slot with a token to evaluate
        rows = [s for s in self.slots if s.job is not None and s.job.feed is not None]
        if rows:
            t0 = time.perf_counter()
            try:
                logits = self.pool.decode([s.session for s in rows], [s.job.feed for s in rows])
            except (ValueError, MemoryError) as e:
                for s in rows:
                    self._fail(s, f"decode failed: {e}")
                rows = []
            else:
                self.t_decode += time.perf_counter() - t0
                self.n_decode_steps += 1
                self.n_decode_rows += len(rows)
            for i, s in enumerate(rows):
                s.cached.append(s.job.feed)
                s.job.feed = None
                s.job.logits = logits[i]
        # 3. one prefill chunk, for the oldest admitted request still prefilling
        pre = [s for s in self.slots if s.job is not None and s.job.todo]
        if pre:
            s = min(pre, key=lambda s: s.job.t_admit)
            self._prefill_chunk(s)

    def _prefill_chunk(self, s: _Slot) -> None:
        j = s.job
        sess = s.session
        # up to the next multiple of the chunk size: the chunks Session.eval uses
        n = min(len(j.todo), self.chunk - sess.n_past % self.chunk)
        part = j.todo[:n]
        t0 = time.perf_counter()
        try:
            sess.eval(part)
        except (ValueError, MemoryError) as e:
            self._fail(s, f"prefill failed: {e}")
            return
        del j.todo[:n]
        s.cached.extend(part)
        s.prompt.extend(part)
        if not j.todo:
            j.logits = sess.logits()
            s.prompt_logits = j.logits
            j.t_first = time.perf_counter()
        self.t_prompt += time.perf_counter() - t0
        self.n_prompt_tokens += n

    def _sample(self, s: _Slot) -> None:
        j = s.job
        req = j.req
        raw = j.logits
        j.logits = None
        x = raw
        if j.bias_ids.size:
            x = raw.copy()
            x[j.bias_ids] += j.bias_vals
        tok = j.sampler.sample(x, j.history)
        if tok in self._eog and not req.ignore_eos:
            self._finish(s, "stop")
            return
        j.n_gen += 1
        self.n_gen_tokens += 1
        j.history.append(tok)
        lp = None
        if req.logprobs is not None:
            ls = log_softmax(raw)
            k = req.logprobs
            top = []
            if k > 0:
                idx = np.argpartition(-ls, k)[:k] if k < ls.shape[0] else np.arange(ls.shape[0])
                idx = idx[np.lexsort((idx, -ls[idx]))]
                top = [(int(i), float(ls[i])) for i in idx]
            lp = TokenLogprob(tok, float(ls[tok]), top)
        d = j.text.feed(tok, lp)
        if d is not None:
            self._send(j.handle, d)
        if j.text.stopped:
            self._finish(s, "stop", flush=False)
        elif j.sampler.finished:  # the response_format grammar is complete
            self._finish(s, "stop")
        elif req.max_tokens is not None and j.n_gen >= req.max_tokens:
            self._finish(s, "length")
        elif s.session.n_past >= s.session.n_ctx:
            self._finish(s, "length")
        else:
            j.feed = tok

    # ------------------------------------------------------------ endings
    def _send(self, h: Handle, event) -> None:
        try:
            h.sink(event)
        except Exception:  # a sink must not take the engine down (its loop may be closed)
            h.cancelled = True

    def _release(self, s: _Slot) -> None:
        j = s.job
        s.job = None
        s.last_used = time.perf_counter()
        if j is not None and j.todo:
            s.prompt_logits = None  # prefill cut short: the prompt's end is not cached

    def _finish(self, s: _Slot, reason: str, flush: bool = True) -> None:
        j = s.job
        if j is None:
            return
        if flush:
            d = j.text.flush()
            if d is not None and reason not in ("cancelled",):
                self._send(j.handle, d)
        now = time.perf_counter()
        t_first = j.t_first or now
        self._release(s)
        self.n_finished += 1
        self._send(j.handle, Finished(reason=reason, n_prompt=len(j.req.prompt), n_cached=j.n_cached,
                                      n_gen=j.n_gen, t_prompt=t_first - j.t_admit, t_gen=now - t_first,
                                      t_queue=j.t_admit - j.handle.t_submit, slot=s.index))

    def _fail(self, s: _Slot, message: str) -> None:
        j = s.job
        if j is None:
            return
        self._release(s)
        # the cache may hold part of a failed step: forget it
        s.session.reset()
        s.cached.clear()
        s.prompt = []
        s.prompt_logits = None
        self.n_finished += 1
        self._send(j.handle, Failed(message))
