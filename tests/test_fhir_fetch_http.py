"""The HTTP layer on its own: Retry-After, backoff, origins, rate limit, size limits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.connectors.fhir_server import instant
from pipeline.errors import ConfigError
from pipeline.http import (
    HttpClient,
    HttpPolicy,
    OriginRefused,
    backoff,
    describe,
    origin_of,
    outcome_text,
    retry_after,
)
from tests.fhir_server import FIXTURES, FhirTestServer, Sleeps, outcome


def test_retry_after_in_seconds_or_as_an_http_date():
    assert retry_after("120") == 120.0
    assert retry_after(None) is None and retry_after("soon") is None
    server_now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    later = format_datetime(server_now + timedelta(seconds=90), usegmt=True)
    # measured against the answer's Date header, not the local clock
    assert retry_after(later, format_datetime(server_now, usegmt=True)) == 90.0
    assert retry_after(format_datetime(server_now - timedelta(hours=1), usegmt=True)) == 0.0


@given(st.integers(min_value=0, max_value=100), st.floats(min_value=0, max_value=1))
def test_backoff_grows_exponentially_within_its_cap_with_jitter(attempt, r):
    pause = backoff(attempt, 1.0, 60.0, rand=lambda: r)
    ceiling = min(60.0, 2.0 ** attempt)
    assert ceiling / 2 <= pause <= ceiling


def test_origins_and_descriptions():
    assert origin_of("HTTPS://Fhir.Example.org/r4") == ("https", "fhir.example.org", 443)
    assert origin_of("http://127.0.0.1:8080/x") == ("http", "127.0.0.1", 8080)
    with pytest.raises(ValueError):
        origin_of("file:///etc/passwd")
    assert describe("https://user:pw@fhir.example.org/r4/Patient?name=Smith") == "https://fhir.example.org:443/r4/Patient"


def test_outcome_text_is_short_and_plain():
    text = outcome_text(outcome("invalid", "line one\nline two " + "x" * 1000))
    assert text.startswith("error invalid line one line two") and len(text) == 300
    assert outcome_text({"error": "invalid_client", "error_description": "bad key"}) == "invalid_client bad key"
    assert outcome_text("<html>") == ""


def test_instants_are_utc_with_the_precision_they_have():
    assert instant(datetime(2024, 5, 1, 12, 0, tzinfo=UTC)) == "2024-05-01T12:00:00Z"
    assert instant(datetime(2024, 5, 1, 14, 0, 0, 120000, tzinfo=UTC) .astimezone()) == "2024-05-01T14:00:00.120Z"
    assert instant(datetime(2024, 5, 1, 12, 0)) == "2024-05-01T12:00:00Z"   # naive: UTC


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.server
def test_the_rate_limit_spaces_requests():
    clock = FakeClock()
    with FhirTestServer(FIXTURES) as server:
        http = HttpClient(server.base_url, HttpPolicy(rate_limit=4.0), sleep=clock.sleep, clock=clock)
        for _ in range(5):
            http.get_json(http.url("metadata"), what="metadata")
    assert clock.sleeps == [0.25] * 4


@pytest.mark.server
def test_a_download_larger_than_the_limit_is_refused(tmp_path):
    with FhirTestServer(FIXTURES, polls=0, content_gzip=False) as server:
        http = HttpClient(server.base_url, HttpPolicy(max_file_bytes=5000), sleep=Sleeps())
        resp = http.request("GET", http.url("$export"), what="kick-off",
                            headers={"Accept": "application/fhir+json", "Prefer": "respond-async"})
        _, manifest = http.get_json(resp.headers["Content-Location"], what="status")
        big = next(o["url"] for o in manifest["output"] if o["type"] == "Encounter")
        with pytest.raises(ConfigError, match="max_file_bytes"):
            http.download(big, tmp_path / "f.part", what="file", send_auth=False)
        with pytest.raises(OriginRefused):
            http.download("http://127.0.0.2:9/evil", tmp_path / "g.part", what="file", send_auth=False)
    assert not (tmp_path / "g.part").exists()


@pytest.mark.server
def test_netrc_credentials_are_not_added(tmp_path, monkeypatch):
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login someone password from-netrc\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    with FhirTestServer(FIXTURES) as server:
        http = HttpClient(server.base_url, sleep=Sleeps())
        http.get_json(http.url("metadata"), what="metadata")
    assert "authorization" not in server.seen[0].headers
