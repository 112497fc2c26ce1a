"""The gate's configuration: documented defaults, every mistake reported at once, overrides that apply."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.errors import ConfigError, Exit
from pipeline.validation import load_gate_config, run_gate
from pipeline.validation.bias import suppress
from pipeline.validation.checks import KINDS
from pipeline.validation.synthetic import population, uniform_reference_csv

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 6, 1, tzinfo=UTC)


def test_the_defaults_load_and_follow_the_dqd_thresholds():
    c = load_gate_config(None)
    assert set(c.checks) == set(KINDS)
    assert c.check("required").threshold == 0.0 and c.check("unique-key").threshold == 0.0
    assert c.check("reference").threshold == 0.0
    assert c.check("after-birth").threshold == 0.01 and c.check("start-before-end").threshold == 0.01
    assert c.check("sex-specific").threshold == 0.05
    assert c.check("before-death").params["grace_days"] == 60
    assert {k for k, v in c.checks.items() if v.severity == "warn"} >= {
        "representation", "coverage-gap", "device-mix", "unknown-demographics", "freshness"}
    assert c.loinc["59408-5"] == {"%": (0.0, 100.0)}
    assert c.bias.min_group_size == 30 and c.bias.suppress_below == 11
    assert (c.bias.ratio_low, c.bias.ratio_high) == (0.8, 1.25)
    assert c.bias.dimensions["age_band"].band_labels == ("0-17", "18-64", "65+")


def test_the_default_reference_population_is_the_2020_census():
    c = load_gate_config(None)
    race = {g.group: g for g in c.bias.reference_for("race")}
    assert race["White"].codes == ("2106-3",) and race["White"].count == 204_277_273
    assert sum(g.count for g in race.values()) == 331_449_281
    assert sum(g.count for g in c.bias.reference_for("ethnicity")) == 331_449_281
    assert sum(g.count for g in c.bias.reference_for("age_band")) == 331_449_281
    assert [g.group for g in c.bias.reference_for("age_band")] == ["0-17", "18-64", "65+"]
    text = (REPO / "config" / "reference-population.csv").read_text()
    assert "Public Law 94-171" in text and "Table P1" in text


def test_every_problem_is_reported_with_its_key_path(tmp_path):
    bad = tmp_path / "gate.toml"
    bad.write_text("""
[checks.required]
severty = "error"
threshold = "none"
[checks.value-range]
severity = "fatal"
[checks.freshness]
quarantine = true
[checks.nope]
severity = "warn"
[loinc."8867-4"]
units = { "/min" = [10] }
[bias]
min_group_size = 2.5
[bias.dimensions.sex]
colum = "sex"
""")
    with pytest.raises(ConfigError) as e:
        load_gate_config(bad)
    problems = e.value.problems
    expected = [
        "checks.required.severty: unknown key (did you mean severity?)",
        "checks.required.threshold: expected a number, got a string",
        "checks.value-range.severity: 'fatal' is not one of error, warn",
        "checks.freshness.quarantine: unknown key",
        "checks.nope: unknown key",
        'loinc.8867-4.units."/min": expected 2 items, got 1',
        "bias.min_group_size: expected an integer, got a number",
        "bias.dimensions.sex.colum: unknown key (did you mean column?)",
    ]
    for p in expected:
        assert p in problems, (p, problems)
    assert e.value.exit_code == Exit.USAGE
    assert str(bad) in str(e.value)


def test_a_bad_reference_file_is_reported_by_line(tmp_path):
    (tmp_path / "ref.csv").write_text(
        "# comment\ndimension,group,codes,count\nsex,female,female,10\nsexx,male,male,10\n"
        "age_band,0-20,,5\nrace,White,2106-3,many\n")
    (tmp_path / "gate.toml").write_text('[bias]\nreference = "ref.csv"\n')
    with pytest.raises(ConfigError) as e:
        load_gate_config(tmp_path / "gate.toml")
    text = "\n".join(e.value.problems)
    assert "ref.csv:4: dimension 'sexx' is not in bias.dimensions (did you mean sex?)" in text
    assert "ref.csv:5: age band '0-20' does not match the bands" in text
    assert "ref.csv:6: count must be a whole number" in text


def test_invalid_toml_and_missing_files_are_config_errors(tmp_path):
    (tmp_path / "gate.toml").write_text("[checks\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_gate_config(tmp_path / "gate.toml")
    with pytest.raises(ConfigError, match="not found"):
        load_gate_config(tmp_path / "absent.toml")


@pytest.fixture(scope="module")
def schema():
    return json.loads((REPO / "schemas" / "twin-v1.json").read_text())


@pytest.fixture(scope="module")
def broken(schema):
    """The synthetic population with three observations missing their status."""
    t = population(schema, NOW, per_cell=10)
    obs = t["observation"]
    mask = pa.array([i % 500 == 0 for i in range(obs.num_rows)])
    status = pc.if_else(mask, pa.scalar(None, pa.string()), obs.column("status"))
    t["observation"] = obs.set_column(obs.schema.get_field_index("status"), "status", status)
    return t


def _config(tmp_path: Path, extra: str = ""):
    (tmp_path / "ref.csv").write_text(uniform_reference_csv())
    (tmp_path / "gate.toml").write_text('[bias]\nreference = "ref.csv"\n' + extra)
    return load_gate_config(tmp_path / "gate.toml")


def test_an_override_changes_one_column_only(tmp_path, broken, schema):
    cfg = _config(tmp_path, '[checks.required.overrides]\n"observation.status" = { severity = "warn", quarantine = false }\n')
    assert cfg.check("required", "observation", "status").severity == "warn"
    assert cfg.check("required", "observation", "observation_id").severity == "error"
    result = run_gate(broken, cfg, now=NOW, schema=schema)
    failed = [c for c in result.checks if not c.passed]
    assert [(c.id, c.severity) for c in failed] == [("required:observation.status", "warn")]
    assert result.passed and result.row_failure_count == 0


def test_quarantine_sends_exactly_the_failing_rows(tmp_path, broken, schema):
    result = run_gate(broken, _config(tmp_path), now=NOW, schema=schema)
    rows = list(result.row_failures)
    assert not result.passed
    assert len(rows) == 3 == result.row_failure_count
    assert {(r.check, r.table, r.source) for r in rows} == {("required", "observation", "test")}
    assert all(r.unit_key.startswith("Observation/") and r.source_ref.startswith("observation.ndjson:") for r in rows)
    assert "observation.status" in rows[0].message


def test_a_disabled_check_is_not_run(tmp_path, broken, schema):
    result = run_gate(broken, _config(tmp_path, "[checks.required]\nenabled = false\n"), now=NOW, schema=schema)
    assert not any(c.name == "required" for c in result.checks)
    assert result.passed


def test_small_counts_are_suppressed_and_cannot_be_recovered():
    assert suppress({"a": 100, "b": 5, "c": 40}, 11) == {"a": 100, "b": None, "c": None}
    assert suppress({"a": 100, "b": 5, "c": 3}, 11) == {"a": 100, "b": None, "c": None}
    assert suppress({"a": 100, "b": 0}, 11) == {"a": 100, "b": 0}
    assert suppress({"a": 100, "b": 11}, 11) == {"a": 100, "b": 11}


def test_importing_the_gate_does_not_import_great_expectations():
    """GX takes seconds to import: only running the checks may pay for it."""
    import subprocess
    import sys

    code = ("import sys, pipeline.validation, pipeline.validation.report; "
            "print(any(m.startswith('great_expectations') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
