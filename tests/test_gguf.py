"""GGUF reading: round trips through gguf.GGUFWriter, agreement with
gguf.GGUFReader and gguf.quants on the real models, speed/memory of opening,
and one test per kind of hostile file."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tracemalloc

import gguf
import numpy as np
import pytest

from runtime import quant
from runtime.gguf import GGUFError, GGUFFile, TensorInfo, ggml_type_name
from _gguf_util import ARR, I8, STR, U8, U32, U64, build_gguf, write

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType


# -- round trips ---------------------------------------------------------------

SCALARS = [  # (key, GGUFValueType, value)
    ("v.u8", VT.UINT8, 255), ("v.i8", VT.INT8, -128), ("v.u16", VT.UINT16, 65535),
    ("v.i16", VT.INT16, -32768), ("v.u32", VT.UINT32, 2**32 - 1), ("v.i32", VT.INT32, -2**31),
    ("v.f32", VT.FLOAT32, 1.5), ("v.bool", VT.BOOL, True), ("v.bool0", VT.BOOL, False),
    ("v.str", VT.STRING, "naïve ☃ 日本"), ("v.empty", VT.STRING, ""),
    ("v.u64", VT.UINT64, 2**64 - 1), ("v.i64", VT.INT64, -2**63), ("v.f64", VT.FLOAT64, -1e300),
]
ARRAYS = [  # (key, item type, values, numpy dtype)
    ("a.u8", VT.UINT8, [0, 1, 255], np.uint8), ("a.i8", VT.INT8, [-128, 0, 127], np.int8),
    ("a.u16", VT.UINT16, [0, 65535], np.uint16), ("a.i16", VT.INT16, [-32768, 5], np.int16),
    ("a.u32", VT.UINT32, [7, 2**32 - 1], np.uint32), ("a.i32", VT.INT32, [-2**31, 3], np.int32),
    ("a.f32", VT.FLOAT32, [0.25, -3.5, 1e30], np.float32),
    ("a.bool", VT.BOOL, [True, False, True], np.bool_),
    ("a.u64", VT.UINT64, [2**64 - 1, 0], np.uint64), ("a.i64", VT.INT64, [-2**63, 1], np.int64),
    ("a.f64", VT.FLOAT64, [1e-300, 2.0], np.float64),
]


@pytest.fixture(scope="module")
def writer_file(tmp_path_factory):
    """A v3 file with every metadata value type and a few tensor types."""
    path = tmp_path_factory.mktemp("w") / "all.gguf"
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(path, "llama")
    for key, vt, v in SCALARS:
        w.add_key_value(key, v, vt)
    for key, it, vals, _ in ARRAYS:
        w.add_key_value(key, vals, VT.ARRAY, sub_type=it)
    w.add_array("a.str", ["", "x", "ünï", "<|im_end|>"])
    w.add_key_value("a.nested", [[1, 2, 3], [4], [5, 6]], VT.ARRAY)
    w.add_key_value("a.nested_str", [["a", "b"], ["c"]], VT.ARRAY)
    tensors = {
        "f32": rng.standard_normal((3, 5, 8)).astype(np.float32),
        "f16": rng.standard_normal((4, 16)).astype(np.float16),
        "vec": rng.standard_normal(7).astype(np.float32),
    }
    for name, t in tensors.items():
        w.add_tensor(name, t)
    q8 = rng.integers(0, 256, size=(5, 2 * 34), dtype=np.uint8)  # 5 rows of 64 elements
    w.add_tensor("q8", q8, raw_dtype=QT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tensors["q8"] = q8
    return path, tensors


def _check_all_types(g: GGUFFile, tensors) -> None:
    for key, vt, v in SCALARS:
        assert g.metadata[key] == v and type(g.metadata[key]) is type(v), key
        assert g.value_types[key] == vt
    for key, it, vals, dtype in ARRAYS:
        arr = g.metadata[key]
        assert isinstance(arr, np.ndarray) and arr.dtype == dtype, key
        assert np.array_equal(arr, np.array(vals, dtype=dtype)), key
    assert g.metadata["a.str"] == ["", "x", "ünï", "<|im_end|>"]
    nested = g.metadata["a.nested"]
    assert [x.tolist() for x in nested] == [[1, 2, 3], [4], [5, 6]]
    assert g.metadata["a.nested_str"] == [["a", "b"], ["c"]]
    assert g.arch == "llama" and g.get("general.architecture") == "llama"
    assert list(g.tensors) == ["f32", "f16", "vec", "q8"]  # file order

    t = g.tensors["f32"]
    assert isinstance(t, TensorInfo)
    assert t.dims == (8, 5, 3) and t.shape == (3, 5, 8) and t.type_name == "F32"
    assert t.n_elements == 120 and t.nbytes == 480 and t.offset % g.alignment == 0
    for name in ("f32", "f16", "vec"):
        ref = tensors[name]
        raw = g.raw(name)
        assert raw.dtype == np.uint8
        assert raw.shape == (max(1, ref.size // ref.shape[-1]), ref.shape[-1] * ref.itemsize)
        assert np.array_equal(raw.reshape(-1), ref.reshape(-1).view(np.uint8))
    q = g.tensors["q8"]
    assert q.type_name == "Q8_0" and q.dims == (64, 5) and q.shape == (5, 64) and q.nbytes == 5 * 68
    assert np.array_equal(g.raw("q8"), tensors["q8"])


def test_roundtrip_every_value_type_v3(writer_file):
    path, tensors = writer_file
    with GGUFFile(path) as g:
        assert g.version == 3 and g.alignment == 32
        _check_all_types(g, tensors)


def test_roundtrip_v2_by_patching_version(writer_file, tmp_path):
    # v2 and v3 share the layout for little-endian files; only the number differs.
    path, tensors = writer_file
    data = bytearray(path.read_bytes())
    assert struct.unpack_from("<I", data, 4)[0] == 3
    struct.pack_into("<I", data, 4, 2)
    p2 = write(tmp_path / "v2.gguf", bytes(data))
    with GGUFFile(p2) as g:
        assert g.version == 2
        _check_all_types(g, tensors)


def test_v2_built_by_hand(tmp_path):
    kvs = [("general.architecture", STR, "llama"), ("x", U32, 5),
           ("toks", ARR, ["a", "b"], STR)]
    data = np.arange(8, dtype=np.float32).tobytes()
    p = write(tmp_path / "h.gguf", build_gguf(kvs, [("w", (4, 2), 0, 0, 32)], version=2, data=data))
    with GGUFFile(p) as g:
        assert g.version == 2 and g.get("x") == 5
        assert g.get("toks") == ["a", "b"]
        assert np.array_equal(g.raw("w").view(np.float32), np.arange(8, dtype=np.float32).reshape(2, 4))


def test_empty_and_nested_arrays(tmp_path):
    kvs = [("e.u32", ARR, [], U32), ("e.str", ARR, [], STR),
           ("n", ARR, [(U8, [1, 2]), (STR, ["x"]), (ARR, [(I8, [-1])])], ARR)]
    p = write(tmp_path / "n.gguf", build_gguf(kvs))
    with GGUFFile(p) as g:
        assert isinstance(g.get("e.u32"), np.ndarray) and g.get("e.u32").size == 0
        assert g.get("e.str") == []
        n = g.get("n")
        assert n[0].tolist() == [1, 2] and n[1] == ["x"] and n[2][0].tolist() == [-1]
        assert g.tensors == {}


def test_custom_alignment(tmp_path):
    p = tmp_path / "al.gguf"
    w = gguf.GGUFWriter(p, "llama")
    w.add_custom_alignment(128)
    w.add_tensor("a", np.ones(3, np.float32))
    w.add_tensor("b", np.full(5, 2, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(p) as g:
        assert g.alignment == 128 and g.data_offset % 128 == 0
        assert all(t.offset % 128 == 0 for t in g.tensors.values())
        assert np.array_equal(g.raw("b").view(np.float32)[0], np.full(5, 2, np.float32))


def test_invalid_utf8_value_kept_losslessly(tmp_path):
    raw = b"\xff\xfeab"
    kvs = [("toks", ARR, [b"ok", raw], STR), ("s", STR, raw)]
    p = write(tmp_path / "u.gguf", build_gguf(kvs))
    with GGUFFile(p) as g:
        assert g.get("toks")[1].encode("utf-8", "surrogateescape") == raw
        assert g.get("s").encode("utf-8", "surrogateescape") == raw


def test_raw_is_zero_copy_and_close(writer_file):
    path, _ = writer_file
    g = GGUFFile(path)
    r = g.raw("f32")
    assert not r.flags.owndata and not r.flags.writeable
    g.close()
    with pytest.raises(GGUFError, match="closed"):
        g.raw("f32")
    assert r.sum() is not None  # a view taken before close stays valid
    with pytest.raises(GGUFError, match="no tensor named"):
        GGUFFile(path).raw("nope")


def test_header_only_accepts_partial_file(writer_file, tmp_path):
    path, _ = writer_file
    with GGUFFile(path) as g:
        cut = g.tensors["q8"].offset + 10  # q8 is last: its data is cut short
        last_ok = "vec"
    p = write(tmp_path / "partial.gguf", path.read_bytes()[:cut])
    with pytest.raises(GGUFError, match="'q8'.*outside the file"):
        GGUFFile(p)
    with GGUFFile(p, header_only=True) as g:
        assert set(g.tensors) == {"f32", "f16", "vec", "q8"}
        g.raw(last_ok)
        with pytest.raises(GGUFError, match="'q8'.*not in the file"):
            g.raw("q8")


def test_dequantize_writer_tensors(writer_file):
    path, tensors = writer_file
    with GGUFFile(path) as g:
        for name in ("f32", "f16", "vec"):
            out = g.dequantize(name)
            assert out.dtype == np.float32
            assert np.array_equal(out, tensors[name].astype(np.float32))
        ref = gguf.quants.dequantize(tensors["q8"], QT.Q8_0)
        assert np.array_equal(g.dequantize("q8"), ref, equal_nan=True)


def test_dequantize_unsupported_type_names_tensor_and_type(tmp_path):
    t = QT.IQ2_XXS  # known to ggml, not decoded by this runtime
    assert not quant.is_supported(int(t))
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    tensors = [("blk.0.ffn_up.weight", (bs, 2), int(t), 0, 2 * ts)]
    p = write(tmp_path / "iq.gguf", build_gguf([], tensors))
    with GGUFFile(p) as g:
        assert g.tensors["blk.0.ffn_up.weight"].type_name == "IQ2_XXS"
        with pytest.raises(GGUFError, match=r"blk\.0\.ffn_up\.weight.*IQ2_XXS"):
            g.dequantize("blk.0.ffn_up.weight")


def test_type_layouts_agree_with_quant():
    # The reader sizes tensors from the gguf package's table; the decoder has its own.
    for t, (bs, ts) in gguf.GGML_QUANT_SIZES.items():
        assert ggml_type_name(int(t)) == t.name
        if quant.is_supported(int(t)):
            assert (quant.block_size(int(t)), quant.type_size(int(t))) == (bs, ts), t.name
            assert quant.type_name(int(t)) == t.name
    assert sum(quant.is_supported(int(t)) for t in gguf.GGML_QUANT_SIZES) == 15


# -- the real models -----------------------------------------------------------

@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request, smollm2_path, gemma3_path):
    path = smollm2_path if request.param == "smollm2" else gemma3_path
    return path, gguf.GGUFReader(path)


def test_real_metadata_and_tensors_match_gguf_reader(real):
    path, reader = real
    with GGUFFile(path) as g:
        fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        assert list(g.metadata) == list(fields)
        for key, f in fields.items():
            ours, ref = g.metadata[key], f.contents()
            assert g.value_types[key] == f.types[0], key
            if isinstance(ours, np.ndarray):
                assert ours.tolist() == ref, key
            else:
                assert ours == ref, key
        assert g.alignment == reader.alignment and g.data_offset == reader.data_offset
        assert list(g.tensors) == [t.name for t in reader.tensors]
        for rt in reader.tensors:
            t = g.tensors[rt.name]
            assert t.dims == tuple(int(d) for d in rt.shape)
            assert (t.type_id, t.offset, t.nbytes, t.n_elements) == (
                int(rt.tensor_type), rt.data_offset, rt.n_bytes, rt.n_elements)
            assert np.array_equal(g.raw(rt.name).reshape(-1), rt.data.reshape(-1).view(np.uint8))


def test_real_dequantize_matches_gguf_quants(real):
    path, reader = real
    with GGUFFile(path) as g:
        for rt in reader.tensors:
            ref = gguf.quants.dequantize(rt.data, rt.tensor_type).astype(np.float32, copy=False)
            ours = g.dequantize(rt.name)
            assert ours.shape == ref.shape == g.tensors[rt.name].shape, rt.name
            assert ours.dtype == np.float32
            assert np.array_equal(ours, ref), rt.name
            del ref, ours  # the Gemma embedding is 670 MB per copy


_OPEN_PROBE = r"""
import json, sys, time
import numpy, gguf.constants, runtime.gguf
def rss():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
r0 = rss(); t0 = time.perf_counter()
g = runtime.gguf.GGUFFile(sys.argv[1])
t = time.perf_counter() - t0
n_tokens = len(g.metadata["tokenizer.ggml.tokens"])
print(json.dumps({"seconds": t, "rss_growth": rss() - r0, "n_tokens": n_tokens}))
"""


def test_open_gemma_fast_and_small(gemma3_path):
    # A fresh process, so that earlier tests' allocations do not blur the number.
    r = subprocess.run([sys.executable, "-c", _OPEN_PROBE, str(gemma3_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    print(f"\nopen {gemma3_path.name}: {m['seconds'] * 1000:.0f} ms, "
          f"RSS +{m['rss_growth'] / 2**20:.1f} MiB, {m['n_tokens']} tokens")
    assert m["n_tokens"] == 262144
    assert m["rss_growth"] < 64 * 2**20


# -- hostile files: each gives GGUFError saying what and where -------------------

def _valid_parts():
    kvs = [("general.architecture", STR, "llama"), ("toks", ARR, ["a", "b", "c"], STR)]
    tensors = [("w", (32, 2), 0, 0, 256), ("v", (32,), 0, 256, 128)]
    return kvs, tensors


def _open(tmp_path, data: bytes, **kw):
    p = write(tmp_path / "bad.gguf", data)
    g = GGUFFile(p, **kw)
    g.close()
    return g


def test_valid_parts_are_valid(tmp_path):
    kvs, tensors = _valid_parts()
    g = _open(tmp_path, build_gguf(kvs, tensors))
    assert list(g.tensors) == ["w", "v"] and g.get("toks") == ["a", "b", "c"]


def test_wrong_magic(tmp_path):
    with pytest.raises(GGUFError, match=r"not a GGUF file.*GGUX.*offset 0x0"):
        _open(tmp_path, build_gguf(*_valid_parts(), magic=b"GGUX"))


def test_not_gguf_at_all(tmp_path):
    with pytest.raises(GGUFError, match="not a GGUF file"):
        _open(tmp_path, b"\x7fELF" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        _open(tmp_path, b"GG")


@pytest.mark.parametrize("version", [1, 4, 0xFFFFFFFF])
def test_unsupported_version(tmp_path, version):
    with pytest.raises(GGUFError, match=f"unsupported GGUF version {version}.*offset 0x4"):
        _open(tmp_path, build_gguf(*_valid_parts(), version=version))


def test_big_endian_rejected(tmp_path):
    with pytest.raises(GGUFError, match="big-endian"):
        _open(tmp_path, build_gguf(*_valid_parts(), version=0x03000000))


def test_empty_file(tmp_path):
    with pytest.raises(GGUFError, match="empty"):
        _open(tmp_path, b"")


def test_truncated_header_everywhere(tmp_path):
    data = build_gguf(*_valid_parts())
    header_end = len(data) - 384
    for cut in range(4, header_end - 31, 7):  # every cut inside the header fails cleanly
        with pytest.raises(GGUFError, match="truncated|past the end|outside the file"):
            _open(tmp_path, data[:cut])
    with pytest.raises(GGUFError, match=r"truncated header: tensor count.*offset 0x8"):
        _open(tmp_path, data[:12])


def test_string_length_beyond_file(tmp_path):
    data = bytearray(build_gguf(*_valid_parts()))
    struct.pack_into("<Q", data, 24, 2**62)  # length of the first key
    with pytest.raises(GGUFError, match=r"key of metadata entry 0: string length 4611686018427387904 "
                                        r"runs past the end.*offset 0x18"):
        _open(tmp_path, bytes(data))


def test_string_array_item_length_beyond_file(tmp_path):
    kvs = [("toks", ARR, ["a", "b"], STR)]
    data = bytearray(build_gguf(kvs))
    pos = data.index(b"\x01\x00\x00\x00\x00\x00\x00\x00b")  # length prefix of "b"
    struct.pack_into("<Q", data, pos, 10**12)
    with pytest.raises(GGUFError, match=r"'toks'\[1\]: string length 1000000000000 runs past"):
        _open(tmp_path, bytes(data))


@pytest.mark.parametrize("item_type", [U8, U64, STR, ARR])
def test_array_length_beyond_file(tmp_path, item_type):
    data = bytearray(build_gguf([("arr", ARR, [], item_type)]))
    pos = data.index(b"arr") + 3 + 4 + 4  # key, value type, item type -> count
    struct.pack_into("<Q", data, pos, 2**64 - 1)
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match=r"'arr': array length 18446744073709551615 runs past"):
            _open(tmp_path, bytes(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # nothing sized by the bogus count was allocated


def test_absurd_kv_count(tmp_path):
    with pytest.raises(GGUFError, match=r"absurd metadata key/value count 1000000000"):
        _open(tmp_path, build_gguf(*_valid_parts(), n_kv=10**9))


def test_absurd_tensor_count(tmp_path):
    with pytest.raises(GGUFError, match=r"absurd tensor count 18446744073709551615"):
        _open(tmp_path, build_gguf(*_valid_parts(), n_tensors=2**64 - 1))


def test_tensor_data_outside_file(tmp_path):
    kvs, _ = _valid_parts()
    tensors = [("w", (32, 2), 0, 0, 256), ("far", (32,), 0, 2**40, 128)]
    data = build_gguf(kvs, tensors, data=bytes(512))
    with pytest.raises(GGUFError, match=r"tensor 'far' data .* lies outside the file"):
        _open(tmp_path, data)


def test_tensor_data_overlapping(tmp_path):
    kvs, _ = _valid_parts()
    tensors = [("w", (32, 2), 0, 0, 256), ("v", (32,), 0, 224, 128)]
    with pytest.raises(GGUFError, match=r"tensor 'v' .* overlaps tensor 'w'"):
        _open(tmp_path, build_gguf(kvs, tensors))


@pytest.mark.parametrize("type_id", [4, 5, 31, 99, 2**32 - 1])
def test_unknown_type_id(tmp_path, type_id):
    tensors = [("w", (32, 2), type_id, 0, 256)]
    with pytest.raises(GGUFError, match=f"tensor 'w': unknown ggml type id {type_id}"):
        _open(tmp_path, build_gguf([], tensors))


def test_dims_product_overflow(tmp_path):
    tensors = [("w", (2**32, 2**32, 4), 0, 0, 0)]
    with pytest.raises(GGUFError, match=r"tensor 'w': dims .* overflow"):
        _open(tmp_path, build_gguf([], tensors, data=bytes(64)))


@pytest.mark.parametrize("dim", [0, 2**63, 2**64 - 1])
def test_zero_or_negative_dim(tmp_path, dim):
    tensors = [("w", (32, dim), 0, 0, 0)]
    with pytest.raises(GGUFError, match=r"tensor 'w': zero or negative dimension"):
        _open(tmp_path, build_gguf([], tensors, data=bytes(64)))


@pytest.mark.parametrize("n_dims", [0, 5, 2**31])
def test_bad_number_of_dims(tmp_path, n_dims):
    data = bytearray(build_gguf([], [("w", (32,), 0, 0, 128)]))
    struct.pack_into("<I", data, 24 + 8 + 1, n_dims)
    with pytest.raises(GGUFError, match=rf"tensor 'w': {n_dims} dimensions \(must be 1..4\)"):
        _open(tmp_path, bytes(data))


def test_row_not_multiple_of_block(tmp_path):
    tensors = [("q", (48, 2), int(QT.Q4_0), 0, 64)]
    with pytest.raises(GGUFError, match=r"tensor 'q': row length 48 is not a multiple "
                                        r"of the Q4_0 block size 32"):
        _open(tmp_path, build_gguf([], tensors))


def test_misaligned_tensor_offset(tmp_path):
    tensors = [("w", (32,), 0, 0, 128), ("v", (8,), 0, 136, 32)]
    with pytest.raises(GGUFError, match=r"tensor 'v': data offset 136 is misaligned \(alignment 32\)"):
        _open(tmp_path, build_gguf([], tensors))


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_bad_alignment_value(tmp_path, alignment):
    kvs = [("general.alignment", U32, alignment)]
    with pytest.raises(GGUFError, match="general.alignment must be a power-of-two uint32"):
        _open(tmp_path, build_gguf(kvs))


def test_alignment_wrong_type(tmp_path):
    with pytest.raises(GGUFError, match="general.alignment"):
        _open(tmp_path, build_gguf([("general.alignment", U64, 32)]))


def test_duplicated_tensor_name(tmp_path):
    tensors = [("w", (32,), 0, 0, 128), ("w", (32,), 0, 128, 128)]
    with pytest.raises(GGUFError, match="duplicated tensor name 'w'"):
        _open(tmp_path, build_gguf([], tensors))


def test_duplicated_key(tmp_path):
    kvs = [("a.b", U32, 1), ("a.b", STR, "x")]
    with pytest.raises(GGUFError, match=r"duplicated metadata key 'a.b' at offset 0x"):
        _open(tmp_path, build_gguf(kvs))


def test_unknown_value_type(tmp_path):
    data = bytearray(build_gguf([("k", U32, 1)]))
    struct.pack_into("<I", data, 24 + 8 + 1, 13)
    with pytest.raises(GGUFError, match=r"metadata 'k': unknown value type 13"):
        _open(tmp_path, bytes(data))


def test_unknown_array_item_type(tmp_path):
    data = bytearray(build_gguf([("k", ARR, [1], U32)]))
    struct.pack_into("<I", data, 24 + 8 + 1 + 4, 99)
    with pytest.raises(GGUFError, match=r"'k': unknown array item type 99"):
        _open(tmp_path, bytes(data))


def test_arrays_nested_too_deep(tmp_path):
    value = (U8, [1])
    for _ in range(20):
        value = (ARR, [value])
    with pytest.raises(GGUFError, match="nested deeper than"):
        _open(tmp_path, build_gguf([("deep", ARR, value[1], ARR)]))


def test_invalid_utf8_key_and_tensor_name(tmp_path):
    with pytest.raises(GGUFError, match="key of metadata entry 0: invalid UTF-8"):
        _open(tmp_path, build_gguf([(b"\xc3\x28", U8, 1)]))
    with pytest.raises(GGUFError, match="name of tensor 0: invalid UTF-8"):
        _open(tmp_path, build_gguf([], [(b"\xff", (32,), 0, 0, 128)]))


def test_missing_architecture(tmp_path):
    g = _open(tmp_path, build_gguf([("x", U8, 1)]))
    with pytest.raises(GGUFError, match="general.architecture"):
        g.arch


def test_directory_and_fifo_and_missing(tmp_path):
    with pytest.raises(GGUFError, match="is a directory"):
        GGUFFile(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(GGUFError, match="not a regular file"):
        GGUFFile(fifo)  # must not block waiting for a writer
    with pytest.raises(FileNotFoundError):
        GGUFFile(tmp_path / "missing.gguf")


def test_gguf_error_is_the_one_public_exception():
    assert issubclass(GGUFError, ValueError)
    import runtime

    assert runtime.GGUFError is GGUFError and runtime.GGUFFile is GGUFFile
