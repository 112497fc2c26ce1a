"""FHIR R4 from a FHIR server: RESTful search with paging, or Bulk Data `$export`.

Scheduled jobs pull from the hospital's server rather than from files (issue 6). Two ways,
one interface (`fetch_fhir(options)` -> an object with `units()`, `watermark`,
`finished()`), yielding the same units as the file connector: `Resource`, `Deletion`,
`Rejected`.

- Search (FHIR R4 RESTful API, http.html#search and search.html#count): `GET
  [base]/[Type]?_count=N` and, for an incremental run, `_lastUpdated=gt<since>`; every
  `Bundle.link` `next` is followed, on the configured origin only. The new watermark is
  the server's time before paging began (the first page's `Bundle.meta.lastUpdated`, else
  its `Date` header), the earliest over all types, so a resource changed while paging is
  fetched again next time rather than missed.
- Bulk Data Access IG v2 (hl7.org/fhir/uv/bulkdata/STU2/export.html): kick-off at system,
  Group or Patient level with `Prefer: respond-async`, `_type`, `_since`; polling that
  honours `Retry-After` and reports `X-Progress`; the completion manifest; NDJSON files
  (gzip too) streamed to `state_dir` and then read line by line; `deleted` files become
  `Deletion`s and `error` files `Rejected`s. The new watermark is the manifest's
  `transactionTime`. An interrupted run resumes: the status URL and the manifest are kept
  in `state_dir`, finished files are kept, a partial file is continued with `Range`;
  `finished()` removes them once the lead has committed the data.

Security: URLs the server sends (next pages, status, manifest files, redirects) must stay
on the base URL's origin, or on the one `allowed_origin` (export files on object
storage); others are refused (`OriginRefused`). Nothing here logs or raises with patient
data or secrets: source refs are `GET Observation?_lastUpdated=gt...: page 3 entry 17`
or `bulk Observation.000.ndjson:1234`.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import orjson

from ..auth import AuthConfig, authenticator
from ..errors import ConfigError, SourceUnavailable
from ..fhir import RESOURCE_TYPES, valid_id
from ..http import (
    BrokenBody,
    HttpClient,
    HttpPolicy,
    NotFound,
    backoff,
    error_for,
    origin_of,
    outcome_codes,
    outcome_text,
    retry_after,
    small_body,
)
from ..temporal import BadTemporal, parse_fhir_datetime
from ..units import Deletion, Rejected, Resource, Unit
from .fhir_files import DEFAULT_LIMITS, FhirFile

log = logging.getLogger("twinline.fetch")

# Searched when no types are given: the types Twinline has views for (mappings/views),
# less those the server's CapabilityStatement says it cannot search.
# The types the views map, led by the types other resources point to by identifier
# (conditional references such as Practitioner?identifier=...): fetched first, they
# resolve those references without setting resources aside.
DEFAULT_TYPES = (
    "Organization", "Location", "Practitioner", "PractitionerRole",
    "Patient", "Encounter", "Observation", "Condition", "MedicationRequest", "MedicationAdministration",
    "MedicationStatement", "Procedure", "Immunization", "AllergyIntolerance", "DiagnosticReport",
    "ImagingStudy", "Device",
)
FHIR_JSON = {"Accept": "application/fhir+json"}
MAX_LINE_BYTES = 64 << 20      # one line of a deleted or error file
STATE_VERSION = 1


@dataclass(frozen=True)
class FetchProgress:
    """One progress event; the caller renders it (the CLI as a status line).

    phase    detail                            done / total
    search   "Observation page 3"              entries so far / Bundle.total (if the server says)
    kick-off "export started"                  -
    poll     the server's X-Progress text      polls so far / -
    download "Observation.000.ndjson (file 3 of 9)"  bytes of this file so far / -
    read     the file name                     files read / files in the manifest
    """

    phase: str
    detail: str = ""
    done: int | None = None
    total: int | None = None


@dataclass(kw_only=True)
class FetchOptions:
    """What to fetch from where, and how patiently. Everything but base_url and state_dir has a default."""

    base_url: str
    types: list[str] | None = None       # None: DEFAULT_TYPES for search, every type for bulk
    since: datetime | None = None        # the last watermark; naive datetimes are UTC
    bulk: bool = False
    group: str | None = None             # bulk: Group/[id]/$export
    patient: str | None = None           # bulk: Patient/$export; "*" for all patients, else ids "a,b" (POST)
    count: int = 1000                    # search: _count
    auth: AuthConfig = field(default_factory=AuthConfig)
    state_dir: Path                      # bulk: where the status URL, manifest and files are kept
    timeout: tuple[float, float] = (10.0, 120.0)
    max_retries: int = 5
    rate_limit: float | None = None      # requests per second
    verify_tls: bool = True
    progress: Callable[[FetchProgress], None] | None = None
    # Beyond the lead's list; all optional.
    allowed_origin: str | None = None    # bulk: the one extra origin export files may be on (object storage)
    poll_cap: float = 300.0              # longest pause between two status polls, whatever Retry-After says
    poll_timeout: float = 6 * 3600.0     # stop polling after this long (SourceUnavailable; the next run resumes)
    max_json_bytes: int = 256 << 20
    max_file_bytes: int = 1 << 40
    sleep: Callable[[float], None] = time.sleep   # injectable: tests observe waits without waiting

    def problems(self) -> list[str]:
        """Every problem with these options, each naming the option."""
        out: list[str] = []
        try:
            origin_of(self.base_url)
            parts = urlsplit(self.base_url)
            if parts.query or parts.fragment:
                out.append("base_url: must not have a query or a fragment")
            if parts.username or parts.password:
                out.append("base_url: must not carry credentials: use the auth settings")
        except ValueError:
            out.append("base_url: not an absolute http(s) URL")
        for t in self.types or []:
            if t not in RESOURCE_TYPES:
                out.append(f"types: {t[:64]!r} is not a FHIR R4 resource type")
        if self.types is not None and not self.types:
            out.append("types: empty (leave it out to fetch the default types)")
        if self.group and self.patient:
            out.append("group, patient: give one of them (a Group export or a Patient export)")
        if (self.group or self.patient) and not self.bulk:
            out.append("group, patient: only for a bulk export (bulk = true)")
        if self.group is not None and not valid_id(self.group):
            out.append("group: not a FHIR id")
        if self.patient is not None and self.patient != "*" and not all(valid_id(p) for p in _ids(self.patient)):
            out.append("patient: '*' or a comma-separated list of Patient ids")
        if not isinstance(self.count, int) or self.count < 1:
            out.append("count: must be a positive integer")
        if len(self.timeout) != 2 or min(self.timeout) <= 0:
            out.append("timeout: (connect seconds, read seconds), both positive")
        if self.max_retries < 0:
            out.append("max_retries: must be 0 or more")
        if self.rate_limit is not None and self.rate_limit <= 0:
            out.append("rate_limit: requests per second, positive")
        if self.allowed_origin is not None:
            try:
                origin_of(self.allowed_origin)
            except ValueError:
                out.append("allowed_origin: not an absolute http(s) URL")
        if self.since is not None and not isinstance(self.since, datetime):
            out.append("since: must be a datetime")
        out.extend(self.auth.problems())
        return out


def fetch_fhir(opts: FetchOptions) -> SearchFetch | BulkFetch:
    """A fetch, ready to run: the options are checked and the credentials read (ConfigError if not usable)."""
    problems = opts.problems()
    if problems:
        raise ConfigError("the FHIR fetch settings are not usable", problems)
    if not opts.verify_tls:
        log.warning("TLS certificate verification is off for %s: use this only for testing", opts.base_url)
    policy = HttpPolicy(timeout=opts.timeout, max_retries=opts.max_retries, rate_limit=opts.rate_limit,
                        verify_tls=opts.verify_tls, max_json_bytes=opts.max_json_bytes,
                        max_file_bytes=opts.max_file_bytes)
    extra = [opts.allowed_origin] if opts.allowed_origin and opts.bulk else []
    http = HttpClient(opts.base_url, policy, extra_origins=extra, sleep=opts.sleep)
    authenticator(opts.auth, http)
    return BulkFetch(opts, http) if opts.bulk else SearchFetch(opts, http)


class _Fetch:
    def __init__(self, opts: FetchOptions, http: HttpClient):
        self.opts = opts
        self.http = http
        self.watermark: str | None = None

    def finished(self) -> None:
        """The lead has committed what `units()` yielded: forget what a resume would need."""

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _progress(self, phase: str, detail: str = "", done: int | None = None, total: int | None = None) -> None:
        if self.opts.progress is not None:
            self.opts.progress(FetchProgress(phase, detail, done, total))


# ---------------------------------------------------------------------- search


class SearchFetch(_Fetch):
    """RESTful search, type by type, page by page. Holds one page in memory at a time."""

    def units(self) -> Iterator[Unit]:
        types = list(dict.fromkeys(self.opts.types)) if self.opts.types else self._searchable_defaults()
        marks: list[tuple[datetime, str]] = []
        for rtype in types:
            mark = yield from self._search(rtype)
            if mark is not None:
                marks.append(mark)
        self.watermark = min(marks)[1] if marks and len(marks) == len(types) else None
        if self.watermark is None:
            log.warning("the server gave no time (Bundle.meta.lastUpdated or Date): no new watermark")

    def _search(self, rtype: str) -> Generator[Unit, None, tuple[datetime, str] | None]:
        params = {"_count": str(self.opts.count)}
        label = f"GET {rtype}"
        if self.opts.since is not None:
            params["_lastUpdated"] = "gt" + instant(self.opts.since)
            label += f"?_lastUpdated={params['_lastUpdated']}"
        url: str | None = self.http.url(rtype)
        query: dict[str, str] | None = params
        mark = None
        seen: set[bytes] = set()
        page = done = 0
        while url is not None:
            page += 1
            what = f"search {rtype} page {page}"
            resp, doc = self.http.get_json(url, what=what, params=query, headers=FHIR_JSON)
            if not (isinstance(doc, dict) and doc.get("resourceType") == "Bundle"):
                raise SourceUnavailable(f"{what}: the answer is not a Bundle")
            if page == 1:
                mark = _server_time(doc, resp.headers.get("Date"))
            entries = doc.get("entry") or []
            if not isinstance(entries, list):
                raise SourceUnavailable(f"{what}: Bundle.entry is not a list")
            for i, entry in enumerate(entries):
                unit = search_entry(entry, f"{label}: page {page} entry {i}")
                if unit is not None:
                    yield unit
            done += len(entries)
            total = doc.get("total")
            self._progress("search", f"{rtype} page {page}", done, total if isinstance(total, int) else None)
            url, query = _next_link(doc, resp.url), None
            if url is not None:
                key = hashlib.sha256(url.encode()).digest()
                if key in seen:
                    raise SourceUnavailable(f"{what}: the next link points to a page already read (a loop)")
                seen.add(key)
        return mark

    def _searchable_defaults(self) -> list[str]:
        """DEFAULT_TYPES less those the CapabilityStatement does not list as searchable."""
        try:
            _, cap = self.http.get_json(self.http.url("metadata"), what="capability statement", headers=FHIR_JSON)
        except ConfigError as e:
            log.warning("no CapabilityStatement (%s): searching the default types", e)
            return list(DEFAULT_TYPES)
        searchable = set()
        rests = cap.get("rest") if isinstance(cap, dict) else None
        for rest in rests if isinstance(rests, list) else []:
            if not isinstance(rest, dict) or rest.get("mode", "server") != "server":
                continue
            for res in rest.get("resource") or []:
                if not isinstance(res, dict):
                    continue
                codes = {i.get("code") for i in res.get("interaction") or [] if isinstance(i, dict)}
                if not codes or "search-type" in codes:
                    searchable.add(res.get("type"))
        types = [t for t in DEFAULT_TYPES if t in searchable] if searchable else list(DEFAULT_TYPES)
        log.info("searching %s", ", ".join(types))
        return types


def search_entry(entry: Any, ref: str) -> Unit | None:
    """One entry of a searchset: a Resource, a Rejected, or None (an outcome that only warns)."""
    if not isinstance(entry, dict):
        return Rejected("parse", "bad-entry", "a Bundle entry is not a JSON object", ref, **_kept(orjson.dumps(entry), ref))
    search: dict[str, Any] = entry["search"] if isinstance(entry.get("search"), dict) else {}
    res = entry.get("resource")
    mode = search.get("mode")
    if mode == "outcome" or (mode is None and isinstance(res, dict) and res.get("resourceType") == "OperationOutcome"):
        return _search_outcome(res, ref)
    # "match" and "include" are both data: an included resource is as real as a match
    return checked_resource(res, ref)


def _search_outcome(res: Any, ref: str) -> Unit | None:
    """An OperationOutcome inside a searchset: an error is quarantined (the page may be incomplete), a warning logged."""
    issues = res.get("issue") if isinstance(res, dict) else None
    severities = {i.get("severity") for i in issues or [] if isinstance(i, dict)}
    codes = ", ".join(outcome_codes(res)) or "no issue code"
    if severities & {"error", "fatal"}:
        return Rejected("read", "search-outcome", f"the server reported an error inside the search results ({codes}): "
                        "the results may be incomplete; the OperationOutcome is the payload", ref,
                        **_kept(orjson.dumps(res), ref))
    log.warning("%s: the server notes about this search: %s", ref, codes)
    return None


def checked_resource(obj: Any, ref: str, raw: bytes | None = None) -> Unit:
    """A `Resource` if `obj` is one (a known type with a valid id), else a `Rejected` saying why."""
    if not isinstance(obj, dict):
        return Rejected("parse", "not-a-resource", "the entry holds no resource object", ref,
                        **_kept(orjson.dumps(obj) if obj is not None else None, ref))
    rtype = obj.get("resourceType")
    raw = raw if raw is not None else orjson.dumps(obj)
    if rtype not in RESOURCE_TYPES:
        return Rejected("parse", "unknown-resource-type", "no resourceType, or not a FHIR R4 resource type", ref,
                        **_kept(raw, ref))
    if not valid_id(obj.get("id")):
        return Rejected("parse", "bad-id", f"the {rtype} has no id, or not a FHIR id (1-64 of A-Z a-z 0-9 - .)", ref,
                        **_kept(raw, ref))
    return Resource(obj, ref, None, raw)


def _next_link(bundle: dict[str, Any], page_url: str) -> str | None:
    links = bundle.get("link")
    for link in links if isinstance(links, list) else []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return urljoin(page_url, link["url"])
    return None


def _server_time(bundle: dict[str, Any], date: str | None) -> tuple[datetime, str] | None:
    """The server's clock when it answered: Bundle.meta.lastUpdated, else the Date header."""
    meta: dict[str, Any] = bundle["meta"] if isinstance(bundle.get("meta"), dict) else {}
    text = meta.get("lastUpdated")
    if isinstance(text, str):
        try:
            when, precision, offset = parse_fhir_datetime(text)
            if offset is not None and precision in ("second", "millisecond"):
                return when, text
        except BadTemporal:
            pass
    if date:
        try:
            when = parsedate_to_datetime(date)
        except (TypeError, ValueError, IndexError):
            return None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        return when, instant(when)
    return None


