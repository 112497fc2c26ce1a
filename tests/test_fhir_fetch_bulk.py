"""Bulk Data $export against the test server: the whole flow, deletions, errors, resume, cancel, SSRF."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from pipeline.connectors.fhir_server import FetchOptions, fetch_fhir
from pipeline.errors import ConfigError, SourceUnavailable
from pipeline.http import OriginRefused
from pipeline.units import Deletion, Rejected, Resource
from tests.fhir_server import FIXTURES, FhirTestServer, Sleeps, fetched_resources, file_resources, outcome

pytestmark = pytest.mark.server
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def server():
    with FhirTestServer(FIXTURES, stamp_meta=False) as s:
        yield s


def options(server: FhirTestServer, tmp_path, **kw) -> FetchOptions:
    kw.setdefault("sleep", Sleeps())
    kw.setdefault("max_retries", 3)
    return FetchOptions(base_url=server.base_url, state_dir=tmp_path / "state", bulk=True, **kw)


def state_files(tmp_path) -> list[Path]:
    return sorted(p for p in (tmp_path / "state").rglob("*") if p.is_file())


def patient_ids() -> list[str]:
    return [orjson.loads(line)["id"] for line in (FIXTURES / "Patient.000.ndjson").read_bytes().splitlines()]


def of_patients(ids):
    def keep(res):
        if res["resourceType"] == "Patient":
            return res["id"] in ids
        ref = (res.get("subject") or res.get("patient") or {}).get("reference", "")
        return ref.startswith("Patient/") and ref.split("/", 1)[1] in ids
    return keep


def test_system_export_kicks_off_polls_downloads_and_yields_the_files_resources(tmp_path):
    with FhirTestServer(FIXTURES, stamp_meta=False, polls=2, retry_after="2") as server:
        events, sleeps = [], Sleeps()
        fetch = fetch_fhir(options(server, tmp_path, progress=events.append, sleep=sleeps))
        units = list(fetch.units())
        on_disk = state_files(tmp_path)

        kickoff = server.requests_to(r"/\$export$")[0]
        assert kickoff.method == "GET" and kickoff.query == {}
        assert kickoff.headers["accept"] == "application/fhir+json" and kickoff.headers["prefer"] == "respond-async"
        assert sleeps == [2.0, 2.0]                                  # Retry-After of both 202s
        assert [e.detail for e in events if e.phase == "poll"] == ["33% done", "66% done"]   # X-Progress
        assert fetched_resources(units) == file_resources(FIXTURES)
        assert all(isinstance(u, Resource) for u in units)
        assert {u.source_ref.rsplit(":", 1)[0] for u in units} >= {"bulk Encounter.000.ndjson", "bulk Patient.000.ndjson"}
        job = next(iter(server.jobs.values()))
        assert datetime.fromisoformat(fetch.watermark) == job.transaction_time
        # sent with Content-Encoding gzip, kept as sent
        assert all(p.name.endswith(".ndjson.gz") for p in on_disk if "/files/" in str(p))
        assert all(s.headers.get("accept-encoding") == "gzip" for s in server.requests_to("export-file"))

        fetch.finished()
        assert server.requests_to(r"/\$export-status/", "DELETE") and server.jobs == {}   # the server may free the files
    assert state_files(tmp_path) == []


def test_type_since_deleted_and_error_files_on_an_incremental_export(tmp_path):
    with FhirTestServer(FIXTURES) as server:
        first = fetch_fhir(options(server, tmp_path))
        assert len(list(first.units())) == 65
        first.finished()
        mark = datetime.fromisoformat(first.watermark)
        encounter, condition = next(iter(server.store["Encounter"])), next(iter(server.store["Condition"]))
        server.touch("Encounter", encounter, {"status": "cancelled"})
        server.delete("Condition", condition)
        server.touch("Patient", patient_ids()[0])       # not among the types asked for
        server.export_errors = [outcome("processing", "could not export one resource")]

        again = fetch_fhir(options(server, tmp_path, types=["Encounter", "Condition"], since=mark))
        units = list(again.units())

        kickoff = server.requests_to(r"/\$export$")[-1]
        assert kickoff.query == {"_type": ["Encounter,Condition"], "_since": [first.watermark]}
        resources = [u for u in units if isinstance(u, Resource)]
        assert [(u.resource["id"], u.resource["status"]) for u in resources] == [(encounter, "cancelled")]
        assert [u for u in units if isinstance(u, Deletion)] == [
            Deletion("Condition", condition, "bulk deleted.000.ndjson:1 entry 0")]
        errors = [u for u in units if isinstance(u, Rejected)]
        assert [(r.reason, r.source_ref) for r in errors] == [("export-error", "bulk error.000.ndjson:1")]
        assert "processing" in errors[0].message and b"could not export" in errors[0].payload
        assert datetime.fromisoformat(again.watermark) > mark


def test_gzip_files_without_content_encoding_are_read_too(tmp_path):
    with FhirTestServer(FIXTURES, stamp_meta=False, gzip_files=True, content_gzip=False) as server:
        units = list(fetch_fhir(options(server, tmp_path)).units())
    assert fetched_resources(units) == file_resources(FIXTURES)


def test_group_export_yields_the_groups_patients_compartments(server, tmp_path):
    first = patient_ids()[0]
    server.groups["cohort-1"] = [first]
    units = list(fetch_fhir(options(server, tmp_path, group="cohort-1")).units())
    assert server.requests_to(r"^/fhir/Group/cohort-1/\$export$")
    assert fetched_resources(units) == file_resources(FIXTURES, keep=of_patients({first}))


def test_patient_export_all_patients_by_get_and_some_by_post(server, tmp_path):
    everyone = list(fetch_fhir(options(server, tmp_path, patient="*")).units())
    assert server.requests_to(r"^/fhir/Patient/\$export$", "GET")
    assert fetched_resources(everyone) == file_resources(FIXTURES, keep=of_patients(set(patient_ids())))

    second = patient_ids()[1]
    some = list(fetch_fhir(options(server, tmp_path / "other", patient=second, types=["Patient", "Encounter"])).units())
    post = server.requests_to(r"^/fhir/Patient/\$export$", "POST")
    assert len(post) == 1
    assert fetched_resources(some) == file_resources(FIXTURES, ["Patient", "Encounter"], keep=of_patients({second}))


def test_an_interrupted_poll_resumes_without_a_second_kickoff(tmp_path):
    with FhirTestServer(FIXTURES, stamp_meta=False, polls=3) as server:
        with pytest.raises(SourceUnavailable, match="polling resumes"):
            list(fetch_fhir(options(server, tmp_path, poll_timeout=0)).units())
        state = orjson.loads(next(p for p in state_files(tmp_path) if p.name == "state.json").read_bytes())
        assert state["status_url"].startswith(server.base_url + "/$export-status/")
        assert "manifest" not in state

        units = list(fetch_fhir(options(server, tmp_path)).units())
    assert server.kickoffs == 1
    assert fetched_resources(units) == file_resources(FIXTURES)


KILLED_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pipeline.connectors.fhir_server import FetchOptions, fetch_fhir
    opts = FetchOptions(base_url=sys.argv[1], state_dir=Path(sys.argv[2]), bulk=True, sleep=lambda s: None)
    for unit in fetch_fhir(opts).units():
        pass
""")


