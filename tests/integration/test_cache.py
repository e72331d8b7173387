"""The response cache through the real server, the real model and the openai SDK: hits and misses with
`x-cache`, streamed replays in the worker's chunk shape, partitions per tenant, what is not cached, and clearing
from the CLI and the API while the server runs."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import Running, new_key
from tests.server import DEFAULT_MODEL, appliance


@pytest.fixture(scope="module")
def cache_server(start_server: Callable[..., Running]) -> Running:
    return start_server()


def question() -> list[dict[str, str]]:
    """A prompt no other test asked (the server is shared by this module's tests)."""
    return [{"role": "user", "content": f"Name a colour. ({uuid.uuid4().hex[:8]})"}]


def ask(client: openai.OpenAI, messages: list[dict[str, str]], **kw: Any) -> tuple[str, Any]:
    raw = client.chat.completions.with_raw_response.create(model=DEFAULT_MODEL, messages=messages,  # type: ignore[arg-type]
                                                            max_tokens=8, **kw)
    return raw.headers.get("x-cache", ""), raw.parse()


def test_identical_deterministic_request_is_a_hit_with_the_same_answer(cache_server: Running) -> None:
    client, messages = cache_server.client(), question()
    first_state, first = ask(client, messages, temperature=0)
    second_state, second = ask(client, messages, temperature=0, user="someone-else-in-my-tenant")
    assert (first_state, second_state) == ("miss", "hit")
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.choices[0].finish_reason == first.choices[0].finish_reason
    assert second.id != first.id
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert second.usage.completion_tokens == first.usage.completion_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens


def stream_chunks(client: openai.OpenAI, messages: list[dict[str, str]]) -> tuple[str, list[dict[str, Any]]]:
    raw = client.chat.completions.with_raw_response.create(
        model=DEFAULT_MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True})
    with raw.parse() as stream:
        return raw.headers.get("x-cache", ""), [chunk.model_dump(exclude_unset=True) for chunk in stream]


def shape(obj: Any) -> Any:
    """Keys and value types, recursively, as a client's parser sees them; a delta's content and whether the finish
    reason rides on the last text chunk or on one of its own are the worker's choice, both as OpenAI streams."""
    if isinstance(obj, dict):
        return {k: "delta" if k == "delta" else "finish" if k == "finish_reason" else shape(v)
                for k, v in obj.items() if k != "prompt_tokens_details"}
    if isinstance(obj, list):
        return [shape(v) for v in obj[:1]]
    return type(obj).__name__


