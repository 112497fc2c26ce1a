"""An import run: files -> connector -> ingest -> store, under the store's lock.

This is the library call behind `twin import`; the job runner and the tests call it
too. It owns the run's life: lock, recovery of a killed run, the processed-files
ledger, the run record, and the commit that makes the whole run visible at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from .connectors import FILE_CONNECTORS, FileConnector, kinds_taking
from .errors import ConfigError
from .identity import IdentityConfig, TwinIds, relink, stored_links
from .ingest import Ingest, ViewSet, collect_at_flushes
from .paths import safe_name
from .runs import Run
from .store import Store
from .temporal import utc_now

if TYPE_CHECKING:
    from .privacy import PrivacyHooks

log = logging.getLogger(__name__)



@dataclass
class FileProgress:
    """What a progress display needs: bytes done of bytes total, and the units so far."""

    total_bytes: int
    done_bytes: int = 0
    units: int = 0


def _ledger(store: Store, source: str) -> dict[str, tuple[int, int, str]]:
    t = store.read("ledger", ["path", "size", "mtime_ns", "sha256"], filter=pc.field("source") == source, latest=True)
    return {p: (s, m, h) for p, s, m, h in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True)}


def check_paths(paths: Iterable[str | Path]) -> list[Path]:
    out = [Path(p) for p in paths]
    missing = [str(p) for p in out if not p.exists()]
    if missing:
        raise ConfigError("input not found", [f"{p}: no such file or folder" for p in missing])
    # a FIFO or device named as input could block a read for ever, or never end (/dev/zero)
    odd = [str(p) for p in out if not (p.is_file() or p.is_dir())]
    if odd:
        raise ConfigError("input is not a file", [f"{p}: not a regular file or folder (a device, pipe or socket)"
                                                  for p in odd])
    return out


def connector_for(kind: str, options: dict[str, Any] | None = None) -> FileConnector:
    """The connector of `kind`; a ConfigError if there is none or it does not take one of `options`."""
    try:
        connector = FILE_CONNECTORS[kind]
    except KeyError:
        raise ConfigError(f"unknown source kind {kind!r}: one of {', '.join(sorted(FILE_CONNECTORS))}") from None
    wrong = connector.misplaced(options)
    if wrong:
        raise ConfigError(f"options that do not apply to {kind} imports",
                          [f"{k} (--{k.replace('_', '-')}) is for {kinds_taking(k)} imports" for k in wrong])
    return connector


def run_import(store: Store, kind: str, paths: Iterable[str | Path], *, source: str | None = None,
               options: dict[str, Any] | None = None, reprocess: bool = False, flush_rows: int = 50_000,
               progress: Callable[[FileProgress], None] | None = None, command: str = "import",
               hooks: PrivacyHooks | None = None) -> Run:
    """Import files of one kind as one run; returns the run (its counts say what happened)."""
    connector_for(kind, options)
    paths = check_paths(paths)
    with store.locked(command):
        run = Run(store, command, inputs=[_ledger_path(hooks, p) if hooks else str(p) for p in paths])
        try:
            import_files(store, run, kind, paths, source=source, options=options, reprocess=reprocess,
                         flush_rows=flush_rows, progress=progress, hooks=hooks)
            finish_run(store, run)
        except BaseException:
            store.rollback()
            raise
    return run


@collect_at_flushes()  # linking builds as many small objects as a batch
def finish_run(store: Store, run: Run, identity: IdentityConfig | None = None) -> None:
    """The end of every writing run: link identities, record the run, commit.

    Linking runs inside the lock and before the commit point, so the run becomes
    visible with every row under its final twin id, or not at all.
    """
    if any(v.get("written") or v.get("deleted") or v.get("deleted_units")
           for t, v in run.rows.items() if t in ("patient", "patient_identifier", "patient_link")):
        result = relink(store, run.run_id, identity)
        if result.rules_changed:
            # a job's [identity] config and config/identity.toml, say, used in turns on one store
            run.notes.append("identity: the store was linked under other rules than this run's identity config; "
                             f"all {result.records} records were linked again under this run's")
        if result.changed_records:
            run.notes.append(f"identity: {result.changed_records} record(s) joined another twin "
                             f"({', '.join(f'{k} {v}' for k, v in sorted(result.by_rule.items()))})")
        if result.conflicts:
            run.notes.append(f"identity: {result.conflicts} conflict(s) to review: `twin link-report`")
    run.record()
    store.commit(run.run_id)


@collect_at_flushes()
def import_files(store: Store, run: Run, kind: str, paths: list[Path], *, source: str | None = None,
                 options: dict[str, Any] | None = None, reprocess: bool = False, flush_rows: int = 50_000,
                 progress: Callable[[FileProgress], None] | None = None, hooks: PrivacyHooks | None = None) -> None:
    """Feed files of one kind into `run` (the caller holds the lock and commits)."""
    connector = connector_for(kind, options)
    source = source or kind
    options = {**(options or {}), **(hooks.connector_options if hooks and connector.kind == "dicom" else {})}
    files = list(connector.files(paths))
    if connector.check is not None:
        connector.check(files, options)  # a usage error stops the import before anything is written
    state = FileProgress(total_bytes=sum(_size(f) for f in files))
    ingest = Ingest(store, run, source, connector.kind, ViewSet(store.schema), flush_rows=flush_rows,
                    twin_ids=TwinIds(stored_links(store)), privacy=hooks)
    if connector.read_all is not None:
        _import_whole(store, run, connector, files, source, options, ingest, reprocess)
        return
    assert connector.read_file is not None
    seen = {} if reprocess else _ledger(store, source)
    ledger_rows: list[dict[str, Any]] = []
    skipped = 0
    tallies: list[Any] = []
    for path in files:
        apath = _ledger_path(hooks, path)
        try:
            st = path.stat()
        except OSError:
            st = None
        known = seen.get(apath)
        if st is not None and known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            skipped += 1
            state.done_bytes += st.st_size
            continue
        reader = connector.read_file(path, options)
        before = run.counts[source].read
        for unit in reader:
            ingest.feed(unit)
            if progress and (run.counts[source].read & 0x3FFF) == 0:
                state.units = run.counts[source].read
                progress(state)
        if getattr(reader, "stats", None) is not None:
            tallies.append(reader.stats)
        digest = getattr(reader, "sha256", None)
        if st is not None and digest:
            # units the connector counted (deferred resources are not in the run's count yet)
            n_units = getattr(reader, "units", None)
            ledger_rows.append({"source": source, "path": apath, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                "sha256": digest, "run_id": run.run_id, "processed_at": utc_now(),
                                "units_read": n_units if n_units is not None else run.counts[source].read - before})
        state.done_bytes += st.st_size if st else 0
        state.units = run.counts[source].read
        if progress:
            progress(state)
    ingest.finish()
    note = connector.tally(tallies) if connector.tally and tallies else None
    if note:
        run.notes.append(f"{source}: {note}")
    if skipped:
        run.notes.append(f"{source}: {skipped} file(s) unchanged since they were last imported, skipped "
                         "(--reprocess reads them again)")
    if ledger_rows:
        schema = store.schema.table("ledger").arrow_schema
        store.merge_by_key("ledger", pa.Table.from_pylist(ledger_rows, schema=schema))


def _import_whole(store: Store, run: Run, connector: FileConnector, files: list[Path], source: str,
                  options: dict[str, Any], ingest: Ingest, reprocess: bool) -> None:
    """A connector that needs the whole input at once (DICOM: a study spans files).

    Incremental at the level of the whole input: when every file is in the ledger,
    unchanged (size and modification time), and no file is new, nothing is read;
    otherwise everything is read again (upserts make the known part a no-op).
    """
    seen = {} if reprocess else _ledger(store, source)
    stats = {_ledger_path(ingest.privacy, f): f for f in files if f.exists()}
    stats = {p: f.stat() for p, f in stats.items()}
    if stats and all(p in seen and seen[p][0] == st.st_size and seen[p][1] == st.st_mtime_ns
                     for p, st in stats.items()):
        run.notes.append(f"{source}: {len(stats)} file(s) unchanged since they were last imported, skipped "
                         "(--reprocess reads them again)")
        return
    ingest.feed_all(connector.read_all(files, options))
    ingest.finish()
    rows = []
    real = {_ledger_path(ingest.privacy, f): f for f in files}
    for p, st in stats.items():
        h = hashlib.sha256()
        try:
            with open(real[p], "rb") as fh:
                h.update(fh.read(1 << 20))
        except OSError:
            continue
        rows.append({"source": source, "path": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                     "sha256": h.hexdigest(), "run_id": run.run_id, "processed_at": utc_now(), "units_read": 0})
    if rows:
        store.merge_by_key("ledger", pa.Table.from_pylist(rows, schema=store.schema.table("ledger").arrow_schema))


def _ledger_path(hooks: PrivacyHooks | None, path: Path) -> str:
    """The ledger's name for a file: its absolute path, or under a privacy profile a keyed
    locator (folder and file names often hold patient ids: DICOM trees, exports)."""
    apath = str(path.resolve())
    return hooks.locator(apath) if hooks is not None else apath


def _size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# --------------------------------------------------------------------------- servers


def last_watermark(store: Store, key: str) -> str | None:
    """The newest watermark a committed run stored under `key` (source @ server)."""
    if not store.exists("runs"):
        return None
    runs = store.read("runs", ["run_id", "watermarks"], filter=pc.is_valid(pc.field("watermarks")))
    for _run_id, marks in sorted(zip(runs.column("run_id").to_pylist(), runs.column("watermarks").to_pylist(),
                                    strict=True), reverse=True):
        value = json.loads(marks).get(key)
        if value:
            return value
    return None


def fetch_watermark_key(source: str, options: Any) -> str:
    """The key a FHIR server's watermark is kept under: source @ server, plus what the fetch
    covers when that is not the default search (bulk; a Group or some patients; a list of
    types).

    A watermark says "all this fetch asks for is here up to T". Handed to a wider fetch it
    would skip every older resource the first one never asked for: after `--types Patient`
    a full fetch would find nothing new, and after `--group A` a `--group B` export would
    miss B's history. Patient ids are hashed: the key is shown by `twin status`.
    """
    scope = []
    if options.bulk:
        scope.append("bulk")
        if options.group:
            scope.append(f"Group/{options.group}")
        elif options.patient:
            ids = ",".join(sorted({p.strip() for p in options.patient.split(",") if p.strip()}))
            scope.append("Patient/*" if ids == "*" else "Patient/" + hashlib.sha256(ids.encode()).hexdigest()[:16])
    if options.types:
        scope.append("_type=" + ",".join(sorted(set(options.types))))
    return " ".join([f"{source}@{options.base_url}", *scope])


@collect_at_flushes()
def fetch_fhir_into(store: Store, run: Run, options: Any, *, source: str = "fhir", flush_rows: int = 50_000,
                    hooks: PrivacyHooks | None = None):
    """Feed a FHIR server's resources into `run`; returns the fetch, whose `finished()`
    the caller calls after committing.

    `options` is a `FetchOptions`; its `since` and `state_dir` are filled here: the
    watermark of the last committed run of this source and server is used when `since`
    is not given, and the new one is stored with this run, so it only advances once the
    data it covers is committed. Bulk downloads wait in the store's `_twin/fetch/<source>`
    folder until then, which is what lets a killed run resume instead of exporting again.
    """
    from dataclasses import replace

    from .connectors.fhir_server import fetch_fhir

    key = fetch_watermark_key(source, options)
    since = options.since
    if since is None:
        mark = last_watermark(store, key)
        since = datetime.fromisoformat(mark.replace("Z", "+00:00")) if mark else None
    opts = replace(options, since=since, state_dir=store.meta / "fetch" / _safe(source))
    fetch = fetch_fhir(opts)
    try:
        ingest = Ingest(store, run, source, "fhir", ViewSet(store.schema), flush_rows=flush_rows,
                        twin_ids=TwinIds(stored_links(store)), privacy=hooks)
        ingest.feed_all(fetch.units())
        ingest.finish()
    except BaseException:
        fetch.close()
        raise
    if fetch.watermark:
        run.watermarks[key] = fetch.watermark
    return fetch


def run_fetch_fhir(store: Store, options: Any, *, source: str = "fhir", flush_rows: int = 50_000,
                   hooks: PrivacyHooks | None = None) -> Run:
    """Pull from a FHIR server (search or Bulk $export) as one run."""
    with store.locked("fetch"):
        run = Run(store, "fetch", inputs=[options.base_url])
        try:
            fetch = fetch_fhir_into(store, run, options, source=source, flush_rows=flush_rows, hooks=hooks)
            finish_run(store, run)
        except BaseException:
            store.rollback()
            raise
    fetch.finished()
    fetch.close()
    return run


@collect_at_flushes()
def fetch_dicomweb_into(store: Store, run: Run, base_url: str, *, source: str = "dicomweb",
                       since: Any = None, headers: dict[str, str] | None = None, options: dict[str, Any] | None = None,
                       flush_rows: int = 50_000, hooks: PrivacyHooks | None = None) -> None:
    """Feed a DICOMweb service's study metadata into `run`, incrementally by Study Date.

    Without `since`, the date of the last committed run of this source and server is
    used (studies of that day are read again: upserts make that harmless), and the
    day before the UTC date this run started becomes the new watermark: Study Date is
    the modality's local date, up to 14 hours behind UTC, so the UTC date itself skipped
    a study done late in the evening west of Greenwich and sent after the run, for ever.
    """
    from datetime import date, timedelta

    from .connectors.dicomweb import read_dicomweb

    options = options or {}
    key = f"{source}@{base_url}"
    if since is None:
        mark = last_watermark(store, key)
        since = date.fromisoformat(mark) if mark else None
    units = read_dicomweb(base_url, since=since, headers=headers, patient_rule=options.get("patient_rule"),
                          timezone=options.get("timezone"), deid_profile=hooks.connector_options.get("deid_profile")
                          if hooks else None, **{k: options[k] for k in ("timeout", "retries")
                                                                 if k in options})
    ingest = Ingest(store, run, source, "dicom", ViewSet(store.schema), flush_rows=flush_rows,
                    twin_ids=TwinIds(stored_links(store)), privacy=hooks)
    ingest.feed_all(units)
    ingest.finish()
    run.watermarks[key] = (run.started_at - timedelta(days=1)).date().isoformat()


def run_fetch_dicomweb(store: Store, base_url: str, **kw: Any) -> Run:
    """Pull DICOMweb metadata as one run."""
    with store.locked("fetch"):
        run = Run(store, "fetch", inputs=[base_url])
        try:
            fetch_dicomweb_into(store, run, base_url, **kw)
            finish_run(store, run)
        except BaseException:
            store.rollback()
            raise
    return run


def _safe(name: str) -> str:
    return safe_name(name)  # a source name is a folder name: never "..", never hidden
