"""HL7 v2 -> FHIR R4: key fields against FHIR written by hand from the HL7 v2 and FHIR specs.

The expected resources below were written from the messages and the v2-to-FHIR IG maps,
not from this code's output. They name only the fields that matter (identifiers, codes,
values, units, times with their offsets, statuses, references); extra fields are allowed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.hl7v2 import build_ack, parse_message, read_msh
from pipeline.hl7v2_datatypes import DTM_SYNTAX, NM_SYNTAX, ConversionError, dtm_groups, dtm_to_fhir, parse_nm
from pipeline.hl7v2_fhir import Mappings, Run, default_mappings, map_message
from pipeline.resources import mappings_dir

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "hl7v2"
_spec = importlib.util.spec_from_file_location("make_fixtures", FIX / "make_fixtures.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
V3_INTERP = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def read(name: str) -> bytes:
    return (FIX / name).read_bytes()


def mapped(name: str, **kw) -> list[dict]:
    out = map_message(read(name), name, **kw)
    assert out.rejected is None, out.rejected
    assert out.ack_code == "AA"
    return [r.resource for r in out.resources]


def of_type(resources: list[dict], rtype: str) -> list[dict]:
    return [r for r in resources if r["resourceType"] == rtype]


def assert_subset(expected: Any, actual: Any, path: str = "$") -> None:
    """Every key of `expected` is in `actual` with the same value; lists match item by item."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected an object, got {actual!r}"
        for k, v in expected.items():
            assert k in actual, f"{path}.{k} missing in {json.dumps(actual)[:400]}"
            assert_subset(v, actual[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{path}: {actual!r}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_subset(e, a, f"{path}[{i}]")
    else:
        assert expected == actual, f"{path}: expected {expected!r}, got {actual!r}"


def validate(resource: dict) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


TWIN_IDENTIFIER = {"system": fx.TWIN_MRN_SYSTEM, "value": fx.TWIN_MRN,
                   "type": {"coding": [{"system": V2_0203, "code": "MR"}]}, "assigner": {"display": "SMARTHOSP"}}


# -- ADT ----------------------------------------------------------------------------------------


def test_adt_a01_patient_and_encounter():
    patient, encounter = mapped("twin-adt-a01.hl7")
    assert_subset({
        "resourceType": "Patient",
        "identifier": [TWIN_IDENTIFIER,
                       {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "999-12-3456",
                        "type": {"coding": [{"code": "SS"}]}}],
        "active": True,
        "name": [{"family": "Ullrich", "given": ["Napoleon"], "prefix": ["Mr."], "use": "official"}],
        "birthDate": "1995-01-08",
        "gender": "male",
        "address": [{"line": ["12 Rue Invented", "Apt 4"], "city": "Olathe", "state": "KS", "postalCode": "66061",
                     "country": "US", "use": "home"}],
        "telecom": [{"system": "phone", "use": "home"}, {"system": "phone", "use": "work"}],
    }, patient)
    race = next(e for e in patient["extension"] if e["url"].endswith("us-core-race"))
    assert_subset([{"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238",
                                                          "code": "2106-3"}},
                   {"url": "text", "valueString": "White"}], race["extension"])
    ethnicity = next(e for e in patient["extension"] if e["url"].endswith("us-core-ethnicity"))
    assert ethnicity["extension"][0]["valueCoding"]["code"] == "2186-5"
    assert_subset({
        "resourceType": "Encounter",
        "status": "in-progress",                       # A01: admitted (IG Event[EncounterStatus])
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": f"Patient/{patient['id']}"},
        "identifier": [{"value": fx.VISIT_NUMBER, "type": {"coding": [{"system": V2_0203, "code": "VN"}]}}],
        "period": {"start": "2024-03-05T08:00:00+01:00"},
        "location": [{"location": {"display": "4E, 412, B, TWINHOSP"}, "status": "active"}],
        "hospitalization": {"admitSource": {"coding": [{"code": "7"}]}},
    }, encounter)
    assert "end" not in encounter["period"]


def test_adt_a03_finishes_the_same_encounter():
    p1, e1 = mapped("twin-adt-a01.hl7")
    p3, e3 = mapped("twin-adt-a03.hl7")
    assert (p1["id"], e1["id"]) == (p3["id"], e3["id"])      # same visit number, same person
    assert_subset({"status": "finished",
                   "period": {"start": "2024-03-05T08:00:00+01:00", "end": "2024-03-09T16:30:00+01:00"},
                   "hospitalization": {"dischargeDisposition": {"coding": [
                       {"system": "http://terminology.hl7.org/CodeSystem/v2-0112", "code": "01"}]}}}, e3)


def test_adt_a40_links_both_records_and_keeps_them():
    (old,) = mapped("twin-adt-a28-old.hl7")
    survivor, merged = mapped("twin-adt-a40.hl7")
    (current, _) = mapped("twin-adt-a01.hl7")
    assert survivor["id"] == current["id"]
    assert merged["id"] == old["id"]                  # the record created before, not a new one
    assert_subset({"active": True, "link": [{"other": {"reference": f"Patient/{old['id']}"}, "type": "replaces"}]},
                  survivor)
    assert_subset({"active": False,
                   "identifier": [{"system": fx.TWIN_MRN_SYSTEM, "value": fx.OLD_MRN}],
                   "link": [{"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}]}, merged)


def test_fhir_converter_a40_with_two_pairs():
    resources = mapped("fhir-converter/ADT-A40-02.hl7")
    survivors = [r for r in resources if r.get("active")]
    merged = [r for r in resources if r.get("active") is False]
    assert [r["identifier"][0]["value"] for r in survivors] == ["12345", "145"]
    assert [r["identifier"][0]["value"] for r in merged] == ["56789", "569"]
    for s, m in zip(survivors, merged, strict=True):  # each PID with its own MRG, not the first one
        assert s["link"] == [{"other": {"reference": f"Patient/{m['id']}"}, "type": "replaces"}]
        assert m["link"] == [{"other": {"reference": f"Patient/{s['id']}"}, "type": "replaced-by"}]
        assert s["identifier"][0]["assigner"] == {"display": "BCBS"}


@pytest.mark.parametrize("name, status", [
    ("fhir-converter/ADT-A01-02.hl7", "in-progress"), ("fhir-converter/ADT-A03-02.hl7", "finished"),
    ("fhir-converter/ADT-A04-02.hl7", "finished"), ("fhir-converter/ADT-A08-02.hl7", "unknown"),
    ("fhir-converter/ADT-A11-02.hl7", "cancelled"), ("fhir-converter/ADT-A13-02.hl7", "in-progress"),
])
def test_encounter_status_follows_the_trigger_event(name, status):
    (encounter,) = of_type(mapped(name), "Encounter")
    # A04-02 carries a discharge time (PV1-45): finished (IG PV1[Encounter]); A11 and A13 carry one
    # too, but a cancel wins
    assert encounter["status"] == status
    planned = read(name).replace(b"|20150209113419+0110|", b"||") if "A04" in name else None
    if planned:
        (enc,) = [r.resource for r in map_message(planned, "x").resources if r.resource["resourceType"] == "Encounter"]
        assert enc["status"] == "planned"


@pytest.mark.parametrize("name", ["fhir-converter/ADT-A28-02.hl7", "fhir-converter/ADT-A31-02.hl7"])
def test_person_updates_make_no_encounter(name):
    assert [r["resourceType"] for r in mapped(name)] == ["Patient"]


def test_fhir_converter_adt_a01_identifiers_keep_authority_and_type():
    (patient,) = of_type(mapped("fhir-converter/ADT-A01-02.hl7"), "Patient")
    ids = {i["value"]: i for i in patient["identifier"]}
    # PID-3: PATID1234^5^M11^test1&2.16.1&HCD^MR  (HD type HCD is no URI kind: assigner only)
    assert_subset({"type": {"coding": [{"system": V2_0203, "code": "MR"}]}, "assigner": {"display": "test1"}},
                  ids["PATID1234"])
    assert "system" not in ids["PATID1234"]
    # PID-3 repetition 2: 123456789^^^USSSA^SS (USSSA is in the assigning authority table)
    assert_subset({"system": "http://hl7.org/fhir/sid/us-ssn", "type": {"coding": [{"code": "SS"}]}},
                  ids["123456789"])
    # PID-2 (older external id) and PID-4 (alternate id) are kept too
    assert "1234567" in ids and "PATID567" in ids
    assert patient["birthDate"] == "1988-08-18"
    assert patient["deceasedDateTime"] == "2008-08-25T11:16:30+01:15"  # PID-29 with its own offset


def test_python_hl7_sample_msh_v23_adt():
    patient, encounter = mapped("python-hl7/sample_msh.hl7")
    ids = {i["value"]: i for i in patient["identifier"]}
    assert_subset({"type": {"coding": [{"code": "MR"}]}, "assigner": {"display": "MSH_MRN"}}, ids["2148790"])
    assert_subset({"type": {"coding": [{"code": "CM"}]}, "assigner": {"display": "MSH_EMPI"}}, ids["162840"])
    assert patient["birthDate"] == "1952-11-29" and patient["gender"] == "female"
    assert encounter["class"]["code"] == "IMP"
    # MSH-7 has no offset, nor has PV1-44: the configured default zone (UTC) is used
    assert encounter["period"]["start"] == "2014-02-10T22:53:00+00:00"


# -- ORU --------------------------------------------------------------------------------------------


def test_oru_r01_observations_and_report():
    resources = mapped("twin-oru-r01.hl7")
    (patient,) = of_type(resources, "Patient")
    obs = of_type(resources, "Observation")
    (report,) = of_type(resources, "DiagnosticReport")
    (device,) = of_type(resources, "Device")                     # two OBX-18, one monitor
    assert device["identifier"] == [{"value": "MON-0042", "system": "urn:oid:2.16.840.1.113883.3.7777.9",
                                     "assigner": {"display": "TWINHOSP"}}]
    subject = {"reference": f"Patient/{patient['id']}"}
    # the stay of PV1-19: the Encounter the A01 made (same id), which results do not describe
    (encounter,) = of_type(resources, "Encounter")
    (_, admitted) = mapped("twin-adt-a01.hl7")
    assert encounter["id"] == admitted["id"]
    assert_subset({"status": "unknown", "class": {"code": "IMP"}, "subject": subject,
                   "identifier": [{"value": fx.VISIT_NUMBER, "type": {"coding": [{"code": "VN"}]}}]}, encounter)
    visit = {"reference": f"Encounter/{encounter['id']}"}
    assert all(o["encounter"] == visit for o in obs) and report["encounter"] == visit
    lab = [{"coding": [{"system": OBS_CAT, "code": "laboratory"}]}]
    expected = [
        {"status": "final", "category": lab, "subject": subject,
         "code": {"coding": [{"system": LOINC, "code": "2345-7"}]},
         "valueQuantity": {"value": 182, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"},
         "effectiveDateTime": "2024-03-06T07:05:00+01:00",
         "referenceRange": [{"text": "70-99", "low": {"value": 70, "code": "mg/dL"}, "high": {"value": 99}}],
         "interpretation": [{"coding": [{"system": V3_INTERP, "code": "H"}]}]},
        {"status": "corrected",                                           # OBX-11 C
         "code": {"coding": [{"system": LOINC, "code": "2823-3"}]},
         "valueQuantity": {"value": 4.2, "unit": "mmol/l", "system": UCUM, "code": "mmol/L"},  # unit to UCUM
         "interpretation": [{"coding": [{"code": "N"}]}]},
        {"code": {"coding": [{"code": "33914-3"}]},                       # SN >^90
         "valueQuantity": {"value": 90, "comparator": ">", "code": "mL/min/{1.73_m2}"},
         "referenceRange": [{"text": ">60", "low": {"value": 60}}]},
        {"code": {"coding": [{"code": "5778-6"}]},                        # CWE
         "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "371244009",
                                              "display": "Yellow"}]}},
        {"code": {"coding": [{"code": "5767-9"}]}, "valueString": "Clear & pale"},            # ST, \T\
        {"status": "preliminary", "code": {"coding": [{"code": "48767-8"}]},                 # TX, escapes
         "valueString": "Reviewed by lab\nSecond line | pipe A",
         "note": [{"text": "Specimen slightly hemolysed"}]},
        {"code": {"coding": [{"code": "11778-8"}]}, "valueDateTime": "2024-10-15"},           # DT
        {"category": [{"coding": [{"system": OBS_CAT, "code": "vital-signs"}]}],             # a vital sign
         "code": {"coding": [{"code": "8867-4"}]},
         "valueQuantity": {"value": 72, "system": UCUM, "code": "/min"},
         "effectiveDateTime": "2024-03-06T02:05:00-05:00",                                    # offset kept
         "device": {"reference": f"Device/{device['id']}"}},
        {"category": [{"coding": [{"code": "vital-signs"}]}], "code": {"coding": [{"code": "9279-1"}]},
         "valueQuantity": {"value": 16, "code": "/min"}, "device": {"reference": f"Device/{device['id']}"}},
    ]
    assert len(obs) == len(expected)
    for e, a in zip(expected, obs, strict=True):
        assert_subset(e, a)
    assert_subset({
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "24323-8"}]},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "CH"}]}],
        "subject": subject,
        "effectiveDateTime": "2024-03-06T07:05:00+01:00",
        "issued": "2024-03-06T09:25:00+01:00",
        "identifier": [{"value": "ORD-77", "type": {"coding": [{"code": "PLAC"}]}},
                       {"value": "LAB-5501", "type": {"coding": [{"code": "FILL"}]}}],
        "result": [{"reference": f"Observation/{o['id']}"} for o in obs],
    }, report)


