"""A threaded HTTP server on a free localhost port, for the download tests."""

from __future__ import annotations

import http.server
import threading
from contextlib import contextmanager


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
