"""numba's on-disk cache follows the package sources: an edit to any module (say a
kernel in quant/ that model.py's compiled engine inlines) starts a fresh cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cache_dir(pkg_parent: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["PYTHONPATH"] = str(pkg_parent)
    r = subprocess.run([sys.executable, "-c", "import os, runtime; print(os.environ['NUMBA_CACHE_DIR'])"],
                       cwd=pkg_parent, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_source_edit_changes_numba_cache_dir(tmp_path):
    pkg = tmp_path / "runtime"
    shutil.copytree(ROOT / "runtime", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    first = _cache_dir(tmp_path)
    assert Path(first).parent == pkg / "__pycache__" and Path(first).name.startswith("numba-")
    Path(first).mkdir(parents=True)
    assert _cache_dir(tmp_path) == first  # same sources, same cache
    with open(pkg / "quant" / "q4_k.py", "a") as f:  # a kernel module inside the subpackage
        f.write("\n# an edit\n")
    second = _cache_dir(tmp_path)
    assert second != first
    assert not Path(first).exists()  # the stale cache is removed


def test_a_child_process_shares_its_parents_cache(tmp_path):
    """A process started by one that imported runtime inherits NUMBA_CACHE_DIR (the hashed
    directory itself): it must use that directory, not a fresh one nested inside it; a
    user's own NUMBA_CACHE_DIR stays the parent of the hashed one."""
    code = ("import os, subprocess, sys, runtime; print(os.environ['NUMBA_CACHE_DIR']); sys.stdout.flush(); "
            "subprocess.run([sys.executable, '-c', 'import os, runtime; print(os.environ[\"NUMBA_CACHE_DIR\"])'])")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "user-cache"))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    parent, child = r.stdout.split()
    assert Path(parent).parent == tmp_path / "user-cache" and Path(parent).name.startswith("numba-")
    assert child == parent


def test_forward_pass_loads_from_the_cache(tmp_path):
    """The engine's compiled entry (named tuples of weights, config and cache) is
    found in numba's on-disk cache by a second process: no recompilation per start."""
    sys.path.insert(0, str(ROOT / "tools"))
    from make_synthetic import default_spec, write_synthetic

    path = write_synthetic(tmp_path / "m.gguf", default_spec("qwen3"))
    code = (
        "import runtime, sys\n"
        "from runtime import model\n"
        f"m = runtime.Model.load({str(path)!r}, n_ctx=32)\n"
        "s = m.session(); s.eval([1, 2, 3, 4]); s.eval([5]); s.logits()\n"
        "st = model.forward_layers.stats\n"
        "print(len(st.cache_hits), len(st.cache_misses))\n")
    env = {k: v for k, v in os.environ.items()}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                           env=env, cwd=ROOT) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    hits, misses = map(int, runs[1].stdout.split())
    assert hits >= 1 and misses == 0, runs[1].stdout


def test_first_run_says_it_is_compiling(tmp_path):
    """A cold numba cache (the first run after install or an upgrade) gets one line on
    stderr before the kernels compile; a warm one gets none."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "runtime", "generate", str(tmp_path / "absent.gguf"), "-p", "hi", "-n", "1"]

    def run():
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "error:" in r.stderr  # the missing file, after the notice
        return r.stderr

    first = run()
    assert first.count("compiling kernels for this CPU") == 1 and "first run only" in first
    tagged = next((tmp_path / "cache").glob("numba-*"), None) or (tmp_path / "cache" / "numba-x")
    (tagged / "some" / "dir").mkdir(parents=True, exist_ok=True)
    (tagged / "some" / "dir" / "model.forward_layers-300.py311.nbi").write_bytes(b"")
    assert "compiling kernels" not in run()


def test_a_format_compiles_only_its_own_code(tmp_path):
    """kernels(T) are closures over the constant T: compiling Q4_0's fused kernel
    (empty cache) compiles Q4_0's row dot and no other format's."""
    code = """
import sys
from numba.core import event
names = []
class L(event.Listener):
    def on_start(self, ev):
        names.append(ev.data["dispatcher"].py_func.__qualname__)
    def on_end(self, ev):
        pass
event.register("numba:compile", L())
from runtime import quant
quant.kernels(quant.GGML_Q4_0).fused.compile(quant.SIG_FUSED)
print(" ".join(names))
"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    names = r.stdout.split()
    dots = {n for n in names if n.startswith("_rdot_")}
    assert dots == {"_rdot_q4_0"}, names


