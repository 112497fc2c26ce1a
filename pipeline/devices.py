"""Device logs to observation rows: one declarative mapping file per vendor format.

Monitors and wearables write millions of samples, each vendor in its own CSV dialect
(ARCHITECTURE.md: device streams are the one source that skips FHIR). Adding a vendor
must mean writing a TOML file in mappings/devices/, not code: this module reads those
files (the vocabulary is documented in mappings/devices/README.md), recognises which
format a file is in, and turns Arrow record batches of one file into columnar rows of
the observation table. The file handling (preamble, streaming, ragged lines, chunks)
lives in pipeline.connectors.csv_files.

Everything per sample is vectorised (pyarrow + numpy); Python runs per batch, per
signal and per rejected row only, so the cost per sample stays a few nanoseconds.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .arrays import constant, fixed_strings, runs_column
from .errors import ConfigError
from .resources import mappings_dir
from .schema import load_schema

LOINC = "http://loinc.org"
LOCAL_CODES = "https://twinline.dev/codes/device"
CATEGORIES = ("vital-signs", "laboratory", "survey", "social-history", "imaging", "procedure", "exam",
              "therapy", "activity", "device")
DEVICE_KINDS = ("imaging-equipment", "monitor", "wearable", "implant", "other")
PRECISIONS = ("minute", "second", "millisecond")
EPOCH_FORMATS = {"epoch-s": 1_000_000, "epoch-ms": 1_000, "epoch-us": 1}
ELAPSED_FORMATS = {"s": 1_000_000, "ms": 1_000, "min": 60_000_000, "hh:mm": None}
CLOCKS = ("column", "rate", "elapsed", "time-of-day")
# Times outside this window cannot come from a device log: the row is rejected.
EARLIEST_US = int(datetime(1900, 1, 1, tzinfo=UTC).timestamp()) * 1_000_000
LATEST_US = int(datetime(2200, 1, 1, tzinfo=UTC).timestamp()) * 1_000_000


class FileProblem(Exception):
    """A whole file cannot be mapped (bad preamble, missing column): one quarantine entry.

    `reason` is a stable code; the message names fields and line numbers, never values.
    """

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


# --------------------------------------------------------------------------- the mapping model


@dataclass(frozen=True)
class Source:
    """Where one value comes from: a literal, a preamble line, the path, a header name, a sidecar, a column."""

    kind: str  # value | line | path | header | sidecar | column
    arg: Any
    field: int = 1
    pattern: re.Pattern[str] | None = None
    key: str | None = None
    format: str | None = None

    def describe(self) -> str:
        if self.kind == "line":
            return f"line {self.arg} field {self.field}"
        if self.kind == "sidecar":
            return f"{self.arg} key {self.key}"
        return f"{self.kind} {self.arg!r}" if self.kind != "value" else "the mapping's value"


@dataclass(frozen=True)
class Signal:
    """One observed quantity: where its values are, what code and unit they get, what is impossible."""

    name: str
    column: str | None
    key: str | None
    code: str
    system: str
    display: str | None
    unit: str | None
    unit_display: str | None
    scale: float
    offset: float
    missing: tuple[float, ...]
    missing_text: tuple[str, ...]
    limits: tuple[float, float] | None
    plausible: tuple[float, float] | None
    category: str
    part: int
    codes: tuple[tuple[float, str, str | None], ...]  # (value as written, code, display), sorted
    value_system: str | None
    constant: float | None

    @property
    def coded(self) -> bool:
        return bool(self.codes)


@dataclass(frozen=True)
class Clock:
    """How a row's time is found (see README, "Time")."""

    kind: str
    column: str | None = None
    format: str | None = None
    hour: str | None = None
    minute: str | None = None
    second: str | None = None
    start: Source | None = None
    rate: Source | None = None
    date: Source | None = None
    precision: str | None = None

    def columns(self) -> list[str]:
        return [c for c in (self.column, self.hour, self.minute, self.second) if c]


@dataclass(frozen=True)
class FileKind:
    """One kind of CSV file of a format (Empatica writes ACC.csv, HR.csv, ...)."""

    format: str
    kind: str
    match: re.Pattern[str]
    signature: tuple[re.Pattern[str], ...]
    skip: str | None
    delimiter: str
    skip_lines: int
    header: bool
    columns: tuple[str, ...]
    units_row: bool
    strip_prefix: re.Pattern[str] | None
    footer: re.Pattern[str] | None
    id_columns: tuple[str, ...]
    row_missing_if: tuple[str, tuple[str, ...] | None] | None
    clock: Clock | None
    layout: str
    key_column: str | None
    value_column: str | None
    part_separator: str | None
    ignore_keys: frozenset[str]
    signals: tuple[Signal, ...]
    timezone: str
    downsample: int | None  # window in microseconds

    @property
    def head_lines(self) -> int:
        """Lines to read before the body: enough for the signature, the preamble and the header."""
        return max(len(self.signature), self.skip_lines + 1 + int(self.header) + int(self.units_row) + 1)


@dataclass(frozen=True)
class IdSpec:
    sources: tuple[Source, ...]
    system: tuple[Source, ...] = ()
    fallback: str = "file"  # device only: when no source names it, one device per "file" or per "folder"


@dataclass(frozen=True)
class Format:
    name: str
    title: str
    spec: str | None
    path: Path
    digest: str
    kinds: tuple[FileKind, ...]
    ignore: tuple[re.Pattern[str], ...]
    device_kind: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    device: IdSpec | None = None
    patient: IdSpec | None = None


# --------------------------------------------------------------------------- loading and validation


_REQUIRED = object()


class _Table:
    """One TOML table being read: collects every problem with its key path, flags unknown keys."""

    def __init__(self, data: Any, where: str, problems: list[str]):
        self.where = where
        self.problems = problems
        self.data = data if isinstance(data, dict) else {}
        if not isinstance(data, dict):
            problems.append(f"{where}: expected a table")
        self.used: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, types: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                self.problems.append(f"{self.path(key)}: required")
                return None
            return default
        v = self.data[key]
        if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            self.problems.append(f"{self.path(key)}: expected {_type_names(types)}")
            return None if default is _REQUIRED else default
        if not isinstance(v, types):
            self.problems.append(f"{self.path(key)}: expected {_type_names(types)}")
            return None if default is _REQUIRED else default
        return v

    def choice(self, key: str, choices: Sequence[str], default: Any = _REQUIRED) -> Any:
        v = self.get(key, str, default)
        if v is not None and v is not default and v not in choices:
            self.problems.append(f"{self.path(key)}: one of {', '.join(choices)}")
            return None
        return v

    def regex(self, key: str, default: Any = None) -> re.Pattern[str] | None:
        v = self.get(key, str, default)
        if v is None:
            return None
        try:
            return re.compile(v)
        except re.error as e:
            self.problems.append(f"{self.path(key)}: not a regular expression ({e})")
            return None

    def table(self, key: str) -> _Table | None:
        self.used.add(key)
        if key not in self.data:
            return None
        return _Table(self.data[key], self.path(key), self.problems)

    def done(self) -> None:
        for key in self.data.keys() - self.used:
            self.problems.append(f"{self.path(key)}: unknown key (see mappings/devices/README.md)")


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "a table"}
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in ts)


_SOURCE_KINDS = ("value", "line", "path", "header", "sidecar", "column")


def _source(raw: Any, where: str, problems: list[str], *, rows: bool = False) -> Source | None:
    t = _Table(raw, where, problems)
    kinds = [k for k in _SOURCE_KINDS if t.has(k)]
    if len(kinds) != 1:
        problems.append(f"{where}: give exactly one of {', '.join(_SOURCE_KINDS)}")
        return None
    kind = kinds[0]
    if kind == "column" and not rows:
        problems.append(f"{where}: a column gives one value per row; here a single value is needed")
    pattern = t.regex("pattern")
    fmt = t.get("format", str, None)
    if kind == "line":
        arg = t.get("line", int)
        if isinstance(arg, int) and arg < 1:
            problems.append(f"{where}.line: lines count from 1")
    elif kind in ("path", "header"):
        arg = t.regex(kind)
        if arg is not None and arg.groups < 1:
            problems.append(f"{where}.{kind}: the regular expression needs a capture group")
    elif kind == "value":
        arg = t.get("value", (str, int, float))
    else:
        arg = t.get(kind, str)
    fld = t.get("field", int, 1)
    key = t.get("key", str, None)
    if kind == "sidecar" and not key:
        problems.append(f"{where}.key: required with sidecar (a dotted path into the JSON)")
    t.done()
    return Source(kind, arg, fld, pattern, key, fmt)