def test_a_killed_download_resumes_with_range_and_no_second_kickoff(tmp_path):
    with FhirTestServer(FIXTURES, stamp_meta=False, content_gzip=False) as server:
        stall = server.fault(r"/\$export-file/.*/Encounter-0", cut_after=7000, hang=True)
        script = tmp_path / "run.py"
        script.write_text(KILLED_RUN)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, str(script), server.base_url, str(tmp_path / "state")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            part = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                part = next((p for p in state_files(tmp_path) if p.name.startswith("Encounter")
                             and p.name.endswith(".part") and p.stat().st_size > 0), None)
                if part is not None:
                    break
                time.sleep(0.05)
            assert part is not None, proc.stderr.read().decode() if proc.poll() is not None else "no partial file"
        finally:
            proc.kill()
            proc.wait()
            stall.hang.set()
        have = part.stat().st_size
        assert 0 < have <= 7000

        units = list(fetch_fhir(options(server, tmp_path)).units())

        assert server.kickoffs == 1
        resumed = server.requests_to(r"/\$export-file/.*/Encounter-0")[-1]
        assert resumed.headers["range"] == f"bytes={have}-" and resumed.headers["if-range"].startswith('"')
        assert len(server.requests_to(r"/\$export-file/.*/Condition-0")) == 1   # finished files are kept
        assert fetched_resources(units) == file_resources(FIXTURES)


