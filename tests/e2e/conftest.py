"""What the web UI tests share: a real server with an admin and a plain user, Debian's chromium driven by
Playwright (pytest-playwright's `page`, `context`, `new_context`), sign-in, axe and screenshots.

The browser is Debian's chromium (APPLIANCE_TEST_CHROMIUM, else `chromium` on PATH); without one every test here
skips, saying so. Playwright's own browser download is never used. A failing test leaves a full-page screenshot of
each page it had open in tests/e2e/artifacts/<test>/, and `shot` saves named ones there for people to look at.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
from axe_playwright_python.sync_playwright import Axe  # type: ignore[import-untyped]
from playwright.sync_api import BrowserContext, Page, ViewportSize, expect
from pytest_playwright.pytest_playwright import CreateContextCallback

from tests.server import Running, appliance

ARTIFACTS = Path(__file__).parent / "artifacts"
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
SERIOUS = ("critical", "serious")
GENERATION = 60_000  # ms to wait for what a model writes: a reply on a busy 2-core box can take many seconds

# UI changes that wait on the server (a page's data, a save) get 15 s instead of Playwright's 5 on a loaded box
expect.set_options(timeout=15_000)


def pytest_configure(config: pytest.Config) -> None:
    """Unless the command line says otherwise: a full-page screenshot of each open page when a test fails, kept in
    tests/e2e/artifacts/ (pytest-playwright empties that folder when a run starts)."""
    if config.option.screenshot == "off":
        config.option.screenshot = "only-on-failure"
    if config.option.output == "test-results":
        config.option.output = str(ARTIFACTS)
    config.option.full_page_screenshot = True


@pytest.fixture(scope="session", autouse=True)
def chromium() -> str:
    """The path of Debian's chromium; every test here skips without one."""
    if path := os.environ.get("APPLIANCE_TEST_CHROMIUM"):
        if not os.access(path, os.X_OK):
            pytest.fail(f"APPLIANCE_TEST_CHROMIUM={path} is not an executable; point it at chromium or unset it")
        return path
    if path := shutil.which("chromium"):
        return path
    pytest.skip("the web UI tests need Debian's chromium: apt-get install chromium (./install.sh --test installs "
                "it when run as root), or set APPLIANCE_TEST_CHROMIUM to a Chromium binary")


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any], chromium: str) -> dict[str, Any]:
    return {**browser_type_launch_args, "executable_path": chromium}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict[str, Any]) -> dict[str, Any]:
    """Settings of every context; the viewport is set per context (`context`, `phone`), as new_context() refuses a
    setting given both here and as its argument."""
    return {**browser_context_args, "locale": "en-US", "timezone_id": "UTC", "color_scheme": "light"}


@pytest.fixture
def context(new_context: CreateContextCallback) -> BrowserContext:
    """pytest-playwright's `context` (and so `page`) at the desktop size, 1280x800."""
    return new_context(viewport=DESKTOP)


@pytest.fixture
def phone(new_context: CreateContextCallback) -> Page:
    """A page in a phone-sized context, 390x844 with touch; screenshots on failure as for `page`."""
    return new_context(viewport=PHONE, is_mobile=True, has_touch=True).new_page()


class UiServer(Running):
    """The server under test (`.url`, `.key` an admin API key, `.client()`, `.headers`) and who can sign in to it:
    `.admin` and `.user` are (name, password) of an admin and of a plain user (role `user`)."""

    def __init__(self, running: Running, admin: tuple[str, str], user: tuple[str, str]) -> None:
        super().__init__(running.url, running.key, running.process)
        self.admin = admin
        self.user = user


@pytest.fixture(scope="session")
def server(server_factory: Callable[..., Running]) -> UiServer:
    """One server for the UI tests, its users created with the real CLI before it starts."""
    admin = ("ui-admin", secrets.token_urlsafe(18))
    user = ("ui-user", secrets.token_urlsafe(18))

    def add_users(data_dir: Path) -> None:
        for (name, password), role in ((admin, "admin"), (user, "user")):
            appliance("users", "create", name, "--role", role, "--password-stdin", data_dir=data_dir,
                      input=password + "\n")

    return UiServer(server_factory(prepare=add_users), admin, user)


@pytest.fixture(scope="session")
def base_url(server: UiServer) -> str:
    """Relative URLs resolve against the server, e.g. page.goto("/ui/"). (This also keeps pytest-playwright's own
    `base_url`, which pytest 9 warns about, from being used.)"""
    return server.url


def login(page: Page, server: UiServer, who: Literal["admin", "user"] = "admin") -> None:
    """Sign in through the sign-in form at /ui/ and wait until the app shows its first page."""
    name, password = server.admin if who == "admin" else server.user
    page.goto(server.url + "/ui/")
    page.get_by_label("Username", exact=True).fill(name)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign in")).to_be_hidden()
    # the app is there: on a phone the navigation waits behind the Menu button, so look for Sign out
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    expect(page.get_by_role("heading", level=1)).to_be_visible()


def assert_accessible(page: Page, name: str) -> None:
    """Run axe-core on the page as it is now; fail listing every critical or serious violation. `name` says which
    page and state, for the message."""
    violations = [v for v in Axe().run(page).response["violations"] if v["impact"] in SERIOUS]
    if violations:
        lines = [f"{len(violations)} critical or serious accessibility violation(s) on {name} ({page.url}):"]
        for violation in violations:
            lines.append(f"- {violation['id']} ({violation['impact']}): {violation['help']} [{violation['helpUrl']}]")
            for node in violation["nodes"]:
                summary = "; ".join(line.strip() for line in node.get("failureSummary", "").splitlines())
                lines.append(f"    {' '.join(map(str, node['target']))}: {summary.replace(':;', ':')}")
        pytest.fail("\n".join(lines), pytrace=False)


def shot(page: Page, name: str) -> Path:
    """Save a full-page screenshot as tests/e2e/artifacts/<name>-<width>x<height>.png, for a person to look at."""
    size = page.viewport_size
    suffix = f"-{size['width']}x{size['height']}" if size else ""
    path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}{suffix}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=path, full_page=True)
    return path
