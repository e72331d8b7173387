"""Signing in to the web UI (DESIGN §4): the form's "Username", "Password" and "Sign in"; a wrong password is refused
in place with an alert; the right one opens the app with its navigation. axe runs on each state."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from tests.e2e.conftest import UiServer, assert_accessible, login, shot

NAV_LINKS = ("Dashboard", "Playground", "Models", "Collections", "Users", "API keys", "Usage", "Policies", "Privacy",
             "Audit", "Settings")


def test_a_wrong_password_is_refused_on_the_sign_in_form(page: Page, server: UiServer) -> None:
    page.goto(server.url + "/ui/")
    sign_in = page.get_by_role("button", name="Sign in")
    expect(sign_in).to_be_visible()
    assert_accessible(page, "the sign-in form")
    shot(page, "signin")

    name, password = server.admin
    page.get_by_label("Username", exact=True).fill(name)
    page.get_by_label("Password", exact=True).fill(password + "-not")
    sign_in.click()

    expect(page.get_by_role("alert")).to_have_text(re.compile(r"\S"))
    expect(sign_in).to_be_visible()
    expect(page.get_by_role("link", name="Dashboard", exact=True)).to_have_count(0)
    assert_accessible(page, "the sign-in form after a wrong password")
    shot(page, "signin-refused")


def test_signing_in_opens_the_app_with_its_navigation(page: Page, server: UiServer) -> None:
    login(page, server)
    nav = page.get_by_role("navigation").filter(has=page.get_by_role("link", name="Dashboard", exact=True))
    for name in NAV_LINKS:
        expect(nav.get_by_role("link", name=name, exact=True)).to_be_visible()
    assert_accessible(page, "the app after sign-in")
    shot(page, "signed-in")


def test_the_sign_in_form_fits_a_phone(phone: Page, server: UiServer) -> None:
    phone.goto(server.url + "/ui/")
    for field in ("Username", "Password"):
        expect(phone.get_by_label(field, exact=True)).to_be_in_viewport()
    expect(phone.get_by_role("button", name="Sign in")).to_be_in_viewport()
    assert_accessible(phone, "the sign-in form on a phone")
    shot(phone, "signin")
