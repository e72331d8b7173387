"""Which version answered: every completion (chat and legacy, whole and streamed), every Responses API reply and
every cached replay carries `x-served-model: NAME@N`, and the usage history keeps it. The real server, the real
default model and the openai SDK."""

from __future__ import annotations

import sqlite3
import uuid

import openai
import pytest

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL

SERVED = f"{DEFAULT_MODEL}@1"  # a fresh box serves the default model's first version


def question() -> list[dict[str, str]]:
    """A prompt no other test asks, so that the first answer is not a cached one."""
    return [{"role": "user", "content": f"Name a colour. ({uuid.uuid4().hex[:8]})"}]


def test_whole_and_streamed_chat_and_text_completions_name_the_version(client: openai.OpenAI) -> None:
    chat = client.chat.completions.with_raw_response.create(model=DEFAULT_MODEL, messages=question(),  # type: ignore[arg-type]
                                                            max_tokens=3)
    assert chat.headers["x-served-model"] == SERVED
    assert chat.parse().id.startswith("chatcmpl-")
    with client.chat.completions.with_streaming_response.create(
            model=DEFAULT_MODEL, messages=question(), max_tokens=3, stream=True) as streamed:  # type: ignore[arg-type]
        assert streamed.headers["x-served-model"] == SERVED
        assert "".join(streamed.iter_text())  # the body streams as usual
    text = client.completions.with_raw_response.create(model=DEFAULT_MODEL, prompt="One, two,", max_tokens=2,
                                                       temperature=0.9)
    assert text.headers["x-served-model"] == SERVED
    with client.completions.with_streaming_response.create(model=DEFAULT_MODEL, prompt="One, two,", max_tokens=2,
                                                           temperature=0.9, stream=True) as streamed:
        assert streamed.headers["x-served-model"] == SERVED


def test_responses_api_replies_name_the_version(client: openai.OpenAI) -> None:
    whole = client.responses.with_raw_response.create(model=DEFAULT_MODEL, input="Say hi", max_output_tokens=3,
                                                      store=False)
    assert whole.headers["x-served-model"] == SERVED
    with client.responses.with_streaming_response.create(model=DEFAULT_MODEL, input="Say hi", max_output_tokens=3,
                                                         store=False, stream=True) as streamed:
        assert streamed.headers["x-served-model"] == SERVED


def test_a_cached_answer_names_the_version_that_produced_it(client: openai.OpenAI) -> None:
    messages = question()
    raws = [client.chat.completions.with_raw_response.create(model=DEFAULT_MODEL, messages=messages,  # type: ignore[arg-type]
                                                             max_tokens=3, temperature=0) for _ in range(2)]
    assert [r.headers["x-cache"] for r in raws] == ["miss", "hit"]
    assert [r.headers["x-served-model"] for r in raws] == [SERVED, SERVED]
    with client.chat.completions.with_streaming_response.create(
            model=DEFAULT_MODEL, messages=messages, max_tokens=3, temperature=0, stream=True) as replay:  # type: ignore[arg-type]
        assert replay.headers["x-cache"] == "hit" and replay.headers["x-served-model"] == SERVED


def test_the_usage_history_keeps_the_version(server: Running, client: openai.OpenAI) -> None:
    if server.process is None:
        pytest.skip("reads the server's database")
    client.chat.completions.create(model=DEFAULT_MODEL, messages=question(), max_tokens=2)  # type: ignore[arg-type]
    with sqlite3.connect(server.process.data_dir / "appliance.db") as conn:
        served = {row[0] for row in conn.execute("SELECT served FROM usage_hourly WHERE model = ?", (DEFAULT_MODEL,))}
    assert SERVED in served
