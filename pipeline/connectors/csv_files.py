"""Device CSV logs from files and folders: streamed with pyarrow, mapped in chunks.

`read_csv_logs` is the connector the `twin import csv` command and the job runner call.
It finds each file's format (pipeline.devices), reads the lines before the data (the
preamble, a `sep=;` line, the header, a units row) itself, and streams the rest through
pyarrow's CSV reader in record batches, so memory stays flat whatever the file size.

Counting (units read = units produced + units rejected): a unit is one data line.
Preamble, `sep=` and header lines, the units row, blank lines and a declared footer
are not units. Each chunk of `chunk_rows` data lines yields one observation `Rows` whose
`units` is the number of its lines that were not rejected (a line whose values are all
missing is a unit that produces no row); each rejected line is one `Rejected`. A file
that cannot be read at all is one `Rejected` (stage "read"). Device and
patient_identifier `Rows` are derived from the data and count no units.

Hostile input never stops the batch: lines that are not text (not UTF-8, NUL bytes) or longer than
`MAX_LINE` bytes are cut out of the byte stream before pyarrow sees them (it would
give up on the whole file) and come back as rejected lines.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import queue
import re
import stat
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ..devices import (
    FileContext,
    FileKind,
    FileMapper,
    FileProblem,
    Format,
    detect,
    ignored_by,
    load_formats,
    parse_window,
    short_hash,
    single_row_table,
    split_fields,
)
from ..errors import ConfigError
from ..paths import inside
from ..units import STREAM_UNIT_PREFIX, Rejected, Rows

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # longer lines are rejected (line-too-long); pyarrow needs a block to hold a whole line
BLOCK = 4 << 20  # pyarrow block size: one record batch per block
PAYLOAD_LIMIT = 64 << 10  # a rejected line's bytes kept in quarantine up to this size
HEAD_BYTES = 1 << 20  # the preamble, header and units row must fit in the first MiB
# One file: far beyond a week of 64 Hz wearable data (~2 GB); memory does not grow with it
# (the body is streamed), but a file past this is an export gone wrong or not a log.
MAX_FILE = 64 << 30
_MARK = b"\x00twinline-cut:"
_MARK_TEXT = _MARK.decode()
_BOM = b"\xef\xbb\xbf"
_SEP_RE = re.compile(r'^"?sep=(.)"?\s*$')


def read_csv_logs(paths: list[str], *, format: str | None = None, patient_id: str | None = None,
                  patient_system: str | None = None, device_id: str | None = None, downsample: str | None = None,
                  chunk_rows: int = 1_000_000) -> Iterator[Rows | Rejected]:
    """Yield observation, device and patient_identifier rows for device CSV files and folders.

    `format` names a mapping (mappings/devices/*.toml); without it each file's format is
    recognised by its name and first lines, and a file that fits none or several is a
    usage error listing the candidates (raised before anything is read). `patient_id`
    and `device_id` override what the mapping finds in the files; `patient_system`, the
    namespace written with the patient id (so that it links to the hospital's records). `downsample` ("1min",
    "30s", or "raw") overrides the mapping's window; the raw stream is the default.
    """
    formats = load_formats()
    if format is not None and format not in formats:
        raise ConfigError(f"unknown device format {format!r}", [f"known formats: {', '.join(sorted(formats))}"])
    window = parse_window(downsample) if downsample is not None else None
    force_raw = downsample is not None and window is None
    if chunk_rows < 1:
        raise ConfigError("chunk_rows must be at least 1")
    plan = _plan(paths, formats, format)
    seen_devices: set[str] = set()
    for path, kind in plan:
        fmt = formats[kind.format]
        if kind.skip:
            log.info("%s: %s/%s is not mapped (%s)", path, kind.format, kind.kind, kind.skip)
            continue
        yield from _read_file(path, fmt, kind, patient_id=patient_id, patient_system=patient_system,
                              device_id=device_id, window=window,
                              force_raw=force_raw, chunk_rows=chunk_rows, seen_devices=seen_devices)


def accept(path: Path) -> bool:
    """Whether a file found in a folder is for this connector: not hidden, not a file a mapping
    declares part of an export but not data (info.txt, meta.json). Format detection comes later."""
    return not path.name.startswith(".") and ignored_by(path, load_formats().values()) is None


def find_logs(paths: Sequence[str | Path], format: str | None = None) -> list[tuple[Path, str]]:
    """Every file read_csv_logs would read, with its "format/kind", before anything is read.

    Raises ConfigError listing every file that no format (or more than one) recognises, every
    missing path, and an unknown format name: call it first when importing file by file.
    """
    formats = load_formats()
    if format is not None and format not in formats:
        raise ConfigError(f"unknown device format {format!r}", [f"known formats: {', '.join(sorted(formats))}"])
    return [(p, f"{k.format}/{k.kind}") for p, k in _plan([str(p) for p in paths], formats, format)]


def _plan(paths: Sequence[str], formats: dict[str, Format], name: str | None) -> list[tuple[Path, FileKind]]:
    """Every file to read with its kind; all problems are reported together."""
    problems: list[str] = []
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(path).parts) and inside(path, f))
        elif path.is_file():
            files.append(path)
        elif path.exists():  # a device, a FIFO: it may never end, or block
            problems.append(f"{p}: not a regular file (a device, pipe or socket)")
        else:
            problems.append(f"{p}: no such file or folder")
    plan = []
    for f in files:
        if ignored_by(f, formats.values()) is not None:
            log.info("%s: part of an export but not data (mapping 'ignore'); skipped", f)
            continue
        try:
            head = _head_lines(f, 8)
        except OSError as e:
            problems.append(f"{f}: cannot be read ({e.strerror})")
            continue
        if not any(line.strip() for line in head):
            log.info("%s: empty; nothing to import", f)
            continue
        found = detect(f, head, formats, name)
        if isinstance(found, str):
            problems.append(f"{f}: {found}")
        else:
            plan.append((f, found))
    if problems:
        raise ConfigError("some inputs are not device logs Twinline can read", problems)
    return plan


def _head_lines(path: Path, n: int) -> list[str]:
    with open(path, "rb") as fh:
        data = fh.read(HEAD_BYTES)
    lines = data.split(b"\n")[:n]
    out = [line.rstrip(b"\r").decode("utf-8", "replace") for line in lines]
    if out:
        out[0] = out[0].lstrip("\ufeff")
    if data and lines and not lines[-1] and len(lines) <= n:
        out.pop()  # the empty string after the last newline is not a line
    return out


# --------------------------------------------------------------------------- one file


class _Preamble:
    """The lines before the data of one file, and where the data starts."""

    def __init__(self, path: Path, kind: FileKind):
        with open(path, "rb") as fh:
            data = fh.read(HEAD_BYTES)
        bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        pieces = data[bom:].split(b"\n")
        at_eof = len(data) < HEAD_BYTES
        raw = [p + b"\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] and at_eof else [])
        text = [r.rstrip(b"\r\n").decode("utf-8", "replace") for r in raw]
        self.delimiter = kind.delimiter
        i = 0
        sep = _SEP_RE.match(text[0]) if text else None
        if sep:
            self.delimiter = sep.group(1)
            i = 1
        i += kind.skip_lines
        need = i + int(kind.header) + int(kind.units_row)
        if len(raw) < need and not at_eof:
            raise FileProblem("bad-preamble", f"the lines before the data are longer than {HEAD_BYTES} bytes")
        self.lines = text[:need]
        self.raw_names: list[str] = []
        self.names = list(kind.columns)
        self.units: dict[str, str] = {}
        if kind.header:
            header = text[i] if i < len(text) else ""
            self.raw_names = [h.strip() for h in split_fields(header, self.delimiter)]
            self.names = _clean_names(self.raw_names, kind)
            i += 1
        if kind.units_row and i < len(text):
            units = [u.strip() for u in split_fields(text[i], self.delimiter)]
            self.units = {n: u for n, u in zip(self.names, units, strict=False) if u}
            i += 1
        self.non_data = min(i, len(raw))
        self.offset = bom + sum(len(r) for r in raw[: self.non_data])
        self.first_line = self.non_data + 1


def _clean_names(raw: list[str], kind: FileKind) -> list[str]:
    out: list[str] = []
    for i, name in enumerate(raw):
        n = kind.strip_prefix.sub("", name, count=1) if kind.strip_prefix else name
        n = n.strip() or f"column{i + 1}"
        base, k = n, 2
        while n in out:
            n, k = f"{base}#{k}", k + 1
        out.append(n)
    return out


class _Digest:
    """The file's sha256, computed in a thread of its own while the file is parsed.

    hashlib releases the GIL on large reads, so hashing costs (almost) no time of the
    mapping thread; `__call__` waits for it where the unit key or an id needs it.
    """

    def __init__(self, path: Path):
        self._value: str | None = None
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, args=(path,), name="csv-sha256", daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            with open(path, "rb") as fh:
                self._value = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError as e:
            self._error = e

    def __call__(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def _read_file(path: Path, fmt: Format, kind: FileKind, *, patient_id: str | None, patient_system: str | None,
               device_id: str | None, window: int | None, force_raw: bool, chunk_rows: int,
               seen_devices: set[str]) -> Iterator[Rows | Rejected]:
    ref = str(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a device, a FIFO: it may never end, or block
            yield Rejected("read", "not-a-file", "not a regular file (a device, pipe or socket): not read", ref,
                           payload_ref=ref, target_table="observation")
            return
        if st.st_size > MAX_FILE:
            yield Rejected("read", "file-too-large", f"the file is larger than {MAX_FILE} bytes: not read "
                           "(raise csv_files.MAX_FILE if it is genuine)", ref, payload_ref=ref,
                           target_table="observation")
            return
        digest = _Digest(path)
        pre = _Preamble(path, kind)
        ctx = FileContext(path, digest, pre.lines, pre.raw_names, pre.names, pre.units)
        mapper = FileMapper(fmt, kind, ctx, patient_id=patient_id, patient_system=patient_system, device_id=device_id,
                            window=window)
        if force_raw:
            mapper.window = None
    except OSError as e:
        yield Rejected("read", "unreadable-file", f"the file cannot be read ({e.strerror})", ref, payload_ref=ref,
                       target_table="observation")
        return
    except FileProblem as e:
        yield Rejected("read", e.reason, f"{kind.format}/{kind.kind}: {e}", ref, payload_ref=ref,
                       target_table="observation")
        return
    reader = _BodyReader(path, pre, kind)
    emitted_patients: set[tuple[str | None, str]] = set()
    chunk_no = in_chunk = units = 0
    first_row: int | None = None
    last_row = 0

    def flush(final: bool) -> Iterator[Rows]:
        nonlocal chunk_no, in_chunk, units, first_row
        if in_chunk == 0 and not (final and mapper.carry):
            return
        sha = digest()
        content = short_hash(sha, fmt.digest, kind.kind, str(mapper.window), patient_id or "", device_id or "",
                             *([patient_system] if patient_system else []))
        table = mapper.take_chunk(f"{STREAM_UNIT_PREFIX}{sha}:{chunk_no}", final)
        lines = reader.lines_of(np.array([first_row or 0, last_row]))
        span = f"{ref}:{lines[0]}-{lines[1]}" if in_chunk else ref
        if table.num_rows or units:
            yield Rows("observation", table, span, units, short_hash(content, str(chunk_no)))
        yield from _derived(mapper, fmt, sha, ref, seen_devices, emitted_patients)
        chunk_no += 1
        in_chunk = units = 0
        first_row = None

    try:
        for what, piece in reader.pieces(mapper, chunk_rows):
            yield from reader.drain_rejected()
            if what == "chunk-end":
                yield from flush(False)
                continue
            rows, sub, result = piece
            mapper.add(result)
            if first_row is None:
                first_row = int(rows[0])
            last_row = int(rows[-1])
            if result.bad:
                bad_rows = np.array(sorted(result.bad), np.int64)
                for r, line in zip(bad_rows.tolist(), reader.lines_of(rows[bad_rows]).tolist(), strict=True):
                    reason, msgs = result.bad[r]
                    yield Rejected("map", reason, f"line {line}: " + "; ".join(msgs), f"{ref}:{line}",
                                   payload=_payload(sub, r, reader.delimiter), target_table="observation")
            units += len(rows) - len(result.bad)
            in_chunk += len(rows)
        yield from reader.drain_rejected()
    except (pa.ArrowInvalid, OSError) as e:
        # The reader gave up (it should not after the guard): the rest of the file is one unit.
        yield from reader.drain_rejected()
        log.warning("%s: reading stopped after data line %d (%s)", ref, reader.rows_seen, type(e).__name__)
        line = reader.lines_of(np.array([reader.rows_seen]))[0]
        yield Rejected("read", "unreadable-rest", f"reading stopped after {reader.rows_seen} data lines; "
                       "the rest of the file was not read", f"{ref}:{line}-", payload_ref=ref,
                       target_table="observation")
    finally:
        reader.close()
    yield from flush(True)
    try:
        yield from _derived(mapper, fmt, digest(), ref, seen_devices, emitted_patients)
    except OSError as e:
        yield Rejected("read", "unreadable-file", f"the file cannot be read ({e.strerror})", ref, payload_ref=ref,
                       target_table="observation")


def _derived(mapper: FileMapper, fmt: Format, sha: str, ref: str, seen_devices: set[str],
             emitted: set[tuple[str | None, str]]) -> Iterator[Rows]:
    """Device and patient_identifier rows for ids not yet reported (no units: derived from data lines)."""
    for row in mapper.device_rows():
        if row["device_id"] in seen_devices:
            continue
        seen_devices.add(row["device_id"])
        key = f"device:{row['device_id']}"
        yield Rows("device", single_row_table("device", row, key), ref, 0, short_hash(fmt.digest, repr(sorted(
            row.items(), key=lambda kv: kv[0]))))
    for row in mapper.patient_rows():
        k = (row["system"], row["value"])
        if k in emitted:
            continue
        emitted.add(k)
        # One unit per patient, whatever the file: the same patient in many logs is one record
        # (a patient row, so references from its observations resolve, and its identifier).
        key = f"patient:{row['patient_id']}"
        yield Rows("patient", single_row_table("patient", {"patient_id": row["patient_id"]}, key), ref, 0,
                   short_hash("patient", row["patient_id"]))
        yield Rows("patient_identifier", single_row_table("patient_identifier", row, key), ref, 0,
                   short_hash(row["system"] or "", row["value"], row["patient_id"]))


def _payload(batch: pa.RecordBatch, row: int, delimiter: str) -> bytes:
    """The rejected line rebuilt from its fields (quoted where needed), cut at PAYLOAD_LIMIT."""
    out = io.StringIO()
    w = csv.writer(out, delimiter=delimiter, lineterminator="")
    fields = [batch.column(i)[row].as_py() for i in range(batch.num_columns)]
    w.writerow([(f or b"").decode("utf-8", "replace") for f in fields])
    return out.getvalue().encode()[:PAYLOAD_LIMIT]


# --------------------------------------------------------------------------- the body stream


class _GuardedFile(io.RawIOBase):
    """The file's bytes from an offset, with every unusable line swapped for a marker line.

    pyarrow stops reading a file at a line that does not fit in a block or (in a ragged
    line) is not UTF-8. Such lines are replaced by a short marker that is always ragged,
    so the reader's invalid-row handler sees them at their place and line numbers stay
    right; the original bytes (cut at PAYLOAD_LIMIT) are kept for quarantine.
    """

    def __init__(self, fh: Any, width: int, delimiter: str):
        self.fh = fh
        self.filler = delimiter.encode() * (width + 1)
        self.pending = bytearray()
        self.partial = b""
        self.skipping = False
        self.eof = False
        self.cut: list[tuple[str, bytes]] = []

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:  # pragma: no cover - pyarrow calls read()
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self.pending) < n) and not self.eof:
            self._fill()
        if n < 0:
            n = len(self.pending)
        out = bytes(self.pending[:n])
        del self.pending[:n]
        return out

    def _marker(self, reason: str, original: bytes) -> bytes:
        self.cut.append((reason, original[:PAYLOAD_LIMIT]))
        return _MARK + str(len(self.cut) - 1).encode() + self.filler

    def _fill(self) -> None:
        chunk = self.fh.read(MAX_LINE)
        if not chunk:
            self.eof = True
            if self.skipping:
                self.pending += b"\n"
            elif self.partial:
                self._emit(self.partial)
            self.partial = b""
            return
        if self.skipping:
            nl = chunk.find(b"\n")
            if nl < 0:
                return
            self.pending += b"\n"
            self.skipping = False
            chunk = chunk[nl + 1:]
        data = self.partial + chunk
        last = data.rfind(b"\n")
        complete, self.partial = (data[: last + 1], data[last + 1:]) if last >= 0 else (b"", data)
        if complete:
            self._emit(complete)
        if len(self.partial) > MAX_LINE:
            self.pending += self._marker("line-too-long", self.partial)
            self.partial = b""
            self.skipping = True

    def _emit(self, data: bytes) -> None:
        """Append complete lines, cutting a too-long first line and any line that is not text.

        Not text: not UTF-8, or holding a NUL byte (never in a text log, and the marker
        starts with one, so no input line can pass for a marker).
        """
        if _BOM in data:  # a byte-order mark mid-file (files concatenated): nothing, as at the start
            data = data.replace(b"\n" + _BOM, b"\n").removeprefix(_BOM)
        first = data.find(b"\n")
        if (first if first >= 0 else len(data)) > MAX_LINE:
            self.pending += self._marker("line-too-long", data[:first]) + (b"\n" if first >= 0 else b"")
            data = data[first + 1:] if first >= 0 else b""
        if b"\x00" not in data:
            try:
                data.decode("utf-8")
                self.pending += data
                return
            except UnicodeDecodeError:
                pass
        # Only blocks holding junk get here: look at their lines one by one.
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            end = b"\n" if i < len(lines) - 1 else b""
            if not line and not end:
                continue
            if b"\x00" in line or not _is_utf8(line):
                self.pending += self._marker("not-text", line) + end
            else:
                self.pending += line + end


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class _BodyReader:
    """pyarrow's streaming CSV reader over the guarded body, with line numbers and rejected lines.

    Parsing and mapping run in a thread of their own (pyarrow and numpy release the
    GIL) while the caller's thread builds the chunks' tables, so both cores work; the
    queue between them is bounded, so memory stays flat.
    """

    AHEAD = 2

    def __init__(self, path: Path, pre: _Preamble, kind: FileKind):
        self.path, self.pre, self.kind = path, pre, kind
        self.delimiter = pre.delimiter
        self.invalid: list[int] = []  # body row numbers (1-based) the reader skipped, in order
        self.rejected: deque[Rejected] = deque()
        self.rows_seen = 0
        self.footer_lines = 0
        self._v: tuple[int, np.ndarray] = (0, np.zeros(0, np.int64))
        self.fh = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.fh.seek(pre.offset)
        self.guard = _GuardedFile(self.fh, len(pre.names), self.delimiter)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.fh.close()

    def _invalid_row(self, row: Any) -> str:
        """pyarrow's handler for a line it cannot use: record why, and skip it (never raise: that stops the file)."""
        line = self.pre.first_line + row.number - 1
        self.invalid.append(row.number)
        ref = f"{self.path}:{line}"
        try:
            text: str = row.text
            if text.startswith(_MARK_TEXT):
                reason, original = self.guard.cut[int(text[len(_MARK_TEXT):].split(self.delimiter, 1)[0])]
                what = "longer than 1 MiB" if reason == "line-too-long" else "not text (not UTF-8, or NUL bytes)"
                self.rejected.append(Rejected("map", reason, f"line {line}: {what}", ref, payload=original,
                                              target_table="observation"))
            elif self.kind.footer is not None and self.kind.footer.search(text):
                self.footer_lines += 1
            else:
                self.rejected.append(Rejected(
                    "map", "ragged-row", f"line {line}: {row.actual_columns} fields where the header has "
                    f"{row.expected_columns}", ref, payload=text.encode()[:PAYLOAD_LIMIT], target_table="observation"))
        except Exception:  # noqa: BLE001 - a bug here must not lose the line
            log.exception("%s: could not classify a skipped line", ref)
            self.rejected.append(Rejected("map", "ragged-row", f"line {line}: cannot be split into the header's fields",
                                          ref, target_table="observation"))
        return "skip"

    def _open(self, names: list[str]) -> pacsv.CSVStreamingReader:
        # Single-threaded parsing: only then does pyarrow tell the handler the line number.
        return pacsv.open_csv(
            self.guard,
            read_options=pacsv.ReadOptions(column_names=names, block_size=BLOCK, use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=self.delimiter, newlines_in_values=False,
                                             ignore_empty_lines=False, invalid_row_handler=self._invalid_row),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.binary() for n in names},
                                                 strings_can_be_null=True, null_values=[""],
                                                 quoted_strings_can_be_null=True),
        )

    def _produce(self, out: queue.Queue[tuple[str, Any]], mapper: FileMapper, chunk_rows: int) -> None:
        """The reader thread: parse, drop blank lines, cut at chunk boundaries, map."""
        try:
            names = self.pre.names
            try:
                reader = self._open(names)
            except pa.ArrowInvalid as e:
                if "Empty CSV" not in str(e):
                    raise
                self._put(out, ("end", None))  # nothing but a byte-order mark or the like after the header
                return
            in_chunk = 0
            for batch in reader:
                row0 = self.rows_seen
                self.rows_seen += batch.num_rows
                pos = 0
                while pos < batch.num_rows:
                    take = min(batch.num_rows - pos, chunk_rows - in_chunk)
                    part = batch.slice(pos, take)
                    keep = np.flatnonzero(self.non_blank(part))
                    if len(keep):
                        sub = part if len(keep) == take else part.take(pa.array(keep))
                        if not self._put(out, ("piece", (row0 + pos + keep, sub, mapper.map_batch(sub)))):
                            return
                        in_chunk += len(keep)
                    pos += take
                    if in_chunk >= chunk_rows:
                        in_chunk = 0
                        if not self._put(out, ("chunk-end", None)):
                            return
            self._put(out, ("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
            self._put(out, ("error", e))

    def _put(self, out: queue.Queue[tuple[str, Any]], item: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pieces(self, mapper: FileMapper, chunk_rows: int) -> Iterator[tuple[str, Any]]:
        """("piece", (reader row numbers, batch, BatchResult)) in file order, and ("chunk-end", None)."""
        if not self.pre.names or os.fstat(self.fh.fileno()).st_size <= self.pre.offset:
            return  # a header and no data
        q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=self.AHEAD)
        self._thread = threading.Thread(target=self._produce, args=(q, mapper, chunk_rows), name="csv-reader",
                                        daemon=True)
        self._thread.start()
        while True:
            what, item = q.get()
            if what == "end":
                return
            if what == "error":
                raise item
            yield what, item

    def drain_rejected(self) -> Iterator[Rejected]:
        while self.rejected:
            yield self.rejected.popleft()

    def non_blank(self, batch: pa.RecordBatch) -> np.ndarray:
        """Rows with at least one non-empty field (a blank line is not a unit)."""
        keep = np.zeros(batch.num_rows, bool)
        for col in batch.columns:
            if not col.null_count:
                return np.ones(batch.num_rows, bool)
            keep |= ~np.asarray(col.is_null())
        return keep

    def lines_of(self, rows: np.ndarray) -> np.ndarray:
        """File line numbers of data rows (0-based positions among the rows the reader kept).

        Lines the reader skipped (ragged, cut, footer) are counted in; rows that come
        later in the file do not change the answer, so the reader may run ahead.
        """
        n = len(self.invalid)
        if self._v[0] != n:
            inv = np.array(self.invalid[:n], np.int64)
            self._v = (n, inv - 1 - np.arange(n))  # valid rows before each skipped line
        return self.pre.first_line + rows + np.searchsorted(self._v[1], rows, side="right")
