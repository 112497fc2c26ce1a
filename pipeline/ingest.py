"""From units to stored rows: views, type checks, provenance, batching, upserts.

One `Ingest` serves one source in one run. Resources go through every view of their
type (mappings/views/<table>[.<variant>].json); each row is checked against the twin
schema as it is made, while the unit is still at hand, so a unit whose values do not
fit goes to quarantine whole, with its raw payload, and never half into the tables.
Rows wait in memory per table until `flush_rows` are pending, then every table is
upserted (one commit per table per flush); memory stays flat whatever the input size.

Resources that name a conditional reference not seen yet are spilled to a scratch file
and processed after the rest of the input (see pipeline.references).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import orjson
import pyarrow as pa

from .arrays import constant, distinct_codes, map_values, runs_column
from .errors import ConfigError
from .fhir import DIRECTORY_TYPES
from .identity import TwinIds
from .references import IdentifierIndex, Resolver, identifiers_of
from .resources import mappings_dir
from .runs import Run
from .schema import TIMESTAMP, Schema, Table
from .store import Store, version_newer
from .temporal import BadTemporal, parse_fhir_datetime, utc_now
from .units import Deletion, Rejected, Resource, Rows, Unit
from .views import RowError, Unresolved, ViewError, compile_view

if TYPE_CHECKING:
    from .privacy import PrivacyHooks

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- views


class _BadValue(Exception):
    pass


def _as_string(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise _BadValue("a string")


def _as_float(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if not isinstance(v, (str, bool, list, dict)) and hasattr(v, "__float__"):
        return float(v)  # decimal.Decimal
    raise _BadValue("a number")


def _as_int(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    raise _BadValue("an integer")


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise _BadValue("true or false")


def _as_strings(v: Any) -> list[str]:
    if isinstance(v, list):
        return [_as_string(x) for x in v if x is not None]
    return [_as_string(v)]


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "string": _as_string, "float64": _as_float, "int64": _as_int, "int32": _as_int, "boolean": _as_bool,
    "list<string>": _as_strings,
}


@dataclass
class TableView:
    """One compiled ViewDefinition feeding one table, with its row converter."""

    table: Table
    view: Any  # pipeline.views.CompiledView
    resource_type: str
    path: Path
    # (view column index, output positions, converter or None for temporal)
    plan: list[tuple[int, tuple[int, ...], Callable[[Any], Any] | None, str]] = field(default_factory=list)
    width: int = 0
    required: list[tuple[int, str]] = field(default_factory=list)  # (position, column) that may not be null

    def convert(self, row: tuple) -> list[Any]:
        out = self._convert(row)
        for pos, name in self.required:
            if out[pos] is None:
                raise _Missing(f"column {name} is required and the resource gives no value for it")
        return out

    def _convert(self, row: tuple) -> list[Any]:
        out: list[Any] = [None] * self.width
        for i, pos, conv, name in self.plan:
            v = row[i]
            if v is None:
                continue
            try:
                if conv is None:  # a FHIR date/dateTime: instant, precision, offset
                    if isinstance(v, list):
                        v = v[0] if v else None
                        if v is None:
                            continue
                    out[pos[0]], out[pos[1]], out[pos[2]] = parse_fhir_datetime(v)
                else:
                    if isinstance(v, list) and conv is not _as_strings:
                        v = v[0] if len(v) == 1 else _raise_list()
                    out[pos[0]] = conv(v)
            except _BadValue as e:
                raise _BadValue(f"column {name}: expected {e}, got {type(v).__name__}") from None
            except BadTemporal as bad:
                raise _BadValue(f"column {name}: {bad}") from None
        return out


class _Missing(Exception):
    pass


def _raise_list():
    raise _BadValue("a single value")


class ViewSet:
    """Every ViewDefinition in a folder, compiled once and indexed by resource type.

    The table a view feeds is its file name up to the first dot:
    `medication.request.json` feeds `medication`. Each view column must be a column of
    that table (provenance columns are added by the pipeline, date companions derived).
    """

    def __init__(self, schema: Schema, directory: Path | None = None):
        self.schema = schema
        self.directory = directory or (mappings_dir() / "views")
        self.by_type: dict[str, list[TableView]] = {}
        problems: list[str] = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                tv = self._load(path)
            except (ViewError, ValueError, KeyError) as e:
                problems.append(f"{path.name}: {e}")
                continue
            for other in self.by_type.get(tv.resource_type, []):
                if other.table.name == tv.table.name:
                    problems.append(f"{path.name}: a second view of {tv.resource_type} into table {tv.table.name} "
                                    f"(the first is {other.path.name})")
            self.by_type.setdefault(tv.resource_type, []).append(tv)
        if problems:
            raise ConfigError(f"the views in {self.directory} are not usable", problems)
        self.tables: list[str] = sorted({tv.table.name for tvs in self.by_type.values() for tv in tvs})
        self.tables_of_type: dict[str, tuple[str, ...]] = {
            rtype: tuple(tv.table.name for tv in tvs) for rtype, tvs in self.by_type.items()}
        self.types_of_table: dict[str, set[str]] = {
            t: {rtype for rtype, names in self.tables_of_type.items() if t in names} for t in self.tables}

    def _load(self, path: Path) -> TableView:
        definition = orjson.loads(path.read_bytes())
        view = compile_view(definition)
        table_name = path.name.split(".", 1)[0]
        if table_name not in self.schema.tables:
            raise ValueError(f"no table {table_name!r} in twin schema v{self.schema.version}")
        table = self.schema.tables[table_name]
        own = list(table.own_columns)
        index = {n: i for i, n in enumerate(own)}
        tv = TableView(table, view, view.resource, path, width=len(own))
        seen = set()
        for i, col in enumerate(view.columns):
            if col.name not in index:
                raise ValueError(f"column {col.name!r} is not a column of table {table_name}")
            if col.name in seen:
                raise ValueError(f"column {col.name!r} twice")
            seen.add(col.name)
            scol = table.by_name[col.name]
            if col.name in table.temporal:
                pos = (index[col.name], index[col.name + "_precision"], index[col.name + "_offset"])
                tv.plan.append((i, pos, None, col.name))
            else:
                conv = _CONVERT.get(scol.type)
                if conv is None:
                    raise ValueError(f"column {col.name!r} has type {scol.type}, which a view cannot fill")
                tv.plan.append((i, (index[col.name],), conv, col.name))
        if table.patient_column and table.patient_column not in seen:
            raise ValueError(f"the view must give {table.patient_column!r}: it decides which twin a row belongs to")
        missing = [c.name for c in table.columns if c.required and c.name in index and c.name not in seen
                   and not c.name.endswith(("_precision", "_offset"))]
        if missing:
            raise ValueError(f"required columns not given: {missing}")
        tv.required = [(index[c.name], c.name) for c in table.columns if c.required and c.name in seen]
        return tv


# --------------------------------------------------------------------------- ingest


def unit_version(resource: dict[str, Any]) -> str | None:
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        return None
    lu = meta.get("lastUpdated")
    vid = meta.get("versionId")
    lu_text = ""
    if isinstance(lu, str):
        try:
            lu_text = parse_fhir_datetime(lu)[0].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        except BadTemporal:
            lu_text = ""
    vid_text = vid if isinstance(vid, str) else ""
    if not lu_text and not vid_text:
        return None
    return f"{lu_text}|{vid_text}"


def _digest(rows: list[list[Any]]) -> str:
    """The content hash of a unit's rows in one table: what tells a changed unit from an
    unchanged one on the next import, so its bytes must not change between versions.
    orjson writes the rows' datetimes (timezone.utc) exactly as datetime.isoformat(),
    which earlier versions called for each one (tests/test_import_fhir.py pins it)."""
    return hashlib.blake2b(orjson.dumps(rows), digest_size=16).hexdigest()


class Mapped:
    """The rows one resource yields, per table, already typed for the schema.

    A plain class, one per resource: the compiled build makes it in a fraction of a
    dataclass's time (whose __init__ is Python)."""

    __slots__ = ("key", "version", "source_ref", "tables", "create_only")

    def __init__(self, key: str, version: str | None, source_ref: str, tables: dict[str, list[list[Any]]],
                 create_only: bool = False) -> None:
        self.key = key
        self.version = version
        self.source_ref = source_ref
        self.tables = tables
        self.create_only = create_only  # Resource.create_only


