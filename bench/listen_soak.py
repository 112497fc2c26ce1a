"""Soak: `twin listen` under a steady feed, and the memory of its two processes over time.

A listener (`twin listen mllp`, a process of its own, draining every --drain-every
seconds into a fresh store) receives --messages generated HL7 v2 messages from
--clients senders at once (python-hl7's MLLP client, each waiting for its ACK). Every
5 seconds the resident memory (VmRSS) of the listener and of its drain process is
sampled. With --distinct K the feed cycles over K distinct messages, so the store stops
growing after the first K (re-sent messages change nothing); with 0 every message is
new, and so are most of its patients.

    python bench/listen_soak.py --messages 200000
    python bench/listen_soak.py --messages 150000 --distinct 10000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from hl7v2 import corpus  # noqa: E402


def _rss_mb(pid: int | None) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss // 2**20 if pid is not None else None
    except psutil.NoSuchProcess:
        return None


def _drain_process(parent: int) -> int | None:
    """The listener's drain process: the child multiprocessing spawned (not its resource tracker)."""
    for child in psutil.Process(parent).children():
        try:
            if any("multiprocessing.spawn" in a for a in child.cmdline()):
                return child.pid
        except psutil.NoSuchProcess:
            continue
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import hl7.client

    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--distinct", type=int, default=0, help="cycle over this many distinct messages (0: all new)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--drain-every", type=float, default=1.0)
    a = ap.parse_args()
    msgs = corpus(a.distinct or a.messages, seed=5)
    msgs = (msgs * (a.messages // len(msgs) + 1))[:a.messages]
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from pipeline.cli import console_main; "
                f"sys.argv = ['twin', 'listen', 'mllp', '--port', '{port}', '--store', {tmp + '/store'!r}, "
                f"'--drain-every', '{a.drain_every}']; console_main()")
        listener = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        drainer = None
        while time.monotonic() < deadline and drainer is None:
            time.sleep(0.5)
            drainer = _drain_process(listener.pid)
        time.sleep(2)  # the listening socket is up well before this

        def send(k: int) -> None:
            with hl7.client.MLLPClient("127.0.0.1", port) as c:
                for m in msgs[k::a.clients]:
                    c.send_message(m)

        senders = [threading.Thread(target=send, args=(k,)) for k in range(a.clients)]
        start = time.monotonic()
        for t in senders:
            t.start()
        samples = []
        while any(t.is_alive() for t in senders):
            samples.append((time.monotonic() - start, _rss_mb(listener.pid), _rss_mb(drainer)))
            time.sleep(5)
        for t in senders:
            t.join()
        sent = time.monotonic() - start
        listener.send_signal(2)
        out = listener.communicate(timeout=600)[0].decode().strip()
    print(f"{a.messages:,} messages ({a.distinct or 'all'} distinct) from {a.clients} senders in {sent:.0f} s "
          f"({a.messages / sent:,.0f} msg/s); {out}\n")
    print("| seconds | listener RSS MB | drain process RSS MB |\n|---:|---:|---:|")
    for t, lrss, drss in samples:
        print(f"| {t:.0f} | {lrss} | {drss} |")


if __name__ == "__main__":
    main()
