"""FHIR export of twins: one R4 Bundle (type `collection`) per twin, from the store's tables.

Why a collection: the Bundle is a set of resources handed to someone else, not
instructions for a server (`transaction`) and not an attested clinical document
(`document`, which would need a signed Composition to come first and be immutable). A
collection keeps the source ids untouched, and an integrator who wants to load it into
a server turns each entry into a PUT.

Ids and references. Every resource keeps the id its source gave it. Two sources may
use the same id (the same record imported twice, two hospitals numbering from 1), so
each source gets its own base URL, `https://twinline.dev/fhir/source/<source>/`, and
an entry's fullUrl is that base plus `Type/id`. References are written relative
(`Patient/123`) and, as the Bundle rules say (FHIR R4 Bundle, "Resolving references
in Bundles"), resolve against the base of the entry that holds them: to the record of
the same source. What the twin assembled itself (the summary, derived scores) lives
under `https://twinline.dev/fhir/twin/` and refers to source entries by absolute URL.
A reference that no entry answers (practitioners, organisations, locations: the twin
holds no rows for them) is listed per twin in `index.ndjson` as external.

What is exported: every row of every clinical table for the twin (see
docs/export.md for the mapping of each column), panel components folded back into
their Observation, device streams as aggregated Observations (per source, device,
signal and window: mean as the value, minimum, maximum and sample count as components
coded with the FHIR observation-statistics code system), and the twin state as a
Composition with IPS-like sections that point at the entries, plus a NEWS2
Observation when the twin has a score.

Dates come back as FHIR text with the precision and offset the source wrote, from the
`_precision` and `_offset` companion columns, formatted column-wise in Arrow.

Streaming: twins are exported in groups whose rows fit a budget (`row_budget`), each
group read with one filtered scan per table (record batch by batch, so memory holds
the group's rows, never a whole table); then one Bundle at a time is built and written.
The tables are read at the versions the store had committed when the export started.

Validation with fhir.resources is ~20x slower than parsing (NOTES.md) and makes the
whole export 2-3x slower, so it runs only when asked (`validate=True`, `--validate`);
the tests validate every resource.
"""

from __future__ import annotations

import errno
import hashlib
import html
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache, partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable

from . import __version__
from .errors import ConfigError, Exit
from .fhir import valid_id
from .store import Store
from .temporal import utc_now
from .twins import HOLD_COLUMNS, NEWS2_INPUTS, gate_holds, held_mask
from .units import Rejected

log = logging.getLogger(__name__)

STAGE = "export"
TWIN_ID_SYSTEM = "https://twinline.dev/twin-id"
SOURCE_BASE = "https://twinline.dev/fhir/source/"
TWIN_BASE = "https://twinline.dev/fhir/twin/"
TWINLINE_CS = "https://twinline.dev/fhir/CodeSystem/"

UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
DAR_EXT = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
DAR_CS = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
STATS_CS = "http://terminology.hl7.org/CodeSystem/observation-statistics"
OBS_CATEGORY_CS = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION_CS = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
ID_TYPE_CS = "http://terminology.hl7.org/CodeSystem/v2-0203"
EMPTY_REASON_CS = "http://terminology.hl7.org/CodeSystem/list-empty-reason"
OMB_CS = "urn:oid:2.16.840.1.113883.6.238"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
BIRTH_TIME = "http://hl7.org/fhir/StructureDefinition/patient-birthTime"

