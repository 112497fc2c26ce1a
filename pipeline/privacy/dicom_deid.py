"""De-identification of DICOM metadata: the PS3.15 Basic Application Level Confidentiality
Profile (Annex E, Table E.1-1) applied to the attributes a mapping reads, by allow-list.

mappings/deid/dicom-basic-profile.toml gives each attribute an action code of Table E.1-1
and names the profile rule or option it implements:

- K keep (an attribute the table does not list, or a profile option retains);
- X remove; Z replace with an empty value (here: removed, the FHIR mapping then has none);
- D replace with a dummy value (a keyed pseudonym, so one value gives one dummy);
- U replace a UID by another, consistently (2.25.<decimal of a keyed hash>, PS3.5 B.2).

An attribute the file does not list is removed (private attributes included: the Basic
Profile removes them), so a mapping that reads more attributes reads nothing new until
someone decides what the profile does with it. What comes out is then mapped to FHIR and
de-identified again by the FHIR allow-list (dates, identifiers), like every other source.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..keys import keyed_hash
from ..resources import mappings_dir
from .pseudonym import pseudonym

CODES = ("K", "X", "Z", "D", "U")


def uid_pseudonym(uid: str) -> str:
    """A UID under the 2.25 root (UUID-derived form), at most 64 characters, same uid -> same."""
    return "2.25." + str(int(keyed_hash("uid", uid, length=30), 16))


def load_dicom_profile(path: str | Path | None = None) -> dict[str, str]:
    """keyword -> action code, checked: every entry names a code and a rule."""
    p = Path(path) if path else mappings_dir() / "deid" / "dicom-basic-profile.toml"
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"DICOM de-identification profile {p.name} cannot be read: {e}") from None
    problems: list[str] = []
    out: dict[str, str] = {}
    for kw, spec in doc.get("attributes", {}).items():
        if not isinstance(spec, dict) or spec.get("action") not in CODES or not spec.get("rule"):
            problems.append(f"attributes.{kw}: expected {{ action = one of {'/'.join(CODES)}, rule = \"...\" }}")
            continue
        out[kw] = spec["action"]
    if not out:
        problems.append("[attributes] is empty")
    if problems:
        raise ConfigError(f"DICOM de-identification profile {p.name} is not valid", problems)
    return out


def record_filter(actions: dict[str, str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The function that de-identifies one instance record (keyword -> value, sequences as
    lists of records) by the profile's actions."""

    def filt(rec: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kw, value in rec.items():
            code = actions.get(kw, "X")
            if code == "K":
                out[kw] = [filt(i) if isinstance(i, dict) else i for i in value] if isinstance(value, list) else value
            elif code == "U" and isinstance(value, str):
                out[kw] = uid_pseudonym(value)
            elif code == "D" and isinstance(value, str) and value:
                out[kw] = pseudonym(value)[:16]  # fits SH (16) and LO (64)
        return out

    return filt
