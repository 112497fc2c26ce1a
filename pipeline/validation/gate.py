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
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .bias import bias_checks
from .checks import CheckResult, Finding, GateResult, _Quarantined, judge
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


# Checks whose verdict on a row needs only that row and the rows of its own patient: they
# can be measured per bucket of patients and summed (`twin check --engine spark`). The
# others compare rows across patients (unique keys, references), or judge the population.
PER_PATIENT = frozenset({"required", "allowed-values", "code-system", "future-date", "unit", "value-range",
                         "after-birth", "before-death", "start-before-end", "sex-specific"})


def only_kinds(config: GateConfig, keep: Callable[[str], bool]) -> GateConfig:
    """The same configuration with every check kind `keep` refuses disabled."""
    checks = {k: c if keep(k) else replace(c, enabled=False) for k, c in config.checks.items()}
    overrides = {k: o if keep(k) else {w: replace(c, enabled=False) for w, c in o.items()}
                 for k, o in config.overrides.items()}
    return replace(config, checks=checks, overrides=overrides)


def typed_tables(tables: Mapping[str, pa.Table], lay: Mapping[str, TableLayout]) -> dict[str, pa.Table]:
    """Tables whose columns have the schema's types (the others are left to column-type:
    the other checks would misread them)."""
    return {n: t for n, t in tables.items() if n in lay and
            all(t.schema.field(c).type.equals(s.arrow) for c, s in lay[n].columns.items() if c in t.column_names)}


def measure(typed: Mapping[str, pa.Table], lay: Mapping[str, TableLayout], config: GateConfig,
            now: datetime) -> list[Finding]:
    """Every check but the structural ones, over tables of the schema's types."""
    # sex is needed by the sex-specific check even when no bias dimension uses it
    attrs = tuple(dict.fromkeys([*(d.column for d in config.bias.dimensions.values() if not d.bands), "sex"]))
    persons = people(typed.get("patient"), lay.get("patient"), attrs)
    findings: list[Finding] = []
    findings += column_checks(typed, lay, config, now)
    findings += measurement_checks(typed.get("observation"), config)
    findings += reference_checks(typed, lay, config)
    findings += patients_without_data(typed, lay, persons, config)
    findings += life_checks(typed, lay, persons, config)
    findings += period_checks(typed, lay, config)
    findings += sex_checks(typed, lay, persons, config)
    findings += freshness_checks(typed, lay, config, now)
    findings += bias_checks(typed, lay, persons, config, now)
    return findings


def examples(data: pa.Table, rows: np.ndarray, k: int) -> list[str]:
    """The `k` smallest source_refs of the failing rows: the same whichever way the rows
    were split up to be checked."""
    if k <= 0 or not len(rows) or "source_ref" not in data.column_names:
        return []
    refs = data.column("source_ref").take(pa.array(rows, pa.int64())).drop_null()
    if len(refs) > k:
        refs = refs.take(pc.select_k_unstable(refs, k, [("dummy", "ascending")]))
    return sorted(refs.to_pylist())


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
    findings = structure_checks(known, lay, config) + measure(typed_tables(known, lay), lay, config, now)
    results, quarantined = judge_all(findings, known, config)
    return GateResult(checks=results, now=now, tables={n: t.num_rows for n, t in known.items()},
                      config_source=config.source, _quarantined=quarantined, _data=dict(known))


def judge_all(findings: list[Finding], known: Mapping[str, pa.Table],
              config: GateConfig) -> tuple[list[CheckResult], list[_Quarantined]]:
    """Judge every finding (with its example locators); the rows to quarantine by check."""
    results, quarantined = [], []
    for f in findings:
        if config.examples and f.rows is not None and len(f.rows):
            refs = examples(known[f.table], f.rows, config.examples)
            if refs:
                f.details.setdefault("examples", refs)
        result, rows = judge(f, config)
        results.append(result)
        if rows is not None:
            quarantined.append(_Quarantined(result, rows))
    return results, quarantined


__all__ = ["PER_PATIENT", "examples", "judge_all", "measure", "only_kinds", "run_gate", "structure_checks", "typed_tables"]
