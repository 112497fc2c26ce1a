"""Pseudonymisation and de-identification (issue 10, docs/privacy.md).

End to end on the bundled fixtures of every connector: what the store holds under each
profile, that records still link and references still resolve, and that nothing the
inputs say about who the patients are survives --deid. Unit tests pin the rules.
"""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path

import deltalake
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import keys
from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.imports import run_import
from pipeline.privacy import PrivacyHooks, privacy_hooks
from pipeline.privacy.deid import Deidentifier, generalise_date, load_profile, over_89, parse_profile, zip3
from pipeline.privacy.dicom_deid import load_dicom_profile, record_filter, uid_pseudonym
from pipeline.privacy.pseudonym import Pseudonymiser, pseudonym, pseudonym_id, pseudonym_reference
from pipeline.store import Store

from .conftest import FIXTURES, secret_key
from .sensitive import contains, found_in, sensitive_values

KEY = "privacy-test-key-0123456789"
HL7 = [FIXTURES / "hl7v2" / n for n in ("twin-adt-a01.hl7", "twin-oru-r01.hl7", "twin-vxu-v04.hl7",
                                       "twin-adt-a28-old.hl7", "twin-adt-a40.hl7")]
SOURCES = [("fhir", [FIXTURES / "fhir"]), ("hl7v2", HL7), ("dicom", [FIXTURES / "dicom"]),
           ("csv", [FIXTURES / "devices"])]


@pytest.fixture(autouse=True)
def _key():
    with secret_key(KEY):
        yield


def _import_all(store_dir: Path, profile: str | None, **kw) -> Store:
    store = Store(store_dir)
    for kind, paths in SOURCES:
        run_import(store, kind, paths, hooks=privacy_hooks(profile, source=kind, **kw))
    return store


def _table(store: Store, name: str) -> pa.Table:
    return deltalake.DeltaTable(str(store.root / name)).to_pyarrow_table()


def _strings(store: Store) -> str:
    """Every string value of every table (and the store's metadata files), one text."""
    out = []
    for d in sorted(store.root.iterdir()):
        if (d / "_delta_log").is_dir():
            t = _table(store, d.name)
            for col in t.columns:
                if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                    out.extend(v for v in col.to_pylist() if v)
                elif pa.types.is_list(col.type):
                    out.extend(json.dumps(v) for v in col.to_pylist() if v)
    for f in store.root.rglob("*"):
        if f.is_file() and "_delta_log" not in f.parts and f.suffix in (".json", ".txt", ".ndjson"):
            out.append(f.read_text(errors="replace"))
    return "\n".join(out)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    with secret_key(KEY):
        root = tmp_path_factory.mktemp("privacy")
        out = {p or "plain": _import_all(root / (p or "plain"), p) for p in (None, "pseudonymise", "deid")}
    return out


def test_the_fixtures_hold_what_the_privacy_tests_look_for(stores):
    s = sensitive_values()
    assert len(s["names"]) >= 10 and len(s["identifiers"]) >= 10 and len(s["births"]) >= 3
    text = _strings(stores["plain"])
    assert sum(contains(text, n) for n in s["names"]) >= 10  # the plain store does hold them: the search works


def test_deid_store_holds_no_name_identifier_or_birth_date(stores):
    text = _strings(stores["deid"])
    assert found_in(text) == {"names": [], "identifiers": [], "births": []}


def test_pseudonymised_store_holds_no_identifier(stores):
    text = _strings(stores["pseudonymise"])
    assert [v for v in sensitive_values()["identifiers"] if contains(text, v)] == []
    values = _table(stores["pseudonymise"], "patient_identifier").column("value").to_pylist()
    assert values and all(re.fullmatch(r"[0-9a-f]{32}", v) for v in values)


@pytest.mark.parametrize("profile", ["pseudonymise", "deid"])
def test_profiles_lose_no_unit_and_still_link_and_resolve(stores, profile):
    plain, other = stores["plain"], stores[profile]
    for t in ("patient", "patient_identifier", "encounter", "observation", "imaging_study", "imaging_series",
              "immunization", "medication", "procedure", "condition", "device"):
        assert _table(other, t).num_rows == _table(plain, t).num_rows, t
    # the same persons: linking across the four sources survives the pseudonyms
    assert _table(other, "patient").column("twin_id").unique().to_pylist().__len__() == \
        len(_table(plain, "patient").column("twin_id").unique())
    # references (literal, urn:uuid, conditional Practitioner?identifier=) resolve as often as before
    for t, col in (("encounter", "practitioner_id"), ("encounter", "patient_id"), ("observation", "encounter_id"),
                   ("immunization", "practitioner_id")):
        assert pc.count(_table(other, t).column(col)).as_py() == pc.count(_table(plain, t).column(col)).as_py(), col
    q_plain = _table(plain, "quarantine").num_rows
    q_other = _table(other, "quarantine")
    assert q_other.num_rows == q_plain
    assert q_other.column("payload").null_count == q_other.num_rows  # no raw input kept under a profile


