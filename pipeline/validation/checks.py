"""What the gate reports: the catalogue of check kinds, and the values a run produces.

A check is measured by one module (quality, conformance, completeness, plausibility,
freshness, bias) as a `Finding`: how many rows or groups fail out of how many, and
which rows. `judge` then applies the configured severity and threshold, so that
measuring and deciding stay apart: the same finding passes under one configuration
and fails under another, and a module never needs to know the configuration's policy.

Nothing here holds patient data: messages name tables, columns and counts; row
failures carry locators (source, unit key, source_ref), never values.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from .config import CheckConfig, GateConfig

CATEGORIES = ("conformance", "completeness", "plausibility", "uniqueness", "freshness", "bias")


@dataclass(frozen=True)
class Kind:
    """One kind of check: its category, whether it judges rows, and what to tell people."""

    category: str
    row_level: bool
    fails: str   # what a failing row or group does, completing "N of M rows ..."
    advice: str  # what to do when the check fails


KINDS: dict[str, Kind] = {
    "column-present": Kind(
        "conformance", False, "columns of the schema are missing from the table",
        "The table was written by a stage that does not follow the twin schema version in use: "
        "re-run the import with the current Twinline, or migrate the store."),
    "column-type": Kind(
        "conformance", False, "columns have an Arrow type other than the schema's",
        "A stage wrote the column with the wrong type: fix the mapping that produces it and re-import."),
    "allowed-values": Kind(
        "conformance", True, "hold a value outside the allowed values",
        "Map the source's local values to the allowed ones (mappings/codes/) or fix the source, "
        "then retry the quarantined units (`twin quarantine retry`)."),
    "code-system": Kind(
        "conformance", True, "name a code system the schema does not list for this column",
        "Add a translation from the local code system to a standard one (mappings/codes/); the rows "
        "stay usable but are not interoperable until then."),
    "unit": Kind(
        "conformance", True, "carry a unit that is not a listed UCUM unit for their LOINC code",
        "Check the unit mapping of the source (non-UCUM spellings, wrong units): values in the "
        "wrong unit are wrong values. Add a unit to [loinc] in the gate config only if it is valid."),
    "required": Kind(
        "completeness", True, "have no value in a required column",
        "The source omits a field the twin needs, or the mapping loses it: fix the mapping or the "
        "source, then retry the quarantined units."),
    "reference": Kind(
        "completeness", True, "point to a row that is not in the referenced table",
        "Load the referenced records (for example the Patient or Encounter resources) or check that "
        "the ids are mapped the same way in both sources."),
    "patients-without-data": Kind(
        "completeness", False, "patients have no row in any clinical table",
        "Check that all of the source's clinical data was exported and imported, and that patient "
        "ids link (twin_id) across sources."),
    "value-range": Kind(
        "plausibility", True, "hold a value outside the plausible range for their code and unit",
        "Look for unit mix-ups, decimal errors and test values in the source; values that are "
        "physiologically impossible should not reach a twin."),
    "future-date": Kind(
        "plausibility", True, "lie in the future",
        "Check the source's clock and time zones, and dates typed in the wrong format."),
    "after-birth": Kind(
        "plausibility", True, "lie before the patient's birth",
        "Check the birth date and the event date in the source; a wrong patient link (twin_id) "
        "also produces this."),
    "before-death": Kind(
        "plausibility", True, "lie after the patient's death (beyond the grace period)",
        "Check the death date and the event date; a wrong patient link also produces this."),
    "start-before-end": Kind(
        "plausibility", True, "end before they start",
        "Check the source's period mapping (start and end swapped, or time zones)."),
    "sex-specific": Kind(
        "plausibility", True, "carry a code specific to the other sex",
        "Check the patient's administrative sex and the code in the source, and the patient link; "
        "a person whose sex changed can legitimately have such codes."),
    "unique-key": Kind(
        "uniqueness", True, "share their key with another row of the same source",
        "Two rows claim the same identity: check the source's ids and the mapping of row keys."),
    "freshness": Kind(
        "freshness", False, "source is older than allowed",
        "Check that the source still delivers (feed, export job, MLLP connection)."),
    "representation": Kind(
        "bias", False, "groups are under- or over-represented against the reference population",
        "A model or analysis built on these twins may not hold for under-represented groups: "
        "check for missing sources (sites, wards) and state the gap where the data is used. If "
        "the population served truly differs, point [bias] reference to a fitting reference file."),
    "unknown-demographics": Kind(
        "bias", False, "patients have no known value",
        "Representation and fairness cannot be assessed for unknown groups: map the source's "
        "demographics (US Core race/ethnicity extensions, PID-10/22) or collect them."),
    "coverage-gap": Kind(
        "bias", False, "groups miss this measure more (or less) often than the patients overall",
        "Find out why the measure is missing for the group (access, ordering practice, a source "
        "not loaded) before using it in models or comparisons."),
    "device-mix": Kind(
        "bias", False, "groups are measured with a different mix of device models",
        "Device models differ in accuracy by group (pulse oximeters overestimate SpO2 on darker "
        "skin): compare results by device before pooling them."),
}


@dataclass(frozen=True)
class CheckResult:
    """One check on one table (and column), judged against its configured threshold.

    `observed` is the share of failing rows (failing_count / denominator), except for
    freshness (age in days), representation (total variation distance) and the coverage and
    device-mix checks (the largest absolute gap): `details["observed_unit"]` says which.
    """

    name: str
    category: str
    table: str
    column: str | None
    severity: str
    threshold: float
    observed: float | None
    failing_count: int
    denominator: int
    passed: bool
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """Unique within a run: name:table.column, and @source for per-source checks (freshness)."""
        where = f"{self.name}:{self.table}" + (f".{self.column}" if self.column else "")
        return where + (f"@{self.details['source']}" if "source" in self.details else "")

    @property
    def status(self) -> str:
        if self.denominator == 0:
            return "not-applicable"
        return "passed" if self.passed else "failed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "category": self.category, "table": self.table,
            "column": self.column, "severity": self.severity, "threshold": self.threshold,
            "observed": self.observed, "failing_count": self.failing_count,
            "denominator": self.denominator, "passed": self.passed, "status": self.status,
            "message": self.message, "advice": KINDS[self.name].advice, "details": self.details,
        }


# where a failing row came from, in RowFailure's order
LOCATOR_COLUMNS = ("source", "unit_key", "source_ref", "row_index")


@dataclass(frozen=True, slots=True)
class RowFailure:
    """A row that failed a row-level check whose config says quarantine = true."""

    check: str
    table: str
    source: str | None
    unit_key: str | None
    source_ref: str | None
    message: str
    row_index: int | None = None  # the row within its unit: a device chunk is one unit of 750,000 rows

    @property
    def row_ref(self) -> str:
        """`table:unit_key#row_index`: the quarantine entry's pointer to the row, and what the build holds back."""
        ref = f"{self.table}:{self.unit_key}"
        return ref if self.row_index is None else f"{ref}#{self.row_index}"


