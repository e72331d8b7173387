"""The pure parts of single sign-on (appliance/auth/oidc.py): claims to a role and a user name, the sealed pending
sign-in, and the `[oidc]` settings refused at start. The flow itself runs against a real provider in
tests/integration/test_oidc.py."""

from __future__ import annotations

import time

import pytest

from appliance.auth.oidc import PendingSignIn, SignInRefused, check_settings, role_for, seal, unseal, username_for
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
