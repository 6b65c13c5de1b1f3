"""``perplexity ... --ray [ADDRESS]``: the chunks scored over a Ray cluster.

Perplexity is embarrassingly parallel by chunk: every chunk runs from an empty
cache, and what it contributes is a list of per-token values (NLLs, and with a
base KL, Delta-p, top-1 agreement).  ``RayScorer`` gives each Ray worker an
actor that loads the model (and the base) once and scores chunks with
``perplexity.score_chunk``, the function the local loop calls; the driver
takes the results back in chunk order and feeds them to the local run's merge.
So the sums are the same float64 additions in the same order and the printed
results (PPL, the KL table, the per-chunk lines) equal the single-process run
digit for digit.

Each worker runs ``threads`` numba threads and reserves that many CPUs from
Ray, so ``workers x threads`` never exceeds a node.  The driver only
tokenizes and merges.  Workers open the model by the same path as the driver
(it must be reachable on every node: a shared filesystem) or, given a
registry name, pull it into their node's cache.

Ray is optional (the ``distributed`` extra); without it ``require_ray`` raises
``RayMissing`` naming the extra.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .perplexity import ChunkJob, ChunkScore, score_chunk

__all__ = ["DistributedError", "RayMissing", "RayScorer", "plan_workers", "require_ray", "model_ref"]

EXTRA_HINT = "pip install 'gguf-runtime[distributed]' (or pip install 'ray[client]')"

# Chunks in flight per worker: one running, one waiting, so no worker idles
# while the driver collects a result.
_PER_WORKER = 2


class RayMissing(ImportError):
    """--ray without Ray installed."""


class DistributedError(RuntimeError):
    """The cluster cannot run the job, or a worker failed."""


def require_ray():
    try:
        import ray
    except ImportError:
        raise RayMissing(f"--ray needs Ray, the 'distributed' extra: {EXTRA_HINT}") from None
    return ray


def plan_workers(node_cpus: Iterable[float], workers: int | None = None,
                 threads: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) that fit nodes with these CPU counts.

    A worker reserves ``threads`` CPUs on one node.  Neither given: one thread
    per worker and a worker per CPU (chunks are independent: no thread
    synchronization is the fastest use of a core; the weights are memory-mapped,
    so a node's workers share them in the page cache).  ``workers`` alone: the
    most threads each that still fit them all.  ``threads`` alone: as many
    workers as fit."""
    cpus = [int(c) for c in node_cpus if int(c) >= 1]
    if not cpus:
        raise DistributedError("the Ray cluster has no node with a CPU")
    if workers is not None and workers < 1:
        raise DistributedError(f"--ray-workers must be at least 1 (got {workers})")
    if threads is not None and threads < 1:
        raise DistributedError(f"-t must be at least 1 (got {threads})")

    def room(t: int) -> int:
        return sum(c // t for c in cpus)

    if threads is None:
        if workers is None:
            return room(1), 1
        fits = [t for t in range(max(cpus), 0, -1) if room(t) >= workers]
        if not fits:
            raise DistributedError(f"--ray-workers {workers}: the cluster has {sum(cpus)} CPUs "
                                   f"(one per worker at least)")
        return workers, fits[0]
    if threads > max(cpus):
        raise DistributedError(f"-t {threads}: no Ray node has {threads} CPUs (the largest has {max(cpus)})")
    if workers is None:
        return room(threads), threads
    if workers > room(threads):
        raise DistributedError(f"--ray-workers {workers} with -t {threads}: the cluster's nodes "
                               f"({', '.join(map(str, cpus))} CPUs) hold {room(threads)} such workers")
    return workers, threads


def model_ref(arg) -> str:
    """What workers open: an existing path made absolute (their working directory
    is not the driver's), else the argument as given (a registry name)."""
    p = Path(str(arg)).expanduser()
    return str(p.resolve()) if p.exists() else str(arg)


def _worker_path(ref: str) -> Path:
    from .registry import resolve_model

    p = Path(ref)
    if p.exists():
        return p
    if p.is_absolute() or os.sep in ref or ref.endswith(".gguf"):
        raise FileNotFoundError(
            f"{ref}: no such file on Ray node {socket.gethostname()}; with --ray every node must "
            f"reach the model by the driver's path (a shared filesystem), or name it by registry "
            f"name so that each node pulls it")
    return resolve_model(ref)


class ChunkWorker:
    """The Ray actor: one model (and base) per worker process, loaded once."""

    def __init__(self, model: str, base: str | None, n_ctx: int, precision: str, threads: int,
                 base_precision: str | None = None):
        self._args = (model, base, n_ctx, precision, threads, base_precision or precision)
        self.model = self.base = None

    def load(self) -> dict:
        from .model import Model
        from .threads import set_threads

        model, base, n_ctx, precision, threads, base_precision = self._args
        threads = set_threads(threads)
        self.model = Model.load(_worker_path(model), n_ctx=n_ctx, precision=precision)
        if base is not None:
            self.base = Model.load(_worker_path(base), n_ctx=n_ctx, precision=base_precision)
        return {"node": socket.gethostname(), "pid": os.getpid(), "threads": threads,
                "n_vocab": self.model.n_vocab, "base_n_vocab": None if self.base is None else self.base.n_vocab}

    def score(self, job: ChunkJob, want_records: bool) -> ChunkScore:
        return score_chunk(self.model, job, base=self.base, want_records=want_records)


def _why(e: BaseException) -> str:
    """A worker's exception as one line (Ray wraps it with the remote traceback)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return str(cause) or type(cause).__name__
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


class RayScorer:
    """Scores ChunkJobs on Ray actors and yields the ChunkScores in chunk order.

    ``address`` as ray.init takes it ("auto", "HOST:6379", "ray://HOST:10001");
    None: "auto" when RAY_ADDRESS is set, else a local Ray started here (and
    shut down by ``close``).  When this process is already connected to Ray
    that connection is used and left open.  ``timeout``: seconds to wait for
    the workers to load, and then for each next result, before giving up
    (None: no limit).  ``limit``: at most this many workers (more than there
    are chunks would only load models).  ``base_precision``: the base's
    (default ``precision``, as the command line loads both)."""

    parallel = True   # the speed is the wall clock's: workers run side by side

    def __init__(self, model, base=None, *, n_ctx: int, precision: str = "fast", address: str | None = None,
                 workers: int | None = None, threads: int | None = None, limit: int | None = None,
                 timeout: float | None = None, base_precision: str | None = None):
        ray = self._ray = require_ray()
        self.timeout = timeout
        self.actors: list = []
        self.with_base = base is not None
        self._started = False
        if not ray.is_initialized():
            if address is None or address == "":
                address = "auto" if os.environ.get("RAY_ADDRESS") else "local"
            try:
                # Workers' stdout stays theirs: the driver's output is the results.
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise DistributedError(f"cannot connect to Ray at {address!r}: {_why(e)}") from None
            self._started = True
        try:
            nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
            self.workers, self.threads = plan_workers(nodes, workers, threads)
            if limit is not None:
                self.workers = max(1, min(self.workers, int(limit)))
            actor = ray.remote(ChunkWorker).options(num_cpus=self.threads, max_restarts=0)
            self.actors = [actor.remote(str(model), None if base is None else str(base), int(n_ctx),
                                        precision, self.threads, base_precision) for _ in range(self.workers)]
            self.info = self._get([a.load.remote() for a in self.actors], "load the model")
        except BaseException:
            self.close()
            raise

    @property
    def n_vocab(self) -> int:
        return self.info[0]["n_vocab"]

    def _get(self, refs, what: str):
        ray = self._ray
        try:
            return ray.get(refs, timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            raise DistributedError(f"the Ray workers did not {what} within {self.timeout:g} s") from None
        except ray.exceptions.RayError as e:
            raise DistributedError(f"a Ray worker failed to {what}: {_why(e)}") from None

    def scores(self, jobs: Iterable[ChunkJob], want_records: bool = False) -> Iterator[ChunkScore]:
        ray = self._ray
        jobs = iter(jobs)
        in_flight = [0] * len(self.actors)
        pending: dict = {}            # ObjectRef -> actor number
        done: dict[int, ChunkScore] = {}
        next_out = submitted = 0
        exhausted = False
        window = _PER_WORKER * len(self.actors)
        while True:
            # Keep every worker busy, with at most `window` chunks beyond the one
            # due next (that bounds what waits here for an earlier chunk).
            while not exhausted and submitted - next_out < window:
                a = min(range(len(in_flight)), key=in_flight.__getitem__)
                if in_flight[a] >= _PER_WORKER:
                    break
                job = next(jobs, None)
                if job is None:
                    exhausted = True
                    break
                if job.base_records is not None:
                    job = job._replace(base_records=np.array(job.base_records))  # a memmap slice: send the values
                pending[self.actors[a].score.remote(job, want_records)] = a
                in_flight[a] += 1
                submitted += 1
            if next_out in done:
                yield done.pop(next_out)
                next_out += 1
                continue
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout)
            if not ready:
                raise DistributedError(f"no chunk came back from the Ray workers within {self.timeout:g} s")
            for ref in ready:
                in_flight[pending.pop(ref)] -= 1
                s = self._get(ref, "score a chunk")
                done[s.index] = s

    def close(self) -> None:
        ray = self._ray
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:   # already gone: nothing to release
                pass
        self.actors = []
        if self._started:
            ray.shutdown()
            self._started = False

    def __enter__(self) -> "RayScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
