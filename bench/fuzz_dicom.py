"""Long fuzzing of the DICOM file connector: damaged real files must never crash it.

    python bench/fuzz_dicom.py [--executions 1000000] [--minutes M] [--seed 1] [--batch 200]

One execution is one damaged file read by the connector (metadata, grouping into
studies, mapping to FHIR); files are written in batches to a folder in memory (/dev/shm).

Each batch writes damaged copies of the DICOM fixtures into a temporary folder and reads
the folder with `read_dicom`. A damage is chosen at random among: flipped bytes,
truncation, inserted or deleted bytes, and structure-aware hits on data element headers
(a length set to 0, odd, huge or undefined; a VR made unknown; a tag swapped), which reach
the parser paths random bytes rarely reach. Checked for every batch: no exception, the
counts reconcile, every unit is a Resource or a Rejected with a reason, and no Rejected
message quotes a patient's name or id from the originals. The first failing input is
kept (its path is printed) to become a test. The short version of this runs in
tests/test_dicom.py (hypothesis).
"""

from __future__ import annotations

import argparse
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.connectors.dicom_files import read_dicom, walk  # noqa: E402
from pipeline.dicom_fhir import DicomMapping  # noqa: E402
from pipeline.units import Rejected, Resource  # noqa: E402


def originals() -> list[tuple[str, bytes, list[int]]]:
    """(name, bytes, offsets of data element headers) of every fixture DICOM file."""
    out = []
    for p in walk([REPO / "fixtures" / "dicom"]):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not a readable original: not a seed
            continue
        offsets = [e.value_tell - (12 if e.VR in ("OB", "OW", "SQ", "UN", "UT", "UC") else 8)
                   for e in ds.values() if getattr(e, "value_tell", None)]
        out.append((Path(p).name, Path(p).read_bytes(), [o for o in offsets if o > 0]))
    return out


def secrets() -> set[str]:
    found = set()
    for p in walk([REPO / "fixtures" / "dicom"]):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001
            continue
        for kw in ("PatientID", "PatientName", "PatientBirthDate"):
            value = str(ds.get(kw) or "")
            if len(value) > 3:
                found.add(value)
    return found


def damage(data: bytes, headers: list[int], rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["flip", "truncate", "insert", "delete", "length", "vr", "tag"])
        if kind == "flip" and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == "truncate" and b:
            del b[rng.randrange(len(b)):]
        elif kind == "insert":
            pos = rng.randrange(len(b) + 1)
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif kind == "delete" and b:
            pos = rng.randrange(len(b))
            del b[pos:pos + rng.randint(1, 16)]
        elif headers and len(b) > max(headers) + 12:
            h = rng.choice(headers)
            if kind == "length":
                value = rng.choice([0, 1, 3, 0x7FFF, 0xFFFF])
                b[h + 6:h + 8] = struct.pack("<H", value)
                if rng.random() < 0.3:
                    b[h + 4:h + 12] = b"UN\0\0" + struct.pack("<I", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 5]))
            elif kind == "vr":
                b[h + 4:h + 6] = rng.choice([b"ZZ", b"\0\0", b"sq", b"SQ", b"UN", b"OB"])
            else:
                b[h:h + 4] = rng.randbytes(4)
    return bytes(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, default=1_000_000)
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long (default: no limit)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's, about the originals
        seeds, hidden = originals(), secrets()
    mapping = DicomMapping.load()
    started = time.monotonic()
    deadline = started + args.minutes * 60 if args.minutes else float("inf")
    files = batches = 0
    reasons: dict[str, int] = {}
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    while files < args.executions and time.monotonic() < deadline:
        with tempfile.TemporaryDirectory(dir=shm) as tmp:
            for i in range(args.batch):
                name, data, headers = rng.choice(seeds)
                Path(tmp, f"{i:05d}-{name}").write_bytes(damage(data, headers, rng))
            try:
                reader = read_dicom([tmp], mapping=mapping)
                for unit in reader:
                    assert isinstance(unit, (Resource, Rejected)), type(unit)
                    if isinstance(unit, Rejected):
                        assert unit.reason and not any(s in unit.message for s in hidden), unit.message
                        assert unit.reason != "mapping-failed", "a mapping bug"
                        reasons[unit.reason] = reasons.get(unit.reason, 0) + 1
                assert reader.counts.reconciles(), reader.counts
            except Exception:  # noqa: BLE001 - report and keep the input
                keep = Path(tempfile.mkdtemp(prefix="fuzz-dicom-failure-"))
                shutil.copytree(tmp, keep, dirs_exist_ok=True)
                traceback.print_exc()
                print(f"FAILED on batch {batches}: inputs kept in {keep}")
                sys.exit(1)
        files += args.batch
        batches += 1
        if batches % 500 == 0:
            print(f"{files:,} files, {time.monotonic() - started:.0f} s", flush=True)
    seconds = time.monotonic() - started
    print(f"{files:,} damaged files in {batches:,} batches, {seconds:.0f} s ({files / seconds:,.0f}/s): no crash, "
          "counts reconcile, no patient data in messages")
    print("reasons:", ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
