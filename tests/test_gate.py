"""The gate on a balanced synthetic population: it passes as built, and each way of breaking
it fails exactly the check made to catch that break, and no other.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.validation import load_gate_config, run_gate
from pipeline.validation.synthetic import population, uniform_reference_csv

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((REPO / "schemas" / "twin-v1.json").read_text())


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate-config")
    (d / "reference.csv").write_text(uniform_reference_csv())
    (d / "gate.toml").write_text('[bias]\nreference = "reference.csv"\n')
    return load_gate_config(d / "gate.toml")


@pytest.fixture(scope="module")
def base(schema) -> dict[str, pa.Table]:
    return population(schema, NOW, per_cell=10)


def failing(result) -> set[str]:
    return {c.id for c in result.checks if not c.passed}


# --------------------------------------------------------------------------- helpers that break the data


def where(table: pa.Table, column: str, mask, value) -> pa.Table:
    """`table` with `column` set to `value` on the rows of `mask`."""
    col = table.column(column)
    new = pc.if_else(mask, pa.scalar(value, col.type), col)
    return table.set_column(table.schema.get_field_index(column), column, new)


def every(table: pa.Table, k: int, offset: int = 0) -> pa.Array:
    """Every k-th row."""
    import numpy as np

    return pa.array((np.arange(table.num_rows) % k) == offset)


def patient_attr(tables, table: str, column: str) -> pa.ChunkedArray:
    """A patient attribute for each row of `table`."""
    pat = tables["patient"]
    idx = pc.index_in(tables[table].column("patient_id"), value_set=pat.column("patient_id"))
    return pc.take(pat.column(column), idx)


def keep_patients(tables, mask) -> dict[str, pa.Table]:
    kept = tables["patient"].filter(mask).column("patient_id")
    out = {}
    for name, t in tables.items():
        out[name] = t.filter(pc.is_in(t.column("patient_id"), value_set=kept)) if name not in ("device",) else t
    return out


def most_women_removed(t):
    pat = t["patient"]
    keep = pc.or_(pc.equal(pat.column("sex"), "male"), every(pat, 4))
    return keep_patients(t, keep)


def spo2_removed_for_black_patients(t):
    obs = t["observation"]
    drop = pc.and_(pc.equal(obs.column("code"), "59408-5"), pc.equal(patient_attr(t, "observation", "race_code"), "2054-5"))
    return {**t, "observation": obs.filter(pc.invert(drop))}


def future_dates(t):
    obs = t["observation"]
    return {**t, "observation": where(obs, "effective_start", every(obs, 20), NOW + timedelta(days=60))}


def impossible_values(t):
    obs = t["observation"]
    spo2 = pc.equal(obs.column("code"), "59408-5")
    return {**t, "observation": where(obs, "value_number", pc.and_(spo2, every(obs, 10)), 300.0)}


def broken_references(t):
    obs = t["observation"]
    return {**t, "observation": where(obs, "encounter_id", every(obs, 500), "no-such-encounter")}


def duplicate_keys(t):
    obs = t["observation"]
    hr = obs.filter(pc.equal(obs.column("code"), "8867-4")).slice(0, 3)
    return {**t, "observation": pa.concat_tables([obs, hr])}


def missing_required(t):
    obs = t["observation"]
    return {**t, "observation": where(obs, "status", every(obs, 500), None)}


def unknown_category(t):
    obs = t["observation"]
    return {**t, "observation": where(obs, "category_code", every(obs, 500), "vital-sign")}


def wrong_unit(t):
    obs = t["observation"]
    hba1c = pc.equal(obs.column("code"), "4548-4")
    return {**t, "observation": where(obs, "value_unit", pc.and_(hba1c, every(obs, 5)), "mmol/mol")}


def local_code_system(t):
    cond = t["condition"]
    return {**t, "condition": where(cond, "code_system", every(cond, 10), "urn:oid:1.2.3.4.local")}


def pregnant_men(t):
    cond = t["condition"]
    htn_of_men = pc.and_(pc.equal(cond.column("code"), "38341003"), pc.equal(patient_attr(t, "condition", "sex"), "male"))
    extra = cond.filter(htn_of_men).slice(0, 30)
    extra = where(extra, "code", pa.array([True] * extra.num_rows), "72892002")
    extra = extra.set_column(0, "condition_id", pc.binary_join_element_wise(extra.column("condition_id"), "x", ""))
    return {**t, "condition": pa.concat_tables([cond, extra])}


def events_before_birth(t):
    cond = t["condition"]
    return {**t, "condition": where(cond, "onset", every(cond, 20), datetime(1900, 1, 1, tzinfo=UTC))}


def events_after_death(t):
    """Some patients died 100 days ago; all their events are older, but their conditions' onsets are not."""
    pat = t["patient"]
    dead = every(pat, 10)
    died, before = NOW - timedelta(days=100), NOW - timedelta(days=120)
    out = {**t, "patient": where(where(pat, "deceased_at", dead, died), "deceased_at_precision", dead, "day")}
    gone = pat.filter(dead).column("patient_id")
    for name, cols in (("encounter", ("period_start", "period_end")), ("observation", ("effective_start",)),
                       ("imaging_study", ("started",))):
        tab = out[name]
        for c in cols:
            tab = where(tab, c, pc.is_in(tab.column("patient_id"), value_set=gone), before)
        out[name] = tab
    return out


