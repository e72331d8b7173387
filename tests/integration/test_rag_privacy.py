"""RAG under the privacy policy, through the real server: the `rag` surface redacts secrets before anything is
indexed; a deleted document, and the documents of an erased user, leave no byte of their text in the data dir."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.integration.conftest import Running
from tests.privacy_canaries import CANARIES, scan
from tests.server import DEFAULT_MODEL, appliance

pytestmark = pytest.mark.slow
PASSWORD = "copper-Lantern-42-meadow"


@pytest.fixture(scope="module")
def box(start_server: Callable[..., Running]) -> Running:
    return start_server()


def test_secrets_are_redacted_before_indexing_and_a_delete_leaves_no_trace(box: Running) -> None:
    assert box.process is not None
    api = httpx.Client(base_url=box.url, headers=box.headers, timeout=120)
    api.post("/api/collections", json={"name": "hr"})
    text = ("Onboarding notes for the new hire. " + " ".join(f"Their {k} is {v}." for k, v in CANARIES.items())
            + " The badge office is on the second floor.")
    assert api.post("/api/collections/hr/documents", json={"id": "onboarding", "text": text}).status_code == 201
    api.post("/api/collections/hr/documents", json={"id": "other", "text": "Lunch is served at noon."})
    found = api.post("/api/collections/hr/query", json={"query": "badge office", "mode": "keyword"}).json()["data"]
    assert found[0]["document_id"] == "onboarding"
    assert CANARIES["secret"] not in found[0]["text"] and "<SECRET_1>" in found[0]["text"]
    assert CANARIES["email"] in found[0]["text"]  # the default policy keeps other entities in a user's documents
    assert scan(box.process.data_dir, [CANARIES["secret"]], [box.process.log_path]) == []
    reply = box.client().chat.completions.create(
        model=DEFAULT_MODEL, max_tokens=8, messages=[{"role": "user", "content": "Where is the badge office?"}],
        extra_body={"rag": {"collections": ["hr"], "top_k": 1}})
    assert reply.model_extra["citations"][0]["document_id"] == "onboarding"  # type: ignore[index]

    assert api.delete("/api/collections/hr/documents/onboarding").status_code == 200
    assert scan(box.process.data_dir, CANARIES, [box.process.log_path]) == []
    assert api.post("/api/collections/hr/query", json={"query": "lunch"}).json()["data"][0]["document_id"] == "other"
    assert api.post("/api/rag/check").json()["consistent"] is True
    api.close()


def test_erasing_a_user_erases_their_collections_and_documents(box: Running) -> None:
    assert box.process is not None
    appliance("users", "create", "rowan", "--role", "user", "--password-stdin", input=PASSWORD + "\n",
              data_dir=box.process.data_dir)
    with httpx.Client(base_url=box.url, timeout=120) as ui:
        login = ui.post("/api/auth/login", json={"username": "rowan", "password": PASSWORD})
        assert login.status_code == 200
        csrf = login.json()["csrf_token"]
        key = ui.post("/api/me/keys", json={"name": "notes"}, headers={"X-CSRF-Token": csrf}).json()["key"]
    as_rowan = {"Authorization": f"Bearer {key}"}
    phrase = "marmalade-heron-7719 private journal entry"
    with httpx.Client(base_url=box.url, headers=as_rowan, timeout=120) as api:
        assert api.post("/api/collections", json={"name": "rowan-journal"}).status_code == 201
        assert api.post("/api/collections/rowan-journal/documents",
                        json={"id": "day1", "text": phrase}).status_code == 201
    assert scan(box.process.data_dir, ["marmalade-heron-7719"]) != []  # it was there
    report = httpx.get(box.url + "/api/privacy/report", headers=box.headers).json()
    assert {c["data_class"]: c for c in report["classes"]}["rag_documents"]["count"] >= 1

    erased = httpx.post(box.url + "/api/privacy/erasures", json={"subject": "rowan"}, headers=box.headers)
    assert erased.status_code == 200 and erased.json()["deleted"]["rag_documents"] == 1
    names = [c["name"] for c in httpx.get(box.url + "/api/collections", headers=box.headers).json()["data"]]
    assert "rowan-journal" not in names
    assert scan(box.process.data_dir, ["marmalade-heron-7719"], [box.process.log_path]) == []
