"""The store's fast append (Store._append): pyarrow writes the Parquet file, delta-rs commits it.

What it does differently from write_deltalake, and what must hold anyway: dictionary
columns are written as they are and read back as their values; a column null in every
row is left out of the file and read as null by every reader (pyarrow datasets, delta-rs
MERGE, DuckDB); the Delta log carries the statistics `stored_units` skips files with.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from pipeline.arrays import runs_column
from pipeline.store import Store

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def device_rows(store: Store, unit_key: str, n: int, value: float = 1.0) -> pa.Table:
    """Observation rows shaped like a device chunk: dictionary columns of one value, per-row
    ids, values and times, and most columns null in every row."""
    table = store.schema.table("observation")
    per_row = {
        "observation_id": pa.array([f"{unit_key}-{i}" for i in range(n)]),
        "value_number": pa.array([value + i for i in range(n)], pa.float64()),
        "effective_start": pa.array([NOW.replace(minute=i % 60) for i in range(n)], pa.timestamp("us", tz="UTC")),
        "row_index": pa.array(range(n), pa.int32()),
        "ingested_at": pa.array([NOW] * n, pa.timestamp("us", tz="UTC")),
        "is_component": pa.array([False] * n),
    }
    runs = {"patient_id": "p1", "code": "8867-4", "code_system": "http://loinc.org", "value_unit": "/min",
            "status": "final", "twin_id": "t1", "source": "csv", "source_ref": "f.csv:2-9", "run_id": "r1",
            "unit_key": unit_key, "content_hash": f"h-{value}"}
    cols = {}
    for f in table.arrow_schema:
        if f.name in per_row:
            cols[f.name] = per_row[f.name]
        elif f.name in runs:
            cols[f.name] = runs_column([(runs[f.name], n)], pa.string())
        else:
            cols[f.name] = pa.nulls(n, f.type)
    return pa.table(cols)


def write(store: Store, data: pa.Table, version: str = "h") -> None:
    keys = pc.unique(data.column("unit_key").cast(pa.string())).to_pylist()
    with store.locked("test"):
        store.upsert_units("observation", "csv", data, {k: (None, data.column("content_hash")[0].as_py(),
                                                            data.num_rows) for k in keys})
        store.commit("r")


def test_null_columns_are_left_out_of_the_file_and_read_as_null(tmp_path):
    store = Store(tmp_path / "s")
    write(store, device_rows(store, "csv:a:0", 5))
    files = DeltaTable(str(store.root / "observation")).file_uris()
    in_file = pq.read_schema(files[0]).names
    assert "observation_id" in in_file and "value_comparator" not in in_file and "reference_low" not in in_file
    # every reader sees the table's columns, the missing ones null
    for t in (store.read("observation"), DeltaTable(str(store.root / "observation")).to_pyarrow_table()):
        assert t.num_rows == 5 and t.column("reference_low").null_count == 5
        assert t.column("code").to_pylist() == ["8867-4"] * 5  # dictionary written, values read
    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(f"select count(*), min(code) from read_parquet({files!r}, union_by_name=true)").fetchall()
    assert got == [(5, "8867-4")]


def test_merges_and_updates_work_on_files_without_the_null_columns(tmp_path):
    """A changed chunk is replaced by MERGE (delta-rs, DataFusion) over a file lacking columns."""
    store = Store(tmp_path / "s")
    write(store, device_rows(store, "csv:a:0", 5))
    write(store, device_rows(store, "csv:a:0", 3, value=10.0))  # the unit changed and shrank
    t = store.read("observation").sort_by("row_index")
    assert t.column("value_number").to_pylist() == [10.0, 11.0, 12.0]
    data = pa.table({"source": ["csv"], "unit_key": ["csv:a:0"], "row_index": pa.array([1], pa.int32()),
                     "reference_low": [60.0]})
    with store.locked("test"):
        store.update_columns("observation", ["source", "unit_key", "row_index"], data, ["reference_low"])
        store.commit("r2")
    t = store.read("observation").sort_by("row_index")
    assert t.column("reference_low").to_pylist() == [None, 60.0, None]


def test_the_log_has_the_statistics_stored_units_skips_files_with(tmp_path):
    store = Store(tmp_path / "s")
    write(store, device_rows(store, "csv:a:0", 4))
    write(store, device_rows(store, "csv:b:0", 4))
    dt = DeltaTable(str(store.root / "observation"))
    assert dt.metadata().configuration["delta.dataSkippingStatsColumns"] == "source,unit_key,twin_id"
    acts = pa.table(dt.get_add_actions(flatten=True))
    assert sorted(zip(acts.column("min.unit_key").to_pylist(), acts.column("max.unit_key").to_pylist(),
                      acts.column("num_records").to_pylist(), strict=True)) == [("csv:a:0", "csv:a:0", 4),
                                                                                ("csv:b:0", "csv:b:0", 4)]
    assert acts.column("null_count.twin_id").to_pylist() == [0, 0]
    assert set(store.stored_units("observation", "csv", ["csv:b:0", "csv:c:0"])) == {"csv:b:0"}


def test_the_same_rows_as_write_deltalake_writes(tmp_path):
    store = Store(tmp_path / "s")
    data = device_rows(store, "csv:a:0", 50)
    write(store, data)
    plain = data.cast(store.schema.table("observation").arrow_schema)
    write_deltalake(str(tmp_path / "ref"), plain)
    ours = DeltaTable(str(store.root / "observation")).to_pyarrow_table().sort_by("row_index")
    ref = DeltaTable(str(tmp_path / "ref")).to_pyarrow_table().sort_by("row_index")
    assert ours.select(ref.column_names).cast(ref.schema).equals(ref)