@dataclass
class Finding:
    """A measurement, before judgement.

    `rows` are the positions of the failing rows in the table (row-level checks).
    `verdict` is set by measurements that decide by their own rules (bias: flagged
    groups); otherwise observed <= threshold decides.
    """

    kind: str
    table: str
    column: str | None
    failing: int
    denominator: int
    observed: float | None = None
    rows: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)
    verdict: bool | None = None
    summary: str | None = None  # message for measurements whose numbers are not rows


@dataclass
class _Quarantined:
    result: CheckResult
    rows: np.ndarray


@dataclass
class GateResult:
    """Everything one run of the gate found. `passed` is False iff an error-level check failed."""

    checks: list[CheckResult]
    now: datetime
    tables: dict[str, int]
    config_source: str
    _quarantined: list[_Quarantined] = field(default_factory=list, repr=False)
    _data: dict[str, pa.Table] = field(default_factory=dict, repr=False)
    _row_failures: list[RowFailure] = field(default_factory=list, repr=False)  # made already (partitioned gate)

    @property
    def passed(self) -> bool:
        return not any(c.severity == "error" and not c.passed for c in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    @property
    def row_failure_count(self) -> int:
        return sum(len(q.rows) for q in self._quarantined) + len(self._row_failures)

    @property
    def row_failures(self) -> Iterator[RowFailure]:
        """Rows to quarantine, made on demand (a bad load can fail millions of rows)."""
        yield from self._row_failures
        for q in self._quarantined:
            data = self._data[q.result.table]
            idx = pa.array(q.rows, pa.int64())
            cols = {c: data.column(c).take(idx).to_pylist() if c in data.column_names else [None] * len(idx)
                    for c in LOCATOR_COLUMNS}
            message = row_message(q.result)
            for source, unit_key, source_ref, row_index in zip(*(cols[c] for c in LOCATOR_COLUMNS), strict=True):
                yield RowFailure(q.result.name, q.result.table, source, unit_key, source_ref, message, row_index)

    def summary(self) -> dict[str, Any]:
        by_cat: dict[str, dict[str, int]] = {c: {"passed": 0, "failed": 0, "not-applicable": 0} for c in CATEGORIES}
        for c in self.checks:
            by_cat[c.category][c.status] += 1
        return {
            "passed": self.passed,
            "checks": len(self.checks),
            "failed_errors": sum(1 for c in self.checks if not c.passed and c.severity == "error"),
            "failed_warnings": sum(1 for c in self.checks if not c.passed and c.severity == "warn"),
            "rows_to_quarantine": self.row_failure_count,
            "by_category": by_cat,
        }


def row_message(result: CheckResult) -> str:
    where = f"{result.table}.{result.column}" if result.column else result.table
    return f"gate check {result.name} failed on {where}: the row's value(s) {KINDS[result.name].fails}"


def _pct(x: float) -> str:
    return f"{x * 100:.3g}%"


def judge(f: Finding, config: GateConfig) -> tuple[CheckResult, np.ndarray | None]:
    """Apply severity and threshold; return the result and the rows to quarantine (or None)."""
    kind = KINDS[f.kind]
    cc: CheckConfig = config.check(f.kind, f.table, f.column)
    if f.denominator == 0:
        passed, observed = True, None
    else:
        observed = f.observed if f.observed is not None else f.failing / f.denominator
        passed = f.verdict if f.verdict is not None else observed <= cc.threshold
    where = f"{f.table}.{f.column}" if f.column else f.table
    if f.summary is not None:
        text = f"{where}: {f.summary}"
    elif f.denominator == 0:
        text = f"{where}: nothing to check"
    else:
        text = (f"{where}: {f.failing:,} of {f.denominator:,} ({_pct(observed or 0.0)}) {kind.fails}; "
                f"allowed up to {_pct(cc.threshold)}")
    details = dict(f.details)
    details.setdefault("observed_unit", "share")
    result = CheckResult(
        name=f.kind, category=kind.category, table=f.table, column=f.column, severity=cc.severity,
        threshold=cc.threshold, observed=observed, failing_count=f.failing, denominator=f.denominator,
        passed=bool(passed), message=text, details=details,
    )
    rows = f.rows if (kind.row_level and cc.quarantine and f.rows is not None and len(f.rows)) else None
    return result, rows


__all__ = ["CATEGORIES", "KINDS", "CheckResult", "Finding", "GateResult", "Kind", "RowFailure", "judge", "row_message"]
