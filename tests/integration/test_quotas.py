"""Token-aware quotas through the real server and model, driven by the openai SDK: rpm, tpm, the daily budget,
x-ratelimit-* headers, settlement of streams, and usage kept across a restart."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.conftest import OPEN_CLIENTS, Running
from tests.server import DEFAULT_MODEL, ServerProcess, appliance

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end-of-generation tokens, banned: a long stream to cancel


@pytest.fixture(scope="module")
def quota_server(start_server: Callable[..., Running]) -> Running:
    return start_server()


def limited_key(running: Running, *limits: str) -> str:
    assert running.process is not None, "needs a local server to create keys on"
    result = appliance("keys", "create", "--name", "metered", "--role", "user", *limits,
                       data_dir=running.process.data_dir)
    return result.stdout.strip().splitlines()[-1]


def client_for(running: Running | ServerProcess, key: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=running.url + "/v1", api_key=key, max_retries=0)
    OPEN_CLIENTS.append(client)  # closed after the test
    return client


def ask(client: openai.OpenAI, max_tokens: int = 1) -> tuple[Mapping[str, str], int]:
    """One small chat completion, generated (not from the response cache): its response headers and its total
    tokens."""
    raw = client.chat.completions.with_raw_response.create(  # no-store: a cached answer would spend no tokens
        model=DEFAULT_MODEL, messages=QUESTION, max_tokens=max_tokens, temperature=0, extra_body={"cache": "no-store"})
    usage = raw.parse().usage
    assert usage is not None
    return raw.headers, usage.total_tokens


def metric(running: Running, name: str) -> float:
    text = httpx.get(running.url + "/metrics", headers=running.headers).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def tokens_today(running: Running, key: str) -> int:
    """What the server has recorded for the key today (read straight from its database)."""
    assert running.process is not None
    with contextlib.closing(sqlite3.connect(running.process.data_dir / "appliance.db")) as conn:
        row = conn.execute("SELECT day_tokens FROM quota_usage WHERE subject = ?", (f"key:{key[4:12]}",)).fetchone()
    return int(row[0]) if row else 0


def test_rpm_lets_two_requests_through_and_refuses_the_third(quota_server: Running) -> None:
    client = client_for(quota_server, limited_key(quota_server, "--rpm", "2"))
    ask(client)
    ask(client)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client)
    error = caught.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert "rpm" in error.message and "retry in" in error.message
    assert 1 <= int(error.response.headers["retry-after"]) <= 30
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_tpm_refuses_an_oversized_request_before_it_reaches_the_model(quota_server: Running) -> None:
    client = client_for(quota_server, limited_key(quota_server, "--tpm", "100"))
    prompt_tokens = metric(quota_server, "appliance_prompt_tokens_total")
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, max_tokens=200)
    assert "tpm" in caught.value.message and "lower max_tokens" in caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in caught.value.response.headers
    assert metric(quota_server, "appliance_prompt_tokens_total") == prompt_tokens, "the model saw the request"
    headers, _ = ask(client, max_tokens=2)  # a request that fits still goes through
    assert headers["x-ratelimit-limit-tokens"] == "100"


def test_ratelimit_headers_are_present_and_decrease(quota_server: Running) -> None:
    key = limited_key(quota_server, "--rpm", "10", "--tpm", "300", "--daily-tokens", "100000")
    client = client_for(quota_server, key)
    first, used_first = ask(client)
    second, used_second = ask(client)
    assert first["x-ratelimit-limit-requests"] == "10" and first["x-ratelimit-limit-tokens"] == "300"
    assert (first["x-ratelimit-remaining-requests"], second["x-ratelimit-remaining-requests"]) == ("9", "8")
    assert int(second["x-ratelimit-remaining-tokens"]) < int(first["x-ratelimit-remaining-tokens"]) < 300
    assert first["x-ratelimit-reset-requests"].endswith("s") and first["x-ratelimit-reset-tokens"].endswith("s")
    day_first = int(first["x-ratelimit-remaining-tokens-day"])
    assert day_first == 100_000 - used_first  # settled with the real usage
    assert int(second["x-ratelimit-remaining-tokens-day"]) == day_first - used_second

    body = {"model": DEFAULT_MODEL, "messages": QUESTION, "max_tokens": 2, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", quota_server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["x-ratelimit-remaining-requests"] == "7"
        assert int(stream.headers["x-ratelimit-remaining-tokens-day"]) < int(second["x-ratelimit-remaining-tokens-day"])
        events = [line for line in stream.iter_lines() if line.startswith("data: {")]
    streamed = openai.types.chat.ChatCompletionChunk.model_validate_json(events[-1][6:]).usage
    assert streamed is not None
    third, used_third = ask(client)
    assert int(third["x-ratelimit-remaining-tokens-day"]) == (
        int(second["x-ratelimit-remaining-tokens-day"]) - streamed.total_tokens - used_third)


def test_a_cancelled_stream_is_charged_what_it_sent_not_its_reservation(quota_server: Running) -> None:
    key = limited_key(quota_server, "--daily-tokens", "100000")
    stream = client_for(quota_server, key).chat.completions.create(
        model=DEFAULT_MODEL, messages=QUESTION, max_tokens=4000, temperature=0, stream=True, logit_bias=NO_EOS)
    for received, _ in enumerate(stream):
        if received == 5:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while tokens_today(quota_server, key) >= 4000 and time.monotonic() < deadline:
        time.sleep(0.1)
    charged = tokens_today(quota_server, key)
    assert 5 <= charged < 1000, charged  # prompt estimate + chunks relayed, not the 4000 reserved


def test_a_request_the_model_refuses_gives_its_reservation_back(quota_server: Running) -> None:
    client = client_for(quota_server, limited_key(quota_server, "--rpm", "1"))
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=DEFAULT_MODEL, prompt="hello " * 5000, max_tokens=4000)
    assert caught.value.code == "context_length_exceeded"
    ask(client)  # the refused request did not spend the one request a minute


def test_an_unlimited_admin_key_is_never_limited_and_gets_no_ratelimit_headers(quota_server: Running) -> None:
    client = quota_server.client()
    for _ in range(4):
        headers, _ = ask(client)
        assert not [name for name in headers if name.startswith("x-ratelimit")]


def test_limits_and_usage_survive_a_restart(start_server: Callable[..., Running]) -> None:
    running = start_server()
    assert running.process is not None
    budget_key = limited_key(running, "--daily-tokens", "100000")
    rpm_key = limited_key(running, "--rpm", "1")
    day = datetime.now(UTC).date()
    before, _ = ask(client_for(running, budget_key))
    ask(client_for(running, rpm_key))
    running.process.stop()

    restarted = ServerProcess(running.process.data_dir)
    try:
        restarted.start()
        after, used = ask(client_for(restarted, budget_key))
        if datetime.now(UTC).date() == day:  # the budget renews at midnight UTC
            remaining_before = int(before["x-ratelimit-remaining-tokens-day"])
            assert int(after["x-ratelimit-remaining-tokens-day"]) == remaining_before - used
        with pytest.raises(openai.RateLimitError) as caught:
            ask(client_for(restarted, rpm_key))
        assert "rpm" in caught.value.message
        assert 1 <= int(caught.value.response.headers["retry-after"]) <= 60
    finally:
        restarted.stop()


def test_a_users_limits_bind_its_session_and_the_keys_it_owns_together(quota_server: Running) -> None:
    """A user with --rpm 1: the second chat of its web session is refused, and a key it made for itself spends the
    same budget; an admin's PATCH {"rpm": null} lifts it, audited as user.update."""
    assert quota_server.process is not None
    appliance("users", "create", "metered-user", "--role", "user", "--rpm", "1", "--password-stdin",
              input="violet-Tangerine-87-harbour\n", data_dir=quota_server.process.data_dir)
    login = httpx.post(quota_server.url + "/api/auth/login",
                       json={"username": "metered-user", "password": "violet-Tangerine-87-harbour"})
    assert login.status_code == 200, login.text
    session = {"Cookie": f"appliance_session={login.cookies['appliance_session']}",
               "X-CSRF-Token": login.json()["csrf_token"]}
    body = {"model": DEFAULT_MODEL, "messages": QUESTION, "max_tokens": 1, "temperature": 0}

    def chat(headers: dict[str, str]) -> httpx.Response:
        return httpx.post(quota_server.url + "/v1/chat/completions", json=body, headers=headers, timeout=120)

    first = chat(session)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    second = chat(session)
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
    assert "your user's limit" in second.json()["error"]["message"] and int(second.headers["retry-after"]) >= 1

    created = httpx.post(quota_server.url + "/api/me/keys", headers=session, json={"name": "laptop"})
    assert created.status_code == 201, created.text
    owned = {"Authorization": f"Bearer {created.json()['key']}"}
    shared = chat(owned)
    assert shared.status_code == 429 and "your user's limit" in shared.json()["error"]["message"]

    lifted = httpx.patch(quota_server.url + "/api/users/metered-user", headers=quota_server.headers,
                         json={"rpm": None})
    assert lifted.status_code == 200 and lifted.json()["rpm"] is None, lifted.text
    assert chat(owned).status_code == 200 and chat(session).status_code == 200
    audit = httpx.get(quota_server.url + "/api/audit", headers=quota_server.headers,
                      params={"action": "user.update"}).json()["data"]
    assert any(r["details"].get("name") == "metered-user" and r["details"]["rpm"] is None for r in audit)
