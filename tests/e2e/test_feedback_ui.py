"""Rating a reply in the playground: thumbs up and down on each reply are toggle buttons (aria-pressed) that a
mouse and a keyboard can press; the rating reaches the server and counts for the version that served the reply."""

from __future__ import annotations

import httpx
from playwright.sync_api import Page, expect

from tests.e2e.conftest import GENERATION, UiServer, assert_accessible, login, shot
from tests.e2e.test_pages import open_page
from tests.server import DEFAULT_MODEL


def ratings(server: UiServer) -> dict[str, int]:
    versions = httpx.get(f"{server.url}/api/models/{DEFAULT_MODEL}/versions", headers=server.headers).json()["data"]
    feedback: dict[str, int] = next(v["feedback"] for v in versions if v["version"] == 1)
    return feedback


def test_a_reply_is_rated_with_the_thumbs(page: Page, server: UiServer) -> None:
    before = ratings(server)
    login(page, server)
    open_page(page, "Playground")
    page.get_by_label("Max tokens").fill("8")
    page.get_by_label("Message").fill("Say hello to the thumbs.")
    page.get_by_role("button", name="Send").click()
    reply = page.get_by_role("log").get_by_role("article", name="Assistant").last
    rating = reply.get_by_role("group", name="Rate this reply")
    good, bad = rating.get_by_role("button", name="Good reply"), rating.get_by_role("button", name="Bad reply")
    expect(good).to_be_visible(timeout=GENERATION)
    expect(good).to_have_attribute("aria-pressed", "false")
    good.click()
    expect(good).to_have_attribute("aria-pressed", "true")
    expect(bad).to_have_attribute("aria-pressed", "false")
    expect(rating.get_by_role("status")).to_have_text("Rated good.")
    assert ratings(server) == {"up": before["up"] + 1, "down": before["down"]}
    bad.focus()  # the keyboard changes its mind
    page.keyboard.press("Enter")
    expect(bad).to_have_attribute("aria-pressed", "true")
    expect(good).to_have_attribute("aria-pressed", "false")
    expect(rating.get_by_role("status")).to_have_text("Rated bad.")
    assert ratings(server) == {"up": before["up"], "down": before["down"] + 1}
    assert_accessible(page, "the playground with a rated reply")
    shot(page, "flow-playground-feedback")