# Code systems of codes the tables keep without one: used only for the codes they define.
_KNOWN_CODES = {
    "observation_category": (OBS_CATEGORY_CS, {"social-history", "vital-signs", "imaging", "laboratory", "procedure",
                                               "survey", "exam", "therapy", "activity"}),
    "condition_clinical": ("http://terminology.hl7.org/CodeSystem/condition-clinical",
                           {"active", "recurrence", "relapse", "inactive", "remission", "resolved"}),
    "condition_verification": ("http://terminology.hl7.org/CodeSystem/condition-ver-status",
                               {"unconfirmed", "provisional", "differential", "confirmed", "refuted", "entered-in-error"}),
    "condition_category": ("http://terminology.hl7.org/CodeSystem/condition-category",
                           {"problem-list-item", "encounter-diagnosis"}),
    "allergy_clinical": ("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                         {"active", "inactive", "resolved"}),
    "allergy_verification": ("http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                             {"unconfirmed", "confirmed", "refuted", "entered-in-error"}),
}

# Tables read for a twin, in the order their resources appear in the Bundle.
TABLES = ("patient", "patient_identifier", "patient_link", "encounter", "condition", "observation",
          "diagnostic_report", "medication", "procedure", "immunization", "allergy", "imaging_study",
          "imaging_series", "device")
_SKIP_COLUMNS = {"run_id", "ingested_at", "unit_version", "content_hash"}
_BATCH = 1 << 15
_FHIR_OBSERVATION = "Observation/"  # unit_key prefix of observations that came as FHIR (device streams: STREAM_UNIT_PREFIX)


# --------------------------------------------------------------------------- dates, column-wise


def fhir_times(ts: pa.Array, precision: pa.Array | None, offset: pa.Array | None, kind: str = "dateTime") -> pa.Array:
    """UTC instants + precision + offset -> FHIR text, as the source wrote it.

    `kind` is the FHIR type of the element: `dateTime` keeps year, month and day
    precision (`2020-05`); `instant` always has a time; `date` keeps the date (in the
    source's offset) when the source had a time. A time the source wrote without an
    offset was read as UTC by the store and comes back with `Z`, because FHIR requires
    an offset on every time. Minute precision gets `:00` seconds for the same reason.
    """
    ts = _combined(ts)
    n = len(ts)
    if n == 0:
        return pa.array([], pa.string())
    precision = _combined(precision) if precision is not None else pa.nulls(n, pa.string())
    offset = _combined(offset) if offset is not None else pa.nulls(n, pa.string())
    ok = pc.fill_null(pc.match_substring_regex(offset, r"^[+-]((0\d|1[0-3]):[0-5]\d|14:00)$"), False)
    offset = pc.if_else(ok, offset, pa.scalar(None, pa.string()))
    hours = pc.cast(pc.fill_null(pc.utf8_slice_codeunits(offset, 1, 3), "0"), pa.int64())
    mins = pc.add(pc.multiply(hours, 60), pc.cast(pc.fill_null(pc.utf8_slice_codeunits(offset, 4, 6), "0"), pa.int64()))
    mins = pc.if_else(pc.fill_null(pc.starts_with(offset, "-"), False), pc.negate(mins), mins)
    local = pc.add(ts, pc.cast(pc.multiply(mins, 60_000_000), pa.duration("us")))
    micro = pc.add(pc.multiply(pc.cast(pc.millisecond(local), pa.int64()), 1000), pc.cast(pc.microsecond(local), pa.int64()))
    millis = pc.divide(micro, 1000)  # integer division
    frac = pc.if_else(
        pc.equal(micro, 0), "",
        pc.if_else(pc.equal(pc.multiply(millis, 1000), micro),
                   pc.binary_join_element_wise(".", pc.utf8_lpad(pc.cast(millis, pa.string()), 3, "0"), ""),
                   pc.binary_join_element_wise(".", pc.utf8_lpad(pc.cast(micro, pa.string()), 6, "0"), "")))
    seconds = pc.utf8_lpad(pc.cast(pc.second(local), pa.string()), 2, "0")
    full = pc.binary_join_element_wise(pc.strftime(local, "%Y-%m-%dT%H:%M"), ":", seconds, frac,
                                       pc.fill_null(offset, "Z"), "")
    if kind == "instant":
        return full
    day = pc.strftime(ts, "%Y-%m-%d")
    has_time = pc.invert(pc.fill_null(pc.is_in(precision, pa.array(["year", "month", "day"])), False))
    if kind == "date":
        return pc.if_else(has_time, pc.strftime(local, "%Y-%m-%d"), _short_dates(ts, precision, day))
    return pc.if_else(has_time, full, _short_dates(ts, precision, day))


def _short_dates(ts: pa.Array, precision: pa.Array, day: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(precision, "year"), pc.strftime(ts, "%Y"),
                      pc.if_else(pc.equal(precision, "month"), pc.strftime(ts, "%Y-%m"), day))


def _combined(a):
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a


def _with_fhir_times(t: pa.Table, temporal: frozenset[str], instants: frozenset[str] = frozenset(),
                     dates: frozenset[str] = frozenset()) -> pa.Table:
    """Replace each temporal column by `<col>@` (FHIR text) and `<col>#us` (epoch microseconds, for matching)."""
    for c in sorted(temporal):
        if c not in t.column_names:
            continue
        kind = "instant" if c in instants else "date" if c in dates else "dateTime"
        prec = t.column(f"{c}_precision") if f"{c}_precision" in t.column_names else None
        off = t.column(f"{c}_offset") if f"{c}_offset" in t.column_names else None
        t = t.append_column(f"{c}@", fhir_times(t.column(c), prec, off, kind))
        if kind == "date":  # a birth date with a time keeps it in the birthTime extension
            t = t.append_column(f"{c}@time", fhir_times(t.column(c), prec, off))
        t = t.append_column(f"{c}#us", pc.cast(t.column(c), pa.int64()))
        t = t.drop_columns([x for x in (c, f"{c}_precision", f"{c}_offset") if x in t.column_names])
    return t


# --------------------------------------------------------------------------- reading


class CommittedTables:
    """The store's tables at the versions committed when the export started.

    Pinning the versions once means a Bundle never mixes rows of two runs, even when an
    import commits while `--all` is running. Rows are read record batch by record
    batch and filtered at once, so reading a group of twins holds that group's rows.
    Plain local tables (no partitions, reader protocol 1: what the store writes) are
    read file by file with unbuffered Parquet batches: a scan through the dataset API
    decodes a whole row group at a time, and delta-rs writes row groups of up to a
    million rows, which made memory grow with the table (600 MB for 450k observation
    rows against 90 MB this way).
    """

    def __init__(self, store: Store):
        self.store = store
        self.versions = {k: int(v) for k, v in store.manifest()["tables"].items()}
        self._tables: dict[str, DeltaTable] = {}
        # rows the gate quarantined are left out, as the build leaves them out (twins.gate_holds)
        self.held = gate_holds(self._all("quarantine", ["source", "stage", "status", "payload_ref"])
                               if "quarantine" in self.versions else None)

    def exists(self, table: str) -> bool:
        return table in self.versions

    def columns(self, table: str) -> list[str]:
        return [c.name for c in self.store.schema.table(table).columns if c.name not in _SKIP_COLUMNS]

    def scan(self, table: str, twins: pa.Array | None, columns: Sequence[str] | None = None) -> pa.Table:
        """Rows of these twins (None: rows that belong to no twin), with the given columns."""
        wanted = list(columns or self.columns(table))
        held = self.held.get(table)
        cols = list(dict.fromkeys([*wanted, *HOLD_COLUMNS])) if held else wanted
        parts = []
        for batch in self._batches(table, cols):
            tw = batch.column(cols.index("twin_id"))
            mask = pc.is_null(tw) if twins is None else pc.fill_null(pc.is_in(tw, value_set=twins), False)
            if held:
                mask = pc.and_(mask, pc.invert(held_mask(batch, *held)))
            hit = batch.filter(mask)
            if hit.num_rows:
                parts.append(hit.select(wanted))
        return pa.Table.from_batches(parts, schema=self._schema(table, wanted))

    def _schema(self, table: str, cols: list[str]) -> pa.Schema:
        target = self.store.schema.table(table).arrow_schema
        return pa.schema([target.field(c).with_nullable(True) for c in cols])

    def _batches(self, table: str, cols: list[str]) -> Iterator[pa.RecordBatch]:
        """Record batches of the table at its pinned version, typed as the schema says (string, not string_view)."""
        if table not in self.versions:
            return
        schema = self._schema(table, cols)
        dt = self._tables.get(table)
        if dt is None:
            dt = self._tables[table] = DeltaTable(str(self.store.table_path(table)), version=self.versions[table])
        uris = dt.file_uris()
        if dt.metadata().partition_columns or dt.protocol().min_reader_version > 1 or any("://" in u for u in uris):
            for b in dt.to_pyarrow_dataset(as_large_types=True).to_batches(columns=cols, batch_size=_BATCH):
                yield b.cast(schema)
            return
        for uri in uris:
            pf = pq.ParquetFile(uri, pre_buffer=False, buffer_size=1 << 20)
            present = [c for c in cols if c in pf.schema_arrow.names]  # a file from before a column was added
            for b in pf.iter_batches(batch_size=_BATCH, columns=present):
                if len(present) < len(cols):
                    b = pa.RecordBatch.from_arrays([b.column(c) if c in present else pa.nulls(b.num_rows, f.type)
                                                    for c, f in zip(cols, schema, strict=True)], names=cols)
                yield b.select(cols).cast(schema)

    def twins(self) -> pa.Table:
        """twin_id and rows per twin, from the `twin` table (what `twin build` assembled)."""
        if "twin" not in self.versions:
            raise ConfigError("no twins to export: run `twin build` first")
        return self._all("twin", ["twin_id", "counts"])

    def _all(self, table: str, cols: list[str]) -> pa.Table:
        return pa.Table.from_batches(list(self._batches(table, cols)), schema=self._schema(table, cols))


class _Part:
    """One table's rows for a group of twins (sorted by twin), and each twin's row range.

    Rows become Python dicts one twin at a time: the group stays in compact Arrow form.
    """

    def __init__(self, table: pa.Table):
        self.table = table
        self.ranges: dict[str, tuple[int, int]] = {}
        if table.num_rows:
            ids = table.column("twin_id")
            ends = pc.indices_nonzero(pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))).to_pylist()
            starts = [0] + [e + 1 for e in ends]
            for a, b in zip(starts, [*starts[1:], table.num_rows], strict=True):
                self.ranges[ids[a].as_py()] = (a, b)

    def rows(self, twin: str) -> list[dict[str, Any]]:
        a, b = self.ranges.get(twin, (0, 0))
        if a == b:
            return []
        part = self.table.slice(a, b - a)
        names = part.column_names
        return [dict(zip(names, vals, strict=True)) for vals in zip(*(c.to_pylist() for c in part.columns), strict=True)]


def _sorted(t: pa.Table, keys: Sequence[str]) -> pa.Table:
    return t.sort_by([(k, "ascending") for k in keys if k in t.column_names]) if t.num_rows else t


