"""Write synthetic llama / qwen2 / qwen3 / gemma3 GGUF files (F32 weights) with gguf-py's GGUFWriter.

The weights are random but scaled so that activations stay O(1) and the logits are peaky
(output rows std 4/sqrt(d)), like a trained model's; every matrix row length is a multiple of
256 so llama.cpp can k-quantize all of them. The vocabulary is a minimal GPT-2 style BPE one
(256 byte tokens, <|endoftext|>, then merged two-byte tokens with their merges) so that
llama.cpp loads the file as an ordinary model.

    python tools/make_synthetic.py --arch qwen3 --gqa 3 --tied --out X.gguf
    python tools/make_synthetic.py --arch gemma3 --layers 7 --out G.gguf

gemma3 files carry Gemma 3's extra tensors (per-head QK norms, post_attention_norm,
post_ffw_norm) and attention.sliding_window (default 32, so that a few hundred
tokens run far past the window); with 6 layers or more, layer 5 is the first global one.
    python tools/make_synthetic.py --preset bench --out models/synthetic/bench.F32.gguf

``--preset bench`` is the speed benchmark's model (tools/PERF.md): SmolLM2-135M's shape
(30 layers, tied output, heads of 64, ffn 3x d) with row lengths that are multiples of
256 (see BENCH_SPEC), so that llama.cpp's Q4_K_M k-quantizes every matrix.

Importable: ``write_synthetic(path, SynthSpec(...))`` / ``write_synthetic(path, arch=..., ...)``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

# Bump when the generator's output changes: model caches key on it.
GENERATOR_VERSION = "1"


@dataclass(frozen=True)
class SynthSpec:
    arch: str = "llama"          # llama | qwen2 | qwen3 | gemma3
    n_layers: int = 2
    d_model: int = 256
    n_heads: int = 8
    gqa: int = 1                 # n_heads / n_kv_heads
    head_dim: int | None = None  # None: d_model // n_heads (qwen3 default: 64 with 6 heads -> 384 != d)
    ffn: int = 512
    vocab: int = 512
    tied: bool = False
    rope_base: float = 10000.0
    rope_scale: float | None = None   # linear rope scaling factor
    rms_eps: float = 1e-6
    seed: int = 0
    rope_freqs: float | None = None   # llama3-style rope_freqs.weight: factors 1 .. this over the pairs
    heads_per_layer: tuple | None = None  # per-layer head_count / head_count_kv arrays (llama.cpp's
    kv_per_layer: tuple | None = None     # get_key_or_arr); None: n_heads and n_kv_heads everywhere
    sliding_window: int | None = None     # gemma3: attention.sliding_window of its local layers

    @property
    def n_kv_heads(self) -> int:
        if self.n_heads % self.gqa:
            raise ValueError(f"n_heads {self.n_heads} not divisible by gqa {self.gqa}")
        return self.n_heads // self.gqa

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def key(self) -> str:
        """A file-name-safe key of all parameters plus the generator version."""
        parts = [f"{k}{v}" for k, v in asdict(self).items() if v is not None and k != "arch"]
        return f"{self.arch}-" + "-".join(parts).replace(".", "p") + f"-v{GENERATOR_VERSION}"


def default_spec(arch: str, gqa: int = 1, tied: bool = False, **kw) -> SynthSpec:
    """Per-arch defaults with every row length a multiple of 256: GQA 1 -> 8 heads,
    3 -> 12 heads (d=768), 8 -> 16 heads; qwen3 (d=512) gets an explicit
    attention.key_length different from d_model / n_heads.  gemma3: 7 layers (layer 5
    global, the others local with a 32-token window), 4 query heads of 128 (key_length
    != d / heads, as Gemma's 256 != 640 / 4), gqa 1, 2 or 4."""
    if arch == "gemma3":
        base = dict(arch=arch, gqa=gqa, tied=tied, n_layers=7, n_heads=4, d_model=256, head_dim=128,
                    sliding_window=32)
        base.update(kw)
        return SynthSpec(**base)
    # qwen2 (like llama.cpp's loader) ignores key_length: head_dim must be d / heads there
    n_heads = {1: 8, 3: 12, 8: 16}.get(gqa, 8 * gqa)
    d = 768 if (n_heads == 12 and arch != "qwen3") else 512 if arch == "qwen3" else 256
    head_dim = {8: 128, 12: 64, 16: 64}.get(n_heads, 64) if arch == "qwen3" else None
    base = dict(arch=arch, gqa=gqa, tied=tied, n_heads=n_heads, d_model=d, head_dim=head_dim)
    base.update(kw)
    return SynthSpec(**base)


def _vocab(n: int) -> tuple[list[str], list[str], list[int]]:
    """GPT-2 byte-level BPE vocabulary of n tokens: bytes, <|endoftext|>, two-char merges."""
    # GPT-2's byte <-> unicode map: printable bytes map to themselves, others shifted to 256+
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    k = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    byte_chr = {b: chr(c) for b, c in zip(bs, cs)}
    tokens = [byte_chr[b] for b in range(256)] + ["<|endoftext|>"]
    types = [1] * 256 + [3]  # NORMAL, CONTROL
    letters = [byte_chr[b] for b in b"etaoinshrdlucmfwyp Ggbvk"]
    letters = [("Ġ" if c == " " else c) for c in letters]
    merges = []
    for a in letters:
        for b in letters:
            if len(tokens) >= n:
                break
            tokens.append(a + b)
            merges.append(f"{a} {b}")
            types.append(1)
    while len(tokens) < n:  # pad (never produced by merges, but valid tokens)
        tokens.append(f"<|pad{len(tokens)}|>")
        types.append(4)  # USER_DEFINED
    return tokens, merges, types


def write_synthetic(path, spec: SynthSpec | None = None, drop: tuple = (), metadata: dict | None = None,
                    any_rows: bool = False, dtype=np.float32, **kw) -> Path:
    """Write an F32 synthetic GGUF to `path` (spec or keyword fields of SynthSpec).

    `drop` leaves the named tensors out, `metadata` {key: value or (value, GGUFValueType)}
    replaces or adds header values (a "{arch}." prefix is added to keys starting with
    "."), and any `arch` string is written as given (llama-shaped tensors): they make
    broken and hostile files for the loader's error tests.  any_rows allows row lengths
    that are not multiples of 256 (real shapes such as Qwen2.5-0.5B's d = 896); dtype
    float16 halves the file of a large model."""
    import gguf

    spec = replace(spec, **kw) if spec else SynthSpec(**kw)
    rng = np.random.default_rng(spec.seed)
    d, H, KV, hd, ffn, V = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.hd, spec.ffn, spec.vocab
    for name, n in (("d_model", d), ("n_heads*head_dim", H * hd), ("ffn", ffn)):
        if n % 256 and not any_rows:
            raise ValueError(f"{name}={n} is not a multiple of 256")

    w = gguf.GGUFWriter(str(path), spec.arch)
    w.add_name(f"synthetic-{spec.arch}")
    w.add_block_count(spec.n_layers)
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ffn)
    Hl = list(spec.heads_per_layer or [H] * spec.n_layers)
    KVl = list(spec.kv_per_layer or [KV] * spec.n_layers)
    w.add_head_count(Hl if spec.heads_per_layer else H)
    w.add_head_count_kv(KVl if spec.kv_per_layer else KV)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    w.add_rope_freq_base(spec.rope_base)
    w.add_rope_dimension_count(hd)
    if spec.sliding_window:
        w.add_sliding_window(spec.sliding_window)
    if spec.arch == "qwen3" or spec.head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if spec.rope_scale:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec.rope_scale)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)
    tokens, merges, types = _vocab(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(256)
    w.add_eos_token_id(256)
    w.add_add_bos_token(False)
    for key, value in (metadata or {}).items():
        key = spec.arch + key if key.startswith(".") else key
        value, vtype = value if isinstance(value, tuple) else (value, None)
        if vtype is None:
            vtype = gguf.GGUFValueType.get_type(value)
        sub = gguf.GGUFValueType.get_type(value[0]) if vtype == gguf.GGUFValueType.ARRAY and value else None
        for kv in w.kv_data:
            kv.pop(key, None)
        w.add_key_value(key, value, vtype, sub_type=sub)

    def mat(rows, cols, gain=1.0):
        return (rng.standard_normal((rows, cols)) * gain / np.sqrt(cols)).astype(dtype)

    def norm(n):  # near-1 gains, not exactly 1 so that a missing multiply shows
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def vec(n, s=0.1):
        return (s * rng.standard_normal(n)).astype(np.float32)

    add = w.add_tensor

    def add_tensor(name, arr):
        if name not in drop:
            add(name, arr)
    w.add_tensor = add_tensor

    # std 4/sqrt(d): tied-output logits get a trained-model-like spread
    emb = mat(V, d, 4.0)
    w.add_tensor("token_embd.weight", emb)
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        H, KV = Hl[i], KVl[i]
        w.add_tensor(p + "attn_norm.weight", norm(d))
        w.add_tensor(p + "attn_q.weight", mat(H * hd, d, 2.0))
        w.add_tensor(p + "attn_k.weight", mat(KV * hd, d, 2.0))
        w.add_tensor(p + "attn_v.weight", mat(KV * hd, d))
        if spec.arch == "qwen2":
            w.add_tensor(p + "attn_q.bias", vec(H * hd))
            w.add_tensor(p + "attn_k.bias", vec(KV * hd))
            w.add_tensor(p + "attn_v.bias", vec(KV * hd))
        if spec.arch in ("qwen3", "gemma3"):
            w.add_tensor(p + "attn_q_norm.weight", norm(hd))
            w.add_tensor(p + "attn_k_norm.weight", norm(hd))
        w.add_tensor(p + "attn_output.weight", mat(d, H * hd))
        if spec.arch == "gemma3":
            w.add_tensor(p + "post_attention_norm.weight", norm(d))
        w.add_tensor(p + "ffn_norm.weight", norm(d))
        # gate gain 2: GELU's curved part (|x| ~ 1-3) matters, not only its linear tail
        w.add_tensor(p + "ffn_gate.weight", mat(ffn, d, 2.0 if spec.arch == "gemma3" else 1.0))
        w.add_tensor(p + "ffn_up.weight", mat(ffn, d))
        w.add_tensor(p + "ffn_down.weight", mat(d, ffn))
        if spec.arch == "gemma3":
            w.add_tensor(p + "post_ffw_norm.weight", norm(d))
    w.add_tensor("output_norm.weight", norm(d))
    if spec.rope_freqs:
        # llama3's shape: high-frequency pairs untouched, low-frequency ones slowed down
        w.add_tensor("rope_freqs.weight", np.geomspace(1.0, spec.rope_freqs, hd // 2).astype(np.float32))
    if not spec.tied:
        w.add_tensor("output.weight", mat(V, d, 4.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


# The speed benchmark's model: about SmolLM2-135M's size and shape, but every row length
# a multiple of 256 (SmolLM2's 576 is not), so Q4_K_M k-quantizes every matrix.
BENCH_SPEC = SynthSpec(arch="llama", n_layers=30, d_model=512, n_heads=8, gqa=4, ffn=1536,
                       vocab=32768, tied=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3", "gemma3"])
    ap.add_argument("--gqa", type=int, default=1, help="n_heads / n_kv_heads (1, 3, 8...)")
    ap.add_argument("--tied", action="store_true", help="no output.weight (tied to token_embd)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--rope-scale", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", choices=["bench"], help="a named spec (overrides the shape flags)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.preset == "bench":
        spec = BENCH_SPEC
    else:
        spec = default_spec(a.arch, a.gqa, a.tied, n_layers=a.layers, vocab=a.vocab,
                            rope_scale=a.rope_scale, seed=a.seed)
    write_synthetic(a.out, spec)
    print(f"wrote {a.out}: {spec}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
