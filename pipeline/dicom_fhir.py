"""DICOM records -> FHIR R4 ImagingStudy, Patient and Device, driven by mappings/dicom/.

The mapping file says which attribute feeds which element and through which converter
(the vocabulary is in mappings/dicom/README.md). This module owns what a file cannot
say declaratively: grouping instances into studies and series, their canonical order,
counts, references between the resources, and deterministic ids.

Order makes the output independent of how instances arrive (walk order, server order):
series are sorted by (Series Number, Series Instance UID), instances by (Instance Number,
SOP Instance UID), and study, patient and series values come from the first instance.
The same instances therefore give the same resources, from files or from DICOMweb.

Rules are compiled once into closures; mapping one instance is a few dict lookups.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from pydicom.datadict import tag_for_keyword
from pydicom.uid import UID

from .dicom import Wanted
from .errors import ConfigError
from .resources import mappings_dir
from .units import Rejected, Resource

log = logging.getLogger(__name__)
DCM = "http://dicom.nema.org/resources/ontology/DCM"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
EN_REPRESENTATION = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
STUDY_UID, SERIES_UID, SOP_UID = "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"
PATIENT_ID = "PatientID"
_ORDER_KEYS = ("SeriesNumber", "InstanceNumber")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_CS = re.compile(r"[A-Z0-9_ ]{1,16}")
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_CODE_ITEM = ("CodeValue", "LongCodeValue", "URNCodeValue", "CodingSchemeDesignator", "CodeMeaning")
_ISSUER_ITEM = ("LocalNamespaceEntityID", "UniversalEntityID", "UniversalEntityIDType")
_QUALIFIER_ITEM = ("UniversalEntityID", "UniversalEntityIDType", "IdentifierTypeCode")
SECTIONS = {  # section -> the record(s) its values come from
    "ImagingStudy": "first instance of the study",
    "ImagingStudy.series": "first instance of each series",
    "ImagingStudy.series.instance": "each instance",
    "Patient": "first instance of the study",
    "Device": "first instance of each series",
}
DEFAULT_MAPPING = "fhir-r4.toml"


def valid_uid(value: Any) -> bool:
    """A DICOM UID (PS3.5 9.1): dot-separated numbers without leading zeros, at most 64 chars.

    Such a UID is also a valid FHIR `id` and `oid` body, so it is safe in URLs and ids.
    """
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def stable_id(*parts: str) -> str:
    """A deterministic FHIR id (32 hex characters) from the parts that identify a resource."""
    return hashlib.sha256("\x1f".join(("dicom", *parts)).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- converters


@dataclass
class Tables:
    """The lookup tables a mapping brings (its own TOML sections and the CSV files beside it)."""

    coding_schemes: dict[str, str] = field(default_factory=dict)
    gender: dict[str, str] = field(default_factory=dict)
    laterality: dict[str, dict[str, str]] = field(default_factory=dict)
    issuers: dict[str, str] = field(default_factory=dict)
    body_parts: dict[str, dict[str, str]] = field(default_factory=dict)
    modalities: dict[str, str] = field(default_factory=dict)
    timezone: ZoneInfo | None = None


Converter = Callable[[list[Any], Tables, Any], Any]


def _first(v: Any) -> Any:
    if isinstance(v, list):
        return v[0] if v else None
    return v


def _text(v: Any) -> str | None:
    if isinstance(v, list):
        parts = [t for t in (_text(x) for x in v) if t]
        return ", ".join(parts) or None
    if isinstance(v, dict):
        return _name_display(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return v if isinstance(v, str) and v else None


def conv_text(values: list[Any], t: Tables, arg: Any) -> str | None:
    return _text(values[0])


def conv_unsigned_int(values: list[Any], t: Tables, arg: Any) -> int | None:
    v = _first(values[0])
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2147483647 else None


def _digits(s: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²' and other scripts' digits."""
    return s.isascii() and s.isdigit()


def _da(v: Any) -> date | None:
    v = _first(v)
    if not isinstance(v, str):
        return None
    v = v.replace(".", "") if len(v) == 10 else v  # ACR-NEMA YYYY.MM.DD
    if len(v) != 8 or not _digits(v):
        return None
    try:
        d = date(int(v[:4]), int(v[4:6]), int(v[6:]))
    except ValueError:
        return None
    return d if d.year >= 1 else None


def _tm(v: Any) -> tuple[int, int, int, str] | None:
    """TM (PS3.5 6.2): HH, HHMM, HHMMSS, HHMMSS.F{1,6}; the old HH:MM:SS too."""
    v = _first(v)
    if not isinstance(v, str):
        return None
    main, _, frac = v.replace(":", "").partition(".")
    if len(main) not in (2, 4, 6) or not _digits(main) or (frac and not (_digits(frac) and len(frac) <= 6)):
        return None
    h, m, s = int(main[:2]), int(main[2:4] or 0), int(main[4:6] or 0)
    if h > 23 or m > 59 or s > 60:
        return None
    return h, m, s, frac