def test_deid_dates_are_years_and_zip_codes_three_digits(stores):
    store = stores["deid"]
    for t in ("patient", "encounter", "observation", "condition", "immunization", "imaging_study"):
        table = _table(store, t)
        for col in (c for c in table.column_names if c.endswith("_precision")):
            assert set(table.column(col).drop_null().to_pylist()) <= {"year"}, f"{t}.{col}"
    codes = _table(store, "patient").column("postal_code").drop_null().to_pylist()
    assert codes and all(re.fullmatch(r"\d{3}", c) for c in codes)
    # and the twin still has what the gate's bias checks need
    patient = _table(store, "patient")
    assert patient.column("sex").null_count < patient.num_rows
    assert patient.column("race_code").null_count < patient.num_rows


def test_the_key_decides_the_pseudonyms_and_is_not_stored(stores, tmp_path, monkeypatch):
    for f in stores["pseudonymise"].root.rglob("*"):
        assert not f.is_file() or KEY.encode() not in f.read_bytes(), f
    first = pseudonym("12345")
    monkeypatch.setenv("TWIN_KEY", "another-key-0123456789abcdef")
    keys.secret_key.cache_clear()
    assert pseudonym("12345") != first
    monkeypatch.setenv("TWIN_KEY", KEY)
    keys.secret_key.cache_clear()
    assert pseudonym("12345") == first  # stable: a second import of the same source matches


def test_deid_from_the_command_line(tmp_path, capsys):
    code = main(["import", "fhir", str(FIXTURES / "fhir" / "bundles"), "--store", str(tmp_path / "s"), "--deid",
                 "--deid-dates", "shift"])
    assert code == 0
    patient = _table(Store(tmp_path / "s"), "patient")
    assert patient.num_rows > 0 and patient.column("name_family").null_count == patient.num_rows
    assert set(patient.column("birth_date_precision").drop_null().to_pylist()) == {"day"}  # shifted, not cut
    assert main(["import", "fhir", str(FIXTURES / "fhir"), "--store", str(tmp_path / "t"), "--deid-dates", "year"]) == 2
    assert "--deid-dates goes with --deid" in capsys.readouterr().err


def test_a_pseudonymised_twin_is_found_by_its_original_id_with_the_key(tmp_path, capsys):
    store = str(tmp_path / "s")
    assert main(["import", "fhir", str(FIXTURES / "fhir" / "bundles"), "--store", store, "--pseudonymise"]) == 0
    assert main(["build", "--store", store]) == 0
    capsys.readouterr()
    assert main(["show", "2354df0f-349f-4042-a827-2ef12013e69d", "--store", store]) == 0
    assert "born 1995-01-08" in capsys.readouterr().out


def test_a_source_keeps_the_profile_it_was_written_under(tmp_path, capsys):
    """The same source imported without a profile and then with --deid used to be stored
    twice, silently: the identified copy beside the de-identified one, and every person
    split into two twins (identifiers do not link to their pseudonyms)."""
    store = str(tmp_path / "s")
    bundles = str(FIXTURES / "fhir" / "bundles")
    assert main(["import", "fhir", bundles, "--store", store]) == 0
    patients = _table(Store(store), "patient").num_rows
    capsys.readouterr()
    for flags in (["--deid"], ["--pseudonymise"]):
        assert main(["import", "fhir", bundles, "--store", store, *flags]) == 2
        assert "written under the privacy profile none" in capsys.readouterr().err
    assert _table(Store(store), "patient").num_rows == patients  # nothing of the refused runs kept
    # a deid source stays deid, with its date mode
    assert main(["import", "fhir", bundles, "--store", store, "--source", "ehr", "--deid"]) == 0
    assert main(["import", "fhir", bundles, "--store", store, "--source", "ehr", "--deid", "--deid-dates", "shift"]) == 2
    assert main(["import", "fhir", bundles, "--store", store, "--source", "ehr"]) == 2
    assert Store(store).manifest()["privacy"] == {"ehr": "deid:year", "fhir": "none"}
    capsys.readouterr()
    assert main(["status", "--store", store]) == 0
    assert "privacy by source: ehr deid:year, fhir none" in capsys.readouterr().out


