"""Partitions of an input, and reading one partition back into units.

A partition (`Part`) is a list of pieces, numbered in the order the single process
reads the input, so that whatever runs where, the driver can replay the outcomes in
input order. A piece is either a whole file, read by its connector's own `read_file`
(Bundles, gzip, small NDJSON, any other kind), or a byte range of a large plain NDJSON
file. NDJSON is one resource per line (Bulk Data export format,
https://hl7.org/fhir/uv/bulkdata/export.html#bulk-data-output-file-request), so a range
is self-contained once aligned on line starts: a line belongs to the range its first
byte is in, as in Hadoop's line splits. Small files are packed together into one part,
so a folder of many Bundles does not become thousands of tiny tasks.

Reading a range gives the same units, the same `file:line` locators and the same
reasons as `FhirFile` reading the whole file; the scan pass (pipeline.engines.tasks)
supplies each range's first line number.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..connectors import FileConnector
from ..connectors.fhir_files import DEFAULT_LIMITS, FhirFile, Limits, _is_bulk_log, _skip_line
from ..fhir import DIRECTORY_TYPES
from ..units import Rejected, Unit

DEFAULT_PART_BYTES = 32 << 20


@dataclass(frozen=True)
class Piece:
    path: str            # as the user gave it: the locator in source_ref and the ledger key
    abspath: str         # what a worker opens
    start: int = 0
    end: int = -1        # -1: the whole file, through the connector
    first_line: int = 1  # number of the first line that starts in [start, end)
    empty_file: bool = False  # the last range of an NDJSON file that holds no unit at all

    @property
    def whole(self) -> bool:
        return self.end < 0


@dataclass(frozen=True)
class Part:
    index: int
    pieces: tuple[Piece, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "pieces": [p.__dict__ for p in self.pieces]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Part:
        return Part(d["index"], tuple(Piece(**p) for p in d["pieces"]))


def splittable(connector: FileConnector, path: Path) -> bool:
    """Plain NDJSON read by the FHIR connector: the only files cut into ranges."""
    return connector.kind == "fhir" and path.name.lower().endswith((".ndjson", ".jsonl"))


def plan_parts(connector: FileConnector, files: list[Path], part_bytes: int = DEFAULT_PART_BYTES) -> list[Part]:
    """Cut the files into parts of about `part_bytes`, in input order.

    Plain NDJSON files become ranges of at most `part_bytes` (read without the
    connector: see `read_range`); other files are pieces of their own. Small pieces
    are packed together until a part is full.
    """
    parts: list[Part] = []
    batch: list[Piece] = []
    size = 0

    def add(piece: Piece, n: int) -> None:
        nonlocal batch, size
        if batch and size + n > part_bytes:
            parts.append(Part(len(parts), tuple(batch)))
            batch, size = [], 0
        batch.append(piece)
        size += n

    for path in files:
        ref, absolute = str(path), os.path.abspath(path)
        try:
            n = os.path.getsize(absolute)
        except OSError:
            n = 0  # reading it says why: a Rejected, as in the single process
        if splittable(connector, path):
            for start in range(0, max(n, 1), part_bytes):
                end = min(start + part_bytes, n)
                add(Piece(ref, absolute, start, end), end - start)
        else:
            add(Piece(ref, absolute), n)
    if batch:
        parts.append(Part(len(parts), tuple(batch)))
    return parts


def auto_part_bytes(files: list[Path], slots: int) -> int:
    """About eight parts per task slot, so that uneven parts even out; 1 to 128 MiB."""
    total = 0
    for f in files:
        with contextlib.suppress(OSError):
            total += os.path.getsize(f)
    return max(1 << 20, min(128 << 20, total // max(8 * slots, 1)))


def with_line_numbers(parts: list[Part], scans: dict[tuple[int, int], dict[str, Any]]) -> list[Part]:
    """Give each range its first line number, from the scan's line counts (part, piece) -> scan.

    Ranges of a file whose first line is a Bulk Data log are dropped (the whole file is
    a log, as FhirFile decides); the last range of a file without a single unit says so.
    """
    lines: dict[str, int] = {}
    units: dict[str, bool] = {}
    last: dict[str, tuple[int, int]] = {}
    logs = {pc.path for p in parts for j, pc in enumerate(p.pieces)
            if not pc.whole and pc.start == 0 and scans[(p.index, j)].get("log")}
    out: list[Part] = []
    for part in parts:
        pieces = []
        for j, pc in enumerate(part.pieces):
            if pc.whole:
                pieces.append(pc)
                continue
            if pc.path in logs:
                continue
            scan = scans[(part.index, j)]
            pieces.append(replace(pc, first_line=lines.get(pc.path, 0) + 1))
            lines[pc.path] = lines.get(pc.path, 0) + scan["lines"]
            units[pc.path] = units.get(pc.path, False) or scan["units"]
            last[pc.path] = (len(out), len(pieces) - 1)
        out.append(Part(part.index, tuple(pieces)))
    for path, (i, j) in last.items():
        if not units[path]:
            pieces = list(out[i].pieces)
            pieces[j] = replace(pieces[j], empty_file=True)
            out[i] = Part(out[i].index, tuple(pieces))
    return out


# --------------------------------------------------------------------------- reading


def _align(f, start: int) -> int:
    """Position `f` at the first line that starts at or after `start`; return that offset."""
    if start == 0:
        f.seek(0)
        return 0
    f.seek(start - 1)
    f.readline()  # the rest of the line that began before the range (just b"\n" if it ended there)
    return f.tell()


def read_range(piece: Piece, limits: Limits = DEFAULT_LIMITS) -> Iterator[Unit]:
    """The units of the lines that start in [start, end), as FhirFile would give them."""
    reader = FhirFile(Path(piece.path), limits)
    ref = reader.ref
    try:
        f = open(piece.abspath, "rb")  # noqa: SIM115 - closed in finally
    except OSError as e:
        if piece.start == 0:
            yield Rejected("read", "unreadable-file", f"cannot open the file ({e.strerror})", ref)
        return
    try:
        pos = _align(f, piece.start)
        line_no = piece.first_line - 1
        while pos < piece.end:
            line = f.readline(limits.max_line_bytes + 1)
            if not line:
                break
            pos += len(line)
            line_no += 1
            if len(line) > limits.max_line_bytes:
                skipped = _skip_line(f, limits.max_line_bytes)
                pos += skipped
                yield Rejected("read", "line-too-long", f"line longer than {limits.max_line_bytes} bytes "
                               f"({len(line) + skipped}+ bytes): raise max_line_bytes if it is genuine",
                               f"{ref}:{line_no}", payload_ref=f"{ref}:{line_no}")
                continue
            if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                continue
            if line_no == 1 and _is_bulk_log(line):
                return
            yield from reader._line(line.rstrip(b"\r\n"), f"{ref}:{line_no}")
    finally:
        f.close()
    if piece.empty_file:
        yield Rejected("read", "empty-file", "the file holds no resources", ref)


# --------------------------------------------------------------------------- scanning

_DIRECTORY = re.compile(rb'"resourceType"\s*:\s*"(?:' + b"|".join(t.encode() for t in sorted(DIRECTORY_TYPES)) + rb')"')


def scan_range(piece: Piece, limits: Limits = DEFAULT_LIMITS) -> tuple[dict[str, Any], list[tuple[int, Unit]]]:
    """Count the lines and units of a range and return its directory resources (for the index).

    Only lines that may hold a directory resource are parsed: those naming one of the
    types as resourceType, or holding a JSON escape (`\\u`) that could spell it. Which
    of them are units is decided by the same per-line reader as the mapping pass.
    """
    stats: dict[str, Any] = {"lines": 0, "units": False, "log": False}
    found: list[tuple[int, Unit]] = []
    try:
        f = open(piece.abspath, "rb")  # noqa: SIM115 - closed in finally
    except OSError:
        return stats, found
    try:
        pos = _align(f, piece.start)
        region = f.read(max(piece.end - pos, 0))
        if region and not region.endswith(b"\n"):
            region += f.readline()  # the line that crosses the end belongs to this range
    finally:
        f.close()
    if not region:
        return stats, found
    stats["lines"] = region.count(b"\n") + (0 if region.endswith(b"\n") else 1)
    body = region[3:] if piece.start == 0 and region.startswith(b"\xef\xbb\xbf") else region
    stats["units"] = bool(body.strip())  # a line that is not blank is a unit (a resource or a rejection)
    if piece.start == 0:
        first = region.split(b"\n", 1)[0]
        if len(first) <= limits.max_line_bytes and _is_bulk_log(first.removeprefix(b"\xef\xbb\xbf")):
            stats["log"] = True
            return stats, found
    starts = {m.start() for m in _DIRECTORY.finditer(region)} | {m.start() for m in re.finditer(rb"\\u", region)}
    seen: set[int] = set()
    line_no = piece.first_line - 1
    counted = 0
    reader = FhirFile(Path(piece.path), limits)
    for at in sorted(starts):
        begin = region.rfind(b"\n", 0, at) + 1
        if begin in seen:
            continue
        seen.add(begin)
        line_no += region.count(b"\n", counted, begin)
        counted = begin
        end = region.find(b"\n", begin)
        line = region[begin:end if end >= 0 else len(region)]
        if len(line) + 1 > limits.max_line_bytes:
            continue
        if begin == 0 and piece.start == 0:
            line = line.removeprefix(b"\xef\xbb\xbf")
        for unit in reader._line(line.rstrip(b"\r"), ""):
            found.append((line_no + 1, unit))
    return stats, found

