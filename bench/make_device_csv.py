"""Write a large twinline-vitals CSV for the device benchmark (bench/data/, git-ignored).

    python bench/make_device_csv.py 10000000 bench/data/vitals-10M.csv

One patient, one monitor, one line per second with heart rate, SpO2 and respiratory
rate (integers, as monitors write them); about one value in 5,000 is outside its
plausible range so the flagging path is exercised. Written with pyarrow in slices, so
generating 10 million lines takes seconds and little memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

START = np.datetime64("2024-01-01T00:00:00", "s")
SLICE = 1_000_000


def write(n: int, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2012)
    opts = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with open(out, "wb") as fh:
        fh.write(b"time,patient_id,device_id,hr,spo2,resp_rate\n")
    with open(out, "ab") as fh, pacsv.CSVWriter(fh, pa.schema([("time", pa.string()), ("patient_id", pa.string()),
                                         ("device_id", pa.string()), ("hr", pa.int32()),
                                         ("spo2", pa.int32()), ("resp_rate", pa.int32())]), write_options=opts) as w:
        for start in range(0, n, SLICE):
            k = min(SLICE, n - start)
            t = pa.array(START + np.arange(start, start + k), pa.timestamp("s"))
            hr = rng.normal(78, 12, k).round().astype(np.int32)
            hr[rng.random(k) < 0.0002] = 260  # implausible, kept and flagged
            table = pa.table({
                "time": pc.strftime(t, format="%Y-%m-%dT%H:%M:%SZ"),
                "patient_id": pa.array(["bench-patient-1"] * k),
                "device_id": pa.array(["bench-monitor-1"] * k),
                "hr": hr,
                "spo2": rng.integers(90, 100, k, dtype=np.int32),
                "resp_rate": rng.integers(10, 24, k, dtype=np.int32),
            })
            w.write_table(table)


if __name__ == "__main__":
    write(int(sys.argv[1]), Path(sys.argv[2]))
