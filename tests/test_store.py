"""The Delta store: unit upserts, versions, the manifest as commit point, recovery, the lock."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from pipeline.errors import LockHeld
from pipeline.store import Store, version_newer

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def rows(store: Store, units: dict[str, list[str]], versions: dict[str, str] | None = None):
    """Condition rows: one row per code; unit -> list of codes."""
    table = store.schema.table("condition")
    data = []
    for key, codes in units.items():
        for i, code in enumerate(codes):
            data.append({"condition_id": key.split("/")[1], "patient_id": "p1", "code": code, "twin_id": "t1",
                         "source": "s", "source_ref": f"f:{i}", "run_id": "r", "ingested_at": NOW, "unit_key": key,
                         "unit_version": (versions or {}).get(key), "row_index": i, "content_hash": "|".join(codes)})
    meta = {k: ((versions or {}).get(k), "|".join(c), len(c)) for k, c in units.items()}
    return pa.Table.from_pylist(data, schema=table.arrow_schema), meta


def stored(store: Store) -> dict[str, list[str]]:
    t = store.read("condition", ["unit_key", "row_index", "code"], latest=True).sort_by([("unit_key", "ascending"),
                                                                                          ("row_index", "ascending")])
    out: dict[str, list[str]] = {}
    for k, c in zip(t.column("unit_key").to_pylist(), t.column("code").to_pylist(), strict=True):
        out.setdefault(k, []).append(c)
    return out


def upsert(store, units, versions=None):
    data, meta = rows(store, units, versions)
    return store.upsert_units("condition", "s", data, meta)


def test_new_unchanged_changed_older_and_shrinking(tmp_path):
    store = Store(tmp_path / "s")
    with store.locked("test"):
        st = upsert(store, {"Condition/a": ["1", "2", "3"], "Condition/b": ["9"]}, {"Condition/a": "2024-01-01T00:00:00.000000Z|1"})
        assert (st.new, st.changed) == (2, 0)
        st = upsert(store, {"Condition/a": ["1", "2", "3"]}, {"Condition/a": "2024-01-01T00:00:00.000000Z|1"})
        assert st.unchanged == 1 and st.rows_written == 0
        # a newer version with fewer rows replaces all of them
        st = upsert(store, {"Condition/a": ["4"]}, {"Condition/a": "2024-02-01T00:00:00.000000Z|2"})
        assert st.changed == 1 and st.rows_deleted == 2
        assert stored(store)["Condition/a"] == ["4"]
        # an older version never overwrites a newer one
        st = upsert(store, {"Condition/a": ["0", "0"]}, {"Condition/a": "2023-12-01T00:00:00.000000Z|0"})
        assert st.older == 1
        assert stored(store) == {"Condition/a": ["4"], "Condition/b": ["9"]}
        # a unit that no longer maps to the table loses its rows
        st = upsert(store, {"Condition/b": []})
        assert st.changed == 1
        assert "Condition/b" not in stored(store)
        assert store.delete_units("condition", "s", ["Condition/a", "Condition/zzz"]) == 1
        assert stored(store) == {}


def _identifiers(store: Store, mapping: dict[str, str], run: str) -> pa.Table:
    table = store.schema.table("resource_identifier")
    return pa.Table.from_pylist([
        {"resource_type": "Patient", "system": "urn:mrn", "value": v, "resource_id": rid, "source": "s",
         "source_ref": "", "run_id": run, "ingested_at": NOW, "unit_key": f"Patient/{rid}", "row_index": 0,
         "content_hash": ""} for v, rid in mapping.items()], schema=table.arrow_schema)


def test_merge_by_key_leaves_same_rows_alone_and_appends_when_every_key_is_new(tmp_path):
    """A drain's identifiers are mostly new and the rest unchanged: that must not rewrite the
    files holding the stored ones (a MERGE that updates a matched row rewrites its file)."""
    store = Store(tmp_path / "s")

    def history() -> list[str]:
        dt = store.delta("resource_identifier", latest=True)
        return [h["operation"] for h in reversed(dt.history())]

    def mapping() -> dict[str, tuple[str, str]]:
        t = store.read("resource_identifier", ["value", "resource_id", "run_id"], latest=True)
        return {v: (r, run) for v, r, run in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True)}

    with store.locked("test"):
        store.merge_by_key("resource_identifier", _identifiers(store, {"1": "a", "2": "b"}, "r1"), unless_same=("resource_id",))
        ops = history()
        # the same mapping again: nothing written, no new version
        store.merge_by_key("resource_identifier", _identifiers(store, {"1": "a", "2": "b"}, "r2"), unless_same=("resource_id",))
        assert history() == ops
        # one known and unchanged, one new: the new one is appended, nothing merged
        store.merge_by_key("resource_identifier", _identifiers(store, {"2": "b", "3": "c"}, "r3"), unless_same=("resource_id",))
        assert history() == ops + ["WRITE"]
        assert mapping() == {"1": ("a", "r1"), "2": ("b", "r1"), "3": ("c", "r3")}
        # a value now naming another resource is updated in place
        store.merge_by_key("resource_identifier", _identifiers(store, {"1": "z", "4": "d"}, "r4"), unless_same=("resource_id",))
        assert history()[-1] == "MERGE"
        assert mapping() == {"1": ("z", "r4"), "2": ("b", "r1"), "3": ("c", "r3"), "4": ("d", "r4")}
        # without unless_same every matched row is updated, as before
        store.merge_by_key("resource_identifier", _identifiers(store, {"2": "b"}, "r5"))
        assert mapping()["2"] == ("b", "r5")


def test_version_rules():
    assert version_newer("2024-02-01T00:00:00.000000Z|", "2024-01-01T00:00:00.000000Z|") is True
    assert version_newer("|3", "|12") is False
    assert version_newer("|a", "|b") is None
    assert version_newer(None, "|1") is None
    assert version_newer("x|1", "x|1") is False


def test_uncommitted_writes_are_invisible_and_rolled_back(tmp_path):
    store = Store(tmp_path / "s")
    with store.locked("test"):
        upsert(store, {"Condition/a": ["1"]})
        store.commit("run-1")
    with store.locked("test"):
        upsert(store, {"Condition/b": ["2"]})
        # a reader outside the run sees the committed state only
        assert Store(tmp_path / "s").read("condition", ["unit_key"]).column("unit_key").to_pylist() == ["Condition/a"]
        store.rollback()
    assert stored(store) == {"Condition/a": ["1"]}


def test_a_killed_run_is_rolled_back_by_the_next(tmp_path):
    root = tmp_path / "s"
    store = Store(root)
    with store.locked("test"):
        upsert(store, {"Condition/a": ["1"]})
        store.commit("run-1")
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).resolve().parent.parent)!r})
        from tests.test_store import upsert
        from pipeline.store import Store
        s = Store({str(root)!r})
        with s.locked("doomed"):
            upsert(s, {{"Condition/b": ["2"], "Condition/a": ["changed"]}})
            os._exit(9)   # killed after writing, before the commit point
        """)
    subprocess.run([sys.executable, "-c", script], check=False)
    assert len(stored(store)) == 2  # the half run is on disk ...
    assert store.read("condition", ["code"]).column("code").to_pylist() == ["1"]  # ... but not visible
    with store.locked("next"):
        pass  # taking the lock recovers
    assert stored(store) == {"Condition/a": ["1"]}


