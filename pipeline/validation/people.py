"""Who each row belongs to, and what the gate needs to know about that person.

Rows of every table are tied to a person by `twin_id`. A row written before identity
linking ran (twin_id null) falls back to its source and patient id, so the checks work
on a store that has not linked anyone yet. A person's sex, birth, death, race and
ethnicity come from the patient table: the first known value over their patient
records, in a fixed order (source, patient_id), so the answer does not depend on how
rows happen to be ordered.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .layout import TableLayout

_SEP = "\x1f"
# The period a value written with this precision may stand for; a bound may be lenient by
# up to a few days (a year is taken as 366 days, a month as 31), never strict.
_SPANS = {"year": timedelta(days=366), "month": timedelta(days=31), "day": timedelta(days=1),
          "minute": timedelta(minutes=1), "second": timedelta(seconds=1), "millisecond": timedelta(milliseconds=1)}
_SPAN_NAMES = pa.array(list(_SPANS))
_SPAN_VALUES = pa.array([int(v / timedelta(microseconds=1)) for v in _SPANS.values()] + [0], pa.int64())


def person_keys(data: pa.Table, layout: TableLayout) -> pa.ChunkedArray | None:
    """twin_id, or source + patient id where twin_id is null; None when the table names no person."""
    pcol = "patient_id" if layout.name == "patient" else layout.patient_column
    twin = data.column("twin_id") if "twin_id" in data.column_names else None
    if pcol is None or pcol not in data.column_names or "source" not in data.column_names:
        return twin
    fallback = pc.binary_join_element_wise(data.column("source"), data.column(pcol), _SEP)
    if twin is None:
        return fallback
    if twin.null_count == 0:
        return twin
    return pc.coalesce(twin, fallback)


def upper_bound(ts: pa.ChunkedArray, precision: pa.ChunkedArray | None) -> pa.ChunkedArray:
    """The end of the period a time written with `precision` may stand for (2020 -> 2021-01-01)."""
    if precision is None:
        return ts
    idx = pc.fill_null(pc.index_in(precision, value_set=_SPAN_NAMES), len(_SPANS))
    micros = pc.take(_SPAN_VALUES, idx)
    return pc.add(ts, pc.cast(micros, pa.duration("us")))


@dataclass
class People:
    """One row per person: key, the raw attribute columns, birth and death bounds."""

    keys: pa.Array
    attrs: dict[str, pa.Array]
    birth: pa.Array           # start of the birth date's period
    death_upper: pa.Array     # end of the death date's period (null when alive or unknown)

    def __len__(self) -> int:
        return len(self.keys)

    def index_of(self, keys: pa.ChunkedArray | pa.Array) -> pa.Array:
        """Position of each key in this table (null when the person is not in the patient table)."""
        return pc.index_in(keys, value_set=self.keys)

    def age_years(self, now: datetime) -> np.ndarray:
        """Whole years of age at `now` (NaN when the birth date is unknown)."""
        b = self.birth
        valid = pc.is_valid(b).to_numpy(zero_copy_only=False)
        y = pc.year(b).to_numpy(zero_copy_only=False).astype(float)
        md = (pc.month(b).to_numpy(zero_copy_only=False).astype(float) * 100
              + pc.day(b).to_numpy(zero_copy_only=False).astype(float))
        age = now.year - y - ((now.month * 100 + now.day) < md)
        age[~valid] = np.nan
        return age


def people(patient: pa.Table | None, layout: TableLayout | None, columns: tuple[str, ...]) -> People:
    """Collapse the patient table to one row per person, keeping `columns` (first known value)."""
    if patient is None or layout is None or patient.num_rows == 0:
        empty = pa.array([], pa.string())
        return People(empty, {c: empty for c in columns}, pa.array([], pa.timestamp("us", tz="UTC")),
                      pa.array([], pa.timestamp("us", tz="UTC")))
    keys = person_keys(patient, layout)
    if keys is None:  # neither twin_id nor source + patient_id: nobody can be named
        return people(None, None, columns)
    t = pa.table({"__key": keys})
    order = [("__key", "ascending")]
    for c in ("source", "patient_id"):  # a fixed order, so the first known value does not depend on row order
        if c in patient.column_names:
            t = t.append_column(f"__{c}", patient.column(c))
            order.append((f"__{c}", "ascending"))
    wanted = [c for c in dict.fromkeys((*columns, "birth_date", "deceased_at", "deceased_at_precision"))
              if c in patient.column_names]
    for c in wanted:
        t = t.append_column(c, patient.column(c))
    t = t.sort_by(order)
    g = t.group_by("__key", use_threads=False).aggregate([(c, "first") for c in wanted])
    get = {c: g.column(f"{c}_first").combine_chunks() for c in wanted}
    n = g.num_rows
    ts_null = pa.nulls(n, pa.timestamp("us", tz="UTC"))
    birth = get.get("birth_date", ts_null)
    death = get.get("deceased_at")
    death_upper = upper_bound(death, get.get("deceased_at_precision")) if death is not None else ts_null
    attrs = {c: get.get(c, pa.nulls(n, pa.string())) for c in columns}
    return People(g.column("__key").combine_chunks(), attrs, birth, death_upper)


__all__ = ["People", "people", "person_keys", "upper_bound"]
