"""FHIR search against the test server: paging, incremental runs, errors, hostile answers."""

from __future__ import annotations

import logging
import socket
from datetime import datetime

import orjson
import pytest

from pipeline.connectors.fhir_server import FetchOptions, fetch_fhir
from pipeline.errors import ConfigError, Exit, SourceUnavailable
from pipeline.http import OriginRefused
from pipeline.units import Rejected, Resource
from tests.fhir_server import FIXTURES, FhirTestServer, Sleeps, fetched_resources, file_resources, outcome

pytestmark = pytest.mark.server

TYPES = ["Patient", "Encounter", "Condition", "Procedure", "Immunization", "MedicationRequest", "Device",
         "Practitioner", "Organization"]


@pytest.fixture
def server():
    with FhirTestServer(FIXTURES, stamp_meta=False) as s:
        yield s


@pytest.fixture
def stamped():
    with FhirTestServer(FIXTURES) as s:
        yield s


def options(server: FhirTestServer, tmp_path, **kw) -> FetchOptions:
    kw.setdefault("sleep", Sleeps())
    kw.setdefault("max_retries", 3)
    return FetchOptions(base_url=server.base_url, state_dir=tmp_path / "state", **kw)


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_search_follows_next_links_and_yields_exactly_the_files_resources(server, tmp_path):
    events = []
    fetch = fetch_fhir(options(server, tmp_path, types=TYPES, count=5, progress=events.append))
    units = list(fetch.units())

    assert all(isinstance(u, Resource) for u in units)
    assert fetched_resources(units) == file_resources(FIXTURES)
    first = server.requests_to(r"^/fhir/Encounter$")[0]
    assert first.query == {"_count": ["5"]}
    assert first.headers["accept"] == "application/fhir+json"
    # 12 encounters in pages of 5: the first page and two next links
    assert [e.detail for e in events if e.detail.startswith("Encounter")] == ["Encounter page 1", "Encounter page 2",
                                                                            "Encounter page 3"]
    assert events[-1].done == events[-1].total == 4
    refs = [u.source_ref for u in units if u.resource["resourceType"] == "Encounter"]
    assert refs[0] == "GET Encounter: page 1 entry 0" and refs[-1] == "GET Encounter: page 3 entry 1"


def test_incremental_search_fetches_only_what_changed_since_the_watermark(stamped, tmp_path):
    first = fetch_fhir(options(stamped, tmp_path, types=["Encounter", "Condition"], count=4))
    assert len(list(first.units())) == 24
    mark = first.watermark
    assert mark is not None
    encounter = next(iter(stamped.store["Encounter"]))
    changed_at = stamped.touch("Encounter", encounter, {"status": "cancelled"})
    assert changed_at > when(mark)

    again = fetch_fhir(options(stamped, tmp_path, types=["Encounter", "Condition"], since=when(mark)))
    units = list(again.units())

    assert [(u.resource["id"], u.resource["status"]) for u in units] == [(encounter, "cancelled")]
    asked = stamped.requests_to(r"^/fhir/Encounter$")[-1].query["_lastUpdated"]
    assert asked == ["gt" + mark.replace("+00:00", "Z")]
    assert when(again.watermark) > when(mark)


def test_the_watermark_is_the_servers_time_before_paging_so_changes_during_paging_come_next_time(stamped, tmp_path):
    touched = []

    def change_while_paging(event):
        if event.detail == "Encounter page 1":  # after page 1, before page 2 is asked for
            rid = list(stamped.store["Encounter"])[-1]   # on the last page, served from the snapshot
            touched.append((rid, stamped.touch("Encounter", rid, {"status": "entered-in-error"})))

    fetch = fetch_fhir(options(stamped, tmp_path, types=["Patient", "Encounter"], count=5,
                               progress=change_while_paging))
    list(fetch.units())
    snapshot_times = sorted(t for t, _ in stamped.snapshots.values())
    assert when(fetch.watermark) == snapshot_times[0]   # the first type's first page, the earliest

    again = list(fetch_fhir(options(stamped, tmp_path, types=["Patient", "Encounter"],
                                    since=when(fetch.watermark))).units())
    assert [(u.resource["id"], u.resource["status"]) for u in again] == [(touched[0][0], "entered-in-error")]


