"""The twin store: one Delta Lake table per schema table, plus a small manifest.

Layout (readable by DuckDB, Spark or pandas without Twinline):

    twinstore/
      patient/ observation/ ...        Delta tables (Parquet files + _delta_log)
      _twin/manifest.json              the table versions of the last complete run
      _twin/lock                       held (flock) by the process writing the store

Why a manifest: a run writes several tables, and Delta commits are per table. The
manifest is replaced atomically once every table of a run is written, so it is the
store's commit point. Twinline reads tables at the manifest's versions; a run killed
before its manifest write is rolled back (each table restored to its manifest version)
by the next process that takes the lock. Nothing of a half run is ever visible
through Twinline, and the next run redoes the work (the file ledger and watermarks are
tables too, rolled back with the rest).

Why units: every row carries `unit_key` (the source unit it came from, for example
`Observation/123`), `unit_version` and `content_hash`. An upsert compares incoming
units with stored ones: unchanged units are skipped (re-imports change nothing), older
versions never replace newer ones, and a changed unit has all its rows replaced in the
same commit (tombstones delete rows a shorter new version no longer has).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import DeltaTable, WriterProperties, write_deltalake
from deltalake.transaction import AddAction

from .errors import ConfigError, LockHeld, StoreError
from .schema import Schema, Table, load_schema
from .temporal import utc_now

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
# Stores whose lock this process holds, with the nesting depth: a job holds the lock
# from its first import to its build, and the steps it calls take it again.
_HELD: dict[str, int] = {}
# Row groups of 64k rows: readers (the twin build, the export, pyarrow datasets) decode a
# row group at a time, so an unbounded group (delta-rs writes one per file) costs memory.
_ROW_GROUP = 65_536
_WRITER = WriterProperties(compression="ZSTD", max_row_group_size=_ROW_GROUP)
# Columns with min/max statistics in the Delta log (Store._table_config).
_STATS_COLUMNS = ("source", "unit_key", "twin_id")
# A checkpoint every 10 commits, not Delta's 100: opening a table replays the JSON commits
# since its last checkpoint (12 ms 60 commits past one, 3 ms just after), and a run opens
# the tables it writes a few times each. Set on new tables, and on older ones at the next
# commit that writes them.
_CHECKPOINT_KEY, _CHECKPOINT_EVERY = "delta.checkpointInterval", "10"
# Tiny files are merged at the commit point of a run that wrote the table, once it has
# _COMPACT_AT of them: every run (a `twin listen` drain each few seconds) adds files of a
# few kB to each table it writes, and a scan opens every file (2,000 files: 22x slower).
# Files of _TINY_FILE or more (an import's flushes, a device stream's chunks) never start
# a compaction, and those of COMPACT_SIZE or more are never rewritten: a compaction
# rewrites at most a few of those sizes, however large the table.
_TINY_FILE = 256 << 10
COMPACT_SIZE = 8 << 20
_COMPACT_AT = 32


def _delta_stats(data: pa.Table, columns: Sequence[str]) -> str:
    """The Delta `stats` of an added file: row count, and min, max and null count of
    `columns` (the others have none: readers then cannot skip on them, which is allowed)."""
    lo, hi, nulls = {}, {}, {}
    for c in columns:
        col = data.column(c)
        nulls[c] = col.null_count
        if pa.types.is_dictionary(col.type):  # the values the rows use, not the whole dictionary
            col = pa.chunked_array([ch.dictionary.take(pc.unique(ch.indices).drop_null()) for ch in col.chunks],
                                   col.type.value_type)
        mm = pc.min_max(col)
        if mm["min"].is_valid:
            lo[c], hi[c] = mm["min"].as_py(), mm["max"].as_py()
    return json.dumps({"numRecords": data.num_rows, "minValues": lo, "maxValues": hi, "nullCount": nulls})


def default_store_path() -> Path:
    return Path(os.environ.get("TWIN_STORE") or "twinstore")


@dataclass
class UpsertStats:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    older: int = 0
    deleted: int = 0
    rows_written: int = 0
    rows_deleted: int = 0
    outcome: dict[str, str] = field(default_factory=dict)  # unit_key -> new|changed|unchanged|older

    def add(self, other: UpsertStats) -> None:
        for k in ("new", "changed", "unchanged", "older", "deleted", "rows_written", "rows_deleted"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


def version_newer(incoming: str | None, stored: str | None) -> bool | None:
    """Is `incoming` a newer version than `stored`? None when it cannot be told.

    Versions are `lastUpdated|versionId` (either part may be empty). lastUpdated (an
    instant, normalised to UTC text by the ingest stage) decides when both have it;
    else a numeric versionId; else nobody knows, and the caller treats the incoming
    content as the latest (the last import wins).
    """
    if not incoming or not stored:
        return None
    i_lu, _, i_v = incoming.partition("|")
    s_lu, _, s_v = stored.partition("|")
    if i_lu and s_lu and i_lu != s_lu:
        return i_lu > s_lu
    if i_v.isdigit() and s_v.isdigit() and i_v != s_v:
        return int(i_v) > int(s_v)
    if i_lu == s_lu and i_v == s_v:
        return False
    return None


class Store:
    """A twin store on the local file system (or a path deltalake understands)."""

    def __init__(self, root: Path | str, schema: Schema | None = None):
        self.root = Path(root)
        self.schema = schema or load_schema()
        self.meta = self.root / "_twin"
        self._privacy_claims: dict[str, str] = {}  # source -> privacy profile of this run's writes
        self._linking: str | None = None  # what this run's identity linking ran under (identity.linking_fingerprint)

    # ------------------------------------------------------------------ manifest

    @property
    def manifest_path(self) -> Path:
        return self.meta / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"format": MANIFEST_FORMAT, "schema_version": self.schema.version, "tables": {}}
        except (OSError, ValueError) as e:
            raise StoreError(f"the store manifest {self.manifest_path} cannot be read ({e}); "
                             "restore it from a backup or remove the store") from None
        if str(data.get("schema_version")) != self.schema.version:
            raise StoreError(f"the store at {self.root} holds twin schema v{data.get('schema_version')}, "
                             f"this Twinline writes v{self.schema.version}: migrate it or use another --store")
        return data

    def _write_manifest(self, tables: dict[str, int], last_run: str | None, key: str | None = None) -> None:
        self.meta.mkdir(parents=True, exist_ok=True)
        doc = {"format": MANIFEST_FORMAT, "schema_version": self.schema.version,
               "tables": dict(sorted(tables.items())), "last_run_id": last_run,
               "updated_at": utc_now().isoformat()}
        old = self.manifest()  # the defaults when there is none yet
        key = key or old.get("key_fingerprint")
        if key:
            doc["key_fingerprint"] = key
        privacy = {**old.get("privacy", {}), **self._privacy_claims}
        if privacy:
            doc["privacy"] = dict(sorted(privacy.items()))
        linking = self._linking or old.get("linking")
        if linking:
            doc["linking"] = linking
        # dates shifted per person (twin), not per source record as before: the two do not mix
        offsets = old.get("date_offsets") if "deid:shift" in old.get("privacy", {}).values() else "twin"
        if "deid:shift" in privacy.values() and offsets:
            doc["date_offsets"] = offsets
        tmp = self.meta / f"manifest.json.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.manifest_path)
        fsync_dir(self.meta)

    def committed_version(self, table: str) -> int | None:
        v = self.manifest()["tables"].get(table)
        return None if v is None else int(v)

    # ------------------------------------------------------------------ reading

    def table_path(self, table: str) -> Path:
        self.schema.table(table)  # unknown names are an error, not a new folder
        return self.root / table

    def exists(self, table: str) -> bool:
        return self.committed_version(table) is not None

    def delta(self, table: str, *, latest: bool = False) -> DeltaTable | None:
        """The Delta table at its committed version (or the latest, inside a run)."""
        path = self.table_path(table)
        if latest:
            return DeltaTable(str(path)) if DeltaTable.is_deltatable(str(path)) else None
        v = self.committed_version(table)
        if v is None:
            return None
        return DeltaTable(str(path), version=v)

    def dataset(self, table: str, *, latest: bool = False) -> pads.Dataset:
        dt = self.delta(table, latest=latest)
        if dt is None:
            return pads.dataset(self.schema.table(table).arrow_schema.empty_table())
        return dt.to_pyarrow_dataset(as_large_types=True)

    def read(self, table: str, columns: Sequence[str] | None = None, filter: pc.Expression | None = None,
             *, latest: bool = False) -> pa.Table:
        """Rows of a table, typed as the schema says.

        The filter is applied after reading, not pushed into the scan: delta-rs writes
        string_view columns in the files it rewrites (MERGE), and pyarrow's statistics
        pruning fails on those (string vs string_view kernels). Reading the projected
        columns and filtering in memory is correct for every file.
        """
        cols = list(columns) if columns else None
        ds = self.dataset(table, latest=latest)
        if filter is not None and cols is not None:
            extra = [f for f in _fields(filter) if f not in cols]
            t = ds.to_table(columns=cols + extra)
        else:
            t = ds.to_table(columns=cols)
        target = self.schema.table(table).arrow_schema
        t = t.cast(pa.schema([target.field(n).with_nullable(True) for n in t.column_names]))
        if filter is not None:
            t = t.filter(filter)
            if cols is not None:
                t = t.select(cols)
        return t

    def count(self, table: str) -> int:
        return self.dataset(table).count_rows()

    def size_bytes(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(dirpath, f))
        return total

    # ------------------------------------------------------------------ lock and recovery

    @contextlib.contextmanager
    def locked(self, command: str) -> Iterator[None]:
        """Hold the store's write lock for the duration of a run.

        flock is released by the kernel when the process dies, so a lock left by a
        killed run is never stale: the next process simply gets it (the holder line in
        the file is only informational). On network file systems without flock, run one
        writer per store.
        """
        self.meta.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.meta)
        if key in _HELD:  # this process already holds it (a job running import, check and build)
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        fd = os.open(self.meta / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise LockHeld(f"the store {self.root} is being written by {holder}; "
                           "try again when that run ends") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command}, since {utc_now():%Y-%m-%dT%H:%M:%SZ})\n"
                 .encode())
        _HELD[key] = 1
        try:
            self.recover()
            yield
        finally:
            del _HELD[key]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def recover(self) -> list[str]:
        """Roll back what a killed run left behind: tables newer than the manifest."""
        # what a run claimed is recorded at its commit: a run rolled back claims nothing (its
        # source's privacy profile, the rules its identity table was linked under)
        self._privacy_claims, self._linking = {}, None
        manifest = self.manifest()
        committed: dict[str, int] = {k: int(v) for k, v in manifest["tables"].items()}
        rolled = []
        for name in self.schema.tables:
            path = self.root / name
            if not path.exists():
                continue
            if name not in committed:
                shutil.rmtree(path)  # created by a run that never committed
                rolled.append(name)
                continue
            latest = _latest_version(path)
            if latest is not None and latest <= committed[name]:
                continue  # untouched since the commit: no need to open it
            dt = DeltaTable(str(path))
            if dt.version() > committed[name]:
                dt.restore(committed[name])
                committed[name] = DeltaTable(str(path)).version()
                rolled.append(name)
        if rolled:
            self._write_manifest(committed, manifest.get("last_run_id"))
        shutil.rmtree(self.meta / "tmp", ignore_errors=True)
        return rolled

    def commit(self, run_id: str) -> None:
        """Make every table's latest version the committed one: the run's commit point."""
        if os.path.realpath(self.meta) not in _HELD:
            raise StoreError("commit outside a locked run")
        key = self._check_key()
        committed = self.manifest()["tables"]
        tables = {}
        for name in self.schema.tables:
            latest = _latest_version(self.root / name)
            if latest is None:
                continue
            if latest != committed.get(name):  # this run wrote it
                dt = DeltaTable(str(self.root / name))
                self._upkeep(name, dt)
                latest = dt.version()
            tables[name] = latest
        self._write_manifest(tables, run_id, key)

    @staticmethod
    def _upkeep(name: str, dt: DeltaTable) -> None:
        """Checkpoint interval and tiny files of a table the run wrote. Best effort: the
        run's rows are written either way, and a failure here must not roll them back."""
        try:
            checkpoint_often(dt)
            compact_small_files(dt, _COMPACT_AT)
        except Exception as e:  # a delta-rs error on an odd table: the next run tries again
            # the type only: a message may quote a value, and logs carry locators, never data
            log.warning("table %s: small files left as they are (%s)", name, type(e).__name__)

    def _check_key(self) -> str | None:
        """The fingerprint of the key this run hashed with, if it hashed; refused if the store was built with another.

        Twin ids and pseudonyms are keyed hashes: under another key (a TWIN_KEY set after a
        demo run without one, a rotated key file) every person would silently become a new
        twin, split from their history. The run's writes are rolled back by the caller.
        """
        from .keys import key_in_use

        return self.check_key() if key_in_use() else None

    def check_key(self) -> str:
        """The fingerprint of the key in force; ConfigError if the store was built with another
        (before a run: a listener checks before it acknowledges what its drains could not store)."""
        from .keys import key_fingerprint

        mine = key_fingerprint()
        stored = self.manifest().get("key_fingerprint")
        if stored and stored != mine:
            raise ConfigError(f"this store's twin ids were made with another key (fingerprint {stored}; "
                              f"TWIN_KEY / TWIN_KEY_FILE now give {mine}): under it every person would become a new "
                              "twin. Set the store's key, or use a new --store; nothing was written")
        return mine

    def claim_privacy(self, source: str, profile: str) -> None:
        """Refuse to write a source under another privacy profile than the one it was written under.

        `profile`: "none", "pseudonymise" or "deid:<dates>". A source imported once with
        --deid and once without (a job or cron line that lost its flag) would otherwise put
        the identified copy of every record beside the de-identified one, silently: the
        identifiers do not link to their pseudonyms, so each person also becomes two twins.
        Recorded in the manifest at the commit point; stores and sources from before the
        record adopt the profile of their next run. Checked before the run writes anything.
        """
        manifest = self.manifest()
        stored = manifest.get("privacy", {}).get(source)
        if profile == "deid:shift" and "deid:shift" in manifest.get("privacy", {}).values() \
                and manifest.get("date_offsets") != "twin":
            raise ConfigError("this store holds dates shifted per source record, by an earlier Twinline; dates are "
                              "now shifted per person (twin) so that one person's sources agree, and the two "
                              "cannot be mixed: import into a new --store")
        if stored is not None and stored != profile:
            raise ConfigError(f"source {source!r} of this store was written under the privacy profile {stored}; "
                              f"this run would write it under {profile}, beside it, and every person would become "
                              "a second twin. Use the same profile, another --source name, or a new --store")
        self._privacy_claims[source] = profile

    def note_linking(self, fingerprint: str) -> None:
        """Record, at the commit point, the rules the identity table was linked under: a later
        run links only the records it touched while they stay the same (identity.relink)."""
        self._linking = fingerprint

    def privacy_profiles(self) -> dict[str, str]:
        """source -> privacy profile, as committed and as claimed by the current run."""
        return {**self.manifest().get("privacy", {}), **self._privacy_claims}

    def rollback(self) -> list[str]:
        return self.recover()

    def tmp_dir(self) -> Path:
        """Scratch space of the current run (spilled units); removed on recovery."""
        d = self.meta / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ------------------------------------------------------------------ writing

    def _check(self, table: Table, data: pa.Table, *, keep_dictionaries: bool = False) -> pa.Table:
        """The rows with the table's columns, in its order and types. `keep_dictionaries`:
        a dictionary-typed column of the right value type stays one (the fast append
        writes it as it is; Delta sees the value type)."""
        missing = [c for c in table.arrow_schema.names if c not in data.column_names]
        if missing:
            raise StoreError(f"{table.name}: rows lack columns {missing}")
        data = data.select(table.arrow_schema.names)
        for col in table.columns:
            if col.required and data.column(col.name).null_count:
                raise StoreError(f"{table.name}: required column {col.name} has "
                                 f"{data.column(col.name).null_count} null values")
        target = table.arrow_schema
        if keep_dictionaries:
            target = pa.schema([pa.field(f.name, t, f.nullable) if pa.types.is_dictionary(t := data.schema.field(f.name).type)
                                and t.value_type == f.type else f for f in target])
        return data.cast(target)

    def append(self, table_name: str, data: pa.Table) -> None:
        """Append rows (bookkeeping tables, new units) in one commit."""
        if data.num_rows == 0:
            return
        table = self.schema.table(table_name)
        data = self._check(table, data, keep_dictionaries=True)
        self._append(table_name, data)

    def _append(self, table_name: str, data: pa.Table) -> None:
        """Append rows as one new Parquet file: pyarrow writes it, delta-rs commits it.

        write_deltalake re-encodes every value: it hashes each string for its dictionary,
        even three million copies of one code, and computes statistics on every column.
        pyarrow writes dictionary-typed columns as they are (the device mapper makes its
        constant and low-cardinality columns so) and we ask for statistics only where a
        reader uses them: the Delta skipping columns and the non-string ones (time ranges).
        2.5x faster on device rows (bench/RESULTS.md). The file is invisible until the
        commit adds it, and a run that dies before its commit point is rolled back as
        before. Tables with nested columns (the assembled twin) keep write_deltalake.
        """
        table = self.schema.table(table_name)
        if any(pa.types.is_nested(f.type) for f in table.arrow_schema):
            self._write(table_name, data.cast(table.arrow_schema), "append")
            return
        path = self.table_path(table_name)
        dt = self.delta(table_name, latest=True)
        if dt is None:
            path.mkdir(parents=True, exist_ok=True)
            dt = DeltaTable.create(str(path), table.arrow_schema, configuration=self._table_config(table))
        name = f"part-00000-{uuid.uuid4()}-c000.zstd.parquet"
        stats_columns = [c for c in _STATS_COLUMNS if c in table.by_name]
        parquet_stats = stats_columns + [f.name for f in table.arrow_schema if not pa.types.is_string(f.type)]
        stats = _delta_stats(data, stats_columns)
        # no dictionary for the record ids (unique: the writer would hash them all, then give up);
        # no compression for dictionary columns: their pages are a few bytes of runs, and zstd
        # costs a context per page
        dictionary = [c for c in table.arrow_schema.names if not (c in table.key and c.endswith("_id"))]
        # A column null in every row is left out of the file: Delta readers read a column a
        # file lacks as null (how ADD COLUMN works without rewriting), and device rows have
        # a dozen such columns (comparators, reference ranges, windows) in every chunk.
        empty = [c for c in data.column_names if data.column(c).null_count == data.num_rows]
        if empty and len(empty) < data.num_columns:
            data = data.drop_columns(empty)
        compression = {f.name: "none" if pa.types.is_dictionary(f.type) else "zstd" for f in data.schema}
        # times and positions as deltas: samples a second apart become a few bits each (half
        # the file of a device chunk, and less for zstd to do)
        deltas = {f.name: "DELTA_BINARY_PACKED" for f in data.schema
                  if pa.types.is_timestamp(f.type) or pa.types.is_integer(f.type)}
        pq.write_table(data, path / name, compression=compression, row_group_size=_ROW_GROUP, store_schema=False,
                       write_statistics=[c for c in parquet_stats if c in data.column_names],
                       use_dictionary=[c for c in dictionary if c in data.column_names and c not in deltas],
                       column_encoding=deltas or None)
        st = (path / name).stat()
        add = AddAction(name, st.st_size, {}, int(st.st_mtime * 1000), True, stats)
        dt.create_write_transaction([add], mode="append", schema=table.arrow_schema)

    @staticmethod
    def _table_config(table: Table) -> dict[str, str]:
        """A checkpoint every 10 commits (_CHECKPOINT_EVERY). Delta keeps min/max statistics
        for the first 32 columns only; the provenance columns come last. Naming them makes
        `stored_units` read only the files whose unit_key range can hold the units asked
        for, instead of the whole table."""
        config = {_CHECKPOINT_KEY: _CHECKPOINT_EVERY}
        if table.provenance:
            config["delta.dataSkippingStatsColumns"] = ",".join(_STATS_COLUMNS)
        return config

    def _write(self, table_name: str, data: pa.Table, mode: str) -> None:
        """write_deltalake, creating the table with statistics on the columns upserts look up."""
        path = str(self.table_path(table_name))
        config = None if DeltaTable.is_deltatable(path) else self._table_config(self.schema.table(table_name))
        write_deltalake(path, data, mode=mode, writer_properties=_WRITER, configuration=config)

    def replace(self, table_name: str, data: pa.Table) -> None:
        """Replace the whole content of a small bookkeeping table in one commit."""
        table = self.schema.table(table_name)
        data = self._check(table, data)
        self._write(table_name, data, "overwrite")

    def merge_by_key(self, table_name: str, data: pa.Table, *, update: bool = True,
                     unless_same: Sequence[str] = ()) -> None:
        """Insert rows whose key is new; update (or, with update=False, keep) the others.

        `unless_same`: a row whose stored row (same key) has the same values in these
        columns is left out: updating it would rewrite every file that holds one, for no
        change. When none of the rows left has a stored key, they are appended rather than
        merged: a MERGE reads every file of the table, and rewrites those it matches in.
        (The resource identifiers of a drain: mostly new, the rest the same; 149 ms of a
        1 s drain into a store of 77,000 patients became 43 ms.)
        """
        if data.num_rows == 0:
            return
        table = self.schema.table(table_name)
        data = self._check(table, data)
        dt = self.delta(table_name, latest=True)
        if dt is None:
            self._append(table_name, data)
            return
        if unless_same:
            key = list(table.key)
            stored = self._stored_keys(dt, table_name, data, key + list(unless_same))
            data = data.join(stored, keys=key + list(unless_same), join_type="left anti")
            if data.num_rows == 0:
                return
            if data.join(stored.select(key), keys=key, join_type="left semi").num_rows == 0:
                self._append(table_name, data)
                return
        pred = " AND ".join(f"t.{k} = s.{k}" for k in table.key)
        m = dt.merge(data, pred, source_alias="s", target_alias="t", writer_properties=_WRITER)
        if update:
            m = m.when_matched_update_all()
        m.when_not_matched_insert_all().execute()

    def _stored_keys(self, dt: DeltaTable, table_name: str, data: pa.Table, columns: list[str]) -> pa.Table:
        """`columns` of the stored rows whose key columns each hold a value `data` has there
        (a superset of the rows with one of its keys), typed as in `data`. Scanned in
        batches: memory holds the matches, not the table."""
        key = self.schema.table(table_name).key
        sets = {k: data.column(k).combine_chunks().cast(pa.large_string()) if pa.types.is_string(data.schema.field(k).type)
                else data.column(k).combine_chunks() for k in key}
        target = pa.schema([data.schema.field(c) for c in columns])

        def mask(batch: pa.RecordBatch) -> pa.Array:
            hits = [pc.is_in(batch.column(columns.index(k)), value_set=sets[k]) for k in key]
            return functools.reduce(pc.and_, hits)

        parts = _matching(dt.to_pyarrow_dataset(as_large_types=True).to_batches(columns=columns, batch_size=1 << 17),
                          mask)
        return pa.Table.from_batches(parts).cast(target) if parts else target.empty_table()

    def stored_units(self, table_name: str, source: str, unit_keys: Sequence[str]) -> dict[str, tuple[str | None, str, int]]:
        """For the given units of one source: unit_key -> (version, content_hash, row count).

        The table is scanned in batches, keeping only matching rows, so memory stays
        bounded by the batch and the matches whatever the size of the table.
        """
        if not unit_keys:
            return {}
        dt = self.delta(table_name, latest=True)
        if dt is None:
            return {}
        wanted = pa.array(list(unit_keys), pa.large_string())
        cols = ["source", "unit_key", "unit_version", "content_hash", "row_index"]
        parts = _matching(self._candidate_files(dt, table_name, cols, sorted(unit_keys)).to_batches(batch_size=1 << 17),
                          lambda b: pc.and_(pc.equal(b.column(0), source), pc.is_in(b.column(1), value_set=wanted)))
        if not parts:
            return {}
        found = pa.Table.from_batches(parts)
        agg = found.group_by("unit_key").aggregate(
            [("unit_version", "max"), ("content_hash", "max"), ("row_index", "max")])
        return {k: (v, h, n + 1) for k, v, h, n in zip(
            agg.column("unit_key").to_pylist(), agg.column("unit_version_max").to_pylist(),
            agg.column("content_hash_max").to_pylist(), agg.column("row_index_max").to_pylist(), strict=True)}

    def _candidate_files(self, dt: DeltaTable, table_name: str, columns: list[str], keys: list[str]) -> pads.Dataset:
        """The table's files whose unit_key statistics can hold one of `keys` (sorted), as a dataset.

        Files without statistics are always candidates. Strings are read as large_string:
        files delta-rs rewrote hold string_view, and an explicit schema casts both alike.
        """
        acts = pa.table(dt.get_add_actions(flatten=True))
        paths = acts.column("path").to_pylist()
        if "min.unit_key" in acts.column_names and keys:
            lo, hi = acts.column("min.unit_key").to_pylist(), acts.column("max.unit_key").to_pylist()
            chosen = []
            for p, a, b in zip(paths, lo, hi, strict=True):
                if a is None or b is None:
                    chosen.append(p)
                    continue
                i = bisect.bisect_left(keys, a)
                if i < len(keys) and keys[i] <= b:
                    chosen.append(p)
            paths = chosen
        base = self.table_path(table_name)
        full = self.schema.table(table_name).arrow_schema
        schema = pa.schema([pa.field(c, pa.large_string() if full.field(c).type == pa.string() else full.field(c).type)
                            for c in columns])
        return pads.dataset([str(base / unquote(p)) for p in paths], schema=schema, format="parquet")

    def upsert_units(self, table_name: str, source: str, rows: pa.Table,
                     units: dict[str, tuple[str | None, str, int]], keep_stored: Collection[str] = ()) -> UpsertStats:
        """Store the rows of `units` (unit_key -> (version, content hash, row count)) of one source.

        `rows` holds every row of those units, with all columns of the table. Units
        with zero rows are allowed: if stored before, their rows are deleted (the
        source still has the unit, but it no longer maps to this table). Units in
        `keep_stored` are written only when none is stored yet (Resource.create_only).
        """
        table = self.schema.table(table_name)
        stats = UpsertStats()
        stored = self.stored_units(table_name, source, list(units))
        write: list[str] = []
        tomb_keys: list[str] = []
        tomb_index: list[int] = []
        replacing = False
        for key, (version, digest, n) in units.items():
            old = stored.get(key)
            if old is None:
                outcome = "new" if n else "unchanged"
            elif old[1] == digest or key in keep_stored:
                outcome = "unchanged"
            elif version_newer(version, old[0]) is False:
                outcome = "older"
            else:
                outcome = "changed"
            stats.outcome[key] = outcome
            if outcome == "new":
                stats.new += 1
                write.append(key)
            elif outcome == "changed":
                stats.changed += 1
                replacing = True
                write.append(key)
                for i in range(n, old[2]):
                    tomb_keys.append(key)
                    tomb_index.append(i)
            elif outcome == "older":
                stats.older += 1
            else:
                stats.unchanged += 1
        if not write:
            return stats
        if len(write) == len(units):
            data = rows
        else:
            keys = rows.column("unit_key")
            keys = keys.cast(keys.type.value_type) if pa.types.is_dictionary(keys.type) else keys
            data = rows.filter(pc.is_in(keys, value_set=pa.array(write, keys.type)))
        data = self._check(table, data, keep_dictionaries=True)
        stats.rows_written = data.num_rows
        stats.rows_deleted = len(tomb_keys)
        dt = self.delta(table_name, latest=True)
        if not replacing or dt is None:
            self._append(table_name, data)
            return stats
        data = data.cast(table.arrow_schema)  # MERGE takes the table's own types
        ops = pa.array(["upsert"] * data.num_rows + ["delete"] * len(tomb_keys))
        if tomb_keys:
            tomb = {c: pa.nulls(len(tomb_keys), data.schema.field(c).type) for c in data.column_names}
            tomb["source"] = pa.array([source] * len(tomb_keys), pa.string())
            tomb["unit_key"] = pa.array(tomb_keys, pa.string())
            tomb["row_index"] = pa.array(tomb_index, pa.int32())
            nullable = pa.schema([f.with_nullable(True) for f in data.schema])
            tomb_table = pa.Table.from_pydict(tomb, schema=nullable)
            src = pa.concat_tables([data.cast(nullable), tomb_table])
        else:
            src = data
        src = src.append_column("_op", ops)
        (dt.merge(src, "t.source = s.source AND t.unit_key = s.unit_key AND t.row_index = s.row_index",
                  source_alias="s", target_alias="t", writer_properties=_WRITER)
           .when_matched_delete(predicate="s._op = 'delete'")
           .when_matched_update_all(predicate="s._op = 'upsert'", except_cols=["_op"])
           .when_not_matched_insert_all(predicate="s._op = 'upsert'", except_cols=["_op"])
           .execute())
        return stats

    def delete_units(self, table_name: str, source: str, unit_keys: Sequence[str]) -> int:
        """Delete every row of these units of one source (deletions, merges). Returns units deleted."""
        stored = self.stored_units(table_name, source, unit_keys)
        if not stored:
            return 0
        dt = self.delta(table_name, latest=True)
        assert dt is not None
        src = pa.table({"source": pa.array([source] * len(stored), pa.string()),
                        "unit_key": pa.array(list(stored), pa.string())})
        (dt.merge(src, "t.source = s.source AND t.unit_key = s.unit_key", source_alias="s", target_alias="t",
                  writer_properties=_WRITER)
           .when_matched_delete().execute())
        return len(stored)

    def update_columns(self, table_name: str, key_columns: Sequence[str], data: pa.Table, columns: Sequence[str]) -> None:
        """Set `columns` on the rows matching `data` by `key_columns` (identity relinking,
        date offsets moving with it)."""
        dt = self.delta(table_name, latest=True)
        if dt is None or data.num_rows == 0:
            return
        pred = " AND ".join(f"t.{k} = s.{k}" for k in key_columns)
        changed = " OR ".join(f"(t.{c} IS DISTINCT FROM s.{c})" for c in columns)
        (dt.merge(data, pred, source_alias="s", target_alias="t", writer_properties=_WRITER)
           .when_matched_update(updates={c: f"s.{c}" for c in columns}, predicate=changed)
           .execute())

    def rows_of_records(self, table_name: str, columns: Sequence[str], source: str, patient_ids: pa.Array) -> pa.Table:
        """The rows of some patients of one source (latest version), typed as the schema
        says; scanned in batches, so memory holds the matches, not the table."""
        if self.delta(table_name, latest=True) is None:
            return self.schema.table(table_name).arrow_schema.empty_table().select(list(columns))
        wanted = patient_ids.cast(pa.large_string())
        parts = _matching(self.dataset(table_name, latest=True).to_batches(columns=list(columns), batch_size=1 << 17),
                          lambda b: pc.and_(pc.equal(b.column("source"), source),
                                            pc.is_in(b.column("patient_id"), value_set=wanted)))
        target = self.schema.table(table_name).arrow_schema
        schema = pa.schema([target.field(c).with_nullable(True) for c in columns])
        if not parts:
            return schema.empty_table()
        return pa.Table.from_batches(parts).cast(schema)


