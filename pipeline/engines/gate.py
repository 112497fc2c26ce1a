"""`twin check --engine spark`: the gate partitioned by patient.

Every row belongs to one patient bucket (the twin's, `pipeline.twins.twin_bucket`; rows
without a twin go to bucket 0), and most checks judge a row by itself and its own
patient (`PER_PATIENT`: required values, code lists, units, ranges, dates against birth
and death, periods, sex-specific codes). Each task reads its bucket's rows, runs those
checks with the single process's code, and returns counts, examples and the locators of
rows to quarantine; the driver adds them up. The checks that compare rows of different
patients (unique keys, references) or judge the population (bias, freshness, patients
without data) run once on the driver, over only the columns they read; the structural
checks need only the tables' schemas. Counts, verdicts and examples are those of the
single-process gate (tests/test_spark.py compares them).
"""

from __future__ import annotations

import os
from collections import defaultdict
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..store import Store
from ..twins import twin_bucket
from ..validation.checks import LOCATOR_COLUMNS, Finding, GateResult, RowFailure, judge, row_message
from ..validation.config import GateConfig
from ..validation.gate import (
    PER_PATIENT,
    examples,
    judge_all,
    measure,
    only_kinds,
    structure_checks,
    typed_tables,
)
from ..validation.layout import TableLayout, layouts, references
from .parts import Part

_PROVENANCE = ("twin_id", "source", "source_ref", "unit_key", "row_index", "ingested_at")


def bucket_rows(store: Store, table: str, bucket: int, buckets: int) -> pa.Table:
    """The rows of one bucket of patients (and, in bucket 0, the rows without a twin)."""
    data = store.read(table)
    ids = data.column("twin_id")
    uniq = pc.unique(ids).drop_null()
    mine = pa.array([i for i in uniq.to_pylist() if twin_bucket(i, buckets) == bucket], pa.string())
    mask = pc.is_in(ids, value_set=mine)
    if bucket == 0:
        mask = pc.or_(mask, pc.is_null(ids))
    return data.filter(pc.fill_null(mask, False))


def gate_bucket(root: str, bucket: int, buckets: int, tables: list[str], config: GateConfig,
                now: datetime) -> dict[str, Any]:
    """One task: the per-patient checks over one bucket; findings as JSON-ready dicts."""
    store = Store(root)
    lay = layouts(store.schema.raw)
    data = {t: bucket_rows(store, t, bucket, buckets) for t in tables}
    findings = measure(typed_tables(data, lay), lay, only_kinds(config, PER_PATIENT.__contains__), now)
    out = []
    for f in findings:
        rows = f.rows if f.rows is not None else []
        _, quarantine = judge(f, config)
        locators = []
        if quarantine is not None:
            t = data[f.table]
            idx = pa.array(quarantine, pa.int64())
            cols = [t.column(c).take(idx).to_pylist() if c in t.column_names else [None] * len(idx)
                    for c in LOCATOR_COLUMNS]
            locators = [list(x) for x in zip(*cols, strict=True)]
        out.append({"kind": f.kind, "table": f.table, "column": f.column, "failing": f.failing,
                    "denominator": f.denominator, "observed": f.observed, "details": f.details,
                    "verdict": f.verdict, "summary": f.summary, "has_rows": f.rows is not None,
                    "examples": examples(data[f.table], rows, config.examples) if len(rows) else [],
                    "quarantine": locators})
    return {"part": bucket, "findings": out}


def _merge(parts: list[dict[str, Any]], examples_k: int) -> list[tuple[Finding, list[str], list[list[Any]]]]:
    """Add up the buckets' findings of each check (in the order the checks first appear)."""
    merged: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    for part in parts:
        for f in part["findings"]:
            key = (f["kind"], f["table"], f["column"])
            m = merged.get(key)
            if m is None:
                merged[key] = {**f, "details": dict(f["details"]), "examples": list(f["examples"]),
                               "quarantine": list(f["quarantine"])}
                continue
            m["failing"] += f["failing"]
            m["denominator"] += f["denominator"]
            m["examples"] = sorted(m["examples"] + f["examples"])[:examples_k]
            m["quarantine"] += f["quarantine"]
            if f["verdict"] is False:
                m["verdict"], m["summary"] = False, f["summary"]
            for k, v in f["details"].items():  # by_code counts add up; the rest is the same in every bucket
                if isinstance(v, dict) and isinstance(m["details"].get(k), dict):
                    acc = defaultdict(int, m["details"][k])
                    for code, n in v.items():
                        acc[code] += n
                    m["details"][k] = dict(acc)
    out = []
    for m in merged.values():
        f = Finding(m["kind"], m["table"], m["column"], m["failing"], m["denominator"], observed=m["observed"],
                    details=m["details"], verdict=m["verdict"], summary=m["summary"])
        out.append((f, m["examples"], m["quarantine"]))
    return out


def _driver_columns(name: str, layout: TableLayout, lay: dict[str, TableLayout], config: GateConfig) -> list[str] | None:
    """The columns the driver's checks read (None: all of them, for the small tables)."""
    if name in ("patient", "device"):
        return None
    cols = [*_PROVENANCE, *layout.key]
    if layout.patient_column:
        cols.append(layout.patient_column)
    cols += layout.temporal[:1]  # freshness by event time
    for table, column, target, target_col in references(lay, config.references_extra, config.references_exclude):
        if table == name:
            cols.append(column)
        if target == name:
            cols.append(target_col)
    for m in config.bias.measures.values():
        if m.table == name:
            cols += ["code", "device_id"] + ([m.require] if m.require else [])
    return [c for c in dict.fromkeys(cols) if c in layout.columns]


def _schema_only(store: Store, table: str) -> pa.Table:
    """An empty table with the columns and types `store.read` gives: what the structural checks need."""
    names = store.dataset(table).schema.names
    target = store.schema.table(table).arrow_schema
    return pa.schema([target.field(n).with_nullable(True) for n in names if n in target.names]).empty_table()


def spark_gate(store: Store, spark, tables: list[str], config: GateConfig, *, now: datetime,
               buckets: int | None = None) -> GateResult:
    """The gate's result over `tables`, the per-patient checks run on Spark by bucket."""
    from .spark import run_tasks

    n = buckets or max(1, spark.sparkContext.defaultParallelism)
    root = os.path.abspath(store.root)
    parts = run_tasks(spark, [Part(b).to_json() for b in range(n)],
                      lambda p: gate_bucket(root, p.index, n, tables, config, now), "gate")
    lay = layouts(store.schema.raw)
    known = {t: store.read(t, _driver_columns(t, lay[t], lay, config)) for t in tables if t in lay}
    findings = structure_checks({t: _schema_only(store, t) for t in known}, lay, config)
    driver = measure(typed_tables(known, lay), lay, only_kinds(config, lambda k: k not in PER_PATIENT), now)
    results, quarantined = judge_all(findings + driver, known, config)
    failures = []
    for f, refs, locators in _merge(parts, config.examples):
        if refs:
            f.details.setdefault("examples", refs)
        result, _ = judge(f, config)
        results.append(result)
        failures += [RowFailure(result.name, result.table, *loc[:3], row_message(result), *loc[3:])
                     for loc in locators]
    return GateResult(checks=results, now=now, tables={t: d.num_rows for t, d in known.items()},
                      config_source=config.source, _quarantined=quarantined, _data=known, _row_failures=failures)


__all__ = ["bucket_rows", "gate_bucket", "spark_gate"]
