"""Memory planner: will a model fit, and how much of it can go on the GPU.

``python -m runtime plan MODEL --vram 4GiB --ctx 8192`` answers from the GGUF
header alone (tensor types and sizes plus the architecture numbers), so it works
on a file that is still downloading.  ``--arch`` plans from architecture numbers
without any file.  The accounting follows llama.cpp (src/llama-model.cpp,
llama-kv-cache.cpp, llama-context.cpp of the version llama-cpp-python 0.3.36
vendors), so that its figures match llama.cpp's own log lines:

* weights: exact, from the tensor table.  llama.cpp keeps the input layer (token
  embeddings) on the CPU always; ``-ngl k`` puts the last k of the n_layer + 1
  "layers" on the GPU, where index n_layer is the output layer (final norm and
  LM head).  So ``-ngl 1`` offloads only the output layer and ``-ngl n_layer+1``
  offloads everything.  With tied embeddings the GPU output layer holds its own
  copy of token_embd.
* KV cache: n_ctx is padded to a multiple of 256; per layer, K is n_ctx rows of
  n_kv_heads*head_dim_k elements in the cache type (f16: 2 bytes, q8_0: 34 bytes
  per 32, q4_0: 18 bytes per 32), V likewise.  Each layer's cache lives on the
  device of its layer.  Sliding-window layers (Gemma 3: 5 of every 6) keep
  n_swa + ubatch cells (padded to 256, at most n_ctx) with swa_full off, the
  default of llama-server and llama-cli, which ``plan`` follows; ``--swa-full``
  gives them n_ctx cells like the others, the C API's default that
  llama-cpp-python inherits (it logs "using full-size SWA cache").
* compute buffer: an estimate of the peak of llama.cpp's graph allocator for one
  ubatch of u tokens (float32 activations; tensors of finished ops are reused):
  max of  attention  = (n_heads + 1)*n_kv*u*4 (scores + f32 mask; with flash
                       attention the scores are never stored and the mask is f16:
                       n_kv*u*2) + 5 residual-sized vectors (d*u*4),
          FFN        = 2*ffn*u*4 + 5 residual-sized vectors,
          output     = n_vocab*u*4 (llama.cpp reserves logits for every token of
                       the ubatch) + 2 residual-sized vectors.
  Within 5 % of llama.cpp's "compute buffer size" lines, CPU and CUDA.
  At -ngl 0 a CUDA build still multiplies the prompt's LM head on the GPU,
  with a copy of the output weight in the compute buffer.
* overhead: a fixed allowance for what never shows up in llama.cpp's buffer
  lines: the CUDA context, cuBLAS workspaces and ggml-cuda's memory pool (see
  OVERHEAD_MIB; measured on an H100).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields

from . import arch as arch_mod
from .arch import HParams

MiB = 1024 * 1024
GiB = 1024 * MiB

# Fixed GPU memory that no llama.cpp buffer line reports: the CUDA context,
# cuBLAS's handle and workspace, ggml-cuda's pool of temporaries.  Measured on an
# H100 (CUDA 13.0, driver 580, llama.cpp as vendored by llama-cpp-python 0.3.36,
# per-process memory from nvidia-smi after a 512-token prompt): process total
# minus llama.cpp's buffers = 601-603 MiB with flash attention, 700-701 MiB
# without (its cuBLAS path for the attention products), the same at -ngl 0, 1,
# 15 and 29 and at 4k and 32k context.  Of that, a bare CUDA context took 518 MiB
# and a cuBLAS handle 68 MiB.  The context's share grows with the GPU (per-SM
# reservations for 132 SMs on an H100); a 4 GB card has 14-20 SMs, so the default
# assumes a context of about 250 MiB plus the measured cuBLAS and llama.cpp parts.
# Use --overhead for a measured value on your card (H100: 600MiB).
OVERHEAD_MIB = 384
NO_FA_EXTRA_MIB = 100

CTX_PAD = 256          # llama_context pads n_ctx (and the SWA cache) to this

# KV cache element types: (elements per block, bytes per block), ggml's layouts.
KV_TYPES = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "iq4_nl": (32, 18),
}

# Whole-model bits per weight of llama.cpp's quantization mixes, as measured on
# Llama-3.1-8B: tools/quantize/README.md (Q2_K 3.1593, Q4_K_M 4.8944, Q5_K_M
# 5.7036, Q6_K 6.5633, Q8_0 8.5008, F16 16.0005) and, for the two it does not
# list, the sizes in tools/quantize/quantize.cpp (Q3_K_M 3.74G, Q4_0 4.34G of
# the same model, converted with that table's 4.58G <-> 4.8944 bpw).  The mixes
# keep some tensors at higher precision, so these exceed the block type's own
# rate (Q4_K alone is 4.5 bpw).
QUANT_BPW = {
    "Q2_K": 3.16,
    "Q3_K_M": 4.00,
    "Q4_0": 4.64,
    "Q4_K_M": 4.89,
    "Q5_K_M": 5.70,
    "Q6_K": 6.56,
    "Q8_0": 8.50,
    "F16": 16.00,
}


# --------------------------------------------------------------------------
# KV cache


def _kv_row_bytes(kv_type: str, n: int) -> int:
    try:
        block, size = KV_TYPES[kv_type.lower()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {kv_type!r} (one of {', '.join(KV_TYPES)})") from None
    if n % block:
        raise ValueError(f"KV cache type {kv_type} needs rows that are a multiple of {block} "
                         f"elements, got {n}")
    return n // block * size


def kv_cache_bytes(n_layers: int, n_kv_heads, head_dim_k: int, head_dim_v: int, n_ctx: int,
                   kv_type: str = "f16") -> int:
    """Bytes of the K and V caches: per layer, n_ctx rows of n_kv_heads*head_dim.

    ``n_kv_heads`` may be a per-layer sequence (some GGUFs store it that way).
    A K (or V) row of one position holds all KV heads; ggml quantizes along it,
    which is why its length must be a multiple of the block size.  ``n_ctx`` is
    taken as given (llama.cpp pads it to 256 first: see ``pad_ctx``).
    """
    try:
        heads = [int(h) for h in n_kv_heads]
    except TypeError:                       # one number (int or numpy integer)
        heads = [int(n_kv_heads)] * n_layers
    else:
        if len(heads) != n_layers:
            raise ValueError(f"{len(heads)} per-layer KV head counts for {n_layers} layers")
    return sum(kv_layer_bytes(h, head_dim_k, head_dim_v, n_ctx, kv_type) for h in heads)


def kv_layer_bytes(n_kv_heads: int, head_dim_k: int, head_dim_v: int, n_ctx: int,
                   kv_type: str = "f16") -> int:
    if n_kv_heads == 0:
        return 0
    return (_kv_row_bytes(kv_type, n_kv_heads * head_dim_k)
            + _kv_row_bytes(kv_type, n_kv_heads * head_dim_v)) * n_ctx


def pad_ctx(n_ctx: int) -> int:
    return -(-n_ctx // CTX_PAD) * CTX_PAD


# --------------------------------------------------------------------------
# Architecture numbers


class Arch(HParams):
    """The numbers that decide memory use: runtime.arch's description of a model
    (from a GGUF header, a preset, or `--arch key=value`)."""

    def params(self) -> int:
        w = weights_from_arch(self, 16.0)
        return w.n_params


# Public config.json numbers of the README's reference models.
PRESETS = {
    "Qwen2.5-0.5B": Arch("Qwen2.5-0.5B", 24, 896, 14, 2, 64, 4864, 151936, tied=True,
                         n_ctx_train=32768, qkv_bias=True),
    "Qwen2.5-1.5B": Arch("Qwen2.5-1.5B", 28, 1536, 12, 2, 128, 8960, 151936, tied=True,
                         n_ctx_train=32768, qkv_bias=True),
    "Qwen2.5-3B": Arch("Qwen2.5-3B", 36, 2048, 16, 2, 128, 11008, 151936, tied=True,
                       n_ctx_train=32768, qkv_bias=True),
    "Qwen3-0.6B": Arch("Qwen3-0.6B", 28, 1024, 16, 8, 128, 3072, 151936, tied=True,
                       n_ctx_train=40960, qk_norm=True),
    "Qwen3-4B": Arch("Qwen3-4B", 36, 2560, 32, 8, 128, 9728, 151936, tied=True,
                     n_ctx_train=40960, qk_norm=True),
    "Llama-3.2-1B": Arch("Llama-3.2-1B", 16, 2048, 32, 8, 64, 8192, 128256, tied=True,
                         n_ctx_train=131072),
    "Llama-3.2-3B": Arch("Llama-3.2-3B", 28, 3072, 24, 8, 128, 8192, 128256, tied=True,
                         n_ctx_train=131072),
    "Llama-3.1-8B": Arch("Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, 128256, tied=False,
                         n_ctx_train=131072),
}

def arch_from_gguf(g) -> Arch:
    """The architecture numbers of an open GGUFFile (header is enough), validated by
    runtime.arch (any architecture: planning does not need the engine to run it)."""
    h = arch_mod.from_gguf(g)
    return Arch(**{f.name: getattr(h, f.name) for f in fields(h)})


_ARCH_KEYS = {
    "layers": "n_layers", "n_layers": "n_layers", "d": "d_model", "d_model": "d_model",
    "hidden": "d_model", "heads": "n_heads", "n_heads": "n_heads", "kv_heads": "n_kv_heads",
    "n_kv_heads": "n_kv_heads", "head_dim": "head_dim", "ffn": "ffn_dim", "ffn_dim": "ffn_dim",
    "vocab": "n_vocab", "n_vocab": "n_vocab", "tied": "tied", "ctx": "n_ctx_train",
    "n_ctx_train": "n_ctx_train", "qkv_bias": "qkv_bias", "qk_norm": "qk_norm",
}


def parse_arch(spec: str) -> tuple[Arch, float | None]:
    """``--arch``: a preset name (case-insensitive) or ``key=value,...``.

    Keys: layers, d, heads, kv_heads, ffn, vocab (required); head_dim (default
    d/heads), tied, ctx, qkv_bias, qk_norm (0/1), bpw.  Returns (arch, bpw or None).
    """
    s = spec.strip()
    for name, arch in PRESETS.items():
        if s.lower() == name.lower():
            return arch, None
    if "=" not in s:
        raise ValueError(f"--arch {spec!r}: not a preset ({', '.join(PRESETS)}, all) nor "
                         f"key=value pairs like layers=28,d=1536,heads=12,kv_heads=2,"
                         f"ffn=8960,vocab=151936,bpw=4.85")
    kw: dict = {}
    bpw = None
    for part in s.split(","):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ValueError(f"--arch: {part!r} is not key=value")
        try:
            num = float(val)
        except ValueError:
            raise ValueError(f"--arch: {key}={val!r} is not a number") from None
        if key == "bpw":
            if not 0 < num <= 32:
                raise ValueError(f"--arch: bpw={val} out of range (0, 32]")
            bpw = num
            continue
        if key not in _ARCH_KEYS:
            raise ValueError(f"--arch: unknown key {key!r} (known: layers, d, heads, kv_heads, "
                             f"head_dim, ffn, vocab, tied, ctx, qkv_bias, qk_norm, bpw)")
        if num != int(num) or num < 0:
            raise ValueError(f"--arch: {key}={val} must be a non-negative integer")
        kw[_ARCH_KEYS[key]] = int(num)
    missing = [k for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_dim", "n_vocab")
               if not kw.get(k)]
    if missing:
        inv = {v: k for k, v in _ARCH_KEYS.items() if len(k) <= 8}
        raise ValueError(f"--arch: missing {', '.join(inv.get(m, m) for m in missing)}")
    if kw["n_heads"] % kw["n_kv_heads"]:
        raise ValueError(f"--arch: heads={kw['n_heads']} is not a multiple of kv_heads={kw['n_kv_heads']}")
    kw.setdefault("head_dim", kw["d_model"] // kw["n_heads"])
    for b in ("tied", "qkv_bias", "qk_norm"):
        kw[b] = bool(kw.get(b, 0))
    return Arch(name="custom", **kw), bpw


# --------------------------------------------------------------------------
# Weights per device


@dataclass
class Group:
    """Tensors that llama.cpp places together (one layer, the input, the output)."""

    nbytes: int = 0
    matrix_elems: int = 0       # quantizable weights (2-D and up)
    f32_elems: int = 0          # 1-D tensors (norms, biases): always F32

    def add(self, nbytes: int, n_elements: int, is_matrix: bool) -> None:
        self.nbytes += nbytes
        if is_matrix:
            self.matrix_elems += n_elements
        else:
            self.f32_elems += n_elements

    def at_bpw(self, bpw: float) -> "Group":
        return Group(math.ceil(self.matrix_elems * bpw / 8) + 4 * self.f32_elems,
                     self.matrix_elems, self.f32_elems)


@dataclass
class Weights:
    input: Group                    # token embeddings: always in host memory
    output: Group                   # final norm + LM head, as the GPU would hold it
    layers: list                    # one Group per repeating layer
    output_dup: int = 0             # bytes of output that are a copy of token_embd (tied)

    @property
    def n_params(self) -> int:
        groups = [self.input, self.output, *self.layers]
        n = sum(g.matrix_elems + g.f32_elems for g in groups)
        return n - (self.input.matrix_elems if self.output_dup else 0)

    @property
    def total(self) -> int:
        """All weights once, as a CPU-only llama.cpp maps them."""
        layers = sum(g.nbytes for g in self.layers)
        return self.input.nbytes + self.output.nbytes - self.output_dup + layers

    def at_bpw(self, bpw: float) -> "Weights":
        """The same architecture with every matrix at ``bpw`` bits, 1-D tensors F32."""
        inp = self.input.at_bpw(bpw)
        out = self.output.at_bpw(bpw)
        dup = 0
        if self.output_dup:
            dup = math.ceil(self.input.matrix_elems * bpw / 8)
        return Weights(inp, out, [g.at_bpw(bpw) for g in self.layers], dup)


_INPUT_TENSORS = ("token_embd.", "token_embd_norm.", "position_embd.", "token_types.")
_BLK = re.compile(r"^blk\.(\d+)\.")


def weights_from_gguf(g, arch: Arch | None = None) -> Weights:
    """Exact bytes per placement group from the tensor table.

    Each tensor is counted at its size padded to the file's alignment, the way
    it lies in the file (llama.cpp's CPU_Mapped buffer is the span of the file
    that holds its tensors).
    """
    arch = arch or arch_from_gguf(g)
    align = int(getattr(g, "alignment", 32) or 32)
    inp, out = Group(), Group()
    layers = [Group() for _ in range(arch.n_layers)]
    for name, t in g.tensors.items():
        nbytes = -(-t.nbytes // align) * align
        is_matrix = len([d for d in t.dims if d > 1]) >= 2
        m = _BLK.match(name)
        if m:
            il = int(m.group(1))
            if il >= arch.n_layers:
                raise ValueError(f"{g.path}: tensor {name} beyond block_count {arch.n_layers}")
            layers[il].add(nbytes, t.n_elements, is_matrix)
        elif name.startswith(_INPUT_TENSORS):
            inp.add(nbytes, t.n_elements, is_matrix)
        elif name.startswith(("output", "cls")):
            out.add(nbytes, t.n_elements, is_matrix)
        else:
            # rope_freqs and the like: llama.cpp creates them with layer 0.
            (layers[0] if layers else out).add(nbytes, t.n_elements, is_matrix)
    dup = 0
    if "output.weight" not in g.tensors and "token_embd.weight" in g.tensors:
        t = g.tensors["token_embd.weight"]
        dup = -(-t.nbytes // align) * align
        out.add(dup, t.n_elements, True)
    return Weights(inp, out, layers, dup)


def weights_from_arch(arch: Arch, bpw: float) -> Weights:
    """Weights of an architecture with every matrix at ``bpw`` bits per weight."""
    d, q_dim = arch.d_model, arch.n_heads * arch.head_dim

    def group(matrix: int, f32: int) -> Group:
        return Group(math.ceil(matrix * bpw / 8) + 4 * f32, matrix, f32)

    emb = arch.n_vocab * d
    layers = []
    for il in range(arch.n_layers):
        kv_dim = arch.kv_heads(il) * arch.head_dim
        kv_dim_v = arch.kv_heads(il) * arch.head_dim_v
        matrix = d * q_dim + d * kv_dim + d * kv_dim_v + q_dim * d + 3 * d * arch.ffn_dim
        f32 = 2 * d                                     # attn_norm, ffn_norm
        if arch.qkv_bias:
            f32 += q_dim + kv_dim + kv_dim_v
        if arch.qk_norm:
            f32 += 2 * arch.head_dim
        layers.append(group(matrix, f32))
    inp = group(emb, 0)
    out = group(emb, d)
    dup = math.ceil(emb * bpw / 8) if arch.tied else 0
    return Weights(inp, out, layers, dup)


# --------------------------------------------------------------------------
# Compute buffer estimate


def _vec(arch: Arch, n_ubatch: int) -> int:
    """One residual-sized float32 activation of a ubatch."""
    return max(arch.d_model, arch.n_heads * arch.head_dim) * n_ubatch * 4


def compute_bytes(arch: Arch, n_kv: int, n_ubatch: int, *, flash_attn: bool = True) -> dict:
    """Peak of llama.cpp's compute buffer for one ubatch (formula in the module doc)."""
    u = n_ubatch
    vec = _vec(arch, u)
    if flash_attn:
        attn = n_kv * u * 2 + 5 * vec
    else:
        attn = (arch.n_heads + 1) * n_kv * u * 4 + 5 * vec
    ffn = 2 * arch.ffn_dim * u * 4 + 5 * vec
    out = arch.n_vocab * u * 4 + 2 * vec
    return {"attention": attn, "ffn": ffn, "output": out, "peak": max(attn, ffn, out)}


