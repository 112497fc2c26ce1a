"""`twin check`: the gate as a run, and the verdict `twin build` obeys.

The checks themselves live in pipeline.validation; this module reads the committed
tables, runs them, sends rows that fail a row-level check to quarantine (stage
`gate`, reason = the check; nothing is deleted from the tables), writes the report
and records the run, whose status (`ok` or `gate_failed`) is what `twin build` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .errors import ConfigError, Exit
from .runs import Run, last_run
from .store import Store
from .temporal import utc_now
from .units import Rejected

GATE_TABLES = ("patient", "patient_identifier", "encounter", "observation", "condition", "medication", "procedure",
               "immunization", "allergy", "diagnostic_report", "imaging_study", "imaging_series", "device")


@dataclass
class CheckOutcome:
    run: Run
    passed: bool
    report_html: Path
    report_json: Path
    failed: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    def summary(self) -> str:
        s = self.counts
        lines = [f"run {self.run.run_id} (check): {'passed' if self.passed else 'FAILED'}: {s.get('checks', 0)} checks, "
                 f"{s.get('failed_errors', 0)} error(s), {s.get('failed_warnings', 0)} warning(s), "
                 f"{s.get('rows_to_quarantine', 0):,} row(s) quarantined",
                 f"  report: {self.report_html}"]
        lines += [f"  {line}" for line in self.failed]
        lines += [f"  note: {n}" for n in self.run.notes]
        return "\n".join(lines)


def run_check(store: Store, *, config: str | Path | None = None, report_dir: str | Path | None = None,
              now: datetime | None = None, spark=None) -> CheckOutcome:
    """Run the gate as a run. `spark`: a SparkSession to run it partitioned by patient
    (pipeline.engines.gate); the verdict and counts are the same."""
    from .validation import load_gate_config, run_gate
    from .validation.report import failed_lines, write_report

    cfg = load_gate_config(config)
    if not any(store.exists(t) for t in GATE_TABLES):
        # "passed: 0 checks" would read as a clean bill of health for data that is not there
        raise ConfigError("nothing to check: the store has no data yet (import something first)")
    with store.locked("check"):
        run = Run(store, "check", inputs=[str(config) if config else "config/gate.toml"])
        try:
            present = [t for t in GATE_TABLES if store.exists(t)]
            if spark is not None:
                from .engines.gate import spark_gate

                result = spark_gate(store, spark, present, cfg, now=now or utc_now())
            else:
                tables = {t: store.read(t).combine_chunks() for t in present}
                result = run_gate(tables, cfg, now=now or utc_now(), schema=store.schema.raw)
            still = {run.quarantine(f.source or "unknown", "gate", Rejected(
                "gate", f.check, f.message, f.source_ref or f.row_ref, payload_ref=f.row_ref, target_table=f.table))
                for f in result.row_failures}
            resolved = _resolve_passing_entries(store, run, still)
            if resolved:
                run.notes.append(f"{resolved:,} gate quarantine entr{'y' if resolved == 1 else 'ies'} resolved: "
                                 "their rows pass now")
            out = Path(report_dir) if report_dir else store.meta / "reports" / run.run_id
            html, js = write_report(result, out)
            summary = result.summary()
            run.checks_passed = sum(1 for c in result.checks if c.passed)
            run.checks_failed = sum(1 for c in result.checks if not c.passed)
            # gate rows are not units read from a source: keep the source tallies out of it
            for c in run.counts.values():
                c.read = c.quarantined
            run.record(status="ok" if result.passed else "gate_failed",
                       exit_code=int(Exit.OK if result.passed else Exit.GATE_FAILED),
                       message=f"report {html}")
            store.commit(run.run_id)
        except BaseException:
            store.rollback()
            raise
    return CheckOutcome(run, result.passed, html, js, failed_lines(result), summary)


def _resolve_passing_entries(store: Store, run: Run, still: set[str]) -> int:
    """Open gate entries not among `still` (this check's entries: their rows no longer
    fail, fixed at the source and re-imported, or a threshold changed) leave quarantine,
    resolved by this run. The build holds back the rows of open gate entries, so an entry
    left open would hide a fixed row forever."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not store.exists("quarantine"):
        return 0
    t = store.read("quarantine", latest=True, filter=(pc.field("stage") == "gate") & (pc.field("status") == "open"))
    done = [e for e in t.to_pylist() if e["quarantine_id"] not in still]
    for e in done:
        e["status"] = "resolved"
        e["resolved_run_id"] = run.run_id
    if done:
        store.merge_by_key("quarantine", pa.Table.from_pylist(done, schema=store.schema.table("quarantine").arrow_schema))
    return len(done)


def last_gate_failed(store: Store) -> bool:
    """Did the most recent `check` run fail? (`twin build` refuses to build after it unless forced.)"""
    last = last_run(store, "check")
    return last is not None and last["status"] == "gate_failed"