def test_a_failed_run_does_not_claim_its_profile_for_the_source(tmp_path, monkeypatch):
    """The claim is recorded at the commit point. A run that failed, and was rolled back,
    wrote nothing under its profile: the source may still be imported under another."""
    from pipeline import imports

    store = Store(tmp_path / "s")
    bundles = FIXTURES / "fhir" / "bundles"
    run_import(store, "fhir", [bundles], source="other")

    def killed(run):
        raise RuntimeError("killed before the commit")

    with monkeypatch.context() as m:
        m.setattr(imports.Run, "record", killed)
        with pytest.raises(RuntimeError):
            run_import(store, "fhir", [bundles], source="ehr", hooks=privacy_hooks("pseudonymise", source="ehr"))
    assert "ehr" not in Store(tmp_path / "s").manifest().get("privacy", {})
    run = run_import(store, "fhir", [bundles], source="ehr")
    assert run.counts["ehr"].written > 0
    assert Store(tmp_path / "s").manifest()["privacy"] == {"ehr": "none", "other": "none"}


def test_a_profile_refuses_the_public_development_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TWIN_KEY")
    monkeypatch.delenv("TWIN_KEY_FILE", raising=False)
    keys.secret_key.cache_clear()
    assert main(["import", "fhir", str(FIXTURES / "fhir" / "bundles"), "--store", str(tmp_path), "--pseudonymise"]) == 2
    assert "needs a secret key" in capsys.readouterr().err
    assert not (tmp_path / "patient").exists()


def test_a_short_twin_key_is_refused_like_a_short_key_file(tmp_path, monkeypatch, capsys):
    """TWIN_KEY=abc used to be taken as a secret key: its fingerprint in the manifest gives it
    away by brute force in seconds, and with it every pseudonym. TWIN_KEY_FILE already
    required 16 bytes."""
    monkeypatch.setenv("TWIN_KEY", "abc")
    keys.secret_key.cache_clear()
    assert main(["import", "fhir", str(FIXTURES / "fhir" / "bundles"), "--store", str(tmp_path), "--pseudonymise"]) == 2
    err = capsys.readouterr().err
    assert "TWIN_KEY is shorter than 16 bytes" in err and "abc" not in err
    assert not (tmp_path / "patient").exists()


