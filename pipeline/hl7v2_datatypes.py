"""HL7 v2 data types -> FHIR R4 data types: the conversions the maps name with `as`.

Each conversion is named as in the HL7 v2-to-FHIR IG's data type maps, V2TYPE[FHIRType]
(https://hl7.org/fhir/uv/v2mappings/STU1/datatype_maps.html): `CX[Identifier]`,
`XPN[HumanName]`, `CWE[CodeableConcept]`, `DTM[dateTime]`, ... A conversion reads one
value (a leaf, a field repetition, or all repetitions) through the `Run` of the message,
and returns FHIR JSON, or None when there is nothing, or raises `ConversionError` with a
description that never quotes the value.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .hl7v2_fhir import Run
    from .hl7v2_maps import Rule

UCUM = "http://unitsofmeasure.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
RACE_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
ETHNICITY_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"


class ConversionError(Exception):
    """A value that does not convert; carries a description without the value."""


_Invalid = ConversionError


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


# ======================================================================================
# The registry

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


# re.ASCII: \d is 0-9 (HL7 numbers and dates are ASCII), not every Unicode digit ("²" is one)
# compiled once: re.fullmatch(text, ...) looks its pattern up on every call
_OID = re.compile(r"[0-2](\.(0|[1-9]\d*))+")
_CDC_CODE = re.compile(r"\d{4}-\d")
NM_SYNTAX = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\Z", re.ASCII)
DTM_SYNTAX = re.compile(
    r"(?P<y>\d{4})(?:(?P<mo>\d{2})(?:(?P<d>\d{2})(?:(?P<h>\d{2})(?:(?P<mi>\d{2})(?:(?P<s>\d{2})(?:\.(?P<f>\d{1,4}))?)?)?)?)?)?"
    r"(?:(?P<sign>[+-])(?P<oh>\d{2})(?P<om>\d{2}))?\Z", re.ASCII
)
_TM = re.compile(r"(?P<h>\d{2})(?:(?P<mi>\d{2})(?:(?P<s>\d{2})(?:\.(?P<f>\d{1,4}))?)?)?(?:[+-]\d{4})?\Z", re.ASCII)


def dtm_offset(text: str) -> str | None:
    """The UTC offset a DTM is written with, as +HH:MM, or None."""
    g = dtm_groups(text) if text else None
    return f"{g[7]}{g[8]}:{g[9]}" if g is not None and g[7] else None


def code_text(text: str) -> str:
    """Text fit for a FHIR code: no leading, trailing or repeated whitespace (of any kind)."""
    return " ".join(text.split())


_SPACE = " \t\n\r\f\v"  # what \s is under re.ASCII


def parse_nm(text: str) -> int | float:
    """HL7 NM: optional sign, digits, optional decimal point (no exponent, no thousands separator).

    Decided with string tests, not the NM_SYNTAX regex (a match costs ten times as much): after
    an optional sign, what is left without one decimal point must be ASCII digits. The
    tests hold this to NM_SYNTAX."""
    s = text.strip(_SPACE)
    body = s[1:] if s[:1] in ("+", "-") else s
    if not _digits(body.replace(".", "", 1)):
        raise _Invalid("not a number (NM)")
    return float(s) if "." in s else int(s)


# The groups of a DTM_SYNTAX match, in order: what dtm_groups returns.
DtmParts = tuple[str, str | None, str | None, str | None, str | None, str | None, str | None, str | None,
                 str | None, str | None]
_DTM_LENGTHS = frozenset((4, 6, 8, 10, 12, 14))


def _digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²' and other scripts' digits (as
    dicom_fhir._digits, which the DICOM mapping keeps to itself: a call into it from here
    would leave the compiled code)."""
    return text.isascii() and text.isdigit()


def dtm_groups(text: str) -> DtmParts | None:
    """(year, month, day, hour, minute, second, fraction, sign, offset hours, offset minutes)
    of a DTM, each None when not written, or None when text is no DTM: the groups of a
    DTM_SYNTAX match of the stripped text, found by slicing (a match and its named groups
    cost several times as much; the tests hold the two to each other)."""
    t = text.strip()
    n = len(t)
    sign = oh = om = None
    if n >= 5 and t[n - 5] in "+-":
        zone = t[n - 4:]
        if not _digits(zone):
            return None
        sign, oh, om = t[n - 5], zone[:2], zone[2:]
        t = t[:n - 5]
    frac = None
    dot = t.find(".")
    if dot >= 0:
        frac = t[dot + 1:]
        t = t[:dot]
        if len(t) != 14 or not 1 <= len(frac) <= 4 or not _digits(frac):
            return None
    n = len(t)
    if n not in _DTM_LENGTHS or not _digits(t):
        return None
    return (t[:4], t[4:6] or None, t[6:8] or None, t[8:10] or None, t[10:12] or None, t[12:14] or None, frac,
            sign, oh, om)