class TableBatch:
    """The rows one flush writes to one table, gathered unit by unit, and what each unit's
    rows share (kept once per unit: batch_to_arrow spreads it).

    The values are kept by column, as Arrow takes them. Transposing 50,000 rows at the
    flush with `zip(*rows)` stepped through every row's list for every column, a cache
    miss a value; appending each row's values to its column's list as units come costs
    more instructions but less time (bench/RESULTS.md, stop 23)."""

    __slots__ = ("columns", "owners", "counts")

    def __init__(self, width: int) -> None:
        self.columns: list[list[Any]] = [[] for _ in range(width)]  # the table's own columns, in order
        self.owners: list[tuple[str, str, str | None, str]] = []  # (source_ref, unit key, version, hash)
        self.counts: list[int] = []  # rows of each owner

    def add(self, m: Mapped, rows: list[list[Any]]) -> str:
        """Take one unit's rows for this table; returns their content hash."""
        digest = _digest(rows)
        if rows:
            columns = self.columns
            width = len(columns)
            for row in rows:
                if len(row) != width:
                    raise ValueError(f"{m.key}: a row of {len(row)} values for a table of {width} columns")
                for j in range(width):
                    columns[j].append(row[j])
            self.owners.append((m.source_ref, m.key, m.version, digest))
            self.counts.append(len(rows))
        return digest


