"""One date offset per person under `--deid-dates shift`, whatever source a record came from
(issue 10, docs/privacy.md "Dates").

The offset is keyed on the twin. A record that linking later moves to another twin has its
dates moved by the difference, in the same run (privacy/reshift.py). Checked end to end on
a real pair of sources that link (fixtures/devices/linked/vitals.csv names the MRN of
fixtures/fhir/bundles/patient-1.json), in both import orders, against a plain import.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import deltalake
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import keys
from pipeline.errors import ConfigError
from pipeline.imports import run_import
from pipeline.privacy import PrivacyHooks, privacy_hooks
from pipeline.privacy.reshift import _shift_column, _shift_strings
from pipeline.schema import TIMESTAMP
from pipeline.store import Store

from .conftest import FIXTURES, secret_key

KEY = "date-offset-test-key-0123456789"
FHIR = ("fhir", [FIXTURES / "fhir" / "bundles"])
CSV = ("csv", [FIXTURES / "devices" / "linked"])


@pytest.fixture(autouse=True)
def _key():
    with secret_key(KEY):
        yield


def _import(store_dir, order, profile):
    store = Store(store_dir)
    for kind, paths in order:
        run_import(store, kind, paths, hooks=privacy_hooks(profile, source=kind, dates="shift"))
    return store


def _table(store: Store, name: str) -> pa.Table:
    return deltalake.DeltaTable(str(store.root / name)).to_pyarrow_table()


def _linked_twin(store: Store) -> str:
    """The twin with observations from both sources (the FHIR patient wearing the device)."""
    obs = _table(store, "observation")
    per = obs.group_by(["twin_id", "source"]).aggregate([]).group_by("twin_id").aggregate([("source", "count")])
    both = per.filter(pc.equal(per.column("source_count"), 2)).column("twin_id").to_pylist()
    assert len(both) == 1, both
    return both[0]


def _offsets(plain: Store, deid: Store, table: str, column: str, source: str) -> set[int]:
    """Day differences between the de-identified and the real instants of the linked
    person's rows of one source (both sides sorted: the shift keeps the order)."""
    def instants(store):
        t = _table(store, table)
        keep = pc.and_(pc.equal(t.column("twin_id"), _linked_twin(store)), pc.equal(t.column("source"), source))
        keep = pc.and_(keep, pc.invert(pc.is_in(t.column(f"{column}_precision"), pa.array(["year", "month"]))))
        return sorted(t.filter(keep).column(column).drop_null().to_pylist())
    real, shifted = instants(plain), instants(deid)
    assert real and len(real) == len(shifted)
    return {(s - r) / timedelta(days=1) for r, s in zip(real, shifted, strict=True)}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    with secret_key(KEY):
        root = tmp_path_factory.mktemp("offsets")
        out = {"plain": _import(root / "plain", [FHIR, CSV], None),
               "fhir-first": _import(root / "a", [FHIR, CSV], "deid"),
               "csv-first": _import(root / "b", [CSV, FHIR], "deid")}
    return out


@pytest.mark.parametrize("order", ["fhir-first", "csv-first"])
def test_one_person_has_one_date_offset_in_every_source(stores, order):
    plain, deid = stores["plain"], stores[order]
    twin = _linked_twin(deid)
    expected = PrivacyHooks("deid", "fhir", dates="shift").deidentifier.shift_for(twin)
    assert expected
    found = {
        "fhir observations": _offsets(plain, deid, "observation", "effective_start", "fhir"),
        "fhir encounters": _offsets(plain, deid, "encounter", "period_start", "fhir"),
        "device samples": _offsets(plain, deid, "observation", "effective_start", "csv"),
    }
    assert found == dict.fromkeys(found, {float(expected)})
    # the twin's birth date moved by the same offset
    born = {s: _table(s, "patient").filter(pc.equal(_table(s, "patient").column("twin_id"), _linked_twin(s)))
            .column("birth_date").drop_null().to_pylist() for s in (plain, deid)}
    assert [b + timedelta(days=expected) for b in born[plain]] == born[deid]


def test_both_import_orders_store_the_same_dates(stores):
    a, b = stores["fhir-first"], stores["csv-first"]
    for table, col in (("observation", "effective_start"), ("encounter", "period_start"), ("patient", "birth_date")):
        assert sorted(_table(a, table).column(col).drop_null().to_pylist()) == \
            sorted(_table(b, table).column(col).drop_null().to_pylist()), table


