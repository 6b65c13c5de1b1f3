"""llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity),
built once per machine from the source vendored in llama-cpp-python's sdist.

llama-cpp-python's wheel ships the library only, and its C API cannot pass an
importance matrix (llama.cpp keeps it in a C++ map) nor read or write
llama-perplexity's KL-divergence files.  The comparison tests need the tools
themselves, of the same llama.cpp version as the oracle library, so this module:

1. downloads the sdist of the *installed* llama-cpp-python version
   (``pip download --no-binary :all: --no-deps llama-cpp-python==V``),
2. extracts ``vendor/llama.cpp`` and builds only the three targets with cmake
   (ninja when present), Release, statically linked (the binaries are moved out of
   the build tree, so they must not point back into it), no tests/examples/server,
3. moves them into ``<cache>/<version>-<hash>/`` with one rename, so a half-finished
   build is never found, under a file lock, so two processes never build at once.

The hash covers the CPU's feature flags and the cmake arguments: ``-DGGML_NATIVE=ON``
compiles for this CPU, so a cache shared by two machines must not hand one machine's
binaries to the other.  On CPUs with AMX the native build is replaced by the
AMX-free flag set of runtime/llamacpp.py (ggml's AMX buffer type crashes there).

Cache: $RUNTIME_LLAMA_TOOLS_DIR, else ~/.cache/gguf-runtime/llama-tools (beside the
models' fallback cache; outside the checkout, so a fresh CI checkout on the same
machine still finds it).  ``python -m runtime.llamacpp_tools`` builds (if needed)
and prints where the tools are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .llamacpp import cpu_flags
from .threads import default_threads

__all__ = ["TOOLS", "ToolsBuildError", "LlamaCppTools", "cache_root", "cmake_args", "build_key",
           "installed_version", "find_tools", "ensure_tools", "missing_build_tools"]

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
BUILD_VERSION = 1  # bump when the build recipe below changes: a new cache key

# The AMX-free flag set of runtime/llamacpp.py's docstring (and ../shared/MODELS.md):
# everything an AVX-512 machine has, AMX tiles off.
AMX_FREE_FLAGS = ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
                  "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON",
                  "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AVX_VNNI=ON",
                  "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")


class ToolsBuildError(RuntimeError):
    """The tools could not be built (missing cmake/compiler, download or build failure)."""


@dataclass(frozen=True)
class LlamaCppTools:
    """Paths of the built tools and how they came to be."""

    directory: Path
    version: str
    built: bool            # True when this call ran the build, False when found cached
    build_seconds: float   # wall time of the build that produced them (from BUILD.json)

    def path(self, tool: str) -> Path:
        if tool not in TOOLS:
            raise KeyError(f"unknown tool {tool!r} (have {', '.join(TOOLS)})")
        return self.directory / tool

    @property
    def quantize(self) -> Path:
        return self.path("llama-quantize")

    @property
    def imatrix(self) -> Path:
        return self.path("llama-imatrix")

    @property
    def perplexity(self) -> Path:
        return self.path("llama-perplexity")


def cache_root() -> Path:
    env = os.environ.get("RUNTIME_LLAMA_TOOLS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gguf-runtime" / "llama-tools"


def installed_version() -> str:
    """The installed llama-cpp-python's version (the oracle library the tools must match)."""
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise ToolsBuildError("llama-cpp-python is not installed: its version decides which llama.cpp "
                              "source to build (pip install -e '.[test]')") from None


def cmake_args(flags=None) -> list[str]:
    """The configure arguments (source and build directories excluded) for this CPU."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    cpu = list(AMX_FREE_FLAGS) if "amx_int8" in flags else ["-DGGML_NATIVE=ON"]
    return ["-DCMAKE_BUILD_TYPE=Release", *cpu, "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON",
            "-DLLAMA_BUILD_COMMON=ON", "-DGGML_BACKEND_DL=OFF"]


def build_key(version: str, flags=None) -> str:
    """<version>-<hash of CPU flags, cmake arguments and recipe version>."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    h = hashlib.sha256(json.dumps([BUILD_VERSION, sorted(flags), cmake_args(flags)]).encode())
    return f"{version}-{h.hexdigest()[:12]}"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def missing_build_tools() -> list[str]:
    """What the build needs and this machine lacks: [] when cmake and a C/C++ compiler exist."""
    missing = []
    if not shutil.which("cmake"):
        missing.append("cmake")
    if _compiler() is None:
        missing.append("a C++ compiler (c++, g++ or clang++; or $CXX)")
    if not any(shutil.which(n) for n in (os.environ.get("CC"), "cc", "gcc", "clang") if n):
        missing.append("a C compiler (cc, gcc or clang; or $CC)")
    return missing


