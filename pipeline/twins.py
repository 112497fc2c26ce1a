"""Twin assembly: one row per person in `twin`, and every event in `timeline`.

The build is columnar (pyarrow group-bys over the tables), never a Python loop over
rows, so it costs a small multiple of one scan of the tables. It is incremental: each
twin's inputs are summarised by a hash of the content hashes of its rows; a twin whose
inputs did not change since the last build is not rebuilt. `as_of` builds the state as
it was known at a past time: every table is read as it stood then (Delta time travel),
and events after that time are left out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from .codes import KEY_LABS, VITAL_SIGNS
from .errors import ConfigError, GateFailed
from .runs import Run, last_run
from .schema import TIMESTAMP
from .store import Store
from .temporal import utc_now
from .units import STREAM_UNIT_PREFIX

BUILD_SOURCE = "twinline-build"
# Part of every twin's input hash: a new version of the build code rebuilds every twin.
BUILD_VERSION = "2"
CLINICAL = ("patient", "encounter", "observation", "condition", "medication", "procedure", "immunization",
            "allergy", "diagnostic_report", "imaging_study", "imaging_series", "device")
NEWS2_WINDOW = timedelta(hours=24)


# --------------------------------------------------------------------------- reading


HOLD_COLUMNS = ("source", "unit_key", "row_index")


def gate_holds(quarantine: pa.Table | None) -> dict[str, tuple[pa.Array, pa.Array]]:
    """table -> (whole units, single rows) the gate quarantined (open entries), as
    `source\x1funit_key` and `source\x1funit_key\x1frow_index`; `quarantine` needs the
    columns source, stage, status and payload_ref.

    Quarantined means not used, by the build and the export alike: a heart rate of
    900/min that the gate flagged must not become the twin's latest heart rate, nor a
    NEWS2 input. The gate names the row (`table:unit_key#row_index`), so one bad sample
    holds back that sample, not the 750,000-row device chunk it came in. The rows stay in
    their tables (nothing is deleted) and come back when a later `twin check` resolves
    the entry. Patient records are never held back: without them the twin itself would
    dissolve; their problems show in the report and the twin's quality flags.
    """
    if quarantine is None or quarantine.num_rows == 0:
        return {}
    q = quarantine.filter(pc.and_(pc.equal(quarantine.column("stage"), "gate"),
                                  pc.equal(quarantine.column("status"), "open")))
    units: dict[str, list[str]] = {}
    rows: dict[str, list[str]] = {}
    for source, ref in zip(q.column("source").to_pylist(), q.column("payload_ref").to_pylist(), strict=True):
        table, sep, unit = (ref or "").partition(":")
        if not sep or table not in CLINICAL or table == "patient":
            continue
        key, hash_, row = unit.rpartition("#")
        if hash_ and row.isdigit():
            rows.setdefault(table, []).append(f"{source}\x1f{key}\x1f{row}")
        else:  # an entry written before the gate named rows: the whole unit
            units.setdefault(table, []).append(f"{source}\x1f{unit}")
    return {t: (pa.array(units.get(t, []), pa.string()), pa.array(rows.get(t, []), pa.string()))
            for t in units.keys() | rows.keys()}


def held_mask(t: pa.Table | pa.RecordBatch, units: pa.Array, rows: pa.Array) -> pa.Array:
    """True for the rows of `t` (with HOLD_COLUMNS) that `gate_holds` holds back."""
    unit = pc.binary_join_element_wise(t.column("source"), t.column("unit_key"), "\x1f")
    row = pc.binary_join_element_wise(unit, pc.cast(t.column("row_index"), pa.string()), "\x1f")
    return pc.fill_null(pc.or_(pc.is_in(unit, value_set=units), pc.is_in(row, value_set=rows)), False)


class Snapshot:
    """The tables as the build sees them: committed now, or as they stood at `as_of`.

    "As they stood at T" is the store's commit point at T: every table at its version
    when the last run that ended at or before T committed. Not the newest Delta version
    at T: a run writes several versions of a table (so T inside a run would see half of
    it), a killed run leaves versions that the next run rolls back, and deltalake's own
    time travel answers version 0 for a T before the table existed. Before the first
    run, nothing was known: every table is empty.
    """

    def __init__(self, store: Store, as_of: datetime | None):
        self.store = store
        self.as_of = as_of
        self._cutoff_ms: int | None = None
        if as_of is not None and store.exists("runs"):
            ended = store.read("runs", ["ended_at"]).column("ended_at")
            known = pc.max(pc.filter(ended, pc.less_equal(ended, pa.scalar(as_of, TIMESTAMP)))).as_py()
            if known is not None:
                self._cutoff_ms = int(known.timestamp() * 1000)
        self._held = gate_holds(self._read_at("quarantine", ["source", "stage", "status", "payload_ref"]))

    def _read_at(self, table: str, columns: Sequence[str]) -> pa.Table | None:
        """A whole table as the snapshot sees it (None: not there)."""
        if self.as_of is None:
            return self.store.read(table, columns) if self.store.exists(table) else None
        dt = self._delta_at(table)
        return None if dt is None else dt.to_pyarrow_dataset(as_large_types=True).to_table(columns=list(columns))

    def _delta_at(self, table: str) -> DeltaTable | None:
        """The Delta table at its version at the commit point of T (None: it did not exist then)."""
        if self._cutoff_ms is None or not self.store.exists(table):
            return None
        dt = DeltaTable(str(self.store.table_path(table)))
        versions = [h["version"] for h in dt.history() if "version" in h and h.get("timestamp", 0) <= self._cutoff_ms]
        if not versions:
            return None
        dt.load_as_version(max(versions))
        return dt

    def read(self, table: str, columns: Sequence[str], twins: pa.Array | None = None) -> pa.Table:
        if table not in self._held:
            return self._read(table, columns, twins)
        t = self._read(table, [*columns, *HOLD_COLUMNS], twins)
        return t.filter(pc.invert(held_mask(t, *self._held[table]))).select(list(dict.fromkeys(columns)))

    def _read(self, table: str, columns: Sequence[str], twins: pa.Array | None) -> pa.Table:
        columns = list(dict.fromkeys(columns))
        flt = pc.field("twin_id").isin(twins) if twins is not None else pc.is_valid(pc.field("twin_id"))
        if self.as_of is None:
            return self.store.read(table, columns, filter=flt)
        target = self.store.schema.table(table).arrow_schema
        dt = self._delta_at(table)
        if dt is None:
            return target.empty_table().select(columns)
        # filtered after the scan, as Store.read does: pushed into it, the filter fails on
        # the string_view columns of the files delta-rs rewrote (MERGE)
        cols = list(dict.fromkeys([*columns, "twin_id"]))
        t = dt.to_pyarrow_dataset(as_large_types=True).to_table(columns=cols)
        t = t.cast(pa.schema([target.field(n).with_nullable(True) for n in t.column_names]))
        return t.filter(flt).select(columns)


# --------------------------------------------------------------------------- arrow helpers


def group_lists(keys: pa.Array, values: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Rows sorted by key -> (unique keys, one list of values per key)."""
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    n = len(keys)
    if n == 0:
        return pa.array([], keys.type), pa.ListArray.from_arrays(pa.array([0], pa.int32()), values)
    change = pc.not_equal(keys.slice(1), keys.slice(0, n - 1))
    starts = pc.add(pc.indices_nonzero(change), 1)
    offsets = pa.concat_arrays([pa.array([0], pa.uint64()), starts.cast(pa.uint64()), pa.array([n], pa.uint64())])
    uniq = pc.take(keys, offsets.slice(0, len(offsets) - 1))
    return uniq, pa.ListArray.from_arrays(offsets.cast(pa.int32()), values)


