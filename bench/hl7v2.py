"""HL7 v2 throughput: parse + map to FHIR beside python-hl7's and hl7apy's bare parse; MLLP loopback.

    /work/venv/bin/python bench/hl7v2.py [--messages 4000] [--mllp-clients 8] [--mllp-messages 200]
                                         [--listen-messages 8000]

The machine is shared and noisy: every number is printed beside a baseline measured in
the same run, and the ratios are what to compare between runs. The corpus is generated
(seeded, invented data): half ORU^R01 (PID, PV1, ORC, OBR and 4-8 OBX with units,
ranges and flags), half ADT (A01/A03/A08 with PID and PV1), HL7 v2.5.1, CR terminators.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.connectors.mllp import ServerStats, serve_mllp  # noqa: E402
from pipeline.hl7v2 import parse_message  # noqa: E402
from pipeline.hl7v2_fhir import map_message  # noqa: E402

LABS = [("2345-7", "Glucose", "mg/dL", "70-99", 60, 250), ("2823-3", "Potassium", "mmol/L", "3.5-5.1", 3, 6),
        ("2951-2", "Sodium", "mmol/L", "135-145", 125, 150), ("2160-0", "Creatinine", "mg/dL", "0.6-1.3", 0.4, 3),
        ("718-7", "Hemoglobin", "g/dL", "12-17", 8, 18), ("6690-2", "Leukocytes", "10*3/uL", "4-11", 2, 20),
        ("777-3", "Platelets", "10*3/uL", "150-400", 50, 500), ("8867-4", "Heart rate", "/min", "60-100", 45, 140)]


def _results(rnd: random.Random, order: str, when: str) -> list[str]:
    """An ORU's order and its 4-8 lab results (NM, UCUM units, a range, a flag), all at `when`."""
    segs = [f"ORC|RE|O{order}^EHR|F{order}^LAB", f"OBR|1|O{order}^EHR|F{order}^LAB|24323-8^Metabolic panel^LN|||"
            f"{when}|||||||||||||||{when}||CH|F"]  # OBR-22 results time, OBR-24 section, OBR-25 status
    for k, (code, name, unit, rng, lo, hi) in enumerate(rnd.sample(LABS, rnd.randrange(4, 9)), 1):
        value = round(rnd.uniform(lo, hi), 1)
        flag = rnd.choice(["N", "N", "H", "L"])
        segs.append(f"OBX|{k}|NM|{code}^{name}^LN||{value}|{unit}^{unit}^UCUM|{rng}|{flag}|||F|||{when}")
    return segs


def corpus(n: int, seed: int = 7, start: int = 0) -> list[bytes]:
    """n messages; `start` numbers them on from there (visit, order and control ids come from
    the number, so corpora with disjoint ranges share none; patients recur at random)."""
    rnd = random.Random(seed)
    out = []
    for i in range(start, start + n):
        mrn = f"MRN{rnd.randrange(10**6):06d}"
        when = f"2024{rnd.randrange(1, 13):02d}{rnd.randrange(1, 29):02d}{rnd.randrange(24):02d}{rnd.randrange(60):02d}00+0100"
        pid = (f"PID|1||{mrn}^^^HOSP&2.16.840.1.113883.3.1&ISO^MR||Doe{i}^Jane^Q||19{rnd.randrange(30, 99)}0412|"
               f"{rnd.choice('FM')}||2106-3^White^CDCREC|{i} Main St^^Springfield^IL^62701^US^H||^PRN^PH^^1^217^5550{i % 1000:03d}")
        pv1 = (f"PV1|1|{rnd.choice('IOE')}|4E^{400 + i % 50}^B^HOSP||||1234^Welby^Marcus|||MED||||7||||"
               f"|V{i:07d}^^^HOSP^VN|||||||||||||||||||||||||{when}")
        if i % 2:
            segs = [f"MSH|^~\\&|LAB|HOSP|TWIN|TWIN|{when}||ORU^R01^ORU_R01|M{i:08d}|P|2.5.1", pid, pv1,
                    *_results(rnd, str(i), when)]
        else:
            trigger = rnd.choice(["A01", "A03", "A08"])
            segs = [f"MSH|^~\\&|ADT|HOSP|TWIN|TWIN|{when}||ADT^{trigger}^ADT_A01|M{i:08d}|P|2.5.1",
                    f"EVN|{trigger}|{when}", pid, pv1 + (f"|{when}" if trigger == "A03" else "")]
        out.append(("\r".join(segs) + "\r").encode())
    return out