def test_a_job_source_can_ask_for_a_profile(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(f'[job]\nname = "p"\n[[source]]\nname = "ehr"\nkind = "fhir"\nprivacy = "pseudonymise"\n'
                   f'paths = ["{FIXTURES / "fhir" / "bundles"}"]\n[gate]\nenabled = false\n[build]\nenabled = false\n')
    assert main(["run", "--config", str(job), "--store", str(tmp_path / "s")]) == 0
    values = _table(Store(tmp_path / "s"), "patient_identifier").column("value").to_pylist()
    assert values and all(re.fullmatch(r"[0-9a-f]{32}", v) for v in values)


# --------------------------------------------------------------------------- pseudonymisation rules


def test_pseudonymiser_replaces_identifiers_ids_and_references():
    res = {"resourceType": "Encounter", "id": "enc-1",
           "identifier": [{"system": "urn:x", "value": "V1"}],
           "subject": {"reference": "Patient/p1", "display": "Jane"},
           "participant": [{"individual": {"reference": "Practitioner?identifier=http://npi|999"}}],
           "serviceProvider": {"reference": "http://server/fhir/Organization/o1/_history/2"},
           "location": [{"location": {"reference": "urn:uuid:abc"}}],
           "extension": [{"url": "u", "valueIdentifier": {"value": "X9"}}]}
    p = Pseudonymiser()
    out = p.resource(res)
    assert out["id"] == pseudonym_id("Encounter", "enc-1")
    assert out["identifier"] == [{"system": "urn:x", "value": pseudonym("V1")}]
    assert out["subject"]["reference"] == f"Patient/{pseudonym_id('Patient', 'p1')}"
    assert out["participant"][0]["individual"]["reference"] == f"Practitioner?identifier=http://npi|{pseudonym('999')}"
    assert out["serviceProvider"]["reference"] == f"Organization/{pseudonym_id('Organization', 'o1')}"
    assert out["location"][0]["location"]["reference"] == "urn:uuid:abc"
    assert out["extension"][0]["valueIdentifier"]["value"] == pseudonym("X9")
    assert res["id"] == "enc-1" and res["identifier"][0]["value"] == "V1"  # the input is not changed
    assert p.full_urls({"urn:uuid:abc": "Location/l1"}) == {"urn:uuid:abc": f"Location/{pseudonym_id('Location', 'l1')}"}
    assert pseudonym_reference("#contained", True) == "#contained"
    assert Pseudonymiser(ids=False).resource(res)["subject"]["reference"] == "Patient/p1"


def test_per_source_and_per_table_settings():
    cfg = {"pseudonymise": {"ids": True, "columns": {"device": ["serial_number"]}},
           "source": {"pacs": {"pseudonymise": {"ids": False, "columns": {"imaging_study": ["accession_number"]}}}}}
    ehr, pacs = PrivacyHooks("pseudonymise", "ehr", cfg), PrivacyHooks("pseudonymise", "pacs", cfg)
    assert ehr.pseudonymiser.ids and not pacs.pseudonymiser.ids
    assert set(ehr.column_transforms()) == {"device"}
    assert set(pacs.column_transforms()) == {"device", "imaging_study"}
    with pytest.raises(ConfigError, match="columns the schema does not have"):
        PrivacyHooks("pseudonymise", "x", {"pseudonymise": {"columns": {"device": ["no_such"]}}})


# --------------------------------------------------------------------------- de-identification rules


def test_safe_harbor_date_zip_and_age_rules():
    assert generalise_date("2019-03-04T10:11:12+01:00", None) == "2019"
    assert generalise_date("2019-03-04T10:11:12+01:00", 10) == "2019-03-14T10:11:12+01:00"
    assert generalise_date("2019-03", -40)[:4] == "2019" and len(generalise_date("2019-03", -40)) == 7
    assert generalise_date("not a date", None) is None
    assert zip3("02139-1234", frozenset()) == "021"
    assert zip3("03601", frozenset({"036"})) == "000"
    assert zip3("EH1 2AB", frozenset()) is None
    today = date(2026, 11, 28)
    assert over_89("1936-11-27", {}, today) and not over_89("1936-11-29", {}, today)
    assert not over_89("1920-01-01", {"deceasedDateTime": "1990-01-01"}, today)


def test_deidentifier_keeps_only_the_allow_list():
    deid = Deidentifier(load_profile(), today=date(2026, 11, 28))
    patient = {"resourceType": "Patient", "id": "p", "name": [{"family": "Doe"}], "gender": "female",
               "birthDate": "1930-05-06", "telecom": [{"value": "555"}], "text": {"div": "<div>Doe</div>"},
               "address": [{"line": ["1 Main St"], "city": "Boston", "state": "MA", "postalCode": "02139"}],
               "extension": [{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
                              "extension": [{"url": "ombCategory", "valueCoding": {"code": "2106-3"}}]},
                             {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
                              "valueString": "Smith"}]}
    out = deid.resource(patient)
    assert out == {"resourceType": "Patient", "id": "p", "gender": "female", "birthDate": "1936",
                   "address": [{"state": "MA", "postalCode": "021"}], "extension": [patient["extension"][0]]}
    obs = {"resourceType": "Observation", "id": "o", "status": "final", "code": {"coding": [{"code": "x"}], "text": "t"},
           "valueString": "lives with daughter Jane", "subject": {"reference": "Patient/p", "display": "Doe"},
           "note": [{"text": "call 555"}], "effectiveDateTime": "2020-02-03"}
    assert deid.resource(obs) == {"resourceType": "Observation", "id": "o", "status": "final",
                                  "code": {"coding": [{"code": "x"}]}, "subject": {"reference": "Patient/p"},
                                  "effectiveDateTime": "2020"}
    assert deid.resource({"resourceType": "Claim", "id": "c"}) is None  # a type the profile does not list


def test_date_shift_is_one_offset_per_patient():
    deid = Deidentifier(load_profile(dates="shift"))
    a = deid.resource({"resourceType": "Encounter", "id": "e", "subject": {"reference": "Patient/p"},
                       "period": {"start": "2020-01-01", "end": "2020-01-11"}})
    b = deid.resource({"resourceType": "Observation", "id": "o", "subject": {"reference": "urn:uuid:1"},
                       "effectiveDateTime": "2020-01-01"}, {"urn:uuid:1": "Patient/p"})
    c = deid.resource({"resourceType": "Patient", "id": "p", "birthDate": "2000-01-01"})
    start, end = date.fromisoformat(a["period"]["start"]), date.fromisoformat(a["period"]["end"])
    assert (end - start).days == 10 and start != date(2020, 1, 1)
    assert b["effectiveDateTime"] == a["period"]["start"]
    shift = (start - date(2020, 1, 1)).days
    assert date.fromisoformat(c["birthDate"]) == date(2000, 1, 1).fromordinal(date(2000, 1, 1).toordinal() + shift)
    other = deid.shift_for("another-patient")
    assert other is not None and other != 0 and abs(other) <= 365


def test_device_rows_without_a_patient_get_the_year_under_date_shift(tmp_path):
    """An Empatica log names no patient: there is no offset to shift by. It used to crash the
    import (TypeError hashing None); a shift of 0 would have kept the real times."""
    store = Store(tmp_path / "s")
    run_import(store, "csv", [FIXTURES / "devices" / "devicely" / "empatica"],
               hooks=privacy_hooks("deid", source="csv", dates="shift"))
    obs = _table(store, "observation")
    assert obs.num_rows > 0 and obs.column("patient_id").null_count == obs.num_rows
    starts = obs.column("effective_start").drop_null().to_pylist()
    assert starts and all((t.month, t.day, t.hour, t.minute, t.second) == (1, 1, 0, 0, 0) for t in starts)
    assert set(obs.column("effective_start_precision").drop_null().to_pylist()) == {"year"}


def test_every_profile_entry_names_a_rule():
    with pytest.raises(ConfigError) as e:
        parse_profile({"rules": {"A": "names"}, "Patient": {"gender": {"as": "keep"}, "birthDate": {"rule": "Z"},
                                                           "x": {"as": "explode", "rule": "A"}}})
    assert len(e.value.problems) == 3
    profile = load_profile()
    assert {"A", "B", "C", "R"} <= set(profile.rules)


def test_dicom_record_filter_follows_the_basic_profile():
    filt = record_filter(load_dicom_profile())
    rec = {"PatientName": "Doe^Jane", "PatientID": "MRN1", "PatientSex": "F", "StudyInstanceUID": "1.2.3",
           "SeriesInstanceUID": "1.2.3.4", "SOPInstanceUID": "1.2.3.4.5", "StudyDescription": "Jane's knee",
           "DeviceSerialNumber": "SN9", "StationName": "CT01", "Modality": "CT",
           "ACME 1.1:(0009,0010)": "private", "AnatomicRegionSequence": [{"CodeValue": "T-1", "Private": "x"}]}
    out = filt(rec)
    assert out == {"PatientID": "MRN1", "PatientSex": "F", "StudyInstanceUID": uid_pseudonym("1.2.3"),
                   "SeriesInstanceUID": uid_pseudonym("1.2.3.4"), "SOPInstanceUID": uid_pseudonym("1.2.3.4.5"),
                   "Modality": "CT", "AnatomicRegionSequence": [{"CodeValue": "T-1"}]}
    uid = uid_pseudonym("1.2.840.10008.1")
    assert uid.startswith("2.25.") and len(uid) <= 64 and re.fullmatch(r"[0-9.]+", uid)


def test_messages_received_over_mllp_are_pseudonymised_as_they_are_drained(tmp_path):
    from pipeline.listen import _MSG, Drainer, Spool

    store = Store(tmp_path / "s")
    spool = Spool(tmp_path / "spool")
    raw = (FIXTURES / "hl7v2" / "twin-adt-a01.hl7").read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    spool.append([(_MSG, "mllp:127.0.0.1:1 [ctl]", raw)])
    spool.seal()
    drainer = Drainer(store, spool.folder, "adt", privacy=privacy_hooks("deid", source="adt"))
    assert drainer.drain() and not spool.ready()  # drained, and the raw segment is gone
    ids = _table(store, "patient_identifier")
    assert ids.num_rows and all(re.fullmatch(r"[0-9a-f]{32}", v) for v in ids.column("value").to_pylist())
    assert _table(store, "patient").column("name_family").null_count == _table(store, "patient").num_rows
    assert not any(contains(_strings(store), v) for v in sensitive_values()["identifiers"] | sensitive_values()["names"])


@pytest.mark.parametrize("dates", ["year", "shift"])
def test_no_date_older_than_the_over_89_group_survives(dates):
    # the group's birth year is 1936 (today 2026): a 1928 record would tell the age, and precede the birth
    deid = Deidentifier(load_profile(dates=dates), today=date(2026, 11, 28))
    old = {"resourceType": "Patient", "id": "p", "birthDate": "1920-03-04"}
    allergy = {"resourceType": "AllergyIntolerance", "id": "a", "patient": {"reference": "Patient/p"},
               "recordedDate": "1928-06-01", "onsetDateTime": "2020-02-03"}
    assert deid.resource(old)["birthDate"] == "1936"
    out = deid.resource(allergy)
    assert out["recordedDate"] == "1936"
    assert out["onsetDateTime"][:4] in ("2019", "2020", "2021")  # recent dates are not touched by the floor
