"""`twin listen mllp`: HL7 v2 over MLLP, acknowledged only once durably stored.

Why a spool: a listener runs for months, and scheduled jobs write the same store; if
the listener held the store's lock, no job could run, and if it waited for the lock
before acknowledging, senders would time out while a nightly job runs. So each batch
the MLLP server receives is appended to a spool (checksummed, length-prefixed records in
segment files under `_twin/spool/<source>/`, fsynced once per batch) and only then
acknowledged: that is the durable store an ACK waits for. A drain process
(DrainProcess) moves sealed segments into the tables whenever it can take the store's
lock, as runs of command `listen`, and deletes a segment only after its run has committed. A segment
from a killed listener is drained by the next one; a record cut by the kill was never
acknowledged (its fsync did not return) and is ignored.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import multiprocessing
import os
import signal
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pyarrow.compute as pc

from .errors import ConfigError, LockHeld
from .hl7v2 import DEFAULT_LIMITS
from .hl7v2_fhir import map_message
from .hl7v2_maps import Mappings, default_mappings
from .identity import TwinIds, stored_links
from .imports import finish_run
from .ingest import Ingest, ViewSet, collect_at_flushes
from .paths import safe_name
from .runs import Run
from .store import Store, fsync_dir
from .units import Rejected, Resource

log = logging.getLogger(__name__)

# Spool record kinds. F: a mapped message (the raw bytes and the FHIR resources, as JSON);
# R: a refused one (its Rejected); M: a raw message, mapped when drained (spools written
# before the listener spooled what it had mapped already).
_MSG, _REJ, _FHIR = b"M", b"R", b"F"
# Not written: what Spool.read gives for bytes of a segment that do not frame as a record.
DAMAGED = b"!"

# Segment layout: _HEADER, then records of
#     _SYNC (2 bytes), kind (1), len(source_ref) (4), len(data) (4), CRC-32 (4), source_ref, data
# (big-endian; the CRC over kind, both lengths, source_ref and data). The checksum tells a
# record damaged on disk (a flipped bit, bytes overwritten from outside) from a good one,
# and the sync bytes let the reader find the next good record behind it: the damaged bytes
# go to the quarantine, the records behind them are drained. Without them the reader
# could only stop at the first bad length, and lose every acknowledged message after it.
# Segments written before checksums (no header: kind, two lengths, source_ref, data) are
# read as they were.
_HEADER = b"TWINSPOOL2\n"
_SYNC = b"\xa7\x5c"
_FRAME = struct.Struct(">2scIII")
_CRC_AT = _FRAME.size - 4  # the checksum covers the 9 bytes before it (kind, lengths) and the 2 fields after


def _record(kind: bytes, ref: str, data: bytes) -> bytes:
    r = ref.encode("utf-8", "replace")
    head = kind + len(r).to_bytes(4, "big") + len(data).to_bytes(4, "big")
    return b"".join((_SYNC, head, zlib.crc32(data, zlib.crc32(r, zlib.crc32(head))).to_bytes(4, "big"), r, data))


class Spool:
    """Append-only segments of received messages. Not thread-safe: one writer, one drainer, with a lock."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        # One listener per spool: a second one would take the first's open segment for a
        # dead listener's and drain it while acknowledged messages are still appended to
        # it. The lock dies with the process, so a crashed listener never blocks the next.
        self._owner = open(folder / ".listener.lock", "a+b")  # noqa: SIM115 - closed in close()
        try:
            fcntl.flock(self._owner.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._owner.close()
            raise ConfigError(f"another listener already receives for source {folder.name!r} on this store: "
                              "stop it, or give this one another --source") from None
        self._lock = threading.Lock()
        self._file = None
        self._path: Path | None = None
        self._closed: list[Path] = []  # closed segments not renamed to .ready yet (a rename that failed)
        for stale in folder.glob("*.open"):  # a segment of a listener that died: drain it
            stale.rename(stale.with_suffix(".ready"))
        # Segments drain in name order, so names must grow even if the wall clock steps back
        # (an NTP correction): an older A08 would otherwise overwrite a newer one.
        self._stamp = max((_stamp(p) for p in folder.glob("*.ready")), default=0)

    def close(self) -> None:
        """Seal the open segment and let another listener take this spool."""
        self.seal()
        self._owner.close()

    def append(self, records: list[tuple[bytes, str, bytes]]) -> None:
        """Write (kind, source_ref, data) records and fsync: when this returns, they survive a crash.

        When it raises (a full disk, an I/O error), the records were not stored and the
        caller refuses them; the segment is given up, cut back to its last whole record, so
        that no record acknowledged later follows torn bytes (which the reader would take
        for bytes damaged on disk, and quarantine). After a failed fsync the page cache is not to be trusted
        either, so a new segment is the one safe place for what comes next."""
        buf = b"".join(_record(kind, ref, data) for kind, ref, data in records)
        with self._lock:
            if self._file is None:
                self._stamp = max(time.time_ns(), self._stamp + 1)
                self._path = self.folder / f"{self._stamp:020d}-{os.getpid()}.open"
                self._file = open(self._path, "ab", buffering=0)  # noqa: SIM115 - closed in seal()
                fsync_dir(self.folder)  # the segment's name survives a power cut, not only its bytes
            whole = os.fstat(self._file.fileno()).st_size
            if whole == 0:  # written with the first records: a header alone is never left behind
                buf = _HEADER + buf
            try:
                written = self._file.write(buf)  # unbuffered: one write(2), which may be short
                if written != len(buf):
                    raise OSError(f"short write to the spool ({written} of {len(buf)} bytes)")
                os.fsync(self._file.fileno())
            except BaseException:
                self._give_up(whole)
                raise

    def _give_up(self, whole: int) -> None:
        """Close the open segment after a failed append, cut back to `whole` bytes (best effort:
        a tail that cannot be cut is a torn last record, which the reader skips), and seal it."""
        assert self._file is not None
        with contextlib.suppress(OSError):
            os.ftruncate(self._file.fileno(), whole)
        self._close_open()
        with contextlib.suppress(OSError):
            self._rename_closed()

    def _close_open(self) -> None:
        """Close the open segment (each append was fsynced) and queue it for its rename to .ready."""
        assert self._file is not None and self._path is not None
        with contextlib.suppress(OSError):  # the file is closed even when close(2) reports an error
            self._file.close()
        self._closed.append(self._path)
        self._file, self._path = None, None

    def _rename_closed(self) -> None:
        """Seal the closed segments; one whose rename fails stays queued for the next seal."""
        while self._closed:
            self._closed[0].rename(self._closed[0].with_suffix(".ready"))
            self._closed.pop(0)
        fsync_dir(self.folder)

    def seal(self) -> None:
        """Close the open segment (if it holds anything) so the drainer may take it."""
        with self._lock:
            if self._file is not None:
                self._close_open()
            if self._closed:
                self._rename_closed()

    def ready(self) -> list[Path]:
        return _sealed(self.folder)

    @staticmethod
    def count(path: Path) -> int:
        """Records in a segment, and runs of damaged bytes (a quarantine entry each): what
        the next drain will read. Mapped, not read (a backlog can be large)."""
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return 0
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return sum(1 for _ in _frames(m))

    @staticmethod
    def read(path: Path) -> Iterator[tuple[bytes, str, bytes]]:
        """(kind, source_ref, data) of each record; for bytes that do not frame as one
        (damaged on disk), (DAMAGED, where they are in the segment, the bytes)."""
        data = path.read_bytes()
        for kind, start, ref_start, ref_end, end in _frames(data):
            if kind == DAMAGED:
                yield DAMAGED, f"{path.name} bytes {start}-{end}", data[start:end]
            else:
                yield kind, data[ref_start:ref_end].decode("utf-8", "replace"), data[ref_end:end]


def _frames(buf) -> Iterator[tuple[bytes, int, int, int, int]]:
    """(kind, start, start of source_ref, its end, end) of each record of a segment, and
    (DAMAGED, start, -1, -1, end) for bytes between records that do not frame as one (a
    bad sync, length or checksum), up to the next record that does. The last record cut
    short is not one: a crash cut it before its fsync returned, so it was never
    acknowledged (nor is a header cut short: the segment's first records came with it).
    A last record whose length was damaged to reach past the end looks the same, and is
    taken for one cut by a crash: the checksum cannot be read without its end."""
    size = len(buf)
    if size <= len(_HEADER):  # no room for a record: a header cut short, or nothing
        return
    head = buf[:len(_HEADER)]
    if sum(a == b for a, b in zip(head, _HEADER, strict=True)) >= len(_HEADER) - 3:  # a damaged byte or three
        i = len(_HEADER)
    elif head[:1] in (_MSG, _REJ, _FHIR):
        yield from _legacy_frames(buf)
        return
    else:  # the header damaged beyond recognition: the records behind it are still read
        i = 0
    while i < size:
        end = _frame_end(buf, i, size)
        if end:
            _, kind, nref, _, _ = _FRAME.unpack_from(buf, i)
            yield kind, i, i + _FRAME.size, i + _FRAME.size + nref, end
            i = end
            continue
        j = i
        while (j := buf.find(_SYNC, j + 1)) >= 0 and not _frame_end(buf, j, size):  # a payload may hold _SYNC
            pass
        if j < 0:
            if _cut_short(buf, i, size):
                return
            j = size
        yield DAMAGED, i, -1, -1, j
        i = j


def _frame_end(buf, i: int, size: int) -> int:
    """The end of the record at i, or 0 if there is none whole and sound there."""
    if i + _FRAME.size > size or buf[i:i + 2] != _SYNC:
        return 0
    _, _, nref, ndata, crc = _FRAME.unpack_from(buf, i)
    end = i + _FRAME.size + nref + ndata
    if end > size:
        return 0
    with memoryview(buf) as view:  # no copy of the record
        if zlib.crc32(view[i + _FRAME.size:end], zlib.crc32(view[i + 2:i + _CRC_AT])) != crc:
            return 0
    return end


def _cut_short(buf, i: int, size: int) -> bool:
    """A sound start of a record that the segment ends before its end."""
    if not _SYNC.startswith(buf[i:i + 2]):  # the slice is shorter at the very end
        return False
    if size - i < _FRAME.size:
        return True
    _, _, nref, ndata, _ = _FRAME.unpack_from(buf, i)
    return i + _FRAME.size + nref + ndata > size


def _legacy_frames(buf) -> Iterator[tuple[bytes, int, int, int, int]]:
    """Records of a segment written before checksums: kind, two 4-byte lengths, source_ref,
    data. The reader stops at the first one that does not fit."""
    i, size = 0, len(buf)
    while i + 9 <= size:
        ref_end = i + 9 + int.from_bytes(buf[i + 1:i + 5], "big")
        end = ref_end + int.from_bytes(buf[i + 5:i + 9], "big")
        if end > size:
            return
        yield buf[i:i + 1], i, i + 9, ref_end, end
        i = end


def _stamp(segment: Path) -> int:
    """The number a segment is named by: when its first record was written (ns), or the last
    segment's number plus one if the clock has gone back since."""
    head = segment.name.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def _sealed(folder: Path) -> list[Path]:
    """The sealed segments of a spool, oldest first: what a drain takes."""
    return sorted(folder.glob("*.ready"))


@dataclass
class Backlog:
    """Messages a listener received (acknowledged, or refused as frames) not in the tables yet, for one source."""

    source: str
    messages: int
    segments: int
    oldest: datetime | None  # when the oldest waiting segment was started (its first message)
    set_aside: int = 0       # segments that failed their drains, kept in set-aside/ (Drainer)
    damaged: int = 0         # segments with bytes damaged on disk, kept in damaged/ (Drainer._damaged)


def spool_backlog(store: Store) -> list[Backlog]:
    """What the spools of `store` hold, per source, read without taking a listener's lock:
    `twin status` shows it, for a listener that cannot drain (a job holds the store for
    hours, a full disk) keeps acknowledging into its spool."""
    out = []
    for folder in sorted(p for p in (store.meta / "spool").glob("*") if p.is_dir()):
        waiting = []  # (segment, records), oldest first: a segment is named for its first message's time
        for seg in sorted([*folder.glob("*.open"), *folder.glob("*.ready")], key=lambda p: p.name):
            with contextlib.suppress(FileNotFoundError):  # drained meanwhile
                if n := Spool.count(seg):
                    waiting.append((seg, n))
        aside = len(list((folder / "set-aside").glob("*.ready")))
        damaged = len(list((folder / "damaged").glob("*.ready")))
        if not waiting and not aside and not damaged:
            continue
        stamp = _stamp(waiting[0][0]) if waiting else 0
        oldest = datetime.fromtimestamp(stamp / 1e9, UTC) if stamp else None
        out.append(Backlog(folder.name, sum(n for _, n in waiting), len(waiting), oldest, aside, damaged))
    return out


@dataclass
class ListenStats:
    drained_messages: int = 0
    drains: int = 0
    waits_for_lock: int = 0


class Drainer:
    """Moves sealed spool segments (`folder`/*.ready) into the store, one `listen` run per
    drain. Sealing is the receiving side's: the drainer never touches the open segment.

    A drain takes every sealed segment, so one whose records make every drain fail (a bug
    that one message meets) would hold back all later ones, while the listener goes on
    acknowledging. After a failed drain the drainer takes one segment at a time; a segment
    that was in SET_ASIDE_AFTER failed drains (the first with others, then alone) is set
    aside: its messages go to the quarantine (reason `drain-failed`, with their raw bytes,
    for `twin quarantine retry` after a fix), the segment file to `set-aside/` beside the
    spool, and the drains go on behind it. Failed drains are counted from the claims they
    leave (see _settle), so a drain that crashes its process counts as one too.
    """

    SET_ASIDE_AFTER = 3

    def __init__(self, store: Store, folder: Path, source: str, *, strict: bool = False, privacy=None):
        self.store = store
        self.privacy = privacy  # pipeline.privacy.PrivacyHooks: applied as the spool is drained
        self.folder = folder
        self.source = source
        self.strict = strict
        self.mappings: Mappings | None = None  # found once a drain (_run): it reads the environment
        self.stats = ListenStats()
        self.views = ViewSet(store.schema)
        # segment -> failed drains it was in; kept in a file, for a drain process started after a crash
        self._failures = folder / "drain-failures.json"
        self._failed: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):  # none, or unreadable: none
            self._failed = {str(k): int(v) for k, v in orjson.loads(self._failures.read_bytes()).items()}
        self._error = ""                   # the type of the last failure, for the quarantine's message

    def ready(self) -> list[Path]:
        return _sealed(self.folder)

    @collect_at_flushes()
    def drain(self) -> bool:
        """Drain what is sealed; False if the store's lock is held by another process."""
        if not self.ready():
            return True
        try:
            with self.store.locked("listen"):
                self._settle()
                # listed again under the lock: the drain process of a killed listener, ending
                # its last run, may have committed and removed segments meanwhile
                segments = self.ready()
                self._note_failed({k: v for k, v in self._failed.items() if k in {s.name for s in segments}})
                if not segments:
                    return True
                if self._failed:  # a drain failed: find the segment it failed on
                    segments = segments[:1]
                aside = self._failed.get(segments[0].name, 0) >= self.SET_ASIDE_AFTER
                n = self._run(segments, aside)  # a failure is counted by the next drain, from the claim
                self._note_failed({k: v for k, v in self._failed.items() if k not in {s.name for s in segments}})
        except LockHeld:
            self.stats.waits_for_lock += 1
            return False
        self.stats.drained_messages += n
        self.stats.drains += 1
        return True

    def _run(self, segments: list[Path], aside: bool) -> int:
        """One `listen` run over `segments` (or, `aside`, their messages into the quarantine);
        the number of messages."""
        run = Run(self.store, "listen", inputs=[s.name for s in segments])
        claim = self.folder / f"{run.run_id}.drain"
        names = [s.name for s in segments]
        claim.write_bytes(orjson.dumps({"segments": names}))
        fsync_dir(self.folder)
        try:
            self.mappings = default_mappings()  # a map-file problem fails this drain, as a message would
            ingest = Ingest(self.store, run, self.source, "hl7v2", self.views,
                            twin_ids=TwinIds(stored_links(self.store)), privacy=self.privacy)
            n = 0
            for seg in segments:
                if aside:  # the file stays too: under a privacy profile the quarantine keeps no payload
                    self._keep(seg, "set-aside")
                for kind, ref, data in Spool.read(seg):
                    n += 1
                    if kind == DAMAGED:
                        ingest.feed(self._damaged(seg, ref, data))
                    elif aside:
                        ingest.feed(self._set_aside(seg, kind, ref, data))
                    else:
                        self._feed(ingest, kind, ref, data)
            ingest.finish()
            run.notes.append(f"{n} message(s) from {len(segments)} spool segment(s)" + (
                f", set aside into the quarantine after {self.SET_ASIDE_AFTER} failed drains" if aside else ""))
            finish_run(self.store, run)
        except BaseException as e:  # the claim stays: this may have come after the commit
            self.store.rollback()
            with contextlib.suppress(OSError):
                claim.write_bytes(orjson.dumps({"segments": names, "error": type(e).__name__}))
            raise
        self._forget(claim, names)
        if aside:
            log.error("spool segment %s failed %d drains (%s); its %d message(s) are in the quarantine "
                      "(reason drain-failed) and the segment in %s", segments[0].name, self.SET_ASIDE_AFTER,
                      self._error, n, self.folder / "set-aside")
        return n

    def _feed(self, ingest: Ingest, kind: bytes, ref: str, data: bytes) -> None:
        if kind == _FHIR:
            rec = orjson.loads(data)
            raw = rec["raw"].encode("latin-1")
            ingest.feed_all([Resource(r["r"], r["ref"], raw=raw, create_only=r["co"]) for r in rec["resources"]])
        elif kind == _REJ:
            r = orjson.loads(data)
            ingest.feed(Rejected(r["stage"], r["reason"], r["message"], ref,
                                 payload=r["payload"].encode("latin-1") if r.get("payload") else None))
        else:
            mapped = map_message(data, ref, strict=self.strict, mappings=self.mappings)
            ingest.feed_all([mapped.rejected] if mapped.rejected is not None else mapped.resources)

    def _damaged(self, seg: Path, where: str, data: bytes) -> Rejected:
        """Bytes of a segment that do not frame as a record: into the quarantine as they are,
        and the segment file kept in `damaged/` beside the spool (its bytes may be too many
        for a quarantine entry, and under a privacy profile the entry keeps none)."""
        kept = self.folder / "damaged" / seg.name
        if self._keep(seg, "damaged"):
            log.error("spool segment %s holds bytes that are not a sound record (damaged on disk?): they are in "
                      "the quarantine (reason spool-damaged), the segment is kept in %s", seg.name, kept.parent)
        small = len(data) <= DEFAULT_LIMITS.max_payload_bytes
        return Rejected("drain", "spool-damaged", f"spool segment {seg.name}: {len(data)} bytes do not frame as a "
                        "record (a bad checksum, length or sync); an acknowledged message may be among them, "
                        f"the segment is kept in {kept.parent.name}/ beside the spool", where,
                        payload=data if small else None, payload_ref=None if small else f"{kept.parent}/{where}")

    def _keep(self, seg: Path, folder: str) -> bool:
        """Keep a copy of a segment (a hard link) in `folder` beside the spool, for the
        operator; False if a drain before this one kept it already."""
        kept = self.folder / folder / seg.name
        kept.parent.mkdir(exist_ok=True)
        if kept.exists():
            return False
        os.link(seg, kept)
        return True

    def _set_aside(self, seg: Path, kind: bytes, ref: str, data: bytes) -> Rejected:
        """A spool record as a quarantine entry holding the message as received."""
        raw = data
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            if kind == _FHIR:
                raw = orjson.loads(data)["raw"].encode("latin-1")
            elif kind == _REJ:
                raw = orjson.loads(data)["payload"].encode("latin-1")
        return Rejected("drain", "drain-failed", f"draining spool segment {seg.name} failed {self.SET_ASIDE_AFTER} "
                        f"times ({self._error}); the message was acknowledged and is kept here as received", ref,
                        payload=raw)

    # A drain claims its segments in a file named for its run before it writes, and
    # removes the claim after the segments. A drain killed
    # between its commit and their removal leaves the claim, and the next drain removes
    # them instead of storing them again (the tables would not change, but the runs table
    # would count those messages twice). A claim whose run was rolled back is a failed
    # drain, whether it raised or its process was killed or crashed: the next drain counts
    # it, so a segment that crashes the drain process itself is also set aside in the end.

    def _settle(self) -> None:
        """Under the store's lock, after its recovery: the claims of drains that did not end."""
        for claim in sorted(self.folder.glob("*.drain")):
            try:
                c = orjson.loads(claim.read_bytes())
                names = [str(n) for n in c["segments"]]
            except (ValueError, KeyError, TypeError):  # cut as it was written: nothing began
                claim.unlink()
                continue
            if self._committed(claim.stem):
                self._forget(claim, names)
                continue
            if not c.get("stopped"):  # not a drain its listener stopped at shutdown for taking too long
                self._note_failed({**self._failed, **{n: self._failed.get(n, 0) + 1 for n in names}})
            self._error = str(c.get("error") or "the drain process ended before its commit")
            claim.unlink()  # rolled back: its segments are drained again now

    def _note_failed(self, failed: dict[str, int]) -> None:
        """Keep the failure counts, in memory and in their file (replaced whole: a count lost to
        a power cut only delays a set-aside)."""
        if failed == self._failed:
            return
        self._failed = failed
        if not failed:
            self._failures.unlink(missing_ok=True)
            return
        tmp = self._failures.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(failed))
        os.replace(tmp, self._failures)

    def _committed(self, run_id: str) -> bool:
        return self.store.exists("runs") and self.store.read(
            "runs", ["run_id"], filter=pc.field("run_id") == run_id).num_rows > 0

    def _forget(self, claim: Path, names: list[str]) -> None:
        """A committed drain's segments, then its claim (under the lock, so that no other
        drainer lists them meanwhile)."""
        for name in names:
            (self.folder / Path(name).name).unlink(missing_ok=True)
        claim.unlink()
        fsync_dir(self.folder)


