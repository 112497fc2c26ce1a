"""The HL7 v2 maps of mappings/hl7v2/, loaded, checked and compiled once.

Loading reads messages.toml (which message types make which resources), one TOML file
per resource map, tables.toml (code tables) and the CSV code lists of mappings/codes/
(code system names, UCUM units, assigning authorities); every problem in them is
reported at once as a ConfigError. Compiling turns each `[[map]]` rule into one closure
with what it reads, converts and writes already bound, so that mapping a message only
calls closures (the vocabulary is in mappings/hl7v2/README.md).
"""

from __future__ import annotations

import csv
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path as FsPath
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ConfigError
from .hl7v2 import Path, compile_path
from .hl7v2_datatypes import (
    COMPOSITE,
    CONVERTERS,
    MANY,
    SCALAR,
    VALUEX,
    Coded,
    Converter,
    Table,
    table_hit,
)
from .hl7v2_datatypes import ConversionError as _Invalid
from .resources import mappings_dir

if TYPE_CHECKING:
    from .hl7v2_fhir import Run

DAR_URL = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
DAR_SYSTEM = "http://terminology.hl7.org/CodeSystem/data-absent-reason"

# ======================================================================================
# Vocabulary: code tables, code systems, units, assigning authorities


_TABLE_TYPES: dict[str, Any] = {"map": dict, "system": str, "unmapped": str, "unmapped_system": str, "default": None,
                                "display": dict, "source": str, "url": str}


def _load_tables(path: FsPath, problems: list[str]) -> dict[str, Table]:
    data = _read_toml(path, problems)
    tables: dict[str, Table] = {}
    for name, spec in data.items():
        where = f"{path.name} [{name}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("map"), dict):
            problems.append(f"{where}: a table needs a `map` of v2 code -> FHIR code")
            continue
        if not _checked(spec, _TABLE_TYPES, where, problems):
            continue
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
    # (unit text, delimiters) -> (unit as written, UCUM code or None): hl7v2_datatypes._unit
    units_seen: dict[tuple[str, ...], tuple[str, str | None]] = field(default_factory=dict)

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
    ref_type: str | None
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
    when: tuple[Path, ...] = ()   # make the resource only when these have a value
    shared: bool = False          # the same id twice in a message is one resource (a Device)
    # (field of the anchor to look at first, or 0; the compiled rule), in rule order: a rule whose
    # only source is an empty field of the anchor (the common case) is skipped without a call
    program: tuple[tuple[int, Callable[[Run, dict], None]], ...] = ()


@dataclass(slots=True)
class MessageMap:
    types: tuple[str, ...]
    requires: tuple[str, ...]
    resources: list[ResourceMap]
    create_only: frozenset[str]  # resource maps whose resource never replaces a stored one
    # for each of `resources`, in order: the paths that must have a value for it to be made (its
    # map's own `when` and the message's), so that map_message checks one tuple per resource map
    when: tuple[tuple[Path, ...], ...]


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


# The keys of each kind of table in the map files, and the TOML type each must have
# (`list[str]`: a list of strings; None: any value), for _checked.
_PATHS = (str, list)
_RULE_TYPES: dict[str, Any] = {
    "to": str, "from": _PATHS, "value": None, "as": str, "table": str, "system": str, "repeat": bool,
    "required": bool, "default": None, "when": _PATHS, "unless": _PATHS, "ref": str, "ref_type": str, "refs": str,
    "wrap": str, "with": dict, "type_from": _PATHS, "unit_from": _PATHS, "types": dict}
_MAP_TYPES: dict[str, Any] = {
    "resource": str, "anchor": str, "children": "list[str]", "group_ends": "list[str]", "id": list, "map": list,
    "when": _PATHS, "shared": bool}
_MSG_TYPES: dict[str, Any] = {"types": "list[str]", "requires": "list[str]", "resources": "list[str]",
                              "create_only": "list[str]", "when": dict}
_TYPE_NAMES = {str: "a string", list: "a list", dict: "a table", bool: "true or false"}


