"""runtime.llamacpp: the AMX mitigation is decided by CPU and build (both branches
exercised with injected flags, on any hardware), and a crash of llama.cpp in the
probe child becomes a message naming llama.cpp and the signal."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from runtime import llamacpp
from _oracle import kl_stats, llamacpp_logits, synthetic_model

AMX_CPU = "fpu sse2 avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8"
NO_AMX_CPU = "fpu sse2 avx2 fma f16c"
AMX_BUILD = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 | "
NO_AMX_BUILD = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | REPACK = 1 | "


def test_cpu_flags_from_cpuinfo_text_and_environment(monkeypatch):
    text = f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {AMX_CPU}\n\nprocessor\t: 1\nflags\t: fpu\n"
    assert "amx_int8" in llamacpp.cpu_flags(text)
    assert llamacpp.cpu_flags("model name : x\n") == frozenset()
    monkeypatch.setenv("RUNTIME_CPU_FLAGS", NO_AMX_CPU)
    assert llamacpp.cpu_flags() == frozenset(NO_AMX_CPU.split())


@pytest.mark.parametrize("cpu,build,active", [
    (AMX_CPU, AMX_BUILD, True),        # the crashing combination
    (AMX_CPU, NO_AMX_BUILD, False),    # AMX-free build: REPACK kept, untouched
    (NO_AMX_CPU, AMX_BUILD, False),    # build has it, the CPU cannot run it
    (NO_AMX_CPU, NO_AMX_BUILD, False),
], ids=["amx-cpu-amx-build", "amx-cpu-plain-build", "plain-cpu-amx-build", "plain-cpu-plain-build"])
def test_mitigation_by_cpu_and_build(cpu, build, active):
    m = llamacpp.decide(frozenset(cpu.split()), build)
    assert m.active is active
    line = m.describe()
    assert "\n" not in line and line.startswith("llama.cpp")
    assert ("use_extra_bufts=False" in line and "REPACK" in line) if active else "use_extra_bufts" not in line


def test_load_turns_extra_buffer_types_off_only_when_needed(llama_cpp):
    try:
        mod = llamacpp.load(flags=AMX_CPU.split(), system_info=AMX_BUILD)
        assert llamacpp.mitigation().active
        # Llama() reads its parameters from llama_cpp.llama_cpp's function: that is the one patched.
        assert mod.llama_cpp.llama_model_default_params().use_extra_bufts is False
        mod = llamacpp.load(flags=AMX_CPU.split(), system_info=NO_AMX_BUILD)
        assert not llamacpp.mitigation().active
        assert mod.llama_cpp.llama_model_default_params().use_extra_bufts is True
    finally:
        llamacpp.load()  # this machine's own decision for the rest of the session


def test_mitigated_llama_cpp_still_computes_the_same_model(llama_cpp):
    path = synthetic_model("llama", 1, False, "Q4_0")
    ids = list(range(3, 43))
    plain = llamacpp_logits(llama_cpp, path, ids)
    try:
        mod = llamacpp.load(flags=AMX_CPU.split(), system_info=AMX_BUILD)
        mitigated = llamacpp_logits(mod, path, ids)
    finally:
        llamacpp.load()
    kl, top1 = kl_stats(plain, mitigated)
    assert np.isfinite(mitigated).all() and kl < 1e-3 and top1 >= 0.95, (kl, top1)


def test_probe_runs_one_batch(llama_cpp, smollm2_path):
    r = llamacpp.probe(smollm2_path)
    assert r.ok, r.output
    assert r.describe().startswith("llama.cpp probe")


def test_probe_names_llama_cpp_and_the_signal_of_a_crash():
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    r = llamacpp._run_child(crash, timeout=60)
    assert not r.ok and r.returncode < 0
    msg = r.describe()
    assert "llama.cpp crashed" in msg and "SIGSEGV" in msg


def test_probe_of_a_file_llama_cpp_cannot_load(tmp_path):
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    r = llamacpp.probe(bad, timeout=120)
    assert not r.ok and "exit status" in r.describe()