def instant(when: datetime) -> str:
    """A FHIR instant in UTC (`2024-05-01T10:00:00Z`); a naive datetime is taken as UTC."""
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    micro = when.microsecond
    spec = "seconds" if not micro else "milliseconds" if micro % 1000 == 0 else "microseconds"
    return when.isoformat(timespec=spec).replace("+00:00", "Z")


def _ids(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


# ---------------------------------------------------------------------- bulk


class _ExportGone(Exception):
    """The server no longer knows a saved export (404/410): start a new one."""


class BulkFetch(_Fetch):
    """Bulk Data $export: kick off (or resume), poll, download to state_dir, read."""

    def __init__(self, opts: FetchOptions, http: HttpClient):
        super().__init__(opts, http)
        if opts.group:
            self.path = f"Group/{opts.group}/$export"
        elif opts.patient:
            self.path = "Patient/$export"
        else:
            self.path = "$export"
        self.patients = _ids(opts.patient) if opts.patient and opts.patient != "*" else []
        self.types = list(opts.types) if opts.types else []
        self.since = instant(opts.since) if opts.since is not None else None
        what = {"base": http.base_url, "path": self.path, "types": sorted(self.types), "patients": sorted(self.patients)}
        key = hashlib.sha256(orjson.dumps(what, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
        self.request = {**what, "since": self.since}
        self.dir = Path(opts.state_dir) / f"bulk-{key}"
        self.state_file = self.dir / "state.json"
        self.resumed = False

    # ------------------------------------------------------------------ the lead's calls

    def units(self) -> Iterator[Unit]:
        manifest = self._prepared()
        for problem in manifest["problems"]:
            yield Rejected("read", "bad-manifest-entry", problem["message"], problem["ref"])
        files = manifest["files"]
        for i, f in enumerate(files):
            self._progress("read", f["name"], i, len(files))
            yield from self._read(f)
        self._progress("read", "done", len(files), len(files))
        self.watermark = manifest["transactionTime"]

    def finished(self) -> None:
        """Tell the server the files are no longer needed (DELETE, best effort), then forget the export."""
        self._release(self._state().get("status_url"), "bulk done")
        self._clear()

    def cancel(self) -> None:
        """Ask the server to stop and delete the export (DELETE on the status URL); forget it here."""
        url = self._state().get("status_url")
        if url:
            resp = self.http.request("DELETE", url, what="bulk cancel", headers=FHIR_JSON)
            if resp.status_code not in (200, 202, 204, 404, 410):
                raise error_for(resp, "bulk cancel")
            resp.close()
        self._clear()

    # ------------------------------------------------------------------ state in state_dir

    def _state(self) -> dict[str, Any]:
        try:
            state = orjson.loads(self.state_file.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return {}
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            return {}
        return state

    def _save(self, state: dict[str, Any]) -> None:
        """Write atomically: a kill leaves the old state or the new one, never half of one."""
        folder = self._folder(self.dir)
        try:
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps({**state, "version": STATE_VERSION}))
            os.replace(tmp, self.state_file)
        except OSError as e:
            raise ConfigError(f"state_dir: cannot write {folder} ({e.strerror})") from None

    @staticmethod
    def _folder(path: Path) -> Path:
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise ConfigError(f"state_dir: cannot make {path} ({e.strerror or type(e).__name__})") from None
        return path

    def _clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ kick-off, poll, download

    def _prepared(self) -> dict[str, Any]:
        """The manifest with every file on disk; one fresh start if a saved export has expired."""
        for last_try in (False, True):
            try:
                manifest = self._manifest()
                self._download(manifest)
                return manifest
            except _ExportGone as e:
                if last_try or not self.resumed:
                    raise SourceUnavailable(f"bulk export: {e}; retry later") from None
                log.warning("bulk export: the saved export is gone on the server (%s): starting a new one", e)
                self._clear()
                self.resumed = False
        raise AssertionError("unreachable")

    def _manifest(self) -> dict[str, Any]:
        state = self._state()
        if state and state.get("request") != self.request:
            # an export for another `since`: its data was committed (the watermark moved) or is not wanted
            log.info("bulk export: discarding a saved export made for other settings")
            self._forget_other(state)
            state = {}
        if state.get("manifest"):
            self.resumed = True
            return state["manifest"]
        if state.get("status_url"):
            self.resumed = True
            status_url = state["status_url"]
            log.info("bulk export: resuming the export started %s", state.get("kicked_off_at", "earlier"))
        else:
            status_url = self._kick_off()
        manifest = self._poll(status_url)
        self._save({**self._state(), "manifest": manifest})
        return manifest

    def _forget_other(self, state: dict[str, Any]) -> None:
        self._release(state.get("status_url"), "bulk cancel (stale export)")
        self._clear()

    def _release(self, status_url: str | None, what: str) -> None:
        """DELETE on a status URL, for a server's sake: a failure here costs nothing but a log line."""
        if not status_url:
            return
        try:
            self.http.request("DELETE", status_url, what=what, headers=FHIR_JSON).close()
        except (ConfigError, SourceUnavailable) as e:
            log.info("%s: the server was not told (%s)", what, e)

    def _kick_off(self) -> str:
        what = f"bulk kick-off {self.path}"
        self._clear()            # files of an abandoned export must not pass for this one's
        self._folder(self.dir)   # before the server starts work that could not be resumed
        url = self.http.url(self.path)
        headers = {**FHIR_JSON, "Prefer": "respond-async"}
        if self.patients:   # the `patient` parameter exists only in a POSTed Parameters resource
            params: list[dict[str, Any]] = [{"name": "_type", "valueString": t} for t in self.types]
            if self.since:
                params.append({"name": "_since", "valueInstant": self.since})
            params += [{"name": "patient", "valueReference": {"reference": f"Patient/{p}"}} for p in self.patients]
            body = orjson.dumps({"resourceType": "Parameters", "parameter": params})
            resp = self.http.request("POST", url, what=what, data=body,
                                     headers={**headers, "Content-Type": "application/fhir+json"})
        else:
            query = {}
            if self.types:
                query["_type"] = ",".join(self.types)
            if self.since:
                query["_since"] = self.since
            resp = self.http.request("GET", url, what=what, params=query, headers=headers)
        if resp.status_code != 202:
            if resp.status_code < 300:
                resp.close()
                raise ConfigError(f"{what}: HTTP {resp.status_code} instead of 202 Accepted: "
                                  "the server does not run $export asynchronously")
            raise error_for(resp, what)
        location = resp.headers.get("Content-Location")
        resp.close()
        if not location:
            raise SourceUnavailable(f"{what}: 202 Accepted without a Content-Location: the server cannot be polled")
        status_url = self.http.check(urljoin(resp.url, location), f"{what} (Content-Location)")
        self._save({"request": self.request, "status_url": status_url, "kicked_off_at": instant(datetime.now(UTC))})
        self._progress("kick-off", "export started")
        log.info("bulk export started (%s)", self.path)
        return status_url

    def _poll(self, status_url: str) -> dict[str, Any]:
        what = "bulk status"
        clock = self.http.clock
        deadline = clock() + self.opts.poll_timeout
        polls = broken = 0
        while True:
            resp = self.http.request("GET", status_url, what=what, headers={"Accept": "application/json"})
            status = resp.status_code
            if status == 200:
                try:
                    return self._checked_manifest(self.http.read_json(resp, what), status_url)
                except BrokenBody:
                    broken += 1
                    if broken > self.opts.max_retries:
                        raise
                    self.http.sleep(backoff(broken - 1, 1.0, self.opts.poll_cap))
                    continue
            if status == 202:
                polls += 1
                told = _printable(resp.headers.get("X-Progress", ""))
                wait = retry_after(resp.headers.get("Retry-After"), resp.headers.get("Date"))
                resp.close()
                if wait is None:
                    wait = backoff(polls - 1, 1.0, self.opts.poll_cap)
                wait = min(wait, self.opts.poll_cap)
                self._progress("poll", told or "in progress", polls)
                if clock() + wait >= deadline:
                    raise SourceUnavailable(f"bulk export: still running after {self.opts.poll_timeout:.0f} s of "
                                            "polling; run again later: polling resumes, no new export is started")
                self.http.sleep(wait)
                continue
            if status in (404, 410):
                resp.close()
                raise _ExportGone(f"the status URL answers HTTP {status}")
            body = small_body(resp)
            if status in (401, 403) or not (isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"):
                raise error_for(resp, what, body)   # credentials, or a server that is down: keep the export
            if "transient" in outcome_codes(body):
                raise SourceUnavailable(f"{what}: HTTP {status}, a transient problem ({outcome_text(body)}); "
                                        "run again later: polling resumes")
            self._clear()
            raise SourceUnavailable(f"bulk export failed on the server (HTTP {status}): {outcome_text(body)}; "
                                    "the next run starts a new export")

    def _checked_manifest(self, doc: Any, status_url: str) -> dict[str, Any]:
        """The manifest reduced to what a resume needs, every file URL checked against the origins."""
        if not isinstance(doc, dict):
            raise SourceUnavailable("bulk status: the completion manifest is not a JSON object")
        when = doc.get("transactionTime")
        try:
            parse_fhir_datetime(when)
        except BadTemporal:
            raise SourceUnavailable("bulk status: the manifest has no valid transactionTime") from None
        files: list[dict[str, Any]] = []
        problems: list[dict[str, str]] = []
        per_name: dict[str, int] = {}
        for kind in ("output", "deleted", "error"):
            items = doc.get(kind) or []
            if not isinstance(items, list):
                problems.append({"ref": f"bulk manifest {kind}", "message": f"the manifest's {kind} is not a list"})
                continue
            for i, item in enumerate(items):
                ref = f"bulk manifest {kind}[{i}]"
                url = item.get("url") if isinstance(item, dict) else None
                if not isinstance(url, str) or not url:
                    problems.append({"ref": ref, "message": f"the manifest's {kind}[{i}] has no url: "
                                     "that file cannot be fetched"})
                    continue
                url = self.http.check(urljoin(status_url, url), ref)
                rtype = item.get("type")
                stem = rtype if kind == "output" and isinstance(rtype, str) and rtype in RESOURCE_TYPES else kind
                n = per_name[stem] = per_name.get(stem, -1) + 1
                count = item.get("count")
                files.append({"kind": kind, "url": url, "name": f"{stem}.{n:03d}.ndjson",
                              "count": count if isinstance(count, int) else None})
        return {"transactionTime": when, "requiresAccessToken": doc.get("requiresAccessToken") is not False,
                "files": files, "problems": problems}

    def _download(self, manifest: dict[str, Any]) -> None:
        files = manifest["files"]
        folder = self._folder(self.dir / "files")
        for i, f in enumerate(files):
            if self._on_disk(f) is not None:
                continue
            name = f["name"]
            part = folder / (name + ".part")
            partial = self._state().get("partial", {}).get(name, {})

            def started(validator: str | None, encoding: str, name: str = name) -> None:
                state = self._state()
                state.setdefault("partial", {})[name] = {"validator": validator, "encoding": encoding}
                self._save(state)

            label = f"{name} (file {i + 1} of {len(files)})"

            def moved(size: int, label: str = label) -> None:
                self._progress("download", label, size)

            self._progress("download", label, 0)
            try:
                self.http.download(f["url"], part, what=f"bulk file {name}", send_auth=manifest["requiresAccessToken"],
                                   validator=partial.get("validator"), encoding=partial.get("encoding"),
                                   on_start=started, on_bytes=_every(moved, 8 << 20))
            except NotFound as e:
                raise _ExportGone(str(e)) from None
            with open(part, "rb") as fh:
                gz = fh.read(2) == b"\x1f\x8b"
            os.replace(part, folder / (name + (".gz" if gz else "")))

    def _on_disk(self, f: dict[str, Any]) -> Path | None:
        base = self.dir / "files" / f["name"]
        for path in (base, base.with_name(base.name + ".gz")):
            if path.exists():
                return path
        return None

    # ------------------------------------------------------------------ reading the files

    def _read(self, f: dict[str, Any]) -> Iterator[Unit]:
        path = self._on_disk(f)
        if path is None or path.stat().st_size == 0:
            return
        ref = f"bulk {f['name']}"
        if f["kind"] == "output":
            reader = FhirFile(path)
            reader.ref = ref
            yield from reader
            if f["count"] is not None and reader.units != f["count"]:
                log.warning("%s: the manifest says %d resources, the file holds %d lines", ref, f["count"], reader.units)
            return
        convert = _deletions if f["kind"] == "deleted" else _export_errors
        for item in _json_lines(path, ref):
            if isinstance(item, Rejected):
                yield item
            else:
                yield from convert(*item)


def _json_lines(path: Path, ref: str) -> Iterator[tuple[Any, str, bytes] | Rejected]:
    """(object, ref, raw line) for each line of a small NDJSON file (gzip or not), or a Rejected."""
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    line_no = 0
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as stream:
            while line := stream.readline(MAX_LINE_BYTES + 1):
                line_no += 1
                here = f"{ref}:{line_no}"
                if len(line) > MAX_LINE_BYTES:
                    while line and not line.endswith(b"\n"):
                        line = stream.readline(MAX_LINE_BYTES)
                    yield Rejected("read", "line-too-long", f"a line longer than {MAX_LINE_BYTES} bytes", here,
                                   payload_ref=here)
                    continue
                if not line.strip():
                    continue
                try:
                    yield orjson.loads(line), here, line.rstrip(b"\r\n")
                except orjson.JSONDecodeError:
                    yield Rejected("parse", "invalid-json", "not valid JSON", here, **_kept(line, here))
    except (EOFError, OSError, zlib.error):
        yield Rejected("read", "bad-gzip", f"the compressed file is corrupt after line {line_no}: fetch it again",
                       f"{ref}:{line_no + 1}", payload_ref=ref)


def _deletions(bundle: Any, ref: str, raw: bytes) -> Iterator[Unit]:
    """A line of a `deleted` file: a Bundle of DELETE requests -> one Deletion per entry."""
    entries = bundle.get("entry") if isinstance(bundle, dict) and bundle.get("resourceType") == "Bundle" else None
    if not isinstance(entries, list) or not entries:
        yield Rejected("parse", "bad-deleted-line", "a line of a deleted file is not a Bundle with entries", ref,
                       **_kept(raw, ref))
        return
    for j, entry in enumerate(entries):
        here = f"{ref} entry {j}"
        request: dict[str, Any] = entry["request"] if isinstance(entry, dict) and isinstance(entry.get("request"), dict) \
            else {}
        url = request.get("url")
        target = _type_and_id(url) if str(request.get("method", "")).upper() == "DELETE" else None
        if target is None:
            yield Rejected("parse", "bad-deleted-entry", "an entry of a deleted Bundle is not a DELETE of Type/id",
                           here, **_kept(orjson.dumps(entry), here))
        else:
            yield Deletion(target[0], target[1], here)


def _type_and_id(url: Any) -> tuple[str, str] | None:
    """`Patient/123` or `https://server/fhir/Patient/123` (no conditional deletes)."""
    if not isinstance(url, str) or "?" in url:
        return None
    parts = url.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] in RESOURCE_TYPES and valid_id(parts[-1]):
        return parts[-2], parts[-1]
    return None


def _export_errors(outcome: Any, ref: str, raw: bytes) -> Iterator[Unit]:
    """A line of an `error` file: the server could not export something; it goes to quarantine as reported."""
    if isinstance(outcome, dict) and outcome.get("resourceType") == "OperationOutcome":
        codes = ", ".join(outcome_codes(outcome)) or "no issue code"
        yield Rejected("read", "export-error", f"the server reported an export error ({codes}); "
                       "its OperationOutcome is the payload", ref, **_kept(raw, ref))
    else:
        yield Rejected("read", "export-error", "a line of the server's error file that is not an OperationOutcome",
                       ref, **_kept(raw, ref))


def _kept(raw: bytes | None, ref: str) -> dict[str, Any]:
    """The payload a Rejected keeps: the bytes, or only a pointer past the quarantine's size limit."""
    if raw is None or len(raw) <= DEFAULT_LIMITS.max_payload_bytes:
        return {"payload": raw}
    return {"payload_ref": ref}


def _printable(text: str, limit: int = 100) -> str:
    text = "".join(c for c in text if c.isprintable())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _every(callback: Callable[[int], None], step: int) -> Callable[[int], None]:
    """Call `callback(n)` only when n has grown by `step` since the last call."""
    last = [0]

    def maybe(n: int) -> None:
        if n - last[0] >= step:
            last[0] = n
            callback(n)

    return maybe