def _checked(entry: Any, types: dict[str, Any], where: str, problems: list[str], *, closed: bool = True) -> bool:
    """Whether entry is a table whose keys have their types. A key of the wrong type is a
    problem, and so (`closed`) is a key not in `types`: each is one listed problem, not a
    traceback from deep inside the loader. Unknown keys alone do not make it False."""
    if not isinstance(entry, dict):
        problems.append(f"{where}: must be a table, not {type(entry).__name__}")
        return False
    extra = set(entry) - set(types) if closed else set()
    if extra:
        problems.append(f"{where}: unknown keys {sorted(extra)}")
    ok = True
    for key, want in types.items():
        if key not in entry or want is None:
            continue
        v = entry[key]
        if want == "list[str]":
            good, shown = isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"
        else:
            good = isinstance(v, want)
            shown = " or ".join(_TYPE_NAMES[t] for t in (want if isinstance(want, tuple) else (want,)))
        if not good:
            problems.append(f"{where}: `{key}` must be {shown}, not {type(v).__name__}")
            ok = False
    return ok


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
        if not _checked(spec, {"settings": dict, "message": list}, "messages.toml", problems, closed=False):
            spec = {}
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
            if not _checked(entry, _MSG_TYPES, where, problems):
                continue
            rmaps = []
            for rname in entry.get("resources", []):
                if rname not in resource_maps:
                    rm = _load_resource_map(folder / f"{rname}.toml", rname, vocab, problems)
                    if rm is None:
                        continue
                    resource_maps[rname] = rm
                rmaps.append(resource_maps[rname])
            create_only = entry.get("create_only", [])
            extra = entry.get("when", {})
            for key, named in (("create_only", create_only), ("when", extra)):
                for rname in named:  # a list's items, a table's keys
                    if rname not in entry.get("resources", []):
                        problems.append(f"{where}: {key} names {rname!r}, which is not one of its resources")
            when = tuple(rm.when + _as_paths(extra.get(rm.name), f"{where} when.{rm.name}", problems)
                         for rm in rmaps)
            mm = MessageMap(tuple(entry.get("types", [])), tuple(entry.get("requires", [])), rmaps,
                            frozenset(create_only), when)
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
    except tomllib.TOMLDecodeError as bad:
        problems.append(f"{path.name}: not valid TOML ({bad})")
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
    if not _checked(spec, _MAP_TYPES, where, problems):
        return None
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
        if not isinstance(alt, list):
            problems.append(f"{where}: each `id` is a list of accessors, not {type(alt).__name__}")
            continue
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
    referenced: set[str] = set()
    for r in rules:
        referenced.update(p.segment for p in r.sources + r.when + r.unless)
        referenced.update(p.segment for p in (r.type_from, r.unit_from) if p is not None)
        referenced.update(x for x in (r.ref,) if x)
    for alt in ids:
        referenced.update(p.path.segment for p in alt if p.path is not None)
    when = _as_paths(spec.get("when"), where, problems)
    referenced.update(p.segment for p in when)
    boundary = frozenset({anchor, "MSH"} | (referenced - children) | set(spec.get("group_ends", [])))
    program = []
    for r in rules:
        assert r.apply is not None  # _compile_rule compiled it
        program.append((r.probe[1] if r.probe is not None and r.probe[0] == anchor else 0, r.apply))
    return ResourceMap(name, rtype, anchor, children, boundary, ids, rules, when, bool(spec.get("shared", False)),
                       tuple(program))


def _compile_rule(entry: Any, where: str, vocab: Vocabulary, problems: list[str]) -> Rule | None:
    if not _checked(entry, _RULE_TYPES, where, problems):
        return None
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
        ref=entry.get("ref"), ref_type=entry.get("ref_type"), refs=entry.get("refs"), wrap=entry.get("wrap"), with_=entry.get("with"),
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
    """Apply `wrap` and `with`; the constants are copied, so that no two resources share an object."""
    if rule.wrap:
        value = {rule.wrap: value}
    if rule.with_:
        value = {**value, **_copy(rule.with_)}
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
        name, rtype_wanted = rule.ref, rule.ref_type

        def ref(run: Run, res: dict) -> None:
            pos = run.locate(name)
            for rtype, rid in run.by_pos.get(pos, ()) if pos is not None else ():
                if rtype_wanted is None or rtype == rtype_wanted:
                    _put(res, steps, _shape(rule, {"reference": f"{rtype}/{rid}"}), False)
                    return

        return ref
    if rule.refs is not None:
        child, rtype_wanted = rule.refs, rule.ref_type

        def refs(run: Run, res: dict) -> None:
            out = [_shape(rule, {"reference": f"{rtype}/{rid}"})
                   for pos in run.children_positions(child) for rtype, rid in run.by_pos.get(pos, ())
                   if rtype_wanted is None or rtype == rtype_wanted]
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

        def find(run: Run) -> tuple[Path, list[str]] | None:
            pos = run.locate(name0)
            if pos is None:
                return None
            seg = run.msg.segments[pos]
            if field0 < len(seg):
                text = seg[field0]
                if text and text != '""':
                    return p0, seg
            return None
    else:
        def find(run: Run) -> tuple[Path, list[str]] | None:
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
            return None

    if kind == SCALAR and not repeat and not shaped and len(steps) == 1 and steps[0][0] in (_KEY, _APPEND):
        target, appending = steps[0][1], steps[0][0] == _APPEND

        def one_scalar(run: Run, res: dict) -> None:  # the common case, kept short: one value, one key
            found = find(run)
            if found is None:
                return missing(run, res, None)
            src, seg = found
            run.loc = src
            leaf = run.msg.value(seg, src.field, src.repetition or 1, src.component, src.subcomponent)
            try:
                v = _convert_scalar(run, rule, leaf or '""')
            except _Invalid as e:
                return _invalid(run, rule, res, run.locator(src), str(e))
            if v is None or v is _DROP:
                return missing(run, res, src)
            if not appending:
                res[target] = v
            elif target in res:
                res[target].append(v)
            else:
                res[target] = [v]

        return one_scalar

    if kind in (COMPOSITE, VALUEX) and not repeat and not append and not shaped:
        def one_value(run: Run, res: dict) -> None:
            found = find(run)
            if found is None:
                return missing(run, res, None)
            src, seg = found
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
        found = find(run)
        if found is None:
            return missing(run, res, None)
        src, seg = found
        run.loc = src
        msg = run.msg
        try:
            if kind == SCALAR:
                reps: range | tuple[int]
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
    hit = table_hit(table, code)
    if hit is None:
        if table.unmapped == "drop":
            return _DROP
        raise _Invalid(f"code not in table {table.name}")
    return conv.fn(run, rule, Coded(hit[0], hit[1]))


def _invalid(run: Run, rule: Rule, res: dict, loc: str, text: str) -> None:
    if rule.required:
        if rule.has_default:
            run.invalid.append((loc, text))
            _put(res, rule.steps, _copy(rule.default), False)
        else:
            run.errors.append(("bad-value", loc, text))
        return
    run.invalid.append((loc, text))
    if rule.has_default:
        _put(res, rule.steps, _copy(rule.default), False)
    else:
        _put_absent(res, rule)


__all__ = ["IdPart", "Mappings", "MessageMap", "ResourceMap", "Rule", "Vocabulary", "compile_apply", "default_mappings"]
