"""Benchmark: `twin import csv` end to end (read, map, provenance, Delta write) beside pyarrow's read_csv.

    python bench/make_device_csv.py 1000000 bench/data/vitals-1M.csv
    python bench/devices_e2e.py bench/data/vitals-1M.csv

Each in its own process pinned to one core, in turns for --rounds rounds (the machine is
shared and read_csv's time varies by a third between runs); peak RSS of each process.
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
    ap.add_argument("--rounds", type=int, default=3, help="read_csv and the import in turns, each in a fresh process")
    a = ap.parse_args()
    bases, ours_runs = [], []
    for _ in range(a.rounds):  # in turns: a busy minute on the machine hits both alike
        bases.append(run(BASELINE, str(a.file)))
        with tempfile.TemporaryDirectory() as tmp:
            ours_runs.append(run(OURS, str(a.file), str(Path(tmp, "store")), str(REPO)))
    ratios = sorted(b["seconds"] / o["seconds"] for b, o in zip(bases, ours_runs, strict=True))
    base = min(bases, key=lambda r: r["seconds"])
    ours = min(ours_runs, key=lambda r: r["seconds"])
    print("| file | read_csv, best of rounds | twin import csv, best of rounds | ratio of bests | ratio per round (sorted) |")
    print("|---|---|---|---|---|")
    print(f"| {a.file.name} | {base['lines'] / base['seconds']:,.0f} lines/s ({base['rss_mb']:.0f} MB) | "
          f"{ours['lines'] / ours['seconds']:,.0f} lines/s, {ours['rows']:,} observation rows ({ours['rss_mb']:.0f} MB) | "
          f"{base['seconds'] / ours['seconds']:.2f} | {' / '.join(f'{r:.2f}' for r in ratios)} |")


if __name__ == "__main__":
    main()