def test_streamed_hit_has_the_chunk_shape_of_a_streamed_miss(cache_server: Running) -> None:
    client, messages = cache_server.client(), question()
    miss_state, miss = stream_chunks(client, messages)
    hit_state, hit = stream_chunks(client, messages)
    assert (miss_state, hit_state) == ("miss", "hit")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in miss if c["choices"])
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in hit if c["choices"]) == text
    assert shape(hit[0]) == shape(miss[0]) and shape(hit[-1]) == shape(miss[-1])  # first chunk, usage chunk
    assert {str(shape(c)) for c in hit[1:-1]} == {str(shape(c)) for c in miss[1:-1]}
    assert hit[0]["choices"][0]["delta"]["role"] == "assistant"
    finish = [c["choices"][0]["finish_reason"] for c in miss if c["choices"]][-1]
    assert [c["choices"][0]["finish_reason"] for c in hit if c["choices"]][-1] == finish
    assert hit[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == miss[-1]["usage"]["prompt_tokens"]
    # a whole request is answered from what a stream stored, and the other way round
    assert ask(client, messages, temperature=0)[0] == "hit"


def test_text_completions_are_cached_too(cache_server: Running) -> None:
    client, prompt = cache_server.client(), f"The colour of the sky is ({uuid.uuid4().hex[:8]})"
    raws = [client.completions.with_raw_response.create(model=DEFAULT_MODEL, prompt=prompt, max_tokens=6,
                                                        temperature=0) for _ in range(2)]
    assert [r.headers["x-cache"] for r in raws] == ["miss", "hit"]
    first, second = (r.parse() for r in raws)
    assert second.choices[0].text == first.choices[0].text and second.object == first.object == "text_completion"


def test_another_users_identical_request_is_a_miss(cache_server: Running) -> None:
    assert cache_server.process is not None
    other = cache_server.client(new_key(cache_server.process.data_dir, role="user"))
    messages = question()
    assert ask(cache_server.client(), messages, temperature=0)[0] == "miss"
    assert ask(other, messages, temperature=0)[0] == "miss"
    assert ask(other, messages, temperature=0)[0] == "hit"


def test_non_deterministic_requests_are_not_cached_unless_opted_in(cache_server: Running) -> None:
    client, messages = cache_server.client(), question()
    assert [ask(client, messages, temperature=0.8)[0] for _ in range(2)] == ["miss", "miss"]
    opted = [ask(client, messages, temperature=0.8, extra_body={"cache": "store"})[0] for _ in range(2)]
    assert opted == ["miss", "hit"]
    seeded = [ask(client, messages, temperature=0.8, seed=42)[0] for _ in range(2)]
    assert seeded == ["miss", "hit"]


def test_no_store_is_honoured_in_the_body_and_the_headers(cache_server: Running) -> None:
    client = cache_server.client()
    for kw in ({"extra_body": {"cache": "no-store"}}, {"extra_headers": {"x-cache": "no-store"}},
               {"extra_headers": {"Cache-Control": "no-store"}}):
        messages = question()
        assert [ask(client, messages, temperature=0, **kw)[0] for _ in range(2)] == ["miss", "miss"]
        assert ask(client, messages, temperature=0)[0] == "miss"  # nothing was stored either


def test_bad_cache_directive_is_a_400_naming_it(cache_server: Running) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(cache_server.client(), question(), temperature=0, extra_body={"cache": "sometimes"})
    assert caught.value.body["param"] == "cache"  # type: ignore[index]


def test_clear_from_the_cli_while_the_server_runs(cache_server: Running) -> None:
    assert cache_server.process is not None
    data_dir, client = cache_server.process.data_dir, cache_server.client()
    other_key = new_key(data_dir, role="user")
    other = cache_server.client(other_key)
    mine, theirs = question(), question()
    ask(client, mine, temperature=0)
    ask(other, theirs, temperature=0)
    assert ask(client, mine, temperature=0)[0] == "hit" and ask(other, theirs, temperature=0)[0] == "hit"
    stats = appliance("cache", "stats", data_dir=data_dir).stdout
    partition = next(line.split("\t")[0] for line in stats.splitlines() if line.startswith(f"key:{other_key[4:12]}"))
    out = appliance("cache", "clear", "--partition", partition, data_dir=data_dir).stdout
    assert out.startswith("cleared 1 ")
    assert ask(other, theirs, temperature=0)[0] == "miss"
    assert ask(client, mine, temperature=0)[0] == "hit"  # another partition is untouched
    appliance("cache", "clear", data_dir=data_dir)
    assert ask(client, mine, temperature=0)[0] == "miss"
    export = appliance("audit", "export", "--action", "cache.clear", data_dir=data_dir).stdout
    assert export.count('"cache.clear"') == 2


def test_admin_api_reports_and_clears_and_metrics_count(cache_server: Running) -> None:
    client, messages = cache_server.client(), question()
    ask(client, messages, temperature=0)
    ask(client, messages, temperature=0)
    with httpx.Client(base_url=cache_server.url, headers=cache_server.headers, timeout=30) as http:
        report = http.get("/api/cache").json()
        assert report["entries"] >= 1 and report["bytes"] > 0 and sum(report["partitions"].values()) >= 1
        metrics = http.get("/metrics").text
        assert 'appliance_cache_hits_total{cache="exact"}' in metrics
        assert 'appliance_cache_hit_seconds_bucket{cache="exact",le="0.001"}' in metrics
        assert 'appliance_cache_bytes{cache="exact"}' in metrics
        bad = http.delete("/api/cache", params={"partition": "a/b"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "partition"
        cleared = http.delete("/api/cache").json()
        assert cleared["cleared"] >= 1 and cleared["partition"] is None
        assert http.get("/api/cache").json()["entries"] == 0
        assert cache_server.process is not None
        user = new_key(cache_server.process.data_dir, role="user")
        refused = http.get("/api/cache", headers={"Authorization": f"Bearer {user}"})
        assert refused.status_code == 403
    assert ask(client, messages, temperature=0)[0] == "miss"


def test_semantic_cache_serves_a_paraphrase_when_enabled(start_server: Callable[..., Running]) -> None:
    server = start_server({"APPLIANCE_CACHE__SEMANTIC": "true", "APPLIANCE_CACHE__SEMANTIC_THRESHOLD": "0.9"})
    client = server.client()
    asked = [{"role": "user", "content": "What is the capital of France?"}]
    assert ask(client, asked, temperature=0)[0] == "miss"
    state, answer = ask(client, [{"role": "user", "content": "Tell me the capital of France."}], temperature=0)
    assert state == "hit"
    assert answer.choices[0].message.content == ask(client, asked, temperature=0)[1].choices[0].message.content
    assert ask(client, [{"role": "user", "content": "What is the capital of Peru?"}], temperature=0)[0] == "miss"
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as http:
        assert 'appliance_cache_hits_total{cache="semantic"} 1.0' in http.get("/metrics").text


def test_models_rm_drops_that_models_cached_answers(cache_server: Running) -> None:
    """Last in this module: it removes the model the module's server answers with."""
    assert cache_server.process is not None
    data_dir = cache_server.process.data_dir
    ask(cache_server.client(), question(), temperature=0)
    assert not appliance("cache", "stats", data_dir=data_dir).stdout.startswith("0 entries")
    out = appliance("models", "rm", DEFAULT_MODEL, data_dir=data_dir).stdout
    assert "dropped" in out and "cached responses" in out
    assert appliance("cache", "stats", data_dir=data_dir).stdout.startswith("0 entries")
