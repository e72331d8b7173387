"""The console's main flows, done in a real browser as a person would: chat with streaming, Stop and Regenerate;
a collection with an uploaded document, the query tester and a cited answer; an API key made in the browser that
works with the openai SDK; pulling and promoting a model version; verifying the audit chain. Hostile text (HTML
and script in a document, a key name and a reply) must show as text and never run."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import httpx
import openai
import pytest
from playwright.sync_api import Page, expect

from tests.e2e.conftest import GENERATION, PHONE, UiServer, assert_accessible, login, shot
from tests.e2e.test_pages import open_page
from tests.integration.conftest import model_file  # noqa: F401 (the fixture: the default GGUF in plaintext)
from tests.integration.test_rollout import with_metadata
from tests.server import DEFAULT_MODEL

HOSTILE = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
DOCUMENT = f"""# Employee handbook

## Vacation

Every employee gets thirty days of paid vacation per year. Unused vacation days carry over to the next year,
up to ten days. Requests go to your manager two weeks ahead.

## Equipment

Laptops are replaced every four years. {HOSTILE} Lost equipment must be reported to IT within a day.
"""


def no_script_ran(page: Page) -> None:
    assert page.evaluate("window.__xss") is None, "a hostile payload ran"
    assert page.locator("main img[src='x'], main script").count() == 0, "a hostile payload became markup"


def test_chat_streams_and_can_be_stopped_and_regenerated(page: Page, server: UiServer) -> None:
    login(page, server)
    open_page(page, "Playground")
    page.get_by_label("Max tokens").fill("600")
    page.get_by_label("Message").fill("Write a long story about a dragon who learns to bake bread.")
    page.get_by_role("button", name="Send").click()
    log = page.get_by_role("log")
    reply = log.get_by_role("article", name="Assistant").last
    # streamed: text shows while the reply is still being generated, then Stop ends it
    expect(reply).to_have_attribute("aria-busy", "true")
    expect(reply.locator(".body")).to_have_text(re.compile(r"\w+ \w+"), timeout=GENERATION)
    page.get_by_role("button", name="Stop").click()
    expect(reply).not_to_have_attribute("aria-busy", "true")
    expect(reply).to_contain_text("stopped", timeout=GENERATION)
    expect(page.get_by_role("button", name="Send")).to_be_enabled()

    page.get_by_label("Max tokens").fill("16")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Message").fill("Say hello.")
    page.get_by_label("Message").press("Control+Enter")
    answer = log.get_by_role("article", name="Assistant").last
    expect(answer).to_contain_text(re.compile(r"\d+ prompt \+ \d+ completion tokens"), timeout=GENERATION)
    first = answer.locator(".body").inner_text()
    assert first.strip()
    page.get_by_role("button", name="Regenerate").click()
    expect(log.get_by_role("article", name="Assistant")).to_have_count(2)  # replaced, not added
    expect(log.get_by_role("article", name="Assistant").last).to_contain_text("completion tokens", timeout=GENERATION)
    assert_accessible(page, "the playground after a chat")
    shot(page, "flow-playground")


def test_a_document_uploaded_in_the_browser_answers_with_citations(page: Page, server: UiServer) -> None:
    login(page, server)
    open_page(page, "Collections")
    page.get_by_label("Collection name").fill("handbook")
    page.get_by_role("button", name="Create collection").click()
    expect(page.get_by_role("heading", name="Documents in handbook")).to_be_visible()

    page.locator("#upload-files").set_input_files([
        {"name": "handbook.md", "mimeType": "text/markdown", "buffer": DOCUMENT.encode()},
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"Parking is free for employees on weekends."},
    ])
    uploads = page.get_by_role("list", name="Uploads")
    expect(uploads.get_by_role("listitem")).to_have_count(2)
    # the first upload also loads the embedding model: allow it a minute
    expect(uploads.get_by_role("listitem").filter(has_text="handbook.md")).to_contain_text("done", timeout=90_000)
    expect(uploads.get_by_role("listitem").filter(has_text="notes.txt")).to_contain_text("done", timeout=90_000)
    documents = page.get_by_role("region", name="Documents", exact=True)
    expect(documents.get_by_role("row", name=re.compile("handbook.md"))).to_be_visible()

    page.get_by_label("Query", exact=True).fill("how many vacation days per year")
    page.get_by_role("button", name="Search").click()
    for mode in ("hybrid", "vector", "keyword"):
        expect(page.get_by_role("region", name=f"{mode} results")).to_contain_text("handbook.md")
    page.get_by_label("Query", exact=True).fill("lost equipment laptops")
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_role("region", name="keyword results")).to_contain_text('onerror="window.__xss=1"')
    no_script_ran(page)
    assert_accessible(page, "collections with documents and results")
    shot(page, "flow-collections")

    open_page(page, "Playground")
    page.get_by_label("Answer from collections (RAG)").check()
    page.get_by_label("handbook", exact=True).check()
    page.get_by_label("Max tokens").fill("48")
    page.get_by_label("Message").fill("How many days of paid vacation does an employee get per year?")
    page.get_by_role("button", name="Send").click()
    sources = page.get_by_role("log").get_by_role("list", name="Sources")
    expect(sources.get_by_role("link", name="handbook / handbook.md").first).to_be_visible(timeout=GENERATION)
    no_script_ran(page)
    shot(page, "flow-rag-answer")
    sources.get_by_role("link", name="handbook / handbook.md").first.click()
    expect(page.get_by_role("heading", level=1, name="Collections")).to_be_visible()
    expect(page.locator("mark", has_text="handbook.md")).to_be_visible()


def test_a_key_created_by_keyboard_works_with_the_openai_sdk_until_revoked(page: Page, server: UiServer) -> None:
    login(page, server)
    open_page(page, "API keys")
    page.get_by_role("button", name="Create key").focus()
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog", name="Create an API key")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_label("Name")).to_be_focused()
    page.keyboard.type(f"sdk {HOSTILE}")
    page.keyboard.press("Enter")  # submits the form: "Create"
    expect(dialog).to_be_hidden()
    secret = page.get_by_label("The new API key").inner_text().strip()
    assert secret.startswith("apl_")
    no_script_ran(page)
    expect(page.get_by_role("cell", name=f"sdk {HOSTILE}", exact=True)).to_be_visible()
    assert_accessible(page, "API keys with a new key shown")
    shot(page, "flow-api-key")

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0)
    try:
        reply = client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=4,
                                               messages=[{"role": "user", "content": "Hi"}])
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        page.get_by_role("button", name="I have stored it").click()
        page.get_by_role("button", name=f"Revoke key sdk {HOSTILE}").click()
        page.get_by_role("dialog", name="Revoke key").get_by_role("button", name="Revoke").click()
        expect(page.get_by_role("row", name=re.compile("sdk")).get_by_text("revoked")).to_be_visible()
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=4,
                                           messages=[{"role": "user", "content": "Hi"}])
    finally:
        client.close()


def test_a_version_pulled_in_the_browser_is_promoted_there(page: Page, server: UiServer,
                                                           model_file: Path, tmp_path: Path) -> None:  # noqa: F811
    name = bytes(gguf.GGUFReader(model_file).fields["general.name"].parts[-1])
    variant = with_metadata(model_file, tmp_path / "variant.gguf", "general.name", b"V" + name[1:])
    login(page, server)
    open_page(page, "Models")
    page.get_by_label("Source", exact=True).fill(f"file:{variant}")
    page.get_by_label("Name", exact=True).fill(DEFAULT_MODEL)
    page.get_by_role("button", name="Pull model").click()
    expect(page.get_by_text(re.compile(rf"Pulled {DEFAULT_MODEL}@\d+")).first).to_be_visible(timeout=120_000)
    staged = page.get_by_role("row", name=re.compile(r"staging"))
    expect(staged).to_have_count(1)
    version = re.search(r"@(\d+)", staged.inner_text())
    assert version is not None
    # a bandit alias over both versions shows its targets and shares
    targets = [f"{DEFAULT_MODEL}@1", f"{DEFAULT_MODEL}@{version.group(1)}"]
    put = httpx.put(f"{server.url}/api/aliases/arena", headers=server.headers, timeout=30,
                    json={"strategy": "bandit", "targets": targets})
    assert put.status_code == 200, put.text
    page.reload()
    alias_row = page.get_by_role("row", name=re.compile(r"^arena bandit over"))
    expect(alias_row).to_contain_text(f"bandit over {', '.join(targets)}")
    expect(alias_row).to_contain_text(re.compile(rf"{re.escape(targets[0])}: \d+%"))
    expect(alias_row).to_contain_text("+0 / -0, 0 failed")
    assert_accessible(page, "models with a bandit alias")
    shot(page, "flow-models-bandit")
    desktop = page.viewport_size
    page.set_viewport_size(PHONE)  # the same page on a phone: the alias table scrolls, nothing overlaps
    expect(alias_row).to_be_visible()
    shot(page, "flow-models-bandit")
    assert desktop is not None
    page.set_viewport_size(desktop)
    assert httpx.delete(f"{server.url}/api/aliases/arena", headers=server.headers, timeout=30).status_code == 200
    page.reload()
    staged = page.get_by_role("row", name=re.compile(r"staging"))
    staged.get_by_role("button", name=re.compile("Promote")).click()
    page.get_by_role("dialog", name="Promote").get_by_role("button", name="Promote").click()
    expect(page.get_by_text(f"{DEFAULT_MODEL}@{version.group(1)} is now in production")).to_be_visible(
        timeout=120_000)
    row = page.get_by_role("row", name=re.compile(rf"@{version.group(1)}\b"))
    expect(row).to_contain_text("production")
    expect(page.get_by_role("region", name=re.compile("When")).first).to_contain_text("model.promote")
    assert_accessible(page, "models after a promotion")
    shot(page, "flow-models-promoted")


def test_the_audit_chain_verifies_as_intact(page: Page, server: UiServer) -> None:
    login(page, server)
    open_page(page, "Audit")
    page.get_by_role("button", name="Verify chain").click()
    expect(page.get_by_role("alert")).to_contain_text("intact")
    page.get_by_label("Action").fill("user.login")
    page.get_by_role("button", name="Filter").click()
    rows = page.get_by_role("region", name=re.compile("#")).get_by_role("row")
    expect(rows.nth(1)).to_contain_text("user.login")
    export = page.get_by_role("link", name="Export JSONL").get_attribute("href")
    assert export == "/api/audit?action=user.login&format=jsonl"
    shot(page, "flow-audit")


def test_users_are_created_changed_and_disabled_and_a_hostile_name_stays_text(page: Page, server: UiServer) -> None:
    login(page, server)
    open_page(page, "Users")
    page.get_by_label("User name").fill(HOSTILE)
    page.get_by_label("Initial password").fill("a-long-enough-password-1")
    page.get_by_role("button", name="Create user").click()
    expect(page.get_by_role("alert")).to_contain_text("name")  # refused, and the refusal is shown as text
    no_script_ran(page)

    page.get_by_label("User name").fill("carol")
    page.get_by_role("combobox", name="Role", exact=True).select_option("auditor")
    page.get_by_role("button", name="Create user").click()
    row = page.get_by_role("row", name=re.compile(r"^carol"))
    expect(row).to_contain_text("active")
    expect(row.get_by_role("combobox", name="Role of carol")).to_have_value("auditor")
    row.get_by_role("combobox", name="Role of carol").select_option("user")
    expect(page.get_by_role("status")).to_contain_text("carol is now user")
    row.get_by_role("button", name="Disable carol").click()
    page.get_by_role("dialog", name="Disable user").get_by_role("button", name="Disable").click()
    expect(page.get_by_role("row", name=re.compile(r"^carol"))).to_contain_text("disabled")
    assert_accessible(page, "users after changes")
    shot(page, "flow-users")