def test_results_name_a_visit_only_by_its_number():
    """A result's PV1 without PV1-19 names no visit another message could find: no Encounter is
    made for it, and the results reference none. Without a PV1 there is none either."""
    raw = read("twin-oru-r01.hl7")
    pv1 = next(s for s in raw.split(b"\r") if s.startswith(b"PV1|"))
    for changed in (raw.replace(pv1, pv1.rsplit(b"|", 1)[0] + b"|"), raw.replace(pv1 + b"\r", b"")):
        out = map_message(changed, "x")
        assert out.rejected is None
        resources = [r.resource for r in out.resources]
        assert not of_type(resources, "Encounter")
        assert not [r for r in resources if "encounter" in r]
        assert len(of_type(resources, "Observation")) == 9


def test_a_result_s_visit_never_replaces_adt_s():
    """Whose word counts for a visit: ADT's. The Encounter of a result or vaccination message is made
    only when none is stored (create_only); ADT's Encounter is not."""
    oru = map_message(read("twin-oru-r01.hl7"), "x")
    vxu = map_message(read("fhir-converter/VXU-V04-01.hl7"), "x")
    adt = map_message(read("twin-adt-a01.hl7"), "x")
    assert {(r.resource["resourceType"], r.create_only) for r in oru.resources + vxu.resources
            if r.resource["resourceType"] in ("Patient", "Encounter")} == {("Patient", True), ("Encounter", True)}
    assert [r.create_only for r in adt.resources] == [False, False]


