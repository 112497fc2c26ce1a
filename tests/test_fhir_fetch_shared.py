"""The public 10-patient Synthea bulk set (../shared) served and fetched: what comes out is what went in."""

from __future__ import annotations

import pytest

from pipeline.connectors.fhir_server import FetchOptions, fetch_fhir
from pipeline.units import Resource
from tests.fhir_server import FhirTestServer, Sleeps, fetched_resources, file_resources

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def ten_patients(shared_data):
    folder = shared_data / "fhir" / "sample-bulk-fhir-datasets" / "10-patients"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not there")
    with FhirTestServer(folder, stamp_meta=False, lines_per_file=500) as server:
        yield folder, server


def test_search_of_every_type_yields_the_multiset_of_the_files(ten_patients, tmp_path):
    folder, server = ten_patients
    types = sorted(server.store)
    units = list(fetch_fhir(FetchOptions(base_url=server.base_url, types=types, count=200, state_dir=tmp_path,
                                         sleep=Sleeps())).units())
    assert all(isinstance(u, Resource) for u in units)
    assert fetched_resources(units) == file_resources(folder)


def test_bulk_export_yields_the_multiset_of_the_files(ten_patients, tmp_path):
    folder, server = ten_patients
    fetch = fetch_fhir(FetchOptions(base_url=server.base_url, bulk=True, state_dir=tmp_path, sleep=Sleeps()))
    units = list(fetch.units())
    assert all(isinstance(u, Resource) for u in units)
    assert fetched_resources(units) == file_resources(folder)
    assert any(u.source_ref.startswith("bulk Procedure.004.ndjson:") for u in units)   # 2,056 lines in files of 500
    fetch.finished()