# Column transforms (pseudonymisation of configured columns) replace one typed value by another.
ColumnTransforms = dict[str, dict[str, Callable[[Any], Any]]]


class ResourceMapper:
    """Resource -> the typed rows of every table its views feed. No store, no state.

    This is the pure core the single-process ingest and the Spark engine share: the
    same resource gives the same rows wherever it is mapped. It raises `Unresolved`
    when a conditional reference names a resource not known yet (the caller decides
    whether to defer); every other problem with the resource is a `Rejected`.
    """

    def __init__(self, views: ViewSet, resolver: Resolver, *, column_transforms: ColumnTransforms | None = None):
        self.views = views
        self.resolver = resolver
        self.column_transforms = column_transforms or {}
        self._positions = {
            t: [(views.schema.table(t).own_columns.index(c), f) for c, f in cols.items()]
            for t, cols in self.column_transforms.items()
        }

    def map(self, unit: Resource) -> Mapped | Rejected | None:
        """None when no view maps the resource's type."""
        res = unit.resource
        rtype = res["resourceType"]
        tvs = self.views.by_type.get(rtype)
        if not tvs:
            return None
        self.resolver.full_urls = unit.full_urls
        tables: dict[str, list[list[Any]]] = {}
        tv = tvs[0]
        try:
            for tv in tvs:
                rows = [tv.convert(r) for r in tv.view.rows(res, self.resolver)]
                for pos, f in self._positions.get(tv.table.name, ()):
                    for row in rows:
                        if row[pos] is not None:
                            row[pos] = f(row[pos])
                tables[tv.table.name] = rows
        except Unresolved:
            raise
        except _BadValue as e:
            return Rejected("view", "wrong-type", f"{rtype}: {e}", unit.source_ref, **_payload(unit),
                            target_table=tv.table.name)
        except _Missing as missing:  # (mypyc: a name bound by two except clauses must have one type)
            return Rejected("schema", "missing-required", f"{rtype} into {tv.table.name}: {missing}", unit.source_ref,
                            **_payload(unit), target_table=tv.table.name)
        except RowError as broken:  # the resource breaks a rule the view relies on (two values for one column, ...)
            return Rejected("view", broken.reason, f"{rtype}: view {tv.path.name}: {broken}", unit.source_ref,
                            **_payload(unit), target_table=tv.table.name)
        except (RecursionError, TypeError, ValueError, AttributeError, KeyError, IndexError) as failed:
            # the runner is built to yield empty on odd shapes; anything left is still this unit's problem only
            return Rejected("view", "view-failed", f"{rtype}: view {tv.path.name} failed on this resource "
                            f"({type(failed).__name__})", unit.source_ref, **_payload(unit), target_table=tv.table.name)
        return Mapped(f"{rtype}/{res['id']}", unit_version(res), unit.source_ref, tables, unit.create_only)


