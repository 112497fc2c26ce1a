"""The unified twin schema, loaded once from schemas/twin-vN.json.

The JSON file is the single definition of tables, columns, types, required flags,
meanings and code systems. This module turns it into pyarrow schemas and converts the
plain Python values the views produce into typed Arrow columns, reporting every value
that does not fit (by row), so that the ingest stage can quarantine the unit that
produced it instead of failing the batch.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from .errors import StoreError
from .resources import schemas_dir
from .temporal import BadTemporal, parse_fhir_datetime

CURRENT_VERSION = "1"
TIMESTAMP = pa.timestamp("us", tz="UTC")

_SCALARS: dict[str, pa.DataType] = {
    "string": pa.string(),
    "boolean": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "date": pa.date32(),
    "timestamp": TIMESTAMP,
    "binary": pa.binary(),
}


def arrow_type(spec: str) -> pa.DataType:
    """Parse the schema's small type language: scalars, list<T>, map<K,V>, struct<a:T,...>."""
    spec = spec.strip()
    if spec in _SCALARS:
        return _SCALARS[spec]
    m = re.fullmatch(r"(list|map|struct)<(.*)>", spec)
    if not m:
        raise ValueError(f"unknown type {spec!r}")
    kind, inner = m.groups()
    parts = _split_top(inner)
    if kind == "list":
        return pa.list_(arrow_type(inner))
    if kind == "map":
        return pa.map_(arrow_type(parts[0]), arrow_type(parts[1]))
    fields = []
    for p in parts:
        name, _, t = p.partition(":")
        fields.append(pa.field(name.strip(), arrow_type(t)))
    return pa.struct(fields)


def _split_top(s: str) -> list[str]:
    depth, start, out = 0, 0, []
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(s[start:i])
            start = i + 1
    out.append(s[start:])
    return [p.strip() for p in out]


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    required: bool
    description: str
    values: tuple[str, ...] = ()
    code_systems: tuple[str, ...] = ()

    @property
    def arrow(self) -> pa.DataType:
        return arrow_type(self.type)


@dataclass(frozen=True)
class Table:
    name: str
    description: str
    key: tuple[str, ...]
    columns: tuple[Column, ...]
    provenance: bool
    patient_column: str | None
    own_columns: tuple[str, ...] = field(default=())

    @functools.cached_property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.arrow, nullable=not c.required) for c in self.columns])

    @functools.cached_property
    def by_name(self) -> dict[str, Column]:
        return {c.name: c for c in self.columns}

    @functools.cached_property
    def temporal(self) -> frozenset[str]:
        """Timestamp columns that have `_precision` companions: filled from FHIR date text."""
        names = self.by_name
        return frozenset(c.name for c in self.columns if c.type == "timestamp" and f"{c.name}_precision" in names)


@dataclass(frozen=True)
class Schema:
    version: str
    status: str
    tables: dict[str, Table]
    raw: dict[str, Any]

    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            raise StoreError(f"table {name!r} is not in twin schema v{self.version}") from None


def _columns(items: list[dict[str, Any]]) -> list[Column]:
    return [
        Column(
            name=c["name"],
            type=c["type"],
            required=bool(c.get("required", False)),
            description=c.get("description", ""),
            values=tuple(c.get("values", ())),
            code_systems=tuple(c.get("code_systems", ())),
        )
        for c in items
    ]


@functools.cache
def load_schema(version: str = CURRENT_VERSION, directory: Path | None = None) -> Schema:
    path = (directory or schemas_dir()) / f"twin-v{version}.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    prov = _columns(raw["provenance"]["columns"])
    tables = {}
    for name, t in raw["tables"].items():
        own = _columns(t["columns"])
        has_prov = t.get("provenance", True)
        cols = own + prov if has_prov else own
        if has_prov:
            # key columns of the source-level identity are required whatever the file says
            cols = [Column(c.name, c.type, True, c.description, c.values, c.code_systems) if c.name in t["key"] else c for c in cols]
        tables[name] = Table(
            name=name,
            description=t["description"],
            key=tuple(t["key"]),
            columns=tuple(cols),
            provenance=has_prov,
            patient_column=t.get("patient_column"),
            own_columns=tuple(c.name for c in own),
        )
    return Schema(version=raw["version"], status=raw.get("status", "released"), tables=tables, raw=raw)