def test_the_manifest_says_dates_are_shifted_per_twin(stores):
    m = stores["csv-first"].manifest()
    assert m["privacy"] == {"csv": "deid:shift", "fhir": "deid:shift"} and m["date_offsets"] == "twin"


def test_a_store_shifted_per_record_by_an_earlier_version_is_refused(tmp_path):
    store = _import(tmp_path / "s", [FHIR], "deid")
    doc = json.loads(store.manifest_path.read_text())
    del doc["date_offsets"]  # what the stores of the per-record offsets look like
    store.manifest_path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="shifted per source record"):
        run_import(Store(tmp_path / "s"), *CSV, hooks=privacy_hooks("deid", source="csv", dates="shift"))


def test_moving_a_record_needs_the_key(tmp_path, monkeypatch):
    """Without the key the difference of two offsets cannot be computed: the run stops and
    rolls back instead of leaving a twin with two offsets."""
    from pipeline.privacy.reshift import Move, reshift

    store = _import(tmp_path / "s", [FHIR], "deid")
    pid = _table(store, "patient").column("patient_id")[0].as_py()
    monkeypatch.delenv("TWIN_KEY")
    keys.secret_key.cache_clear()
    with pytest.raises(ConfigError, match="needs the store's key"):
        reshift(store, [Move("fhir", pid, "old", "new")])


def _ts(*parts):
    return datetime(*parts, tzinfo=UTC)


def test_years_and_months_move_as_the_ingest_moves_them_and_never_below_the_floor():
    """A year moves with its middle (July 1st), a month with its 15th, instants by whole
    days; a value at the over-89 floor stays there; nothing moves below it."""
    ts = pa.chunked_array([pa.array([_ts(2000, 1, 1), _ts(2000, 3, 1), _ts(2000, 3, 9, 10, 30), _ts(1936, 1, 1),
                                     _ts(1937, 1, 5), None], TIMESTAMP)])
    prec = pa.chunked_array([pa.array(["year", "month", "minute", "year", "day", None])])
    days = pa.array([200, -20, 3, 300, -400, 5], pa.int64())
    moved, precs = _shift_column(ts, prec, days, floor_year=1936)
    assert moved.to_pylist() == [_ts(2001, 1, 1), _ts(2000, 2, 1), _ts(2000, 3, 12, 10, 30), _ts(1936, 1, 1),
                                 _ts(1936, 1, 1), None]
    assert precs.to_pylist() == ["year", "month", "minute", "year", "year", None]
    strings = _shift_strings(pa.chunked_array([["2020-05-01T10:00:00Z", "1936", "1937-01-02", "n/a"]]),
                             pa.chunked_array([["dateTime", "dateTime", "dateTime", "string"]]),
                             pa.array([2, 400, -400, 9], pa.int64()), floor_year=1936)
    assert strings.to_pylist() == ["2020-05-03T10:00:00Z", "1936", "1936", "n/a"]


@pytest.mark.parametrize("dates", ["year", "shift"])
def test_device_rows_keep_no_year_older_than_the_over_89_group(tmp_path, dates):
    """Like FHIR dates: a sample dated before the floor would tell an age over 89."""
    floor = datetime.now(UTC).year - 90
    f = tmp_path / "vitals.csv"
    f.write_text("time,patient_system,patient_id,device_id,hr,spo2,resp_rate,temp,sys,dia\n"
                 f"{floor - 5}-03-05T08:00:00Z,urn:mrn,p1,m1,82,94,18,37.2,112,85\n"
                 "2024-03-05T08:01:00Z,urn:mrn,p1,m1,68,95,12,37.5,,\n")
    store = Store(tmp_path / "s")
    run_import(store, "csv", [f], hooks=privacy_hooks("deid", source="csv", dates=dates))
    obs = _table(store, "observation")
    old = obs.filter(pc.less(obs.column("effective_start"), pa.scalar(datetime(2000, 1, 1, tzinfo=UTC))))
    assert old.num_rows > 0
    assert set(old.column("effective_start").to_pylist()) == {datetime(floor, 1, 1, tzinfo=UTC)}
    assert set(old.column("effective_start_precision").to_pylist()) == {"year"}
