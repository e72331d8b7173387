"""Single sign-on in the web UI, in a real browser against the real OpenID Provider (tests/oidc_provider.py): the
"Sign in with <provider>" button beside the password form, reached by keyboard, the provider's login page and back
into the app, signing out there too, a refused sign-in explained on the sign-in page, and a sign-in page with only
the provider's button when local passwords are off. axe runs on each state; screenshots at desktop and phone size."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from tests.e2e.conftest import assert_accessible, shot
from tests.integration.conftest import Running


def test_sign_in_and_out_with_the_provider_by_keyboard(page: Page, sso_server: Running) -> None:
    page.goto(sso_server.url + "/ui/")
    sso = page.get_by_role("button", name="Sign in with Test IdP", exact=True)
    expect(sso).to_be_focused()  # the first thing on the page, so Enter alone starts the sign-in
    expect(page.get_by_label("Username", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Sign in", exact=True)).to_be_visible()
    assert_accessible(page, "the sign-in page with single sign-on")
    shot(page, "signin-sso")

    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/interaction/"))  # the provider's own login page
    page.locator("input[name=login]").fill("dave")
    page.locator("input[name=password]").fill("any password")
    page.locator("button[type=submit]").click()

    page.wait_for_url(re.compile(r"/ui/"))
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    expect(page.get_by_text("dave · admin")).to_be_visible()
    expect(page.get_by_role("heading", level=1)).to_have_text("Dashboard")
    shot(page, "sso-signed-in")

    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("button", name="Yes, sign me out").click()  # the provider asks; then sends us back
    expect(page.get_by_role("alert")).to_have_text("You signed out.")
    expect(page.get_by_role("button", name="Sign in with Test IdP", exact=True)).to_be_visible()
    assert page.url == sso_server.url + "/ui/"


def test_a_refused_sign_in_is_explained_on_the_sign_in_page(page: Page, sso_server: Running) -> None:
    page.goto(sso_server.url + "/api/auth/oidc/callback?code=stolen&state=forged")
    expect(page.get_by_role("alert")).to_contain_text("not started in this browser")
    assert page.url == sso_server.url + "/ui/"  # the code is gone from the address
    expect(page.get_by_role("button", name="Sign in with Test IdP", exact=True)).to_be_visible()
    assert_accessible(page, "the sign-in page after a refused single sign-on")
    shot(page, "signin-sso-refused")


def test_the_sign_in_page_with_single_sign_on_fits_a_phone(phone: Page, sso_server: Running) -> None:
    phone.goto(sso_server.url + "/ui/")
    expect(phone.get_by_role("button", name="Sign in with Test IdP", exact=True)).to_be_in_viewport()
    expect(phone.get_by_role("button", name="Sign in", exact=True)).to_be_in_viewport()
    assert_accessible(phone, "the sign-in page with single sign-on on a phone")
    shot(phone, "signin-sso")


def test_with_local_passwords_off_only_the_provider_is_offered(page: Page, phone: Page,
                                                               sso_only_server: Running) -> None:
    for view in (page, phone):
        view.goto(sso_only_server.url + "/ui/")
        expect(view.get_by_role("button", name="Sign in with Staff Login", exact=True)).to_be_focused()
        expect(view.get_by_text("Password sign-in is turned off on this appliance.")).to_be_visible()
        expect(view.get_by_label("Username", exact=True)).to_have_count(0)
        expect(view.get_by_role("button", name="Sign in", exact=True)).to_have_count(0)
        assert_accessible(view, "the sign-in page with only single sign-on")
        shot(view, "signin-sso-only")

    page.get_by_role("button", name="Sign in with Staff Login", exact=True).click()
    page.locator("input[name=login]").fill("carol")
    page.locator("input[name=password]").fill("any password")
    page.locator("button[type=submit]").click()
    expect(page.get_by_text("carol · auditor")).to_be_visible()
