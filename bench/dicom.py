"""DICOM import speed: files/s end to end (read + map to FHIR) beside bare pydicom, same files, same run.

    /work/venv/bin/python bench/dicom.py [--rounds 5] [--study-files 1000]

Two inputs:
- `samples`: pydicom's test files (../shared/data/dicom, else fixtures/dicom): varied
  transfer syntaxes, character sets and bad files, read whole several times;
- `study`: one synthetic CT study of N files (copies of CT_small.dcm with their own
  UIDs, 10 series), the shape of a real import.

The baseline is `pydicom.dcmread(path, stop_before_pixels=True)` on the same files,
measured in alternation with ours in each round (the machine is shared and noisy: the
ratio of medians is what to read, not the absolute numbers). Target: ours >= 50% of the
baseline. Then peak Python memory (tracemalloc) for 1x and 4x the study: it must not grow
with the number of studies, since instances wait in a SQLite spool, not in memory
(the walk holds one folder's listing at a time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.connectors.dicom_files import read_dicom, walk  # noqa: E402
from pipeline.dicom import read_file  # noqa: E402
from pipeline.dicom_fhir import DicomMapping  # noqa: E402


def bare(files: list[Path]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            try:  # noqa: SIM105 - the plainest loop: it is the baseline
                pydicom.dcmread(f, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - the baseline reads the same bad files, and fails on them
                pass


def read_only(files: list[Path], mapping: DicomMapping) -> None:
    for f in files:
        read_file(f, mapping.wanted)


def end_to_end(files: list[Path], mapping: DicomMapping) -> int:
    reader = read_dicom(files, mapping=mapping)
    n = sum(1 for _ in reader)
    assert reader.counts.reconciles()
    return n


def make_studies(folder: Path, studies: int, per_study: int, source: Path) -> list[Path]:
    """`studies` CT studies of `per_study` files each (10 series), copies of `source` with their own UIDs."""
    folder.mkdir()
    ds = pydicom.dcmread(source)
    out = []
    for s in range(studies):
        ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[f"bench-{folder.name}-{s}"])
        series = [pydicom.uid.generate_uid(entropy_srcs=[f"bench-{folder.name}-{s}-{x}"]) for x in range(10)]
        for i in range(per_study):
            ds.SeriesInstanceUID = series[i % 10]
            ds.SeriesNumber = i % 10 + 1
            ds.InstanceNumber = i // 10 + 1
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(
                entropy_srcs=[f"bench-{folder.name}-{s}-{i}"])
            path = folder / f"S{s:03d}" / f"IM{i:06d}"  # a folder per study, as exports usually are
            path.parent.mkdir(exist_ok=True)
            ds.save_as(path)
            out.append(path)
    return out


def measure(name: str, files: list[Path], mapping: DicomMapping, rounds: int, repeat: int) -> float:
    work = files * repeat if repeat > 1 else files
    b, r, e = [], [], []
    for _ in range(rounds):
        t = time.perf_counter()
        bare(work)
        b.append(len(work) / (time.perf_counter() - t))
        t = time.perf_counter()
        read_only(work, mapping)
        r.append(len(work) / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(repeat):
            end_to_end(files, mapping)
        e.append(len(work) / (time.perf_counter() - t))
    base, ours, reading = statistics.median(b), statistics.median(e), statistics.median(r)
    print(f"{name:8s} {len(files):5d} files x{repeat:<3d} bare dcmread {base:7.0f} files/s | "
          f"read_file {reading:7.0f} files/s ({reading / base:4.0%}) | "
          f"end to end {ours:7.0f} files/s ({ours / base:4.0%} of bare)")
    return ours / base


def peak_memory(files: list[Path], mapping: DicomMapping) -> float:
    tracemalloc.start()
    end_to_end(files, mapping)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--study-files", type=int, default=1000)
    args = parser.parse_args()
    mapping = DicomMapping.load()
    shared = REPO.parent / "shared" / "data" / "dicom"
    samples_dir = shared if shared.is_dir() else REPO / "fixtures" / "dicom"
    samples = list(walk([samples_dir]))
    print(f"pydicom {pydicom.__version__}, Python {sys.version.split()[0]}; median of {args.rounds} rounds")
    ratios = [measure("samples", samples, mapping, args.rounds, repeat=max(1, 2000 // len(samples)))]
    source = REPO / "fixtures" / "dicom" / "pydicom" / "CT_small.dcm"
    with tempfile.TemporaryDirectory() as tmp:
        study = make_studies(Path(tmp, "study"), 1, args.study_files, source)
        ratios.append(measure("study", study, mapping, args.rounds, repeat=1))
        per_study = max(1, args.study_files // 10)
        few = make_studies(Path(tmp, "few"), 10, per_study, source)
        many = make_studies(Path(tmp, "many"), 40, per_study, source)
        m1, m4 = peak_memory([Path(tmp, "few")], mapping), peak_memory([Path(tmp, "many")], mapping)
        print(f"peak Python memory end to end: {m1:.1f} MiB for {len(few)} files (10 studies), {m4:.1f} MiB for "
              f"{len(many)} files (40 studies): x{m4 / m1:.2f} for x4 the files (bounded by one study)")
    verdict = "meets" if min(ratios) >= 0.5 else "MISSES"
    print(f"{verdict} the target (end to end >= 50% of bare dcmread): worst ratio {min(ratios):.0%}")


if __name__ == "__main__":
    main()
