"""`python -m runtime bench`: the llama-bench style numbers, --json, --vs-llamacpp, bad arguments."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _oracle import synthetic_model

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args, timeout=300, pythonpath=()):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, pythonpath), str(ROOT)]))
    return subprocess.run([sys.executable, "-m", "runtime", "bench", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _check_stats(st, reps):
    assert len(st["samples"]) == reps
    assert all(math.isfinite(v) and v > 0 for v in st["samples"])
    assert st["min"] <= st["median"] <= st["max"]
    assert st["min"] == min(st["samples"]) and st["max"] == max(st["samples"])


def test_json_numbers():
    path = synthetic_model("llama", 1, False, "F32")
    r = _bench(path, "-p", 16, "-n", 4, "-r", 2, "-t", 1, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model"] == path.name and doc["threads"] == 1 and doc["repetitions"] == 2
    assert doc["file_size"] == path.stat().st_size and doc["n_params"] > 0
    assert set(doc["tests"]) == {"pp16", "tg4"}
    for t in doc["tests"].values():
        assert set(t) == {"ours"}
        _check_stats(t["ours"], 2)
    assert doc["load_s"] >= 0
    m = doc["machine"]
    assert m["cpu"] and isinstance(m["cpu_flags"], list) and m["numba_cpu"]
    assert m["int8_path"] in ("avx512-vnni", "avx2-maddubs", "portable")


def test_precision_exact_runs_the_float_activation_path():
    """bench --precision exact times a model loaded with precision "exact" (float32
    activations in every matmul) and says so; the default is "fast"."""
    from runtime import bench as rb

    path = synthetic_model("llama", 1, False, "Q8_0")
    e = rb._engine("ours", path, 8, 2, 1, "exact")
    assert e.model.precision == "exact" and e.session.precision == "exact"
    r = _bench(path, "-p", 8, "-n", 2, "-r", 1, "-t", 1, "--precision", "exact", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["precision"] == "exact" and set(doc["tests"]) == {"pp8", "tg2"}
    r = _bench(path, "-p", 8, "-n", 2, "-r", 1, "-t", 1, "--precision", "exact")
    assert r.returncode == 0 and "precision exact" in r.stdout.splitlines()[1], r.stdout
    assert json.loads(_bench(path, "-p", 0, "-n", 2, "-r", 1, "-t", 1, "--json").stdout)["precision"] == "fast"
    r = _bench(path, "-p", 8, "-n", 2, "--precision", "bogus")
    assert r.returncode != 0 and "precision" in r.stderr


def test_table_and_skipping_a_test():
    path = synthetic_model("qwen2", 1, True, "F32")
    r = _bench(path, "-p", 0, "-n", 3, "-r", 1)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(l.strip().startswith("tg3 |") for l in lines)
    assert not any("pp" in l.split("|")[0] for l in lines if "|" in l)  # -p 0 skips pp
    assert all(len(l) <= 80 for l in lines)


def test_vs_llamacpp_ratio(llama_cpp):
    path = synthetic_model("llama", 1, False, "F32")
    r = _bench(path, "-p", 16, "-n", 4, "-r", 2, "-t", 2, "--vs-llamacpp", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for t in doc["tests"].values():
        _check_stats(t["llamacpp"], 2)
        assert t["ratio"] == pytest.approx(t["ours"]["median"] / t["llamacpp"]["median"])
    lc = doc["llamacpp"]
    assert lc["version"] and "=" in lc["system_info"]
    assert lc["features"] and set(lc["features"]) <= set(lc["system_info"].replace("=", " ").split())


def test_cpu_model_and_ggml_features():
    from runtime import bench as rb

    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n" \
          "model name\t: AMD EPYC\n\nprocessor\t: 1\nmodel name\t: other\n"
    assert rb._cpu_model(x86) == "AMD EPYC (family 25 model 17)"
    assert rb._cpu_model("processor : 0\nmodel name : Intel(R) Xeon(R) Platinum 8480+\n") == \
        "Intel(R) Xeon(R) Platinum 8480+"
    info = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | AMX_INT8 = 1 | REPACK = 1 | "
    assert rb.ggml_features(info) == ["SSE3", "AVX2", "AMX_INT8", "REPACK"]


@pytest.mark.parametrize("cpu,features,path", [
    ("haswell", "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+f16c,+fma,+popcnt,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3",
     "avx2-maddubs"),
    ("skylake-avx512", "+avx,+avx2,+fma,+f16c,+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512cd,+avx512vnni",
     "avx512-vnni"),
    ("x86-64", "+64bit,+sse,+sse2", "portable"),
])
def test_machine_reports_the_compile_target(cpu, features, path):
    """bench's machine record says what numba compiles for (an AVX2-only run on an
    AVX-512 host says haswell) and the int8 path that target selects."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features,
               RUNTIME_CPU_FLAGS="fpu avx2 fma avx512f amx_int8")
    r = subprocess.run([sys.executable, "-c", "import json; from runtime import bench; print(json.dumps(bench.machine()))"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["numba_cpu"] == cpu and m["numba_cpu_features"] == features and m["int8_path"] == path
    assert m["cpu_flags"] == ["avx2", "fma", "avx512f", "amx_int8"]


@pytest.mark.parametrize("args,msg", [
    (["-r", "0"], "repetitions"),
    (["-p", "0", "-n", "0"], "nothing to measure"),
    (["-n", "-1"], ">= 0"),
])
def test_bad_arguments(args, msg):
    path = synthetic_model("llama", 1, False, "F32")
    r = _bench(path, *args, timeout=120)
    assert r.returncode != 0
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_model():
    r = _bench("no/such/model.gguf", timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_arguments_checked_before_resolving_the_model():
    # a registry name that is not pulled yet must not be downloaded for a bad -r
    r = _bench("no-such-registry-name", "-r", "0", timeout=120)
    assert r.returncode != 0 and "repetitions" in r.stderr and "Traceback" not in r.stderr


def test_vs_llamacpp_without_llama_cpp(tmp_path):
    (tmp_path / "llama_cpp.py").write_text("raise ImportError('blocked for the test')\n")
    path = synthetic_model("llama", 1, False, "F32")
    r = _bench(path, "-p", 8, "-n", 2, "-r", 1, "--vs-llamacpp", timeout=120, pythonpath=[tmp_path])
    assert r.returncode == 1, r.stderr
    assert "llama-cpp-python" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


def test_public_api(llama_cpp):
    from runtime.bench import bench_llamacpp, bench_ours

    import numba

    path = synthetic_model("llama", 1, False, "F32")
    before = numba.get_num_threads()
    try:
        for fn in (bench_ours, bench_llamacpp):
            res = fn(path, n_prompt=8, n_gen=0, n_threads=1, reps=2)
            assert set(res["tests"]) == {"pp8"} and res["threads"] == 1 and res["load_s"] >= 0
            _check_stats(res["tests"]["pp8"], 2)
    finally:
        numba.set_num_threads(before)  # the rest of the test session keeps its threads


def test_stream_sum_reads_every_element():
    """The bandwidth probe's sum covers the whole array exactly once (64 parts,
    a length that does not divide evenly), so its bytes/s is of the whole read."""
    import numpy as np

    from runtime.bench import _stream_sum, read_bandwidth

    a = np.arange(1_000_003, dtype=np.uint64)
    assert int(_stream_sum(a)) == int(a.sum())
    assert read_bandwidth(8 << 20, reps=2) > 0