def test_a_dropped_connection_mid_file_is_resumed_in_the_same_run(server, tmp_path):
    server.fault(r"/\$export-file/.*/Procedure-0", cut_after=1000)
    sleeps = Sleeps()
    units = list(fetch_fhir(options(server, tmp_path, sleep=sleeps)).units())
    tries = server.requests_to(r"/\$export-file/.*/Procedure-0")
    assert [t.headers.get("range") for t in tries] == [None, "bytes=1000-"]
    assert sleeps[:2] == [0.0, 0.0] and len(sleeps) == 3 and sleeps[2] > 0   # two polls, one backoff
    assert fetched_resources(units) == file_resources(FIXTURES)


def test_a_file_changed_on_the_server_is_downloaded_again_whole(server, tmp_path):
    server.fault(r"/\$export-file/.*/Procedure-0", cut_after=1000)
    replaced = []

    def change_the_file(_seconds):
        job = next(iter(server.jobs.values()))
        kind, rtype, data, lines = job.files["Procedure-0.ndjson"]
        short = b"".join(data.splitlines(keepends=True)[:3])
        job.files["Procedure-0.ndjson"] = (kind, rtype, short, 3)
        server._gz_cache.clear()
        replaced.append(short)

    units = list(fetch_fhir(options(server, tmp_path, sleep=change_the_file)).units())
    procedures = [u for u in units if u.resource["resourceType"] == "Procedure"]
    assert len(procedures) == 3 and replaced   # If-Range did not match: the new file, whole, not a splice


def test_manifest_files_on_another_origin_are_refused_and_never_fetched(server, tmp_path):
    with FhirTestServer() as elsewhere:
        server.file_base = elsewhere.base_url
        with pytest.raises(OriginRefused, match="allowed_origin"):
            list(fetch_fhir(options(server, tmp_path)).units())
        assert elsewhere.seen == []


def test_an_allowed_file_origin_gets_no_token_when_the_manifest_says_none_is_needed(tmp_path, monkeypatch):
    monkeypatch.setenv("FHIR_TOKEN", "tok-for-the-fhir-server-only")
    from pipeline.auth import AuthConfig

    with FhirTestServer(FIXTURES, stamp_meta=False, auth="bearer", bearer_token="tok-for-the-fhir-server-only",
                        file_listener=True) as server:
        units = list(fetch_fhir(options(server, tmp_path, allowed_origin=server.file_origin,
                                        auth=AuthConfig(kind="bearer", token_env="FHIR_TOKEN"))).units())
        files = [s for s in server.seen if s.listener == "files"]
        data = [s for s in server.seen if s.listener == "main"]
    assert fetched_resources(units) == file_resources(FIXTURES)
    assert files and all("authorization" not in s.headers for s in files)
    assert all(s.headers["authorization"] == "Bearer tok-for-the-fhir-server-only" for s in data)


def test_cancel_deletes_the_export_on_the_server_and_here(tmp_path):
    with FhirTestServer(FIXTURES, polls=5) as server:
        fetch = fetch_fhir(options(server, tmp_path, poll_timeout=0))
        with pytest.raises(SourceUnavailable):
            list(fetch.units())
        fetch.cancel()
        assert server.requests_to(r"/\$export-status/", "DELETE")
        assert server.jobs == {} and state_files(tmp_path) == []


def test_a_saved_export_the_server_forgot_is_started_again(tmp_path):
    with FhirTestServer(FIXTURES, stamp_meta=False, polls=3) as server:
        with pytest.raises(SourceUnavailable):
            list(fetch_fhir(options(server, tmp_path, poll_timeout=0)).units())
        server.jobs.clear()   # expired on the server
        units = list(fetch_fhir(options(server, tmp_path)).units())
    assert server.kickoffs == 2
    assert fetched_resources(units) == file_resources(FIXTURES)


def test_an_export_that_failed_on_the_server_is_forgotten_and_reported(tmp_path):
    with FhirTestServer(FIXTURES, polls=0) as server:
        original = server._status

        def failing(jid, method):
            server.jobs[jid].fail = (500, outcome("exception", "the export job crashed"))
            return original(jid, method)

        server._status = failing
        with pytest.raises(SourceUnavailable, match="failed on the server.*the export job crashed.*new export"):
            list(fetch_fhir(options(server, tmp_path, max_retries=1)).units())
    assert state_files(tmp_path) == []