def batch_to_arrow(table: Table, batch: TableBatch, now: datetime, source: str, run_id: str,
                   twin_ids: TwinIds) -> pa.Table:
    """The batch's rows with their provenance, as the table's Arrow columns (Ingest.flush,
    and the parts of a job on an engine: pipeline/engines/tasks.py).

    What is the same for every row of a unit (locator, key, version, hash) is kept
    once per unit and spread by index (`take`), what is the same for the whole
    batch once: no Python list of one value per row for the provenance columns.
    """
    n = sum(batch.counts)
    arrays: dict[str, Any] = {}
    for name, values in zip(table.own_columns, batch.columns, strict=True):
        arrays[name] = pa.array(values, table.by_name[name].arrow)
    pcol = table.patient_column
    if pcol:  # a twin id per distinct patient, not per row; plain strings, as before
        arrays["twin_id"] = map_values(arrays[pcol], lambda p: twin_ids(source, p),
                                       pa.string()).cast(pa.string())
    else:
        arrays["twin_id"] = pa.nulls(n, pa.string())
    counts = np.asarray(batch.counts, np.int64)
    owner = pa.array(np.repeat(np.arange(len(counts), dtype=np.int32), counts))
    refs, keys, versions, hashes = zip(*batch.owners, strict=True) if batch.owners else ((), (), (), ())
    arrays["source_ref"] = pa.array(refs, pa.string()).take(owner)
    arrays["unit_key"] = pa.array(keys, pa.string()).take(owner)
    arrays["unit_version"] = pa.array(versions, pa.string()).take(owner)
    arrays["content_hash"] = pa.array(hashes, pa.string()).take(owner)
    starts = np.cumsum(counts) - counts
    arrays["row_index"] = pa.array((np.arange(n, dtype=np.int64) - np.repeat(starts, counts)).astype(np.int32))
    arrays["source"] = pa.repeat(pa.scalar(source, pa.string()), n)
    arrays["run_id"] = pa.repeat(pa.scalar(run_id, pa.string()), n)
    arrays["ingested_at"] = pa.repeat(pa.scalar(now, TIMESTAMP), n)
    return pa.table([arrays[c.name] for c in table.columns], names=[c.name for c in table.columns])


