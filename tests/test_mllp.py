"""The MLLP server on real TCP sockets, with python-hl7's MLLP client as an independent sender.

The handler here stands in for the store: it appends what it is given to a file and
fsyncs it before returning, so "acknowledged" can be checked against "on disk".
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import hl7
import hl7.client
import orjson
import pytest

from pipeline.connectors.mllp import InboundMessage, ServerStats, mapping_handler, serve_mllp, tls_context
from pipeline.hl7v2_fhir import map_message

pytestmark = pytest.mark.server

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "hl7v2"
ORU = (FIX / "twin-oru-r01.hl7").read_bytes()
REPO = Path(__file__).resolve().parent.parent


def message(control_id: str) -> bytes:
    return ORU.replace(b"TWIN-LAB-0001", control_id.encode())


class FileHandler:
    """Stores each batch in a file (one line per message: control id and outcome), fsynced before returning."""

    def __init__(self, path: Path, fail_on: str | None = None, delay: float = 0.0):
        self.path, self.fail_on, self.delay = path, fail_on, delay
        self.batches: list[int] = []
        self.seen: list[InboundMessage] = []

    def __call__(self, batch: list[InboundMessage]):
        if self.delay:
            time.sleep(self.delay)
        lines, results = [], []
        for m in batch:
            self.seen.append(m)
            if m.rejected is not None:
                lines.append(f"QUARANTINE {m.rejected.reason} {m.source_ref}")
                results.append("AE")
                continue
            if self.fail_on is not None and m.control_id == self.fail_on:
                raise RuntimeError("the store is down")
            mapped = map_message(m.raw, m.source_ref)
            outcome = "STORED" if mapped.rejected is None else f"QUARANTINE {mapped.rejected.reason}"
            lines.append(f"{outcome} {m.control_id}")
            results.append(mapped)
        with open(self.path, "a") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        self.batches.append(len(batch))
        return results

    def stored(self) -> list[str]:
        if not self.path.exists():
            return []
        return [line.split()[1] for line in self.path.read_text().splitlines() if line.startswith("STORED")]

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []


@contextmanager
def running(handler, **kw):
    stats, ready, stop = ServerStats(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run():
        try:
            serve_mllp("127.0.0.1", 0, handler, ready=ready, stop=stop, stats=stats, **{"batch_wait_ms": 5, **kw})
        except BaseException as e:  # noqa: BLE001 - surfaced by the test below
            errors.append(e)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    assert not errors, errors
    try:
        yield stats
    finally:
        stop.set()
        thread.join(15)
        assert not thread.is_alive(), "the server did not stop"
        assert not errors, errors


def parse_ack(raw: bytes) -> hl7.Message:
    assert raw.startswith(b"\x0b") and raw.endswith(b"\x1c\r"), raw
    return hl7.parse(raw[1:-2].decode())


def test_ack_only_after_store_on_a_persistent_connection(tmp_path):
    handler = FileHandler(tmp_path / "store.log")
    with running(handler) as stats, hl7.client.MLLPClient("127.0.0.1", stats.address[1]) as client:
        for i in range(25):
            cid = f"P{i:04d}"
            ack = parse_ack(client.send_message(message(cid)))
            assert str(ack.segment("MSA")[1]) == "AA" and str(ack.segment("MSA")[2]) == cid
            assert cid in handler.stored()          # on disk before the ACK was sent
        msh = ack.segment("MSH")
        # sender and receiver swapped: the ORU came from TWINLAB/TWINHOSP to TWINLINE/TWINLINE
        assert (str(msh[3]), str(msh[4]), str(msh[5]), str(msh[6])) == (
            "TWINLINE", "TWINLINE", "TWINLAB", "TWINHOSP^2.16.840.1.113883.3.7777^ISO")
        assert str(msh[9]) == "ACK^R01^ACK" and str(msh[12]) == "2.5.1"
    assert stats.connections == 1 and stats.frames == 25 and stats.acks["AA"] == 25


def test_many_connections_are_grouped_into_batches(tmp_path):
    handler = FileHandler(tmp_path / "store.log")
    clients, per_client = 6, 30
    acked: dict[str, str] = {}
    lock = threading.Lock()

    def sender(n: int, port: int):
        with hl7.client.MLLPClient("127.0.0.1", port) as client:
            for i in range(per_client):
                cid = f"C{n}-{i:03d}"
                ack = parse_ack(client.send_message(message(cid)))
                with lock:
                    acked[str(ack.segment("MSA")[2])] = str(ack.segment("MSA")[1])

    with running(handler, batch_wait_ms=20) as stats:
        threads = [threading.Thread(target=sender, args=(n, stats.address[1])) for n in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    total = clients * per_client
    assert len(acked) == total and set(acked.values()) == {"AA"}
    assert sorted(handler.stored()) == sorted(acked)
    assert stats.batches < total and stats.largest_batch > 1          # group commit happened
    assert sum(handler.batches) == total and max(handler.batches) <= 100


def test_content_errors_are_quarantined_and_answered(tmp_path):
    handler = FileHandler(tmp_path / "store.log")
    no_pid = message("E1").replace(b"\rPID|", b"\rZZZ|")
    unsupported = b"MSH|^~\\&|A|B|C|D|20240101||SIU^S12|E2|P|2.5\rSCH|1\r"
    no_msh = b"hello, this is not HL7"
    with running(handler) as stats, hl7.client.MLLPClient("127.0.0.1", stats.address[1]) as client:
        ae = parse_ack(client.send_message(no_pid))
        ar = parse_ack(client.send_message(unsupported))
        bare = parse_ack(client.send_message(no_msh))
    assert str(ae.segment("MSA")[1]) == "AE" and str(ae.segment("ERR")[3]).startswith("100^")
    assert "missing-segment" in str(ae.segment("ERR")[8])
    assert str(ar.segment("MSA")[1]) == "AR" and str(ar.segment("ERR")[3]).startswith("200^")
    assert str(bare.segment("MSA")[1]) == "AR" and str(bare.segment("MSA")[2]) == ""
    assert handler.lines() == ["QUARANTINE missing-segment E1", "QUARANTINE unsupported-message-type E2",
                               "QUARANTINE no-msh None"]


def test_framing_errors_reach_the_handler_and_are_never_acknowledged(tmp_path):
    handler = FileHandler(tmp_path / "store.log")
    with running(handler) as stats:
        with socket.create_connection(("127.0.0.1", stats.address[1])) as s:
            s.sendall(b"noise before the frame\x0b" + message("F1") + b"\x1c\r")
            s.settimeout(5)
            ack = s.recv(65536)
            assert parse_ack(ack).segment("MSA")[2][0] == "F1"
            s.sendall(b"\x0b" + message("F2")[:120])      # cut: the connection closes mid-frame
        deadline = time.time() + 5
        while len([m for m in handler.seen if m.rejected]) < 2 and time.time() < deadline:
            time.sleep(0.02)
    reasons = [m.rejected.reason for m in handler.seen if m.rejected]
    assert reasons == ["junk-before-frame", "truncated-frame"]
    cut = next(m for m in handler.seen if m.rejected and m.rejected.reason == "truncated-frame")
    assert cut.rejected.payload.startswith(b"MSH|") and cut.rejected.stage == "read"
    assert stats.framing_errors == 2 and stats.acks == {"AA": 1, "AE": 0, "AR": 0}
    assert handler.stored() == ["F1"]


def test_mapping_handler_commits_each_batch_once_before_the_acks(tmp_path):
    store = tmp_path / "store.ndjson"
    commits: list[tuple[int, int]] = []

    def commit(resources, rejected):  # what the store does: write everything, fsync, return
        with open(store, "ab") as f:
            for r in resources:
                f.write(orjson.dumps({"ref": r.source_ref, "id": r.resource["id"]}) + b"\n")
            for r in rejected:
                f.write(orjson.dumps({"ref": r.source_ref, "reason": r.reason}) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        commits.append((len(resources), len(rejected)))

    with running(mapping_handler(commit)) as stats, hl7.client.MLLPClient("127.0.0.1", stats.address[1]) as c:
        ack = parse_ack(c.send_message(message("M1")))
        lines = store.read_bytes().splitlines()       # on disk when the ACK arrived
        bad = parse_ack(c.send_message(message("M2").replace(b"\rOBR|", b"\rZZZ|")))
    assert str(ack.segment("MSA")[1]) == "AA" and len(lines) == 13   # Patient, Encounter, 9 Observations, Device, report
    assert str(bad.segment("MSA")[1]) == "AE" and commits == [(13, 0), (0, 1)]
    assert orjson.loads(store.read_bytes().splitlines()[-1])["reason"] == "missing-segment"


def test_a_failing_handler_gets_ar_and_the_sender_can_resend(tmp_path):
    handler = FileHandler(tmp_path / "store.log", fail_on="BAD")
    with running(handler) as stats, hl7.client.MLLPClient("127.0.0.1", stats.address[1]) as client:
        ar = parse_ack(client.send_message(message("BAD")))
        ok = parse_ack(client.send_message(message("GOOD")))
    assert str(ar.segment("MSA")[1]) == "AR" and str(ar.segment("ERR")[3]).startswith("207^")
    assert str(ok.segment("MSA")[1]) == "AA"
    assert handler.stored() == ["GOOD"] and stats.handler_errors == 1


def test_duplicates_are_marked_for_the_handler(tmp_path):
    handler = FileHandler(tmp_path / "store.log")
    with running(handler) as stats, hl7.client.MLLPClient("127.0.0.1", stats.address[1]) as client:
        for _ in range(2):
            assert str(parse_ack(client.send_message(message("D1"))).segment("MSA")[1]) == "AA"
    assert [m.duplicate for m in handler.seen] == [False, True]
    assert stats.duplicates == 1


def test_shutdown_with_messages_in_flight_loses_no_acknowledged_message(tmp_path):
    handler = FileHandler(tmp_path / "store.log", delay=0.05)
    acked: list[str] = []
    lock = threading.Lock()

    def sender(n: int, port: int):
        try:
            with hl7.client.MLLPClient("127.0.0.1", port) as client:
                client.socket.settimeout(10)
                for i in range(10_000):
                    cid = f"S{n}-{i}"
                    raw = client.send_message(message(cid))
                    if not raw:
                        return
                    ack = parse_ack(raw)
                    if str(ack.segment("MSA")[1]) == "AA":
                        with lock:
                            acked.append(cid)
        except OSError:
            return

    with running(handler, batch_wait_ms=10) as stats:
        threads = [threading.Thread(target=sender, args=(n, stats.address[1])) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.6)
    for t in threads:
        t.join(15)
    stored = set(handler.stored())
    assert acked, "nothing was acknowledged before the stop"
    assert set(acked) <= stored                          # every ACK had its message on disk
    assert stats.acks["AA"] == len(stored)              # and every stored message was answered
    assert stats.open_connections == 0


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls(tmp_path):
    cert, key = _self_signed(tmp_path)
    handler = FileHandler(tmp_path / "store.log")
    with running(handler, ssl_context=tls_context(str(cert), str(key))) as stats:
        client = hl7.client.MLLPClient("127.0.0.1", stats.address[1])
        trust = ssl.create_default_context(cafile=str(cert))
        client.socket = trust.wrap_socket(client.socket, server_hostname="localhost")
        with client:
            ack = parse_ack(client.send_message(message("T1")))
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", stats.address[1])) as plain, \
                ssl.create_default_context().wrap_socket(plain, server_hostname="localhost"):
            pass  # a client that does not trust the certificate is refused
    assert str(ack.segment("MSA")[1]) == "AA" and handler.stored() == ["T1"]


SERVER_SCRIPT = """
import json, sys, threading
from pipeline.connectors.mllp import serve_mllp, ServerStats
stats, ready = ServerStats(), threading.Event()
def announce():
    ready.wait(); print(json.dumps({"port": stats.address[1]}), flush=True)
threading.Thread(target=announce, daemon=True).start()
out = serve_mllp("127.0.0.1", 0, lambda batch: ["AA"] * len(batch), ready=ready, stats=stats, batch_wait_ms=5)
print(json.dumps({"frames": out.frames, "aa": out.acks["AA"]}), flush=True)
"""


def test_sigterm_stops_the_server_cleanly():
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = json.loads(proc.stdout.readline())["port"]
        with hl7.client.MLLPClient("127.0.0.1", port) as client:
            assert str(parse_ack(client.send_message(message("K1"))).segment("MSA")[1]) == "AA"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        final = json.loads(proc.stdout.readline())
        assert final == {"frames": 1, "aa": 1}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