def _sorted(t: pa.Table, keys: list[tuple[str, str]]) -> pa.Table:
    return t.sort_by(keys) if t.num_rows else t


def _by_twin(twins: pa.Array, keys: pa.Array, values: pa.Array, typ: pa.DataType) -> pa.Array:
    """Align per-twin values (keys unique) to the order of `twins`; null where absent."""
    if len(keys) == 0:
        return pa.nulls(len(twins), typ)
    idx = pc.index_in(twins, value_set=keys)
    return pc.take(values, idx).cast(typ)


def _latest(obs: pa.Table, codes: dict[str, str]) -> pa.Table:
    """Latest numeric value per (twin, code) among `codes` -> twin_id, list<struct>."""
    t = obs.filter(pc.and_(pc.and_(pc.is_in(obs.column("code"), pa.array(list(codes))),
                                   pc.is_valid(obs.column("value_number"))), pc.is_valid(obs.column("effective_start"))))
    t = _sorted(t, [("twin_id", "ascending"), ("code", "ascending"), ("effective_start", "descending")])
    g = t.group_by(["twin_id", "code"], use_threads=False).aggregate(
        [("value_number", "first"), ("value_unit", "first"), ("effective_start", "first")])
    g = _sorted(g, [("twin_id", "ascending"), ("code", "ascending")])
    names = pa.array([codes[c] for c in g.column("code").to_pylist()], pa.string())
    s = pc.make_struct(names, g.column("code"), g.column("value_number_first"), g.column("value_unit_first"),
                       g.column("effective_start_first"), field_names=["name", "code", "value", "unit", "at"])
    return pa.table(dict(zip(["twin_id", "list"], group_lists(g.column("twin_id"), s), strict=True)))


# --------------------------------------------------------------------------- the build


@dataclass
class BuildResult:
    run_id: str
    as_of: datetime
    twins_total: int = 0
    rebuilt: int = 0
    unchanged: int = 0
    removed: int = 0
    timeline_rows: int = 0
    forced: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"run {self.run_id} (build): as of {self.as_of:%Y-%m-%dT%H:%M:%SZ}",
                 f"  twins: {self.twins_total:,} ({self.rebuilt:,} rebuilt, {self.unchanged:,} unchanged, "
                 f"{self.removed:,} removed)",
                 f"  rows written: twin {self.rebuilt:,}, timeline {self.timeline_rows:,}"]
        if self.forced:
            lines.append("  note: built past a failed gate (--force), recorded in runs")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def twin_bucket(twin_id: str, buckets: int) -> int:
    """The bucket of a twin among `buckets`: stable across processes and machines (builds run per bucket)."""
    return int.from_bytes(hashlib.blake2b(twin_id.encode(), digest_size=8).digest(), "big") % buckets


