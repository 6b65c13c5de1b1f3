"""runtime.llamacpp_tools (llama.cpp's tools built from llama-cpp-python's sdist) and,
with the real llama-perplexity, llama.cpp's KL-divergence files in both directions:
a --kl-divergence-base file written by our `perplexity` is read by llama-perplexity
--kl-divergence and gives our statistics, and a file llama-perplexity wrote is read
by ours with its statistics.

The builder's own tests run on a tiny stand-in sdist (three one-line programs named
like the tools), so caching, the lock, atomic placement and the errors are checked
in seconds without building llama.cpp."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from runtime import llamacpp_tools as lt

ROOT = Path(__file__).resolve().parents[1]

# --- the builder ------------------------------------------------------------------

FAKE_CMAKE = """cmake_minimum_required(VERSION 3.14)
project(fake_llama CXX)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
foreach(t llama-quantize llama-imatrix llama-perplexity)
  add_executable(${t} main.cpp)
  target_compile_definitions(${t} PRIVATE TOOL="${t}")
endforeach()
"""


def _fake_sdist(path: Path, version: str, main_cpp: str = '#include <cstdio>\nint main() { std::puts(TOOL); }\n',
                vendor: bool = True) -> Path:
    top = f"llama_cpp_python-{version}"
    files = {f"{top}/pyproject.toml": "[project]\nname = 'x'\n", f"{top}/llama_cpp/__init__.py": ""}
    if vendor:
        files[f"{top}/vendor/llama.cpp/CMakeLists.txt"] = FAKE_CMAKE
        files[f"{top}/vendor/llama.cpp/main.cpp"] = main_cpp
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def tool_cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("RUNTIME_LLAMA_TOOLS_DIR", str(d))
    return d


def _need_build_tools():
    missing = lt.missing_build_tools()
    if missing:
        pytest.skip("cannot build: missing " + " and ".join(missing))


def test_cmake_args_follow_the_cpu():
    amx = lt.cmake_args({"avx512f", "amx_int8", "amx_tile"})
    plain = lt.cmake_args({"avx2", "fma"})
    assert "-DGGML_NATIVE=ON" in plain and "-DGGML_NATIVE=ON" not in amx
    # the AMX-free set of runtime/llamacpp.py's docstring, word for word
    from runtime import llamacpp

    assert all(f in llamacpp.__doc__ for f in lt.AMX_FREE_FLAGS)
    assert set(lt.AMX_FREE_FLAGS) <= set(amx) and "-DGGML_AMX_INT8=OFF" in amx
    for args in (amx, plain):
        for f in ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
                  "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"):
            assert f in args
    # the cache key: per version and per CPU (a native build only runs where it was built)
    assert lt.build_key("0.3.36", {"avx2"}) != lt.build_key("0.3.36", {"avx2", "avx512f"})
    assert lt.build_key("0.3.36", {"avx2"}) != lt.build_key("0.3.37", {"avx2"})
    assert lt.build_key("0.3.36", {"fma", "avx2"}) == lt.build_key("0.3.36", {"avx2", "fma"})


def test_build_caches_and_places_atomically(tool_cache, tmp_path):
    _need_build_tools()
    sdist = _fake_sdist(tmp_path / "fake.tar.gz", "9.9.1")
    assert lt.find_tools("9.9.1", {"avx2"}) is None
    lines = []
    t = lt.ensure_tools("9.9.1", flags={"avx2"}, sdist=sdist, jobs=2, log=lines.append)
    assert t.built and t.directory == tool_cache / lt.build_key("9.9.1", {"avx2"})
    for name in lt.TOOLS:
        out = subprocess.run([str(t.path(name))], capture_output=True, text=True, timeout=30).stdout
        assert out.strip() == name
    info = json.loads((t.directory / "BUILD.json").read_text())
    assert info["llama_cpp_python"] == "9.9.1" and info["cmake_args"] == lt.cmake_args({"avx2"})
    assert any("built in" in s for s in lines)
    # nothing but the result and the lock file is left in the cache
    assert sorted(p.name for p in tool_cache.iterdir()) == sorted([t.directory.name, t.directory.name + ".lock"])
    again = lt.ensure_tools("9.9.1", flags={"avx2"}, sdist=sdist)
    assert not again.built and again.directory == t.directory and again.build_seconds == info["build_seconds"]
    # another CPU is another build
    assert lt.find_tools("9.9.1", {"avx2", "avx512f"}) is None


def test_two_processes_build_once(tool_cache, tmp_path):
    _need_build_tools()
    sdist = _fake_sdist(tmp_path / "fake.tar.gz", "9.9.2")
    code = ("import sys; from runtime import llamacpp_tools as lt; "
            "t = lt.ensure_tools('9.9.2', flags={'avx2'}, sdist=sys.argv[1], jobs=1, log=lambda s: None); "
            "print('built' if t.built else 'cached')")
    env = dict(os.environ, PYTHONPATH=str(ROOT), RUNTIME_LLAMA_TOOLS_DIR=str(tool_cache))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(sdist)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = sorted(p.communicate(timeout=600)[0].strip() for p in procs)
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == ["built", "cached"]


def test_build_errors_are_clear(tool_cache, tmp_path, monkeypatch):
    _need_build_tools()
    bad = _fake_sdist(tmp_path / "bad.tar.gz", "9.9.3", main_cpp="this is not C++\n")
    with pytest.raises(lt.ToolsBuildError, match=r"cmake --build failed .*build log: ") as e:
        lt.ensure_tools("9.9.3", flags={"avx2"}, sdist=bad, log=lambda s: None)
    log = Path(str(e.value).rsplit("build log: ", 1)[1])
    assert log.is_file() and "error" in log.read_text()
    key = lt.build_key("9.9.3", {"avx2"})
    assert not (tool_cache / key).exists()
    assert not [p for p in tool_cache.iterdir() if ".build-" in p.name]   # the temporary tree is gone
    novendor = _fake_sdist(tmp_path / "nov.tar.gz", "9.9.4", vendor=False)
    with pytest.raises(lt.ToolsBuildError, match="no vendor/llama.cpp/ source"):
        lt.ensure_tools("9.9.4", flags={"avx2"}, sdist=novendor, log=lambda s: None)
    # no cmake on PATH: said before anything starts
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(lt.ToolsBuildError, match="missing cmake"):
        lt.ensure_tools("9.9.5", flags={"avx2"}, sdist=novendor)


def test_module_command_reports_the_tools(tool_cache, tmp_path):
    _need_build_tools()
    sdist = _fake_sdist(tmp_path / "fake.tar.gz", lt.installed_version())
    env = dict(os.environ, PYTHONPATH=str(ROOT), RUNTIME_LLAMA_TOOLS_DIR=str(tool_cache))
    r = subprocess.run([sys.executable, "-m", "runtime.llamacpp_tools", "--sdist", str(sdist), "-j", "1"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "(built," in r.stdout and str(tool_cache) in r.stdout
    r = subprocess.run([sys.executable, "-m", "runtime.llamacpp_tools"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0 and "(cached," in r.stdout
    r = subprocess.run([sys.executable, "-m", "runtime.llamacpp_tools", "--sdist", str(tmp_path / "none.tar.gz")],
                       capture_output=True, text=True, env=dict(env, RUNTIME_LLAMA_TOOLS_DIR=str(tmp_path / "c2")),
                       timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


# --- KL-divergence files, both ways, with the real llama-perplexity -----------------

KL_CTX, KL_CHUNKS = 128, 4

# llama-perplexity's closing table (and format_kl_table's): label -> (field, error field, scale)
_TABLE = {
    "Mean PPL(Q)": ("ppl", "ppl_err", 1), "Mean PPL(base)": ("base_ppl", "base_ppl_err", 1),
    "Cor(ln(PPL(Q)), ln(PPL(base)))": ("ppl_cor", None, 100),
    "Mean ln(PPL(Q)/PPL(base))": ("ln_ppl_ratio", "ln_ppl_ratio_err", 1),
    "Mean PPL(Q)/PPL(base)": ("ppl_ratio", "ppl_ratio_err", 1),
    "Mean PPL(Q)-PPL(base)": ("ppl_diff", "ppl_diff_err", 1),
    "Mean    KLD": ("kl_mean", "kl_err", 1), "Maximum KLD": ("kl_max", None, 1),
    "99.9%   KLD": ("kl_p99_9", None, 1), "99.0%   KLD": ("kl_p99", None, 1), "Median  KLD": ("kl_median", None, 1),
    " 1.0%   KLD": ("kl_p1", None, 1), "Minimum KLD": ("kl_min", None, 1),
    "Mean    Δp": ("dp_mean", "dp_err", 100), "Maximum Δp": ("dp_max", None, 100),
    "Median  Δp": ("dp_median", None, 100), "Minimum Δp": ("dp_min", None, 100),
    "RMS Δp    ": ("dp_rms", "dp_rms_err", 100), "Same top p": ("top1", "top1_err", 100),
}
_NUM = r"(-?[0-9.]+|nan|-?inf)"


def parse_kl_table(text: str) -> dict:
    """The fields of _TABLE from llama-perplexity's printed statistics (fractions)."""
    out = {}
    for label, (field, err, scale) in _TABLE.items():
        m = re.search(r"^" + re.escape(label) + r"\s*:\s*" + _NUM + r"\s*%?(?:\s*±\s*" + _NUM + ")?", text, re.M)
        assert m, f"no {label!r} line in:\n{text[-3000:]}"
        out[field] = float(m.group(1)) / scale
        if err:
            out[err] = float(m.group(2)) / scale
    return out


