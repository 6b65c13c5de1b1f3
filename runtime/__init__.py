"""Local LLM inference for GGUF models in pure Python + numba.

Public entry points: ``GGUFFile`` (memory-mapped GGUF reader), ``GGUFError``
(the one exception for bad files) and ``Model`` (forward pass, sessions).
Imports are lazy so that ``python -m runtime --help`` stays instant.
"""

__version__ = "0.1.0"

__all__ = ["GGUFFile", "GGUFError", "Model", "__version__"]


def __getattr__(name):
    if name in ("GGUFFile", "GGUFError"):
        from . import gguf

        return getattr(gguf, name)
    if name == "Model":
        from .model import Model

        return Model
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
