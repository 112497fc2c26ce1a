"""`twin fetch fhir` end to end: the tables fetched from a server equal those imported from its files."""

from __future__ import annotations

import pytest

from pipeline.cli import main as twin
from pipeline.store import Store
from tests.conftest import FIXTURES
from tests.fhir_server import FhirTestServer
from tests.test_import_fhir import snapshot

DATA = FIXTURES / "fhir" / "bulk"
TABLES = ("patient", "patient_identifier", "encounter", "condition", "procedure", "immunization", "medication", "device")


def _content(store: Store, table: str) -> list[dict]:
    rows = snapshot(store, table)
    for r in rows:
        r.pop("source_ref")  # file:line versus server page: the locators differ, nothing else may
    return rows


@pytest.mark.server
@pytest.mark.parametrize("mode", ["search", "bulk"])
def test_fetched_tables_equal_imported_tables(tmp_path, mode):
    imported = tmp_path / "imported"
    fetched = tmp_path / "fetched"
    assert twin(["import", "fhir", str(DATA), "--store", str(imported)]) == 0
    with FhirTestServer(DATA, stamp_meta=False) as server:
        extra = ["--bulk"] if mode == "bulk" else ["--count", "50"]
        assert twin(["fetch", "fhir", server.base_url, "--store", str(fetched), *extra]) == 0
        a, b = Store(imported), Store(fetched)
        for table in TABLES:
            assert _content(a, table) == _content(b, table), table
        # the watermark was stored with the run; a second fetch asks only for what changed since
        assert twin(["fetch", "fhir", server.base_url, "--store", str(fetched), *extra]) == 0
        since = [s for s in server.seen if "_lastUpdated" in s.query or "_since" in s.query]
        assert since, "the second fetch did not send the stored watermark"
        for table in TABLES:
            assert _content(a, table) == _content(b, table), table


@pytest.mark.server
@pytest.mark.parametrize("mode", ["search", "bulk"])
def test_a_narrower_fetch_does_not_hide_the_rest_from_a_wider_one(tmp_path, mode):
    """A first fetch of Patient only, then one of every type: the second has never seen the
    other types, so the first fetch's watermark must not make it ask only for changes."""
    imported = tmp_path / "imported"
    fetched = tmp_path / "fetched"
    assert twin(["import", "fhir", str(DATA), "--store", str(imported)]) == 0
    with FhirTestServer(DATA) as server:
        extra = ["--bulk"] if mode == "bulk" else ["--count", "200"]
        assert twin(["fetch", "fhir", server.base_url, "--store", str(fetched), "--types", "Patient", *extra]) == 0
        assert twin(["fetch", "fhir", server.base_url, "--store", str(fetched), *extra]) == 0
        a, b = Store(imported), Store(fetched)
        for table in ("encounter", "condition", "procedure"):
            assert b.count(table) == a.count(table), table
