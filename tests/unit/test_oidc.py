"""The parts of single sign-on (appliance/auth/oidc.py) that need no provider running: claims to a role and a user
name, the sealed pending sign-in, the `[oidc]` settings refused at start, and each check of the ID token against
keys this test publishes (tokens a real provider would never issue). The flow itself runs against a real provider
in tests/integration/test_oidc.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey

from appliance.auth.oidc import (
    OidcSignIn,
    PendingSignIn,
    SignInRefused,
    check_settings,
    role_for,
    seal,
    unseal,
    username_for,
)
from appliance.config import ConfigError, OidcSettings

ROLES = ("admin", "operator", "user", "auditor")
MAPPED = OidcSettings(issuer="https://login.example.com", client_id="appliance",
                      role_map={"admins": "admin", "ops": "operator"}, default_role="user")


@pytest.mark.parametrize(("claims", "role"), [
    ({"groups": ["staff", "ops", "admins"]}, "admin"),  # role_map's order decides, not the claim's
    ({"groups": ["ops"]}, "operator"),
    ({"groups": "ops"}, "operator"),  # a single value as a string
    ({"groups": ["staff"]}, "user"),  # the default
    ({}, "user"),
    ({"groups": [{"name": "admins"}, 7]}, "user"),  # values that are not strings never match
])
def test_the_first_mapped_value_picks_the_role_else_the_default(claims: dict[str, object], role: str) -> None:
    assert role_for(claims, MAPPED) == role


def test_without_a_default_role_an_unmapped_user_has_none() -> None:
    strict = OidcSettings(issuer=MAPPED.issuer, client_id="c", role_map={"admins": "admin"})
    assert role_for({"groups": ["staff"]}, strict) is None
    assert role_for({"roles": ["admins"]}, OidcSettings(role_claim="roles", role_map={"admins": "admin"})) == "admin"


@pytest.mark.parametrize(("claims", "name"), [
    ({"preferred_username": "alice", "email": "a@example.com", "sub": "1"}, "alice"),
    ({"email": "bob@example.com", "sub": "2"}, "bob@example.com"),
    ({"preferred_username": "Zoë van Dijk", "sub": "3"}, "Zo-van-Dijk"),
    ({"preferred_username": "  ", "sub": "f81d4fae-7dec"}, "f81d4fae-7dec"),
    ({"preferred_username": "x" * 100, "sub": "4"}, "x" * 64),
])
def test_the_user_name_comes_from_the_claims_made_to_fit(claims: dict[str, object], name: str) -> None:
    assert username_for(claims, MAPPED) == name


def test_no_usable_name_is_refused() -> None:
    with pytest.raises(SignInRefused) as info:
        username_for({"preferred_username": 5}, MAPPED)
    assert info.value.code == "oidc_no_username"


def test_a_sealed_sign_in_opens_only_unchanged_and_under_its_key() -> None:
    key, other = b"k" * 32, b"o" * 32
    pending = PendingSignIn("state", "nonce", "verifier", "https://box/api/auth/oidc/callback", time.time())
    sealed = seal(key, pending)
    assert unseal(key, sealed) == pending
    assert "verifier" not in sealed and "nonce" not in sealed  # sealed, not merely encoded
    assert seal(key, pending) != sealed  # a fresh nonce each time
    flipped = sealed[:30] + ("A" if sealed[30] != "A" else "B") + sealed[31:]
    for bad_key, text in ((other, sealed), (key, flipped), (key, "not-base64!"), (key, "")):
        with pytest.raises(SignInRefused) as info:
            unseal(bad_key, text)
        assert info.value.code == "oidc_state_mismatch"


@pytest.mark.parametrize(("settings", "message"), [
    (OidcSettings(local_passwords=False), "needs oidc.issuer"),
    (OidcSettings(issuer="http://login.example.com", client_id="c", default_role="user"), "https://"),
    (OidcSettings(issuer="https://login.example.com", default_role="user"), "client_id is empty"),
    (OidcSettings(issuer="https://login.example.com", client_id="c", role_map={"g": "root"}), "unknown role 'root'"),
    (OidcSettings(issuer="https://login.example.com", client_id="c", default_role="boss"), "unknown role 'boss'"),
    (OidcSettings(issuer="https://login.example.com", client_id="c"), "neither role_map nor default_role"),
])
def test_settings_that_cannot_work_stop_the_start(settings: OidcSettings, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_settings(settings, ROLES)


def test_working_settings_pass() -> None:
    check_settings(OidcSettings(), ROLES)  # no single sign-on at all
    check_settings(MAPPED, ROLES)
    check_settings(OidcSettings(issuer="http://127.0.0.1:9000", client_id="c", default_role="user"), ROLES)


# ---- the ID token's validation, against keys this test publishes (the real provider runs in the integration tests)
ISSUER = "https://login.example.com"


class Published:
    """A provider's discovery document and JWKS served through httpx.MockTransport; `keys` may change (rotation)."""

    def __init__(self, *keys: RSAKey) -> None:
        self.keys = list(keys)
        self.jwks_fetches = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={
                "issuer": ISSUER, "authorization_endpoint": ISSUER + "/auth", "token_endpoint": ISSUER + "/token",
                "jwks_uri": ISSUER + "/jwks", "id_token_signing_alg_values_supported": ["RS256", "HS256", "none"]})
        self.jwks_fetches += 1
        return httpx.Response(200, json={"keys": [k.as_dict(private=False) for k in self.keys]})