class Ingest:
    """Feeds the units of one source into the store, within a run."""

    def __init__(self, store: Store, run: Run, source: str, source_kind: str, views: ViewSet,
                 *, flush_rows: int = 50_000, twin_ids: TwinIds | None = None,
                 on_flush: Callable[[], None] | None = None, privacy: PrivacyHooks | None = None):
        self.store = store
        self.run = run
        self.source = source
        self.source_kind = source_kind
        self.views = views
        self.flush_rows = flush_rows
        self.twin_ids = twin_ids or TwinIds()
        self.counts = run.counts[source]
        self.index = IdentifierIndex(self._stored_identifiers)
        self.resolver = Resolver(self.index)
        self.privacy = privacy
        store.claim_privacy(source, privacy.name if privacy else "none")
        self.mapper = ResourceMapper(views, self.resolver,
                                     column_transforms=privacy.column_transforms() if privacy else None)
        self.on_flush = on_flush
        self._pending: dict[str, Mapped] = {}
        self._deletions: dict[str, str] = {}  # unit_key -> source_ref
        self._identifiers: dict[tuple[str, str, str], str] = {}
        self._pending_rows = 0
        self._spill_path: Path | None = None
        self._spill: BinaryIO | None = None
        self.deferred = 0
        self.no_patient: dict[str, int] = {}  # device-stream rows naming no patient, per table
        self._row_chunks = 0

    def _twin_of(self, patient_id: str) -> str:
        """The twin a patient of this source belongs to now: the key of its date offset
        under --deid-dates shift (privacy/reshift.py keeps it when linking moves it)."""
        tid = self.twin_ids(self.source, patient_id)
        assert tid is not None
        return tid

    # ------------------------------------------------------------------ units

    def feed_all(self, units: Iterable[Unit]) -> None:
        for unit in units:
            self.feed(unit)

    def feed(self, unit: Unit, *, private: bool = False) -> None:
        """Take one unit. `private`: it has been through the privacy hooks already (a
        deferred resource read back)."""
        if isinstance(unit, Resource):
            self.counts.read += 1
            if self.privacy is not None and not private:
                kept = self.privacy.resource(unit, self._twin_of)
                if kept is None:  # the profile does not keep this resource type
                    self._ignored(unit.resource["resourceType"])
                    return
                unit = kept
            self._resource(unit)
        elif isinstance(unit, Rejected):
            self.counts.read += 1
            self._quarantine(unit)
        elif isinstance(unit, Deletion):
            self.counts.read += 1
            key = f"{unit.resource_type}/{unit.resource_id}"
            dropped = self._pending.pop(key, None)
            if dropped is not None:  # a copy read earlier in this batch, deleted before it was written
                self.counts.unchanged += 1
                self._pending_rows -= sum(len(r) for r in dropped.tables.values())
            self._deletions[key] = unit.source_ref
        elif isinstance(unit, Rows):
            self._rows(unit if self.privacy is None else self.privacy.rows(unit, self._twin_of))
        else:  # pragma: no cover - a connector bug
            raise TypeError(f"not a unit: {type(unit).__name__}")
        if self._pending_rows >= self.flush_rows:
            self.flush()

    def _resource(self, unit: Resource) -> None:
        res = unit.resource
        rtype = res["resourceType"]
        key = f"{rtype}/{res['id']}"
        if rtype in DIRECTORY_TYPES:
            for system, value in identifiers_of(res):
                self.index.add(rtype, system, value, res["id"])
                self._identifiers[(rtype, system, value)] = res["id"]
        old = self._pending.get(key)
        if old is not None and unit.create_only and not old.create_only:
            # the batch already holds the copy whose word counts (ADT's Patient and Encounter,
            # before a result naming them): this one would go through the views to be dropped
            self.counts.unchanged += 1
            return
        try:
            mapped = self.mapper.map(unit)
        except Unresolved:
            self._defer(unit)
            return
        if mapped is None:
            self._ignored(rtype)
            return
        if isinstance(mapped, Rejected):
            self._quarantine(mapped)
            return
        if self._deletions.pop(key, None) is not None:
            self.counts.unchanged += 1  # a deletion read earlier in this batch, superseded by this copy
        if old is not None:
            self.counts.unchanged += 1  # one of the two copies of a unit in this batch is not written
            if version_newer(mapped.version, old.version) is False:
                return
            self._pending_rows -= sum(len(r) for r in old.tables.values())
        self._pending[key] = mapped
        self._pending_rows += sum(len(r) for r in mapped.tables.values())

    def _quarantine(self, r: Rejected) -> None:
        """Under a privacy profile the quarantine keeps no payload (it would be the raw,
        identified input): the locator says where to find it, and a retry re-reads it."""
        self.run.quarantine(self.source, self.source_kind, r if self.privacy is None else self.privacy.rejected(r))

    def _ignored(self, rtype: str) -> None:
        self.counts.ignored += 1
        self.counts.ignored_types[rtype] = self.counts.ignored_types.get(rtype, 0) + 1

    def _defer(self, unit: Resource) -> None:
        if self._spill is None:
            self._spill_path = self.store.tmp_dir() / f"deferred-{self.run.run_id}-{id(self)}.ndjson"
            self._spill = open(self._spill_path, "wb")  # noqa: SIM115 - closed in finish()
        rec = {"r": unit.resource, "ref": unit.source_ref, "fu": dict(unit.full_urls) if unit.full_urls else None,
               "co": unit.create_only}
        self._spill.write(orjson.dumps(rec) + b"\n")
        self.deferred += 1
        self.counts.read -= 1  # counted again when it is read back

    def _rows(self, unit: Rows) -> None:
        """Columnar rows (device streams): provenance added, stored at once."""
        self.counts.read += unit.units
        table = self.store.schema.table(unit.table)
        data = unit.data
        n = data.num_rows
        now = utc_now()
        pcol = table.patient_column
        if pcol and pcol in data.column_names:
            # a stream has few patients: hash each once, then index (no per-row Python)
            pids = data.column(pcol)
            twin = map_values(pids, lambda p: self.twin_ids(self.source, p), pa.string())
            orphans = pids.null_count
        else:
            twin = pa.nulls(n, pa.string())
            orphans = n if pcol else 0
        if orphans and unit.table != "device":  # a device need not belong to anyone
            self.no_patient[unit.table] = self.no_patient.get(unit.table, 0) + orphans
        cols = {name: data.column(name) for name in data.column_names}
        # Provenance is one value per chunk: dictionary columns of one value, index blocks
        # shared by every row, not n copies each (pa.repeat of a 64-character hash over
        # 750,000 rows costs more than mapping them; the Parquet writer takes them as they are).
        cols.update({
            "twin_id": twin,
            "source": runs_column([(self.source, n)], pa.string()),
            "source_ref": runs_column([(unit.source_ref, n)], pa.string()),
            "run_id": runs_column([(self.run.run_id, n)], pa.string()),
            "ingested_at": pa.chunked_array(constant(now, n, TIMESTAMP, cache=False), TIMESTAMP),
            "unit_version": runs_column([(None, n)], pa.string()),
            "content_hash": runs_column([(unit.content_hash, n)], pa.string()),
        })
        full = pa.table({c.name: cols[c.name] if c.name in cols else pa.nulls(n, c.arrow) for c in table.columns})
        idx, keys = distinct_codes(full.column("unit_key"))  # a chunk is one unit, or a few
        counts = np.bincount(idx.to_numpy(), minlength=len(keys)).tolist() if n else []
        units: dict[str, tuple[str | None, str, int]] = {k: (None, unit.content_hash, c) for k, c in zip(keys.to_pylist(), counts, strict=True)}
        stats = self.store.upsert_units(unit.table, self.source, full, units)
        if stats.new or stats.changed:
            self.counts.written += unit.units
        else:
            self.counts.unchanged += unit.units
        self.run.rows[unit.table]["written"] += stats.rows_written
        del full, cols, data
        # Every 16th chunk, not each: the next chunk reuses the pages of the last (giving them
        # back and faulting them in again cost 9% of a device import); peak RSS stays flat.
        self._row_chunks += 1
        if self._row_chunks % 16 == 0:
            release_memory()

    # ------------------------------------------------------------------ flushing

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        deletions, self._deletions = self._deletions, {}
        self._pending_rows = 0
        now = utc_now()
        touched: dict[str, bool] = {k: False for k in pending}
        # each pending unit goes to the tables its type's views fill (one pass, in order),
        # not every table past every unit
        tables_of = self.views.tables_of_type
        per_table: dict[str, list[tuple[str, Any]]] = {t: [] for t in self.views.tables}
        for key, p in pending.items():
            for table_name in tables_of.get(key.split("/", 1)[0], ()):
                per_table[table_name].append((key, p))
        for table_name in self.views.tables:
            table = self.store.schema.table(table_name)
            covered = self.views.types_of_table[table_name]
            units: dict[str, tuple[str | None, str, int]] = {}
            batch = TableBatch(len(table.own_columns))
            for key, p in per_table[table_name]:
                trows = p.tables.get(table_name, [])
                units[key] = (p.version, batch.add(p, trows), len(trows))
            dels = [k for k in deletions if k.split("/", 1)[0] in covered]
            if dels:
                n = self.store.delete_units(table_name, self.source, dels)
                self.run.rows[table_name]["deleted_units"] += n
            if not units:
                continue
            data = batch_to_arrow(table, batch, now, self.source, self.run.run_id, self.twin_ids)
            stats = self.store.upsert_units(table_name, self.source, data, units,
                                            keep_stored={k for k, p in per_table[table_name] if p.create_only})
            for k, outcome in stats.outcome.items():
                if outcome in ("new", "changed"):
                    touched[k] = True
            self.run.rows[table_name]["written"] += stats.rows_written
            self.run.rows[table_name]["deleted"] += stats.rows_deleted
        for wrote in touched.values():
            if wrote:
                self.counts.written += 1
            else:
                self.counts.unchanged += 1
        self.counts.written += len(deletions)
        self.counts.deleted += len(deletions)
        self._flush_identifiers(now)
        self.run.flush_quarantine()
        del pending, per_table
        if _paused:
            gc.collect()  # the one collection per batch that collect_at_flushes() leaves
        release_memory()
        if self.on_flush:
            self.on_flush()

    def _flush_identifiers(self, now: datetime) -> None:
        if not self._identifiers:
            return
        items = self._identifiers
        self._identifiers = {}
        table = self.store.schema.table("resource_identifier")
        n = len(items)
        keys = list(items)
        data = {
            "resource_type": [k[0] for k in keys], "system": [k[1] for k in keys], "value": [k[2] for k in keys],
            "resource_id": list(items.values()),
            "twin_id": [None] * n, "source": [self.source] * n, "source_ref": [""] * n,
            "run_id": [self.run.run_id] * n, "ingested_at": [now] * n,
            "unit_key": [f"{k[0]}/{v}" for k, v in items.items()], "unit_version": [None] * n,
            "row_index": [0] * n, "content_hash": [""] * n,
        }
        self.store.merge_by_key("resource_identifier", pa.Table.from_pydict(data, schema=table.arrow_schema),
                                unless_same=("resource_id",))

    def _stored_identifiers(self):
        t = self.store.read("resource_identifier", ["resource_type", "system", "value", "resource_id"], latest=True)
        return zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True)

    def finish(self) -> None:
        """Process deferred resources (now every file has been read), then flush everything."""
        self.flush()
        if self._spill is not None:
            self._spill.close()
            self._spill = None
            self.resolver.final = True
            assert self._spill_path is not None
            with open(self._spill_path, "rb") as f:
                for line in f:
                    rec = orjson.loads(line)
                    self.feed(Resource(rec["r"], rec["ref"], rec["fu"], create_only=rec["co"]), private=True)
            self._spill_path.unlink(missing_ok=True)
            self.flush()
            self.resolver.final = False
        if self.no_patient:
            # A wearable's export often does not say whose it is (Empatica E4): such rows
            # are kept, but belong to no twin; say so rather than let them vanish from view.
            rows = ", ".join(f"{t} {n:,}" for t, n in sorted(self.no_patient.items()))
            self.run.notes.append(f"{self.source}: rows name no patient ({rows}) and belong to no twin; "
                                  "give --patient-id (patient_id in a job source), or map the id in the format's [patient] section")
            self.no_patient = {}
        missed = self.resolver.unresolved
        if missed:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(missed.items()))
            self.run.notes.append(f"{self.source}: {sum(missed.values())} references did not resolve ({kinds}); "
                                  "stored as null, see the gate's reference checks")
            self.resolver.unresolved = {}


