"""Benchmark: `twin import fhir` against a floor measured in the same run.

The floor is pyarrow's JSON reader plus a Parquet write of the same NDJSON files (no
flattening, no views, no upserts): the least any importer of these files can do.
Each measurement runs in its own process pinned to one core (taskset), and reports
wall time, resources/s and peak RSS (ru_maxrss of that process).

    python bench/make_synthea_ndjson.py --copies 1 --out bench/data/synthea-x1
    python bench/make_synthea_ndjson.py --copies 10 --out bench/data/synthea-x10
    python bench/import_fhir.py bench/data/synthea-x1 bench/data/synthea-x10 [--bundles DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FLOOR = r"""
import sys, time, resource, pathlib, pyarrow.json as pj, pyarrow.parquet as pq
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
t = time.perf_counter(); n = 0
for f in sorted(src.glob("*.ndjson")):
    table = pj.read_json(f, read_options=pj.ReadOptions(block_size=1 << 26))
    pq.write_table(table, out / (f.stem + ".parquet"))
    n += table.num_rows
print(__import__("json").dumps({"seconds": time.perf_counter() - t, "resources": n,
                                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

OURS = r"""
import sys, time, resource, pathlib, json
sys.path.insert(0, sys.argv[3])
from pipeline.imports import run_import
from pipeline.store import Store
t = time.perf_counter()
run = run_import(Store(sys.argv[2]), "fhir", [sys.argv[1]])
c = run.counts["fhir"]
print(json.dumps({"seconds": time.perf_counter() - t, "resources": c.read, "written": c.written,
                  "quarantined": c.quarantined, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(code: str, *args: str, extra_env: dict[str, str] | None = None) -> dict:
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    env = {"TWIN_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin", "TWIN_KEY": "benchmark-key-benchmark-key",
           **(extra_env or {})}
    out = subprocess.run([*pin, sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("datasets", nargs="+", type=Path, help="folders of NDJSON files")
    ap.add_argument("--bundles", type=Path, help="also import a folder of Bundles (no floor: pyarrow cannot read them)")
    a = ap.parse_args()
    rows = []
    for ds in a.datasets:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "pq").mkdir()
            floor = run(FLOOR, str(ds), str(Path(tmp, "pq")))
            ours = run(OURS, str(ds), str(Path(tmp, "store")), str(REPO))
        rows.append((ds.name, floor, ours))
    print("| input | resources | floor: pyarrow read_json + Parquet | twin import fhir | twin / floor time | peak RSS floor / twin |")
    print("|---|---|---|---|---|---|")
    for name, f, o in rows:
        print(f"| {name} | {o['resources']:,} | {f['seconds']:.2f} s ({f['resources'] / f['seconds']:,.0f}/s) | "
              f"{o['seconds']:.2f} s ({o['resources'] / o['seconds']:,.0f}/s) | {o['seconds'] / f['seconds']:.1f}x | "
              f"{f['rss_mb']:.0f} MB / {o['rss_mb']:.0f} MB |")
    if a.bundles:
        with tempfile.TemporaryDirectory() as tmp:
            o = run(OURS, str(a.bundles), str(Path(tmp, "store")), str(REPO))
        print(f"\nBundles ({a.bundles.name}): {o['resources']:,} resources in {o['seconds']:.2f} s "
              f"({o['resources'] / o['seconds']:,.0f}/s), peak RSS {o['rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
