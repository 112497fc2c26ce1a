"""Long fuzz run of the device CSV import: mutated vendor files must never crash it.

    python bench/fuzz_devices.py --seconds 600

Each round takes a fixture file (every vendor format), mutates it (flipped bytes, junk
lines, cut lines, repeated or dropped lines, very long fields, binary blocks, swapped
delimiters, truncation) and imports it with its format named. It checks the contract:
only Rows and Rejected come out, every Rejected has a known reason and points at the
file, observation rows have the schema's columns, and data lines reconcile where the
file's non-data lines are known. A failing input is saved under bench/out/fuzz/ with
the traceback. The short property test in tests/test_devices_hostile.py runs in CI.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pipeline.connectors.csv_files import read_csv_logs  # noqa: E402
from pipeline.devices import output_schema  # noqa: E402
from pipeline.units import Rejected, Rows  # noqa: E402

FIX = HERE.parent / "fixtures" / "devices"
# (file, format) pairs: the format is named, so a mutated file is still read as that format.
TARGETS = [
    (FIX / "devicely/empatica/ACC.csv", "empatica-e4"), (FIX / "devicely/empatica/HR.csv", "empatica-e4"),
    (FIX / "devicely/empatica/IBI.csv", "empatica-e4"), (FIX / "devicely/empatica/tags.csv", "empatica-e4"),
    (FIX / "devicely/faros/HRV.csv", "faros"), (FIX / "devicely/shimmer/read_test_data.csv", "shimmer"),
    (FIX / "devicely/spacelabs/spacelabs.abp", "spacelabs-abpm"),
    (FIX / "devicely/everion/CsvData_signals_EV-EC39-7079-57A8.csv", "everion"),
    (FIX / "devicely/everion/CsvData_features_EV-EC39-7079-57A8.csv", "everion"),
    (FIX / "physionet/140001.txt", "physionet-2012"), (FIX / "linked/vitals.csv", "twinline-vitals"),
]
REASONS = {"ragged-row", "not-text", "line-too-long", "bad-timestamp", "not-a-number", "unknown-parameter",
           "unknown-code", "value-out-of-limits", "bad-preamble", "bad-sidecar", "missing-column",
           "no-mapped-columns", "unreadable-file"}


def mutate(data: bytes, rng: random.Random) -> bytes:
    lines = data.split(b"\n")
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(9)
        i = rng.randrange(len(lines)) if lines else 0
        b = bytearray(b"\n".join(lines))
        if op == 0 and b:
            for _ in range(rng.randint(1, 20)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            lines = bytes(b).split(b"\n")
        elif op == 1:
            lines.insert(i, bytes(rng.randrange(256) for _ in range(rng.randint(0, 80))).replace(b"\n", b""))
        elif op == 2 and lines:
            lines[i] = lines[i][: rng.randint(0, len(lines[i]))]
        elif op == 3 and lines:
            lines.insert(i, lines[i])
        elif op == 4 and lines:
            del lines[i]
        elif op == 5 and lines:
            lines[i] += b"," + b"7" * rng.choice([10, 100_000, 1_100_000, 3_000_000])
        elif op == 6 and lines:
            lines[i] = lines[i].replace(b",", rng.choice([b";", b"\t", b",,", b'"']))
        elif op == 7:
            lines = lines[: rng.randint(0, len(lines))]
        elif op == 8 and lines:
            lines[i] = rng.choice([b"-1", b"NaN", b"1e400", b"", b"\xef\xbb\xbf", b"\r", b'"\n"', b"00:00"]) + lines[i]
    return b"\n".join(lines)


def check(units: list[object], path: Path) -> None:
    schema = output_schema("observation")
    for u in units:
        if isinstance(u, Rejected):
            assert u.reason in REASONS, u.reason
            assert u.source_ref.startswith(str(path)), u.source_ref
            assert u.payload is None or len(u.payload) <= 64 * 1024
        else:
            assert isinstance(u, Rows), type(u)
            if u.table == "observation":
                assert u.data.schema == schema
                assert u.units >= 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = HERE / "out" / "fuzz"
    work.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + args.seconds
    rounds = failures = 0
    while time.monotonic() < end:
        src, fmt = rng.choice(TARGETS)
        case = work / f"case-{rounds % 4}"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(src.parent, case)  # sidecars (meta.json) come along
        target = case / src.name
        target.write_bytes(mutate(src.read_bytes(), rng))
        try:
            check(list(read_csv_logs([str(target)], format=fmt, chunk_rows=rng.choice([3, 50, 1_000_000]))), target)
        except Exception:  # noqa: BLE001 - the point is to catch anything
            failures += 1
            keep = work / f"failure-{failures}"
            shutil.copytree(case, keep, dirs_exist_ok=True)
            (keep / "traceback.txt").write_text(f"format {fmt}\n{traceback.format_exc()}")
            print(f"FAIL {keep}: {traceback.format_exc().splitlines()[-1]}", flush=True)
        rounds += 1
    print(f"{rounds} mutated files, {failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
