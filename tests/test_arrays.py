"""Columns built from buffers (pipeline/arrays.py) hold exactly the values a plain pa.array would."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from pipeline.arrays import constant, fixed_strings


def test_fixed_width_ids_spell_hex():
    arr = fixed_strings([b"ab-", np.array([0, 255, -1]), b"-", np.array([1, 2, 3])], 3)
    assert arr.to_pylist() == ["ab-0000000000000000-0000000000000001", "ab-00000000000000ff-0000000000000002",
                               "ab-ffffffffffffffff-0000000000000003"]


@pytest.mark.parametrize(("value", "typ"), [
    ("bench-monitor-7", pa.string()), ("", pa.string()), ("Zürich µg/L ✓", pa.string()), (b"\x00\xff", pa.binary()),
    (1.5, pa.float64()), (7, pa.int32()), (True, pa.bool_()), (None, pa.string()),
    (datetime(2024, 1, 1, 12, tzinfo=UTC), pa.timestamp("us", tz="UTC")),
])
@pytest.mark.parametrize("n", [0, 1, 3, 65_536, 200_001])
@pytest.mark.parametrize("cache", [True, False])
def test_constant_is_n_copies_in_shared_blocks(value, typ, n, cache):
    col = pa.chunked_array(constant(value, n, typ, cache=cache), typ)
    col.validate(full=True)
    assert len(col) == n and col.type == typ
    assert col.null_count == (n if value is None else 0)
    if n:
        assert col.unique().to_pylist() == [value]
    if n > 65_536:  # blocks shared, not n copies
        assert col.num_chunks == -(-n // 65_536) and len({c.buffers()[-1].address for c in col.chunks}) == 1
