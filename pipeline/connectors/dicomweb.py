"""DICOMweb -> FHIR R4 ImagingStudy, Patient and Device, through the same mapping as files.

Studies are listed with QIDO-RS (PS3.18 10.6: `GET {base}/studies?limit&offset`, paged
until a short page, `StudyDate=YYYYMMDD-` for an incremental pull) and so are their
series; the instances' attributes come from WADO-RS metadata (PS3.18 10.4:
`GET {base}/studies/{study}/series/{series}/metadata`), because QIDO answers only carry a
few attributes. Each DICOM JSON dataset becomes the same record as a file would
(`pipeline.dicom.json_record`), and a study is mapped once all its series are in:
memory is bounded by one study.

A unit is an instance's metadata (or a listed study or series that could not be
fetched). `counts` (pipeline.dicom_fhir.DicomCounts) says what became of each:
read = instances + duplicates + rejected.

The connector stays on the origin it was given: every URL is built from the base URL
and UIDs checked to be UIDs; redirects are followed only to the same scheme, host and
port; URLs in the answers (Retrieve URL, BulkDataURI) are never followed. Server trouble
(connection errors, timeouts, 429, 5xx) is retried with exponential backoff, honouring
Retry-After; when the server stays unreachable, SourceUnavailable (exit code 5) says so.
Refused credentials (401, 403) raise ConfigError: retrying will not help.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from datetime import date
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import orjson
import requests

from ..dicom import json_record
from ..dicom_fhir import SERIES_UID, SOP_UID, STUDY_UID, DicomCounts, DicomMapping, DicomSource, valid_uid
from ..errors import ConfigError, SourceUnavailable
from ..units import Rejected, Resource

log = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
MAX_PAYLOAD = 1 << 20  # instance metadata kept in quarantine; larger ones keep a pointer


class _Refused(Exception):
    """The server answered a request with a client error: that unit cannot be fetched."""

    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


class _BadAnswer(Exception):
    """The server answered something that is not DICOM JSON."""


class DicomWebClient:
    """GET requests to one DICOMweb service, with retries, limits and the origin rule."""

    def __init__(self, base_url: str, *, headers: Mapping[str, str] | None = None,
                 timeout: tuple[float, float] = (5, 60), retries: int = 4, backoff: float = 0.5,
                 max_backoff: float = 30.0, max_response_bytes: int = 256 << 20,
                 session: requests.Session | None = None, sleep: Callable[[float], None] = time.sleep,
                 counts: DicomCounts | None = None):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"not an http(s) DICOMweb base URL: {_redact(base_url)!r}")
        if parts.query or parts.fragment:
            raise ConfigError("the DICOMweb base URL must not have a query or fragment")
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in parts.hostname:  # IPv6 literal
            netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
        self.base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/", "", ""))
        self.origin = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        self.session = session or requests.Session()
        self.session.headers.update({"Accept": f"{DICOM_JSON}, application/json"})
        self.session.headers.update(dict(headers or {}))
        if parts.username is not None:
            self.session.auth = (parts.username, parts.password or "")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_response_bytes = max_response_bytes
        self.sleep = sleep
        self.counts = counts or DicomCounts()

    def url(self, path: str) -> str:
        return self.base + path

    def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """GET base+path and parse the JSON answer; [] for 204 No Content.

        Raises SourceUnavailable after the retries, ConfigError for refused credentials,
        _Refused for another client error, _BadAnswer for an answer that is not JSON.
        """
        url = self.url(path)
        last = ""
        redirects = 0
        attempt = 0
        while True:
            self.counts.requests += 1
            try:
                resp = self.session.get(url, params=params, timeout=self.timeout, allow_redirects=False, stream=True)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = type(e).__name__
                resp = None
            if resp is not None:
                with resp:
                    status = resp.status_code
                    if status in (301, 302, 303, 307, 308):
                        url = self._redirect(url, resp.headers.get("Location"), redirects)
                        params = None  # the new location carries its own query
                        redirects += 1
                        continue
                    if status == 429 or status >= 500:
                        last = f"HTTP {status}"
                        wait = _retry_after(resp.headers.get("Retry-After"))
                    elif status in (401, 403):
                        raise ConfigError(f"the DICOMweb server refused the credentials (HTTP {status}) at "
                                          f"{_redact(url)}: check the auth header")
                    elif status == 204:
                        return []
                    elif status >= 400:
                        raise _Refused(status)
                    else:
                        return self._json(resp)
            else:
                wait = None
            if attempt >= self.retries:
                raise SourceUnavailable(f"the DICOMweb server at {_redact(self.base)} did not answer "
                                        f"{path.split('?')[0]} after {attempt + 1} attempt(s) (last: {last}); "
                                        "run again later")
            delay = min(self.max_backoff, wait if wait is not None else self.backoff * (2 ** attempt))
            attempt += 1
            self.counts.retries += 1
            log.warning("DICOMweb %s: %s, retry %d/%d in %.1fs", path.split("?")[0], last, attempt, self.retries, delay)
            self.sleep(delay)

    def _redirect(self, url: str, location: str | None, redirects: int) -> str:
        if not location or redirects >= 5:
            raise SourceUnavailable(f"the DICOMweb server at {_redact(self.base)} redirects without end")
        target = urljoin(url, location)
        parts = urlsplit(target)
        origin = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        if origin != self.origin:
            raise SourceUnavailable(f"the DICOMweb server at {_redact(self.base)} redirects to another origin "
                                    f"({parts.scheme}://{parts.hostname}): refused, configure that URL if it is meant")
        return target

    def _json(self, resp: requests.Response) -> Any:
        body = bytearray()
        for chunk in resp.iter_content(1 << 16):
            body += chunk
            if len(body) > self.max_response_bytes:
                raise _BadAnswer(f"answer larger than {self.max_response_bytes} bytes")
        try:
            return orjson.loads(body) if body else []
        except orjson.JSONDecodeError:
            raise _BadAnswer("answer is not JSON") from None

    def paged(self, path: str, params: dict[str, Any], page_size: int) -> Iterator[dict[str, Any]]:
        """QIDO-RS results page by page (limit/offset) until a short page.

        A server that ignores `offset` (the same page again) ends the listing, with a warning.
        Raises what get_json raises, and _BadAnswer for an answer that is not a JSON array.
        """
        offset = 0
        previous: list[Any] | None = None
        while True:
            page = self.get_json(path, {**params, "limit": page_size, "offset": offset})
            if not isinstance(page, list):
                raise _BadAnswer("the answer is not a JSON array")
            if page and page == previous:
                log.warning("DICOMweb %s: the server ignores offset; listing stopped at %d results", path, offset)
                return
            yield from (item for item in page if isinstance(item, dict))
            if len(page) < page_size or len(page) > page_size:
                return  # a short page ends the list; a longer one means the server ignored limit
            previous = page
            offset += len(page)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: use our own backoff


def _redact(url: str) -> str:
    """A URL without user name and password, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _uid_of(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") if isinstance(item.get(tag), dict) else None
    return values[0] if isinstance(values, list) and values else None


class DicomWeb(DicomSource):
    """The units of a DICOMweb service. Iterate once; `counts` fills as it goes."""

    def __init__(self, client: DicomWebClient, mapping: DicomMapping, *, since: date | None = None,
                 page_size: int = 100):
        super().__init__(mapping, client.counts)
        self.client = client
        self.since = since
        self.page_size = page_size
        self._studies_done: OrderedDict[str, None] = OrderedDict()

    def _run(self) -> Iterator[Resource | Rejected]:
        params: dict[str, Any] = {}
        if self.since is not None:
            params["StudyDate"] = f"{self.since:%Y%m%d}-"  # range matching (PS3.4 C.2.2.2.5)
        try:
            yield from self._studies(params)
        except (_Refused, _BadAnswer) as e:  # the very first request: the URL is wrong, not the server busy
            raise ConfigError(f"the DICOMweb study search at {_redact(self.client.base)} failed ({e}): "
                              "is it the DICOMweb base URL (e.g. http://host:8042/dicom-web)?") from None

    def _studies(self, params: dict[str, Any]) -> Iterator[Resource | Rejected]:
        for i, study in enumerate(self.client.paged("studies", params, self.page_size)):
            uid = _uid_of(study, "0020000D")
            if not valid_uid(uid):
                yield self._reject(Rejected("read", "bad-study-uid", "the server listed a study without a valid "
                                            "Study Instance UID: not fetched", f"{self.client.base}studies#{i}"))
                continue
            if uid in self._studies_done:
                continue  # listed again (another page, or another patient's copy on the server)
            self._studies_done[uid] = None
            if len(self._studies_done) > 100_000:
                self._studies_done.popitem(last=False)
            yield from self._fetch_study(uid)

    def _fetch_study(self, study_uid: str) -> Iterator[Resource | Rejected]:
        instances: dict[str, tuple[dict[str, Any], str]] = {}
        listing = f"studies/{study_uid}/series"
        try:  # a study's series are few: listed first, so that a failure leaves nothing half done
            all_series = list(self.client.paged(listing, {}, self.page_size))
        except (_Refused, _BadAnswer) as e:
            yield self._reject(Rejected("read", "fetch-failed", f"the study's series could not be listed ({e})",
                                        self.client.url(listing)))
            return
        for j, series in enumerate(all_series):
            series_uid = _uid_of(series, "0020000E")
            path = f"studies/{study_uid}/series/{series_uid}/metadata"
            if not valid_uid(series_uid):
                yield self._reject(Rejected("read", "bad-series-uid", "the server listed a series without a valid "
                                            "Series Instance UID: not fetched",
                                            f"{self.client.base}studies/{study_uid}/series#{j}"))
                continue
            try:
                metadata = self.client.get_json(path)
            except (_Refused, _BadAnswer) as e:
                yield self._reject(Rejected("read", "fetch-failed", f"the series metadata could not be fetched ({e})",
                                            self.client.url(path)))
                continue
            if not isinstance(metadata, list):
                yield self._reject(Rejected("read", "fetch-failed", "the series metadata is not a JSON array",
                                            self.client.url(path)))
                continue
            for k, obj in enumerate(metadata):
                yield from self._instance(obj, study_uid, series_uid, f"{self.client.url(path)}#{k}", instances)
        if instances:
            yield from self._study(list(instances.values()))

    def _instance(self, obj: Any, study_uid: str, series_uid: str, where: str,
                  instances: dict[str, tuple[dict[str, Any], str]]) -> Iterator[Rejected]:
        self.counts.read += 1
        record = json_record(obj, self.mapping.wanted.attrs)
        sop = record.get(SOP_UID)
        ref = f"sop:{sop}" if valid_uid(sop) else where
        problem = self.mapping.admit(record, ref)
        if problem is None and (record[STUDY_UID] != study_uid or record[SERIES_UID] != series_uid):
            problem = Rejected("map", "inconsistent-uids", "the server returned this instance under another study "
                               "or series than its own UIDs name", ref)
        if problem is None:
            other = instances.get(sop)
            if other is None:
                instances[sop] = (record, ref)
                return
            if other[0] == record:
                self.counts.duplicates += 1
                return
            problem = Rejected("map", "duplicate-sop-instance", "the server returned this SOP Instance UID twice "
                               "with other metadata: the first is kept", ref)
        payload = orjson.dumps(obj)  # the DICOM JSON as received: what quarantine keeps
        kept = {"payload": payload} if len(payload) <= MAX_PAYLOAD else {"payload_ref": where}
        yield self._reject(Rejected(problem.stage, problem.reason, problem.message, ref, **kept))

    def _reject(self, unit: Rejected) -> Rejected:
        self.counts.rejected += 1
        if unit.stage == "read":
            self.counts.read += 1  # a listing entry or a series that never became instances
        return unit


def read_dicomweb(base_url: str, *, since: date | None = None, headers: Mapping[str, str] | None = None,
                  timeout: tuple[float, float] = (5, 60), retries: int = 4, page_size: int = 100,
                  backoff: float = 0.5, patient_rule: str | None = None,
                  mapping: str | DicomMapping | None = None, timezone: str | None = None,
                  session: requests.Session | None = None, deid_profile: str | None = None) -> DicomWeb:
    """FHIR resources (and Rejected units) from a DICOMweb service (QIDO-RS + WADO-RS metadata).

    `headers` (e.g. {"Authorization": "Bearer ..."}) go with every request; `since` pulls
    only studies with Study Date on or after it (studies without a date are not matched
    by a range query). The other options are those of `read_dicom`. Iterating raises
    SourceUnavailable when the server stays unreachable after `retries`.
    """
    if page_size < 1:
        raise ConfigError("page_size must be at least 1")
    if not isinstance(mapping, DicomMapping):
        mapping = DicomMapping.load(mapping, patient_rule=patient_rule, timezone=timezone,
                                    deid_profile=deid_profile)
    client = DicomWebClient(base_url, headers=headers, timeout=timeout, retries=retries, backoff=backoff,
                            session=session)
    return DicomWeb(client, mapping, since=since, page_size=page_size)


__all__ = ["DicomWeb", "DicomWebClient", "read_dicomweb"]
