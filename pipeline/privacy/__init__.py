"""Privacy stages between the connectors and the ingest: pseudonymisation and de-identification.

A source imported with a privacy profile has every unit pass through `PrivacyHooks`
before anything reads its values, so that the store, the identifier index, the
quarantine's messages and every log after this point see only what the profile keeps:

- "pseudonymise": identifiers (and logical ids) replaced by keyed hashes (pseudonym.py);
  names, dates and the rest are kept. Records still link and references still resolve.
- "deid": pseudonymised, then reduced to the allow-list of mappings/deid/ (deid.py for
  FHIR, which HL7 v2 and DICOM become; dicom_deid.py for DICOM attributes before they
  are mapped; device rows by column, below).

Settings: config/privacy.toml (per source overrides in [source.NAME]). docs/privacy.md
says what each profile does and does not do.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..arrays import distinct_codes, map_values
from ..errors import ConfigError
from ..keys import has_secret_key
from ..resources import config_dir
from ..schema import TIMESTAMP, load_schema
from ..units import Rejected, Resource, Rows
from .deid import Deidentifier, load_profile
from .pseudonym import Pseudonymiser, pseudonym, pseudonym_id
from .reshift import floor_instants

PROFILES = ("pseudonymise", "deid")


def load_privacy_config(path: str | Path | None = None) -> dict[str, Any]:
    p = Path(path) if path else config_dir() / "privacy.toml"
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"privacy config {p.name} cannot be read: {e}") from None


def _settings(cfg: dict[str, Any], section: str, source: str) -> dict[str, Any]:
    base = dict(cfg.get(section, {}))
    over = cfg.get("source", {}).get(source, {}).get(section, {})
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


class PrivacyHooks:
    """What one source's units go through. Picklable (it travels to Spark workers)."""

    def __init__(self, profile: str, source: str, cfg: dict[str, Any] | None = None, *, dates: str | None = None):
        if profile not in PROFILES:
            raise ConfigError(f"privacy profile {profile!r} is not one of {', '.join(PROFILES)}")
        if not has_secret_key():
            raise ConfigError(f"the {profile} profile needs a secret key: set TWIN_KEY or TWIN_KEY_FILE "
                              "(with the public development key, anyone could reverse the pseudonyms)")
        cfg = load_privacy_config() if cfg is None else cfg
        pseudo = _settings(cfg, "pseudonymise", source)
        self.profile = profile
        self.pseudonymiser = Pseudonymiser(ids=bool(pseudo.get("ids", True)) or profile == "deid")
        self.columns: dict[str, list[str]] = {t: list(c) for t, c in pseudo.get("columns", {}).items()}
        self.deidentifier: Deidentifier | None = None
        self.empty_columns: dict[str, list[str]] = {}
        if profile == "deid":
            d = _settings(cfg, "deid", source)
            from ..resources import mappings_dir

            prof = load_profile(mappings_dir() / "deid" / d.get("profile", "fhir-safe-harbor.toml"),
                                dates=dates or d.get("dates") or None)
            self.deidentifier = Deidentifier(prof)
            self.empty_columns = {t: list(c) for t, c in d.get("empty_columns", {}).items()}
            self.dicom_profile = d.get("dicom_profile", "dicom-basic-profile.toml")
        schema = load_schema()
        unknown = [f"{t}.{c}" for t, cols in {**self.columns, **self.empty_columns}.items()
                   for c in cols if t not in schema.tables or c not in schema.table(t).own_columns]
        if unknown:
            raise ConfigError("privacy config names columns the schema does not have", unknown)

    @property
    def name(self) -> str:
        """The profile as the store records it per source: "pseudonymise", "deid:year" or
        "deid:shift" (a source's dates cut to the year in one run and shifted in the next
        would tell the offset)."""
        return self.profile if self.deidentifier is None else f"deid:{self.deidentifier.profile.dates}"

    # ------------------------------------------------------------------ units

    @property
    def connector_options(self) -> dict[str, Any]:
        """Options for the connectors that apply a part of the profile themselves (DICOM)."""
        return {"deid_profile": self.dicom_profile} if self.profile == "deid" else {}

    def locator(self, ref: str) -> str:
        """A source_ref (path:line, path#entry[3], SOP UID) with its file or UID part keyed:
        paths and UIDs can name patients. Line and entry numbers stay, to find the unit
        again by hashing the candidate files' paths with the same key."""
        base, hash_, frag = ref.partition("#")
        head, colon, line = base.rpartition(":")
        if colon and line.isdigit():
            base = head
        else:
            line = ""
        return f"ref:{pseudonym(base)[:24]}{':' + line if line else ''}{hash_}{frag}"

    def rejected(self, r: Rejected) -> Rejected:
        """A quarantine entry without the raw input (the locator says where it is) and with
        a keyed locator."""
        ref = self.locator(r.source_ref)
        return dataclasses.replace(r, source_ref=ref, payload=None, payload_ref=ref)

    def resource(self, unit: Resource, twin_of: Callable[[str], str] | None = None) -> Resource | None:
        """The unit with its resource pseudonymised (and de-identified); None to drop it.
        `twin_of`: pseudonymised patient id -> twin id, the key of the date offset."""
        res = self.pseudonymiser.resource(unit.resource)
        full_urls = self.pseudonymiser.full_urls(unit.full_urls)
        if self.deidentifier is not None:
            res = self.deidentifier.resource(res, full_urls, twin_of)
            if res is None:
                return None
        return dataclasses.replace(unit, resource=res, full_urls=full_urls, source_ref=self.locator(unit.source_ref))

    def column_transforms(self) -> dict[str, dict[str, Any]]:
        """table -> column -> function, for the rows mapped from resources."""
        return {t: dict.fromkeys(cols, pseudonym) for t, cols in self.columns.items()}

    def rows(self, unit: Rows, twin_of: Callable[[str], str] | None = None) -> Rows:
        """Device rows: patient ids, identifier values and configured columns replaced; under
        deid, configured columns emptied and times generalised like FHIR dates."""
        table = load_schema().table(unit.table)
        data = unit.data
        pcol = table.patient_column
        if pcol and pcol in data.column_names:
            data = _map_strings(data, pcol, lambda v: pseudonym_id("Patient", v))
        if "device_id" in data.column_names:
            data = _map_strings(data, "device_id", lambda v: pseudonym_id("Device", v))
        if "unit_key" in data.column_names:  # patient:<id>, device:<id> (docs/devices.md)
            data = _map_strings(data, "unit_key", _unit_key)
        hashed = list(self.columns.get(unit.table, ()))
        if unit.table == "patient_identifier":
            hashed.append("value")
        for col in hashed:
            if col in data.column_names:
                data = _map_strings(data, col, pseudonym)
        if self.deidentifier is not None:
            for col in self.empty_columns.get(unit.table, ()):
                if col in data.column_names:
                    i = data.column_names.index(col)
                    data = data.set_column(i, col, pa.nulls(data.num_rows, data.schema.field(col).type))
            data = self._times(data, table, pcol, twin_of)
        return dataclasses.replace(unit, data=data, source_ref=self.locator(unit.source_ref))

    def _times(self, data: pa.Table, table: Any, pcol: str | None, twin_of: Callable[[str], str] | None) -> pa.Table:
        """Times to the year, or shifted by each row's patient offset. A row without a patient
        (a device log that names none and no --patient-id) has no offset: it gets the year,
        as a FHIR resource without a patient does; a shift of 0 would keep the real time."""
        assert self.deidentifier is not None
        shift = self.deidentifier.profile.dates == "shift"
        pids = data.column(pcol) if shift and pcol and pcol in data.column_names else None
        # rows cut to the year: all of them, or under shift those without a patient
        to_year = pa.repeat(pa.scalar(True), data.num_rows) if pids is None else pc.is_null(pids)
        per_row = None  # each row's offset in microseconds, the same for every column
        if pids is not None:
            idx, uniq = distinct_codes(pids)
            days = [self.deidentifier.shift_for(twin_of(p) if twin_of is not None else p) for p in uniq.to_pylist()]
            per_row = pc.take(pa.array([d * 86_400_000_000 for d in days], pa.int64()), idx)
        for col in table.temporal:
            if col not in data.column_names:
                continue
            ts = data.column(col)
            new = pc.cast(pc.floor_temporal(ts, unit="year"), TIMESTAMP)
            if per_row is not None:
                shifted = pc.cast(pc.add(pc.cast(ts, pa.int64()), per_row), TIMESTAMP)
                new = pc.if_else(to_year, new, shifted)
            # Safe Harbor (C), as for FHIR dates: no year older than the over-89 group's
            new, early = floor_instants(new, self.deidentifier.floor_year)
            data = data.set_column(data.column_names.index(col), col, new)
            prec = f"{col}_precision"
            if prec in data.column_names:
                data = data.set_column(data.column_names.index(prec), prec,
                                       pc.if_else(pc.or_(to_year, early), pa.scalar("year", pa.string()),
                                                  data.column(prec)))
        return data


def _unit_key(key: str) -> str:
    kind, sep, rest = key.partition(":")
    if sep and kind in ("patient", "device"):
        return f"{kind}:{pseudonym_id(kind.capitalize(), rest)}"
    return key


def _map_strings(data: pa.Table, col: str, f) -> pa.Table:
    """Apply f to each distinct value of a string column (streams have few distinct ids)."""
    return data.set_column(data.column_names.index(col), col, map_values(data.column(col), f, pa.string()))


def privacy_hooks(profile: str | None, *, source: str, dates: str | None = None) -> PrivacyHooks | None:
    """The hooks for a source: profile None or "none" for none; "pseudonymise" or "deid"."""
    if profile in (None, "none"):
        return None
    return PrivacyHooks(profile, source, dates=dates)


__all__ = ["PROFILES", "PrivacyHooks", "load_privacy_config", "privacy_hooks"]