def test_compile_notice_names_the_new_formats(tmp_path, monkeypatch):
    """A model whose formats' kernels are not cached yet says which it compiles
    (the CLI prints it); the kernel columns of its matrices are filled in."""
    from runtime import model as model_mod
    from runtime import quant

    from runtime.model import Model

    sys.path.insert(0, str(ROOT / "tools"))
    from make_synthetic import write_synthetic

    path = write_synthetic(tmp_path / "m.gguf", n_layers=1, d_model=256, n_heads=8, ffn=512, vocab=512)
    m = Model.load(path, n_ctx=64)
    seen = []
    monkeypatch.setattr(model_mod, "COMPILE_NOTICE", seen.append)
    monkeypatch.setattr(quant, "uncompiled", lambda ts: sorted(set(ts)))
    w = m.weights
    types_ = sorted({int(t) for t in w.mats[:, :, 3].ravel()} | {m.output.type_id})
    assert seen == [types_]
    assert (w.mats[:, :, model_mod.KERNELS] != 0).all()


def test_formats_compiled_in_two_processes_keep_their_own_kernels(tmp_path):
    """Two formats' kernels, each compiled first thing in a process of its own (as two
    models' helper processes do), then both loaded from the cache into one process:
    each call reaches its own format's code (the symbols once collided, and one
    format's matmul ran the other's)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    for t in ("GGML_Q4_0", "GGML_Q4_1"):
        code = f"from runtime import quant; quant.kernels(quant.{t}).fused.compile(quant.SIG_FUSED)"
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
    code = """
import numpy as np
from runtime import quant
from runtime.quant import matmuls as qmm
rng = np.random.default_rng(3)
names = set()
for t in (quant.GGML_Q4_0, quant.GGML_Q4_1):
    k = quant.kernels(t).fused
    k.compile(quant.SIG_FUSED)
    names.add(k.overloads[quant.SIG_FUSED.args].fndesc.llvm_cfunc_wrapper_name)
for t in (quant.GGML_Q4_0, quant.GGML_Q4_1):
    bs = 18 if t == quant.GGML_Q4_0 else 20
    raw = rng.integers(0, 256, (8, 4 * bs), dtype=np.uint8)
    for r in range(8):
        for b in range(4):
            raw[r, b * bs:b * bs + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            if bs == 20:
                raw[r, b * bs + 2:b * bs + 4] = np.frombuffer(np.float16(-0.05).tobytes(), np.uint8)
    W = qmm._as_u8_readonly(raw, 2)
    X = rng.standard_normal((1, 128)).astype(np.float32)
    want = X.astype(np.float64) @ quant.dequantize(W, t, (8, 128)).astype(np.float64).T
    out = np.empty((1, 8), np.float32)
    k = np.array(quant.kernel_addresses(t), np.int64)
    qmm.matmul_at(t, k, W, X, out)  # through the address, as the engine calls it
    assert np.abs(out - want).max() < 1e-4 * np.abs(want).max(), (t, out, want)
print(len(names))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "2"


def test_fast_precision_links_without_the_chunked_kernels():
    """The integer path takes int16 tiles above the int8 decode rows, so a fast model
    links no float chunked kernel where its format has tiles (a fresh install then
    compiles none); the first float32-activation use links them.  A 24-token prompt
    (the tiles now, the chunked kernel before) gives the exact path's logits to
    within integer activations' rounding."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from _oracle import synthetic_model

    from runtime import quant
    from runtime.model import KERNELS, Model

    m = Model.load(synthetic_model("llama", 2, False, "Q8_0"), n_ctx=64)
    ids = list(range(3, 3 + 24))
    assert quant.Q8_MAX_ROWS < len(ids) and quant.I16_MIN_N <= len(ids)
    got = m.session(precision="fast").eval(ids, all_logits=True)
    mats = m.linked_weights(exact=False).mats
    assert (mats[:, :, KERNELS + quant.KERNEL_CHUNKED] == 0).all()
    assert (mats[:, :, KERNELS + quant.KERNEL_I16] != 0).all()
    want = m.session(precision="exact").eval(ids, all_logits=True)
    assert (m.linked_weights(exact=False).mats[:, :, KERNELS + quant.KERNEL_CHUNKED] != 0).all()
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()
