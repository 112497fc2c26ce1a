"""The driver's half of a distributed import: staged partitions -> the store, in input order.

Why the driver writes: the store's upsert (compare each unit with the stored one, skip
the unchanged, never let an older version replace a newer one, tombstone rows a
shorter version no longer has) is one MERGE per table; one writer means no concurrent
Delta commits to reconcile, and the store's lock, manifest commit point and recovery
apply unchanged. What the driver does per row is Arrow-level only (concatenate,
filter, upsert): the per-unit Python work (parsing, views, conversion, hashing) is done
by the tasks. Memory stays bounded by one flush plus one staged partition.

The outcomes are replayed in input order with the single process's own rules, so a
Spark import leaves the same tables and the same tallies: a unit seen twice keeps the
copy `Ingest` would keep (the newer version; the later one when versions do not
tell), deletions cancel earlier copies, quarantine entries are the same. Bookkeeping
that needs no per-row work (quarantine, deletions, identifier index, columnar `Rows`
units, the note on unresolved references) goes through a real `Ingest`.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..ingest import Ingest, _digest, release_memory
from ..store import version_newer
from ..units import Deletion, Rejected, Rows
from .tasks import UNITS, read_staged

_EMPTY = _digest([])


def _uid(part: int, seq: Any) -> Any:
    """One int64 per unit occurrence: its partition and its position there (input order)."""
    return (part << 32) + seq


class Collector:
    """Feeds the staged output of mapping tasks into the store through one `Ingest`."""

    def __init__(self, ingest: Ingest):
        self.ingest = ingest
        self.store = ingest.store
        self.counts = ingest.counts
        self.flush_rows = ingest.flush_rows
        self.covered = ingest.views.types_of_table  # table -> the resource types its views read
        # key -> (uid, version, rtype, rows, create_only)
        self.pending: dict[str, tuple[int, str | None, str, int, bool]] = {}
        self.pending_rows = 0
        self.buffers: dict[str, list[pa.Table]] = defaultdict(list)
        self.unresolved: dict[str, int] = {}
        self.units_by_path: dict[str, int] = defaultdict(int)

    def add(self, result: dict[str, Any], pieces: list[str]) -> None:
        """One mapping task's result; `pieces` are the paths of its part's pieces (ledger tallies)."""
        part = result["part"]
        staged = result["staged"]
        for name, path in staged.items():
            if not name.startswith("_"):
                t = read_staged(path)
                uid = pc.add(pa.scalar(part << 32, pa.int64()), t.column("_seq"))
                self.buffers[name].append(t.drop_columns(["_seq"]).append_column("_uid", uid))
        units = read_staged(staged[UNITS])
        rows_units = {r["seq"]: r for r in result["rows_units"]}
        for u in units.to_pylist():
            kind = u["kind"]
            self.units_by_path[pieces[u["piece"]]] += 1 if kind != "rows" else 0
            if kind == "resource":
                self._resource(u, part)
            elif kind == "ignored":
                self.counts.read += 1
                self.counts.ignored += 1
                self.counts.ignored_types[u["rtype"]] = self.counts.ignored_types.get(u["rtype"], 0) + 1
            elif kind == "rejected":
                self.ingest.feed(Rejected(u["stage"], u["reason"], u["message"], u["source_ref"], u["payload"],
                                          u["payload_ref"], u["target_table"]))
            elif kind == "deletion":
                old = self.pending.pop(u["key"], None)
                if old is not None:  # a copy the deletion supersedes: read, not written
                    self.pending_rows -= old[3]
                    self.counts.unchanged += 1
                rtype, _, rid = u["key"].partition("/")
                self.ingest.feed(Deletion(rtype, rid, u["source_ref"]))
            elif kind == "rows":
                meta = rows_units[u["seq"]]
                data = read_staged(staged[f"_rows{u['seq']}"])
                before = self.counts.read
                self.ingest.feed(Rows(meta["table"], data, u["source_ref"], meta["units"], meta["content_hash"]))
                self.units_by_path[pieces[u["piece"]]] += self.counts.read - before
        for k, v in result["unresolved"].items():
            self.unresolved[k] = self.unresolved.get(k, 0) + v
        for path in staged.values():
            _remove(path)
        if self.pending_rows >= self.flush_rows:
            self.flush()

    def _resource(self, u: dict[str, Any], part: int) -> None:
        self.counts.read += 1
        key = u["key"]
        if self.ingest._deletions.pop(key, None) is not None:
            self.counts.unchanged += 1  # a deletion read earlier in this batch, superseded by this copy (as Ingest)
        old = self.pending.get(key)
        create_only = bool(u["create_only"])
        if old is not None:
            self.counts.unchanged += 1  # one of two copies of a unit in one batch is not written
            if version_newer(u["version"], old[1]) is False or (create_only and not old[4]):
                return
            self.pending_rows -= old[3]
        self.pending[key] = (_uid(part, u["seq"]), u["version"], u["rtype"], u["rows"], create_only)
        self.pending_rows += u["rows"]

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        buffers, self.buffers = self.buffers, defaultdict(list)
        self.pending_rows = 0
        run = self.ingest.run
        source = self.ingest.source
        touched = dict.fromkeys(pending, False)
        for table_name, covered in self.covered.items():
            mine = {k: v for k, v in pending.items() if v[2] in covered}
            if not mine:
                continue
            parts = buffers.pop(table_name, [])
            schema = self.store.schema.table(table_name).arrow_schema
            data = pa.concat_tables(parts) if parts else schema.empty_table().append_column(
                "_uid", pa.array([], pa.int64()))
            data = data.filter(pc.is_in(data.column("_uid"), pa.array([v[0] for v in mine.values()], pa.int64())))
            data = data.drop_columns(["_uid"])
            found: dict[str, tuple[str, int]] = {}
            if data.num_rows:
                g = data.group_by("unit_key", use_threads=False).aggregate([("content_hash", "first"),
                                                                            ("unit_key", "count")])
                found = dict(zip(g.column("unit_key").to_pylist(),
                                 zip(g.column("content_hash_first").to_pylist(), g.column("unit_key_count").to_pylist(),
                                     strict=True), strict=True))
            units = {k: (v[1], *found.get(k, (_EMPTY, 0))) for k, v in mine.items()}
            stats = self.store.upsert_units(table_name, source, data, units,
                                            keep_stored={k for k, v in mine.items() if v[4]})
            for k, outcome in stats.outcome.items():
                if outcome in ("new", "changed"):
                    touched[k] = True
            run.rows[table_name]["written"] += stats.rows_written
            run.rows[table_name]["deleted"] += stats.rows_deleted
        for wrote in touched.values():
            if wrote:
                self.counts.written += 1
            else:
                self.counts.unchanged += 1
        self.ingest.flush()  # deletions, quarantine, identifiers: the single process's own code
        release_memory()

    def finish(self, identifiers: dict[tuple[str, str, str], str]) -> None:
        """Flush what is left, store the identifier index, note unresolved references."""
        self.flush()
        self.ingest._identifiers = identifiers
        self.ingest.resolver.unresolved = self.unresolved
        self.ingest.finish()


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