def test_fhir_converter_oru_sn_and_units():
    patient, obs, report = mapped("fhir-converter/ORU-R01-RMGEAD.hl7")
    # OBX|1|SN|1554-5^GLUCOSE^...||^182|mg/dl|70_105|H|||F  under OBR-7 20020215073000+0600
    assert_subset({"status": "final", "code": {"coding": [{"code": "1554-5", "display": "GLUCOSE"}]},
                   "valueQuantity": {"value": 182, "unit": "mg/dl", "system": UCUM, "code": "mg/dL"},
                   "effectiveDateTime": "2002-02-15T07:30:00+06:00",
                   "referenceRange": [{"text": "70_105"}],
                   "interpretation": [{"coding": [{"system": V3_INTERP, "code": "H"}]}],
                   "subject": {"reference": f"Patient/{patient['id']}"}}, obs)
    assert "comparator" not in obs["valueQuantity"]
    assert report["result"] == [{"reference": f"Observation/{obs['id']}"}]


def test_lri_cbc_panel_maps_every_result():
    resources = mapped("fhir-converter/LRI_2.0-NG_CBC_Typ_Message.hl7")
    obs = of_type(resources, "Observation")
    (report,) = of_type(resources, "DiagnosticReport")
    assert len(obs) == len(report["result"]) == len(parse_message(read(
        "fhir-converter/LRI_2.0-NG_CBC_Typ_Message.hl7")).positions("OBX"))
    hgb = next(o for o in obs if o["code"]["coding"][0]["code"] == "718-7")
    assert hgb["valueQuantity"]["system"] == UCUM and hgb["status"] == "final"


