"""HL7 v2 over MLLP: a server that acknowledges a message only once it is stored.

Why asyncio: an MLLP peer keeps its connection open for hours and sends one message at a
time, waiting for each ACK; hundreds of mostly idle connections are cheap as coroutines.
The handler that stores messages is blocking and must never run twice at once, so it runs
in one worker thread, fed by one batching task.

Durability contract (ARCHITECTURE.md, "An MLLP message is acknowledged only after it is
durably stored (or quarantined)"): frames from all connections are grouped into batches
(up to `batch_max` messages, or `batch_wait_ms` after the first, or at once when every
open connection already has a message in the batch, since original-mode senders wait
for their ACK before sending again), the handler stores the batch and returns one ACK
code per message, and only then is each ACK written to its connection.

- Handler returns: "AA" stored; "AE" content error, quarantined; "AR" refused (type,
  version) or not stored. It may return `MappedMessage`s instead of codes: their reason
  then goes into the ACK's ERR segment.
- Handler raises: nothing of the batch is stored, every message of it gets AR with ERR
  code 207 (application internal error). HL7 v2.5 section 2.9.2 makes AR the answer when
  the receiver "is unable to process the message for reasons unrelated to its format or
  content": the sender keeps the message and sends it again, which is what must happen;
  AE would tell it the message itself is wrong.
- Framing errors (bytes before 0x0B, a frame cut by a closed connection) reach the
  handler as an `InboundMessage` with `rejected` set, so they can be quarantined; nothing
  is acknowledged for them. A frame over the size limit is handed over the same way and
  answered AR.
- Duplicates: ids of mapped resources are deterministic, so storing a re-sent message
  again changes nothing; the handler, which knows the store, decides. The server marks
  `duplicate=True` on a message whose sender and control id it already acknowledged AA
  during this run.
- Shutdown (SIGTERM/SIGINT in the main thread, `stop` set, or `MLLPServer.stop()`): stop
  accepting, stop reading, hand the frames already received to the handler, write their
  ACKs, close. Bytes of a frame not fully received are dropped unacknowledged: the
  sender sends the message again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..hl7v2 import DEFAULT_LIMITS, HL7ParseError, Limits, build_ack, read_msh
from ..hl7v2_framing import MLLPDecoder
from ..units import Rejected, Resource

if TYPE_CHECKING:
    from ..hl7v2_maps import Mappings

log = logging.getLogger(__name__)

SB, EB, CR = b"\x0b", b"\x1c", b"\r"
_ACK_CODES = ("AA", "AE", "AR")
_LOCATION = re.compile(r"[A-Z][A-Z0-9]{2}(?:\[\d+\])?-\d+")


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One frame received, as handed to the handler."""

    raw: bytes                      # the bytes between 0x0B and 0x1C
    peer: str                       # "host:port" of the sender
    received_at: datetime           # UTC, when its last byte arrived
    connection_id: int
    sequence: int                   # n-th frame on its connection, from 1
    control_id: str | None          # MSH-10 as the server read it (None without a usable MSH)
    sender: str | None = None       # MSH-3^MSH-4 as written (with control_id: what makes a duplicate)
    duplicate: bool = False         # same sender and control id already acknowledged AA in this run
    rejected: Rejected | None = None  # a framing error: quarantine it; it is never acknowledged

    @property
    def source_ref(self) -> str:
        return f"mllp:{self.peer}#{self.connection_id}:{self.sequence}"


Handler = Callable[[list[InboundMessage]], Sequence[Any]]


@dataclass(slots=True)
class ServerStats:
    """Counters of one server run (read them live or from `serve_mllp`'s return value)."""

    address: tuple | None = None
    connections: int = 0
    open_connections: int = 0
    refused_connections: int = 0
    frames: int = 0
    framing_errors: int = 0
    batches: int = 0
    largest_batch: int = 0
    handler_errors: int = 0
    duplicates: int = 0
    acks: dict[str, int] = field(default_factory=lambda: {"AA": 0, "AE": 0, "AR": 0})
    acks_lost: int = 0              # ACKs that could not be written (the sender had gone)
    started_at: float = 0.0
    stopped_at: float = 0.0


@dataclass(slots=True)
class _Pending:
    msg: InboundMessage
    conn: _Connection | None         # None: nothing to acknowledge
    msh: Any = None
    forced: str | None = None        # an ACK code decided by the server (AR for an oversized frame)