def plan_groups(twins: list[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    """Consecutive twins packed into groups of at most `budget` rows (a bigger twin goes alone)."""
    groups: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for tw in twins:
        n = sizes.get(tw, 0)
        if cur and used + n > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(tw)
        used += n
    if cur:
        groups.append(cur)
    return groups


# --------------------------------------------------------------------------- small FHIR pieces


def _num(v: Any) -> int | float | None:
    """A JSON number for a FHIR decimal: integral floats as integers (120, not 120.0); no NaN."""
    if v is None or not math.isfinite(v):
        return None
    return int(v) if float(v).is_integer() and abs(v) < 1e15 else v


def _prune(d: dict[str, Any]) -> dict[str, Any]:
    """Drop absent values: None, and empty strings, lists and objects (FHIR allows none of them)."""
    return {k: v for k, v in d.items() if v or v is False or v == 0}


def coding(system: str | None, code: str | None, display: str | None = None) -> dict[str, Any] | None:
    if not code and not display:
        return None
    c = {"system": system} if system else {}
    if code:
        c["code"] = code
    if display:
        c["display"] = display
    return c


def concept(system: str | None, code: str | None, display: str | None = None) -> dict[str, Any] | None:
    c = coding(system, code, display)
    return {"coding": [c]} if c else None


def known(vocabulary: str, code: str | None) -> dict[str, Any] | None:
    """A CodeableConcept for a code the table keeps without its system: the system only when the code is its."""
    if code is None:
        return None
    system, codes = _KNOWN_CODES[vocabulary]
    return {"coding": [{"system": system, "code": code} if code in codes else {"code": code}]}


def bare(code: str | None) -> dict[str, Any] | None:
    """A CodeableConcept for a code whose system the table does not keep (route, body site, reason)."""
    return None if code is None else {"coding": [{"code": code}]}


def absent(reason: str = "unknown") -> dict[str, Any]:
    """A required element the twin has no value for: data-absent-reason, as FHIR says to say it."""
    return {"extension": [{"url": DAR_EXT, "valueCode": reason}]}


def period(start: str | None, end: str | None) -> dict[str, Any] | None:
    return _prune({"start": start, "end": end}) or None


@lru_cache(maxsize=1 << 16)
def fhir_id(raw: str) -> str:
    """The source id when it is a valid FHIR id, else a stable id derived from it (same everywhere it is used)."""
    if valid_id(raw):
        return raw
    return "x-" + hashlib.blake2b(raw.encode("utf-8"), digest_size=20).hexdigest()


@lru_cache(maxsize=1024)
def source_base(source: str) -> str:
    return f"{SOURCE_BASE}{quote(source, safe='')}/"


# --------------------------------------------------------------------------- one Bundle


@dataclass
class TwinReport:
    """What the export did for one twin: the line written to index.ndjson."""

    twin_id: str
    file: str | None = None
    entries: int = 0
    resources: Counter = field(default_factory=Counter)
    rows_read: Counter = field(default_factory=Counter)
    rows_exported: Counter = field(default_factory=Counter)
    rows_rejected: Counter = field(default_factory=Counter)
    external_references: list[str] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def line(self) -> dict[str, Any]:
        return {"twin_id": self.twin_id, "file": self.file, "entries": self.entries,
                "resources": dict(sorted(self.resources.items())), "rows": dict(sorted(self.rows_read.items())),
                "external_references": self.external_references,
                "rejected": [{"reason": r.reason, "source_ref": r.source_ref, "message": r.message}
                             for r in self.rejected]}


class BundleBuilder:
    """The entries of one twin's Bundle, with every reference they make.

    Builders call `ref` for every Reference they write, so that integrity is checked
    without walking the resources again: at the end, each reference either names an
    entry of the Bundle or is listed as external.
    """

    def __init__(self, twin_id: str, report: TwinReport, validate: Callable[[dict[str, Any]], str | None] | None):
        self.twin_id = twin_id
        self.report = report
        self.validate = validate
        self.entries: list[dict[str, Any]] = []
        self.urls: set[str] = set()
        self.targets: set[str] = set()

    def ref(self, source: str, rtype: str, rid: str | None, display: str | None = None) -> dict[str, Any] | None:
        if not rid:
            return {"display": display} if display else None
        local = f"{rtype}/{fhir_id(rid)}"
        self.targets.add(source_base(source) + local)
        return {"reference": local, "display": display} if display else {"reference": local}

    def absolute(self, url: str | None) -> dict[str, Any] | None:
        if url is None:
            return None
        self.targets.add(url)
        return {"reference": url}

    def add(self, base: str, resource: dict[str, Any], row: dict[str, Any] | None, rows: dict[str, int]) -> str | None:
        """Add a resource made of `rows` (table -> rows); returns its fullUrl, or None if it was refused."""
        url = f"{base}{resource['resourceType']}/{resource['id']}"
        problem = None
        if url in self.urls:
            problem = ("duplicate-id", f"{resource['resourceType']}: a second resource with the same id in the same "
                                       "source; the first was exported")
        elif self.validate is not None:
            err = self.validate(resource)
            if err:
                problem = ("invalid-resource", f"{resource['resourceType']}: not valid under FHIR R4B ({err})")
        if problem:
            self.reject(problem[0], problem[1], row, rows, payload=resource)
            return None
        self.urls.add(url)
        self.entries.append({"fullUrl": url, "resource": resource})
        self.report.resources[resource["resourceType"]] += 1
        exported = self.report.rows_exported
        for table, n in rows.items():
            exported[table] += n
        return url

    def reject(self, reason: str, message: str, row: dict[str, Any] | None, rows: dict[str, int],
               payload: Any = None) -> None:
        """A unit that cannot be exported: kept as a Rejected with the rows it stands for."""
        ref = (row or {}).get("source_ref") or f"twin {self.twin_id}"
        blob = orjson.dumps(payload, default=str) if payload is not None else None
        self.report.rejected.append(Rejected(STAGE, reason, message, ref, payload=blob,
                                             target_table=next(iter(rows), None)))
        self.report.rows_rejected.update(rows)

    def bundle(self, now: str) -> dict[str, Any]:
        self.report.entries = len(self.entries)
        self.report.external_references = sorted(self.targets - self.urls)
        return {"resourceType": "Bundle", "id": fhir_id(self.twin_id), "meta": {"lastUpdated": now},
                "type": "collection", "timestamp": now, "entry": self.entries}


# --------------------------------------------------------------------------- rows -> resources
#
# One function per table. Each takes a row (the table's columns, with `<col>@` holding
# FHIR date text) and returns the resource; docs/export.md lists column -> element.


def patient(rec: dict[str, Any], twin_id: str, b: BundleBuilder) -> dict[str, Any]:
    """A patient record: its patient row (if any), identifier rows, link rows, and the twin id."""
    src, r = rec["source"], rec["row"] or {}
    ids = [_prune({"use": i["use"], "type": concept(ID_TYPE_CS, i["type_code"]), "system": i["system"],
                   "value": i["value"], "assigner": {"display": i["assigner"]} if i["assigner"] else None})
           for i in rec["identifiers"]]
    ids.append({"system": TWIN_ID_SYSTEM, "value": twin_id})
    name = _prune({"family": r.get("name_family"), "given": (r.get("name_given") or "").split() or None})
    address = _prune({"postalCode": r.get("postal_code"), "state": r.get("state"), "country": r.get("country")})
    res = {"resourceType": "Patient", "id": fhir_id(rec["patient_id"]), "identifier": ids, "active": r.get("active"),
           "name": [name] if name else None, "gender": r.get("sex"), "birthDate": r.get("birth_date@"),
           "address": [address] if address else None,
           "managingOrganization": b.ref(src, "Organization", r.get("managing_organization_id")),
           "link": [{"other": b.ref(src, "Patient", k["other_patient_id"]), "type": k["link_type"]}
                    for k in rec["links"]] or None}
    if r.get("birth_date@time") and r.get("birth_date@time") != r.get("birth_date@"):
        res["_birthDate"] = {"extension": [{"url": BIRTH_TIME, "valueDateTime": r["birth_date@time"]}]}
    if r.get("deceased_at@"):
        res["deceasedDateTime"] = r["deceased_at@"]
    elif r.get("deceased") is not None:
        res["deceasedBoolean"] = r["deceased"]
    ext = [e for e in (_omb("race", r.get("race_code"), r.get("race_display")),
                       _omb("ethnicity", r.get("ethnicity_code"), r.get("ethnicity_display"))) if e]
    if ext:
        res["extension"] = ext
    return _prune(res)


def _omb(which: str, code: str | None, display: str | None) -> dict[str, Any] | None:
    """US Core race / ethnicity: the OMB category code and the text (1..1 in US Core: the code when no text)."""
    if code is None and display is None:
        return None
    parts: list[dict[str, Any]] = [{"url": "ombCategory", "valueCoding": {"system": OMB_CS, "code": code}}] if code else []
    parts.append({"url": "text", "valueString": display or code})
    return {"url": f"{US_CORE}us-core-{which}", "extension": parts}


def encounter(r: dict[str, Any], b: BundleBuilder) -> dict[str, Any]:
    s = r["source"]
    cls = coding(r["class_system"], r["class_code"])
    hosp = _prune({"admitSource": bare(r["admit_source_code"]), "dischargeDisposition": bare(r["discharge_disposition_code"])})
    loc = b.ref(s, "Location", r["location_id"], r["location_display"])
    return _prune({
        "resourceType": "Encounter", "id": fhir_id(r["encounter_id"]), "status": r["status"],
        "class": cls or absent(), "type": [t] if (t := concept(r["type_system"], r["type_code"], r["type_display"])) else None,
        "subject": b.ref(s, "Patient", r["patient_id"]),
        "participant": [{"individual": p}] if (p := b.ref(s, "Practitioner", r["practitioner_id"])) else None,
        "period": period(r["period_start@"], r["period_end@"]),
        "reasonCode": [c] if (c := concept(r["reason_system"], r["reason_code"], r["reason_display"])) else None,
        "hospitalization": hosp or None, "location": [{"location": loc}] if loc else None,
        "serviceProvider": b.ref(s, "Organization", r["service_provider_id"]),
    })


def _value(r: dict[str, Any]) -> tuple[str, Any] | None:
    """The value[x] of an observation row (or component row), from `value_type` and the value columns."""
    vt = r["value_type"]
    n = _num(r["value_number"])
    if vt == "integer" and isinstance(n, int) and -(2**31) <= n < 2**31:  # FHIR integer is 32-bit
        return "valueInteger", n
    if vt in ("Quantity", "integer") or (vt is None and n is not None):
        q: dict[str, Any] = {"value": n} if n is not None else {}
        if r["value_comparator"]:
            q["comparator"] = r["value_comparator"]
        if r["value_unit_display"]:
            q["unit"] = r["value_unit_display"]
        if r["value_unit"]:
            q["system"] = UCUM
            q["code"] = r["value_unit"]
        return ("valueQuantity", q) if q else None
    if vt == "CodeableConcept":
        c = concept(r["value_code_system"], r["value_code"], r["value_display"]) if r["value_code"] else (
            {"text": r["value_display"]} if r["value_display"] else None)
        return ("valueCodeableConcept", c) if c else None
    if vt == "boolean" and r["value_boolean"] is not None:
        return "valueBoolean", r["value_boolean"]
    if vt in ("string", "dateTime", "time") and r["value_string"] is not None:
        return "value" + vt[0].upper() + vt[1:], r["value_string"]
    if vt in ("Period", "Ratio", "Range", "SampledData"):
        return "dataAbsentReason", {"coding": [{"system": DAR_CS, "code": "unsupported"}],
                                    "text": f"the twin tables do not keep {vt} values"}
    return None


def _observed(r: dict[str, Any], into: dict[str, Any]) -> dict[str, Any]:
    """code, value, interpretation and reference range: what a panel and its components share."""
    into["code"] = concept(r["code_system"], r["code"], r["code_display"]) or absent()
    v = _value(r)
    if v:
        into[v[0]] = v[1]
    if r["interpretation_code"]:
        into["interpretation"] = [concept(INTERPRETATION_CS, r["interpretation_code"])]
    if r["reference_low"] is not None or r["reference_high"] is not None or r["reference_text"]:
        low, high = _num(r["reference_low"]), _num(r["reference_high"])
        rng = _prune({"low": {"value": low} if low is not None else None,
                      "high": {"value": high} if high is not None else None, "text": r["reference_text"]})
        if rng:
            into["referenceRange"] = [rng]
    return into


def observation(r: dict[str, Any], components: list[dict[str, Any]], b: BundleBuilder) -> dict[str, Any]:
    s = r["source"]
    res: dict[str, Any] = {"resourceType": "Observation", "id": fhir_id(r["observation_id"]), "status": r["status"]}
    if r["quality_flag"]:
        res["meta"] = {"tag": [{"system": f"{TWINLINE_CS}quality-flag", "code": r["quality_flag"]}]}
    if r["category_code"]:
        res["category"] = [known("observation_category", r["category_code"])]
    _observed(r, res)
    res["subject"] = b.ref(s, "Patient", r["patient_id"])
    res["encounter"] = b.ref(s, "Encounter", r["encounter_id"])
    if r["effective_end@"]:
        res["effectivePeriod"] = period(r["effective_start@"], r["effective_end@"])
    else:
        res["effectiveDateTime"] = r["effective_start@"]
    res["device"] = b.ref(s, "Device", r["device_id"])
    if components:
        res["component"] = [_observed(c, {}) for c in components]
    return _prune(res)


def condition(r: dict[str, Any], b: BundleBuilder) -> dict[str, Any]:
    s = r["source"]
    return _prune({
        "resourceType": "Condition", "id": fhir_id(r["condition_id"]),
        "clinicalStatus": known("condition_clinical", r["clinical_status"]),
        "verificationStatus": known("condition_verification", r["verification_status"]),
        "category": [known("condition_category", r["category_code"])] if r["category_code"] else None,
        "code": concept(r["code_system"], r["code"], r["code_display"]),
        "subject": b.ref(s, "Patient", r["patient_id"]), "encounter": b.ref(s, "Encounter", r["encounter_id"]),
        "onsetDateTime": r["onset@"], "abatementDateTime": r["abatement@"], "recordedDate": r["recorded@"],
    })


_MEDICATION_TYPES = {"request": "MedicationRequest", "administration": "MedicationAdministration",
                     "statement": "MedicationStatement"}


def medication(r: dict[str, Any], b: BundleBuilder) -> dict[str, Any]:
    """One row of `medication`, as the resource its `kind` names."""
    s, kind = r["source"], r["kind"]
    rtype = _MEDICATION_TYPES[kind]
    res: dict[str, Any] = {"resourceType": rtype, "id": fhir_id(r["medication_record_id"]), "status": r["status"]}
    med = concept(r["code_system"], r["code"], r["code_display"])
    if med:
        res["medicationCodeableConcept"] = med
    elif r["medication_ref_id"]:
        res["medicationReference"] = b.ref(s, "Medication", r["medication_ref_id"])
    else:
        res["medicationCodeableConcept"] = absent()
    res["subject"] = b.ref(s, "Patient", r["patient_id"])
    enc = b.ref(s, "Encounter", r["encounter_id"])
    dose = _prune({"value": _num(r["dose_value"]), "system": UCUM if r["dose_unit"] else None, "code": r["dose_unit"]})
    who = b.ref(s, "Practitioner", r["practitioner_id"])
    reason = [bare(r["reason_code"])] if r["reason_code"] else None
    when = period(r["effective_start@"], r["effective_end@"]) if r["effective_end@"] else None
    if kind == "request":
        if r["intent"]:
            res["intent"] = r["intent"]
        else:
            res["_intent"] = absent()
        timing = {"repeat": {"boundsPeriod": {"end": r["effective_end@"]}}} if r["effective_end@"] else None
        dosage = _prune({"timing": timing, "route": bare(r["route_code"]),
                         "doseAndRate": [{"doseQuantity": dose}] if dose else None})
        res.update(encounter=enc, authoredOn=r["effective_start@"], requester=who, reasonCode=reason,
                   dosageInstruction=[dosage] if dosage else None)
    elif kind == "administration":
        if when:
            res["effectivePeriod"] = when
        elif r["effective_start@"]:
            res["effectiveDateTime"] = r["effective_start@"]
        else:
            res["effectivePeriod"] = absent()
        dosage = _prune({"route": bare(r["route_code"]), "dose": dose or None})
        res.update(context=enc, performer=[{"actor": who}] if who else None, reasonCode=reason, dosage=dosage or None)
    else:
        if when:
            res["effectivePeriod"] = when
        else:
            res["effectiveDateTime"] = r["effective_start@"]
        dosage = _prune({"route": bare(r["route_code"]), "doseAndRate": [{"doseQuantity": dose}] if dose else None})
        res.update(context=enc, informationSource=who, reasonCode=reason, dosage=[dosage] if dosage else None)
    return _prune(res)


def procedure(r: dict[str, Any], b: BundleBuilder) -> dict[str, Any]:
    s = r["source"]
    res = {"resourceType": "Procedure", "id": fhir_id(r["procedure_id"]), "status": r["status"],
           "code": concept(r["code_system"], r["code"], r["code_display"]),
           "subject": b.ref(s, "Patient", r["patient_id"]), "encounter": b.ref(s, "Encounter", r["encounter_id"])}
    if r["performed_end@"]:
        res["performedPeriod"] = period(r["performed_start@"], r["performed_end@"])
    else:
        res["performedDateTime"] = r["performed_start@"]
    res.update(location=b.ref(s, "Location", r["location_id"]),
               reasonCode=[bare(r["reason_code"])] if r["reason_code"] else None,
               bodySite=[bare(r["body_site_code"])] if r["body_site_code"] else None)
    return _prune(res)


def immunization(r: dict[str, Any], b: BundleBuilder) -> dict[str, Any]:
    s = r["source"]
    dose = r["dose_number"]
    applied = None
    if dose is not None:
        applied = [{"doseNumberPositiveInt": int(dose)} if dose.isdigit() and int(dose) > 0 else {"doseNumberString": dose}]
    who = b.ref(s, "Practitioner", r["practitioner_id"])
    return _prune({
        "resourceType": "Immunization", "id": fhir_id(r["immunization_id"]), "status": r["status"],
        "vaccineCode": concept(r["vaccine_system"], r["vaccine_code"], r["vaccine_display"]) or absent(),
        "patient": b.ref(s, "Patient", r["patient_id"]), "encounter": b.ref(s, "Encounter", r["encounter_id"]),
        # occurrence[x] is required and a dateTime cannot carry data-absent-reason here: the string form says it
        "occurrenceDateTime": r["occurrence@"], "occurrenceString": None if r["occurrence@"] else "unknown",
        "primarySource": r["primary_source"], "lotNumber": r["lot_number"], "site": bare(r["site_code"]),
        "route": bare(r["route_code"]), "performer": [{"actor": who}] if who else None, "protocolApplied": applied,
    })


def allergy(r: dict[str, Any], b: BundleBuilder) -> dict[str, Any]:
    s = r["source"]
    reaction = None
    if r["reaction_code"] or r["reaction_severity"]:
        reaction = [_prune({"manifestation": [bare(r["reaction_code"]) or absent()], "severity": r["reaction_severity"]})]
    return _prune({
        "resourceType": "AllergyIntolerance", "id": fhir_id(r["allergy_id"]),
        "clinicalStatus": known("allergy_clinical", r["clinical_status"]),
        "verificationStatus": known("allergy_verification", r["verification_status"]),
        "type": r["type"], "category": [r["category"]] if r["category"] else None, "criticality": r["criticality"],
        "code": concept(r["code_system"], r["code"], r["code_display"]),
        "patient": b.ref(s, "Patient", r["patient_id"]),
        "onsetDateTime": r["onset@"], "recordedDate": r["recorded@"], "reaction": reaction,
    })


def diagnostic_report(r: dict[str, Any], b: BundleBuilder) -> dict[str, Any]:
    s = r["source"]
    return _prune({
        "resourceType": "DiagnosticReport", "id": fhir_id(r["report_id"]), "status": r["status"],
        "category": [bare(r["category_code"])] if r["category_code"] else None,
        "code": concept(r["code_system"], r["code"], r["code_display"]) or absent(),
        "subject": b.ref(s, "Patient", r["patient_id"]), "encounter": b.ref(s, "Encounter", r["encounter_id"]),
        "effectiveDateTime": r["effective_start@"], "issued": r["issued@"],
    })


def imaging_study(r: dict[str, Any], series: list[dict[str, Any]], b: BundleBuilder) -> dict[str, Any]:
    s = r["source"]
    ids = []
    if r["study_instance_uid"]:
        ids.append({"system": "urn:dicom:uid", "value": r["study_instance_uid"]})
    if r["accession_number"]:
        ids.append({"type": concept(ID_TYPE_CS, "ACSN"), "value": r["accession_number"]})
    return _prune({
        "resourceType": "ImagingStudy", "id": fhir_id(r["study_id"]), "identifier": ids, "status": r["status"],
        "modality": [{"system": DCM, "code": m} for m in (r["modalities"] or "").split()] or None,
        "subject": b.ref(s, "Patient", r["patient_id"]) or absent(),
        "encounter": b.ref(s, "Encounter", r["encounter_id"]), "started": r["started@"],
        "referrer": b.ref(s, "Practitioner", r["referrer_id"], r["referrer_display"]),
        "numberOfSeries": r["number_of_series"], "numberOfInstances": r["number_of_instances"],
        "procedureCode": [c] if (c := concept(r["procedure_system"], r["procedure_code"], r["procedure_display"])) else None,
        "location": b.ref(s, "Location", r["location_id"]), "description": r["description"],
        "series": [_series(x, b) for x in series] or None,
    })


def _series(r: dict[str, Any], b: BundleBuilder) -> dict[str, Any]:
    dev = b.ref(r["source"], "Device", r["device_id"])
    return _prune({
        "uid": r["series_instance_uid"], "number": r["series_number"],
        "modality": {"system": DCM, "code": r["modality"]} if r["modality"] else absent(),
        "description": r["description"], "numberOfInstances": r["number_of_instances"],
        "bodySite": coding(None, r["body_site_code"], r["body_site_display"]),
        "laterality": coding(None, r["laterality"]), "started": r["started@"],
        "performer": [{"actor": dev}] if dev else None,
    })


def device(r: dict[str, Any], b: BundleBuilder) -> dict[str, Any]:
    codings = [c for c in (coding(r["type_system"], r["type_code"], r["type_display"]),
                           coding(f"{TWINLINE_CS}device-kind", r["kind"])) if c]
    return _prune({
        "resourceType": "Device", "id": fhir_id(r["device_id"]), "status": r["status"],
        "udiCarrier": [{"deviceIdentifier": r["udi"]}] if r["udi"] else None, "manufacturer": r["manufacturer"],
        "serialNumber": r["serial_number"], "modelNumber": r["model"],
        "deviceName": [{"name": r["station_name"], "type": "other"}] if r["station_name"] else None,
        "type": {"coding": codings} if codings else None,
        "version": [{"value": r["software_version"]}] if r["software_version"] else None,
        "patient": b.ref(r["source"], "Patient", r["patient_id"]),
    })


# --------------------------------------------------------------------------- device streams

_STREAM_KEYS = ["twin_id", "source", "patient_id", "device_id", "code_system", "code", "value_unit",
                "value_code_system", "value_code", "window"]


def aggregate_streams(t: pa.Table, window: timedelta) -> pa.Table:
    """Device-stream rows -> one row per (source, patient, device, signal, value code, window).

    Already downsampled rows (`sample_count`, `value_min`, `value_max`) combine
    exactly: the mean is weighted by the samples each row stands for. Coded signals
    keep their value code in the key, so each window holds one row per value seen.
    Columnar: the cost is one Arrow group-by, whatever the number of samples.
    """
    if t.num_rows == 0:
        return pa.table({k: pa.array([], pa.string()) for k in _STREAM_KEYS[:-1]})
    n = pc.cast(pc.fill_null(t.column("sample_count"), 1), pa.int64())
    value = t.column("value_number")
    nv = pc.if_else(pc.is_valid(value), n, 0)
    start = t.column("effective_start")
    x = pa.table({
        **{k: t.column(k) for k in _STREAM_KEYS[:-1]},
        "window": pc.floor_temporal(start, multiple=max(1, int(window.total_seconds())), unit="second"),
        "n": n, "nv": nv, "wsum": pc.multiply(value, pc.cast(n, pa.float64())),
        "lo": pc.coalesce(t.column("value_min"), value), "hi": pc.coalesce(t.column("value_max"), value),
        "start": start, "end": pc.coalesce(t.column("effective_end"), start),
        "implausible": pc.cast(pc.fill_null(pc.equal(t.column("quality_flag"), "implausible"), False), pa.int64()),
        "category_code": t.column("category_code"), "code_display": t.column("code_display"),
        "value_unit_display": t.column("value_unit_display"), "value_display": t.column("value_display"),
        "offset": t.column("effective_start_offset"),
    })
    g = x.group_by(_STREAM_KEYS, use_threads=False).aggregate([
        ("n", "sum"), ("nv", "sum"), ("wsum", "sum"), ("lo", "min"), ("hi", "max"), ("start", "min"), ("end", "max"),
        ("implausible", "sum"), ("category_code", "first"), ("code_display", "first"),
        ("value_unit_display", "first"), ("value_display", "first"), ("offset", "first"), ([], "count_all")])
    mean = pc.if_else(pc.greater(g.column("nv_sum"), 0),
                      pc.divide(g.column("wsum_sum"), pc.cast(g.column("nv_sum"), pa.float64())),
                      pa.scalar(None, pa.float64()))
    out = {k: g.column(k) for k in _STREAM_KEYS}
    out.update({
        "window#us": pc.cast(g.column("window"), pa.int64()), "count": g.column("n_sum"), "mean": mean,
        "minimum": g.column("lo_min"), "maximum": g.column("hi_max"),
        "start@": fhir_times(g.column("start_min"), None, g.column("offset_first")),
        "end@": fhir_times(g.column("end_max"), None, g.column("offset_first")),
        "implausible": g.column("implausible_sum"), "category_code": g.column("category_code_first"),
        "code_display": g.column("code_display_first"), "value_unit_display": g.column("value_unit_display_first"),
        "value_display": g.column("value_display_first"), "rows": g.column("count_all"),
    })
    del out["window"]
    return _sorted(pa.table(out), ["twin_id", "source", "device_id", "code", "value_code", "window#us"])


def _stat(code: str, display: str, value: dict[str, Any] | None = None, integer: int | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"code": {"coding": [{"system": STATS_CS, "code": code, "display": display}]}}
    if integer is not None:
        c["valueInteger"] = integer
    else:
        c["valueQuantity"] = value
    return c


def stream_observation(r: dict[str, Any], b: BundleBuilder) -> dict[str, Any]:
    """One window of one device signal, as an Observation over `effectivePeriod`."""
    s = r["source"]
    key = "\x1f".join(str(r[k]) for k in ("source", "patient_id", "device_id", "code_system", "code", "value_unit",
                                          "value_code_system", "value_code", "window#us"))
    tags = [{"system": f"{TWINLINE_CS}export", "code": "device-stream-window",
             "display": "device samples aggregated over a window"}]
    if r["implausible"]:
        tags.append({"system": f"{TWINLINE_CS}quality-flag", "code": "implausible"})
    res: dict[str, Any] = {
        "resourceType": "Observation", "id": "stream-" + hashlib.blake2b(key.encode(), digest_size=16).hexdigest(),
        "meta": {"tag": tags}, "status": "final",
        "category": [known("observation_category", r["category_code"])] if r["category_code"] else None,
        "code": concept(r["code_system"], r["code"], r["code_display"]) or absent(),
        "subject": b.ref(s, "Patient", r["patient_id"]),
        "effectivePeriod": period(r["start@"], r["end@"]),
        "device": b.ref(s, "Device", r["device_id"]),
    }
    count = _stat("count", "Count", integer=int(r["count"]))
    if r["value_code"] or r["value_display"]:
        res["valueCodeableConcept"] = concept(r["value_code_system"], r["value_code"], r["value_display"])
        res["component"] = [count]
    else:
        unit = {"unit": r["value_unit_display"], "system": UCUM if r["value_unit"] else None, "code": r["value_unit"]}
        q = lambda v: _prune({"value": _num(v), **unit})  # noqa: E731
        res["valueQuantity"] = q(r["mean"]) if _num(r["mean"]) is not None else None
        res["component"] = [c for c in (
            _stat("minimum", "Minimum", q(r["minimum"])) if _num(r["minimum"]) is not None else None,
            _stat("maximum", "Maximum", q(r["maximum"])) if _num(r["maximum"]) is not None else None, count) if c]
        if res["valueQuantity"] is None:
            res["dataAbsentReason"] = {"coding": [{"system": DAR_CS, "code": "unknown"}]}
    return _prune(res)


# --------------------------------------------------------------------------- the twin state


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(dt: datetime | None) -> int | None:
    """Epoch microseconds of a datetime (naive ones are UTC, as in the store)."""
    if dt is None:
        return None
    return ((dt if dt.tzinfo else dt.replace(tzinfo=UTC)) - _EPOCH) // timedelta(microseconds=1)


def instant_text(dt: datetime) -> str:
    """A datetime as a FHIR instant, in UTC."""
    dt = dt.astimezone(UTC) if dt.tzinfo else dt
    frac = f".{dt.microsecond:06d}".rstrip("0") if dt.microsecond else ""
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"


@dataclass
class SummaryIndex:
    """Where the twin's facts live in the Bundle: (what, code, time) -> fullUrl, filled as entries are added."""

    by_code_time: dict[tuple[str, str | None, int | None], str] = field(default_factory=dict)
    encounters: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)
    window_us: int = 3_600_000_000

    def put(self, what: str, code: str | None, at: int | None, url: str) -> None:
        self.by_code_time.setdefault((what, code, at), url)

    def find(self, what: str, code: str | None, at: datetime | None) -> str | None:
        """The entry for a fact; a measurement that came in a device stream is found in its window."""
        t = _us(at)
        url = self.by_code_time.get((what, code, t))
        if url is None and what == "observation" and t is not None:
            url = self.by_code_time.get(("stream", code, t - t % self.window_us))
        return url


_SECTIONS = (  # (key, title, LOINC code, display): the sections of the International Patient Summary they mirror
    ("problems", "Active problems", "11450-4", "Problem list - Reported"),
    ("medications", "Active medications", "10160-0", "History of Medication use Narrative"),
    ("allergies", "Allergies and intolerances", "48765-2", "Allergies and adverse reactions Document"),
    ("vitals", "Latest vital signs", "8716-3", "Vital signs"),
    ("labs", "Latest key laboratory results", "30954-2", "Relevant diagnostic tests/laboratory data Narrative"),
    ("encounters", "Last encounter", "46240-8", "History of Hospitalizations+Outpatient visits Narrative"),
    ("imaging", "Imaging studies", "18748-4", "Diagnostic imaging study"),
    ("devices", "Devices", "46264-8", "History of medical device use"),
)


def twin_state(twin: dict[str, Any], idx: SummaryIndex, subject: str | None, b: BundleBuilder) -> list[dict[str, Any]]:
    """The assembled twin row as resources: a Composition whose sections point at entries, and NEWS2."""
    tw = twin["twin_id"]
    as_of = instant_text(twin["as_of"])
    found: dict[str, Sequence[str | None]] = {
        "problems": [idx.find("condition", c["code"], c["since"]) for c in twin["active_conditions"] or []],
        "medications": [idx.find("medication", c["code"], c["since"]) for c in twin["active_medications"] or []],
        "allergies": [idx.find("allergy", c["code"], c["since"]) for c in twin["allergies"] or []],
        "vitals": [idx.find("observation", v["code"], v["at"]) for v in twin["latest_vitals"] or []],
        "labs": [idx.find("observation", v["code"], v["at"]) for v in twin["latest_labs"] or []],
        "encounters": [idx.encounters.get(twin["last_encounter_id"])] if twin["last_encounter_id"] else [],
        "imaging": idx.lists.get("imaging", []),
        "devices": idx.lists.get("devices", []),
    }
    sections = []
    for key, title, code, display in _SECTIONS:
        urls = list(dict.fromkeys(u for u in found[key] if u))
        sec: dict[str, Any] = {"title": title, "code": {"coding": [{"system": LOINC, "code": code, "display": display}]}}
        if urls:
            sec["entry"] = [b.absolute(u) for u in urls]
        else:
            sec["emptyReason"] = {"coding": [{"system": EMPTY_REASON_CS, "code": "nilknown", "display": "Nil Known"}]}
        sections.append(sec)
    out = []
    news = _news2(twin, idx, subject, as_of, b)
    state_items = [f"as of {as_of}", f"records: {len(twin['patient_ids'] or [])} from {len(twin['sources'] or [])} "
                   "source(s)"]
    if twin["age_years"] is not None:
        state_items.append(f"age: {twin['age_years']} years")
    state_items.append("data-quality flags: " + (", ".join(twin["quality_flags"]) if twin["quality_flags"] else "none"))
    state: dict[str, Any] = {
        "title": "Twin state", "code": {"coding": [{"system": f"{TWINLINE_CS}twin-state", "code": "twin-state",
                                                    "display": "Derived state of the digital twin"}]},
        "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"><ul>'
                 + "".join(f"<li>{html.escape(i)}</li>" for i in state_items) + "</ul></div>"},
    }
    base = f"{TWIN_BASE}{tw}/"
    if news is not None:
        out.append(news)
        state["entry"] = [{"reference": f"Observation/{news['id']}"}]
        b.targets.add(f"{base}Observation/{news['id']}")
    sections.append(state)
    comp = {"resourceType": "Composition", "id": fhir_id(tw), "identifier": {"system": TWIN_ID_SYSTEM, "value": tw},
            "status": "final", "type": {"coding": [{"system": LOINC, "code": "60591-5", "display": "Patient summary Document"}]},
            "subject": b.absolute(subject), "date": as_of, "author": [{"reference": "Device/twinline"}],
            "title": "Digital twin summary", "section": sections}
    b.targets.add(f"{base}Device/twinline")
    author = {"resourceType": "Device", "id": "twinline", "deviceName": [{"name": "Twinline", "type": "user-friendly-name"}],
              "version": [{"value": __version__}]}
    return [_prune(comp), author, *out]


