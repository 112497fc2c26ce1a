"""DICOM files and folders -> FHIR R4 ImagingStudy, Patient and Device, or Rejected.

A unit is a file. `counts` (pipeline.dicom_fhir.DicomCounts) says what became of each,
so that read = instances + duplicates + dicomdirs + rejected can be checked.

Instances of one study may lie in many folders, so nothing can be mapped before the
walk ends. Records wait in a private temporary SQLite file (the stdlib's `connect("")`),
not in memory: memory is bounded by one study, whatever the number of files. The
spool also finds duplicate SOP Instance UIDs across the whole input and remembers which
files were read, for the DICOMDIRs: a DICOMDIR counts as read but is not an instance;
the files it lists that the walk did not see are read after the walk.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from ..dicom import Directory, read_file
from ..dicom_fhir import SOP_UID, STUDY_UID, DicomCounts, DicomMapping, DicomSource
from ..paths import inside
from ..units import Rejected, Resource


def walk(paths: Iterable[str | Path]) -> Iterator[str]:
    """Files named directly, and every file below named folders (sorted, hidden ones skipped).

    os.walk streams one folder at a time: a million files do not become one list. Paths
    are plain strings: pathlib interns every name it parses, and that table only grows.
    """
    for p in paths:
        p = os.fspath(p)
        if not os.path.isdir(p):
            yield p
            continue
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith(".") and inside(p, os.path.join(root, name)):
                    yield os.path.join(root, name)


class DicomFiles(DicomSource):
    """The units of a set of DICOM files and folders. Iterate once; `counts` fills as it goes."""

    def __init__(self, paths: Iterable[str | Path], mapping: DicomMapping):
        super().__init__(mapping)
        self.paths = list(paths)

    def _run(self) -> Iterator[Resource | Rejected]:
        with _Spool() as spool:
            for path in walk(self.paths):
                yield from self._file(path, spool)
            for path in spool.references():
                if os.path.isfile(path):
                    yield from self._file(path, spool)  # read unless the walk saw it
                else:
                    self.counts.read += 1
                    yield self._reject(Rejected("read", "dicomdir-missing-file", "a DICOMDIR lists this file but it "
                                                "does not exist: copy the whole media again", path))
            for instances in spool.studies():
                yield from self._study(instances)

    def _file(self, path: str, spool: _Spool) -> Iterator[Resource | Rejected]:
        if not spool.first_read(path):
            return  # named twice (a folder and a file in it, or a DICOMDIR entry already walked)
        self.counts.read += 1
        ref = path
        result = read_file(path, self.mapping.wanted)
        if isinstance(result, Rejected):
            yield self._reject(result)
        elif isinstance(result, Directory):
            self.counts.dicomdirs += 1
            spool.add_references(result.references)
            for i in range(result.bad_references):
                self.counts.read += 1
                yield self._reject(Rejected("parse", "dicomdir-bad-reference", "a DICOMDIR record names a file outside "
                                            "its folder or with an invalid Referenced File ID: not followed",
                                            f"{ref}#bad-reference[{i}]", payload_ref=ref))
        else:
            problem = self.mapping.admit(result.record, ref)
            if problem is not None:
                yield self._reject(problem)
                return
            other = spool.add_instance(result.record, ref)
            if other is None:
                return
            if other[1]:
                self.counts.duplicates += 1
            else:
                yield self._reject(Rejected("map", "duplicate-sop-instance", f"the file {other[0]} holds the same SOP "
                                            "Instance UID with other metadata: the first one read is kept; fix the "
                                            "other", ref, payload_ref=ref))

    def _reject(self, unit: Rejected) -> Rejected:
        self.counts.rejected += 1
        return unit


class _Spool:
    """Instances waiting for the end of the walk, in a temporary SQLite file.

    Keyed by SOP Instance UID: a second file with the same instance is a duplicate when
    its record is the same, a conflict otherwise. Read back study by study.
    """

    def __enter__(self) -> _Spool:
        self.db = sqlite3.connect("")  # a private temporary file, deleted when closed
        self.db.executescript("""
            PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
            CREATE TABLE files (path TEXT PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE refs (path TEXT PRIMARY KEY, n INTEGER) WITHOUT ROWID;
            CREATE TABLE instances (sop TEXT PRIMARY KEY, study TEXT, record BLOB, ref TEXT);
            CREATE INDEX by_study ON instances (study);
        """)
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()

    def first_read(self, path: str) -> bool:
        """True the first time a file is met, by any path (links included): keyed by inode."""
        try:
            st = os.stat(path)
            key = f"{st.st_dev}:{st.st_ino}"
        except OSError:
            key = os.path.abspath(path)
        return self.db.execute("INSERT OR IGNORE INTO files VALUES (?)", (key,)).rowcount == 1

    def add_references(self, paths: Iterable[str]) -> None:
        n = self.db.execute("SELECT COUNT(*) FROM refs").fetchone()[0]
        self.db.executemany("INSERT OR IGNORE INTO refs VALUES (?, ?)",
                            ((p, n + i) for i, p in enumerate(paths)))

    def references(self) -> Iterator[str]:
        """The files the DICOMDIRs list, in their order (streamed: a CD may list thousands)."""
        for (path,) in self.db.execute("SELECT path FROM refs ORDER BY n"):
            yield path

    def add_instance(self, record: dict[str, Any], ref: str) -> tuple[str, bool] | None:
        """None when new; else (the other file, whether the metadata is the same)."""
        blob = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
        try:
            self.db.execute("INSERT INTO instances VALUES (?, ?, ?, ?)", (record[SOP_UID], record[STUDY_UID], blob, ref))
            return None
        except sqlite3.IntegrityError:
            other_blob, other_ref = self.db.execute("SELECT record, ref FROM instances WHERE sop = ?",
                                                    (record[SOP_UID],)).fetchone()
            return other_ref, other_blob == blob

    def studies(self) -> Iterator[list[tuple[dict[str, Any], str]]]:
        rows = self.db.execute("SELECT study, record, ref FROM instances ORDER BY study")
        for _, group in itertools.groupby(rows, key=lambda row: row[0]):
            yield [(orjson.loads(blob), ref) for _, blob, ref in group]


def read_dicom(paths: list[str] | list[Path], *, patient_rule: str | None = None,
               mapping: str | Path | DicomMapping | None = None, timezone: str | None = None,
               deid_profile: str | None = None) -> DicomFiles:
    """FHIR resources (and Rejected units) from DICOM files and folders.

    `patient_rule`: how to link files without Patient ID: `patient_id_from=<Keyword>` or
    `patient_id=<id>`; without one such files are rejected (`no-patient-id`).
    `mapping`: another mapping file than mappings/dicom/fhir-r4.toml. `timezone`: the IANA
    zone of the files' local times (overrides the mapping's setting). Raises ConfigError
    for a bad mapping or rule, before reading anything.
    """
    if not isinstance(mapping, DicomMapping):
        mapping = DicomMapping.load(mapping, patient_rule=patient_rule, timezone=timezone,
                                    deid_profile=deid_profile)
    return DicomFiles(paths, mapping)


__all__ = ["DicomCounts", "DicomFiles", "read_dicom", "walk"]
