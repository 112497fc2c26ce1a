"""Keep one date offset per person when linking moves a record to another twin.

Under `--deid-dates shift` every date of a person is moved by a secret offset keyed on
their twin id (deid.py), so that the intervals between the events of one person hold
across sources. Linking is not final when a record is written: a later import can join
the record to another twin (its HL7 feed matched a FHIR export by MRN). Its rows were
shifted by the old twin's offset; this moves them by the difference to the new one, in
the same run and before its commit point, so no committed version mixes two offsets for
one twin. The difference tells nothing about the real dates; computing it needs the key.

Precision is kept as the ingest keeps it: a year or month moves as its middle moves
(deid._shift_partial), and no date moves before the Safe Harbor floor (ages over 89).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ConfigError
from ..keys import has_secret_key
from ..schema import TIMESTAMP
from ..temporal import parse_fhir_datetime
from .deid import generalise_date, shift_floored

SHIFTED = "deid:shift"
_DAY_US = 86_400_000_000
_ROW_KEY = ["source", "unit_key", "row_index"]


@dataclass(frozen=True)
class Move:
    """A record that linking moved from one twin to another."""

    source: str
    patient_id: str
    old_twin: str
    new_twin: str


def reshift(store, moves: Iterable[Move]) -> int:
    """Move the dates of the moved records of date-shifted sources to their new twin's
    offset. Returns the number of rows rewritten."""
    profiles = store.privacy_profiles()
    by_source: dict[str, list[Move]] = {}
    for m in moves:
        if profiles.get(m.source) == SHIFTED:
            by_source.setdefault(m.source, []).append(m)
    rewritten = 0
    for source, ms in by_source.items():
        if not has_secret_key():
            raise ConfigError(f"linking moved records of source {source!r}, whose dates are shifted per person, to "
                              "another twin; moving their dates to the new offset needs the store's key: set "
                              "TWIN_KEY or TWIN_KEY_FILE")
        from . import PrivacyHooks

        deid = PrivacyHooks("deid", source, dates="shift").deidentifier
        assert deid is not None
        days = {m.patient_id: deid.shift_for(m.new_twin) - deid.shift_for(m.old_twin) for m in ms}
        days = {p: d for p, d in days.items() if d}
        if days:
            rewritten += _reshift_source(store, source, days, deid.floor_year)
    return rewritten


def _reshift_source(store, source: str, days: dict[str, int], floor_year: int) -> int:
    pids = pa.array(list(days), pa.string())
    deltas = pa.array(list(days.values()), pa.int64())
    n = 0
    for name, table in store.schema.tables.items():
        if table.patient_column != "patient_id" or not table.provenance or not table.temporal:
            continue
        dated_strings = "value_string" in table.by_name and "value_type" in table.by_name
        columns = sorted(table.temporal) + [f"{c}_precision" for c in sorted(table.temporal)]
        columns += ["value_string"] if dated_strings else []
        rows = store.rows_of_records(name, _ROW_KEY + ["patient_id"] + columns + (["value_type"] if dated_strings else []),
                                     source, pids)
        if rows.num_rows == 0:
            continue
        row_days = pc.take(deltas, pc.index_in(rows.column("patient_id"), value_set=pids))
        out = {c: rows.column(c) for c in _ROW_KEY}
        for col in sorted(table.temporal):
            out[col], out[f"{col}_precision"] = _shift_column(rows.column(col), rows.column(f"{col}_precision"),
                                                              row_days, floor_year)
        if dated_strings:
            out["value_string"] = _shift_strings(rows.column("value_string"), rows.column("value_type"),
                                                 row_days, floor_year)
        store.update_columns(name, _ROW_KEY, pa.table(out), [c for c in out if c not in _ROW_KEY])
        n += rows.num_rows
    return n


def _shift_column(ts: pa.ChunkedArray, prec: pa.ChunkedArray, row_days: pa.Array,
                  floor_year: int) -> tuple[pa.Array, pa.Array]:
    """Instants at day precision or finer move by whole days (vectorised); years and
    months move as the ingest moves them (few rows, per value)."""
    ts, prec = ts.combine_chunks(), prec.combine_chunks()
    moved = pc.cast(pc.add(pc.cast(ts, pa.int64()), pc.multiply(row_days, _DAY_US)), TIMESTAMP)
    coarse = pc.is_in(prec, value_set=pa.array(["year", "month"]))
    if pc.any(coarse).as_py():
        values, precs = moved.to_pylist(), prec.to_pylist()
        originals, shifts = ts.to_pylist(), row_days.to_pylist()
        for i in pc.indices_nonzero(coarse).to_pylist():
            year = originals[i].year
            text = f"{year:04d}" if precs[i] == "year" else f"{year:04d}-{originals[i].month:02d}"
            if precs[i] == "year" and year <= floor_year:
                values[i] = originals[i]  # a floored value (age over 89) stays at the floor
                continue
            values[i] = parse_fhir_datetime(generalise_date(text, shifts[i]))[0]
        moved = pa.array(values, TIMESTAMP)
    moved, early = floor_instants(moved, floor_year)
    return moved, pc.if_else(early, pa.scalar("year"), prec)


def floor_instants(ts: pa.Array | pa.ChunkedArray, floor_year: int) -> tuple[pa.Array, pa.Array]:
    """Instants before January 1st of `floor_year` set to it (Deidentifier.floor_year), and
    which ones were: their precision becomes the year."""
    floor = pa.scalar(datetime(floor_year, 1, 1, tzinfo=UTC), TIMESTAMP)
    early = pc.fill_null(pc.less(ts, floor), False)
    return pc.if_else(early, floor, ts), early


def _shift_strings(values: pa.ChunkedArray, types: pa.ChunkedArray, row_days: pa.Array, floor_year: int) -> pa.Array:
    """Observation values of type dateTime (value_string) move like the other dates."""
    texts, kinds, shifts = values.to_pylist(), types.to_pylist(), row_days.to_pylist()
    for i, (v, k) in enumerate(zip(texts, kinds, strict=True)):
        if k != "dateTime" or v is None or (len(v) == 4 and v.isdigit() and int(v) <= floor_year):
            continue  # not a date, or a floored one (it stays at the floor)
        moved = shift_floored(v, shifts[i], floor_year)
        texts[i] = str(floor_year) if moved is None else moved
    return pa.array(texts, pa.string())


__all__ = ["Move", "SHIFTED", "reshift"]