_paused = 0  # depth of collect_at_flushes() scopes


@contextmanager
def collect_at_flushes() -> Iterator[None]:
    """Pause the cyclic garbage collector while units are fed; each flush collects.

    An ingest allocates millions of small containers (resources, rows) and keeps up to
    `flush_rows` rows alive until a flush. The collector, started every few hundred (or
    thousand) allocations, walks the young ones and now and then every live object,
    pending rows included: 14% of an HL7 v2 import with CPython's default threshold,
    still 9% with a threshold of 20,000 (bench/RESULTS.md). Almost nothing here forms a
    cycle: reference counting frees it. So within the scope the collector runs once per
    flush, after the batch is dropped, when little is alive; memory stays bounded by one
    batch, as before. Process-wide, like any GC setting: threads running beside an
    import (the MLLP listener's) have their cycles collected at the next flush.

    What was alive when the outermost scope began (modules, compiled views and maps,
    their caches: some 70,000 objects) is frozen for the scope (gc.freeze): a flush's
    collection walks only what the scope made, not all of that again each time (35 to
    60 ms a flush, 2 to 3% of an HL7 v2 import). The scope's end thaws it, so a cycle
    that was garbage before the scope is still collected, only later.
    """
    global _paused
    was = gc.isenabled()
    gc.disable()
    if _paused == 0:
        gc.freeze()
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1
        if _paused == 0:
            gc.unfreeze()
        if was:
            gc.enable()


def release_memory() -> None:
    """Give memory freed by a flush back to the system.

    Arrow's allocator and glibc keep freed pages for reuse; between flushes that shows
    as a resident size that creeps up with every batch. Releasing them keeps the peak
    at one flush's worth, whatever the size of the input.
    """
    pa.default_memory_pool().release_unused()
    if _libc is not None:
        _libc.malloc_trim(0)


try:
    _libc: Any = ctypes.CDLL("libc.so.6")
    _libc.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _libc = None


def _payload(unit: Resource) -> dict[str, Any]:
    try:
        data = unit.raw if unit.raw is not None else orjson.dumps(unit.resource)
    except TypeError:  # nested deeper than orjson writes (254 levels): the locator must do
        return {"payload_ref": unit.source_ref}
    if len(data) <= 1 << 20:
        return {"payload": data}
    return {"payload_ref": unit.source_ref}
