"""The web UI as the server delivers it: `/` goes to `/ui/`, page paths get the shell, files are compressed and
revalidated, every response carries the security headers, and a session learns its CSRF token from /api/me."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import Running
from tests.server import appliance


@pytest.fixture(scope="module")
def signed_in(server: Running) -> Iterator[tuple[httpx.Client, str]]:
    """A browser-like client with a session cookie, and its CSRF token from the login reply."""
    assert server.process is not None, "needs a local server (it creates a user)"
    name, password = "webui-" + secrets.token_hex(3), secrets.token_urlsafe(18)
    appliance("users", "create", name, "--role", "user", "--password-stdin", data_dir=server.process.data_dir,
              input=password + "\n")
    with httpx.Client(base_url=server.url) as client:
        reply = client.post("/api/auth/login", json={"username": name, "password": password})
        assert reply.status_code == 200, reply.text
        yield client, reply.json()["csrf_token"]


def test_the_root_redirects_to_the_ui_and_page_paths_get_the_shell(server: Running) -> None:
    root = httpx.get(server.url + "/")
    assert root.status_code == 302 and root.headers["location"] == "/ui/"
    for path in ("/ui", "/ui/", "/ui/models", "/ui/audit?x=1"):
        page = httpx.get(server.url + path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/ui/js/app.js">' in page.text
    assert httpx.get(server.url + "/ui/js/missing.js").status_code == 404


def test_files_are_gzipped_and_revalidated_with_their_etag(server: Running) -> None:
    first = httpx.get(server.url + "/ui/js/lib.js", headers={"accept-encoding": "gzip"})
    assert first.status_code == 200 and first.headers["content-encoding"] == "gzip"
    assert first.headers["content-type"].startswith("text/javascript")
    assert "export function h(" in first.text
    again = httpx.get(server.url + "/ui/js/lib.js", headers={"if-none-match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize("path", ["/ui/", "/ui/js/app.js", "/healthz", "/api/me", "/v1/models"])
def test_every_response_carries_the_security_headers(server: Running, path: str) -> None:
    headers = httpx.get(server.url + path).headers
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self';" in csp
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    for directive in ("frame-ancestors 'none'", "object-src 'none'", "base-uri 'none'"):
        assert directive in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


def test_a_session_learns_its_csrf_token_from_me_and_needs_it_to_change_anything(
        server: Running, signed_in: tuple[httpx.Client, str]) -> None:
    client, csrf = signed_in
    cookie = next(c for c in client.cookies.jar if c.name == "appliance_session")
    assert cookie.has_nonstandard_attr("HttpOnly") and cookie.get_nonstandard_attr("SameSite", "").lower() == "strict"
    me = client.get("/api/me").json()
    assert me["via"] == "session" and me["csrf_token"] == csrf
    without = client.post("/api/me/keys", json={"name": "laptop"})
    assert without.status_code == 403 and without.json()["error"]["code"] == "csrf_failed"
    made = client.post("/api/me/keys", json={"name": "laptop"}, headers={"x-csrf-token": csrf})
    assert made.status_code == 201, made.text
    # an API key never gets a CSRF token: it is not a session
    assert "csrf_token" not in httpx.get(server.url + "/api/me", headers=server.headers).json()


def test_a_session_that_ended_gets_401_with_the_code_the_ui_reacts_to(server: Running,
                                                                       signed_in: tuple[httpx.Client, str]) -> None:
    with httpx.Client(base_url=server.url, cookies={"appliance_session": "not-a-session"}) as stale:
        reply = stale.get("/api/me")
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "session_expired"