def test_observation_ids_survive_a_correction():
    """A corrected result for the same order and test replaces the preliminary one (same id)."""
    raw = read("twin-oru-r01.hl7")
    first = of_type(mapped("twin-oru-r01.hl7"), "Observation")
    corrected = raw.replace(b"|TWIN-LAB-0001|", b"|TWIN-LAB-0002|").replace(b"||182|", b"||178|")
    again = of_type([r.resource for r in map_message(corrected, "x").resources], "Observation")
    assert [o["id"] for o in first] == [o["id"] for o in again]
    assert again[0]["valueQuantity"]["value"] == 178


# -- VXU ----------------------------------------------------------------------------------------------


def test_vxu_v04_immunization():
    patient, imm = mapped("twin-vxu-v04.hl7")
    assert_subset({
        "resourceType": "Immunization",
        "status": "completed",
        "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "141"}]},
        "patient": {"reference": f"Patient/{patient['id']}"},
        "occurrenceDateTime": "2024-03-07T10:00:00+01:00",
        "primarySource": True,                                   # RXA-9 00 new record
        "doseQuantity": {"value": 0.5, "system": UCUM, "code": "mL"},
        "lotNumber": "LOT-AB12",
        "expirationDate": "2025-06-30",
        "manufacturer": {"identifier": {"system": "http://hl7.org/fhir/sid/mvx", "value": "SKB"}},
        "route": {"coding": [{"code": "C28161"}]},
        "site": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0163", "code": "LD"}]},
    }, imm)


def test_fhir_converter_vxu_refused_and_deleted_doses():
    resources = mapped("fhir-converter/VXU-V04-01.hl7")
    (imm,) = of_type(resources, "Immunization")
    # PV1-19 40007716^^^AccMng&1.2&HCD^AM, PV1-2 P: the visit the dose was given in
    (encounter,) = of_type(resources, "Encounter")
    assert_subset({"status": "unknown", "identifier": [{"value": "40007716"}],
                   "class": {"code": "PRENC"}, "period": {"start": "2015-02-08T11:34:19+01:10"}}, encounter)
    assert imm["encounter"] == {"reference": f"Encounter/{encounter['id']}"}
    # RXA-20 CP, RXA-21 A; amount 0.5 mL^mL^UCUM; NDC code
    assert_subset({"status": "completed", "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/ndc"}]},
                   "doseQuantity": {"value": 0.5, "code": "mL"}, "lotNumber": "315841"}, imm)
    raw = read("fhir-converter/VXU-V04-01.hl7")
    for change, status in ((b"|||CP|A|", b"|||RE|A|"), (b"|||CP|A|", b"|||CP|D|")):
        out = map_message(raw.replace(*[change, status]), "x")
        (imm2,) = [r.resource for r in out.resources if r.resource["resourceType"] == "Immunization"]
        assert imm2["status"] == ("not-done" if b"RE" in status else "entered-in-error")


# -- every resource is valid R4, ids are deterministic ---------------------------------------------

ALL_FIXTURES = sorted(p.relative_to(FIX).as_posix() for p in FIX.rglob("*.hl7") if "bad" not in p.name)


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_every_mapped_resource_is_valid_r4(name):
    out = map_message(read(name), name)
    for res in out.resources:
        validate(res.resource)
    again = map_message(read(name), name)
    assert [r.resource for r in again.resources] == [r.resource for r in out.resources]


