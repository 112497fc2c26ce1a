"""HTTP for pulling from remote servers: one requests Session with the manners hospital servers expect.

Why a wrapper and not bare `requests`: every remote fetch must behave the same way when a
server is slow, busy or hostile. So, in one place:

- bounded waits: a connect and a read timeout on every request;
- polite retries: exponential backoff with jitter on 429 and 5xx answers and on dropped
  connections, honouring `Retry-After` (seconds or an HTTP-date), and giving up with
  `SourceUnavailable` (exit "retry later") rather than hammering a server or hanging;
- an optional request-rate cap, and connection reuse (one Session);
- origin pinning: every URL a server hands back (next pages, status and file URLs,
  redirects) must be on the configured origin (scheme, host, port) or on one explicitly
  allowed extra origin; anything else is refused with `OriginRefused`, so that a server
  cannot make Twinline fetch from elsewhere (server-side request forgery);
- bodies streamed with size limits: JSON answers are read up to a limit, files are
  written to disk chunk by chunk and resumed with `Range` after a broken connection.

Messages and logs name a URL by `describe()`: origin and path, never the query string,
never credentials. The caller passes `what`, a short label of its own ("search
Observation page 3"), which is what errors quote.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import orjson
import requests
import urllib3

from . import __version__
from .errors import ConfigError, SourceUnavailable, TwinlineError

log = logging.getLogger("twinline.http")

# Answers that mean "not now": worth another try after a pause. 501 and 505 are answers.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# What can go wrong while a body is being read: the connection drops, a read times out.
BODY_ERRORS = (urllib3.exceptions.HTTPError, requests.RequestException, OSError)

Origin = tuple[str, str, int]


class OriginRefused(ConfigError):
    """A server sent a URL on another origin; Twinline does not follow it (no SSRF)."""


class BrokenBody(SourceUnavailable):
    """An answer whose body stopped before its end: worth another try."""

    def __init__(self, what: str, reason: str):
        self.reason = reason
        super().__init__(f"{what}: the answer broke off ({reason}); retry later")


class NotFound(ConfigError):
    """404 or 410: the server does not know the URL (an unknown type, an expired export)."""


class Authenticator(Protocol):
    """What `pipeline.auth` gives the client: headers to send, and a way to renew them."""

    def headers(self) -> dict[str, str]: ...

    def refresh(self) -> bool:
        """After a 401: get new credentials if that can help (True), else False."""
        ...


@dataclass(frozen=True)
class HttpPolicy:
    """How patient and how careful the client is. Defaults suit a production FHIR server."""

    timeout: tuple[float, float] = (10.0, 120.0)   # connect, read (seconds between bytes)
    max_retries: int = 5
    backoff_base: float = 1.0        # first pause; doubles with every try
    backoff_cap: float = 60.0        # longest pause between two tries
    retry_after_cap: float = 300.0   # a server asking for a longer pause: give up now, retry later
    rate_limit: float | None = None  # at most this many requests per second
    verify_tls: bool = True
    max_json_bytes: int = 256 << 20  # one search page, manifest or token answer
    max_file_bytes: int = 1 << 40    # one bulk file as sent (compressed if it came compressed)
    max_redirects: int = 5


# ---------------------------------------------------------------------- URLs


def origin_of(url: str) -> Origin:
    """(scheme, host, port) with the default port filled in. ValueError if not an http(s) URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an absolute http(s) URL")
    return scheme, parts.hostname.lower(), parts.port or (443 if scheme == "https" else 80)


def origin_text(origin: Origin) -> str:
    scheme, host, port = origin
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def describe(url: str, limit: int = 160) -> str:
    """A URL fit for a message or a log line: origin and path only (no query, no userinfo)."""
    try:
        parts = urlsplit(url)
        text = origin_text(origin_of(url)) + parts.path
    except ValueError:
        return "(not an http URL)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_loopback(url: str) -> bool:
    try:
        host = origin_of(url)[1]
    except ValueError:
        return False
    return host in ("localhost", "::1") or host.startswith("127.")


