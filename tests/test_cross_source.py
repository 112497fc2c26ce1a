"""One person in four sources (FHIR, HL7 v2, DICOM, a device log) becomes exactly one twin holding all of it.

The fixtures are prepared so that their identifiers correspond: the medical record
number of fixtures/fhir/bundles/patient-1.json is PID-3 in the HL7 messages, PatientID
(with its issuer) in the DICOM study, and the patient column of the bedside-monitor log.
"""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from pipeline.cli import main as twin
from pipeline.export import export_twins
from pipeline.store import Store
from tests.conftest import FIXTURES

FHIR_ID = "2354df0f-349f-4042-a827-2ef12013e69d"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "store"
    assert twin(["run", "--config", str(FIXTURES / "demo" / "job.toml"), "--store", str(root)]) == 3
    return Store(root)


def test_the_four_records_are_one_twin(demo):
    ident = demo.read("identity").to_pylist()
    mine = [r for r in ident if r["patient_id"] == FHIR_ID]
    assert len(mine) == 1
    tid = mine[0]["twin_id"]
    members = [r for r in ident if r["twin_id"] == tid]
    assert {r["source"] for r in members} == {"ehr", "adt-lab-feed", "pacs", "bedside-monitors"}
    twins = demo.read("twin", filter=pc.field("twin_id") == tid).to_pylist()
    assert len(twins) == 1
    t = twins[0]
    assert sorted(t["sources"]) == ["adt-lab-feed", "bedside-monitors", "ehr", "pacs"]
    assert t["imaging_study_count"] == 1 and t["device_sample_count"] > 0
    # everything the sources sent about this person is under the one twin id
    for source, table in (("adt-lab-feed", "observation"), ("bedside-monitors", "observation"),
                          ("pacs", "imaging_study"), ("ehr", "encounter")):
        rows = demo.read(table, ["source", "twin_id"], filter=pc.field("source") == source)
        assert tid in set(rows.column("twin_id").to_pylist()), (source, table)


def test_only_the_corresponding_records_were_joined(demo):
    ident = demo.read("identity").to_pylist()
    groups: dict[str, set[str]] = {}
    for r in ident:
        groups.setdefault(r["twin_id"], set()).add(r["source"])
    multi = [s for s in groups.values() if len(s) > 1]
    assert multi == [{"ehr", "adt-lab-feed", "pacs", "bedside-monitors"}]


def test_the_twin_exports_as_one_valid_bundle(demo, tmp_path):
    tid = next(r["twin_id"] for r in demo.read("identity").to_pylist() if r["patient_id"] == FHIR_ID)
    result = export_twins(demo, tmp_path / "out", [tid], validate=True)
    assert result.reconciles() and not result.rejected
    assert (tmp_path / "out" / f"{tid}.json").exists()
