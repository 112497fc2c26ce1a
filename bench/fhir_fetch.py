"""How fast `twin fetch fhir` pulls, beside the floor of a bare client measured in the same run.

The test FHIR server (tests/fhir_server.py) runs in its own process and serves the
10-patient Synthea set from ../shared (or, without it, the fixtures copied 100 times
under new ids). Each way of fetching is timed against a baseline that does the least
any client must do with `requests` + `orjson` and nothing else (no retries, no origin
checks, no files on disk, no validation):

  search  Twinline's SearchFetch            vs  GET pages, follow `next`, orjson.loads
  bulk    Twinline's BulkFetch (to disk,    vs  GET each file of the same manifest into
          then read line by line)               memory, split lines, orjson.loads

The machine is shared and noisy: read the ratios, not the absolute numbers.

    /work/venv/bin/python bench/fhir_fetch.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import orjson
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.connectors.fhir_server import FetchOptions, fetch_fhir  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "fhir" / "sample-bulk-fhir-datasets" / "10-patients"
FIXTURES = REPO / "fixtures" / "fhir-server"


def data_folder(tmp: Path) -> Path:
    if SHARED.is_dir():
        return SHARED
    out = tmp / "data"
    out.mkdir()
    for path in sorted(FIXTURES.glob("*.ndjson")):
        lines = path.read_bytes().splitlines()
        with open(out / path.name, "wb") as f:
            for copy in range(100):
                for line in lines:
                    res = orjson.loads(line)
                    res["id"] = f"{res['id'][:50]}-{copy}"
                    f.write(orjson.dumps(res) + b"\n")
    return out


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fhir_server.py"), str(folder), "--no-meta",
                             "--polls", "0"], stdout=subprocess.PIPE, cwd=REPO)
    base = proc.stdout.readline().decode().strip()
    return proc, base


def types_of(folder: Path) -> list[str]:
    return sorted(p.name.split(".")[0] for p in folder.glob("*.ndjson") if p.name != "log.ndjson")


def baseline_search(base: str, types: list[str]) -> int:
    n = 0
    with requests.Session() as s:
        for t in types:
            url, params = f"{base}/{t}", {"_count": "1000"}
            while url:
                bundle = orjson.loads(s.get(url, params=params, headers={"Accept": "application/fhir+json"}).content)
                n += len(bundle.get("entry") or [])
                url, params = next((lk["url"] for lk in bundle["link"] if lk["relation"] == "next"), None), None
    return n


def baseline_bulk(base: str) -> int:
    n = 0
    with requests.Session() as s:
        kick = s.get(f"{base}/$export", headers={"Accept": "application/fhir+json", "Prefer": "respond-async"})
        manifest = s.get(kick.headers["Content-Location"]).json()
        for item in manifest["output"]:
            for line in s.get(item["url"]).content.splitlines():
                orjson.loads(line)
                n += 1
    return n


def twinline(base: str, state: Path, **kw) -> int:
    fetch = fetch_fhir(FetchOptions(base_url=base, state_dir=state, **kw))
    n = sum(1 for _ in fetch.units())
    fetch.finished()
    return n


def timed(fn, repeat: int) -> tuple[int, float]:
    best = float("inf")
    n = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - t0)
    return n, best


def peak_mib(fn) -> float:
    """Peak Python heap during one run: it must stay flat however large the export (streaming)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the best is kept")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    try:
        folder = data_folder(tmp)
        proc, base = start_server(folder)
        try:
            types = types_of(folder)
            rows = [
                ("search", lambda: baseline_search(base, types),
                 lambda: twinline(base, tmp / "s", types=types, count=1000)),
                ("bulk", lambda: baseline_bulk(base), lambda: twinline(base, tmp / "b", bulk=True)),
            ]
            size = sum(p.stat().st_size for p in folder.glob("*.ndjson")) / 2**20
            print(f"data: {folder} ({len(types)} types, {size:.1f} MiB of NDJSON)")
            print(f"{'way':8} {'resources':>9} {'baseline/s':>11} {'twinline/s':>11} {'ratio':>6} "
                  f"{'peak MiB baseline':>18} {'twinline':>9}")
            for name, base_fn, ours_fn in rows:
                n0, t0 = timed(base_fn, args.repeat)
                n1, t1 = timed(ours_fn, args.repeat)
                assert n0 == n1, (name, n0, n1)
                m0, m1 = peak_mib(base_fn), peak_mib(ours_fn)
                print(f"{name:8} {n1:9d} {n0 / t0:11.0f} {n1 / t1:11.0f} {t0 / t1:6.2f} {m0:18.1f} {m1:9.1f}")
        finally:
            proc.terminate()
            proc.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
