"""What the twin schema says about each table, in the shape the checks need.

The gate derives as much as it can from the parsed schema JSON it is given (required
columns, allowed values, code systems, types, keys, time columns, references), so that
a new column or table is checked without touching the gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ..schema import arrow_type


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    type: str
    required: bool
    values: tuple[str, ...]
    code_systems: tuple[str, ...]

    @property
    def arrow(self) -> pa.DataType:
        return arrow_type(self.type)


@dataclass(frozen=True)
class TableLayout:
    name: str
    columns: dict[str, ColumnSpec]
    key: tuple[str, ...]
    patient_column: str | None
    provenance: bool
    own: tuple[str, ...]  # the table's own columns, without the provenance ones

    @property
    def temporal(self) -> tuple[str, ...]:
        """Time columns of the table's own data: timestamps with a `_precision` companion."""
        return tuple(c for c, s in self.columns.items() if s.type == "timestamp" and f"{c}_precision" in self.columns)

    def system_column(self, code_column: str) -> str | None:
        """The column holding the code system of `code_column` (code -> code_system, type_code -> type_system)."""
        if code_column == "code":
            cand = "code_system"
        elif code_column.endswith("_code"):
            cand = code_column[: -len("_code")] + "_system"
        else:
            return None
        return cand if cand in self.columns else None


def layouts(schema: dict[str, Any]) -> dict[str, TableLayout]:
    """Parse the schema JSON. Key columns of tables with provenance are required, as the store makes them."""
    prov = schema.get("provenance", {}).get("columns", [])
    out = {}
    for name, t in schema["tables"].items():
        has_prov = t.get("provenance", True)
        key = tuple(t["key"])
        cols = {}
        for c in list(t["columns"]) + (list(prov) if has_prov else []):
            cols[c["name"]] = ColumnSpec(
                name=c["name"], type=c["type"],
                required=bool(c.get("required", False)) or (has_prov and c["name"] in key),
                values=tuple(c.get("values", ())), code_systems=tuple(c.get("code_systems", ())),
            )
        out[name] = TableLayout(name, cols, key, t.get("patient_column"), has_prov, tuple(c["name"] for c in t["columns"]))
    return out


def references(tables: dict[str, TableLayout], extra=(), exclude=frozenset()) -> list[tuple[str, str, str, str]]:
    """(table, column, target table, target column) for every reference the schema shows by name.

    A column named like the single-column key of another table (encounter_id, device_id,
    report_id, study_id) points to it; a table's patient column points to patient.patient_id.
    """
    by_key = {t.key[0]: name for name, t in tables.items() if len(t.key) == 1 and t.provenance}
    out = []
    for name, t in tables.items():
        for col in t.own:
            target = None
            if col == t.patient_column and name != "patient" and "patient" in tables:
                target = ("patient", "patient_id")
            elif col in by_key and by_key[col] != name:
                target = (by_key[col], col)
            if target and f"{name}.{col}" not in exclude:
                out.append((name, col, *target))
    for ref in extra:
        if f"{ref[0]}.{ref[1]}" not in exclude and ref not in out:
            out.append(tuple(ref))
    return out


__all__ = ["ColumnSpec", "TableLayout", "layouts", "references"]
