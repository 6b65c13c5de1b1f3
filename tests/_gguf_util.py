"""Helpers for the GGUF tests: a byte-level GGUF builder (for v2 files and for
files no well-behaved writer would produce) and a walker that lists where the
length, count, type and offset fields of a file sit (for targeted mutation)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

# value type ids
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
        BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}


def gguf_string(s) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def gguf_value(vtype: int, value, item_type: int | None = None) -> bytes:
    """Encode a value *without* its leading type id."""
    if vtype in _FMT:
        return struct.pack(_FMT[vtype], value)
    if vtype == STR:
        return gguf_string(value)
    if vtype == ARR:
        assert item_type is not None
        out = struct.pack("<IQ", item_type, len(value))
        for v in value:
            if item_type == ARR:
                sub_type, sub_items = v
                out += gguf_value(ARR, sub_items, sub_type)
            else:
                out += gguf_value(item_type, v)
        return out
    raise ValueError(vtype)


def build_gguf(kvs=(), tensors=(), *, version=3, alignment=32, data=None,
               n_tensors=None, n_kv=None, magic=b"GGUF") -> bytes:
    """kvs: (key, vtype, value[, item_type]); tensors: (name, dims, type_id,
    rel_offset, nbytes). Data section: `data` bytes if given, else zeros
    covering every tensor."""
    out = bytearray(magic + struct.pack("<I", version))
    out += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors,
                       len(kvs) if n_kv is None else n_kv)
    for kv in kvs:
        key, vtype, value = kv[:3]
        item_type = kv[3] if len(kv) > 3 else None
        out += gguf_string(key) + struct.pack("<I", vtype) + gguf_value(vtype, value, item_type)
    for name, dims, type_id, rel, _ in tensors:
        out += gguf_string(name) + struct.pack("<I", len(dims))
        out += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", type_id, rel)
    out += b"\0" * (-len(out) % alignment)
    if data is None:
        end = max((rel + nb for _, _, _, rel, nb in tensors), default=0)
        data = b"\0" * end
    return bytes(out) + data


def write(path: Path, data: bytes) -> Path:
    Path(path).write_bytes(data)
    return Path(path)


def header_fields(buf: bytes) -> list[tuple[int, int, str]]:
    """(offset, size, kind) of every structural field of a GGUF header, as far
    as the bytes go: kinds 'count', 'len', 'type', 'dim', 'ndims', 'offset'.
    Independent of runtime.gguf so that the fuzz test does not trust the code
    under test to tell it where to aim."""
    fields: list[tuple[int, int, str]] = []
    pos = 8
    try:
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, pos)
        fields += [(8, 8, "count"), (16, 8, "count")]
        pos = 24

        def string():
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            fields.append((pos, 8, "len"))
            pos += 8 + n
            if pos > len(buf):
                raise IndexError

        def value(vtype):
            nonlocal pos
            if vtype in _FMT:
                pos += struct.calcsize(_FMT[vtype])
            elif vtype == STR:
                string()
            elif vtype == ARR:
                (itype,) = struct.unpack_from("<I", buf, pos)
                fields.append((pos, 4, "type"))
                (count,) = struct.unpack_from("<Q", buf, pos + 4)
                fields.append((pos + 4, 8, "len"))
                pos += 12
                if itype in _FMT:
                    pos += count * struct.calcsize(_FMT[itype])
                else:
                    for _ in range(min(count, 10_000_000)):
                        value(itype)
                        if pos > len(buf):
                            raise IndexError
            else:
                raise IndexError

        for _ in range(n_kv):
            string()
            (vtype,) = struct.unpack_from("<I", buf, pos)
            fields.append((pos, 4, "type"))
            pos += 4
            value(vtype)
        for _ in range(n_tensors):
            string()
            (nd,) = struct.unpack_from("<I", buf, pos)
            fields.append((pos, 4, "ndims"))
            pos += 4
            for _ in range(nd):
                fields.append((pos, 8, "dim"))
                pos += 8
            fields.append((pos, 4, "type"))
            fields.append((pos + 4, 8, "offset"))
            pos += 12
    except (struct.error, IndexError):
        pass
    return [f for f in fields if f[0] + f[1] <= len(buf)]


def small_gguf_files(tmp: Path) -> list[bytes]:
    """A few small but complete GGUF files written by gguf.GGUFWriter."""
    import gguf

    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        p = tmp / f"small{i}.gguf"
        w = gguf.GGUFWriter(p, ["llama", "qwen2", "gemma3"][i])
        w.add_block_count(2)
        w.add_context_length(128)
        w.add_uint8("t.u8", 7)
        w.add_int16("t.i16", -3)
        w.add_float32("t.f32", 0.5)
        w.add_float64("t.f64", -2.25)
        w.add_bool("t.bool", True)
        w.add_uint64("t.u64", 1 << 40)
        w.add_string("t.str", "héllo")
        w.add_array("t.strs", ["a", "bc", "", "дж"])
        w.add_array("t.ints", [1, 2, 3])
        w.add_key_value("t.nested", [[1, 2], [3]], gguf.GGUFValueType.ARRAY)
        w.add_tensor("a", rng.standard_normal((4, 32)).astype(np.float32))
        w.add_tensor("b", rng.standard_normal((2, 64)).astype(np.float16))
        q = rng.integers(0, 256, size=(3, 34), dtype=np.uint8)
        w.add_tensor("c", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        out.append(p.read_bytes())
    return out


def header_excerpt(path: Path, *, max_items: int = 200, max_tensors: int = 40) -> bytes:
    """A small GGUF made from the first part of a real file's header: every
    metadata entry (arrays cut to their first `max_items` items) and the first
    `max_tensors` tensor infos with their real names, dims and types.  Tensor
    offsets are packed anew; there is no data section (open it header_only)."""
    from runtime.gguf import GGUFFile

    kvs, tensors = [], []
    with GGUFFile(path) as g:
        for key, value in g.metadata.items():
            vtype = g.value_types[key]
            if vtype == ARR:
                item_type = _array_item_type(value)
                kvs.append((key, ARR, list(value[:max_items]) if item_type != STR else
                            [s.encode("utf-8", "surrogateescape") for s in value[:max_items]],
                            item_type))
            else:
                kvs.append((key, vtype, value.encode("utf-8", "surrogateescape")
                            if isinstance(value, str) else value))
        rel = 0
        for t in list(g.tensors.values())[:max_tensors]:
            tensors.append((t.name, t.dims, t.type_id, rel, t.nbytes))
            rel += -(-t.nbytes // 32) * 32
    return build_gguf(kvs, tensors, data=b"")


def _array_item_type(value) -> int:
    if isinstance(value, list):
        assert all(isinstance(v, str) for v in value), "nested arrays not expected here"
        return STR
    return {np.dtype(np.uint8): U8, np.dtype(np.int8): I8, np.dtype(np.uint16): U16,
            np.dtype(np.int16): I16, np.dtype(np.uint32): U32, np.dtype(np.int32): I32,
            np.dtype(np.float32): F32, np.dtype(np.bool_): BOOL, np.dtype(np.uint64): U64,
            np.dtype(np.int64): I64, np.dtype(np.float64): F64}[value.dtype]