def _matching(batches: Iterable[pa.RecordBatch], mask: Callable[[pa.RecordBatch], pa.Array]) -> list[pa.RecordBatch]:
    """The rows `mask` selects in each batch of a scan (a null in the mask selects nothing),
    batches left with none dropped: memory holds the matches, not the table."""
    out = []
    for batch in batches:
        hit = batch.filter(mask(batch))
        if hit.num_rows:
            out.append(hit)
    return out


# a commit, or a checkpoint (log cleanup may leave a checkpoint without its commit file)
_COMMIT_FILE = re.compile(r"(\d{20})\.(?:json|checkpoint(?:\.\d+\.\d+)?\.parquet)\Z")


def _latest_version(path: Path) -> int | None:
    """A table's latest version from the names in its log (None: no table there). Opening
    the table replays its log; the commit point and recovery ask this of every table at
    every run, and most are untouched."""
    try:
        names = os.listdir(path / "_delta_log")
    except (FileNotFoundError, NotADirectoryError):
        return None
    versions = [int(m[1]) for n in names if (m := _COMMIT_FILE.match(n))]
    return max(versions) if versions else None


def checkpoint_often(dt: DeltaTable) -> None:
    """Give a table made by an earlier Twinline the checkpoint interval of new ones."""
    if dt.metadata().configuration.get(_CHECKPOINT_KEY) != _CHECKPOINT_EVERY:
        dt.alter.set_table_properties({_CHECKPOINT_KEY: _CHECKPOINT_EVERY})


def compact_small_files(dt: DeltaTable, at: int, under: int = _TINY_FILE) -> int:
    """Merge the table's files under COMPACT_SIZE into files of about that size (one commit,
    the same rows) when `at` or more of them are under `under` bytes. Returns the number of
    files merged."""
    sizes = pa.table(dt.get_add_actions(flatten=True)).column("size_bytes")
    if (pc.sum(pc.less(sizes, under)).as_py() or 0) < max(at, 2):
        return 0
    return dt.optimize.compact(target_size=COMPACT_SIZE, writer_properties=_WRITER)["numFilesRemoved"]


def _fields(expr: pc.Expression) -> list[str]:
    """Column names an expression refers to (pyarrow has no public accessor for them).

    In the expression's text, option blocks `{...}` and quoted strings hold no field
    names; what remains are function names (followed by '('), keywords and fields.
    """
    text = re.sub(r"\{[^{}]*\}", " ", str(expr))
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)
    names = re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\b(?!\s*\()", text)
    return list(dict.fromkeys(n for n in names if n not in ("and", "or", "not", "true", "false", "null")))


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a file created, renamed or removed) survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