def _news2(twin: dict[str, Any], idx: SummaryIndex, subject: str | None, as_of: str,
           b: BundleBuilder) -> dict[str, Any] | None:
    if twin["news2_score"] is None:
        return None
    inputs = [i for i in twin["news2_inputs"] or []]
    derived, times = [], []
    for i in inputs:
        if i["at"] is None:
            continue
        times.append(i["at"])
        for code in NEWS2_INPUTS.get(i["name"], ()):
            url = idx.find("observation", code, i["at"])
            if url:
                derived.append(url)
                break
    res = {"resourceType": "Observation", "id": f"news2-{fhir_id(twin['twin_id'])}"[:64], "status": "final",
           "category": [{"coding": [{"system": OBS_CATEGORY_CS, "code": "survey"}]}],
           "code": {"coding": [{"system": f"{TWINLINE_CS}twin-state", "code": "news2", "display": "NEWS2 total score"}],
                    "text": "National Early Warning Score 2 (Royal College of Physicians, 2017)"},
           "subject": b.absolute(subject), "effectiveDateTime": instant_text(max(times)) if times else None,
           "issued": as_of, "valueInteger": int(twin["news2_score"]),
           "derivedFrom": [b.absolute(u) for u in dict.fromkeys(derived)] or None,
           "component": [{"code": {"text": i["name"]}, "valueQuantity": {"value": _num(i["value"])}}
                         for i in inputs if _num(i["value"]) is not None] or None}
    return _prune(res)


