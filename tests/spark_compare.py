"""Comparing two stores table by table, by meaning: the test of the Spark engine's promise.

Rows are compared as multisets (order-independent). Columns that say when or in which
run a row was written differ between any two runs and are left out: run_id,
ingested_at, quarantined_at, processed_at, and the run id inside a build's source_ref.
The runs table is compared on what a run did (command, status, unit tallies per source).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from pipeline.store import Store

RUN_COLUMNS = {"run_id", "ingested_at", "quarantined_at", "processed_at", "as_of", "started_at", "ended_at",
               "resolved_run_id", "updated_at"}
RUN_TALLIES = ("command", "status", "exit_code", "inputs", "units_read", "units_written", "units_quarantined",
               "units_ignored", "checks_passed", "checks_failed", "forced")


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def table_rows(store: Store, name: str, ignore: set[str] = frozenset()) -> Counter:
    if not store.exists(name):
        return Counter()
    t = store.read(name)
    if name == "runs":
        rows = []
        for r in t.to_pylist():
            sources = json.loads(r["counts"])["sources"]
            rows.append(_freeze({**{k: r[k] for k in RUN_TALLIES}, "sources": sources}))
        return Counter(rows)
    keep = [c for c in t.column_names if c not in RUN_COLUMNS and c not in ignore]
    out = Counter()
    for r in t.select(keep).to_pylist():
        if isinstance(r.get("source_ref"), str) and r["source_ref"].startswith("build "):
            r["source_ref"] = "build"
        out[_freeze(r)] += 1
    return out


def differences(a: Store, b: Store, ignore: dict[str, set[str]] | None = None) -> dict[str, str]:
    """Table name -> what differs (empty when the stores hold the same data); `ignore`: more columns to leave out."""
    out = {}
    for name in a.schema.tables:
        skip = (ignore or {}).get(name, set())
        ra, rb = table_rows(a, name, skip), table_rows(b, name, skip)
        if ra != rb:
            only_a, only_b = ra - rb, rb - ra
            out[name] = (f"{sum(ra.values())} vs {sum(rb.values())} rows; {sum(only_a.values())} only in the first, "
                         f"{sum(only_b.values())} only in the second; e.g. {next(iter(only_a or only_b))!r:.600}")
    return out
