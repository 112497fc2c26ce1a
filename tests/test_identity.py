"""Identity linking: one person, one twin, across sources; never a guess."""

from __future__ import annotations

import orjson
import pyarrow as pa
import pytest

from pipeline.cli import main as twin
from pipeline.errors import ConfigError
from pipeline.identity import (
    IdentityConfig,
    demographic_score,
    link_records,
    parse_identity_config,
    record_key,
    twin_id_for_record,
)
from pipeline.imports import run_import
from pipeline.store import Store
from pipeline.twins import build_twins
from tests.conftest import FIXTURES

BUNDLE = FIXTURES / "fhir" / "bundles" / "patient-1.json"


def twins_of(store: Store, table: str) -> set[str]:
    return set(store.read(table, ["twin_id"]).column("twin_id").to_pylist())


def test_the_same_person_from_two_sources_is_one_twin(tmp_path):
    store = Store(tmp_path / "s")
    run_import(store, "fhir", [BUNDLE], source="hospital-a")
    run = run_import(store, "fhir", [BUNDLE], source="hospital-b", reprocess=True)
    assert any("joined another twin" in n for n in run.notes)
    # every row of both sources now carries one twin id
    for table in ("patient", "observation", "encounter", "condition"):
        assert len(twins_of(store, table)) == 1, table
    result = build_twins(store)
    assert result.twins_total == 1
    row = store.read("twin").to_pylist()[0]
    assert sorted(row["patient_ids"]) == ["hospital-a/2354df0f-349f-4042-a827-2ef12013e69d",
                                          "hospital-b/2354df0f-349f-4042-a827-2ef12013e69d"]
    assert dict(row["counts"])["patient"] == 2
    assert row["twin_id"] == twin_id_for_record("hospital-a", "2354df0f-349f-4042-a827-2ef12013e69d")


def _patient(pid, family, given, birth, idents=(), links=()):
    r = {"resourceType": "Patient", "id": pid, "name": [{"family": family, "given": [given]}], "birthDate": birth,
         "gender": "female", "address": [{"postalCode": "02139"}]}
    if idents:
        r["identifier"] = [{"system": s, "value": v, "type": {"coding": [{"code": t}]}} for s, v, t in idents]
    if links:
        r["link"] = [{"other": {"reference": f"Patient/{o}"}, "type": t} for o, t in links]
    return r


def _write(path, *resources):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    return path


def test_same_name_and_birth_date_are_not_merged_by_the_deterministic_rules(tmp_path):
    store = Store(tmp_path / "s")
    a = _patient("a1", "Smith", "Ann", "1970-01-01", [("urn:mrn:a", "111", "MR")])
    b = _patient("b1", "Smith", "Ann", "1970-01-01", [("urn:mrn:b", "999", "MR")])
    run_import(store, "fhir", [_write(tmp_path / "a.ndjson", a)], source="a")
    run_import(store, "fhir", [_write(tmp_path / "b.ndjson", b)], source="b")
    assert len(twins_of(store, "patient")) == 2
    # the optional demographic rule would link them, and says so
    cfg = IdentityConfig(demographic=True, threshold=0.95)
    pats = store.read("patient")
    linkage = link_records(pats, store.read("patient_identifier"), store.read("patient_link"), cfg)
    assert linkage.by_rule == {"demographic": 1}
    assert linkage.candidates[0]["linked"] and linkage.candidates[0]["score"] == 1.0


def test_namespace_aliases_link_an_hl7_style_authority_to_a_fhir_system(tmp_path):
    store = Store(tmp_path / "s")
    fhir_side = _patient("f1", "Jones", "Bo", "1980-02-02", [("https://github.com/synthetichealth/synthea", "X42", "MR")])
    hl7_side = _patient("h1", "JONES", "BO", "1980-02-02", [("SYNTHEA", "X42", "MR")])
    run_import(store, "fhir", [_write(tmp_path / "f.ndjson", fhir_side)], source="fhir")
    run_import(store, "fhir", [_write(tmp_path / "h.ndjson", hl7_side)], source="adt")
    assert len(twins_of(store, "patient")) == 1


