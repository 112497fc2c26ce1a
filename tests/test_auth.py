"""Authentication: bearer, basic, SMART Backend Services; secrets never leak."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pipeline.auth import AuthConfig, authenticator
from pipeline.connectors.fhir_server import FetchOptions, fetch_fhir
from pipeline.errors import ConfigError
from pipeline.http import HttpClient
from tests.fhir_server import FIXTURES, FhirTestServer, Sleeps, fetched_resources, file_resources

pytestmark = pytest.mark.server
TOKEN = "s3cret-bearer-0f1e2d3c4b5a"
PASSWORD = "pa55-w0rd-9a8b7c"


def write_key(path: Path, key) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    pytest.importorskip("jwt", reason="PyJWT is not installed: SMART Backend Services needs PyJWT[crypto] (pyproject)")
    folder = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP384R1())
    return {"RS384": (write_key(folder / "rsa.pem", rsa_key), rsa_key.public_key()),
            "ES384": (write_key(folder / "ec.pem", ec_key), ec_key.public_key())}


def smart(keys, alg="RS384", **kw) -> AuthConfig:
    return AuthConfig(kind="smart", client_id="twinline-test", private_key_file=keys[alg][0], key_id="k1", alg=alg, **kw)


def options(server, tmp_path, auth, **kw) -> FetchOptions:
    kw.setdefault("sleep", Sleeps())
    return FetchOptions(base_url=server.base_url, state_dir=tmp_path / "state", auth=auth, max_retries=2, **kw)


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_every_problem_of_an_auth_config_is_listed(tmp_path):
    with pytest.raises(ConfigError) as caught:
        fetch_fhir(FetchOptions(base_url="https://fhir.example.org/r4", state_dir=tmp_path,
                                auth=AuthConfig(kind="smart", alg="HS256")))
    text = str(caught.value)
    for needle in ("client_id", "private_key_file", "key_id", "'HS256'"):
        assert needle in text
    assert AuthConfig(kind="bearer", token_env="A", token_file=Path("b")).problems() == [
        "auth: a bearer token needs exactly one of token_env or token_file"]
    assert "not one of" in AuthConfig(kind="oauth").problems()[0]
    assert AuthConfig().problems() == []


def test_a_bearer_token_from_the_environment_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TWIN_FHIR_TOKEN", TOKEN)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with FhirTestServer(FIXTURES, stamp_meta=False, auth="bearer", bearer_token=TOKEN) as server:
        for auth in (AuthConfig(kind="bearer", token_env="TWIN_FHIR_TOKEN"), AuthConfig(kind="bearer", token_file=token_file)):
            units = list(fetch_fhir(options(server, tmp_path, auth, types=["Patient"])).units())
            assert len(units) == 2
        assert all(s.headers["authorization"] == f"Bearer {TOKEN}" for s in server.seen)


def test_a_missing_secret_is_named_not_shown(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE is not set"):
        fetch_fhir(FetchOptions(base_url="https://fhir.example.org/r4", state_dir=tmp_path,
                                auth=AuthConfig(kind="bearer", token_env="NOT_SET_ANYWHERE")))
    with pytest.raises(ConfigError, match="cannot read"):
        fetch_fhir(FetchOptions(base_url="https://fhir.example.org/r4", state_dir=tmp_path,
                                auth=AuthConfig(kind="basic", username="u", password_file=tmp_path / "nope")))


def test_basic_auth_and_a_refusal_that_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("TWIN_PW", PASSWORD)
    with FhirTestServer(FIXTURES, stamp_meta=False, auth="basic", basic=("twin", PASSWORD)) as server:
        units = list(fetch_fhir(options(server, tmp_path, AuthConfig(kind="basic", username="twin",
                                                                     password_env="TWIN_PW"), types=["Patient"])).units())
        assert len(units) == 2
        monkeypatch.setenv("TWIN_PW", "wrong-" + PASSWORD)
        with pytest.raises(ConfigError) as caught:
            list(fetch_fhir(options(server, tmp_path, AuthConfig(kind="basic", username="twin",
                                                                 password_env="TWIN_PW"), types=["Patient"])).units())
    assert "HTTP 401" in str(caught.value) and "missing, invalid or expired credentials" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_credentials_go_over_https_only_except_to_loopback(tmp_path, monkeypatch):
    monkeypatch.setenv("TWIN_FHIR_TOKEN", TOKEN)
    with pytest.raises(ConfigError, match="only over https"):
        fetch_fhir(FetchOptions(base_url="http://fhir.example.org/r4", state_dir=tmp_path,
                                auth=AuthConfig(kind="bearer", token_env="TWIN_FHIR_TOKEN")))


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_smart_backend_services_search_and_bulk(keys, alg, tmp_path):
    with FhirTestServer(FIXTURES, stamp_meta=False, auth="smart") as server:
        server.register_client("twinline-test", "k1", alg, keys[alg][1])
        found = list(fetch_fhir(options(server, tmp_path, smart(keys, alg), types=["Patient", "Encounter"])).units())
        exported = list(fetch_fhir(options(server, tmp_path, smart(keys, alg), bulk=True)).units())

    assert fetched_resources(found) == file_resources(FIXTURES, ["Patient", "Encounter"])
    assert fetched_resources(exported) == file_resources(FIXTURES)
    assert server.token_requests == 2                    # one per fetch: the token is reused
    assert server.requests_to(r"/\.well-known/smart-configuration$")   # token URL discovered
    for claims in server.assertions:
        assert claims["iss"] == claims["sub"] == "twinline-test"
        assert claims["aud"] == server.token_url
        assert claims["exp"] - claims["iat"] <= 300
    assert len({c["jti"] for c in server.assertions}) == 2
    files = server.requests_to("export-file")
    assert files and all(s.headers["authorization"].startswith("Bearer ") for s in files)   # requiresAccessToken


def test_the_token_is_renewed_before_it_expires(keys):
    with FhirTestServer(FIXTURES, auth="smart", token_lifetime=100) as server:
        server.register_client("twinline-test", "k1", "RS384", keys["RS384"][1])
        clock = FakeClock()
        http = HttpClient(server.base_url, clock=clock, sleep=Sleeps())
        authenticator(smart(keys, token_url=server.token_url), http)
        http.get_json(http.url("Patient"), what="search")
        clock.now += 70                                    # 30 s left: still good (renewal at 20 s left)
        http.get_json(http.url("Patient"), what="search")
        assert server.token_requests == 1
        clock.now += 15                                    # 15 s left: renew before using it
        http.get_json(http.url("Patient"), what="search")
        assert server.token_requests == 2
        assert [s.path for s in server.seen].count("/fhir/Patient") == 3   # no 401 and retry on the way


def test_a_revoked_token_is_renewed_once_after_a_401(keys):
    with FhirTestServer(FIXTURES, auth="smart") as server:
        server.register_client("twinline-test", "k1", "RS384", keys["RS384"][1])
        http = HttpClient(server.base_url, sleep=Sleeps())
        authenticator(smart(keys), http)
        http.get_json(http.url("Patient"), what="search")
        server.tokens.clear()
        _, bundle = http.get_json(http.url("Patient"), what="search")
    assert bundle["total"] == 2 and server.token_requests == 2


def test_a_key_the_server_does_not_know_is_refused_clearly(keys, tmp_path):
    with FhirTestServer(FIXTURES, auth="smart") as server:
        another = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        server.register_client("twinline-test", "k1", "RS384", another.public_key())
        with pytest.raises(ConfigError) as caught:
            list(fetch_fhir(options(server, tmp_path, smart(keys), types=["Patient"])).units())
    text = str(caught.value)
    assert "invalid_client" in text and "InvalidSignatureError" in text and "key_id" in text
    assert "BEGIN" not in text and "eyJ" not in text    # no key, no assertion


def test_a_bad_private_key_file_is_named_not_shown(keys, tmp_path):
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    rsa_for_es384 = AuthConfig(kind="smart", client_id="c", key_id="k", alg="ES384", private_key_file=keys["RS384"][0])
    for cfg, needle in ((AuthConfig(kind="smart", client_id="c", private_key_file=not_a_key, key_id="k"),
                         "not an unencrypted PEM"), (rsa_for_es384, "P-384")):
        with pytest.raises(ConfigError, match=needle) as caught:
            fetch_fhir(FetchOptions(base_url="https://fhir.example.org/r4", state_dir=tmp_path, auth=cfg))
        assert "bm90IGEga2V5" not in str(caught.value)


def test_secrets_never_reach_logs_exceptions_or_state(keys, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TWIN_FHIR_TOKEN", TOKEN)
    monkeypatch.setenv("TWIN_PW", PASSWORD)
    texts: list[str] = []
    with FhirTestServer(FIXTURES, auth="smart", polls=1) as server:
        server.register_client("twinline-test", "k1", "ES384", keys["ES384"][1])
        bulk = fetch_fhir(options(server, tmp_path, smart(keys, "ES384"), bulk=True))
        list(bulk.units())
        texts += [p.read_text(errors="replace") for p in (tmp_path / "state").rglob("*") if p.is_file()]
        texts.append(repr(bulk.http.auth))
        # wrong credentials of every kind: the exceptions, with their tracebacks
        for auth in (AuthConfig(kind="bearer", token_env="TWIN_FHIR_TOKEN"),
                     AuthConfig(kind="basic", username="twin", password_env="TWIN_PW")):
            with pytest.raises(ConfigError) as caught:
                list(fetch_fhir(options(server, tmp_path, auth, types=["Patient"])).units())
            texts.append("".join(traceback.format_exception(caught.value)))
        issued = list(server.tokens)
        assertion_jtis = [c["jti"] for c in server.assertions]
    pem = keys["ES384"][0].read_text().splitlines()[1]
    texts.append(caplog.text)
    secrets = [TOKEN, PASSWORD, pem, *issued, *assertion_jtis]
    assert issued and assertion_jtis
    for text in texts:
        for secret in secrets:
            assert secret not in text


def test_a_discovered_token_endpoint_must_be_https(keys, tmp_path):
    with FhirTestServer(FIXTURES, auth="smart") as server:
        server.token_endpoint = "http://169.254.169.254/token"   # a server pointing at a local service
        with pytest.raises(ConfigError, match="discovered token endpoint is plain http"):
            list(fetch_fhir(options(server, tmp_path, smart(keys), types=["Patient"])).units())
        assert server.token_requests == 0