def _inputs_hash(snap: Snapshot, bucket: tuple[int, int] | None = None) -> dict[str, str]:
    """twin_id -> hash of the content hashes of every row that belongs to it (only twins of `bucket` (b, n))."""
    parts = []
    for name in CLINICAL:
        t = snap.read(name, ["twin_id", "unit_key", "content_hash"])
        if t.num_rows:
            parts.append(t.append_column("table", pa.array([name] * t.num_rows)))
    if not parts:
        return {}
    t = pa.concat_tables(parts)
    if bucket is not None:
        ids = pc.unique(t.column("twin_id")).to_pylist()
        mine = pa.array([i for i in ids if twin_bucket(i, bucket[1]) == bucket[0]], pa.string())
        t = t.filter(pc.is_in(t.column("twin_id"), value_set=mine))
    t = t.sort_by([("twin_id", "ascending"), ("table", "ascending"), ("unit_key", "ascending")])
    out: dict[str, str] = {}
    seed = BUILD_VERSION.encode()
    twins = t.column("twin_id").to_pylist()
    blobs = pc.binary_join_element_wise(t.column("table"), t.column("unit_key"), t.column("content_hash"), "\x1f")
    h = None
    cur = None
    for tw, b in zip(twins, blobs.to_pylist(), strict=True):
        if tw != cur:
            if cur is not None:
                out[cur] = h.hexdigest()
            cur, h = tw, hashlib.blake2b(seed, digest_size=16)
        h.update(b.encode())
        h.update(b"\n")
    if cur is not None:
        out[cur] = h.hexdigest()
    return out


@dataclass
class BuildPlan:
    """What a build does: every twin's inputs hash, the twins to (re)build, the twins gone."""

    hashes: dict[str, str]
    todo: list[str]
    gone: list[str]


def plan_build(store: Store, snap: Snapshot, *, full: bool, bucket: tuple[int, int] | None = None) -> BuildPlan:
    """Decide which twins to rebuild (all of them when `full`), for every twin or one bucket's."""
    hashes = _inputs_hash(snap, bucket)
    stored: dict[str, str] = {}
    if store.exists("twin"):
        t = store.read("twin", ["twin_id", "inputs_hash"], latest=True)
        stored = dict(zip(t.column("twin_id").to_pylist(), t.column("inputs_hash").to_pylist(), strict=True))
        if bucket is not None:
            stored = {k: v for k, v in stored.items() if twin_bucket(k, bucket[1]) == bucket[0]}
    todo = sorted(hashes) if full else sorted(k for k, h in hashes.items() if stored.get(k) != h)
    return BuildPlan(hashes, todo, sorted(set(stored) - set(hashes)))


def begin_build(store: Store, as_of: datetime | None, force: bool) -> tuple[Run, Snapshot, datetime, bool]:
    """Checks and the run of a build (the caller holds the lock): run, snapshot, build time, full rebuild?"""
    if not store.exists("patient"):
        raise ConfigError("nothing to build: the store has no patients yet (import something first)")
    from .gate_runs import last_gate_failed

    if last_gate_failed(store) and not force:
        raise GateFailed("the last `twin check` failed: twins are not built on data that failed the gate. "
                         "Read its report (`twin status` shows the run), fix the data, or `twin build --force`")
    run = Run(store, "build", inputs=[f"as_of={as_of.isoformat()}" if as_of else "as_of=now"])
    # an as-of build is a full rebuild at T; a plain build redoes only twins whose inputs changed
    # (or that the last build left at another as-of)
    full = as_of is not None or _last_as_of(store) is not None
    return run, Snapshot(store, as_of), as_of or utc_now(), full


def build_mode(as_of: datetime | None) -> str:
    # a twin's content hash leaves out the build time, so that rebuilding the same inputs the
    # same way gives the same hash; an as-of build is a different state and says so
    return f"as-of {as_of.isoformat()}" if as_of else "current"


def end_build(store: Store, run: Run, result: BuildResult, *, total: int, rebuilt: int, gone: list[str],
              force: bool) -> None:
    """Remove the twins that are gone, record the run, commit."""
    from .gate_runs import last_gate_failed

    if gone:
        store.delete_units("twin", BUILD_SOURCE, gone)
        store.delete_units("timeline", BUILD_SOURCE, gone)
        result.removed = len(gone)
    result.twins_total = total
    result.unchanged = total - rebuilt
    run.counts[BUILD_SOURCE].read = total
    run.counts[BUILD_SOURCE].written = rebuilt
    run.counts[BUILD_SOURCE].unchanged = total - rebuilt
    run.rows["twin"]["written"] = result.rebuilt
    run.rows["timeline"]["written"] = result.timeline_rows
    forced = force and last_gate_failed(store)
    run.forced = forced
    result.forced = forced
    run.record(status="ok", exit_code=0, message="forced past a failed gate" if forced else None)
    store.commit(run.run_id)


def build_twins(store: Store, *, as_of: datetime | None = None, force: bool = False) -> BuildResult:
    """Assemble the twin and timeline tables, as one run."""
    with store.locked("build"):
        run, snap, now, full = begin_build(store, as_of, force)
        result = BuildResult(run.run_id, now)
        try:
            plan = plan_build(store, snap, full=full)
            if plan.todo:
                twins, timeline = _assemble(snap, pa.array(plan.todo, pa.string()), plan.hashes, now, run)
                mode = build_mode(as_of)
                _write(store, "twin", twins, run, mode, plan.hashes)
                _write(store, "timeline", timeline, run, mode, plan.hashes, all_units=plan.todo)
                result.rebuilt = twins.num_rows
                result.timeline_rows = timeline.num_rows
            end_build(store, run, result, total=len(plan.hashes), rebuilt=len(plan.todo), gone=plan.gone, force=force)
        except BaseException:
            store.rollback()
            raise
    return result


