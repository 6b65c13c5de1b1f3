"""numba's on-disk cache follows the package sources: an edit to any module (say a
kernel in quant.py that model.py's compiled engine inlines) starts a fresh cache."""

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
    pkg.mkdir()
    for f in (ROOT / "runtime").glob("*.py"):
        shutil.copy(f, pkg / f.name)
    first = _cache_dir(tmp_path)
    assert Path(first).parent == pkg / "__pycache__" and Path(first).name.startswith("numba-")
    Path(first).mkdir(parents=True)
    assert _cache_dir(tmp_path) == first  # same sources, same cache
    with open(pkg / "quant.py", "a") as f:
        f.write("\n# an edit\n")
    second = _cache_dir(tmp_path)
    assert second != first
    assert not Path(first).exists()  # the stale cache is removed