def signed(key: RSAKey | OctKey, alg: str = "RS256", **overrides: object) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "u1", "aud": "appliance", "iat": now, "exp": now + 300, "nonce": "n-1",
              **overrides}
    header = {"alg": alg, **({"kid": key.kid} if key.kid else {})}
    return jwt.encode(header, {k: v for k, v in claims.items() if v is not None}, key,
                      algorithms=[alg])


def validator(published: Published) -> OidcSignIn:
    settings = OidcSettings(issuer=ISSUER, client_id="appliance", default_role="user")
    return OidcSignIn(settings, "client-secret-value-0123456789", b"k" * 32, None, None,  # type: ignore[arg-type]
                      transport=httpx.MockTransport(published.handle))


KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})


def test_a_valid_id_token_gives_its_claims() -> None:
    claims = asyncio.run(validator(Published(KEY)).validate_id_token({"id_token": signed(KEY)}, "n-1"))
    assert claims["sub"] == "u1" and claims["aud"] == "appliance"


@pytest.mark.parametrize("token", [
    pytest.param(lambda: signed(RSAKey.generate_key(2048, parameters={"kid": "k1"})), id="signed by another key"),
    pytest.param(lambda: signed(KEY, aud="someone-else"), id="another audience"),
    pytest.param(lambda: signed(KEY, iss="https://evil.example.com"), id="another issuer"),
    pytest.param(lambda: signed(KEY, exp=int(time.time()) - 600), id="expired"),
    pytest.param(lambda: signed(KEY, exp=None), id="no exp"),
    pytest.param(lambda: signed(KEY, nonce="n-2"), id="another nonce"),
    pytest.param(lambda: signed(KEY, nonce=None), id="no nonce"),
    pytest.param(lambda: signed(OctKey.import_key(b"client-secret-value-0123456789"), "HS256"),
                 id="MACed with the client secret"),
    pytest.param(lambda: signed(KEY)[:-4] + "AAAA", id="signature bytes changed"),
])
def test_an_id_token_that_fails_any_check_is_refused(token: Callable[[], str]) -> None:
    with pytest.raises(SignInRefused) as info:
        asyncio.run(validator(Published(KEY)).validate_id_token({"id_token": token()}, "n-1"))
    assert info.value.code == "oidc_invalid_token"


def test_keys_are_fetched_again_when_the_provider_rotated_them() -> None:
    published = Published(KEY)
    oidc = validator(published)
    asyncio.run(oidc.validate_id_token({"id_token": signed(KEY)}, "n-1"))
    rotated = RSAKey.generate_key(2048, parameters={"kid": "k2"})
    published.keys = [rotated]
    claims = asyncio.run(oidc.validate_id_token({"id_token": signed(rotated)}, "n-1"))
    assert claims["sub"] == "u1" and published.jwks_fetches == 2
