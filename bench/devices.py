"""Device CSV import speed and memory, beside pyarrow.csv.read_csv of the same file.

    python bench/devices.py                 # 10M lines: speed (best of 3, interleaved) and peak RSS
    python bench/devices.py --rows 1000000 --repeat 5 --parquet --rss 1000000,10000000,20000000

The machine is shared and noisy, so the two contenders run in turns and the best run
of each is compared: the ratio is what counts, not the absolute numbers. CPU time of
all threads is printed too: other load on the machine disturbs it much less than the
wall clock (read_csv parses on both cores; the import parses and maps in one thread
while another builds the tables). Peak RSS is
measured in a fresh process per run (1M and 10M lines) to show that memory stays flat
with the import while it grows with the file for read_csv, which loads it whole.

"Lines/s" counts CSV data lines for both; the import also writes three observation
rows per line (heart rate, SpO2, respiratory rate) with ids, codes, units and flags.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import pyarrow.csv as pacsv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from make_device_csv import write  # noqa: E402

from pipeline.connectors.csv_files import read_csv_logs  # noqa: E402
from pipeline.devices import output_schema  # noqa: E402

FORMAT = "twinline-vitals"


def data_file(rows: int) -> Path:
    path = HERE / "data" / f"vitals-{rows}.csv"
    if not path.exists():
        print(f"generating {path} ...", file=sys.stderr)
        write(rows, path)
    return path


def baseline(path: Path) -> int:
    return pacsv.read_csv(path).num_rows


def ours(path: Path, parquet: Path | None = None) -> tuple[int, int]:
    """Read and map the whole file; return (data lines, observation rows)."""
    lines = rows = 0
    writer = pq.ParquetWriter(parquet, output_schema("observation")) if parquet else None
    try:
        for unit in read_csv_logs([str(path)], format=FORMAT):
            if unit.table == "observation":
                lines += unit.units
                rows += unit.data.num_rows
                if writer is not None:
                    writer.write_table(unit.data)
    finally:
        if writer is not None:
            writer.close()
    return lines, rows


def timed(fn, *args) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def cpu_timed(fn, *args) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of all threads, result): CPU time is far less disturbed by other load."""
    c = time.process_time()
    wall, out = timed(fn, *args)
    return wall, time.process_time() - c, out


def child(which: str, path: Path) -> None:
    """Run one contender in this (fresh) process and print its peak RSS."""
    seconds, _ = timed(baseline if which == "read_csv" else ours, path)
    print(json.dumps({"seconds": seconds, "rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(which: str, path: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", which, "--file", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--parquet", action="store_true", help="also time the import writing Parquet")
    ap.add_argument("--rss", default="1000000,10000000",
                    help="file sizes (lines) whose peak RSS to measure, comma-separated; empty to skip")
    ap.add_argument("--child", choices=("read_csv", "ours"))
    ap.add_argument("--file", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.file)
        return
    path = data_file(args.rows)
    ours(data_file(10_000))  # warm up: imports, mapping files, constant blocks
    runs: dict[str, list[tuple[float, float]]] = {"read_csv": [], "import": [], "import+parquet": []}
    lines = rows = 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            wall, cpu, _ = cpu_timed(baseline, path)
            runs["read_csv"].append((wall, cpu))
            wall, cpu, (lines, rows) = cpu_timed(ours, path)
            runs["import"].append((wall, cpu))
            if args.parquet:
                wall, cpu, _ = cpu_timed(ours, path, Path(tmp) / "obs.parquet")
                runs["import+parquet"].append((wall, cpu))
    best = {k: min(w for w, _ in v) for k, v in runs.items() if v}
    cpu_best = {k: min(c for _, c in v) for k, v in runs.items() if v}
    print(f"file: {path.name}, {lines:,} data lines -> {rows:,} observation rows; "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; best of {args.repeat}, interleaved\n")
    print("| run | best s | median s | lines/s | vs read_csv | CPU s (all threads) | CPU vs read_csv |")
    print("|---|---|---|---|---|---|---|")
    for k, v in runs.items():
        if v:
            print(f"| {k} | {best[k]:.2f} | {statistics.median(w for w, _ in v):.2f} | {lines / best[k] / 1e6:.2f}M | "
                  f"{best['read_csv'] / best[k]:.0%} | {cpu_best[k]:.2f} | {cpu_best['read_csv'] / cpu_best[k]:.0%} |")
    sizes = sorted({int(x) for x in args.rss.split(",") if x.strip()})
    if sizes:
        print("\n| peak RSS (MB), fresh process | read_csv | import |")
        print("|---|---|---|")
        for n in sizes:
            p = data_file(n)
            print(f"| {n:,} lines | {peak_rss('read_csv', p):.0f} | {peak_rss('ours', p):.0f} |")


if __name__ == "__main__":
    main()
