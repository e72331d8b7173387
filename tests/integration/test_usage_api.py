"""Usage history against the real server and model: completions made with the openai SDK (whole and streamed, by
two keys) appear in `GET /api/usage` with the token counts of their own `usage`, per day and per hour, as JSON and
as CSV; only roles with usage:read may read it."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL


@pytest.fixture(scope="module")
def box(start_server: Callable[..., Running]) -> Running:
    return start_server()  # its own usage history, untouched by other tests


def new_key(box: Running, role: str, name: str) -> tuple[str, str]:
    created = httpx.post(box.url + "/api/keys", json={"name": name, "role": role}, headers=box.headers)
    assert created.status_code == 201, created.text
    return created.json()["id"], created.json()["key"]


def usage(box: Running, **params: str) -> httpx.Response:
    return httpx.get(box.url + "/api/usage", params=params, headers=box.headers)


def test_completions_appear_with_their_token_counts(box: Running) -> None:
    ci_id, ci_key = new_key(box, "user", "=ci-runner")
    admin = box.client()
    expected: dict[str, list[int]] = {}  # key id -> [requests, prompt tokens, completion tokens]

    def count(key_id: str, prompt: int, completion: int) -> None:
        seen = expected.setdefault(key_id, [0, 0, 0])
        seen[0], seen[1], seen[2] = seen[0] + 1, seen[1] + prompt, seen[2] + completion

    admin_id = box.key[4:12]  # apl_ + the key's id
    for text in ("Say hi", "Name a colour"):
        reply = admin.chat.completions.create(model=DEFAULT_MODEL, max_tokens=6, temperature=0,
                                              messages=[{"role": "user", "content": text}])
        assert reply.usage is not None
        count(admin_id, reply.usage.prompt_tokens, reply.usage.completion_tokens)
    chunks = list(box.client(ci_key).chat.completions.create(
        model=DEFAULT_MODEL, max_tokens=5, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count to three"}]))
    streamed = chunks[-1].usage
    assert streamed is not None
    count(ci_id, streamed.prompt_tokens, streamed.completion_tokens)
    plain = box.client(ci_key).completions.create(model=DEFAULT_MODEL, prompt="Once upon", max_tokens=4)
    assert plain.usage is not None
    count(ci_id, plain.usage.prompt_tokens, plain.usage.completion_tokens)

    daily = usage(box)
    assert daily.status_code == 200, daily.text
    body = daily.json()
    assert body["object"] == "list" and body["bucket"] == "day"
    today = datetime.now(UTC).date().isoformat()
    rows: dict[str, dict[str, Any]] = {r["key_id"]: r for r in body["data"]}
    assert set(rows) == set(expected)
    for key_id, (requests, prompt, completion) in expected.items():
        row = rows[key_id]
        assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (requests, prompt, completion)
        assert row["total_tokens"] == prompt + completion and row["bucket"] == today
        assert row["model"] == DEFAULT_MODEL and row["user"] == "" and row["user_id"] == ""
    assert rows[ci_id]["key_name"] == "=ci-runner" and rows[admin_id]["key_name"] == "test"

    hourly = usage(box, bucket="hour", since=(datetime.now(UTC) - timedelta(hours=2)).isoformat()).json()
    assert hourly["bucket"] == "hour" and all(r["bucket"].endswith(":00:00Z") for r in hourly["data"])
    assert sum(r["requests"] for r in hourly["data"]) == sum(e[0] for e in expected.values())
    assert usage(box, until="2000-01-01").json()["data"] == []

    exported = usage(box, format="csv")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    assert exported.headers["content-disposition"] == 'attachment; filename="usage.csv"'
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert list(table[0]) == ["bucket", "user", "user_id", "key_id", "key_name", "model", "requests",
                              "prompt_tokens", "completion_tokens", "total_tokens"]
    by_key = {r["key_id"]: r for r in table}
    assert by_key[ci_id]["key_name"] == "'=ci-runner"  # a spreadsheet shows it, never runs it
    assert int(by_key[ci_id]["total_tokens"]) == expected[ci_id][1] + expected[ci_id][2]


def test_bad_queries_and_who_may_read(box: Running) -> None:
    bad = usage(box, since="last tuesday")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
    assert usage(box, bucket="week").status_code == 400
    for role, status in (("auditor", 200), ("operator", 200), ("user", 403)):
        _, key = new_key(box, role, f"{role}-reader")
        response = httpx.get(box.url + "/api/usage", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == status, (role, response.text)
