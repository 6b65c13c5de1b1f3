"""Local LLM inference for GGUF models in pure Python + numba.

Public entry points: ``GGUFFile`` (memory-mapped GGUF reader), ``GGUFError``
(the one exception for bad files) and ``Model`` (forward pass, sessions).
Imports are lazy so that ``python -m runtime --help`` stays instant.
"""

__version__ = "0.1.0"


def _numba_cache_dir() -> None:
    """Point numba's on-disk cache at a directory named after a hash of this package's
    compiled modules' sources.  numba keys a cached function on its own file only, so after an edit to
    a format's kernels in quant/ the cached engine in model.py would keep running the old, inlined
    kernels; with the hash, any source change starts a fresh cache (older ones are
    removed).  A NUMBA_CACHE_DIR set by the user is kept as the parent directory."""
    import hashlib
    import os
    import re
    import shutil
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(here.rglob("*.py")):  # the modules with compiled code (quant/ too)
        src = f.read_bytes()
        if b"@njit" in src or b"@intrinsic" in src:
            h.update(f.relative_to(here).as_posix().encode() + b"\0" + src)
    tag = f"numba-{h.hexdigest()[:16]}"
    parent = Path(os.environ["NUMBA_CACHE_DIR"]) if os.environ.get("NUMBA_CACHE_DIR") else here / "__pycache__"
    if re.fullmatch(r"numba-[0-9a-f]{16}", parent.name):
        # Inherited from a process that imported this package (a CLI test, a server
        # started by a script): it already points at a cache of ours, so its parent is
        # the parent.  Nesting a fresh cache inside it made every such child compile
        # the whole engine again (about two minutes on 2 cores).
        parent = parent.parent
    if not os.access(parent if parent.exists() else parent.parent, os.W_OK):
        parent = Path.home() / ".cache" / "gguf-runtime"
    target = parent / tag
    try:
        for old in parent.glob("numba-*"):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    except OSError:
        pass
    if "numba" in sys.modules:
        import numba.core.config

        numba.core.config.CACHE_DIR = str(target)
    else:
        os.environ["NUMBA_CACHE_DIR"] = str(target)


_numba_cache_dir()

__all__ = ["GGUFFile", "GGUFError", "Model", "__version__"]


def __getattr__(name):
    if name in ("GGUFFile", "GGUFError"):
        from . import gguf

        return getattr(gguf, name)
    if name == "Model":
        from .model import Model

        return Model
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
