"""A FHIR server for the tests: search paging, Bulk Data $export, SMART Backend Services, faults on demand.

No FHIR server can be installed on these machines (NOTES.md), so the fetch client is
tested against this one. It follows the specifications the way production servers do,
and is strict where they may be strict, so that a sloppy client fails here first:

- search (FHIR R4 http.html#search): `GET [base]/[Type]` with `_count` (capped at
  `max_count`) and `_lastUpdated` (prefixes gt, ge, lt, le, eq) over each resource's
  `meta.lastUpdated`; other parameters are refused with 400 and an OperationOutcome. Pages
  come from a snapshot taken at the first page (HAPI-style `[base]?_getpages=...` next
  links); `Bundle.meta.lastUpdated` is the snapshot's time.
- Bulk Data Access IG v2: `$export` at system, `Group/[id]` and `Patient` level, by GET
  (`_type`, `_since`, `_outputFormat`) or POST of a Parameters resource (also `patient`);
  `Accept: application/fhir+json` and `Prefer: respond-async` are required. The status
  URL answers 202 with `X-Progress` and `Retry-After` for `polls` polls, then the
  manifest (`output`, `deleted` for `_since` exports, `error`). Files are served with
  `ETag`, `Range`/`If-Range` (206/416), and `Content-Encoding: gzip` when asked for;
  `gzip_files` serves `.ndjson.gz` files instead. DELETE on the status URL cancels.
- SMART Backend Services: `/auth/token` checks the client assertion's signature against
  the public key registered for the client (`register_client`), and its claims (iss = sub
  = client_id, aud = the token URL, exp at most 5 minutes ahead, a jti never seen
  before, kid, typ); every data request then needs a valid, unexpired bearer token.
  `auth="bearer"` and `auth="basic"` check a fixed token or user and password.
- faults on demand (`fault()`): an HTTP status with `Retry-After`, a connection cut after
  N bytes, a hang after N bytes until released, a redirect; `next_url` and `file_base`
  send next links or manifest file URLs to another origin.

Every request is recorded in `seen` for the tests to inspect. Data: NDJSON files, one
resource a line (`log.ndjson` and other lines without resourceType/id are skipped).
With `stamp_meta` (the default) resources are served with `meta.lastUpdated` and
`meta.versionId` set as a server would; without it they are served byte for byte as read.

Run alone (for trying the CLI or the benchmark by hand):
    python tests/fhir_server.py DATA_DIR [--port 8080] [--polls 2]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import re
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

BASE_PATH = "/fhir"
NDJSON_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
EXPORT_PARAMS = {"_type", "_since", "_outputFormat", "patient"}
SEARCH_PARAMS = {"_count", "_lastUpdated"}
PAGE_PARAMS = {"_getpages", "_getpagesoffset", "_count", "_bundletype"}
COMPARTMENT_FIELDS = ("subject", "patient", "beneficiary")


def fhir_instant(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def outcome(code: str, text: str, severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": text}]}


@dataclass
class Stored:
    rtype: str
    id: str
    original: bytes          # the line as read
    resource: dict[str, Any]
    updated: datetime
    version: int = 1
    deleted_at: datetime | None = None
    served: bytes = b""


@dataclass
class Seen:
    """One request as received (for assertions)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    listener: str


@dataclass
class Fault:
    pattern: re.Pattern[str]
    method: str | None
    times: int
    status: int | None = None
    retry_after: str | None = None
    body: dict[str, Any] | None = None
    cut_after: int | None = None
    hang: threading.Event | None = None
    location: str | None = None
    hits: int = 0


@dataclass
class Client:
    client_id: str
    kid: str
    alg: str
    public_key: Any


@dataclass
class Job:
    id: str
    request: str
    transaction_time: datetime
    files: dict[str, tuple[str, str | None, bytes, int]]   # name -> (kind, type, bytes, lines)
    polls: int = 0
    fail: tuple[int, dict[str, Any]] | None = None


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    cut_after: int | None = None
    hang: threading.Event | None = None


