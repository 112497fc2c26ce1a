"""A run: its id, its tallies, its quarantine entries, and the row it leaves in `runs`.

Every command that writes the store is a run. The tallies are what the summary prints
and what the `runs` table keeps, per source and per table, so that anyone can check
afterwards that units read = written + unchanged + ignored + quarantined.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa

from . import __version__
from .errors import Exit
from .store import Store
from .temporal import utc_now
from .units import Counts, Rejected

# Quarantine entries are flushed to the store in batches of this size, so a file full
# of bad lines never fills memory.
QUARANTINE_FLUSH = 5_000


def last_run(store: Store, command: str) -> dict[str, Any] | None:
    """The newest run of `command` in the store (committed or this run's own), or None."""
    import pyarrow.compute as pc

    if not store.exists("runs") and store.delta("runs", latest=True) is None:
        return None
    runs = store.read("runs", filter=pc.field("command") == command, latest=True)
    if runs.num_rows == 0:
        return None
    return max(runs.to_pylist(), key=lambda r: r["run_id"])


def new_run_id(now: datetime | None = None) -> str:
    now = now or utc_now()
    return f"{now:%Y%m%dT%H%M%S}Z-{secrets.token_hex(3)}"


def quarantine_id(source: str, source_ref: str, stage: str, reason: str, content: bytes | str | None = None) -> str:
    """The entry's key: the same bad unit quarantined again keeps one entry.

    `content` (the payload, else its pointer) is part of the key because a locator alone
    does not name a unit for ever: an HL7 drop file rewritten under the same name, or an
    MLLP connection number after a listener restart, points at a different message the
    next time, and keying on the locator alone kept the first entry and silently dropped
    the new message.
    """
    h = hashlib.sha256("\x1f".join((source, source_ref, stage, reason)).encode())
    if content is not None:
        h.update(b"\x1f" + (content if isinstance(content, bytes) else content.encode("utf-8", "replace")))
    return h.hexdigest()[:32]


@dataclass
class Run:
    store: Store
    command: str
    inputs: list[str] = field(default_factory=list)
    run_id: str = field(default_factory=new_run_id)
    started_at: datetime = field(default_factory=utc_now)
    counts: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    rows: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    watermarks: dict[str, str] = field(default_factory=dict)
    checks_passed: int | None = None
    checks_failed: int | None = None
    forced: bool = False
    notes: list[str] = field(default_factory=list)
    # False for `twin quarantine retry`: what fails again is the entry being replayed, which
    # stays open as it was; recorded again it would be a second entry for the same unit,
    # under whatever locator and reason the replay of a payload gives (`no-msh` for a batch trailer)
    record_quarantine: bool = True
    _quarantine: list[dict[str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------------ quarantine

    def quarantine(self, source: str, source_kind: str, r: Rejected) -> str:
        """Count and record a refused unit; returns its entry's id."""
        self.counts[source].quarantined += 1
        qid = quarantine_id(source, r.source_ref, r.stage, r.reason, r.payload if r.payload is not None else r.payload_ref)
        if not self.record_quarantine:
            return qid
        self._quarantine.append({
            "quarantine_id": qid,
            "run_id": self.run_id,
            "quarantined_at": utc_now(),
            "source": source,
            "source_kind": source_kind,
            "source_ref": r.source_ref,
            "stage": r.stage,
            "reason": r.reason,
            "message": r.message,
            "target_table": r.target_table,
            "payload": r.payload,
            "payload_ref": r.payload_ref,
            "status": "open",
            "resolved_run_id": None,
        })
        if len(self._quarantine) >= QUARANTINE_FLUSH:
            self.flush_quarantine()
        return qid

    def flush_quarantine(self) -> None:
        if not self._quarantine:
            return
        table = self.store.schema.table("quarantine")
        data = pa.Table.from_pylist(self._quarantine, schema=table.arrow_schema)
        # a unit quarantined again (the same bad line re-imported) keeps its first entry
        self.store.merge_by_key("quarantine", data, update=False)
        self.rows["quarantine"]["written"] += data.num_rows
        self._quarantine.clear()

    # ------------------------------------------------------------------ outcome

    def totals(self) -> Counts:
        t = Counts()
        for c in self.counts.values():
            t.read += c.read
            t.written += c.written
            t.unchanged += c.unchanged
            t.quarantined += c.quarantined
            t.ignored += c.ignored
            t.deleted += c.deleted
            for k, v in c.ignored_types.items():
                t.ignored_types[k] = t.ignored_types.get(k, 0) + v
        return t

    def exit_code(self) -> Exit:
        return Exit.QUARANTINED if self.totals().quarantined else Exit.OK

    def status(self) -> str:
        t = self.totals()
        if t.read == 0 and self.command in ("import", "fetch", "run", "listen"):
            return "nothing_new"
        return "quarantined" if t.quarantined else "ok"

    def counts_json(self) -> str:
        return json.dumps({
            "sources": {s: asdict(c) for s, c in sorted(self.counts.items())},
            "tables": {t: dict(v) for t, v in sorted(self.rows.items())},
            "notes": self.notes,
        }, sort_keys=True)

    def record(self, *, status: str | None = None, exit_code: int | None = None, message: str | None = None) -> None:
        """Write this run's row to the `runs` table (inside the run's lock, before commit)."""
        self.flush_quarantine()
        t = self.totals()
        row = {
            "run_id": self.run_id,
            "command": self.command,
            "started_at": self.started_at,
            "ended_at": utc_now(),
            "status": status or self.status(),
            "exit_code": int(exit_code if exit_code is not None else self.exit_code()),
            "inputs": self.inputs,
            "units_read": t.read,
            "units_written": t.written + t.unchanged,
            "units_quarantined": t.quarantined,
            "units_ignored": t.ignored,
            "counts": self.counts_json(),
            "checks_passed": self.checks_passed,
            "checks_failed": self.checks_failed,
            "forced": self.forced,
            "watermarks": json.dumps(self.watermarks, sort_keys=True) if self.watermarks else None,
            "message": message,
            "twinline_version": __version__,
            "schema_version": self.store.schema.version,
        }
        table = self.store.schema.table("runs")
        self.store.append("runs", pa.Table.from_pylist([row], schema=table.arrow_schema))
