"""Feedback through the real server: the receiver of a response (or an admin) rates it by its id within the
window; the rating counts against the version that served it in GET /api/models/{name}/versions and in /metrics;
someone else's response does not exist for a caller (404); a closed window is a 410 that says why; a bad rating is
a 400 in the OpenAI error shape; the comment passes the privacy policy and erasure removes it. Completions come
from the openai SDK."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from appliance.privacy.policy import SHIPPED_PRIVACY
from tests.integration.conftest import Running, new_key
from tests.server import DEFAULT_MODEL

HI = [{"role": "user", "content": "Say hi"}]
SHIPPED = SHIPPED_PRIVACY.read_text()
PSEUDONYMS = SHIPPED.replace('ner = "auto"', 'ner = "off"').replace(
    '[surfaces.conversations]\ndefault = "block"', '[surfaces.conversations]\ndefault = "pseudonymize"')


@pytest.fixture(scope="module")
def box(start_server: Callable[..., Running]) -> Running:
    return start_server({"APPLIANCE_CACHE__ENABLED": "false"})  # counts of its own


def use_policy(box: Running, text: str) -> None:
    changed = httpx.put(box.url + "/api/privacy/policy", headers=box.headers, json={"policy": text})
    assert changed.status_code == 200, changed.text


def rate(box: Running, response_id: str, rating: Any, key: str | None = None, **extra: Any) -> httpx.Response:
    return httpx.post(box.url + "/api/feedback", headers={"Authorization": f"Bearer {key or box.key}"},
                      json={"response_id": response_id, "rating": rating, **extra}, timeout=30)


def counts(box: Running) -> dict[int, dict[str, int]]:
    versions = httpx.get(f"{box.url}/api/models/{DEFAULT_MODEL}/versions", headers=box.headers).json()["data"]
    return {v["version"]: v["feedback"] for v in versions}


def metric(box: Running, rating: str) -> float:
    text = httpx.get(box.url + "/metrics", headers=box.headers).text
    line = f'appliance_feedback_total{{model="{DEFAULT_MODEL}",rating="{rating}",version="1"}} '
    return next((float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line)), 0.0)


def test_rating_ones_own_responses_counts_per_version(box: Running) -> None:
    client = box.client()
    whole = client.chat.completions.create(model=DEFAULT_MODEL, messages=HI, max_tokens=2)  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(model=DEFAULT_MODEL, messages=HI, max_tokens=2,  # type: ignore[arg-type]
                                                 stream=True))
    text = client.completions.create(model=DEFAULT_MODEL, prompt="One, two,", max_tokens=2)
    reply = client.responses.create(model=DEFAULT_MODEL, input="Say hi", max_output_tokens=3, store=False)
    assert reply.id.startswith("resp_") and chunks[0].id.startswith("chatcmpl-")
    before = counts(box).get(1, {"up": 0, "down": 0}), metric(box, "up"), metric(box, "down")
    for response_id, rating in ((whole.id, 1), (chunks[0].id, 1), (text.id, -1), (reply.id, 1)):
        answer = rate(box, response_id, rating)
        assert answer.status_code == 200, answer.text
        assert answer.json()["served_model"] == f"{DEFAULT_MODEL}@1" and answer.json()["rating"] == rating
    assert counts(box)[1] == {"up": before[0]["up"] + 3, "down": before[0]["down"] + 1}
    assert (metric(box, "up"), metric(box, "down")) == (before[1] + 3, before[2] + 1)
    changed = rate(box, text.id, 1)  # rating again replaces the rating
    assert changed.status_code == 200
    assert counts(box)[1] == {"up": before[0]["up"] + 4, "down": before[0]["down"]}


def test_someone_elses_response_is_not_found_and_an_admin_may_rate_any(box: Running) -> None:
    assert box.process is not None
    alice, bob = (new_key(box.process.data_dir, role="user") for _ in range(2))
    mine = box.client(alice).chat.completions.create(model=DEFAULT_MODEL, messages=HI, max_tokens=2)  # type: ignore[arg-type]
    refused = rate(box, mine.id, 1, key=bob)
    assert refused.status_code == 404
    assert refused.json()["error"]["param"] == "response_id"
    unknown = rate(box, "chatcmpl-doesnotexist", 1, key=bob)  # the same answer as for an id never given out
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == refused.json()["error"]["code"]
    assert rate(box, mine.id, -1, key=alice).status_code == 200
    assert rate(box, mine.id, 1).status_code == 200  # the admin key holds privacy:admin
    assert httpx.post(box.url + "/api/feedback", json={"response_id": mine.id, "rating": 1}).status_code == 401


@pytest.mark.parametrize("body", [{"rating": 5}, {"rating": 0}, {"rating": "up"}])
def test_a_bad_rating_is_a_400_in_the_openai_shape(box: Running, body: dict[str, Any]) -> None:
    answer = box.client().chat.completions.create(model=DEFAULT_MODEL, messages=HI, max_tokens=2)  # type: ignore[arg-type]
    refused = rate(box, answer.id, body["rating"])
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == "rating"
    assert "rating" in error["message"]


def test_outside_the_window_a_rating_is_refused_with_a_clear_message(start_server: Callable[..., Running]) -> None:
    closed = start_server({"APPLIANCE_ROLLOUT__FEEDBACK_WINDOW_SECONDS": "0", "APPLIANCE_CACHE__ENABLED": "false"})
    answer = closed.client().chat.completions.create(model=DEFAULT_MODEL, messages=HI, max_tokens=2)  # type: ignore[arg-type]
    refused = rate(closed, answer.id, 1)
    assert refused.status_code == 410
    error = refused.json()["error"]
    assert error["code"] == "feedback_window_closed"
    assert "can no longer be rated" in error["message"] and "rollout.feedback_window_seconds" in error["message"]


def test_the_comment_passes_the_privacy_policy_and_erasure_removes_it(box: Running) -> None:
    assert box.process is not None
    email = "quokka.canary.9182@example.org"
    answer = box.client().chat.completions.create(model=DEFAULT_MODEL, messages=HI, max_tokens=2)  # type: ignore[arg-type]
    blocked = rate(box, answer.id, -1, comment=f"wrong; write to {email}")  # the shipped policy blocks emails
    assert blocked.status_code == 400 and blocked.json()["error"]["param"] == "comment"
    assert email not in blocked.text
    use_policy(box, PSEUDONYMS)
    try:
        rated = rate(box, answer.id, -1, comment=f"wrong; write to {email}")
    finally:
        use_policy(box, SHIPPED)
    assert rated.status_code == 200, rated.text
    stored = rated.json()["comment"]
    assert stored.startswith("wrong; write to") and email not in stored  # the conversations surface rewrote it
    database = box.process.data_dir / "appliance.db"

    def kept() -> tuple[str, int]:
        conn = sqlite3.connect(database)
        try:
            row = conn.execute("SELECT comment, rating FROM feedback WHERE response_id = ?", (answer.id,)).fetchone()
        finally:
            conn.close()
        return str(row[0]), int(row[1])

    assert kept() == (stored, -1)
    erased = httpx.post(box.url + "/api/privacy/erasures", headers=box.headers, json={"subject": email})
    assert erased.status_code == 200 and erased.json()["deleted"]["conversations"] >= 1
    assert kept() == ("", -1)  # the comment is gone; the bare rating still counts for its version


def test_a_role_without_chat_use_cannot_rate(box: Running) -> None:
    assert box.process is not None
    answer = box.client().chat.completions.create(model=DEFAULT_MODEL, messages=HI, max_tokens=2)  # type: ignore[arg-type]
    auditor = new_key(box.process.data_dir, role="auditor")
    refused = rate(box, answer.id, 1, key=auditor)
    assert refused.status_code == 403 and "chat:use" in refused.json()["error"]["message"]