def _sources(raw: Any, where: str, problems: list[str], *, rows: bool = False) -> tuple[Source, ...]:
    items = raw if isinstance(raw, list) else [raw]
    out = [_source(r, f"{where}[{i}]" if isinstance(raw, list) else where, problems, rows=rows)
           for i, r in enumerate(items)]
    srcs = tuple(s for s in out if s is not None)
    if sum(s.kind == "column" for s in srcs) > 1:
        problems.append(f"{where}: at most one column source")
    return srcs


def _pair(t: _Table, key: str) -> tuple[float, float] | None:
    v = t.get(key, list, None)
    if v is None:
        return None
    if len(v) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) or v[0] > v[1]:
        t.problems.append(f"{t.path(key)}: expected [low, high] numbers with low <= high")
        return None
    return float(v[0]), float(v[1])


def _signal(name: str, raw: Any, where: str, problems: list[str], *, long: bool, category: str) -> Signal | None:
    t = _Table(raw, where, problems)
    column = t.get("column", str, None)
    key = t.get("key", (str, int), None)
    constant = t.get("constant", (int, float), None)
    if long:
        if key is None:
            problems.append(f"{where}.key: required in the long layout (the value of the key column)")
        if column is not None or constant is not None:
            problems.append(f"{where}: in the long layout a signal has a key, not a column or constant")
    elif (column is None) == (constant is None):
        problems.append(f"{where}: give a column (or a constant, for rows whose presence is the value)")
    missing = t.get("missing", list, [])
    missing_num = tuple(float(x) for x in missing if isinstance(x, (int, float)) and not isinstance(x, bool))
    missing_text = tuple(x for x in missing if isinstance(x, str))
    if len(missing_num) + len(missing_text) != len(missing):
        problems.append(f"{where}.missing: numbers or strings")
    codes_raw = t.table("codes")
    codes: list[tuple[float, str, str | None]] = []
    if codes_raw is not None:
        for k in list(codes_raw.data):
            v = codes_raw.get(k, (str, list))
            try:
                num = float(k)
            except ValueError:
                problems.append(f"{codes_raw.path(k)}: keys are the numbers written in the file")
                continue
            if isinstance(v, list) and (len(v) != 2 or not all(isinstance(x, str) for x in v)):
                problems.append(f"{codes_raw.path(k)}: \"code\" or [\"code\", \"display\"]")
                continue
            codes.append((num, v[0], v[1]) if isinstance(v, list) else (num, v, None))
        codes_raw.done()
    value_system = t.get("value_system", str, None)
    if codes and not value_system:
        problems.append(f"{where}.value_system: required with codes (the code system of the values)")
    unit = t.get("unit", str, None)
    if not codes and unit is None:
        problems.append(f"{where}.unit: required (a UCUM unit; \"1\" for a pure number)")
    sig = Signal(
        name=name,
        column=column,
        key=str(key) if key is not None else None,
        code=t.get("code", str) or "",
        system=t.get("system", str, LOINC),
        display=t.get("display", str, None),
        unit=unit,
        unit_display=t.get("unit_display", str, None),
        scale=float(t.get("scale", (int, float), 1.0)),
        offset=float(t.get("offset", (int, float), 0.0)),
        missing=missing_num,
        missing_text=missing_text,
        limits=_pair(t, "limits"),
        plausible=_pair(t, "plausible"),
        category=t.choice("category", CATEGORIES, category) or category,
        part=t.get("part", int, 0),
        codes=tuple(sorted(codes)),
        value_system=value_system,
        constant=float(constant) if constant is not None else None,
    )
    t.done()
    return sig


_WINDOW_RE = re.compile(r"^\s*(\d+)\s*(s|sec|min|h)\s*$")


def parse_window(text: str | None) -> int | None:
    """A downsampling window ("30s", "1min", "1h") in microseconds; None or "raw" for the raw stream."""
    if text is None or text.strip().lower() in ("", "raw", "none"):
        return None
    m = _WINDOW_RE.match(text.lower())
    if not m or int(m.group(1)) == 0:
        raise ConfigError(f"downsampling window {text!r} is not understood: use e.g. 30s, 1min, 5min, 1h, or raw")
    return int(m.group(1)) * {"s": 1, "sec": 1, "min": 60, "h": 3600}[m.group(2)] * 1_000_000


def _clock(t: _Table | None, where: str, problems: list[str]) -> Clock | None:
    if t is None:
        problems.append(f"{where}: required (how each row's time is found)")
        return None
    kind = t.choice("clock", CLOCKS)
    src = functools.partial(_opt_source, t)
    clock = Clock(
        kind=kind or "column",
        column=t.get("column", str, None),
        format=t.get("format", str, None),
        hour=t.get("hour", str, None),
        minute=t.get("minute", str, None),
        second=t.get("second", str, None),
        start=src("start"),
        rate=src("rate"),
        date=src("date"),
        precision=t.choice("precision", PRECISIONS, None),
    )
    t.done()
    need = {"column": ("column", "format"), "rate": ("start", "rate"), "elapsed": ("start", "column", "format"),
            "time-of-day": ("date",)}.get(clock.kind, ())
    for k in need:
        if getattr(clock, k) is None:
            problems.append(f"{where}.{k}: required with clock = \"{clock.kind}\"")
    if clock.kind == "column" and clock.format and clock.format not in EPOCH_FORMATS and clock.format != "iso8601" \
            and "%" not in clock.format:
        problems.append(f"{where}.format: epoch-s, epoch-ms, epoch-us, iso8601 or a strptime pattern (%Y-%m-%d ...)")
    if clock.kind == "elapsed" and clock.format not in ELAPSED_FORMATS:
        problems.append(f"{where}.format: one of {', '.join(ELAPSED_FORMATS)}")
    if clock.kind == "time-of-day" and not (clock.column or (clock.hour and clock.minute)):
        problems.append(f"{where}: give column (HH:MM[:SS]) or hour and minute columns")
    return clock


def _opt_source(t: _Table, key: str) -> Source | None:
    t.used.add(key)
    if not t.has(key):
        return None
    return _source(t.data[key], t.path(key), t.problems)


_FILE_KEYS = ("signature", "delimiter", "skip_lines", "header", "columns", "units_row", "strip_prefix", "footer", "id_columns",
              "row_missing_if", "time", "layout", "timezone", "downsample", "category")