def spooling_handler(spool: Spool, *, strict: bool = False):
    """The MLLP handler: map (the ACK code says how that went), spool what the mapping gave
    (fsync), then let the server acknowledge.

    The spool keeps the resources, not only the raw message, so that the drain does not
    map every message a second time: mapping is about half of a drain's work, and the
    drain process is what bounds the rate a listener can sustain (bench/RESULTS.md). The
    raw bytes go along, for the quarantine of a resource a later stage refuses.
    """

    def handle(batch) -> list:
        records: list[tuple[bytes, str, bytes]] = []
        results: list = []
        mappings = default_mappings()  # once a batch, not per message: it reads the environment
        for m in batch:
            if m.rejected is not None:
                records.append((_REJ, m.rejected.source_ref, _rejected_record(m.rejected)))
                results.append("AE")
                continue
            mapped = map_message(m.raw, m.source_ref, strict=strict, mappings=mappings)
            if mapped.rejected is not None:
                records.append((_REJ, m.source_ref, _rejected_record(mapped.rejected)))
            else:
                records.append((_FHIR, m.source_ref, orjson.dumps({"raw": m.raw.decode("latin-1"), "resources": [
                    {"r": u.resource, "ref": u.source_ref, "co": u.create_only} for u in mapped.resources]})))
            results.append(mapped)
        spool.append(records)
        return results

    return handle


