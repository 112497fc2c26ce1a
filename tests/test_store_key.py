"""A store is keyed once: twin ids and pseudonyms made under another key would split every person."""

from __future__ import annotations

import pytest

from pipeline import keys
from pipeline.cli import main as twin
from pipeline.store import Store
from tests.conftest import FIXTURES

PATIENTS = str(FIXTURES / "fhir" / "bulk" / "Patient.000.ndjson")
BUNDLES = str(FIXTURES / "fhir" / "bundles")


@pytest.fixture
def key(monkeypatch):
    def use(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("TWIN_KEY", raising=False)
        else:
            monkeypatch.setenv("TWIN_KEY", value)
        monkeypatch.delenv("TWIN_KEY_FILE", raising=False)
        keys.secret_key.cache_clear()
    yield use
    keys.secret_key.cache_clear()


def test_another_key_is_refused_and_nothing_of_the_run_is_kept(tmp_path, key, capsys):
    store = str(tmp_path / "s")
    key(None)  # the demo's way: the public development key
    assert twin(["import", "fhir", PATIENTS, "--store", store]) == 0
    before = Store(store).manifest()
    counts = {t: Store(store).count(t) for t in ("patient", "patient_identifier", "runs")}
    assert before["key_fingerprint"] == keys.key_fingerprint()
    key("a-real-secret-key-set-afterwards")
    capsys.readouterr()
    assert twin(["import", "fhir", BUNDLES, "--store", store]) == 2
    err = capsys.readouterr().err
    assert "made with another key" in err and "a-real-secret" not in err
    after = Store(store).manifest()  # rolled back (restored versions), the run never recorded
    assert after["last_run_id"] == before["last_run_id"] and after["key_fingerprint"] == before["key_fingerprint"]
    assert {t: Store(store).count(t) for t in counts} == counts
    # commands that hash nothing still work under any key (a new process: nothing hashed yet)
    keys.secret_key.cache_clear()
    assert twin(["check", "--store", store]) == 0
    key(None)
    assert twin(["import", "fhir", BUNDLES, "--store", store]) == 0  # the store's own key again


def test_a_store_from_before_fingerprints_adopts_the_key_of_its_next_run(tmp_path, key):
    store = Store(tmp_path / "s")
    key("the-first-real-key-0001")
    assert twin(["import", "fhir", PATIENTS, "--store", str(store.root)]) == 0
    doc = store.manifest()
    del doc["key_fingerprint"]
    store.manifest_path.write_text(__import__("json").dumps(doc))
    assert twin(["import", "fhir", BUNDLES, "--store", str(store.root)]) == 0
    assert store.manifest()["key_fingerprint"] == keys.key_fingerprint()