def test_without_bundle_meta_the_watermark_is_the_date_header(tmp_path):
    with FhirTestServer(FIXTURES, bundle_meta=False) as server:
        fetch = fetch_fhir(options(server, tmp_path, types=["Patient"]))
        list(fetch.units())
    mark = when(fetch.watermark)
    assert mark.tzinfo is not None and mark.microsecond == 0
    assert abs((mark - server.now()).total_seconds()) < 60


def test_a_next_link_to_another_origin_is_refused_and_never_followed(server, tmp_path):
    with FhirTestServer() as elsewhere:
        server.next_url = elsewhere.base_url + "/Encounter?_count=5"
        fetch = fetch_fhir(options(server, tmp_path, types=["Encounter"], count=5))
        with pytest.raises(OriginRefused) as caught:
            list(fetch.units())
        assert elsewhere.seen == []
    message = str(caught.value)
    assert elsewhere.origin.replace("http://", "") in message and "refused" in message and "allowed_origin" in message
    assert caught.value.exit_code == Exit.USAGE


def test_a_redirect_to_another_origin_is_refused_too(server, tmp_path):
    with FhirTestServer() as elsewhere:
        server.fault(r"^/fhir/Patient$", location=elsewhere.base_url + "/Patient")
        with pytest.raises(OriginRefused, match="redirect"):
            list(fetch_fhir(options(server, tmp_path, types=["Patient"])).units())
        assert elsewhere.seen == []


def test_a_redirect_on_the_same_origin_is_followed(server, tmp_path):
    server.fault(r"^/fhir/Patient$", location=server.base_url + "/Patient?_count=1000")
    units = list(fetch_fhir(options(server, tmp_path, types=["Patient"])).units())
    assert len(units) == 2


def test_a_next_link_loop_is_detected(server, tmp_path):
    server.next_url = server.base_url + "/Encounter?_count=5"
    with pytest.raises(SourceUnavailable, match="loop"):
        list(fetch_fhir(options(server, tmp_path, types=["Encounter"], count=5)).units())


def test_a_type_the_server_does_not_serve_is_a_clear_config_error(server, tmp_path):
    with pytest.raises(ConfigError) as caught:
        list(fetch_fhir(options(server, tmp_path, types=["Observation"])).units())
    assert "HTTP 404" in str(caught.value) and "resource type Observation is not supported" in str(caught.value)


def test_an_operation_outcome_becomes_the_message_truncated(server, tmp_path):
    server.fault(r"^/fhir/Patient$", status=400, body=outcome("invalid", "the server explains " + "at length " * 200))
    with pytest.raises(ConfigError) as caught:
        list(fetch_fhir(options(server, tmp_path, types=["Patient"])).units())
    message = str(caught.value)
    assert "HTTP 400" in message and "error invalid the server explains at length" in message
    assert len(message) < 500


def test_429_with_retry_after_is_waited_out_then_the_search_goes_on(server, tmp_path):
    server.fault(r"^/fhir/Patient$", status=429, retry_after="3", times=2)
    sleeps = Sleeps()
    units = list(fetch_fhir(options(server, tmp_path, types=["Patient"], sleep=sleeps)).units())
    assert len(units) == 2
    assert sleeps == [3.0, 3.0]


def test_5xx_until_the_retries_run_out_is_source_unavailable(server, tmp_path):
    server.fault(r"^/fhir/Patient$", status=503, times=10)
    sleeps = Sleeps()
    with pytest.raises(SourceUnavailable) as caught:
        list(fetch_fhir(options(server, tmp_path, types=["Patient"], sleep=sleeps, max_retries=2)).units())
    assert caught.value.exit_code == Exit.SOURCE_UNAVAILABLE
    assert "HTTP 503" in str(caught.value) and "retry later" in str(caught.value)
    assert len(server.requests_to(r"^/fhir/Patient$")) == 3
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0   # backoff with jitter


