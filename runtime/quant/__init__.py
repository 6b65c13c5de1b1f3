"""GGML block formats, decoded by numba kernels.

Every weight matrix of a GGUF file is a sequence of rows; every row a sequence of
fixed-size *blocks*, each holding ``block_size`` weights in ``type_size`` bytes
(one or two float16 scales plus packed small integers).  This package decodes
them in compiled code:

* ``dequantize(raw, type_id, shape)`` - float32, bit for bit what
  ``gguf.quants.dequantize`` gives: every kernel below performs the same float32
  operations, in the same order, as gguf-py's numpy code (``d * q``, then ``+ m``;
  ``(d * sc) * q - (dmin * m)`` for the k-quants ...), and numba emits no fused
  multiply-adds unless asked (the decoders are compiled without fastmath).
  f16 fields go through the CPU's conversion (F16C on x86), exact for every
  half; only a signalling NaN comes out quieted, which _dec_f16 undoes for F16
  data and which cannot matter for a scale (its products are NaN either way).
* ``matmul(type_id, W, X, out)`` - ``out = X @ dequant(W).T`` computed from the
  blocks, never materialising the dequantized matrix, by the format's own
  parallel kernels (``kernels(type_id)``: compiled for that format alone, on its
  first use; the engine's compiled code reaches them by address, ``matmul_at``).
  For one activation row (decode) it runs fused per-format row dots: each
  block's integers are dotted with x in float32 and the block scale applied
  once.  For n > 1 rows (batched prefill) each 256-weight chunk of a weight row
  is decoded once into a thread-local buffer (by the same exact decoders) and
  dotted with all n rows.  Either way: float32 within a block / chunk, float64
  across the row.
* ``matvec`` / ``dot`` - the same kernel for one activation vector / one row.
* ``matmul_q8(type_id, W, X, out)`` - the engine's variant, trading exact float
  activations for integer arithmetic as llama.cpp does: one row (decode) is
  rounded to int8 blocks and dotted with vpdpbusd-style u8 x s8 sums; many rows
  (prefill) are rounded to int16 (14 bits per 256 values, 64x finer than
  llama.cpp's int8) and multiplied by int16 weight tiles (vpmaddwd / vpdpwssd).

One module per format family holds its layout (documented next to its decoder:
byte offsets inside one block; all multi-byte fields little-endian; ``f16`` = IEEE
half), its exact decoder, its float row dot, its int8 decode dot and its int16
decoder: ``legacy`` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), ``q2_k``, ``q3_k``, ``q4_k``
(Q4_K and Q5_K), ``q6_k``, ``iq4`` (IQ4_NL, IQ4_XS), ``floats`` (F32, F16, BF16).
``formats`` names the types, ``ir`` holds the vector-IR pieces every format shares,
``activations`` the integer rounding of activations, ``matmuls`` the dispatch, the
parallel kernels and the checked Python API.  This package's namespace is that API.
"""

from __future__ import annotations

__all__ = [
    "UnsupportedType", "type_name", "block_size", "type_size", "row_nbytes",
    "is_supported", "dequantize", "dot", "matvec", "matmul",
    "GGML_F32", "GGML_F16", "GGML_Q4_0", "GGML_Q4_1", "GGML_Q5_0", "GGML_Q5_1",
    "GGML_Q8_0", "GGML_Q2_K", "GGML_Q3_K", "GGML_Q4_K", "GGML_Q5_K", "GGML_Q6_K",
    "GGML_IQ4_NL", "GGML_IQ4_XS", "GGML_BF16",
]

from .formats import (  # noqa: F401
    GGML_BF16, GGML_F16, GGML_F32, GGML_IQ4_NL, GGML_IQ4_XS, GGML_Q2_K, GGML_Q3_K, GGML_Q4_0,
    GGML_Q4_1, GGML_Q4_K, GGML_Q5_0, GGML_Q5_1, GGML_Q5_K, GGML_Q6_K, GGML_Q8_0, QK_K,
    UnsupportedType, _SUPPORTED, block_size, is_supported, row_nbytes, type_name, type_size,
)
from .ir import Q8_MAX_ROWS  # noqa: F401
from .activations import quantize_q8, quantize_x16  # noqa: F401
from .matmuls import (  # noqa: F401
    FUSED_MAX_N, I16_MIN_N, KERNEL_CHUNKED, KERNEL_FUSED, KERNEL_I16, Kernels, SIG_CHUNKED,
    SIG_FUSED, SIG_I16, compile_in_background, compile_kernels, dequantize, dequantize_cached, dot,
    kernel_addresses, kernels, matmul, matmul3_q8_at, matmul_at, matmul_q8, matmul_q8_at, matvec,
    quantize_x16_rows, uncompiled,
)