@pytest.mark.parametrize("name", ["twin-adt-a01.hl7", "twin-adt-a03.hl7", "twin-adt-a28-old.hl7", "twin-adt-a40.hl7",
                                  "twin-oru-r01.hl7", "twin-vxu-v04.hl7", "syntax-latin1.hl7"])
def test_hand_made_fixtures_are_valid_hl7_for_an_independent_validator(name):
    """hl7apy's strict structure validation (message structure, cardinality, data types) accepts
    the messages written here, so the expectations above rest on correct HL7. Z-segments are
    taken out first: hl7apy cannot place one in the middle of a group (NOTES.md)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message as hl7apy_parse

    er7 = "\r".join(s for s in parse_message(read(name)).to_er7().split("\r") if not s.startswith("Z"))
    assert hl7apy_parse(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()


def test_resources_share_no_objects():
    """A later stage may change a resource in place (pseudonymise, drop a name): nothing it
    touches may be shared with another resource or with the maps."""
    first = mapped("twin-adt-a01.hl7")
    second = mapped("twin-adt-a01.hl7")

    def ids(node, out):
        if isinstance(node, dict | list):
            out.add(id(node))
            for child in node.values() if isinstance(node, dict) else node:
                ids(child, out)
        return out

    assert not ids(first, set()) & ids(second, set())


def test_ids_do_not_depend_on_delimiters_or_message():
    ids = {name: mapped(name)[0]["id"] for name in
           ("twin-adt-a01.hl7", "twin-oru-r01.hl7", "twin-vxu-v04.hl7", "syntax-custom-delimiters.hl7",
            "syntax-latin1.hl7")}
    assert len(set(ids.values())) == 1, ids


# -- refusals, strictness, versions ---------------------------------------------------------------

NAMES_AND_VALUES = ("EVERYWOMAN", "196203520", "555-44-4444", "Ullrich", fx.TWIN_MRN)


def test_lenient_mode_marks_values_that_do_not_convert():
    # python-hl7's sample: PID-7 196203520 is no date; OBX 2 has the type FN, which is not a value type
    out = map_message(read("python-hl7/sample_hl7.hl7"), "x")
    patient, obs1, obs2, report = (r.resource for r in out.resources)
    assert out.ack_code == "AA"
    dar = {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "error"}]}
    assert "birthDate" not in patient and patient["_birthDate"] == dar
    assert obs1["valueQuantity"]["value"] == 182
    assert "valueQuantity" not in obs2 and obs2["dataAbsentReason"]["coding"][0]["code"] == "error"
    for r in (patient, obs1, obs2, report):
        validate(r)


def test_strict_mode_refuses_and_names_every_field_without_values():
    out = map_message(read("python-hl7/sample_hl7.hl7"), "x", strict=True)
    assert out.resources == [] and out.ack_code == "AE"
    rej = out.rejected
    assert rej.reason == "bad-value" and rej.stage == "map" and rej.payload == read("python-hl7/sample_hl7.hl7")
    assert "PID-7" in rej.message and "OBX[2]-5" in rej.message
    assert not any(v in rej.message for v in NAMES_AND_VALUES)


@pytest.mark.parametrize("change, reason, ack", [
    ((b"|2.5.1|", b"|2.2|"), "unsupported-version", "AR"),
    ((b"|2.5.1|", b"|3.0|"), "unsupported-version", "AR"),
    ((b"ORU^R01^ORU_R01", b"ORU^R30^ORU_R30"), "unsupported-message-type", "AR"),
    ((b"|TWIN-LAB-0001|", b"||"), "missing-field", "AE"),
    ((b"\rOBR|", b"\rXXX|"), "missing-segment", "AE"),
    ((b"||182|", b"||182|"), None, "AA"),
    ((b"|H|||F|", b"|H||||"), "missing-field", "AE"),          # OBX-11 is required
    ((b"|H|||F|", b"|H|||Q|"), "bad-value", "AE"),             # and must be a table 0085 code
    ((b"2345-7^Glucose", b"^Glucose"), None, "AA"),            # code text only: still a code
])
def test_refusals_have_a_reason_and_an_ack_code(change, reason, ack):
    out = map_message(read("twin-oru-r01.hl7").replace(*change), "x")
    assert out.ack_code == ack
    if reason is None:
        assert out.rejected is None
    else:
        assert out.rejected.reason == reason and out.resources == []
        assert not any(v in out.rejected.message for v in NAMES_AND_VALUES)


def test_refusals_never_echo_header_fields_that_hold_something_else():
    # a message whose fields are shifted: MSH-12 and MSH-9 now hold what should be elsewhere
    raw = b"MSH|^~\\&|A|B|C|D|2024||Quillfeather^Odile|CTL1|P|Quillfeather\rPID|1||X^^^H^MR\r"
    out = map_message(raw, "x")
    assert out.rejected.reason == "unsupported-version" and "Quillfeather" not in out.rejected.message
    assert "(not a version number)" in out.rejected.message and out.message_type is None
    out = map_message(raw.replace(b"|P|Quillfeather", b"|P|2.5"), "x")
    assert out.rejected.reason == "unsupported-message-type" and "Quillfeather" not in out.rejected.message


def test_codes_are_made_fit_for_fhir():
    """Found by bench/fuzz_hl7v2.py: a code with a line break or a non-breaking space from an
    escape, or one that escapes to nothing, must still give valid FHIR (codes have single spaces)."""
    raw = read("twin-adt-a03.hl7").replace(b"|01|", b"|01\\X0A\\ \\XC2A0\\home|")
    raw = raw.replace(b"&URI^MR", b"&URI^\\H\\")
    patient, encounter = (r.resource for r in map_message(raw, "x").resources)
    assert encounter["hospitalization"]["dischargeDisposition"]["coding"][0]["code"] == "01 home"
    assert "type" not in patient["identifier"][0]
    validate(patient)
    validate(encounter)


def test_v29_maps_when_its_segments_are_known():
    raw = read("twin-oru-r01.hl7").replace(b"|2.5.1|", b"|2.9|")
    assert map_message(raw, "x").ack_code == "AA"          # ZLB is a Z-segment: allowed
    unknown = raw.replace(b"\rZLB|", b"\rXYZ|")
    out = map_message(unknown, "x")
    assert out.rejected.reason == "unsupported-version" and "XYZ" in out.rejected.message


def test_default_timezone_comes_from_the_maps(tmp_path):
    root = tmp_path / "mappings"
    shutil.copytree(mappings_dir(), root)
    toml = root / "hl7v2" / "messages.toml"
    toml.write_text(toml.read_text().replace('default_timezone = "UTC"', 'default_timezone = "America/New_York"'))
    maps = Mappings.load(root)
    pv1 = [""] * 46
    pv1[0], pv1[2], pv1[19], pv1[44], pv1[45] = "PV1", "I", "V1", "202401101200", "202407101200"
    raw = b"MSH|^~\\&|A|F|C|D|20240110||ADT^A01|1|P|2.5\rPID|1||X1^^^H^MR\r" + "|".join(pv1).encode() + b"\r"
    (_, enc) = (r.resource for r in map_message(raw, "x", mappings=maps).resources)
    assert enc["period"] == {"start": "2024-01-10T12:00:00-05:00", "end": "2024-07-10T12:00:00-04:00"}  # DST
    with_offset = raw.replace(b"|20240110|", b"|20240110120000+0200|")
    (_, enc) = (r.resource for r in map_message(with_offset, "x", mappings=maps).resources)
    assert enc["period"]["start"] == "2024-01-10T12:00:00+02:00"  # MSH-7's offset is the sender's zone


def test_broken_maps_list_every_problem(tmp_path):
    root = tmp_path / "mappings"
    shutil.copytree(mappings_dir(), root)
    obs = root / "hl7v2" / "observation.toml"
    text = obs.read_text().replace('as = "CWE[CodeableConcept]"\nrequired = true',
                                   'as = "CWE[Nothing]"\nrequired = true\ncolour = "red"')
    obs.write_text(text.replace('table = "observation-status"', 'table = "no-such-table"'))
    with pytest.raises(ConfigError) as e:
        Mappings.load(root)
    problems = "\n".join(e.value.problems)
    assert "CWE[Nothing]" in problems and "colour" in problems and "no-such-table" in problems


@pytest.mark.parametrize("file, old, new, problem", [
    ("device.toml", "shared = true", "shared = \"yes\"", "device.toml: `shared` must be true or false, not str"),
    ("device.toml", "anchor = \"OBX\"", "anchor = 5", "device.toml: `anchor` must be a string, not int"),
    ("device.toml", "anchor = \"OBX\"", "anchor = \"OBX\"\nchildren = \"NTE\"",
     "device.toml: `children` must be a list of strings, not str"),
    ("device.toml", "id = [[\"OBX-18\"]]", "id = [\"OBX-18\"]", "each `id` is a list of accessors, not str"),
    ("observation.toml", "required = true", "required = 1", "`required` must be true or false, not int"),
    ("observation.toml", "[[map]]\nto = \"status\"", "[[map]]\nto = 7", "`to` must be a string, not int"),
    ("messages.toml", "requires = [\"PID\", \"PV1\"]", "requires = \"PID\"",
     "[[message]] #1: `requires` must be a list of strings, not str"),
    ("messages.toml", "[settings]", "settings = 5\n[unused]", "messages.toml: `settings` must be a table, not int"),
    ("tables.toml", "system = \"http://terminology.hl7.org/CodeSystem/v3-ActCode\"", "system = 3",
     "tables.toml [encounter-class]: `system` must be a string, not int"),
    ("messages.toml", "when = { encounter = \"PV1-19\" }", "when = \"PV1-19\"",
     "[[message]] #4: `when` must be a table, not str"),
    ("messages.toml", "when = { encounter = \"PV1-19\" }", "when = { encounters = \"PV1-19\" }",
     "[[message]] #4: when names 'encounters', which is not one of its resources"),
    ("messages.toml", "when = { encounter = \"PV1-19\" }", "when = { encounter = \"PV1-\" }",
     "[[message]] #4 when.encounter: "),
])
def test_a_wrong_type_in_a_map_file_is_a_listed_problem_not_a_crash(tmp_path, file, old, new, problem):
    # (the compiled build enforces the loader's annotations: a wrong type that reached it
    # would be a TypeError from deep inside, in pure Python an AttributeError)
    root = tmp_path / "mappings"
    shutil.copytree(mappings_dir(), root)
    path = root / "hl7v2" / file
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as e:
        Mappings.load(root)
    assert any(problem in p for p in e.value.problems), e.value.problems


# -- ACKs ---------------------------------------------------------------------------------------------


def test_ack_swaps_sender_and_receiver_and_names_the_error():
    import hl7
    from hl7apy.parser import parse_message as hl7apy_parse

    raw = read("twin-oru-r01.hl7")
    ack = build_ack(read_msh(raw), "AE", reason="missing-field", text="OBX[2]-11: required and empty",
                    location="OBX[2]-11").decode()
    m = hl7.parse(ack)  # an independent parser reads it
    assert str(m.segment("MSH")[3]) == "TWINLINE" and str(m.segment("MSH")[5]) == "TWINLAB"
    assert str(m.segment("MSH")[9]) == "ACK^R01^ACK" and str(m.segment("MSH")[12]) == "2.5.1"
    assert str(m.segment("MSA")[1]) == "AE" and str(m.segment("MSA")[2]) == "TWIN-LAB-0001"
    err = m.segment("ERR")
    assert str(err[2]) == "OBX^2^11" and str(err[3]).startswith("101^") and str(err[4]) == "E"
    parsed = hl7apy_parse(ack)
    assert parsed.msa.msa_1.value == "AE" and parsed.msa.msa_2.value == "TWIN-LAB-0001"


def test_ack_before_v25_uses_err1_and_ack_without_msh():
    import hl7

    old = build_ack(read_msh(read("python-hl7/sample_msh.hl7")), "AR", reason="unsupported-message-type",
                    text="not mapped", location="MSH-9").decode()
    err = hl7.parse(old).segment("ERR")
    assert str(err[1]) == "MSH^1^9^200&Unsupported message type&HL70357"
    bare = hl7.parse(build_ack(None, "AR", reason="no-msh", text="no MSH").decode())
    assert str(bare.segment("MSA")[1]) == "AR" and str(bare.segment("MSA")[2]) == ""


def test_ack_gives_back_non_ascii_sender_names_byte_for_byte_and_declares_their_charset():
    """A sender matches the ACK's MSH-5/6 against its own MSH-3/4: re-encoding them
    (read as Latin-1, written as UTF-8) turned 'CLÍNICA' into mojibake."""
    base = read("twin-adt-a01.hl7")
    for name, charset in (("CLÍNICA".encode("latin-1"), b"8859/1"), ("CLÍNICA".encode(), b"UNICODE UTF-8")):
        raw = base.replace(b"TWINADT", name).replace(b"UNICODE UTF-8", charset)
        msh = build_ack(read_msh(raw), "AA").split(b"\r")[0].split(b"|")
        assert msh[4] == name and msh[17] == charset  # split index n is MSH-(n+1)
    assert b"||||||" not in build_ack(read_msh(read("python-hl7/sample_msh.hl7")), "AA")  # no MSH-18: none echoed


def test_ack_reads_the_version_number_out_of_a_vid_with_components():
    raw = read("twin-adt-a01.hl7").replace(b"|2.5.1|", b"|2.4^CAN|")
    ack = build_ack(read_msh(raw), "AE", reason="missing-field", text="PID-3", location="PID-3")
    assert b"\rERR|PID^1^3^101&Required field missing&HL70357\r" in ack  # v2.4: ERR-1, not ERR-2..8


# -- all public samples (../shared) ---------------------------------------------------------------------


@pytest.mark.slow
def test_every_shared_sample_maps_or_is_rejected_with_a_reason(shared_data):
    from pipeline.connectors.hl7v2_files import ReadStats, read_hl7v2
    from pipeline.units import Rejected, Resource

    stats = ReadStats()
    rejected = resources = 0
    for unit in read_hl7v2([shared_data / "hl7v2"], stats=stats):
        if isinstance(unit, Rejected):
            rejected += 1
            assert unit.reason and unit.message and unit.source_ref
            assert unit.payload is not None or unit.payload_ref is not None
        else:
            assert isinstance(unit, Resource)
            resources += 1
            validate(unit.resource)
    assert stats.reconciles() and stats.rejected == rejected and stats.resources == resources
    assert stats.files >= 170 and stats.messages >= 200 and stats.mapped >= 60
    assert stats.by_reason.get("unsupported-message-type", 0) > 100   # SIU, ORM, MDM, ...


@pytest.mark.parametrize("obx5, obx7", [("²9", ""), ("1¹2", ""), ("~", ""), ("5", "1²-9"), ("٣", "<٣"),
                                        ("7", "³")])
def test_odd_numbers_and_empty_repetitions_are_refused_or_kept_never_fatal(obx5, obx7):
    """Found by bench/fuzz_hl7v2.py: Unicode digits passed str.isdigit and \\d, then int()
    failed; an OBX-5 of empty repetitions reached an index. HL7 numbers are ASCII."""
    msg = ("MSH|^~\\&|LAB|HOSP|TWIN|HOSP|20240101120000||ORU^R01|C1|P|2.5\r"
           "PID|1||12345^^^HOSP^MR||DOE^JANE||19800101|F\r"
           "OBR|1|||24317-0^Hemogram^LN|||20240101110000\r"
           f"OBX|1|NM|11156-7^Leukocytes^LN||{obx5}|10*3/uL|{obx7}|N|||F\r").encode()
    for strict in (False, True):
        out = map_message(msg, "t", strict=strict)
        assert out.ack_code in ("AA", "AE", "AR")
        obs = [r.resource for r in out.resources if r.resource["resourceType"] == "Observation"]
        if out.rejected is None and obs and "valueQuantity" in obs[0]:
            assert isinstance(obs[0]["valueQuantity"]["value"], int | float)


# -- NM: the string tests of parse_nm say what the NM_SYNTAX regex says ------------------

_NM_ALPHABET = "0123456789+-. \t\xa0e_²٣,"


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=_NM_ALPHABET, max_size=8))
def test_parse_nm_accepts_what_the_nm_syntax_accepts_with_the_same_value(text):
    m = NM_SYNTAX.match(text)
    if m is None:
        with pytest.raises(ConversionError):
            parse_nm(text)
        return
    want = float(m[1]) if "." in m[1] else int(m[1])
    got = parse_nm(text)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("text, value", [("7", 7), ("-7", -7), ("+7.", 7.0), (" .5 ", 0.5), ("-.5", -0.5),
                                         ("007", 7), ("1.20", 1.2)])
def test_parse_nm_reads_numbers(text, value):
    assert parse_nm(text) == value and type(parse_nm(text)) is type(value)


@pytest.mark.parametrize("text", ["", ".", "+", "-", "1.2.3", "1e5", "inf", "nan", "1_000", "1,5", "²", "٣",
                                  "5\xa0", "--5", "5-"])
def test_parse_nm_refuses_what_is_no_nm(text):
    with pytest.raises(ConversionError):
        parse_nm(text)


# -- DTM: the slicing of dtm_groups finds what the DTM_SYNTAX regex finds ------------------

_DTM_PIECES = ["2024", "01", "12", "31", "23", "59", "00", ".", "1", "1234", "12345", "+", "-", "0100", "1", " ", "x",
               "٣", "+0530", "-1200", ".5"]


@settings(max_examples=4000, deadline=None)
@given(st.lists(st.sampled_from(_DTM_PIECES), max_size=9).map("".join) | st.text(alphabet="0123456789+-. ", max_size=24))
def test_dtm_groups_are_the_groups_of_the_dtm_syntax(text):
    m = DTM_SYNTAX.match(text.strip())
    assert dtm_groups(text) == (m.groups() if m else None)


def test_dtm_groups_of_common_times():
    assert dtm_groups("20240412103000+0100") == ("2024", "04", "12", "10", "30", "00", None, "+", "01", "00")
    assert dtm_groups(" 20240412103000.123-0500 ") == ("2024", "04", "12", "10", "30", "00", "123", "-", "05", "00")
    assert dtm_groups("2024") == ("2024", None, None, None, None, None, None, None, None, None)
    for bad in ("", "202", "2024-04-12", "20240412T1030", "2024041210300.1", "+0100", "20240412+01"):
        assert dtm_groups(bad) is None, bad


@settings(max_examples=3000, deadline=None)
@given(st.integers(0, 2401), st.integers(0, 13), st.integers(0, 32), st.integers(0, 25), st.integers(0, 61),
       st.integers(0, 61))
@example(1900, 2, 29, 0, 0, 0)  # the leap-year rules, each
@example(2000, 2, 29, 0, 0, 0)
@example(2023, 2, 29, 0, 0, 0)
@example(2024, 2, 29, 0, 0, 0)
@example(2024, 4, 31, 0, 0, 0)
@example(0, 1, 1, 0, 0, 0)
@example(2024, 1, 1, 24, 0, 0)
@example(2024, 1, 1, 23, 60, 0)
@example(2024, 1, 1, 23, 59, 60)
def test_a_dtm_is_a_valid_time_exactly_when_datetime_takes_it(y, mo, d, h, mi, s):
    text = f"{y:04d}{mo:02d}{d:02d}{h:02d}{mi:02d}{s:02d}"
    try:
        datetime(y, mo, d, h, mi, s)
        valid = True
    except ValueError:
        valid = False
    run = _a_run()
    if valid:
        assert dtm_to_fhir(run, text + "+0000", "dateTime").startswith(f"{y:04d}-{mo:02d}-{d:02d}T")
    else:
        with pytest.raises(ConversionError):
            dtm_to_fhir(run, text + "+0000", "dateTime")


@functools.cache
def _a_run() -> Run:
    """A Run to convert times with (each carries its offset, so the message's does not matter)."""
    return Run(parse_message(b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\r"), default_mappings(), False)
