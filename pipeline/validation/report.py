"""The gate report: one static HTML page and a JSON file with the same content.

The page is for the integrator who must decide what to fix: it leads with the verdict,
then every failed check with what failed, how much, the first locators to look at and
what to do, then the bias picture as charts, then every check in a table. It is
self-contained (inline CSS and SVG, no scripts, fonts or network), so it can be mailed,
archived and opened offline. Like the results it is made from, it holds counts,
shares and locators, never patient values; bias counts under the suppression limit are
already hidden in the results.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from .checks import CATEGORIES, KINDS, CheckResult, GateResult
from .plots import grouped_bars, stacked_bars

REPORT_VERSION = 1


def report_data(result: GateResult) -> dict[str, Any]:
    """The report's content as plain JSON-ready data (what report.json holds)."""
    return {
        "report": "twinline-gate",
        "version": REPORT_VERSION,
        "generated_at": datetime.now(UTC).isoformat(),
        "now": result.now.isoformat(),
        "passed": result.passed,
        "summary": result.summary(),
        "tables": result.tables,
        "config": result.config_source,
        "checks": [c.to_dict() for c in result.checks],
    }


def write_report(result: GateResult, out_dir: Path) -> tuple[Path, Path]:
    """Write report.html and report.json into `out_dir` (created if needed); return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = report_data(result)
    html_path, json_path = out_dir / "report.html", out_dir / "report.json"
    _write_atomic(json_path, json.dumps(data, indent=1, default=str, ensure_ascii=False))
    _write_atomic(html_path, render_html(data))
    return html_path, json_path


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d1d1d;background:#fafafa}
main{max-width:1080px;margin:0 auto;padding:0 20px 40px}
header.verdict{padding:18px 20px;color:#fff}
header.verdict h1{margin:0;font-size:22px}
.pass{background:#2e7d32}.fail{background:#b3261e}
section{margin-top:26px}
h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px}
article.check{background:#fff;border:1px solid #ddd;border-left:6px solid #999;padding:10px 14px;margin:12px 0}
article.severity-error{border-left-color:#b3261e}article.severity-warn{border-left-color:#e6a100}
article h3{margin:0 0 4px;font-size:15px;font-family:ui-monospace,monospace}
.badge{display:inline-block;font-size:11px;padding:1px 6px;border-radius:3px;color:#fff;margin-right:6px;font-family:sans-serif}
.badge.error{background:#b3261e}.badge.warn{background:#a86f00}.badge.passed{background:#2e7d32}
.badge.not-applicable{background:#777}
dl.numbers{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:6px 0}
dl.numbers dt{color:#555}dl.numbers dd{margin:0}
.advice{background:#f3f6fb;padding:6px 10px}
ul.examples{font-family:ui-monospace,monospace;font-size:12px;color:#333}
table{border-collapse:collapse;width:100%;background:#fff;font-size:12.5px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#eee}
tr.failed td{background:#fff1f0}
.plots{display:flex;flex-wrap:wrap;gap:14px}
.plots figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px}
details summary{cursor:pointer;font-weight:600;margin:8px 0}
"""


def _fmt(value: float | None, unit: str) -> str:
    """A number in the unit of its check: shares and gaps as percentages, days as days."""
    if value is None:
        return "—"
    if unit == "days":
        return f"{value:g} days"
    if unit == "share" or "gap" in unit:
        return f"{value * 100:.3g}%"
    return f"{value:.3g}"


def _fmt_observed(c: dict[str, Any]) -> str:
    return _fmt(c["observed"], c["details"].get("observed_unit", "share"))


def _fmt_threshold(c: dict[str, Any]) -> str:
    return _fmt(c["threshold"], c["details"].get("observed_unit", "share"))


def _plot(c: dict[str, Any]) -> str:
    d, name = c["details"], c["name"]
    groups = d.get("groups") or []
    if not groups:
        return ""
    labels = [g["group"] for g in groups]
    if name == "representation":
        return grouped_bars(f"Share of patients by {d['dimension']}: data vs reference", labels,
                            {"in the data": [g["share"] for g in groups],
                             "reference": [g["reference_share"] for g in groups]}, kind="representation")
    if name == "coverage-gap":
        return grouped_bars(f"Patients without {d['measure']}, by {d['dimension']}", labels,
                            {"missing rate": [g["missing_rate"] for g in groups]}, kind="coverage-gap",
                            scale=1.0 if d["overall_missing_rate"] > 0.5 else None, marker=d["overall_missing_rate"])
    if name == "device-mix":
        devices = [m["device"] for m in groups[0]["devices"]]
        overall = [[m["overall_share"] for m in groups[0]["devices"]]]
        shares = [[m["share"] for m in g["devices"]] for g in groups]
        return stacked_bars(f"Device models measuring {d['measure']}, by {d['dimension']}", ["overall", *labels],
                            devices, overall + shares, kind="device-mix")
    return ""