class FhirTestServer:
    """Start with `with FhirTestServer(data) as server:`; `server.base_url` is the FHIR base."""

    def __init__(self, data: Path | Iterable[Path] | None = None, *, auth: str | None = None, stamp_meta: bool = True,
                 bundle_meta: bool = True, polls: int = 2, retry_after: str | None = "0", lines_per_file: int = 10_000,
                 gzip_files: bool = False, content_gzip: bool = True, token_lifetime: int = 300, max_count: int = 1000,
                 file_listener: bool = False, bearer_token: str | None = None,
                 basic: tuple[str, str] | None = None, port: int = 0):
        self.port = port
        self.auth = auth
        self.stamp_meta = stamp_meta
        self.bundle_meta = bundle_meta
        self.polls = polls
        self.retry_after = retry_after        # "0", "2", or "date" (an HTTP-date 1 s ahead), or None
        self.lines_per_file = lines_per_file
        self.gzip_files = gzip_files
        self.content_gzip = content_gzip
        self.token_lifetime = token_lifetime
        self.max_count = max_count
        self.bearer_token = bearer_token
        self.basic = basic
        self.requires_access_token = auth is not None and not file_listener
        self.with_file_listener = file_listener
        self.next_url: str | None = None       # every next link is this URL (another origin, a loop)
        self.file_base: str | None = None      # send manifest file URLs to another origin
        self.token_endpoint: str | None = None  # what .well-known/smart-configuration names (default: ours)
        self.search_extra: list[bytes] = []    # raw entries appended to every first search page
        self.export_errors: list[dict[str, Any]] = []
        self.bulk_extra_lines: list[bytes] = []   # raw lines appended to the first output file of an export
        self.groups: dict[str, list[str]] = {}
        self.seen: list[Seen] = []
        self.kickoffs = 0
        self.token_requests = 0
        self.assertions: list[dict[str, Any]] = []   # verified claims, for assertions
        self.clients: dict[str, Client] = {}
        self.tokens: dict[str, float] = {}           # token -> expiry (monotonic)
        self.jtis: set[str] = set()
        self.faults: list[Fault] = []
        self.jobs: dict[str, Job] = {}
        self.snapshots: dict[str, tuple[datetime, list[Stored]]] = {}
        self.store: dict[str, dict[str, Stored]] = {}
        self._lock = threading.RLock()
        self._last = datetime(2000, 1, 1, tzinfo=UTC)
        self._gz_cache: dict[tuple[str, str], bytes] = {}
        self._servers: list[_Server] = []
        for folder in ([data] if isinstance(data, Path) else list(data or [])):
            self.load(folder)

    # ------------------------------------------------------------------ data

    def now(self) -> datetime:
        """The server clock: UTC, millisecond precision, strictly increasing."""
        with self._lock:
            t = datetime.now(UTC)
            t = t.replace(microsecond=t.microsecond // 1000 * 1000)
            if t <= self._last:
                t = self._last + timedelta(milliseconds=1)
            self._last = t
            return t

    def load(self, folder: Path) -> None:
        for path in sorted(Path(folder).glob("*.ndjson")):
            with open(path, "rb") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    obj = orjson.loads(line)
                    if isinstance(obj, dict) and "resourceType" in obj and "id" in obj:
                        self._put(Stored(obj["resourceType"], obj["id"], line, obj, self.now()))

    def _put(self, item: Stored) -> None:
        if self.stamp_meta:
            res = {**item.resource, "meta": {**(item.resource.get("meta") or {}), "versionId": str(item.version),
                                             "lastUpdated": fhir_instant(item.updated)}}
            item.served = orjson.dumps(res)
        else:
            item.served = item.original if item.version == 1 else orjson.dumps(item.resource)
        self.store.setdefault(item.rtype, {})[item.id] = item

    def add(self, resource: dict[str, Any]) -> None:
        raw = orjson.dumps(resource)
        with self._lock:
            self._put(Stored(resource["resourceType"], resource["id"], raw, resource, self.now()))

    def touch(self, rtype: str, rid: str, change: dict[str, Any] | None = None) -> datetime:
        """Update a resource (optionally changing fields): a new version, lastUpdated = now."""
        with self._lock:
            old = self.store[rtype][rid]
            res = {**old.resource, **(change or {})}
            item = Stored(rtype, rid, old.original, res, self.now(), old.version + 1)
            self._put(item)
            return item.updated

    def delete(self, rtype: str, rid: str) -> datetime:
        with self._lock:
            item = self.store[rtype][rid]
            item.deleted_at = item.updated = self.now()
            return item.deleted_at

    def live(self, rtype: str) -> list[Stored]:
        return [s for s in self.store.get(rtype, {}).values() if s.deleted_at is None]

    # ------------------------------------------------------------------ test controls

    def register_client(self, client_id: str, kid: str, alg: str, public_key: Any) -> None:
        self.clients[client_id] = Client(client_id, kid, alg, public_key)

    def fault(self, pattern: str, *, method: str | None = None, times: int = 1, status: int | None = None,
              retry_after: str | None = None, body: dict[str, Any] | None = None, cut_after: int | None = None,
              hang: bool = False, location: str | None = None) -> Fault:
        """The next `times` requests whose path matches `pattern` misbehave as told.

        status: answer this status (with an OperationOutcome or `body`, and `retry_after`);
        location: answer 302 to this URL; cut_after: send the real answer's headers and
        this many body bytes, then close the connection (`hang`: first wait until
        `fault.hang` is set).
        """
        f = Fault(re.compile(pattern), method, times, status, retry_after, body, cut_after,
                  threading.Event() if hang else None, location)
        self.faults.append(f)
        return f

    def requests_to(self, pattern: str, method: str | None = None) -> list[Seen]:
        rx = re.compile(pattern)
        return [s for s in self.seen if rx.search(s.path) and (method is None or s.method == method)]

    # ------------------------------------------------------------------ life

    @property
    def base_url(self) -> str:
        return self._url(self._servers[0]) + BASE_PATH

    @property
    def origin(self) -> str:
        return self._url(self._servers[0])

    @property
    def file_origin(self) -> str:
        return self._url(self._servers[1])

    @property
    def token_url(self) -> str:
        return self.origin + "/auth/token"

    @staticmethod
    def _url(server: _Server) -> str:
        host, port = server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FhirTestServer:
        roles = ["main", "files"] if self.with_file_listener else ["main"]
        for role in roles:
            srv = _Server(("127.0.0.1", self.port if role == "main" else 0), _Handler)
            srv.app = self     # type: ignore[attr-defined]
            srv.role = role    # type: ignore[attr-defined]
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(srv)
        if self.with_file_listener:
            self.file_base = self.file_origin + BASE_PATH
        return self

    def stop(self) -> None:
        for f in self.faults:
            if f.hang is not None:
                f.hang.set()
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()

    def __enter__(self) -> FhirTestServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ dispatch

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes, role: str) -> Reply:
        parts = urlsplit(target)
        path = parts.path
        query = parse_qs(parts.query, keep_blank_values=True)
        self.seen.append(Seen(method, path, query, headers, role))
        fault = self._fault(method, path)
        if fault is not None and fault.location is not None:
            return Reply(302, b"", {"Location": fault.location})
        if fault is not None and fault.status is not None:
            reply = _json(fault.status, fault.body or outcome("transient", f"injected {fault.status}"))
            if fault.retry_after is not None:
                reply.headers["Retry-After"] = fault.retry_after
            return reply
        reply = self._route(method, path, query, headers, body, role)
        if fault is not None and fault.cut_after is not None:
            reply.cut_after, reply.hang = fault.cut_after, fault.hang
        return reply

    def _fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.times > 0 and f.pattern.search(path) and (f.method is None or f.method == method):
                    f.times -= 1
                    f.hits += 1
                    return f
        return None

    def _route(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes,
               role: str) -> Reply:
        if path == "/auth/token" and method == "POST" and role == "main":
            return self._token(headers, body)
        if not path.startswith(BASE_PATH):
            return _json(404, outcome("not-found", "no such endpoint"))
        rel = path[len(BASE_PATH):].strip("/")
        segs = rel.split("/") if rel else []
        if role == "files":
            if len(segs) == 3 and segs[0] == "$export-file" and method == "GET":
                return self._file(segs[1], segs[2], headers)
            return _json(404, outcome("not-found", "this host serves export files only"))
        if segs == ["metadata"]:
            return self._capabilities()
        if segs == [".well-known", "smart-configuration"]:
            return _json(200, {"token_endpoint": self.token_endpoint or self.token_url,
                               "grant_types_supported": ["client_credentials"],
                               "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                               "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
                               "scopes_supported": ["system/*.read", "system/*.rs"]}, "application/json")
        refused = self._check_auth(headers, segs)
        if refused is not None:
            return refused
        if not segs and method == "GET" and "_getpages" in query:
            return self._page(query)
        if segs and segs[-1] == "$export" and method in ("GET", "POST"):
            return self._kickoff(segs[:-1], query, headers, body, method)
        if len(segs) == 2 and segs[0] == "$export-status":
            return self._status(segs[1], method)
        if len(segs) == 3 and segs[0] == "$export-file" and method == "GET":
            return self._file(segs[1], segs[2], headers)
        if len(segs) == 1 and method == "GET":
            return self._search(segs[0], query)
        if len(segs) == 2 and method == "GET":
            item = self.store.get(segs[0], {}).get(segs[1])
            if item is None or item.deleted_at is not None:
                return _json(404 if item is None else 410, outcome("not-found", "no such resource"))
            return Reply(200, item.served, {"Content-Type": "application/fhir+json"})
        return _json(400, outcome("not-supported", "operation not supported by this test server"))

    def _check_auth(self, headers: dict[str, str], segs: list[str]) -> Reply | None:
        if self.auth is None or (segs and segs[0] == "$export-file" and not self.requires_access_token):
            return None
        given = headers.get("authorization", "")
        if self.auth == "basic" and self.basic:
            want = "Basic " + base64.b64encode(f"{self.basic[0]}:{self.basic[1]}".encode()).decode()
            ok = secrets.compare_digest(given, want)
        elif self.auth == "bearer":
            ok = secrets.compare_digest(given, f"Bearer {self.bearer_token}")
        else:
            token = given[7:] if given.startswith("Bearer ") else ""
            expiry = self.tokens.get(token)
            ok = expiry is not None and time.monotonic() < expiry
        if ok:
            return None
        reply = _json(401, outcome("login", "missing, invalid or expired credentials"))
        reply.headers["WWW-Authenticate"] = "Bearer" if self.auth != "basic" else 'Basic realm="fhir"'
        return reply

    def _capabilities(self) -> Reply:
        resources = [{"type": t, "interaction": [{"code": "read"}, {"code": "search-type"}],
                      "searchParam": [{"name": "_lastUpdated", "type": "date"}]} for t in sorted(self.store)]
        return _json(200, {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                           "fhirVersion": "4.0.1", "format": ["json"],
                           "rest": [{"mode": "server", "resource": resources}]})

    # ------------------------------------------------------------------ SMART token endpoint

    def _token(self, headers: dict[str, str], body: bytes) -> Reply:
        import jwt

        self.token_requests += 1
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}

        def refuse(why: str) -> Reply:
            return _json(400, {"error": "invalid_client", "error_description": why}, "application/json")

        if form.get("grant_type") != "client_credentials":
            return _json(400, {"error": "unsupported_grant_type"}, "application/json")
        if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            return refuse("client_assertion_type must be jwt-bearer")
        if not form.get("scope"):
            return _json(400, {"error": "invalid_scope"}, "application/json")
        assertion = form.get("client_assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return refuse("the assertion is not a JWT")
        client = self.clients.get(str(unverified.get("iss")))
        if client is None:
            return refuse("unknown client")
        if header.get("kid") != client.kid or header.get("typ") != "JWT" or header.get("alg") != client.alg:
            return refuse("kid, typ or alg do not match the registration")
        try:
            claims = jwt.decode(assertion, client.public_key, algorithms=[client.alg], audience=self.token_url,
                                issuer=client.client_id, options={"require": ["iss", "sub", "aud", "exp", "jti"]})
        except jwt.PyJWTError as e:
            return refuse(f"assertion refused: {type(e).__name__}")
        if claims["sub"] != client.client_id:
            return refuse("sub must equal iss")
        if claims["exp"] > time.time() + 300 + 5:
            return refuse("exp more than five minutes ahead")
        with self._lock:
            if claims["jti"] in self.jtis:
                return refuse("jti replayed")
            self.jtis.add(claims["jti"])
        self.assertions.append(claims)
        token = secrets.token_urlsafe(24)
        self.tokens[token] = time.monotonic() + self.token_lifetime
        return _json(200, {"access_token": token, "token_type": "bearer", "expires_in": self.token_lifetime,
                           "scope": form["scope"]}, "application/json")

    # ------------------------------------------------------------------ search

    def _search(self, rtype: str, query: dict[str, list[str]]) -> Reply:
        if rtype not in self.store:
            return _json(404, outcome("not-supported", f"resource type {rtype[:40]} is not supported"))
        unknown = set(query) - SEARCH_PARAMS
        if unknown:
            return _json(400, outcome("not-supported", f"unknown search parameter {sorted(unknown)[0][:40]}"))
        try:
            count = min(int(query.get("_count", ["50"])[0]), self.max_count)
            tests = [_date_test(v) for v in query.get("_lastUpdated", [])]
        except ValueError:
            return _json(400, outcome("invalid", "bad _count or _lastUpdated value"))
        if count < 1:
            return _json(400, outcome("invalid", "_count must be positive"))
        with self._lock:
            items = [s for s in self.live(rtype) if all(t(s.updated) for t in tests)]
            sid = secrets.token_hex(8)
            self.snapshots[sid] = (self.now(), items)
        return self._bundle(sid, 0, count, first=True)

    def _page(self, query: dict[str, list[str]]) -> Reply:
        unknown = set(query) - PAGE_PARAMS
        if unknown:
            return _json(400, outcome("not-supported", "unknown paging parameter"))
        sid = query["_getpages"][0]
        if sid not in self.snapshots:
            return _json(410, outcome("not-found", "the search has expired"))
        try:
            offset, count = int(query["_getpagesoffset"][0]), int(query["_count"][0])
        except (KeyError, ValueError):
            return _json(400, outcome("invalid", "bad paging parameters"))
        return self._bundle(sid, offset, count, first=False)

    def _bundle(self, sid: str, offset: int, count: int, first: bool) -> Reply:
        when, items = self.snapshots[sid]
        page = items[offset:offset + count]
        links = [{"relation": "self", "url": f"{self.base_url}?_getpages={sid}&_getpagesoffset={offset}&_count={count}"}]
        if offset + count < len(items):
            links.append({"relation": "next", "url": self.next_url or
                          f"{self.base_url}?_getpages={sid}&_getpagesoffset={offset + count}&_count={count}"})
        head: dict[str, Any] = {"resourceType": "Bundle", "id": sid, "type": "searchset", "total": len(items),
                                "link": links}
        if self.bundle_meta:
            head["meta"] = {"lastUpdated": fhir_instant(when)}
        entries = [b'{"fullUrl":"' + f"{self.base_url}/{s.rtype}/{s.id}".encode() + b'","resource":' + s.served
                   + b',"search":{"mode":"match"}}' for s in page]
        if first:
            entries += self.search_extra
        body = orjson.dumps(head)[:-1] + b',"entry":[' + b",".join(entries) + b"]}"
        return Reply(200, body, {"Content-Type": "application/fhir+json"})

    # ------------------------------------------------------------------ bulk export

    def _kickoff(self, level: list[str], query: dict[str, list[str]], headers: dict[str, str], body: bytes,
                 method: str) -> Reply:
        if headers.get("accept") != "application/fhir+json":
            return _json(400, outcome("invalid", "the Accept header must be application/fhir+json"))
        if "respond-async" not in headers.get("prefer", ""):
            return _json(400, outcome("invalid", "the Prefer header must be respond-async"))
        if level not in ([], ["Patient"]) and not (len(level) == 2 and level[0] == "Group"):
            return _json(400, outcome("not-supported", "$export is defined at system, Patient and Group level"))
        params: dict[str, list[str]] = {}
        if method == "POST":
            try:
                doc = orjson.loads(body)
                for p in doc["parameter"]:
                    value = p.get("valueString") or p.get("valueInstant") or (p.get("valueReference") or {}).get("reference")
                    params.setdefault(p["name"], []).append(value)
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                return _json(400, outcome("invalid", "the body must be a Parameters resource"))
        else:
            params = {k: ",".join(v).split(",") if k == "_type" else v for k, v in query.items()}
            if "patient" in params:
                return _json(400, outcome("not-supported", "the patient parameter needs POST"))
        unknown = set(params) - EXPORT_PARAMS
        if unknown:
            return _json(400, outcome("not-supported", f"unsupported parameter {sorted(unknown)[0][:40]}"))
        if any(f not in NDJSON_FORMATS for f in params.get("_outputFormat", [])):
            return _json(400, outcome("not-supported", "only NDJSON output"))
        types = [t for v in params.get("_type", []) for t in v.split(",") if t]
        if any(not t[:1].isupper() for t in types):
            return _json(400, outcome("invalid", "bad _type"))
        try:
            since = datetime.fromisoformat(params["_since"][0]) if params.get("_since") else None
        except ValueError:
            return _json(400, outcome("invalid", "bad _since"))
        members: set[str] | None = None
        if level == ["Patient"]:
            refs = params.get("patient") or []
            members = {r.split("/", 1)[1] for r in refs if r.startswith("Patient/")} if refs else \
                {s.id for s in self.live("Patient")}
        elif level:
            if level[1] not in self.groups:
                return _json(404, outcome("not-found", "no such Group"))
            members = set(self.groups[level[1]])
        with self._lock:
            self.kickoffs += 1
            job = Job(secrets.token_hex(8), f"{self.base_url}/{'/'.join(level + ['$export'])}", self.now(), {})
            self._fill(job, types, since, members)
            self.jobs[job.id] = job
        return Reply(202, orjson.dumps(outcome("informational", "export accepted", "information")),
                     {"Content-Location": f"{self.base_url}/$export-status/{job.id}",
                      "Content-Type": "application/fhir+json"})

    def _fill(self, job: Job, types: list[str], since: datetime | None, members: set[str] | None) -> None:
        wanted = types or sorted(self.store)
        for rtype in wanted:
            lines = []
            for s in self.store.get(rtype, {}).values():
                if s.deleted_at is not None or (since is not None and s.updated <= since):
                    continue
                if members is not None and not _in_compartment(s, members):
                    continue
                lines.append(s.served)
            if rtype == wanted[0]:
                lines += self.bulk_extra_lines
            for k in range(0, len(lines), self.lines_per_file):
                chunk = lines[k:k + self.lines_per_file]
                self._add_file(job, f"{rtype}-{k // self.lines_per_file}", "output", rtype, chunk)
        if since is not None:
            gone = [s for t in wanted for s in self.store.get(t, {}).values()
                    if s.deleted_at is not None and s.deleted_at > since]
            if gone:
                bundles = [orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
                    {"request": {"method": "DELETE", "url": f"{s.rtype}/{s.id}"}}]}) for s in gone]
                self._add_file(job, "deleted-0", "deleted", "Bundle", bundles)
        if self.export_errors:
            self._add_file(job, "errors-0", "error", "OperationOutcome", [orjson.dumps(o) for o in self.export_errors])

    def _add_file(self, job: Job, stem: str, kind: str, rtype: str, lines: list[bytes]) -> None:
        data = b"".join(line + b"\n" for line in lines)
        name = stem + ".ndjson"
        if self.gzip_files:
            data, name = gzip.compress(data, mtime=0), name + ".gz"
        job.files[name] = (kind, rtype, data, len(lines))

    def _status(self, jid: str, method: str) -> Reply:
        job = self.jobs.get(jid)
        if job is None:
            return _json(404, outcome("not-found", "no such export"))
        if method == "DELETE":
            del self.jobs[jid]
            return _json(202, outcome("informational", "export cancelled", "information"))
        if method != "GET":
            return _json(405, outcome("not-supported", "GET or DELETE"))
        if job.fail is not None:
            return _json(*job.fail)
        job.polls += 1
        if job.polls <= self.polls:
            headers = {"X-Progress": f"{100 * job.polls // (self.polls + 1)}% done"}
            if self.retry_after == "date":
                headers["Retry-After"] = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
            elif self.retry_after is not None:
                headers["Retry-After"] = self.retry_after
            return Reply(202, b"", headers)
        base = self.file_base or self.base_url
        listing: dict[str, list[dict[str, Any]]] = {"output": [], "deleted": [], "error": []}
        for name, (kind, rtype, _, lines) in job.files.items():
            item: dict[str, Any] = {"type": rtype, "url": f"{base}/$export-file/{jid}/{name}"}
            if kind == "output":
                item["count"] = lines
            listing[kind].append(item)
        manifest = {"transactionTime": fhir_instant(job.transaction_time), "request": job.request,
                    "requiresAccessToken": self.requires_access_token, **listing}
        reply = _json(200, manifest, "application/json")
        reply.headers["Expires"] = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
        return reply

    def _file(self, jid: str, name: str, headers: dict[str, str]) -> Reply:
        job = self.jobs.get(jid)
        if job is None or name not in job.files:
            return _json(404, outcome("not-found", "no such file"))
        data = job.files[name][2]
        extra = {"Content-Type": "application/fhir+ndjson", "Accept-Ranges": "bytes"}
        if self.content_gzip and not name.endswith(".gz") and "gzip" in headers.get("accept-encoding", ""):
            key = (jid, name)
            if key not in self._gz_cache:
                self._gz_cache[key] = gzip.compress(data, mtime=0)
            data = self._gz_cache[key]
            extra["Content-Encoding"] = "gzip"
        etag = '"' + hashlib.sha256(data).hexdigest()[:20] + '"'
        extra["ETag"] = etag
        ranged = re.fullmatch(r"bytes=(\d+)-", headers.get("range", ""))
        if ranged and headers.get("if-range", etag) == etag:
            start = int(ranged.group(1))
            if start >= len(data):
                return Reply(416, b"", {**extra, "Content-Range": f"bytes */{len(data)}"})
            return Reply(206, data[start:], {**extra, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        return Reply(200, data, extra)


def _in_compartment(s: Stored, members: set[str]) -> bool:
    if s.rtype == "Patient":
        return s.id in members
    for name in COMPARTMENT_FIELDS:
        ref = s.resource.get(name)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            kind, _, rid = ref["reference"].partition("/")
            if kind == "Patient" and rid in members:
                return True
    return False


def _date_test(value: str):
    prefix, text = (value[:2], value[2:]) if value[:2] in ("gt", "ge", "lt", "le", "eq") else ("eq", value)
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError("an instant needs a time zone")
    return {"gt": lambda t: t > when, "ge": lambda t: t >= when, "lt": lambda t: t < when,
            "le": lambda t: t <= when, "eq": lambda t: t == when}[prefix]


def _json(status: int, doc: dict[str, Any], content_type: str = "application/fhir+json") -> Reply:
    return Reply(status, orjson.dumps(doc), {"Content-Type": content_type})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up (the tests' cut and killed downloads) is not an error here."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TwinlineTestFHIR/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the tests read `seen`
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        app: FhirTestServer = self.server.app  # type: ignore[attr-defined]
        reply = app.handle(self.command, self.path, headers, body, self.server.role)  # type: ignore[attr-defined]
        try:
            self.send_response(reply.status)
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if reply.cut_after is None:
                self.wfile.write(reply.body)
                return
            self.wfile.write(reply.body[:reply.cut_after])
            self.wfile.flush()
            if reply.hang is not None:
                reply.hang.wait(60)
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_DELETE = _serve


# ---------------------------------------------------------------------- comparing what was served and fetched


FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "fhir-server"


def canonical(resource: dict[str, Any]) -> bytes:
    return orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)


def file_resources(folder: Path, types: Iterable[str] | None = None,
                   keep=lambda res: True) -> Counter[tuple[str, str, bytes]]:
    """The multiset of (type, id, content) of the resources in a folder's NDJSON files."""
    wanted = set(types) if types is not None else None
    out: Counter[tuple[str, str, bytes]] = Counter()
    for path in sorted(Path(folder).glob("*.ndjson")):
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            res = orjson.loads(line)
            if "resourceType" in res and "id" in res and (wanted is None or res["resourceType"] in wanted) and keep(res):
                out[(res["resourceType"], res["id"], canonical(res))] += 1
    return out


def fetched_resources(units: Iterable[Any]) -> Counter[tuple[str, str, bytes]]:
    """The same multiset for the `Resource` units of a fetch."""
    return Counter((u.resource["resourceType"], u.resource["id"], canonical(u.resource))
                   for u in units if hasattr(u, "resource"))


class Sleeps(list):
    """Stands in for time.sleep: records each wait instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve NDJSON files as a FHIR server (search and Bulk Data $export).")
    ap.add_argument("data", type=Path, nargs="+")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--polls", type=int, default=2)
    ap.add_argument("--no-meta", action="store_true", help="serve resources byte for byte, without meta.lastUpdated")
    args = ap.parse_args()
    server = FhirTestServer(args.data, polls=args.polls, stamp_meta=not args.no_meta, port=args.port).start()
    print(server.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
