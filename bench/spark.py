"""Benchmark: import + build on Spark local[1] and local[2] against the single process, in one run.

Each configuration runs in its own process, one after the other, on the same input and
a fresh store; the table gives wall times, throughput, the ratio to the single process
(the baseline measured in the same run: the machine is shared and noisy), and the peak
resident memory of the whole process tree (driver, JVM, Python workers; sampled from
/proc every 0.2 s). The second table has the per-partition costs that docs/scaling.md
uses: time per task, bytes and resources per task-second, and the fixed cost of a task.

    python bench/make_synthea_ndjson.py --copies 10 --out bench/data/synthea-x10
    python bench/spark.py bench/data/synthea-x10 [--configs single,local[1],local[2]] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

RUN = r"""
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[3])

def tree_rss():
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except OSError:
                pass
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 1024

peak = [0.0]
def sample():
    while True:
        peak[0] = max(peak[0], tree_rss())
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()

from pipeline.store import Store
config, src, store = sys.argv[1], sys.argv[2], Store(sys.argv[4])
out = {"config": config}
if config == "single":
    from pipeline.imports import run_import
    from pipeline.twins import build_twins
    t = time.perf_counter(); run = run_import(store, "fhir", [src]); out["import_s"] = time.perf_counter() - t
    t = time.perf_counter(); build_twins(store); out["build_s"] = time.perf_counter() - t
    out["start_s"] = 0.0
else:
    from pipeline.engines import spark as S
    from pipeline.engines.build import spark_build
    jobs = []
    real = S.run_tasks
    def timed(spark, items, fn, what):
        t = time.perf_counter(); res = real(spark, items, fn, what)
        jobs.append({"what": what, "wall": time.perf_counter() - t, "tasks": [r["seconds"] for r in res],
                     "parts": items})
        return res
    S.run_tasks = timed
    t = time.perf_counter(); spark = S.spark_session(config); spark.range(1).collect()
    out["start_s"] = time.perf_counter() - t
    for key in ("first_job_s", "noop_job_s"):  # the first starts the Python workers
        t = time.perf_counter(); S.run_tasks(spark, [{"index": i, "pieces": []} for i in range(8)], lambda p: {"part": p.index}, "noop")
        out[key] = time.perf_counter() - t
    t = time.perf_counter(); run = S.spark_import(store, "fhir", [src], spark=spark); out["import_s"] = time.perf_counter() - t
    t = time.perf_counter(); spark_build(store, spark); out["build_s"] = time.perf_counter() - t
    out["slots"] = spark.sparkContext.defaultParallelism
    out["jobs"] = [{"what": j["what"], "wall": j["wall"], "tasks": j["tasks"],
                    "bytes": [sum(max(p["end"], 0) - p["start"] if p["end"] >= 0 else os.path.getsize(p["abspath"])
                                  for p in part["pieces"]) for part in j["parts"]]} for j in jobs]
c = run.counts["fhir"]
out.update(resources=c.read, written=c.written, reconciles=c.reconciles(), rss_mb=max(peak[0], tree_rss()))
print(json.dumps(out))
"""


LOOP = "import time\nt = time.perf_counter()\nx = 0\nfor i in range(10_000_000): x += i\nprint(time.perf_counter() - t)"


def cores_available() -> float:
    """How many cores' worth of CPU two processes got just now (2.0 on an idle 2-core machine)."""
    one = float(subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True).stdout)
    procs = [subprocess.Popen([sys.executable, "-c", LOOP], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    two = [float(p.communicate()[0]) for p in procs]
    return 2 * one / max(two)


def measure(config: str, src: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {"TWIN_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin", "TWIN_KEY": "benchmark-key-benchmark-key"}
        out = subprocess.run([sys.executable, "-c", RUN, config, str(src), str(REPO), str(Path(tmp, "store"))],
                             capture_output=True, text=True, env=env, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("input", type=Path, help="a folder of NDJSON files (bench/make_synthea_ndjson.py)")
    ap.add_argument("--configs", default="single,local[1],local[2]")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration, in rounds; the fastest is shown")
    a = ap.parse_args()
    configs = a.configs.split(",")
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    capacity = []
    for _ in range(a.repeat):  # rounds, so that a busy minute does not hit one configuration only
        capacity.append(cores_available())
        for c in configs:
            runs[c].append(measure(c, a.input))
        capacity.append(cores_available())
    rows = [min(runs[c], key=lambda r: r["import_s"] + r["build_s"]) for c in configs]
    base = next((r for r in rows if r["config"] == "single"), rows[0])
    size = sum(f.stat().st_size for f in a.input.glob("*.ndjson")) / 2**20
    print(f"input: {a.input} ({rows[0]['resources']:,} resources, {size:,.0f} MiB)")
    print(f"cores' worth of CPU two processes got, before and after each round: "
          f"{', '.join(f'{c:.1f}' for c in capacity)} (of {os.cpu_count()})\n")
    print("| engine | start-up | import | build | import resources/s | import+build vs single | peak RSS (tree) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        work = r["import_s"] + r["build_s"]
        print(f"| {r['config']} | {r['start_s']:.1f} s | {r['import_s']:.1f} s | {r['build_s']:.1f} s | "
              f"{r['resources'] / r['import_s']:,.0f} | {work / (base['import_s'] + base['build_s']):.2f}x | "
              f"{r['rss_mb']:,.0f} MB |")
        assert r["reconciles"] and r["resources"] == base["resources"] and r["written"] == base["written"]
    print("\nPer-partition costs (Spark jobs of the import and the build):\n")
    print("| engine | job | tasks | job wall | task seconds (sum / median / max) | MiB per task-second | "
          "fixed cost per job |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for j in r.get("jobs", []):
            if j["what"] == "noop":
                continue
            tasks = sorted(j["tasks"])
            busy = sum(tasks)
            mib = sum(j["bytes"]) / 2**20
            rate = f"{mib / busy:,.1f}" if j["what"] != "twin build" and busy else "-"
            print(f"| {r['config']} | {j['what']} | {len(tasks)} | {j['wall']:.1f} s | {busy:.1f} / "
                  f"{tasks[len(tasks) // 2]:.2f} / {tasks[-1]:.2f} s | {rate} | "
                  f"{max(j['wall'] - busy / r['slots'], 0):.1f} s |")
        if "noop_job_s" in r:
            print(f"| {r['config']} | first job (starts the Python workers), 8 empty tasks | 8 | {r['first_job_s']:.2f} s "
                  "| - | - | - |")
            print(f"| {r['config']} | later job, 8 empty tasks | 8 | {r['noop_job_s']:.2f} s | - | - | - |")
            jobs = sum(j["wall"] for j in r["jobs"] if j["what"] in ("scan", "mapping"))
            print(f"| {r['config']} | driver: plan, index, write the store | - | {r['import_s'] - jobs:.1f} s | - | - | - |")


if __name__ == "__main__":
    main()