def _file_kind(fmt_name: str, raw: dict[str, Any], defaults: dict[str, Any], where: str,
               problems: list[str]) -> FileKind | None:
    merged = {**{k: v for k, v in defaults.items() if k in _FILE_KEYS}, **raw}
    t = _Table(merged, where, problems)
    kind = t.get("kind", str)
    match = t.regex("match", _REQUIRED) if t.has("match") else None
    if match is None and not t.has("match"):
        problems.append(f"{where}.match: required (a regular expression searched in the file name)")
    sig_raw = t.get("signature", list, [])
    signature = []
    for i, s in enumerate(sig_raw):
        try:
            signature.append(re.compile(s))
        except (re.error, TypeError):
            problems.append(f"{where}.signature[{i}]: not a regular expression")
    skip = t.get("skip", str, None)
    timezone = t.get("timezone", str, "UTC")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append(f"{where}.timezone: unknown time zone {timezone!r} (use an IANA name such as Europe/Berlin)")
    try:
        window = parse_window(t.get("downsample", str, None))
    except ConfigError as e:
        problems.append(f"{where}.downsample: {e}")
        window = None
    category = t.choice("category", CATEGORIES, "device") or "device"
    delimiter = t.get("delimiter", str, ",")
    if len(delimiter) != 1 or delimiter in "\r\n\"":
        problems.append(f"{where}.delimiter: one character (not a quote or a line break)")
    layout_t = t.table("layout")
    layout, key_col, value_col, part_sep, ignore_keys = "wide", None, None, None, frozenset()
    if layout_t is not None:
        layout = layout_t.choice("kind", ("wide", "long"), "wide") or "wide"
        key_col = layout_t.get("key", str, None)
        value_col = layout_t.get("value", str, None)
        part_sep = layout_t.get("part_separator", str, None)
        ignore_keys = frozenset(str(k) for k in layout_t.get("ignore_keys", list, []))
        layout_t.done()
        if layout == "long" and not (key_col and value_col):
            problems.append(f"{where}.layout: key and value columns are required for the long layout")
    rmi = t.table("row_missing_if")
    row_missing_if = None
    if rmi is not None:
        col = rmi.get("column", str)
        vals = rmi.get("values", list, None)
        row_missing_if = (col, tuple(str(v) for v in vals) if vals is not None else None)
        rmi.done()
    signals: list[Signal] = []
    sig_t = t.table("signals")
    if skip is None:
        if sig_t is None or not sig_t.data:
            problems.append(f"{where}.signals: at least one signal (or skip = \"why this file is not mapped\")")
        else:
            for name in sig_t.data:
                sig_t.used.add(name)
                s = _signal(name, sig_t.data[name], sig_t.path(name), problems, long=layout == "long",
                            category=category)
                if s is not None:
                    signals.append(s)
    elif sig_t is not None:
        sig_t.used.update(sig_t.data)
    header = t.get("header", bool, True)
    columns = tuple(t.get("columns", list, []))
    if not header and not columns and skip is None:
        problems.append(f"{where}.columns: required when header = false (the names of the columns)")
    strip_prefix = t.regex("strip_prefix")
    footer = t.regex("footer")
    clock = _clock(t.table("time"), f"{where}.time", problems) if skip is None else None
    if skip is not None:
        t.used.add("time")
    fk = FileKind(
        format=fmt_name,
        kind=kind or "",
        match=match or re.compile("(?!)"),
        signature=tuple(signature),
        skip=skip,
        delimiter=delimiter if isinstance(delimiter, str) and len(delimiter) == 1 else ",",
        skip_lines=t.get("skip_lines", int, 0),
        header=header,
        columns=tuple(str(c) for c in columns),
        units_row=t.get("units_row", bool, False),
        strip_prefix=strip_prefix,
        footer=footer,
        id_columns=tuple(str(c) for c in t.get("id_columns", list, [])),
        row_missing_if=row_missing_if,
        clock=clock,
        layout=layout,
        key_column=key_col,
        value_column=value_col,
        part_separator=part_sep,
        ignore_keys=ignore_keys,
        signals=tuple(signals),
        timezone=timezone,
        downsample=window,
    )
    t.done()
    return fk


def _id_spec(t: _Table | None, problems: list[str], *, with_system: bool) -> IdSpec | None:
    if t is None:
        return None
    ids = _sources(t.data["id"], t.path("id"), problems, rows=True) if t.has("id") else ()
    t.used.add("id")
    system: tuple[Source, ...] = ()
    fallback = "file"
    if not with_system:
        fallback = t.choice("fallback", ("file", "folder"), "file") or "file"
    if with_system:
        t.used.add("system")
        raw = t.data.get("system")
        if isinstance(raw, str):
            system = (Source("value", raw),)
        elif raw is not None:
            system = _sources(raw, t.path("system"), problems, rows=True)
        else:
            problems.append(f"{t.path('system')}: required (the identifier namespace, a URI)")
    return IdSpec(ids, system, fallback)


def load_format(path: Path) -> Format:
    """Read and check one mapping file; every problem is reported at once (ConfigError)."""
    problems: list[str] = []
    try:
        raw_bytes = path.read_bytes()
        data = tomllib.loads(raw_bytes.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"device mapping {path.name} cannot be read: {e}") from None
    t = _Table(data, "", problems)
    name = t.get("name", str) or path.stem
    title = t.get("title", str, name)
    spec = t.get("spec", str, None)
    ignore = []
    for i, s in enumerate(t.get("ignore", list, [])):
        try:
            ignore.append(re.compile(s))
        except (re.error, TypeError):
            problems.append(f"ignore[{i}]: not a regular expression")
    dev = t.table("device")
    device_kind = manufacturer = model = None
    device = None
    if dev is not None:
        device_kind = dev.choice("kind", DEVICE_KINDS, "other")
        manufacturer = dev.get("manufacturer", str, None)
        model = dev.get("model", str, None)
        device = _id_spec(dev, problems, with_system=False)
        dev.done()
    pat = t.table("patient")
    patient = _id_spec(pat, problems, with_system=True)
    if pat is not None:
        pat.done()
    defaults = {k: data[k] for k in _FILE_KEYS if k in data}
    t.used.update(defaults)
    kinds = []
    files = t.get("files", list, [])
    if not files:
        problems.append("files: at least one [[files]] entry")
    for i, f in enumerate(files):
        fk = _file_kind(name, f if isinstance(f, dict) else {}, defaults, f"files[{i}]", problems)
        if fk is not None:
            kinds.append(fk)
    seen = set()
    for fk in kinds:
        if fk.kind in seen:
            problems.append(f"files: kind {fk.kind!r} appears twice")
        seen.add(fk.kind)
    t.done()
    if problems:
        raise ConfigError(f"device mapping {path.name} has errors", problems)
    return Format(name=name, title=title, spec=spec, path=path, digest=hashlib.sha256(raw_bytes).hexdigest(),
                  kinds=tuple(kinds), ignore=tuple(ignore), device_kind=device_kind, manufacturer=manufacturer,
                  model=model, device=device, patient=patient)


def load_formats(directory: Path | None = None) -> dict[str, Format]:
    """All mapping files of mappings/devices/ (or `directory`), by format name; read once per folder."""
    return _load_formats((directory or mappings_dir() / "devices").resolve())


@functools.cache
def _load_formats(d: Path) -> dict[str, Format]:
    formats: dict[str, Format] = {}
    problems = []
    for p in sorted(d.glob("*.toml")):
        try:
            f = load_format(p)
        except ConfigError as e:
            problems.extend([f"{p.name}: {x}" for x in e.problems] or [str(e)])
            continue
        if f.name in formats:
            problems.append(f"{p.name}: format name {f.name!r} is also used by {formats[f.name].path.name}")
        formats[f.name] = f
    if problems:
        raise ConfigError("device mappings have errors", problems)
    return formats


# --------------------------------------------------------------------------- detection


def ignored_by(path: Path, formats: Iterable[Format]) -> Format | None:
    """The format whose export includes this non-data file (info.txt, meta.json), if any."""
    posix = path.as_posix()
    for f in formats:
        if any(p.search(posix) for p in f.ignore):
            return f
    return None


def detect(path: Path, head: Sequence[str], formats: dict[str, Format], name: str | None) -> FileKind | str:
    """The file kind a file is in, or a message saying why none or several fit.

    Without a format name, the file name and the first lines must match a kind's
    signature. With a name, only that format's kinds are tried, by file name alone:
    the user has said what the file is, so its lines are checked row by row instead.
    """
    fname = path.name
    if name is not None:
        cands = [k for k in formats[name].kinds if k.match.search(fname)]
        if len(cands) == 1:
            return cands[0]
        kinds = ", ".join(f"{k.kind} ({k.match.pattern})" for k in formats[name].kinds)
        what = "no" if not cands else "more than one"
        return f"{what} file kind of format {name} matches this file name; its kinds are: {kinds}"
    cands = [k for f in formats.values() for k in f.kinds if k.match.search(fname) and _signature_ok(k, head)]
    if len(cands) == 1:
        return cands[0]
    if not cands:
        named = [k for f in formats.values() for k in f.kinds if k.match.search(fname)]
        hint = (f"; its name fits {', '.join(f'{k.format}/{k.kind}' for k in named)} but its first lines do not"
                if named else "")
        known = ", ".join(formats)
        return f"no device format recognises this file{hint}; known formats: {known}; pass --format NAME"
    return ("more than one device format recognises this file: "
            + ", ".join(f"{k.format}/{k.kind}" for k in cands) + "; pass --format NAME")


def _signature_ok(kind: FileKind, head: Sequence[str]) -> bool:
    if len(head) < len(kind.signature):
        return False
    return all(p.search(line) for p, line in zip(kind.signature, head, strict=False))


# --------------------------------------------------------------------------- one file's context


@dataclass
class FileContext:
    """What is known about one file before its body is read: preamble lines, names, units row."""

    path: Path
    digest: Callable[[], str]  # the file's sha256 (hex); may still be computing in another thread
    lines: list[str]  # the lines before the body, decoded (index 0 is line 1)
    raw_names: list[str]  # header names as written (before strip_prefix)
    names: list[str]  # column names used by the mapping
    units: dict[str, str] = field(default_factory=dict)
    _sidecars: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return self.digest()

    def sidecar(self, name: str) -> Any:
        if name not in self._sidecars:
            p = self.path.parent / name
            try:
                if p.stat().st_size > 1 << 20:
                    raise FileProblem("bad-sidecar", f"sidecar {name} is larger than 1 MiB")
                self._sidecars[name] = json.loads(p.read_bytes())
            except FileNotFoundError:
                self._sidecars[name] = None
            except (OSError, ValueError):
                raise FileProblem("bad-sidecar", f"sidecar {name} is not readable JSON") from None
        return self._sidecars[name]


