"""HL7 v2 messages -> FHIR R4 resources, driven by the declarative maps in mappings/hl7v2/.

The maps say which message types make which resources, from which segments, with which
HL7 v2 data type conversion and which code table (vocabulary: mappings/hl7v2/README.md);
this module only knows the conversions themselves (CX -> Identifier, DTM -> dateTime, ...,
named as in the HL7 v2-to-FHIR IG) and how to run a map. Maps are compiled once; a
message is parsed once and each rule reads only the fields it names, which is what lets
parse + map run at several thousand messages per second on one core.

A message maps whole or is refused whole: `map_message` returns every resource, or one
`Rejected` carrying the raw message and every problem found (positions and field names,
never values). Resource ids are deterministic (a hash of what identifies the thing in
the message), so the same message always gives the same ids and re-sending it changes
nothing downstream.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path as FsPath
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ConfigError
from .hl7v2 import (
    DEFAULT_DELIMITERS as STANDARD,
)
from .hl7v2 import (
    DEFAULT_LIMITS,
    HL7ParseError,
    Limits,
    Message,
    Path,
    compile_path,
    parse_message,
)
from .resources import mappings_dir
from .units import Rejected, Resource

UCUM = "http://unitsofmeasure.org"
DAR_URL = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
DAR_SYSTEM = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
RACE_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
ETHNICITY_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"

# Rejected reasons -> ACK code (HL7 v2.5 section 2.9.2: MSH-9/-11/-12 validation failures are
# AR; content errors are AE).
_AR_REASONS = frozenset((
    "no-msh", "bad-msh", "bad-encoding-characters", "unsupported-charset", "bad-charset",
    "unsupported-version", "unsupported-message-type", "multiple-messages", "message-too-large",
    "line-too-long",
))


@dataclass(frozen=True, slots=True)
class MappedMessage:
    """The outcome of mapping one message: its resources, or why it was refused, and the ACK code."""

    control_id: str | None
    message_type: str | None
    resources: list[Resource]
    rejected: Rejected | None
    ack_code: str  # "AA" | "AE" | "AR"


# ======================================================================================
# Vocabulary: code tables, code systems, units, assigning authorities


@dataclass(frozen=True, slots=True)
class Table:
    """An HL7 v2 code table mapped to FHIR codes (mappings/hl7v2/tables.toml)."""

    name: str
    map: dict[str, Any]
    system: str | None = None
    unmapped: str = "invalid"        # invalid | drop | keep | default
    unmapped_system: str | None = None
    default: Any = None
    display: dict[str, str] = field(default_factory=dict)


_TABLE_KEYS = {"map", "system", "unmapped", "unmapped_system", "default", "display", "source", "url"}


def _load_tables(path: FsPath, problems: list[str]) -> dict[str, Table]:
    data = _read_toml(path, problems)
    tables: dict[str, Table] = {}
    for name, spec in data.items():
        where = f"{path.name} [{name}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("map"), dict):
            problems.append(f"{where}: a table needs a `map` of v2 code -> FHIR code")
            continue
        extra = set(spec) - _TABLE_KEYS
        if extra:
            problems.append(f"{where}: unknown keys {sorted(extra)}")
        unmapped = spec.get("unmapped", "invalid")
        if unmapped not in ("invalid", "drop", "keep", "default"):
            problems.append(f"{where}: unmapped must be invalid, drop, keep or default")
        if unmapped == "default" and "default" not in spec:
            problems.append(f"{where}: unmapped = \"default\" needs a `default`")
        tables[name] = Table(name, {str(k): v for k, v in spec["map"].items()}, spec.get("system"), unmapped,
                             spec.get("unmapped_system"), spec.get("default"), dict(spec.get("display", {})))
    return tables


def _read_csv_map(path: FsPath, problems: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.reader(line for line in f if line.strip() and not line.startswith("#"))
            header = next(rows, None)
            if header is None or len(header) < 2:
                problems.append(f"{path.name}: expected a header row with two columns")
                return out
            for n, row in enumerate(rows, 2):
                if len(row) < 2 or not row[0] or not row[1]:
                    problems.append(f"{path.name}: row {n} needs two values")
                    continue
                out[row[0].strip()] = row[1].strip()
    except OSError as e:
        problems.append(f"{path}: cannot read ({e.strerror})")
    return out


@dataclass(slots=True)
class Vocabulary:
    tables: dict[str, Table]
    coding_systems: dict[str, str]
    units: dict[str, str]
    units_folded: dict[str, str]
    authorities: dict[str, str]
    timezone: ZoneInfo

    def system_for(self, name: str) -> str | None:
        """FHIR code system URI for an HL7 v2 coding system name (table 0396), or None."""
        if not name:
            return None
        uri = self.coding_systems.get(name) or self.coding_systems.get(name.upper())
        if uri:
            return uri
        m = _HL7_TABLE.match(name)
        if m:
            return f"http://terminology.hl7.org/CodeSystem/v2-{int(m[1]):04d}"
        return None

    def ucum_for(self, unit: str) -> str | None:
        if not unit:
            return None
        hit = self.units.get(unit)
        if hit is None and len(unit) >= 3:
            hit = self.units_folded.get(unit.lower())
        return hit


_HL7_TABLE = re.compile(r"(?:HL7)(\d{3,5})\Z", re.IGNORECASE)


# ======================================================================================
# Compiled maps


@dataclass(slots=True)
class Rule:
    """One `[[map]]` entry, compiled."""

    to: str
    steps: tuple[tuple[int, str], ...]
    sources: tuple[Path, ...]
    const: Any
    conv: Converter | None
    table: Table | None
    system: str | None
    repeat: bool
    required: bool
    default: Any
    has_default: bool
    when: tuple[Path, ...]
    unless: tuple[Path, ...]
    ref: str | None
    refs: str | None
    wrap: str | None
    with_: dict | None
    type_from: Path | None
    unit_from: Path | None
    types: dict[str, str]
    probe: tuple[str, int] | None = None   # (segment, field): when that field is empty the rule does nothing
    key: str | None = None                 # the target is one plain key of the resource (most rules)
    apply: Callable[[Run, dict], None] | None = None  # the compiled rule (compile_apply)


@dataclass(slots=True)
class IdPart:
    path: Path | None
    token: str | None
    optional: bool


@dataclass(slots=True)
class ResourceMap:
    name: str
    type: str
    anchor: str
    children: frozenset[str]
    boundary: frozenset[str]
    ids: list[list[IdPart]]
    rules: list[Rule]


@dataclass(slots=True)
class MessageMap:
    types: tuple[str, ...]
    requires: tuple[str, ...]
    resources: list[ResourceMap]


# Target steps
_KEY, _APPEND, _FIRST, _VALUEX = 0, 1, 2, 3
_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\[\]|\[0\]|\[x\])?\Z")


def _compile_target(text: str) -> tuple[tuple[int, str], ...]:
    steps = []
    parts = text.split(".")
    for i, part in enumerate(parts):
        m = _STEP.match(part)
        if not m:
            raise ValueError(f"bad target path {text!r} (use a.b, a[] to append, a[0] for the first element)")
        name, mark = m.groups()
        if mark == "[x]":
            if i != len(parts) - 1:
                raise ValueError(f"[x] only at the end of a target: {text!r}")
            steps.append((_VALUEX, name))
        else:
            steps.append(({None: _KEY, "[]": _APPEND, "[0]": _FIRST}[mark], name))
    return tuple(steps)


_RULE_KEYS = {"to", "from", "value", "as", "table", "system", "repeat", "required", "default", "when", "unless",
              "ref", "refs", "wrap", "with", "type_from", "unit_from", "types"}
_MAP_KEYS = {"resource", "anchor", "children", "group_ends", "id", "map"}
_MSG_KEYS = {"types", "requires", "resources"}


@dataclass(slots=True)
class Mappings:
    """All HL7 v2 maps of a mappings folder, compiled. Load once (`default_mappings()`), use many times."""

    messages: dict[str, MessageMap]
    versions: frozenset[str]
    versions_if_known: frozenset[str]
    vocab: Vocabulary
    source: str

    @classmethod
    def load(cls, root: str | FsPath | None = None) -> Mappings:
        """Read and check mappings/hl7v2/*.toml and mappings/codes/*.csv; ConfigError lists every problem."""
        base = FsPath(root) if root is not None else mappings_dir()
        folder = base / "hl7v2"
        codes = base / "codes"
        problems: list[str] = []
        spec = _read_toml(folder / "messages.toml", problems)
        settings = spec.get("settings", {})
        tz_name = settings.get("default_timezone", "UTC")
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(f"messages.toml [settings]: unknown time zone {tz_name!r} (an IANA name, e.g. Europe/Paris)")
            tz = ZoneInfo("UTC")
        units = _read_csv_map(codes / "ucum.csv", problems)
        folded: dict[str, str] = {}
        clashes: set[str] = set()
        for k, v in units.items():
            low = k.lower()
            if low in folded and folded[low] != v:
                clashes.add(low)
            folded[low] = v
        for low in clashes:
            del folded[low]
        vocab = Vocabulary(
            tables=_load_tables(folder / "tables.toml", problems),
            coding_systems=_read_csv_map(codes / "hl7v2_coding_systems.csv", problems),
            units=units,
            units_folded=folded,
            authorities=_read_csv_map(codes / "hl7v2_assigning_authorities.csv", problems),
            timezone=tz,
        )
        resource_maps: dict[str, ResourceMap] = {}
        messages: dict[str, MessageMap] = {}
        for n, entry in enumerate(spec.get("message", []), 1):
            where = f"messages.toml [[message]] #{n}"
            extra = set(entry) - _MSG_KEYS
            if extra:
                problems.append(f"{where}: unknown keys {sorted(extra)}")
            rmaps = []
            for rname in entry.get("resources", []):
                if rname not in resource_maps:
                    rm = _load_resource_map(folder / f"{rname}.toml", rname, vocab, problems)
                    if rm is None:
                        continue
                    resource_maps[rname] = rm
                rmaps.append(resource_maps[rname])
            mm = MessageMap(tuple(entry.get("types", [])), tuple(entry.get("requires", [])), rmaps)
            if not mm.types:
                problems.append(f"{where}: `types` lists no message type (e.g. \"ADT^A01\")")
            for t in mm.types:
                if t in messages:
                    problems.append(f"{where}: {t} is mapped twice")
                messages[t] = mm
        if problems:
            raise ConfigError(f"the HL7 v2 maps in {folder} have problems", problems)
        return cls(messages, frozenset(settings.get("versions", [])),
                   frozenset(settings.get("versions_if_segments_known", [])), vocab, str(folder))


def _read_toml(path: FsPath, problems: list[str]) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        problems.append(f"{path}: cannot read ({e.strerror})")
    except tomllib.TOMLDecodeError as e:
        problems.append(f"{path.name}: not valid TOML ({e})")
    return {}


def _as_paths(value: Any, where: str, problems: list[str]) -> tuple[Path, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        try:
            out.append(compile_path(str(item)))
        except ValueError as e:
            problems.append(f"{where}: {e}")
    return tuple(out)


def _load_resource_map(path: FsPath, name: str, vocab: Vocabulary, problems: list[str]) -> ResourceMap | None:
    spec = _read_toml(path, problems)
    if not spec:
        return None
    where = path.name
    extra = set(spec) - _MAP_KEYS
    if extra:
        problems.append(f"{where}: unknown keys {sorted(extra)}")
    rtype, anchor = spec.get("resource"), spec.get("anchor")
    if not rtype or not anchor:
        problems.append(f"{where}: `resource` (a FHIR type) and `anchor` (a segment id) are required")
        return None
    children = frozenset(spec.get("children", []))
    rules: list[Rule] = []
    for n, entry in enumerate(spec.get("map", []), 1):
        rule = _compile_rule(entry, f"{where} [[map]] #{n}", vocab, problems)
        if rule is not None:
            rules.append(rule)
    ids: list[list[IdPart]] = []
    for alt in spec.get("id", []):
        parts = []
        for item in alt:
            item = str(item)
            optional = item.endswith("?")
            item = item.rstrip("?")
            if item.startswith("#"):
                if item != "#position":
                    problems.append(f"{where}: id token {item} unknown (only #position)")
                parts.append(IdPart(None, item, optional))
                continue
            try:
                parts.append(IdPart(compile_path(item), None, optional))
            except ValueError as e:
                problems.append(f"{where} id: {e}")
        ids.append(parts)
    if not ids:
        problems.append(f"{where}: `id` needs at least one list of accessors")
    referenced = set()
    for r in rules:
        referenced.update(p.segment for p in r.sources + r.when + r.unless)
        referenced.update(p.segment for p in (r.type_from, r.unit_from) if p is not None)
        referenced.update(x for x in (r.ref,) if x)
    for alt in ids:
        referenced.update(p.path.segment for p in alt if p.path is not None)
    boundary = frozenset({anchor, "MSH"} | (referenced - children) | set(spec.get("group_ends", [])))
    return ResourceMap(name, rtype, anchor, children, boundary, ids, rules)


def _compile_rule(entry: dict, where: str, vocab: Vocabulary, problems: list[str]) -> Rule | None:
    extra = set(entry) - _RULE_KEYS
    if extra:
        problems.append(f"{where}: unknown keys {sorted(extra)}")
    to = entry.get("to")
    if not to:
        problems.append(f"{where}: `to` (the FHIR element) is required")
        return None
    try:
        steps = _compile_target(to)
    except ValueError as e:
        problems.append(f"{where}: {e}")
        return None
    kinds = [k for k in ("from", "value", "ref", "refs") if k in entry]
    if len(kinds) != 1:
        problems.append(f"{where}: give exactly one of `from`, `value`, `ref`, `refs`")
        return None
    conv = None
    if "from" in entry:
        conv = CONVERTERS.get(entry.get("as", ""))
        if conv is None:
            problems.append(f"{where}: `as = {entry.get('as')!r}` is no conversion; use one of {sorted(CONVERTERS)}")
            return None
    table = None
    if "table" in entry:
        table = vocab.tables.get(entry["table"])
        if table is None:
            problems.append(f"{where}: no table {entry['table']!r} in tables.toml")
    sources = _as_paths(entry.get("from"), where, problems)
    if conv is not None and conv.kind != SCALAR and any(p.component is not None for p in sources):
        problems.append(f"{where}: {entry.get('as')} reads whole fields: give `from` without a component")
    if (steps[-1][0] == _VALUEX) != (conv is not None and conv.kind == VALUEX):
        problems.append(f"{where}: a `value[x]` target goes with `as = \"varies[value]\"` and only with it")
    probe = None
    if len(sources) == 1 and "when" not in entry and "unless" not in entry and "default" not in entry \
            and not entry.get("required"):
        probe = (sources[0].segment, sources[0].field)
    rule = Rule(
        probe=probe, key=steps[0][1] if len(steps) == 1 and steps[0][0] == _KEY else None,
        to=to, steps=steps, sources=sources, const=entry.get("value"), conv=conv, table=table,
        system=entry.get("system"), repeat=bool(entry.get("repeat", False)), required=bool(entry.get("required", False)),
        default=entry.get("default"), has_default="default" in entry,
        when=_as_paths(entry.get("when"), where, problems), unless=_as_paths(entry.get("unless"), where, problems),
        ref=entry.get("ref"), refs=entry.get("refs"), wrap=entry.get("wrap"), with_=entry.get("with"),
        type_from=(_as_paths(entry["type_from"], where, problems) or (None,))[0] if "type_from" in entry else None,
        unit_from=(_as_paths(entry["unit_from"], where, problems) or (None,))[0] if "unit_from" in entry else None,
        types=dict(entry.get("types", {})),
    )
    rule.apply = compile_apply(rule)
    return rule


@lru_cache(maxsize=8)
def _cached_mappings(twin_home: str | None) -> Mappings:
    return Mappings.load(mappings_dir())


def default_mappings() -> Mappings:
    """The maps of the project's mappings/ folder (or $TWIN_HOME/mappings), loaded once."""
    return _cached_mappings(os.environ.get("TWIN_HOME"))


# ======================================================================================
# Running a map on a message


class _Invalid(Exception):
    """A value that does not convert; carries a description without the value."""


_SENTINEL = object()


class Run:
    """State of mapping one message: the message, the problems found, lookups cached."""

    __slots__ = ("msg", "maps", "vocab", "strict", "errors", "invalid", "names", "_msh_offset", "_anchor",
                 "_rmap", "_loc_cache", "by_pos", "loc", "text", "comps", "subs")

    def __init__(self, msg: Message, maps: Mappings, strict: bool):
        self.msg = msg
        self.maps = maps
        self.vocab = maps.vocab
        self.strict = strict
        self.errors: list[tuple[str, str, str]] = []    # (reason, locator, text): always refuse
        self.invalid: list[tuple[str, str]] = []        # (locator, text): refuse in strict mode
        self.loc: Path | None = None                     # the field being converted
        self.names = msg.names
        self._msh_offset: Any = _SENTINEL
        self._anchor = 0
        self._rmap: ResourceMap | None = None
        self._loc_cache: dict[str, int | None] = {}
        self.by_pos: dict[int, list[tuple[str, str]]] = {}
        self.text = msg.text               # unescape a leaf
        self.comps = msg.components        # split a repetition into components
        self.subs = msg.subcomponents      # split a component into subcomponents

    def leaves(self, raw: str, pad: int = 0) -> list[str]:
        """Components of a repetition, unescaped and stripped, padded with '' to at least `pad` items."""
        msg = self.msg
        es = msg.delims.escape
        comps = msg.components(raw)
        out = [msg.text(x).strip() for x in comps] if es and es in raw else [x.strip() for x in comps]
        if len(out) < pad:
            out.extend([""] * (pad - len(out)))
        return out

    def note_invalid(self, text: str) -> None:
        """A part of a value did not convert and was left out (strict mode refuses the message)."""
        self.invalid.append((self.locator(self.loc) if self.loc else "?", text))

    # -- segment resolution -------------------------------------------------------------
    def set_anchor(self, rmap: ResourceMap, pos: int) -> None:
        self._rmap, self._anchor = rmap, pos
        self._loc_cache = {}

    def locate(self, name: str) -> int | None:
        """Position of the segment `name` as seen from the current anchor.

        The anchor itself; a child segment: the first one after the anchor, before the
        next segment that ends the anchor's group; any other segment: the nearest one
        before the anchor (its parent group: the OBR of an OBX, the PID of everything).
        """
        a = self._anchor
        if name == self.names[a]:
            return a
        cache = self._loc_cache
        if name in cache:
            return cache[name]
        names = self.names
        rmap = self._rmap
        assert rmap is not None
        found: int | None = None
        if name == names[a]:
            found = a
        elif name == "MSH":
            found = 0
        elif name in rmap.children:
            boundary = rmap.boundary
            for i in range(a + 1, len(names)):
                n = names[i]
                if n == name:
                    found = i
                    break
                if n in boundary:
                    break
        else:
            for i in range(a - 1, -1, -1):
                if names[i] == name:
                    found = i
                    break
        cache[name] = found
        return found

    def children_positions(self, name: str) -> list[int]:
        names, a = self.names, self._anchor
        rmap = self._rmap
        assert rmap is not None
        out = []
        for i in range(a + 1, len(names)):
            n = names[i]
            if n == name:
                out.append(i)
            elif n in rmap.boundary:
                break
        return out

    def locator(self, p: Path) -> str:
        pos = self.locate(p.segment)
        field_ = p.text.split("-", 1)[1] if "-" in p.text else str(p.field)
        if pos is None:
            return p.text
        return f"{self.msg.locator(pos)}-{field_}"

    # -- reading --------------------------------------------------------------------------
    def leaf(self, p: Path) -> str | None:
        pos = self.locate(p.segment)
        if pos is None:
            return None
        return self.msg.value(self.msg.segments[pos], p.field, p.repetition or 1, p.component, p.subcomponent)

    def valued(self, p: Path) -> bool:
        pos = self.locate(p.segment)
        if pos is None:
            return False
        seg = self.msg.segments[pos]
        if p.component is None and p.repetition is None:
            return p.field < len(seg) and bool(seg[p.field]) and seg[p.field] != '""'
        v = self.leaf(p)
        return v is not None and v != '""'

    def raw_element(self, p: Path) -> str | None:
        """The whole text of an element, all its parts, unescaped and joined with fixed separators
        (^ between components, & between subcomponents): what ids hash, the same whatever the
        message's delimiters."""
        pos = self.locate(p.segment)
        if pos is None:
            return None
        msg = self.msg
        reps = msg.repetitions(msg.segments[pos], p.field)
        r = p.repetition or 1
        if r > len(reps):
            return None
        text = reps[r - 1]
        d = msg.delims
        if d is STANDARD and p.component is None and "\\" not in text:
            return text.rstrip("^&") or None   # already in canonical form
        comps = msg.components(text)
        if p.component is not None:
            if p.component > len(comps):
                return None
            comps = comps[p.component - 1:p.component]
            if p.subcomponent is not None:
                subs = msg.subcomponents(comps[0])
                if p.subcomponent > len(subs):
                    return None
                comps = subs[p.subcomponent - 1:p.subcomponent]
        text = "^".join("&".join(msg.text(s) for s in msg.subcomponents(c)) for c in comps).rstrip("^&")
        return text or None

    def field_reps(self, p: Path) -> list[str]:
        pos = self.locate(p.segment)
        if pos is None:
            return []
        reps = self.msg.repetitions(self.msg.segments[pos], p.field)
        if p.repetition:
            return reps[p.repetition - 1:p.repetition] if p.repetition <= len(reps) else []
        return [r for r in reps if r and r != '""']

    # -- time zone of date-times without one ----------------------------------------------
    def default_offset(self, local: datetime) -> str:
        off = self._msh_offset
        if off is _SENTINEL:
            off = None
            t = self.msg.msh_field(7)
            m = _DTM.match(t.strip()) if t else None
            if m and m["sign"]:
                off = f"{m['sign']}{m['oh']}:{m['om']}"
            self._msh_offset = off
        if off is not None:
            return off
        delta = self.vocab.timezone.utcoffset(local) or timedelta(0)
        minutes = int(delta.total_seconds() // 60)
        sign = "-" if minutes < 0 else "+"
        minutes = abs(minutes)
        return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


# ======================================================================================
# Conversions (named as the IG's data type maps: V2TYPE[FHIRType])

SCALAR, COMPOSITE, MANY, VALUEX = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Converter:
    kind: int
    fn: Callable[..., Any]
    primitive: bool = False


CONVERTERS: dict[str, Converter] = {}


def converter(name: str, kind: int, primitive: bool = False):
    def deco(fn):
        CONVERTERS[name] = Converter(kind, fn, primitive)
        return fn
    return deco


_NM = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\Z")
_DTM = re.compile(
    r"(?P<y>\d{4})(?:(?P<mo>\d{2})(?:(?P<d>\d{2})(?:(?P<h>\d{2})(?:(?P<mi>\d{2})(?:(?P<s>\d{2})(?:\.(?P<f>\d{1,4}))?)?)?)?)?)?"
    r"(?:(?P<sign>[+-])(?P<oh>\d{2})(?P<om>\d{2}))?\Z"
)
_TM = re.compile(r"(?P<h>\d{2})(?:(?P<mi>\d{2})(?:(?P<s>\d{2})(?:\.(?P<f>\d{1,4}))?)?)?(?:[+-]\d{4})?\Z")


def parse_nm(text: str) -> int | float:
    m = _NM.match(text)
    if not m:
        raise _Invalid("not a number (NM)")
    s = m.group(1)
    if "." in s:
        v = float(s)
        return v
    return int(s)


def _dtm_parts(text: str) -> re.Match:
    m = _DTM.match(text.strip())
    if not m:
        raise _Invalid("not an HL7 date/time (DTM)")
    y, mo, d = int(m["y"]), int(m["mo"] or 1), int(m["d"] or 1)
    try:
        datetime(y, mo, d, int(m["h"] or 0), int(m["mi"] or 0), int(m["s"] or 0))
    except ValueError:
        raise _Invalid("not a valid calendar date/time") from None
    if y < 1:
        raise _Invalid("year out of range")
    if m["sign"] and (int(m["oh"]) > 14 or int(m["om"]) > 59):
        raise _Invalid("time zone offset out of range")
    return m


_DTM_CACHE: dict[tuple[str, str], str] = {}


def dtm_to_fhir(run: Run, text: str, want: str) -> str:
    """HL7 DTM/TS/DT -> FHIR date, dateTime or instant text; see `_dtm_to_fhir`.

    Results that do not depend on the message (the value has its own offset, or no time
    of day) are cached: the same times recur in every OBX of a report and across messages.
    """
    hit = _DTM_CACHE.get((text, want))
    if hit is not None:
        return hit
    out = _dtm_to_fhir(run, text, want)
    if len(text) <= 8 or "+" in text or "-" in text:
        if len(_DTM_CACHE) > 50_000:
            _DTM_CACHE.clear()
        _DTM_CACHE[(text, want)] = out
    return out


def _dtm_to_fhir(run: Run, text: str, want: str) -> str:
    """HL7 DTM/TS/DT -> FHIR date, dateTime or instant text (offset kept as written).

    A time without an offset takes MSH-7's, else the configured time zone's (FHIR requires
    one once hours are given); hours without minutes get ':00' (FHIR has no hour precision).
    """
    m = _dtm_parts(text)
    y, mo, d = m["y"], m["mo"], m["d"]
    if want == "date" or not m["h"]:
        if want == "instant":
            raise _Invalid("an instant needs a time of day")
        out = y
        if mo:
            out += f"-{mo}"
            if d:
                out += f"-{d}"
        return out
    h, mi, s, f = m["h"], m["mi"] or "00", m["s"] or "00", m["f"]
    if m["sign"]:
        off = f"{m['sign']}{m['oh']}:{m['om']}"
    else:
        off = run.default_offset(datetime(int(y), int(mo or 1), int(d or 1), int(h), int(mi), int(s)))
    if not (mo and d):
        raise _Invalid("a time of day without a full date")
    frac = f".{f}" if f else ""
    return f"{y}-{mo}-{d}T{h}:{mi}:{s}{frac}{off}"


@converter("ST[string]", SCALAR, primitive=True)
def _st(run: Run, rule: Rule, v: str) -> Any:
    v = v.strip()
    return v or None


@converter("ID[code]", SCALAR, primitive=True)
def _id_code(run: Run, rule: Rule, v: Any) -> Any:
    if isinstance(v, Coded):
        v = v.code
    v = " ".join(str(v).split())
    return v or None


@converter("ID[boolean]", SCALAR, primitive=True)
def _id_boolean(run: Run, rule: Rule, v: Any) -> Any:
    if isinstance(v, Coded):
        v = v.code
    if isinstance(v, bool):
        return v
    v = v.strip().upper()
    if v == "Y":
        return True
    if v == "N":
        return False
    raise _Invalid("not Y or N")


@converter("NM[decimal]", SCALAR, primitive=True)
def _nm(run: Run, rule: Rule, v: str) -> Any:
    return parse_nm(v)


@converter("DTM[dateTime]", SCALAR, primitive=True)
def _dtm_datetime(run: Run, rule: Rule, v: str) -> Any:
    return dtm_to_fhir(run, v, "dateTime")


@converter("DTM[date]", SCALAR, primitive=True)
def _dtm_date(run: Run, rule: Rule, v: str) -> Any:
    return dtm_to_fhir(run, v, "date")


@converter("DTM[instant]", SCALAR, primitive=True)
def _dtm_instant(run: Run, rule: Rule, v: str) -> Any:
    return dtm_to_fhir(run, v, "instant")


@converter("TM[time]", SCALAR, primitive=True)
def _tm(run: Run, rule: Rule, v: str) -> Any:
    return tm_to_fhir(v)


def tm_to_fhir(v: str) -> str:
    m = _TM.match(v.strip())
    if not m or int(m["h"]) > 23 or int(m["mi"] or 0) > 59 or int(m["s"] or 0) > 59:
        raise _Invalid("not an HL7 time (TM)")
    frac = f".{m['f']}" if m["f"] else ""
    return f"{m['h']}:{m['mi'] or '00'}:{m['s'] or '00'}{frac}"


@dataclass(frozen=True, slots=True)
class Coded:
    """A code read through a table: the FHIR code (or a ready Coding dict, or a boolean) and its system."""

    system: str | None
    code: Any


def _coded(rule: Rule, v: Any) -> Coded:
    return v if isinstance(v, Coded) else Coded(rule.system, v.strip() if isinstance(v, str) else v)


def _coding(rule: Rule, c: Coded) -> dict | None:
    if isinstance(c.code, dict):
        return c.code
    if c.code in (None, ""):
        return None
    coding: dict[str, Any] = {"system": c.system, "code": c.code} if c.system else {"code": c.code}
    disp = rule.table.display.get(c.code) if rule.table else None
    if disp:
        coding["display"] = disp
    return coding


@converter("ID[Coding]", SCALAR)
def _id_coding(run: Run, rule: Rule, v: Any) -> Any:
    return _coding(rule, _coded(rule, v))


@converter("ID[CodeableConcept]", SCALAR)
def _id_cc(run: Run, rule: Rule, v: Any) -> Any:
    coding = _coding(rule, _coded(rule, v))
    return {"coding": [coding]} if coding else None


@converter("ST[Identifier]", SCALAR)
def _st_identifier(run: Run, rule: Rule, v: str) -> Any:
    v = v.strip()
    return {"value": v} if v else None


@converter("FT[Annotation]", SCALAR)
def _ft_annotation(run: Run, rule: Rule, v: str) -> Any:
    v = v.strip()
    return {"text": v} if v else None


def _hd_system(run: Run, namespace: str, universal: str, utype: str) -> str | None:
    """HD (assigning authority) -> Identifier.system: its universal id, else the site's table."""
    ut = utype.strip().upper()
    if universal:
        if ut == "ISO" and re.fullmatch(r"[0-2](\.(0|[1-9]\d*))+", universal):
            return f"urn:oid:{universal}"
        if ut == "UUID":
            return f"urn:uuid:{universal.lower()}"
        if ut in ("URI", "URL") and ":" in universal:
            return universal
    if namespace:
        return run.vocab.authorities.get(namespace) or run.vocab.authorities.get(namespace.upper())
    return None


@converter("CX[Identifier]", COMPOSITE)
def _cx(run: Run, rule: Rule, raw: str) -> Any:
    c = run.comps(raw)
    value = run.text(c[0]).strip() if c[0] else ""
    if not value or value == '""':
        return None
    ident: dict[str, Any] = {"value": value}
    if len(c) > 4 and c[4]:
        ident["type"] = {"coding": [{"system": V2_0203, "code": run.text(c[4]).strip()}]}
    if len(c) > 3 and c[3]:
        hd = [run.text(s).strip() for s in run.subs(c[3])] + ["", ""]
        system = _hd_system(run, hd[0], hd[1], hd[2])
        if system:
            ident["system"] = system
        if hd[0] or hd[1]:
            ident["assigner"] = {"display": hd[0] or hd[1]}
    period = {}
    for idx, key in ((6, "start"), (7, "end")):
        if len(c) > idx and c[idx]:
            try:
                period[key] = dtm_to_fhir(run, run.text(c[idx]), "date")
            except _Invalid:
                run.note_invalid(f"CX.{idx + 1} is not a date")
    if period:
        ident["period"] = period
    return ident


@converter("EI[Identifier]", COMPOSITE)
def _ei(run: Run, rule: Rule, raw: str) -> Any:
    c = run.leaves(raw, 4)
    if not c[0]:
        return None
    ident: dict[str, Any] = {"value": c[0]}
    system = _hd_system(run, c[1], c[2], c[3])
    if system:
        ident["system"] = system
    if c[1] or c[2]:
        ident["assigner"] = {"display": c[1] or c[2]}
    return ident


@converter("EI[Reference]", COMPOSITE)
def _ei_reference(run: Run, rule: Rule, raw: str) -> Any:
    ident = _ei(run, rule, raw)
    if not ident:
        return None
    ident.pop("assigner", None)
    return {"identifier": ident}


@converter("XPN[HumanName]", COMPOSITE)
def _xpn(run: Run, rule: Rule, raw: str) -> Any:
    c = run.comps(raw)
    t = run.leaves(raw, 7)
    family = run.text(run.subs(c[0])[0]).strip() if c[0] else ""
    name: dict[str, Any] = {}
    if family:
        name["family"] = family
    given = [g for g in (t[1], *t[2].split()) if g]
    if given:
        name["given"] = given
    if t[4]:
        name["prefix"] = [t[4]]
    suffix = [s for s in (t[3], t[5]) if s]
    if suffix:
        name["suffix"] = suffix
    if not name:
        return None
    use = _lookup(run, "name-use", t[6]) if t[6] else None
    if use:
        name["use"] = use
    return name


@converter("XAD[Address]", COMPOSITE)
def _xad(run: Run, rule: Rule, raw: str) -> Any:
    c = run.comps(raw)
    t = run.leaves(raw, 9)
    street = run.text(run.subs(c[0])[0]).strip() if c[0] else ""
    addr: dict[str, Any] = {}
    lines = [x for x in (street, t[1]) if x]
    if lines:
        addr["line"] = lines
    for idx, key in ((2, "city"), (3, "state"), (4, "postalCode"), (5, "country"), (8, "district")):
        if t[idx]:
            addr[key] = t[idx]
    if not addr:
        return None
    if t[6]:
        use = _lookup(run, "address-use", t[6])
        if use:
            addr["use"] = use
        if t[6] == "M":
            addr["type"] = "postal"
    return addr


@converter("XTN[ContactPoint]", COMPOSITE)
def _xtn(run: Run, rule: Rule, raw: str) -> Any:
    t = run.leaves(raw, 12)
    use_code, equip = t[1], t[2]
    system = _lookup(run, "telecom-system", equip) if equip else None
    if equip in ("Internet", "X.400") or use_code == "NET":
        value = t[3]
        system = "email"
    else:
        value = t[11] or t[0]
        if not value and (t[5] or t[6]):
            value = " ".join(x for x in (f"+{t[4]}" if t[4] else "", t[5], t[6]) if x)
            if t[7]:
                value += f" x{t[7]}"
    if not value:
        return None
    cp: dict[str, Any] = {"system": system or "phone", "value": value}
    use = "mobile" if equip == "CP" else (_lookup(run, "telecom-use", use_code) if use_code else None)
    if use:
        cp["use"] = use
    return cp


def _xcn_display(t: list[str]) -> str:
    return " ".join(x for x in (t[5], t[2], t[3], t[1], t[4]) if x)


@converter("XCN[Reference]", COMPOSITE)
def _xcn(run: Run, rule: Rule, raw: str) -> Any:
    c = run.comps(raw)
    t = run.leaves(raw, 9)
    t[1] = run.text(run.subs(c[1])[0]).strip() if len(c) > 1 and c[1] else ""
    ref: dict[str, Any] = {}
    if t[0]:
        ident: dict[str, Any] = {"value": t[0]}
        if len(c) > 8 and c[8]:
            hd = [run.text(s).strip() for s in run.subs(c[8])] + ["", ""]
            system = _hd_system(run, hd[0], hd[1], hd[2])
            if system:
                ident["system"] = system
        ref["identifier"] = ident
    display = _xcn_display(t)
    if display:
        ref["display"] = display
    return ref or None


@converter("PL[Reference]", COMPOSITE)
def _pl(run: Run, rule: Rule, raw: str) -> Any:
    c = run.comps(raw)
    parts = [run.text(run.subs(c[i])[0]).strip() for i in (0, 1, 2, 3, 6, 7) if i < len(c) and c[i]]
    parts = [p for p in parts if p]
    return {"display": ", ".join(parts)} if parts else None


@converter("CWE[Reference]", COMPOSITE)
def _cwe_reference(run: Run, rule: Rule, raw: str) -> Any:
    t = run.leaves(raw, 3)
    ref: dict[str, Any] = {}
    if t[0]:
        ident = {"value": t[0]}
        system = run.vocab.system_for(t[2])
        if system:
            ident["system"] = system
        ref["identifier"] = ident
    if t[1]:
        ref["display"] = t[1]
    return ref or None


def cwe_to_cc(run: Run, raw: str, table: Table | None = None) -> dict | None:
    """CWE/CE/CNE -> CodeableConcept (IG CWE[CodeableConcept]): the primary, alternate and second
    alternate codings, original text (CWE.9) as text, or CWE.2 as text when nothing is coded."""
    t = run.leaves(raw, 12)
    codings = []
    for code_i, text_i, sys_i, ver_i in ((0, 1, 2, 6), (3, 4, 5, 7), (9, 10, 11, 12)):
        code = t[code_i]
        if not code or code == '""':
            continue
        if table is not None and code_i == 0:
            hit = _table_hit(table, code)
            if hit is not None:
                system, mapped = hit
                coding = {"system": system, "code": mapped} if system else {"code": mapped}
                disp = table.display.get(mapped) or t[text_i]
                if disp:
                    coding["display"] = disp
                codings.append(coding)
                continue
        coding = {}
        system = run.vocab.system_for(t[sys_i])
        if system:
            coding["system"] = system
        if t[ver_i]:
            coding["version"] = t[ver_i]
        coding["code"] = code
        if t[text_i]:
            coding["display"] = t[text_i]
        codings.append(coding)
    cc: dict[str, Any] = {}
    if codings:
        cc["coding"] = codings
    text = t[8] or ("" if codings else t[1])
    if text:
        cc["text"] = text
    return cc or None


def _table_hit(table: Table, code: str) -> tuple[str | None, Any] | None:
    v = table.map.get(code)
    if v is not None:
        return table.system, v
    if table.unmapped == "keep":
        return table.unmapped_system, code
    if table.unmapped == "default":
        return table.system, table.default
    return None


@converter("CWE[CodeableConcept]", COMPOSITE)
def _cwe_cc(run: Run, rule: Rule, raw: str) -> Any:
    return cwe_to_cc(run, raw, rule.table)


def _omb_extension(run: Run, reps: list[str], url: str, table_name: str, all_cdc: set[str]) -> dict | None:
    table = run.vocab.tables[table_name]
    parts: list[dict] = []
    texts: list[str] = []
    for raw in reps:
        t = run.leaves(raw, 2)
        code, display = t[0], t[1]
        mapped = table.map.get(code)
        if mapped:
            disp = table.display.get(mapped, display)
            parts.append({"url": "ombCategory", "valueCoding": {"system": table.system, "code": mapped, "display": disp}})
            texts.append(display or disp)
        elif code in all_cdc or re.fullmatch(r"\d{4}-\d", code or ""):
            coding = {"system": table.system, "code": code}
            if display:
                coding["display"] = display
            parts.append({"url": "detailed", "valueCoding": coding})
            if display:
                texts.append(display)
        elif display or code:
            texts.append(display or code)
    if not parts and not texts:
        return None
    parts.append({"url": "text", "valueString": ", ".join(dict.fromkeys(texts)) or "unknown"})
    return {"url": url, "extension": parts}


@converter("CWE[us-core-race]", MANY)
def _race(run: Run, rule: Rule, reps: list[str]) -> Any:
    return _omb_extension(run, reps, RACE_URL, "race-omb", set())


@converter("CWE[us-core-ethnicity]", MANY)
def _ethnicity(run: Run, rule: Rule, reps: list[str]) -> Any:
    return _omb_extension(run, reps, ETHNICITY_URL, "ethnicity-omb", set())


def _unit(run: Run, unit_raw: str) -> tuple[str, str | None]:
    """(unit as written, UCUM code or None) of a CWE unit; cached, units recur in every message."""
    key = (unit_raw, run.msg.delims, id(run.vocab))
    hit = _UNIT_CACHE.get(key)
    if hit is None:
        t = run.leaves(unit_raw, 3)
        code, text, system = t[0], t[1], t[2]
        ucum = code if system.upper() == "UCUM" and code else (run.vocab.ucum_for(code) or run.vocab.ucum_for(text))
        hit = (code or text, ucum)
        if len(_UNIT_CACHE) > 10_000:
            _UNIT_CACHE.clear()
        _UNIT_CACHE[key] = hit
    return hit


_UNIT_CACHE: dict[tuple[str, Any, int], tuple[str, str | None]] = {}


def _quantity(run: Run, value: int | float, unit_raw: str | None) -> dict:
    q: dict[str, Any] = {"value": value}
    if unit_raw:
        shown, ucum = _unit(run, unit_raw)
        if shown:
            q["unit"] = shown
        if ucum:
            q["system"] = UCUM
            q["code"] = ucum
    return q


def _unit_raw(run: Run, rule: Rule) -> str | None:
    if rule.unit_from is None:
        return None
    reps = run.field_reps(rule.unit_from)
    return reps[0] if reps else None


@converter("NM[Quantity]", SCALAR)
def _nm_quantity(run: Run, rule: Rule, v: str) -> Any:
    value = parse_nm(v)
    if rule.unit_from is not None and abs(value - 999) < 1e-9:  # CDC: 999 = amount unknown
        return None
    return _quantity(run, value, _unit_raw(run, rule))


_RANGE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*\Z")
_LIMIT = re.compile(r"\s*([<>])=?\s*(-?\d+(?:\.\d+)?)\s*\Z")


@converter("ST[referenceRange]", SCALAR)
def _reference_range(run: Run, rule: Rule, v: str) -> Any:
    """OBX-7 -> referenceRange: the text always, and low/high when it reads 'a-b', '<b' or '>a'."""
    text = v.strip()
    if not text:
        return None
    rr: dict[str, Any] = {"text": text}
    unit = _unit_raw(run, rule)
    m = _RANGE.match(text)
    if m:
        rr["low"] = _quantity(run, parse_nm(m[1]), unit)
        rr["high"] = _quantity(run, parse_nm(m[2]), unit)
    else:
        m = _LIMIT.match(text)
        if m:
            rr["high" if m[1] == "<" else "low"] = _quantity(run, parse_nm(m[2]), unit)
    return rr


_COMPARATORS = {"<", ">", "<=", ">="}


def _sn(run: Run, rule: Rule, raw: str) -> tuple[str, Any]:
    """SN -> Quantity (with comparator), Range ('-'), Ratio (':' '/'), else string (IG OBX-5 rows for SN)."""
    t = run.leaves(raw, 4)
    comp, n1, sep, n2 = t[0], t[1], t[2], t[3]
    unit = _unit_raw(run, rule)
    try:
        if comp != "<>":
            if n1 and not sep and not n2 and comp in _COMPARATORS | {"", "="}:
                q = _quantity(run, parse_nm(n1), unit)
                if comp in _COMPARATORS:
                    q["comparator"] = comp
                return "Quantity", q
            if n1 and n2 and sep == "-" and comp in ("", "="):
                return "Range", {"low": _quantity(run, parse_nm(n1), unit), "high": _quantity(run, parse_nm(n2), unit)}
            if n1 and n2 and sep in (":", "/") and comp in ("", "="):
                return "Ratio", {"numerator": _quantity(run, parse_nm(n1), unit),
                                 "denominator": {"value": parse_nm(n2)}}
    except _Invalid:
        pass
    text = " ".join(x for x in (comp, n1, sep, n2) if x)
    if not text:
        raise _Invalid("an empty structured numeric (SN)")
    if unit:
        u = run.leaves(unit)
        if u and u[0]:
            text += f" {u[0]}"
    return "String", text


@converter("varies[value]", VALUEX)
def _varies(run: Run, rule: Rule, reps: list[str]) -> Any:
    """OBX-5 -> value[x] by the type named in OBX-2 (IG OBX[Observation] rows 5/6).

    Text types join their repetitions with line breaks; other types map the first one
    (the others are named in a note, and refused in strict mode).
    """
    vtype = (run.leaf(rule.type_from) or "").strip().upper() if rule.type_from else ""
    kind = rule.types.get(vtype)
    if kind is None:
        raise _Invalid(f"value type {vtype or '(none)'} in OBX-2 is not one this map converts")
    if kind == "string":
        text = "\n".join(run.text(r) for r in reps).strip()
        return ("String", text) if text else None
    if len(reps) > 1:
        run.note_invalid(f"{len(reps)} repetitions where FHIR has room for one: only the first is mapped")
    raw = reps[0]
    if kind == "Quantity":
        first = run.text(run.comps(raw)[0]).strip()
        try:
            return "Quantity", _quantity(run, parse_nm(first), _unit_raw(run, rule))
        except _Invalid:
            # Keep what was written rather than lose it: a string value, flagged (strict refuses).
            run.note_invalid("not a number (NM): kept as a string")
            return ("String", run.text(raw).strip()) if raw.strip() else None
    if kind == "SN":
        return _sn(run, rule, raw)
    if kind == "CodeableConcept":
        cc = cwe_to_cc(run, raw)
        return ("CodeableConcept", cc) if cc else None
    if kind == "dateTime":
        return "DateTime", dtm_to_fhir(run, run.text(run.comps(raw)[0]), "dateTime")
    if kind == "time":
        return "Time", tm_to_fhir(run.text(run.comps(raw)[0]))
    raise _Invalid(f"value type {vtype} maps to {kind}, which no conversion produces")


def _lookup(run: Run, table_name: str, code: str) -> Any:
    table = run.vocab.tables.get(table_name)
    if table is None:
        return None
    hit = _table_hit(table, code)
    return None if hit is None else hit[1]


# ======================================================================================
# Applying rules


def _put(node: dict, steps: tuple[tuple[int, str], ...], value: Any, extend: bool) -> None:
    for kind, key in steps[:-1]:
        if kind == _KEY:
            nxt = node.get(key)
            if nxt is None:
                nxt = node[key] = {}
            node = nxt
        elif kind == _FIRST:
            lst = node.setdefault(key, [])
            if not lst:
                lst.append({})
            node = lst[0]
        else:
            lst = node.setdefault(key, [])
            lst.append({})
            node = lst[-1]
    kind, key = steps[-1]
    if kind == _KEY:
        node[key] = value
    elif kind == _APPEND:
        lst = node.setdefault(key, [])
        if extend:
            lst.extend(value)
        else:
            lst.append(value)
    elif kind == _FIRST:
        lst = node.setdefault(key, [])
        if lst:
            lst[0] = value
        else:
            lst.append(value)
    else:  # value[x]
        suffix, v = value
        node[key + suffix] = v


def _put_absent(node: dict, rule: Rule) -> None:
    """Lenient mode: say 'there was a value, it did not convert' the FHIR way."""
    kind, key = rule.steps[-1]
    if kind == _VALUEX:
        target = node
        for k, name in rule.steps[:-1]:
            if k != _KEY:
                return
            target = target.setdefault(name, {})
        target["dataAbsentReason"] = {"coding": [{"system": DAR_SYSTEM, "code": "error", "display": "Error"}]}
        return
    if kind != _KEY or rule.conv is None or not rule.conv.primitive:
        return
    target = node
    for k, name in rule.steps[:-1]:
        if k != _KEY:
            return
        target = target.setdefault(name, {})
    if key not in target:
        target["_" + key] = {"extension": [{"url": DAR_URL, "valueCode": "error"}]}


def _shape(rule: Rule, value: Any) -> Any:
    if rule.wrap:
        value = {rule.wrap: value}
    if rule.with_:
        value = {**value, **rule.with_}
    return value


def compile_apply(rule: Rule) -> Callable[[Run, dict], None]:
    """The rule as one closure with everything it needs bound: what runs per message per rule."""
    body = _compile_body(rule)
    when, unless = rule.when, rule.unless
    if not when and not unless:
        return body

    def guarded(run: Run, res: dict) -> None:
        for p in when:
            if not run.valued(p):
                return
        for p in unless:
            if run.valued(p):
                return
        body(run, res)

    return guarded


def _compile_body(rule: Rule) -> Callable[[Run, dict], None]:
    steps, key = rule.steps, rule.key
    if rule.sources:
        return _compile_from(rule)
    if rule.ref is not None:
        name = rule.ref

        def ref(run: Run, res: dict) -> None:
            pos = run.locate(name)
            targets = run.by_pos.get(pos) if pos is not None else None
            if targets:
                rtype, rid = targets[0]
                _put(res, steps, _shape(rule, {"reference": f"{rtype}/{rid}"}), False)

        return ref
    if rule.refs is not None:
        child = rule.refs

        def refs(run: Run, res: dict) -> None:
            out = [_shape(rule, {"reference": f"{rtype}/{rid}"})
                   for pos in run.children_positions(child) for rtype, rid in run.by_pos.get(pos, ())]
            if out:
                _put(res, steps, out, True)

        return refs
    const = _shape(rule, rule.const) if isinstance(rule.const, dict) else rule.const
    if key is not None and not isinstance(const, dict | list):
        def constant(run: Run, res: dict) -> None:
            res[key] = const

        return constant

    def constant_copy(run: Run, res: dict) -> None:  # a fresh copy: resources never share objects
        _put(res, steps, _copy(const), False)

    return constant_copy


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _compile_from(rule: Rule) -> Callable[[Run, dict], None]:
    conv = rule.conv
    assert conv is not None
    kind, fn = conv.kind, conv.fn
    sources, steps, key = rule.sources, rule.steps, rule.key
    required, has_default, default = rule.required, rule.has_default, rule.default
    repeat, shaped = rule.repeat, bool(rule.wrap or rule.with_)
    append = steps[-1][0] == _APPEND

    def missing(run: Run, res: dict, src: Path | None) -> None:
        if required and not has_default:
            run.errors.append(("missing-field", run.locator(src or sources[0]),
                               "required and empty" if src is None else "no usable value"))
        elif has_default:
            _put(res, steps, _copy(default), False)

    if len(sources) == 1 and sources[0].component is None and sources[0].repetition is None:
        p0 = sources[0]
        name0, field0 = p0.segment, p0.field

        def find(run: Run) -> tuple[Path | None, list[str] | None]:
            pos = run.locate(name0)
            if pos is None:
                return None, None
            seg = run.msg.segments[pos]
            if field0 < len(seg):
                text = seg[field0]
                if text and text != '""':
                    return p0, seg
            return None, None
    else:
        def find(run: Run) -> tuple[Path | None, list[str] | None]:
            msg = run.msg
            for p in sources:  # the first source with a value
                pos = run.locate(p.segment)
                if pos is None:
                    continue
                seg = msg.segments[pos]
                f = p.field
                if f >= len(seg) or not seg[f] or seg[f] == '""':
                    continue
                if p.component is not None or p.repetition is not None:
                    v = msg.value(seg, f, p.repetition or 1, p.component, p.subcomponent)
                    if v is None or v == '""':
                        continue
                return p, seg
            return None, None

    if kind == SCALAR and not repeat and key is not None and not shaped:
        def scalar_into_key(run: Run, res: dict) -> None:
            src, seg = find(run)
            if src is None:
                return missing(run, res, None)
            run.loc = src
            leaf = run.msg.value(seg, src.field, src.repetition or 1, src.component, src.subcomponent)
            try:
                v = _convert_scalar(run, rule, leaf or '""')
            except _Invalid as e:
                return _invalid(run, rule, res, run.locator(src), str(e))
            if v is None or v is _DROP:
                return missing(run, res, src)
            res[key] = v

        return scalar_into_key

    if kind in (COMPOSITE, VALUEX) and not repeat and not append and not shaped:
        def one_value(run: Run, res: dict) -> None:
            src, seg = find(run)
            if src is None:
                return missing(run, res, None)
            run.loc = src
            reps = run.msg.repetitions(seg, src.field)
            if src.repetition:
                reps = reps[src.repetition - 1:src.repetition]
            try:
                if kind == VALUEX:
                    v = fn(run, rule, [r for r in reps if r and r != '""'])
                else:
                    v = None
                    for r in reps:
                        if r and r != '""':
                            v = fn(run, rule, r)
                            if v is not None:
                                break
            except _Invalid as e:
                return _invalid(run, rule, res, run.locator(src), str(e))
            if v is None:
                return missing(run, res, src)
            if key is not None:
                res[key] = v
            else:
                _put(res, steps, v, False)

        return one_value

    def general(run: Run, res: dict) -> None:
        src, seg = find(run)
        if src is None:
            return missing(run, res, None)
        run.loc = src
        msg = run.msg
        try:
            if kind == SCALAR:
                if repeat and src.repetition is None:
                    reps = range(1, len(msg.repetitions(seg, src.field)) + 1)
                else:
                    reps = (src.repetition or 1,)
                values = []
                for i in reps:
                    leaf = msg.value(seg, src.field, i, src.component, src.subcomponent)
                    if leaf is not None and leaf != '""':
                        v = _convert_scalar(run, rule, leaf)
                        if v is not None and v is not _DROP:
                            values.append(v)
            else:
                raw = msg.repetitions(seg, src.field)
                if src.repetition:
                    raw = raw[src.repetition - 1:src.repetition]
                if kind in (VALUEX, MANY):
                    v = fn(run, rule, [r for r in raw if r and r != '""'])
                    values = [] if v is None else [v]
                else:
                    values = []
                    for r in raw:
                        if r and r != '""':
                            v = fn(run, rule, r)
                            if v is not None:
                                values.append(v)
                                if not repeat:
                                    break
        except _Invalid as e:
            return _invalid(run, rule, res, run.locator(src), str(e))
        if not values:
            return missing(run, res, src)
        if append:
            _put(res, steps, [_shape(rule, v) for v in values] if shaped else values, True)
        else:
            first = values[0]
            _put(res, steps, _shape(rule, first) if shaped and isinstance(first, dict) else first, False)

    return general


_DROP = object()


def _convert_scalar(run: Run, rule: Rule, leaf: str) -> Any:
    if leaf == '""':
        return None
    conv = rule.conv
    assert conv is not None
    table = rule.table
    if table is None:
        return conv.fn(run, rule, leaf)
    code = leaf.strip()
    hit = _table_hit(table, code)
    if hit is None:
        if table.unmapped == "drop":
            return _DROP
        raise _Invalid(f"code not in table {table.name}")
    return conv.fn(run, rule, Coded(hit[0], hit[1]))


def _invalid(run: Run, rule: Rule, res: dict, loc: str, text: str) -> None:
    if rule.required:
        if rule.has_default:
            run.invalid.append((loc, text))
            _put(res, rule.steps, rule.default, False)
        else:
            run.errors.append(("bad-value", loc, text))
        return
    run.invalid.append((loc, text))
    if rule.has_default:
        _put(res, rule.steps, rule.default, False)
    else:
        _put_absent(res, rule)


# ======================================================================================
# The entry point


def _resource_id(run: Run, rmap: ResourceMap, pos: int) -> str:
    for n, alt in enumerate(rmap.ids):
        parts = [rmap.type, str(n)]
        ok = True
        for part in alt:
            if part.token == "#position":
                parts.append(str(pos))
                continue
            assert part.path is not None
            v = run.raw_element(part.path)
            if v is None or v == '""':
                if part.optional:
                    parts.append("")
                    continue
                ok = False
                break
            parts.append(v)
        if ok:
            return hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=16).hexdigest()
    return hashlib.blake2b(f"{rmap.type}\x1f{pos}\x1f{run.msg.control_id}".encode(), digest_size=16).hexdigest()


@lru_cache(maxsize=1)
def known_segments() -> frozenset[str]:
    """Segment ids HL7 v2.3 to v2.8.2 define, from hl7apy's structure tables (loaded on first use)."""
    from hl7apy import load_library
    from hl7apy.exceptions import UnsupportedVersion

    names: set[str] = set()
    for v in ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2"):
        try:
            names.update(load_library(v).SEGMENTS)
        except UnsupportedVersion:  # hl7apy 1.3 has no 2.7.1 / 2.8.1 tables: their segments are in 2.8.2's
            continue
    return frozenset(names)


def _safe_ref(text: str | None) -> str | None:
    if not text:
        return None
    clean = "".join(ch if ch.isprintable() else "?" for ch in text.strip())[:64]
    return clean or None


def _reject(stage: str, reason: str, message: str, source_ref: str, raw: bytes, control_id: str | None,
            message_type: str | None, ack: str | None = None) -> MappedMessage:
    rej = Rejected(stage=stage, reason=reason, message=message, source_ref=source_ref, payload=raw)
    code = ack or ("AR" if reason in _AR_REASONS else "AE")
    return MappedMessage(control_id, message_type, [], rej, code)


def map_message(raw: bytes, source_ref: str, *, strict: bool = False, mappings: Mappings | None = None,
                limits: Limits = DEFAULT_LIMITS) -> MappedMessage:
    """Map one HL7 v2 message to FHIR R4 resources, or refuse it whole with a reason.

    `strict` also refuses a message for any value that does not convert (a bad date, a
    code outside its table, a repeated value where FHIR has room for one). Without it,
    such a value is left out and marked with the data-absent-reason extension (or
    Observation.dataAbsentReason), and the rest of the message is kept.
    """
    maps = mappings or default_mappings()
    try:
        msg = parse_message(raw, limits)
    except HL7ParseError as e:
        return _reject("parse", e.reason, str(e), source_ref, raw, None, None)
    control_id = _safe_ref(msg.control_id)
    mtype = msg.message_type
    if not msg.control_id:
        return _reject("parse", "missing-field", "MSH-10 (message control id) is empty", source_ref, raw, None, mtype)
    version = msg.version
    if version not in maps.versions:
        if version in maps.versions_if_known:
            unknown = sorted({n for n in msg.names if n not in known_segments() and not n.startswith("Z")})
            if unknown:
                return _reject("map", "unsupported-version", f"version {version} message uses segments HL7 v2.3-2.8 "
                               f"do not define ({', '.join(unknown)}): not mapped", source_ref, raw, control_id, mtype)
        else:
            shown = _safe_ref(version) or "(empty)"
            return _reject("map", "unsupported-version", f"MSH-12 version {shown} is not supported "
                           f"(mapped: {', '.join(sorted(maps.versions))})", source_ref, raw, control_id, mtype)
    mmap = maps.messages.get(mtype or "")
    if mmap is None:
        shown = _safe_ref(mtype) or "(empty)"
        return _reject("map", "unsupported-message-type", f"message type {shown} (MSH-9) is not mapped "
                       f"(mapped: {', '.join(sorted(maps.messages))})", source_ref, raw, control_id, mtype)
    idx = msg.index()
    missing = [s for s in mmap.requires if s not in idx]
    if missing:
        return _reject("map", "missing-segment", f"{mtype} without {', '.join(missing)} segment", source_ref, raw,
                       control_id, mtype)
    run = Run(msg, maps, strict)
    # ids first, so that references can point at any resource of the message
    plan: list[tuple[ResourceMap, int, str]] = []
    seen: set[tuple[str, str]] = set()
    for rmap in mmap.resources:
        for pos in idx.get(rmap.anchor, ()):
            run.set_anchor(rmap, pos)
            rid = _resource_id(run, rmap, pos)
            if (rmap.type, rid) in seen:  # two segments that identify the same way: keep both apart
                rid = hashlib.blake2b(f"{rid}\x1f{pos}".encode(), digest_size=16).hexdigest()
            seen.add((rmap.type, rid))
            plan.append((rmap, pos, rid))
            run.by_pos.setdefault(pos, []).append((rmap.type, rid))
    out: list[Resource] = []
    prefix = f"{source_ref} [{control_id}]"
    for rmap, pos, rid in plan:
        run.set_anchor(rmap, pos)
        res: dict[str, Any] = {"resourceType": rmap.type, "id": rid}
        seg = msg.segments[pos]
        nfields, anchor = len(seg), rmap.anchor
        for rule in rmap.rules:
            probe = rule.probe
            if probe is not None and probe[0] == anchor and (probe[1] >= nfields or not seg[probe[1]]):
                continue  # the only field it reads is empty: nothing to do (the common case)
            rule.apply(run, res)
        out.append(Resource(resource=res, source_ref=f"{prefix} {msg.locator(pos)}", raw=raw))
    if run.errors:
        reason = run.errors[0][0]
        text = "; ".join(f"{loc}: {why}" for _, loc, why in run.errors[:20])
        return _reject("map", reason, text, source_ref, raw, control_id, mtype)
    if strict and run.invalid:
        text = "; ".join(f"{loc}: {why}" for loc, why in run.invalid[:20])
        return _reject("map", "bad-value", text, source_ref, raw, control_id, mtype)
    return MappedMessage(control_id, mtype, out, None, "AA")


__all__ = ["CONVERTERS", "MappedMessage", "Mappings", "default_mappings", "dtm_to_fhir", "known_segments",
           "map_message"]
