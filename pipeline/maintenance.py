"""`twin maintain`: merge a store's small files now, and give back the space of old versions.

Runs merge their tables' tiny files at their commit point on their own (store.py,
compact_small_files), so reads stay fast without this. What only an operator should
decide is deleting files: every table keeps the files of its earlier versions, so that
`twin build --as-of` can see the store as it was, and a listener's store grows by them.
`--vacuum-days N` deletes the files no version of the last N days needs; as-of builds
further back than that are no longer possible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .runs import Run
from .store import COMPACT_SIZE, Store, checkpoint_often, compact_small_files


@dataclass
class MaintainResult:
    run_id: str
    merged: dict[str, int] = field(default_factory=dict)     # table -> small files merged
    deleted: dict[str, int] = field(default_factory=dict)    # table -> old files deleted (--vacuum-days)

    def summary(self) -> str:
        lines = [f"run {self.run_id} (maintain)", f"  small files merged: {_per_table(self.merged)}"]
        if self.deleted:
            lines.append(f"  files of old versions deleted: {_per_table(self.deleted)}")
        return "\n".join(lines)


def _per_table(counts: dict[str, int]) -> str:
    return ", ".join(f"{t} {n}" for t, n in sorted(counts.items()) if n) or "none"


def maintain(store: Store, *, vacuum_days: float | None = None) -> MaintainResult:
    """Merge every table's small files (one commit each, recorded as a run) and checkpoint
    every table; then, with `vacuum_days`, delete the files that no version of the last
    `vacuum_days` days reads."""
    if vacuum_days is not None and vacuum_days < 0:
        raise ValueError("vacuum_days must be 0 or more")
    with store.locked("maintain"):
        run = Run(store, "maintain", inputs=[])
        result = MaintainResult(run.run_id)
        try:
            for name in store.schema.tables:
                dt = store.delta(name, latest=True)
                if dt is not None:
                    checkpoint_often(dt)
                    result.merged[name] = compact_small_files(dt, 2, COMPACT_SIZE)
            run.notes.append(f"small files merged: {_per_table(result.merged)}")
            run.record()
            store.commit(run.run_id)
        except BaseException:
            store.rollback()
            raise
        for name in store.schema.tables:
            dt = store.delta(name, latest=True)
            if dt is None:
                continue
            dt.create_checkpoint()  # a short log to replay from now on, not from the next checkpoint
            if vacuum_days is not None:
                # after the commit: the files the committed versions read are the latest's, never deleted
                result.deleted[name] = len(dt.vacuum(retention_hours=int(vacuum_days * 24), dry_run=False,
                                                     enforce_retention_duration=False))
        if vacuum_days is not None:
            # vacuum logs itself (two commits per table, the rows unchanged): committed too, or
            # the next run would take them for a killed run's writes and restore every table
            store.commit(run.run_id)
    return result


__all__ = ["MaintainResult", "maintain"]
