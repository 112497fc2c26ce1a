"""Long fuzz run of the device CSV import: mutated vendor files must never crash it.

    python bench/fuzz_devices.py [--executions 1000000] [--seconds S] [--seed 0]

One execution is one mutated file read by the CSV mapper with its format named. Each
takes a fixture file (every vendor format), cut to its first 25 lines (preamble, header)
and a random slice of up to 40 more, and mutates it (flipped bytes, junk
lines, cut lines, repeated or dropped lines, very long fields, binary blocks, swapped
delimiters, truncation) and imports it with its format named. It checks the contract:
only Rows and Rejected come out, every Rejected has a known reason and points at the
file, observation rows have the schema's columns, and data lines reconcile where the
file's non-data lines are known. A failing input is saved under bench/out/fuzz/ with
the traceback. The short property test in tests/test_devices_hostile.py runs in CI.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pyarrow as pa

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
            lines[i] += b"," + b"7" * (rng.choice([10, 100_000, 1_100_000, 3_000_000]) if rng.random() < 0.05 else 10)
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
                # columns of runs of one value come dictionary-encoded, of the same value type (9bf3c0e)
                assert u.data.schema.names == schema.names
                for f in u.data.schema:
                    typ = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
                    assert typ == schema.field(f.name).type, f.name
                assert u.units >= 0


def excerpt(lines: list[bytes], rng: random.Random) -> bytes:
    """The head of the file (preamble, header) and a random slice of its data lines."""
    start = rng.randrange(25, max(26, len(lines)))
    return b"\n".join(lines[:25] + lines[start:start + rng.randint(0, 40)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--executions", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=None, help="stop after this long (default: no limit)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()) / f"fuzz-devices-{os.getpid()}"
    cases = []
    for i, (src, fmt) in enumerate(TARGETS):  # each format's folder once: sidecars (meta.json) come along
        case = root / str(i)
        shutil.copytree(src.parent, case, ignore=lambda d, names: [n for n in names if n != "meta.json"])
        cases.append((case / src.name, fmt, src.read_bytes().split(b"\n")))
    started = time.monotonic()
    end = started + args.seconds if args.seconds else float("inf")
    rounds = failures = 0
    while rounds < args.executions and time.monotonic() < end:
        target, fmt, lines = rng.choice(cases)
        target.write_bytes(mutate(excerpt(lines, rng), rng))
        try:
            check(list(read_csv_logs([str(target)], format=fmt, chunk_rows=rng.choice([3, 50, 1_000_000]))), target)
        except Exception:  # noqa: BLE001 - the point is to catch anything
            failures += 1
            keep = HERE / "out" / "fuzz" / f"failure-{failures}"
            shutil.copytree(target.parent, keep, dirs_exist_ok=True)
            (keep / "traceback.txt").write_text(f"format {fmt}\n{traceback.format_exc()}")
            print(f"FAIL {keep}: {traceback.format_exc().splitlines()[-1]}", flush=True)
            if failures >= 5:
                break
        rounds += 1
        if rounds % 100_000 == 0:
            print(f"{rounds:,} executions, {time.monotonic() - started:.0f} s, {failures} failures", flush=True)
    seconds = time.monotonic() - started
    shutil.rmtree(root, ignore_errors=True)
    print(f"{rounds:,} mutated files in {seconds:.0f} s ({rounds / seconds:,.0f}/s), {failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
