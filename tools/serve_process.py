"""Start `python -m runtime serve` in a subprocess and wait until it answers.

Shared by tools/bench_server.py and tests/test_server.py, so that the benchmark and
the tests start servers the same way (the tests import it from here, as they import
tools/make_synthetic.py: tests depend on tools, not the other way round).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spawn_serve(model, *flags, stderr=None) -> subprocess.Popen:
    """``python -m runtime serve MODEL --port 0 FLAGS`` from the repository root, its
    stdout a pipe (``serve_url`` reads the address from it); ``stderr`` as Popen's."""
    cmd = [sys.executable, "-m", "runtime", "serve", str(model), "--port", "0", *map(str, flags)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)


def serve_url(proc: subprocess.Popen, health_timeout: float = 60.0, poll: float = 0.05) -> str:
    """The base URL of a ``spawn_serve`` process once it answers /health with 200.
    It prints "listening on URL" after loading the model; /health answers as soon as
    the engine thread runs.  Raises RuntimeError if it exits or never gets healthy."""
    import httpx

    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        raise RuntimeError(f"server did not start (exit status {proc.poll()}): {line!r}")
    url = line.split()[-1]
    deadline = time.monotonic() + health_timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server at {url} never became healthy")
        time.sleep(poll)