def split_fields(line: str, delimiter: str) -> list[str]:
    """One line's fields, as CSV; a line the csv module refuses (a stray CR) is split plainly."""
    try:
        return next(csv.reader([line], delimiter=delimiter), [])
    except csv.Error:
        return line.split(delimiter)


def resolve(src: Source, ctx: FileContext, delimiter: str) -> str | None:
    """The text a file-level source yields for this file (None when it yields nothing)."""
    value: Any = None
    if src.kind == "value":
        value = src.arg
    elif src.kind == "line":
        if src.arg > len(ctx.lines):
            return None
        fields = split_fields(ctx.lines[src.arg - 1], delimiter)
        value = fields[src.field - 1] if 0 < src.field <= len(fields) else None
    elif src.kind == "path":
        m = src.arg.search(ctx.path.as_posix())
        value = m.group(1) if m else None
    elif src.kind == "header":
        for n in ctx.raw_names:
            m = src.arg.search(n)
            if m:
                value = m.group(1)
                break
    elif src.kind == "sidecar":
        value = ctx.sidecar(src.arg)
        for part in (src.key or "").split("."):
            value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return None
    text = str(value).strip()
    if src.pattern is not None:
        m = src.pattern.search(text)
        text = (m.group(1) if m.groups() else m.group(0)) if m else ""
    return text or None


def first_value(sources: Sequence[Source], ctx: FileContext, delimiter: str) -> str | None:
    for s in sources:
        if s.kind != "column":
            v = resolve(s, ctx, delimiter)
            if v is not None:
                return v
    return None


def scalar_time(text: str, fmt: str | None, tz: str) -> int:
    """One time written in a preamble, sidecar or mapping, as UTC microseconds."""
    if fmt in EPOCH_FORMATS:
        return round(float(text) * EPOCH_FORMATS[fmt])
    if fmt is None or fmt == "iso8601":
        dt = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    else:
        dt = datetime.strptime(text, fmt)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=ZoneInfo(tz))
    return round((dt - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))


# --------------------------------------------------------------------------- vectorised helpers

_NUMBER_RE = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_ISO_RE = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})?$"
_OFFSET_RE = r"(?P<o>Z|[+-]\d{2}:?\d{2})$"


