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


# --------------------------------------------------------------------------- retry


def retry(store: Store, *, ids: list[str] | None = None, reason: str | None = None, source: str | None = None):
    """Replay open quarantine entries through the current mappings (after a fix).

    An entry leaves quarantine (status `resolved`, with the run that stored it) only
    when its unit is stored this time; one that fails again stays open, unchanged.
    Gate entries are not replayed: their rows are already in the tables.
    """
    import pyarrow as pa

    from .connectors import FILE_CONNECTORS
    from .identity import TwinIds, stored_links
    from .imports import finish_run
    from .ingest import Ingest, ViewSet
    from .runs import Run

    if not store.exists("quarantine"):
        raise ConfigError("quarantine is empty: nothing to retry")
    with store.locked("retry"):
        t = store.read("quarantine", latest=True, filter=pc.field("status") == "open")
        entries = [e for e in t.to_pylist()
                   if (not ids or any(e["quarantine_id"].startswith(i) for i in ids))
                   and (reason is None or e["reason"] == reason) and (source is None or e["source"] == source)]
        for i in ids or ():  # a mistyped or already resolved id would otherwise "succeed" having done nothing
            if not any(e["quarantine_id"].startswith(i) for e in entries):
                find_entry(store, i)  # says when there is no such entry at all
                raise ConfigError(f"quarantine entry {i!r} is not open (already resolved, or filtered out by "
                                  "--reason/--source): nothing to retry")
        run = Run(store, "retry", inputs=[f"{len(entries)} quarantine entries"], record_quarantine=False)
        views = ViewSet(store.schema)
        resolved: list[dict] = []
        skipped: dict[str, int] = {}
        try:
            ingests: dict[tuple[str, str], Ingest] = {}
            for e in entries:
                conn = FILE_CONNECTORS.get(e["source_kind"])
                why = ("gate entries are checked again by `twin check`, not replayed" if e["stage"] == "gate" else
                       "no payload kept (re-import the file)" if e["payload"] is None else
                       f"{e['source_kind']} units cannot be replayed alone (re-import the file)"
                       if conn is None or conn.replay is None else None)
                if why:
                    skipped[why] = skipped.get(why, 0) + 1
                    continue
                key = (e["source"], e["source_kind"])
                if key not in ingests:
                    ingests[key] = Ingest(store, run, e["source"], e["source_kind"], views,
                                          twin_ids=TwinIds(stored_links(store)))
                ingest = ingests[key]
                before = run.counts[e["source"]].quarantined
                for unit in conn.replay(e["payload"], e["source_ref"]):
                    ingest.feed(unit)
                if run.counts[e["source"]].quarantined == before:
                    resolved.append(e)
            for ingest in ingests.values():
                ingest.finish()
            if resolved:
                schema = store.schema.table("quarantine").arrow_schema
                for e in resolved:
                    e["status"] = "resolved"
                    e["resolved_run_id"] = run.run_id
                store.merge_by_key("quarantine", pa.Table.from_pylist(resolved, schema=schema))
            run.notes.append(f"{len(resolved)} of {len(entries)} entries stored and resolved")
            run.notes += [f"{n} not replayed: {why}" for why, n in sorted(skipped.items())]
            finish_run(store, run)
        except BaseException:
            store.rollback()
            raise
    return run
