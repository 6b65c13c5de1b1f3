"""Hostile models and prompts: every input here came from a stranger's file or command
line, and each must end in one clear error (or a correct result), never memory
corruption, a hang, an unbounded allocation or a traceback."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gguf as gguf_py

from runtime import arch
from runtime.gguf import GGUFError, GGUFFile
from runtime.model import Model
from _oracle import ROOT
from make_synthetic import default_spec, write_synthetic

U32 = gguf_py.GGUFValueType.UINT32
F32 = gguf_py.GGUFValueType.FLOAT32


def _cli(*args, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def _one_line_error(r, *needles):
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _tiny(tmp_path, name="m", spec=None, **metadata) -> Path:
    """A 2-layer llama (d 256, 8 heads of 32, vocab 512) with header values replaced:
    metadata keys use '__' for '.' after the architecture ('rope__dimension_count')."""
    md = {"." + k.replace("__", "."): v for k, v in metadata.items()}
    return write_synthetic(tmp_path / f"{name}.gguf", spec or default_spec("llama"), metadata=md)


def _patch_u32(src: Path, dst: Path, key: str, value: int) -> Path:
    """Copy src with the u32 value of `key` replaced in place (the issue's reproduction)."""
    data = bytearray(src.read_bytes())
    k = key.encode()
    i = data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    assert struct.unpack_from("<I", data, i)[0] == 4, "not a u32 value"
    struct.pack_into("<I", data, i + 4, value)
    dst.write_bytes(bytes(data))
    return dst


# --------------------------------------------------------------------------
# 1. Memory corruption: the rotary width was never checked against the head size


@pytest.mark.parametrize("n_rot", [128, 100000, 66])
def test_rope_dimension_larger_than_head_refused(tmp_path, smollm2_path, n_rot):
    bad = _patch_u32(smollm2_path, tmp_path / "rope.gguf", "llama.rope.dimension_count", n_rot)
    with pytest.raises(ValueError, match="rope.dimension_count"):
        Model.load(bad, n_ctx=64)
    _one_line_error(_cli("generate", bad, "-p", "hi", "-n", 4), "rope.dimension_count")


def test_odd_rope_dimension_refused(tmp_path):
    with pytest.raises(ValueError, match="rope.dimension_count.*even"):
        Model.load(_tiny(tmp_path, rope__dimension_count=(31, U32)), n_ctx=16)


def test_rope_kernel_checks_its_own_bounds():
    from runtime import ops

    x = np.zeros((2, 2 * 8), np.float32)
    cs = ops.rope_table(np.arange(2), ops.rope_inv_freq(16, 10000.0))  # 8 pairs for heads of 8
    with pytest.raises(ValueError, match="rope"):
        ops.rope_rotate(x, 2, 8, cs, True)


# --------------------------------------------------------------------------
# 2. Hyperparameters: bounds, consistency, types


def test_huge_block_count_is_refused_at_once(tmp_path, smollm2_path):
    bad = _patch_u32(smollm2_path, tmp_path / "layers.gguf", "llama.block_count", 0xFFFFFFFF)
    with pytest.raises(ValueError, match="block_count"):
        Model.load(bad, n_ctx=64)
    for cmd in (("generate", bad, "-p", "hi", "-n", 2), ("plan", bad, "--vram", "4GiB")):
        _one_line_error(_cli(*cmd, timeout=60), "block_count")


def test_block_count_beyond_the_tensors_refused(tmp_path):
    with pytest.raises(ValueError, match="block_count = 3, but the file has tensors for 2 layers"):
        Model.load(_tiny(tmp_path, block_count=(3, U32)), n_ctx=16)


@pytest.mark.parametrize("key,value,match", [
    ("attention__head_count", (0, U32), "head_count"),
    ("attention__head_count_kv", (0, U32), "head_count_kv"),
    ("attention__head_count_kv", (3, U32), "head_count_kv"),           # 8 heads do not split in 3
    ("attention__head_count_kv", (16, U32), "head_count_kv"),          # more KV than query heads
    ("embedding_length", (0, U32), "embedding_length"),
    ("embedding_length", (512, U32), "token_embd"),                     # disagrees with the tensors
    ("embedding_length", ([256, 256], None), "embedding_length"),
    ("attention__layer_norm_rms_epsilon", ([1e-5, 1e-5], None), "layer_norm_rms_epsilon"),
    ("attention__layer_norm_rms_epsilon", (math.nan, F32), "layer_norm_rms_epsilon"),
    ("attention__layer_norm_rms_epsilon", (math.inf, F32), "layer_norm_rms_epsilon"),
    ("attention__layer_norm_rms_epsilon", (-1e-5, F32), "layer_norm_rms_epsilon"),
    ("attention__layer_norm_rms_epsilon", (0.0, F32), "layer_norm_rms_epsilon"),
    ("rope__freq_base", (math.nan, F32), "rope.freq_base"),
    ("rope__freq_base", (0.0, F32), "rope.freq_base"),
    ("attention__key_length", (4096, U32), "key_length"),
    ("attention__key_length", (64, U32), "attn_q.weight"),              # rows disagree
    ("feed_forward_length", (0, U32), "feed_forward_length"),
    ("feed_forward_length", ([512, 512, 512], None), "feed_forward_length"),  # 3 values, 2 layers
    ("context_length", ("long", None), "context_length"),
    ("rope__scaling__type", ("yarn", None), "rope.scaling.type"),
    ("vocab_size", (1000, U32), "vocab_size"),
])
def test_bad_hyperparameter_refused_naming_the_key(tmp_path, key, value, match):
    path = _tiny(tmp_path, **{key: value if value[1] is not None else value[0]})
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        Model.load(path, n_ctx=16)


def test_cli_turns_a_bad_hyperparameter_into_one_line(tmp_path):
    path = _tiny(tmp_path, attention__head_count=(0, U32))
    _one_line_error(_cli("generate", path, "-p", "hi", "-n", 2), "head_count")
    _one_line_error(_cli("plan", path, "--vram", "4GiB"), "head_count")
    r = _cli("info", path)  # info describes the file, and says what is wrong with it
    assert r.returncode == 0 and "PROBLEM" in r.stdout and "head_count" in r.stdout, r.stdout + r.stderr


def test_tokenizer_and_embedding_disagree(tmp_path):
    spec = default_spec("llama")
    path = _tiny(tmp_path, spec=spec)
    g = GGUFFile(path)
    toks = list(g.get("tokenizer.ggml.tokens"))[:300]
    bad = write_synthetic(tmp_path / "vocab.gguf", spec, metadata={"tokenizer.ggml.tokens": toks})
    with pytest.raises(ValueError, match="300 tokens"):
        Model.load(bad, n_ctx=16)


def test_per_layer_arrays_where_llama_cpp_reads_them(tmp_path):
    """llama.cpp reads head_count, head_count_kv and feed_forward_length as one value or
    one per layer: uniform arrays compute as the scalar does; per-layer KV or query
    head counts that differ are refused by the engine, naming the key (the planner
    sizes them)."""
    ids = [5, 9, 300, 42, 7]
    ref = Model.load(_tiny(tmp_path, "scalar"), n_ctx=16).logits(ids)
    arr = _tiny(tmp_path, "arrays", attention__head_count=([8, 8], None),
                attention__head_count_kv=([8, 8], None), feed_forward_length=([512, 512], None))
    np.testing.assert_array_equal(Model.load(arr, n_ctx=16).logits(ids), ref)
    mixed = _tiny(tmp_path, "mixed", attention__head_count_kv=([8, 4], None))
    with pytest.raises(ValueError, match="head_count_kv.*per-layer"):
        Model.load(mixed, n_ctx=16)
    from runtime import memory

    a = memory.arch_from_gguf(GGUFFile(mixed, header_only=True))
    assert a.n_kv_heads_per_layer == (8, 4)


# --------------------------------------------------------------------------
# The fuzz test, on hyperparameter values (test_gguf_fuzz mutates the structure)

_KEYS = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
         "attention.head_count_kv", "attention.key_length", "attention.value_length",
         "rope.dimension_count", "attention.layer_norm_rms_epsilon", "rope.freq_base",
         "context_length", "rope.scaling.factor", "attention.sliding_window"]