def _dtm_parts(text: str) -> DtmParts:
    """dtm_groups of a DTM that is also a valid date and time; _Invalid otherwise."""
    g = dtm_groups(text)
    if g is None:
        raise _Invalid("not an HL7 date/time (DTM)")
    y, mo, d, h, mi, s, _, sign, oh, om = g
    year, month, day = int(y), int(mo) if mo else 1, int(d) if d else 1
    if not (year >= 1 and 1 <= month <= 12 and 1 <= day <= _days_in(year, month)
            and (not h or int(h) < 24) and (not mi or int(mi) < 60) and (not s or int(s) < 60)):
        raise _Invalid("not a valid calendar date/time")
    if sign and oh and om and (int(oh) > 14 or int(om) > 59):
        raise _Invalid("time zone offset out of range")
    return g


_MONTH_DAYS = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days_in(year: int, month: int) -> int:
    """Days in the month (what datetime() accepts; the tests hold the two to each other)."""
    if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
        return 29
    return _MONTH_DAYS[month]


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
    y, mo, d, h, mi, s, f, sign, oh, om = _dtm_parts(text)
    if want == "date" or not h:
        if want == "instant":
            raise _Invalid("an instant needs a time of day")
        out = y
        if mo:
            out += f"-{mo}"
            if d:
                out += f"-{d}"
        return out
    mi, s = mi or "00", s or "00"
    if sign:
        off = f"{sign}{oh}:{om}"
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
    return code_text(str(v)) or None


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


class Coded:
    """A code read through a table: the FHIR code (or a ready Coding dict, or a boolean) and its system.

    A plain class, not a frozen dataclass: several are made per message, and the compiled
    build makes a plain class in a seventh of the time (a dataclass's __init__ is Python)."""

    __slots__ = ("system", "code")

    def __init__(self, system: str | None, code: Any) -> None:
        self.system = system
        self.code = code


def _coded(rule: Rule, v: Any) -> Coded:
    return v if isinstance(v, Coded) else Coded(rule.system, code_text(v) if isinstance(v, str) else v)


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
        if ut == "ISO" and _OID.fullmatch(universal):
            return f"urn:oid:{universal}"
        if ut == "UUID":
            return f"urn:uuid:{universal.lower()}"
        if ut in ("URI", "URL") and ":" in universal:
            return universal
    if namespace:
        return run.vocab.authorities.get(namespace) or run.vocab.authorities.get(namespace.upper())
    return None


def _identifier(run: Run, value: str, namespace: str, universal: str, utype: str) -> dict[str, Any]:
    """An Identifier qualified by an HD: system from its universal id or the site's table,
    assigner from its name (IG CX[Identifier] rows 4 and EI[Identifier] rows 2-4)."""
    ident: dict[str, Any] = {"value": value}
    system = _hd_system(run, namespace, universal, utype)
    if system:
        ident["system"] = system
    if namespace or universal:
        ident["assigner"] = {"display": namespace or universal}
    return ident


@converter("CX[Identifier]", COMPOSITE)
def _cx(run: Run, rule: Rule, raw: str) -> Any:
    c = run.comps(raw)
    value = run.text(c[0]).strip() if c[0] else ""
    if not value or value == '""':
        return None
    hd = [run.text(s).strip() for s in run.subs(c[3])] + ["", ""] if len(c) > 3 and c[3] else ["", "", ""]
    ident = _identifier(run, value, hd[0], hd[1], hd[2])
    type_code = code_text(run.text(c[4])) if len(c) > 4 and c[4] else ""
    if type_code:
        ident["type"] = {"coding": [{"system": V2_0203, "code": type_code}]}
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
    return _identifier(run, c[0], c[1], c[2], c[3]) if c[0] else None


@converter("EI[Reference]", COMPOSITE)
def _ei_reference(run: Run, rule: Rule, raw: str) -> Any:
    ident = _ei(run, rule, raw)
    if not ident:
        return None
    ident.pop("assigner", None)
    return {"identifier": ident}


def _first_part(run: Run, raw: str) -> str:
    """Subcomponent 1 of component 1 (XPN.1.1 surname, XAD.1.1 street), unescaped."""
    first = run.comps(raw)[0]
    return run.text(run.subs(first)[0]).strip() if first else ""


def _compact(d: dict[str, Any]) -> dict[str, Any] | None:
    """The dict without its empty values; None when nothing is left."""
    out = {k: v for k, v in d.items() if v}
    return out or None


@converter("XPN[HumanName]", COMPOSITE)
def _xpn(run: Run, rule: Rule, raw: str) -> Any:
    t = run.leaves(raw, 7)
    name = _compact({"family": _first_part(run, raw), "given": [g for g in (t[1], *t[2].split()) if g],
                     "prefix": [t[4]] if t[4] else None, "suffix": [x for x in (t[3], t[5]) if x]})
    if name is not None and t[6]:
        use = _lookup(run, "name-use", t[6])
        if use:
            name["use"] = use
    return name


@converter("XAD[Address]", COMPOSITE)
def _xad(run: Run, rule: Rule, raw: str) -> Any:
    t = run.leaves(raw, 9)
    addr = _compact({"line": [x for x in (_first_part(run, raw), t[1]) if x], "city": t[2], "state": t[3],
                     "postalCode": t[4], "country": t[5], "district": t[8]})
    if addr is not None and t[6]:
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


