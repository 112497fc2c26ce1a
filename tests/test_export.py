"""FHIR export: every row of a twin comes back as valid R4 (R4B models), with its ids, codes, values and times.

The store is built from the fixtures (Synthea FHIR, fixtures/export/extra.ndjson for the
resource types Synthea lacks) plus a device stream generated here and fed through the
ingest stage as `Rows`, the interface the device-log connector uses.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from fhir.resources.R4B import get_fhir_model_class

from pipeline.cli import main
from pipeline.connectors.hl7v2_files import read_hl7v2
from pipeline.errors import ConfigError
from pipeline.export import (
    SOURCE_BASE,
    TWIN_ID_SYSTEM,
    aggregate_streams,
    export_twins,
    fhir_times,
    iter_bundles,
    parse_window,
    plan_groups,
)
from pipeline.identity import TwinIds, stored_links
from pipeline.imports import finish_run, run_import
from pipeline.ingest import Ingest, ViewSet
from pipeline.runs import Run
from pipeline.store import Store
from pipeline.temporal import parse_fhir_datetime
from pipeline.twins import build_twins
from pipeline.units import Rows
from tests.conftest import FIXTURES

EXTRA = FIXTURES / "export" / "extra.ndjson"
MRN = "urn:oid:2.16.840.1.113883.3.6543.1"
STREAM_START = datetime(2021, 3, 4, 4, 50, tzinfo=UTC)  # 10:20 at +05:30
TABLES = ("patient", "patient_identifier", "patient_link", "encounter", "condition", "observation", "diagnostic_report",
          "medication", "procedure", "immunization", "allergy", "imaging_study", "imaging_series", "device")


# --------------------------------------------------------------------------- building the store


def feed_rows(store: Store, source: str, units: list[Any], kind: str = "csv") -> None:
    """Store units as one import run (what the device-log and HL7 v2 connectors do)."""
    with store.locked("import"):
        run = Run(store, "import", inputs=["generated"])
        ingest = Ingest(store, run, source, kind, ViewSet(store.schema), twin_ids=TwinIds(stored_links(store)))
        for u in units:
            ingest.feed(u)
        ingest.finish()
        finish_run(store, run)


def rows(store: Store, table: str, data: list[dict[str, Any]], unit_key: str) -> Rows:
    schema = store.schema.table(table)
    names = sorted({k for d in data for k in d})
    t = pa.table({n: pa.array([d.get(n) for d in data], schema.by_name[n].arrow) for n in names})
    t = t.append_column("unit_key", pa.array([unit_key] * len(data), pa.string()))
    t = t.append_column("row_index", pa.array(range(len(data)), pa.int32()))
    return Rows(table, t, f"generated {unit_key}", len(data), unit_key)


def stream_samples() -> list[dict[str, Any]]:
    """2.5 h of heart rate every 10 s and SpO2 every 30 s, 2 h of 5-minute respiratory-rate windows, and a coded signal."""
    common = {"patient_id": "mon-17", "device_id": "dev-mon-1", "is_component": False, "status": "final",
              "category_code": "vital-signs", "code_system": "http://loinc.org", "effective_start_precision": "second",
              "effective_start_offset": "+05:30"}
    out = []
    for i in range(900):
        out.append({**common, "observation_id": f"hr-{i}", "code": "8867-4", "code_display": "Heart rate",
                    "value_type": "Quantity", "value_number": 60.0 + i % 40, "value_unit": "/min",
                    "value_unit_display": "beats/min", "effective_start": STREAM_START + timedelta(seconds=10 * i),
                    "quality_flag": "implausible" if i == 5 else None})
    for i in range(300):
        out.append({**common, "observation_id": f"sp-{i}", "code": "59408-5", "code_display": "SpO2",
                    "value_type": "Quantity", "value_number": 95.0 + i % 5, "value_unit": "%",
                    "effective_start": STREAM_START + timedelta(seconds=30 * i)})
    for i in range(24):  # already downsampled by the connector: mean, min, max, samples per 5 minutes
        start = STREAM_START + timedelta(minutes=5 * i)
        out.append({**common, "observation_id": f"rr-{i}", "code": "9279-1", "code_display": "Respiratory rate",
                    "value_type": "Quantity", "value_number": 14.0 + i % 3, "value_min": 10.0 + i % 3,
                    "value_max": 20.0 + i, "sample_count": 100 + i, "value_unit": "/min", "effective_start": start,
                    "effective_end": start + timedelta(minutes=5), "effective_end_precision": "second"})
    for i in range(60):
        out.append({**common, "observation_id": f"act-{i}", "code": "activity", "code_system": "https://example.org/act",
                    "value_type": "CodeableConcept", "value_code_system": "https://example.org/act-state",
                    "value_code": "rest" if i % 3 else "walk", "value_display": "Resting" if i % 3 else "Walking",
                    "effective_start": STREAM_START + timedelta(minutes=i)})
    return out


def add_device_stream(store: Store) -> None:
    ids = rows(store, "patient_identifier", [{"patient_id": "mon-17", "system": MRN, "value": "EXP-0001"}], "csv:ids:1")
    dev = rows(store, "device", [{"device_id": "dev-mon-1", "patient_id": "mon-17", "kind": "monitor",
                                  "manufacturer": "Example", "model": "M1", "status": "active"}], "csv:dev:1")
    feed_rows(store, "monitor", [ids, dev, rows(store, "observation", stream_samples(), "csv:stream:0")])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Store:
    store = Store(tmp_path_factory.mktemp("export") / "store")
    run_import(store, "fhir", [FIXTURES / "fhir", EXTRA])
    add_device_stream(store)
    build_twins(store)
    return store


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory) -> tuple[Store, Path, Any, dict[str, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("out")
    result = export_twins(built, out)
    bundles = {p.stem: orjson.loads(p.read_bytes()) for p in out.glob("*.json")}
    return built, out, result, bundles


def twin_of(store: Store, patient_id: str) -> str:
    t = store.read("patient", ["patient_id", "twin_id"], filter=pc.field("patient_id") == patient_id)
    return t.column("twin_id")[0].as_py()


def by_type(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def resource(bundle: dict[str, Any], rtype: str, rid: str) -> dict[str, Any]:
    found = [r for r in by_type(bundle, rtype) if r["id"] == rid]
    assert len(found) == 1, (rtype, rid)
    return found[0]


def is_stream(o: dict[str, Any]) -> bool:
    return any(t["code"] == "device-stream-window" for t in o.get("meta", {}).get("tag", []))


# --------------------------------------------------------------------------- validity, files, integrity


def test_every_resource_of_every_bundle_is_valid_r4b(exported):
    store, _, result, bundles = exported
    assert len(bundles) == store.count("twin") == result.twins
    n = 0
    for bundle in bundles.values():
        get_fhir_model_class("Bundle").model_validate(bundle)
        assert bundle["type"] == "collection"
        for e in bundle["entry"]:
            get_fhir_model_class(e["resource"]["resourceType"]).model_validate(e["resource"])
            n += 1
    assert n == result.entries > 1000
    assert result.reconciles() and not result.rejected and result.exit_code() == 0


def test_file_names_are_twin_ids(exported):
    store, out, _, bundles = exported
    twins = set(store.read("twin", ["twin_id"]).column("twin_id").to_pylist())
    assert set(bundles) == twins
    assert all(re.fullmatch(r"[0-9a-f]{32}\.json", p.name) for p in out.glob("*.json"))
    index = [orjson.loads(line) for line in (out / "index.ndjson").read_bytes().splitlines()]
    assert {i["twin_id"] for i in index} == twins and all(i["file"] == f"{i['twin_id']}.json" for i in index)
    assert not (out / "rejected.ndjson").exists()


def _references(node: Any):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from _references(v)
    elif isinstance(node, list):
        for v in node:
            yield from _references(v)


def resolve(full_url: str, reference: str) -> str:
    """FHIR Bundle rule: a relative reference resolves against the base of the entry that holds it."""
    if reference.startswith(("http://", "https://", "urn:")):
        return reference
    parts = full_url.split("/")
    return "/".join(parts[:-2]) + "/" + reference


def test_every_reference_resolves_or_is_listed_external(exported):
    _, out, _, bundles = exported
    index = {i["twin_id"]: i for i in map(orjson.loads, (out / "index.ndjson").read_bytes().splitlines())}
    outside = Counter()
    for tw, bundle in bundles.items():
        urls = [e["fullUrl"] for e in bundle["entry"]]
        assert len(urls) == len(set(urls))
        external = set(index[tw]["external_references"])
        for e in bundle["entry"]:
            for ref in _references(e["resource"]):
                target = resolve(e["fullUrl"], ref)
                assert target in urls or target in external, (e["fullUrl"], ref)
                if target not in urls:
                    outside[target.split("/")[-2]] += 1
        assert not external & set(urls)
    assert set(outside) <= {"Practitioner", "Organization", "Location", "Medication"}


def test_patients_carry_the_twin_id_and_their_own_ids(exported):
    store, _, _, bundles = exported
    pats = store.read("patient", ["twin_id", "source", "patient_id"]).to_pylist()
    for p in pats:
        res = resource(bundles[p["twin_id"]], "Patient", p["patient_id"])
        assert {"system": TWIN_ID_SYSTEM, "value": p["twin_id"]} in res["identifier"]
        assert f"{SOURCE_BASE}{p['source']}/Patient/{p['patient_id']}" in [e["fullUrl"] for e in bundles[p["twin_id"]]["entry"]]


# --------------------------------------------------------------------------- every row appears


def test_every_row_of_every_table_appears(exported):
    store, _, _, bundles = exported
    for tw, bundle in bundles.items():
        def count(table, flt=None, tw=tw):
            f = pc.field("twin_id") == tw
            return store.read(table, filter=f if flt is None else f & flt).num_rows

        pats = by_type(bundle, "Patient")
        records = store.read("patient_identifier", ["source", "patient_id"], filter=pc.field("twin_id") == tw).to_pylist()
        records += store.read("patient", ["source", "patient_id"], filter=pc.field("twin_id") == tw).to_pylist()
        assert len(pats) == len({(r["source"], r["patient_id"]) for r in records})
        assert sum(len([i for i in p["identifier"] if i["system"] != TWIN_ID_SYSTEM]) for p in pats) == count("patient_identifier")
        assert sum(len(p.get("link", [])) for p in pats) == count("patient_link")
        for table, rtype in (("encounter", "Encounter"), ("condition", "Condition"), ("procedure", "Procedure"),
                             ("immunization", "Immunization"), ("allergy", "AllergyIntolerance"),
                             ("diagnostic_report", "DiagnosticReport"), ("imaging_study", "ImagingStudy")):
            assert len(by_type(bundle, rtype)) == count(table), table
        for kind, rtype in (("request", "MedicationRequest"), ("administration", "MedicationAdministration"),
                            ("statement", "MedicationStatement")):
            assert len(by_type(bundle, rtype)) == count("medication", pc.field("kind") == kind)
        assert sum(len(s.get("series", [])) for s in by_type(bundle, "ImagingStudy")) == count("imaging_series")
        own_devices = [d for d in by_type(bundle, "Device") if "patient" in d]
        assert len(own_devices) == count("device")

        fhir_obs = pc.starts_with(pc.field("unit_key"), "Observation/")
        obs = [o for o in by_type(bundle, "Observation") if not is_stream(o) and not o["id"].startswith("news2-")]
        assert len(obs) == count("observation", fhir_obs & ~pc.field("is_component"))
        assert sum(len(o.get("component", [])) for o in obs) == count("observation", fhir_obs & pc.field("is_component"))
        stream = store.read("observation", ["sample_count"], filter=(pc.field("twin_id") == tw) & ~fhir_obs)
        samples = sum(n or 1 for n in stream.column("sample_count").to_pylist())
        exported_samples = sum(c["valueInteger"] for o in by_type(bundle, "Observation") if is_stream(o)
                               for c in o["component"] if c["code"]["coding"][0]["code"] == "count")
        assert exported_samples == samples


# --------------------------------------------------------------------------- round trip of key fields


def _check_time(text: str | None, ts: datetime | None, precision: str | None, offset: str | None) -> None:
    if ts is None:
        assert text is None
        return
    got_ts, got_prec, got_off = parse_fhir_datetime(text)
    assert got_ts == ts
    # minute precision gains ':00' seconds, and a time written without offset gains 'Z': FHIR requires both
    assert got_prec == ("second" if precision == "minute" else precision)
    assert got_off == (offset or ("+00:00" if got_prec not in ("year", "month", "day") else None))


def test_round_trip_of_observations(exported):
    store, _, _, bundles = exported
    t = store.read("observation", filter=pc.starts_with(pc.field("unit_key"), "Observation/")).to_pylist()
    panels = {(r["twin_id"], r["source"], r["observation_id"]): r for r in t if not r["is_component"]}
    comps = defaultdict(list)
    for r in sorted(t, key=lambda r: r["row_index"]):
        if r["is_component"]:
            comps[(r["twin_id"], r["source"], r["observation_id"])].append(r)
    for key, r in panels.items():
        o = resource(bundles[key[0]], "Observation", r["observation_id"])
        assert o["status"] == r["status"]
        for row, el in [(r, o)] + list(zip(comps[key], o.get("component", []), strict=True)):
            c = el["code"]["coding"][0]
            assert (c.get("system"), c.get("code"), c.get("display")) == (row["code_system"], row["code"], row["code_display"])
            if row["value_type"] == "Quantity":
                q = el["valueQuantity"]
                assert q.get("value") == row["value_number"] and q.get("code") == row["value_unit"]
                assert q.get("comparator") == row["value_comparator"]
            elif row["value_type"] == "CodeableConcept":
                assert el["valueCodeableConcept"]["coding"][0]["code"] == row["value_code"]
        period = o.get("effectivePeriod", {})
        _check_time(o.get("effectiveDateTime", period.get("start")), r["effective_start"],
                    r["effective_start_precision"], r["effective_start_offset"])
        _check_time(period.get("end"), r["effective_end"], r["effective_end_precision"], r["effective_end_offset"])


_TIMES = {  # table -> (id column, resource type or None for medication, [(element path, column)])
    "encounter": ("encounter_id", "Encounter", [("period.start", "period_start"), ("period.end", "period_end")]),
    "condition": ("condition_id", "Condition", [("onsetDateTime", "onset"), ("abatementDateTime", "abatement"),
                                                ("recordedDate", "recorded")]),
    "procedure": ("procedure_id", "Procedure", [("performedDateTime|performedPeriod.start", "performed_start"),
                                                ("performedPeriod.end", "performed_end")]),
    "immunization": ("immunization_id", "Immunization", [("occurrenceDateTime", "occurrence")]),
    "allergy": ("allergy_id", "AllergyIntolerance", [("onsetDateTime", "onset"), ("recordedDate", "recorded")]),
    "diagnostic_report": ("report_id", "DiagnosticReport", [("effectiveDateTime", "effective_start")]),
    "imaging_study": ("study_id", "ImagingStudy", [("started", "started")]),
    "patient": ("patient_id", "Patient", [("deceasedDateTime", "deceased_at")]),
}


def _get(res: dict[str, Any], path: str) -> Any:
    for alt in path.split("|"):
        node: Any = res
        for part in alt.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def test_round_trip_of_times_codes_and_statuses(exported):
    store, _, _, bundles = exported
    for table, (id_col, rtype, times) in _TIMES.items():
        for r in store.read(table).to_pylist():
            res = resource(bundles[r["twin_id"]], rtype, r[id_col])
            for path, col in times:
                _check_time(_get(res, path), r[col], r[f"{col}_precision"], r[f"{col}_offset"])
            if "status" in r:
                assert res.get("status") == r["status"]
            if "code" in r and r["code"] is not None:
                assert res["code"]["coding"][0]["code"] == r["code"]
    for r in store.read("medication").to_pylist():
        rtype = {"request": "MedicationRequest", "administration": "MedicationAdministration",
                 "statement": "MedicationStatement"}[r["kind"]]
        res = resource(bundles[r["twin_id"]], rtype, r["medication_record_id"])
        assert res["status"] == r["status"]
        when = res.get("authoredOn") or res.get("effectiveDateTime") or res.get("effectivePeriod", {}).get("start")
        _check_time(when, r["effective_start"], r["effective_start_precision"], r["effective_start_offset"])
        if r["code"]:
            assert res["medicationCodeableConcept"]["coding"][0]["code"] == r["code"]


def test_dates_keep_the_precision_and_offset_the_source_wrote(exported):
    store, _, _, bundles = exported
    b = bundles[twin_of(store, "tl-export-1")]
    p1, p2 = resource(b, "Patient", "tl-export-1"), resource(b, "Patient", "tl-export-2")
    assert p1["birthDate"] == "1970-05"
    assert p1["deceasedDateTime"] == "2023-03-04T05:06:07.123+05:30"
    assert p2["birthDate"] == "1970-05-17"  # the source wrote a time: it stays in the birthTime extension
    assert p2["_birthDate"]["extension"][0]["valueDateTime"] == "1970-05-17T08:30:00+02:00"
    assert resource(b, "Encounter", "enc-1")["period"] == {"start": "2021-03-04T10:30:00+05:30",
                                                           "end": "2021-03-04T12:00:00+05:30"}
    assert resource(b, "Condition", "cond-1")["onsetDateTime"] == "2015"
    assert resource(b, "AllergyIntolerance", "alg-1")["onsetDateTime"] == "2010-06"
    assert resource(b, "Observation", "crp-1")["effectiveDateTime"] == "2021-03-04T11:00:00.250+05:30"
    assert resource(b, "DiagnosticReport", "dr-1")["issued"] == "2021-03-04T13:00:00+05:30"


def test_components_values_and_coded_fields(exported):
    store, _, _, bundles = exported
    b = bundles[twin_of(store, "tl-export-1")]
    bp = resource(b, "Observation", "bp-1")
    assert [(c["code"]["coding"][0]["code"], c["valueQuantity"]["value"]) for c in bp["component"]] == \
        [("8480-6", 128), ("8462-4", 82.5)]
    assert bp["component"][0]["referenceRange"] == [{"low": {"value": 90}, "high": {"value": 130}}]
    assert "valueQuantity" not in bp
    crp = resource(b, "Observation", "crp-1")
    assert crp["valueQuantity"] == {"value": 5, "comparator": "<", "unit": "mg/L", "system": "http://unitsofmeasure.org",
                                    "code": "mg/L"}
    assert crp["interpretation"][0]["coding"][0]["code"] == "L"
    assert resource(b, "Observation", "note-1")["valueString"] == "patient comfortable"
    assert resource(b, "Observation", "preg-1")["valueBoolean"] is False
    assert resource(b, "Observation", "steps-1")["valueInteger"] == 8042
    assert resource(b, "Observation", "lmp-1")["valueDateTime"] == "2021-02-10"
    assert resource(b, "Observation", "ratio-1")["dataAbsentReason"]["coding"][0]["code"] == "unsupported"
    assert resource(b, "Observation", "smoke-1")["valueCodeableConcept"]["coding"][0]["code"] == "8517006"
    cond = resource(b, "Condition", "cond-1")
    assert cond["clinicalStatus"]["coding"][0] == {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                   "code": "active"}
    mr = resource(b, "MedicationRequest", "mr-1")
    assert mr["medicationReference"] == {"reference": "Medication/med-1"} and "intent" not in mr
    assert mr["_intent"]["extension"][0]["valueCode"] == "unknown"  # required, absent in the source: said so
    ma = resource(b, "MedicationAdministration", "ma-1")
    assert ma["dosage"]["dose"]["value"] == 5 and ma["effectivePeriod"]["end"] == "2021-03-04T11:05:00+05:30"
    img = resource(b, "ImagingStudy", "img-1")
    assert [s["uid"] for s in img["series"]] == ["1.2.826.0.1.3680043.8.498.1.1", "1.2.826.0.1.3680043.8.498.1.2"]
    assert img["series"][0]["performer"][0]["actor"] == {"reference": "Device/ct-1"}
    assert resource(b, "Device", "ct-1")["modelNumber"] == "CT-9000"  # equipment the series points at
    assert resource(b, "Encounter", "enc-1")["class"]["extension"][0]["valueCode"] == "unknown"


# --------------------------------------------------------------------------- device streams


def test_device_streams_are_windows_with_statistics(exported):
    store, _, _, bundles = exported
    b = bundles[twin_of(store, "tl-export-1")]
    windows = [o for o in by_type(b, "Observation") if is_stream(o)]
    expected: dict[tuple[str, str | None, int], list[dict[str, Any]]] = defaultdict(list)
    for s in stream_samples():
        hour = int(s["effective_start"].timestamp()) // 3600
        expected[(s["code"], s.get("value_code"), hour)].append(s)
    assert len(windows) == len(expected) < len(stream_samples()) / 20  # bounded: windows, not samples
    for o in windows:
        start = parse_fhir_datetime(o["effectivePeriod"]["start"])
        assert start[2] == "+05:30"  # the samples' offset
        code = o["code"]["coding"][0]["code"]
        value_code = o.get("valueCodeableConcept", {}).get("coding", [{}])[0].get("code")
        samples = expected[(code, value_code, int(start[0].timestamp()) // 3600)]
        stats = {c["code"]["coding"][0]["code"]: c.get("valueQuantity", {}).get("value", c.get("valueInteger"))
                 for c in o["component"]}
        n = [s.get("sample_count") or 1 for s in samples]
        assert stats["count"] == sum(n)
        assert o["subject"] == {"reference": "Patient/mon-17"} and o["device"] == {"reference": "Device/dev-mon-1"}
        if value_code is None:
            mean = sum(s["value_number"] * k for s, k in zip(samples, n, strict=True)) / sum(n)
            assert o["valueQuantity"]["value"] == pytest.approx(mean)
            assert stats["minimum"] == min(s.get("value_min", s["value_number"]) for s in samples)
            assert stats["maximum"] == max(s.get("value_max", s["value_number"]) for s in samples)
        end = max(s.get("effective_end") or s["effective_start"] for s in samples)
        assert parse_fhir_datetime(o["effectivePeriod"]["end"])[0] == end
    flagged = [o for o in windows if any(t["code"] == "implausible" for t in o["meta"]["tag"])]
    assert len(flagged) == 1 and flagged[0]["code"]["coding"][0]["code"] == "8867-4"


def test_stream_window_is_a_setting(built):
    twin = twin_of(built, "tl-export-1")
    (_, hourly), = iter_bundles(built, [twin])
    (_, quarter), = iter_bundles(built, [twin], stream_window=parse_window("15min"))
    count = lambda b: sum(1 for o in by_type(b, "Observation") if is_stream(o))  # noqa: E731
    assert count(quarter) > count(hourly)
    assert parse_window("1d") == timedelta(days=1)
    for bad in ("0h", "h", "5 years", "-1h"):
        with pytest.raises(ConfigError, match="stream-window"):
            parse_window(bad)


def test_aggregate_streams_of_nothing():
    assert aggregate_streams(pa.table({"x": pa.array([], pa.int64())}).slice(0, 0), timedelta(hours=1)).num_rows == 0


# --------------------------------------------------------------------------- the twin state


def test_twin_state_is_a_composition_pointing_at_entries(exported):
    store, _, _, bundles = exported
    for twin in store.read("twin").to_pylist():
        b = bundles[twin["twin_id"]]
        (comp,) = by_type(b, "Composition")
        assert comp["identifier"] == {"system": TWIN_ID_SYSTEM, "value": twin["twin_id"]}
        assert parse_fhir_datetime(comp["date"])[0] == twin["as_of"]
        assert b["entry"][len(by_type(b, "Patient"))]["resource"] is comp  # right after the patients
        urls = {e["fullUrl"]: e["resource"] for e in b["entry"]}
        sections = {s["code"]["coding"][0]["code"]: s for s in comp["section"]}
        vitals = [urls[e["reference"]] for e in sections["8716-3"].get("entry", [])]
        codes = {c["code"]["coding"][0]["code"] for o in vitals for c in [o, *o.get("component", [])]}
        assert {v["code"] for v in twin["latest_vitals"] or []} <= codes
        problems = [urls[e["reference"]] for e in sections["11450-4"].get("entry", [])]
        assert {p["code"]["coding"][0]["code"] for p in problems} == {c["code"] for c in twin["active_conditions"] or []}
        assert len(sections["18748-4"].get("entry", [])) == (twin["imaging_study_count"] or 0)
        news = [o for o in by_type(b, "Observation") if o["id"].startswith("news2-")]
        if twin["news2_score"] is None:
            assert not news
        else:
            assert news[0]["valueInteger"] == twin["news2_score"]
            assert all(urls[d["reference"]]["resourceType"] == "Observation" for d in news[0]["derivedFrom"])
    b = bundles[twin_of(store, "tl-export-1")]
    news = [o for o in by_type(b, "Observation") if o["id"].startswith("news2-")]
    assert news and len(news[0]["derivedFrom"]) == 6


# --------------------------------------------------------------------------- two source records, one twin


def test_a_twin_with_two_source_records(tmp_path):
    store = Store(tmp_path / "s")
    patient_file = FIXTURES / "fhir" / "bundles" / "patient-1.json"
    run_import(store, "fhir", [patient_file], source="hospital-a")
    run_import(store, "fhir", [patient_file], source="hospital-b")
    build_twins(store)
    result = export_twins(store, tmp_path / "out", validate=True)
    assert result.twins == 1 and result.reconciles() and not result.rejected
    (path,) = (tmp_path / "out").glob("*.json")
    bundle = orjson.loads(path.read_bytes())
    pats = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert [p["fullUrl"].split("/")[-3] for p in pats] == ["hospital-a", "hospital-b"]
    assert pats[0]["resource"]["id"] == pats[1]["resource"]["id"]  # the source's own id, twice, one per base
    per_source = Counter(e["fullUrl"].split("/")[-3] for e in bundle["entry"] if "/source/" in e["fullUrl"])
    assert per_source["hospital-a"] == per_source["hospital-b"] > 50
    for e in bundle["entry"]:
        if "/source/" in e["fullUrl"]:
            own = e["fullUrl"].split("/")[-3]
            for ref in _references(e["resource"]):
                assert resolve(e["fullUrl"], ref).split("/")[-3] == own  # never crosses into the other record
    for table, n in result.rows_read.items():
        if table != "twin":
            assert n == 2 * store.read(table, filter=pc.field("source") == "hospital-a").num_rows, table


# --------------------------------------------------------------------------- HL7 v2 records


def test_a_twin_from_fhir_and_hl7v2(tmp_path):
    """HL7 v2 times come without offsets and at minute precision; OBX-18 makes Devices: all of it valid FHIR."""
    store = Store(tmp_path / "s")
    run_import(store, "fhir", [FIXTURES / "fhir" / "bundles" / "patient-1.json"])  # the HL7 fixtures' patient
    feed_rows(store, "hl7", list(read_hl7v2(sorted((FIXTURES / "hl7v2").glob("twin-*.hl7")))), kind="hl7v2")
    build_twins(store)
    result = export_twins(store, tmp_path / "out", validate=True)
    assert result.reconciles() and not result.rejected
    hl7 = store.read("observation", ["twin_id", "observation_id"], filter=pc.field("source") == "hl7")
    assert hl7.num_rows
    twin = hl7.column("twin_id")[0].as_py()
    bundle = orjson.loads((tmp_path / "out" / f"{twin}.json").read_bytes())
    sources = {e["fullUrl"].split("/")[-3] for e in bundle["entry"] if "/source/" in e["fullUrl"]}
    assert sources == {"fhir", "hl7"}  # one person, two sources, one Bundle
    urls = {e["fullUrl"] for e in bundle["entry"]}
    for oid in set(hl7.column("observation_id").to_pylist()):
        assert f"{SOURCE_BASE}hl7/Observation/{oid}" in urls


# --------------------------------------------------------------------------- streaming in groups


def test_groups_fit_the_row_budget():
    groups = plan_groups(["a", "b", "c", "d", "e"], {"a": 5, "b": 5, "c": 20, "d": 1, "e": 1}, 10)
    assert groups == [["a", "b"], ["c"], ["d", "e"]]


def test_small_row_budget_gives_the_same_bundles(built):
    now = datetime(2030, 1, 1, tzinfo=UTC)
    one_group = {r.twin_id: b for r, b in iter_bundles(built, now=now)}
    one_each = {r.twin_id: b for r, b in iter_bundles(built, now=now, row_budget=1)}
    assert orjson.dumps(one_group, option=orjson.OPT_SORT_KEYS) == orjson.dumps(one_each, option=orjson.OPT_SORT_KEYS)


def test_fhir_times_formats():
    texts = ["2020", "2020-05", "2020-05-17", "2020-05-17T10:30+02:00", "2020-05-17T10:30:05.123456-03:30",
             "2020-05-17T23:30:05Z", "2020-05-17T10:30:05"]
    parsed = [parse_fhir_datetime(t) for t in texts]
    ts = pa.array([p[0] for p in parsed] + [None], pa.timestamp("us", tz="UTC"))
    prec, off = pa.array([p[1] for p in parsed] + [None]), pa.array([p[2] for p in parsed] + [None])
    assert fhir_times(ts, prec, off).to_pylist() == [
        "2020", "2020-05", "2020-05-17", "2020-05-17T10:30:00+02:00", "2020-05-17T10:30:05.123456-03:30",
        "2020-05-17T23:30:05+00:00", "2020-05-17T10:30:05Z", None]
    assert fhir_times(ts, prec, off, "instant").to_pylist()[2] == "2020-05-17T00:00:00Z"
    assert fhir_times(ts, prec, off, "date").to_pylist()[3:5] == ["2020-05-17", "2020-05-17"]
    bad = fhir_times(ts.slice(3, 1), prec.slice(3, 1), pa.array(["+5:00"]))
    assert bad.to_pylist() == ["2020-05-17T08:30:00Z"]  # an offset the store should never hold is not trusted


# --------------------------------------------------------------------------- bad rows, validation, the CLI


def test_bad_rows_are_rejected_with_reasons_and_the_twin_goes_on(tmp_path):
    store = Store(tmp_path / "s")
    run_import(store, "fhir", [EXTRA])
    bad = [  # the hostile source names the same person (its MRN), so its rows join that twin
        rows(store, "patient_identifier", [{"patient_id": "tl-export-1", "system": MRN, "value": "EXP-0001"}], "ids"),
        rows(store, "encounter", [{"encounter_id": "enc-bad", "patient_id": "tl-export-1", "status": "finished",
                                   "class_code": "SECRET  VALUE"}], "Encounter/enc-bad"),
        rows(store, "observation", [{"observation_id": "orphan", "patient_id": "tl-export-1", "is_component": True,
                                     "status": "final", "code": "8480-6"}], "Observation/orphan"),
        rows(store, "medication", [{"kind": "prescription", "medication_record_id": "m-odd",
                                    "patient_id": "tl-export-1", "status": "active"}], "MedicationRequest/m-odd"),
        rows(store, "condition", [{"condition_id": "not a fhir id!", "patient_id": "tl-export-1",
                                   "code": "38341003"}], "Condition/odd"),
        rows(store, "observation", [{"observation_id": "huge", "patient_id": "tl-export-1", "is_component": False,
                                     "status": "final", "code": "x", "value_type": "integer", "value_number": 1e12}],
             "Observation/huge"),
        rows(store, "observation", [{"observation_id": "nan", "patient_id": "tl-export-1", "is_component": False,
                                     "status": "final", "code": "x", "value_type": "Quantity",
                                     "value_number": float("nan"), "value_unit": "mg"}], "Observation/nan"),
    ]
    feed_rows(store, "hostile", bad)
    build_twins(store)
    run_import(store, "fhir", [FIXTURES / "fhir" / "bundles" / "patient-2.json"])  # after the build: not a twin yet
    out = tmp_path / "out"
    result = export_twins(store, out, validate=True)
    assert any("not in the last build" in n for n in result.notes) and "twin build" in result.summary()
    assert result.rejected == Counter({"invalid-resource": 1, "orphan-component": 1, "export-failed": 1})
    assert result.reconciles() and result.exit_code() == 3
    assert result.rows_rejected == Counter({"encounter": 1, "observation": 1, "medication": 1})
    lines = [orjson.loads(x) for x in (out / "rejected.ndjson").read_bytes().splitlines()]
    assert {x["reason"] for x in lines} == set(result.rejected)
    for x in lines:
        assert "SECRET" not in x["message"] and "tl-export" not in x["message"] and x["stage"] == "export"
    invalid = next(x for x in lines if x["reason"] == "invalid-resource")
    assert "class.code" in invalid["message"] and invalid["payload"]["id"] == "enc-bad"
    (bundle_path,) = out.glob("*.json")
    bundle = orjson.loads(bundle_path.read_bytes())
    odd = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Condition" and "/hostile/" in e["fullUrl"]]
    assert len(odd) == 1 and re.fullmatch(r"x-[0-9a-f]{40}", odd[0]["resource"]["id"])  # a stable, valid id
    obs = {e["resource"]["id"]: e["resource"] for e in bundle["entry"] if "/hostile/Observation/" in e["fullUrl"]}
    assert obs["huge"]["valueQuantity"] == {"value": 1_000_000_000_000}  # too big for a FHIR integer
    assert obs["nan"]["valueQuantity"] == {"system": "http://unitsofmeasure.org", "code": "mg"}  # no NaN in JSON
    get_fhir_model_class("Bundle").model_validate(bundle)
    assert "SECRET" not in result.summary()


def test_cli_exports_one_twin_or_all(built, tmp_path, capsys):
    store = str(built.root)
    assert main(["export", "tl-export-2", "--store", store, "--out", str(tmp_path / "one")]) == 0
    assert [p.stem for p in (tmp_path / "one").glob("*.json")] == [twin_of(built, "tl-export-1")]
    assert "1 twin(s)" in capsys.readouterr().out
    assert main(["export", "--all", "--format", "fhir", "--store", store, "--out", str(tmp_path / "all"),
                 "--stream-window", "30min"]) == 0
    assert len(list((tmp_path / "all").glob("*.json"))) == built.count("twin")
    assert main(["export", "--store", store]) == 2
    assert main(["export", "nobody", "--store", store, "--out", str(tmp_path / "x")]) == 2
    assert main(["export", "--all", "--store", store, "--stream-window", "soon"]) == 2


def test_export_before_any_build_says_what_to_do(tmp_path):
    store = Store(tmp_path / "s")
    run_import(store, "fhir", [EXTRA])
    with pytest.raises(ConfigError, match="twin build"):
        export_twins(store, tmp_path / "out")


# --------------------------------------------------------------------------- real public data


@pytest.mark.slow
def test_shared_bulk_sample_exports_valid_bundles(shared_data, tmp_path):
    src = shared_data / "fhir" / "sample-bulk-fhir-datasets" / "10-patients"
    store = Store(tmp_path / "s")
    run_import(store, "fhir", [src])
    build_twins(store)
    result = export_twins(store, tmp_path / "out", validate=True)
    assert result.twins == store.count("twin") and result.reconciles() and not result.rejected
    for path in (tmp_path / "out").glob("*.json"):
        get_fhir_model_class("Bundle").model_validate(orjson.loads(path.read_bytes()))
