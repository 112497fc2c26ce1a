"""What a task does with one partition: plain functions of the partition and a context.

Nothing here imports Spark: the Spark engine calls these inside `mapInArrow`, and the
tests call them directly. Two passes run over the input:

1. `scan_part` finds the identifiers of directory resources (Practitioner, Organization,
   ...) and counts lines, so that the driver can give every task the whole identifier
   index (conditional references such as `Practitioner?identifier=s|v` point into other
   files) and every byte range its first line number.
2. `map_part` maps every unit with the same `ResourceMapper` as the single process,
   turns the rows into Arrow in each table's schema with the same provenance columns,
   and stages them as Arrow IPC files for the driver, which writes the store
   (pipeline.engines.collect). It returns only small tallies.

Task failures are re-raised without their message: library exceptions can quote the
values they choked on, and Spark logs and ships task errors verbatim.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from ..connectors import FILE_CONNECTORS
from ..connectors.fhir_files import DEFAULT_LIMITS, Limits
from ..fhir import DIRECTORY_TYPES
from ..identity import TwinIds
from ..ingest import Mapped, ResourceMapper, TableBatch, ViewSet, batch_to_arrow
from ..keys import key_fingerprint
from ..references import IdentifierIndex, Resolver, identifiers_of
from ..schema import load_schema
from ..units import Deletion, Rejected, Resource, Rows, Unit
from .parts import Part, Piece, read_range, scan_range

IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")
UNITS = "_units"  # the staged file that lists every unit of a part, in input order
UNIT_SCHEMA = pa.schema([
    ("seq", pa.int64()), ("kind", pa.string()), ("key", pa.string()), ("rtype", pa.string()),
    ("version", pa.string()), ("source_ref", pa.string()), ("rows", pa.int64()), ("piece", pa.int32()),
    ("stage", pa.string()), ("reason", pa.string()), ("message", pa.string()), ("payload", pa.binary()),
    ("payload_ref", pa.string()), ("target_table", pa.string()), ("create_only", pa.bool_()),
])


class TaskFailed(RuntimeError):
    """A task failed outside the per-unit error handling: a bug, or the machine (disk full)."""


def guarded(what: str, fn, *args):
    """Run a task body; an unexpected error leaves with its type and place only (our own TaskFailed whole)."""
    try:
        return fn(*args)
    except TaskFailed:
        raise
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
        raise TaskFailed(f"{what} failed: {type(e).__name__} at {where} (message withheld: it may quote data)") from None


def units_of(piece: Piece, kind: str, options: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Iterable[Unit]:
    """The units of one piece, read the way the single process reads them."""
    if not piece.whole:
        return read_range(piece, limits)
    connector = FILE_CONNECTORS[kind]
    assert connector.read_file is not None
    here = Path(piece.path) if os.path.abspath(piece.path) == piece.abspath else Path(piece.abspath)
    return connector.read_file(here, options)


# --------------------------------------------------------------------------- pass 1


def scan_part(part: Part, kind: str, options: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Identifiers of directory resources (in input order) and per-piece facts for the driver."""
    idents: list[list[Any]] = []
    pieces: list[dict[str, Any]] = []
    for j, piece in enumerate(part.pieces):
        info: dict[str, Any] = {}
        if piece.whole:
            reader = units_of(piece, kind, options, limits)
            found = ((seq, u) for seq, u in enumerate(reader))
        else:
            info, found = scan_range(piece, limits)  # type: ignore[assignment]
        for seq, unit in found:
            if isinstance(unit, Resource) and unit.resource["resourceType"] in DIRECTORY_TYPES:
                res = unit.resource
                for system, value in identifiers_of(res):
                    idents.append([j, seq, res["resourceType"], system, value, res["id"]])
        if piece.whole:
            info["sha256"] = getattr(reader, "sha256", None)
        elif piece.start == 0:
            info["sha256"] = _sha256(piece.abspath)
        pieces.append(info)
    return {"part": part.index, "pieces": pieces, "identifiers": idents}


def _sha256(path: str) -> str | None:
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


# --------------------------------------------------------------------------- pass 2


@dataclass
class ImportContext:
    """Everything a mapping task needs besides its partition (broadcast once per run)."""

    kind: str
    source: str
    source_kind: str
    run_id: str
    now: datetime
    stage_dir: str
    identifiers: list[tuple[str, str, str, str]]         # this run's, in input order: type, system, value, id
    stored_identifiers: list[tuple[str, str, str, str]]  # earlier runs' (resource_identifier)
    links: dict[str, str]                                 # record key -> twin id, for linked records
    key_check: str
    options: dict[str, Any] = field(default_factory=dict)
    limits: Limits = DEFAULT_LIMITS


_CACHE: dict[str, Any] = {}


def _mapper(ctx: ImportContext) -> tuple[ResourceMapper, ViewSet, TwinIds]:
    """One mapper per worker process and run: views compile once, the index is built once."""
    hit = _CACHE.get("mapper")
    if hit is not None and hit[0] == ctx.run_id:
        return hit[1]
    if key_fingerprint() != ctx.key_check:
        raise TaskFailed("this worker's TWIN_KEY differs from the driver's: twin ids would not match. "
                         "Give every node the same key (TWIN_KEY or TWIN_KEY_FILE)")
    views = ViewSet(load_schema())
    stored = ctx.stored_identifiers
    index = IdentifierIndex(lambda: stored)
    for rtype, system, value, rid in ctx.identifiers:
        index.add(rtype, system, value, rid)
    resolver = Resolver(index)
    resolver.final = True  # the index is complete: a reference it cannot resolve never will be
    made = (ResourceMapper(views, resolver), views,
            TwinIds(ctx.links))
    _CACHE["mapper"] = (ctx.run_id, made)
    return made


