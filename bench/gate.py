"""Benchmark: all gate checks over 1,000,000 generated observation rows (+ patients, encounters, ...).

Target (docs/gate.md): <= 10 s on the 2-core reference machine, Great Expectations import
included. The machine is shared and noisy, so the run also measures two baselines on the
same data and prints ratios:

  parquet   pyarrow: write the observation table as Parquet to memory (what storing it
            costs: the gate should cost a small multiple of that)
  gx-one    Great Expectations: one not-null expectation on observation_id (the cost of
            handing 1M rows of one column to GX: conversion, batch fingerprint, validation)

    /work/venv/bin/python bench/gate.py [--rows 1000000] [--patients 20000]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.validation import load_gate_config, run_gate  # noqa: E402
from pipeline.validation.layout import layouts  # noqa: E402

NOW = datetime(2026, 11, 28, tzinfo=UTC)
LOINC = "http://loinc.org"
# code, unit, mean, sd, device pool, category
MEASURES = [
    ("59408-5", "%", 96.0, 2.0, ("ox-a", "ox-b"), "vital-signs"),
    ("8867-4", "/min", 75.0, 12.0, ("mon-1",), "vital-signs"),
    ("9279-1", "/min", 16.0, 3.0, ("mon-1",), "vital-signs"),
    ("8310-5", "Cel", 36.9, 0.4, ("mon-1",), "vital-signs"),
    ("8480-6", "mm[Hg]", 125.0, 15.0, ("mon-1",), "vital-signs"),
    ("8462-4", "mm[Hg]", 80.0, 10.0, ("mon-1",), "vital-signs"),
    ("4548-4", "%", 5.8, 0.8, (None,), "laboratory"),
    ("2339-0", "mg/dL", 100.0, 20.0, (None,), "laboratory"),
]


def table(lay, name: str, n: int, cols: dict) -> pa.Table:
    """A table in the schema's Arrow shape with provenance filled in; other columns null."""
    t = lay[name]
    key = cols[t.key[0]]
    cols = {
        "source": pa.array(np.where(np.arange(n) % 2 == 0, "ehr", "devices")),
        "source_ref": pc.binary_join_element_wise(f"{name}.ndjson:", pc.cast(pa.array(np.arange(1, n + 1)), pa.string()), ""),
        "run_id": pa.array(["run-1"] * n),
        "ingested_at": pa.array(np.full(n, np.datetime64(NOW.replace(tzinfo=None) - timedelta(hours=1), "us")), pa.timestamp("us", tz="UTC")),
        "unit_key": key, "row_index": pa.array(np.zeros(n, np.int32)),
        "content_hash": key, **cols,
    }
    arrays = [pa.array(cols[c], s.arrow) if not isinstance(cols.get(c), pa.Array | pa.ChunkedArray) and c in cols
              else (cols[c].cast(s.arrow) if c in cols else pa.nulls(n, s.arrow)) for c, s in t.columns.items()]
    return pa.Table.from_arrays(arrays, schema=pa.schema([pa.field(c, s.arrow) for c, s in t.columns.items()]))


def ids(prefix: str, n: int) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(np.arange(n)), pa.string()), "")