def _last_as_of(store: Store) -> datetime | None:
    """The as-of time of the last build, if it was an as-of build (its runs row says so)."""
    last = last_run(store, "build")
    mark = ((last or {}).get("inputs") or ["as_of=now"])[0]
    return None if mark == "as_of=now" else datetime.fromisoformat(mark.split("=", 1)[1])


def _write(store: Store, table_name: str, data: pa.Table, run: Run, mode: str, inputs: dict[str, str], *,
           unit_column: str = "twin_id", all_units: Sequence[str] | None = None) -> None:
    """Upsert the rows of rebuilt twins, one unit per twin.

    A twin's rows are a pure function of its inputs, the build mode and the build code,
    so their content hash is computed from those (`inputs`: twin id -> inputs hash), not
    from the rows: hashing every row in Python would cost more than the build itself.
    """
    table = store.schema.table(table_name)
    n = data.num_rows
    if n:
        data = data.take(pc.sort_indices(data, [(unit_column, "ascending")]))
    keys = data.column(unit_column).combine_chunks() if n else pa.array([], pa.string())
    # position of each row within its twin: row number minus the start of its run of equal keys
    starts = np.zeros(n, dtype=np.int64)
    if n > 1:
        change = np.flatnonzero(pc.not_equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)) + 1
        starts[change] = change
        starts = np.maximum.accumulate(starts)
    idx = np.arange(n, dtype=np.int64) - starts
    uniq = pc.unique(keys).to_pylist()
    hx = {k: hashlib.blake2b(f"{BUILD_VERSION}|{mode}|{inputs[k]}".encode(), digest_size=16).hexdigest()
          for k in uniq}
    digests = pa.array([hx[k] for k in uniq], pa.string())
    cols = {c: data.column(c) for c in data.column_names}
    cols.update({
        "source": pa.repeat(pa.scalar(BUILD_SOURCE, pa.string()), n),
        "source_ref": pa.repeat(pa.scalar(f"build {run.run_id}", pa.string()), n),
        "run_id": pa.repeat(pa.scalar(run.run_id, pa.string()), n),
        "ingested_at": pa.repeat(pa.scalar(utc_now(), TIMESTAMP), n),
        "unit_key": keys,
        "unit_version": pa.nulls(n, pa.string()),
        "row_index": pa.array(idx, pa.int32()),
        "content_hash": pc.take(digests, pc.index_in(keys, value_set=pa.array(uniq, pa.string()))),
    })
    full = pa.table({c.name: cols[c.name] if c.name in cols else pa.nulls(n, c.arrow) for c in table.columns})
    counts = pc.value_counts(keys).to_pylist() if n else []
    units = {c["values"]: (None, hx[c["values"]], c["counts"]) for c in counts}
    for k in all_units or ():
        units.setdefault(k, (None, "empty", 0))
    store.upsert_units(table_name, BUILD_SOURCE, full, units)


# --------------------------------------------------------------------------- assembling


_STRUCT_CODED = pa.struct([("system", pa.string()), ("code", pa.string()), ("display", pa.string()), ("since", TIMESTAMP)])


def _coded_lists(t: pa.Table, system: str, code: str, display: str, since: str) -> pa.Table:
    t = _sorted(t, [("twin_id", "ascending"), (since, "ascending"), (code, "ascending")])
    s = pc.make_struct(t.column(system), t.column(code), t.column(display), t.column(since),
                       field_names=["system", "code", "display", "since"])
    keys, lists = group_lists(t.column("twin_id"), s)
    return pa.table({"twin_id": keys, "list": lists})


def _first_per_twin(t: pa.Table, columns: list[str], order: list[tuple[str, str]]) -> pa.Table:
    t = _sorted(t, [("twin_id", "ascending"), *order])
    return t.group_by("twin_id", use_threads=False).aggregate([(c, "first") for c in columns])


