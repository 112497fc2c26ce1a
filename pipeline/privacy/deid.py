"""De-identification of FHIR resources by allow-list (HIPAA Safe Harbor style).

mappings/deid/fhir-safe-harbor.toml lists, per resource type, the elements kept and what is
done to each (keep, a date rule, the ZIP rule); every element not listed is removed, so
free text, names, telecoms, addresses and narrative go without being named. Each entry
names the Safe Harbor rule (45 CFR 164.514(b)(2)(i)(A)-(R)) it implements or the reason the
element is not an identifier. The file's vocabulary and what it does NOT do are in
mappings/deid/README.md.

Identifiers and ids are pseudonymised first (pseudonym.py): a twin needs them to link
records, and a keyed hash is not one of the eighteen identifiers ((c) re-identification
code, kept secret).
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..keys import keyed_hash
from ..references import split_literal
from ..resources import mappings_dir
from ..temporal import utc_now
from .dicom_deid import uid_pseudonym

ACTIONS = ("keep", "date", "birth-date", "zip3", "uid")
DATE_MODES = ("year", "shift")
# Element names whose value is a patient reference: the key of the per-patient date shift.
_PATIENT_REFS = ("subject", "patient", "beneficiary")


@dataclass(frozen=True)
class Leaf:
    action: str
    rule: str


@dataclass(frozen=True)
class Extensions:
    """[<Type>.extension]: the extensions kept whole, by URL."""

    urls: frozenset[str]


@dataclass
class DeidProfile:
    """The allow-list, compiled: resource type -> element trie (dict of name -> trie | Leaf)."""

    types: dict[str, dict[str, Any]]
    rules: dict[str, str]
    dates: str = "year"
    max_shift_days: int = 365
    restricted_zip3: frozenset[str] = field(default_factory=frozenset)
    path: str = ""


def load_profile(path: str | Path | None = None, *, dates: str | None = None) -> DeidProfile:
    p = Path(path) if path else mappings_dir() / "deid" / "fhir-safe-harbor.toml"
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"de-identification profile {p.name} cannot be read: {e}") from None
    return parse_profile(doc, str(p), dates=dates)


def parse_profile(doc: dict[str, Any], where: str = "profile", *, dates: str | None = None) -> DeidProfile:
    problems: list[str] = []
    settings = doc.get("settings", {})
    rules = doc.get("rules", {})
    if not isinstance(rules, dict) or not rules:
        problems.append("[rules]: the rules the entries name are missing")
        rules = {}
    mode = dates or settings.get("dates", "year")
    if mode not in DATE_MODES:
        problems.append(f"settings.dates: {mode!r} is not one of {', '.join(DATE_MODES)}")
    common = doc.get("common", {})
    types: dict[str, dict[str, Any]] = {}
    for rtype, entries in doc.items():
        if rtype in ("settings", "rules", "common"):
            continue
        if not isinstance(entries, dict):
            problems.append(f"[{rtype}]: expected a table of element = {{ as, rule }}")
            continue
        trie: dict[str, Any] = {}
        for path, spec in {**common, **entries}.items():
            if path == "extension" and isinstance(spec, dict) and "rule" not in spec:
                for url, s in spec.items():
                    _leaf(f"{rtype}.extension.{url}", s, rules, problems)
                trie["extension"] = Extensions(frozenset(spec))
                continue
            leaf = _leaf(f"{rtype}.{path}", spec, rules, problems)
            if leaf is not None:
                _insert(trie, path.split("."), leaf, f"{rtype}.{path}", problems)
        types[rtype] = trie
    if problems:
        raise ConfigError(f"de-identification profile {Path(where).name} is not valid", problems)
    return DeidProfile(types, dict(rules), mode, int(settings.get("max_shift_days", 365)),
                       frozenset(str(z) for z in settings.get("restricted_zip3", ())), where)


def _leaf(where: str, spec: Any, rules: dict[str, str], problems: list[str]) -> Leaf | None:
    if not isinstance(spec, dict) or set(spec) - {"as", "rule"} or "rule" not in spec:
        problems.append(f"{where}: expected {{ as = ACTION, rule = RULE }} (as defaults to keep)")
        return None
    action = spec.get("as", "keep")
    if action not in ACTIONS:
        problems.append(f"{where}: unknown action {action!r} (known: {', '.join(ACTIONS)})")
        return None
    if spec["rule"] not in rules:
        problems.append(f"{where}: rule {spec['rule']!r} is not defined in [rules]")
        return None
    return Leaf(action, spec["rule"])


def _insert(trie: dict[str, Any], parts: list[str], leaf: Leaf, where: str, problems: list[str]) -> None:
    node = trie
    for name in parts[:-1]:
        nxt = node.setdefault(name, {})
        if isinstance(nxt, Leaf):
            problems.append(f"{where}: a parent element is already kept whole")
            return
        node = nxt
    if isinstance(node.get(parts[-1]), dict):
        problems.append(f"{where}: listed whole and by parts")
        return
    node[parts[-1]] = leaf


class Deidentifier:
    """Pseudonymised resource -> the allow-listed resource, dates and ZIP codes generalised."""

    def __init__(self, profile: DeidProfile, *, today: date | None = None):
        self.profile = profile
        self.today = today or utc_now().date()

    @property
    def floor_year(self) -> int:
        """Safe Harbor (C): the birth year of a 90-year-old. Every age over 89 is one group,
        and no de-identified date keeps an older year (it would tell the age)."""
        return self.today.year - 90

    def resource(self, res: dict[str, Any], full_urls: Mapping[str, str] | None = None,
                 twin_of: Callable[[str], str] | None = None) -> dict[str, Any] | None:
        """None when the profile does not list the resource type (it is then not kept).
        `full_urls`: the Bundle's fullUrl map, to find the patient a `urn:uuid:` names.
        `twin_of`: the (pseudonymised) patient id -> the person's twin id, the key of the
        date offset, so that one person has one offset in every source (the ingest gives
        it; without it the patient id is the key)."""
        trie = self.profile.types.get(res.get("resourceType"))
        if trie is None:
            return None
        ctx = _Context(self, self._shift_days(res, full_urls or {}, twin_of), res)
        out = ctx.filter(res, trie)
        out["resourceType"] = res["resourceType"]
        return out

    def _shift_days(self, res: dict[str, Any], full_urls: Mapping[str, str],
                    twin_of: Callable[[str], str] | None) -> int | None:
        """The patient's secret date offset (dates = shift), None to generalise to the year."""
        if self.profile.dates != "shift":
            return None
        key = None
        if res.get("resourceType") == "Patient":
            key = res.get("id")
        else:
            for name in _PATIENT_REFS:
                ref = res.get(name)
                if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                    target = full_urls.get(ref["reference"], ref["reference"])
                    rtype, rid = split_literal(target)
                    if rtype == "Patient":
                        key = rid
                        break
        if not isinstance(key, str):
            return None  # no patient: the year only
        return self.shift_for(twin_of(key) if twin_of is not None else key)

    def shift_for(self, person_key: str) -> int | None:
        """The secret offset in days of one person (their twin id); never 0.

        Keyed on the twin, not the source record: a person's HL7 feed and FHIR export
        must keep the intervals between their events. When linking moves a record to
        another twin, the store moves its dates by the difference (reshift.py)."""
        if self.profile.dates != "shift":
            return None
        span = self.profile.max_shift_days
        days = int(keyed_hash("date-shift", person_key, length=12), 16) % (2 * span) - span
        return days if days < 0 else days + 1