def cwe_to_cc(run: Run, raw: str, table: Table | None = None, default_system: str | None = None) -> dict | None:
    """CWE/CE/CNE -> CodeableConcept (IG CWE[CodeableConcept]): the primary, alternate and second
    alternate codings, original text (CWE.9) as text, or CWE.2 as text when nothing is coded.

    `default_system` is the system of a primary code that names none: the HL7 table of a field
    typed IS or ID in older versions (PV1-36 is IS, table 0112, before v2.7 made it CWE)."""
    t = run.leaves(raw, 13)
    codings: list[dict[str, Any]] = []
    _add_coding(run, codings, t[0], t[1], t[2], t[6], table, default_system)  # the primary code
    _add_coding(run, codings, t[3], t[4], t[5], t[7], None, None)             # alternate
    _add_coding(run, codings, t[9], t[10], t[11], t[12], None, None)          # second alternate
    cc: dict[str, Any] = {}
    if codings:
        cc["coding"] = codings
    text = t[8] or ("" if codings else t[1])
    if text:
        cc["text"] = text
    return cc or None


def _add_coding(run: Run, codings: list[dict[str, Any]], raw_code: str, display: str, system_name: str,
                version: str, table: Table | None, default_system: str | None) -> None:
    """One triplet of a CWE as a Coding, when it has a code: through the table if one is
    given and knows the code, else with the system its name stands for."""
    code = code_text(raw_code)
    if not code or code == '""':
        return
    if table is not None:
        hit = table_hit(table, code)
        if hit is not None:
            system, mapped = hit
            coding = {"system": system, "code": mapped} if system else {"code": mapped}
            disp = table.display.get(mapped) or display
            if disp:
                coding["display"] = disp
            codings.append(coding)
            return
    out: dict[str, Any] = {}
    system = run.vocab.system_for(system_name) or (default_system if not system_name else None)
    if system:
        out["system"] = system
    if version:
        out["version"] = version
    out["code"] = code
    if display:
        out["display"] = display
    codings.append(out)


def table_hit(table: Table, code: str) -> tuple[str | None, Any] | None:
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
    return cwe_to_cc(run, raw, rule.table, rule.system)


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
        elif code in all_cdc or _CDC_CODE.fullmatch(code or ""):
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
    """(unit as written, UCUM code or None) of a CWE unit; cached, units recur in every message.
    The cache is the vocabulary's (its UCUM list decides), keyed by the text and the
    delimiters it is read with, as strings: they hash at once, where the frozen Delimiters
    hashed through a Python-level __hash__."""
    d = run.msg.delims
    key = (unit_raw, d.field, d.component, d.repetition, d.escape, d.subcomponent, d.truncation)
    cache = run.vocab.units_seen
    hit = cache.get(key)
    if hit is None:
        t = run.leaves(unit_raw, 3)
        code, text, system = t[0], t[1], t[2]
        ucum = code if system.upper() == "UCUM" and code else (run.vocab.ucum_for(code) or run.vocab.ucum_for(text))
        hit = (code or text, ucum)
        if len(cache) > 10_000:
            cache.clear()
        cache[key] = hit
    return hit


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


_RANGE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*\Z", re.ASCII)
_LIMIT = re.compile(r"\s*([<>])=?\s*(-?\d+(?:\.\d+)?)\s*\Z", re.ASCII)


@converter("ST[referenceRange]", SCALAR)
def _reference_range(run: Run, rule: Rule, v: str) -> Any:
    """OBX-7 -> referenceRange: the text always, and low/high when it reads 'a-b', '<b' or '>a'."""
    text = v.strip()
    if not text:
        return None
    rr: dict[str, Any] = {"text": text}
    bounds = _RANGE_CACHE.get(text)
    if bounds is None:
        bounds = _range_bounds(text)
        if len(_RANGE_CACHE) > 10_000:
            _RANGE_CACHE.clear()
        _RANGE_CACHE[text] = bounds
    if bounds:
        unit = _unit_raw(run, rule)
        for key, value in bounds:
            rr[key] = _quantity(run, value, unit)
    return rr


_RANGE_CACHE: dict[str, tuple] = {}


def _range_bounds(text: str) -> tuple:
    """(('low', a), ('high', b)) for 'a-b', (('high', b),) for '<b', (('low', a),) for '>a', else ()."""
    m = _RANGE.match(text)
    if m:
        return (("low", parse_nm(m[1])), ("high", parse_nm(m[2])))
    m = _LIMIT.match(text)
    if m:
        return (("high" if m[1] == "<" else "low", parse_nm(m[2])),)
    return ()


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
    if not reps:  # OBX-5 of empty repetitions ("~")
        return None
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
    hit = table_hit(table, code)
    return None if hit is None else hit[1]


__all__ = ["COMPOSITE", "CONVERTERS", "MANY", "SCALAR", "VALUEX", "Coded", "ConversionError", "Converter", "Table",
           "converter", "cwe_to_cc", "dtm_offset", "dtm_to_fhir", "parse_nm", "table_hit", "tm_to_fhir"]
