"""Credentials for FHIR servers: none, a bearer token, HTTP basic, or SMART Backend Services.

The configuration (`AuthConfig`) holds no secret, only where to find one: the name of an
environment variable or the path of a file. Secrets are read when the fetch starts, kept
in memory only, sent only over TLS (or to a loopback address, for tests), and never
logged, never put into an exception, never written to disk. The authenticators'
reprs name their kind and nothing else.

SMART Backend Services (the client-credentials flow of SMART App Launch 2.x, "Backend
Services"): Twinline signs a short-lived JWT with its private key (RS384 or ES384;
iss = sub = client_id, aud = the token URL, exp at most five minutes ahead, a unique jti),
posts it to the token endpoint, and uses the access token it gets until shortly before
it expires. The token URL is configured or discovered from
`[base]/.well-known/smart-configuration`.
"""

from __future__ import annotations

import base64
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .http import HttpClient, error_for, is_loopback, origin_of, origin_text, outcome_text, small_body

log = logging.getLogger("twinline.auth")

KINDS = ("none", "bearer", "basic", "smart")
ALGS = ("RS384", "ES384")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 240     # seconds; the spec allows up to 300, the rest absorbs clock skew
MAX_SECRET_BYTES = 64 << 10


@dataclass(frozen=True)
class AuthConfig:
    """How to authenticate to the server; names where secrets are, never the secrets."""

    kind: str = "none"                     # none | bearer | basic | smart
    token_env: str | None = None           # bearer: environment variable holding the token
    token_file: Path | None = None         # bearer: or a file holding it
    username: str | None = None            # basic
    password_env: str | None = None        # basic: environment variable holding the password
    password_file: Path | None = None      # basic: or a file holding it
    client_id: str | None = None           # smart
    token_url: str | None = None           # smart: discovered from .well-known/smart-configuration if absent
    private_key_file: Path | None = None   # smart: PEM private key (RSA for RS384, P-384 for ES384)
    key_id: str | None = None              # smart: the `kid` the server knows the public key by
    alg: str = "RS384"                     # smart: RS384 or ES384
    scope: str = "system/*.read"           # smart: the scopes asked for

    def problems(self) -> list[str]:
        """Every problem with this configuration, each naming the setting (empty: usable)."""
        out: list[str] = []
        if self.kind not in KINDS:
            return [f"auth.kind: {self.kind!r} is not one of {', '.join(KINDS)}"]
        if self.kind == "bearer" and bool(self.token_env) == bool(self.token_file):
            out.append("auth: a bearer token needs exactly one of token_env or token_file")
        if self.kind == "basic":
            if not self.username:
                out.append("auth.username: required for basic auth")
            if bool(self.password_env) == bool(self.password_file):
                out.append("auth: basic auth needs exactly one of password_env or password_file")
        if self.kind == "smart":
            if not self.client_id:
                out.append("auth.client_id: required for SMART Backend Services")
            if not self.private_key_file:
                out.append("auth.private_key_file: required for SMART Backend Services (a PEM private key)")
            if not self.key_id:
                out.append("auth.key_id: required for SMART Backend Services (the kid of the registered public key)")
            if self.alg not in ALGS:
                out.append(f"auth.alg: {self.alg!r} is not one of {', '.join(ALGS)}")
            if not self.scope:
                out.append("auth.scope: required for SMART Backend Services")
            if self.token_url is not None:
                try:
                    origin_of(self.token_url)
                except ValueError:
                    out.append("auth.token_url: not an absolute http(s) URL")
        return out

    @property
    def sends_secret(self) -> bool:
        return self.kind != "none"