def host_compute_bytes(arch: Arch, n_kv: int, n_ubatch: int, flash_attn: bool = True) -> int:
    """llama.cpp's host-side compute buffer next to a GPU (CUDA_Host): the graph
    inputs, i.e. the token embeddings looked up on the CPU and the attention mask."""
    return 2 * _vec(arch, n_ubatch) + n_kv * n_ubatch * (2 if flash_attn else 4)


# --------------------------------------------------------------------------
# The plan


@dataclass
class Split:
    """Memory use with ``n_gpu_layers`` (llama.cpp's -ngl) layers offloaded."""

    n_gpu_layers: int
    gpu_weights: int
    gpu_kv: int
    gpu_compute: int
    gpu_overhead: int
    host_weights: int
    host_kv: int
    host_compute: int

    @property
    def gpu_total(self) -> int:
        return self.gpu_weights + self.gpu_kv + self.gpu_compute + self.gpu_overhead

    @property
    def host_total(self) -> int:
        return self.host_weights + self.host_kv + self.host_compute

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gpu_total"] = self.gpu_total
        d["host_total"] = self.host_total
        return d


@dataclass
class Planner:
    arch: Arch
    weights: Weights
    kv_type: str = "f16"
    n_ubatch: int = 512
    flash_attn: bool = True
    overhead: int = OVERHEAD_MIB * MiB
    swa_full: bool = False         # True: SWA layers get a full-size cache (the C API's default)
    n_seq: int = 1                 # parallel sequences (llama-server -np) sharing one unified cache

    def swa_cells(self, n_ctx: int) -> int:
        """Cells of a sliding-window layer's cache at (padded) context n_ctx:
        llama_kv_cache_iswa's min(n_ctx, pad(n_swa + n_ubatch)), or n_ctx with swa_full."""
        a = self.arch
        if a.n_swa and a.swa_layers and not self.swa_full:
            # a unified cache keeps a window for each of the n_seq sequences
            # (llama_kv_cache_iswa: n_swa * (unified ? n_seq_max : 1) + n_ubatch)
            return min(n_ctx, pad_ctx(a.n_swa * self.n_seq + self.n_ubatch))
        return n_ctx

    def kv_layers(self, n_ctx: int) -> list:
        """Per-layer KV bytes at (padded) context n_ctx, llama.cpp's layout."""
        a = self.arch
        n_swa_cells = self.swa_cells(n_ctx)
        out = []
        for il in range(a.n_layers):
            cells = n_swa_cells if (a.swa_layers and a.swa_layers[il]) else n_ctx
            out.append(kv_layer_bytes(a.kv_heads(il), a.head_dim, a.head_dim_v, cells, self.kv_type))
        return out

    def split(self, n_ctx: int, n_gpu_layers: int) -> Split:
        """Memory of each device with -ngl n_gpu_layers at context n_ctx."""
        a, w = self.arch, self.weights
        n_ctx = pad_ctx(n_ctx)
        u = min(self.n_ubatch, n_ctx)
        ngl = max(0, min(n_gpu_layers, a.n_layers + 1))
        first_gpu = a.n_layers + 1 - ngl           # layers >= first_gpu are offloaded
        kv = self.kv_layers(n_ctx)
        gpu_layers = range(min(first_gpu, a.n_layers), a.n_layers)
        cpu_layers = range(0, min(first_gpu, a.n_layers))
        out_on_gpu = ngl >= 1
        gw = sum(w.layers[i].nbytes for i in gpu_layers) + (w.output.nbytes if out_on_gpu else 0)
        hw = (w.input.nbytes + sum(w.layers[i].nbytes for i in cpu_layers)
              + (0 if out_on_gpu else w.output.nbytes - w.output_dup))
        comp = compute_bytes(a, n_ctx, u, flash_attn=self.flash_attn)
        gpu_comp = comp["peak"]
        if ngl == 0:
            # Nothing offloaded, yet a CUDA build still runs the prompt's LM-head
            # product on the GPU (op offload), with a copy of the output weight in
            # the compute buffer.
            gpu_comp = max(gpu_comp, comp["output"] + w.output.nbytes)
        overhead = self.overhead + (0 if self.flash_attn else NO_FA_EXTRA_MIB * MiB)
        host_comp = host_compute_bytes(a, n_ctx, u, self.flash_attn)
        return Split(ngl, gw, sum(kv[i] for i in gpu_layers), gpu_comp, overhead,
                     hw, sum(kv[i] for i in cpu_layers), host_comp)

    def max_gpu_layers(self, n_ctx: int, vram: int) -> int:
        """Largest -ngl whose GPU total fits (0: nothing fits)."""
        for ngl in range(self.arch.n_layers + 1, 0, -1):
            if self.split(n_ctx, ngl).gpu_total <= vram:
                return ngl
        return 0

    def max_ctx(self, vram: int, limit: int = 1 << 24) -> int:
        """Largest context (a multiple of 256) with every layer on the GPU; 0 if none."""
        full = self.arch.n_layers + 1
        if self.split(CTX_PAD, full).gpu_total > vram:
            return 0
        lo, hi = 1, limit // CTX_PAD           # in units of 256 tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.split(mid * CTX_PAD, full).gpu_total <= vram:
                lo = mid
            else:
                hi = mid - 1
        return lo * CTX_PAD