class _Connection:
    __slots__ = ("id", "peer", "reader", "writer", "sequence", "closed", "task")

    def __init__(self, cid: int, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.id, self.peer, self.reader, self.writer = cid, peer, reader, writer
        self.sequence = 0
        self.closed = False
        self.task: asyncio.Task | None = None


def tls_context(certfile: str, keyfile: str, cafile: str | None = None, require_client_cert: bool = False
                ) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2+) from PEM files; with `cafile`, client certificates are checked."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cafile)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(certfile, keyfile)
    except OSError as e:  # a wrong path or PEM (ssl.SSLError is an OSError) is the user's to fix, not a bug
        why = getattr(e, "reason", None) or e.strerror or type(e).__name__
        raise ConfigError(f"TLS: the certificate, key or CA file cannot be used ({why})") from None
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class MLLPServer:
    """The server; `serve_mllp` runs one in the calling thread. `stop()` is safe from any thread."""

    def __init__(self, host: str, port: int, handler: Handler, *, batch_max: int = 100, batch_wait_ms: float = 20,
                 ssl_context: ssl.SSLContext | None = None, limits: Limits = DEFAULT_LIMITS,
                 max_connections: int = 256, idle_timeout_s: float | None = None, stats: ServerStats | None = None):
        if batch_max < 1 or batch_wait_ms < 0:
            raise ValueError("batch_max must be >= 1 and batch_wait_ms >= 0")
        self.host, self.port, self.handler = host, port, handler
        self.batch_max, self.batch_wait = batch_max, batch_wait_ms / 1000.0
        self.ssl_context, self.limits = ssl_context, limits
        self.max_connections, self.idle_timeout = max_connections, idle_timeout_s
        self.stats = stats if stats is not None else ServerStats()
        self._conns: dict[int, _Connection] = {}
        self._next_id = 0
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._acked: OrderedDict[tuple[str | None, str], None] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mllp-handler")

    # -- control ------------------------------------------------------------------------
    def stop(self) -> None:
        loop, ev = self._loop, self._stopping
        if loop is not None and ev is not None and not loop.is_closed():
            loop.call_soon_threadsafe(ev.set)

    async def serve(self, ready: threading.Event | None = None, stop: threading.Event | None = None) -> ServerStats:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._queue = asyncio.Queue(maxsize=max(4 * self.batch_max, 64))
        try:
            server = await asyncio.start_server(self._on_connect, self.host, self.port, ssl=self.ssl_context,
                                                limit=1 << 16)
        except OSError as e:  # port in use, address not on this machine: fix the command, not a bug
            raise ConfigError(f"cannot listen on {self.host}:{self.port} ({e.strerror or type(e).__name__})") from None
        self.stats.address = server.sockets[0].getsockname() if server.sockets else None
        self.stats.started_at = time.time()
        handlers = self._install_signals()
        batcher = asyncio.create_task(self._batcher())
        watcher = asyncio.create_task(self._watch(stop)) if stop is not None else None
        log.info("MLLP listening on %s", self.stats.address)
        if ready is not None:
            ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for conn in list(self._conns.values()):   # stop reading; frames already received stay queued
                if conn.task is not None:
                    conn.task.cancel()
            await asyncio.gather(*(c.task for c in list(self._conns.values()) if c.task), return_exceptions=True)
            await self._queue.put(None)                # the batcher drains what is queued, then ends
            await batcher
            for conn in list(self._conns.values()):
                self._close(conn)
            await server.wait_closed()
            if watcher is not None:
                watcher.cancel()
            self._remove_signals(handlers)
            self._executor.shutdown(wait=True)
            self.stats.stopped_at = time.time()
            log.info("MLLP stopped: %d frames, %d batches", self.stats.frames, self.stats.batches)
        return self.stats

    async def _watch(self, stop: threading.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(0.05)
        assert self._stopping is not None
        self._stopping.set()

    def _install_signals(self) -> list[int]:
        if threading.current_thread() is not threading.main_thread():
            return []
        done = []
        assert self._loop is not None and self._stopping is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.add_signal_handler(sig, self._stopping.set)
                done.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover - non-Unix loops
                pass
        return done

    def _remove_signals(self, sigs: list[int]) -> None:
        for sig in sigs:
            assert self._loop is not None
            self._loop.remove_signal_handler(sig)

    # -- connections --------------------------------------------------------------------
    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._stopping is not None
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        if self._stopping.is_set() or len(self._conns) >= self.max_connections:
            self.stats.refused_connections += 1
            writer.close()
            return
        self._next_id += 1
        conn = _Connection(self._next_id, peer, reader, writer)
        self._conns[conn.id] = conn
        self.stats.connections += 1
        self.stats.open_connections += 1
        conn.task = asyncio.current_task()
        try:
            await self._read(conn)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, ssl.SSLError, OSError) as e:
            log.info("MLLP connection %d from %s ended: %s", conn.id, peer, type(e).__name__)
        finally:
            conn.task = None
            if not self._stopping.is_set():
                self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if not conn.closed:
            conn.closed = True
            self.stats.open_connections -= 1
            self._conns.pop(conn.id, None)
            with contextlib.suppress(Exception):  # closing a broken transport
                conn.writer.close()

    async def _read(self, conn: _Connection) -> None:
        decoder = MLLPDecoder(self.limits.max_message_bytes)
        while True:
            if self.idle_timeout:
                try:
                    data = await asyncio.wait_for(conn.reader.read(1 << 16), self.idle_timeout)
                except TimeoutError:
                    log.info("MLLP connection %d idle for %ss: closed", conn.id, self.idle_timeout)
                    break
            else:
                data = await conn.reader.read(1 << 16)
            if not data:
                break
            for event in decoder.feed(data):
                await self._on_event(conn, event)
        for event in decoder.close():
            await self._on_event(conn, event, at_eof=True)

    async def _on_event(self, conn: _Connection, event: tuple[str, bytes, int], at_eof: bool = False) -> None:
        kind, data, offset = event
        assert self._queue is not None
        conn.sequence += 1
        now = datetime.now(UTC)
        if kind == "frame":
            self.stats.frames += 1
            msh, control_id, sender = _peek_msh(data)
            dup = control_id is not None and (sender, control_id) in self._acked
            if dup:
                self.stats.duplicates += 1
            msg = InboundMessage(data, conn.peer, now, conn.id, conn.sequence, control_id, sender, dup)
            await self._queue.put(_Pending(msg, conn, msh))
            return
        self.stats.framing_errors += 1
        ref = f"mllp:{conn.peer}#{conn.id}:{conn.sequence}"
        if kind == "junk":
            rej = Rejected("read", "junk-before-frame", f"{len(data)} bytes outside any MLLP frame at byte {offset} "
                           "of the connection", ref, data[: self.limits.max_payload_bytes])
            await self._queue.put(_Pending(InboundMessage(data, conn.peer, now, conn.id, conn.sequence, None,
                                                          rejected=rej), None))
        elif kind == "truncated":
            rej = Rejected("read", "truncated-frame", f"the connection closed in the middle of a frame (byte {offset}):"
                           " the message is incomplete and was not acknowledged", ref,
                           data[: self.limits.max_payload_bytes])
            await self._queue.put(_Pending(InboundMessage(data, conn.peer, now, conn.id, conn.sequence, None,
                                                          rejected=rej), None))
        else:  # too-large: the frame ended, answer it
            msh, control_id, sender = _peek_msh(data)
            rej = Rejected("read", "message-too-large", f"the frame is larger than {self.limits.max_message_bytes} "
                           "bytes", ref, None, f"{ref}:bytes {offset}-")
            await self._queue.put(_Pending(InboundMessage(data[:4096], conn.peer, now, conn.id, conn.sequence,
                                                          control_id, sender, rejected=rej), conn, msh, "AR"))

    # -- batching -----------------------------------------------------------------------
    async def _batcher(self) -> None:
        """Cut the queue into batches. One pending `get` is kept across waits (never cancelled,
        so no frame can be lost between a timeout and a get)."""
        assert self._queue is not None and self._loop is not None
        queue, loop = self._queue, self._loop
        getter: asyncio.Future | None = None
        ending = False
        while not ending:
            if getter is None:
                getter = asyncio.ensure_future(queue.get())
            first = await getter
            getter = None
            if first is None:
                break
            batch = [first]
            deadline = loop.time() + self.batch_wait
            while len(batch) < self.batch_max:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self._everyone_waiting(batch):
                        break
                    getter = asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait({getter}, timeout=remaining)
                    if not done:
                        break
                    item, getter = getter.result(), None
                if item is None:
                    ending = True
                    break
                batch.append(item)
            await self._process(batch)
        rest = []
        if getter is not None:
            if not getter.done():
                await queue.put(None)  # wake the pending get so that it can be collected
            item = await getter
            if item is not None:
                rest.append(item)
        while not queue.empty():  # frames received before the stop: handle and acknowledge them too
            item = queue.get_nowait()
            if item is not None:
                rest.append(item)
            if len(rest) >= self.batch_max:
                await self._process(rest)
                rest = []
        if rest:
            await self._process(rest)

    def _everyone_waiting(self, batch: list[_Pending]) -> bool:
        """True when every open connection has a message in the batch: waiting longer gains nothing."""
        waiting = {p.conn.id for p in batch if p.conn is not None}
        return len(waiting) >= len(self._conns) > 0

    async def _process(self, batch: list[_Pending]) -> None:
        assert self._loop is not None
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        msgs = [p.msg for p in batch]
        try:
            results = await self._loop.run_in_executor(self._executor, self.handler, msgs)
            results = list(results)
            if len(results) != len(batch):
                raise ValueError(f"the handler returned {len(results)} results for {len(batch)} messages")
            codes = [_code_of(r) for r in results]
        except Exception as e:  # noqa: BLE001 - any handler failure means "not stored"
            self.stats.handler_errors += 1
            log.error("MLLP handler failed on a batch of %d (%s): answering AR, senders will resend",
                      len(batch), type(e).__name__)
            results = [None] * len(batch)
            codes = ["AR"] * len(batch)
            failed = True
        else:
            failed = False
        writers = {}
        for p, code, result in zip(batch, codes, results, strict=True):
            conn = p.conn
            if conn is None:
                continue
            code = p.forced or code
            reason, text, where = _error_of(result, p, failed)
            ack = build_ack(p.msh, code, reason=reason, text=text, location=where)
            self.stats.acks[code] += 1
            if code == "AA" and p.msg.control_id is not None and not failed:
                self._remember((p.msg.sender, p.msg.control_id))
            if conn.closed or conn.writer.is_closing():
                self.stats.acks_lost += 1
                continue
            conn.writer.write(SB + ack + EB + CR)
            writers[conn.id] = conn
        if writers:
            done = await asyncio.gather(*(c.writer.drain() for c in writers.values()), return_exceptions=True)
            self.stats.acks_lost += sum(1 for d in done if isinstance(d, Exception))

    def _remember(self, key: tuple[str | None, str]) -> None:
        acked = self._acked
        acked[key] = None
        if len(acked) > 100_000:
            acked.popitem(last=False)