def test_lock_is_exclusive_and_a_dead_holder_leaves_no_stale_lock(tmp_path):
    root = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).resolve().parent.parent)!r})
        from pipeline.store import Store
        with Store({str(root)!r}).locked("nightly-job"):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=r"nightly-job.*try again"), Store(root).locked("second"):
            pass
    finally:
        holder.kill()  # kill -9: the kernel drops the flock with the process
        holder.wait()
    # the same process may take it again (a job's steps): nesting does not deadlock
    with Store(root).locked("third"), Store(root).locked("nested"):
        pass


def test_tables_are_plain_delta_readable_by_duckdb(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    store = Store(tmp_path / "s")
    with store.locked("test"):
        upsert(store, {"Condition/a": ["1", "2"]})
        store.commit("r")
    # DuckDB's delta extension needs a download; read the Parquet files the Delta log lists instead
    files = store.delta("condition").file_uris()
    n = duckdb.sql(f"select count(*) from read_parquet({files!r})").fetchall()[0][0]
    assert n == 2


def test_small_files_are_merged_at_the_commit_point_and_older_versions_still_read(tmp_path, monkeypatch):
    """Each run adds small files to the tables it writes (a listener drains every few
    seconds). Once a written table holds _COMPACT_AT small files, the commit merges them:
    the same rows, a few files, and the versions before it still read (build --as-of)."""
    import orjson
    from deltalake import DeltaTable

    from pipeline import store as store_module
    from pipeline.imports import run_import

    monkeypatch.setattr(store_module, "_COMPACT_AT", 6)
    store = Store(tmp_path / "s")
    versions = []
    for i in range(9):
        p = {"resourceType": "Patient", "id": f"p{i}", "birthDate": f"19{50 + i}-01-01"}
        (tmp_path / f"{i}.ndjson").write_bytes(orjson.dumps(p) + b"\n")
        run_import(store, "fhir", [tmp_path / f"{i}.ndjson"])
        versions.append(store.committed_version("patient"))
    dt = DeltaTable(str(store.table_path("patient")), version=versions[-1])
    assert len(dt.file_uris()) < 6  # merged (5 small files is under the threshold: 6 runs, then 3 more)
    assert sorted(store.read("patient", ["patient_id"]).column("patient_id").to_pylist()) == [f"p{i}" for i in range(9)]
    history = [h.get("operation") for h in DeltaTable(str(store.table_path("patient"))).history()]
    assert "OPTIMIZE" in history
    for i, v in enumerate(versions[:5]):  # before the merge, each version reads as it was committed
        old = DeltaTable(str(store.table_path("patient")), version=v).to_pyarrow_table(columns=["patient_id"])
        assert sorted(old.column("patient_id").to_pylist()) == [f"p{j}" for j in range(i + 1)]
    runs = DeltaTable(str(store.table_path("runs")))
    assert len(runs.file_uris()) < 6 and store.read("runs").num_rows == 9
    # the commit point and recovery read each table's latest version from its log's file names
    for name in store.schema.tables:
        if (tmp_path / "s" / name).exists():
            assert store_module._latest_version(tmp_path / "s" / name) == DeltaTable(str(tmp_path / "s" / name)).version()
            assert store.committed_version(name) == DeltaTable(str(tmp_path / "s" / name)).version()


def test_twin_maintain_merges_now_and_deletes_old_versions_files_only_when_asked(tmp_path, monkeypatch, capsys):
    import orjson
    from deltalake import DeltaTable

    from pipeline import store as store_module
    from pipeline.cli import main as twin
    from pipeline.imports import run_import

    monkeypatch.setattr(store_module, "_COMPACT_AT", 1000)  # no merging at the commits: maintain does it
    store = Store(tmp_path / "s")
    for i in range(5):
        p = {"resourceType": "Patient", "id": f"p{i}", "birthDate": f"19{60 + i}-02-03", "gender": "female",
             "identifier": [{"system": "urn:mrn", "value": f"M{i}"}]}
        (tmp_path / f"{i}.ndjson").write_bytes(orjson.dumps(p) + b"\n")
        run_import(store, "fhir", [tmp_path / f"{i}.ndjson"])
    path = str(store.table_path("patient"))
    before = store.committed_version("patient")
    assert len(DeltaTable(path).file_uris()) == 5
    content = {t: store.read(t).sort_by("patient_id") for t in ("patient", "patient_identifier")}
    assert twin(["maintain", "--store", str(tmp_path / "s")]) == 0
    for t, rows in content.items():  # every column of every row, the columns files left out (all null) too
        assert store.read(t).sort_by("patient_id").equals(rows), t
    out = capsys.readouterr().out
    assert "small files merged:" in out and "patient 5" in out and "deleted" not in out
    assert len(DeltaTable(path).file_uris()) == 1
    assert sorted(store.read("patient", ["patient_id"]).column("patient_id").to_pylist()) == [f"p{i}" for i in range(5)]
    assert DeltaTable(path, version=before).to_pyarrow_table().num_rows == 5  # the old version still reads
    assert "maintain" in store.read("runs", ["command"]).column("command").to_pylist()
    for table in ("patient", "runs", "ledger"):  # every table's log starts from a checkpoint now
        assert list((store.table_path(table) / "_delta_log").glob("*.checkpoint.parquet")), table
    assert twin(["maintain", "--store", str(tmp_path / "s"), "--vacuum-days", "0"]) == 0
    assert "files of old versions deleted:" in capsys.readouterr().out and len(list(tmp_path.glob("s/patient/*.parquet"))) == 1
    for name, version in store.manifest()["tables"].items():  # nothing left for the next run to roll back
        assert DeltaTable(str(store.table_path(name))).version() == version, name
    assert Store(tmp_path / "s").recover() == []
    assert store.read("patient").num_rows == 5
    with pytest.raises(OSError):  # what --as-of would have read is gone, as asked
        DeltaTable(path, version=before).to_pyarrow_table()
    with pytest.raises(SystemExit):
        twin(["maintain", "--store", str(tmp_path / "s"), "--vacuum-days", "-1"])


def test_tables_checkpoint_every_ten_commits_older_tables_from_their_next_write(tmp_path):
    """Opening a table replays its commits since the last checkpoint; a store written by
    small runs (a listener) opens its tables ~40 times a run."""
    import orjson
    from deltalake import DeltaTable

    from pipeline.imports import run_import

    store = Store(tmp_path / "s")
    for i in range(12):
        (tmp_path / f"{i}.ndjson").write_bytes(orjson.dumps({"resourceType": "Patient", "id": f"p{i}"}) + b"\n")
        run_import(store, "fhir", [tmp_path / f"{i}.ndjson"])
    log = store.table_path("patient") / "_delta_log"
    assert list(log.glob("*.checkpoint.parquet"))
    # a table made by an earlier Twinline (Delta's default interval), committed as such...
    runs = str(store.table_path("runs"))
    with store.locked("an earlier Twinline"):
        dt = DeltaTable(runs)
        dt.alter.set_table_properties({"delta.checkpointInterval": "100"})
        store._write_manifest({**store.manifest()["tables"], "runs": dt.version()}, None)
    assert DeltaTable(runs).metadata().configuration["delta.checkpointInterval"] == "100"
    # ...takes the setting at the next commit that writes it
    run_import(store, "fhir", [tmp_path / "0.ndjson"], reprocess=True)
    assert DeltaTable(runs).metadata().configuration["delta.checkpointInterval"] == "10"


def test_a_failed_merge_of_small_files_keeps_the_run(tmp_path, monkeypatch, caplog):
    import orjson

    from pipeline import store as store_module
    from pipeline.imports import run_import

    def broken(dt, at, under=0):
        raise OSError("disk full, at Patient/secret-id")

    monkeypatch.setattr(store_module, "compact_small_files", broken)
    (tmp_path / "p.ndjson").write_bytes(orjson.dumps({"resourceType": "Patient", "id": "p1"}) + b"\n")
    run = run_import(Store(tmp_path / "s"), "fhir", [tmp_path / "p.ndjson"])
    assert run.counts["fhir"].written == 1 and Store(tmp_path / "s").read("patient").num_rows == 1
    assert "small files left as they are (OSError)" in caplog.text and "secret-id" not in caplog.text
