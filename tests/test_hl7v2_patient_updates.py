"""Whose word counts for a patient and a visit: ADT's. A result or vaccination message with a thin
PID never replaces the Patient an ADT message stored, nor its PV1 the Encounter
(mappings/hl7v2/messages.toml create_only); its results still point at that Encounter."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from pipeline.imports import finish_run, run_import
from pipeline.ingest import Ingest, ViewSet
from pipeline.runs import Run
from pipeline.store import Store
from pipeline.units import Resource
from tests.conftest import FIXTURES

A01 = (FIXTURES / "hl7v2" / "twin-adt-a01.hl7").read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
MRN = b"cbc83bf2-c38e-4617-bc1d-f99fc86a80f0^^^SMARTHOSP&http://hospital.smarthealthit.org&URI^MR"
ORU = (FIXTURES / "hl7v2" / "twin-oru-r01.hl7").read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
THIN_ORU = (b"MSH|^~\\&|TWINLAB|TWINHOSP|TWINLINE|TWINLINE|20240306093000+0100||ORU^R01^ORU_R01|LAB-THIN-1|P|2.5.1\r"
            b"PID|1||" + MRN + b"||Ullrich^Napoleon\r"
            b"OBR|1|ORD-78|LAB-5502|2345-7^Glucose^LN|||20240306070500+0100\r"
            b"OBX|1|NM|2345-7^Glucose [Mass/volume] in Serum or Plasma^LN||99|mg/dL^mg/dL^UCUM|||||F\r")
THIN_VXU = (b"MSH|^~\\&|TWINIIS|TWINHOSP|TWINLINE|TWINLINE|20240307093000+0100||VXU^V04^VXU_V04|IIS-THIN-1|P|2.5.1\r"
            b"PID|1||" + MRN + b"||Ullrich^Napoleon\r"
            b"RXA|0|1|20240307||08^HepB^CVX|999\r")


def patient(store: Store) -> dict:
    [row] = store.read("patient").to_pylist()
    return row


def identifier_types(store: Store) -> set[str]:
    ids = store.read("patient_identifier")
    return set(pc.unique(ids.column("value")).to_pylist())


@pytest.mark.parametrize("thin", [THIN_ORU, THIN_VXU], ids=["ORU", "VXU"])
@pytest.mark.parametrize("one_file", [False, True], ids=["two-runs", "one-file"])
def test_a_thin_pid_after_adt_keeps_the_demographics(tmp_path, thin, one_file):
    store = Store(tmp_path / "s")
    if one_file:
        (tmp_path / "feed.hl7").write_bytes(A01.rstrip(b"\r") + b"\r" + thin)
        run = run_import(store, "hl7v2", [tmp_path / "feed.hl7"])
    else:
        (tmp_path / "a01.hl7").write_bytes(A01)
        run_import(store, "hl7v2", [tmp_path / "a01.hl7"])
        (tmp_path / "thin.hl7").write_bytes(thin)
        run = run_import(store, "hl7v2", [tmp_path / "thin.hl7"])
    c = run.counts["hl7v2"]
    assert c.read == c.written + c.unchanged + c.quarantined and c.quarantined == 0
    p = patient(store)
    assert str(p["birth_date"]).startswith("1995-01-08") and p["sex"] == "male" and p["postal_code"]
    assert "999-12-3456" in identifier_types(store)  # the SSN the A01 brought, used to link sources
    results = store.read("immunization" if thin is THIN_VXU else "observation")
    assert results.num_rows >= 1 and results.column("patient_id").null_count == 0


def test_a_thin_pid_first_makes_the_patient_and_adt_then_completes_it(tmp_path):
    store = Store(tmp_path / "s")
    (tmp_path / "thin.hl7").write_bytes(THIN_ORU)
    run_import(store, "hl7v2", [tmp_path / "thin.hl7"])
    assert patient(store)["birth_date"] is None  # known only from the result: made, thin
    (tmp_path / "a01.hl7").write_bytes(A01)
    run_import(store, "hl7v2", [tmp_path / "a01.hl7"])
    assert str(patient(store)["birth_date"]).startswith("1995-01-08")


def test_an_adt_update_still_replaces_the_patient(tmp_path):
    store = Store(tmp_path / "s")
    (tmp_path / "a01.hl7").write_bytes(A01)
    run_import(store, "hl7v2", [tmp_path / "a01.hl7"])
    a08 = A01.replace(b"ADT^A01^ADT_A01", b"ADT^A08^ADT_A01").replace(b"TWIN-ADT-0001", b"TWIN-ADT-0002")
    a08 = a08.replace(b"|19950108|M|", b"|19950109|M|")
    (tmp_path / "a08.hl7").write_bytes(a08)
    run_import(store, "hl7v2", [tmp_path / "a08.hl7"])
    assert str(patient(store)["birth_date"]).startswith("1995-01-09")


def test_the_summary_counts_messages_beside_the_resources_they_became(tmp_path):
    import re

    run = run_import(Store(tmp_path / "s"), "hl7v2", [FIXTURES / "hl7v2"])
    c = run.counts["hl7v2"]
    [note] = [n for n in run.notes if "message(s)" in n]
    m = re.fullmatch(r"hl7v2: ([\d,]+) message\(s\): ([\d,]+) mapped to ([\d,]+) resources, ([\d,]+) refused"
                     r"(?:; ([\d,]+) stretch\(es\) of bytes that were no message)?", note)
    assert m, note
    messages, mapped, resources, refused, junk = (int((g or "0").replace(",", "")) for g in m.groups())
    assert messages == mapped + refused and messages > 10
    assert resources == c.written + c.unchanged + c.ignored and refused + junk == c.quarantined


def encounter(store: Store) -> dict:
    [row] = store.read("encounter").to_pylist()
    return row


@pytest.mark.parametrize("one_file", [False, True], ids=["two-runs", "one-file"])
def test_results_belong_to_the_visit_adt_admitted(tmp_path, one_file):
    store = Store(tmp_path / "s")
    if one_file:
        (tmp_path / "feed.hl7").write_bytes(A01.rstrip(b"\r") + b"\r" + ORU)
        run_import(store, "hl7v2", [tmp_path / "feed.hl7"])
    else:
        (tmp_path / "a01.hl7").write_bytes(A01)
        run_import(store, "hl7v2", [tmp_path / "a01.hl7"])
        (tmp_path / "oru.hl7").write_bytes(ORU)
        run_import(store, "hl7v2", [tmp_path / "oru.hl7"])
    visit = encounter(store)
    # ADT's description of the stay, not the result's (status unknown, no admission time)
    assert visit["status"] == "in-progress" and str(visit["period_start"]).startswith("2024-03-05")
    for table in ("observation", "diagnostic_report"):
        rows = store.read(table)
        assert rows.num_rows >= 1 and set(rows.column("encounter_id").to_pylist()) == {visit["encounter_id"]}


def test_a_result_first_makes_the_visit_and_adt_then_completes_it(tmp_path):
    store = Store(tmp_path / "s")
    (tmp_path / "oru.hl7").write_bytes(ORU)
    run_import(store, "hl7v2", [tmp_path / "oru.hl7"])
    made = encounter(store)
    assert made["status"] == "unknown" and made["period_start"] is None  # known only from the result
    (tmp_path / "a01.hl7").write_bytes(A01)
    run_import(store, "hl7v2", [tmp_path / "a01.hl7"])
    visit = encounter(store)
    assert visit["encounter_id"] == made["encounter_id"] and visit["status"] == "in-progress"
    assert set(store.read("observation").column("encounter_id").to_pylist()) == {visit["encounter_id"]}


def test_a_result_s_copy_of_what_adt_sent_in_the_same_batch_is_not_mapped(tmp_path):
    """In one batch, a result's copy (create_only) of a record ADT's copy already holds is dropped
    before its views run: none of its rows would be kept. Seen through a copy the views would
    refuse: mapped, it would be quarantined (as it still is when it comes first, or alone)."""
    good = {"resourceType": "Patient", "id": "p1", "birthDate": "1995-01-08"}
    bad = {"resourceType": "Patient", "id": "p1", "birthDate": "not a date"}
    counts = []
    for units in ([Resource(good, "adt"), Resource(bad, "oru", create_only=True)],
                  [Resource(bad, "oru", create_only=True), Resource(good, "adt")]):
        store = Store(tmp_path / f"s{len(counts)}")
        with store.locked("import"):
            run = Run(store, "import")
            ingest = Ingest(store, run, "hl7", "hl7v2", ViewSet(store.schema))
            for u in units:
                ingest.feed(u)
            ingest.finish()
            finish_run(store, run)
        c = run.counts["hl7"]
        counts.append((c.read, c.written, c.unchanged, c.quarantined))
        assert str(patient(store)["birth_date"]).startswith("1995-01-08")
    assert counts == [(2, 1, 1, 0), (2, 1, 0, 1)]
