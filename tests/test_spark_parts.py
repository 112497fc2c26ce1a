"""Partitions of the input, without Spark: cutting NDJSON into byte ranges loses nothing.

Reading every range of a file must give exactly the units FhirFile gives for the whole
file (same resources, same `file:line` locators, same rejections), whatever the cut
points; the scan must find every directory resource the full read finds.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.connectors import FILE_CONNECTORS
from pipeline.connectors.fhir_files import FhirFile, Limits
from pipeline.engines.parts import Part, plan_parts, read_range, scan_range, with_line_numbers
from pipeline.engines.tasks import scan_part
from pipeline.fhir import DIRECTORY_TYPES
from pipeline.units import Resource
from tests.conftest import FIXTURES

LIMITS = Limits(max_line_bytes=400)
FHIR = FILE_CONNECTORS["fhir"]

LINES = st.one_of(
    st.builds(lambda i, t: orjson.dumps({"resourceType": t, "id": f"r{i}",
                                         "identifier": [{"system": "s", "value": f"v{i}"}]}),
              st.integers(0, 50), st.sampled_from(["Patient", "Observation", "Practitioner", "Location"])),
    st.just(b'{"resourceType": "Organization", "id": "o1", "identifier": [{"value": "x"}]}'),
    st.just(b'{"resource\\u0054ype":"Organization","id":"o2","identifier":[{"value":"y"}]}'),
    st.just(b""), st.just(b"   "), st.just(b"{not json"), st.just(b'{"id": "no-type"}'),
    st.just(b'{"resourceType": "Patient"}'), st.just(b"[1, 2]"),
    st.just(b'{"resourceType":"Patient","id":"long","x":"' + b"a" * 500 + b'"}'),
)


def units_key(units):
    out = []
    for u in units:
        if isinstance(u, Resource):
            out.append(("resource", u.resource["resourceType"], u.resource["id"], u.source_ref))
        else:
            out.append((type(u).__name__, getattr(u, "reason", None), u.source_ref))
    return out


def by_ranges(path: Path, part_bytes: int):
    parts = plan_parts(FHIR, [path], part_bytes)
    scans = {}
    found = []
    for p in parts:
        for j, piece in enumerate(p.pieces):
            scans[(p.index, j)], hits = scan_range(piece, LIMITS)
            found += [u for _, u in hits]
    units = [u for p in with_line_numbers(parts, scans) for piece in p.pieces for u in read_range(piece, LIMITS)]
    return units, found


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(LINES, max_size=25), part_bytes=st.integers(1, 300), crlf=st.booleans(), final_newline=st.booleans(),
       bom=st.booleans())
def test_ranges_give_the_units_of_the_whole_file(tmp_path_factory, lines, part_bytes, crlf, final_newline, bom):
    path = tmp_path_factory.mktemp("ndjson") / "x.ndjson"
    end = b"\r\n" if crlf else b"\n"
    data = end.join(lines) + (end if final_newline and lines else b"")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    whole = list(FhirFile(path, LIMITS))
    units, found = by_ranges(path, part_bytes)
    assert units_key(units) == units_key(whole)
    def directory(us):
        return sorted((u.resource["resourceType"], u.resource["id"]) for u in us
                      if isinstance(u, Resource) and u.resource["resourceType"] in DIRECTORY_TYPES)

    assert directory(found) == directory(whole)


def test_bulk_log_files_are_skipped_whole(tmp_path):
    log = tmp_path / "log.ndjson"
    log.write_bytes(b'{"exportId": "1", "eventId": "a"}\n' + b'{"resourceType":"Patient","id":"p"}\n' * 20)
    assert list(FhirFile(log)) == []
    units, _ = by_ranges(log, 40)
    assert units == []


def test_empty_and_blank_files_are_one_rejection(tmp_path):
    for name, data in (("empty.ndjson", b""), ("blank.ndjson", b"\n \n\n" * 30)):
        path = tmp_path / name
        path.write_bytes(data)
        units, _ = by_ranges(path, 8)
        assert units_key(units) == units_key(FhirFile(path)) == [("Rejected", "empty-file", str(path))]


def test_small_files_are_packed_and_bundles_stay_whole():
    files = list(FHIR.files([FIXTURES / "fhir"]))
    parts = plan_parts(FHIR, files, 1 << 20)
    pieces = [pc for p in parts for pc in p.pieces]
    assert [pc.path for pc in pieces if pc.start == 0] == [str(f) for f in files]  # input order kept
    assert all(pc.whole for pc in pieces if pc.path.endswith(".json"))
    assert len(parts) < len(files)
    assert Part.from_json(parts[0].to_json()) == parts[0]


def test_scan_finds_the_identifiers_the_single_process_indexes():
    files = list(FHIR.files([FIXTURES / "fhir" / "bulk"]))
    parts = plan_parts(FHIR, files, 50_000)
    found = {(t, s, v, i) for p in parts for _, _, t, s, v, i in scan_part(p, "fhir", {})["identifiers"]}
    expected = set()
    for f in files:
        for line in f.read_bytes().splitlines():
            r = orjson.loads(line)
            if r["resourceType"] in DIRECTORY_TYPES:
                expected |= {(r["resourceType"], i.get("system", ""), i["value"], r["id"])
                             for i in r.get("identifier", []) if "value" in i}
    assert found == expected and len(found) > 100


def test_the_single_process_does_not_load_spark():
    """The default path pays nothing for the extra: importing the CLI and running an import loads no Spark."""
    import subprocess
    import sys

    code = ("import sys, tempfile; from pipeline.imports import run_import; from pipeline.store import Store; "
            "import pipeline.cli; run_import(Store(tempfile.mkdtemp()), 'fhir', [sys.argv[1]]); "
            "print(sorted(m for m in sys.modules if m.startswith(('pyspark', 'py4j', 'pipeline.engines'))))")
    out = subprocess.run([sys.executable, "-c", code, str(FIXTURES / "fhir" / "bundles" / "patient-1.json")],
                         capture_output=True, text=True, check=True, cwd=str(FIXTURES.parent))
    assert out.stdout.strip() == "[]"


def test_a_worker_with_another_key_stops_the_run(monkeypatch, tmp_path):
    import pytest

    from pipeline.engines import tasks
    from pipeline.temporal import utc_now

    ctx = tasks.ImportContext("fhir", "fhir", "fhir", "r-key", utc_now(), str(tmp_path), [], [], {}, "not-the-key")
    tasks._CACHE.clear()
    with pytest.raises(tasks.TaskFailed, match="TWIN_KEY"):
        tasks.map_part(Part(0), ctx)


def test_task_errors_do_not_quote_data():
    import pytest

    from pipeline.engines.tasks import TaskFailed, guarded

    def boom():
        raise ValueError("Jane Doe, born 1970-01-01")

    with pytest.raises(TaskFailed) as e:
        guarded("mapping of partition 3", boom)
    assert "Jane" not in str(e.value) and "ValueError" in str(e.value) and "partition 3" in str(e.value)


def test_columnar_rows_are_written_as_the_single_process_writes_them(tmp_path, monkeypatch):
    """A connector that yields `Rows` (device streams do): mapped by a task, written by the
    Collector, it leaves the same observation rows and tallies as `Ingest.feed`."""
    from datetime import UTC, datetime

    import pyarrow as pa

    from pipeline.connectors import FileConnector
    from pipeline.engines.collect import Collector
    from pipeline.engines.tasks import _CACHE, ImportContext, map_part
    from pipeline.ingest import Ingest, ViewSet
    from pipeline.keys import key_fingerprint
    from pipeline.runs import Run
    from pipeline.store import Store
    from pipeline.units import Rejected, Rows
    from tests.spark_compare import differences

    t0 = datetime(2024, 5, 1, tzinfo=UTC)
    samples = pa.table({
        "observation_id": [f"dev-1-{i}" for i in range(4)], "patient_id": ["p1"] * 4, "is_component": [False] * 4,
        "category_code": ["device"] * 4, "code": ["8867-4"] * 4, "value_number": [60.0, 61.0, 62.0, 63.0],
        "effective_start": pa.array([t0] * 4, pa.timestamp("us", tz="UTC")), "status": ["final"] * 4,
        "device_id": ["monitor-7"] * 4, "unit_key": ["monitor-7/2024-05-01"] * 4, "row_index": pa.array(range(4), pa.int32()),
    })

    def read(path, options):
        yield Rows("observation", samples, f"{path}:1-4", 4, "h1")
        yield Rejected("parse", "bad-row", "line 5: not a number", f"{path}:5")

    log = tmp_path / "monitor.csv"
    log.write_text("csv\n")
    monkeypatch.setitem(FILE_CONNECTORS, "devlog", FileConnector("devlog", "test", lambda p: True, read_file=read))
    stores = []
    for engine in ("single", "tasks"):
        store = Store(tmp_path / engine)
        with store.locked("import"):
            run = Run(store, "import")
            ingest = Ingest(store, run, "icu", "devlog", ViewSet(store.schema))
            if engine == "single":
                ingest.feed_all(read(log, {}))
                ingest.finish()
            else:
                _CACHE.clear()
                stage = tmp_path / "stage"
                stage.mkdir()
                ctx = ImportContext("devlog", "icu", "devlog", run.run_id, t0, str(stage), [], [], {}, key_fingerprint())
                part = Part(0, (plan_parts(FILE_CONNECTORS["devlog"], [log])[0].pieces[0],))
                collector = Collector(ingest)
                collector.add(map_part(part, ctx), [str(log)])
                collector.finish({})
            run.record()
            store.commit(run.run_id)
        c = run.counts["icu"]
        assert (c.read, c.written, c.quarantined) == (5, 4, 1) and c.reconciles()
        stores.append(store)
    assert differences(*stores) == {}
