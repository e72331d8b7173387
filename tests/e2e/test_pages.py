"""Every page of the console as a person meets it: reached from the navigation by keyboard, titled, loaded without
an error, free of critical and serious axe violations, and laid out within a phone's width. A screenshot of each
page at both sizes is kept in tests/e2e/artifacts/ for people to look at."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import UiServer, assert_accessible, login, shot

PAGES = ("Dashboard", "Playground", "Models", "Collections", "Users", "API keys", "Usage", "Policies", "Privacy",
         "Audit", "Settings")


def open_page(page: Page, title: str) -> None:
    """Follow the navigation link as a keyboard user would (focus it, press Enter) and wait for the page."""
    menu = page.get_by_role("button", name="Menu")
    if menu.is_visible():
        menu.click()
    link = page.get_by_role("navigation", name="Main").get_by_role("link", name=title, exact=True)
    link.focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1, name=title, exact=True)).to_be_visible()
    expect(page).to_have_title(f"{title} · Appliance")
    # the current page is marked for screen readers (on a phone the menu has closed again, so read the DOM)
    expect(page.locator("nav a[aria-current='page']")).to_have_text(title)
    expect(page.get_by_role("main")).to_have_attribute("aria-busy", "false", timeout=15_000)


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_every_page_opens_without_errors_and_passes_axe(page: Page, phone: Page, server: UiServer, size: str) -> None:
    browser_page = page if size == "desktop" else phone
    errors: list[str] = []
    browser_page.on("pageerror", lambda exc: errors.append(str(exc)))
    login(browser_page, server)
    for title in PAGES:
        open_page(browser_page, title)
        main = browser_page.get_by_role("main")
        expect(main.get_by_role("alert")).to_have_count(0)
        shot(browser_page, f"page-{title.lower().replace(' ', '-')}")
        assert_accessible(browser_page, f"{title} ({size})")
        width = browser_page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert width <= 1, f"{title} is {width}px wider than the {size} viewport"
    assert errors == [], errors


def test_a_page_address_opens_that_page_after_sign_in_and_back_goes_back(page: Page, server: UiServer) -> None:
    login(page, server)
    page.goto(server.url + "/ui/audit")
    expect(page.get_by_role("heading", level=1, name="Audit")).to_be_visible()
    open_page(page, "Models")
    page.go_back()
    expect(page.get_by_role("heading", level=1, name="Audit")).to_be_visible()
    assert page.url.endswith("/ui/audit")


def test_the_skip_link_moves_to_the_main_content(page: Page, server: UiServer) -> None:
    login(page, server)
    page.goto(server.url + "/ui/settings")
    expect(page.get_by_role("heading", level=1, name="Settings")).to_be_visible()
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    page.keyboard.press("Enter")
    assert page.evaluate("location.hash") == "#main"
