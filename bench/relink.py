"""Benchmark: identity linking at the end of a small run, as the store grows.

Each `twin listen` drain and each small import links identities before it commits. This
fills a store with --batches imports of 20,000 generated HL7 v2 messages (the ORU/ADT
mix of bench/hl7v2.py, a new seed and new message numbers each: new patients, visits and
orders, as a live feed brings; a few patients recur), then after each measures a
100-message import twice: linking only the region the run touched (the default), and
linking the whole store (what every run did before, forced by removing the linking
fingerprint from the manifest). Same store, same run size, one after the other.

    python bench/relink.py --batches 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hl7v2 import corpus, mllp  # noqa: E402

from pipeline import identity, imports  # noqa: E402
from pipeline.imports import run_import  # noqa: E402
from pipeline.store import Store  # noqa: E402

TIMES: list[tuple[float, identity.RelinkResult]] = []


def _timed_relink(*a, **k):
    t = time.perf_counter()
    result = identity.relink(*a, **k)
    TIMES.append((time.perf_counter() - t, result))
    return result


def _feed(tmp: Path, n: int, seed: int, start: int) -> Path:
    path = tmp / f"feed-{n}-{seed}.mllp"
    path.write_bytes(mllp(corpus(n, seed, start)))
    return path


def _small_run(store_path: Path, feed: Path) -> tuple[float, float, identity.RelinkResult]:
    t = time.perf_counter()
    run_import(Store(store_path), "hl7v2", [feed])
    return time.perf_counter() - t, *TIMES[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=4)
    a = ap.parse_args()
    imports.relink = _timed_relink
    print("| patients in the store | 100-message run, linking the region | its linking (records) "
          "| same, linking the whole store | its linking (records) | linking: whole / region |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        store_path = tmp / "store"
        seed, start = 100, 0
        for b in range(1, a.batches + 1):
            run_import(Store(store_path), "hl7v2", [_feed(tmp, 20_000, b, start)])
            start += 20_000
            patients = Store(store_path).read("identity", ["patient_id"]).num_rows
            seed += 1
            run_t, link_t, region = _small_run(store_path, _feed(tmp, 100, seed, start))
            start += 100
            manifest = store_path / "_twin" / "manifest.json"
            doc = json.loads(manifest.read_text())
            doc.pop("linking", None)
            manifest.write_text(json.dumps(doc))
            seed += 1
            full_run_t, full_link_t, whole = _small_run(store_path, _feed(tmp, 100, seed, start))
            start += 100
            assert not region.full and whole.full
            print(f"| {patients:,} | {run_t:.2f} s | {link_t:.2f} s ({region.records:,}) | {full_run_t:.2f} s "
                  f"| {full_link_t:.2f} s ({whole.records:,}) | {full_link_t / link_t:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