class _TableRows:
    """Rows of one table, gathered per unit as Ingest.flush gathers them, with the
    sequence number of each row's unit. (It holds a TableBatch rather than extends it:
    TableBatch may be compiled, and a compiled class takes no interpreted subclass.)"""

    __slots__ = ("batch", "seqs")

    def __init__(self, width: int) -> None:
        self.batch = TableBatch(width)
        self.seqs: list[int] = []

    def add(self, m: Mapped, rows: list[list[Any]], seq: int) -> str:
        self.seqs.extend([seq] * len(rows))
        return self.batch.add(m, rows)


def map_part(part: Part, ctx: ImportContext) -> dict[str, Any]:
    """Map every unit of the part; stage per-table Arrow and the unit list; return tallies."""
    mapper, views, twin_ids = _mapper(ctx)
    mapper.resolver.unresolved = {}
    schema = views.schema
    units: dict[str, list[Any]] = {f.name: [] for f in UNIT_SCHEMA}
    tables: dict[str, _TableRows] = {}
    rows_units: list[tuple[int, Rows]] = []
    seq = 0

    def unit_row(kind: str, key=None, rtype=None, version=None, ref=None, rows=0, piece=0, r: Rejected | None = None,
                 create_only: bool = False):
        vals = {"seq": seq, "kind": kind, "key": key, "rtype": rtype, "version": version, "source_ref": ref,
                "rows": rows, "piece": piece, "create_only": create_only}
        if r is not None:
            vals.update(stage=r.stage, reason=r.reason, message=r.message, source_ref=r.source_ref,
                        payload=r.payload, payload_ref=r.payload_ref, target_table=r.target_table)
        for name, col in units.items():
            col.append(vals.get(name))

    for j, piece in enumerate(part.pieces):
        for unit in units_of(piece, ctx.kind, ctx.options, ctx.limits):
            if isinstance(unit, Resource):
                rtype = unit.resource["resourceType"]
                mapped = mapper.map(unit)
                if mapped is None:
                    unit_row("ignored", rtype=rtype, piece=j)
                elif isinstance(mapped, Rejected):
                    unit_row("rejected", rtype=rtype, piece=j, r=mapped)
                else:
                    n = 0
                    for tname, trows in mapped.tables.items():
                        t = tables.get(tname)
                        if t is None:
                            t = tables[tname] = _TableRows(len(schema.table(tname).own_columns))
                        t.add(mapped, trows, seq)
                        n += len(trows)
                    unit_row("resource", mapped.key, rtype, mapped.version, mapped.source_ref, n, j,
                             create_only=mapped.create_only)
            elif isinstance(unit, Rejected):
                unit_row("rejected", piece=j, r=unit)
            elif isinstance(unit, Deletion):
                unit_row("deletion", f"{unit.resource_type}/{unit.resource_id}", unit.resource_type,
                         ref=unit.source_ref, piece=j)
            elif isinstance(unit, Rows):
                unit_row("rows", unit.table, ref=unit.source_ref, rows=unit.data.num_rows, piece=j)
                rows_units.append((seq, unit))
            else:  # pragma: no cover - a connector bug
                raise TypeError(f"not a unit: {type(unit).__name__}")
            seq += 1
    staged = {}
    for tname, t in tables.items():
        table = schema.table(tname)
        data = batch_to_arrow(table, t.batch, ctx.now, ctx.source, ctx.run_id, twin_ids)
        staged[tname] = _stage(ctx, part, tname, data.append_column("_seq", pa.array(t.seqs, pa.int64())))
    for i, r in rows_units:
        staged[f"_rows{i}"] = _stage(ctx, part, f"_rows{i}", r.data)
    staged[UNITS] = _stage(ctx, part, UNITS, pa.table(units, schema=UNIT_SCHEMA))
    result = {"part": part.index, "staged": staged, "units": seq,
              "rows_units": [{"seq": i, "table": r.table, "units": r.units, "content_hash": r.content_hash}
                             for i, r in rows_units],
              "unresolved": dict(mapper.resolver.unresolved)}
    _write_atomic(_done_path(ctx.stage_dir, part.index), orjson.dumps(result))  # last: the part is complete
    return result


def _done_path(stage_dir: str, index: int) -> str:
    return os.path.join(stage_dir, f"part-{index:06d}.done.json")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def wait_staged(stage_dir: str, index: int, job: Future, poll: float = 0.05) -> dict[str, Any]:
    """The result of part `index` once its task has staged it (or the job's error, if it failed)."""
    path = _done_path(stage_dir, index)
    while True:
        try:
            with open(path, "rb") as f:
                result = orjson.loads(f.read())
            os.remove(path)
            return result
        except FileNotFoundError:
            if job.done():
                job.result()  # raises the job's error
                if not os.path.exists(path):
                    raise TaskFailed(f"partition {index} finished without staging its result") from None
            else:
                time.sleep(poll)


def _stage(ctx: ImportContext, part: Part, name: str, data: pa.Table) -> str:
    return _stage_table(ctx.stage_dir, part.index, name, data)


def _stage_table(stage_dir: str, index: int, name: str, data: pa.Table) -> str:
    """Write atomically (tmp + rename): a retried task rewrites the same file whole."""
    path = os.path.join(stage_dir, f"part-{index:06d}.{name}.arrow")
    tmp = f"{path}.{os.getpid()}.tmp"
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, data.schema, options=IPC_OPTIONS) as w:
        w.write_table(data, max_chunksize=1 << 16)
    os.replace(tmp, path)
    return path


def read_staged(path: str) -> pa.Table:
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all()


def iter_parts(batches: Iterator[pa.RecordBatch]) -> Iterator[Part]:
    for batch in batches:
        for text in batch.column(0).to_pylist():
            yield Part.from_json(orjson.loads(text))
