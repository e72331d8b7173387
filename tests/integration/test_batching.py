"""Continuous batching through the real server: concurrent streams keep their solo text, a cancelled stream frees
its sequence at once, a long prompt is processed in slices between other streams' tokens, and response_format
constrains output with a grammar."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Running
from tests.integration.test_workers import NO_EOS, wait_until, worker_health
from tests.server import DEFAULT_MODEL

PARALLEL = 4
N_BATCH = 32
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def batched(start_server: Callable[..., Running]) -> Running:
    # one thread: these tests are about scheduling, and on a shared, loaded box two threads that must meet at
    # every barrier of llama.cpp's thread pool are many times slower than one
    return start_server({"APPLIANCE_LLAMACPP__PARALLEL": str(PARALLEL), "APPLIANCE_LLAMACPP__N_CTX": "2048",
                         "APPLIANCE_LLAMACPP__N_BATCH": str(N_BATCH), "APPLIANCE_LLAMACPP__THREADS": "1",
                         "APPLIANCE_LLAMACPP__LOOKUP": "on"})  # drafts whatever they cost on this box


def uncached(running: Running) -> openai.OpenAI:
    """A client whose requests always reach the model (the response cache would answer repeats)."""
    return running.client(default_headers={"Cache-Control": "no-store"})


def ask(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def health(running: Running) -> dict[str, int]:
    assert running.process is not None
    return worker_health(running.process.data_dir)


def test_concurrent_streams_each_get_their_solo_text(batched: Running) -> None:
    client = uncached(batched)
    prompts = ["Name three fruits.", "What is the capital of Italy?", "Write a haiku about rain.",
               "Explain gravity in one sentence."]
    params: dict[str, object] = {"model": DEFAULT_MODEL, "temperature": 0, "max_tokens": MAX_TOKENS,
                              "logit_bias": NO_EOS}
    solo = [client.chat.completions.create(messages=ask(p), **params).choices[0].message.content  # type: ignore
            for p in prompts]
    texts: dict[int, str] = {}
    start = threading.Barrier(len(prompts))
    before = health(batched)

    def stream(i: int) -> None:
        start.wait()
        parts = []
        for chunk in client.chat.completions.create(messages=ask(prompts[i]), stream=True, **params):  # type: ignore
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        texts[i] = "".join(parts)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [texts.get(i) for i in range(len(prompts))] == solo
    after = health(batched)
    tokens, steps = (after[k] - before[k] for k in ("generated_tokens", "steps"))
    assert tokens == len(prompts) * MAX_TOKENS
    # one sequence at a time would take a decoding step per token (and more for prompts)
    assert steps <= tokens * 3 // 4, f"{steps} decoding steps for {tokens} tokens: the streams were not batched"


def test_a_cancelled_stream_frees_its_sequence(batched: Running) -> None:
    before = health(batched)
    stream = uncached(batched).chat.completions.create(model=DEFAULT_MODEL, messages=ask("Tell me a long story."),
                                                      max_tokens=1500, temperature=0, stream=True,
                                                      logit_bias=NO_EOS)
    chunks = iter(stream)
    next(chunks)
    next(chunks)
    assert health(batched)["active_sequences"] == 1
    stream.close()
    wait_until(lambda: health(batched)["active_sequences"] == 0, what="the sequence freed")
    after = health(batched)
    assert after["cancelled"] - before["cancelled"] == 1
    assert after["generated_tokens"] - before["generated_tokens"] < 1500
    assert after["busy"] == 0


def test_a_long_prompt_does_not_hold_back_other_streams(batched: Running) -> None:
    client = uncached(batched)
    events: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def background() -> None:
        stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=ask("Tell me a very long story."),
                                                max_tokens=1500, temperature=0, stream=True, logit_bias=NO_EOS)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                with lock:
                    events.append("A")
            if stop.is_set():
                break
        stream.close()

    runner = threading.Thread(target=background)
    runner.start()
    try:
        wait_until(lambda: len(events) >= 2, timeout=120, what="the first stream under way")
        long_prompt = "Summarise this. " + " ".join(f"item{i} is fine;" for i in range(220))
        with lock:
            events.append("B sent")
        stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=ask(long_prompt), max_tokens=4,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        prompt_tokens = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and "B first" not in events:
                with lock:
                    events.append("B first")
            if chunk.usage:
                prompt_tokens = chunk.usage.prompt_tokens
    finally:
        stop.set()
        runner.join(120)
    between = events[events.index("B sent"):events.index("B first")].count("A")
    slices = prompt_tokens // N_BATCH
    assert slices >= 20
    # processed whole, the prompt would take one step and let through about one token of the other stream
    assert between >= slices // 2, f"{between} tokens of the other stream during {slices} prompt slices"


def test_response_format_json_schema_and_json_object(batched: Running) -> None:
    client = uncached(batched)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=ask("Invent a person."), temperature=0, max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    person = json.loads(reply.choices[0].message.content or "")
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=ask("Give me a JSON object."),
                                           temperature=0, max_tokens=60, response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    else:  # cut by max_tokens: still the start of an object
        assert (reply.choices[0].message.content or "").lstrip().startswith("{")


def test_requests_with_and_without_grammars_are_batched_together(batched: Running) -> None:
    """Tool calls (grammar-constrained) and plain chats share decoding steps, and each gets its solo answer."""
    client = uncached(batched)
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"query": {"type": "string", "maxLength": 24}}, "required": ["query"]}}}
    requests: list[dict[str, object]] = [
        {"messages": ask("Find the population of Lyon."), "tools": [tool], "tool_choice": "required"},
        {"messages": ask("Name three rivers."), "logit_bias": NO_EOS},
        {"messages": ask("Look up the height of Mont Blanc."), "tools": [tool], "tool_choice": "required"},
        {"messages": ask("What is the capital of Spain?"), "logit_bias": NO_EOS},
    ]
    params: dict[str, object] = {"model": DEFAULT_MODEL, "temperature": 0, "max_tokens": MAX_TOKENS}

    def answer(request: dict[str, object]) -> object:
        message = client.chat.completions.create(**params, **request).choices[0].message  # type: ignore[call-overload]
        return [(c.function.name, c.function.arguments) for c in message.tool_calls or []] or message.content

    solo = [answer(r) for r in requests]
    assert all(isinstance(a, list) for a in solo[::2]), "tool_choice=required always gives a call"
    together: dict[int, object] = {}
    start = threading.Barrier(len(requests))
    before = health(batched)

    def run(i: int) -> None:
        start.wait()
        together[i] = answer(requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [together.get(i) for i in range(len(requests))] == solo
    after = health(batched)
    tokens, steps = (after[k] - before[k] for k in ("generated_tokens", "steps"))
    assert steps <= tokens * 3 // 4, f"{steps} decoding steps for {tokens} tokens: the requests were not batched"


def test_a_schema_without_schema_is_400(batched: Running) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        uncached(batched).chat.completions.create(
            model=DEFAULT_MODEL, messages=ask("hi"), max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x"}})  # type: ignore[typeddict-item]
    assert caught.value.status_code == 400
    assert "schema" in caught.value.message


def test_usage_reports_the_prompt_tokens_a_slot_still_held(batched: Running) -> None:
    """A chat's next turn starts with the previous prompt: the slot that held it reuses its KV cache, and usage
    says how many prompt tokens were not computed again (OpenAI's prompt_tokens_details.cached_tokens)."""
    client = uncached(batched)
    system = {"role": "system", "content": "You answer in one short sentence about the history of clocks. " * 6}
    first = client.chat.completions.create(model=DEFAULT_MODEL, messages=[system, *ask("Who made the first?")],
                                           temperature=0, max_tokens=4)
    second = client.chat.completions.create(model=DEFAULT_MODEL, messages=[system, *ask("And the second?")],
                                            temperature=0, max_tokens=4)
    assert first.usage is not None and second.usage is not None
    assert second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    assert 60 < cached < second.usage.prompt_tokens
    assert first.usage.prompt_tokens_details is not None


def metric(running: Running, name: str) -> float:
    """The value of `name` for the default model's worker in /metrics (0 before it has a sample)."""
    families = text_string_to_metric_families(httpx.get(running.url + "/metrics", headers=running.headers,
                                                        timeout=30).text)
    return sum(s.value for f in families for s in f.samples
               if s.name == name and s.labels.get("model", "").partition("@")[0] == DEFAULT_MODEL)


def test_a_quoting_answer_is_drafted_by_prompt_lookup_and_metrics_count_it(batched: Running) -> None:
    """A RAG-style answer alone on the worker: drafted tokens from its prompt are accepted, the text is the one the
    same request gets in a batch (where no drafts are made), and /metrics counts the accepted draft tokens."""
    client = uncached(batched)
    sources = ("[1] The lighthouse on Skerry Point was built in 1874 from granite quarried on the island. "
               "[2] Its lamp was converted to electricity in 1952 and automated in 1988.")
    params: dict[str, object] = {"model": DEFAULT_MODEL, "temperature": 0, "max_tokens": MAX_TOKENS,
                                 "messages": ask(sources + "\nQuote source [1] word for word.")}
    before = metric(batched, "appliance_llamacpp_draft_tokens_accepted_total")
    alone = client.chat.completions.create(**params).choices[0].message.content  # type: ignore[call-overload]
    wait_until(lambda: metric(batched, "appliance_llamacpp_draft_tokens_accepted_total") > before,
               what="accepted draft tokens in /metrics")
    start = threading.Barrier(2)
    texts: list[str | None] = [None, None]

    def run(i: int) -> None:
        start.wait()
        body = params if i == 0 else {**params, "messages": ask("Name three fruits.")}
        texts[i] = client.chat.completions.create(**body).choices[0].message.content  # type: ignore[call-overload]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert texts[0] == alone and "1874" in alone
