"""The gate: data-quality and bias checks over the twin tables, and the report (docs/gate.md).

    from pipeline.validation import run_gate, load_gate_config
    result = run_gate(tables, load_gate_config(None), now=now, schema=schema)
    write_report(result, out_dir)            # pipeline.validation.report

Great Expectations is imported only when the checks run: importing this package stays cheap.
"""

from .checks import CheckResult, GateResult, RowFailure
from .config import GateConfig, load_gate_config
from .gate import run_gate

__all__ = ["CheckResult", "GateConfig", "GateResult", "RowFailure", "load_gate_config", "run_gate"]
