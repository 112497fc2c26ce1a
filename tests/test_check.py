"""`twin check` as a run: report, quarantine of failing rows, and the verdict `twin build` obeys."""

from __future__ import annotations

import json

import orjson
import pyarrow.compute as pc

from pipeline.cli import main as twin
from pipeline.store import Store
from tests.conftest import FIXTURES


def test_fixtures_pass_and_the_report_is_written(tmp_path, capsys):
    store = str(tmp_path / "s")
    assert twin(["import", "fhir", str(FIXTURES / "fhir"), "--store", store]) == 0
    assert twin(["check", "--store", store, "--report", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "(check): passed" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["passed"] is True and report["summary"]["failed_errors"] == 0
    assert (tmp_path / "r" / "report.html").stat().st_size > 10_000
    runs = Store(tmp_path / "s").read("runs", filter=pc.field("command") == "check").to_pylist()
    assert runs[0]["status"] == "ok" and runs[0]["checks_passed"] > 100 and runs[0]["checks_failed"] == 0


def test_a_failed_gate_stops_the_build_until_forced(tmp_path, capsys):
    store = str(tmp_path / "s")
    assert twin(["import", "fhir", str(FIXTURES / "fhir" / "bundles"), "--store", store]) == 0
    # impossible values: heart rates of 900/min for every patient
    bad = []
    for i, pid in enumerate(["2354df0f-349f-4042-a827-2ef12013e69d", "beaf00da-c197-4e72-8b27-7ee1131348f1",
                             "32342551-fcab-4a4f-bbcd-1e4bc156d781"] * 10):
        bad.append({"resourceType": "Observation", "id": f"hr-{i}", "status": "final",
                    "category": [{"coding": [{"code": "vital-signs"}]}],
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": "2020-01-01T00:00:00Z",
                    "valueQuantity": {"value": 900, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}})
    (tmp_path / "bad.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in bad))
    assert twin(["import", "fhir", str(tmp_path / "bad.ndjson"), "--store", store]) == 0
    assert twin(["check", "--store", store, "--report", str(tmp_path / "r")]) == 4
    out = capsys.readouterr().out
    assert "FAILED" in out and "range" in out
    assert twin(["build", "--store", store]) == 4
    assert "failed the gate" in capsys.readouterr().err
    assert twin(["build", "--store", store, "--force"]) == 0
    s = Store(tmp_path / "s")
    builds = s.read("runs", filter=pc.field("command") == "build").to_pylist()
    assert [b["forced"] for b in builds] == [True]
    # the rows that failed are in quarantine (stage gate), and still in the table: nothing is deleted
    q = s.read("quarantine", filter=pc.field("stage") == "gate").to_pylist()
    assert len(q) == 30 and all(e["target_table"] == "observation" for e in q)
    assert s.read("observation", filter=pc.field("value_number") == 900.0).num_rows == 30


def test_an_empty_store_is_not_checked_and_says_so(tmp_path, capsys):
    # "passed: 0 checks" would tell an integrator the data is clean when there is none
    assert twin(["check", "--store", str(tmp_path / "s")]) == 2
    assert "nothing to check" in capsys.readouterr().err
    assert twin(["build", "--store", str(tmp_path / "s")]) == 2


def _hr(value: float) -> bytes:
    return orjson.dumps({
        "resourceType": "Observation", "id": "hr-typo", "status": "final", "category": [{"coding": [{"code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/2354df0f-349f-4042-a827-2ef12013e69d"}, "effectiveDateTime": "2025-01-01T00:00:00Z",
        "valueQuantity": {"value": value, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}) + b"\n"


def test_a_row_the_gate_quarantined_does_not_feed_the_twin_until_it_passes(tmp_path, capsys):
    # within its threshold one implausible heart rate does not fail the gate, and goes to quarantine:
    # it must not become the twin's latest heart rate; fixed and checked again, it comes back
    store = str(tmp_path / "s")
    (tmp_path / "gate.toml").write_text("[checks.value-range]\nthreshold = 0.5\n")
    assert twin(["import", "fhir", str(FIXTURES / "fhir" / "bundles"), "--store", store]) == 0
    (tmp_path / "hr.ndjson").write_bytes(_hr(900))
    assert twin(["import", "fhir", str(tmp_path / "hr.ndjson"), "--store", store]) == 0
    assert twin(["check", "--store", store, "--config", str(tmp_path / "gate.toml")]) == 0
    assert twin(["build", "--store", store]) == 0
    s = Store(tmp_path / "s")

    def heart_rates():
        return [v["value"] for t in s.read("twin").to_pylist() for v in t["latest_vitals"] or [] if v["code"] == "8867-4"]

    assert 900 not in heart_rates()
    assert s.read("observation", filter=pc.field("value_number") == 900.0).num_rows == 1  # held back, not deleted
    (tmp_path / "hr.ndjson").write_bytes(_hr(90))
    assert twin(["import", "fhir", str(tmp_path / "hr.ndjson"), "--store", store]) == 0
    capsys.readouterr()
    assert twin(["check", "--store", store, "--config", str(tmp_path / "gate.toml")]) == 0
    assert "1 gate quarantine entry resolved" in capsys.readouterr().out
    assert twin(["build", "--store", store]) == 0
    assert 90 in heart_rates()
    assert not s.read("quarantine", filter=(pc.field("stage") == "gate") & (pc.field("status") == "open")).num_rows


def test_one_bad_sample_holds_back_that_sample_not_its_device_chunk(tmp_path):
    # a device file is one unit of many rows: the gate names the row, and the build leaves out only that row
    store = str(tmp_path / "s")
    (tmp_path / "gate.toml").write_text("[checks.value-range]\nthreshold = 0.5\n")
    head = "time,patient_id,device_id,hr\n"
    lines = [f"2024-03-05T08:{m:02d}:00Z,p-1,mon-1,{70 + m}" for m in range(20)]
    lines.append("2024-03-05T08:30:00Z,p-1,mon-1,380")  # within the monitor's limits, past the gate's [10, 350]
    (tmp_path / "vitals.csv").write_text(head + "\n".join(lines) + "\n")
    assert twin(["import", "csv", str(tmp_path / "vitals.csv"), "--format", "twinline-vitals",
                 "--store", store]) == 0
    assert twin(["check", "--store", store, "--config", str(tmp_path / "gate.toml")]) == 0
    s = Store(tmp_path / "s")
    gate = s.read("quarantine", filter=pc.field("stage") == "gate").to_pylist()
    assert len(gate) == 1 and gate[0]["payload_ref"].startswith("observation:") and gate[0]["payload_ref"].endswith("#20")
    assert twin(["build", "--store", store]) == 0
    [twin_row] = s.read("twin").to_pylist()
    [hr] = [v for v in twin_row["latest_vitals"] if v["code"] == "8867-4"]
    assert hr["value"] == 89  # the last sample the gate let through, not 380, and not nothing
    # the export leaves it out too: the twin's FHIR is what the build used
    assert twin(["export", "--all", "--format", "fhir", "--store", store, "--out", str(tmp_path / "out")]) == 0
    bundles = [orjson.loads(f.read_bytes()) for f in (tmp_path / "out").glob("*.json")]  # one Bundle per twin
    values = [e["resource"]["valueQuantity"]["value"] for b in bundles for e in b["entry"]
              if e["resource"]["resourceType"] == "Observation" and "valueQuantity" in e["resource"]]
    assert values == [sum(range(70, 90)) / 20]  # the stream's summary is over the 20 samples let through