def _rejected_record(r: Rejected) -> bytes:
    return orjson.dumps({"stage": r.stage, "reason": r.reason, "message": r.message,
                         "payload": r.payload.decode("latin-1") if r.payload else None})


def listen_mllp(store: Store, host: str, port: int, *, source: str = "hl7v2", ssl_context=None,
                batch_max: int = 100, batch_wait_ms: float = 20, drain_every: float = 2.0, strict: bool = False,
                ready: threading.Event | None = None, stop: threading.Event | None = None, stats=None,
                shutdown_wait: float = 60.0, privacy=None) -> ListenStats:
    """Serve until SIGTERM/SIGINT (or `stop`); on the way out, drain what was acknowledged.

    This process receives, maps (for the ACK code), spools and acknowledges; a process of
    its own drains (DrainProcess). A drain is up to seconds of Python work over the store,
    and in a thread of this process it held the GIL while ACKs waited: with drains every
    half second, the ACK latency p99 of 8 senders rose from 4 ms to 84 ms, and the
    throughput halved (bench/RESULTS.md). This process seals the open segment every
    `drain_every` seconds; the drain process takes sealed segments only.
    """
    from .connectors.mllp import ServerStats, serve_mllp

    # What would make every drain fail is refused before the first ACK, not after thousands:
    # another key than the store's, or another privacy profile than this source's.
    if store.manifest().get("key_fingerprint"):  # else there is nothing to compare with (and no warning twice)
        store.check_key()
    store.claim_privacy(source, privacy.name if privacy else "none")
    store.meta.mkdir(parents=True, exist_ok=True)
    spool = Spool(store.meta / "spool" / _safe(source))  # refuses a second listener before anything starts
    drains = DrainProcess(store.root, spool.folder, source, strict=strict, privacy=privacy, every=drain_every,
                          shutdown_wait=shutdown_wait)
    done = threading.Event()

    def seal_loop() -> None:
        while not done.wait(drain_every):
            try:
                spool.seal()
            except OSError:  # the segment is closed, and its rename to .ready is tried next time
                log.exception("sealing the spool segment failed; it is tried again")
            drains.keep_running()

    thread = threading.Thread(target=seal_loop, name="twin-seal", daemon=True)
    thread.start()
    try:
        serve_mllp(host, port, spooling_handler(spool, strict=strict), batch_max=batch_max,
                   batch_wait_ms=batch_wait_ms, ssl_context=ssl_context, ready=ready, stop=stop,
                   stats=stats if stats is not None else ServerStats())
    finally:
        done.set()
        thread.join()
        spool.seal()
        result = drains.finish()
        left = spool.ready()
        if left:
            log.warning("%d spool segment(s) not drained (the store stayed locked, or the drain failed: see above); "
                        "the next listener drains them", len(left))
        spool.close()
    return result


