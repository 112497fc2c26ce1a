"""Benchmark: the compiled view runner against a hand-written extractor of the same columns.

    python bench/views.py [N]

Builds N Observations (from the Synthea bundles in ../shared/data when present, else
generated ones of the same shape), then runs, on one core and in the same process:

- the compiled ViewDefinition `VIEW` below: 25 columns, ofType() on Quantity /
  CodeableConcept / string / boolean values, first(), where(), getReferenceKey(Patient),
  and a unionAll of the Observation itself with one row per component;
- `hand_rows`, a plain-Python extractor of exactly the same rows (checked equal first);
- when present, the project's own mappings/views/observation.json.

Prints Observations per second for each and the ratio compiled / hand-written (the
machine is shared and noisy: the ratio is the number to compare between runs).
Targets: ratio >= 0.5 and >= 40,000 Observations/s.
"""

from __future__ import annotations

import gc
import random
import sys
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.views import compile_view  # noqa: E402

SYNTHEA = REPO.parent / "shared" / "data" / "fhir" / "generated-sample-data" / "R4" / "SYNTHEA"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
LOINC = "http://loinc.org"


def _value_columns(part: str) -> list[dict]:
    return [
        {"name": "part", "path": f"'{part}'"},
        {"name": "part_code", "path": "code.coding.first().code"},
        {"name": "value_number", "path": "value.ofType(Quantity).value"},
        {"name": "value_unit", "path": "value.ofType(Quantity).code"},
        {"name": "value_unit_display", "path": "value.ofType(Quantity).unit"},
        {"name": "value_comparator", "path": "value.ofType(Quantity).comparator"},
        {"name": "value_code_system", "path": "value.ofType(CodeableConcept).coding.first().system"},
        {"name": "value_code", "path": "value.ofType(CodeableConcept).coding.first().code"},
        {"name": "value_display", "path": "value.ofType(CodeableConcept).coding.first().display"},
        {"name": "value_string", "path": "value.ofType(string)"},
        {"name": "value_boolean", "path": "value.ofType(boolean)"},
        {"name": "interpretation", "path": "interpretation.first().coding.first().code"},
        {"name": "reference_low", "path": "referenceRange.first().low.value"},
    ]


VIEW = {
    "resourceType": "ViewDefinition", "name": "bench_observation", "resource": "Observation",
    "select": [{
        "column": [
            {"name": "id", "path": "getResourceKey()"},
            {"name": "patient_id", "path": "subject.getReferenceKey(Patient)"},
            {"name": "encounter_id", "path": "encounter.getReferenceKey(Encounter)"},
            {"name": "status", "path": "status"},
            {"name": "category", "path": "category.first().coding.first().code"},
            {"name": "is_vital_sign", "path": f"category.coding.where(system = '{CATEGORY}' and code = 'vital-signs')"
                                              ".exists()"},
            {"name": "effective", "path": "effective.ofType(dateTime)"},
            {"name": "effective_start", "path": "effective.ofType(Period).start"},
            {"name": "issued", "path": "issued"},
            {"name": "loinc", "path": f"code.coding.where(system = '{LOINC}').code.first()"},
            {"name": "code_display", "path": "code.coding.first().display"},
            {"name": "code_text", "path": "code.text"},
        ],
        "unionAll": [
            {"column": _value_columns("observation")},
            {"forEach": "component", "column": _value_columns("component")},
        ],
    }],
}


# --------------------------------------------------------------------------- hand-written


def _d(v: object) -> dict:
    return v if type(v) is dict else {}


def _first(v: object) -> dict:
    return v[0] if type(v) is list and v and type(v[0]) is dict else {}


def _ref_id(ref: object, rtype: str) -> str | None:
    r = _d(ref).get("reference")
    if type(r) is not str:
        return None
    parts = r.split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == rtype else None


def _values(part: str, x: dict) -> tuple:
    q = _d(x.get("valueQuantity"))
    cc = _first(_d(x.get("valueCodeableConcept")).get("coding"))
    return (
        part,
        _first(_d(x.get("code")).get("coding")).get("code"),
        q.get("value"), q.get("code"), q.get("unit"), q.get("comparator"),
        cc.get("system"), cc.get("code"), cc.get("display"),
        x.get("valueString"), x.get("valueBoolean"),
        _first(_first(x.get("interpretation")).get("coding")).get("code"),
        _d(_first(x.get("referenceRange")).get("low")).get("value"),
    )


