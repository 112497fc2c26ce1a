"""Run every check over the twin tables and decide: may twins be built from this data?

The gate reads; it never changes a table. It returns judged results (checks.py) and
the rows that failed row-level checks whose config asks for quarantine; the caller
stores those in the quarantine table (stage "gate") and refuses to build twins when
`GateResult.passed` is False, unless forced.

Structural checks (columns present, Arrow types) run first, in plain pyarrow: GX sees
pandas dtypes, which lose the difference between, say, int32 and int64 or a timestamp's
time zone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from .bias import bias_checks
from .checks import Finding, GateResult, _Quarantined, judge
from .completeness import patients_without_data, reference_checks
from .config import GateConfig
from .freshness import freshness_checks
from .layout import TableLayout, layouts
from .measurements import measurement_checks
from .people import people
from .plausibility import life_checks, period_checks, sex_checks
from .quality import column_checks

log = logging.getLogger(__name__)


def structure_checks(tables: Mapping[str, pa.Table], lay: Mapping[str, TableLayout], config: GateConfig) -> list[Finding]:
    findings = []
    for name, data in tables.items():
        layout = lay.get(name)
        if layout is None:
            continue
        missing = [c for c in layout.columns if c not in data.column_names]
        if config.check("column-present", name).enabled:
            findings.append(Finding("column-present", name, None, len(missing), len(layout.columns),
                                    details={"columns": missing}))
        if config.check("column-type", name).enabled:
            present = [c for c in layout.columns if c in data.column_names]
            wrong = {c: {"expected": str(layout.columns[c].arrow), "found": str(data.schema.field(c).type)}
                     for c in present if not data.schema.field(c).type.equals(layout.columns[c].arrow)}
            findings.append(Finding("column-type", name, None, len(wrong), len(present), details={"columns": wrong}))
    return findings


def run_gate(tables: Mapping[str, pa.Table], config: GateConfig, *, now: datetime, schema: dict[str, Any]) -> GateResult:
    """Check `tables` (name -> Arrow table in the shape of the twin schema) against `config`.

    `now` is the time dates are judged against (future dates, ages, freshness); `schema`
    is the parsed twin schema JSON. Tables the schema does not know are skipped.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    lay = layouts(schema)
    unknown = sorted(set(tables) - set(lay))
    if unknown:
        log.warning("gate: tables not in the twin schema are not checked: %s", ", ".join(unknown))
    known = {n: t for n, t in tables.items() if n in lay}
    findings: list[Finding] = []
    findings += structure_checks(known, lay, config)
    # Tables whose columns have the wrong type are left to column-type: the other checks would misread them.
    typed = {n: t for n, t in known.items()
             if all(t.schema.field(c).type.equals(s.arrow) for c, s in lay[n].columns.items() if c in t.column_names)}
    # sex is needed by the sex-specific check even when no bias dimension uses it
    attrs = tuple(dict.fromkeys([*(d.column for d in config.bias.dimensions.values() if not d.bands), "sex"]))
    persons = people(typed.get("patient"), lay.get("patient"), attrs)
    findings += column_checks(typed, lay, config, now)
    findings += measurement_checks(typed.get("observation"), config)
    findings += reference_checks(typed, lay, config)
    findings += patients_without_data(typed, lay, persons, config)
    findings += life_checks(typed, lay, persons, config)
    findings += period_checks(typed, lay, config)
    findings += sex_checks(typed, lay, persons, config)
    findings += freshness_checks(typed, lay, config, now)
    findings += bias_checks(typed, lay, persons, config, now)

    results, quarantined = [], []
    for f in findings:
        if config.examples and f.rows is not None and len(f.rows) and "source_ref" in known[f.table].column_names:
            refs = known[f.table].column("source_ref").take(pa.array(f.rows[:config.examples], pa.int64())).to_pylist()
            f.details.setdefault("examples", refs)
        result, rows = judge(f, config)
        results.append(result)
        if rows is not None:
            quarantined.append(_Quarantined(result, rows))
    return GateResult(checks=results, now=now, tables={n: t.num_rows for n, t in known.items()},
                      config_source=config.source, _quarantined=quarantined, _data=dict(known))


__all__ = ["run_gate", "structure_checks"]
