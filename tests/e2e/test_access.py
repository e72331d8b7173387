"""What a `user`-role session sees and may do (pages and controls it lacks are not shown, and the server refuses
them anyway), a session that ends going back to the sign-in page with a message, the login's rate limit as the
form shows it, and Markdown from a model never becoming markup. Nothing is kept in browser storage."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.e2e.conftest import UiServer, assert_accessible, login, shot
from tests.e2e.test_pages import open_page
from tests.server import Running, appliance

USER_PAGES = ("Playground", "Models", "Collections", "API keys")
ADMIN_ONLY = ("Dashboard", "Users", "Usage", "Policies", "Privacy", "Audit", "Settings")


def test_a_user_sees_only_their_pages_and_the_server_refuses_the_rest(page: Page, server: UiServer) -> None:
    login(page, server, "user")
    nav = page.get_by_role("navigation", name="Main")
    for title in USER_PAGES:
        expect(nav.get_by_role("link", name=title, exact=True)).to_be_visible()
    for title in ADMIN_ONLY:
        expect(nav.get_by_role("link", name=title, exact=True)).to_have_count(0)

    page.goto(server.url + "/ui/users")  # typed by hand: not shown, said so, and the API refuses it
    expect(page.get_by_role("heading", level=1, name="Playground")).to_be_visible()
    expect(page.get_by_role("status")).to_contain_text("Your role cannot open Users.")
    for path in ("/api/users", "/api/audit", "/api/settings", "/api/dashboard", "/api/usage"):
        status = page.evaluate("path => fetch(path).then(r => r.status)", path)
        assert status == 403, (path, status)
    csrf = page.evaluate("fetch('/api/me').then(r => r.json()).then(me => me.csrf_token)")
    refused = page.evaluate("""csrf => fetch('/api/users', {method: 'POST',
        headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf},
        body: JSON.stringify({name: 'mallory', role: 'admin', password: 'x'.repeat(16)})}).then(r => r.status)""", csrf)
    assert refused == 403

    open_page(page, "Models")  # read-only: no pull, promote, rollback or verify
    expect(page.get_by_role("button", name="Pull model")).to_have_count(0)
    expect(page.get_by_role("button", name="Verify all")).to_have_count(0)
    expect(page.get_by_role("button", name="Roll back")).to_have_count(0)
    assert_accessible(page, "Models for a user")

    open_page(page, "API keys")  # their own keys, with their own role
    expect(page.get_by_role("heading", name="Your keys")).to_be_visible()
    page.get_by_role("button", name="Create key").click()
    dialog = page.get_by_role("dialog", name="Create an API key")
    expect(dialog.get_by_label("Role")).to_have_count(0)
    dialog.get_by_label("Name").fill("my laptop")
    dialog.get_by_role("button", name="Create").click()
    expect(page.get_by_label("The new API key")).to_have_text(re.compile(r"^apl_"))
    shot(page, "user-keys")
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0


def test_an_ended_session_returns_to_sign_in_with_a_message(page: Page, server: UiServer) -> None:
    login(page, server)
    open_page(page, "Audit")
    page.context.clear_cookies()  # as when the session times out or an admin disables the user
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Models", exact=True).click()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    expect(page.get_by_role("alert")).to_contain_text("session has ended")
    name, password = server.admin  # signing in again, right there, goes on where the user was
    page.get_by_label("Username", exact=True).fill(name)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1, name="Models")).to_be_visible()


def test_signing_out_ends_the_session_on_the_server(page: Page, server: UiServer) -> None:
    login(page, server)
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    assert page.evaluate("fetch('/api/me').then(r => r.status)") == 401


def test_model_markdown_is_rendered_as_text_nodes_only(page: Page, server: UiServer) -> None:
    login(page, server)
    hostile = ("**bold** and `code` <img src=x onerror=\"window.__xss=1\">\n\n<script>window.__xss=2</script>\n\n"
               "[click](javascript:window.__xss=3) [ok](https://example.org/a)\n\n```\n<b>not bold</b>\n```")
    html = page.evaluate("""async text => {
        const { renderMarkdown } = await import('/ui/js/markdown.js');
        const box = document.createElement('div');
        box.append(renderMarkdown(text));
        document.body.append(box);
        return box.innerHTML;
    }""", hostile)
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert "<img" not in html and "<script" not in html and "javascript:" not in html.split("href=")[-1]
    assert "&lt;img src=x onerror=" in html and "&lt;b&gt;not bold&lt;/b&gt;" in html
    assert '<a href="https://example.org/a"' in html
    assert page.evaluate("window.__xss") is None


def test_the_sign_in_form_shows_the_login_rate_limit(page: Page, start_server: Callable[..., Running]) -> None:
    password = secrets.token_urlsafe(18)

    def add_user(data: Path) -> None:
        appliance("users", "create", "throttled", "--role", "user", "--password-stdin", data_dir=data,
                  input=password + "\n")

    own = start_server({"APPLIANCE_SESSIONS__LOGIN_MAX_FAILURES": "2"}, prepare=add_user)
    page.goto(own.url + "/ui/")
    for _ in range(3):
        page.get_by_label("Username", exact=True).fill("throttled")
        page.get_by_label("Password", exact=True).fill("wrong-" + secrets.token_hex(4))
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("button", name="Sign in")).to_be_enabled()
    expect(page.get_by_role("alert")).to_contain_text("too many failed logins")
    shot(page, "signin-throttled")
