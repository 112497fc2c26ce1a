"""Twin assembly: one row per person, the timeline, incremental rebuilds, as-of, NEWS2."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import orjson
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from pipeline.imports import import_files, run_import
from pipeline.runs import Run
from pipeline.store import Store
from pipeline.twins import build_twins, news2_points
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("twins") / "s")
    run_import(store, "fhir", [FIXTURES / "fhir"])
    result = build_twins(store)
    return store, result


def test_one_row_per_person_with_counts(built):
    store, result = built
    twins = store.read("twin")
    assert twins.num_rows == result.twins_total == store.count("patient") == 6
    for row in twins.to_pylist():
        counts = dict(row["counts"])
        for table, n in counts.items():
            assert n == store.read(table, filter=pc.field("twin_id") == row["twin_id"]).num_rows
        assert row["inputs_hash"] and row["as_of"]


def test_latest_vitals_are_the_latest(built):
    store, _ = built
    obs = store.read("observation").to_pylist()
    for row in store.read("twin").to_pylist():
        for v in row["latest_vitals"] or []:
            mine = [o for o in obs if o["twin_id"] == row["twin_id"] and o["code"] == v["code"]
                    and o["value_number"] is not None]
            newest = max(mine, key=lambda o: o["effective_start"])
            assert v["at"] == newest["effective_start"] and v["value"] == newest["value_number"]


def test_timeline_has_every_event_in_order(built):
    store, _ = built
    tl = store.read("timeline")
    obs = store.read("observation", ["is_component", "category_code"])
    main_obs = obs.filter(pc.invert(obs.column("is_component"))).num_rows
    expected = (store.count("encounter") + main_obs + store.count("condition") + store.count("procedure")
                + store.count("immunization") + store.count("medication") + store.count("diagnostic_report"))
    assert tl.num_rows == expected
    for tw in set(tl.column("twin_id").to_pylist()):
        times = [t for t in tl.filter(pc.field("twin_id") == tw).column("at").to_pylist() if t is not None]
        assert times == sorted(times)


def test_only_changed_twins_are_rebuilt(tmp_path):
    store = Store(tmp_path / "s")
    run_import(store, "fhir", [FIXTURES / "fhir" / "bundles"])
    assert build_twins(store).rebuilt == 3
    assert build_twins(store).rebuilt == 0
    extra = {"resourceType": "Observation", "id": "new-hr", "status": "final",
             "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
             "subject": {"reference": "Patient/2354df0f-349f-4042-a827-2ef12013e69d"},
             "effectiveDateTime": "2030-01-01T00:00:00Z", "valueQuantity": {"value": 61, "code": "/min"}}
    (tmp_path / "x.ndjson").write_bytes(orjson.dumps(extra) + b"\n")
    run_import(store, "fhir", [tmp_path / "x.ndjson"])
    result = build_twins(store)
    assert (result.rebuilt, result.unchanged) == (1, 2)
    twin = store.read("twin", filter=pc.field("patient_ids").is_valid()).to_pylist()
    hr = [v for t in twin for v in (t["latest_vitals"] or []) if v["code"] == "8867-4" and v["value"] == 61]
    assert len(hr) == 1


def test_as_of_rebuilds_the_state_known_then(tmp_path):
    store = Store(tmp_path / "s")
    run_import(store, "fhir", [FIXTURES / "fhir" / "bundles" / "patient-1.json"])
    time.sleep(1.1)
    then = datetime.now(UTC)
    time.sleep(1.1)
    run_import(store, "fhir", [FIXTURES / "fhir" / "bundles" / "patient-2.json"])
    assert build_twins(store).twins_total == 2
    past = build_twins(store, as_of=then)
    assert past.twins_total == 1
    assert store.read("twin").num_rows == 1
    assert store.read("twin").column("as_of").to_pylist() == [then.replace(microsecond=then.microsecond)]
    assert build_twins(store).twins_total == 2


def test_as_of_sees_committed_runs_only_and_reads_merged_tables(tmp_path):
    # the state known at T is the store's commit point at T: not what a run killed before T had
    # written (rolled back later), nothing before the first run, and tables rewritten by MERGE readable
    store = Store(tmp_path / "s")
    before_any = datetime.now(UTC)
    time.sleep(1.1)
    run_import(store, "fhir", [FIXTURES / "fhir" / "bundles" / "patient-1.json"])
    changed = orjson.loads((FIXTURES / "fhir" / "bundles" / "patient-1.json").read_bytes())
    patient = next(e["resource"] for e in changed["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["gender"] = "unknown"
    (tmp_path / "p.ndjson").write_bytes(orjson.dumps(patient) + b"\n")
    run_import(store, "fhir", [tmp_path / "p.ndjson"])  # a changed unit: a MERGE rewrites the patient table
    assert any(h.get("operation") == "MERGE" for h in DeltaTable(str(store.table_path("patient"))).history())
    with store.locked("killed"):  # a run that wrote and never committed, as kill -9 leaves it
        killed = Run(store, "import")
        import_files(store, killed, "fhir", [FIXTURES / "fhir" / "bundles" / "patient-2.json"])
    time.sleep(1.1)
    during_the_killed_run = datetime.now(UTC)
    time.sleep(1.1)
    assert build_twins(store).twins_total == 1  # rolls the killed run back first
    assert build_twins(store, as_of=during_the_killed_run).twins_total == 1
    assert store.read("twin").column("sex").to_pylist() == ["unknown"]
    assert build_twins(store, as_of=before_any).twins_total == 0


def _vital(pid, code, value, at, unit="/min", coded=None):
    r = {"resourceType": "Observation", "id": f"{code}-{at[:13]}", "status": "final",
         "category": [{"coding": [{"code": "vital-signs"}]}],
         "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
         "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": at}
    if coded:
        r["valueCodeableConcept"] = {"coding": [{"system": "http://loinc.org", "code": coded}]}
    else:
        r["valueQuantity"] = {"value": value, "code": unit}
    return r


def test_news2_from_recent_vitals_with_input_times(tmp_path):
    pid = "n2"
    patient = {"resourceType": "Patient", "id": pid, "birthDate": "1950-01-01", "gender": "male"}
    t = "2024-05-01T10:00:00Z"
    rows = [patient, _vital(pid, "9279-1", 22, t), _vital(pid, "59408-5", 95, t, "%"), _vital(pid, "8480-6", 105, t, "mm[Hg]"),
            _vital(pid, "8867-4", 115, t), _vital(pid, "8310-5", 38.5, t, "Cel"), _vital(pid, "67775-7", None, t, coded="LA9340-6")]
    (tmp_path / "v.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    store = Store(tmp_path / "s")
    run_import(store, "fhir", [tmp_path / "v.ndjson"])
    build_twins(store)
    row = store.read("twin").to_pylist()[0]
    # RR 22 -> 2, SpO2 95 -> 1, SBP 105 -> 1, HR 115 -> 2, T 38.5 -> 1, alert -> 0, air -> 0
    assert row["news2_score"] == 7
    assert {i["name"] for i in row["news2_inputs"]} >= {"respiratory_rate", "spo2", "consciousness"}
    assert all(i["at"] is not None for i in row["news2_inputs"] if not i["name"].startswith("oxygen"))
    # without one input, no score
    store2 = Store(tmp_path / "s2")
    (tmp_path / "w.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows[:-1]))
    run_import(store2, "fhir", [tmp_path / "w.ndjson"])
    build_twins(store2)
    assert store2.read("twin").to_pylist()[0]["news2_score"] is None


@pytest.mark.parametrize("name, value, points", [
    ("respiratory_rate", 8, 3), ("respiratory_rate", 12, 0), ("respiratory_rate", 25, 3),
    ("spo2", 91, 3), ("spo2", 96, 0), ("systolic_bp", 90, 3), ("systolic_bp", 220, 3), ("systolic_bp", 111, 0),
    ("heart_rate", 40, 3), ("heart_rate", 131, 3), ("heart_rate", 51, 0), ("temperature", 35.0, 3),
    ("temperature", 39.1, 2), ("temperature", 36.1, 0), ("consciousness", "LA9340-6", 0), ("consciousness", "V", 3),
])
def test_news2_chart(name, value, points):
    assert news2_points(name, value) == points


def test_a_twin_without_a_patient_record_is_built_and_flagged(tmp_path):
    orphan = _vital("nobody", "8867-4", 70, "2024-01-01T00:00:00Z")
    (tmp_path / "o.ndjson").write_bytes(orjson.dumps(orphan) + b"\n")
    store = Store(tmp_path / "s")
    run_import(store, "fhir", [tmp_path / "o.ndjson"])
    run_import(store, "fhir", [FIXTURES / "fhir" / "bundles" / "patient-1.json"])
    build_twins(store)
    rows = {tuple(r["patient_ids"]): r for r in store.read("twin").to_pylist()}
    assert () in rows and "no-patient-record" in rows[()]["quality_flags"]