def test_patient_link_merges_and_conflicts_are_reported(tmp_path, capsys):
    store = Store(tmp_path / "s")
    old = _patient("old", "Lee", "Kim", "1990-03-03", [("urn:mrn", "1", "MR")], links=[("new", "replaced-by")])
    new = _patient("new", "Lee", "Kim", "1990-03-03", [("urn:mrn", "2", "MR")])
    # one identifier on two people with different birth dates
    x = _patient("x", "Park", "Jo", "1950-01-01", [("urn:ssn", "555", "SS")])
    y = _patient("y", "Park", "Jo", "1951-01-01", [("urn:ssn", "555", "SS")])
    # one person with two medical record numbers in one namespace (a merge retires the old one; this is no merge)
    m1 = _patient("m1", "Ito", "Ai", "1960-06-06", [("urn:ssn", "777", "SS"), ("urn:mrn", "7", "MR")])
    m2 = _patient("m2", "Ito", "Ai", "1960-06-06", [("urn:ssn", "777", "SS"), ("urn:mrn", "8", "MR")])
    run = run_import(store, "fhir", [_write(tmp_path / "p.ndjson", old, new, x, y, m1, m2)])
    assert any("conflict" in n for n in run.notes)
    assert len(twins_of(store, "patient")) == 3
    assert twin(["link-report", "--store", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "3 persons from 6 patient records" in out
    assert "identifier 2" in out and "patient-link 1" in out
    assert out.count("two-mrns-in-one-namespace") == 1 and "Patient/m1" in out
    assert "identifier-on-different-birth-dates" in out and "two-mrns-in-one-namespace" in out
    assert "555" not in out  # identifier values are never printed


def test_twin_ids_are_stable_across_stores_and_reveal_nothing(tmp_path):
    ids = []
    for name in ("one", "two"):
        store = Store(tmp_path / name)
        run_import(store, "fhir", [FIXTURES / "fhir"])
        ids.append(sorted(twins_of(store, "patient")))
    assert ids[0] == ids[1]
    assert not any("2354df0f" in t for t in ids[0])


def test_config_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        parse_identity_config({"identifiers": {"link_types": "MR", "colour": 1}, "demographic": {"threshold": 2},
                               "namespaces": [{"systems": []}], "extra": 1})
    text = str(e.value)
    for key in ("identifiers.link_types", "identifiers.colour", "demographic.threshold", "namespaces[0].systems", ".extra"):
        assert key in text


def test_demographic_score_uses_only_shared_fields():
    a = {"name_family": "Müller", "name_given": "Anna Maria", "birth_date": 1, "sex": "female", "postal_code": None}
    b = {"name_family": "MULLER", "name_given": "anna", "birth_date": 1, "sex": "male", "postal_code": "12345"}
    w = {"family": 0.3, "given": 0.2, "birth_date": 0.3, "sex": 0.1, "postal_code": 0.1}
    assert demographic_score(a, b, w) == pytest.approx(0.8 / 0.9)


def test_link_records_on_empty_tables():
    empty = {n: pa.table({c: pa.array([], pa.string()) for c in cols}) for n, cols in {
        "p": ["source", "patient_id", "name_family", "name_given", "birth_date", "sex", "postal_code"],
        "i": ["source", "patient_id", "system", "value", "type_code"],
        "l": ["source", "patient_id", "other_patient_id", "link_type"]}.items()}
    linkage = link_records(empty["p"], empty["i"], empty["l"], IdentityConfig())
    assert linkage.groups == {} and record_key("s", "p") == "s|Patient/p"


def test_linking_does_not_depend_on_the_order_of_the_rows():
    """Groups, rules, link counts and the conflicts (in namespace, value order) are the
    same however the tables are ordered; an identifier held by one record (p5's urn:c)
    joins nothing."""
    import random

    births = [0, 0, 86_400_000_000, 0, 0, 0]  # p2 shares an MRN with p0/p1 under another birth date
    patients = pa.table({"source": ["s"] * 6, "patient_id": [f"p{i}" for i in range(6)],
                         "name_family": [None] * 6, "name_given": [None] * 6,
                         "birth_date": pa.array(births, pa.timestamp("us", "UTC")),
                         "sex": [None] * 6, "postal_code": [None] * 6})
    idents = [("p0", "urn:b", "9", "MR"), ("p1", "urn:b", "9", "MR"), ("p2", "urn:b", "9", "MR"),
              ("p3", "urn:a", "5", "MR"), ("p4", "urn:a", "5", "MR"), ("p4", "urn:a", "6", "MR"),
              ("p5", "urn:a", "7", "MR"), ("p2", "urn:a", "7", "MR"), ("p3", "urn:a", "5", "MR"),
              ("p5", "urn:c", "1", "MR")]
    cols = ["patient_id", "system", "value", "type_code"]

    def link(rows):
        table = pa.table({"source": ["s"] * len(rows), **{c: [r[i] for r in rows] for i, c in enumerate(cols)}})
        links = pa.table({c: pa.array([], pa.string()) for c in ["source", "patient_id", "other_patient_id", "link_type"]})
        return link_records(patients, table, links, IdentityConfig())

    first = link(idents)
    assert sorted(map(sorted, first.groups.values())) == [
        ["s|Patient/p0", "s|Patient/p1", "s|Patient/p2", "s|Patient/p5"], ["s|Patient/p3", "s|Patient/p4"]]
    assert first.by_rule == {"identifier": 4}
    assert [(c["kind"], c["namespace"], c["records"]) for c in first.conflicts] == [
        ("identifier-on-different-birth-dates", "urn:a", ["s|Patient/p2", "s|Patient/p5"]),
        ("identifier-on-different-birth-dates", "urn:b", ["s|Patient/p0", "s|Patient/p1", "s|Patient/p2"]),
        ("two-mrns-in-one-namespace", "urn:a", ["s|Patient/p3", "s|Patient/p4"])]
    rnd = random.Random(3)
    for _ in range(20):
        rows = idents[:]
        rnd.shuffle(rows)
        again = link(rows)
        assert (again.groups, again.rules, again.by_rule, again.conflicts) == (
            first.groups, first.rules, first.by_rule, first.conflicts)
