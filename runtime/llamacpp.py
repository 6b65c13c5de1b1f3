"""llama.cpp (through llama-cpp-python) as the reference engine, loaded safely.

Every comparison with llama.cpp (the tests' oracle, ``bench --vs-llamacpp``, the
tools/ scripts) imports it through :func:`load`, which applies one mitigation:

On CPUs with AMX (Intel Sapphire Rapids and later), a llama.cpp *built with* AMX
segfaults in batched matmuls of Q4_0 / Q4_1 / Q8_0 / Q4_K weights (its AMX buffer
type; seen with llama-cpp-python 0.3.36, one token at a time works).  ggml's AMX
path covers Q5_K, Q6_K and IQ4_XS too, so the mitigation is chosen by CPU and
build, never by quant type: where both have AMX, models load with
``llama_model_params.use_extra_bufts = False``, which turns off the AMX *and* the
REPACK buffer types (llama.cpp then runs its plain CPU kernels, a slower
reference for speed races).  An AMX-free build keeps REPACK and needs nothing:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
      -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
      -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON \
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
      pip install --force-reinstall --no-cache-dir llama-cpp-python

A crash nobody knows of yet should not kill the process that compares: :func:`probe`
runs one batched evaluation in a child process and reports how it ended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LlamaCppMissing", "Mitigation", "cpu_flags", "build_has_amx", "decide", "load",
           "mitigation", "probe", "ProbeResult"]


class LlamaCppMissing(RuntimeError):
    """llama-cpp-python is not installed."""


@dataclass(frozen=True)
class Mitigation:
    """What :func:`load` did to llama.cpp on this CPU and build."""

    active: bool        # use_extra_bufts turned off
    cpu_amx: bool
    build_amx: bool

    def describe(self) -> str:
        """One line for pytest's header and bench's output."""
        if self.active:
            return ("llama.cpp: CPU and build both have AMX, whose batched quantized matmuls crash; "
                    "models load with use_extra_bufts=False (no AMX, no REPACK: llama.cpp runs "
                    "its plain CPU kernels; README shows the AMX-free build for a full-speed race)")
        if self.cpu_amx:
            return "llama.cpp: CPU has AMX, this build has none: run as installed (REPACK on)"
        return "llama.cpp: no AMX on this CPU: run as installed"


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo's first 'flags' line (text injectable).

    $RUNTIME_CPU_FLAGS (space-separated) replaces the machine's own: tests and a
    child process use it to exercise either branch on any hardware."""
    env = os.environ.get("RUNTIME_CPU_FLAGS")
    if cpuinfo is None and env is not None:
        return frozenset(env.split())
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:  # not Linux: no flags known, so no mitigation
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def build_has_amx(system_info: str) -> bool:
    """Whether llama_print_system_info() says the build uses AMX int8 ('AMX_INT8 = 1')."""
    compact = system_info.replace(" ", "")
    return "AMX_INT8=1" in compact


def decide(flags, system_info: str) -> Mitigation:
    cpu = "amx_int8" in flags
    build = build_has_amx(system_info)
    return Mitigation(active=cpu and build, cpu_amx=cpu, build_amx=build)


_state: dict = {}


def _system_info(llama_cpp) -> str:
    raw = llama_cpp.llama_print_system_info()
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def load(flags=None, system_info: str | None = None):
    """Import llama_cpp, apply the mitigation this CPU and build need, return the module.

    flags / system_info replace the machine's (tests).  Calling again re-decides:
    the wrapper of llama_model_default_params is installed or removed to match."""
    try:
        import llama_cpp
    except ImportError:
        raise LlamaCppMissing("llama-cpp-python is not installed (pip install -e '.[test]')") from None
    low = llama_cpp.llama_cpp  # Llama() builds its model parameters from this module's function
    original = _state.setdefault("default_params", low.llama_model_default_params)
    m = decide(cpu_flags() if flags is None else frozenset(flags),
               _system_info(llama_cpp) if system_info is None else system_info)
    if m.active:
        def default_params_without_extra_bufts():
            p = original()
            p.use_extra_bufts = False
            return p
        low.llama_model_default_params = default_params_without_extra_bufts
        llama_cpp.llama_model_default_params = default_params_without_extra_bufts
    else:
        low.llama_model_default_params = original
        llama_cpp.llama_model_default_params = original
    _state["mitigation"] = m
    return llama_cpp


def mitigation() -> Mitigation | None:
    """What the last :func:`load` decided (None before the first)."""
    return _state.get("mitigation")


@dataclass(frozen=True)
class ProbeResult:
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.ok:
            return "llama.cpp probe: one batched evaluation ran"
        rc = self.returncode
        how = f"exit status {rc}"
        if rc < 0:
            try:
                how = f"signal {signal.Signals(-rc).name}"
            except ValueError:
                how = f"signal {-rc}"
        tail = self.output.strip().splitlines()[-1:] if self.output.strip() else []
        return (f"llama.cpp crashed ({how}) in a probe subprocess evaluating one batch of tokens"
                + (f": {tail[0]}" if tail else ""))


def probe(model_path, n_tokens: int = 40, timeout: float = 300.0) -> ProbeResult:
    """Load model_path in llama.cpp in a child process (same mitigation as here) and
    evaluate one batch of n_tokens; how the child ended.  A crash kills the child only."""
    return _run_child([sys.executable, "-m", "runtime.llamacpp", str(model_path), str(int(n_tokens))],
                      timeout)


def _run_child(cmd, timeout: float) -> ProbeResult:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           cwd=str(Path(__file__).resolve().parents[1]))
    except subprocess.TimeoutExpired:
        return ProbeResult(124, f"no answer within {timeout:.0f} s")
    return ProbeResult(r.returncode, (r.stdout or "") + (r.stderr or ""))


def _probe_main(argv) -> int:
    path, n = argv[0], int(argv[1]) if len(argv) > 1 else 40
    llama_cpp = load()
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(512, n), n_batch=256, n_ubatch=256,
                          n_threads=2, verbose=False)
    try:
        vocab = llm.n_vocab()
        llm.eval([(300 + i) % vocab for i in range(n)])   # the batched path that crashed
        llm.eval([(301 + n) % vocab])                     # and one token
    finally:
        llm.close()
    print(mitigation().describe())
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1:]))
