"""Arrow columns built without per-row Python work: the columnar paths' building blocks.

A device log becomes millions of rows whose codes, units, ids and provenance are the
same for a whole file or chunk. Building those columns value by value (or with
`pa.repeat`, which copies a string per row) costs more than reading the file; the
helpers here build them from buffers, or as chunks that all share one block.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _hex4_table() -> np.ndarray:
    """Four hex digits (as one uint32 in memory) for each uint16 read natively from big-endian bytes."""
    v = np.arange(65536, dtype=np.uint32)
    value = ((v & 0xFF) << 8) | (v >> 8) if np.little_endian else v  # the number those two bytes spell
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    chars = np.stack([digits[(value >> s) & 15] for s in (12, 8, 4, 0)], axis=1).astype(np.uint8)
    return np.ascontiguousarray(chars).view(np.uint32).ravel()


_HEX4 = _hex4_table()


def fixed_strings(parts: Sequence[np.ndarray | bytes], n: int) -> pa.Array:
    """A string array of n fixed-width values: each the concatenation of the parts.

    A part is bytes (the same for every row) or an int64 array written as 16 hex
    digits. Building the buffers directly is ~10x faster than formatting and joining
    strings in Arrow, and this is the one per-sample string column (observation_id).
    """
    width = sum(len(p) if isinstance(p, bytes) else 16 for p in parts)
    out = np.empty((n, width), np.uint8)
    pos = 0
    for p in parts:
        if isinstance(p, bytes):
            out[:, pos:pos + len(p)] = np.frombuffer(p, np.uint8)
            pos += len(p)
        else:
            pairs = np.ascontiguousarray(p, dtype=">i8").view(np.uint16).reshape(n, 4)
            # mode="wrap": every uint16 is in the table; the default bounds check costs 5x
            out[:, pos:pos + 16].view(np.uint32)[:] = np.take(_HEX4, pairs, mode="wrap")
            pos += 16
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(out)])


_BLOCK = 1 << 16


@functools.lru_cache(maxsize=256)
def _block(value: Any, typ: pa.DataType) -> pa.Array:
    return _make_block(value, _BLOCK, typ)


def _make_block(value: Any, n: int, typ: pa.DataType) -> pa.Array:
    if value is None:
        return pa.nulls(n, typ)
    if pa.types.is_string(typ) or pa.types.is_binary(typ):
        # from buffers: pa.array and pa.repeat append the string once per row
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if n * len(raw) < 1 << 31:
            offsets = np.arange(0, (n + 1) * len(raw), len(raw), np.int32) if raw else np.zeros(n + 1, np.int32)
            return pa.Array.from_buffers(typ, n, [None, pa.py_buffer(offsets), pa.py_buffer(raw * n)])
    return pa.repeat(pa.scalar(value, typ), n)


def constant(value: Any, n: int, typ: pa.DataType, *, cache: bool = True) -> list[pa.Array]:
    """n copies of one value as chunks that all share one block: no memory per row.

    Values of the mapping (codes, units, displays) keep their block across chunks and
    files (`cache`); per-file values (ids, unit keys) get a block of their own each time,
    or the cache would grow with the number of files and chunks.
    """
    if n < _BLOCK:  # a small file: its own n copies cost less than a block of 65,536 made on a cache miss
        return [_make_block(value, n, typ)]
    block = _block(value, typ) if cache else _make_block(value, _BLOCK, typ)
    out = [block] * (n // _BLOCK)
    if n % _BLOCK:
        out.append(block.slice(0, n % _BLOCK))
    return out


@functools.lru_cache(maxsize=64)
def _index_block(k: int) -> pa.Array:
    return pa.array(np.full(_BLOCK, k, np.int32))


_NULL_INDICES = pa.nulls(_BLOCK, pa.int32())


def runs_column(runs: Sequence[tuple[Any, int]], typ: pa.DataType) -> pa.ChunkedArray:
    """A column made of runs (value, count), dictionary-encoded: one dictionary of the
    distinct values for the whole column, and index blocks shared by every chunk.

    The Parquet writer takes dictionary columns as they are (Store._append): no hashing
    of three million copies of a code, unit or id to find they are all the same.
    """
    values = list(dict.fromkeys(v for v, _ in runs if v is not None))
    where = {v: i for i, v in enumerate(values)}
    dictionary = pa.array(values, typ)
    dtype = pa.dictionary(pa.int32(), typ)
    chunks = []
    for value, n in runs:
        block = _NULL_INDICES if value is None else _index_block(where[value])
        for start in range(0, n, _BLOCK):
            idx = block if n - start >= _BLOCK else block.slice(0, n - start)
            chunks.append(pa.DictionaryArray.from_arrays(idx, dictionary, safe=False))
    return pa.chunked_array(chunks, dtype)


def plain(data: pa.Table) -> pa.Table:
    """The table with its dictionary columns decoded (for what needs the value type)."""
    if not any(pa.types.is_dictionary(t) for t in data.schema.types):
        return data
    return data.cast(pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type,
                                         f.nullable) for f in data.schema]))


def distinct_codes(col: pa.ChunkedArray | pa.Array) -> tuple[pa.ChunkedArray, pa.Array]:
    """(index of each row's value in `values`, null for null rows; the distinct non-null
    values) of a plain or dictionary-encoded column: work per distinct value, not per row."""
    if isinstance(col, pa.Array):
        col = pa.chunked_array([col])
    if pa.types.is_dictionary(col.type):
        col = col.unify_dictionaries()
        if col.num_chunks:
            return pa.chunked_array([c.indices for c in col.chunks], col.type.index_type), col.chunk(0).dictionary
        return pa.chunked_array([], pa.int32()), pa.array([], col.type.value_type)
    values = pc.unique(col).drop_null()
    return pc.index_in(col, value_set=values), values


def map_values(col: pa.ChunkedArray | pa.Array, f: Any, typ: pa.DataType) -> pa.ChunkedArray:
    """f applied to each distinct non-null value of a column, as a dictionary column
    (streams have few distinct ids: a hash per patient, not per sample)."""
    idx, values = distinct_codes(col)
    mapped = pa.array([f(v) for v in values.to_pylist()], typ)
    return pa.chunked_array([pa.DictionaryArray.from_arrays(c, mapped) for c in idx.chunks],
                            pa.dictionary(idx.type, typ))