def _peek_msh(data: bytes) -> tuple[Any, str | None, str | None]:
    try:
        msh = read_msh(data)
    except HL7ParseError:
        return None, None, None
    fields = msh[1]
    control = fields[10].decode("latin-1").strip() if len(fields) > 10 else ""
    sender = b"^".join(fields[3:5]).decode("latin-1") if len(fields) > 4 else None
    return msh, (control or None), sender


def _code_of(result: Any) -> str:
    code = getattr(result, "ack_code", result)
    if code not in _ACK_CODES:
        raise ValueError("the handler returned something other than AA, AE or AR")
    return code


def _error_of(result: Any, p: _Pending, failed: bool) -> tuple[str | None, str | None, str | None]:
    if failed:
        return "internal-error", "the message could not be stored; send it again", None
    rej = getattr(result, "rejected", None) or p.msg.rejected
    if rej is None:
        return None, None, None
    m = _LOCATION.search(rej.message or "")
    return rej.reason, rej.message, m.group(0) if m else None


def mapping_handler(commit: Callable[[list[Resource], list[Rejected]], None], *, strict: bool = False,
                    mappings: Mappings | None = None) -> Handler:
    """A handler that maps each message of a batch and commits the batch once.

    `commit(resources, rejected)` must store both durably (the resources, and the
    quarantine entries: framing errors and refused messages) before it returns, or raise.
    The ACK of each message follows from its mapping: AA mapped, AE refused for its
    content (it is in quarantine), AR refused for its type or version, or not parsable.
    """
    from ..hl7v2_fhir import map_message
    from ..hl7v2_maps import default_mappings

    def handle(batch: list[InboundMessage]) -> list[Any]:
        resources: list[Resource] = []
        rejected: list[Rejected] = []
        results: list[Any] = []
        maps = mappings if mappings is not None else default_mappings()  # once a batch: it reads the environment
        for m in batch:
            if m.rejected is not None:       # a framing error: quarantined, never acknowledged
                rejected.append(m.rejected)
                results.append("AE")
                continue
            mapped = map_message(m.raw, m.source_ref, strict=strict, mappings=maps)
            if mapped.rejected is not None:
                rejected.append(mapped.rejected)
            resources.extend(mapped.resources)
            results.append(mapped)
        commit(resources, rejected)
        return results

    return handle


def serve_mllp(host: str, port: int, handler: Handler, *, batch_max: int = 100, batch_wait_ms: float = 20,
               ssl_context: ssl.SSLContext | None = None, ready: threading.Event | None = None,
               stop: threading.Event | None = None, limits: Limits = DEFAULT_LIMITS, max_connections: int = 256,
               idle_timeout_s: float | None = None, stats: ServerStats | None = None) -> ServerStats:
    """Run an MLLP server until SIGTERM/SIGINT (main thread) or `stop` is set; return its counters.

    `ready` is set once the socket listens (its address is then in `stats.address`: pass
    your own `stats` to read it, e.g. with port 0). The handler is called from one worker
    thread, never concurrently, with batches of up to `batch_max` messages.
    """
    server = MLLPServer(host, port, handler, batch_max=batch_max, batch_wait_ms=batch_wait_ms,
                        ssl_context=ssl_context, limits=limits, max_connections=max_connections,
                        idle_timeout_s=idle_timeout_s, stats=stats)
    return asyncio.run(server.serve(ready, stop))


__all__ = ["InboundMessage", "MLLPServer", "ServerStats", "mapping_handler", "serve_mllp", "tls_context"]