def _assemble(snap: Snapshot, twins: pa.Array, hashes: dict[str, str], now: datetime, run: Run
              ) -> tuple[pa.Table, pa.Table]:
    schema = snap.store.schema.table("twin")
    n = len(twins)
    out: dict[str, pa.Array] = {"twin_id": twins, "as_of": pa.array([now] * n, TIMESTAMP)}
    before = pc.less_equal

    # demographics: the first record that has each value (records of one twin agree, or the gate flags it)
    pat = snap.read("patient", ["twin_id", "patient_id", "source", "birth_date", "birth_date_precision",
                                "birth_date_offset", "sex", "race_code", "ethnicity_code", "deceased", "deceased_at",
                                "postal_code"], twins)
    pat = _sorted(pat, [("twin_id", "ascending"), ("source", "ascending"), ("patient_id", "ascending")])
    keys, ids = group_lists(pat.column("twin_id"), pc.binary_join_element_wise(pat.column("source"),
                                                                               pat.column("patient_id"), "/"))
    # a twin whose rows name a patient no source sent a record of has no records: empty lists
    # (and the quality flag no-patient-record), never null
    empty = pa.array([[]] * n, pa.list_(pa.string()))
    out["patient_ids"] = pc.coalesce(_by_twin(twins, keys, ids, pa.list_(pa.string())), empty)
    src = pat.group_by("twin_id").aggregate([("source", "distinct")])
    out["sources"] = pc.coalesce(_by_twin(twins, src.column("twin_id"), _sorted_lists(src.column("source_distinct")),
                                          pa.list_(pa.string())), empty)
    demo_cols = ["birth_date", "birth_date_precision", "birth_date_offset", "sex", "race_code", "ethnicity_code",
                 "deceased", "postal_code", "deceased_at"]
    for c in demo_cols:
        valid = pat.filter(pc.is_valid(pat.column(c)))
        g = valid.group_by("twin_id", use_threads=False).aggregate([(c, "first")])
        out[c] = _by_twin(twins, g.column("twin_id"), g.column(f"{c}_first"), pat.schema.field(c).type)
    conflicts = pat.group_by("twin_id").aggregate([("birth_date", "count_distinct"), ("sex", "count_distinct")])
    conflict_twins = set(conflicts.filter(pc.or_(pc.greater(conflicts.column("birth_date_count_distinct"), 1),
                                                 pc.greater(conflicts.column("sex_count_distinct"), 1)))
                         .column("twin_id").to_pylist())
    out["age_years"] = _ages(out["birth_date"], out["deceased_at"], now)

    # counts per table
    counts: dict[str, dict[str, int]] = {t: {} for t in twins.to_pylist()}
    for name in CLINICAL:
        t = snap.read(name, ["twin_id"], twins)
        if t.num_rows:
            g = t.group_by("twin_id").aggregate([([], "count_all")])
            for tw, c in zip(g.column("twin_id").to_pylist(), g.column("count_all").to_pylist(), strict=True):
                counts[tw][name] = c
    out["counts"] = pa.array([sorted(counts[t].items()) for t in twins.to_pylist()], pa.map_(pa.string(), pa.int64()))

    # observations: latest vitals and key labs, device streams
    obs = snap.read("observation", ["twin_id", "unit_key", "code_system", "code", "code_display", "category_code",
                                    "value_number", "value_unit", "value_string", "value_code", "value_display",
                                    "effective_start", "effective_start_precision", "effective_end", "status",
                                    "device_id", "is_component"], twins)
    obs = obs.filter(pc.invert(pc.is_in(obs.column("status"), pa.array(["entered-in-error", "cancelled"]))))
    if snap.as_of is not None:
        obs = obs.filter(pc.or_kleene(pc.is_null(obs.column("effective_start")), before(obs.column("effective_start"), now)))
    vit = _latest(obs, VITAL_SIGNS)
    out["latest_vitals"] = _by_twin(twins, vit.column("twin_id"), vit.column("list"), schema.by_name["latest_vitals"].arrow)
    labs = _latest(obs, KEY_LABS)
    out["latest_labs"] = _by_twin(twins, labs.column("twin_id"), labs.column("list"), schema.by_name["latest_labs"].arrow)
    dev = obs.filter(_is_stream(obs))
    g = dev.group_by("twin_id").aggregate([("device_id", "distinct"), ([], "count_all"), ("effective_start", "max")])
    out["device_ids"] = _by_twin(twins, g.column("twin_id"), _sorted_lists(g.column("device_id_distinct")),
                                 pa.list_(pa.string()))
    out["device_sample_count"] = _by_twin(twins, g.column("twin_id"), g.column("count_all"), pa.int64())
    out["last_device_sample_at"] = _by_twin(twins, g.column("twin_id"), g.column("effective_start_max"), TIMESTAMP)
    news = _news2(obs, twins, now)
    out["news2_score"] = news[0]
    out["news2_inputs"] = news[1]

    # conditions, medications, allergies
    cond = snap.read("condition", ["twin_id", "code_system", "code", "code_display", "clinical_status", "onset",
                                   "abatement", "verification_status"], twins)
    active = pc.is_in(cond.column("clinical_status"), pa.array(["active", "recurrence", "relapse"]))
    active = pc.and_kleene(active, pc.invert(pc.is_in(cond.column("verification_status"),
                                                       pa.array(["refuted", "entered-in-error"]))))
    if snap.as_of is not None:
        active = pc.and_kleene(active, pc.or_kleene(pc.is_null(cond.column("onset")), before(cond.column("onset"), now)))
    c = _coded_lists(cond.filter(pc.fill_null(active, False)), "code_system", "code", "code_display", "onset")
    out["active_conditions"] = _by_twin(twins, c.column("twin_id"), c.column("list"), pa.list_(_STRUCT_CODED))
    med = snap.read("medication", ["twin_id", "kind", "status", "code_system", "code", "code_display",
                                   "effective_start", "effective_end"], twins)
    mact = pc.and_(pc.is_in(med.column("kind"), pa.array(["request", "statement"])),
                   pc.is_in(med.column("status"), pa.array(["active", "on-hold", "intended"])))
    m = _coded_lists(med.filter(pc.fill_null(mact, False)), "code_system", "code", "code_display", "effective_start")
    out["active_medications"] = _by_twin(twins, m.column("twin_id"), m.column("list"), pa.list_(_STRUCT_CODED))
    alg = snap.read("allergy", ["twin_id", "code_system", "code", "code_display", "clinical_status", "onset",
                                "verification_status"], twins)
    aact = pc.or_kleene(pc.is_null(alg.column("clinical_status")), pc.equal(alg.column("clinical_status"), "active"))
    a = _coded_lists(alg.filter(pc.fill_null(aact, False)), "code_system", "code", "code_display", "onset")
    out["allergies"] = _by_twin(twins, a.column("twin_id"), a.column("list"), pa.list_(_STRUCT_CODED))

    # last encounter
    enc = snap.read("encounter", ["twin_id", "encounter_id", "class_code", "period_start", "period_end"], twins)
    enc = enc.filter(pc.is_valid(enc.column("period_start")))
    if snap.as_of is not None:
        enc = enc.filter(before(enc.column("period_start"), now))
    last = _first_per_twin(enc, ["encounter_id", "class_code", "period_start", "period_end"], [("period_start", "descending")])
    for src_col, dst in (("encounter_id", "last_encounter_id"), ("class_code", "last_encounter_class"),
                         ("period_start", "last_encounter_start"), ("period_end", "last_encounter_end")):
        out[dst] = _by_twin(twins, last.column("twin_id"), last.column(f"{src_col}_first"), schema.by_name[dst].arrow)

    # imaging
    img = snap.read("imaging_study", ["twin_id", "started", "modalities"], twins)
    if snap.as_of is not None:
        img = img.filter(pc.or_kleene(pc.is_null(img.column("started")), before(img.column("started"), now)))
    mods = pc.split_pattern(pc.fill_null(img.column("modalities"), ""), " ")
    flat = pa.table({"twin_id": pc.list_parent_indices(mods), "m": pc.list_flatten(mods)})
    flat = pa.table({"twin_id": pc.take(img.column("twin_id"), flat.column("twin_id")), "m": flat.column("m")})
    flat = flat.filter(pc.not_equal(flat.column("m"), ""))
    gm = flat.group_by("twin_id").aggregate([("m", "distinct")])
    gi = img.group_by("twin_id").aggregate([([], "count_all"), ("started", "max")])
    out["imaging_study_count"] = pc.fill_null(_by_twin(twins, gi.column("twin_id"), gi.column("count_all"), pa.int64()), 0)
    out["imaging_modalities"] = _by_twin(twins, gm.column("twin_id"), _sorted_lists(gm.column("m_distinct")),
                                         pa.list_(pa.string()))
    out["last_imaging_at"] = _by_twin(twins, gi.column("twin_id"), gi.column("started_max"), TIMESTAMP)
    out["device_sample_count"] = pc.fill_null(out["device_sample_count"], 0)

    # data-quality flags
    flags = []
    for i, tw in enumerate(twins.to_pylist()):
        f = []
        if not out["birth_date"][i].is_valid:
            f.append("missing-birth-date")
        if not out["sex"][i].is_valid:
            f.append("missing-sex")
        if tw in conflict_twins:
            f.append("conflicting-demographics")
        if not counts[tw].get("patient"):
            f.append("no-patient-record")
        flags.append(f)
    out["quality_flags"] = pa.array(flags, pa.list_(pa.string()))
    out["inputs_hash"] = pa.array([hashes[t] for t in twins.to_pylist()], pa.string())
    cols = [c for c in schema.own_columns] + ["twin_id"]
    twin_table = pa.table({c: out[c] if c in out else pa.nulls(n, schema.by_name[c].arrow) for c in cols})
    timeline = _timeline(snap, twins, obs, now)
    return twin_table, timeline


