"""logprobs through the real server and model, driven by the official openai SDK: the numbers are the model's
(a distribution: the alternatives' probabilities sum to at most 1; at temperature 0 the chosen token is the most
likely), one entry per generated token, the same streamed as whole, and bad values are 400s naming the parameter."""

from __future__ import annotations

import itertools
import math
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL, NO_EOS

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three rivers of Europe."}]
TOKENS = 8


def test_greedy_chat_logprobs_are_the_models_distribution(server: Running) -> None:
    reply = server.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=QUESTION, max_tokens=TOKENS, temperature=0, logprobs=True, top_logprobs=5)
    choice = reply.choices[0]  # no logit_bias here: greedy must pick the arg-max of the very distribution shown
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert reply.usage is not None and len(content) == reply.usage.completion_tokens > 0
    for entry in content:
        assert len(entry.top_logprobs) == 5
        assert sum(math.exp(top.logprob) for top in entry.top_logprobs) <= 1.0 + 1e-6
        assert all(a.logprob >= b.logprob for a, b in itertools.pairwise(entry.top_logprobs))
        best = entry.top_logprobs[0]
        assert (entry.token, entry.logprob) == (best.token, best.logprob)  # greedy took the most likely token
        assert entry.logprob < 0 and entry.bytes is not None
    assert b"".join(bytes(e.bytes or []) for e in content).decode() == choice.message.content


def test_without_logprobs_there_are_none(server: Running) -> None:
    reply = server.client().chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=2,
                                                    temperature=0)
    assert reply.choices[0].logprobs is None


def streamed_entries(server: Running, **kw: Any) -> tuple[str, list[Any]]:
    stream = server.client().chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, stream=True, **kw)
    text, entries = "", []
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                entries += choice.logprobs.content or []
    return text, entries


def test_streamed_logprobs_equal_the_whole_ones_for_the_same_seed(server: Running) -> None:
    sampling: dict[str, Any] = {"max_tokens": TOKENS, "temperature": 0.9, "seed": 4242, "logit_bias": NO_EOS,
                                "logprobs": True, "top_logprobs": 3}
    whole = server.client().chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, **sampling)
    text, entries = streamed_entries(server, **sampling)
    content = whole.choices[0].logprobs.content if whole.choices[0].logprobs else None
    assert content is not None and text == whole.choices[0].message.content
    assert [e.token for e in entries] == [e.token for e in content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content], abs=1e-3)
    assert [[t.token for t in e.top_logprobs] for e in entries] == [[t.token for t in e.top_logprobs] for e in content]


def test_legacy_completion_logprobs(server: Running) -> None:
    reply = server.client().completions.create(model=DEFAULT_MODEL, prompt="The rivers of Europe include",
                                               max_tokens=TOKENS, temperature=0, logprobs=3)
    choice = reply.choices[0]
    assert choice.logprobs is not None and reply.usage is not None
    tokens, lps = choice.logprobs.tokens or [], choice.logprobs.token_logprobs or []
    tops, offsets = choice.logprobs.top_logprobs or [], choice.logprobs.text_offset or []
    assert len(tokens) == len(lps) == len(tops) == len(offsets) == reply.usage.completion_tokens > 0
    assert "".join(tokens) == choice.text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    for token, lp, top in zip(tokens, lps, tops, strict=True):
        assert 3 <= len(top) <= 4 and top[token] == lp == max(top.values())
        assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-6


@pytest.mark.parametrize(("kind", "fields", "param"), [
    ("chat", {"top_logprobs": 3}, "top_logprobs"),
    ("chat", {"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("completion", {"logprobs": 6}, "logprobs"),
])
def test_bad_logprobs_are_400_naming_the_parameter(server: Running, kind: str, fields: dict[str, Any],
                                                   param: str) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        if kind == "chat":
            client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=2, **fields)
        else:
            client.completions.create(model=DEFAULT_MODEL, prompt="Hi", max_tokens=2, **fields)
    error = caught.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert error["param"] == param and param in error["message"]