def hand_rows(o: dict) -> list[tuple]:
    if o.get("resourceType") != "Observation":
        return []
    code = _d(o.get("code"))
    codings = code.get("coding") if type(code.get("coding")) is list else []
    cats = o.get("category") if type(o.get("category")) is list else []
    vital = any(type(c) is dict and c.get("system") == CATEGORY and c.get("code") == "vital-signs"
                for cat in cats if type(cat) is dict for c in (cat.get("coding") or ()))
    loinc = next((c.get("code") for c in codings if type(c) is dict and c.get("system") == LOINC
                  and c.get("code") is not None), None)
    head = (
        o.get("id"), _ref_id(o.get("subject"), "Patient"), _ref_id(o.get("encounter"), "Encounter"),
        o.get("status"), _first(_first(cats).get("coding")).get("code"), vital,
        o.get("effectiveDateTime"), _d(o.get("effectivePeriod")).get("start"), o.get("issued"),
        loinc, _first(codings).get("display"), code.get("text"),
    )
    rows = [head + _values("observation", o)]
    for comp in o.get("component") or ():
        if type(comp) is dict:
            rows.append(head + _values("component", comp))
    return rows


# --------------------------------------------------------------------------- data


def load_observations(n: int) -> tuple[list[dict], str]:
    found: list[dict] = []
    if SYNTHEA.is_dir():
        for p in sorted(SYNTHEA.glob("*.json")):
            bundle = orjson.loads(p.read_bytes())
            for e in bundle.get("entry", []):
                r = e.get("resource", {})
                if r.get("resourceType") == "Observation":
                    # the bundles use urn:uuid references; make them literal as a server would
                    for k in ("subject", "encounter"):
                        if isinstance(r.get(k), dict):
                            r[k] = {"reference": ("Patient/" if k == "subject" else "Encounter/")
                                    + r[k].get("reference", "").rsplit(":", 1)[-1]}
                    found.append(r)
        source = f"Synthea bundles in {SYNTHEA}"
    if not found:
        found = [_generated(i) for i in range(2000)]
        source = "generated Observations (../shared absent)"
    return [found[i % len(found)] for i in range(n)], f"{len(found)} distinct, from {source}"


def _generated(i: int) -> dict:
    rnd = random.Random(i)
    o = {
        "resourceType": "Observation", "id": f"obs-{i}", "status": "final",
        "category": [{"coding": [{"system": CATEGORY, "code": rnd.choice(["vital-signs", "laboratory"])}]}],
        "code": {"coding": [{"system": LOINC, "code": f"{1000 + i % 90}-{i % 7}", "display": "Some test"}],
                 "text": "Some test"},
        "subject": {"reference": f"Patient/p{i % 300}"}, "encounter": {"reference": f"Encounter/e{i % 900}"},
        "effectiveDateTime": "2020-01-01T10:00:00+01:00", "issued": "2020-01-01T10:00:00.000+01:00",
    }
    kind = i % 10
    if kind == 0:
        o["component"] = [{"code": {"coding": [{"system": LOINC, "code": c}]},
                           "valueQuantity": {"value": rnd.randint(60, 140), "unit": "mm[Hg]", "code": "mm[Hg]"}}
                          for c in ("8480-6", "8462-4")]
    elif kind == 1:
        o["valueCodeableConcept"] = {"coding": [{"system": "http://snomed.info/sct", "code": "260385009",
                                                 "display": "Negative"}]}
    elif kind == 2:
        o["valueString"] = "free text"
    else:
        o["valueQuantity"] = {"value": round(rnd.uniform(1, 200), 1), "unit": "mg/dL", "code": "mg/dL"}
    return o


# --------------------------------------------------------------------------- timing


def best_rate(fn, obs: list[dict], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        for o in obs:
            fn(o)
        best = min(best, time.perf_counter() - t)
    return len(obs) / best


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    obs, source = load_observations(n)
    view = compile_view(VIEW)
    assert len(view.columns) == 25
    mismatched = sum(view.rows(o) != hand_rows(o) for o in obs[:5000])
    if mismatched:
        raise SystemExit(f"the compiled view and the hand-written extractor disagree on {mismatched} Observations")
    print(f"{n} Observations ({source}); {sum(len(hand_rows(o)) for o in obs)} rows of {len(view.columns)} columns")
    hand = best_rate(hand_rows, obs)
    compiled = best_rate(view.rows, obs)
    print(f"hand-written extractor : {hand:10,.0f} Observations/s  (baseline)")
    print(f"compiled view          : {compiled:10,.0f} Observations/s  ratio {compiled / hand:.2f}"
          f"  (target >= 0.50 and >= 40,000/s)")
    project_view = REPO / "mappings" / "views" / "observation.json"
    if project_view.is_file():
        pv = compile_view(orjson.loads(project_view.read_bytes()))
        rate = best_rate(pv.rows, obs)
        print(f"mappings/views/observation.json ({len(pv.columns)} columns): {rate:10,.0f} Observations/s"
              f"  ratio {rate / hand:.2f}")


if __name__ == "__main__":
    main()
