"""The unified twin schema, loaded once from schemas/twin-vN.json.

The JSON file is the single definition of tables, columns, types, required flags,
meanings and code systems. This module turns it into pyarrow schemas; the ingest stage
checks every value against them as it maps (pipeline.ingest), and the store checks
every table it writes (pipeline.store).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from .errors import ConfigError, StoreError
from .resources import schemas_dir

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
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        # Most likely a TWIN_HOME that holds only the mappings a user added: a setup
        # mistake to fix (exit 2), not a bug to report.
        raise ConfigError(f"the twin schema {path} is not there: TWIN_HOME ({os.environ.get('TWIN_HOME') or 'not set'}) "
                          "must hold a copy of the project's schemas/, config/ and mappings/ folders") from None
    raw = json.loads(text)
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