def _llama_perplexity(tools, *args) -> str:
    r = subprocess.run([str(tools.perplexity), *map(str, args), "-t", "2"], capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"llama-perplexity failed ({r.returncode}):\n{out[-3000:]}"
    return out


def _ours(*args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "runtime", "perplexity", *map(str, args)], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="session")
def kl_files(llamacpp_tools, smollm2_path, wikitext, tmp_path_factory):
    """The base (SmolLM2 Q4_1)'s log-prob file over the same text, written by us and
    by llama-perplexity."""
    d = tmp_path_factory.mktemp("kl-files")
    text = d / "text.txt"
    text.write_text(wikitext[:3000], encoding="utf-8")
    ours = d / "ours.kld"
    _ours(smollm2_path, text, "--ctx", KL_CTX, "--chunks", KL_CHUNKS, "--kl-divergence-base", ours)
    theirs = d / "llama-perplexity.kld"
    _llama_perplexity(llamacpp_tools, "-m", smollm2_path, "-f", text, "-c", KL_CTX, "--chunks", KL_CHUNKS,
                      "--kl-divergence-base", theirs)
    return text, ours, theirs


def test_kl_file_headers_agree(kl_files):
    """Same text, same tokenizer: magic, n_ctx, n_vocab, n_chunk and every token id
    byte for byte; then as many records of the same size."""
    _, ours, theirs = kl_files
    head = 8 + 4 + 4 + 4 + 4 * KL_CTX * KL_CHUNKS
    a, b = ours.read_bytes(), theirs.read_bytes()
    assert a[:head] == b[:head]
    assert len(a) == len(b)


