"""Connectors: one module per source kind, and the registry that names them.

A connector reads a source and yields units (`pipeline.units`): FHIR `Resource`s,
`Deletion`s, columnar `Rows` (device streams) or `Rejected` entries. It knows nothing
of the twin schema or the store. File connectors come in two shapes:

- per file (`read_file`): the file is the unit of incremental work, so a ledger of
  processed files (path, size, hash) lets a second import skip what it has seen;
- whole input (`read_all`): the mapping needs several files at once (DICOM groups
  instances of one study from many files), so everything given is read every time.

The registry is a plain dict: a new kind is one entry here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..units import Unit
from . import csv_files, fhir_files, hl7v2_files


@dataclass(frozen=True)
class FileConnector:
    kind: str
    description: str
    accept: Callable[[Path], bool]
    read_file: Callable[[Path, dict[str, Any]], Iterable[Unit]] | None = None
    read_all: Callable[[list[Path], dict[str, Any]], Iterable[Unit]] | None = None
    # `twin quarantine retry`: the units of a quarantined payload (None: cannot be replayed alone)
    replay: Callable[[bytes, str], Iterable[Unit]] | None = None
    # checks every file before anything is read, raising ConfigError (unknown device formats)
    check: Callable[[list[Path], dict[str, Any]], object] | None = None
    # a line for the run summary from the per-file `stats` of its readers (HashedRead.stats)
    tally: Callable[[list[Any]], str | None] | None = None
    # the options (`twin import` flags, job source keys) this kind takes; others are refused,
    # not ignored: `--patient-id` on a FHIR import must not look as if it had done something
    options: tuple[str, ...] = ()

    def misplaced(self, options: dict[str, Any] | None) -> list[str]:
        """The options given (not None, not False) that this kind does not take."""
        return [k for k, v in (options or {}).items() if v not in (None, False) and k not in self.options]

    def files(self, paths: Iterable[str | Path]) -> Iterator[Path]:
        return fhir_files.walk(paths, self.accept)


def _fhir_file(path: Path, options: dict[str, Any]) -> fhir_files.FhirFile:
    return fhir_files.FhirFile(path)


class HashedRead:
    """The units of one file from a connector that does not hash as it reads.

    The ledger needs the file's sha256; it is taken in a first pass (the second read
    comes from the page cache), before the units, so a file that changes while it is
    read is recorded with the hash of what was read first and read again next time.
    """

    def __init__(self, path: Path, units: Callable[[Path], Iterable[Unit]], stats: Any = None):
        self.path = path
        self._units = units
        self.sha256: str | None = None
        self.stats = stats  # what the connector counted in this file (FileConnector.tally sums them)

    def __iter__(self) -> Iterator[Unit]:
        h = hashlib.sha256()
        try:
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self.sha256 = h.hexdigest()
        except OSError:
            self.sha256 = None  # the connector reports the unreadable file
        yield from self._units(self.path)


def _hl7v2_file(path: Path, options: dict[str, Any]) -> HashedRead:
    strict = bool(options.get("strict", False))
    stats = hl7v2_files.ReadStats()
    return HashedRead(path, lambda p: hl7v2_files.read_hl7v2([p], strict=strict, stats=stats), stats)


def _hl7v2_tally(stats: list[hl7v2_files.ReadStats]) -> str | None:
    """Messages, not units: the summary counts resources (a message makes several, and the
    same patient in many messages is read many times, the later copies as unchanged)."""
    messages = sum(s.messages for s in stats)
    mapped = sum(s.mapped for s in stats)
    resources = sum(s.resources for s in stats)
    junk = sum(s.units - s.messages for s in stats)
    text = f"{messages:,} message(s): {mapped:,} mapped to {resources:,} resources, {messages - mapped:,} refused"
    return text + (f"; {junk:,} stretch(es) of bytes that were no message" if junk else "")


def _hl7v2_replay(payload: bytes, source_ref: str) -> Iterable[Unit]:
    from ..hl7v2_fhir import map_message

    mapped = map_message(payload, source_ref)
    return [mapped.rejected] if mapped.rejected is not None else mapped.resources


# Lines per columnar chunk of a device log: a line becomes one row per signal, each with
# the observation table's ~50 columns, so 250k lines (~750k rows) keep a chunk's Arrow
# table near 400 MB. Chunk boundaries are part of the unit keys: keep it fixed.
CSV_CHUNK_LINES = 250_000


def _csv_file(path: Path, options: dict[str, Any]) -> HashedRead:
    return HashedRead(path, lambda p: csv_files.read_csv_logs(
        [str(p)], format=options.get("format"), patient_id=options.get("patient_id"),
        patient_system=options.get("patient_system"), device_id=options.get("device_id"), downsample=options.get("downsample"), chunk_rows=CSV_CHUNK_LINES))


# In a folder walk, files with these suffixes are taken as device logs (named directly,
# any file is); READMEs, licences and scripts beside the data are not.
CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".abp", ".dat", ".log")


def _csv_accept(path: Path) -> bool:
    return path.suffix.lower() in CSV_SUFFIXES and csv_files.accept(path)


def _dicom_all(files: list[Path], options: dict[str, Any]) -> Iterable[Unit]:
    from .dicom_files import read_dicom

    return read_dicom(files, patient_rule=options.get("patient_rule"), timezone=options.get("timezone"),
                      deid_profile=options.get("deid_profile"))


def _dicom_check(files: list[Path], options: dict[str, Any]) -> object:
    """--patient-rule and --timezone are checked even when the ledger skips every file:
    a typo in them otherwise passed as "nothing new" (exit 0) until the files changed."""
    from ..dicom_fhir import DicomMapping

    return DicomMapping.load(patient_rule=options.get("patient_rule"), timezone=options.get("timezone"))


FILE_CONNECTORS: dict[str, FileConnector] = {
    "fhir": FileConnector("fhir", "FHIR R4 NDJSON (.ndjson, .ndjson.gz), Bundles and single resources (.json)",
                          fhir_files.is_fhir_file, read_file=_fhir_file, replay=fhir_files.replay),
    "hl7v2": FileConnector("hl7v2", "HL7 v2 messages: files, batch files (FHS/BHS), MLLP-framed dumps",
                           hl7v2_files._accept, read_file=_hl7v2_file, replay=_hl7v2_replay, options=("strict",),
                           tally=_hl7v2_tally),
    # a CSV line cannot be replayed alone: it needs its file's preamble and header
    "csv": FileConnector("csv", "device logs (monitors, wearables), one mapping file per vendor format",
                         _csv_accept, read_file=_csv_file,
                         check=lambda files, o: csv_files.find_logs(files, o.get("format")),
                         options=("format", "patient_id", "patient_system", "device_id", "downsample")),
    # DICOM groups the instances of a study from many files: the whole input is read each time
    "dicom": FileConnector("dicom", "DICOM files and folders (metadata only, DICOMDIR included)",
                           lambda p: True, read_all=_dicom_all, check=_dicom_check,
                           options=("patient_rule", "timezone")),
}


# Every option some kind takes: the `twin import` flags and job source keys, named once.
FILE_OPTIONS = tuple(dict.fromkeys(o for c in FILE_CONNECTORS.values() for o in c.options))


def kinds_taking(option: str) -> str:
    """The kinds whose imports take `option` ("csv", "csv and dicom"), for refusal messages."""
    return " and ".join(k for k, c in sorted(FILE_CONNECTORS.items()) if option in c.options)