def plan(arch: Arch, weights: Weights, *, vram: int, n_ctx: int, kv_type: str = "f16",
         n_ubatch: int = 512, flash_attn: bool = True, overhead: int = OVERHEAD_MIB * MiB,
         quants: dict | None = None, swa_full: bool = False, n_parallel: int = 1) -> dict:
    """Every number the ``plan`` command prints.

    ``n_parallel`` is llama-server's ``-np``: n_ctx is the total context of one
    unified KV cache that the slots share (each slot holds n_ctx / n_parallel), so
    the KV bytes stay those of n_ctx; only sliding-window layers keep a window per
    slot."""
    if n_ctx <= 0:
        raise ValueError(f"context size must be positive, got {n_ctx}")
    if n_ubatch <= 0:
        raise ValueError(f"batch size must be positive, got {n_ubatch}")
    if n_parallel < 1 or n_parallel > n_ctx:
        raise ValueError(f"parallel slots must be in 1..n_ctx ({n_ctx}), got {n_parallel}")
    p = Planner(arch, weights, kv_type, n_ubatch, flash_attn, overhead, swa_full, n_parallel)
    full = arch.n_layers + 1
    ctx = pad_ctx(n_ctx)
    s_full = p.split(ctx, full)
    ngl = p.max_gpu_layers(ctx, vram)
    kv = p.kv_layers(ctx)
    comp = compute_bytes(arch, ctx, min(n_ubatch, ctx), flash_attn=flash_attn)
    res = {
        "model": arch.name,
        "arch": {k: v for k, v in asdict(arch).items() if k not in ("swa_layers", "n_kv_heads_per_layer", "ffn_dim_per_layer", "n_heads_per_layer",
                                                                "family")},
        "n_params": weights.n_params,
        "vram": vram,
        "n_ctx": n_ctx,
        "n_ctx_padded": ctx,
        "n_parallel": n_parallel,
        "n_ctx_slot": ctx // n_parallel,
        "kv_type": kv_type,
        "swa_full": swa_full,
        "n_swa_layers": sum(arch.swa_layers),
        "swa_cells": p.swa_cells(ctx) if arch.swa_layers else 0,
        "n_ubatch": min(n_ubatch, ctx),
        "flash_attn": flash_attn,
        "weights": {
            "total": weights.total,
            "input_host": weights.input.nbytes,
            "output": weights.output.nbytes,
            "output_copy_of_embeddings": weights.output_dup,
            "per_layer": [g.nbytes for g in weights.layers],
            "bpw": 8 * weights.total / max(1, weights.n_params),
        },
        "kv_cache": {"total": sum(kv), "per_layer": kv,
                     "per_token": sum(p.kv_layers(CTX_PAD)) // CTX_PAD},
        "compute": comp,
        "overhead": s_full.gpu_overhead,
        "full_offload": s_full.to_dict(),
        "fits": s_full.gpu_total <= vram,
        "max_gpu_layers": ngl,
        "n_gpu_layers_all": full,
        "at_max_gpu_layers": p.split(ctx, ngl).to_dict(),
        "max_ctx_full_offload": p.max_ctx(vram),
    }
    table = []
    for qname, bpw in (quants if quants is not None else QUANT_BPW).items():
        qp = Planner(arch, weights.at_bpw(bpw), kv_type, n_ubatch, flash_attn, overhead, swa_full, n_parallel)
        qs = qp.split(ctx, full)
        table.append({"quant": qname, "bpw": bpw, "weights": qp.weights.total,
                      "gpu_total": qs.gpu_total, "fits": qs.gpu_total <= vram,
                      "max_gpu_layers": qp.max_gpu_layers(ctx, vram),
                      "max_ctx_full_offload": qp.max_ctx(vram)})
    res["quants"] = table
    return res


# --------------------------------------------------------------------------
# Host RAM check used by the engine before it allocates


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file).

    MemAvailable already counts reclaimable page cache, so a model file that is
    cached counts as available and must be counted as needed again below.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def host_scratch_bytes(arch: Arch, n_ctx: int, n_batch: int = 512) -> int:
    """Scratch our engine needs besides weights and KV cache (float32).

    A batch of b positions: logits b*n_vocab, one layer's attention scores
    n_heads*b*n_ctx, the FFN's gate and up 2*b*ffn, and a few residual-sized
    vectors.  Layers run one after another, so one layer's scratch is alive.
    """
    b = max(1, min(n_batch, n_ctx))
    vec = b * max(arch.d_model, arch.n_heads * arch.head_dim)
    floats = b * arch.n_vocab + arch.n_heads * b * n_ctx + 2 * b * arch.ffn_dim + 6 * vec
    return 4 * floats


