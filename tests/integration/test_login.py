"""Web UI login against the real server: the session cookie and its attributes, CSRF on state-changing requests,
Bearer keys ignoring cookies, identical refusals, the backoff, logout, new ids at each login, disable and set-role
taking effect at once, and no password or session token in the audit log or the server log."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL, appliance

PASSWORD = "violet-Tangerine-87-harbour"
COOKIE = "appliance_session"
CHAT = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def site(start_server: Callable[..., Running]) -> Running:
    running = start_server()
    assert running.process is not None
    for name in ("alice", "bob", "carol"):
        appliance("users", "create", name, "--role", "user", "--password-stdin", input=PASSWORD + "\n",
                  data_dir=running.process.data_dir)
    return running


def login(site: Running, name: str = "alice", password: str = PASSWORD) -> httpx.Response:
    return httpx.post(site.url + "/api/auth/login", json={"username": name, "password": password})


def session_of(response: httpx.Response) -> tuple[dict[str, str], str]:
    """Headers that send this login's cookie, and its CSRF token."""
    assert response.status_code == 200, response.text
    return {"Cookie": f"{COOKIE}={response.cookies[COOKIE]}"}, response.json()["csrf_token"]


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


def test_login_sets_a_strict_httponly_cookie_and_returns_a_csrf_token(site: Running) -> None:
    response = login(site)
    assert response.status_code == 200
    body = response.json()
    assert body["user"] == {"name": "alice", "role": "user"} and len(body["csrf_token"]) >= 32
    cookie = response.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")}
    assert cookie.startswith(f"{COOKIE}=") and "httponly" in attributes and "secure" not in attributes
    assert attributes["samesite"].lower() == "samesite=strict" and attributes["path"] == "Path=/"
    assert response.cookies[COOKIE] != body["csrf_token"]
    assert login(site).cookies[COOKIE] != response.cookies[COOKIE]  # a new session id at every login


def test_me_and_chat_with_the_cookie_and_csrf_a_cross_site_post_is_refused(site: Running) -> None:
    cookie, csrf = session_of(login(site))
    me = httpx.get(site.url + "/api/me", headers=cookie)
    assert me.status_code == 200, me.text
    assert me.json()["name"] == "alice" and me.json()["role"] == "user" and me.json()["via"] == "session"
    assert "chat:use" in me.json()["permissions"]

    chat = httpx.post(site.url + "/v1/chat/completions", json=CHAT, headers={**cookie, "X-CSRF-Token": csrf},
                      timeout=120)
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"

    for headers in (cookie, {**cookie, "X-CSRF-Token": "forged"}):  # what a cross-site form post can send
        refused = httpx.post(site.url + "/v1/chat/completions", json=CHAT, headers=headers)
        assert refused.status_code == 403 and error_of(refused)["code"] == "csrf_failed"


def test_a_bearer_key_ignores_cookies(site: Running) -> None:
    bogus = {"Cookie": f"{COOKIE}=not-a-session", "Authorization": f"Bearer {site.key}"}
    me = httpx.get(site.url + "/api/me", headers=bogus)
    assert me.status_code == 200 and me.json()["via"] == "api_key" and me.json()["role"] == "admin"
    cookie, _ = session_of(login(site))
    chat = httpx.post(site.url + "/v1/chat/completions", json=CHAT, timeout=120,
                      headers={**cookie, "Authorization": f"Bearer {site.key}"})  # no CSRF token needed
    assert chat.status_code == 200, chat.text
    assert httpx.get(site.url + "/api/me", headers={"Cookie": f"{COOKIE}=not-a-session"}).status_code == 401


def test_logout_ends_the_session_and_clears_the_cookie(site: Running) -> None:
    cookie, csrf = session_of(login(site))
    assert httpx.post(site.url + "/api/auth/logout", headers=cookie).status_code == 403  # CSRF needed
    out = httpx.post(site.url + "/api/auth/logout", headers={**cookie, "X-CSRF-Token": csrf})
    assert out.status_code == 204
    assert out.headers["set-cookie"].startswith(f'{COOKIE}=""') or out.headers["set-cookie"].startswith(
        f"{COOKIE}=;")
    assert "max-age=0" in out.headers["set-cookie"].lower()
    after = httpx.get(site.url + "/api/me", headers=cookie)
    assert after.status_code == 401 and error_of(after)["type"] == "authentication_error"


def test_disable_ends_sessions_and_set_role_applies_at_once(site: Running) -> None:
    assert site.process is not None
    bob, _ = session_of(login(site, "bob"))
    carol, carol_csrf = session_of(login(site, "carol"))
    assert httpx.get(site.url + "/api/me", headers=bob).status_code == 200
    appliance("users", "disable", "bob", data_dir=site.process.data_dir)
    assert httpx.get(site.url + "/api/me", headers=bob).status_code == 401
    assert login(site, "bob").status_code == 401

    appliance("users", "set-role", "carol", "auditor", data_dir=site.process.data_dir)
    assert httpx.get(site.url + "/api/me", headers=carol).json()["role"] == "auditor"
    chat = httpx.post(site.url + "/v1/chat/completions", json=CHAT, headers={**carol, "X-CSRF-Token": carol_csrf})
    assert chat.status_code == 403 and error_of(chat)["code"] == "insufficient_permissions"


def test_refusals_are_identical_and_repeated_failures_back_off(start_server: Callable[..., Running]) -> None:
    target = start_server()
    assert target.process is not None
    appliance("users", "create", "dora", "--role", "user", "--password-stdin", input=PASSWORD + "\n",
              data_dir=target.process.data_dir)
    wrong, unknown = login(target, "dora", "not her password at all"), login(target, "nobody", PASSWORD)
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json() and error_of(wrong)["type"] == "authentication_error"
    assert "set-cookie" not in wrong.headers

    for attempt in range(3):  # five failures from this address in all
        assert login(target, "dora", f"guess number {attempt}").status_code == 401
    throttled = login(target, "dora", PASSWORD)  # refused before the password is even checked
    assert throttled.status_code == 429 and throttled.headers["retry-after"] == "1"
    assert error_of(throttled)["code"] == "too_many_login_attempts"
    time.sleep(1.1)
    assert login(target, "dora", "one more guess").status_code == 401
    again = login(target, "dora", PASSWORD)
    assert again.status_code == 429 and again.headers["retry-after"] == "2"
    time.sleep(2.1)
    assert login(target, "dora", PASSWORD).status_code == 200

    exported = appliance("audit", "export", "--action", "user.login", data_dir=target.process.data_dir).stdout
    records = [json.loads(line) for line in exported.splitlines()]
    assert [r["outcome"] for r in records] == ["denied"] * 8 + ["ok"]
    clients = {r["details"]["client"] for r in records}  # the address, pseudonymized by the privacy policy's
    assert len(clients) == 1 and "127.0.0.1" not in clients  # audit surface: stable, never in the clear


def test_no_password_or_session_token_in_the_audit_log_or_the_server_log(site: Running) -> None:
    assert site.process is not None
    response = login(site)
    token, csrf = response.cookies[COOKIE], response.json()["csrf_token"]
    httpx.get(site.url + "/api/me", headers={"Cookie": f"{COOKIE}={token}"})
    exported = appliance("audit", "export", data_dir=site.process.data_dir).stdout
    assert '"action": "user.login"' in exported
    server_log = site.process.log_path.read_text(errors="replace")
    for secret in (PASSWORD, token, csrf):
        assert secret not in exported and secret not in server_log
