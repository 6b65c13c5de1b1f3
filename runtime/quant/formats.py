"""The GGML types this package decodes: ids (ggml's enum ggml_type), names, block
sizes and byte sizes, and the errors for the ones it does not."""

from __future__ import annotations


# ggml's type ids (enum ggml_type); only the ones we decode get a constant.
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1 = 0, 1, 2, 3
GGML_Q5_0, GGML_Q5_1, GGML_Q8_0 = 6, 7, 8
GGML_Q2_K, GGML_Q3_K, GGML_Q4_K, GGML_Q5_K, GGML_Q6_K = 10, 11, 12, 13, 14
GGML_IQ4_NL, GGML_IQ4_XS, GGML_BF16 = 20, 23, 30

QK_K = 256  # weights per k-quant super-block

# type id -> (name, block_size, type_size) for every type we decode
_SUPPORTED = {
    GGML_F32: ("F32", 1, 4),
    GGML_F16: ("F16", 1, 2),
    GGML_BF16: ("BF16", 1, 2),
    GGML_Q4_0: ("Q4_0", 32, 18),
    GGML_Q4_1: ("Q4_1", 32, 20),
    GGML_Q5_0: ("Q5_0", 32, 22),
    GGML_Q5_1: ("Q5_1", 32, 24),
    GGML_Q8_0: ("Q8_0", 32, 34),
    GGML_Q2_K: ("Q2_K", QK_K, 84),
    GGML_Q3_K: ("Q3_K", QK_K, 110),
    GGML_Q4_K: ("Q4_K", QK_K, 144),
    GGML_Q5_K: ("Q5_K", QK_K, 176),
    GGML_Q6_K: ("Q6_K", QK_K, 210),
    GGML_IQ4_NL: ("IQ4_NL", 32, 18),
    GGML_IQ4_XS: ("IQ4_XS", QK_K, 136),
}

# Names of the types we do not decode, so that errors can say what a file holds.
_OTHER_NAMES = {
    4: "Q4_2", 5: "Q4_3", 9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
    18: "IQ3_XXS", 19: "IQ1_S", 21: "IQ3_S", 22: "IQ2_S", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0",
    39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}


class UnsupportedType(ValueError):
    """A ggml tensor type this runtime cannot decode."""


def type_name(type_id: int) -> str:
    t = int(type_id)
    if t in _SUPPORTED:
        return _SUPPORTED[t][0]
    return _OTHER_NAMES.get(t, f"type {t}")


def is_supported(type_id: int) -> bool:
    return int(type_id) in _SUPPORTED


def _traits(type_id: int) -> tuple[str, int, int]:
    t = int(type_id)
    if t not in _SUPPORTED:
        desc = _OTHER_NAMES.get(t)
        desc = f"{desc} (ggml type {t})" if desc else f"unknown ggml type {t}"
        raise UnsupportedType(f"tensor type {desc} is not supported")
    return _SUPPORTED[t]


def block_size(type_id: int) -> int:
    return _traits(type_id)[1]


def type_size(type_id: int) -> int:
    """Bytes per block."""
    return _traits(type_id)[2]


def row_nbytes(type_id: int, n_cols: int) -> int:
    _, bs, ts = _traits(type_id)
    if n_cols % bs:
        raise ValueError(f"row of {n_cols} values is not a multiple of the "
                         f"{type_name(type_id)} block size {bs}")
    return n_cols // bs * ts


# fastmath flags of the float row dots (reassociation lets LLVM vectorise their reductions)
_FM = {"reassoc", "contract", "nsz", "arcp"}
