"""`twin quarantine`: look at what could not be used, and why."""

from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc

from .errors import ConfigError
from .store import Store

_COLUMNS = ["quarantine_id", "quarantined_at", "source", "source_kind", "stage", "reason", "source_ref", "message",
            "target_table", "status", "payload_ref", "run_id", "resolved_run_id"]


def list_entries(store: Store, *, limit: int = 50, reason: str | None = None, include_resolved: bool = False) -> str:
    if not store.exists("quarantine"):
        return "quarantine is empty"
    flt = None if include_resolved else pc.field("status") == "open"
    if reason:
        cond = pc.field("reason") == reason
        flt = cond if flt is None else flt & cond
    t = store.read("quarantine", _COLUMNS, filter=flt).sort_by([("quarantined_at", "descending")])
    if t.num_rows == 0:
        return "no quarantined units" + (f" with reason {reason}" if reason else "")
    by_reason = Counter(t.column("reason").to_pylist())
    lines = [f"{t.num_rows:,} quarantined unit(s): " + ", ".join(f"{k} {v:,}" for k, v in by_reason.most_common())]
    for r in t.slice(0, limit).to_pylist():
        lines.append(f"{r['quarantine_id'][:12]}  {r['stage']:<6} {r['reason']:<24} {r['source']}: {r['source_ref']}")
        lines.append(f"{'':14}{r['message']}")
    if t.num_rows > limit:
        lines.append(f"... {t.num_rows - limit:,} more (--limit)")
    return "\n".join(lines)


def find_entry(store: Store, entry_id: str) -> dict:
    t = store.read("quarantine", filter=pc.starts_with(pc.field("quarantine_id"), entry_id))
    if t.num_rows == 0:
        raise ConfigError(f"no quarantine entry {entry_id!r}")
    if t.num_rows > 1:
        raise ConfigError(f"{entry_id!r} matches {t.num_rows} entries: give more characters")
    return t.to_pylist()[0]


def show_entry(store: Store, entry_id: str, *, payload: bool = False) -> str:
    e = find_entry(store, entry_id)
    lines = [f"{k:<16} {e[k]}" for k in _COLUMNS if e.get(k) is not None]
    data = e.get("payload")
    if data is not None:
        if payload:
            lines.append("payload:")
            lines.append(data.decode("utf-8", "replace"))
        else:
            lines.append(f"payload          {len(data):,} bytes (--payload prints it; it may hold patient data)")
    return "\n".join(lines)
