"""HL7 v2 from files: single messages, many per file, batch files, MLLP dumps; folders walked.

A unit is one message (or one stretch of bytes that is not a usable message). Each
message becomes its FHIR resources, or one `Rejected` carrying the raw message; bytes
that are not a message (junk, segments without MSH, a broken batch envelope) become a
`Rejected` of their own. Files are streamed: memory follows the largest message, not
the file.

Counting: pass a `ReadStats` and read it when the iterator is exhausted. Its invariant is
`units == mapped + rejected` (a unit maps whole or is rejected whole), and `messages`
counts the units that were messages, mapped or not.

    stats = ReadStats()
    for unit in read_hl7v2(["exports/"], stats=stats):
        ...
    assert stats.reconciles()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..hl7v2 import DEFAULT_LIMITS, Limits
from ..hl7v2_fhir import Mappings, map_message
from ..hl7v2_framing import FramingProblem, RawMessage, frame_stream
from ..hl7v2_maps import default_mappings
from ..paths import inside
from ..units import Rejected, Resource

log = logging.getLogger(__name__)

# Extensions taken when walking a folder (files named directly are always read). Other files
# in a folder are counted in `ReadStats.skipped_files`, not read.
HL7_SUFFIXES = (".hl7", ".hl7v2", ".er7", ".msg", ".txt", ".dat", ".mllp", ".batch", "")


@dataclass(slots=True)
class ReadStats:
    """What `read_hl7v2` read. units = mapped + rejected; messages <= units."""

    files: int = 0
    skipped_files: int = 0
    units: int = 0             # messages + stretches of bytes that were not a message
    messages: int = 0          # units that were messages (an MSH, or a cut MLLP frame)
    mapped: int = 0            # messages that became resources
    rejected: int = 0          # units that became a Rejected
    resources: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)   # tolerated envelope gaps (BTS/FTS missing), no data

    def reconciles(self) -> bool:
        return self.units == self.mapped + self.rejected and self.messages <= self.units

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1


def _accept(path: Path) -> bool:
    name = path.name.lower()
    if name.startswith(".") or name.endswith((".md", ".json", ".ndjson", ".csv", ".gz", ".zip", ".dcm", ".py")):
        return False
    return path.suffix.lower() in HL7_SUFFIXES


def walk(paths: Iterable[str | os.PathLike], stats: ReadStats) -> Iterator[Path]:
    """Files named directly, and HL7-looking files in folders (recursively, sorted, hidden ones left out)."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for child in sorted(p.rglob("*")):
                rel = child.relative_to(p).parts
                if not child.is_file() or any(part.startswith(".") for part in rel) or not inside(p, child):
                    continue
                if _accept(child):
                    yield child
                else:
                    stats.skipped_files += 1
        else:
            yield p


def _payload(data: bytes | None, limits: Limits, path: Path, start: int, end: int) -> tuple[bytes | None, str | None]:
    if data is not None and len(data) <= limits.max_payload_bytes:
        return data, None
    return None, f"{path}:bytes {start}-{end}"


def read_hl7v2(paths: list[str] | list[Path], *, stats: ReadStats | None = None, strict: bool = False,
               limits: Limits = DEFAULT_LIMITS, mappings: Mappings | None = None) -> Iterator[Resource | Rejected]:
    """FHIR resources (and Rejected units) from HL7 v2 files and folders, in file order.

    `source_ref` of a message is `path:msg N (line L)` (`(byte B)` in MLLP dumps); its
    resources add the control id and the segment (`... [CTRL-1] OBX[2]`). A file that
    cannot be opened is one Rejected (`unreadable-file`), a file over the size limit too
    (`file-too-large`); the walk goes on.
    """
    stats = stats if stats is not None else ReadStats()
    if mappings is None:  # once, not per message: finding them reads the environment (TWIN_HOME)
        mappings = default_mappings()
    for path in walk(paths, stats):
        stats.files += 1
        try:
            size = path.stat().st_size
            if size > limits.max_file_bytes:
                stats.units += 1
                stats._reject("file-too-large")
                yield Rejected("read", "file-too-large", f"the file is larger than {limits.max_file_bytes} bytes",
                               str(path), None, f"{path}:bytes 0-{size}")
                continue
            fh = open(path, "rb")  # noqa: SIM115 - closed by the `with` below, after the size check
        except OSError as e:
            stats.units += 1
            stats._reject("unreadable-file")
            yield Rejected("read", "unreadable-file", f"cannot read the file ({e.strerror or type(e).__name__})",
                           str(path))
            continue
        with fh:
            try:
                yield from _read_stream(fh, path, stats, strict, limits, mappings)
            except OSError as e:  # the file went away or the disk failed mid-read
                stats.units += 1
                stats._reject("unreadable-file")
                yield Rejected("read", "unreadable-file", f"reading stopped ({e.strerror or type(e).__name__})",
                               str(path))


def _read_stream(fh, path: Path, stats: ReadStats, strict: bool, limits: Limits,
                 mappings: Mappings | None) -> Iterator[Resource | Rejected]:
    warnings: list[str] = []
    for unit in frame_stream(fh, limits, warnings):
        stats.units += 1
        where = f"line {unit.line}" if unit.line is not None else f"byte {unit.offset}"
        if isinstance(unit, RawMessage):
            stats.messages += 1
            ref = f"{path}:msg {unit.index} ({where})"
            mapped = map_message(unit.data, ref, strict=strict, mappings=mappings, limits=limits)
            if mapped.rejected is not None:
                stats._reject(mapped.rejected.reason)
                payload, pointer = _payload(unit.data, limits, path, unit.offset, unit.end)
                r = mapped.rejected
                yield Rejected(r.stage, r.reason, r.message, r.source_ref, payload, pointer, r.target_table)
                continue
            stats.mapped += 1
            stats.resources += len(mapped.resources)
            yield from mapped.resources
        else:
            assert isinstance(unit, FramingProblem)
            if unit.index is not None:
                stats.messages += 1
                ref = f"{path}:msg {unit.index} ({where})"
            else:
                ref = f"{path}:{where}"
            stats._reject(unit.reason)
            payload, pointer = _payload(unit.data, limits, path, unit.offset, unit.end)
            yield Rejected("read", unit.reason, unit.message, ref, payload, pointer)
    for w in warnings:
        stats.warnings.append(f"{path}: {w}")
        log.info("%s: %s", path, w)


__all__ = ["HL7_SUFFIXES", "ReadStats", "read_hl7v2", "walk"]
