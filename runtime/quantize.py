"""Quantize a GGUF file: llama.cpp's quantizer, byte for byte, in numba.

    python -m runtime quantize IN.gguf OUT.gguf Q4_K_M [--imatrix FILE] [--pure] [-t N]

Two halves, each mirroring a part of llama.cpp:

* **which type each tensor gets** (``plan``): llama.cpp's ``llama_tensor_get_type``
  rules for a file type ("mix"): the output / tied embedding matrix at Q6_K,
  ``attn_v`` and ``ffn_down`` of some layers one or two steps up (Q4_K_M: Q6_K in
  the first and last eighth of the layers and every third one between), ...; then
  the fallback for a row length that is not a multiple of the type's block
  (d=576 cannot hold 256-weight super-blocks: Q4_K -> Q5_0, Q6_K -> Q8_0, ...).
  Tensors are visited in llama.cpp's order (by layer, then by name), because the
  per-layer rules count ``attn_v`` / ``ffn_down`` tensors as they go.
* **the block bytes** (``quantize_rows``): one section per format below, each a
  numba kernel parallel over rows (prange), computing what ggml-quants.c's
  reference quantizers compute, in the same float32 operations in the same
  order (numba contracts no multiply-adds without fastmath, as the C build of
  ggml-base has no FMA), so that every rounding lands the same way.  Formats,
  by ggml type: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0, Q2_K Q3_K Q4_K Q5_K Q6_K, IQ4_NL
  IQ4_XS; F16 / BF16 / F32 are numpy conversions (round to nearest even; BF16
  as ggml's ``ggml_compute_fp32_to_bf16``).

With an importance matrix (``--imatrix``: llama-imatrix's GGUF file, or
``quantize_file(imatrix={name: values})``) the formats that take one use ggml's
weighted searches (``quantize_row_*_impl``), again bit for bit; the mixes then
also apply their imatrix-only rules.

The layout of each block (byte offsets, fields little-endian, ``f16`` = IEEE
half) is written next to its kernel; ``runtime.quant``'s decoders read the same
layouts back.  Inputs may be F32, F16 or BF16 (exact) or already quantized
(decoded with ``runtime.quant``; llama.cpp's own decoder may differ from it in a
last bit for some types, so equality is then not guaranteed).  A tensor whose
target type equals its current type is copied unchanged, as llama.cpp does.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import llvmlite.ir as llir
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

__all__ = ["QuantizeError", "FTYPES", "TensorPlan", "Imatrix", "plan", "quantize_rows",
           "quantize_file", "load_imatrix", "cli_quantize"]

F = np.float32

# ggml type ids (enum ggml_type)
T_F32, T_F16, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q8_0 = 0, 1, 2, 3, 6, 7, 8
T_Q2_K, T_Q3_K, T_Q4_K, T_Q5_K, T_Q6_K = 10, 11, 12, 13, 14
T_IQ4_NL, T_IQ4_XS, T_BF16 = 20, 23, 30

# ggml type -> (weights per block, bytes per block), for the types we write
_BLOCK = {T_F32: (1, 4), T_F16: (1, 2), T_BF16: (1, 2), T_Q4_0: (32, 18), T_Q4_1: (32, 20),
          T_Q5_0: (32, 22), T_Q5_1: (32, 24), T_Q8_0: (32, 34), T_Q2_K: (256, 84),
          T_Q3_K: (256, 110), T_Q4_K: (256, 144), T_Q5_K: (256, 176), T_Q6_K: (256, 210),
          T_IQ4_NL: (32, 18), T_IQ4_XS: (256, 136)}

# file type name -> (llama_ftype, the mix's default ggml type); llama.cpp's
# llama_ftype_get_default_type.  The value goes into general.file_type.
FTYPES = {
    "F32": (0, T_F32), "F16": (1, T_F16), "BF16": (32, T_BF16),
    "Q4_0": (2, T_Q4_0), "Q4_1": (3, T_Q4_1), "Q5_0": (8, T_Q5_0), "Q5_1": (9, T_Q5_1),
    "Q8_0": (7, T_Q8_0), "Q2_K": (10, T_Q2_K),
    "Q3_K_S": (11, T_Q3_K), "Q3_K_M": (12, T_Q3_K), "Q3_K_L": (13, T_Q3_K),
    "Q4_K_S": (14, T_Q4_K), "Q4_K_M": (15, T_Q4_K), "Q5_K_S": (16, T_Q5_K), "Q5_K_M": (17, T_Q5_K),
    "Q6_K": (18, T_Q6_K), "IQ4_NL": (25, T_IQ4_NL), "IQ4_XS": (30, T_IQ4_XS),
}
_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as llama-quantize accepts
_GGML_QNT_VERSION = 2


class QuantizeError(ValueError):
    """Bad input for quantization: unknown type, unusable shape, IN == OUT ..."""


def _type_name(t: int) -> str:
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return f"type {t}"


def _block_size(t: int) -> int:
    if t in _BLOCK:
        return _BLOCK[t][0]
    from gguf.constants import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[t][0]


def _ftype(name: str) -> tuple[str, int, int]:
    key = str(name).upper()
    key = _ALIASES.get(key, key)
    if key not in FTYPES:
        raise QuantizeError(f"unknown quantization type {name!r} (known: {', '.join(FTYPES)})")
    return (key, *FTYPES[key])


# ===========================================================================
# Part 1: the type of each tensor (llama.cpp src/llama-quant.cpp)
# ===========================================================================

@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple        # numpy order (rows ..., ne0)
    src_type: int
    dst_type: int

    @property
    def dst_nbytes(self) -> int:
        bs, ts = _BLOCK.get(self.dst_type, (None, None))
        n = int(np.prod(self.shape, dtype=np.int64))
        return n // bs * ts


def _layer_of(name: str) -> int:
    """sscanf(name, "blk.%d.") as llama.cpp's weight_name_comparer reads it (-1: none)."""
    m = re.match(r"blk\.([+-]?\d+)", name)
    return int(m.group(1)) if m else -1