def _offset(v: Any) -> timedelta | None:
    """Timezone Offset From UTC (0008,0201): &ZZXX, e.g. +0100, -0500."""
    v = _first(v)
    if not isinstance(v, str) or len(v) != 5 or v[0] not in "+-" or not _digits(v[1:]):
        return None
    hours, minutes = int(v[1:3]), int(v[3:])
    if hours > 14 or minutes > 59:
        return None
    delta = timedelta(hours=hours, minutes=minutes)
    return -delta if v[0] == "-" else delta


def conv_date(values: list[Any], t: Tables, arg: Any) -> str | None:
    d = _da(values[0])
    return d.isoformat() if d else None


def conv_datetime(values: list[Any], t: Tables, arg: Any) -> str | None:
    """(DA, TM, offset) -> FHIR dateTime. A time needs an offset in FHIR R4: from the
    instance, else from the configured time zone; without either only the date is kept."""
    d = _da(values[0])
    if d is None:
        return None
    tm = _tm(values[1]) if len(values) > 1 else None
    if tm is None:
        return d.isoformat()
    h, m, s, frac = tm
    off = _offset(values[2]) if len(values) > 2 else None
    if off is None and t.timezone is not None:
        off = datetime(d.year, d.month, d.day, h, m, min(s, 59), tzinfo=t.timezone).utcoffset()
    if off is None:
        return d.isoformat()
    minutes = int(off.total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    fraction = f".{frac}" if frac else ""
    return f"{d.isoformat()}T{h:02d}:{m:02d}:{s:02d}{fraction}{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _name_groups(pn: Any) -> list[tuple[str, list[str]]]:
    if not isinstance(pn, dict):
        return []
    out = []
    for group in ("Alphabetic", "Ideographic", "Phonetic"):
        text = pn.get(group)
        if isinstance(text, str) and text.strip(" ^"):
            comps = [c.strip() for c in text.split("^")[:5]]
            out.append((group, comps + [""] * (5 - len(comps))))
    return out


def _name_display(pn: Any) -> str | None:
    groups = _name_groups(pn)
    if not groups:
        return None
    family, given, middle, prefix, suffix = groups[0][1]
    return " ".join(p for p in (prefix, given, middle, family, suffix) if p) or None


def conv_display_reference(values: list[Any], t: Tables, arg: Any) -> dict[str, str] | None:
    display = _name_display(_first(values[0]))
    return {"display": display} if display else None


def conv_human_names(values: list[Any], t: Tables, arg: Any) -> list[dict[str, Any]] | None:
    """PN -> HumanName per component group (PS3.5 6.2.1); ideographic and phonetic groups
    carry the iso21090-EN-representation extension (IDE, SYL)."""
    names = []
    for group, (family, given, middle, prefix, suffix) in _name_groups(_first(values[0])):
        name: dict[str, Any] = {}
        if group != "Alphabetic":
            name["extension"] = [{"url": EN_REPRESENTATION, "valueCode": "IDE" if group == "Ideographic" else "SYL"}]
        if family:
            name["family"] = family
        if given or middle:
            name["given"] = [g for g in (given, middle) if g]
        if prefix:
            name["prefix"] = [prefix]
        if suffix:
            name["suffix"] = [suffix]
        names.append(name)
    return names or None


def conv_gender(values: list[Any], t: Tables, arg: Any) -> str | None:
    v = _first(values[0])
    if not isinstance(v, str) or not v:
        return None
    return t.gender.get(v.upper(), "unknown")


def _cs(v: Any) -> str | None:
    v = _first(v)
    return v.upper() if isinstance(v, str) and _CS.fullmatch(v.upper()) else None


def conv_modality(values: list[Any], t: Tables, arg: Any) -> dict[str, str] | None:
    code = _cs(values[0])
    if code is None:
        return None
    coding = {"system": DCM, "code": code.strip()}
    display = t.modalities.get(coding["code"])
    if display:
        coding["display"] = display
    return coding


def conv_sop_class(values: list[Any], t: Tables, arg: Any) -> dict[str, str] | None:
    uid = _first(values[0])
    if not valid_uid(uid):
        return None
    coding = {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{uid}"}
    name = UID(uid).name
    if name != uid:
        coding["display"] = name
    return coding


def _code_item(item: Any, t: Tables) -> dict[str, str] | None:
    """A Code Sequence item (PS3.3 8.8) -> Coding."""
    if not isinstance(item, dict):
        return None
    code = _text(item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue"))
    if not code:
        return None
    coding = {}
    system = t.coding_schemes.get(_text(item.get("CodingSchemeDesignator")) or "")
    if system:
        coding["system"] = system
    coding["code"] = code
    display = _text(item.get("CodeMeaning"))
    if display:
        coding["display"] = display
    return coding


def conv_coding(values: list[Any], t: Tables, arg: Any) -> dict[str, str] | None:
    items = values[0] if isinstance(values[0], list) else []
    return next((c for c in (_code_item(i, t) for i in items) if c), None)


def conv_codeable_concepts(values: list[Any], t: Tables, arg: Any) -> list[dict[str, Any]] | None:
    out = []
    for item in values[0] if isinstance(values[0], list) else []:
        coding = _code_item(item, t)
        if coding:
            concept: dict[str, Any] = {"coding": [coding]}
            if "display" in coding:
                concept["text"] = coding["display"]
            out.append(concept)
    return out or None


def conv_body_part(values: list[Any], t: Tables, arg: Any) -> dict[str, str] | None:
    """Body Part Examined (0018,0015) -> SNOMED CT via PS3.16 Annex L; unknown terms keep
    their text as display only."""
    term = _text(_first(values[0]))
    if not term:
        return None
    known = t.body_parts.get(term.upper())
    return dict(known) if known else {"display": term}


def conv_laterality(values: list[Any], t: Tables, arg: Any) -> dict[str, str] | None:
    code = _cs(values[0])
    found = t.laterality.get(code.strip()) if code else None
    return dict(found) if found else None


def _entity_system(item: Any) -> str | None:
    """Universal Entity ID (0040,0032) as a URI, by its type (PS3.3 10.14)."""
    if not isinstance(item, dict):
        return None
    uid, kind = _text(item.get("UniversalEntityID")), _text(item.get("UniversalEntityIDType"))
    if not uid:
        return None
    if kind == "ISO" and _OID.fullmatch(uid):
        return f"urn:oid:{uid}"
    if kind in ("URI", "URL") and ":" in uid:
        return uid
    if kind == "UUID" and re.fullmatch(r"[0-9a-fA-F-]{36}", uid):
        return f"urn:uuid:{uid.lower()}"
    return None


def _issuer_system(issuer: str | None, t: Tables) -> str | None:
    if not issuer:
        return None
    if issuer in t.issuers:
        return t.issuers[issuer]
    if _OID.fullmatch(issuer):
        return f"urn:oid:{issuer}"
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:\S+", issuer):
        return issuer
    return None


def conv_patient_identifier(values: list[Any], t: Tables, arg: Any) -> dict[str, Any] | None:
    """(PatientID, IssuerOfPatientID, IssuerOfPatientIDQualifiersSequence) -> Identifier.

    system: the qualifiers' universal entity id, else the [issuers] table, else the issuer
    itself when it is an OID or a URI. An issuer that is none of these stays as
    assigner.display (and in the Patient id), never invented into a system.
    """
    value = _text(_first(values[0]))
    if not value:
        return None
    issuer = _text(_first(values[1])) if len(values) > 1 else None
    qualifiers = values[2][0] if len(values) > 2 and isinstance(values[2], list) and values[2] else None
    identifier: dict[str, Any] = {}
    type_code = _text(qualifiers.get("IdentifierTypeCode")) if isinstance(qualifiers, dict) else None
    if type_code:
        identifier["type"] = {"coding": [{"system": V2_0203, "code": type_code}]}
    system = _entity_system(qualifiers) or _issuer_system(issuer, t)
    if system:
        identifier["system"] = system
    identifier["value"] = value
    if issuer:
        identifier["assigner"] = {"display": issuer}
    return identifier


def conv_accession(values: list[Any], t: Tables, arg: Any) -> dict[str, Any] | None:
    """(AccessionNumber, IssuerOfAccessionNumberSequence) -> Identifier of type ACSN."""
    value = _text(_first(values[0]))
    if not value:
        return None
    identifier: dict[str, Any] = {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}}
    issuer = values[1][0] if len(values) > 1 and isinstance(values[1], list) and values[1] else None
    system = _entity_system(issuer)
    if system:
        identifier["system"] = system
    identifier["value"] = value
    local = _text(issuer.get("LocalNamespaceEntityID")) if isinstance(issuer, dict) else None
    if local:
        identifier["assigner"] = {"display": local}
    return identifier


def conv_device_name(values: list[Any], t: Tables, arg: Any) -> dict[str, str] | None:
    name = _text(values[0])
    return {"name": name, "type": arg} if name else None


def conv_versions(values: list[Any], t: Tables, arg: Any) -> list[dict[str, str]] | None:
    v = values[0]
    items = [_text(x) for x in (v if isinstance(v, list) else [v])]
    return [{"value": x} for x in items if x] or None


@dataclass(frozen=True)
class ConverterSpec:
    fn: Converter
    arity: tuple[int, int]  # how many `from` attributes it takes (min, max)
    children: dict[int, tuple[str, ...]] = field(default_factory=dict)  # sequence items it reads
    doc: str = ""


CONVERTERS: dict[str, ConverterSpec] = {
    "text": ConverterSpec(conv_text, (1, 1), doc="the value as a string (several values joined by ', ')"),
    "unsigned-int": ConverterSpec(conv_unsigned_int, (1, 1), doc="an IS value as unsignedInt"),
    "date": ConverterSpec(conv_date, (1, 1), doc="DA -> FHIR date"),
    "datetime": ConverterSpec(conv_datetime, (1, 3), doc="(DA, TM, offset) -> FHIR dateTime"),
    "display-reference": ConverterSpec(conv_display_reference, (1, 1), doc="PN -> Reference with display only"),
    "human-names": ConverterSpec(conv_human_names, (1, 1), doc="PN -> list of HumanName"),
    "gender": ConverterSpec(conv_gender, (1, 1), doc="CS via [gender]"),
    "modality": ConverterSpec(conv_modality, (1, 1), doc="CS -> Coding in the DCM system"),
    "sop-class": ConverterSpec(conv_sop_class, (1, 1), doc="UI -> Coding urn:ietf:rfc:3986 urn:oid:..."),
    "coding": ConverterSpec(conv_coding, (1, 1), {0: _CODE_ITEM}, doc="first code sequence item -> Coding"),
    "codeable-concepts": ConverterSpec(conv_codeable_concepts, (1, 1), {0: _CODE_ITEM},
                                       doc="code sequence items -> list of CodeableConcept"),
    "body-part": ConverterSpec(conv_body_part, (1, 1), doc="Body Part Examined via body-parts.csv"),
    "laterality": ConverterSpec(conv_laterality, (1, 1), doc="CS via [laterality]"),
    "patient-identifier": ConverterSpec(conv_patient_identifier, (1, 3), {2: _QUALIFIER_ITEM},
                                        doc="(PatientID, IssuerOfPatientID, qualifiers) -> Identifier"),
    "accession": ConverterSpec(conv_accession, (1, 2), {1: _ISSUER_ITEM}, doc="accession -> Identifier ACSN"),
    "device-name": ConverterSpec(conv_device_name, (1, 1), doc="text -> Device.deviceName with type `arg`"),
    "versions": ConverterSpec(conv_versions, (1, 1), doc="values -> list of Device.version"),
}


# --------------------------------------------------------------------------- compiled rules


@dataclass(frozen=True)
class Rule:
    paths: tuple[tuple[str, ...], ...]
    fn: Converter | None
    arg: Any = None
    const: Any = None

    def __call__(self, rec: dict[str, Any], t: Tables) -> Any:
        if self.fn is None:
            return self.const
        values = [_lookup(rec, p) for p in self.paths]
        if values[0] is None:
            return None
        return self.fn(values, t, self.arg)


def _lookup(rec: dict[str, Any], path: tuple[str, ...]) -> Any:
    """Follow a path through sequences (the first item of each), as in A/B/C."""
    value: Any = rec
    for i, key in enumerate(path):
        if i:
            if not isinstance(value, list) or not value:
                return None
            value = value[0]
        if not isinstance(value, dict):
            return None
        value = value.get(key)
        if value is None:
            return None
    return value


@dataclass(frozen=True)
class Element:
    """One target element: its path (`a.b`, or `name` with an item index) and its rules."""

    name: str
    steps: tuple[str, ...]
    index: int | None
    rules: tuple[Rule, ...]
    required: bool

    def value(self, rec: dict[str, Any], t: Tables) -> Any:
        for rule in self.rules:
            v = rule(rec, t)
            if v is not None:
                return v
        return None


@dataclass(frozen=True)
class Section:
    elements: tuple[Element, ...]

    def build(self, rec: dict[str, Any], t: Tables, missing: list[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        items: dict[str, list[tuple[int, Any]]] = {}
        for el in self.elements:
            v = el.value(rec, t)
            if v is None:
                if el.required and missing is not None:
                    missing.append(el.name)
                continue
            if el.index is not None:
                items.setdefault(el.steps[0], []).append((el.index, v))
                continue
            node = out
            for step in el.steps[:-1]:
                node = node.setdefault(step, {})
            node[el.steps[-1]] = v
        for name, indexed in items.items():
            out[name] = [v for _, v in sorted(indexed, key=lambda iv: iv[0])]
        return out

    def required(self) -> Section:
        return Section(tuple(e for e in self.elements if e.required))


# --------------------------------------------------------------------------- the mapping


class DicomMapping:
    """A compiled mapping file. `admit` checks one instance, `map_study` maps a whole study."""

    def __init__(self, doc: dict[str, Any], tables: Tables, *, patient_rule: str | None = None, source: str = ""):
        problems: list[str] = []
        self.tables = tables
        self.source = source
        self.sections: dict[str, Section] = {}
        paths: set[str] = {STUDY_UID, SERIES_UID, SOP_UID, *_ORDER_KEYS}
        known = {"settings", "issuers", "coding_schemes", "gender", "laterality", "ImagingStudy", "Patient", "Device"}
        problems.extend(f"[{k}]: unknown table (one of {', '.join(sorted(known))})" for k in doc if k not in known)
        for name in SECTIONS:
            body: Any = doc
            for part in name.split("."):
                body = body.get(part, {}) if isinstance(body, dict) else {}
            self.sections[name] = _section(name, body, paths, problems)
        self.patient_from, self.patient_fixed = _patient_rule(patient_rule, doc.get("settings", {}), problems)
        if self.patient_from:
            paths.add(self.patient_from)
        if problems:
            raise ConfigError(f"the DICOM mapping {source or ''} has problems", problems)
        self.wanted = Wanted.of(sorted(paths))
        # de-identification of each record before it is mapped (pipeline.privacy.dicom_deid)
        self.record_filter: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self._admit = [s.required() for s in self.sections.values()]
        self._patient_identifier = Section(tuple(e for e in self.sections["Patient"].elements
                                                 if e.steps[0] == "identifier"))

    @classmethod
    def load(cls, path: str | Path | None = None, *, patient_rule: str | None = None,
             timezone: str | None = None, deid_profile: str | None = None) -> DicomMapping:
        """Load a mapping file (default mappings/dicom/fhir-r4.toml) and the CSV tables beside it.
        `deid_profile`: a file in mappings/deid/ whose PS3.15 actions each record goes through."""
        path = Path(path) if path else mappings_dir() / "dicom" / DEFAULT_MAPPING
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"the DICOM mapping {path} cannot be read ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"the DICOM mapping {path} is not valid TOML: {e}") from None
        tables = _tables(doc, path.parent, timezone)
        mapping = cls(doc, tables, patient_rule=patient_rule, source=str(path))
        if deid_profile:
            from .privacy.dicom_deid import load_dicom_profile, record_filter

            mapping.record_filter = record_filter(load_dicom_profile(mappings_dir() / "deid" / deid_profile))
        return mapping

    # ------------------------------------------------------------------ instances

    def admit(self, rec: dict[str, Any], ref: str) -> Rejected | None:
        """Check one instance before it is grouped: UIDs, patient, required elements.

        Applies the patient linking rule to `rec` (a file without Patient ID gets the id
        the rule names). Returns a Rejected listing every problem at once, or None.
        """
        bad = [k for k in (STUDY_UID, SERIES_UID, SOP_UID) if not valid_uid(rec.get(k))]
        if not _text(rec.get(PATIENT_ID)):
            linked = self.patient_fixed or (_text(_first(rec.get(self.patient_from))) if self.patient_from else None)
            if linked is None:
                if bad:
                    return self._missing(bad, ref)
                why = (f"the linking rule's attribute {self.patient_from} is empty too" if self.patient_from else
                       "no linking rule names its patient: give patient_rule (patient_id_from=<keyword> or "
                       "patient_id=<id>)")
                return Rejected("map", "no-patient-id", f"the instance has no Patient ID (0010,0020) and {why}; "
                                "or fix the file", ref, payload_ref=ref)
            rec[PATIENT_ID] = linked
        missing: list[str] = []
        for section in self._admit:
            section.build(rec, self.tables, missing)
        return self._missing(bad + missing, ref) if bad or missing else None

    def _missing(self, problems: list[str], ref: str) -> Rejected:
        return Rejected("map", "missing-required", "required attributes missing or not valid: "
                        + ", ".join(problems), ref, payload_ref=ref)

    def patient_key(self, rec: dict[str, Any]) -> tuple[str, str]:
        """(namespace, value) of the instance's patient: what makes the Patient id."""
        built = self._patient_identifier.build(rec, self.tables).get("identifier") or [{}]
        ident = built[0]
        namespace = ident.get("system") or ident.get("assigner", {}).get("display") or ""
        return namespace, str(ident.get("value", ""))

    # ------------------------------------------------------------------ studies

    def map_study(self, instances: Iterable[tuple[dict[str, Any], str]]) -> list[Resource | Rejected]:
        """Map the admitted instances of one study (record, source_ref) to FHIR resources.

        Instances naming another patient than the study's first one are rejected
        (`patient-mismatch`): a study belongs to one patient, and guessing which is wrong.
        """
        if self.record_filter is not None:
            instances = [(self.record_filter(rec), ref) for rec, ref in instances]
        series: dict[str, list[tuple[dict[str, Any], str]]] = {}
        for rec, ref in instances:
            series.setdefault(rec[SERIES_UID], []).append((rec, ref))
        if not series:
            return []
        for recs in series.values():
            recs.sort(key=lambda r: _instance_key(r[0]))
        ordered = sorted(((_sort_key(recs[0][0], SERIES_UID, "SeriesNumber"), uid, recs)
                          for uid, recs in series.items()), key=lambda x: x[0])
        first = ordered[0][2][0][0]
        study_uid = first[STUDY_UID]
        key = self.patient_key(first)
        out: list[Resource | Rejected] = []
        kept_series = []
        for _, uid, recs in ordered:
            kept = []
            for rec, ref in recs:
                if self.patient_key(rec) != key:
                    out.append(Rejected("map", "patient-mismatch", f"the instance names another patient than "
                                        f"the first instance of its study {study_uid}: fix the file or the study",
                                        ref, payload_ref=ref))
                else:
                    kept.append(rec)
            if kept:
                kept_series.append((uid, kept))
        t = self.tables
        ref = f"study:{study_uid}"
        patient = {"resourceType": "Patient", "id": stable_id("Patient", *key)}
        patient.update(self.sections["Patient"].build(first, t))
        resources = [_fhir_order(patient, _PATIENT_ORDER)]
        devices: dict[str, dict[str, Any]] = {}
        series_out = []
        n_instances = 0
        for uid, recs in kept_series:
            s: dict[str, Any] = {"uid": uid}
            s.update(self.sections["ImagingStudy.series"].build(recs[0], t))
            s["numberOfInstances"] = len(recs)
            device = self.sections["Device"].build(recs[0], t)
            if device:
                device_id = stable_id("Device", orjson.dumps(device, option=orjson.OPT_SORT_KEYS).decode())
                devices.setdefault(device_id, _fhir_order({"resourceType": "Device", "id": device_id, **device},
                                                          _DEVICE_ORDER))
                s["performer"] = [{"actor": {"reference": f"Device/{device_id}"}}]
            instance_section = self.sections["ImagingStudy.series.instance"]
            s["instance"] = [{"uid": r[SOP_UID], **instance_section.build(r, t)} for r in recs]
            n_instances += len(recs)
            series_out.append(_fhir_order(s, _SERIES_ORDER))
        resources.extend(devices.values())
        study: dict[str, Any] = {
            "resourceType": "ImagingStudy",
            "id": stable_id("ImagingStudy", study_uid),
            "status": "available",
            "subject": {"reference": f"Patient/{patient['id']}"},
            "numberOfSeries": len(series_out),
            "numberOfInstances": n_instances,
        }
        mapped = self.sections["ImagingStudy"].build(first, t)
        study["identifier"] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}, *mapped.pop("identifier", [])]
        study.update(mapped)
        modalities = []
        for s in series_out:
            m = s.get("modality")
            if m and m["code"] in t.modalities and m not in modalities:
                modalities.append(m)
        if modalities:
            study["modality"] = modalities
        study["series"] = series_out
        resources.append(_fhir_order(study, _STUDY_ORDER))
        out[:0] = [Resource(r, ref) for r in resources]
        return out


_STUDY_ORDER = ("resourceType", "id", "identifier", "status", "modality", "subject", "started", "referrer",
                "numberOfSeries", "numberOfInstances", "procedureCode", "description", "series")
_PATIENT_ORDER = ("resourceType", "id", "identifier", "active", "name", "telecom", "gender", "birthDate")
_DEVICE_ORDER = ("resourceType", "id", "identifier", "status", "manufacturer", "serialNumber", "deviceName",
                 "modelNumber", "type", "version")
_SERIES_ORDER = ("uid", "number", "modality", "description", "numberOfInstances", "bodySite", "laterality",
                 "started", "performer", "instance")


def _fhir_order(d: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    """Elements in the order of the FHIR specification (JSON consumers do not care; people do)."""
    rank = {k: i for i, k in enumerate(order)}
    return dict(sorted(d.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _sort_key(rec: dict[str, Any], uid_key: str, number_key: str) -> tuple[int, int, str]:
    """Numbered first, by number, then by UID: a total order that does not depend on arrival."""
    n = rec.get(number_key)
    return (0, n, rec[uid_key]) if isinstance(n, int) else (1, 0, rec[uid_key])


def _instance_key(rec: dict[str, Any]) -> tuple[int, int, str]:
    return _sort_key(rec, SOP_UID, "InstanceNumber")


def _section(name: str, body: Any, paths: set[str], problems: list[str]) -> Section:
    if not isinstance(body, dict):
        problems.append(f"[{name}]: expected a table")
        return Section(())
    elements = []
    for key, spec in body.items():
        if isinstance(spec, dict) and not ({"from", "const"} & spec.keys()):
            if f"{name}.{key}" not in SECTIONS:
                problems.append(f"[{name}.{key}]: not a section (one of {', '.join(SECTIONS)})")
            continue  # a nested section ([ImagingStudy.series] inside [ImagingStudy])
        where = f"[{name}] {key}"
        m = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*(?:\.[A-Za-z][A-Za-z0-9]*)*)(?:\[(\d+)\])?", key)
        if not m:
            problems.append(f"{where}: not an element path (name, a.b, or name[N])")
            continue
        steps = tuple(m[1].split("."))
        index = int(m[2]) if m[2] is not None else None
        if index is not None and len(steps) > 1:
            problems.append(f"{where}: an item index is allowed on a top-level element only")
            continue
        specs = spec if isinstance(spec, list) else [spec]
        rules = []
        required = False
        for s in specs:
            rule = _rule(where, s, paths, problems)
            if rule is not None:
                rules.append(rule)
                required = required or bool(isinstance(s, dict) and s.get("required"))
        label = f"{name.removeprefix('ImagingStudy.')}.{key} ({', '.join(_sources(specs))})"
        elements.append(Element(label, steps, index, tuple(rules), required))
    return Section(tuple(elements))


def _sources(specs: list[Any]) -> list[str]:
    out = []
    for s in specs:
        src = s.get("from", []) if isinstance(s, dict) else []
        out.extend(src if isinstance(src, list) else [src])
    return [str(x) for x in out[:1]] or ["const"]


def _rule(where: str, spec: Any, paths: set[str], problems: list[str]) -> Rule | None:
    if not isinstance(spec, dict):
        problems.append(f"{where}: a rule is a table {{ from = ..., as = ... }} or {{ const = ... }}")
        return None
    unknown = spec.keys() - {"from", "as", "arg", "const", "required"}
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    if "const" in spec:
        return Rule((), None, const=spec["const"])
    sources = spec["from"] if isinstance(spec["from"], list) else [spec["from"]]
    conv_name = spec.get("as", "text")
    conv = CONVERTERS.get(conv_name)
    if conv is None:
        problems.append(f"{where}: unknown converter {conv_name!r} (one of {', '.join(sorted(CONVERTERS))})")
        return None
    if not (conv.arity[0] <= len(sources) <= conv.arity[1]):
        problems.append(f"{where}: converter {conv_name!r} takes {conv.arity[0]} to {conv.arity[1]} attribute(s)")
        return None
    rule_paths = []
    for i, src in enumerate(sources):
        if not isinstance(src, str) or not src:
            problems.append(f"{where}: `from` holds attribute keywords or paths (A/B/C)")
            return None
        parts = tuple(p.strip() for p in src.split("/"))
        for p in parts:
            if tag_for_keyword(p) is None and not re.fullmatch(r"[^:]+:\([0-9A-Fa-f]{4},xx[0-9A-Fa-f]{2}\)", p):
                problems.append(f"{where}: {p!r} is not a DICOM keyword (PS3.6) nor CREATOR:(gggg,xxee)")
        paths.add(src)
        for child in conv.children.get(i, ()):
            paths.add(f"{src}/{child}")
        rule_paths.append(parts)
    return Rule(tuple(rule_paths), conv.fn, spec.get("arg"))


def _patient_rule(rule: str | None, settings: dict[str, Any], problems: list[str]) -> tuple[str | None, str | None]:
    """`patient_id_from=<Keyword>` or `patient_id=<id>`; else the mapping's own setting."""
    if rule:
        name, sep, value = rule.partition("=")
        value = value.strip()
        if not sep or not value:
            problems.append("patient_rule: expected patient_id_from=<keyword> or patient_id=<id>")
        elif name.strip() == "patient_id_from":
            if tag_for_keyword(value) is None:
                problems.append(f"patient_rule: {value!r} is not a DICOM keyword")
            return value, None
        elif name.strip() == "patient_id":
            return None, value
        else:
            problems.append("patient_rule: expected patient_id_from=<keyword> or patient_id=<id>")
        return None, None
    keyword = settings.get("patient_id_from") or None
    if keyword and tag_for_keyword(keyword) is None:
        problems.append(f"[settings] patient_id_from: {keyword!r} is not a DICOM keyword")
        return None, None
    return keyword, None


def _tables(doc: dict[str, Any], folder: Path, timezone: str | None) -> Tables:
    settings = doc.get("settings", {})
    zone_name = timezone if timezone is not None else settings.get("timezone", "")
    zone = None
    if zone_name:
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"unknown time zone {zone_name!r}: use an IANA name such as Europe/Paris") from None
    body_parts = {row["body_part_examined"]: {"system": "http://snomed.info/sct", "code": row["code"],
                                              "display": row["display"]}
                  for row in _csv(folder / "body-parts.csv")}
    modalities = {row["code"]: row["display"] for row in _csv(folder / "modalities.csv")}
    return Tables(coding_schemes=dict(doc.get("coding_schemes", {})), gender=dict(doc.get("gender", {})),
                  laterality=dict(doc.get("laterality", {})), issuers=dict(doc.get("issuers", {})),
                  body_parts=body_parts, modalities=modalities, timezone=zone)


def _csv(path: Path) -> Iterator[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f)
    except OSError as e:
        raise ConfigError(f"the mapping table {path} cannot be read ({e.strerror})") from None


@dataclass
class DicomCounts:
    """What became of the units a DICOM connector read (files, or instance metadata).

    Every unit read ends as exactly one of: an instance of an ImagingStudy produced, a
    duplicate of an instance already read (same SOP Instance UID, same metadata), a
    DICOMDIR, or a Rejected. `resources` counts FHIR resources produced (not units: a
    study gives several); `requests` and `retries` are DICOMweb's.
    """

    read: int = 0
    instances: int = 0
    duplicates: int = 0
    dicomdirs: int = 0
    rejected: int = 0
    resources: int = 0
    studies: int = 0
    requests: int = 0
    retries: int = 0

    def reconciles(self) -> bool:
        return self.read == self.instances + self.duplicates + self.dicomdirs + self.rejected


class DicomSource:
    """The units of one DICOM source (files, a DICOMweb service): an iterator that does its
    work lazily, filling `counts` as it goes. Subclasses write `_run`."""

    def __init__(self, mapping: DicomMapping, counts: DicomCounts | None = None):
        self.mapping = mapping
        self.counts = counts or DicomCounts()
        self._seen = SeenResources()
        self._units: Iterator[Resource | Rejected] | None = None

    def __iter__(self) -> DicomSource:
        return self

    def __next__(self) -> Resource | Rejected:
        if self._units is None:
            self._units = self._run()
        return next(self._units)

    def _run(self) -> Iterator[Resource | Rejected]:
        raise NotImplementedError

    def _study(self, instances: list[tuple[dict[str, Any], str]]) -> Iterator[Resource | Rejected]:
        return emit_study(self.mapping, instances, self.counts, self._seen)


def emit_study(mapping: DicomMapping, instances: list[tuple[dict[str, Any], str]], counts: DicomCounts,
               seen: SeenResources) -> Iterator[Resource | Rejected]:
    """Map one study and yield its units, counting them; a Patient or Device already sent
    unchanged is not sent again. A mapping bug sends the study's instances to quarantine
    (`mapping-failed`) instead of stopping the other studies."""
    try:
        units = mapping.map_study(instances)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.error("mapping study %s failed (%s): its instances go to quarantine", instances[0][0][STUDY_UID],
                  type(e).__name__)
        units = [Rejected("map", "mapping-failed", f"mapping the study failed ({type(e).__name__}): report it",
                          ref, payload_ref=ref) for _, ref in instances]
    for unit in units:
        if isinstance(unit, Rejected):
            counts.rejected += 1
            yield unit
            continue
        res = unit.resource
        if res["resourceType"] == "ImagingStudy":
            counts.studies += 1
            counts.instances += res["numberOfInstances"]
        elif not seen.fresh(res):
            continue
        counts.resources += 1
        yield unit


class SeenResources:
    """Remembers the last Patients and Devices emitted, so that a patient with many studies
    is not sent again unchanged each time. Bounded: forgetting only costs a repeat, which
    the store recognises by content hash."""

    def __init__(self, size: int = 10_000):
        self.size = size
        self._seen: OrderedDict[str, bytes] = OrderedDict()

    def fresh(self, resource: dict[str, Any]) -> bool:
        key = f"{resource['resourceType']}/{resource['id']}"
        digest = hashlib.sha256(orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)).digest()
        if self._seen.get(key) == digest:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = digest
        self._seen.move_to_end(key)
        if len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return True


__all__ = ["CONVERTERS", "DicomCounts", "DicomMapping", "DicomSource", "SECTIONS", "SeenResources", "emit_study", "stable_id",
           "valid_uid"]
