"""Freshness: is each source still delivering (ingested_at), or is its data current (event time)?

One result per table and source; observed and threshold are in days. Plain pyarrow
group-by: a GX expectation runs on a whole batch, not per source.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import pyarrow as pa

from .checks import Finding
from .config import GateConfig
from .layout import TableLayout


def freshness_checks(tables: Mapping[str, pa.Table], layouts: Mapping[str, TableLayout], config: GateConfig,
                     now: datetime) -> list[Finding]:
    basis = config.check("freshness").params.get("basis", "ingested")
    findings = []
    for name, data in tables.items():
        layout = layouts.get(name)
        if layout is None or not layout.provenance or data.num_rows == 0 or "source" not in data.column_names:
            continue
        column = "ingested_at" if basis == "ingested" else next(iter(layout.temporal), None)
        if column is None or column not in data.column_names:
            continue
        newest = data.group_by("source", use_threads=False).aggregate([(column, "max")])
        for source, latest in zip(newest.column("source").to_pylist(), newest.column(f"{column}_max").to_pylist(),
                                  strict=True):
            if source is None:
                continue
            cc = config.check("freshness", name, column)
            if not cc.enabled:
                continue
            if latest is None:
                findings.append(Finding("freshness", name, column, failing=0, denominator=0,
                                        details={"source": source, "observed_unit": "days"}))
                continue
            age = max((now - latest).total_seconds() / 86400.0, 0.0)
            stale = age > cc.threshold
            findings.append(Finding(
                "freshness", name, column, failing=int(stale), denominator=1, observed=round(age, 2),
                details={"source": source, "newest": latest.isoformat(), "observed_unit": "days"},
                summary=(f"newest row from source {source!r} is {age:.1f} days old "
                         f"(allowed up to {cc.threshold:g} days, by {column})")))
    return findings


__all__ = ["freshness_checks"]