def utf8(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Binary to string; values that are not UTF-8 become null and are flagged."""
    try:
        return pc.cast(col, pa.string()), np.zeros(len(col), bool)
    except pa.ArrowInvalid:
        vals, bad = [], np.zeros(len(col), bool)
        for i, b in enumerate(col.to_pylist()):
            try:
                vals.append(None if b is None else b.decode("utf-8"))
            except UnicodeDecodeError:
                vals.append(None)
                bad[i] = True
        return pa.array(vals, pa.string()), bad


def numbers(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values with NaN for blank or NaN, mask of values that are not numbers)."""
    try:
        arr = pc.cast(col, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        s, bad_utf8 = utf8(col)
        ok = pc.match_substring_regex(s, _NUMBER_RE)
        t = pc.utf8_trim_whitespace(s)
        blank = pc.fill_null(pc.equal(t, ""), True)
        arr = pc.cast(pc.if_else(ok, t, pa.scalar(None, pa.string())), pa.float64())
        vals = arr.to_numpy(zero_copy_only=False)
        bad = ~np.asarray(blank) & ~np.asarray(pc.fill_null(ok, False)) | bad_utf8
        return vals, bad
    vals = arr.to_numpy(zero_copy_only=False)
    return vals, np.isinf(vals)


def part_of(col: pa.Array, sep: str, part: int) -> pa.Array:
    """The part-th piece of each value split on sep ("65.0;85.0" -> "65.0"); empty when there is none."""
    padded = pc.binary_join_element_wise(col, pa.scalar(sep.encode() * part, col.type), b"") if part else col
    return pc.list_element(pc.split_pattern(padded, sep, max_splits=part + 1), part)


def text_values(col: pa.Array) -> pa.Array:
    s, _ = utf8(col)
    return pc.utf8_trim_whitespace(s)


def iso_times(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[np.ndarray, str]]]:
    """ISO 8601 text to (microseconds, bad, has_offset, [(rows, offset as +HH:MM)]).

    Values with an offset come back in UTC, values without one as wall-clock time (the
    caller applies the mapping's time zone).
    """
    s, bad_utf8 = utf8(col)
    zulu = np.asarray(pc.fill_null(pc.ends_with(s, "Z"), False))
    all_zulu = bool(zulu.all())
    if not all_zulu:  # the common export writes Z everywhere: trimming and the regex are for the rest
        s = pc.utf8_trim_whitespace(s)
        zulu = np.asarray(pc.fill_null(pc.ends_with(s, "Z"), False))
    has_off = zulu if all_zulu else np.asarray(pc.fill_null(pc.match_substring_regex(s, _OFFSET_RE), False))
    try:
        if not (has_off.all() or not has_off.any()):
            raise pa.ArrowInvalid("offsets on some values only")
        us = pc.cast(pc.cast(s, pa.timestamp("us", tz="UTC") if has_off.any() else pa.timestamp("us")), pa.int64())
        bad = np.asarray(pc.is_null(us)) | bad_utf8
        out = np.where(bad, 0, us.to_numpy(zero_copy_only=False)).astype(np.int64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        out, bad = _iso_slow(pc.utf8_trim_whitespace(s).to_pylist())
    offsets: list[tuple[np.ndarray, str]] = []
    if has_off.any():
        if all_zulu or zulu[has_off].all():
            offsets.append((has_off, "+00:00"))
        else:
            found = pc.struct_field(pc.extract_regex(s, _OFFSET_RE), [0])
            for o in pc.unique(found).to_pylist():
                if o is not None:
                    norm = "+00:00" if o == "Z" else (o if ":" in o else f"{o[:3]}:{o[3:]}")
                    offsets.append((np.asarray(pc.fill_null(pc.equal(found, o), False)), norm))
    return out, bad, has_off, offsets


def _iso_slow(values: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros(len(values), np.int64)
    bad = np.zeros(len(values), bool)
    for i, v in enumerate(values):
        try:
            if v is None or not re.match(_ISO_RE, v):
                raise ValueError
            dt = datetime.fromisoformat(v[:-1] + "+00:00" if v.endswith("Z") else v)
            base = datetime(1970, 1, 1, tzinfo=UTC) if dt.tzinfo else datetime(1970, 1, 1)
            out[i] = (dt - base) // timedelta(microseconds=1)
        except (ValueError, OverflowError):
            bad[i] = True
    return out, bad


def to_us(v: np.ndarray, factor: float, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Numbers times a unit in microseconds, as int64; values that cannot be a time are flagged."""
    scaled = np.where(bad, 0.0, v) * factor
    bad = bad | ~(np.abs(scaled) < 9e18)  # also NaN and inf
    return np.round(np.where(bad, 0.0, scaled)).astype(np.int64), bad


def local_to_utc(us: np.ndarray, tz: str) -> tuple[np.ndarray, np.ndarray]:
    """Local wall-clock microseconds to UTC; times that do not exist there (DST gap) are flagged.

    An ambiguous time (the repeated hour in autumn) is read as the earlier one.
    """
    if tz == "UTC":
        return us, np.zeros(len(us), bool)
    naive = pa.array(us, pa.timestamp("us"))
    early = pc.assume_timezone(naive, timezone=tz, ambiguous="earliest", nonexistent="earliest")
    late = pc.assume_timezone(naive, timezone=tz, ambiguous="earliest", nonexistent="latest")
    a = pc.cast(early, pa.int64()).to_numpy(zero_copy_only=False)
    b = pc.cast(late, pa.int64()).to_numpy(zero_copy_only=False)
    return a, a != b


def _clean_id(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace").strip()
    return text or None


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


# --------------------------------------------------------------------------- output schema


def _column(parts: list[pa.Array | tuple[Any, int]], typ: pa.DataType) -> pa.ChunkedArray:
    """A chunk's column from its groups' parts: runs of one value (value, count) and per-row
    arrays. Strings of runs only: dictionary-encoded (arrays.runs_column; a column of codes,
    units or ids costs no memory per row and is written as it is). Otherwise plain, the
    runs as shared blocks."""
    if pa.types.is_string(typ) and all(isinstance(p, tuple) for p in parts):
        return runs_column(parts, typ)  # type: ignore[arg-type]
    chunks: list[pa.Array] = []
    for p in parts:
        chunks.extend(constant(p[0], p[1], typ, cache=False) if isinstance(p, tuple) else [p])
    return pa.chunked_array(chunks, typ)


@functools.cache
def output_schema(table: str) -> pa.Schema:
    """The table's own columns (types from schemas/twin-v1.json) plus unit_key and row_index."""
    t = load_schema().table(table)
    own = [t.by_name[c] for c in t.own_columns]
    return pa.schema([pa.field(c.name, c.arrow) for c in own]
                     + [pa.field("unit_key", pa.string()), pa.field("row_index", pa.int32())])


def single_row_table(table: str, values: dict[str, Any], unit_key: str) -> pa.Table:
    schema = output_schema(table)
    row = {**values, "unit_key": unit_key, "row_index": 0}
    return pa.Table.from_pylist([{f.name: row.get(f.name) for f in schema}], schema=schema)


# --------------------------------------------------------------------------- mapping one file


@dataclass
class RowProblem:
    """Rows of a batch that cannot be used, by position, with a reason code and words."""

    rows: np.ndarray  # positions in the batch
    reason: str
    message: str


Sample = tuple[tuple[int, int, int], np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None", np.ndarray]
"""(signal, patient, device) indexes, then times, values, implausible flags, sequence numbers, time-meta."""


@dataclass
class BatchResult:
    """What one batch gave: samples by (signal, patient, device), and the rows that cannot be used."""

    samples: list[Sample]
    bad: dict[int, tuple[str, list[str]]]  # row -> (first reason, every problem of the row)


@dataclass
class _Group:
    times: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    flags: list[np.ndarray] = field(default_factory=list)
    seqs: list[np.ndarray] = field(default_factory=list)
    tmeta: list[np.ndarray] = field(default_factory=list)
    window: int | None = None  # set on the rows of a downsampled group
    mins: list[np.ndarray] = field(default_factory=list)
    maxs: list[np.ndarray] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)

    def add(self, t: np.ndarray, v: np.ndarray, f: np.ndarray, s: np.ndarray | None, m: np.ndarray) -> None:
        self.times.append(t)
        self.values.append(v)
        self.flags.append(f)
        self.tmeta.append(m)
        if s is not None:
            self.seqs.append(s)

    def __len__(self) -> int:
        return sum(len(t) for t in self.times)


_REASON_ORDER = ("bad-timestamp", "not-a-number", "unknown-parameter", "unknown-code",
                 "value-out-of-limits")


class FileMapper:
    """Maps the record batches of one file to samples, and samples to observation rows.

    State that spans batches lives here: the running sample number (sample-rate
    clocks), the previous time of day (midnight rollover), ids seen, and the samples
    of the current chunk.
    """

    def __init__(self, fmt: Format, kind: FileKind, ctx: FileContext, *, patient_id: str | None = None,
                 patient_system: str | None = None, device_id: str | None = None, window: int | None = None):
        self.fmt, self.kind, self.ctx = fmt, kind, ctx
        self.window = window if window is not None else kind.downsample
        self.names = set(ctx.names)
        clock = kind.clock
        assert clock is not None
        missing = [c for c in clock.columns() if c not in self.names]
        if kind.layout == "long":
            missing += [c for c in (kind.key_column, kind.value_column) if c not in self.names]
        missing += [c for c in kind.id_columns if c not in self.names]
        if missing:
            raise FileProblem("missing-column", f"column {', '.join(missing)} is not in the file "
                                                f"(it has {len(ctx.names)} columns)")
        if kind.layout == "wide":
            self.signals = [s for s in kind.signals if s.constant is not None or s.column in self.names]
            if not self.signals:
                raise FileProblem("no-mapped-columns", "none of the columns the mapping maps is in the file")
        else:
            self.signals = list(kind.signals)
        self._time_setup(clock)
        self.patients: list[str | None] = []
        self.devices: list[str | None] = []
        self._pidx: dict[str | None, int] = {}
        self._didx: dict[str | None, int] = {}
        self.patient_system = None
        self._patient = self._id_setup(fmt.patient, patient_id)
        self._device = self._id_setup(fmt.device, device_id)
        if fmt.patient is not None:
            self.patient_system = first_value(fmt.patient.system, ctx, kind.delimiter)
            self._system_col = next((s.arg for s in fmt.patient.system if s.kind == "column"), None)
        else:
            self._system_col = None
        if patient_system:  # the command line names the namespace: over the mapping's and the rows'
            self.patient_system, self._system_col = patient_system, None
        self._derived: str | None = None
        self.tmeta: list[tuple[str | None, str | None]] = []
        self._tmeta_idx: dict[tuple[str | None, str | None], int] = {}
        self.groups: dict[tuple[int, int, int], _Group] = {}
        self.carry: dict[tuple[int, int, int], _Group] = {}
        # per group: the last time of the previous chunk and how often it came, so that a
        # run of equal times cut by a chunk boundary keeps counting (observation ids)
        self.last_time: dict[tuple[int, int, int], tuple[int, int]] = {}
        self.patient_systems: dict[int, str | None] = {}

    # ------------------------------------------------------------------ ids

    @property
    def derived_device(self) -> str:
        """The device id when no source names the device: one per file (its content) or per export folder."""
        if self._derived is None:
            by_folder = self.fmt.device is not None and self.fmt.device.fallback == "folder"
            self._derived = "dev-" + short_hash(self.fmt.name, "folder" if by_folder else "file",
                                                self.ctx.path.parent.name if by_folder else self.ctx.sha256)[:24]
        return self._derived

    def _id_setup(self, spec: IdSpec | None, cli: str | None) -> tuple[str | None, str | None]:
        """(file-level value, column name or None); the command line wins over the file."""
        if cli:
            return cli, None
        if spec is None:
            return None, None
        col = None
        for s in spec.sources:
            if s.kind == "column":
                col = s.arg if s.arg in self.names else None
                if col:
                    break
            else:
                v = resolve(s, self.ctx, self.kind.delimiter)
                if v is not None:
                    return v, None
        return None, col

    def _index(self, values: list[str | None], table: list[str | None], idx: dict[str | None, int]) -> list[int]:
        out = []
        for v in values:
            i = idx.get(v)
            if i is None:
                i = idx[v] = len(table)
                table.append(v)
            out.append(i)
        return out

    def _ids(self, batch: pa.RecordBatch, which: tuple[str | None, str | None], table: list[str | None],
             idx: dict[str | None, int], fallback: Callable[[], str | None]) -> int | np.ndarray:
        value, col = which
        if col is None:
            return self._index([value if value is not None else fallback()], table, idx)[0]
        raw = batch.column(col)
        if not raw.null_count and pc.all(pc.equal(raw, raw[0])).as_py():
            return self._index([_clean_id(raw[0].as_py()) or fallback()], table, idx)[0]  # one id per file: usual
        # Ids repeat: encode the raw bytes, then clean the few distinct values in Python.
        enc = pc.dictionary_encode(raw)
        names = [_clean_id(v) or fallback() for v in enc.dictionary.to_pylist()]
        codes = enc.indices.to_numpy(zero_copy_only=False)
        if enc.indices.null_count:
            # Only null fields use the fallback: indexing it otherwise would report a
            # device (or patient) that no row refers to.
            names.append(fallback())
            codes = np.where(np.asarray(pc.is_null(enc.indices)), len(names) - 1, codes)
        dict_idx = np.array(self._index(names, table, idx), np.int64)
        return dict_idx[codes.astype(np.int64)]

    # ------------------------------------------------------------------ time

    def _time_setup(self, clock: Clock) -> None:
        tz = self.kind.timezone
        self.start_us = self.date_us = None
        self.rate = 0.0
        if clock.start is not None:
            self.start_us = self._scalar(clock.start, "start time", lambda t: scalar_time(t, clock.start.format, tz))
            if not EARLIEST_US <= self.start_us < LATEST_US:
                raise FileProblem("bad-preamble", f"the start time ({clock.start.describe()}) is out of range")
        if clock.rate is not None:
            self.rate = self._scalar(clock.rate, "sample rate", float)
            if not (self.rate > 0 and math.isfinite(self.rate)):
                raise FileProblem("bad-preamble", f"the sample rate ({clock.rate.describe()}) is not a positive number")
        if clock.date is not None:
            fmt = clock.date.format or "%Y-%m-%d"
            self.date_us = self._scalar(clock.date, "date", lambda t: round(
                (datetime.strptime(t, fmt) - datetime(1970, 1, 1)) / timedelta(microseconds=1)))
        default = {"rate": "millisecond" if self.rate > 1 else "second",
                   "time-of-day": "minute" if not clock.second and clock.format != "hh:mm:ss" else "second",
                   "elapsed": "minute" if clock.format == "hh:mm" else "millisecond"}.get(clock.kind)
        if clock.kind == "column":
            default = "millisecond" if clock.format in ("epoch-ms", "epoch-us") else "second"
        self.precision = clock.precision or default
        self.sample_no = 0
        self.prev_tod: int | None = None
        self.day = 0

    def _scalar(self, src: Source, what: str, parse: Callable[[str], Any]) -> Any:
        text = resolve(src, self.ctx, self.kind.delimiter)
        try:
            if text is None:
                raise ValueError
            return parse(text)
        except (ValueError, OverflowError, TypeError):
            raise FileProblem("bad-preamble", f"the {what} ({src.describe()}) is missing or not understood") from None

    def _meta(self, precision: str | None, offset: str | None) -> int:
        k = (precision, offset)
        i = self._tmeta_idx.get(k)
        if i is None:
            i = self._tmeta_idx[k] = len(self.tmeta)
            self.tmeta.append(k)
        return i

    def _times(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(UTC microseconds, bad mask, time-meta index per row)."""
        clock = self.kind.clock
        assert clock is not None
        n = batch.num_rows
        meta = np.full(n, self._meta(self.precision, None), np.int16)
        local = True
        if clock.kind == "rate":
            idx = np.arange(self.sample_no, self.sample_no + n, dtype=np.float64)
            us = self.start_us + np.round(idx * (1_000_000 / self.rate)).astype(np.int64)
            self.sample_no += n
            return us, np.zeros(n, bool), meta
        if clock.kind == "column":
            col = batch.column(clock.column)
            if clock.format in EPOCH_FORMATS:
                v, bad = numbers(col)
                us, bad = to_us(v, EPOCH_FORMATS[clock.format], bad)
                local = False
            elif clock.format == "iso8601":
                us, bad, has_off, offsets = iso_times(col)
                for rows, off in offsets:
                    meta[rows] = self._meta(self.precision, off)
                if has_off.any():
                    local = False
                    if not has_off.all():
                        loc, gap = local_to_utc(us[~has_off], self.kind.timezone)
                        us = us.copy()
                        us[~has_off] = loc
                        bad[~has_off] |= gap
            else:
                s, bad = utf8(col)
                ts = pc.strptime(pc.utf8_trim_whitespace(s), format=clock.format, unit="us", error_is_null=True)
                local = ts.type.tz is None
                ints = pc.cast(ts, pa.int64())
                bad = bad | np.asarray(pc.is_null(ints))
                us = np.where(bad, 0, ints.to_numpy(zero_copy_only=False)).astype(np.int64)
        elif clock.kind == "elapsed":
            us, bad = self._durations(batch.column(clock.column), clock.format)
            us = us + self.start_us
            local = False
        else:
            us, bad = self._time_of_day(batch, clock)
        if local:
            us, gap = local_to_utc(us, self.kind.timezone)
            bad = bad | gap
        bad = bad | (us < EARLIEST_US) | (us >= LATEST_US)
        return us, bad, meta

    def _durations(self, col: pa.Array, fmt: str | None) -> tuple[np.ndarray, np.ndarray]:
        if fmt == "hh:mm":
            s = text_values(col)
            parts = pc.extract_regex(s, r"^(?P<h>-?\d{1,6}):(?P<m>[0-5]\d)$")
            bad = np.asarray(pc.is_null(parts))
            h = pc.cast(pc.fill_null(pc.struct_field(parts, [0]), "0"), pa.int64()).to_numpy(zero_copy_only=False)
            m = pc.cast(pc.fill_null(pc.struct_field(parts, [1]), "0"), pa.int64()).to_numpy(zero_copy_only=False)
            sign = np.where(h < 0, -1, 1)
            return (h * 3600 + sign * m * 60) * 1_000_000, bad  # at most 6 digits of hours: no overflow
        v, bad = numbers(col)
        return to_us(v, ELAPSED_FORMATS[fmt or "s"], bad)

    def _time_of_day(self, batch: pa.RecordBatch, clock: Clock) -> tuple[np.ndarray, np.ndarray]:
        n = batch.num_rows
        if clock.column:
            s = text_values(batch.column(clock.column))
            parts = pc.extract_regex(s, r"^(?P<h>\d{1,2}):(?P<m>\d{2})(:(?P<s>\d{2}))?$")
            bad = np.asarray(pc.is_null(parts))
            fields = [pc.cast(pc.fill_null(pc.if_else(pc.equal(pc.struct_field(parts, [i]), ""), "0",
                                                      pc.struct_field(parts, [i])), "0"),
                              pa.float64()).to_numpy(zero_copy_only=False) for i in range(3)]
        else:
            fields, bad = [], np.zeros(n, bool)
            for c in (clock.hour, clock.minute, clock.second):
                if c is None:
                    fields.append(np.zeros(n))
                    continue
                v, b = numbers(batch.column(c))
                bad |= b | np.isnan(v)
                fields.append(np.nan_to_num(v))
        h, m, sec = fields
        bad |= ~((h >= 0) & (h <= 23) & (m >= 0) & (m <= 59) & (sec >= 0) & (sec < 60)) | (h != np.floor(h)) | \
            (m != np.floor(m))
        h, m, sec = (np.where(bad, 0, x) for x in (h, m, sec))
        tod = np.where(bad, -1, np.round((h * 3600 + m * 60 + sec) * 1_000_000)).astype(np.int64)
        # Midnight rollover: a time earlier than the previous row's is the next day.
        good = np.flatnonzero(~bad)
        day = np.zeros(n, np.int64)
        if len(good):
            seq = tod[good]
            prev = np.concatenate([[self.prev_tod if self.prev_tod is not None else seq[0]], seq[:-1]])
            inc = np.cumsum(seq < prev) + self.day
            day[good] = inc
            self.day = int(inc[-1])
            self.prev_tod = int(seq[-1])
        return self.date_us + day * 86_400_000_000 + np.maximum(tod, 0), bad

    # ------------------------------------------------------------------ values

    def map_batch(self, batch: pa.RecordBatch) -> BatchResult:
        """Turn one batch into samples and report the rows that cannot be used.

        Batches must come in file order (clocks count samples and days across them);
        `add` then puts the samples into the current chunk. The two steps are apart so
        that mapping can run in the reader's thread while the chunk is built in another.
        """
        n = batch.num_rows
        us, tbad, meta = self._times(batch)
        problems: list[RowProblem] = []
        if tbad.any():
            problems.append(RowProblem(np.flatnonzero(tbad), "bad-timestamp", "time is missing, malformed or impossible"))
        pidx = self._ids(batch, self._patient, self.patients, self._pidx, lambda: None)
        didx = self._ids(batch, self._device, self.devices, self._didx,
                         lambda: self.derived_device if self.fmt.device is not None else None)
        if self._system_col and self._system_col in self.names:
            self._note_systems(batch, pidx)
        absent = self._row_missing(batch)
        seq = None
        if self.kind.id_columns:
            seq = np.zeros(n, np.int64)
            for c in self.kind.id_columns:
                v, b = numbers(batch.column(c))
                b |= ~(np.abs(v) < 9e18)  # blank, NaN or too large for a sample counter
                if b.any():
                    problems.append(RowProblem(np.flatnonzero(b), "not-a-number", f"{c}: not a number"))
                seq = seq * 1_000_003 + np.where(b, 0, v).astype(np.int64)
        streams = self._wide(batch, problems) if self.kind.layout == "wide" else self._long(batch, problems)
        bad_row = np.zeros(n, bool)
        for p in problems:
            bad_row[p.rows] = True
        drop = bad_row if absent is None else bad_row | absent
        samples: list[Sample] = []
        for sig, vals, missing, flags in streams:
            keep = ~missing & ~drop
            samples += self._samples(sig, pidx, didx, keep, us, vals, flags, seq, meta)
        bad: dict[int, tuple[str, list[str]]] = {}
        for p in sorted(problems, key=lambda p: _REASON_ORDER.index(p.reason)):
            for r in p.rows.tolist():
                entry = bad.get(r)
                if entry is None:
                    bad[r] = (p.reason, [p.message])
                elif p.message not in entry[1]:
                    entry[1].append(p.message)
        return BatchResult(samples, bad)

    def _note_systems(self, batch: pa.RecordBatch, pidx: int | np.ndarray) -> None:
        """The identifier system of each patient: the first one its rows name."""
        enc = pc.dictionary_encode(batch.column(self._system_col))
        systems = [_clean_id(v) for v in enc.dictionary.to_pylist()]
        codes = np.asarray(pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False), np.int64)
        combo = np.asarray(pidx, np.int64) * (len(systems) + 1) + codes + 1
        uniq, first = np.unique(np.broadcast_to(combo, codes.shape), return_index=True)
        for c in uniq[np.argsort(first)].tolist():
            p, code = divmod(c, len(systems) + 1)
            if code and p not in self.patient_systems and systems[code - 1]:
                self.patient_systems[p] = systems[code - 1]

    def _row_missing(self, batch: pa.RecordBatch) -> np.ndarray | None:
        rule = self.kind.row_missing_if
        if rule is None or rule[0] not in self.names:
            return None
        s = pc.fill_null(text_values(batch.column(rule[0])), "")
        if rule[1] is None:
            return np.asarray(pc.not_equal(s, ""))
        return np.asarray(pc.is_in(s, value_set=pa.array(rule[1], pa.string())))

    def _wide(self, batch: pa.RecordBatch, problems: list[RowProblem]) -> list[tuple]:
        n = batch.num_rows
        out = []
        for i, s in enumerate(self.signals):
            if s.constant is not None:
                out.append((i, np.full(n, s.constant), np.zeros(n, bool), np.zeros(n, bool)))
                continue
            col = batch.column(s.column)
            if self.kind.part_separator:
                col = part_of(col, self.kind.part_separator, s.part)
            out.append(self._values(i, s, col, None, n, problems))
        return out

    def _long(self, batch: pa.RecordBatch, problems: list[RowProblem]) -> list[tuple]:
        keys = text_values(batch.column(self.kind.key_column))
        col = batch.column(self.kind.value_column)
        key_list = [s.key for s in self.signals]
        sig = pc.index_in(keys, value_set=pa.array(key_list, pa.string())).to_numpy(zero_copy_only=False)
        unknown = np.isnan(sig) if sig.dtype.kind == "f" else np.zeros(len(sig), bool)
        sig = np.nan_to_num(sig, nan=-1).astype(np.int64) if sig.dtype.kind == "f" else sig.astype(np.int64)
        ignored = np.asarray(pc.fill_null(pc.is_in(keys, value_set=pa.array(sorted(self.kind.ignore_keys),
                                                                              pa.string())), False))
        unknown &= ~ignored
        if unknown.any():
            problems.append(RowProblem(np.flatnonzero(unknown), "unknown-parameter",
                                       f"{self.kind.key_column}: not a parameter the mapping knows or ignores"))
        out = []
        # One pass per signal present: long files carry few signals per batch, and each
        # signal then keeps scalar parameters like the wide layout.
        for i in np.unique(sig[sig >= 0]).tolist():
            rows = np.flatnonzero(sig == i)
            s = self.signals[i]
            sub = col.take(pa.array(rows))
            if self.kind.part_separator:
                sub = part_of(sub, self.kind.part_separator, s.part)
            out.append(self._values(i, s, sub, rows, len(sig), problems))
        return out

    def _values(self, i: int, s: Signal, col: pa.Array, rows: np.ndarray | None, n: int,
                problems: list[RowProblem]) -> tuple:
        """Parse, check and convert one signal's values; rows maps them back to batch rows (long layout)."""
        vals, notnum = numbers(col)
        missing = np.isnan(vals) & ~notnum
        for m in s.missing:
            missing |= vals == m
        if s.missing_text:
            missing |= np.asarray(pc.fill_null(pc.is_in(text_values(col), value_set=pa.array(s.missing_text)), False))
            notnum &= ~missing
        where = (lambda idx: idx) if rows is None else (lambda idx: rows[idx])
        label = s.column or s.key or s.name
        if notnum.any():
            problems.append(RowProblem(where(np.flatnonzero(notnum)), "not-a-number", f"{label}: not a number"))
        if s.coded:
            keys = np.array([c[0] for c in s.codes])
            unknown = ~missing & ~notnum & ~np.isin(vals, keys)
            if unknown.any():
                problems.append(RowProblem(where(np.flatnonzero(unknown)), "unknown-code",
                                           f"{label}: not one of the codes the mapping lists"))
            flags = np.zeros(len(vals), bool)
        else:
            if s.scale != 1.0 or s.offset != 0.0:
                vals = vals * s.scale + s.offset
            live = ~missing & ~notnum
            if s.limits is not None:
                out = live & ((vals < s.limits[0]) | (vals > s.limits[1]))
                if out.any():
                    problems.append(RowProblem(where(np.flatnonzero(out)), "value-out-of-limits",
                                               f"{label}: outside the physical limits "
                                               f"[{s.limits[0]:g}, {s.limits[1]:g}] {s.unit}"))
            flags = live & ((vals < s.plausible[0]) | (vals > s.plausible[1])) if s.plausible else \
                np.zeros(len(vals), bool)
        if rows is not None:
            full_v, full_m, full_f = np.full(n, np.nan), np.ones(n, bool), np.zeros(n, bool)
            full_v[rows], full_m[rows], full_f[rows] = vals, missing | notnum, flags
            return i, full_v, full_m, full_f
        return i, vals, missing | notnum, flags

    def _samples(self, sig: int, pidx: int | np.ndarray, didx: int | np.ndarray, keep: np.ndarray,
                 us: np.ndarray, vals: np.ndarray, flags: np.ndarray, seq: np.ndarray | None,
                 meta: np.ndarray) -> list[Sample]:
        if isinstance(pidx, np.ndarray) and len(pidx) and pidx.min() == pidx.max():
            pidx = int(pidx[0])
        if isinstance(didx, np.ndarray) and len(didx) and didx.min() == didx.max():
            didx = int(didx[0])
        sel: np.ndarray | slice
        if keep.all():
            sel = slice(None)
        else:
            sel = np.flatnonzero(keep)
            if not len(sel):
                return []
        parts: list[tuple[tuple[int, int, int], np.ndarray | slice]]
        if isinstance(pidx, np.ndarray) or isinstance(didx, np.ndarray):
            sel = np.arange(len(keep))[sel]
            p = pidx[sel] if isinstance(pidx, np.ndarray) else np.full(len(sel), pidx)
            d = didx[sel] if isinstance(didx, np.ndarray) else np.full(len(sel), didx)
            combo = p * (1 << 32) + d
            parts = [((sig, c >> 32, c & 0xFFFFFFFF), sel[combo == c]) for c in np.unique(combo).tolist()]
        else:
            parts = [((sig, pidx, didx), sel)]
        return [(key, us[x], vals[x], flags[x], seq[x] if seq is not None else None, meta[x]) for key, x in parts]

    def add(self, result: BatchResult) -> None:
        """Put a mapped batch's samples into the current chunk."""
        for key, t, v, f, q, m in result.samples:
            g = self.groups.get(key)
            if g is None:
                g = self.groups[key] = _Group()
            g.add(t, v, f, q, m)

    # ------------------------------------------------------------------ output

    def take_chunk(self, unit_key: str, final: bool) -> pa.Table:
        """The observation rows of the samples collected since the last chunk."""
        groups, self.groups = self.groups, {}
        if self.window is not None:
            groups = self._downsample(groups, final)
        schema = output_schema("observation")
        cols: dict[str, list[pa.Array | tuple[Any, int]]] = {f.name: [] for f in schema}
        types = {f.name: f.type for f in schema}
        total = 0
        for key in sorted(groups):
            g = groups.pop(key)  # freed once its rows are built: the chunk's peak stays lower
            n = len(g)
            if not n:
                continue
            self._group_columns(key, g, n, cols, types)
            total += n
        cols["unit_key"] = [(unit_key, total)]
        cols["row_index"] = [pa.array(np.arange(total, dtype=np.int32))]
        return pa.table({name: _column(cols[name] or [(None, total)], types[name]) for name in types})

    def _group_columns(self, key: tuple[int, int, int], g: _Group, n: int,
                       cols: dict[str, list[pa.Array | tuple[Any, int]]], types: dict[str, pa.DataType]) -> None:
        sig_i, pi, di = key
        s = self.signals[sig_i]
        t = np.concatenate(g.times)
        v = np.concatenate(g.values)
        f = np.concatenate(g.flags)
        meta = np.concatenate(g.tmeta)
        device = self.devices[di] if di < len(self.devices) else None
        device_id = self.device_id(device) if device is not None else None
        patient_id = self.patients[pi] if pi < len(self.patients) else None
        win = g.window
        # the patient is part of the id: without a device (PhysioNet records name none), two
        # patients' samples of one signal at the same time would share it
        prefix = short_hash(patient_id or "", device_id or "", self.fmt.name, self.kind.kind, s.name, s.system,
                            s.code, str(win or ""))[:15] + "-"
        parts: list[np.ndarray | bytes] = [prefix.encode(), t]
        if g.seqs:
            parts += [b"-", np.concatenate(g.seqs)]
        repeats = None if g.seqs or win else self._repeats(key, t)
        unit_display = s.unit_display or self.ctx.units.get(s.column or "") or s.unit
        const = {
            "patient_id": patient_id,
            "device_id": device_id,
            "is_component": False,
            "panel_code": s.code,
            "category_code": s.category,
            "code_system": s.system,
            "code": s.code,
            "code_display": s.display,
            "value_type": "CodeableConcept" if s.coded else "Quantity",
            "value_unit": None if s.coded else s.unit,
            "value_unit_display": None if s.coded else unit_display,
            "value_code_system": s.value_system if s.coded else None,
            "status": "final",
        }
        ids = fixed_strings(parts, n)
        if repeats is not None:  # the 2nd, 3rd... sample at one time: `~<16 hex of the count>`
            rep = np.flatnonzero(repeats)
            extra = fixed_strings([prefix.encode(), t[rep], b"~", repeats[rep]], len(rep))
            ids = pc.replace_with_mask(ids, pa.array(repeats > 0), extra)
        per_row: dict[str, pa.Array] = {
            "observation_id": ids,
            "effective_start": pa.array(t, pa.timestamp("us", tz="UTC")),
        }
        if s.coded:
            keys = np.array([c[0] for c in s.codes])
            pos = np.searchsorted(keys, v)
            per_row["value_code"] = pc.take(pa.array([c[1] for c in s.codes], pa.string()), pa.array(pos))
            per_row["value_display"] = pc.take(pa.array([c[2] for c in s.codes], pa.string()), pa.array(pos))
        else:
            per_row["value_number"] = pa.array(v, pa.float64())
        if f.any():
            per_row["quality_flag"] = pc.if_else(pa.array(f), pa.scalar("implausible"), pa.scalar(None, pa.string()))
        if win:
            per_row["value_min"] = pa.array(np.concatenate(g.mins), pa.float64())
            per_row["value_max"] = pa.array(np.concatenate(g.maxs), pa.float64())
            per_row["sample_count"] = pa.array(np.concatenate(g.counts), pa.int64())
            per_row["effective_end"] = pa.array(t + win, pa.timestamp("us", tz="UTC"))
            const["effective_end_precision"] = const_prec = self._window_precision(win)
            const["effective_start_precision"] = const_prec
        else:
            if meta.min() == meta.max():
                prec, off = self.tmeta[int(meta[0])]
                const["effective_start_precision"] = prec
                const["effective_start_offset"] = off
            else:
                per_row["effective_start_precision"] = pc.take(pa.array([m[0] for m in self.tmeta], pa.string()),
                                                               pa.array(meta))
                per_row["effective_start_offset"] = pc.take(pa.array([m[1] for m in self.tmeta], pa.string()),
                                                            pa.array(meta))
        for name, value in const.items():
            if name in cols:
                cols[name].append((value, n))
        for name, arr in per_row.items():
            if name in cols:
                cols[name].append(arr)
        for name in cols:
            if name not in const and name not in per_row and name not in ("unit_key", "row_index"):
                cols[name].append((None, n))

    def _repeats(self, key: tuple[int, int, int], t: np.ndarray) -> np.ndarray | None:
        """For each sample, how many earlier samples of its group share its time (None when
        none does: the usual, strictly increasing stream costs one comparison per sample).
        Some devices write two values in one minute or one millisecond (PhysioNet urine,
        Shimmer); without this they would share an observation id."""
        last = self.last_time.get(key)
        if len(t):
            self.last_time[key] = (int(t[-1]), 0)
        if len(t) == 0 or ((len(t) < 2 or bool((np.diff(t) > 0).all())) and (last is None or last[0] != t[0])):
            return None
        order = np.argsort(t, kind="stable")
        st = t[order]
        pos = np.arange(len(st))
        start = np.maximum.accumulate(np.where(np.r_[True, st[1:] != st[:-1]], pos, 0))
        counts = np.empty(len(t), np.int64)
        counts[order] = pos - start
        if last is not None:
            counts[t == last[0]] += last[1] + 1
        self.last_time[key] = (int(t[-1]), int(counts[-1]))
        return counts if counts.any() else None

    @staticmethod
    def _window_precision(win: int) -> str:
        return "second" if win % 60_000_000 else "minute"

    def device_id(self, device: str) -> str:
        """The stored id of a device: a hash of what identifies it, so the serial stays in the device table."""
        if device == self.derived_device:
            return device
        return "dev-" + short_hash(self.fmt.manufacturer or "", self.fmt.model or "", device)[:24]

    # ------------------------------------------------------------------ downsampling

    def _downsample(self, groups: dict[tuple[int, int, int], _Group], final: bool) -> dict:
        """Window means (min, max, count) per signal; the last, unfinished window waits for the next chunk."""
        w = self.window
        assert w is not None
        merged = {}
        for key in set(groups) | set(self.carry):
            g = _Group()
            for src in (self.carry.get(key), groups.get(key)):
                if src is not None:
                    g.times += src.times
                    g.values += src.values
                    g.flags += src.flags
                    g.tmeta += src.tmeta
            merged[key] = g
        self.carry = {}
        cut = None
        if not final:
            latest = max((int(np.concatenate(g.times).max()) for g in merged.values() if len(g)), default=None)
            cut = (latest // w) * w if latest is not None else None
        out = {}
        for key, g in merged.items():
            if not len(g):
                continue
            t = np.concatenate(g.times)
            v = np.concatenate(g.values)
            f = np.concatenate(g.flags)
            if self.signals[key[0]].coded:
                out[key] = g  # coded values are not averaged: they pass through raw
                continue
            if cut is not None:
                later = t >= cut
                if later.any():
                    c = _Group()
                    c.add(t[later], v[later], f[later], None, np.concatenate(g.tmeta)[later])
                    self.carry[key] = c
                    t, v, f = t[~later], v[~later], f[~later]
            if not len(t):
                continue
            tab = pa.table({"w": pa.array(t // w), "v": pa.array(v), "f": pa.array(f)})
            agg = tab.group_by("w").aggregate([("v", "mean"), ("v", "min"), ("v", "max"), ("v", "count"),
                                               ("f", "any")]).sort_by("w")
            starts = agg.column("w").to_numpy() * w
            r = _Group(window=w, mins=[agg.column("v_min").to_numpy()], maxs=[agg.column("v_max").to_numpy()],
                       counts=[agg.column("v_count").to_numpy()])
            r.add(starts, agg.column("v_mean").to_numpy(), agg.column("f_any").to_numpy(zero_copy_only=False),
                  None, np.full(len(starts), self._meta(self._window_precision(w), None), np.int16))
            out[key] = r
        return out

    # ------------------------------------------------------------------ devices and patients seen

    def device_rows(self) -> list[dict[str, Any]]:
        if self.fmt.device is None:
            return []
        out = []
        patients = [p for p in list(self.patients) if p is not None]
        patient = patients[0] if len(patients) == 1 else None
        for d in list(self.devices):
            if d is None:
                continue
            derived = d == self.derived_device
            out.append({"device_id": self.device_id(d), "patient_id": patient, "kind": self.fmt.device_kind,
                        "manufacturer": self.fmt.manufacturer, "model": self.fmt.model,
                        "serial_number": None if derived else d})
        return out

    def patient_rows(self) -> list[dict[str, Any]]:
        out = []
        for i, p in enumerate(list(self.patients)):
            if p is None:
                continue
            system = self.patient_systems.get(i, self.patient_system)
            out.append({"patient_id": p, "system": system, "value": p})
        return out
