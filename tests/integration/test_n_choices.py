"""n > 1 through the real server and model, driven by the official openai SDK: n distinct choices that a seed
reproduces, each with its own finish reason, whole and streamed; usage counts the prompt once and every choice's
tokens; more choices than the worker has sequences still come back; quotas charge n completions; the response
cache never answers n choices with one."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.conftest import OPEN_CLIENTS, Running
from tests.server import DEFAULT_MODEL, NO_EOS, appliance

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about your favourite animal."}]
TOKENS = 8
SAMPLED: dict[str, Any] = {"max_tokens": TOKENS, "temperature": 1.0, "seed": 11, "logit_bias": NO_EOS}


def chat(server: Running, n: int, **kw: Any) -> Any:
    return server.client().chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, n=n, **kw)


def test_n_seeded_choices_differ_and_come_back_the_same(server: Running) -> None:
    first = chat(server, 3, **SAMPLED)
    again = chat(server, 3, **SAMPLED)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) == 3, texts
    assert [c.message.content for c in again.choices] == texts
    assert all(c.finish_reason == "length" for c in first.choices)
    single = chat(server, 1, **SAMPLED)
    assert single.choices[0].message.content == texts[0]  # choice 0 is the request's own seed
    assert first.usage is not None and single.usage is not None
    assert first.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt once
    assert first.usage.completion_tokens == 3 * TOKENS
    assert first.usage.total_tokens == first.usage.prompt_tokens + 3 * TOKENS


def test_greedy_choices_from_a_copied_prompt_equal_the_single_answer(server: Running) -> None:
    """At temperature 0 every choice must be the single answer: the followers decode from the leader's copied KV
    cells, so any fault in the copy shows as a different text."""
    greedy: dict[str, Any] = {"max_tokens": 12, "temperature": 0, "logit_bias": NO_EOS,
                              "extra_body": {"cache": "no-store"}}
    single = chat(server, 1, **greedy).choices[0].message.content
    assert [c.message.content for c in chat(server, 3, **greedy).choices] == [single] * 3


def test_streamed_choices_carry_their_index_and_equal_the_whole_ones(server: Running) -> None:
    whole = chat(server, 3, **SAMPLED)
    stream = chat(server, 3, stream=True, stream_options={"include_usage": True}, **SAMPLED)
    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, str] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert usage is not None and usage.completion_tokens == 3 * TOKENS


def test_more_choices_than_the_worker_has_sequences(server: Running) -> None:
    """The worker decodes `llamacpp.parallel` (4) sequences at once; the other choices wait for a free one."""
    reply = server.client().completions.create(model=DEFAULT_MODEL, prompt="My favourite animal is", n=6,
                                               max_tokens=4, temperature=1.0, seed=5, logit_bias=NO_EOS)
    assert sorted(c.index for c in reply.choices) == list(range(6))
    assert len({c.text for c in reply.choices}) > 1
    assert reply.usage is not None and reply.usage.completion_tokens == 6 * 4


@pytest.mark.parametrize("n", [0, 129])
def test_n_out_of_range_is_400(server: Running, n: int) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, n, max_tokens=2)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "n"


def test_the_cache_never_answers_n_choices_with_one(server: Running) -> None:
    question: list[ChatCompletionMessageParam] = [{"role": "user", "content": f"Name a fruit ({uuid.uuid4().hex[:6]})"}]
    client = server.client()

    def ask(n: int) -> tuple[str, Any]:
        raw = client.chat.completions.with_raw_response.create(model=DEFAULT_MODEL, messages=question, n=n,
                                                                max_tokens=4, temperature=0)
        return raw.headers.get("x-cache", ""), raw.parse()

    assert ask(1)[0] == "miss"
    assert ask(1)[0] == "hit"  # the single answer is cached ...
    for _ in range(2):
        header, reply = ask(2)  # ... and never serves n choices, nor is an n-choice answer stored
        assert header != "hit" and len(reply.choices) == 2


def test_quota_reserves_n_completions_and_settles_every_choice(server: Running) -> None:
    assert server.process is not None, "needs a local server to create keys on"
    key = appliance("keys", "create", "--name", "n-metered", "--role", "user", "--tpm", "200",
                    "--daily-tokens", "100000", data_dir=server.process.data_dir).stdout.strip().splitlines()[-1]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    OPEN_CLIENTS.append(client)
    with pytest.raises(openai.RateLimitError) as caught:  # 4 x 60 tokens cannot fit in 200 a minute
        client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, n=4, max_tokens=60)
    assert "tpm" in caught.value.message
    raw = client.chat.completions.with_raw_response.create(model=DEFAULT_MODEL, messages=QUESTION, n=2,
                                                           max_tokens=TOKENS, **{k: v for k, v in SAMPLED.items()
                                                                                 if k != "max_tokens"})
    usage = raw.parse().usage
    assert usage is not None and usage.completion_tokens == 2 * TOKENS
    assert int(raw.headers["x-ratelimit-remaining-tokens-day"]) == 100_000 - usage.total_tokens


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"]}}}


@pytest.mark.parametrize("stream", [False, True])
def test_each_choice_makes_its_own_tool_call(server: Running, stream: bool) -> None:
    """n choices with tools: every choice's calls are parsed on their own (whole and streamed)."""
    ask: dict[str, Any] = {"model": DEFAULT_MODEL, "n": 2, "tools": [WEATHER], "tool_choice": "required",
                           "max_tokens": 40, "temperature": 0.7, "seed": 3,
                           "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    client = server.client()
    if not stream:
        choices = client.chat.completions.create(**ask).choices
        calls = {c.index: [(t.function.name, json.loads(t.function.arguments))
                           for t in c.message.tool_calls or []] for c in choices}
        finishes = {c.index: c.finish_reason for c in choices}
    else:
        arguments: dict[tuple[int, int], str] = defaultdict(str)
        names: dict[tuple[int, int], str] = {}
        finishes = {}
        for chunk in client.chat.completions.create(**ask, stream=True):
            for choice in chunk.choices:
                for call in choice.delta.tool_calls or []:
                    if call.function and call.function.name:
                        names[choice.index, call.index] = call.function.name
                    arguments[choice.index, call.index] += (call.function.arguments or "") if call.function else ""
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
        calls = defaultdict(list)
        for (index, _), name in sorted(names.items()):
            calls[index].append((name, json.loads(arguments[index, _])))
    assert finishes == {0: "tool_calls", 1: "tool_calls"}
    for index in (0, 1):
        assert calls[index] and all(name == "get_weather" and set(args) == {"city"} for name, args in calls[index])
