"""Plausibility across rows and tables: events between birth and death, periods in order, sex-specific codes.

Plain pyarrow: each row is joined to its person (people.py), which GX cannot do.

Times keep the precision the source gave (FHIR allows `2020` or `2020-05`), so a
comparison uses the period a value stands for: an event written `2020` is before a
birth on 2020-06-01 only if the whole of 2020 is. The bounds are lenient by a few days
at most (people.upper_bound), so a flag is never an artefact of precision.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .checks import Finding
from .config import GateConfig
from .layout import TableLayout
from .people import People, person_keys, upper_bound

# Tables whose rows are events in a person's life (not the patient record itself).
EVENT_EXCLUDE = frozenset({"patient", "patient_identifier", "patient_link", "device", "twin", "timeline"})


def _rows(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.indices_nonzero(pc.fill_null(mask, False)).to_numpy()


def _count(mask) -> int:
    return int(pc.sum(pc.fill_null(mask, False)).as_py() or 0)


def life_checks(tables: Mapping[str, pa.Table], layouts: Mapping[str, TableLayout], persons: People,
                config: GateConfig) -> list[Finding]:
    """after-birth and before-death for every time column of every event table."""
    grace = timedelta(days=float(config.check("before-death").params.get("grace_days", 60)))
    findings = []
    for name, data in tables.items():
        layout = layouts.get(name)
        if layout is None or name in EVENT_EXCLUDE or not layout.temporal or data.num_rows == 0:
            continue
        keys = person_keys(data, layout)
        if keys is None:
            continue
        idx = persons.index_of(keys)
        birth = pc.take(persons.birth, idx)
        death_limit = pc.add(pc.take(persons.death_upper, idx), pa.scalar(grace, pa.duration("us")))
        for col in layout.temporal:
            if col not in data.column_names:
                continue
            start = data.column(col)
            prec = data.column(f"{col}_precision") if f"{col}_precision" in data.column_names else None
            if config.check("after-birth", name, col).enabled:
                known = pc.and_(pc.is_valid(start), pc.is_valid(birth))
                before = pc.less(upper_bound(start, prec), birth)
                findings.append(Finding("after-birth", name, col, failing=_count(before), denominator=_count(known),
                                        rows=_rows(before)))
            if config.check("before-death", name, col).enabled:
                known = pc.and_(pc.is_valid(start), pc.is_valid(death_limit))
                after = pc.greater(start, death_limit)
                findings.append(Finding("before-death", name, col, failing=_count(after), denominator=_count(known),
                                        rows=_rows(after), details={"grace_days": grace.days}))
    return findings


def period_checks(tables: Mapping[str, pa.Table], layouts: Mapping[str, TableLayout], config: GateConfig) -> list[Finding]:
    """start-before-end for X_start/X_end pairs of the schema and the configured extra pairs."""
    pairs = [(name, c, c[: -len("_start")] + "_end") for name, t in layouts.items() for c in t.temporal
             if c.endswith("_start") and c[: -len("_start")] + "_end" in t.columns]
    pairs += [tuple(p) for p in config.check("start-before-end").params.get("extra_pairs", [])]
    findings = []
    for name, start_col, end_col in pairs:
        data = tables.get(name)
        if data is None or start_col not in data.column_names or end_col not in data.column_names:
            continue
        if not config.check("start-before-end", name, end_col).enabled:
            continue
        start, end = data.column(start_col), data.column(end_col)
        prec = data.column(f"{end_col}_precision") if f"{end_col}_precision" in data.column_names else None
        known = pc.and_(pc.is_valid(start), pc.is_valid(end))
        bad = pc.greater(start, upper_bound(end, prec))
        findings.append(Finding("start-before-end", name, end_col, failing=_count(bad), denominator=_count(known),
                                rows=_rows(bad), details={"start": start_col, "end": end_col}))
    return findings


def sex_checks(tables: Mapping[str, pa.Table], layouts: Mapping[str, TableLayout], persons: People,
               config: GateConfig) -> list[Finding]:
    """Rows with a code listed for one sex whose person has the other (DQD plausibleGender)."""
    if "sex" not in persons.attrs:
        return []
    findings = []
    for name in dict.fromkeys(c.table for c in config.sex_specific):
        data, layout = tables.get(name), layouts.get(name)
        if data is None or layout is None or data.num_rows == 0 or not config.check("sex-specific", name, "code").enabled:
            continue
        if "code" not in data.column_names or "code_system" not in data.column_names:
            continue
        system, code = data.column("code_system"), data.column("code")
        masks = {}
        for sex in ("female", "male"):
            m = pa.array(np.zeros(data.num_rows, dtype=bool))
            for sc in (c for c in config.sex_specific if c.table == name and c.sex == sex):
                hit = pc.starts_with(code, sc.prefix) if sc.prefix else pc.equal(code, sc.code)
                m = pc.or_(m, pc.fill_null(pc.and_(pc.equal(system, sc.system), hit), False))
            masks[sex] = m
        keys = person_keys(data, layout)
        sex_of = pc.take(persons.attrs["sex"], persons.index_of(keys)) if keys is not None else pa.nulls(data.num_rows, pa.string())
        coded = pc.or_(masks["female"], masks["male"])
        wrong = pc.or_(pc.and_(masks["female"], pc.equal(sex_of, "male")),
                       pc.and_(masks["male"], pc.equal(sex_of, "female")))
        findings.append(Finding("sex-specific", name, "code", failing=_count(wrong), denominator=_count(coded),
                                rows=_rows(wrong)))
    return findings


__all__ = ["life_checks", "period_checks", "sex_checks"]
