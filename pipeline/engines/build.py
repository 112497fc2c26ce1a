"""`twin build --engine spark`: twins assembled per patient bucket, on executors.

Every twin belongs to one bucket (`pipeline.twins.twin_bucket`, a stable hash of its
id), and everything a twin is built from carries its twin id, so a bucket is a
self-contained piece of work: each task reads the committed tables, keeps its bucket's
rows, decides which of its twins changed (`plan_build`) and assembles them with the
single process's own `_assemble`. The driver writes the staged results with the same
`_write` (row indexes, content hashes, upsert), removes twins that are gone, records
the run and commits once, under the store's lock.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..store import Store
from ..twins import BuildResult, Snapshot, _assemble, _write, begin_build, build_mode, end_build, plan_build
from .parts import Part
from .tasks import _stage_table, read_staged

# Staged twins are written to the store in groups of about this many timeline rows.
WRITE_ROWS = 500_000


def build_bucket(root: str, bucket: int, buckets: int, as_of: datetime | None, now: datetime, full: bool,
                 stage_dir: str) -> dict[str, Any]:
    """One task: plan and assemble the twins of one bucket; stage them; return the plan's tallies."""
    store = Store(root)
    snap = Snapshot(store, as_of)
    plan = plan_build(store, snap, full=full, bucket=(bucket, buckets))
    out: dict[str, Any] = {"part": bucket, "total": len(plan.hashes), "todo": plan.todo, "gone": plan.gone,
                           "staged": {}}
    if plan.todo:
        twins, timeline = _assemble(snap, pa.array(plan.todo, pa.string()), plan.hashes, now, None)  # type: ignore[arg-type]
        for name, data in (("twin", twins), ("timeline", timeline)):
            out["staged"][name] = _stage_table(stage_dir, bucket, name, data)
    return out


def spark_build(store: Store, spark, *, as_of: datetime | None = None, force: bool = False,
                buckets: int | None = None) -> BuildResult:
    """Assemble the twin and timeline tables on Spark, as one run (the same tables as `build_twins`)."""
    from .spark import run_tasks

    n = buckets or max(1, spark.sparkContext.defaultParallelism)
    with store.locked("build"):
        run, _snap, now, full = begin_build(store, as_of, force)
        result = BuildResult(run.run_id, now)
        stage = store.tmp_dir() / f"spark-{run.run_id}"
        stage.mkdir(parents=True, exist_ok=True)
        root = os.path.abspath(store.root)
        try:
            results = run_tasks(spark, [Part(b).to_json() for b in range(n)],
                                lambda p: build_bucket(root, p.index, n, as_of, now, full, str(stage)), "twin build")
            mode = build_mode(as_of)
            todo: list[str] = []
            gone: list[str] = []
            group: list[dict[str, Any]] = []
            rows = 0
            for r in results:
                todo += r["todo"]
                gone += r["gone"]
                if r["staged"]:
                    group.append(r)
                    rows += _rows(r["staged"]["timeline"])
                if rows >= WRITE_ROWS:
                    _write_group(store, run, result, group, mode)
                    group, rows = [], 0
            _write_group(store, run, result, group, mode)
            end_build(store, run, result, total=sum(r["total"] for r in results), rebuilt=len(todo),
                      gone=sorted(gone), force=force)
        except BaseException:
            store.rollback()
            raise
        finally:
            _clean(stage)
    return result


def _write_group(store: Store, run, result: BuildResult, group: list[dict[str, Any]], mode: str) -> None:
    """Write the twins of some buckets (twins never span buckets, so `_write` sees each whole)."""
    if not group:
        return
    twins = pa.concat_tables([read_staged(r["staged"]["twin"]) for r in group], promote_options="permissive")
    timeline = pa.concat_tables([read_staged(r["staged"]["timeline"]) for r in group], promote_options="permissive")
    todo = [t for r in group for t in r["todo"]]
    hashes = dict(zip(twins.column("twin_id").to_pylist(), twins.column("inputs_hash").to_pylist(), strict=True))
    _write(store, "twin", twins, run, mode, hashes)
    _write(store, "timeline", timeline, run, mode, hashes, all_units=todo)
    result.rebuilt += twins.num_rows
    result.timeline_rows += timeline.num_rows


def _rows(path: str) -> int:
    import pyarrow.ipc as ipc

    with pa.memory_map(path) as source:
        reader = ipc.open_file(source)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def _clean(stage: Path) -> None:
    import shutil

    shutil.rmtree(stage, ignore_errors=True)
