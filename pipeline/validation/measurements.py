"""Units and plausible ranges of numeric observations, per LOINC code, from the [loinc] table of the config.

One hash join of the observation rows with the (code, unit) -> (low, high) table answers
both questions: a row whose code is listed but whose unit is not fails `unit`; a row
whose unit is listed but whose value is outside its range fails `value-range`. Plain
pyarrow: GX has no expectation that looks limits up per row (see quality.py).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .checks import Finding
from .config import GateConfig

LOINC = "http://loinc.org"


def measurement_checks(observation: pa.Table | None, config: GateConfig) -> list[Finding]:
    needed = ("code_system", "code", "value_number", "value_unit")
    if observation is None or not config.loinc or any(c not in observation.column_names for c in needed):
        return []
    on_unit = config.check("unit", "observation", "value_unit").enabled
    on_range = config.check("value-range", "observation", "value_number").enabled
    if not (on_unit or on_range):
        return []
    codes = pa.array(list(config.loinc))
    listed = pc.and_(pc.and_(pc.equal(observation.column("code_system"), LOINC),
                             pc.is_in(observation.column("code"), value_set=codes)),
                     pc.is_valid(observation.column("value_number")))
    listed = pc.fill_null(listed, False)
    rows = pc.indices_nonzero(listed)
    lookup = pa.table({
        "code": [c for c, units in config.loinc.items() for _ in units],
        "value_unit": [u for units in config.loinc.values() for u in units],
        "__low": [lo for units in config.loinc.values() for lo, _ in units.values()],
        "__high": [hi for units in config.loinc.values() for _, hi in units.values()],
    })
    subset = observation.select(["code", "value_unit", "value_number"]).take(rows).append_column("__row", rows)
    joined = subset.join(lookup, keys=["code", "value_unit"], join_type="left outer", use_threads=False)
    row = joined.column("__row").to_numpy()
    low = joined.column("__low")
    unit_bad = pc.is_null(low).to_numpy(zero_copy_only=False)
    value = joined.column("value_number")
    out_of_range = pc.fill_null(pc.or_(pc.less(value, low), pc.greater(value, joined.column("__high"))), False)
    out_of_range = out_of_range.to_numpy(zero_copy_only=False)
    findings = []
    by_code = joined.column("code").to_numpy(zero_copy_only=False)
    if on_unit:
        findings.append(Finding("unit", "observation", "value_unit", failing=int(unit_bad.sum()),
                                denominator=len(row), rows=np.sort(row[unit_bad]),
                                details={"by_code": _counts(by_code[unit_bad])}))
    if on_range:
        n_ranged = int((~unit_bad).sum())
        findings.append(Finding("value-range", "observation", "value_number", failing=int(out_of_range.sum()),
                                denominator=n_ranged, rows=np.sort(row[out_of_range]),
                                details={"by_code": _counts(by_code[out_of_range])}))
    return findings


def _counts(values: np.ndarray) -> dict[str, int]:
    codes, counts = np.unique(values.astype(str), return_counts=True) if len(values) else ([], [])
    return {str(c): int(n) for c, n in zip(codes, counts, strict=True)}


__all__ = ["measurement_checks"]