def period_reversed(t):
    enc = t["encounter"]
    return {**t, "encounter": where(enc, "period_end", every(enc, 10), NOW - timedelta(days=400))}


def patients_without_data(t):
    pat = t["patient"]
    extra = pat.filter(every(pat, 10))
    extra = extra.set_column(0, "patient_id", pc.binary_join_element_wise(extra.column("patient_id"), "nodata", "-"))
    extra = extra.set_column(extra.schema.get_field_index("twin_id"), "twin_id",
                             pc.binary_join_element_wise("T", extra.column("patient_id"), ""))
    return {**t, "patient": pa.concat_tables([pat, extra])}


def unknown_race(t):
    pat = t["patient"]
    return {**t, "patient": where(pat, "race_code", every(pat, 10), None)}


def stale_source(t):
    img = t["imaging_study"]
    return {**t, "imaging_study": where(img, "ingested_at", every(img, 1), NOW - timedelta(days=30))}


def one_oximeter_for_black_patients(t):
    obs = t["observation"]
    black_spo2 = pc.and_(pc.equal(obs.column("code"), "59408-5"),
                         pc.equal(patient_attr(t, "observation", "race_code"), "2054-5"))
    return {**t, "observation": where(obs, "device_id", black_spo2, "ox-b")}


def value_number_as_float32(t):
    obs = t["observation"]
    i = obs.schema.get_field_index("value_number")
    return {**t, "observation": obs.set_column(i, "value_number", pc.cast(obs.column("value_number"), pa.float32()))}


def encounter_status_dropped(t):
    return {**t, "encounter": t["encounter"].drop_columns(["status"])}


BREAKS = {
    most_women_removed: "representation:patient.sex",
    spo2_removed_for_black_patients: "coverage-gap:observation.spo2/race",
    future_dates: "future-date:observation.effective_start",
    impossible_values: "value-range:observation.value_number",
    broken_references: "reference:observation.encounter_id",
    duplicate_keys: "unique-key:observation",
    missing_required: "required:observation.status",
    unknown_category: "allowed-values:observation.category_code",
    wrong_unit: "unit:observation.value_unit",
    local_code_system: "code-system:condition.code_system",
    pregnant_men: "sex-specific:condition.code",
    events_before_birth: "after-birth:condition.onset",
    events_after_death: "before-death:condition.onset",
    period_reversed: "start-before-end:encounter.period_end",
    patients_without_data: "patients-without-data:patient",
    unknown_race: "unknown-demographics:patient.race",
    stale_source: "freshness:imaging_study.ingested_at@test",
    one_oximeter_for_black_patients: "device-mix:observation.spo2/race",
    value_number_as_float32: "column-type:observation",
    encounter_status_dropped: "column-present:encounter",
}


def test_the_balanced_population_passes_every_check(base, config, schema):
    result = run_gate(base, config, now=NOW, schema=schema)
    assert failing(result) == set()
    assert result.passed
    assert list(result.row_failures) == []
    categories = {c.category for c in result.checks if c.status == "passed"}
    assert categories == {"conformance", "completeness", "plausibility", "uniqueness", "freshness", "bias"}


@pytest.mark.parametrize("breaker", list(BREAKS), ids=[b.__name__ for b in BREAKS])
def test_each_break_fails_its_check_and_only_it(breaker, base, config, schema):
    result = run_gate(breaker(base), config, now=NOW, schema=schema)
    assert failing(result) == {BREAKS[breaker]}
    check = next(c for c in result.checks if c.id == BREAKS[breaker])
    assert check.failing_count > 0 and check.message
    assert result.passed == (check.severity == "warn")