# ---------------------------------------------------------------------- waiting


def retry_after(value: str | None, date: str | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP-date), or None.

    An HTTP-date is measured against the answer's own Date header when there is one, so
    that a skewed local clock does not shorten or stretch the wait.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    when = _http_date(value)
    if when is None:
        return None
    now = _http_date(date) if date else None
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _http_date(text: str) -> datetime | None:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def backoff(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Pause before try `attempt + 1`: exponential, capped, with "equal jitter".

    Half the pause is fixed (so pauses really grow), half random (so many clients that
    failed together do not come back together).
    """
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return ceiling / 2 + rand() * ceiling / 2


# ---------------------------------------------------------------------- errors


def outcome_text(body: Any, limit: int = 300) -> str:
    """The human text of an OperationOutcome (or an OAuth error answer), truncated.

    This is server text about a request, quoted in exceptions so that a person can act on
    it; it is truncated because a server may be verbose.
    """
    parts: list[str] = []
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        for issue in body.get("issue") or []:
            if not isinstance(issue, dict):
                continue
            details: dict[str, Any] = issue["details"] if isinstance(issue.get("details"), dict) else {}
            text = details.get("text") or issue.get("diagnostics") or ""
            parts.append(" ".join(str(p) for p in (issue.get("severity"), issue.get("code"), text) if p))
    elif isinstance(body, dict) and isinstance(body.get("error"), str):
        parts.append(" ".join(str(p) for p in (body["error"], body.get("error_description")) if p))
    text = "; ".join(parts).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def outcome_codes(body: Any) -> list[str]:
    """The issue codes of an OperationOutcome (`transient`, `too-costly`, ...): no free text."""
    if not (isinstance(body, dict) and isinstance(body.get("issue"), list)):
        return []
    return [str(i.get("code")) for i in body["issue"] if isinstance(i, dict) and isinstance(i.get("code"), str)]


def small_body(resp: requests.Response, limit: int = 64 << 10) -> Any:
    """An error answer's JSON body (read at most `limit` bytes), or None."""
    try:
        data = resp.raw.read(limit + 1, decode_content=True) or b""
    except BODY_ERRORS:
        return None
    finally:
        resp.close()
    if len(data) > limit:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def error_for(resp: requests.Response, what: str, body: Any = ...) -> TwinlineError:
    """The exception an unusable answer stands for, with the server's explanation in it.

    401/403: bad or insufficient credentials (fatal, fix the configuration). 429/5xx
    after retries: the server is busy or down (retry later). Other 4xx: the request is
    wrong for this server (fatal).
    """
    if body is ...:
        body = small_body(resp)
    status = resp.status_code
    said = outcome_text(body)
    said = f": {said}" if said else ""
    if status in (401, 403):
        return ConfigError(f"{what}: HTTP {status}, the server refused the credentials{said}; check the auth settings")
    if status in RETRY_STATUSES or status >= 500:
        wait = retry_after(resp.headers.get("Retry-After"), resp.headers.get("Date"))
        asks = f" (it asks to wait {wait:.0f} s)" if wait else ""
        return SourceUnavailable(f"{what}: HTTP {status} from {origin_text(origin_of(resp.url))}{asks}{said}; retry later")
    if status in (404, 410):
        return NotFound(f"{what}: HTTP {status}, not found on the server{said}")
    return ConfigError(f"{what}: HTTP {status}{said}")


# ---------------------------------------------------------------------- the client


@dataclass(frozen=True)
class Download:
    """A finished download: how the bytes on disk are encoded, and their count."""

    encoding: str      # "identity" or "gzip": the bytes are stored exactly as sent
    size: int


class HttpClient:
    """A Session bound to one server origin (plus the extra origins allowed explicitly).

    `sleep` and `clock` are injectable so that tests can observe waits without waiting.
    """

    def __init__(self, base_url: str, policy: HttpPolicy = HttpPolicy(), *, extra_origins: Iterable[str] = (),
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.base_url = base_url.rstrip("/")
        self.origin = origin_of(self.base_url)
        self.origins = {self.origin, *(origin_of(o) for o in extra_origins)}
        self.policy = policy
        self.sleep = sleep
        self.clock = clock
        self.auth: Authenticator | None = None
        self.session = requests.Session()
        # Credentials come from the auth settings only: a no-op auth keeps requests from adding ~/.netrc
        # credentials (which would override ours, or go to an origin they were not meant for).
        # Proxy variables (HTTPS_PROXY, NO_PROXY) still apply: hospitals need them.
        self.session.auth = _as_is
        # gzip only: bulk files are stored as sent, and only gzip is read back (pipeline.connectors.fhir_files)
        self.session.headers.update({"User-Agent": f"twinline/{__version__}", "Accept-Encoding": "gzip"})
        self._next_slot = 0.0
        self.requests_sent = 0

    def close(self) -> None:
        self.session.close()

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def check(self, url: str, what: str) -> str:
        """`url` if it is on an allowed origin; else OriginRefused (nothing is sent)."""
        try:
            origin = origin_of(url)
        except ValueError:
            raise OriginRefused(f"{what}: the server sent a URL that is not an absolute http(s) URL: refused") from None
        if origin not in self.origins:
            raise OriginRefused(
                f"{what}: the server sent a URL on {origin_text(origin)}, not on the configured server "
                f"{origin_text(self.origin)}: refused (a server may not send Twinline elsewhere). If this server "
                "keeps its export files on another host, allow that one origin with `allowed_origin`.")
        return url

    # ------------------------------------------------------------------ requests

    def request(self, method: str, url: str, *, what: str, params: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, data: Any = None, send_auth: bool = True,
                pinned: bool = True) -> requests.Response:
        """Send, retrying what is worth retrying; return the last answer with its body unread.

        Redirects are followed here (each hop checked against the origins when `pinned`;
        credentials are not forwarded to another origin). A 401 gets one retry after the
        authenticator renews its credentials. 429 and 5xx are retried with backoff and
        returned once the retries are spent, for the caller to read the OperationOutcome.
        `data` may be a callable, called for every try (a signed assertion must be fresh).
        Raises SourceUnavailable when the server never answers.
        """
        attempt = 0
        redirects = 0
        renewed = False
        while True:
            if pinned:
                self.check(url, what)
            sent = dict(headers or {})
            if send_auth and self.auth is not None:
                sent.update(self.auth.headers())
            self._throttle()
            try:
                resp = self.session.request(method, url, params=params, headers=sent,
                                            data=data() if callable(data) else data,
                                            timeout=self.policy.timeout, verify=self.policy.verify_tls,
                                            allow_redirects=False, stream=True)
            except requests.exceptions.SSLError:
                raise ConfigError(f"{what}: TLS verification failed for {origin_text(origin_of(url))}: fix the "
                                  "server certificate or point REQUESTS_CA_BUNDLE at the hospital's CA bundle") from None
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                    requests.exceptions.InvalidSchema):
                raise ConfigError(f"{what}: not a usable URL ({describe(url)})") from None
            except requests.RequestException as e:
                attempt += 1
                if attempt > self.policy.max_retries:
                    raise SourceUnavailable(f"{what}: no answer from {origin_text(origin_of(url))} after {attempt} "
                                            f"tries ({_failure(e)}); retry later") from None
                self._pause(backoff(attempt - 1, self.policy.backoff_base, self.policy.backoff_cap), what, _failure(e))
                continue
            self.requests_sent += 1
            status = resp.status_code
            if status in REDIRECTS and resp.headers.get("Location"):
                target = urljoin(resp.url, resp.headers["Location"])
                resp.close()
                redirects += 1
                if redirects > self.policy.max_redirects:
                    raise SourceUnavailable(f"{what}: more than {self.policy.max_redirects} redirects") from None
                if pinned:
                    self.check(target, f"{what} (redirect)")
                if origin_of(target) != origin_of(url):
                    send_auth = False
                if status == 303 or (status in (301, 302) and method == "POST"):
                    method, data = "GET", None
                url, params = target, None
                continue
            if status == 401 and send_auth and self.auth is not None and not renewed and self.auth.refresh():
                renewed = True
                resp.close()
                continue
            if status in RETRY_STATUSES and attempt < self.policy.max_retries:
                wait = retry_after(resp.headers.get("Retry-After"), resp.headers.get("Date"))
                if wait is not None and wait > self.policy.retry_after_cap:
                    return resp  # the server wants a long pause: the caller says "retry later"
                if wait is None:
                    wait = backoff(attempt, self.policy.backoff_base, self.policy.backoff_cap)
                resp.close()
                attempt += 1
                self._pause(wait, what, f"HTTP {status}")
                continue
            return resp

    def get_json(self, url: str, *, what: str, params: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None, ok: Iterable[int] = (200,),
                 send_auth: bool = True) -> tuple[requests.Response, Any]:
        """GET a JSON answer (size-limited, parsed with orjson). A non-`ok` status raises `error_for`.

        The body of an `ok` answer that breaks off mid-way is fetched again (with backoff).
        """
        ok = frozenset(ok)
        attempt = 0
        while True:
            resp = self.request("GET", url, what=what, params=params, headers=headers, send_auth=send_auth)
            if resp.status_code not in ok:
                raise error_for(resp, what)
            try:
                return resp, self.read_json(resp, what)
            except BrokenBody as e:
                attempt += 1
                if attempt > self.policy.max_retries:
                    raise SourceUnavailable(f"{what}: the answer broke off {attempt} times ({e.reason}); "
                                            "retry later") from None
                self._pause(backoff(attempt - 1, self.policy.backoff_base, self.policy.backoff_cap), what, e.reason)

    def read_json(self, resp: requests.Response, what: str) -> Any:
        """The whole body as JSON, refusing bodies past `max_json_bytes` (counted after gunzip).

        A body cut short raises BrokenBody (a SourceUnavailable: `get_json` tries again).
        """
        limit = self.policy.max_json_bytes
        buf = bytearray()
        try:
            for chunk in resp.raw.stream(1 << 16, decode_content=True):
                buf += chunk
                if len(buf) > limit:
                    raise ConfigError(f"{what}: the answer is larger than {limit} bytes: refused "
                                      "(raise max_json_bytes, or ask for smaller pages with `count`)")
        except BODY_ERRORS as e:
            raise BrokenBody(what, _failure(e)) from None
        finally:
            resp.close()
        try:
            return orjson.loads(buf)
        except orjson.JSONDecodeError:
            raise SourceUnavailable(f"{what}: the server answered {len(buf)} bytes that are not JSON "
                                    f"(HTTP {resp.status_code}); retry later or report it to the server's owner") from None

    def download(self, url: str, part: Path, *, what: str, send_auth: bool, validator: str | None = None,
                 encoding: str | None = None, on_start: Callable[[str | None, str], None] | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> Download:
        """Stream `url` into `part`, appending to what is already there; resume after breaks.

        The bytes are stored exactly as sent (gzip stays gzip), so that `Range` offsets
        mean the same on every try. A partial file left by an earlier run is continued
        with `Range` and `If-Range` (the ETag or Last-Modified it was started with: if
        the file changed on the server, the server sends it whole and we start over).
        `on_start(validator, encoding)` is called before the first byte is written, so
        that the caller can save them for a later run.
        """
        attempt = 0
        while True:
            have = part.stat().st_size if part.exists() else 0
            headers = {"Accept": "application/fhir+ndjson"}
            if have:
                headers["Range"] = f"bytes={have}-"
                if validator:
                    headers["If-Range"] = validator
            resp = self.request("GET", url, what=what, headers=headers, send_auth=send_auth)
            status = resp.status_code
            sent_encoding = resp.headers.get("Content-Encoding", "identity").strip().lower() or "identity"
            sent_encoding = "gzip" if sent_encoding == "x-gzip" else sent_encoding
            if status == 206 and have and _range_start(resp) == have and sent_encoding == (encoding or sent_encoding):
                mode = "ab"
            elif status == 200:
                mode, have = "wb", 0
            elif status in (206, 416) and have:
                resp.close()   # a range we did not ask for, or a partial file longer than the file: start over
                part.unlink()
                attempt += 1
                if attempt > self.policy.max_retries:
                    raise SourceUnavailable(f"{what}: the server does not answer ranges consistently; retry later")
                continue
            else:
                raise error_for(resp, what)
            if sent_encoding not in ("identity", "gzip"):
                resp.close()
                raise SourceUnavailable(f"{what}: the server sent Content-Encoding {sent_encoding[:20]!r}, "
                                        "though only gzip was accepted")
            validator = _validator(resp) if mode == "wb" else validator
            encoding = sent_encoding
            if on_start is not None:
                on_start(validator, encoding)
            expected = _body_length(resp)
            got = 0
            try:
                with open(part, mode, buffering=0) as out:
                    while True:
                        chunk = resp.raw.read1(1 << 16, decode_content=False)
                        if not chunk:
                            break
                        got += len(chunk)
                        if have + got > self.policy.max_file_bytes:
                            raise ConfigError(f"{what}: the file is larger than {self.policy.max_file_bytes} bytes: "
                                              "refused (raise max_file_bytes if it is genuine)")
                        try:
                            out.write(chunk)
                        except OSError as e:   # the local disk, not the connection: no retry
                            raise SourceUnavailable(f"{what}: cannot write {part.parent} ({e.strerror})") from None
                        if on_bytes is not None:
                            on_bytes(have + got)
                if expected is not None and got != expected:
                    raise BrokenBody(what, f"connection dropped after {got} of {expected} bytes")
            except (BrokenBody, *BODY_ERRORS) as e:
                attempt += 1
                if attempt > self.policy.max_retries:
                    raise SourceUnavailable(f"{what}: the download broke off {attempt} times ({_failure(e)}); "
                                            "run again later: it resumes where it stopped") from None
                self._pause(backoff(attempt - 1, self.policy.backoff_base, self.policy.backoff_cap), what, _failure(e))
                continue
            finally:
                resp.close()
            return Download(encoding, have + got)

    # ------------------------------------------------------------------ pacing

    def _throttle(self) -> None:
        rate = self.policy.rate_limit
        if not rate:
            return
        now = self.clock()
        if self._next_slot > now:
            self.sleep(self._next_slot - now)
            now = self._next_slot
        self._next_slot = now + 1.0 / rate

    def _pause(self, seconds: float, what: str, why: str) -> None:
        log.info("%s: %s; trying again in %.1f s", what, why, seconds)
        self.sleep(seconds)


def _as_is(request: requests.PreparedRequest) -> requests.PreparedRequest:
    return request


def _failure(e: BaseException) -> str:
    """What went wrong, in words that name no URL (exception texts of requests quote the URL)."""
    if isinstance(e, BrokenBody):
        return e.reason
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return "connect timeout"
    if isinstance(e, requests.exceptions.ReadTimeout | urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return "read timeout"
    if isinstance(e, requests.exceptions.ConnectionError):
        return "connection refused or dropped"
    return f"connection dropped ({type(e).__name__})"


def _range_start(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Range", "")
    if not value.startswith("bytes ") or "-" not in value:
        return None
    first = value[6:].split("-", 1)[0].strip()
    return int(first) if first.isdigit() else None


def _body_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length", "")
    return int(value) if value.strip().isdigit() else None


def _validator(resp: requests.Response) -> str | None:
    """What If-Range may carry: a strong ETag, else Last-Modified (RFC 9110, 13.1.5)."""
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified")