class DrainProcess:
    """A listener's drains, in a process of their own (spawned: the listener has threads).

    It drains sealed segments every `every` seconds. When told to finish, it drains what
    is left, trying for up to `shutdown_wait` seconds while another process holds the
    store's lock. It ignores SIGINT and SIGTERM: a service manager or a terminal signals
    the whole process group, and it is the listener that decides when receiving has
    stopped. When the listener dies without telling it (SIGKILL), it exits after its
    current drain, and the next listener drains the rest. When it dies (the kernel's OOM
    killer, a crash in a native library), `keep_running` starts another: the listener
    would otherwise go on acknowledging into a spool nobody drains.
    """

    # Nothing with a lock is shared with the drain process: one killed while it held the lock
    # of a multiprocessing Event or Array (the OOM killer picks its moment) leaves it held
    # for good, and the listener, or the next drain process, hangs on it. So the stop comes
    # down a pipe (whose end of file also tells the drain process that the listener died),
    # and the counts go in a lock-free array that only the one living drain process writes.

    GRACE = 30.0  # seconds a last drain may take beyond shutdown_wait (one begun just before its end)

    def __init__(self, root: Path, folder: Path, source: str, *, strict: bool, privacy, every: float,
                 shutdown_wait: float):
        self._ctx = multiprocessing.get_context("spawn")
        stop_reader, self._stop = self._ctx.Pipe(duplex=False)
        self._stopping = False
        self._counts = self._ctx.RawArray("q", 3)  # ListenStats: drains, drained messages, waits for the lock
        self._wait = shutdown_wait
        self._folder = folder
        self._restarts: list[float] = []  # when drain processes were started again (monotonic)
        self._args = (str(root), str(folder), source, strict, privacy, every, shutdown_wait, stop_reader,
                      self._counts, _logging_setup())
        self._start()

    def _start(self) -> None:
        self._proc = self._ctx.Process(target=_drain_forever, name="twin-drain", daemon=True, args=self._args)
        self._proc.start()

    def keep_running(self) -> None:
        """Start a new drain process if the last one ended while the listener still receives;
        one that keeps dying is started again less and less often (at most once a minute)."""
        if self._stopping or self._proc.is_alive():
            return
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < 600]
        if self._restarts and now - self._restarts[-1] < min(60.0, 2.0 ** len(self._restarts)):
            return
        log.error("the drain process ended (exit code %s); starting another (%d restart(s) in 10 minutes)",
                  self._proc.exitcode, len(self._restarts) + 1)
        self._restarts.append(now)
        self._start()

    def finish(self) -> ListenStats:
        """Drain what is sealed and stop; the counts of every drain this process made."""
        self._stopping = True
        self._stop.send_bytes(b"stop")
        if not self._proc.is_alive():  # died since the last keep_running: one more, for what is left
            self._start()
        self._proc.join(self._wait + self.GRACE)
        if self._proc.is_alive():  # a drain that does not end: the next drain rolls its run back
            log.warning("the drain process did not end within %.0f s; killed, its run is rolled back by the next "
                        "drain", self._wait + self.GRACE)
            self._proc.kill()  # it ignores SIGTERM (see the class)
            self._proc.join(10)
            for claim in self._folder.glob("*.drain"):  # slow, not failed: not counted (Drainer._settle)
                with contextlib.suppress(OSError, ValueError, TypeError):
                    claim.write_bytes(orjson.dumps({**orjson.loads(claim.read_bytes()), "stopped": True}))
        drains, drained, waits = self._counts[:]
        return ListenStats(drained_messages=drained, drains=drains, waits_for_lock=waits)


