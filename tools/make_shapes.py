"""Models with the real shapes of what users run (random weights), quantized by llama.cpp.

    python tools/make_shapes.py qwen2.5-0.5b --ftype Q4_K_M Q8_0      # -> models/shapes/
    python tools/make_shapes.py all --ftype Q4_K_M Q5_K_M Q6_K Q8_0 Q4_0 IQ4_XS

A 135M model hides what a 1.5B one shows (a 152k-row output matrix, matrices larger
than the caches, Q5_0 fallbacks where a row is not a multiple of 256): speed work
measures on these.  The F16 source is written once per shape (random weights scaled
as tools/make_synthetic.py does), then each requested type is made from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402

from make_synthetic import SynthSpec, write_synthetic  # noqa: E402
from quantize import quantize  # noqa: E402

# (arch, layers, d, heads, kv heads, head dim, ffn, vocab, tied, rope base); shared/MODELS.md
SHAPES = {
    "qwen2.5-0.5b": SynthSpec(arch="qwen2", n_layers=24, d_model=896, n_heads=14, gqa=7, head_dim=64,
                              ffn=4864, vocab=151936, tied=True, rope_base=1e6),
    "qwen2.5-1.5b": SynthSpec(arch="qwen2", n_layers=28, d_model=1536, n_heads=12, gqa=6, head_dim=128,
                              ffn=8960, vocab=151936, tied=True, rope_base=1e6),
    "llama-3.2-1b": SynthSpec(arch="llama", n_layers=16, d_model=2048, n_heads=32, gqa=4, head_dim=64,
                              ffn=8192, vocab=128256, tied=True, rope_base=5e5),
    "qwen3-1.7b": SynthSpec(arch="qwen3", n_layers=28, d_model=2048, n_heads=16, gqa=2, head_dim=128,
                            ffn=6144, vocab=151936, tied=True, rope_base=1e6),
}
OUT = ROOT / "models" / "shapes"


def build(name: str, ftypes, out: Path = OUT) -> list[Path]:
    spec = SHAPES[name]
    out.mkdir(parents=True, exist_ok=True)
    src = out / f"{name}.F16.gguf"
    if not src.exists():
        tmp = src.with_suffix(".part")
        write_synthetic(tmp, spec, any_rows=True, dtype=np.float16)
        tmp.replace(src)
    paths = []
    for ft in ftypes:
        dst = out / f"{name}.{ft.upper()}.gguf"
        if ft.upper() == "F16":
            paths.append(src)
            continue
        if not dst.exists():
            quantize(src, dst, ft)
        paths.append(dst)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=[*SHAPES, "all"])
    ap.add_argument("--ftype", nargs="+", default=["Q4_K_M", "Q8_0"])
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    for name in SHAPES if a.shape == "all" else [a.shape]:
        for p in build(name, a.ftype, a.out):
            print(p, f"{p.stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