def fmt_bytes(n: float) -> str:
    """Sizes for people: MiB below 1 GiB, GiB above; whole GiB without decimals."""
    if n >= GiB and n % GiB == 0:
        return f"{int(n // GiB)} GiB"
    return f"{n / MiB:.1f} MiB" if n < GiB else f"{n / GiB:.2f} GiB"


def host_need(gguf, n_ctx: int, kv_type: str = "f16", n_batch: int = 512) -> dict:
    from .model import swa_cells  # the engine's cache layout (model imports this module lazily too)

    arch = arch_from_gguf(gguf)
    ring = swa_cells(arch, n_ctx)  # sliding-window layers: a ring of window + one batch
    kv = sum(kv_layer_bytes(arch.kv_heads(i), arch.head_dim, arch.head_dim_v,
                            ring if arch.swa_layers and arch.swa_layers[i] else n_ctx, kv_type)
             for i in range(arch.n_layers))
    weights = int(gguf.file_size)
    scratch = host_scratch_bytes(arch, n_ctx, n_batch)
    return {"weights": weights, "kv_cache": kv, "scratch": scratch, "total": weights + kv + scratch}


def check_host_memory(gguf, n_ctx: int, kv_type: str = "f16", *, n_batch: int = 512,
                      available: int | None = None) -> None:
    """Refuse a context whose KV cache would not fit in RAM, with the numbers.

    Needed: the model file (memory-mapped: its pages live in the page cache and
    must stay resident, or every token re-reads them from disk) + the KV cache +
    scratch, compared with MemAvailable (or ``available``).  Does nothing where
    MemAvailable is unknown (non-Linux).
    """
    if n_ctx <= 0:
        raise ValueError(f"context size must be positive, got {n_ctx}")
    avail = mem_available() if available is None else available
    if avail is None:
        return
    need = host_need(gguf, n_ctx, kv_type, n_batch)
    if need["total"] <= avail:
        return
    lo, hi = 0, n_ctx                       # needed bytes grow with n_ctx
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if host_need(gguf, mid, kv_type, n_batch)["total"] <= avail:
            lo = mid
        else:
            hi = mid - 1
    if lo > 0:
        fit = f"the largest context that fits is {lo}"
        if kv_type.lower() in ("f16", "bf16", "f32"):
            fit += " (a q8_0 KV cache needs about half the KV bytes)"
    else:
        fit = "the model does not fit even at context 1"
    raise ValueError(
        f"context {n_ctx} needs {fmt_bytes(need['total'])} of RAM (weights "
        f"{fmt_bytes(need['weights'])} + KV cache {kv_type} {fmt_bytes(need['kv_cache'])} + "
        f"scratch {fmt_bytes(need['scratch'])}) but {fmt_bytes(avail)} is available; {fit}")


