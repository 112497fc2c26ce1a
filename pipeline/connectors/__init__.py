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

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..units import Unit
from . import fhir_files


@dataclass(frozen=True)
class FileConnector:
    kind: str
    description: str
    accept: Callable[[Path], bool]
    read_file: Callable[[Path, dict[str, Any]], Iterable[Unit]] | None = None
    read_all: Callable[[list[Path], dict[str, Any]], Iterable[Unit]] | None = None
    # `twin quarantine retry`: the units of a quarantined payload (None: cannot be replayed alone)
    replay: Callable[[bytes, str], Iterable[Unit]] | None = None

    def files(self, paths: Iterable[str | Path]) -> Iterator[Path]:
        return fhir_files.walk(paths, self.accept)


def _fhir_file(path: Path, options: dict[str, Any]) -> fhir_files.FhirFile:
    return fhir_files.FhirFile(path)


FILE_CONNECTORS: dict[str, FileConnector] = {
    "fhir": FileConnector("fhir", "FHIR R4 NDJSON (.ndjson, .ndjson.gz), Bundles and single resources (.json)",
                          fhir_files.is_fhir_file, read_file=_fhir_file, replay=fhir_files.replay),
}