def generate(schema: dict, n_obs: int, n_pat: int, seed: int = 0) -> dict[str, pa.Table]:
    rng = np.random.default_rng(seed)
    lay = layouts(schema)
    pid = ids("p", n_pat)
    twin = pc.binary_join_element_wise("T", pid, "")
    age = rng.integers(1, 95, n_pat)  # newborns would have events before birth in a year of history
    birth = np.datetime64(NOW.replace(tzinfo=None), "D") - (age * 365.25 + 30).astype("timedelta64[D]")
    races = rng.choice(["2106-3", "2054-5", "2028-9", "2131-1", "1002-5", "2076-8", "UNK"], n_pat,
                       p=[0.60, 0.13, 0.06, 0.09, 0.012, 0.003, 0.105])
    patient = table(lay, "patient", n_pat, {
        "patient_id": pid, "twin_id": twin, "sex": rng.choice(["female", "male"], n_pat, p=[0.51, 0.49]),
        "birth_date": pa.array(birth.astype("datetime64[us]"), pa.timestamp("us", tz="UTC")),
        "birth_date_precision": ["day"] * n_pat, "race_code": races,
        "ethnicity_code": rng.choice(["2135-2", "2186-5"], n_pat, p=[0.19, 0.81])})
    n_enc = n_pat * 2
    enc_pat = np.arange(n_enc) % n_pat
    start = np.datetime64(NOW.replace(tzinfo=None), "s") - rng.integers(3600, 365 * 86400, n_enc).astype("timedelta64[s]")
    encounter = table(lay, "encounter", n_enc, {
        "encounter_id": ids("e", n_enc), "patient_id": pc.take(pid, enc_pat), "twin_id": pc.take(twin, enc_pat),
        "status": ["finished"] * n_enc, "class_code": ["AMB"] * n_enc,
        "period_start": pa.array(start.astype("datetime64[us]"), pa.timestamp("us", tz="UTC")),
        "period_start_precision": ["second"] * n_enc,
        "period_end": pa.array((start + np.timedelta64(1800, "s")).astype("datetime64[us]"), pa.timestamp("us", tz="UTC")),
        "period_end_precision": ["second"] * n_enc})
    which = rng.integers(0, len(MEASURES), n_obs)
    enc = rng.integers(0, n_enc, n_obs)
    codes = np.array([m[0] for m in MEASURES], dtype=object)[which]
    units = np.array([m[1] for m in MEASURES], dtype=object)[which]
    values = np.array([m[2] for m in MEASURES])[which] + rng.standard_normal(n_obs) * np.array([m[3] for m in MEASURES])[which]
    values[rng.random(n_obs) < 0.001] = 1e6  # a few impossible values: the row-failure path runs too
    devices = np.array([m[4][i % len(m[4])] for i, m in enumerate(MEASURES)], dtype=object)
    device = np.where(which == 0, np.where(enc % 2 == 0, "ox-a", "ox-b"), devices[which])
    obs_start = start[enc] + rng.integers(0, 1800, n_obs).astype("timedelta64[s]")
    observation = table(lay, "observation", n_obs, {
        "observation_id": ids("o", n_obs), "patient_id": pc.take(pid, enc_pat[enc]), "twin_id": pc.take(twin, enc_pat[enc]),
        "encounter_id": pc.take(encounter.column("encounter_id"), enc), "is_component": np.zeros(n_obs, bool),
        "category_code": np.array([m[5] for m in MEASURES], dtype=object)[which], "code_system": [LOINC] * n_obs,
        "code": codes, "value_type": ["Quantity"] * n_obs, "value_number": values, "value_unit": units,
        "effective_start": pa.array(obs_start.astype("datetime64[us]"), pa.timestamp("us", tz="UTC")),
        "effective_start_precision": ["second"] * n_obs, "status": ["final"] * n_obs, "device_id": device})
    n_img = n_pat // 2
    imaging = table(lay, "imaging_study", n_img, {
        "study_id": ids("s", n_img), "patient_id": pc.take(pid, np.arange(n_img) * 2), "twin_id": pc.take(twin, np.arange(n_img) * 2),
        "status": ["available"] * n_img, "started": pc.take(encounter.column("period_start"), np.arange(n_img) * 2),
        "started_precision": ["second"] * n_img})
    dev = table(lay, "device", 3, {"device_id": ["ox-a", "ox-b", "mon-1"], "kind": ["monitor"] * 3,
                                   "manufacturer": ["Acme", "Beta", "Gamma"], "model": ["Ox-1", "Ox-2", "Bedside-9"]})
    return {"patient": patient, "encounter": encounter, "observation": observation, "imaging_study": imaging, "device": dev}


def parquet(obs: pa.Table) -> None:
    import pyarrow.parquet as pq

    pq.write_table(obs, pa.BufferOutputStream())


def gx_one(obs: pa.Table) -> None:
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = ctx.data_sources.add_pandas("b").add_dataframe_asset("o").add_batch_definition_whole_dataframe("a").get_batch(
        batch_parameters={"dataframe": obs.select(["observation_id"]).to_pandas()})
    suite = gx.ExpectationSuite(name="one")
    suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="observation_id"))
    batch.validate(suite)


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--patients", type=int, default=20_000)
    args = ap.parse_args()
    schema = json.loads((REPO / "schemas" / "twin-v1.json").read_text())
    t_gen, tables = timed(generate, schema, args.rows, args.patients)
    config = load_gate_config(None)
    rows = {n: t.num_rows for n, t in tables.items()}
    print(f"generated in {t_gen:.1f} s: " + ", ".join(f"{n} {r:,}" for n, r in rows.items()))

    t_floor, _ = timed(parquet, tables["observation"])
    t_cold, result = timed(lambda: run_gate(tables, config, now=NOW, schema=schema))
    t_warm, result = timed(lambda: run_gate(tables, config, now=NOW, schema=schema))
    t_gx, _ = timed(gx_one, tables["observation"])
    t_rows, n_fail = timed(lambda: sum(1 for _ in result.row_failures))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"checks: {len(result.checks)}, failed: {len(result.failed)}, rows to quarantine: {n_fail:,} "
          f"(listed in {t_rows:.2f} s)")
    for c in result.failed:
        print(f"  {c.severity:5} {c.id}: {c.message}")
    print(f"{'measure':<44}{'seconds':>9}{'x parquet':>10}{'x gx-one':>10}")
    for label, t in (("parquet (write observation to memory)", t_floor), ("gx-one (1 GX expectation, 1 column)", t_gx),
                     ("gate, cold (GX import included)", t_cold), ("gate, warm", t_warm)):
        print(f"{label:<44}{t:>9.2f}{t / t_floor:>10.1f}{t / t_gx:>10.1f}")
    print(f"observation rows: {rows['observation']:,}; gate cold {rows['observation'] / t_cold:,.0f} rows/s; "
          f"target <= 10 s: {'met' if t_cold <= 10 else 'NOT met'}; peak RSS {rss:,.0f} MB")


if __name__ == "__main__":
    main()
