"""A threaded HTTP server on a free localhost port, for the download tests; and
``serve`` subprocesses for the server tests (tools/serve_process.py)."""

from __future__ import annotations

import http.server
import sys
import threading
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def local_server(handler):
    """Serve `handler` (a BaseHTTPRequestHandler class) on 127.0.0.1; yields its base URL."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


# Server start-up lives with the tools (tools/bench_server.py uses it too).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from serve_process import serve_url, spawn_serve  # noqa: E402, F401
