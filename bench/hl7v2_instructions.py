"""Benchmark: instructions per HL7 v2 message, stage by stage, counted by valgrind.

Wall-clock numbers on these shared machines move by 25% from one minute to the next,
which hides any change smaller than that; instruction counts do not move. Each stage
runs in its own process under `valgrind --tool=callgrind` on the same generated feed
(the ORU/ADT mix of bench/hl7v2.py), and the counts of successive stages are
subtracted, so what a stage costs is what it adds:

- start: imports, the mappings and the views compiled (the fixed cost of every run);
- parse + map: `read_hl7v2` of the feed (framing, parsing, FHIR R4 resources);
- views: every resource through its views into typed rows (`ResourceMapper.map`);
- import: `twin import hl7v2` of the feed into a fresh store, end to end.

    python bench/hl7v2_instructions.py [--messages 2000]

Instructions are not time (a cache miss costs more than an add), but a change that
removes instructions from one stage and adds none elsewhere is faster: compare these
counts before and after a change, then confirm with bench/hl7v2_e2e.py.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hl7v2 import corpus, mllp  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

STAGE = r"""
import gc, sys
sys.path.insert(0, sys.argv[1])
from pipeline.connectors.hl7v2_files import read_hl7v2
from pipeline.imports import run_import
from pipeline.ingest import ResourceMapper, ViewSet
from pipeline.references import IdentifierIndex, Resolver
from pipeline.schema import load_schema
from pipeline.store import Store
from pipeline.units import Resource
stage, feed = sys.argv[2], sys.argv[3]
if stage != "import":  # the import compiles its own views: once in every stage, so the subtractions cancel it
    mapper = ResourceMapper(ViewSet(load_schema()), Resolver(IdentifierIndex(lambda: [])))
if stage == "import":
    run_import(Store(sys.argv[4]), "hl7v2", [feed])
elif stage != "start":
    gc.disable()
    units = list(read_hl7v2([feed]))
    if stage == "views":
        rows = [mapper.map(u) for u in units if isinstance(u, Resource)]
"""


def instructions(*args: str) -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, "-c", STAGE, str(REPO), *args],
                         capture_output=True, text=True, check=True).stderr
    m = re.search(r"Collected : (\d+)", out)
    if not m:
        raise SystemExit(f"no instruction count in valgrind's output:\n{out[-2000:]}")
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    a = ap.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    msgs = corpus(a.messages)
    with tempfile.TemporaryDirectory() as tmp:
        feed = Path(tmp, "feed.mllp")
        feed.write_bytes(mllp(msgs))
        instructions("start", str(feed))  # a first run writes the .pyc files: not counted
        start = instructions("start", str(feed))
        mapped = instructions("map", str(feed))
        viewed = instructions("views", str(feed))
        imported = instructions("import", str(feed), str(Path(tmp, "store")))
    n = len(msgs)
    print(f"{n:,} messages; instructions per message (valgrind callgrind, Ir)")
    print("| stage | per message | share of the import |")
    print("|---|---:|---:|")
    whole = imported - start
    for name, ir in (("parse + map", mapped - start), ("views", viewed - mapped),
                     ("the rest of the import (batching, hashes, Arrow, Delta, identity)", imported - viewed),
                     ("import, end to end", whole)):
        print(f"| {name} | {ir / n:,.0f} | {100 * ir / whole:.0f}% |")
    print(f"fixed cost of a run (imports, mappings and views compiled): {start / 1e6:,.0f} M")


if __name__ == "__main__":
    main()