_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 7, 16, 31, 32, 33, 64, 255, 256, 257, 512, 4096, 2**31 - 1,
                     2**32 - 1]).map(lambda v: (v, U32)),
    st.integers(-(2**31), -1).map(lambda v: (v, gguf_py.GGUFValueType.INT32)),
    st.sampled_from([0.0, -1.0, 1e-30, 1e30, math.nan, math.inf, -math.inf]).map(lambda v: (v, F32)),
    st.lists(st.integers(0, 600), min_size=1, max_size=4).map(lambda v: (v, None)),
    st.just(("x", None)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(_KEYS), value=_VALUES)
def test_fuzz_hyperparameter_values(tmp_path_factory, key, value):
    """Any value at any key: a clear ValueError / GGUFError, or a model that computes
    finite logits; never a crash (a corrupted heap would take the test run with it)."""
    path = tmp_path_factory.mktemp("fuzz") / "m.gguf"
    v, t = value
    write_synthetic(path, default_spec("llama"), metadata={f".{key}": v if t is None else (v, t)})
    try:
        m = Model.load(path, n_ctx=16)
    except (ValueError, GGUFError):
        return
    logits = m.logits([1, 2, 3])
    assert np.isfinite(logits).all()


def test_arch_table_drives_rope_style_and_biases():
    assert arch.FAMILIES["qwen2"].qkv_bias and arch.FAMILIES["qwen3"].qk_norm
    assert arch.rope_style("llama") == "normal" and arch.rope_style("qwen2") == "neox"
    assert arch.rope_style("gemma3") == "neox" and not arch.FAMILIES["gemma3"].runs