def _sorted_lists(lists: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Sorted, without nulls: `distinct` aggregates come in no fixed order, and a twin must
    be the same value (and content hash) whatever order the engine met its rows in."""
    return pa.array([sorted(x for x in v if x is not None) if v is not None else None for v in lists.to_pylist()],
                    pa.list_(pa.string()))


def _is_stream(obs: pa.Table) -> pa.Array:
    """Device-stream samples (columnar CSV units), as opposed to observations that came as FHIR."""
    return pc.starts_with(obs.column("unit_key"), STREAM_UNIT_PREFIX)


def _ages(birth: pa.Array, died: pa.Array, now: datetime) -> pa.Array:
    out = []
    for b, d in zip(birth.to_pylist(), died.to_pylist(), strict=True):
        if b is None:
            out.append(None)
            continue
        end = d or now
        years = end.year - b.year - ((end.month, end.day) < (b.month, b.day))
        out.append(years if years >= 0 else None)
    return pa.array(out, pa.int64())


# --------------------------------------------------------------------------- NEWS2

NEWS2_INPUTS = {
    "respiratory_rate": ("9279-1",),
    "spo2": ("59408-5", "2708-6"),
    "systolic_bp": ("8480-6",),
    "heart_rate": ("8867-4",),
    "temperature": ("8310-5",),
    "consciousness": ("67775-7",),  # level of responsiveness (ACVPU), coded
}
_ALERT = {"LA9340-6", "alert", "A"}  # LOINC answer 'Alert' (LL2384-8), or as written


def news2_points(name: str, value: float | str) -> int:
    """Royal College of Physicians NEWS2 chart (2017), scale 1 for SpO2, room air assumed unless recorded."""
    if name == "consciousness":
        return 0 if value in _ALERT else 3
    v = float(value)
    if name == "respiratory_rate":
        return 3 if v <= 8 else 1 if v <= 11 else 0 if v <= 20 else 2 if v <= 24 else 3
    if name == "spo2":
        return 3 if v <= 91 else 2 if v <= 93 else 1 if v <= 95 else 0
    if name == "systolic_bp":
        return 3 if v <= 90 else 2 if v <= 100 else 1 if v <= 110 else 0 if v <= 219 else 3
    if name == "heart_rate":
        return 3 if v <= 40 else 1 if v <= 50 else 0 if v <= 90 else 1 if v <= 110 else 2 if v <= 130 else 3
    if name == "temperature":
        return 3 if v <= 35.0 else 1 if v <= 36.0 else 0 if v <= 38.0 else 1 if v <= 39.0 else 2
    raise ValueError(name)


def _news2(obs: pa.Table, twins: pa.Array, now: datetime) -> tuple[pa.Array, pa.Array]:
    wanted = {c: name for name, codes in NEWS2_INPUTS.items() for c in codes}
    t = obs.filter(pc.and_(pc.is_in(obs.column("code"), pa.array(list(wanted))), pc.is_valid(obs.column("effective_start"))))
    t = _sorted(t, [("twin_id", "ascending"), ("effective_start", "descending")])
    latest: dict[str, dict[str, tuple[object, datetime]]] = {}
    for tw, code, num, vcode, vdisp, at in zip(*(t.column(c).to_pylist() for c in (
            "twin_id", "code", "value_number", "value_code", "value_display", "effective_start")), strict=True):
        name = wanted[code]
        slot = latest.setdefault(tw, {})
        if name in slot:
            continue
        value = vcode or vdisp if name == "consciousness" else num
        if value is not None:
            slot[name] = (value, at)
    scores, inputs = [], []
    for tw in twins.to_pylist():
        got = latest.get(tw, {})
        if len(got) < len(NEWS2_INPUTS):
            scores.append(None)
            inputs.append(None)
            continue
        times = [at for _, at in got.values()]
        if max(times) - min(times) > NEWS2_WINDOW:
            scores.append(None)
            inputs.append(None)
            continue
        score = sum(news2_points(n, v) for n, (v, _) in got.items())
        scores.append(score)
        inputs.append([{"name": n, "value": float(v) if n != "consciousness" else float(news2_points(n, v)), "at": at}
                       for n, (v, at) in sorted(got.items())] + [{"name": "oxygen (assumed air)", "value": 0.0, "at": None}])
    typ = pa.list_(pa.struct([("name", pa.string()), ("value", pa.float64()), ("at", TIMESTAMP)]))
    return pa.array(scores, pa.int64()), pa.array(inputs, typ)


# --------------------------------------------------------------------------- timeline


def _timeline(snap: Snapshot, twins: pa.Array, obs: pa.Table, now: datetime) -> pa.Table:
    parts = []

    def add(table: str, t: pa.Table, at: str, kind, code_system, code, display, value, status, end=None, prec=None):
        if t.num_rows == 0:
            return
        n = t.num_rows
        col = t.column
        parts.append(pa.table({
            "twin_id": col("twin_id"),
            "at": col(at),
            "at_precision": col(prec) if prec else col(f"{at}_precision") if f"{at}_precision" in t.column_names
            else pa.nulls(n, pa.string()),
            "end_at": col(end) if end else pa.nulls(n, TIMESTAMP),
            "event_table": pa.array([table] * n, pa.string()),
            "event_key": col("unit_key"),
            "kind": pa.array([kind] * n, pa.string()) if isinstance(kind, str) else kind,
            "code_system": col(code_system) if code_system else pa.nulls(n, pa.string()),
            "code": col(code) if code else pa.nulls(n, pa.string()),
            "display": col(display) if display else pa.nulls(n, pa.string()),
            "value": value if value is not None else pa.nulls(n, pa.string()),
            "status": col(status) if status else pa.nulls(n, pa.string()),
        }))

    enc = snap.read("encounter", ["twin_id", "unit_key", "period_start", "period_start_precision", "period_end",
                                  "type_system", "type_code", "type_display", "status", "class_code"], twins)
    add("encounter", enc, "period_start", "encounter", "type_system", "type_code", "type_display", enc.column("class_code"),
        "status", end="period_end")
    clin = obs.filter(pc.invert(_is_stream(obs)))
    clin = clin.filter(pc.invert(pc.fill_null(clin.column("is_component"), False)))
    kind = pc.if_else(pc.is_in(clin.column("code"), pa.array(list(VITAL_SIGNS))), "vital",
                      pc.if_else(pc.equal(pc.fill_null(clin.column("category_code"), ""), "laboratory"), "lab", "observation"))
    value = pc.coalesce(
        pc.binary_join_element_wise(pc.cast(clin.column("value_number"), pa.string()), pc.fill_null(clin.column("value_unit"), ""), " "),
        clin.column("value_display"), clin.column("value_code"), clin.column("value_string"))
    add("observation", clin, "effective_start", kind, "code_system", "code", "code_display", value, "status",
        end="effective_end")
    dev = obs.filter(_is_stream(obs))
    if dev.num_rows:
        g = dev.group_by(["twin_id", "unit_key", "device_id"]).aggregate(
            [("effective_start", "min"), ("effective_start", "max"), ([], "count_all")])
        g = g.append_column("value", pc.binary_join_element_wise(pc.cast(g.column("count_all"), pa.string()),
                                                                 pa.scalar("samples"), " "))
        g = g.rename_columns(["twin_id", "unit_key", "code", "at", "end_at", "n", "value"])
        add("observation", g, "at", "device", None, "code", None, g.column("value"), None, end="end_at")
    for table, at, kind, cols in (
        ("condition", "onset", "condition", ("code_system", "code", "code_display", "clinical_status")),
        ("procedure", "performed_start", "procedure", ("code_system", "code", "code_display", "status")),
        ("immunization", "occurrence", "immunization", ("vaccine_system", "vaccine_code", "vaccine_display", "status")),
        ("allergy", "onset", "allergy", ("code_system", "code", "code_display", "clinical_status")),
        ("medication", "effective_start", "medication", ("code_system", "code", "code_display", "status")),
        ("diagnostic_report", "effective_start", "report", ("code_system", "code", "code_display", "status")),
    ):
        t = snap.read(table, ["twin_id", "unit_key", at, f"{at}_precision", *cols], twins)
        add(table, t, at, kind, *cols[:3], None, cols[3])
    img = snap.read("imaging_study", ["twin_id", "unit_key", "started", "started_precision", "modalities",
                                      "description", "status"], twins)
    add("imaging_study", img, "started", "imaging", None, "modalities", "description", None, "status")
    if not parts:
        schema = snap.store.schema.table("timeline")
        return pa.table({c: pa.nulls(0, schema.by_name[c].arrow) for c in (*schema.own_columns, "twin_id")})
    tl = pa.concat_tables(parts, promote_options="permissive")
    if snap.as_of is not None:
        tl = tl.filter(pc.or_kleene(pc.is_null(tl.column("at")), pc.less_equal(tl.column("at"), now)))
    return tl.sort_by([("twin_id", "ascending"), ("at", "ascending"), ("event_table", "ascending"),
                       ("event_key", "ascending")])


# --------------------------------------------------------------------------- show


def find_twin(store: Store, who: str) -> str:
    """A twin id, or a source patient id (`id` or `source/id`). With a secret key set, the
    original id of a pseudonymised record finds it too (docs/privacy.md)."""
    if not store.exists("twin"):
        raise ConfigError("no twins yet: run `twin build` first")
    from .keys import has_secret_key
    from .privacy.pseudonym import pseudonym_id

    names = {who, who.split("/", 1)[-1]}
    if has_secret_key():
        names.add(pseudonym_id("Patient", who.split("/", 1)[-1]))
    t = store.read("twin", ["twin_id", "patient_ids"])
    for tw, ids in zip(t.column("twin_id").to_pylist(), t.column("patient_ids").to_pylist(), strict=True):
        if tw == who or tw.startswith(who) and len(who) >= 8:
            return tw
        if ids and any(i in names or i.split("/", 1)[-1] in names for i in ids):
            return tw
    # not echoed: a source patient id is an identifier, and this message ends up in logs
    raise ConfigError(f"no twin found for the PATIENT given ({len(who)} characters; give a twin id or a patient id "
                      "as `twin show` prints it; `twin status` lists counts)")


def show_twin(store: Store, who: str) -> str:
    tw = find_twin(store, who)
    row = store.read("twin", filter=pc.field("twin_id") == tw).to_pylist()[0]
    lines = [f"twin {tw}  (as of {row['as_of']:%Y-%m-%d %H:%M}Z; records: {', '.join(row['patient_ids'] or [])})"]
    bd = row["birth_date"]
    lines.append(f"  born {bd:%Y-%m-%d}" if bd else "  birth date unknown")
    lines[-1] += f", {row['sex'] or 'sex unknown'}, age {row['age_years'] if row['age_years'] is not None else '?'}"
    if row["deceased"]:
        lines[-1] += ", deceased"
    counts = dict(row["counts"] or [])
    lines.append("  data: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    if row["last_encounter_start"]:
        lines.append(f"  last encounter: {row['last_encounter_class'] or '?'} on {row['last_encounter_start']:%Y-%m-%d}")
    for title, key in (("active conditions", "active_conditions"), ("active medications", "active_medications"),
                       ("allergies", "allergies")):
        items = row[key] or []
        if items:
            lines.append(f"  {title} ({len(items)}): " + "; ".join(i["display"] or i["code"] or "?" for i in items[:8])
                         + (" ..." if len(items) > 8 else ""))
    for title, key in (("latest vital signs", "latest_vitals"), ("key labs", "latest_labs")):
        items = row[key] or []
        if items:
            lines.append(f"  {title}:")
            for i in items:
                lines.append(f"    {i['name']:<28} {i['value']:g} {i['unit'] or ''}  ({i['at']:%Y-%m-%d %H:%M})")
    if row["imaging_study_count"]:
        lines.append(f"  imaging: {row['imaging_study_count']} studies ({', '.join(row['imaging_modalities'] or [])})")
    if row["device_sample_count"]:
        lines.append(f"  devices: {', '.join(row['device_ids'] or [])}: {row['device_sample_count']:,} samples")
    if row["news2_score"] is not None:
        lines.append(f"  NEWS2: {row['news2_score']}")
    if row["quality_flags"]:
        lines.append("  quality flags: " + ", ".join(row["quality_flags"]))
    return "\n".join(lines)