def _card(c: dict[str, Any]) -> str:
    ex = c["details"].get("examples") or []
    plot = _plot(c)
    rows = [("observed", _fmt_observed(c)), ("allowed up to", _fmt_threshold(c)),
            ("failing", f"{c['failing_count']:,} of {c['denominator']:,}"), ("category", c["category"])]
    return "".join([
        f'<article class="check failed severity-{escape(c["severity"])}" data-check-id="{escape(c["id"])}">',
        f'<h3><span class="badge {escape(c["severity"])}">{escape(c["severity"])}</span>{escape(c["id"])}</h3>',
        f'<p class="message">{escape(c["message"])}</p>',
        '<dl class="numbers">', *(f"<dt>{k}</dt><dd>{escape(v)}</dd>" for k, v in rows), "</dl>",
        f'<p class="advice"><strong>What to do:</strong> {escape(c["advice"])}</p>',
        (("<p>First rows to look at (source_ref):</p><ul class=\"examples\">"
          + "".join(f"<li>{escape(str(e))}</li>" for e in ex) + "</ul>") if ex else ""),
        (f'<figure class="plot-figure">{plot}</figure>' if plot else ""),
        "</article>",
    ])


def _summary_plot(summary: dict[str, Any]) -> str:
    cats = [c for c in CATEGORIES if sum(summary["by_category"][c].values())]
    shares = []
    for c in cats:
        counts = summary["by_category"][c]
        total = sum(counts.values())
        shares.append([counts["passed"] / total, counts["failed"] / total, counts["not-applicable"] / total])
    return stacked_bars("Checks by category", cats, ["passed", "failed", "not applicable"], shares, kind="summary",
                        colors=("#2e7d32", "#b3261e", "#9e9e9e"))


def _unknown_plot(checks: list[dict[str, Any]]) -> str:
    unknown = [c for c in checks if c["name"] == "unknown-demographics" and c["denominator"]]
    if not unknown:
        return ""
    return grouped_bars("Patients with unknown demographics", [c["column"] for c in unknown],
                        {"unknown": [c["observed"] for c in unknown]}, kind="unknown-demographics")


def render_html(data: dict[str, Any]) -> str:
    checks = data["checks"]
    failed = sorted((c for c in checks if not c["passed"]), key=lambda c: (c["severity"] != "error", c["id"]))
    s = data["summary"]
    verdict = "PASSED" if data["passed"] else "FAILED"
    lead = ("No error-level check failed: twins may be built."
            if data["passed"] else
            f"{s['failed_errors']} error-level check(s) failed: `twin build` will refuse until they are fixed "
            f"(or it is forced, which the runs table records).")
    # coverage charts where nobody misses the measure say nothing: leave them out
    bias = [c for c in checks if c["category"] == "bias" and c["denominator"] and _plot(c)
            and not (c["name"] == "coverage-gap" and c["details"]["overall_missing_rate"] == 0)]
    html = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Twinline gate report: {verdict}</title><style>{CSS}</style></head><body>",
        f'<header class="verdict {"pass" if data["passed"] else "fail"}" id="verdict" data-passed="{str(data["passed"]).lower()}">',
        f"<h1>Gate {verdict}</h1><p>{escape(lead)}</p></header><main>",
        '<section id="summary"><h2>Summary</h2>',
        f"<p>Checked at {escape(data['now'])} with {escape(data['config'])}. "
        f"{s['checks']} checks: {s['failed_errors']} errors and {s['failed_warnings']} warnings failed; "
        f"{s['rows_to_quarantine']:,} rows go to quarantine (stage gate).</p>",
        "<table><tr><th>table</th><th>rows</th></tr>",
        *(f"<tr><td>{escape(t)}</td><td>{n:,}</td></tr>" for t, n in data["tables"].items()),
        "</table>", f'<div class="plots"><figure>{_summary_plot(s)}</figure></div></section>',
        f'<section id="failed"><h2>Failed checks ({len(failed)})</h2>',
        *(_card(c) for c in failed),
        "" if failed else "<p>None.</p>", "</section>",
        '<section id="bias"><h2>Bias</h2>',
        "<p>Representation against the reference population, measures missing by group, and device mix "
        "by group. Counts under the suppression limit are not shown.</p>",
        f'<div class="plots"><figure>{_unknown_plot(checks)}</figure>',
        *(f'<figure data-check-id="{escape(c["id"])}">{_plot(c)}</figure>' for c in bias), "</div></section>",
        '<section id="checks"><h2>All checks</h2><details><summary>Show all '
        f"{len(checks)} checks</summary><table>",
        "<tr><th>check</th><th>category</th><th>severity</th><th>status</th><th>observed</th><th>threshold</th>"
        "<th>failing</th><th>of</th></tr>",
        *(f'<tr class="{escape(c["status"])}"><td>{escape(c["id"])}</td><td>{escape(c["category"])}</td>'
          f'<td>{escape(c["severity"])}</td><td><span class="badge {escape(c["status"])}">{escape(c["status"])}</span></td>'
          f"<td>{escape(_fmt_observed(c))}</td><td>{escape(_fmt_threshold(c))}</td>"
          f"<td>{c['failing_count']:,}</td><td>{c['denominator']:,}</td></tr>" for c in checks),
        "</table></details></section>",
        '<section id="about"><h2>About these checks</h2><table><tr><th>check</th><th>category</th><th>what to do when it fails</th></tr>',
        *(f"<tr><td>{escape(k)}</td><td>{escape(v.category)}</td><td>{escape(v.advice)}</td></tr>" for k, v in KINDS.items()),
        "</table></section>",
        "</main></body></html>",
    ]
    return "\n".join(html)


def failed_lines(result: GateResult) -> list[str]:
    """One line per failed check, errors first: for the CLI summary."""
    failed: list[CheckResult] = sorted(result.failed, key=lambda c: (c.severity != "error", c.id))
    return [f"{c.severity.upper():5} {c.id}: {c.message}" for c in failed]


__all__ = ["failed_lines", "render_html", "report_data", "write_report"]
