"""Benchmark: HL7 v2 end to end (parse, map to FHIR, views, Delta store) beside the bare parsers.

Writes a file of N generated messages (the ORU/ADT mix of bench/hl7v2.py), then, each in
its own process pinned to one core: python-hl7's `hl7.parse` of every message (the
baseline), and `twin import hl7v2` of the file into a fresh store.

    python bench/hl7v2_e2e.py --messages 20000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hl7v2 import corpus  # noqa: E402
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
from pipeline.imports import run_import
from pipeline.store import Store
t = time.perf_counter()
run = run_import(Store(sys.argv[2]), "hl7v2", [sys.argv[1]])
c = run.counts["hl7v2"]
print(json.dumps({"seconds": time.perf_counter() - t, "units": c.read, "quarantined": c.quarantined,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20_000)
    a = ap.parse_args()
    msgs = corpus(a.messages)
    with tempfile.TemporaryDirectory() as tmp:
        mllp = Path(tmp, "feed.mllp")
        mllp.write_bytes(b"".join(b"\x0b" + m + b"\x1c\r" for m in msgs))
        base = run(BASELINE, str(mllp))
        ours = run(OURS, str(mllp), str(Path(tmp, "store")), str(REPO))
    n = len(msgs)
    print(f"| {n:,} messages ({ours['units']:,} units: resources and rejected messages) | "
          f"python-hl7 parse {n / base['seconds']:,.0f} msg/s | twin import hl7v2 end to end "
          f"{n / ours['seconds']:,.0f} msg/s ({ours['seconds']:.1f} s, {ours['quarantined']} quarantined) | "
          f"ratio {base['seconds'] / ours['seconds']:.2f} | peak RSS {ours['rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
