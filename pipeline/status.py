"""`twin status`: what the store holds and what the last runs did."""

from __future__ import annotations

import json

import pyarrow.compute as pc

from .store import Store
from .temporal import utc_now


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _backlog(store: Store) -> list[str]:
    if not (store.meta / "spool").is_dir():  # never listened: no need to load the listener
        return []
    from .listen import spool_backlog

    now = utc_now()
    lines = []
    for b in spool_backlog(store):
        since = ""
        if b.oldest is not None:
            since = f", the oldest received {b.oldest:%Y-%m-%dT%H:%M:%SZ} ({_age((now - b.oldest).total_seconds())} ago)"
        if b.messages:
            lines.append(f"  listener spool {b.source}: {b.messages:,} message(s) received and not in the tables yet, "
                         f"in {b.segments} segment(s){since}")
        if b.set_aside:
            lines.append(f"  listener spool {b.source}: {b.set_aside} segment(s) set aside after failed drains; their "
                         "messages are in the quarantine (`twin quarantine list --reason drain-failed`)")
        if b.damaged:
            lines.append(f"  listener spool {b.source}: {b.damaged} segment(s) with bytes damaged on disk, kept in "
                         "damaged/; the damaged records are in the quarantine (`twin quarantine list --reason "
                         "spool-damaged`)")
    return lines


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def store_status(store: Store, limit: int = 10) -> str:
    manifest = store.manifest()
    lines = [f"store {store.root} (twin schema v{store.schema.version}), {_human(store.size_bytes())} on disk"]
    lines += _backlog(store)  # before the tables: acknowledged messages can wait in a store with none yet
    if not manifest["tables"]:
        lines.append("  empty: nothing has been imported yet")
        return "\n".join(lines)
    counts = []
    for name in store.schema.tables:
        if store.exists(name) and name not in ("runs", "ledger", "resource_identifier"):
            counts.append(f"{name} {store.count(name):,}")
    lines.append("  rows: " + ", ".join(counts))
    if manifest.get("privacy"):  # a store is only as de-identified as its least protected source
        lines.append("  privacy by source: " + ", ".join(f"{k} {v}" for k, v in manifest["privacy"].items()))
    runs = store.read("runs", ["run_id", "command", "status", "exit_code", "units_read", "units_written",
                               "units_quarantined", "started_at", "ended_at", "watermarks", "forced"])
    runs = runs.sort_by([("run_id", "descending")])
    lines.append(f"  last {min(limit, runs.num_rows)} of {runs.num_rows} runs:")
    for r in runs.slice(0, limit).to_pylist():
        secs = (r["ended_at"] - r["started_at"]).total_seconds()
        forced = " FORCED" if r["forced"] else ""
        lines.append(f"    {r['run_id']}  {r['command']:<10} {r['status']:<12} exit {r['exit_code']}  "
                     f"read {r['units_read']:,} written {r['units_written']:,} "
                     f"quarantined {r['units_quarantined']:,}  {secs:.1f}s{forced}")
    marks: dict[str, str] = {}
    for w in runs.filter(pc.is_valid(runs.column("watermarks"))).column("watermarks").to_pylist()[::-1]:
        marks.update(json.loads(w))
    if marks:
        lines.append("  watermarks: " + ", ".join(f"{k} {v}" for k, v in sorted(marks.items())))
    if store.exists("quarantine"):
        q = store.read("quarantine", ["status"])
        open_n = pc.sum(pc.equal(q.column("status"), "open")).as_py() or 0
        lines.append(f"  quarantine: {open_n:,} open of {q.num_rows:,}")
    return "\n".join(lines)
