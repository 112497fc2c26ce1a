"""`twin fetch dicomweb` from a real Orthanc gives the same tables as `twin import dicom` of the same files."""

from __future__ import annotations

import pytest

from pipeline.cli import main as twin
from pipeline.connectors.dicom_files import walk
from pipeline.store import Store
from tests.test_dicomweb import AUTH, FIX, orthanc_server
from tests.test_import_fhir import snapshot

TABLES = ("imaging_study", "imaging_series", "device", "patient", "patient_identifier")


def _content(store: Store, table: str) -> list[dict]:
    rows = snapshot(store, table)
    for r in rows:
        r.pop("source_ref")  # file path versus server URL: the locators differ, nothing else may
    return rows


@pytest.mark.server
def test_fetched_tables_equal_imported_tables(tmp_path, monkeypatch):
    (tmp_path / "orthanc").mkdir()
    with orthanc_server(tmp_path / "orthanc") as server:
        accepted = server.load(walk([FIX]))
        assert accepted, "Orthanc accepted none of the fixture files"
        imported, fetched = tmp_path / "imported", tmp_path / "fetched"
        assert twin(["import", "dicom", *map(str, accepted), "--store", str(imported)]) in (0, 3)
        monkeypatch.setenv("DICOMWEB_AUTH", AUTH["Authorization"])
        assert twin(["fetch", "dicomweb", server.dicomweb, "--store", str(fetched),
                     "--auth-header-env", "DICOMWEB_AUTH"]) in (0, 3)
        a, b = Store(imported), Store(fetched)
        assert a.count("imaging_study") > 0
        for table in TABLES:
            assert _content(a, table) == _content(b, table), table
        # incremental: the second fetch asks from the stored watermark and changes nothing
        assert twin(["fetch", "dicomweb", server.dicomweb, "--store", str(fetched),
                     "--auth-header-env", "DICOMWEB_AUTH"]) in (0, 3)
        for table in TABLES:
            assert _content(a, table) == _content(b, table), table
        # de-identified the same way whichever way the metadata came (PS3.15 actions, then FHIR)
        from pipeline import keys

        monkeypatch.setenv("TWIN_KEY", "dicomweb-deid-test-key-0123")
        keys.secret_key.cache_clear()
        di, df = tmp_path / "deid-imported", tmp_path / "deid-fetched"
        assert twin(["import", "dicom", *map(str, accepted), "--store", str(di), "--deid"]) in (0, 3)
        assert twin(["fetch", "dicomweb", server.dicomweb, "--store", str(df), "--deid",
                     "--auth-header-env", "DICOMWEB_AUTH"]) in (0, 3)
        c, d = Store(di), Store(df)
        for table in TABLES:
            assert _content(c, table) == _content(d, table), table
        assert {r["name_family"] for r in snapshot(d, "patient")} == {None}
        uids = [r["study_instance_uid"] for r in snapshot(d, "imaging_study")]
        plain = {r["study_instance_uid"] for r in snapshot(b, "imaging_study")}
        assert uids and not plain & set(uids)
    keys.secret_key.cache_clear()
