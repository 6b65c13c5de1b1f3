"""Memory-mapped GGUF reader that validates everything it reads.

GGUF files come from strangers, so every length, count, offset and type id in
the header is checked against the file before it is trusted: a bad file gives
one ``GGUFError`` that says what is wrong and where (byte offset, key or tensor
name), never an IndexError, struct.error, UnicodeDecodeError or a huge
allocation.  Tensor data is never read at open time: ``raw()`` returns
zero-copy views of the mapping.

Layout (GGUF v2/v3, little-endian)::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv      x  (string key, u32 value_type, value)
    n_tensors x  (string name, u32 n_dims, u64 dims[n_dims], u32 type, u64 offset)
    padding to general.alignment (default 32), then the tensor data section;
    tensor offsets are relative to the start of that section.

A string is ``u64 length`` + UTF-8 bytes; an array is ``u32 item_type``,
``u64 count`` and the items (arrays may nest).

What opening a file may cost is bounded by the file and absolutely, whatever
sizes the header declares:

* every count is checked against the bytes left before anything is allocated
  (each tensor info takes at least 32 bytes, each key/value 13, each array
  item its own minimum size), so the work is linear in the header's bytes;
* the memory the parsed header takes (Python objects and array copies) is
  metered while it is parsed and may not exceed ``MAX_HEADER_MEMORY``
  (1 GiB): a 1 TiB sparse file declaring a 1 TiB array is refused before
  the array is allocated.  Each value takes a small multiple of its bytes in
  the file (at most about 10x; a tensor info about 15x while it is parsed);
* absolute caps on what no real model comes near: ``MAX_TENSORS`` and
  ``MAX_KV`` (65536 each; models have hundreds to a few thousand tensors and
  tens of keys), ``MAX_ARRAY_STRINGS`` (2M strings inside arrays in all; the
  largest vocabularies with their merges have under 1M) and
  ``MAX_NESTED_ARRAYS`` (65536 arrays inside arrays in all; real models use
  flat arrays).  Each nested array is a Python object of its own, so without
  that cap 10M empty nested arrays (120 MB) would take gigabytes and seconds.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["GGUFError", "GGUFFile", "TensorInfo", "GGUFValueType", "ggml_type_name"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4            # GGML_MAX_DIMS: ggml tensors have at most 4 dimensions
MAX_ARRAY_NESTING = 8   # deeper nesting is certainly hostile (and would recurse)
_INT64_MAX = (1 << 63) - 1

# Absolute bounds on what a header may make us build (see the module docstring).
MAX_HEADER_MEMORY = 1 << 30     # bytes the parsed header may take, estimated as it is parsed
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_ARRAY_STRINGS = 1 << 21     # strings inside arrays, all arrays together
MAX_NESTED_ARRAYS = 1 << 16     # arrays inside arrays, all together

# Smallest encodings, which bound every declared count by the bytes left: a
# key/value is key length + type + a 1-byte value; a tensor info is name
# length + n_dims + one dim + type + offset.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8

# Memory estimates charged to the meter (CPython 3.11, 64-bit; measured with
# tracemalloc and rounded up).  A str takes at most 4 bytes per UTF-8 byte (a
# UCS-4 string whose other characters are undecodable bytes).
_STR_COST = 80            # str object header
_STR_BYTE_COST = 4
_NDARRAY_COST = 128       # ndarray object, without its data
_LIST_COST = 64           # list object, plus 8 bytes per item
_KV_COST = 256            # two dict entries and a scalar value
_TENSOR_INFO_COST = 512   # TensorInfo with its tuples, plus the dict entry


class GGUFError(ValueError):
    """A file that is not a valid GGUF file, with what is wrong and where."""


class GGUFValueType:
    """Metadata value type ids (the ``gguf_type`` enum of the format)."""

    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL = range(8)
    STRING, ARRAY, UINT64, INT64, FLOAT64 = 8, 9, 10, 11, 12

    NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32",
             5: "INT32", 6: "FLOAT32", 7: "BOOL", 8: "STRING", 9: "ARRAY",
             10: "UINT64", 11: "INT64", 12: "FLOAT64"}


# Fixed-size scalar types: struct format and numpy dtype (explicitly little-endian).
_SCALARS = {
    GGUFValueType.UINT8: ("<B", np.dtype("<u1")),
    GGUFValueType.INT8: ("<b", np.dtype("<i1")),
    GGUFValueType.UINT16: ("<H", np.dtype("<u2")),
    GGUFValueType.INT16: ("<h", np.dtype("<i2")),
    GGUFValueType.UINT32: ("<I", np.dtype("<u4")),
    GGUFValueType.INT32: ("<i", np.dtype("<i4")),
    GGUFValueType.FLOAT32: ("<f", np.dtype("<f4")),
    GGUFValueType.BOOL: ("<B", np.dtype("<u1")),
    GGUFValueType.UINT64: ("<Q", np.dtype("<u8")),
    GGUFValueType.INT64: ("<q", np.dtype("<i8")),
    GGUFValueType.FLOAT64: ("<d", np.dtype("<f8")),
}
_SCALAR_STRUCTS = {t: struct.Struct(fmt) for t, (fmt, _) in _SCALARS.items()}
# Native-order dtypes for the copies handed out, made once: a dtype made per
# array would be a Python object per array (nested arrays can be many).
_NATIVE_DTYPES = {t: dt.newbyteorder("=") for t, (_, dt) in _SCALARS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _ggml_layouts() -> dict[int, tuple[str, int, int]]:
    """type id -> (name, elements per block, bytes per block) for every ggml type.

    Taken from the gguf package (a dependency), which tracks ggml's type table,
    so that files with types we cannot decode still parse; only ``dequantize``
    of such a tensor fails.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (GGMLQuantizationType(t).name, bs, ts) for t, (bs, ts) in GGML_QUANT_SIZES.items()}