def test_great_expectations_writes_nothing_to_the_working_directory(base, config, schema, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_gate(base, config, now=NOW, schema=schema)
    assert list(tmp_path.iterdir()) == []


def test_hostile_shapes_do_not_crash_the_gate(base, config, schema):
    assert run_gate({}, config, now=NOW, schema=schema).checks == []
    # no patient table: references to it are not applicable, bias is not judged
    alone = run_gate({"observation": base["observation"]}, config, now=NOW.replace(tzinfo=None), schema=schema)
    assert alone.passed
    ref = next(c for c in alone.checks if c.id == "reference:observation.patient_id")
    assert ref.status == "not-applicable" and "patient" in ref.details["note"]
    assert not any(c.category == "bias" for c in alone.checks)
    # a table the schema does not know is skipped; empty tables and all-null columns are fine
    empty = {n: t.slice(0, 0) for n, t in base.items()}
    assert run_gate({**empty, "not_a_table": pa.table({"x": [1]})}, config, now=NOW, schema=schema).passed
    pat = base["patient"]
    nulls = pat.set_column(pat.schema.get_field_index("birth_date"), "birth_date", pa.nulls(pat.num_rows, pa.timestamp("us", tz="UTC")))
    result = run_gate({**base, "patient": nulls}, config, now=NOW, schema=schema)
    assert failing(result) == {"unknown-demographics:patient.age_band"}
    assert next(c for c in result.checks if c.id == "representation:patient.age_band").status == "not-applicable"


def test_a_person_with_conflicting_records_takes_the_first_source(base, config, schema):
    """Two records of one twin disagree on sex: the gate reads the first by (source, patient_id)."""
    pat = base["patient"]
    twin = pat.slice(0, 1)
    other = where(twin, "sex", pa.array([True]), "male" if twin.column("sex")[0].as_py() == "female" else "female")
    other = where(other, "source", pa.array([True]), "zz-later-source")
    result = run_gate({**base, "patient": pa.concat_tables([pat, other])}, config, now=NOW, schema=schema)
    assert failing(result) == set()
    assert next(c for c in result.checks if c.id == "unknown-demographics:patient.sex").denominator == pat.num_rows


def test_no_locators_in_the_report_when_examples_is_zero(base, schema, tmp_path):
    (tmp_path / "ref.csv").write_text(uniform_reference_csv())
    (tmp_path / "gate.toml").write_text('[bias]\nreference = "ref.csv"\n[report]\nexamples = 0\n')
    result = run_gate(future_dates(base), load_gate_config(tmp_path / "gate.toml"), now=NOW, schema=schema)
    check = next(c for c in result.checks if not c.passed)
    assert "examples" not in check.details and result.row_failure_count == check.failing_count


def _garbage(rng, typ):
    if pa.types.is_string(typ):
        return rng.choice(["", "\x00", "é" * 300, "<script>x</script>", "UNK", "2135-2", "O", None])
    if pa.types.is_floating(typ):
        return rng.choice([float("nan"), float("inf"), -float("inf"), -1e308, None])
    if pa.types.is_timestamp(typ):
        return rng.choice([datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC), None])
    if pa.types.is_integer(typ):
        return rng.choice([0, -1, 2**31 - 1, None])
    return rng.choice([True, False, None]) if pa.types.is_boolean(typ) else None


@pytest.mark.parametrize("seed", range(4))
def test_garbage_values_and_missing_or_mistyped_columns_never_crash_the_gate(seed, schema, config):
    """Random columns dropped or cast to string, random values replaced by hostile ones."""
    import random

    from pipeline.validation.report import render_html, report_data

    rng = random.Random(seed)
    tables = {}
    for name, t in population(schema, NOW, per_cell=2).items():
        t = t.select([c for c in t.column_names if rng.random() > 0.15])
        for c in t.column_names:
            if rng.random() < 0.25:
                col = t.column(c)
                values = [_garbage(rng, col.type) if rng.random() < 0.3 else v for v in col.to_pylist()]
                t = t.set_column(t.schema.get_field_index(c), c, pa.array(values, col.type))
            elif rng.random() < 0.05:
                t = t.set_column(t.schema.get_field_index(c), c, t.column(c).cast(pa.string()))
        tables[name] = t
    result = run_gate(tables, config, now=NOW, schema=schema)
    assert result.checks and all(c.message for c in result.checks)
    for c in result.checks:
        assert 0 <= c.failing_count <= max(c.denominator, tables[c.table].num_rows if c.table in tables else 0)
    assert sum(1 for _ in result.row_failures) == result.row_failure_count
    assert "<script>" not in render_html(report_data(result))
