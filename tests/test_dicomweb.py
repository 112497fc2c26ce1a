"""The DICOMweb connector against a real Orthanc, and against a scripted server for failures."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pydicom
import pytest
import requests
from fhir.resources.R4B import get_fhir_model_class

from pipeline.connectors.dicom_files import read_dicom, walk
from pipeline.connectors.dicomweb import read_dicomweb
from pipeline.dicom import Instance, read_file
from pipeline.dicom_fhir import DicomMapping
from pipeline.errors import ConfigError, SourceUnavailable
from pipeline.units import Rejected, Resource

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "dicom"
ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.exists(p)),
                                          None)
PLUGINS = Path("/usr/share/orthanc/plugins")
USER, PASSWORD = "twin", "not-a-real-secret"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


def resources(units) -> dict[tuple[str, str], dict]:
    return {(u.resource["resourceType"], u.resource["id"]): u.resource for u in units if isinstance(u, Resource)}


def sop_of(path: Path, mapping: DicomMapping) -> str | None:
    r = read_file(path, mapping.wanted)
    return r.record.get("SOPInstanceUID") if isinstance(r, Instance) else None


# --------------------------------------------------------------------------- a real Orthanc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    url: str
    accepted: list[Path] = field(default_factory=list)

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicom-web"

    def load(self, files) -> list[Path]:
        """POST each file to /instances; returns the files Orthanc accepted."""
        accepted = []
        with requests.Session() as s:
            s.headers.update(AUTH)
            for f in files:
                r = s.post(self.url + "/instances", data=Path(f).read_bytes(), timeout=30)
                if r.status_code == 200:
                    accepted.append(Path(f))
        self.accepted.extend(accepted)
        return accepted


@contextmanager
def orthanc_server(folder: Path) -> Iterator[Orthanc]:
    """Orthanc in the foreground, on free loopback ports, storing in `folder`."""
    if ORTHANC is None:
        pytest.skip("ORTHANC IS NOT INSTALLED: the DICOMweb tests need a real server. "
                    "Install it with: apt-get update && apt-get install -y orthanc orthanc-dicomweb")
    if not (PLUGINS / "libOrthancDicomWeb.so").exists():
        pytest.fail(f"Orthanc is installed but its DICOMweb plugin is not in {PLUGINS}: "
                    "apt-get install -y orthanc-dicomweb")
    http = _free_port()
    config = {
        "Name": "twinline-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": http, "DicomPort": _free_port(), "DicomServerEnabled": False,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(PLUGINS)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([ORTHANC, str(folder / "config.json")], cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError("Orthanc exited at start:\n" + (folder / "orthanc.log").read_text()[-2000:])
            try:
                if requests.get(url + "/system", headers=AUTH, timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("Orthanc did not answer within 30 s:\n" + (folder / "orthanc.log").read_text()[-2000:])
            time.sleep(0.1)
        yield Orthanc(url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    with orthanc_server(tmp_path_factory.mktemp("orthanc")) as server:
        server.load(walk([FIX]))
        yield server


def _compare_files_and_web(files: list[Path], web_units, web_counts) -> None:
    reader = read_dicom(files)
    file_units = list(reader)
    assert reader.counts.reconciles() and web_counts.reconciles()
    assert resources(web_units) == resources(file_units)
    assert web_counts.instances == reader.counts.instances and web_counts.studies == reader.counts.studies
    mapping = reader.mapping
    # Rejected instances, by SOP Instance UID (Orthanc keeps one copy of an instance sent twice)
    file_rejects = {(u.reason, sop_of(Path(u.source_ref), mapping)) for u in file_units if isinstance(u, Rejected)}
    web_rejects = {(u.reason, u.source_ref.removeprefix("sop:")) for u in web_units if isinstance(u, Rejected)}
    assert web_rejects == file_rejects
    for u in web_units:
        if isinstance(u, Resource):
            get_fhir_model_class(u.resource["resourceType"]).model_validate(u.resource)


@pytest.mark.server
def test_dicomweb_gives_what_the_files_give(orthanc):
    assert len(orthanc.accepted) >= 40, "Orthanc refused fixture files it should take"
    reader = read_dicomweb(orthanc.dicomweb, headers=AUTH)
    units = list(reader)
    # no Patient ID: kept by Orthanc, refused by Twinline (the two ExplVR files are one instance)
    assert [u.reason for u in units if isinstance(u, Rejected)] == ["no-patient-id"] * 2
    _compare_files_and_web(orthanc.accepted, units, reader.counts)


@pytest.mark.server
def test_dicomweb_paging_gives_the_same(orthanc):
    everything = resources(read_dicomweb(orthanc.dicomweb, headers=AUTH))
    paged = read_dicomweb(orthanc.dicomweb, headers=AUTH, page_size=2)
    assert resources(paged) == everything
    assert paged.counts.requests > len(everything) // 2


@pytest.mark.server
def test_dicomweb_since_pulls_recent_studies_only(orthanc):
    mapping = DicomMapping.load()
    expected = set()
    for f in orthanc.accepted:
        r = read_file(f, mapping.wanted)
        if isinstance(r, Instance) and r.record.get("PatientID") and r.record.get("StudyDate", "") >= "20190101":
            expected.add(r.record["StudyInstanceUID"])
    assert expected, "the fixtures have studies from 2019 on"
    reader = read_dicomweb(orthanc.dicomweb, headers=AUTH, since=date(2019, 1, 1))
    got = {u.resource["identifier"][0]["value"].removeprefix("urn:oid:") for u in reader
           if isinstance(u, Resource) and u.resource["resourceType"] == "ImagingStudy"}
    assert got == expected


@pytest.mark.server
def test_dicomweb_without_credentials_is_a_config_error(orthanc):
    with pytest.raises(ConfigError, match="refused the credentials"):
        list(read_dicomweb(orthanc.dicomweb))


@pytest.mark.server
@pytest.mark.slow
def test_dicomweb_on_all_pydicom_samples(shared_data, tmp_path):
    with orthanc_server(tmp_path) as server:
        accepted = server.load(walk([shared_data / "dicom"]))
        reader = read_dicomweb(server.dicomweb, headers=AUTH)
        _compare_files_and_web(accepted, list(reader), reader.counts)


# --------------------------------------------------------------------------- a scripted server


@dataclass
class Reply:
    status: int = 200
    body: object = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0


class ScriptedServer:
    """A DICOMweb server that answers what a test tells it to, and records every request."""

    def __init__(self):
        self.routes: dict[str, list[Reply]] = {}
        self.seen: list[tuple[str, dict, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                parts = urlsplit(self.path)
                server.seen.append((parts.path, parse_qs(parts.query), dict(self.headers)))
                replies = server.routes.get(parts.path) or [Reply(404, {"error": "no route"})]
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
                time.sleep(reply.delay)
                body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/dicom+json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def serve_files(self, *paths: Path, root: str = "/dicom-web") -> None:
        """Serve real files as a DICOMweb server would: QIDO listings and WADO-RS metadata."""
        studies: dict[str, dict[str, list]] = {}
        for p in paths:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            studies.setdefault(ds.StudyInstanceUID, {}).setdefault(ds.SeriesInstanceUID, []).append(
                ds.to_json_dict())
        self.routes[f"{root}/studies"] = [Reply(body=[{"0020000D": {"vr": "UI", "Value": [s]}} for s in studies])]
        for s, series in studies.items():
            self.routes[f"{root}/studies/{s}/series"] = [
                Reply(body=[{"0020000E": {"vr": "UI", "Value": [x]}} for x in series])]
            for x, instances in series.items():
                self.routes[f"{root}/studies/{s}/series/{x}/metadata"] = [Reply(body=instances)]

    def metadata_path(self) -> str:
        return next(p for p in self.routes if p.endswith("/metadata"))


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


LINKED = FIX / "generated" / "linked-patient.dcm"
ENHANCED = FIX / "generated" / "enhanced-mr.dcm"


def pull(server: ScriptedServer, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("retries", 2)
    reader = read_dicomweb(server.url + "/dicom-web", **kw)
    units = list(reader)
    assert reader.counts.reconciles(), reader.counts
    return reader, units


@pytest.mark.server
def test_scripted_server_matches_files(server):
    server.serve_files(LINKED, ENHANCED)
    reader, units = pull(server)
    assert resources(units) == resources(read_dicom([LINKED, ENHANCED]))
    assert reader.counts.instances == 2 and reader.counts.retries == 0


@pytest.mark.server
def test_retries_on_server_trouble_then_succeeds(server):
    server.serve_files(LINKED)
    path = server.metadata_path()
    good = server.routes[path][0]
    server.routes[path] = [Reply(503), Reply(429, headers={"Retry-After": "0"}), good]
    reader, units = pull(server)
    assert reader.counts.retries == 2 and reader.counts.instances == 1


@pytest.mark.server
def test_server_that_stays_down_is_source_unavailable(server):
    server.routes["/dicom-web/studies"] = [Reply(503)]
    with pytest.raises(SourceUnavailable, match="after 3 attempt"):
        pull(server, retries=2)
    assert len(server.seen) == 3


@pytest.mark.server
def test_unreachable_server_is_source_unavailable():
    with pytest.raises(SourceUnavailable, match="ConnectionError"):
        list(read_dicomweb(f"http://127.0.0.1:{_free_port()}/dicom-web", retries=1, backoff=0.01))


@pytest.mark.server
def test_timeouts_are_retried_then_source_unavailable(server):
    server.routes["/dicom-web/studies"] = [Reply(200, [], delay=1.0)]
    with pytest.raises(SourceUnavailable, match="Timeout"):
        pull(server, timeout=(1, 0.2), retries=1)
    assert len(server.seen) == 2


@pytest.mark.server
def test_redirect_to_another_origin_is_refused(server):
    other = ScriptedServer()
    try:
        other.serve_files(LINKED)
        server.routes["/dicom-web/studies"] = [Reply(302, b"", {"Location": other.url + "/dicom-web/studies"})]
        with pytest.raises(SourceUnavailable, match="another origin"):
            pull(server)
        assert other.seen == []
    finally:
        other.close()


@pytest.mark.server
def test_redirect_on_the_same_origin_is_followed(server):
    server.serve_files(LINKED, root="/moved")
    server.routes["/dicom-web/studies"] = [Reply(307, b"", {"Location": "/moved/studies?limit=100&offset=0"})]
    server.routes["/dicom-web/studies/" + pydicom.dcmread(LINKED).StudyInstanceUID + "/series"] = \
        server.routes.pop(next(p for p in server.routes if p.startswith("/moved/") and p.endswith("/series")))
    metadata = next(p for p in server.routes if p.startswith("/moved/") and p.endswith("/metadata"))
    server.routes[metadata.replace("/moved/", "/dicom-web/")] = server.routes.pop(metadata)
    reader, _ = pull(server)
    assert reader.counts.instances == 1


@pytest.mark.server
def test_refused_credentials_are_a_config_error(server):
    server.routes["/dicom-web/studies"] = [Reply(401)]
    with pytest.raises(ConfigError):
        pull(server)


@pytest.mark.server
def test_auth_header_and_incremental_query_are_sent(server):
    server.serve_files(LINKED)
    pull(server, headers={"Authorization": "Bearer abc"}, since=date(2019, 3, 1), page_size=10)
    path, query, headers = server.seen[0]
    assert path == "/dicom-web/studies"
    assert query == {"StudyDate": ["20190301-"], "limit": ["10"], "offset": ["0"]}
    assert all(h.get("Authorization") == "Bearer abc" for _, _, h in server.seen)


@pytest.mark.server
@pytest.mark.parametrize("reply, reason", [(Reply(404), "fetch-failed"), (Reply(200, b"{not json"), "fetch-failed"),
                                           (Reply(200, {"an": "object"}), "fetch-failed")])
def test_a_series_that_cannot_be_fetched_is_rejected(server, reply, reason):
    server.serve_files(LINKED, ENHANCED)
    server.routes[server.metadata_path()] = [reply]
    reader, units = pull(server)
    assert [u.reason for u in units if isinstance(u, Rejected)] == [reason]
    assert reader.counts.instances == 1


@pytest.mark.server
def test_a_study_whose_series_cannot_be_listed_is_rejected(server):
    server.serve_files(LINKED, ENHANCED)
    listing = next(p for p in server.routes if p.endswith("/series"))
    server.routes[listing] = [Reply(404)]
    reader, units = pull(server)
    assert [u.reason for u in units if isinstance(u, Rejected)] == ["fetch-failed"]
    assert reader.counts.studies == 1


@pytest.mark.server
def test_a_base_url_that_is_not_dicomweb_is_a_config_error(server):
    server.routes["/dicom-web/studies"] = [Reply(200, b"<html>login</html>")]
    with pytest.raises(ConfigError, match="is it the DICOMweb base URL"):
        pull(server)
    server.routes["/dicom-web/studies"] = [Reply(404)]
    with pytest.raises(ConfigError, match="HTTP 404"):
        pull(server)


@pytest.mark.server
def test_uids_from_the_server_never_make_urls_unless_they_are_uids(server):
    server.routes["/dicom-web/studies"] = [Reply(body=[{"0020000D": {"vr": "UI", "Value": ["../../admin"]}},
                                                      {"0020000D": {"vr": "UI", "Value": [7]}}, {}])]
    reader, units = pull(server)
    assert [u.reason for u in units] == ["bad-study-uid"] * 3
    assert [p for p, _, _ in server.seen] == ["/dicom-web/studies"]


@pytest.mark.server
def test_instance_under_the_wrong_study_is_rejected_with_its_payload(server):
    server.serve_files(LINKED, ENHANCED)
    paths = [p for p in server.routes if p.endswith("/metadata")]
    server.routes[paths[0]], server.routes[paths[1]] = server.routes[paths[1]], server.routes[paths[0]]
    reader, units = pull(server)
    rejected = [u for u in units if isinstance(u, Rejected)]
    assert [u.reason for u in rejected] == ["inconsistent-uids"] * 2
    assert all(json.loads(u.payload) for u in rejected)


@pytest.mark.server
def test_server_ignoring_offset_does_not_loop(server):
    server.serve_files(LINKED)
    listing = server.routes["/dicom-web/studies"][0].body
    server.routes["/dicom-web/studies"] = [Reply(body=listing)]
    reader, _ = pull(server, page_size=1)
    assert reader.counts.studies == 1
    assert sum(p == "/dicom-web/studies" for p, _, _ in server.seen) == 2


def test_base_url_is_checked():
    for bad in ("ftp://host/x", "not a url", "http://host/dicom-web?x=1"):
        with pytest.raises(ConfigError):
            read_dicomweb(bad)


@pytest.mark.server
def test_incremental_fetch_reads_back_far_enough_for_any_local_study_date(server, tmp_path):
    """Study Date is the modality's local date. A run at 01:00 UTC is 20:00 the day before in
    New York; a study done at 21:00 there and sent after the run has that earlier date, so
    the next run must ask from the day before the run's UTC date, or it never sees it."""
    from datetime import UTC, timedelta

    from pipeline.imports import run_fetch_dicomweb
    from pipeline.store import Store

    server.serve_files(LINKED)
    store = Store(tmp_path / "store")
    first = run_fetch_dicomweb(store, server.url + "/dicom-web", options={"retries": 1})
    assert "StudyDate" not in server.seen[0][1]
    run_fetch_dicomweb(store, server.url + "/dicom-web", options={"retries": 1})
    studies = [q for p, q, _ in server.seen if p == "/dicom-web/studies"]
    utc_day = first.started_at.astimezone(UTC).date()
    assert studies[-1]["StudyDate"] == [f"{utc_day - timedelta(days=1):%Y%m%d}-"]
