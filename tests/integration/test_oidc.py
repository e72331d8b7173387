"""Single sign-on to the web UI against a real OpenID Provider (npm `oidc-provider` on Node, tests/oidc_provider.py):
the user created at the first sign-in with the role their groups map to, the default role, the same session as a
password login (cookie, CSRF), the role set again at each sign-in, sign-out here and at the provider, a tampered
state, cookie or nonce refused, a local account never taken over, and password sign-in turned off.

Two appliances share one provider: `sso` (a confidential client, local passwords on, default role `user`) and
`sso_only` (a public client, local passwords off, no default role). Neither loads a model: nothing here chats."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from tests.conftest import OIDC_LOCAL_ADMIN
from tests.integration.conftest import Running
from tests.oidc_provider import OpenIdProvider, error_code, sign_in, signed_out_at_provider

COOKIE = "appliance_session"
NAME, PASSWORD = OIDC_LOCAL_ADMIN


@pytest.fixture(scope="module")
def sso(sso_server: Running) -> Running:
    return sso_server


@pytest.fixture(scope="module")
def sso_only(sso_only_server: Running) -> Running:
    return sso_only_server


@pytest.fixture
def browser() -> Iterator[httpx.Client]:
    """A cookie jar and a client, as one browser has."""
    with httpx.Client(timeout=30) as http:
        yield http


def audit(site: Running, action: str) -> list[dict[str, Any]]:
    """The audit records of one action, read with the admin key."""
    exported = httpx.get(site.url + "/api/audit", params={"action": action, "format": "jsonl"}, headers=site.headers)
    assert exported.status_code == 200, exported.text
    return [json.loads(line) for line in exported.text.splitlines()]


def change_user(site: Running, name: str, **change: object) -> None:
    """What an admin does in the Users page (PATCH /api/users/NAME with the admin key)."""
    changed = httpx.patch(f"{site.url}/api/users/{name}", json=change, headers=site.headers)
    assert changed.status_code == 200, changed.text


def me(site: Running, http: httpx.Client) -> httpx.Response:
    return http.get(site.url + "/api/me")


def test_first_sign_in_creates_the_user_with_the_mapped_role_in_a_password_like_session(
        sso: Running, oidc_provider: OpenIdProvider, browser: httpx.Client) -> None:
    start = browser.get(sso.url + "/api/auth/oidc/login")
    assert start.status_code == 302
    query = parse_qs(urlsplit(start.headers["location"]).query)
    assert start.headers["location"].startswith(oidc_provider.issuer + "/auth?")
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43  # PKCE
    assert query["redirect_uri"] == [sso.url + "/api/auth/oidc/callback"] and "nonce" in query
    assert set(query["scope"][0].split()) == {"openid", "profile", "email", "groups"}
    pending = start.headers["set-cookie"].lower()
    assert "httponly" in pending and "samesite=lax" in pending and "max-age=600" in pending

    done = sign_in(browser, sso.url, "alice")
    assert done.status_code == 303 and done.headers["location"] == "/ui/", done.headers
    cookie = next(c for c in done.headers.get_list("set-cookie") if c.startswith(COOKIE + "="))
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "path=/" in cookie.lower()

    who = me(sso, browser)
    assert who.status_code == 200, who.text
    assert (who.json()["name"], who.json()["role"], who.json()["via"]) == ("alice", "admin", "session")
    csrf = who.json()["csrf_token"]
    # the same session as a password login: a state-changing request needs the CSRF token
    assert browser.post(sso.url + "/api/me/keys", json={"name": "sso-key"}).status_code == 403
    made = browser.post(sso.url + "/api/me/keys", json={"name": "sso-key"}, headers={"X-CSRF-Token": csrf})
    assert made.status_code in (200, 201), made.text

    again = sign_in(browser, sso.url, "alice")  # the provider remembers her: no login page, a new session here
    assert again.status_code == 303 and browser.cookies[COOKIE] != done.cookies[COOKIE]
    [created] = [r for r in audit(sso, "user.create") if r["details"]["name"] == "alice"]
    assert created["actor"] == "oidc:Test IdP" and created["details"]["role"] == "admin"
    assert created["details"]["via"] == "oidc" and created["outcome"] == "ok"
    logins = [r for r in audit(sso, "user.login") if r["details"].get("name") == "alice"]
    assert [(r["outcome"], r["details"]["method"]) for r in logins] == [("ok", "oidc")] * 2
    listed = httpx.get(sso.url + "/api/users", headers=sso.headers).json()["data"]
    assert [(u["name"], u["role"]) for u in listed if u["name"] == "alice"] == [("alice", "admin")]


def test_users_without_a_mapped_group_get_the_default_role_and_the_role_follows_the_provider(
        sso: Running, browser: httpx.Client) -> None:
    assert sign_in(browser, sso.url, "bob").status_code == 303
    assert me(sso, browser).json()["role"] == "user"  # only 'staff', which role_map does not name
    with httpx.Client(timeout=30) as other:
        assert sign_in(other, sso.url, "carol").status_code == 303
        assert me(sso, other).json()["role"] == "auditor"

    change_user(sso, "bob", role="auditor")
    assert me(sso, browser).json()["role"] == "auditor"
    assert sign_in(browser, sso.url, "bob").status_code == 303  # the provider says: no mapped group
    assert me(sso, browser).json()["role"] == "user"
    [changed] = [r for r in audit(sso, "user.set_role") if r["actor"] == "oidc:Test IdP"]
    assert changed["details"]["name"] == "bob" and changed["details"]["role"] == "user"
    assert changed["details"]["previous_role"] == "auditor"


def test_sign_out_ends_the_session_here_and_at_the_provider(sso: Running, oidc_provider: OpenIdProvider,
                                                             browser: httpx.Client) -> None:
    sign_in(browser, sso.url, "alice")
    csrf = me(sso, browser).json()["csrf_token"]
    out = browser.post(sso.url + "/api/auth/logout", headers={"X-CSRF-Token": csrf})
    assert out.status_code == 200, out.text
    assert "max-age=0" in out.headers["set-cookie"].lower()
    url = out.json()["end_session_url"]
    query = parse_qs(urlsplit(url).query)
    assert url.startswith(oidc_provider.issuer + "/session/end?") and query["client_id"] == ["appliance"]
    assert query["post_logout_redirect_uri"] == [sso.url + "/ui/"] and query["id_token_hint"][0].count(".") == 2
    assert me(sso, browser).status_code == 401

    back = signed_out_at_provider(browser, url, sso.url)
    assert back.is_redirect and back.headers["location"].startswith(sso.url + "/ui/")
    # signed out at the provider too: the next sign-in shows its login page again
    start = browser.get(sso.url + "/api/auth/oidc/login")
    page = browser.get(start.headers["location"], follow_redirects=True)
    assert 'name="login"' in page.text

    password = httpx.post(sso.url + "/api/auth/login", json={"username": NAME, "password": PASSWORD})
    assert password.status_code == 200
    out = httpx.post(sso.url + "/api/auth/logout", cookies={COOKIE: password.cookies[COOKIE]},
                     headers={"X-CSRF-Token": password.json()["csrf_token"]})
    assert out.status_code == 204  # a password session has nothing to end at the provider


def _rewrite(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | params
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_a_tampered_state_cookie_or_nonce_is_refused(sso: Running, browser: httpx.Client) -> None:
    refused = sign_in(browser, sso.url, "alice", callback=lambda url: _rewrite(url, state="forged-state"))
    assert error_code(refused) == "oidc_state_mismatch" and COOKIE not in browser.cookies

    # the provider's answer taken to another browser (login CSRF): it has no pending sign-in
    stolen: list[str] = []
    sign_in(browser, sso.url, "alice", callback=lambda url: stolen.append(url) or sso.url + "/healthz")
    with httpx.Client(timeout=30) as victim:
        assert error_code(victim.get(stolen[0])) == "oidc_state_mismatch" and COOKIE not in victim.cookies
    browser.cookies.clear()

    def forged_cookie(url: str) -> str:
        sealed = browser.cookies["appliance_oidc"]
        raw = bytearray(base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4)))
        raw[20] ^= 1
        browser.cookies.delete("appliance_oidc")
        browser.cookies.set("appliance_oidc", base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("="),
                            domain="127.0.0.1", path="/")
        return url
    assert error_code(sign_in(browser, sso.url, "alice", callback=forged_cookie)) == "oidc_state_mismatch"
    assert "appliance_oidc" not in browser.cookies  # the refusal clears the pending sign-in

    # a nonce changed on the way to the provider comes back in the ID token, where it must be the one sent
    nonce = sign_in(browser, sso.url, "alice", authorize=lambda url: _rewrite(url, nonce="attacker-nonce"))
    assert error_code(nonce) == "oidc_invalid_token" and COOKIE not in browser.cookies
    # a code whose PKCE challenge was swapped cannot be redeemed with this browser's verifier
    challenge = base64.urlsafe_b64encode(hashlib.sha256(b"attacker").digest()).decode().rstrip("=")
    pkce = sign_in(browser, sso.url, "alice", authorize=lambda url: _rewrite(url, code_challenge=challenge))
    assert error_code(pkce) == "oidc_token_refused" and COOKIE not in browser.cookies

    refusals = [r for r in audit(sso, "user.login") if r["outcome"] == "denied"]
    codes = [r["details"]["code"] for r in refusals]
    assert codes.count("oidc_state_mismatch") >= 3 and "oidc_invalid_token" in codes
    assert "oidc_token_refused" in codes


def test_a_local_user_of_the_same_name_is_not_taken_over(sso: Running, browser: httpx.Client) -> None:
    refused = sign_in(browser, sso.url, "local")  # preferred_username 'local-admin', the local admin's name
    assert error_code(refused) == "oidc_name_taken" and COOKIE not in browser.cookies
    password = httpx.post(sso.url + "/api/auth/login", json={"username": NAME, "password": PASSWORD})
    assert password.status_code == 200 and password.json()["user"]["role"] == "admin"


def test_with_local_passwords_off_only_the_provider_signs_in(sso_only: Running, browser: httpx.Client) -> None:
    methods = httpx.get(sso_only.url + "/api/auth/methods").json()
    assert methods == {"password": False, "sso": {"name": "Staff Login", "url": "/api/auth/oidc/login"}}
    password = httpx.post(sso_only.url + "/api/auth/login", json={"username": "anyone", "password": PASSWORD})
    assert password.status_code == 403 and COOKIE not in password.cookies
    error = password.json()["error"]
    assert error["code"] == "password_login_disabled" and "Sign in with Staff Login" in error["message"]
    assert httpx.get(sso_only.url + "/api/me", headers=sso_only.headers).status_code == 200  # API keys still work

    assert error_code(sign_in(browser, sso_only.url, "bob")) == "oidc_no_role"  # no mapped group, no default role
    with httpx.Client(timeout=30) as other:
        assert sign_in(other, sso_only.url, "alice").status_code == 303
        assert me(sso_only, other).json()["role"] == "admin"
        change_user(sso_only, "alice", disabled=True)
        assert me(sso_only, other).status_code == 401
        assert error_code(sign_in(other, sso_only.url, "alice")) == "user_disabled"
    denied = [r["details"]["reason"] for r in audit(sso_only, "user.login") if r["outcome"] == "denied"]
    assert "password sign-in is turned off" in denied and "the user is disabled" in denied
    assert any("no role on this appliance" in reason for reason in denied)