class _Context:
    def __init__(self, deid: Deidentifier, shift: int | None, res: dict[str, Any]):
        self.deid = deid
        self.shift = shift
        self.res = res

    def filter(self, node: dict[str, Any], trie: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in node.items():
            spec = trie.get(k)
            if spec is None:
                continue
            kept = self._apply(v, spec)
            if kept is not None and kept != [] and kept != {}:
                out[k] = kept
        return out

    def _apply(self, v: Any, spec: Any) -> Any:
        if isinstance(spec, Extensions):
            return [e for e in v if isinstance(e, dict) and e.get("url") in spec.urls] if isinstance(v, list) else None
        if isinstance(v, list):
            items = [self._apply(i, spec) for i in v]
            return [i for i in items if i is not None and i != {}]
        if isinstance(spec, Leaf):
            return self._leaf(v, spec.action)
        if isinstance(v, dict):
            return self.filter(v, spec)
        return None  # a primitive where the profile expects an element with parts

    def _leaf(self, v: Any, action: str) -> Any:
        if action == "keep":
            return v
        if not isinstance(v, str):
            return None
        if action == "uid":
            return uid_pseudonym(v)
        if action == "zip3":
            return zip3(v, self.deid.profile.restricted_zip3)
        floor = self.deid.floor_year
        if action == "birth-date" and over_89(v, self.res, self.deid.today):
            return str(floor)  # Safe Harbor (C): every age over 89 is one group, "90+"
        return shift_floored(v, self.shift, floor)


def zip3(value: str, restricted: frozenset[str]) -> str | None:
    """Safe Harbor (B): the first three digits of a ZIP code; 000 where those three digits
    cover 20,000 people or fewer. Anything that is not a US ZIP code is removed."""
    digits = value.strip()[:3]
    if len(digits) < 3 or not digits.isdigit():
        return None
    return "000" if digits in restricted else digits


def _parse(v: str) -> tuple[date, str] | None:
    """A FHIR date/dateTime/instant -> (its date, the rest after the date part)."""
    try:
        if len(v) >= 10:
            return date.fromisoformat(v[:10]), v[10:]
    except ValueError:
        return None
    return None


def generalise_date(v: str, shift: int | None) -> str | None:
    """Safe Harbor (C): the year only; or (shift) the whole date moved by the patient's offset,
    keeping its precision and time of day. A value that is not a date is removed."""
    if len(v) < 4 or not v[:4].isdigit():
        return None
    if shift is None or len(v) < 10:
        return v[:4] if shift is None else _shift_partial(v, shift)
    parsed = _parse(v)
    if parsed is None:
        return None
    d, rest = parsed
    try:
        return (d + timedelta(days=shift)).isoformat() + rest
    except OverflowError:
        return None


def shift_floored(v: str, shift: int | None, floor_year: int) -> str | None:
    """generalise_date, and no year older than `floor_year` (Deidentifier.floor_year).

    Safe Harbor (C) covers every date "indicative of" an age over 89, not only the birth
    date: a 1928 allergy of a patient grouped as born 1936 tells the age (and sat before
    the birth). No year older than the group's survives, whoever the patient is; the
    ingest and the re-shift of a linked record (privacy/reshift.py) both apply this."""
    out = generalise_date(v, shift)
    if out is not None and out[:4].isdigit() and int(out[:4]) < floor_year:
        return str(floor_year)
    return out


def _shift_partial(v: str, shift: int) -> str:
    """YYYY or YYYY-MM: shift the middle of the period, keep the precision."""
    try:
        if len(v) == 7:
            d = date(int(v[:4]), int(v[5:7]), 15) + timedelta(days=shift)
            return d.isoformat()[:7]
        d = date(int(v[:4]), 7, 1) + timedelta(days=shift)
        return d.isoformat()[:4]
    except (ValueError, OverflowError):
        return v[:4]


def over_89(birth: str, res: dict[str, Any], today: date) -> bool:
    """Older than 89 at death, or today."""
    try:
        born = date(int(birth[:4]), int(birth[5:7] or 1) if len(birth) >= 7 else 1,
                    int(birth[8:10]) if len(birth) >= 10 else 1)
    except ValueError:
        return False
    end = today
    died = res.get("deceasedDateTime")
    if isinstance(died, str) and (parsed := _parse(died)) is not None:
        end = parsed[0]
    age = end.year - born.year - ((end.month, end.day) < (born.month, born.day))
    return age > 89


__all__ = ["DeidProfile", "Deidentifier", "generalise_date", "load_profile", "over_89", "parse_profile", "zip3"]