# --------------------------------------------------------------------------- conversion


@dataclass
class Converted:
    """A typed Arrow table, plus the rows that did not fit and why."""

    table: pa.Table
    bad_rows: dict[int, str]  # row position -> message (column name and expected type; never the value)


def _check_value(kind: str, v: Any) -> bool:
    if kind == "string":
        return isinstance(v, str)
    if kind == "boolean":
        return isinstance(v, bool)
    if kind in ("int32", "int64"):
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float64":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return True


_EXPECTED = {"string": "a string", "boolean": "true or false", "int32": "an integer", "int64": "an integer",
             "float64": "a number"}


def to_arrow(table: Table, names: Sequence[str], columns: Sequence[Sequence[Any]], n_rows: int) -> Converted:
    """Convert column-major Python values named `names` into `table`'s Arrow schema.

    Columns of the table that are not given are null; timestamp columns with
    `_precision`/`_offset` companions take FHIR date text and fill the companions.
    A value of the wrong type marks its row bad (the caller quarantines the unit) and
    is replaced by null so the rest of the batch still converts.
    """
    given = dict(zip(names, columns, strict=True))
    bad: dict[int, str] = {}
    arrays: dict[str, pa.Array] = {}
    for name in table.temporal & given.keys():
        values = given[name]
        ts: list[Any] = [None] * n_rows
        prec: list[Any] = [None] * n_rows
        off: list[Any] = [None] * n_rows
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                ts[i], prec[i], off[i] = parse_fhir_datetime(v)
            except BadTemporal as e:
                bad.setdefault(i, f"column {name}: {e}")
        arrays[name] = pa.array(ts, TIMESTAMP)
        arrays[f"{name}_precision"] = pa.array(prec, pa.string())
        arrays[f"{name}_offset"] = pa.array(off, pa.string())
    for col in table.columns:
        if col.name in arrays:
            continue
        values = given.get(col.name)
        if values is None:
            arrays[col.name] = pa.nulls(n_rows, col.arrow)
            continue
        arrays[col.name] = _convert_column(col, values, bad)
    out = pa.Table.from_arrays([arrays[c.name] for c in table.columns], schema=_nullable(table.arrow_schema))
    return Converted(out, bad)


def _nullable(schema: pa.Schema) -> pa.Schema:
    # Required columns are checked by the store on write (and by the gate); the Arrow
    # schema used for conversion allows nulls so that a bad row can be cut out first.
    return pa.schema([f.with_nullable(True) for f in schema])


def _convert_column(col: Column, values: Sequence[Any], bad: dict[int, str]) -> pa.Array:
    typ = col.arrow
    try:
        return pa.array(values, typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        pass
    kind = col.type
    clean: list[Any] = []
    for i, v in enumerate(values):
        if v is None or _check_value(kind, v):
            clean.append(v)
        elif kind == "float64" and not isinstance(v, (str, bool)) and hasattr(v, "__float__"):
            clean.append(float(v))  # decimal.Decimal from the view runner
        else:
            bad.setdefault(i, f"column {col.name}: expected {_EXPECTED.get(kind, kind)}, got {type(v).__name__}")
            clean.append(None)
    try:
        return pa.array(clean, typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        # e.g. an integer too large for int32: find the rows one by one
        out = []
        for i, v in enumerate(clean):
            try:
                pa.array([v], typ)
                out.append(v)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                bad.setdefault(i, f"column {col.name}: value out of range for {col.type}")
                out.append(None)
        return pa.array(out, typ)


def required_violations(table: Table, data: pa.Table) -> dict[str, int]:
    """Required columns that hold nulls, with how many."""
    out = {}
    for col in table.columns:
        if col.required and col.name in data.column_names:
            n = data.column(col.name).null_count
            if n:
                out[col.name] = n
    return out