def _compare_reads(tools, kl_file: Path, other: Path) -> tuple[dict, dict]:
    """(ours, llama-perplexity's) --kl-divergence statistics of `other` against kl_file."""
    theirs = parse_kl_table(_llama_perplexity(tools, "-m", other, "--kl-divergence-base", kl_file,
                                              "--kl-divergence", "-c", KL_CTX))
    r = _ours(other, "--kl-divergence-base", kl_file, "--kl-divergence", "--json")
    ours = json.loads(r.stdout)["kl"]
    assert ours["source"] == "file" and ours["count"] == KL_CHUNKS * (KL_CTX - 1 - KL_CTX // 2)
    return ours, theirs


def _assert_kl_agree(ours: dict, theirs: dict) -> None:
    # Read from the same file, the base's side is the same math on the same bytes:
    # equal to the printed digits.
    assert theirs["base_ppl"] == pytest.approx(ours["base_ppl"], abs=6e-6, rel=1e-6)
    # The compared model's logits are two engines' (llama.cpp rounds its activations,
    # ours too but not identically): close, not equal.
    for k in ("ppl", "kl_mean", "kl_median", "dp_rms", "ln_ppl_ratio"):
        assert theirs[k] == pytest.approx(ours[k], rel=2e-2, abs=2e-4), (k, ours[k], theirs[k])
    # a tail percentile of 252 values moves with single tokens (measured 2.9 % apart)
    assert theirs["kl_p99"] == pytest.approx(ours["kl_p99"], rel=1e-1, abs=2e-4), (ours["kl_p99"], theirs["kl_p99"])
    assert abs(theirs["top1"] - ours["top1"]) <= 3 / ours["count"] + 1e-5


def test_our_kl_file_read_by_llama_perplexity(llamacpp_tools, kl_files, smollm2_f16):
    text, ours_file, _ = kl_files
    ours, theirs = _compare_reads(llamacpp_tools, ours_file, smollm2_f16)
    print("ours", {k: ours[k] for k in ("base_ppl", "ppl", "kl_mean", "top1")}, "\nllama.cpp", theirs)
    _assert_kl_agree(ours, theirs)


def test_llama_perplexity_kl_file_read_by_us(llamacpp_tools, kl_files, smollm2_f16):
    text, _, theirs_file = kl_files
    ours, theirs = _compare_reads(llamacpp_tools, theirs_file, smollm2_f16)
    print("ours", {k: ours[k] for k in ("base_ppl", "ppl", "kl_mean", "top1")}, "\nllama.cpp", theirs)
    _assert_kl_agree(ours, theirs)


from test_quantize import _cached, smollm2_f16  # noqa: E402,F401  (SmolLM2 in F16: the compared model)
