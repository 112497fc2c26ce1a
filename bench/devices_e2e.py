"""Benchmark: `twin import csv` end to end (read, map, provenance, Delta write) beside pyarrow's read_csv.

    python bench/make_device_csv.py 1000000 bench/data/vitals-1M.csv
    python bench/devices_e2e.py bench/data/vitals-1M.csv

Each in its own process pinned to one core; peak RSS of each process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from import_fhir import run  # noqa: E402  each measurement in its own process, pinned to one core

BASELINE = r"""
import sys, time, json, resource, pyarrow.csv as pv
t = time.perf_counter(); n = pv.read_csv(sys.argv[1]).num_rows
print(json.dumps({"seconds": time.perf_counter() - t, "lines": n, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

OURS = r"""
import sys, time, json, resource
sys.path.insert(0, sys.argv[3])
from pipeline.imports import run_import
from pipeline.store import Store
t = time.perf_counter()
run = run_import(Store(sys.argv[2]), "csv", [sys.argv[1]])
c = run.counts["csv"]
rows = run.rows["observation"]["written"]
print(json.dumps({"seconds": time.perf_counter() - t, "lines": c.read, "rows": rows,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file", type=Path)
    a = ap.parse_args()
    base = run(BASELINE, str(a.file))
    with tempfile.TemporaryDirectory() as tmp:
        ours = run(OURS, str(a.file), str(Path(tmp, "store")), str(REPO))
    print(f"| {a.file.name} | read_csv {base['lines'] / base['seconds']:,.0f} lines/s ({base['rss_mb']:.0f} MB) | "
          f"twin import csv {ours['lines'] / ours['seconds']:,.0f} lines/s, {ours['rows']:,} observation rows "
          f"({ours['rss_mb']:.0f} MB) | ratio {base['seconds'] / ours['seconds']:.2f} |")


if __name__ == "__main__":
    main()