# --------------------------------------------------------------------------- one twin, all of it

_INSTANTS = {"diagnostic_report": frozenset({"issued"})}
_DATES = {"patient": frozenset({"birth_date"})}
_SIMPLE = (("encounter", encounter), ("condition", condition), ("diagnostic_report", diagnostic_report),
           ("medication", medication), ("procedure", procedure), ("immunization", immunization), ("allergy", allergy))


def _read_group(src: CommittedTables, group: list[str], window: timedelta) -> dict[str, Any]:
    """Every table's rows for a group of twins, dates formatted, sorted by twin and unit."""
    twins = pa.array(group, pa.string())
    parts: dict[str, Any] = {}
    for name in TABLES:
        t = src.scan(name, twins)
        if name == "observation":
            stream = pc.invert(pc.fill_null(pc.starts_with(t.column("unit_key"), _FHIR_OBSERVATION), False))
            parts["stream"] = _Part(aggregate_streams(t.filter(stream), window))
            t = t.filter(pc.invert(stream))
        t = _with_fhir_times(t, src.store.schema.table(name).temporal, _INSTANTS.get(name, frozenset()),
                             _DATES.get(name, frozenset()))
        parts[name] = _Part(_sorted(t, ["twin_id", "source", "unit_key", "row_index"]))
    parts["twin"] = {r["twin_id"]: r for r in src.scan("twin", twins).to_pylist()}
    parts["window_us"] = max(1, int(window.total_seconds())) * 1_000_000
    return parts