def read_secret(env: str | None, file: Path | None, what: str) -> str:
    """A secret from an environment variable or a file (first line, whitespace stripped).

    Errors name the variable or the file, never a value.
    """
    if env:
        value = os.environ.get(env)
        if not value or not value.strip():
            raise ConfigError(f"{what}: the environment variable {env} is not set or empty")
        return value.strip()
    assert file is not None
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {file} ({e.strerror})") from None
    if len(data) > MAX_SECRET_BYTES:
        raise ConfigError(f"{what}: {file} is larger than {MAX_SECRET_BYTES} bytes: not a secret file")
    text = data.decode("utf-8", "replace").strip()
    if not text:
        raise ConfigError(f"{what}: {file} is empty")
    return text.splitlines()[0].strip()


# ---------------------------------------------------------------------- authenticators


class NoAuth:
    __slots__ = ()

    def headers(self) -> dict[str, str]:
        return {}

    def refresh(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NoAuth()"


class BearerAuth:
    """A fixed token. After a 401 a token from a file is read again (it may have been rotated)."""

    __slots__ = ("_cfg", "_header")

    def __init__(self, cfg: AuthConfig):
        self._cfg = cfg
        self._header = {"Authorization": "Bearer " + read_secret(cfg.token_env, cfg.token_file, "bearer token")}

    def headers(self) -> dict[str, str]:
        return self._header

    def refresh(self) -> bool:
        if not self._cfg.token_file:
            return False
        old = self._header
        self._header = {"Authorization": "Bearer " + read_secret(None, self._cfg.token_file, "bearer token")}
        return self._header != old

    def __repr__(self) -> str:
        return "BearerAuth()"


class BasicAuth:
    __slots__ = ("_header",)

    def __init__(self, cfg: AuthConfig):
        password = read_secret(cfg.password_env, cfg.password_file, "basic auth password")
        pair = f"{cfg.username}:{password}".encode()
        self._header = {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}

    def headers(self) -> dict[str, str]:
        return self._header

    def refresh(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "BasicAuth()"


class SmartBackendAuth:
    """SMART Backend Services: a signed client assertion for an access token, cached.

    The token is renewed when a fifth of its lifetime (at most a minute) is left, and
    after a 401 (a server may revoke tokens early).
    """

    __slots__ = ("_cfg", "_http", "_key", "_token_url", "_header", "_expires", "clock", "wall")

    def __init__(self, cfg: AuthConfig, http: HttpClient, *, clock=time.monotonic, wall=time.time):
        self._cfg = cfg
        self._http = http
        self._key = _load_private_key(cfg.private_key_file, cfg.alg)  # type: ignore[arg-type]
        self._token_url: str | None = cfg.token_url
        self._header: dict[str, str] | None = None
        self._expires = 0.0
        self.clock = clock
        self.wall = wall

    @property
    def token_url(self) -> str:
        if self._token_url is None:
            self._token_url = self._discover()
        return self._token_url

    def headers(self) -> dict[str, str]:
        if self._header is None or self.clock() >= self._expires:
            self._fetch_token()
        assert self._header is not None
        return self._header

    def refresh(self) -> bool:
        self._fetch_token()
        return True

    def __repr__(self) -> str:
        return f"SmartBackendAuth(client_id={self._cfg.client_id!r}, alg={self._cfg.alg!r})"

    def assertion(self) -> str:
        """A fresh signed client assertion (a new jti every time: servers refuse replays)."""
        import jwt

        now = int(self.wall())
        claims = {"iss": self._cfg.client_id, "sub": self._cfg.client_id, "aud": self.token_url,
                  "exp": now + ASSERTION_LIFETIME, "iat": now, "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self._key, algorithm=self._cfg.alg, headers={"kid": self._cfg.key_id, "typ": "JWT"})

    def _discover(self) -> str:
        what = "SMART configuration discovery"
        _, doc = self._http.get_json(self._http.url(".well-known/smart-configuration"), what=what,
                                     headers={"Accept": "application/json"}, send_auth=False)
        url = doc.get("token_endpoint") if isinstance(doc, dict) else None
        if not isinstance(url, str):
            raise ConfigError(f"{what}: the server's .well-known/smart-configuration names no token_endpoint; "
                              "set auth.token_url")
        try:
            origin_of(url)
        except ValueError:
            raise ConfigError(f"{what}: the token_endpoint is not an absolute http(s) URL; set auth.token_url") from None
        # a server-supplied URL: plain http only when the FHIR server is on loopback too (tests), never
        # to reach the local machine from a remote server's say-so
        if not (is_loopback(self._http.base_url) and is_loopback(url)):
            _require_tls(url, "the discovered token endpoint", loopback_ok=False)
        return url

    def _fetch_token(self) -> None:
        url = self.token_url
        what = f"SMART token request to {origin_text(origin_of(url))}"
        cfg = self._cfg

        def form() -> dict[str, str]:
            return {"grant_type": "client_credentials", "scope": cfg.scope,
                    "client_assertion_type": ASSERTION_TYPE, "client_assertion": self.assertion()}

        started = self.clock()
        resp = self._http.request("POST", url, what=what, data=form, send_auth=False, pinned=False,
                                  headers={"Accept": "application/json"})
        if resp.status_code != 200:
            body = small_body(resp)
            if resp.status_code in (400, 401, 403):
                raise ConfigError(f"{what}: refused (HTTP {resp.status_code}): {outcome_text(body) or 'no reason given'}; "
                                  "check client_id, key_id, the registered public key and the scope")
            raise error_for(resp, what, body)
        doc: Any = self._http.read_json(resp, what)
        token = doc.get("access_token") if isinstance(doc, dict) else None
        kind = str(doc.get("token_type", "")).lower() if isinstance(doc, dict) else ""
        if not isinstance(token, str) or not token or kind != "bearer":
            raise ConfigError(f"{what}: the answer holds no bearer access_token")
        lifetime = doc.get("expires_in")
        ok = isinstance(lifetime, int | float) and not isinstance(lifetime, bool) and 0 < lifetime < 1e7
        lifetime = float(lifetime) if ok else 300.0
        self._header = {"Authorization": "Bearer " + token}
        self._expires = started + lifetime - min(60.0, lifetime / 5)
        log.info("%s: got an access token valid for %.0f s", what, lifetime)


def authenticator(cfg: AuthConfig, http: HttpClient):
    """The authenticator for `cfg`, bound to `http` (which it also sets as `http.auth`)."""
    problems = cfg.problems()
    if problems:
        raise ConfigError("the auth settings are not usable", problems)
    if cfg.sends_secret:
        _require_tls(http.base_url, "the server")
    auth: Any
    if cfg.kind == "bearer":
        auth = BearerAuth(cfg)
    elif cfg.kind == "basic":
        auth = BasicAuth(cfg)
    elif cfg.kind == "smart":
        if cfg.token_url:
            _require_tls(cfg.token_url, "the token endpoint")
        auth = SmartBackendAuth(cfg, http, clock=http.clock)
    else:
        auth = NoAuth()
    http.auth = auth
    return auth


def _require_tls(url: str, what: str, loopback_ok: bool = True) -> None:
    if origin_of(url)[0] != "https" and not (loopback_ok and is_loopback(url)):
        raise ConfigError(f"{what} is plain http ({origin_text(origin_of(url))}): Twinline sends credentials "
                          "only over https (plain http is accepted for loopback addresses only)")


def _load_private_key(path: Path, alg: str):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        with open(path, "rb") as f:
            pem = f.read(MAX_SECRET_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"auth.private_key_file: cannot read {path} ({e.strerror})") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"auth.private_key_file: {path} is not an unencrypted PEM private key") from None
    if alg == "RS384" and not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"auth.private_key_file: {path} is not an RSA key, which RS384 needs")
    if alg == "ES384" and not (isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"):
        raise ConfigError(f"auth.private_key_file: {path} is not a P-384 EC key, which ES384 needs")
    return key