def _logging_setup() -> tuple[int, bool] | None:
    """The level and format of this process's log (logs.install), for the drain process."""
    from .logs import JsonFormatter, RedactingFormatter

    root = logging.getLogger()
    for h in root.handlers:
        if isinstance(h.formatter, JsonFormatter | RedactingFormatter):
            return root.level, isinstance(h.formatter, JsonFormatter)
    return None


def _drain_forever(root: str, folder: str, source: str, strict: bool, privacy, every: float, shutdown_wait: float,
                   stop, counts, logging_setup: tuple[int, bool] | None) -> None:
    """The body of DrainProcess. `stop`: the reading end of the listener's pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if logging_setup is not None:
        from .logs import install

        install(logging_setup[0], json_lines=logging_setup[1])
    drainer = Drainer(Store(root), Path(folder), source, strict=strict, privacy=privacy)

    failures = 0  # drains in a row that failed (not those that found the store locked)

    def drain() -> bool:
        nonlocal failures
        st = drainer.stats
        before = (st.drains, st.drained_messages, st.waits_for_lock)
        try:
            done = drainer.drain()
            failures = 0
            return done
        except Exception:  # keep draining; the spool keeps the messages
            failures += 1
            log.exception("draining the spool failed; the messages stay in the spool and are retried")
            return False
        finally:  # added, not set: a restarted drain process counts on from its predecessor
            for i, (b, a) in enumerate(zip(before, (st.drains, st.drained_messages, st.waits_for_lock), strict=True)):
                counts[i] += a - b

    while True:
        # after a failed drain, wait longer each time (at most a minute): a spool that cannot
        # be drained (a full disk, a store refusing this source) is not retried every second
        if stop.poll(min(60.0, every * 2.0 ** failures)):
            try:
                stop.recv_bytes()
            except EOFError:  # the listener died (SIGKILL): the next one drains
                return
            break
        drain()
    deadline = time.monotonic() + shutdown_wait
    while not drain() and time.monotonic() < deadline:
        time.sleep(0.5)


def _safe(name: str) -> str:
    return safe_name(name)  # a source name is a folder name: never "..", never hidden