def test_a_retry_after_longer_than_the_cap_gives_up_at_once(server, tmp_path):
    server.fault(r"^/fhir/Patient$", status=503, retry_after="3600")
    sleeps = Sleeps()
    with pytest.raises(SourceUnavailable, match="3600 s"):
        list(fetch_fhir(options(server, tmp_path, types=["Patient"], sleep=sleeps)).units())
    assert sleeps == []


def test_an_unreachable_server_is_source_unavailable(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # closed again: nothing listens there
    sleeps = Sleeps()
    opts = FetchOptions(base_url=f"http://127.0.0.1:{port}/fhir", types=["Patient"], state_dir=tmp_path,
                        max_retries=2, sleep=sleeps, timeout=(2.0, 2.0))
    with pytest.raises(SourceUnavailable, match="no answer from http://127.0.0.1") as caught:
        list(fetch_fhir(opts).units())
    assert "after 3 tries" in str(caught.value) and len(sleeps) == 2


def test_included_outcome_and_bad_entries_each_get_their_due(server, tmp_path, caplog):
    practitioner = orjson.loads((FIXTURES / "Practitioner.000.ndjson").read_bytes().splitlines()[0])
    server.search_extra = [
        orjson.dumps({"resource": practitioner, "search": {"mode": "include"}}),
        orjson.dumps({"resource": outcome("too-costly", "only part of it", "warning"), "search": {"mode": "outcome"}}),
        orjson.dumps({"resource": outcome("exception", "a page went missing")}),   # no mode: still an outcome
        orjson.dumps({"resource": {"resourceType": "Patient", "name": [{"family": "Secretname"}]}}),
        orjson.dumps({"resource": {"resourceType": "NotAType", "id": "x"}}),
        b"42",
    ]
    with caplog.at_level(logging.WARNING):
        units = list(fetch_fhir(options(server, tmp_path, types=["Patient"])).units())

    resources = [u for u in units if isinstance(u, Resource)]
    rejected = [u for u in units if isinstance(u, Rejected)]
    assert sorted(u.resource["resourceType"] for u in resources) == ["Patient", "Patient", "Practitioner"]
    assert [r.reason for r in rejected] == ["search-outcome", "bad-id", "unknown-resource-type", "bad-entry"]
    assert [r.source_ref for r in rejected] == [f"GET Patient: page 1 entry {i}" for i in (4, 5, 6, 7)]
    assert "too-costly" in caplog.text
    for r in rejected:
        assert "Secretname" not in r.message
        assert r.payload is not None
    assert b"Secretname" in rejected[1].payload   # the payload keeps the unit for quarantine


def test_a_page_larger_than_the_limit_is_refused(server, tmp_path):
    with pytest.raises(ConfigError, match="max_json_bytes"):
        list(fetch_fhir(options(server, tmp_path, types=["Encounter"], max_json_bytes=4000)).units())


def test_a_page_that_is_not_json_is_source_unavailable(server, tmp_path):
    server.fault(r"^/fhir/Patient$", cut_after=10, times=10)   # a cut body is fetched again, then given up
    with pytest.raises(SourceUnavailable, match="broke off"):
        list(fetch_fhir(options(server, tmp_path, types=["Patient"], max_retries=1)).units())


def test_without_types_the_capability_statement_narrows_the_default_types(server, tmp_path):
    units = list(fetch_fhir(options(server, tmp_path)).units())
    searched = {s.path.rsplit("/", 1)[1] for s in server.seen if s.path.count("/") == 2 and s.path != "/fhir/metadata"}
    # the default types the server lists: those the views map, and the directory types they point to
    assert searched == {"Patient", "Encounter", "Condition", "MedicationRequest", "Procedure", "Immunization", "Device",
                        "Practitioner", "Organization"}
    assert fetched_resources(units) == file_resources(FIXTURES, searched)


def test_options_are_checked_all_at_once(tmp_path):
    opts = FetchOptions(base_url="ftp://user:pw@host/fhir", types=["Observation", "Bogus"], group="g 1",
                        count=0, state_dir=tmp_path, rate_limit=-1)
    with pytest.raises(ConfigError) as caught:
        fetch_fhir(opts)
    text = str(caught.value)
    for needle in ("base_url", "'Bogus'", "group", "bulk", "count", "rate_limit"):
        assert needle in text
    assert "pw" not in text
