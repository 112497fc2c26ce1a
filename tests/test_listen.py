"""`twin listen mllp` on real TCP sockets: ACK after durable storage, the store's lock, kill safety."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import keys, listen
from pipeline.connectors.mllp import ServerStats
from pipeline.listen import Drainer, DrainProcess, Spool, listen_mllp, spool_backlog
from pipeline.privacy import PrivacyHooks
from pipeline.status import store_status
from pipeline.store import Store
from tests.conftest import FIXTURES, REPO

hl7_client = pytest.importorskip("hl7.client")

pytestmark = pytest.mark.server


def messages() -> list[bytes]:
    """The ORU and ADT fixture messages, one per file (CR segment ends)."""
    out = []
    for f in sorted((FIXTURES / "hl7v2").glob("*.hl7")):
        text = f.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
        if text.startswith(b"MSH") and text.count(b"MSH|") == 1:
            out.append(text.rstrip(b"\r") + b"\r")
    assert len(out) >= 3
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send(port: int, msgs: list[bytes]) -> list[bytes]:
    acks = []
    with hl7_client.MLLPClient("127.0.0.1", port) as c:
        for m in msgs:
            acks.append(c.send_message(m))
    return acks


def test_acks_then_rows_in_the_store(tmp_path, monkeypatch):
    # the drains run in a process of their own, never in the one that acknowledges (a drain
    # in a thread of it held the GIL while ACKs waited): here, draining would fail
    from pipeline import listen

    def not_here(self):
        raise AssertionError("drained in the listener's process")

    monkeypatch.setattr(listen.Drainer, "drain", not_here)
    store = Store(tmp_path / "s")
    stop, ready, stats = threading.Event(), threading.Event(), ServerStats()
    port = free_port()
    t = threading.Thread(target=listen_mllp, args=(store, "127.0.0.1", port),
                         kwargs={"ready": ready, "stop": stop, "stats": stats, "drain_every": 0.2}, daemon=True)
    t.start()
    assert ready.wait(10)
    msgs = messages()
    acks = send(port, msgs)
    assert all(b"MSA|A" in a for a in acks)
    codes = [a.split(b"MSA|")[1][:2] for a in acks]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (store.exists("patient") or store.exists("quarantine")):
        time.sleep(0.2)
    stop.set()
    t.join(30)
    runs = store.read("runs").to_pylist()
    assert runs and all(r["command"] == "listen" for r in runs)
    assert sum(r["units_read"] for r in runs) >= codes.count(b"AA")
    assert not list((store.meta / "spool").rglob("*.ready")), "a committed segment was left in the spool"


def _listener(store: Path, port: int) -> subprocess.Popen:
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from pipeline.cli import console_main; "
            f"sys.argv = ['twin', 'listen', 'mllp', '--port', '{port}', '--store', {str(store)!r}, '--drain-every', '0.2']; "
            "console_main()")
    return subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, TWIN_NO_PROGRESS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _children(pid: int) -> list[int]:
    """The live processes `pid` spawned with multiprocessing (its drain process; not the
    resource tracker)."""
    out = []
    for child in psutil.Process(pid).children():
        try:
            if _alive(child.pid) and any("multiprocessing.spawn" in a for a in child.cmdline()):
                out.append(child.pid)
        except psutil.NoSuchProcess:  # gone meanwhile
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a zombie has exited
    except psutil.NoSuchProcess:
        return False


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError("the listener did not start")


def test_acked_messages_survive_a_store_lock_and_a_kill(tmp_path):
    store_dir = tmp_path / "s"
    port = free_port()
    # a nightly job holds the store's lock: the listener still acknowledges (the spool is durable) ...
    holder = subprocess.Popen([sys.executable, "-c", (
        f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from pipeline.store import Store\n"
        f"with Store({str(store_dir)!r}).locked('nightly'):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    listener = _listener(store_dir, port)
    try:
        _wait_port(port)
        acks = send(port, messages())
        assert all(b"MSA|" in a for a in acks)
        time.sleep(0.5)
        assert not Store(store_dir).exists("patient")   # nothing could be written yet
        drainer = _children(listener.pid)
        os.kill(listener.pid, signal.SIGKILL)           # ... and the listener dies
        listener.wait()
        # its drain process does not outlive it (the next listener drains)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in drainer):
            time.sleep(0.1)
        assert drainer and not any(_alive(p) for p in drainer), "the drain process outlived its listener"
    finally:
        holder.kill()
        holder.wait()
    assert list((store_dir / "_twin" / "spool").rglob("*.open")) or list((store_dir / "_twin" / "spool").rglob("*.ready"))
    # `twin status` says how many acknowledged messages wait, and since when, though no table exists yet
    status = store_status(Store(store_dir))
    assert re.search(rf"listener spool hl7v2: {len(messages())} message\(s\) received and not in the tables yet, "
                     r"in \d segment\(s\), the oldest received \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(\d+ s ago\)", status), status
    # the next listener drains what the dead one acknowledged, then stops cleanly on SIGTERM
    listener = _listener(store_dir, port)
    _wait_port(port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not Store(store_dir).exists("patient"):
        time.sleep(0.2)
    listener.send_signal(signal.SIGTERM)
    out, err = listener.communicate(timeout=60)
    assert listener.returncode == 0, err.decode()[-500:]
    assert Store(store_dir).count("patient") >= 1
    assert b"stored" in out
    assert "listener spool" not in store_status(Store(store_dir))  # drained: nothing waits


def test_a_port_in_use_or_an_unreadable_certificate_is_a_usage_error(tmp_path, capsys):
    """Both are the operator's to fix: exit 2 and what is wrong, not 'internal error, please report it'."""
    from pipeline.cli import main as twin

    store = str(tmp_path / "store")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert twin(["listen", "mllp", "--port", str(port), "--store", store]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    missing = str(tmp_path / "missing.pem")
    assert twin(["listen", "mllp", "--port", str(free_port()), "--store", store,
                 "--tls-cert", missing, "--tls-key", missing]) == 2
    assert "TLS: the certificate, key or CA file cannot be used" in capsys.readouterr().err


def test_a_second_listener_for_the_same_source_is_refused_and_the_first_keeps_its_spool(tmp_path, capsys):
    """Two listeners on one spool would drain each other's open segment while it still
    receives acknowledged messages. The second is refused; another --source is fine."""
    from pipeline.cli import main as twin

    store = Store(tmp_path / "s")
    stop, ready = threading.Event(), threading.Event()
    port = free_port()
    t = threading.Thread(target=listen_mllp, args=(store, "127.0.0.1", port),
                         kwargs={"ready": ready, "stop": stop, "drain_every": 0.2}, daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        send(port, messages()[:1])  # the first listener's open segment now exists
        args = ["listen", "mllp", "--port", str(free_port()), "--store", str(tmp_path / "s")]
        assert twin(args) == 2
        assert "another listener already receives for source 'hl7v2'" in capsys.readouterr().err
        assert list((store.meta / "spool" / "hl7v2").glob("*.open")), "the first listener's segment was taken"
    finally:
        stop.set()
        t.join(30)
    from pipeline.listen import Spool

    Spool(store.meta / "spool" / "hl7v2").close()  # released when the first stopped


def test_a_spool_backlog_counts_whole_records_only(tmp_path):
    """What `twin status` reports is what the next drain will read: a record cut by a crash
    (its fsync never returned, so it was never acknowledged) is not counted."""
    from pipeline.listen import Spool, spool_backlog

    store = Store(tmp_path / "s")
    spool = Spool(store.meta / "spool" / "feed")
    spool.append([(b"M", f"msg {i}", b"MSH|^~\\&|x" * (i + 1)) for i in range(3)])
    spool.seal()
    spool.append([(b"M", "msg 3", b"MSH|^~\\&|y")])
    spool.close()
    first, second = spool.ready()
    with open(second, "r+b") as f:  # the last record of the newest segment cut in the middle
        f.truncate(f.seek(0, 2) - 3)
    assert [Spool.count(p) for p in (first, second)] == [3, 0] == [len(list(Spool.read(p))) for p in (first, second)]
    (b,) = spool_backlog(store)
    assert (b.source, b.messages, b.segments) == ("feed", 3, 1)
    assert b.oldest is not None and abs((b.oldest - datetime.now(UTC)).total_seconds()) < 60


def _spooled(folder: Path, records: list[tuple[bytes, str, bytes]]) -> Path:
    spool = Spool(folder)
    spool.append(records)
    spool.close()
    (seg,) = spool.ready()
    return seg


def test_damaged_bytes_in_a_segment_are_quarantined_and_the_records_behind_them_drained(tmp_path):
    """A bit flipped on disk (caught by the checksum) and a length overwritten (caught by the
    sync bytes of the next record): each damaged record goes to the quarantine as its bytes,
    every other message is drained, and the counts reconcile."""
    store = Store(tmp_path / "s")
    msgs = messages()
    assert len(msgs) >= 4
    seg = _spooled(store.meta / "spool" / "hl7v2", [(b"M", f"test#{i}", m) for i, m in enumerate(msgs)])
    frames = list(listen._frames(seg.read_bytes()))
    assert [f[0] for f in frames] == [b"M"] * len(msgs)
    data = bytearray(seg.read_bytes())
    flip = frames[1][3] + 5                                # a byte of message 1
    data[flip] ^= 0x20
    data[frames[3][1] + 3:frames[3][1] + 7] = b"\x7f\xff\xff\xff"  # message 3's source_ref length
    seg.write_bytes(bytes(data))
    damaged = [bytes(data[f[1]:f[4]]) for f in (frames[1], frames[3])]

    assert [k for k, _, _ in Spool.read(seg)] == [b"M", listen.DAMAGED, b"M", listen.DAMAGED, *[b"M"] * (len(msgs) - 4)]
    assert Spool.count(seg) == len(msgs)  # what `twin status` shows: one unit per damaged record too
    assert Drainer(store, seg.parent, "hl7v2").drain()

    store = Store(store.root)
    q = store.read("quarantine").to_pylist()
    assert [(e["reason"], e["stage"], e["payload"]) for e in q] == [("spool-damaged", "drain", d) for d in damaged]
    assert q[0]["source_ref"] == f"{seg.name} bytes {frames[1][1]}-{frames[1][4]}"
    assert [p.name for p in (seg.parent / "damaged").iterdir()] == [seg.name]
    assert "1 segment(s) with bytes damaged on disk" in store_status(store)
    (run,) = store.read("runs").to_pylist()
    kept = [listen.map_message(m, "x") for i, m in enumerate(msgs) if i not in (1, 3)]
    assert run["units_read"] == 2 + sum(1 if k.rejected else len(k.resources) for k in kept)
    assert run["units_read"] == run["units_written"] + run["units_ignored"] + run["units_quarantined"]
    assert run["units_quarantined"] == 2 + sum(1 for k in kept if k.rejected)
    assert not list(seg.parent.glob("*.ready"))
    from pipeline.quarantine import retry
    retry(store, reason="spool-damaged")  # not a message as received: the entries stay open
    assert [e["status"] for e in Store(store.root).read("quarantine", latest=True).to_pylist()] == ["open", "open"]


def test_a_segment_whose_header_is_damaged_is_still_read(tmp_path):
    records = [(b"M", f"m{i}", b"MSH|^~\\&|" + bytes([65 + i]) * 40) for i in range(3)]
    seg = _spooled(tmp_path / "spool", records)
    data = seg.read_bytes()
    for damage in (b"X", b"XXXXXXXX"):  # one byte, then the whole header but its end
        seg.write_bytes(damage + data[len(damage):])
        got = list(Spool.read(seg))
        assert [r for r in got if r[0] != listen.DAMAGED] == records


def test_segments_written_before_checksums_are_read_as_they_were(tmp_path):
    """A listener upgraded with a backlog in its spool: the old layout (kind, two lengths,
    source_ref, data; no header) drains."""
    records = [(b"M", "a", b"MSH|1"), (b"F", "b", b'{"x": 1}'), (b"R", "\u00e9", b"")]
    old = b"".join(k + len(r.encode()).to_bytes(4, "big") + len(d).to_bytes(4, "big") + r.encode() + d
                   for k, r, d in records)
    seg = tmp_path / "00000000000000000001-1.ready"
    seg.write_bytes(old + old[:7])  # and a last record cut by a crash
    assert list(Spool.read(seg)) == records and Spool.count(seg) == 3


@settings(max_examples=300, deadline=None)
@given(payloads=st.lists(st.binary(max_size=60).map(lambda b: b + listen._SYNC + b[:3]), min_size=1, max_size=6),
       cut=st.integers(0, 10_000), at=st.integers(0, 10_000), junk=st.binary(min_size=1, max_size=24))
def test_damage_anywhere_loses_only_the_records_it_touches(tmp_path_factory, payloads, cut, at, junk):
    """Bytes overwritten anywhere in a segment, which may also be cut short: every record the
    damage does not touch is read as written, the damaged ones come back as DAMAGED bytes
    (never as records with other contents), and the frames cover the segment without gaps."""
    folder = tmp_path_factory.mktemp("spool")
    records = [(b"M", f"r{i}", p) for i, p in enumerate(payloads)]
    seg = _spooled(folder, records)
    data = seg.read_bytes()
    frames = list(listen._frames(data))
    size = len(listen._HEADER) + cut % (len(data) - len(listen._HEADER) + 1)  # cut, or not (cut at the end)
    at = at % size
    damaged = bytearray(data[:size])
    damaged[at:at + len(junk)] = junk[:size - at]
    seg.write_bytes(bytes(damaged))
    got = list(listen._frames(bytes(damaged)))
    touched = {i for i, f in enumerate(frames) if f[1] < at + len(junk) and at < f[4]}
    whole = [i for i, f in enumerate(frames) if f[4] <= size and i not in touched]
    read = {r: (k, d) for k, r, d in Spool.read(seg) if k != listen.DAMAGED}
    assert all(read.get(records[i][1]) == (records[i][0], records[i][2]) for i in whole)
    assert all(read[r] == next((k, d) for k, rr, d in records if rr == r) for r in read)
    if got:  # contiguous: each frame starts where the last ended
        assert all(a[4] == b[1] for a, b in zip(got, got[1:], strict=False))
    assert Spool.count(seg) == len(list(Spool.read(seg))) >= len(whole)


def test_a_failed_spool_write_is_cut_off_and_what_follows_is_kept(tmp_path):
    """A full disk in the middle of a batch: the batch is refused (AR), and the next batches,
    acknowledged, must not follow its torn bytes, which the reader would take for damage."""
    spool = Spool(tmp_path / "spool")
    spool.append([(b"M", "a", b"x" * 100)])
    (seg,) = spool.folder.glob("*.open")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (seg.stat().st_size + 50, hard))  # room for part of the next
    try:
        with pytest.raises(OSError):
            spool.append([(b"M", "b", b"y" * 1000)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    spool.append([(b"M", "c", b"z" * 10), (b"M", "d", b"w")])
    spool.close()
    assert [ref for seg in spool.ready() for _, ref, _ in Spool.read(seg)] == ["a", "c", "d"]


def test_a_seal_whose_rename_fails_is_tried_again_and_the_next_batch_is_kept(tmp_path, monkeypatch):
    """A rename refused once (an I/O error): the next batch goes to a new segment, and the
    next seal renames both, instead of writing into a segment already closed."""
    spool = Spool(tmp_path / "spool")
    spool.append([(b"M", "a", b"x")])
    real, refused = Path.rename, []

    def rename_once_refused(self, target):
        if not refused:
            refused.append(self)
            raise OSError("refused")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename_once_refused)
    with pytest.raises(OSError):
        spool.seal()
    spool.append([(b"M", "b", b"y")])
    spool.seal()
    spool.close()
    assert refused and [ref for seg in spool.ready() for _, ref, _ in Spool.read(seg)] == ["a", "b"]


def test_a_drain_killed_after_its_commit_leaves_its_segments_to_be_removed_not_stored_again(tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    spool = Spool(store.meta / "spool" / "hl7v2")
    msgs = messages()
    spool.append([(b"M", f"test#{i}", m) for i, m in enumerate(msgs)])
    spool.close()
    real = listen.finish_run

    def killed_after_the_commit(store, run):
        real(store, run)
        raise SystemExit("killed")

    monkeypatch.setattr(listen, "finish_run", killed_after_the_commit)
    with pytest.raises(SystemExit):
        Drainer(store, spool.folder, "hl7v2").drain()
    assert spool.ready() and list(spool.folder.glob("*.drain"))
    monkeypatch.setattr(listen, "finish_run", real)
    assert Drainer(Store(store.root), spool.folder, "hl7v2").drain()
    runs = Store(store.root).read("runs").to_pylist()
    mapped = [listen.map_message(m, "x") for m in msgs]
    assert len(runs) == 1  # the second drain stored nothing again
    assert runs[0]["units_read"] == sum(1 if r.rejected else len(r.resources) for r in mapped)
    assert not list(spool.folder.glob("[!.]*"))


def test_a_drain_killed_before_its_commit_is_drained_again(tmp_path, monkeypatch):
    store = Store(tmp_path / "s")
    spool = Spool(store.meta / "spool" / "hl7v2")
    spool.append([(b"M", f"test#{i}", m) for i, m in enumerate(messages())])
    spool.close()

    def killed_before_the_commit(store, run):
        raise SystemExit("killed")

    monkeypatch.setattr(listen, "finish_run", killed_before_the_commit)
    with pytest.raises(SystemExit):
        Drainer(store, spool.folder, "hl7v2").drain()
    monkeypatch.undo()
    assert Drainer(Store(store.root), spool.folder, "hl7v2").drain()
    assert Store(store.root).read("runs").num_rows == 1 and Store(store.root).exists("patient")
    assert not list(spool.folder.glob("[!.]*"))


def test_a_segment_that_fails_every_drain_is_set_aside_and_the_others_drain(tmp_path, monkeypatch):
    """A message meeting a bug in the drain would otherwise hold back every later segment
    while the listener goes on acknowledging: the drainer finds the segment, quarantines its
    messages as received, and drains the rest."""
    store = Store(tmp_path / "s")
    spool = Spool(store.meta / "spool" / "hl7v2")
    msgs = messages()
    poison = msgs[2]
    for i, m in enumerate(msgs):  # a segment per message
        spool.append([(b"M", f"test#{i}", m)])
        spool.seal()
    spool.close()
    real = listen.map_message

    def buggy(data, ref, **options):
        if data == poison:
            raise ValueError("a bug this message meets")
        return real(data, ref, **options)

    monkeypatch.setattr(listen, "map_message", buggy)
    drainer = Drainer(store, spool.folder, "hl7v2")
    failures = 0
    for _ in range(20):
        try:
            drainer.drain()
        except ValueError:
            failures += 1
        if not spool.ready():
            break
    assert not spool.ready() and failures == Drainer.SET_ASIDE_AFTER  # the whole batch once, then it alone
    store = Store(store.root)
    (q,) = store.read("quarantine").to_pylist()
    assert (q["reason"], q["stage"], q["source_ref"], q["payload"]) == ("drain-failed", "drain", "test#2", poison)
    assert "ValueError" in q["message"] and "a bug" not in q["message"]
    assert [p.name for p in (spool.folder / "set-aside").iterdir()] and not list(spool.folder.glob("*.drain"))
    assert ("1 segment(s) set aside after failed drains; their messages are in the quarantine"
            in store_status(store)) and "not in the tables yet" not in store_status(store)
    runs = store.read("runs").to_pylist()
    assert sum(r["units_quarantined"] for r in runs) == 1
    others = [real(m, "x") for i, m in enumerate(msgs) if i != 2]
    assert sum(r["units_read"] for r in runs) == 1 + sum(1 if o.rejected else len(o.resources) for o in others)
    monkeypatch.setattr(listen, "map_message", real)  # fixed: the entry replays
    from pipeline.quarantine import retry
    assert retry(store, reason="drain-failed").counts["hl7v2"].quarantined == 0


def test_a_segment_that_crashes_the_drain_process_is_set_aside_too(tmp_path, monkeypatch):
    """A crash in native code kills the drain process, and the next one knows nothing of
    the last: the failures are counted from the claims the dead ones left."""
    store = Store(tmp_path / "s")
    spool = Spool(store.meta / "spool" / "hl7v2")
    msgs = messages()
    for i, m in enumerate(msgs):
        spool.append([(b"M", f"test#{i}", m)])
        spool.seal()
    spool.close()
    real = listen.map_message

    def crashing(data, ref, **options):
        if data == msgs[4]:
            raise SystemExit("the process dies here")  # not an Exception: nothing in the drainer counts it
        return real(data, ref, **options)

    monkeypatch.setattr(listen, "map_message", crashing)
    crashes = 0
    for _ in range(20):
        try:
            Drainer(Store(store.root), spool.folder, "hl7v2").drain()  # a new drain process each time
        except SystemExit:
            crashes += 1
        if not spool.ready():
            break
    assert not spool.ready() and crashes == Drainer.SET_ASIDE_AFTER
    (q,) = Store(store.root).read("quarantine").to_pylist()
    assert (q["reason"], q["source_ref"], q["payload"]) == ("drain-failed", "test#4", msgs[4])
    assert "SystemExit" in q["message"]
    assert Store(store.root).read("patient").num_rows


def test_segments_drain_in_the_order_received_when_the_clock_steps_back(tmp_path, monkeypatch):
    """An NTP correction between two segments: the later A08 must still be drained last."""
    clock = iter([5_000_000_000, 2_000_000_000, 1_000_000_000])
    monkeypatch.setattr(listen.time, "time_ns", lambda: next(clock))
    spool = Spool(tmp_path / "spool")
    for ref in ("first", "second"):
        spool.append([(b"M", ref, b"")])
        spool.seal()
    spool.close()
    spool = Spool(tmp_path / "spool")  # a restarted listener goes on after the segments left
    spool.append([(b"M", "third", b"")])
    spool.close()
    assert [ref for seg in spool.ready() for _, ref, _ in Spool.read(seg)] == ["first", "second", "third"]


def test_a_listener_under_deid_drains_through_its_profile(tmp_path, monkeypatch):
    """The privacy hooks cross into the drain process (pickled): what reaches the tables
    is de-identified there, as `twin import --deid` would store it."""
    from pipeline.privacy import privacy_hooks

    monkeypatch.setenv("TWIN_KEY", "listener-test-key-0123456789abcdef")
    keys.secret_key.cache_clear()
    try:
        store = Store(tmp_path / "s")
        stop, ready = threading.Event(), threading.Event()
        port = free_port()
        t = threading.Thread(target=listen_mllp, args=(store, "127.0.0.1", port), daemon=True,
                             kwargs={"ready": ready, "stop": stop, "drain_every": 0.2,
                                     "privacy": privacy_hooks("deid", source="hl7v2")})
        t.start()
        assert ready.wait(10)
        assert all(b"MSA|A" in a for a in send(port, messages()))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not store.exists("patient_identifier"):
            time.sleep(0.2)
        stop.set()
        t.join(60)
        ids = store.read("patient_identifier", ["value"]).column("value").to_pylist()
        assert ids and all(len(v) == 32 and set(v) <= set("0123456789abcdef") for v in ids), ids
        patients = store.read("patient", ["name_family"])
        assert patients.num_rows and patients.column("name_family").null_count == patients.num_rows
        assert Store(store.root).privacy_profiles()["hl7v2"].startswith("deid")  # committed by the drain's run
    finally:
        keys.secret_key.cache_clear()


def test_a_drain_process_that_dies_is_started_again(tmp_path):
    """Killed by the OOM killer, say: the listener goes on acknowledging, so without a new
    drain process the spool would grow and the tables never see those messages."""
    store = Store(tmp_path / "s")
    stop, ready = threading.Event(), threading.Event()
    port = free_port()
    result: list = []
    others = set(_children(os.getpid()))  # none, unless an earlier test left one behind

    def ours() -> list[int]:
        return [p for p in _children(os.getpid()) if p not in others]

    t = threading.Thread(target=lambda: result.append(listen_mllp(store, "127.0.0.1", port, ready=ready, stop=stop,
                                                                  drain_every=0.2)), daemon=True)
    t.start()
    assert ready.wait(10)
    first = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not first:
        first = ours()
        time.sleep(0.1)
    assert len(first) == 1, first
    msgs = messages()

    def runs() -> int:
        return Store(store.root).read("runs").num_rows if store.exists("runs") else 0

    # killed idle, between drains, where it waits for the listener's word to stop: a drain
    # process killed in a multiprocessing Event's wait left that Event's lock held, and the
    # listener hung for good when it set it on its way out
    assert all(b"MSA|A" in a for a in send(port, msgs[:3]))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not runs():
        time.sleep(0.2)
    assert runs() == 1
    time.sleep(0.5)
    os.kill(first[0], signal.SIGKILL)
    assert all(b"MSA|A" in a for a in send(port, msgs[3:]))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and runs() < 2:
        time.sleep(0.2)
    assert runs() == 2, "nothing drained after the drain process was killed"
    second = ours()
    assert second and second != first
    stop.set()
    t.join(60)
    assert not t.is_alive(), "the listener did not stop"
    assert result[0].drained_messages == len(msgs)


def test_a_listener_whose_drains_would_be_refused_stops_before_it_acknowledges(tmp_path, monkeypatch):
    """Source hl7v2 of this store was written without a privacy profile: a listener under
    --deid could never drain, and would acknowledge into its spool for as long as it ran."""
    from pipeline.errors import ConfigError
    from pipeline.imports import run_import
    from pipeline.privacy import privacy_hooks

    monkeypatch.setenv("TWIN_KEY", "listener-test-key-0123456789abcdef")
    keys.secret_key.cache_clear()
    try:
        store = Store(tmp_path / "s")
        assert run_import(store, "hl7v2", [str(FIXTURES / "hl7v2" / "twin-adt-a01.hl7")]).counts["hl7v2"].written
        ready = threading.Event()
        with pytest.raises(ConfigError, match="privacy profile none"):
            listen_mllp(store, "127.0.0.1", free_port(), ready=ready, privacy=privacy_hooks("deid", source="hl7v2"))
        assert not ready.is_set()
        monkeypatch.setenv("TWIN_KEY", "another-key-0123456789abcdef0123456789")  # a rotated key file, say
        keys.secret_key.cache_clear()
        with pytest.raises(ConfigError, match="another key"):
            listen_mllp(Store(store.root), "127.0.0.1", free_port(), ready=ready)
        assert not ready.is_set() and not (store.meta / "spool").exists()
    finally:
        keys.secret_key.cache_clear()


def test_a_drain_process_that_keeps_dying_is_started_again_less_and_less_often(monkeypatch):
    """One that dies at every start (a store it cannot open, a broken install) is not
    started again every time the listener seals: after 2, 4, 8 ... seconds, at most once a minute."""
    import types

    class Dead:
        exitcode = 1

        def is_alive(self) -> bool:
            return False

    started: list[float] = []
    now = [1000.0]
    monkeypatch.setattr(listen, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(DrainProcess, "_start", lambda self: (started.append(now[0]), setattr(self, "_proc", Dead())))
    drains = DrainProcess(Path("store"), Path("spool"), "hl7v2", strict=False, privacy=None, every=0.5,
                          shutdown_wait=1.0)
    for _ in range(600):  # the listener's seal loop, every 0.5 s for 5 minutes
        drains.keep_running()
        now[0] += 0.5
    gaps = [b - a for a, b in zip(started[1:], started[2:], strict=False)]
    assert gaps[:5] == [2, 4, 8, 16, 32] and all(g == 60 for g in gaps[5:]), gaps


class SlowHooks(PrivacyHooks):
    """Privacy hooks whose first resource takes `seconds`: a drain that does not end in time."""

    def __init__(self, seconds: float):
        super().__init__("pseudonymise", "hl7v2")
        self.seconds = seconds

    def resource(self, unit, twin_of=None):
        time.sleep(self.seconds)
        self.seconds = 0
        return super().resource(unit, twin_of)


def test_a_drain_that_does_not_end_is_killed_at_shutdown_and_its_segments_kept(tmp_path, monkeypatch):
    """The drain process ignores SIGTERM (the listener decides when receiving has stopped),
    so the listener's last word to one that does not end must be SIGKILL; its run is rolled
    back by the next drain, and the spool still holds every acknowledged message."""
    monkeypatch.setenv("TWIN_KEY", "listener-test-key-0123456789abcdef")
    keys.secret_key.cache_clear()
    monkeypatch.setattr(DrainProcess, "GRACE", 1.0)
    try:
        store = Store(tmp_path / "s")
        stop, ready = threading.Event(), threading.Event()
        port = free_port()
        result: list = []
        t = threading.Thread(target=lambda: result.append(listen_mllp(
            store, "127.0.0.1", port, ready=ready, stop=stop, drain_every=0.2, shutdown_wait=1.0,
            privacy=SlowHooks(120))), daemon=True)
        t.start()
        assert ready.wait(10)
        assert all(b"MSA|A" in a for a in send(port, messages()))
        time.sleep(3)  # the drain process is in its slow drain
        began = time.monotonic()
        stop.set()
        t.join(60)
        assert not t.is_alive() and time.monotonic() - began < 30
        assert not [p for p in psutil.Process().children(recursive=True)
                    if _alive(p.pid) and any("multiprocessing.spawn" in a for a in p.cmdline())]
        assert result[0].drained_messages == 0
        assert sum(b.messages for b in spool_backlog(Store(store.root))) == len(messages())
        # slow is not failed: the next drain does not count it towards setting the segments aside
        folder = store.meta / "spool" / "hl7v2"
        (claim,) = folder.glob("*.drain")
        assert orjson.loads(claim.read_bytes())["stopped"] is True
        drainer = Drainer(Store(store.root), folder, "hl7v2", privacy=SlowHooks(0))
        with drainer.store.locked("test"):
            drainer._settle()  # what a drain does first
        assert not (folder / "drain-failures.json").exists() and not list(folder.glob("*.drain"))
        assert drainer.drain() and not Store(store.root).exists("quarantine")
        assert Store(store.root).read("runs").to_pylist()[0]["units_read"] >= len(messages())
    finally:
        keys.secret_key.cache_clear()


def _hl7_corpus() -> list[bytes]:
    """The fixture messages and, when ../shared/data is here, the public samples: mapped,
    refused for their content, and of every message type the maps know."""
    from pipeline.hl7v2 import DEFAULT_LIMITS
    from pipeline.hl7v2_framing import RawMessage, frame_stream

    files = sorted(p for p in (FIXTURES / "hl7v2").rglob("*") if p.is_file())
    shared = REPO.parent / "shared" / "data" / "hl7v2"
    if shared.is_dir():
        files += sorted(p for p in shared.rglob("*") if p.is_file())
    out = []
    for f in files:
        with open(f, "rb") as fh:
            out += [u.data for u in frame_stream(fh, DEFAULT_LIMITS, []) if isinstance(u, RawMessage)]
    return out


def test_a_drain_of_mapped_records_stores_what_mapping_at_the_drain_stored(tmp_path):
    """The listener spools what it mapped (F records) so that drains do not map again; a
    spool of raw messages (M records, as listeners before wrote) must give the same tables."""
    from datetime import UTC, datetime

    from pipeline.connectors.mllp import InboundMessage
    from pipeline.listen import _MSG, Drainer, Spool, spooling_handler

    msgs = _hl7_corpus()
    assert len(msgs) >= 5
    inbound = [InboundMessage(raw=m, peer="127.0.0.1:9", received_at=datetime.now(UTC), connection_id=1,
                              sequence=i + 1, control_id=None) for i, m in enumerate(msgs)]
    tables = {}
    for kind in ("mapped", "raw"):
        store = Store(tmp_path / kind)
        spool = Spool(tmp_path / f"spool-{kind}")
        if kind == "mapped":
            results = spooling_handler(spool)(inbound)
            assert any(getattr(r, "rejected", None) is not None for r in results), "no refused message in the corpus"
        else:
            spool.append([(_MSG, m.source_ref, m.raw) for m in inbound])
        spool.seal()
        assert Drainer(store, spool.folder, "hl7v2").drain()
        spool.close()
        tables[kind] = {}
        for name in store.schema.tables:
            if store.exists(name) and name not in ("runs", "ledger"):
                t = store.read(name)
                keep = [c for c in t.column_names if c not in ("run_id", "ingested_at", "quarantined_at", "quarantine_id")]
                tables[kind][name] = sorted(map(repr, t.select(keep).to_pylist()))
    assert tables["mapped"].keys() == tables["raw"].keys()
    assert "observation" in tables["mapped"] and "quarantine" in tables["mapped"]
    for name in tables["raw"]:
        assert tables["mapped"][name] == tables["raw"][name], name