# --------------------------------------------------------------------------
# Command line: python -m runtime plan

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": MiB, "mb": 10**6,
          "mib": MiB, "g": GiB, "gb": 10**9, "gib": GiB, "t": 1024 * GiB, "tb": 10**12,
          "tib": 1024 * GiB}


def parse_size(text: str) -> int:
    """'4GiB', '4GB' (10^9), '4096MiB', '4g' (binary, like 4GiB), '4000000000'."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"bad size {text!r}: use e.g. 4GiB, 4GB, 4096MiB, 4g or a number of bytes")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"bad size {text!r}: must be positive")
    return n


def format_plan(r: dict) -> str:
    def row(label, gpu, host) -> str:
        cell = lambda v: v if isinstance(v, str) else fmt_bytes(v)  # noqa: E731
        return f"{label:<40}{cell(gpu):>16}{cell(host):>16}"

    a = r["arch"]
    full = r["full_offload"]
    vram = r["vram"]
    lines = [
        f"{r['model']}: {a['n_layers']} layers, d={a['d_model']}, {a['n_heads']}/{a['n_kv_heads']} "
        f"heads (q/kv), vocab {a['n_vocab']}",
        f"  {r['n_params'] / 1e9:.3f}B params, weights {fmt_bytes(r['weights']['total'])} "
        f"({r['weights']['bpw']:.2f} bits/weight)",
        f"plan: {fmt_bytes(vram)} GPU, context {r['n_ctx_padded']}, KV {r['kv_type']}, "
        f"ubatch {r['n_ubatch']}, flash attention {'on' if r['flash_attn'] else 'off'}",
        *([f"  -np {r['n_parallel']}: one unified KV cache of {r['n_ctx_padded']} cells shared by the slots "
           f"(`serve` gives each {r['n_ctx_slot']})"] if r.get("n_parallel", 1) > 1 else []),
        "",
        row(f"all layers on the GPU (-ngl {r['n_gpu_layers_all']})", "GPU", "host"),
        row("weights (token embeddings on host)", full["gpu_weights"], full["host_weights"]),
        row(f"KV cache ({r['kv_type']})", full["gpu_kv"], full["host_kv"] or ""),
        *([f"  {r['n_swa_layers']} sliding-window layers keep {r['swa_cells']} cells each"
           + (" (--swa-full)" if r["swa_full"] else " (--swa-full: all)")] if r.get("n_swa_layers") else []),
        row("compute buffer (estimate)", full["gpu_compute"], full["host_compute"]),
        row("CUDA context, cuBLAS, pool (fixed)", full["gpu_overhead"], ""),
        row("total", full["gpu_total"], full["host_total"]),
        "",
    ]
    if r["fits"]:
        lines.append(f"fits: yes, with {fmt_bytes(vram - full['gpu_total'])} to spare")
    else:
        ngl = r["max_gpu_layers"]
        s = r["at_max_gpu_layers"]
        lines.append(f"fits: no, needs {fmt_bytes(full['gpu_total'])} of {fmt_bytes(vram)}")
        if ngl:
            lines.append(f"  most layers that fit: -ngl {ngl} of {r['n_gpu_layers_all']} "
                         f"(GPU {fmt_bytes(s['gpu_total'])}, host {fmt_bytes(s['host_total'])})")
        else:
            lines.append("  not even the output layer fits on the GPU at this context: -ngl 0")
    mc = r["max_ctx_full_offload"]
    train = a["n_ctx_train"]
    if mc:
        note = f" (model trained on {train})" if train else ""
        lines.append(f"largest context with all layers on the GPU: {mc}{note}")
    else:
        lines.append("largest context with all layers on the GPU: none, the weights alone do not fit")
    lines += ["", f"other quantizations of this architecture, all layers on the GPU at context "
                  f"{r['n_ctx_padded']}:",
              f"{'quant':<8}{'bits/w':>7}{'weights':>13}{'GPU total':>13}{'fits':>6}"
              f"{'max -ngl':>10}{'max context':>13}"]
    for q in r["quants"]:
        lines.append(f"{q['quant']:<8}{q['bpw']:>7.2f}{fmt_bytes(q['weights']):>13}"
                     f"{fmt_bytes(q['gpu_total']):>13}{'yes' if q['fits'] else 'no':>6}{q['max_gpu_layers']:>10}"
                     f"{q['max_ctx_full_offload'] or '-':>13}")
    return "\n".join(lines)


def table_rows(archs: dict, *, vram: int, ctxs=(4096, 32768), quant: str = "Q4_K_M",
               kv_type: str = "f16", n_ubatch: int = 512, flash_attn: bool = True,
               overhead: int = OVERHEAD_MIB * MiB) -> list:
    """Per model at ``quant``: weights, KV per 1k tokens, GPU total and the
    answer for ``vram`` at each context, largest context with all on the GPU."""
    bpw = QUANT_BPW[quant]
    rows = []
    for name, arch in archs.items():
        w = weights_from_arch(arch, bpw)
        p = Planner(arch, w, kv_type, n_ubatch, flash_attn, overhead)
        full = arch.n_layers + 1
        at = {}
        for c in ctxs:
            s = p.split(c, full)
            at[c] = {"gpu_total": s.gpu_total, "fits": s.gpu_total <= vram,
                     "max_gpu_layers": p.max_gpu_layers(c, vram)}
        rows.append({"model": name, "quant": quant, "bpw": bpw, "kv_type": kv_type,
                     "n_params": w.n_params,
                     "weights": w.total, "kv_per_1k": sum(p.kv_layers(1024)),
                     "n_gpu_layers_all": full, "vram": vram, "at_ctx": at,
                     "max_ctx_full_offload": p.max_ctx(vram), "n_ctx_train": arch.n_ctx_train})
    return rows


def readme_table(rows: list) -> str:
    """Markdown for the README from ``table_rows``."""
    ctxs = list(rows[0]["at_ctx"]) if rows else []
    vram = fmt_bytes(rows[0]["vram"]) if rows else ""
    ks = [f"{c // 1024}k" if c % 1024 == 0 else str(c) for c in ctxs]
    quant = rows[0]["quant"] if rows else ""
    kv_type = rows[0]["kv_type"] if rows else ""
    head = (["model", "params", f"weights {quant}", f"KV {kv_type} per 1k tokens"]
            + [f"GPU total @{k}" for k in ks] + [f"{vram} GPU @{k}" for k in ks]
            + [f"max ctx on {vram}, all on GPU"])
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        totals = [fmt_bytes(r["at_ctx"][c]["gpu_total"]) for c in ctxs]
        fits = ["all layers" if r["at_ctx"][c]["fits"]
                else f"-ngl {r['at_ctx'][c]['max_gpu_layers']}/{r['n_gpu_layers_all']}" for c in ctxs]
        # Capped at the trained length: longer contexts fit but are not usable as such.
        mc = min(r["max_ctx_full_offload"], r["n_ctx_train"] or 1 << 30)
        out.append("| " + " | ".join([r["model"], f"{r['n_params'] / 1e9:.2f}B", fmt_bytes(r["weights"]),
                                      fmt_bytes(r["kv_per_1k"]), *totals, *fits,
                                      str(mc) if mc else "-"]) + " |")
    return "\n".join(out)


def _load(args) -> tuple[Arch, Weights, str]:
    from .cli import CLIError

    if args.arch and args.model:
        raise CLIError("give a model file or --arch, not both")
    if args.arch:
        if args.arch.lower() == "all":
            raise CLIError("--arch all makes the README table: add --table")
        arch, bpw = parse_arch(args.arch)
        if bpw is None:
            bpw = QUANT_BPW["Q4_K_M"]
        return arch, weights_from_arch(arch, bpw), f"{arch.name} at {bpw} bits/weight"
    if not args.model:
        raise CLIError("give a GGUF file (or registry name) or --arch")
    from .gguf import GGUFFile
    from .registry import resolve_model

    path = resolve_model(args.model)
    with GGUFFile(path, header_only=True) as g:
        arch = arch_from_gguf(g)
        return arch, weights_from_gguf(g, arch), str(path)


def cli_plan(args) -> int:
    from .cli import CLIError

    vram = parse_size(args.vram)
    kv_type = args.kv_type
    fa = getattr(args, "flash_attn", "on") != "off"
    overhead = parse_size(args.overhead) if getattr(args, "overhead", None) else OVERHEAD_MIB * MiB
    if kv_type != "f16" and not fa:
        raise CLIError(f"a {kv_type} V cache needs flash attention (llama.cpp refuses it without)")
    if args.batch <= 0:
        raise CLIError(f"--batch must be positive, got {args.batch}")
    if args.ctx is not None and args.ctx <= 0:
        raise CLIError(f"--ctx must be positive, got {args.ctx}")
    if getattr(args, "parallel", 1) < 1:
        raise CLIError(f"-np/--parallel must be >= 1, got {args.parallel}")
    if getattr(args, "table", False):
        if args.arch and args.arch.lower() == "all":
            archs = dict(PRESETS)
        elif args.arch:
            arch, _ = parse_arch(args.arch)
            archs = {arch.name: arch}
        else:
            raise CLIError("--table needs --arch (a preset, a spec or 'all')")
        ctxs = (args.ctx,) if args.ctx else (4096, 32768)
        rows = table_rows(archs, vram=vram, ctxs=ctxs, kv_type=kv_type, n_ubatch=args.batch,
                          flash_attn=fa, overhead=overhead)
        print(json.dumps(rows, indent=2) if args.json else readme_table(rows))
        return 0
    arch, weights, source = _load(args)
    n_ctx = args.ctx or arch.n_ctx_train or 4096
    r = plan(arch, weights, vram=vram, n_ctx=n_ctx, kv_type=kv_type, n_ubatch=args.batch,
             flash_attn=fa, overhead=overhead, swa_full=getattr(args, "swa_full", False),
             n_parallel=getattr(args, "parallel", 1))
    r["source"] = source
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(format_plan(r))
    return 0
