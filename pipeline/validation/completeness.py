"""Completeness across tables: references that resolve, and patients that have data.

Plain pyarrow set membership: GX validates one batch at a time and has no expectation
that looks into a second table.

A reference resolves when the id exists in the target table in any source: ids are
compared as written, because a device log and an EHR export may name the same patient
record. The check only runs when the target table is among the checked tables;
otherwise its result says the target was not given.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .checks import Finding
from .config import GateConfig
from .layout import TableLayout, references
from .people import People, person_keys

# Tables that describe the patient record itself rather than clinical data about the patient.
NOT_CLINICAL = frozenset({"patient", "patient_identifier", "patient_link", "device"})


def reference_checks(tables: Mapping[str, pa.Table], layouts: Mapping[str, TableLayout],
                     config: GateConfig) -> list[Finding]:
    findings = []
    targets: dict[tuple[str, str], pa.Array] = {}
    for table, column, target, target_col in references(layouts, config.references_extra, config.references_exclude):
        data = tables.get(table)
        if data is None or column not in data.column_names or not config.check("reference", table, column).enabled:
            continue
        values = data.column(column)
        if target not in tables or target_col not in tables[target].column_names:
            findings.append(Finding("reference", table, column, failing=0, denominator=0,
                                    details={"target": f"{target}.{target_col}", "note": f"table {target} was not given"}))
            continue
        if (target, target_col) not in targets:
            targets[(target, target_col)] = pc.unique(tables[target].column(target_col))
        present = pc.is_valid(values)
        dangling = pc.and_(present, pc.invert(pc.is_in(values, value_set=targets[(target, target_col)])))
        rows = pc.indices_nonzero(pc.fill_null(dangling, False)).to_numpy()
        findings.append(Finding("reference", table, column, failing=len(rows),
                                denominator=int(pc.sum(present).as_py() or 0), rows=rows,
                                details={"target": f"{target}.{target_col}"}))
    return findings


def patients_without_data(tables: Mapping[str, pa.Table], layouts: Mapping[str, TableLayout],
                          persons: People, config: GateConfig) -> list[Finding]:
    if len(persons) == 0 or not config.check("patients-without-data", "patient").enabled:
        return []
    has_data = np.zeros(len(persons), dtype=bool)
    looked = []
    for name, data in tables.items():
        layout = layouts.get(name)
        if layout is None or name in NOT_CLINICAL or layout.patient_column is None or data.num_rows == 0:
            continue
        keys = person_keys(data, layout)
        if keys is None:
            continue
        idx = persons.index_of(pc.unique(keys)).drop_null().to_numpy()
        has_data[idx] = True
        looked.append(name)
    failing = int((~has_data).sum())
    return [Finding("patients-without-data", "patient", None, failing=failing, denominator=len(persons),
                    details={"tables": sorted(looked)})]


__all__ = ["NOT_CLINICAL", "patients_without_data", "reference_checks"]