def _safely(b: BundleBuilder, make: Callable[[], dict[str, Any]], row: dict[str, Any], rows: dict[str, int],
            base: str) -> str | None:
    """Build and add one resource; a row the builder cannot handle is rejected, and the twin goes on."""
    try:
        res = make()
    except Exception as e:  # noqa: BLE001 - one unit's problem, never the batch's
        table = next(iter(rows), "?")
        b.reject("export-failed", f"{table}: the row could not be turned into FHIR ({type(e).__name__})", row, rows,
                 payload=row)
        return None
    return b.add(base, res, row, rows)


def build_bundle(twin_id: str, parts: dict[str, Any], shared_devices: dict[str, dict[str, Any]],
                 validate: Callable[[dict[str, Any]], str | None] | None, now: str) -> tuple[TwinReport, dict[str, Any]]:
    """One twin's Bundle from its rows (`parts` from `_read_group`)."""
    report = TwinReport(twin_id)
    b = BundleBuilder(twin_id, report, validate)
    idx = SummaryIndex(window_us=parts["window_us"])
    rows = {name: parts[name].rows(twin_id) for name in TABLES}
    for name, rs in rows.items():
        if rs:
            report.rows_read[name] = len(rs)
    streams = parts["stream"].rows(twin_id)
    if streams:
        report.rows_read["observation"] += sum(r["rows"] for r in streams)

    # patients: one Patient per source record, from its patient, identifier and link rows
    records: dict[tuple[str, str], dict[str, Any]] = {}
    for table, slot in (("patient", "row"), ("patient_identifier", "identifiers"), ("patient_link", "links")):
        for r in rows[table]:
            rec = records.setdefault((r["source"], r["patient_id"]), {"source": r["source"], "patient_id": r["patient_id"],
                                                                      "row": None, "identifiers": [], "links": []})
            if slot == "row":
                rec["row"] = r
            else:
                rec[slot].append(r)
    subject = None
    for key in sorted(records):
        rec = records[key]
        counts = {t: n for t, n in (("patient", 1 if rec["row"] else 0), ("patient_identifier", len(rec["identifiers"])),
                                    ("patient_link", len(rec["links"]))) if n}
        first = rec["row"] or (rec["identifiers"] + rec["links"])[0]
        url = _safely(b, partial(patient, rec, twin_id, b), first, counts, source_base(rec["source"]))
        if url and (subject is None or rec["row"] and not subject[1]):
            subject = (url, rec["row"] is not None)
    n_patients = len(b.entries)

    for name, make in _SIMPLE:
        for r in rows[name]:
            url = _safely(b, partial(make, r, b), r, {name: 1}, source_base(r["source"]))
            if url is None:
                continue
            if name == "encounter":
                idx.encounters.setdefault(r["encounter_id"], url)
            elif name in ("condition", "allergy"):
                idx.put(name, r["code"], r["onset#us"], url)
            elif name == "medication":
                idx.put(name, r["code"], r["effective_start#us"], url)

    _observations(rows["observation"], b, idx)
    for r in streams:
        url = _safely(b, partial(stream_observation, r, b), r, {"observation": r["rows"]}, source_base(r["source"]))
        if url:
            idx.put("stream", r["code"], r["window#us"], url)
    _imaging(rows["imaging_study"], rows["imaging_series"], b, idx)
    for r in rows["device"]:
        url = _safely(b, partial(device, r, b), r, {"device": 1}, source_base(r["source"]))
        if url:
            idx.lists.setdefault("devices", []).append(url)
    # equipment the twin's rows point at (a scanner, a ward monitor): not the twin's rows, but not patient data either
    for target in sorted(b.targets - b.urls):
        r = shared_devices.get(target)
        if r is not None:
            _safely(b, partial(device, r, b), r, {}, source_base(r["source"]))

    twin = parts["twin"].get(twin_id)
    if twin is not None:
        base = f"{TWIN_BASE}{twin_id}/"
        try:
            state = twin_state(twin, idx, subject[0] if subject else None, b)
        except Exception as e:  # noqa: BLE001
            b.reject("export-failed", f"twin: the twin state could not be turned into FHIR ({type(e).__name__})",
                     None, {"twin": 1})
        else:
            before = len(b.entries)
            for res in state:
                b.add(base, res, None, {"twin": 1} if res["resourceType"] == "Composition" else {})
            added = b.entries[before:]
            del b.entries[before:]
            b.entries[n_patients:n_patients] = added  # the summary right after the patients
            report.rows_read["twin"] = 1
    return report, b.bundle(now)


