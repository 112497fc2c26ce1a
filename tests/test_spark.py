"""The Spark engine's promise: the same tables as the single process, table by table.

Each test imports (and builds) the same input twice, once with the single process and
once on Spark `local[2]`, and compares every table of the two stores by meaning
(tests/spark_compare.py). One Spark session serves the whole test session; the tests skip,
saying why, when PySpark or Java is missing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import orjson
import pytest

from pipeline.imports import run_import
from pipeline.store import Store
from pipeline.twins import build_twins
from tests.conftest import FIXTURES
from tests.spark_compare import differences, table_rows


@pytest.fixture(scope="session")
def spark():
    if shutil.which("java") is None:
        pytest.skip("Spark tests need Java 17+ on PATH (Debian: openjdk-17-jre-headless)")
    try:
        import pyspark  # noqa: F401
    except ImportError:
        pytest.skip("Spark tests need PySpark: pip install 'twinline[spark]'")
    from pipeline.engines.spark import spark_session

    session = spark_session("local[2]")
    yield session
    session.stop()


def both(tmp_path: Path, spark, inputs: list[Path], *, part_bytes: int | None = None, build: bool = True,
         **kw) -> tuple[Store, Store, object, object]:
    """Import (and build) `inputs` into a single-process store and a Spark store."""
    from pipeline.engines.build import spark_build
    from pipeline.engines.spark import spark_import

    one, two = Store(tmp_path / "single"), Store(tmp_path / "spark")
    r1 = run_import(one, "fhir", inputs, **kw)
    r2 = spark_import(two, "fhir", inputs, spark=spark, part_bytes=part_bytes, **kw)
    if build:
        build_twins(one)
        spark_build(two, spark)
    return one, two, r1, r2


def tallies(run) -> dict:
    return {s: (c.read, c.written, c.unchanged, c.ignored, c.quarantined, c.deleted, c.ignored_types)
            for s, c in run.counts.items()}


def assert_same_tables(one: Store, two: Store, *, but: tuple[str, ...] = ()) -> None:
    diff = {k: v for k, v in differences(one, two, ignore={"ledger": {"units_read"}}).items() if k not in but}
    assert diff == {}, "\n".join(f"{k}: {v}" for k, v in diff.items())


def test_import_and_build_give_the_same_tables(tmp_path, spark):
    inputs = [FIXTURES / "fhir"]
    # 64 KiB parts: every bulk file is cut into ranges, so line numbers and references cross parts
    one, two, r1, r2 = both(tmp_path, spark, inputs, part_bytes=1 << 16)
    assert_same_tables(one, two)
    assert tallies(r1) == tallies(r2) and r2.totals().reconciles()
    assert table_rows(two, "twin") and sum(table_rows(two, "timeline").values()) > 1000
    # the ledger counts every unit of a file, the ones whose references resolved late included
    ledger = {r["path"]: r["units_read"] for r in two.read("ledger").to_pylist()}
    for path, n in ledger.items():
        if path.endswith(".ndjson"):
            assert n == sum(1 for line in Path(path).read_bytes().splitlines() if line.strip()), path
        else:
            assert n == len(json.loads(Path(path).read_bytes())["entry"]), path


def test_hostile_input_is_quarantined_the_same_way(tmp_path, spark):
    src = tmp_path / "in"
    src.mkdir()
    pat = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-02-03",
           "meta": {"lastUpdated": "2024-05-01T00:00:00Z"}}
    obs = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"},
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
           "effectiveDateTime": "2024-05-01T10:00:00Z", "valueQuantity": {"value": 72, "unit": "/min"}}
    lines = [orjson.dumps(pat), b"{not json", b"", orjson.dumps({"resourceType": "Patient"}),
             orjson.dumps({"resourceType": "Nonsense", "id": "x"}), orjson.dumps(obs),
             orjson.dumps(dict(obs, id="o2", valueQuantity={"value": "high"})),
             orjson.dumps(dict(obs, id="o3", effectiveDateTime="2024-13-45")),
             orjson.dumps(dict(pat, gender="male", meta={"lastUpdated": "2023-01-01T00:00:00Z"})),  # older copy
             orjson.dumps({"resourceType": "Practitioner", "id": "dr", "identifier": [{"system": "s", "value": "1"}]})]
    (src / "a.ndjson").write_bytes(b"\n".join(lines * 3) + b"\n")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": "Observation/o1"}},
        {"request": {"method": "DELETE", "url": "Observation?code=1"}},
        {"fullUrl": "urn:uuid:1", "resource": dict(obs, id="o4", performer=[{"reference": "Practitioner?identifier=s|1"}]),
         "request": {"method": "PUT", "url": "Observation/o4"}},
        "not an entry",
    ]}
    (src / "b.json").write_bytes(orjson.dumps(bundle))
    (src / "c.ndjson").write_bytes(b"")
    one, two, r1, r2 = both(tmp_path, spark, [src], part_bytes=300, build=False)
    assert_same_tables(one, two, but=("runs",))  # the tallies in runs: below
    t = r2.totals()
    assert t.reconciles() and t.quarantined >= 10 and t.deleted == 1 and t.unchanged >= 2
    # The single process drops from its tally a copy that a later deletion in the same batch cancels
    # (Ingest.feed, Deletion): the Spark engine counts it as unchanged, so that its counts reconcile.
    s = r1.totals()
    gap = s.read - (s.written + s.unchanged + s.ignored + s.quarantined)
    assert tallies(r2) == {k: (v[0], v[1], v[2] + gap, *v[3:]) for k, v in tallies(r1).items()}


def test_second_runs_change_nothing(tmp_path, spark):
    from pipeline.engines.build import spark_build
    from pipeline.engines.spark import spark_import

    inputs = [FIXTURES / "fhir" / "bulk"]
    one, two, _, _ = both(tmp_path, spark, inputs, part_bytes=1 << 16)
    again = spark_import(two, "fhir", inputs, spark=spark)
    assert again.totals().read == 0 and "skipped" in again.notes[0]
    run_import(one, "fhir", inputs)
    r1 = run_import(one, "fhir", inputs, reprocess=True)
    r2 = spark_import(two, "fhir", inputs, spark=spark, reprocess=True, part_bytes=1 << 16)
    assert tallies(r1) == tallies(r2) and r2.totals().written == 0
    assert spark_build(two, spark).rebuilt == 0
    build_twins(one)
    assert_same_tables(one, two)


@pytest.mark.slow
def test_shared_synthea_data_gives_the_same_tables(shared_data, tmp_path, spark):
    inputs = [shared_data / "fhir" / "generated-sample-data", shared_data / "fhir" / "sample-bulk-fhir-datasets"]
    one, two, r1, r2 = both(tmp_path, spark, inputs, part_bytes=4 << 20)
    assert_same_tables(one, two)
    assert tallies(r1) == tallies(r2)


def test_cli_and_job_runner_calls(tmp_path, spark, capsys):
    """`twin import/build --engine spark` and the two calls a job runner makes, in one run."""
    from pipeline.cli import main as twin
    from pipeline.engines.spark import SparkEngine
    from pipeline.imports import finish_run
    from pipeline.runs import Run

    bundles = FIXTURES / "fhir" / "bundles"
    cli_store = tmp_path / "cli"
    assert twin(["import", "fhir", str(bundles), "--store", str(cli_store), "--engine", "spark"]) == 0
    assert twin(["check", "--store", str(cli_store), "--engine", "spark", "--master", "local[2]"]) in (0, 4)
    assert twin(["build", "--store", str(cli_store), "--engine", "spark", "--master", "local[2]", "--force"]) == 0
    out = capsys.readouterr().out
    assert "fhir: read 369 units" in out and "(check): " in out and "twins: 3 (3 rebuilt" in out

    store = Store(tmp_path / "job")
    engine = SparkEngine("local[2]")
    with store.locked("run"):
        run = Run(store, "run", inputs=["job.toml"])
        engine.import_files(store, run, "fhir", [bundles], source="ehr")
        finish_run(store, run)
    assert run.counts["ehr"].read == 369 and run.counts["ehr"].reconciles()
    assert engine.build_twins(store).rebuilt == 3
    for name in ("patient", "observation", "twin", "timeline"):
        assert Store(cli_store).count(name) == store.count(name)


def test_spark_without_java_is_a_usage_error(monkeypatch, tmp_path, capsys):
    from pipeline.cli import main as twin

    pytest.importorskip("pyspark")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    code = twin(["build", "--store", str(tmp_path), "--engine", "spark"])
    assert code == 2 and "needs Java" in capsys.readouterr().err



def test_a_malformed_master_is_a_usage_error_before_a_jvm_starts(monkeypatch, tmp_path, capsys):
    from pipeline.cli import main as twin

    SparkSession = pytest.importorskip("pyspark.sql").SparkSession
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/java")

    def no_jvm(*a, **kw):
        raise AssertionError("a JVM was started for a master Spark cannot take")

    monkeypatch.setattr(SparkSession.Builder, "getOrCreate", no_jvm)
    for master in ("local[x]", "bogus", "spark:head"):
        code = twin(["build", "--store", str(tmp_path), "--engine", "spark", "--master", master])
        assert code == 2 and "is not a Spark master" in capsys.readouterr().err, master

def test_a_job_on_spark_gives_the_same_tables(tmp_path, spark):
    from pipeline.engines.spark import SparkEngine
    from pipeline.jobs import parse_job, run_job

    job = parse_job({"source": [{"name": "ehr", "kind": "fhir", "paths": [str(FIXTURES / "fhir")]}],
                     "build": {"force": True}}, tmp_path / "job.toml")
    one, two = Store(tmp_path / "one"), Store(tmp_path / "two")
    run_job(job, store=one)
    engine = SparkEngine("local[2]")
    engine._spark = spark  # the session of this test session
    result = run_job(job, store=two, engine=engine)
    assert result.build_summary and "twins: 6" in result.build_summary
    assert result.gate_passed == run_job(job, store=Store(tmp_path / "three")).gate_passed
    assert_same_tables(one, two)


def _gate_both(store: Store, spark, buckets: int):
    """The gate's result on one store, single process and partitioned by patient on Spark."""
    from datetime import UTC, datetime

    from pipeline.engines.gate import spark_gate
    from pipeline.gate_runs import GATE_TABLES
    from pipeline.validation import load_gate_config, run_gate

    cfg = load_gate_config()
    now = datetime(2026, 11, 28, tzinfo=UTC)
    tables = [t for t in GATE_TABLES if store.exists(t)]
    one = run_gate({t: store.read(t) for t in tables}, cfg, now=now, schema=store.schema.raw)
    two = spark_gate(store, spark, tables, cfg, now=now, buckets=buckets)

    def checks(result):
        return {c.id: c.to_dict() for c in result.checks}

    def failures(result):
        return sorted((f.check, f.table, f.source or "", f.unit_key or "", f.source_ref or "")
                      for f in result.row_failures)

    return (checks(one), failures(one), one.passed), (checks(two), failures(two), two.passed)