_LAYOUTS: dict[int, tuple[str, int, int]] | None = None


def _layouts() -> dict[int, tuple[str, int, int]]:
    global _LAYOUTS
    if _LAYOUTS is None:
        _LAYOUTS = _ggml_layouts()
    return _LAYOUTS


def ggml_type_name(type_id: int) -> str:
    layout = _layouts().get(type_id)
    return layout[0] if layout else f"unknown type {type_id}"


@dataclass(frozen=True, slots=True)   # slots: a header may hold 65536 of them
class TensorInfo:
    name: str
    dims: tuple[int, ...]    # GGUF order: ne0 (the contiguous row length) first
    shape: tuple[int, ...]   # numpy order: reversed dims
    type_id: int
    type_name: str
    offset: int              # absolute byte offset in the file
    nbytes: int
    n_elements: int

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row of ne0 elements (a whole number of blocks)."""
        return self.nbytes // max(1, self.n_elements // self.dims[0])


class _Parser:
    """Cursor over the mapped header; every read is bounds-checked first."""

    def __init__(self, buf, size: int, path: str):
        self.buf = buf
        self.size = size
        self.pos = 0
        self.path = path
        # What the header may still make us allocate (see the module docstring).
        self.memory_left = MAX_HEADER_MEMORY
        self.strings_left = MAX_ARRAY_STRINGS
        self.nested_left = MAX_NESTED_ARRAYS

    def fail(self, msg: str, at: int | None = None) -> GGUFError:
        where = f" at offset {at:#x}" if at is not None else ""
        return GGUFError(f"{self.path}: {msg}{where}")

    def charge(self, nbytes: int, what: str, at: int) -> None:
        """Count memory that parsing is about to allocate; refuse past the cap
        before allocating it."""
        if nbytes > self.memory_left:
            raise self.over_memory_cap(what, at)
        self.memory_left -= nbytes

    def over_memory_cap(self, what: str, at: int) -> GGUFError:
        return self.fail(f"{what}: the header would take more than {MAX_HEADER_MEMORY >> 20} MiB "
                         f"of memory to load (corrupt or hostile file)", at)

    def need(self, n: int, what: str) -> int:
        """Reserve n bytes for `what`; return their start offset."""
        pos = self.pos
        if n < 0 or pos + n > self.size:
            raise self.fail(
                f"truncated header: {what} needs {n} bytes but the file ends at {self.size}", pos)
        self.pos = pos + n
        return pos

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.need(8, what))[0]

    def string(self, what: str, strict: bool) -> str:
        start = self.pos
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise self.fail(f"{what}: string length {n} runs past the end of the file "
                            f"(size {self.size})", start)
        self.charge(_STR_COST + _STR_BYTE_COST * n, what, start)
        pos = self.need(n, what)
        raw = self.buf[pos:pos + n]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                raise self.fail(f"{what}: invalid UTF-8 ({e.reason})", pos + e.start) from None
            # Token texts are bytes to llama.cpp; keep them lossless rather than reject.
            return raw.decode("utf-8", "surrogateescape")

    # -- metadata values ---------------------------------------------------

    def value(self, vtype: int, where: str, depth: int = 0):
        if vtype in _SCALAR_STRUCTS:
            st = _SCALAR_STRUCTS[vtype]
            v = st.unpack_from(self.buf, self.need(st.size, where))[0]
            return bool(v) if vtype == GGUFValueType.BOOL else v
        if vtype == GGUFValueType.STRING:
            return self.string(where, strict=False)
        if vtype == GGUFValueType.ARRAY:
            return self.array(where, depth)
        raise self.fail(f"{where}: unknown value type {vtype}", self.pos - 4)

    def array(self, where: str, depth: int):
        start = self.pos
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{where}: arrays nested deeper than {MAX_ARRAY_NESTING}", start)
        itype = self.u32(f"{where}: array item type")
        count = self.u64(f"{where}: array length")
        if itype in _SCALARS:
            min_item = _SCALARS[itype][1].itemsize
        elif itype == GGUFValueType.STRING:
            min_item = 8
        elif itype == GGUFValueType.ARRAY:
            min_item = 12
        else:
            raise self.fail(f"{where}: unknown array item type {itype}", start)
        # Reject before allocating anything: every item needs at least min_item bytes.
        if count > (self.size - self.pos) // min_item:
            raise self.fail(f"{where}: array length {count} runs past the end of the file "
                            f"(size {self.size})", start)
        if itype in _SCALARS:
            dtype = _SCALARS[itype][1]
            self.charge(_NDARRAY_COST + count * dtype.itemsize, where, start)
            pos = self.need(count * dtype.itemsize, where)
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=pos)
            if itype == GGUFValueType.BOOL:
                return arr != 0
            return arr.astype(_NATIVE_DTYPES[itype], copy=True)
        # Each item of these becomes a Python object: bound their number before
        # the loop, so that a huge declared count is refused at once.
        if itype == GGUFValueType.STRING:
            if count > self.strings_left:
                raise self.fail(f"{where}: {count} strings in arrays would exceed the "
                                f"{MAX_ARRAY_STRINGS} a header may hold in all", start)
            self.strings_left -= count
            self.charge(_LIST_COST + count * (8 + _STR_COST), where, start)
            return self.string_array(count, where)
        if count > self.nested_left:
            raise self.fail(f"{where}: {count} arrays inside arrays would exceed the "
                            f"{MAX_NESTED_ARRAYS} a header may hold in all", start)
        self.nested_left -= count
        self.charge(_LIST_COST + count * 8, where, start)
        return [self.array(f"{where}[{i}]", depth + 1) for i in range(count)]

    def string_array(self, count: int, where: str) -> list[str]:
        # The hot path of opening a file (262k token strings for Gemma 3): one
        # tight loop with local names and bounds checks.
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        # The strings' bytes are metered as one sum (one addition per item);
        # each is checked against what is left before it is copied.
        text_left = self.memory_left // _STR_BYTE_COST
        text = 0
        out = [""] * count
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"truncated header: {where}[{i}] string length runs past "
                                f"the end of the file (size {size})", pos)
            n = unpack(buf, pos)[0]
            start = pos + 8
            pos = start + n
            if pos > size:
                raise self.fail(f"{where}[{i}]: string length {n} runs past the end of the "
                                f"file (size {size})", start - 8)
            text += n
            if text > text_left:
                raise self.over_memory_cap(f"{where}[{i}]", start - 8)
            # surrogateescape costs nothing on valid UTF-8 and keeps invalid
            # bytes losslessly without a slow exception per string.
            out[i] = buf[start:pos].decode("utf-8", "surrogateescape")
        self.memory_left -= _STR_BYTE_COST * text
        self.pos = pos
        return out


class GGUFFile:
    """A GGUF file, memory-mapped and validated.

    ``header_only=True`` parses and checks the header and tensor table but does
    not require the tensor data to lie inside the file (a partial download);
    ``raw()`` then fails only for tensors whose bytes are missing.

    Metadata values: ints, floats, bools and strs for scalars; numeric arrays
    as numpy arrays (bool arrays as ``np.bool_``); string arrays as lists of
    str; nested arrays as lists.  Strings that are not valid UTF-8 are kept
    with ``surrogateescape`` (``s.encode("utf-8", "surrogateescape")`` gives
    the file's bytes back).
    """

    def __init__(self, path, *, header_only: bool = False):
        self.path = Path(path)
        self.header_only = header_only
        self._mm = None
        name = str(path)
        st = os.stat(self.path)
        if stat.S_ISDIR(st.st_mode):
            raise GGUFError(f"{name}: is a directory, not a GGUF file")
        if not stat.S_ISREG(st.st_mode):
            # A FIFO or device could block or never end; a model is a plain file.
            raise GGUFError(f"{name}: not a regular file")
        with open(self.path, "rb") as f:
            self.file_size = os.fstat(f.fileno()).st_size
            if self.file_size == 0:
                raise GGUFError(f"{name}: empty file, not a GGUF file")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(_Parser(self._mm, self.file_size, name))
        except BaseException:
            self.close()
            raise

    # -- parsing -------------------------------------------------------------

    def _parse(self, p: _Parser) -> None:
        if p.size < 4 or p.buf[0:4] != GGUF_MAGIC:
            raise p.fail(f"not a GGUF file: magic {bytes(p.buf[0:4])!r}, expected {GGUF_MAGIC!r}", 0)
        p.pos = 4
        version = p.u32("version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in (1, 2, 3):
                raise p.fail("big-endian GGUF files are not supported", 4)
            raise p.fail(f"unsupported GGUF version {version} (supported: 2, 3)", 4)
        self.version = version
        n_tensors = p.u64("tensor count")
        n_kv = p.u64("metadata key/value count")
        # Both counts must fit the bytes left (at their entries' smallest size)
        # and stay under the absolute caps, before anything is sized by them.
        left = p.size - p.pos
        if n_kv > left // _MIN_KV_BYTES:
            raise p.fail(f"absurd metadata key/value count {n_kv}: the {left} bytes left cannot "
                         f"hold them (file truncated or corrupt)", 16)
        if n_kv > MAX_KV:
            raise p.fail(f"absurd metadata key/value count {n_kv}: more than the {MAX_KV} "
                         f"this reader accepts", 16)
        if n_tensors > left // _MIN_TENSOR_INFO_BYTES:
            raise p.fail(f"absurd tensor count {n_tensors}: the {left} bytes left cannot "
                         f"hold them (file truncated or corrupt)", 8)
        if n_tensors > MAX_TENSORS:
            raise p.fail(f"absurd tensor count {n_tensors}: more than the {MAX_TENSORS} "
                         f"this reader accepts", 8)
        p.charge(n_kv * _KV_COST + n_tensors * _TENSOR_INFO_COST, "metadata and tensor table", 8)

        self.metadata: dict = {}
        self.value_types: dict[str, int] = {}
        for i in range(n_kv):
            at = p.pos
            key = p.string(f"key of metadata entry {i}", strict=True)
            if key in self.metadata:
                raise p.fail(f"duplicated metadata key {key!r}", at)
            vtype = p.u32(f"value type of {key!r}")
            self.metadata[key] = p.value(vtype, f"metadata {key!r}")
            self.value_types[key] = vtype

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            a = self.metadata["general.alignment"]
            if self.value_types["general.alignment"] != GGUFValueType.UINT32 or a == 0 or a & (a - 1):
                raise p.fail(f"general.alignment must be a power-of-two uint32, got {a!r}")
            self.alignment = a

        layouts = _layouts()
        infos = []
        for i in range(n_tensors):
            at = p.pos
            name = p.string(f"name of tensor {i}", strict=True)
            where = f"tensor {name!r}"
            n_dims = p.u32(f"{where}: n_dims")
            if not 1 <= n_dims <= MAX_DIMS:
                raise p.fail(f"{where}: {n_dims} dimensions (must be 1..{MAX_DIMS})", p.pos - 4)
            dims_at = p.need(8 * n_dims, f"{where}: dims")
            dims = struct.unpack_from(f"<{n_dims}Q", p.buf, dims_at)
            n_elements = 1
            for d in dims:
                if d == 0 or d > _INT64_MAX:
                    raise p.fail(f"{where}: zero or negative dimension in {list(dims)}", dims_at)
                n_elements *= d
            if n_elements > _INT64_MAX:
                raise p.fail(f"{where}: dims {list(dims)} overflow (element count > 2^63)", dims_at)
            type_id = p.u32(f"{where}: type")
            layout = layouts.get(type_id)
            if layout is None:
                raise p.fail(f"{where}: unknown ggml type id {type_id}", p.pos - 4)
            type_name, block, type_size = layout
            if dims[0] % block:
                raise p.fail(f"{where}: row length {dims[0]} is not a multiple of the "
                             f"{type_name} block size {block}", dims_at)
            rel = p.u64(f"{where}: data offset")
            if rel % self.alignment:
                raise p.fail(f"{where}: data offset {rel} is misaligned (alignment "
                             f"{self.alignment})", p.pos - 8)
            nbytes = n_elements // block * type_size
            infos.append((name, dims, type_id, type_name, rel, nbytes, n_elements, at))

        self.data_offset = -(-p.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, type_name, rel, nbytes, n_elements, at in infos:
            if name in self.tensors:
                raise p.fail(f"duplicated tensor name {name!r}", at)
            self.tensors[name] = TensorInfo(
                name=name, dims=tuple(dims), shape=tuple(reversed(dims)), type_id=type_id,
                type_name=type_name, offset=self.data_offset + rel, nbytes=nbytes,
                n_elements=n_elements)

        # Tensor data must not overlap (a shared range could alias two weights),
        # and, unless only the header is wanted, must lie inside the file.
        prev = None
        for t in sorted(self.tensors.values(), key=lambda t: (t.offset, t.nbytes)):
            if prev is not None and t.offset < prev.offset + prev.nbytes:
                raise p.fail(f"tensor {t.name!r} (bytes {t.offset}..{t.offset + t.nbytes}) "
                             f"overlaps tensor {prev.name!r} (bytes {prev.offset}.."
                             f"{prev.offset + prev.nbytes})")
            if not self.header_only and t.offset + t.nbytes > p.size:
                raise p.fail(f"tensor {t.name!r} data (bytes {t.offset}..{t.offset + t.nbytes}) "
                             f"lies outside the file (size {p.size})")
            prev = t

    # -- access ----------------------------------------------------------------

    @property
    def arch(self) -> str:
        a = self.metadata.get("general.architecture")
        if not isinstance(a, str):
            raise GGUFError(f"{self.path}: general.architecture is missing or not a string")
        return a

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def arch_get(self, key: str, default=None):
        return self.metadata.get(f"{self.arch}.{key}", default)

    def _tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r}") from None

    def blob(self) -> np.ndarray:
        """The whole file as one read-only uint8 array (zero-copy, over the memory map)."""
        if self._mm is None or self._mm.closed:
            raise GGUFError(f"{self.path}: file is closed")
        return np.frombuffer(self._mm, dtype=np.uint8)

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy uint8 view of a tensor's bytes, shape (n_rows, row_nbytes)."""
        t = self._tensor(name)
        if self._mm is None or self._mm.closed:
            raise GGUFError(f"{self.path}: file is closed")
        if t.offset + t.nbytes > self.file_size:
            raise GGUFError(f"{self.path}: data of tensor {name!r} is not in the file "
                            f"(bytes {t.offset}..{t.offset + t.nbytes}, file size {self.file_size})")
        n_rows = t.n_elements // t.dims[0]
        arr = np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return arr.reshape(n_rows, t.nbytes // n_rows)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy shape (exactly what gguf.quants gives)."""
        from . import quant

        t = self._tensor(name)
        if not quant.is_supported(t.type_id):
            raise GGUFError(f"{self.path}: tensor {name!r} has type {t.type_name}, "
                            f"which this runtime cannot decode")
        try:
            return quant.dequantize(self.raw(name), t.type_id, t.shape)
        except quant.UnsupportedType as e:
            raise GGUFError(f"{self.path}: tensor {name!r}: {e}") from None

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # Views from raw() still use the mapping; it goes away with them.
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")
