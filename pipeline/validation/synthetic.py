"""Tables in the twin schema's shape, built from a few dicts or generated: for tests, benchmarks, demos.

`make_table` fills what a store would (provenance columns, time precision companions) so
that a test states only what matters to it. `population` makes a small balanced synthetic
population (every combination of sex, age band, race and ethnicity equally often, each
patient with the same measures) that passes every check of the gate against a uniform
reference; a test breaks one thing and expects exactly one check to fail.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from ..temporal import parse_fhir_datetime
from .layout import TableLayout, layouts

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
_UNIT_KIND = {"patient": "Patient", "encounter": "Encounter", "observation": "Observation", "condition": "Condition",
              "procedure": "Procedure", "imaging_study": "ImagingStudy", "device": "Device"}


def _ts(v: Any) -> tuple[datetime | None, str | None]:
    if v is None:
        return None, None
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).astimezone(UTC), "second"
    dt, precision, _ = parse_fhir_datetime(v)
    return dt, precision


def make_columns(schema: dict[str, Any] | TableLayout, name: str, columns: Mapping[str, Sequence[Any]],
                 *, source: str = "test", run_id: str = "run-1", ingested_at: datetime | None = None) -> pa.Table:
    """A table from column lists; columns not given are null, provenance columns are filled in.

    Time columns take datetimes or FHIR date text; their `_precision` companion is filled
    when not given. `twin_id` defaults to "T" + the patient id.
    """
    layout = schema if isinstance(schema, TableLayout) else layouts(schema)[name]
    n = len(next(iter(columns.values()))) if columns else 0
    cols: dict[str, Any] = {k: list(v) for k, v in columns.items()}
    for c in layout.temporal:
        if c in cols and f"{c}_precision" not in cols:
            parsed = [_ts(v) for v in cols[c]]
            cols[c] = [p[0] for p in parsed]
            cols[f"{c}_precision"] = [p[1] for p in parsed]
    pcol = "patient_id" if name == "patient" else layout.patient_column
    key = layout.key[0]
    if layout.provenance:
        if "twin_id" not in cols and pcol in cols:
            cols["twin_id"] = [None if p is None else f"T{p}" for p in cols[pcol]]
        cols.setdefault("source", [source] * n)
        cols.setdefault("source_ref", [f"{name}.ndjson:{i + 1}" for i in range(n)])
        cols.setdefault("run_id", [run_id] * n)
        cols.setdefault("ingested_at", [ingested_at or datetime.now(UTC)] * n)
        kind = _UNIT_KIND.get(name, name)
        cols.setdefault("unit_key", [f"{kind}/{k}" for k in cols.get(key, range(n))])
        cols.setdefault("row_index", [0] * n)
        cols.setdefault("content_hash", [hashlib.sha256(str(i).encode()).hexdigest()[:16] for i in cols["unit_key"]])
    arrays = [pa.array(cols[c], spec.arrow) if c in cols else pa.nulls(n, spec.arrow) for c, spec in layout.columns.items()]
    return pa.Table.from_arrays(arrays, schema=pa.schema([pa.field(c, s.arrow) for c, s in layout.columns.items()]))


def make_table(schema: dict[str, Any], name: str, rows: Sequence[Mapping[str, Any]], **kw: Any) -> pa.Table:
    """A table from a few row dicts (see make_columns)."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return make_columns(schema, name, {k: [r.get(k) for r in rows] for k in names}, **kw)


SEXES = ("female", "male")
AGES = (10, 40, 75)                                  # one age in each default band: 0-17, 18-64, 65+
RACES = ("2106-3", "2054-5", "2028-9", "2131-1")     # White, Black, Asian, Some other race
ETHNICITIES = ("2135-2", "2186-5")                   # Hispanic or Latino, not


def uniform_reference_csv() -> str:
    """A reference population in which every group of `population` has the same share."""
    lines = ["dimension,group,codes,count"]
    lines += [f"sex,{s},{s},100" for s in SEXES]
    lines += [f"age_band,{b},,100" for b in ("0-17", "18-64", "65+")]
    lines += [f"race,{r},{r},100" for r in RACES]
    lines += [f"ethnicity,{e},{e},100" for e in ETHNICITIES]
    return "\n".join(lines) + "\n"


def population(schema: dict[str, Any], now: datetime, per_cell: int = 10) -> dict[str, pa.Table]:
    """A balanced synthetic population: per_cell patients for each sex x age x race x ethnicity.

    Every patient has one encounter, SpO2 (by pulse oximeter A or B, alternating within
    each cell), heart rate (by a bedside monitor), HbA1c and one imaging study; every
    woman has a normal-pregnancy condition, every patient a hypertension condition.
    """
    ingested = now - timedelta(hours=1)
    when = (now - timedelta(days=30)).isoformat()
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in
                                             ("patient", "encounter", "observation", "condition", "imaging_study", "device")}
    rows["device"] = [
        {"device_id": "ox-a", "kind": "monitor", "manufacturer": "Acme", "model": "Ox-1"},
        {"device_id": "ox-b", "kind": "monitor", "manufacturer": "Beta", "model": "Ox-2"},
        {"device_id": "mon-1", "kind": "monitor", "manufacturer": "Gamma", "model": "Bedside-9"},
    ]
    n = 0
    for sex, age, race, eth in itertools.product(SEXES, AGES, RACES, ETHNICITIES):
        for i in range(per_cell):
            n += 1
            pid, enc = f"p{n}", f"e{n}"
            birth = (now - timedelta(days=int(age * 365.25) + 40)).date().isoformat()
            rows["patient"].append({"patient_id": pid, "sex": sex, "birth_date": birth, "race_code": race,
                                    "ethnicity_code": eth, "deceased": False})
            rows["encounter"].append({"encounter_id": enc, "patient_id": pid, "status": "finished",
                                      "class_system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                      "class_code": "AMB", "period_start": when, "period_end": when})
            for code, unit, value, cat, dev in (("59408-5", "%", 97.0, "vital-signs", "ox-a" if i % 2 == 0 else "ox-b"),
                                                ("8867-4", "/min", 72.0, "vital-signs", "mon-1"),
                                                ("4548-4", "%", 5.6, "laboratory", None)):
                rows["observation"].append({
                    "observation_id": f"{pid}-{code}", "patient_id": pid, "encounter_id": enc, "is_component": False,
                    "category_code": cat, "code_system": LOINC, "code": code, "value_type": "Quantity",
                    "value_number": value, "value_unit": unit, "effective_start": when, "status": "final",
                    "device_id": dev})
            rows["condition"].append({"condition_id": f"{pid}-htn", "patient_id": pid, "encounter_id": enc,
                                      "code_system": SNOMED, "code": "38341003", "onset": when})
            if sex == "female":
                rows["condition"].append({"condition_id": f"{pid}-preg", "patient_id": pid, "encounter_id": enc,
                                          "code_system": SNOMED, "code": "72892002", "onset": when})
            rows["imaging_study"].append({"study_id": f"s{n}", "patient_id": pid, "encounter_id": enc,
                                          "status": "available", "started": when, "modalities": "CT"})
    return {t: make_table(schema, t, r, ingested_at=ingested) for t, r in rows.items()}


__all__ = ["population", "make_columns", "make_table", "uniform_reference_csv", "LOINC", "SNOMED", "UCUM"]