def test_a_transient_status_error_keeps_the_export_for_the_next_run(tmp_path):
    with FhirTestServer(FIXTURES, stamp_meta=False, polls=0) as server:
        server.fault(r"/\$export-status/", status=500, body=outcome("transient", "busy"), times=2)
        with pytest.raises(SourceUnavailable, match="transient"):
            list(fetch_fhir(options(server, tmp_path, max_retries=1)).units())
        units = list(fetch_fhir(options(server, tmp_path)).units())
    assert server.kickoffs == 1
    assert fetched_resources(units) == file_resources(FIXTURES)


def test_retry_after_as_an_http_date_is_honoured(tmp_path):
    with FhirTestServer(FIXTURES, polls=1, retry_after="date") as server:
        sleeps = Sleeps()
        list(fetch_fhir(options(server, tmp_path, sleep=sleeps)).units())
    assert len(sleeps) == 1 and 0 < sleeps[0] <= 3


def test_poll_waits_are_capped(tmp_path):
    with FhirTestServer(FIXTURES, polls=1, retry_after="86400") as server:
        sleeps = Sleeps()
        list(fetch_fhir(options(server, tmp_path, sleep=sleeps, poll_cap=30)).units())
    assert sleeps == [30]


def test_bad_lines_in_export_files_are_quarantined_and_counts_reconcile(server, tmp_path):
    server.bulk_extra_lines = [b"{not json", b'{"resourceType":"Condition"}', b'"a string"']
    fetch = fetch_fhir(options(server, tmp_path, types=["Condition", "Patient"]))
    units = list(fetch.units())
    reasons = Counter(u.reason for u in units if isinstance(u, Rejected))
    assert reasons == {"invalid-json": 1, "no-id": 1, "not-a-resource": 1}
    job = next(iter(server.jobs.values()))
    assert len(units) == sum(lines for *_, lines in job.files.values())   # read = produced + rejected
    assert fetched_resources(units) == file_resources(FIXTURES, ["Condition", "Patient"])


def test_a_manifest_entry_without_url_is_quarantined(server, tmp_path):
    original = server._status

    def manifest_with_a_hole(jid, method):
        reply = original(jid, method)
        if reply.status == 200:
            doc = orjson.loads(reply.body)
            doc["output"].append({"type": "Observation"})
            reply.body = orjson.dumps(doc)
        return reply

    server._status = manifest_with_a_hole
    units = list(fetch_fhir(options(server, tmp_path, types=["Patient"])).units())
    rejected = [u for u in units if isinstance(u, Rejected)]
    assert [(r.reason, r.source_ref) for r in rejected] == [("bad-manifest-entry", "bulk manifest output[1]")]
    assert len(units) == 3


def test_a_state_dir_that_cannot_be_written_is_a_config_error(server, tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(ConfigError, match="state_dir"):
        list(fetch_fhir(options(server, tmp_path)).units())
    assert server.kickoffs == 0


def test_a_manifest_cut_short_is_asked_for_again(tmp_path):
    with FhirTestServer(FIXTURES, stamp_meta=False, polls=0) as server:
        server.fault(r"/\$export-status/", cut_after=20)
        units = list(fetch_fhir(options(server, tmp_path)).units())
        assert len(server.requests_to(r"/\$export-status/")) == 2
    assert fetched_resources(units) == file_resources(FIXTURES)


def test_a_corrupt_state_file_starts_afresh_without_trusting_old_files(server, tmp_path):
    fetch = fetch_fhir(options(server, tmp_path, types=["Patient", "Encounter"]))
    list(fetch.units())
    state = next(p for p in state_files(tmp_path) if p.name == "state.json")
    state.write_text("{garbage")
    for done in (state.parent / "files").iterdir():
        done.unlink()
    (state.parent / "files" / "Encounter.000.ndjson").write_text('{"resourceType":"Encounter","id":"stale"}\n')
    units = list(fetch_fhir(options(server, tmp_path, types=["Patient", "Encounter"])).units())
    assert server.kickoffs == 2
    assert fetched_resources(units) == file_resources(FIXTURES, ["Patient", "Encounter"])
