"""The FHIR file connector on real files and on every kind of bad input the spine names."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import orjson
import pytest

from pipeline.connectors.fhir_files import FhirFile, Limits, read_fhir, walk
from pipeline.units import Deletion, Rejected, Resource
from tests.conftest import FIXTURES


def units(path: Path, limits: Limits | None = None):
    f = FhirFile(path, limits or Limits())
    return list(f), f


def test_bundle_entries_get_ids_and_fullurl_map():
    us, f = units(FIXTURES / "fhir" / "bundles" / "patient-1.json")
    bundle = json.loads((FIXTURES / "fhir" / "bundles" / "patient-1.json").read_text())
    assert f.units == len(bundle["entry"]) == len(us)
    assert all(isinstance(u, Resource) for u in us)
    first = us[0]
    assert first.source_ref.endswith("patient-1.json#entry[0]")
    # every urn:uuid reference in the bundle is a key of the fullUrl map
    refs = {m for m in json.dumps(bundle).split('"') if m.startswith("urn:uuid:")}
    assert refs <= set(first.full_urls)
    assert f.sha256 and len(f.sha256) == 64


def test_ndjson_lines_and_locators(tmp_path):
    p = tmp_path / "Observation.ndjson"
    p.write_bytes(b'{"resourceType":"Observation","id":"a","status":"final"}\n\n'
                  b'{"resourceType":"Observation","id":"b","status":"final"}\n')
    us, f = units(p)
    assert [u.source_ref.rsplit(":", 1)[1] for u in us] == ["1", "3"]
    assert f.units == 2


@pytest.mark.parametrize("line, reason", [
    (b'{"resourceType":"Observation","id":"a"', "invalid-json"),
    (b'[1,2]', "not-a-resource"),
    (b'{"id":"x"}', "no-resource-type"),
    (b'{"resourceType":"Nonsense","id":"x"}', "unknown-resource-type"),
    (b'{"resourceType":"Patient"}', "no-id"),
    (b'{"resourceType":"Patient","id":"a/b"}', "bad-id"),
])
def test_bad_lines_are_rejected_and_the_file_goes_on(tmp_path, line, reason):
    p = tmp_path / "x.ndjson"
    good = b'{"resourceType":"Patient","id":"ok"}'
    p.write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
    us, f = units(p)
    assert [type(u).__name__ for u in us] == ["Resource", "Rejected", "Resource"]
    bad = us[1]
    assert bad.reason == reason and bad.source_ref.endswith("x.ndjson:2")
    assert bad.payload == line
    assert f.units == 3


def test_messages_never_quote_the_data(tmp_path):
    p = tmp_path / "x.ndjson"
    p.write_bytes(b'{"resourceType":"Patient","name":[{"family":"Secretname"}]}\n{"resourceType":"Patient","id":"Secretname/"}\n')
    for u in read_fhir([p]):
        assert "Secretname" not in u.message


def test_empty_file_and_empty_bundle(tmp_path):
    (tmp_path / "a.ndjson").write_bytes(b"\n\n")
    (tmp_path / "b.json").write_bytes(b'{"resourceType":"Bundle","type":"collection","entry":[]}')
    (tmp_path / "c.json").write_bytes(b"")
    got = [u.reason for u in read_fhir([tmp_path])]
    assert got == ["empty-file", "empty-file", "empty-file"]


def test_truncated_gzip_keeps_what_was_read(tmp_path):
    lines = b"".join(b'{"resourceType":"Patient","id":"p%d"}\n' % i for i in range(2000))
    data = gzip.compress(lines)
    p = tmp_path / "Patient.ndjson.gz"
    p.write_bytes(data[: len(data) // 2])
    us, f = units(p)
    good = [u for u in us if isinstance(u, Resource)]
    bad = [u for u in us if isinstance(u, Rejected)]
    assert 0 < len(good) < 2000
    assert [b.reason for b in bad] == ["truncated-gzip"]
    assert f.units == len(us)


def test_enormous_line_is_refused_without_holding_it(tmp_path):
    p = tmp_path / "big.ndjson"
    with open(p, "wb") as f:
        f.write(b'{"resourceType":"Patient","id":"a"}\n')
        f.write(b'{"resourceType":"Patient","id":"b","x":"' + b"y" * 300_000 + b'"}\n')
        f.write(b'{"resourceType":"Patient","id":"c"}\n')
    us, _ = units(p, Limits(max_line_bytes=100_000))
    assert [getattr(u, "reason", "ok") for u in us] == ["ok", "line-too-long", "ok"]
    assert us[1].payload is None and us[1].payload_ref.endswith("big.ndjson:2")


def test_gzip_bomb_is_refused(tmp_path):
    p = tmp_path / "bomb.ndjson.gz"
    line = b'{"resourceType":"Patient","id":"a","x":"' + b"0" * 1000 + b'"}\n'
    p.write_bytes(gzip.compress(line * 5000))
    us, _ = units(p, Limits(max_gzip_ratio=20, gzip_ratio_floor=100_000))
    assert us[-1].reason == "gzip-bomb"


def test_gzip_bomb_of_one_endless_line_is_refused_while_it_is_skipped(tmp_path):
    """The ratio used to be checked per line only: a bomb without newlines was skipped as
    one long line, inflated to its end (a 200 MB file: hundreds of GiB of CPU work)."""
    p = tmp_path / "bomb.ndjson.gz"
    p.write_bytes(gzip.compress(b" " * (32 << 20)))
    us, _ = units(p, Limits(max_line_bytes=100_000, max_gzip_ratio=20, gzip_ratio_floor=1 << 20))
    assert [u.reason for u in us] == ["gzip-bomb"]


def test_transaction_deletes_and_derived_ids(tmp_path):
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:1b5c2c1e-0000-4000-8000-000000000001",
         "resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Organization"},
         "request": {"method": "POST", "url": "Organization", "ifNoneExist": "identifier=http://x|1"}},
        {"request": {"method": "DELETE", "url": "Observation/gone"}},
        {"request": {"method": "DELETE", "url": "Observation?code=1234"}},
        {"request": {"method": "GET", "url": "Patient?name=x"}},
    ]}
    p = tmp_path / "tx.json"
    p.write_bytes(orjson.dumps(bundle))
    us, f = units(p)
    assert us[0].resource["id"] == "1b5c2c1e-0000-4000-8000-000000000001"
    assert us[1].resource["id"].startswith("c-")
    assert us[2] == Deletion("Observation", "gone", us[2].source_ref)
    assert [us[3].reason, us[4].reason] == ["bad-delete", "no-resource"]
    assert f.units == 5


def test_bulk_export_log_is_not_data(shared_data):
    folder = shared_data / "fhir" / "sample-bulk-fhir-datasets" / "10-patients"
    assert list(FhirFile(folder / "log.ndjson")) == []


def test_walk_is_sorted_and_skips_hidden(tmp_path):
    (tmp_path / "b.ndjson").write_text("")
    (tmp_path / "a.json").write_text("")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.ndjson").write_text("")
    (tmp_path / "notes.txt").write_text("")
    assert [p.name for p in walk([tmp_path])] == ["a.json", "b.ndjson"]


def test_ndjson_of_bundles_yields_their_entries(tmp_path):
    """One Bundle per line (how bulk loaders take transactions) is read like a Bundle file,
    not ignored as a resource no view maps; a JSON array of Bundles likewise."""
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:1b5c2c1e-0000-4000-8000-000000000002",
         "resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "id": "o1", "status": "final",
                      "subject": {"reference": "urn:uuid:1b5c2c1e-0000-4000-8000-000000000002"}},
         "request": {"method": "PUT", "url": "Observation/o1"}}]}
    p = tmp_path / "tx.ndjson"
    p.write_bytes(b'{"resourceType":"Patient","id":"solo"}\n' + orjson.dumps(bundle) + b"\n")
    us, f = units(p)
    assert [u.resource["id"] for u in us] == ["solo", "1b5c2c1e-0000-4000-8000-000000000002", "o1"]
    assert us[2].source_ref.endswith("tx.ndjson:2#entry[1]")
    assert us[2].full_urls["urn:uuid:1b5c2c1e-0000-4000-8000-000000000002"] == "Patient/1b5c2c1e-0000-4000-8000-000000000002"
    assert f.units == 3
    a = tmp_path / "arr.json"
    a.write_bytes(orjson.dumps([bundle]))
    us, f = units(a)
    assert [u.source_ref.rsplit("/", 1)[1] for u in us] == ["arr.json#[0]#entry[0]", "arr.json#[0]#entry[1]"]


def test_a_saved_searchset_outcome_is_not_a_resource_without_id(tmp_path):
    """A searchset saved from a server: its `outcome` entry is handled as `twin fetch fhir`
    handles it (a warning skipped, an error quarantined as search-outcome), not as a
    resource without an id."""
    def outcome(severity):
        return {"resource": {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": "processing"}]},
                "search": {"mode": "outcome"}}
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"fullUrl": "http://srv/fhir/Patient/p1", "resource": {"resourceType": "Patient", "id": "p1"},
         "search": {"mode": "match"}}, outcome("warning"), outcome("error")]}
    p = tmp_path / "search.json"
    p.write_bytes(orjson.dumps(bundle))
    us, f = units(p)
    assert isinstance(us[0], Resource) and [u.reason for u in us[1:]] == ["search-outcome"]
    assert us[1].source_ref.endswith("search.json#entry[2]")
    assert f.units == 2
