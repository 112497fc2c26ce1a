"""Benchmark: many small runs into one store, as `twin listen` drains make them.

Each run imports --messages HL7 v2 messages (the ORU/ADT mix of bench/hl7v2.py) into
the same store, --runs times; the time of the first and the last ten runs is printed, and
the files each table reads. Twice, each in its own process pinned to one core: as
installed (a run merges a table's tiny files at its commit once there are 32, and tables
checkpoint every 10 commits), and without either (no merging, Delta's checkpoint every
100 commits, as before stop 17).

    python bench/drains.py --runs 250 --messages 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))


def one_mode(runs: int, n: int, merge: bool, root: Path) -> dict:
    from deltalake import DeltaTable
    from hl7v2 import corpus, mllp

    from pipeline import store as store_module
    from pipeline.imports import run_import
    from pipeline.store import Store

    if not merge:  # no merging, Delta's checkpoint interval (as before stop 17)
        store_module._COMPACT_AT = 1 << 60
        store_module._CHECKPOINT_EVERY = "100"
    msgs = corpus(n * runs, 77)
    feed = root / "drain.mllp"
    times = []
    for i in range(runs):
        feed.write_bytes(mllp(msgs[i * n:(i + 1) * n]))
        t = time.perf_counter()
        run_import(Store(root / "store"), "hl7v2", [feed])
        times.append(time.perf_counter() - t)
    files = {t: len(DeltaTable(str(root / "store" / t)).file_uris()) for t in ("observation", "patient", "runs")}
    return {"first": sum(times[:10]) / 10, "last": sum(times[-10:]) / 10, "total": sum(times), "files": files}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=250)
    ap.add_argument("--messages", type=int, default=20)
    ap.add_argument("--mode", choices=["merge", "no-merge"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(one_mode(a.runs, a.messages, a.mode == "merge", Path(tmp))))
        return
    print(f"{a.runs} runs of {a.messages} messages each, into one store\n")
    print("| store upkeep | first 10 runs | last 10 runs | all runs | files read: observation / patient / runs |")
    print("|---|---|---|---|---|")
    for mode in ("merge", "no-merge"):
        cmd = ["taskset", "-c", str(os.sched_getaffinity(0).pop()), sys.executable, __file__, "--runs", str(a.runs),
               "--messages", str(a.messages), "--mode", mode]
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        f = out["files"]
        label = ("merged at the commit, checkpoint every 10 (as installed)" if mode == "merge"
                 else "never merged, checkpoint every 100")
        print(f"| {label} | {out['first']:.2f} s | {out['last']:.2f} s | {out['total']:.0f} s "
              f"| {f['observation']} / {f['patient']} / {f['runs']} |", flush=True)


if __name__ == "__main__":
    main()