def find_tools(version: str | None = None, flags=None) -> LlamaCppTools | None:
    """The cached tools for this version and CPU, or None (never builds)."""
    version = version or installed_version()
    d = cache_root() / build_key(version, flags)
    if not all((d / t).is_file() and os.access(d / t, os.X_OK) for t in TOOLS):
        return None
    try:
        seconds = float(json.loads((d / "BUILD.json").read_text())["build_seconds"])
    except (OSError, ValueError, KeyError):
        seconds = float("nan")
    return LlamaCppTools(d, version, False, seconds)


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock on `path` (blocks until the holder, e.g. another test run, is done)."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd, log, cwd=None, timeout=None, what="") -> None:
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    try:
        r = subprocess.run(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ToolsBuildError(f"{what} took longer than {timeout:.0f} s") from None
    if r.returncode != 0:
        raise ToolsBuildError(f"{what} failed (exit status {r.returncode})")


def _extract_vendor(sdist: Path, dest: Path) -> Path:
    """Extract <top>/vendor/llama.cpp/ of the sdist into dest; return the source directory."""
    try:
        tf = tarfile.open(sdist)
    except (OSError, tarfile.TarError) as e:
        raise ToolsBuildError(f"{sdist}: not a readable sdist ({e})") from None
    with tf:
        members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name
                   and m.name.split("/", 1)[1].startswith("vendor/llama.cpp/")]
        if not members:
            raise ToolsBuildError(f"{sdist.name} has no vendor/llama.cpp/ source")
        top = members[0].name.split("/", 1)[0]
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(dest, members=members, **kw)
    src = dest / top / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        raise ToolsBuildError(f"{sdist.name}: vendor/llama.cpp/CMakeLists.txt missing")
    return src


def _build(version: str, flags, key: str, root: Path, sdist: Path | None, jobs: int, log_to,
           timeout: float) -> float:
    final = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.build-", dir=root))
    log_path = tmp / "build.log"
    t0 = time.monotonic()
    try:
        with open(log_path, "w") as log:
            if sdist is None:
                _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                      "--disable-pip-version-check", f"llama-cpp-python=={version}", "-d", tmp / "sdist"],
                     log, timeout=600, what=f"downloading the llama-cpp-python {version} sdist")
                found = sorted((tmp / "sdist").glob("*.tar.gz"))
                if not found:
                    raise ToolsBuildError(f"pip download gave no llama-cpp-python {version} sdist")
                sdist = found[0]
            log_to(f"llama.cpp tools: building {', '.join(TOOLS)} from {sdist.name} ({jobs} jobs) ...")
            src = _extract_vendor(Path(sdist), tmp / "src")
            build = tmp / "build"
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            _run(["cmake", "-S", src, "-B", build, *gen, *cmake_args(flags)], log, timeout=600,
                 what="cmake configure")
            left = max(60.0, timeout - (time.monotonic() - t0))
            _run(["cmake", "--build", build, "--config", "Release", "-j", str(jobs), "--target", *TOOLS],
                 log, timeout=left, what="cmake --build")
            out = tmp / "bin"
            out.mkdir()
            for t in TOOLS:
                built = build / "bin" / t
                if not built.is_file():
                    raise ToolsBuildError(f"the build produced no {built}")
                shutil.copy2(built, out / t)
            seconds = time.monotonic() - t0
            (out / "BUILD.json").write_text(json.dumps({
                "llama_cpp_python": version, "sdist": Path(sdist).name, "cmake_args": cmake_args(flags),
                "jobs": jobs, "build_seconds": round(seconds, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }, indent=1) + "\n")
        if final.exists():  # a stale, incomplete directory (find_tools said no): replace it
            shutil.rmtree(final)
        os.replace(out, final)
        return seconds
    except BaseException as e:
        failed = root / f"{key}.failed.log"
        with contextlib.suppress(OSError):
            shutil.copy2(log_path, failed)
        if isinstance(e, ToolsBuildError):
            raise ToolsBuildError(f"{e}; build log: {failed}") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_tools(version: str | None = None, *, flags=None, sdist=None, jobs: int | None = None,
                 timeout: float = 3600.0, log=None) -> LlamaCppTools:
    """The tools for the installed llama-cpp-python on this CPU: cached, else built now.

    sdist: a local llama-cpp-python sdist (.tar.gz) instead of downloading one.
    log: a callable for progress lines (default: stderr).  Raises ToolsBuildError."""
    version = version or installed_version()
    found = find_tools(version, flags)
    if found:
        return found
    if sdist is not None and not Path(sdist).is_file():
        raise ToolsBuildError(f"{sdist}: no such sdist file")
    missing = missing_build_tools()
    if missing:
        raise ToolsBuildError("cannot build llama.cpp's tools: missing " + " and ".join(missing))
    log_to = log or (lambda s: print(s, file=sys.stderr, flush=True))
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = build_key(version, flags)
    with _lock(root / f"{key}.lock"):
        found = find_tools(version, flags)  # built by whoever held the lock before us
        if found:
            return found
        seconds = _build(version, flags, key, root, Path(sdist) if sdist else None, jobs or default_threads(),
                         log_to, timeout)
    log_to(f"llama.cpp tools: built in {seconds:.0f} s into {root / key}")
    return LlamaCppTools(root / key, version, True, seconds)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m runtime.llamacpp_tools",
                                 description="Build (once, cached) llama.cpp's llama-quantize, llama-imatrix "
                                             "and llama-perplexity from the installed llama-cpp-python's sdist.")
    ap.add_argument("--sdist", help="a local llama-cpp-python sdist instead of downloading it")
    ap.add_argument("-j", "--jobs", type=int, help="parallel compile jobs (default: all cores)")
    a = ap.parse_args(argv)
    try:
        t = ensure_tools(sdist=a.sdist, jobs=a.jobs)
    except ToolsBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    how = "built" if t.built else "cached"
    print(f"llama.cpp tools for llama-cpp-python {t.version} ({how}, build took {t.build_seconds:.0f} s): "
          f"{t.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
