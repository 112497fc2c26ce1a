"""Benchmark: HL7 v2 end to end (parse, map to FHIR, views, Delta store) beside the bare parser.

Writes a file of N generated messages (the ORU/ADT mix of bench/hl7v2.py), then, each in
its own process pinned to one core and in turns for --rounds rounds (the machine is
shared: compare within a round): python-hl7's `hl7.parse` of every message (the
baseline); `twin import hl7v2` of the file into a fresh store as installed (the modules
setup.py compiles, compiled); and the same with TWINLINE_PURE_PYTHON=1 (every module
from its source).

    python bench/hl7v2_e2e.py --messages 20000 --rounds 3 [--corpus stays]

`--corpus stays` uses bench/hl7v2.py's `stays` instead: hospital stays (A01, results, A08,
A03) interleaved, so ADT updates stored records and results name visits ADT described.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hl7v2 import corpus, mllp, stays  # noqa: E402
from import_fhir import run  # noqa: E402  each measurement in its own process, pinned to one core

REPO = Path(__file__).resolve().parent.parent

BASELINE = r"""
import sys, time, json, hl7
data = open(sys.argv[1], "rb").read().decode("utf-8").split("\x1c")
msgs = [m for m in data if m.strip()]
t = time.perf_counter()
for m in msgs:
    hl7.parse(m)
print(json.dumps({"seconds": time.perf_counter() - t, "messages": len(msgs)}))
"""

OURS = r"""
import sys, time, json, resource
sys.path.insert(0, sys.argv[3])
from pipeline import compiled
from pipeline.imports import run_import
from pipeline.store import Store
t = time.perf_counter()
run = run_import(Store(sys.argv[2]), "hl7v2", [sys.argv[1]])
c = run.counts["hl7v2"]
modes = list(compiled.status().values())
print(json.dumps({"seconds": time.perf_counter() - t, "units": c.read, "quarantined": c.quarantined,
                  "compiled": f"{modes.count('compiled')} of {len(modes)} modules compiled",
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--corpus", choices=["mix", "stays"], default="mix")
    a = ap.parse_args()
    msgs = corpus(a.messages) if a.corpus == "mix" else stays(a.messages)
    n = len(msgs)
    print("| round | python-hl7 parse | twin import hl7v2, compiled | x python-hl7 | same, from source | x python-hl7 "
          "| compiled speed-up | peak RSS compiled / source |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        feed = Path(tmp, "feed.mllp")
        feed.write_bytes(mllp(msgs))
        for r in range(1, a.rounds + 1):
            base = run(BASELINE, str(feed))
            fast = run(OURS, str(feed), str(Path(tmp, f"store-c{r}")), str(REPO))
            slow = run(OURS, str(feed), str(Path(tmp, f"store-s{r}")), str(REPO),
                       extra_env={"TWINLINE_PURE_PYTHON": "1"})
            print(f"| {r} | {n / base['seconds']:,.0f} msg/s | {n / fast['seconds']:,.0f} msg/s "
                  f"({fast['seconds']:.1f} s; {fast['compiled']}) | {base['seconds'] / fast['seconds']:.2f} | "
                  f"{n / slow['seconds']:,.0f} msg/s | {base['seconds'] / slow['seconds']:.2f} | "
                  f"{slow['seconds'] / fast['seconds']:.2f}x | {fast['rss_mb']:.0f} / {slow['rss_mb']:.0f} MB |",
                  flush=True)
    print(f"{n:,} messages, {fast['units']:,} units (resources and refused messages), "
          f"{fast['quarantined']} quarantined")


if __name__ == "__main__":
    main()