def _category(name: str) -> str:
    """tensor_get_category: broad roles by substring, first match wins."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


_NO_QUANT_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd",
    "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)


def _allows_quantization(name: str, dims: tuple) -> bool:
    """tensor_allows_quantization: weight matrices only (>= 2 dims, ggml_n_dims
    ignoring trailing 1s), not norms, routers, positional / token-type embeddings."""
    n_dims = len(dims)
    while n_dims > 1 and dims[n_dims - 1] == 1:
        n_dims -= 1
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if any(s in name for s in _NO_QUANT_SUBSTRINGS):
        return False
    return name not in ("position_embd.weight", "token_types.weight")


class _MixState:
    """quantize_state_impl: what the per-tensor rules need about the model, and
    the running counters of attn_v / ffn_down tensors seen so far."""

    def __init__(self, g, names, has_imatrix: bool):
        self.arch = g.arch
        self.n_layer = int(g.arch_get("block_count", 0) or 0)
        n_head = g.arch_get("attention.head_count", 0)
        n_head_kv = g.arch_get("attention.head_count_kv", None)
        n_head = int(np.asarray(n_head).reshape(-1)[0]) if np.size(n_head) else 0
        n_head_kv = n_head if n_head_kv is None else int(np.asarray(n_head_kv).reshape(-1)[0])
        self.n_gqa = n_head // n_head_kv if n_head_kv else 0
        self.n_expert = int(g.arch_get("expert_count", 0) or 0)
        # LLM_TYPE_70B (only it matters here): llama with 80 layers and GQA
        self.is_70b = self.arch == "llama" and self.n_layer == 80 and n_head != n_head_kv
        self.has_imatrix = has_imatrix
        self.tied = "output.weight" not in names
        self.n_attention_wv = sum(_category(n) in ("attn_v", "attn_qkv", "attn_kv_b") for n in names)
        self.n_ffn = self.n_layer
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.n_fallback = 0

    def layer_info(self, i: int, name: str) -> tuple[int, int]:
        if self.n_expert > 1:  # experts are not consecutive: read the layer from the name
            layer = _layer_of(name)
            if not 0 <= layer < self.n_ffn:
                raise QuantizeError(f"bad layer {layer} for tensor {name}")
            return layer, self.n_ffn
        return i, self.n_ffn


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mix_type(qs: _MixState, t: int, name: str, ne0: int, ftype: str, cat: str) -> int:
    """llama_tensor_get_type_impl for the file types this module writes."""
    falcon = qs.arch == "falcon"
    if cat == "output" or (qs.tied and cat == "token_embd"):
        if falcon or ne0 % _block_size(t):
            return T_Q8_0
        return t if t == T_Q8_0 else T_Q6_K
    if cat == "token_embd":
        return t
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        i, n = qs.i_attention_wv, qs.n_attention_wv
        if ftype == "Q2_K":
            t = T_Q4_K if qs.n_gqa >= 4 else T_Q3_K
        elif ftype == "Q3_K_M":
            t = T_Q5_K if i < 2 else T_Q4_K
        elif ftype == "Q3_K_L":
            t = T_Q5_K
        elif ftype in ("IQ4_NL", "IQ4_XS") and qs.n_gqa >= 4:
            t = T_Q5_K
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            t = T_Q6_K
        elif ftype == "Q4_K_S" and i < 4:
            t = T_Q5_K
        if qs.is_70b and t in (T_Q3_K, T_Q4_K):
            t = T_Q5_K  # 8 heads share attn_v: a cheap place for more bits
        if qs.n_expert == 8:
            t = T_Q8_0
        qs.i_attention_wv += 1
        return t
    if cat == "attn_k":
        return T_Q8_0 if qs.n_expert == 8 else t
    if cat == "ffn_down":
        i, n = qs.layer_info(qs.i_ffn_down, name)
        if ftype == "Q2_K":
            t = T_Q3_K
        elif ftype == "Q3_K_M":
            t = T_Q5_K if i < n // 16 else T_Q4_K if (not falcon or _use_more_bits(i, n)) else T_Q3_K
        elif ftype == "Q3_K_L":
            t = T_Q4_K if falcon else T_Q5_K
        elif ftype == "Q4_K_M":
            if falcon:
                t = T_Q6_K if i < n // 16 else T_Q5_K if _use_more_bits(i, n) else T_Q4_K
            elif _use_more_bits(i, n):
                t = T_Q6_K
        elif i < n // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not qs.has_imatrix:
            t = T_Q5_K
        elif ftype == "Q5_K_M" and _use_more_bits(i, n):
            t = T_Q6_K
        elif ftype == "Q4_K_S" and not falcon and i < n // 8:
            t = T_Q5_K
        elif ftype in ("Q4_0", "Q5_0") and qs.has_imatrix and i < n // 8:
            t = T_Q4_1 if ftype == "Q4_0" else T_Q5_1
        qs.i_ffn_down += 1
        return t
    if cat == "attn_output":
        if not falcon:
            if qs.n_expert == 8:
                if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
                    t = T_Q5_K
            else:
                t = {"Q2_K": T_Q3_K, "Q3_K_M": T_Q4_K, "Q3_K_L": T_Q5_K}.get(ftype, t)
        elif ftype == "Q3_K_L":
            t = T_Q4_K
        return t
    if cat == "attn_qkv":  # (unreachable: attn_qkv is handled with attn_v above, as in llama.cpp)
        return t
    if cat == "ffn_gate":
        qs.layer_info(qs.i_ffn_gate, name)
        qs.i_ffn_gate += 1
    elif cat == "ffn_up":
        qs.layer_info(qs.i_ffn_up, name)
        qs.i_ffn_up += 1
    return t


# tensor_type_fallback: the type a row length that its block does not divide gets
_FALLBACK = {T_IQ4_XS: T_IQ4_NL, T_Q2_K: T_Q4_0, T_Q3_K: T_Q4_0, T_Q4_K: T_Q5_0,
             T_Q5_K: T_Q5_1, T_Q6_K: T_Q8_0}


def _fallback(qs: _MixState, name: str, ne0: int, t: int) -> int:
    if ne0 % _block_size(t) == 0:
        return t
    qs.n_fallback += 1
    if t not in _FALLBACK:
        raise QuantizeError(f"{name}: row length {ne0} is not a multiple of {_block_size(t)}, "
                            f"the {_type_name(t)} block, and {_type_name(t)} has no fallback type")
    r = _FALLBACK[t]
    return r if ne0 % _block_size(r) == 0 else T_F16


def _llama_order(names) -> list[str]:
    """llama.cpp's weights_map order: by layer number (-1 for tensors outside blk.N.), then by name."""
    return sorted(names, key=lambda n: (_layer_of(n), n.encode("utf-8", "surrogateescape")))


def plan(g, ftype: str, *, pure: bool = False, has_imatrix: bool = False) -> list[TensorPlan]:
    """The tensors of GGUFFile `g` in output order, each with the type llama.cpp's
    quantizer gives it for file type `ftype` (``--pure``: the default type
    everywhere, but still the row-length fallbacks)."""
    _, _, default = _ftype(ftype)
    ftype = _ftype(ftype)[0]
    names = _llama_order(g.tensors)
    qs = _MixState(g, names, has_imatrix)
    quantized_default = default not in (T_F32, T_F16, T_BF16)
    out = []
    for name in names:
        ti = g.tensors[name]
        t = ti.type_id
        if _allows_quantization(name, ti.dims):
            t = default
            if quantized_default:
                if not pure:
                    t = _mix_type(qs, t, name, ti.dims[0], ftype, _category(name))
                t = _fallback(qs, name, ti.dims[0], t)
        out.append(TensorPlan(name, tuple(ti.shape), ti.type_id, t))
    return out


# ===========================================================================
# Part 2: the blocks (ggml/src/ggml-quants.c)
# ===========================================================================

