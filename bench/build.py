"""Benchmark: `twin build` beside one plain scan of the same tables, in the same process.

    python bench/make_synthea_ndjson.py --copies 10 --out bench/data/synthea-x10
    python bench/build.py bench/data/synthea-x10

Imports the input into a fresh store (not timed), then times a plain scan (every
committed clinical table read into Arrow, all columns) and a full `twin build`, then an
incremental build with nothing changed. Target: the full build <= 3x the scan.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.imports import run_import  # noqa: E402
from pipeline.store import Store  # noqa: E402
from pipeline.twins import CLINICAL, build_twins  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("input", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        run_import(store, "fhir", [a.input])
        t = time.perf_counter()
        rows = sum(store.read(name).num_rows for name in CLINICAL if store.exists(name))
        scan = time.perf_counter() - t
        t = time.perf_counter()
        result = build_twins(store)
        build = time.perf_counter() - t
        t = time.perf_counter()
        again = build_twins(store)
        incremental = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {a.input.name} | {rows:,} rows, {result.twins_total:,} twins | scan {scan:.2f} s | "
          f"build {build:.2f} s ({build / scan:.1f}x the scan; timeline {result.timeline_rows:,} rows) | "
          f"incremental, nothing changed: {incremental:.2f} s ({again.rebuilt} rebuilt) | peak RSS {rss:.0f} MB |")


if __name__ == "__main__":
    main()
