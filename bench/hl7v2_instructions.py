"""Benchmark: instructions per HL7 v2 message, stage by stage, counted by valgrind.

Wall-clock numbers on these shared machines move by 25% from one minute to the next,
which hides any change smaller than that; instruction counts do not move. Each stage
runs in its own process under `valgrind --tool=callgrind` on a generated feed (the
ORU/ADT mix of bench/hl7v2.py) of N messages and again of 2N, and what a message costs
in a stage is the difference of the two counts over N: everything a run pays once
(imports, the mappings and views compiled, pyarrow's first use importing pandas, the
Delta tables created) cancels out. The stages, each including the ones before it:

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
if stage == "views":
    mapper = ResourceMapper(ViewSet(load_schema()), Resolver(IdentifierIndex(lambda: [])))
if stage == "import":
    run_import(Store(sys.argv[4]), "hl7v2", [feed])
else:
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
    n = a.messages
    counts: dict[tuple[str, int], int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (n, 2 * n):
            feed = Path(tmp, f"feed-{size}.mllp")
            feed.write_bytes(mllp(corpus(size)))
            if size == n:
                instructions("map", str(feed))  # a first run writes the .pyc files: not counted
            for stage in ("map", "views", "import"):
                extra = [str(Path(tmp, f"store-{size}"))] if stage == "import" else []
                counts[stage, size] = instructions(stage, str(feed), *extra)
    per = {stage: (counts[stage, 2 * n] - counts[stage, n]) / n for stage in ("map", "views", "import")}
    print(f"{n:,} and {2 * n:,} messages; instructions per message (valgrind callgrind, Ir, the difference over {n:,})")
    print("| stage | per message | share of the import |")
    print("|---|---:|---:|")
    whole = per["import"]
    for name, ir in (("parse + map", per["map"]), ("views", per["views"] - per["map"]),
                     ("the rest of the import (batching, hashes, Arrow, Delta, identity)", per["import"] - per["views"]),
                     ("import, end to end", whole)):
        print(f"| {name} | {ir:,.0f} | {100 * ir / whole:.0f}% |")
    print(f"fixed cost of an import run (imports, mappings and views compiled, tables created): "
          f"{(counts['import', n] - n * whole) / 1e6:,.0f} M")


if __name__ == "__main__":
    main()