@intrinsic
def _f32_bits(typingctx, v):
    """float32 -> its bits as int32.  Typed for float32 only: a float64 that crept
    into the arithmetic (an int times a float32 is float64 in numba) fails to
    compile here instead of silently rounding differently from the C code."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def _f16_bits(typingctx, v):
    """float32 -> IEEE half bits (round to nearest even: GGML_FP32_TO_FP16)."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        h = builder.bitcast(builder.fptrunc(args[0], llir.HalfType()), llir.IntType(16))
        return builder.zext(h, llir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def _f16_value(typingctx, bits):
    """IEEE half bits (low 16 of an int32) -> float32: GGML_FP16_TO_FP32."""
    def codegen(context, builder, signature, args):
        h = builder.bitcast(builder.trunc(args[0], llir.IntType(16)), llir.HalfType())
        return builder.fpext(h, llir.FloatType())
    return types.float32(types.int32), codegen


_EPS = F(1e-15)  # GROUP_MAX_EPS: a group whose largest |x| is below this is all zero


@njit(cache=True, inline="always")
def _nearest_int(f):
    """ggml's nearest_int: round to nearest even through the float32 adder
    (1.5 * 2^23 pushes the fraction out), exact for |f| < 2^22 and, like the C
    code, garbage beyond (kept so that even degenerate inputs give its bytes)."""
    v = f + F(12582912.0)
    return np.int64((_f32_bits(v) & 0x007FFFFF) - 0x00400000)


@njit(cache=True, inline="always")
def _put_f16(out, o, bits):
    out[o] = bits & 0xFF
    out[o + 1] = (bits >> 8) & 0xFF


@njit(cache=True, inline="always")
def _roundf(v):
    """C roundf (halfway cases away from zero) of a float32, as an int; beyond the
    int32 range (inf / NaN from a denormal scale) what x86's float -> int
    conversion gives, 0x80000000, whose low byte the C code stores."""
    if not abs(v) < F(2147483648.0):
        return np.int64(-2147483648)
    i = np.int64(v)          # toward zero
    r = v - F(i)             # exact
    if r >= F(0.5):
        i += 1
    elif r <= F(-0.5):
        i -= 1
    return i


@njit(cache=True, inline="always")
def _i8(v):
    """The int8 that C's (int8_t) conversion of an int gives (two's complement wrap)."""
    return ((v + 128) & 0xFF) - 128


# ---------------------------------------------------------------------------
# Q8_0: 34 bytes per 32 weights.  f16 d @0, int8 q[32] @2; w = d * q.
# d = max|x| / 127, q = roundf(x / d).
# ---------------------------------------------------------------------------

@njit(cache=True)
def _block_q8_0(x, xo, out, o):
    amax = F(0)
    for j in range(32):
        amax = max(amax, abs(x[xo + j]))
    d = amax / F(127)
    idv = F(1) / d if d != 0 else F(0)
    _put_f16(out, o, _f16_bits(d))
    for j in range(32):
        out[o + 2 + j] = _roundf(x[xo + j] * idv) & 0xFF


# ---------------------------------------------------------------------------
# Q4_0: 18 bytes per 32.  f16 d @0, nibbles @2: byte j holds q[j] (low) and
# q[j+16] (high); w = d * (q - 8).  d = (the x of largest |x|) / -8.
# ---------------------------------------------------------------------------

@njit(cache=True)
def _block_q4_0(x, xo, out, o):
    amax = F(0)
    mx = F(0)
    for j in range(32):
        v = x[xo + j]
        if amax < abs(v):
            amax = abs(v)
            mx = v
    d = mx / F(-8)
    idv = F(1) / d if d != 0 else F(0)
    _put_f16(out, o, _f16_bits(d))
    for j in range(16):
        q0 = min(15, np.int64(x[xo + j] * idv + F(8.5)))
        q1 = min(15, np.int64(x[xo + 16 + j] * idv + F(8.5)))
        out[o + 2 + j] = q0 | (q1 << 4)


# ---------------------------------------------------------------------------
# Q4_1: 20 bytes per 32.  f16 d @0, f16 m @2, nibbles @4 as Q4_0; w = d * q + m.
# m = min x, d = (max - min) / 15.
# ---------------------------------------------------------------------------

@njit(cache=True)
def _block_q4_1(x, xo, out, o):
    mn = F(3.4028234663852886e38)
    mx = -mn
    for j in range(32):
        v = x[xo + j]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    d = (mx - mn) / F(15)
    idv = F(1) / d if d != 0 else F(0)
    _put_f16(out, o, _f16_bits(d))
    _put_f16(out, o + 2, _f16_bits(mn))
    for j in range(16):
        q0 = min(15, np.int64((x[xo + j] - mn) * idv + F(0.5)))
        q1 = min(15, np.int64((x[xo + 16 + j] - mn) * idv + F(0.5)))
        out[o + 4 + j] = q0 | (q1 << 4)


# ---------------------------------------------------------------------------
# Q5_0: 22 bytes per 32.  f16 d @0, u32 qh @2 (bit j = bit 4 of q[j]), low
# nibbles @6 as Q4_0; w = d * (q - 16).  d = (the x of largest |x|) / -16.
# ---------------------------------------------------------------------------

@njit(cache=True)
def _block_q5_0(x, xo, out, o):
    amax = F(0)
    mx = F(0)
    for j in range(32):
        v = x[xo + j]
        if amax < abs(v):
            amax = abs(v)
            mx = v
    d = mx / F(-16)
    idv = F(1) / d if d != 0 else F(0)
    _put_f16(out, o, _f16_bits(d))
    qh = 0
    for j in range(16):
        q0 = min(31, np.int64(x[xo + j] * idv + F(16.5)))
        q1 = min(31, np.int64(x[xo + 16 + j] * idv + F(16.5)))
        out[o + 6 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
        qh |= ((q0 & 0x10) >> 4) << j
        qh |= ((q1 & 0x10) >> 4) << (j + 16)
    for k in range(4):
        out[o + 2 + k] = (qh >> (8 * k)) & 0xFF


# ---------------------------------------------------------------------------
# Q5_1: 24 bytes per 32.  f16 d @0, f16 m @2, u32 qh @4, low nibbles @8;
# w = d * q + m.  m = min x, d = (max - min) / 31.
# ---------------------------------------------------------------------------

@njit(cache=True)
def _block_q5_1(x, xo, out, o):
    mn = F(3.4028234663852886e38)
    mx = -mn
    for j in range(32):
        v = x[xo + j]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    d = (mx - mn) / F(31)
    idv = F(1) / d if d != 0 else F(0)
    _put_f16(out, o, _f16_bits(d))
    _put_f16(out, o + 2, _f16_bits(mn))
    qh = 0
    for j in range(16):
        q0 = np.int64((x[xo + j] - mn) * idv + F(0.5)) & 0xFF
        q1 = np.int64((x[xo + 16 + j] - mn) * idv + F(0.5)) & 0xFF
        out[o + 8 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
        qh |= ((q0 & 0x10) >> 4) << j
        qh |= ((q1 & 0x10) >> 4) << (j + 16)
    for k in range(4):
        out[o + 4 + k] = (qh >> (8 * k)) & 0xFF


# ---------------------------------------------------------------------------
# Shared k-quant searches (ggml-quants.c's helpers of the same names)
# ---------------------------------------------------------------------------

@njit(cache=True)
def _make_qx_quants(n, nmax, x, xo, L, Lo, rmse_type, qw, qwo, use_qw):
    """Symmetric n-weight group on levels -nmax .. nmax-1 (stored + nmax): the
    scale from the x of largest |x|, then 18 nearby scales tried, keeping the one
    of largest (sum w x l)^2 / (sum w l^2), i.e. least weighted squared error."""
    mx = F(0)
    amax = F(0)
    for i in range(n):
        ax = abs(x[xo + i])
        if ax > amax:
            amax = ax
            mx = x[xo + i]
    if amax < _EPS:
        for i in range(n):
            L[Lo + i] = 0
        return F(0)
    iscale = F(-nmax) / mx
    if rmse_type == 0:
        for i in range(n):
            l = _nearest_int(iscale * x[xo + i])
            L[Lo + i] = nmax + max(-nmax, min(nmax - 1, l))
        return F(1) / iscale
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    sumlx = F(0)
    suml2 = F(0)
    for i in range(n):
        xi = x[xo + i]
        l = _nearest_int(iscale * xi)
        l = max(-nmax, min(nmax - 1, l))
        L[Lo + i] = l + nmax
        w = _qx_weight(xi, rmse_type, qw, qwo + i, use_qw)
        fl = F(l)
        sumlx += w * xi * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else F(0)
    if return_early:
        return F(0.5) * (scale + F(1) / iscale) if suml2 > 0 else F(1) / iscale
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(step)) / mx
        sumlx = F(0)
        suml2 = F(0)
        for i in range(n):
            xi = x[xo + i]
            l = _nearest_int(iscale * xi)
            l = max(-nmax, min(nmax - 1, l))
            w = _qx_weight(xi, rmse_type, qw, qwo + i, use_qw)
            fl = F(l)
            sumlx += w * xi * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = _nearest_int(iscale * x[xo + i])
                L[Lo + i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, inline="always")
def _qx_weight(xi, rmse_type, qw, i, use_qw):
    if use_qw:
        return qw[i]
    if rmse_type == 1:
        return xi * xi
    if rmse_type == 2:
        return F(1)
    if rmse_type == 3:
        return abs(xi)
    return F(math.sqrt(abs(xi)))


@njit(cache=True)
def _make_q3_quants(n, nmax, x, xo, L, Lo, do_rmse):
    """Q3_K's group search: levels -nmax .. nmax-1, then up to 5 sweeps moving
    single weights to the level that raises (sum w x l)^2 / (sum w l^2), w = x^2."""
    mx = F(0)
    amax = F(0)
    for i in range(n):
        ax = abs(x[xo + i])
        if ax > amax:
            amax = ax
            mx = x[xo + i]
    if amax < _EPS:
        for i in range(n):
            L[Lo + i] = 0
        return F(0)
    iscale = F(-nmax) / mx
    if do_rmse:
        sumlx = F(0)
        suml2 = F(0)
        for i in range(n):
            xi = x[xo + i]
            l = _nearest_int(iscale * xi)
            l = max(-nmax, min(nmax - 1, l))
            L[Lo + i] = l
            w = xi * xi
            sumlx += w * xi * F(l)
            suml2 += w * F(l) * F(l)
        for _ in range(5):
            n_changed = 0
            for i in range(n):
                xi = x[xo + i]
                w = xi * xi
                li = F(L[Lo + i])
                slx = sumlx - w * xi * li
                if slx > 0:
                    sl2 = suml2 - w * li * li
                    new_l = _nearest_int(xi * sl2 / slx)
                    new_l = max(-nmax, min(nmax - 1, new_l))
                    if new_l != L[Lo + i]:
                        slx += w * xi * F(new_l)
                        sl2 += w * F(new_l) * F(new_l)
                        if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[Lo + i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[Lo + i] += nmax
        return sumlx / suml2 if suml2 > 0 else F(0)
    for i in range(n):
        l = _nearest_int(iscale * x[xo + i])
        L[Lo + i] = max(-nmax, min(nmax - 1, l)) + nmax
    return F(1) / iscale


@njit(cache=True)
def _make_qkx2_quants(n, nmax, x, xo, w, L, Lo, Laux, rmin, rdelta, nstep, use_mad):
    """Asymmetric group (levels 0 .. nmax, w = scale * l - min): min/max start,
    then nstep+1 scales (rmin + rdelta * k + nmax) / (max - min), each refined by
    the weighted least-squares (scale, min) of its levels; keeps the best error.
    Returns (scale, -min)."""
    mn = x[xo]
    mx = x[xo]
    sum_w = w[0]
    sum_x = sum_w * x[xo]
    for i in range(1, n):
        xi = x[xo + i]
        if xi < mn:
            mn = xi
        if xi > mx:
            mx = xi
        wi = w[i]
        sum_w += wi
        sum_x += wi * xi
    if mn > 0:
        mn = F(0)
    if mx == mn:
        for i in range(n):
            L[Lo + i] = 0
        return F(0), -mn
    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    best_error = F(0)
    for i in range(n):
        xi = x[xo + i]
        l = _nearest_int(iscale * (xi - mn))
        l = max(0, min(nmax, l))
        L[Lo + i] = l
        diff = scale * F(l) + mn - xi
        diff = abs(diff) if use_mad else diff * diff
        best_error += w[i] * diff
    if nstep < 1:
        return scale, -mn
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F(step) + F(nmax)) / (mx - mn)
        sum_l = F(0)
        sum_l2 = F(0)
        sum_xl = F(0)
        for i in range(n):
            xi = x[xo + i]
            l = _nearest_int(iscale * (xi - mn))
            l = max(0, min(nmax, l))
            Laux[i] = l
            wi = w[i]
            fl = F(l)
            sum_l += wi * fl
            sum_l2 += wi * fl * fl
            sum_xl += wi * fl * xi
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            cur_error = F(0)
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[xo + i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += w[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[Lo + i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True, inline="always")
def _pack_2bit(L, out, o):
    """256 two-bit levels -> 64 bytes: byte 32*h + l holds L[128h + l + 32k] at bits 2k."""
    for j in range(0, 256, 128):
        for l in range(32):
            out[o + j // 4 + l] = (L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4)
                                   | (L[j + l + 96] << 6)) & 0xFF


# ---------------------------------------------------------------------------
# Q2_K: 84 bytes per 256.  u8 scales[16] @0 (low nibble: scale of 16-weight
# group j, high: its min), 2-bit levels @16 (_pack_2bit), f16 d @80, f16 dmin @82;
# w = d * sc * q - dmin * m.
# ---------------------------------------------------------------------------

@njit(cache=True)
def _block_q2_k(x, xo, out, o, L, Laux, w, scales, mins):
    max_scale = F(0)
    max_min = F(0)
    for j in range(16):
        for l in range(16):
            w[l] = abs(x[xo + 16 * j + l])
        s, m = _make_qkx2_quants(16, 3, x, xo + 16 * j, w, L, 16 * j, Laux, F(-0.5), F(0.1), 15, True)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    if max_scale > 0:
        iscale = F(15) / max_scale
        for j in range(16):
            out[o + j] = _nearest_int(iscale * scales[j]) & 0xFF
        d = _f16_bits(max_scale / F(15))
    else:
        for j in range(16):
            out[o + j] = 0
        d = _f16_bits(F(0))
    if max_min > 0:
        iscale = F(15) / max_min
        for j in range(16):
            out[o + j] = (out[o + j] | (_nearest_int(iscale * mins[j]) << 4)) & 0xFF
        dmin = _f16_bits(max_min / F(15))
    else:
        dmin = _f16_bits(F(0))
    _put_f16(out, o + 80, d)
    _put_f16(out, o + 82, dmin)
    df = _f16_value(d)
    dminf = _f16_value(dmin)
    for j in range(16):
        sc = np.int64(out[o + j])
        dd = df * F(sc & 0xF)
        if dd == 0:
            continue
        dm = dminf * F(sc >> 4)
        for ii in range(16):
            l = _nearest_int((x[xo + 16 * j + ii] + dm) / dd)
            L[16 * j + ii] = max(0, min(3, l))
    _pack_2bit(L, out, o + 16)


# ---------------------------------------------------------------------------
# Q3_K: 110 bytes per 256.  hmask[32] @0 (bit k of byte m: the high bit of
# weight 32k + m), 2-bit low levels @32 (_pack_2bit), 12 bytes of 6-bit scales
# @96 (low nibbles of groups 0-7 then 8-15 in bytes 0-7, top 2 bits in bytes
# 8-11), f16 d @108; w = d * (sc - 32) * (q - 4).
# ---------------------------------------------------------------------------

@njit(cache=True)
def _block_q3_k(x, xo, out, o, L, scales):
    max_scale = F(0)
    amax = F(0)
    for j in range(16):
        s = _make_q3_quants(16, 4, x, xo + 16 * j, L, 16 * j, True)
        scales[j] = s
        a = abs(s)
        if a > amax:
            amax = a
            max_scale = s
    so = o + 96
    for k in range(12):
        out[so + k] = 0
    if max_scale != 0:
        iscale = F(-32) / max_scale
        for j in range(16):
            l = _i8(_nearest_int(iscale * scales[j]))
            l = max(-32, min(31, l)) + 32
            if j < 8:
                out[so + j] = l & 0xF
            else:
                out[so + j - 8] |= (l & 0xF) << 4
            l >>= 4
            out[so + j % 4 + 8] |= l << (2 * (j // 4))
        d = _f16_bits(F(1) / iscale)
    else:
        d = _f16_bits(F(0))
    _put_f16(out, o + 108, d)
    _q3_k_finish(x, xo, out, o, L, _f16_value(d))


@njit(cache=True)
def _q3_k_finish(x, xo, out, o, L, df):
    """Levels from the stored (f16, 6-bit) scales, then the high-bit mask and low bits."""
    so = o + 96
    for j in range(16):
        if j < 8:
            sc = np.int64(out[so + j]) & 0xF
        else:
            sc = np.int64(out[so + j - 8]) >> 4
        sc = (sc | (((np.int64(out[so + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        dd = df * F(sc)
        if dd == 0:
            continue
        for ii in range(16):
            l = _nearest_int(x[xo + 16 * j + ii] / dd)
            L[16 * j + ii] = max(-4, min(3, l)) + 4
    for k in range(32):
        out[o + k] = 0
    m = 0
    hm = 1
    for j in range(256):
        if L[j] > 3:
            out[o + m] |= hm
            L[j] -= 4
        m += 1
        if m == 32:
            m = 0
            hm <<= 1
    _pack_2bit(L, out, o + 32)


# ---------------------------------------------------------------------------
# Q4_K / Q5_K: 144 / 176 bytes per 256.  f16 d @0, f16 dmin @2, 12 bytes @4 of
# eight 6-bit (scale, min) pairs (get_scale_min_k4), Q5_K: qh[32] @16 (bits 2g,
# 2g+1 of byte l: the 5th bit of weights 64g + l and 64g + 32 + l); nibbles
# @16 / @48: byte 32g + l holds weight 64g + l (low) and 64g + 32 + l (high);
# w = d * sc * q - dmin * m.
# ---------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _scale_min_k4(j, out, so):
    if j < 4:
        return np.int64(out[so + j]) & 63, np.int64(out[so + j + 4]) & 63
    sc = (np.int64(out[so + j + 4]) & 0xF) | ((np.int64(out[so + j - 4]) >> 6) << 4)
    m = (np.int64(out[so + j + 4]) >> 4) | ((np.int64(out[so + j]) >> 6) << 4)
    return sc, m


@njit(cache=True)
def _block_q45_k(x, xo, out, o, L, Laux, w, scales, mins, five):
    max_scale = F(0)
    max_min = F(0)
    for j in range(8):
        sum_x2 = F(0)
        for l in range(32):
            v = x[xo + 32 * j + l]
            sum_x2 += v * v
        av_x = F(math.sqrt(sum_x2 / F(32)))
        for l in range(32):
            w[l] = av_x + abs(x[xo + 32 * j + l])
        if five:
            s, m = _make_qkx2_quants(32, 31, x, xo + 32 * j, w, L, 32 * j, Laux, F(-0.5), F(0.1), 15, False)
        else:
            s, m = _make_qkx2_quants(32, 15, x, xo + 32 * j, w, L, 32 * j, Laux, F(-1.0), F(0.1), 20, False)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
    inv_min = F(63) / max_min if max_min > 0 else F(0)
    so = o + 4
    for j in range(8):
        ls = min(63, _nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, _nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            out[so + j] = ls
            out[so + j + 4] = lm
        else:
            out[so + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            out[so + j - 4] |= (ls >> 4) << 6
            out[so + j] |= (lm >> 4) << 6
    d = _f16_bits(max_scale / F(63))
    dmin = _f16_bits(max_min / F(63))
    _put_f16(out, o, d)
    _put_f16(out, o + 2, dmin)
    _q45_k_finish(x, xo, out, o, L, _f16_value(d), _f16_value(dmin), five)


@njit(cache=True)
def _q45_k_finish(x, xo, out, o, L, df, dminf, five):
    """Levels from the stored (f16, 6-bit) scales and mins, then the nibbles (and Q5_K's high bits)."""
    nmax = 31 if five else 15
    so = o + 4
    for j in range(8):
        sc, m = _scale_min_k4(j, out, so)
        dd = df * F(sc)
        if dd == 0:
            continue
        dm = dminf * F(m)
        for ii in range(32):
            l = _nearest_int((x[xo + 32 * j + ii] + dm) / dd)
            L[32 * j + ii] = max(0, min(nmax, l))
    if five:
        qh = o + 16
        ql = o + 48
        for j in range(32):
            out[qh + j] = 0
        m1 = 1
        m2 = 2
        for n in range(0, 256, 64):
            for j in range(32):
                l1 = np.int64(L[n + j])
                if l1 > 15:
                    l1 -= 16
                    out[qh + j] |= m1
                l2 = np.int64(L[n + j + 32])
                if l2 > 15:
                    l2 -= 16
                    out[qh + j] |= m2
                out[ql + j] = l1 | (l2 << 4)
            m1 <<= 2
            m2 <<= 2
            ql += 32
    else:
        q = o + 16
        for j in range(0, 256, 64):
            for l in range(32):
                out[q + l] = L[j + l] | (L[j + l + 32] << 4)
            q += 32


# ---------------------------------------------------------------------------
# Q6_K: 210 bytes per 256.  ql[128] @0 (low nibbles), qh[64] @128 (high 2
# bits), int8 scales[16] @192, f16 d @208; per 128-weight half h, weight
# 128h + 32k + l has its low nibble in ql[64h + l + 32(k&1)] (k>=2: high
# nibble) and its top bits at bits 2k of qh[32h + l]; w = d * sc * (q - 32).
# ---------------------------------------------------------------------------

@njit(cache=True)
def _block_q6_k(x, xo, out, o, L, scales, dummy_qw):
    max_scale = F(0)
    max_abs_scale = F(0)
    for ib in range(16):
        s = _make_qx_quants(16, 32, x, xo + 16 * ib, L, 16 * ib, 1, dummy_qw, 0, False)
        scales[ib] = s
        a = abs(s)
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = s
    _q6_k_finish(x, xo, out, o, L, scales, max_scale, max_abs_scale)


@njit(cache=True)
def _q6_k_finish(x, xo, out, o, L, scales, max_scale, max_abs_scale):
    """Block scale from the largest group scale, int8 group scales, levels, packing."""
    if max_abs_scale < _EPS:
        for k in range(210):
            out[o + k] = 0
        return
    iscale = F(-128) / max_scale
    d = _f16_bits(F(1) / iscale)
    _put_f16(out, o + 208, d)
    for ib in range(16):
        out[o + 192 + ib] = min(127, _nearest_int(iscale * scales[ib])) & 0xFF
    df = _f16_value(d)
    for j in range(16):
        sc = _i8(np.int64(out[o + 192 + j]))
        dd = df * F(sc)
        if dd == 0:
            continue
        for ii in range(16):
            l = _nearest_int(x[xo + 16 * j + ii] / dd)
            L[16 * j + ii] = max(-32, min(31, l)) + 32
    ql = o
    qh = o + 128
    for j in range(0, 256, 128):
        for l in range(32):
            a0 = np.int64(L[j + l])
            a1 = np.int64(L[j + l + 32])
            a2 = np.int64(L[j + l + 64])
            a3 = np.int64(L[j + l + 96])
            out[ql + l] = (a0 & 0xF) | ((a2 & 0xF) << 4)
            out[ql + l + 32] = (a1 & 0xF) | ((a3 & 0xF) << 4)
            out[qh + l] = ((a0 >> 4) | ((a1 >> 4) << 2) | ((a2 >> 4) << 4) | ((a3 >> 4) << 6)) & 0xFF
        ql += 64
        qh += 32


# ---------------------------------------------------------------------------
# IQ4_NL: 18 bytes per 32.  f16 d @0, nibbles @2 as Q4_0, each an index into
# the non-linear grid KVALUES; w = d * KVALUES[q].
# IQ4_XS: 136 bytes per 256.  f16 d @0, u16 scales_h @2 (2 high bits per
# 32-weight group), scales_l[4] @4 (low nibbles, two groups a byte), nibbles
# @8 (16 bytes per group, as IQ4_NL); w = d * (ls - 32) * KVALUES[q].
# ---------------------------------------------------------------------------

_KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                    dtype=np.int8)
# ggml's best_index_int8 has had two forms: a bisection comparing the distances
# x - v[i-1] < v[i] - x (older), and a branch-free search comparing 2x with
# v[i-1] + v[i] (newer).  They differ only for x within a rounding of a midpoint.
# llama-cpp-python 0.3.36's ggml runs the bisection (tests/test_quantize.py).
_IQ4_MIDPOINT_SEARCH = False


@njit(cache=True, inline="always")
def _best_index_iq4(x):
    if _IQ4_MIDPOINT_SEARCH:
        x2 = x + x
        idx = 0
        step = 8
        while step > 0:
            j = idx + step
            if x2 >= F(np.int64(_KVALUES[j - 1]) + np.int64(_KVALUES[j])):
                idx = j
            step >>= 1
        return idx
    if x <= F(_KVALUES[0]):
        return 0
    if x >= F(_KVALUES[15]):
        return 15
    ml = 0
    mu = 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < F(_KVALUES[mav]):
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - F(_KVALUES[mu - 1]) < F(_KVALUES[mu]) - x else mu


@njit(cache=True)
def _iq4_group_scale(x, xo, w, L, Lo, ntry):
    """One 32-weight group: the scale (and levels L) of least weighted error
    over 2 * ntry + 1 candidate scales around max|x| / 127."""
    amax = F(0)
    mx = F(0)
    for j in range(32):
        ax = abs(x[xo + j])
        if ax > amax:
            amax = ax
            mx = x[xo + j]
    if amax < _EPS:
        for j in range(32):
            L[Lo + j] = 0
        return F(0)
    v0 = F(_KVALUES[0])
    d = -mx / v0 if ntry > 0 else mx / v0
    idv = F(1) / d
    sumqx = F(0)
    sumq2 = F(0)
    for j in range(32):
        xj = x[xo + j]
        l = _best_index_iq4(idv * xj)
        L[Lo + j] = l
        q = F(_KVALUES[l])
        wj = w[j]
        sumqx += wj * q * xj
        sumq2 += wj * q * q
    d = sumqx / sumq2 if sumq2 > 0 else F(0)
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        idv = F(itry + np.int64(_KVALUES[0])) / mx
        sumqx = F(0)
        sumq2 = F(0)
        for j in range(32):
            xj = x[xo + j]
            q = F(_KVALUES[_best_index_iq4(idv * xj)])
            wj = w[j]
            sumqx += wj * q * xj
            sumq2 += wj * q * q
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@njit(cache=True)
def _block_iq4_nl(x, xo, out, o, L, w, qw, use_qw):
    if use_qw:  # sigma2: twice the mean x^2 of the block
        sigma2 = _sum_sq(x, xo, 32) * (F(2) / F(32))
        _importance(qw, xo, x, xo, sigma2, w, 32)
    else:
        for j in range(32):
            w[j] = x[xo + j] * x[xo + j]
    d = _iq4_group_scale(x, xo, w, L, 0, 7)
    _put_f16(out, o, _f16_bits(d))
    idv = F(1) / d if d != 0 else F(0)
    for j in range(32):
        L[j] = _best_index_iq4(idv * x[xo + j])
    for j in range(16):
        out[o + 2 + j] = L[j] | (L[16 + j] << 4)


@njit(cache=True)
def _block_iq4_xs(x, xo, out, o, L, w, scales, qw, use_qw):
    max_scale = F(0)
    amax_scale = F(0)
    sigma2 = _sum_sq(x, xo, 256) * (F(2) / F(256))
    for ib in range(8):
        if use_qw:
            _importance(qw, xo + 32 * ib, x, xo + 32 * ib, sigma2, w, 32)
        else:
            for j in range(32):
                v = x[xo + 32 * ib + j]
                w[j] = v * v
        d = _iq4_group_scale(x, xo + 32 * ib, w, L, 32 * ib, 7)
        scales[ib] = d
        a = abs(d)
        if a > amax_scale:
            amax_scale = a
            max_scale = d
    out[o + 2] = 0
    out[o + 3] = 0
    d = -max_scale / F(32)
    _put_f16(out, o, _f16_bits(d))
    idv = F(1) / d if d != 0 else F(0)
    sh = 0
    for ib in range(8):
        l = _nearest_int(idv * scales[ib])
        l = max(-32, min(31, l))
        dl = d * F(l)
        idl = F(1) / dl if dl != 0 else F(0)
        for j in range(32):
            L[32 * ib + j] = _best_index_iq4(idl * x[xo + 32 * ib + j])
        l += 32
        if ib % 2 == 0:
            out[o + 4 + ib // 2] = l & 0xF
        else:
            out[o + 4 + ib // 2] |= (l & 0xF) << 4
        sh |= (l >> 4) << (2 * ib)
    out[o + 2] = sh & 0xFF
    out[o + 3] = (sh >> 8) & 0xFF
    for i in range(8):
        for j in range(16):
            out[o + 8 + 16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << 4)


# ---------------------------------------------------------------------------
# With an importance matrix (llama-imatrix's mean squared activation per input
# column, qw): ggml-quants.c's quantize_row_*_impl.  Each weight's error counts
# qw[j] * sqrt(sigma2 + x[j]^2) (sigma2: the mean x^2 of the row or super-block),
# and the k-quants fit their block scales by weighted least squares too
# (make_qp_quants) instead of rounding them against the largest one.
# ---------------------------------------------------------------------------

@njit(cache=True)
def _make_qkx3_quants(n, nmax, x, xo, w, L, Lo, Laux, rmin, rdelta, nstep, use_mad):
    """_make_qkx2_quants with the weights supplied and levels clamped before
    rounding (the best min so far can sit at max); returns (scale, -min)."""
    mn = x[xo]
    mx = x[xo]
    sum_w = w[0]
    sum_x = sum_w * x[xo]
    for i in range(1, n):
        xi = x[xo + i]
        if xi < mn:
            mn = xi
        if xi > mx:
            mx = xi
        wi = w[i]
        sum_w += wi
        sum_x += wi * xi
    if mn > 0:
        mn = F(0)
    if mx <= mn:
        for i in range(n):
            L[Lo + i] = 0
        return F(0), -mn
    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    best_mad = F(0)
    for i in range(n):
        xi = x[xo + i]
        l = _nearest_int(iscale * (xi - mn))
        l = max(0, min(nmax, l))
        L[Lo + i] = l
        diff = scale * F(l) + mn - xi
        diff = abs(diff) if use_mad else diff * diff
        best_mad += w[i] * diff
    if nstep < 1:
        return scale, -mn
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F(step) + F(nmax)) / (mx - mn)
        sum_l = F(0)
        sum_l2 = F(0)
        sum_xl = F(0)
        for i in range(n):
            xi = x[xo + i]
            v = iscale * (xi - mn)
            l = _nearest_int(min(v, F(nmax))) if v > 0 else 0
            Laux[i] = l
            wi = w[i]
            fl = F(l)
            sum_l += wi * fl
            sum_l2 += wi * fl * fl
            sum_xl += wi * fl * xi
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            mad = F(0)
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[xo + i]
                diff = abs(diff) if use_mad else diff * diff
                mad += w[i] * diff
            if mad < best_mad:
                for i in range(n):
                    L[Lo + i] = Laux[i]
                best_mad = mad
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True)
def _make_qp_quants(n, nmax, x, L, qw):
    """Non-negative values x (block scales or mins) on levels 0 .. nmax with
    weights qw: 9 candidate scales, then up to 5 sweeps of single-level moves."""
    mx = F(0)
    for i in range(n):
        mx = max(mx, x[i])
    if mx < _EPS:
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(nmax) / mx
    for i in range(n):
        L[i] = _nearest_int(iscale * x[i])
    scale = F(1) / iscale
    best_mse = F(0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best_mse += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F(0.1) * F(step) + F(nmax)) / mx
        scale_is = F(1) / iscale_is
        mse = F(0)
        for i in range(n):
            l = min(nmax, _nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * F(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F(0)
    suml2 = F(0)
    for i in range(n):
        l = min(nmax, _nearest_int(iscale * x[i]))
        L[i] = l
        w = qw[i]
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            li = F(L[i])
            slx = sumlx - w * x[i] * li
            sl2 = suml2 - w * li * li
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, _nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w * x[i] * F(new_l)
                    sl2 += w * F(new_l) * F(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else F(0)


@njit(cache=True, inline="always")
def _importance(qw, qo, x, xo, sigma2, w, n):
    """w[j] = qw[j] * sqrt(sigma2 + x[j]^2): imatrix weight times the magnitude."""
    for j in range(n):
        v = x[xo + j]
        w[j] = qw[qo + j] * F(math.sqrt(sigma2 + v * v))


@njit(cache=True)
def _sum_sq(x, xo, n):
    s = F(0)
    for j in range(n):
        s += x[xo + j] * x[xo + j]
    return s


@njit(cache=True)
def _row_legacy_w(kind, x, qw, out, L8, Lu, Laux, w):
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 of one row with importance weights (Q8_0 has none)."""
    n = x.shape[0]
    sigma2 = _sum_sq(x, 0, n) / F(n)
    bsize = (18, 20, 22, 24)[kind]
    for ib in range(n // 32):
        xo = 32 * ib
        o = bsize * ib
        _importance(qw, xo, x, xo, sigma2, w, 32)
        if kind == 0 or kind == 2:
            d = _make_qx_quants(32, 8 if kind == 0 else 16, x, xo, L8, 0, 1, w, 0, True)
            _put_f16(out, o, _f16_bits(d))
            if kind == 0:
                for j in range(16):
                    out[o + 2 + j] = (np.int64(L8[j]) | (np.int64(L8[j + 16]) << 4)) & 0xFF
                continue
            q = o + 6
            qho = o + 2
        else:
            d, m = _make_qkx3_quants(32, 15 if kind == 1 else 31, x, xo, w, Lu, 0, Laux,
                                     F(-0.9), F(0.05), 36, False)
            _put_f16(out, o, _f16_bits(d))
            _put_f16(out, o + 2, _f16_bits(-m))
            if kind == 1:
                for j in range(16):
                    out[o + 4 + j] = Lu[j] | (Lu[j + 16] << 4)
                continue
            for j in range(32):
                L8[j] = Lu[j]
            q = o + 8
            qho = o + 4
        qh = 0
        for j in range(16):
            a = np.int64(L8[j]) & 0xFF
            b = np.int64(L8[j + 16]) & 0xFF
            out[q + j] = (a & 0x0F) | ((b & 0x0F) << 4)
            qh |= ((a & 0x10) >> 4) << j
            qh |= ((b & 0x10) >> 4) << (j + 16)
        for k in range(4):
            out[qho + k] = (qh >> (8 * k)) & 0xFF


@njit(cache=True)
def _block_q2_k_w(x, xo, qw, out, o, L, Laux, w, scales, mins, sw, Ls, Lm):
    sigma2 = _sum_sq(x, xo, 256) / F(256)
    for j in range(16):
        _importance(qw, xo + 16 * j, x, xo + 16 * j, sigma2, w, 16)
        s = F(0)
        for l in range(16):
            s += w[l]
        sw[j] = s
        gs, gm = _make_qkx3_quants(16, 3, x, xo + 16 * j, w, L, 16 * j, Laux, F(-0.9), F(0.05), 36, False)
        scales[j] = gs
        mins[j] = gm
    dm = _make_qp_quants(16, 15, scales, Ls, sw)
    mm = _make_qp_quants(16, 15, mins, Lm, sw)
    db = _f16_bits(dm)
    mb = _f16_bits(mm)
    _put_f16(out, o + 80, db)
    _put_f16(out, o + 82, mb)
    dm = _f16_value(db)
    mm = _f16_value(mb)
    for j in range(16):
        out[o + j] = (np.int64(Ls[j]) | (np.int64(Lm[j]) << 4)) & 0xFF
    for j in range(16):
        sc = np.int64(out[o + j])
        d = dm * F(sc & 0xF)
        if d == 0:
            continue
        m = mm * F(sc >> 4)
        for ii in range(16):
            l = _nearest_int((x[xo + 16 * j + ii] + m) / d)
            L[16 * j + ii] = max(0, min(3, l))
    _pack_2bit(L, out, o + 16)


@njit(cache=True)
def _block_q3_k_w(x, xo, qw, out, o, L, scales, w, sw, Ls):
    sigma2 = F(2) * _sum_sq(x, xo, 256) / F(256)
    for j in range(16):
        _importance(qw, xo + 16 * j, x, xo + 16 * j, sigma2, w, 16)
        s = F(0)
        for l in range(16):
            s += w[l]
        sw[j] = s
        scales[j] = _make_qx_quants(16, 4, x, xo + 16 * j, L, 16 * j, 1, w, 0, True)
    so = o + 96
    for k in range(12):
        out[so + k] = 0
    d_block = _make_qx_quants(16, 32, scales, 0, Ls, 0, 1, sw, 0, True)
    for j in range(16):
        l = np.int64(Ls[j])
        if j < 8:
            out[so + j] = l & 0xF
        else:
            out[so + j - 8] |= (l & 0xF) << 4
        l >>= 4
        out[so + j % 4 + 8] |= l << (2 * (j // 4))
    d = _f16_bits(d_block)
    _put_f16(out, o + 108, d)
    _q3_k_finish(x, xo, out, o, L, _f16_value(d))


@njit(cache=True)
def _block_q45_k_w(x, xo, qw, out, o, L, Laux, w, scales, mins, sw, Ls, Lm, five):
    nmax = 31 if five else 15
    sigma2 = F(2) * _sum_sq(x, xo, 256) / F(256)
    for j in range(8):
        _importance(qw, xo + 32 * j, x, xo + 32 * j, sigma2, w, 32)
        s = F(0)
        for l in range(32):
            s += w[l]
        sw[j] = s
        gs, gm = _make_qkx3_quants(32, nmax, x, xo + 32 * j, w, L, 32 * j, Laux, F(-0.9), F(0.05), 36, False)
        scales[j] = gs
        mins[j] = gm
    d_block = _make_qp_quants(8, 63, scales, Ls, sw)
    m_block = _make_qp_quants(8, 63, mins, Lm, sw)
    so = o + 4
    for j in range(8):
        ls = min(63, np.int64(Ls[j]))
        lm = min(63, np.int64(Lm[j]))
        if j < 4:
            out[so + j] = ls
            out[so + j + 4] = lm
        else:
            out[so + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            out[so + j - 4] |= (ls >> 4) << 6
            out[so + j] |= (lm >> 4) << 6
    d = _f16_bits(d_block)
    dmin = _f16_bits(m_block)
    _put_f16(out, o, d)
    _put_f16(out, o + 2, dmin)
    _q45_k_finish(x, xo, out, o, L, _f16_value(d), _f16_value(dmin), five)


@njit(cache=True)
def _block_q6_k_w(x, xo, qw, out, o, L, scales):
    max_scale = F(0)
    max_abs_scale = F(0)
    for ib in range(16):
        s = _make_qx_quants(16, 32, x, xo + 16 * ib, L, 16 * ib, 1, qw, xo + 16 * ib, True)
        scales[ib] = s
        a = abs(s)
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = s
    _q6_k_finish(x, xo, out, o, L, scales, max_scale, max_abs_scale)


@njit(parallel=True, cache=True)
def _rows_weighted(t, x, qw, out):
    """One parallel kernel for every format's importance-weighted quantizer."""
    nrows, n = x.shape
    for r in prange(nrows):
        L8 = np.zeros(256, np.int8)
        Lu = np.zeros(256, np.uint8)
        Laux = np.zeros(32, np.uint8)
        w = np.zeros(32, np.float32)
        sc = np.zeros(16, np.float32)
        mn = np.zeros(16, np.float32)
        sw = np.zeros(16, np.float32)
        Ls = np.zeros(16, np.uint8)
        Lm = np.zeros(16, np.uint8)
        Ls8 = np.zeros(16, np.int8)
        xr = x[r]
        orow = out[r]
        if t == T_Q4_0 or t == T_Q4_1 or t == T_Q5_0 or t == T_Q5_1:
            kind = 0 if t == T_Q4_0 else 1 if t == T_Q4_1 else 2 if t == T_Q5_0 else 3
            _row_legacy_w(kind, xr, qw, orow, L8, Lu, Laux, w)
        elif t == T_Q2_K:
            for ib in range(n // 256):
                _block_q2_k_w(xr, 256 * ib, qw, orow, 84 * ib, Lu, Laux, w, sc, mn, sw, Ls, Lm)
        elif t == T_Q3_K:
            for ib in range(n // 256):
                _block_q3_k_w(xr, 256 * ib, qw, orow, 110 * ib, L8, sc, w, sw, Ls8)
        elif t == T_Q4_K or t == T_Q5_K:
            for ib in range(n // 256):
                _block_q45_k_w(xr, 256 * ib, qw, orow, (176 if t == T_Q5_K else 144) * ib, Lu, Laux, w,
                               sc, mn, sw, Ls, Lm, t == T_Q5_K)
        elif t == T_Q6_K:
            for ib in range(n // 256):
                _block_q6_k_w(xr, 256 * ib, qw, orow, 210 * ib, L8, sc)
        elif t == T_IQ4_NL:
            for ib in range(n // 32):
                _block_iq4_nl(xr, 32 * ib, orow, 18 * ib, Lu, w, qw, True)
        elif t == T_IQ4_XS:
            for ib in range(n // 256):
                _block_iq4_xs(xr, 256 * ib, orow, 136 * ib, Lu, w, sc, qw, True)


# ---------------------------------------------------------------------------
# Row kernels: parallel over rows, scratch per row
# ---------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def _rows_legacy(kind, x, out):
    nrows, n = x.shape
    nb = n // 32
    for r in prange(nrows):
        xr = x[r]
        orow = out[r]
        for ib in range(nb):
            if kind == 0:
                _block_q4_0(xr, 32 * ib, orow, 18 * ib)
            elif kind == 1:
                _block_q4_1(xr, 32 * ib, orow, 20 * ib)
            elif kind == 2:
                _block_q5_0(xr, 32 * ib, orow, 22 * ib)
            elif kind == 3:
                _block_q5_1(xr, 32 * ib, orow, 24 * ib)
            else:
                _block_q8_0(xr, 32 * ib, orow, 34 * ib)


@njit(parallel=True, cache=True)
def _rows_q2_k(x, out):
    nrows, n = x.shape
    for r in prange(nrows):
        L = np.zeros(256, np.uint8)
        Laux = np.zeros(16, np.uint8)
        w = np.zeros(16, np.float32)
        sc = np.zeros(16, np.float32)
        mn = np.zeros(16, np.float32)
        for ib in range(n // 256):
            _block_q2_k(x[r], 256 * ib, out[r], 84 * ib, L, Laux, w, sc, mn)


@njit(parallel=True, cache=True)
def _rows_q3_k(x, out):
    nrows, n = x.shape
    for r in prange(nrows):
        L = np.zeros(256, np.int8)
        sc = np.zeros(16, np.float32)
        for ib in range(n // 256):
            _block_q3_k(x[r], 256 * ib, out[r], 110 * ib, L, sc)


@njit(parallel=True, cache=True)
def _rows_q45_k(x, out, five):
    nrows, n = x.shape
    bsize = 176 if five else 144
    for r in prange(nrows):
        L = np.zeros(256, np.uint8)
        Laux = np.zeros(32, np.uint8)
        w = np.zeros(32, np.float32)
        sc = np.zeros(8, np.float32)
        mn = np.zeros(8, np.float32)
        for ib in range(n // 256):
            _block_q45_k(x[r], 256 * ib, out[r], bsize * ib, L, Laux, w, sc, mn, five)


@njit(parallel=True, cache=True)
def _rows_q6_k(x, out):
    nrows, n = x.shape
    for r in prange(nrows):
        L = np.zeros(256, np.int8)
        sc = np.zeros(16, np.float32)
        qw = np.zeros(1, np.float32)
        for ib in range(n // 256):
            _block_q6_k(x[r], 256 * ib, out[r], 210 * ib, L, sc, qw)


@njit(parallel=True, cache=True)
def _rows_iq4(x, out, xs):
    nrows, n = x.shape
    for r in prange(nrows):
        L = np.zeros(256, np.uint8)
        w = np.zeros(32, np.float32)
        sc = np.zeros(8, np.float32)
        qw = np.zeros(1, np.float32)
        if xs:
            for ib in range(n // 256):
                _block_iq4_xs(x[r], 256 * ib, out[r], 136 * ib, L, w, sc, qw, False)
        else:
            for ib in range(n // 32):
                _block_iq4_nl(x[r], 32 * ib, out[r], 18 * ib, L, w, qw, False)


_LEGACY_KIND = {T_Q4_0: 0, T_Q4_1: 1, T_Q5_0: 2, T_Q5_1: 3, T_Q8_0: 4}


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even, NaNs kept quiet."""
    u = x.view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (u >> np.uint32(16)) | np.uint32(64), rounded).astype(np.uint16)


_WEIGHTED = (T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q2_K, T_Q3_K, T_Q4_K, T_Q5_K, T_Q6_K, T_IQ4_NL, T_IQ4_XS)


def quantize_rows(x: np.ndarray, type_id: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 `x` (..., ne0) to ggml type `type_id`: uint8 (rows, row bytes),
    the bytes llama.cpp's quantizer writes.  `imatrix`: importance of each input
    column (ne0 values; ne2 * ne0 for a 3-D expert tensor, one vector per expert),
    used by the formats that take one (not Q8_0 / F16 / BF16 / F32, as in ggml)."""
    t = int(type_id)
    if t not in _BLOCK:
        raise QuantizeError(f"cannot quantize to {_type_name(t)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not x.flags.writeable and t not in (T_F32, T_F16, T_BF16):
        # numba types read-only arrays (an F32 file's memory map) apart and would
        # compile every kernel twice; a copy is cheap next to the search
        x = x.copy()
    ne0 = x.shape[-1] if x.ndim else 1
    x2 = x.reshape(-1, ne0)
    bs, ts = _BLOCK[t]
    if ne0 % bs:
        raise QuantizeError(f"row length {ne0} is not a multiple of the {_type_name(t)} block size {bs}")
    if t == T_F32:
        return x2.view(np.uint8).copy()
    if t == T_F16:
        return x2.astype(np.float16).view(np.uint8)
    if t == T_BF16:
        return _bf16_bits(x2).view(np.uint8)
    out = np.zeros((x2.shape[0], ne0 // bs * ts), np.uint8)
    if x2.shape[0] == 0:
        return out
    if imatrix is not None and t in _WEIGHTED:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        n_mat = x.shape[0] if x.ndim == 3 else 1
        if qw.size != ne0 * n_mat:
            raise QuantizeError(f"importance matrix has {qw.size} values, {ne0 * n_mat} expected")
        rows = x2.shape[0] // n_mat
        for e in range(n_mat):  # each expert with its own importance vector
            _rows_weighted(t, x2[e * rows:(e + 1) * rows], qw[e * ne0:(e + 1) * ne0],
                           out[e * rows:(e + 1) * rows])
        return out
    if t in _LEGACY_KIND:
        _rows_legacy(_LEGACY_KIND[t], x2, out)
    elif t == T_Q2_K:
        _rows_q2_k(x2, out)
    elif t == T_Q3_K:
        _rows_q3_k(x2, out)
    elif t in (T_Q4_K, T_Q5_K):
        _rows_q45_k(x2, out, t == T_Q5_K)
    elif t == T_Q6_K:
        _rows_q6_k(x2, out)
    else:
        _rows_iq4(x2, out, t == T_IQ4_XS)
    return out


# ===========================================================================
# Part 3: the file
# ===========================================================================

def _as_float32(g, ti) -> np.ndarray:
    raw = g.raw(ti.name)
    if ti.type_id == T_F32:
        return raw.view(np.float32).reshape(ti.shape)
    if ti.type_id == T_F16:
        return raw.view(np.float16).astype(np.float32).reshape(ti.shape)
    if ti.type_id == T_BF16:
        return (raw.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(ti.shape)
    return g.dequantize(ti.name)


_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def _copy_metadata(g, w, file_type: int) -> None:
    import gguf

    VT = gguf.GGUFValueType
    item_of = {np.dtype(np.uint8): VT.UINT8, np.dtype(np.int8): VT.INT8, np.dtype(np.uint16): VT.UINT16,
               np.dtype(np.int16): VT.INT16, np.dtype(np.uint32): VT.UINT32, np.dtype(np.int32): VT.INT32,
               np.dtype(np.float32): VT.FLOAT32, np.dtype(np.bool_): VT.BOOL, np.dtype(np.uint64): VT.UINT64,
               np.dtype(np.int64): VT.INT64, np.dtype(np.float64): VT.FLOAT64}

    def enc(v):
        return v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v

    for key, value in g.metadata.items():
        if key == "general.architecture" or key in _SPLIT_KEYS:
            continue
        if key == "general.alignment":
            w.add_custom_alignment(int(value))
            continue
        vtype = VT(g.value_types[key])
        if key == "general.file_type":
            value, vtype = file_type, VT.UINT32
        elif key == "general.quantization_version":
            value, vtype = _GGML_QNT_VERSION, VT.UINT32
        if vtype == VT.ARRAY:
            if len(value) == 0:
                raise QuantizeError(f"metadata {key} is an empty array, which gguf-py's writer cannot write")
            if isinstance(value, np.ndarray):
                w.add_key_value(key, value.tolist(), vtype, sub_type=item_of[value.dtype])
            elif all(isinstance(v, str) for v in value):
                w.add_key_value(key, [enc(v) for v in value], vtype, sub_type=VT.STRING)
            else:
                raise QuantizeError(f"metadata {key}: nested arrays are not supported by the writer")
        else:
            w.add_key_value(key, enc(value), vtype)
    if "general.quantization_version" not in g.metadata:
        w.add_quantization_version(_GGML_QNT_VERSION)
    if "general.file_type" not in g.metadata:
        w.add_file_type(file_type)


@dataclass
class Imatrix:
    """An importance matrix: per weight-matrix name, the mean squared activation of
    each input column (ne0 values per expert), as llama-quantize derives it from
    llama-imatrix's GGUF file (``<name>.in_sum2`` / ``<name>.counts``)."""

    values: dict          # tensor name -> float32 (n_mat * ne0,)
    datasets: list
    chunk_count: int
    path: Path | None = None


def load_imatrix(path) -> Imatrix:
    """Read llama-imatrix's GGUF imatrix file (general.type "imatrix")."""
    from .gguf import GGUFFile

    path = Path(path)
    with GGUFFile(path) as g:
        if g.get("general.type") != "imatrix":
            raise QuantizeError(f"{path}: not a GGUF imatrix file (general.type is "
                                f"{g.get('general.type')!r}, expected 'imatrix')")
        values = {}
        for name, ti in g.tensors.items():
            if not name.endswith(".in_sum2"):
                continue
            base = name[: -len(".in_sum2")]
            if base + ".counts" not in g.tensors:
                raise QuantizeError(f"{path}: {name} has no {base}.counts")
            if ti.type_id != T_F32 or g.tensors[base + ".counts"].type_id != T_F32:
                raise QuantizeError(f"{path}: {base}: in_sum2 / counts must be F32")
            sums = g.raw(name).view(np.float32).reshape(-1)
            counts = g.raw(base + ".counts").view(np.float32).reshape(-1)
            if counts.size == 0 or sums.size % counts.size:
                raise QuantizeError(f"{path}: {base}: {sums.size} sums do not split into {counts.size} matrices")
            ne0 = sums.size // counts.size
            v = sums.reshape(counts.size, ne0) / np.where(counts > 0, counts, np.float32(1))[:, None]
            v[counts <= 0] = 1  # a matrix never seen: all columns equally important
            values[base] = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
        datasets = list(g.get("imatrix.datasets", []) or [])
        chunks = int(g.get("imatrix.chunk_count", 0) or 0)
    for name, v in values.items():
        if not np.isfinite(v).all():
            raise QuantizeError(f"{path}: imatrix entry {name} holds non-finite values")
    return Imatrix(values, datasets, chunks, path)


@dataclass
class QuantizeResult:
    path: Path
    ftype: str
    tensors: list            # TensorPlan per tensor, output order
    bytes_in: int
    bytes_out: int
    n_elements: int
    seconds: float
    cpu_seconds: float

    def type_counts(self) -> dict:
        c: dict[str, int] = {}
        for p in self.tensors:
            c[_type_name(p.dst_type)] = c.get(_type_name(p.dst_type), 0) + 1
        return c


def quantize_file(src, dst, ftype: str, *, imatrix=None, pure: bool = False,
                  progress=None) -> QuantizeResult:
    """Write `dst`: GGUF `src` quantized to file type `ftype` (a key of FTYPES), its
    metadata copied (general.file_type and quantization_version set as llama.cpp
    does).  `imatrix`: an Imatrix, a path to one, or {tensor name: values}; a
    matrix it has no entry for is quantized without.  `dst` appears only when
    complete (written to a temporary file in its directory, then renamed); `src`
    is never overwritten.  progress(i, n, TensorPlan) is called before each tensor."""
    import gguf

    from .gguf import GGUFFile

    src, dst = Path(src), Path(dst)
    name, file_type, _ = _ftype(ftype)
    if not src.is_file():
        raise QuantizeError(f"{src}: no such file")
    if dst.exists() and (dst.resolve() == src.resolve() or os.path.samefile(src, dst)):
        raise QuantizeError(f"refusing to overwrite the input file {src}")
    if dst.resolve() == src.resolve():
        raise QuantizeError(f"refusing to overwrite the input file {src}")
    if dst.is_dir():
        raise QuantizeError(f"{dst} is a directory")
    if imatrix is not None and not isinstance(imatrix, (Imatrix, dict)):
        imatrix = load_imatrix(imatrix)
    if isinstance(imatrix, dict):
        imatrix = Imatrix({k: np.asarray(v, np.float32).reshape(-1) for k, v in imatrix.items()}, [], 0)
    t0, c0 = time.perf_counter(), time.process_time()
    with GGUFFile(src) as g:
        tensors = plan(g, name, pure=pure, has_imatrix=imatrix is not None)
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent or ".")
        os.close(fd)
        w = None
        try:
            w = gguf.GGUFWriter(tmp, g.arch)
            _copy_metadata(g, w, file_type)
            if imatrix is not None:  # what llama-quantize records about it
                if imatrix.path is not None:
                    w.add_string("quantize.imatrix.file", str(imatrix.path))
                if imatrix.datasets:
                    w.add_string("quantize.imatrix.dataset", str(imatrix.datasets[0]))
                w.add_int32("quantize.imatrix.entries_count", len(imatrix.values))
                w.add_int32("quantize.imatrix.chunks_count", imatrix.chunk_count)
            for p in tensors:
                w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(g, p),
                                  raw_dtype=gguf.GGMLQuantizationType(p.dst_type))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            bytes_in = bytes_out = n_el = 0
            for i, p in enumerate(tensors):
                if progress:
                    progress(i, len(tensors), p)
                ti = g.tensors[p.name]
                if p.dst_type == p.src_type:
                    data = g.raw(p.name)
                else:
                    qw = _imatrix_for(imatrix, ti)
                    data = quantize_rows(_as_float32(g, ti), p.dst_type, qw)
                w.write_tensor_data(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
                bytes_in += ti.nbytes
                bytes_out += data.nbytes
                n_el += ti.n_elements
            w.close()
            umask = os.umask(0)  # mkstemp made it 0600; give it the mode open() would
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, dst)
        except BaseException:
            if w is not None:
                w.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    return QuantizeResult(dst, name, tensors, bytes_in, bytes_out, n_el,
                          time.perf_counter() - t0, time.process_time() - c0)


def _imatrix_for(imatrix, ti):
    """llama.cpp's lookup: by name; a size other than ne0 * ne2 is an error, except
    for token_embd (which imatrix files never fit: quantized without)."""
    if imatrix is None or ti.name not in imatrix.values:
        return None
    v = imatrix.values[ti.name]
    n_mat = ti.dims[2] if len(ti.dims) > 2 else 1
    if v.size != ti.dims[0] * n_mat:
        if ti.name in ("token_embd.weight", "per_layer_token_embd.weight"):
            return None
        raise QuantizeError(f"imatrix size {v.size} is different from tensor size {ti.dims[0] * n_mat} "
                            f"for {ti.name}")
    return v


def _nbytes(g, p: TensorPlan) -> int:
    if p.dst_type == p.src_type:
        return g.tensors[p.name].nbytes
    return p.dst_nbytes


def cli_quantize(args) -> int:
    import sys

    from .cli import CLIError

    def progress(i, n, p):
        if args.verbose:
            print(f"[{i + 1:4d}/{n:4d}] {p.name:36s} {_type_name(p.src_type):>6s} -> "
                  f"{_type_name(p.dst_type)}", file=sys.stderr, flush=True)

    try:
        r = quantize_file(args.input, args.output, args.type, imatrix=args.imatrix, pure=args.pure,
                          progress=progress)
    except QuantizeError as e:
        raise CLIError(str(e)) from None
    mib = 1024 * 1024
    counts = ", ".join(f"{k} {v}" for k, v in sorted(r.type_counts().items()))
    print(f"{r.path}: {r.ftype}, {len(r.tensors)} tensors ({counts}); "
          f"{r.bytes_in / mib:.2f} MiB ({r.bytes_in * 8 / max(1, r.n_elements):.2f} bpw) -> "
          f"{r.bytes_out / mib:.2f} MiB ({r.bytes_out * 8 / max(1, r.n_elements):.2f} bpw) "
          f"in {r.seconds:.1f} s ({r.cpu_seconds:.1f} s CPU)")
    return 0