def _observations(rs: list[dict[str, Any]], b: BundleBuilder, idx: SummaryIndex) -> None:
    """Observation rows (sorted by unit and row index): each panel row with the component rows after it."""
    i = 0
    while i < len(rs):
        r = rs[i]
        j = i + 1
        while j < len(rs) and rs[j]["is_component"] and (rs[j]["source"], rs[j]["unit_key"]) == (r["source"], r["unit_key"]):
            j += 1
        if r["is_component"]:
            b.reject("orphan-component", "observation: a component row whose panel row is not in the store",
                     r, {"observation": 1})
            i += 1
            continue
        comps = rs[i + 1:j]
        url = _safely(b, partial(observation, r, comps, b), r, {"observation": j - i},
                      source_base(r["source"]))
        if url:
            for x in (r, *comps):
                idx.put("observation", x["code"], r["effective_start#us"], url)
        i = j


def _imaging(studies: list[dict[str, Any]], series: list[dict[str, Any]], b: BundleBuilder, idx: SummaryIndex) -> None:
    by_study: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for x in series:
        by_study.setdefault((x["source"], x["study_id"]), []).append(x)
    for r in studies:
        ser = by_study.pop((r["source"], r["study_id"]), [])
        counts = {"imaging_study": 1, **({"imaging_series": len(ser)} if ser else {})}
        url = _safely(b, partial(imaging_study, r, ser, b), r, counts, source_base(r["source"]))
        if url:
            idx.lists.setdefault("imaging", []).append(url)
    for orphans in by_study.values():
        b.reject("orphan-series", "imaging_series: series rows whose study row is not in the store", orphans[0],
                 {"imaging_series": len(orphans)})