def test_the_gate_partitioned_by_patient_gives_the_same_verdict(tmp_path, spark):
    store = Store(tmp_path / "s")
    run_import(store, "fhir", [FIXTURES / "fhir"])
    run_import(store, "hl7v2", [FIXTURES / "hl7v2"])  # public samples with real defects: rows fail
    run_import(store, "dicom", [FIXTURES / "dicom"])
    run_import(store, "csv", [FIXTURES / "devices"])
    one, two = _gate_both(store, spark, buckets=3)
    assert one[1], "the input should make some rows fail a quarantining check"
    assert not one[2], "and the gate fail, so that failing counts are compared, not only passes"
    assert set(one[0]) == set(two[0])
    for cid in one[0]:
        assert one[0][cid] == two[0][cid], cid
    assert one[1] == two[1]


def test_shared_synthea_data_gives_the_same_gate(shared_data, tmp_path, spark):
    store = Store(tmp_path / "s")
    run_import(store, "fhir", [shared_data / "fhir" / "generated-sample-data"])
    one, two = _gate_both(store, spark, buckets=2)
    assert one == two


def test_a_thin_result_pid_keeps_adt_demographics_on_spark_too(tmp_path, spark):
    # create_only (mappings/hl7v2/messages.toml) travels through the executors' unit list
    from pipeline.engines.spark import spark_import
    from tests.test_hl7v2_patient_updates import A01, THIN_ORU

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a01.hl7").write_bytes(A01)
    (tmp_path / "in" / "z-oru.hl7").write_bytes(THIN_ORU)
    one, two = Store(tmp_path / "single"), Store(tmp_path / "spark")
    r1 = run_import(one, "hl7v2", [tmp_path / "in"])
    r2 = spark_import(two, "hl7v2", [tmp_path / "in"], spark=spark)
    assert_same_tables(one, two)
    assert tallies(r1) == tallies(r2)
    [p] = two.read("patient").to_pylist()
    assert p["birth_date"] is not None and p["sex"] == "male"


def test_a_deletion_superseded_in_one_run_is_counted_on_spark_too(tmp_path, spark):
    # the Collector pops a pending deletion as Ingest does, and counts it as Ingest does
    from pipeline.engines.spark import spark_import
    from tests.test_import_fhir import _obs, _write

    folder = tmp_path / "in"
    folder.mkdir()
    tx = {"resourceType": "Bundle", "type": "history",
          "entry": [{"request": {"method": "DELETE", "url": "Observation/o1"}, "response": {"status": "204"}}]}
    (folder / "a-history.json").write_bytes(json.dumps(tx).encode())
    _write(folder / "b.ndjson", _obs(80))
    one, two = Store(tmp_path / "single"), Store(tmp_path / "spark")
    r1 = run_import(one, "fhir", [folder])
    r2 = spark_import(two, "fhir", [folder], spark=spark)
    assert tallies(r1) == tallies(r2) and r2.totals().reconciles()
    assert_same_tables(one, two)
