"""The token verifier against a real identity provider over HTTP on
loopback: JWTs checked locally against its JWK set, and RFC 7662
introspection. Every kind of bad token is refused, with a reason."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from authgate.errors import ConfigError
from authgate.oauth import OAuthSettings, TokenVerifier, parse_oauth
from authgate.oauth.verifier import VerifierUnavailable
from authgate.sasl.base import STORE_UNAVAILABLE, TokenCheck, TokenVerdict
from authgate.testing.identity_provider import IdentityProvider

USER = "alice@example.org"


@pytest.fixture(scope="module")
def idp() -> Iterator[IdentityProvider]:
    with IdentityProvider() as provider:
        yield provider


def jwt_verifier(idp: IdentityProvider, **changes: object) -> TokenVerifier:
    values: dict[str, object] = {
        "jwks": idp.jwks_url,
        "issuer": idp.issuer,
        "audience": (idp.audience,),
        **changes,
    }
    return TokenVerifier(OAuthSettings(**values))  # type: ignore[arg-type]


def introspecting(idp: IdentityProvider, secret: str | None = None) -> TokenVerifier:
    return TokenVerifier(
        OAuthSettings(
            introspection_url=idp.introspection_url,
            client_id=idp.client_id,
            client_secret=secret or idp.client_secret,
            cache_seconds=30,
        )
    )


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_valid_token_of_each_algorithm(idp: IdentityProvider, alg: str) -> None:
    assert jwt_verifier(idp).verify(idp.token(USER, alg=alg)) == TokenVerdict(True, USER)


def test_user_claim_is_configurable(idp: IdentityProvider) -> None:
    verifier = jwt_verifier(idp, user_claim="preferred_username")
    assert verifier.verify(idp.token(USER, preferred_username="alice")) == TokenVerdict(True, "alice")
    refused = verifier.verify(idp.token(USER))
    assert not refused.valid and "preferred_username" in refused.reason


def bad_tokens(idp: IdentityProvider) -> dict[str, tuple[str, str]]:
    now = int(time.time())
    good = idp.token(USER)
    return {
        "expired": (idp.token(USER, lifetime=-3600), "expired"),
        "wrong audience": (idp.token(USER, aud="other-service"), "wrong aud"),
        "wrong issuer": (idp.token(USER, iss="https://evil.test"), "wrong iss"),
        "alg none": (idp.unsigned(idp.claims(USER)), "algorithm 'none'"),
        "wrong key": (idp.token(USER, key=idp.stranger), "signature"),
        "tampered": (idp.tampered(good, email="mallory@example.org"), "signature"),
        "not yet valid": (idp.token(USER, nbf=now + 3600), "not yet valid"),
        "no exp": (idp.token(USER, exp=None), "required claim"),
        "email not verified": (idp.token(USER, email_verified=False), "not verified"),
        "garbage": ("not-a-jwt", "not a signed JWT"),
        "bad header": ("!!!.e30.sig", "header"),
    }


def test_bad_tokens_refused_with_reasons(idp: IdentityProvider) -> None:
    verifier = jwt_verifier(idp)
    for name, (token, reason) in bad_tokens(idp).items():
        verdict = verifier.verify(token)
        assert not verdict.valid, name
        assert reason in verdict.reason, (name, verdict.reason)
        assert token not in verdict.reason


def test_hs256_with_the_public_key_as_secret_refused(idp: IdentityProvider) -> None:
    """The classic key-confusion attack: the algorithm is ours to choose."""
    import base64
    import hashlib
    import hmac
    import json

    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    signing = part({"alg": "HS256", "kid": "rsa-1"}) + "." + part(idp.claims(USER))
    public = json.dumps(idp.jwks()["keys"][0]).encode()
    mac = hmac.new(public, signing.encode(), hashlib.sha256).digest()
    token = signing + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    verdict = jwt_verifier(idp).verify(token)
    assert not verdict.valid and "HS256" in verdict.reason


def test_small_clock_skew_tolerated(idp: IdentityProvider) -> None:
    verifier = jwt_verifier(idp, leeway=60)
    assert verifier.verify(idp.token(USER, lifetime=-30)).valid
    assert not verifier.verify(idp.token(USER, lifetime=-120)).valid


def test_key_set_cached_and_rotation_picked_up(idp: IdentityProvider) -> None:
    now = [1000.0]
    settings = OAuthSettings(jwks=idp.jwks_url, issuer=idp.issuer, audience=(idp.audience,))
    verifier = TokenVerifier(settings, monotonic=lambda: now[0])
    before = idp.requests.count("/jwks.json")
    for _ in range(3):
        assert verifier.verify(idp.token(USER, alg="ES256")).valid
    assert idp.requests.count("/jwks.json") == before + 1  # fetched once, then cached
    idp.rotate("ES256", kid="ec-2")
    try:
        # A new key id within 30 s of the last fetch: not fetched again (a
        # flood of made-up key ids must not hammer the provider).
        now[0] += 5
        assert not verifier.verify(idp.token(USER, alg="ES256")).valid
        assert idp.requests.count("/jwks.json") == before + 1
        # Later, a token under the new key id makes the verifier fetch again.
        now[0] += 30
        assert verifier.verify(idp.token(USER, alg="ES256")).valid
        assert idp.requests.count("/jwks.json") == before + 2
        # And the set is fetched again once `jwks_refresh` has passed.
        now[0] += settings.jwks_refresh
        assert verifier.verify(idp.token(USER, alg="ES256")).valid
        assert idp.requests.count("/jwks.json") == before + 3
    finally:
        idp.rotate("ES256", kid="ec-1")


def test_key_set_from_a_file(idp: IdentityProvider, tmp_path: Path) -> None:
    import json

    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(idp.jwks()))
    assert jwt_verifier(idp, jwks=str(path)).verify(idp.token(USER, alg="EdDSA")).valid


def test_unreachable_key_set_is_temporary(tmp_path: Path) -> None:
    settings = OAuthSettings(
        jwks="http://127.0.0.1:9/jwks.json", issuer="i", audience=("a",), timeout=2
    )
    verifier = TokenVerifier(settings)
    with pytest.raises(VerifierUnavailable):
        verifier.verify("a.b.c".replace("a", "eyJhbGciOiJSUzI1NiJ9"))
    answer = asyncio.run(verifier.averify(TokenCheck("eyJhbGciOiJSUzI1NiJ9.e30.c2ln")))
    assert answer is STORE_UNAVAILABLE


def test_introspection(idp: IdentityProvider) -> None:
    verifier = introspecting(idp)
    token = idp.token(USER)
    assert verifier.verify(token) == TokenVerdict(True, USER)
    asked = idp.requests.count("/introspect")
    assert verifier.verify(token).valid  # from the cache
    assert idp.requests.count("/introspect") == asked
    assert not verifier.verify("never-issued").valid
    expired = idp.token(USER, lifetime=-10)
    assert not verifier.verify(expired).valid
    revoked = idp.token(USER)
    idp.revoke(revoked)
    assert verifier.verify(revoked).reason == "token not active"


def test_introspection_with_wrong_client_secret_is_temporary(idp: IdentityProvider) -> None:
    with pytest.raises(VerifierUnavailable, match="401"):
        introspecting(idp, secret="wrong").verify(idp.token(USER))


def test_settings(tmp_path: Path) -> None:
    source = tmp_path / "authgate.toml"
    ok = parse_oauth({"jwks": "jwks.json", "issuer": "i", "audience": "a"}, source)
    assert ok.jwks == str(tmp_path / "jwks.json") and ok.audience == ("a",)
    for data, problem in [
        ({}, "jwks"),
        ({"jwks": "https://x/j", "introspection_url": "https://x/i"}, "one of them"),
        ({"jwks": "https://x/j", "audience": "a"}, "issuer"),
        ({"jwks": "https://x/j", "issuer": "i"}, "audience"),
        ({"jwks": "http://idp.example.org/j", "issuer": "i", "audience": "a"}, "loopback"),
        ({"jwks": "https://x/j", "issuer": "i", "audience": "a", "algorithms": ["none"]}, "not allowed"),
        ({"jwks": "https://x/j", "issuer": "i", "audience": "a", "algorithms": ["HS256"]}, "not allowed"),
        ({"introspection_url": "https://x/i"}, "client_id"),
        ({"jwks": "https://x/j", "issuer": "i", "audience": "a", "leeway": 9999}, "leeway"),
        ({"jwks": "https://x/j", "issuer": "i", "audience": "a", "typo": 1}, "unknown key"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            parse_oauth(data, source)