def stays(n: int, seed: int = 7) -> list[bytes]:
    """n messages as a hospital's feed sends them: stays, each an A01, results during it (an
    ORU with the stay's PID and PV1, 2 to 6 of them), an A08 and an A03, the stays of many
    patients interleaved by time. What `corpus` lacks: ADT updates of a stored Patient and
    Encounter, and results for a visit ADT already described (their Patient and Encounter
    made only when none is stored)."""
    def ts(minute: int) -> str:  # minutes into 2024, as an HL7 DTM in UTC
        return time.strftime("%Y%m%d%H%M00+0000", time.gmtime(1704067200 + 60 * minute))

    rnd = random.Random(seed)
    timed: list[tuple[int, int, bytes]] = []
    k = 0
    while len(timed) < n:
        k += 1
        mrn = f"MRN{rnd.randrange(10**6):06d}"
        start = rnd.randrange(365 * 24 * 60)
        length = rnd.randrange(6 * 60, 6 * 24 * 60)
        thin_pid = f"PID|1||{mrn}^^^HOSP&2.16.840.1.113883.3.1&ISO^MR||Stay{k}^Jane^Q"  # what a lab knows
        pid = (f"{thin_pid}||19{rnd.randrange(30, 99)}0412|"
               f"{rnd.choice('FM')}||2106-3^White^CDCREC|{k} Main St^^Springfield^IL^62701^US^H")
        pv1 = (f"PV1|1|I|4E^{400 + k % 50}^B||||1234^Welby^Marcus|||MED||||7||||"
               f"|S{k:07d}^^^HOSP^VN|||||||||||||||||||||||||{ts(start)}")
        events = [(start, "A01"), (start + length // 2, "A08"), (start + length, "A03")]
        events += [(start + rnd.randrange(1, length), "R01") for _ in range(rnd.randrange(2, 7))]
        for n_msg, (minute, ev) in enumerate(sorted(events)):
            when, control = ts(minute), f"S{k:07d}-{n_msg}"
            if ev == "R01":
                segs = [f"MSH|^~\\&|LAB|HOSP|TWIN|TWIN|{when}||ORU^R01^ORU_R01|{control}|P|2.5.1",
                        thin_pid, pv1, *_results(rnd, control, when)]
            else:
                segs = [f"MSH|^~\\&|ADT|HOSP|TWIN|TWIN|{when}||ADT^{ev}^ADT_A01|{control}|P|2.5.1",
                        f"EVN|{ev}|{when}", pid + ("|^PRN^PH^^1^217^5550100" if ev == "A08" else ""),
                        pv1 + (f"|{when}" if ev == "A03" else "")]
            timed.append((minute, len(timed), ("\r".join(segs) + "\r").encode()))
    return [m for _, _, m in sorted(timed)[:n]]


def mllp(msgs: list[bytes]) -> bytes:
    """The messages as one MLLP dump (0x0B message 0x1C 0x0D each), as `twin import hl7v2` reads it."""
    return b"".join(b"\x0b" + m + b"\x1c\r" for m in msgs)


def rate(fn, items, min_seconds: float = 1.0) -> float:
    """Items per CPU-second of fn over items (per core: the thread's CPU time, not the wall clock,
    so that other work on the shared machine does not count), best of three rounds."""
    best = 0.0
    for _ in range(3):
        done, start = 0, time.thread_time()
        while True:
            for item in items:
                fn(item)
            done += len(items)
            elapsed = time.thread_time() - start
            if elapsed >= min_seconds / 3:
                break
        best = max(best, done / elapsed)
    return best


def bench_parse_map(n: int) -> list[tuple[str, float]]:
    import hl7
    from hl7apy.parser import parse_message as hl7apy_parse

    msgs = corpus(n)
    texts = [m.decode() for m in msgs]
    rows = [
        ("python-hl7 hl7.parse (bare parse, baseline)", rate(hl7.parse, texts)),
        ("hl7apy parse_message (bare parse)", rate(hl7apy_parse, texts[:60], 2.0)),
        ("twinline parse_message", rate(parse_message, msgs)),
        ("twinline parse + map to FHIR (map_message)", rate(lambda m: map_message(m, "bench"), msgs)),
    ]
    resources = sum(len(map_message(m, "bench").resources) for m in msgs)
    print(f"corpus: {len(msgs)} messages, {sum(map(len, msgs)) / len(msgs):.0f} bytes and "
          f"{resources / len(msgs):.1f} FHIR resources per message on average")
    return rows


class FsyncFileHandler:
    """The test handler: map, append to a file, fsync once per batch (the store's commit stands for it)."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, batch):
        results = [map_message(m.raw, m.source_ref) for m in batch]
        with open(self.path, "ab") as f:
            for m in batch:
                f.write(m.raw + b"\x1c\n")
            f.flush()
            os.fsync(f.fileno())
        return results


def _send_all(port: int, clients: int, msgs: list[bytes], out) -> None:
    """The senders, in a process of their own (their GIL is not the server's): one python-hl7
    MLLP client per connection, each sending its share one message at a time."""
    import hl7.client

    latencies: list[float] = []
    lock = threading.Lock()

    def send(k: int):
        mine = []
        with hl7.client.MLLPClient("127.0.0.1", port) as c:
            for m in msgs[k::clients]:
                t0 = time.perf_counter()
                ack = c.send_message(m)
                mine.append(time.perf_counter() - t0)
                assert b"MSA|AA|" in ack, ack
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.send((time.perf_counter() - start, latencies))


def bench_mllp(clients: int, per_client: int, batch_wait_ms: float, listen_store: str | None = None) -> dict:
    """Senders in another process against a server in this one: the test handler (map,
    append to a file, fsync per batch), or with `listen_store` the real `twin listen`
    (map, spool with fsync per batch, and its drain process moving the spool into that
    Delta store every half second)."""
    import multiprocessing

    from pipeline.listen import listen_mllp
    from pipeline.store import Store

    msgs = corpus(clients * per_client, seed=11)
    with tempfile.TemporaryDirectory() as tmp:
        stats, ready, stop = ServerStats(), threading.Event(), threading.Event()
        if listen_store is None:
            server = threading.Thread(target=serve_mllp, args=("127.0.0.1", 0, FsyncFileHandler(f"{tmp}/store")),
                                      kwargs=dict(ready=ready, stop=stop, stats=stats, batch_wait_ms=batch_wait_ms,
                                                  batch_max=200), daemon=True)
        else:
            store = Store(listen_store)
            listened: list = []
            server = threading.Thread(target=lambda: listened.append(listen_mllp(
                store, "127.0.0.1", 0, ready=ready, stop=stop, stats=stats, batch_wait_ms=batch_wait_ms,
                batch_max=200, drain_every=0.5)), daemon=True)
        server.start()
        ready.wait(10)
        ctx = multiprocessing.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_send_all, args=(stats.address[1], clients, msgs, send))
        proc.start()
        elapsed, latencies = recv.recv()
        last_ack = time.perf_counter()
        proc.join(30)
        stop.set()
        server.join(300)  # the listener's last drain: what it had not drained yet
        catch_up = time.perf_counter() - last_ack
    lat = sorted(latencies)
    out = {"clients": clients, "messages": len(lat), "rate": len(lat) / elapsed,
           "p50": lat[len(lat) // 2] * 1000, "p95": lat[int(len(lat) * 0.95)] * 1000,
           "p99": lat[int(len(lat) * 0.99)] * 1000, "max": lat[-1] * 1000, "mean": statistics.fmean(lat) * 1000,
           "batches": stats.batches, "largest": stats.largest_batch}
    if listen_store is not None:
        drained = listened[0] if listened else None
        out["drains"] = drained.drains if drained else 0
        out["drained"] = drained.drained_messages if drained else 0
        out["catch_up"] = catch_up
    return out


def fsync_baseline(n: int = 50) -> float:
    with tempfile.NamedTemporaryFile() as f:
        start = time.perf_counter()
        for _ in range(n):
            f.write(b"x" * 2000)
            f.flush()
            os.fsync(f.fileno())
        return (time.perf_counter() - start) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--mllp-clients", type=int, default=8, help="0: parse and map only, no MLLP loopback")
    ap.add_argument("--mllp-messages", type=int, default=150, help="per client")
    ap.add_argument("--listen-messages", type=int, default=0,
                    help="also measure the real `twin listen` (spool and drains into a store) with this many messages")
    args = ap.parse_args()

    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} at start (other work shares them)")
    rows = bench_parse_map(args.messages)
    base = rows[0][1]
    print("\n| path | messages per CPU-second | x python-hl7 parse |\n|---|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r:,.0f} | {r / base:.2f} |")

    if args.mllp_clients < 1:
        return
    print(f"\nfsync of a 2 kB append on this disk: {fsync_baseline():.2f} ms (baseline for the MLLP numbers)")
    print("\n| MLLP loopback (senders in another process), file handler: map + append + fsync per batch "
          "| messages/s | ACK latency p50 / p95 / p99 ms | batches |\n|---|---:|---:|---:|")
    for clients, wait in ((1, 20), (args.mllp_clients, 20)):
        r = bench_mllp(clients, args.mllp_messages if clients > 1 else args.mllp_messages * 2, wait)
        print(f"| {r['clients']} connection(s), {r['messages']} messages, batch_wait_ms={wait} | {r['rate']:,.0f} | "
              f"{r['p50']:.1f} / {r['p95']:.1f} / {r['p99']:.1f} | {r['batches']} (largest {r['largest']}) |")
    if args.listen_messages:
        print("\n| `twin listen` (spool, fsync per batch; its drain process writes a Delta store every 0.5 s) "
              "| messages/s | ACK latency p50 / p95 / p99 / max ms | batches | drains (messages drained) "
              "| all in the tables, after the last ACK |\n|---|---:|---:|---:|---:|---:|")
        for clients in (1, args.mllp_clients):
            with tempfile.TemporaryDirectory() as tmp:
                r = bench_mllp(clients, args.listen_messages // clients, 20, listen_store=f"{tmp}/store")
            print(f"| {r['clients']} connection(s), {r['messages']} messages | {r['rate']:,.0f} | {r['p50']:.1f} / "
                  f"{r['p95']:.1f} / {r['p99']:.1f} / {r['max']:.0f} | {r['batches']} (largest {r['largest']}) "
                  f"| {r['drains']} ({r['drained']:,}) | {r['catch_up']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