# --------------------------------------------------------------------------- export


def validator() -> Callable[[dict[str, Any]], str | None]:
    """A resource -> None when valid under fhir.resources R4B, else the failing element paths (no values)."""
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    models: dict[str, Any] = {}

    def check(resource: dict[str, Any]) -> str | None:
        rtype = resource["resourceType"]
        model = models.get(rtype) or models.setdefault(rtype, get_fhir_model_class(rtype))
        try:
            model.model_validate(resource)
        except ValidationError as e:
            return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or rtype}: {err['type']}" for err in e.errors()[:5])
        except (TypeError, ValueError, KeyError) as e:  # the models raise a few plain errors on odd shapes
            return f"{rtype}: {type(e).__name__}"
        return None

    return check


def iter_bundles(store: Store, twins: Sequence[str] | None = None, *, validate: bool = False,
                 stream_window: timedelta = timedelta(hours=1), row_budget: int = 250_000,
                 now: datetime | None = None, notes: list[str] | None = None) -> Iterator[tuple[TwinReport, dict[str, Any]]]:
    """(report, Bundle) for each twin (all twins of the `twin` table when `twins` is None), one at a time.

    `notes` receives what the caller should know (twins imported after the last build).
    """
    if stream_window <= timedelta(0):
        raise ConfigError("the device-stream window must be positive (for example 1h)")
    src = CommittedTables(store)
    listing = src.twins()
    known_ids = listing.column("twin_id").to_pylist()
    sizes = {tw: sum(v for _, v in (c or [])) for tw, c in zip(known_ids, listing.column("counts").to_pylist(), strict=True)}
    if twins is None:
        wanted = sorted(known_ids)
        unbuilt = {t for name in ("patient", "patient_identifier") for b in src._batches(name, ["twin_id"])
                   for t in pc.unique(b.column(0)).to_pylist() if t is not None} - set(known_ids)
        if unbuilt and notes is not None:
            notes.append(f"{len(unbuilt):,} twin(s) have rows but are not in the last build, so are not exported: "
                         "run `twin build` first")
    else:
        missing = [t for t in twins if t not in sizes]
        if missing:
            raise ConfigError(f"{len(missing)} twin id(s) not in the twin table: run `twin build`, or give ids "
                              "that `twin show` finds")
        wanted = sorted(dict.fromkeys(twins))
    check = validator() if validate else None
    stamp = instant_text(now or utc_now())
    # devices that belong to no twin (imaging equipment, ward monitors), by the URL a reference to them has
    shared = {f"{source_base(r['source'])}Device/{fhir_id(r['device_id'])}": r
              for r in src.scan("device", None).to_pylist()}
    for group in plan_groups(wanted, sizes, row_budget):
        parts = _read_group(src, group, stream_window)
        for tw in group:
            yield build_bundle(tw, parts, shared, check, stamp)


@dataclass
class ExportResult:
    """What an export wrote: the summary the CLI prints, and the counts that must reconcile."""

    out_dir: Path
    twins: int = 0
    entries: int = 0
    resources: Counter = field(default_factory=Counter)
    rows_read: Counter = field(default_factory=Counter)
    rows_exported: Counter = field(default_factory=Counter)
    rows_rejected: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)  # reason -> units
    external_references: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def add(self, report: TwinReport) -> None:
        self.twins += 1
        self.entries += report.entries
        self.resources.update(report.resources)
        self.rows_read.update(report.rows_read)
        self.rows_exported.update(report.rows_exported)
        self.rows_rejected.update(report.rows_rejected)
        self.rejected.update(r.reason for r in report.rejected)
        self.external_references += len(report.external_references)

    def reconciles(self) -> bool:
        tables = set(self.rows_read) | set(self.rows_exported) | set(self.rows_rejected)
        return all(self.rows_read[t] == self.rows_exported[t] + self.rows_rejected[t] for t in tables)

    def exit_code(self) -> Exit:
        return Exit.QUARANTINED if self.rejected else Exit.OK

    def summary(self) -> str:
        read, done, bad = (sum(c.values()) for c in (self.rows_read, self.rows_exported, self.rows_rejected))
        lines = [f"export (fhir): {self.twins:,} twin(s) -> {self.twins:,} Bundle(s), {self.entries:,} entries, "
                 f"in {self.out_dir} ({self.seconds:.1f} s)",
                 "  resources: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.resources.items())),
                 f"  rows: read {read:,} = exported {done:,} + rejected {bad:,}"
                 + ("" if self.reconciles() else "  (DOES NOT RECONCILE: please report)"),
                 f"  references: {self.external_references:,} point outside their Bundle (practitioners, "
                 "organisations, locations the twin holds no rows for): listed in index.ndjson"]
        if self.rejected:
            lines.append(f"  rejected: {sum(self.rejected.values()):,} unit(s) ("
                         + ", ".join(f"{k} {v:,}" for k, v in self.rejected.most_common()) + "): see rejected.ndjson")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def export_twins(store: Store, out_dir: Path | str, twins: Sequence[str] | None = None, *, validate: bool = False,
                 stream_window: timedelta = timedelta(hours=1), row_budget: int = 250_000,
                 now: datetime | None = None, progress: Callable[[int], None] | None = None) -> ExportResult:
    """Write `<twin_id>.json` (one Bundle per twin), `index.ndjson` and, if any, `rejected.ndjson` into out_dir.

    File names hold only twin ids (keyed hashes), never patient data. Each Bundle is
    written to a temporary file and renamed, so a reader never sees half a Bundle;
    files are readable by their owner only, as they hold patient data.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    result = ExportResult(out)
    started = time.perf_counter()
    rejected_path = out / "rejected.ndjson"
    rejected_path.unlink(missing_ok=True)
    index_tmp = out / ".index.ndjson.tmp"
    with _private(index_tmp) as index:
        rej = None
        try:
            for report, bundle in iter_bundles(store, twins, validate=validate, stream_window=stream_window,
                                               row_budget=row_budget, now=now, notes=result.notes):
                try:
                    report.file = f"{fhir_id(report.twin_id)}.json"
                    _write_atomic(out / report.file, orjson.dumps(bundle))
                except (TypeError, ValueError) as e:  # a value JSON cannot hold: the twin is rejected, the export goes on
                    report.file = None
                    report.rejected.append(Rejected(STAGE, "export-failed", f"twin: the Bundle could not be written "
                                                    f"as JSON ({type(e).__name__})", f"twin {report.twin_id}"))
                    report.rows_rejected.update(report.rows_exported)
                    report.rows_exported.clear()
                    report.resources.clear()
                    report.entries = 0
                index.write(orjson.dumps(report.line()) + b"\n")
                if report.rejected:
                    rej = rej or _private(rejected_path)
                    for r in report.rejected:
                        rej.write(orjson.dumps({"twin_id": report.twin_id, "stage": r.stage, "reason": r.reason,
                                                "message": r.message, "source_ref": r.source_ref,
                                                "table": r.target_table,
                                                "payload": orjson.loads(r.payload) if r.payload else None}) + b"\n")
                result.add(report)
                if progress:
                    progress(result.twins)
        finally:
            if rej:
                rej.close()
    os.replace(index_tmp, out / "index.ndjson")
    result.seconds = time.perf_counter() - started
    log.info("exported %d twin(s) to %s", result.twins, out)
    return result


def _private(path: Path):
    # O_NOFOLLOW: a symbolic link planted in the output folder under one of our names is an
    # error, not a way to write patient data wherever it points
    try:
        return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "wb")
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"export: {path} is a symbolic link; Twinline does not write patient data through "
                              "one: remove it, or export into a new folder") from None
        raise


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with _private(tmp) as f:
        f.write(data)
    os.replace(tmp, path)


_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> timedelta:
    """`30s`, `15min`, `1h`, `1d` -> a timedelta (the device-stream window)."""
    t = text.strip().lower()
    for unit in sorted(_UNITS, key=len, reverse=True):
        number = t[: -len(unit)]
        if t.endswith(unit) and number.isdigit() and int(number) > 0:
            return timedelta(seconds=int(number) * _UNITS[unit])
    raise ConfigError(f"--stream-window takes a duration such as 30s, 15min, 1h or 1d, not {text!r}")
