"""Our imatrix against llama-imatrix, and llama-imatrix against itself.

    python tools/imatrix_vs_llamacpp.py [WORKDIR]

The F32 SmolLM2, text and settings of tests/test_imatrix.py (4 chunks of 128 tokens,
float32 KV cache, flash attention off); llama-imatrix run with only its micro-batch
size changed (-ub 512: the test's one batch of 512 rows; 128; 32; below 16 rows its
collector ignores the batch), then ours against each: the worst plain relative
difference per file and the one scaled by max(column, matrix mean).  Needs
`python -m runtime.llamacpp_tools` (the built tools).
"""
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

from runtime import imatrix as ri
from runtime import quantize as rq
from runtime.llamacpp_tools import find_tools
from runtime.model import Model
from runtime.perplexity import tokenize_for_perplexity

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-test.txt"
CTX, CHUNKS = 128, 4


def _theirs(tools, f32: Path, text: Path, d: Path, ub: int) -> Path:
    out = d / f"theirs-ub{ub}.gguf"
    if not out.exists():
        subprocess.run([str(tools.imatrix), "-m", str(f32), "-f", str(text), "-o", str(out), "--output-format", "gguf",
                        "-c", str(CTX), "--chunks", str(CHUNKS), "-ctk", "f32", "-ctv", "f32", "-fa", "off",
                        "--no-ppl", "-t", "2", "-ub", str(ub), "-b", str(CTX * CHUNKS)], check=True, capture_output=True)
    return out


def _sums(path: Path) -> dict:
    rd = gguf.GGUFReader(path)
    return {t.name: np.array(t.data, np.float64).reshape(-1) for t in rd.tensors if t.name.endswith("in_sum2")}


def main() -> int:
    tools = find_tools()
    if tools is None:
        print("llama.cpp tools not built: run python -m runtime.llamacpp_tools", file=sys.stderr)
        return 1
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models" / "imatrix-check"
    d.mkdir(parents=True, exist_ok=True)
    f32 = d / "smollm2-f32.gguf"
    if not f32.exists():
        rq.quantize_file(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf", f32, "F32")
    text = d / "calib.txt"
    calib = WIKITEXT.read_text(encoding="utf-8")[:3000]
    text.write_text(calib, encoding="utf-8")
    m = Model.load(f32, n_ctx=CTX, kv_type="f32", precision="exact")
    r = ri.compute_imatrix(m, tokenize_for_perplexity(m, calib), CTX, CHUNKS, datasets=[str(text)])
    ours = _sums(ri.write_imatrix(r, d / "ours.gguf"))
    theirs = {ub: _sums(_theirs(tools, f32, text, d, ub)) for ub in (512, 128, 32)}
    for a, b in ((128, 512), (32, 512), (32, 128)):
        (w, wk), (s, _) = ri.worst_difference(theirs[a], theirs[b])
        print(f"llama-imatrix -ub {a} vs -ub {b}: worst plain {w:.2e} ({wk}), scaled {s:.2e}")
    for ub, t in theirs.items():
        (w, wk), (s, _) = ri.worst_difference(ours, t)
        print(f"ours vs llama-imatrix -ub {ub}: worst plain {w:.2e} ({wk}), scaled {s:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
