"""Property test: mutated GGUF headers either open or raise GGUFError.

Seeds are small complete files written by gguf.GGUFWriter and the first part
of SmolLM2's real header (all its metadata with arrays cut short, its first
tensor infos).  Mutations: byte flips, truncations, inserted/deleted bytes,
and overwrites of the length/count/type/dim/offset fields with boundary and
huge values.  Anything but GGUFError (IndexError, struct.error, numpy errors,
MemoryError, UnicodeDecodeError, a hang) fails the test; files that do open
must also survive what consumers do with them (raw views, `info`).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.gguf import GGUFError, GGUFFile
from runtime.info import format_info, model_info
from _gguf_util import header_excerpt, header_fields, small_gguf_files

_SEEDS: list[tuple[bytes, list, bool]] = []  # (bytes, fields, header_only)
_TMP = Path(tempfile.mkdtemp(prefix="gguf-fuzz-"))


@pytest.fixture(scope="module", autouse=True)
def seeds(smollm2_path):
    if not _SEEDS:
        for data in small_gguf_files(_TMP):
            _SEEDS.append((data, header_fields(data), False))
        excerpt = header_excerpt(smollm2_path)
        _SEEDS.append((excerpt, header_fields(excerpt), True))
    for data, _, header_only in _SEEDS:  # the unmutated seeds are valid
        GGUFFile(_write(data), header_only=header_only).close()
    return _SEEDS


def _write(data: bytes) -> Path:
    p = _TMP / "case.gguf"
    p.write_bytes(data)
    return p


_MAX = {4: 2**32 - 1, 8: 2**64 - 1}


@st.composite
def mutations(draw, which: str):
    indices = [i for i, s in enumerate(_SEEDS) if s[2] == (which == "smollm2")]
    idx = draw(st.sampled_from(indices))
    seed, fields, header_only = _SEEDS[idx]
    data = bytearray(seed)
    header_end = max(f[0] + f[1] for f in fields) + 64
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "field", "field", "flip", "truncate", "splice"]))
        if kind == "field" and fields:
            off, size, _name = draw(st.sampled_from(fields))
            if off + size > len(data):
                continue
            old = int.from_bytes(data[off:off + size], "little")
            value = draw(st.one_of(
                st.sampled_from([0, 1, 2, 3, 4, 5, 13, 31, 32, 33, 255, 256, 2**16, 2**31 - 1,
                                 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1,
                                 len(data), len(data) - 1, len(data) + 1, old + 1, old - 1,
                                 old * 2, old + 32]),
                st.integers(0, _MAX[size])))
            data[off:off + size] = (value & _MAX[size]).to_bytes(size, "little")
        elif kind == "flip" and data:
            pos = draw(st.integers(0, min(len(data), header_end) - 1))
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "splice" and data:
            pos = draw(st.integers(0, min(len(data), header_end) - 1))
            if draw(st.booleans()):
                data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
            else:
                del data[pos:pos + draw(st.integers(1, 16))]
    return bytes(data), header_only


def _check(data: bytes, header_only: bool) -> None:
    path = _write(data)
    try:
        g = GGUFFile(path, header_only=header_only)
    except GGUFError as e:
        assert str(e)  # a message, not an empty error
        return
    with g:
        for name, t in g.tensors.items():
            assert t.n_elements > 0 and t.nbytes >= 0 and t.offset >= g.data_offset
            try:
                raw = g.raw(name)
            except GGUFError:
                assert header_only
            else:
                assert raw.size == t.nbytes and raw.shape[0] * t.dims[0] == t.n_elements
        for key in g.metadata:
            g.get(key)
        try:
            g.arch
        except GGUFError:
            pass
        info = model_info(g)
        format_info(info).encode("utf-8")
        json.dumps(info, ensure_ascii=False).encode("utf-8")


FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=7000, **FUZZ)
@given(mutations("small"))
def test_fuzz_small_gguf_headers(case):
    _check(*case)


@settings(max_examples=3000, **FUZZ)
@given(mutations("smollm2"))
def test_fuzz_smollm2_header(case):
    _check(*case)


def test_field_walker_finds_fields():
    # The fuzzer aims at fields found by an independent walker; make sure it sees them all.
    data, fields, _ = _SEEDS[0]
    kinds = {k for _, _, k in fields}
    assert {"count", "len", "type", "dim", "ndims", "offset"} <= kinds
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    assert sum(k == "ndims" for _, _, k in fields) == n_tensors
