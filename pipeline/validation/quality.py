"""Column-level expectations, run by Great Expectations 1.x.

One ephemeral GX context per gate run (nothing is written to the working directory,
no GX Cloud), one pandas batch per table, one suite per table holding every
expectation derived from the schema and the config:

  required        ExpectColumnValuesToNotBeNull          columns the schema marks required
  allowed-values  ExpectColumnValuesToBeInSet            the schema's `values`, config code lists
  code-system     ExpectColumnValuesToBeInSet            X_system columns against X's code_systems
  future-date     ExpectColumnValuesToBeBetween          time columns, max = now + tolerance
  unique-key      ExpectCompoundColumnsToBeUnique        the schema's key + source

Checks that need a lookup per row (units and ranges per LOINC) or another table are in
plain pyarrow (measurements, completeness, plausibility): GX would need one conditional
expectation per code and unit, each a full-table filter (measured: 45 of them take ~10 s
on 1M rows, against ~0.2 s for one pyarrow join).

GX is imported here, inside the function, because importing it takes seconds.
Only the columns an expectation needs are converted to pandas (numpy-backed: the
ArrowDtype-backed frames are ~30x slower in GX 1.24).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from .checks import Finding
from .config import GateConfig
from .layout import TableLayout

log = logging.getLogger(__name__)


@dataclass
class _Planned:
    kind: str
    column: str | None
    expectation: Any
    columns: tuple[str, ...]
    nonmissing: bool  # denominator = rows where the column is set (else: all rows)


def _plan(gxe, layout: TableLayout, data: pa.Table, config: GateConfig, now: datetime) -> list[_Planned]:
    present = set(data.column_names)
    plan: list[_Planned] = []

    def on(kind: str, column: str | None) -> bool:
        return config.check(kind, layout.name, column).enabled

    for col, spec in layout.columns.items():
        if col not in present:
            continue  # column-present reports it
        if spec.required and on("required", col):
            plan.append(_Planned("required", col, gxe.ExpectColumnValuesToNotBeNull(column=col), (col,), False))
        allowed = spec.values or tuple(config.code_lists.get(f"{layout.name}.{col}", ()))
        if allowed and on("allowed-values", col):
            plan.append(_Planned("allowed-values", col,
                                 gxe.ExpectColumnValuesToBeInSet(column=col, value_set=sorted(allowed)), (col,), True))
        system = layout.system_column(col)
        if spec.code_systems and system in present and on("code-system", system):
            plan.append(_Planned("code-system", system,
                                 gxe.ExpectColumnValuesToBeInSet(column=system, value_set=list(spec.code_systems)),
                                 (system,), True))
    latest = now + timedelta(hours=float(config.check("future-date").params.get("tolerance_hours", 24)))
    import pandas as pd

    for col in layout.temporal:
        if col in present and on("future-date", col):
            plan.append(_Planned("future-date", col,
                                 gxe.ExpectColumnValuesToBeBetween(column=col, max_value=pd.Timestamp(latest)),
                                 (col,), True))
    key = list(layout.key) + (["source"] if layout.provenance else [])
    if key and all(k in present for k in key) and on("unique-key", None):
        plan.append(_Planned("unique-key", None, gxe.ExpectCompoundColumnsToBeUnique(column_list=key), tuple(key), True))
    for i, p in enumerate(plan):
        p.expectation.meta = {"gate": i}
    return plan


@contextlib.contextmanager
def _main_module_with_a_file():
    """Give `__main__` a file name while Great Expectations is imported.

    GE imports PySpark when it is installed, and PySpark's connect module calls
    sys.exit(0) when `__main__` has no file (it takes that for a doctest run): under
    `python -c` (a scheduler's wrapper, a test subprocess) the whole process would end,
    silently, with success. The name is removed again after the import.
    """
    main = sys.modules.get("__main__")
    patch = main is not None and getattr(main, "__spec__", None) is None and not hasattr(main, "__file__")
    if patch:
        main.__file__ = "<twinline>"
    try:
        yield
    finally:
        if patch:
            del main.__file__


def column_checks(tables: Mapping[str, pa.Table], layouts: Mapping[str, TableLayout], config: GateConfig,
                  now: datetime) -> list[Finding]:
    """Run the expectations of every table; one Finding per expectation."""
    with warnings.catch_warnings(), _main_module_with_a_file():
        # GE imports PySpark when it is installed (the spark extra), which warns about pandas 3
        warnings.simplefilter("ignore", FutureWarning)
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.data_context.types.base import ProgressBarsConfig

    quiet = logging.getLogger().getEffectiveLevel() > logging.DEBUG
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("great_expectations") and quiet:
            logging.getLogger(name).setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("twinline-gate")
    findings: list[Finding] = []
    for name, data in tables.items():
        layout = layouts.get(name)
        if layout is None or data.num_rows == 0:
            continue
        plan = _plan(gxe, layout, data, config, now)
        if not plan:
            continue
        needed = list(dict.fromkeys(c for p in plan for c in p.columns))
        frame = data.select(needed).to_pandas()
        suite = gx.ExpectationSuite(name=f"twinline-{name}")
        for p in plan:
            suite.add_expectation(p.expectation)
        definition = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        outcome = _validate(definition, frame, suite)
        for r in outcome.results:
            findings.append(_finding(plan[r.expectation_config.meta["gate"]], name, r, data.num_rows))
    return findings


_RESULT_FORMAT = {"result_format": "COMPLETE", "partial_unexpected_count": 0, "return_unexpected_index_query": False}


def _validate(definition: Any, frame: Any, suite: Any) -> Any:
    """Validate `frame` once.

    The public `definition.get_batch(...).validate(suite)` builds the batch twice, and GX
    fingerprints every pandas batch by hashing all of it: on 1M observation rows that
    second hash is a quarter of the gate's time. `Batch.validate` delegates to the v1
    Validator; calling it directly builds the batch once. Should a GX 1.x release move
    it, the public path still works.
    """
    try:
        from great_expectations.validator.v1_validator import Validator
    except ImportError:  # pragma: no cover - depends on the GX release
        return definition.get_batch(batch_parameters={"dataframe": frame}).validate(suite, result_format=_RESULT_FORMAT)
    return Validator(batch_definition=definition, batch_parameters={"dataframe": frame},
                     result_format=_RESULT_FORMAT).validate_expectation_suite(suite)


def _finding(p: _Planned, table: str, r: Any, n_rows: int) -> Finding:
    info = r.exception_info or {}
    if info.get("raised_exception"):
        # The message of a GX exception can quote values: log its class only.
        log.warning("gate: expectation %s on %s.%s could not be evaluated", p.kind, table, p.column)
        return Finding(p.kind, table, p.column, failing=n_rows, denominator=n_rows, verdict=False,
                       summary="could not be evaluated (check the column's type)")
    res = r.result
    element = int(res.get("element_count", n_rows))
    missing = int(res.get("missing_count") or 0)
    failing = int(res.get("unexpected_count") or 0)
    rows = np.asarray(res.get("unexpected_index_list") or [], dtype=np.int64)
    denominator = element - missing if p.nonmissing else element
    return Finding(p.kind, table, p.column, failing=failing, denominator=denominator, rows=rows)


__all__ = ["column_checks"]
