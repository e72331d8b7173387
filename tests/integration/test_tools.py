"""Tool calling through the real server and model, driven by the official openai SDK: OpenAI's shapes whole and
streamed, arguments that always validate against the tool's schema, conversations that carry calls and results,
the audit record (names, never arguments), the response cache, and clear 400s."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}}}
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next three days?"}]


def schema_of(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"]["parameters"]  # type: ignore[no-any-return]


def test_required_gives_a_call_whose_arguments_validate(server: Running) -> None:
    reply = server.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER, ADD], tool_choice="required", temperature=0,
        max_tokens=80)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert calls, choice.message
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        tool = {"get_weather": WEATHER, "add": ADD}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema_of(tool))
    assert choice.message.content is None
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_a_named_function_is_the_one_called_once_without_parallel_calls(server: Running) -> None:
    reply = server.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER, ADD], parallel_tool_calls=False, temperature=0.8,
        seed=5, tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=60)
    calls = reply.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["add"]
    jsonschema.validate(json.loads(calls[0].function.arguments), schema_of(ADD))


def test_streamed_calls_come_as_OpenAI_deltas_and_match_the_whole_reply(server: Running) -> None:
    client = server.client()
    kwargs: dict[str, Any] = {"model": DEFAULT_MODEL, "messages": ASK, "tools": [WEATHER], "temperature": 0,
                              "tool_choice": "required", "max_tokens": 80, "extra_body": {"cache": "no-store"}}
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls or []
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function is not None and deltas[0].function.name == "get_weather"
    assert deltas[0].type == "function"
    assert all(d.id is None and d.function is not None and d.function.name is None for d in deltas[1:])
    assert len(deltas) > 2, "arguments arrive in fragments as they are generated"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function is not None)
    assert arguments == whole[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_none_answers_in_text(server: Running) -> None:
    reply = server.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=12)
    assert reply.choices[0].message.tool_calls is None
    assert (reply.choices[0].message.content or "").strip()


def test_auto_answers_in_text_or_with_a_valid_call(server: Running) -> None:
    for seed in range(3):
        reply = server.client().chat.completions.create(
            model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER], tool_choice="auto", temperature=1.0, seed=seed,
            max_tokens=60)
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            if choice.finish_reason == "tool_calls":
                jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments), schema_of(WEATHER))
        else:
            assert choice.finish_reason in ("stop", "length") and choice.message.content


def test_a_tool_result_goes_back_and_the_model_answers(server: Running) -> None:
    client = server.client()
    first = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER], temperature=0,
                                           tool_choice="required", max_tokens=80)
    call = (first.choices[0].message.tool_calls or [])[0]
    messages: list[Any] = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id,
                            "content": json.dumps({"forecast": ["sunny", "rain", "sunny"], "high_c": 21})}]
    final = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, tools=[WEATHER],
                                           tool_choice="none", temperature=0, max_tokens=30)
    assert final.choices[0].message.content
    plain = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, temperature=0, max_tokens=1)
    assert final.usage is not None and plain.usage is not None
    assert final.usage.prompt_tokens > plain.usage.prompt_tokens + 20, "the call and its result are in the prompt"


def test_the_audit_log_names_the_tools_but_never_their_arguments(server: Running) -> None:
    secret_city = "Zyxwvutsville"
    reply = server.client().chat.completions.create(
        model=DEFAULT_MODEL, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80,
        messages=[{"role": "user", "content": f"Weather in {secret_city}?"}], extra_body={"cache": "no-store"})
    assert reply.choices[0].message.tool_calls
    records = httpx.get(f"{server.url}/api/audit", params={"action": "chat.tool_calls", "order": "desc"},
                        headers=server.headers, timeout=30).json()
    record = records["data"][0]
    assert record["details"]["tools"] == ["get_weather"]
    assert secret_city not in json.dumps(records)


def test_a_deterministic_tool_request_is_cached_with_its_calls(server: Running) -> None:
    client = server.client()
    kwargs: dict[str, Any] = {"model": DEFAULT_MODEL, "tools": [ADD], "tool_choice": "required", "temperature": 0,
                              "max_tokens": 60, "messages": [{"role": "user", "content": "What is 17 plus 25?"}]}
    first = client.chat.completions.with_raw_response.create(**kwargs)
    second = client.chat.completions.with_raw_response.create(**kwargs)
    assert second.headers.get("x-cache") == "hit"
    a, b = first.parse().choices[0], second.parse().choices[0]
    assert b.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in a.message.tool_calls or []] == \
        [(c.function.name, c.function.arguments) for c in b.message.tool_calls or []]
    streamed = list(client.chat.completions.create(**kwargs, stream=True))  # a hit replayed as a stream
    arguments = "".join(d.function.arguments or "" for c in streamed if c.choices
                        for d in c.choices[0].delta.tool_calls or [] if d.function is not None)
    assert arguments == (a.message.tool_calls or [])[0].function.arguments


@pytest.mark.parametrize(("tools", "extra", "param"), [
    ([WEATHER], {"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ([{"type": "function", "function": {"name": "bad name!"}}], {}, "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 5, "maximum": 1}}}}}], {}, "tools"),
])
def test_bad_tools_get_a_400_naming_the_parameter(server: Running, tools: list[Any], extra: dict[str, Any],
                                                    param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=DEFAULT_MODEL, messages=ASK, tools=tools, max_tokens=5,
                                                **extra)
    error = info.value.body
    assert isinstance(error, dict)
    assert error["param"].replace("[", ".").replace("]", "") == param, error


# ----------------------------------------------------------------------------- random schemas (property test)

NAMES = st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True)


def _leaf() -> st.SearchStrategy[dict[str, Any]]:
    bounded = st.tuples(st.integers(-1000, 1000), st.integers(0, 1000)).map(lambda t: (t[0], t[0] + t[1]))
    return st.one_of(
        st.just({"type": "string"}),
        st.integers(1, 12).map(lambda n: {"type": "string", "maxLength": n}),
        st.just({"type": "boolean"}),
        st.lists(st.text("abcdefxyz ", min_size=1, max_size=6), min_size=1, max_size=4, unique=True)
        .map(lambda v: {"type": "string", "enum": v}),
        bounded.map(lambda b: {"type": "integer", "minimum": b[0], "maximum": b[1]}),
        # quarters: ranges with no integer inside and single values too (a bound < the other, or both equal)
        bounded.map(lambda b: {"type": "number", "minimum": b[0] / 4, "maximum": b[1] / 4}),
        st.integers(0, 50).map(lambda lo: {"type": "integer", "exclusiveMinimum": lo}),
    )


SCHEMAS = st.recursive(
    _leaf(),
    lambda inner: st.one_of(
        st.tuples(inner, st.integers(0, 2), st.integers(0, 2)).map(
            lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]}),
        st.dictionaries(NAMES, inner, min_size=1, max_size=3).flatmap(
            lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
                lambda req: {"type": "object", "properties": props, "required": req})),
    ),
    max_leaves=6,
).map(lambda s: s if s.get("type") == "object" else {"type": "object", "properties": {"value": s},
                                                       "required": ["value"]})


@pytest.mark.timeout(1200)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, stream=st.booleans(), seed=st.integers(0, 2**16))
def test_random_schemas_always_yield_arguments_that_validate(server: Running, schema: dict[str, Any], stream: bool,
                                                             seed: int) -> None:
    tool = {"type": "function", "function": {"name": "record", "description": "Record the values",
                                             "parameters": schema}}
    kwargs: dict[str, Any] = {"model": DEFAULT_MODEL, "tools": [tool], "tool_choice": "required",
                              "temperature": 1.0, "seed": seed, "max_tokens": 200, "extra_body": {"cache": "no-store"},
                              "messages": [{"role": "user", "content": "Record some example values."}]}
    client = server.client()
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        finish = chunks[-1].choices[0].finish_reason
        calls: dict[int, str] = {}
        for delta in (d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []):
            calls[delta.index] = calls.get(delta.index, "") + (delta.function.arguments or "" if delta.function else "")
        arguments = [calls[i] for i in sorted(calls)]
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        finish = choice.finish_reason
        arguments = [c.function.arguments for c in choice.message.tool_calls or []]
    if finish == "length":  # a model may ramble inside a long string; cut short, the JSON is incomplete
        return
    assert finish == "tool_calls" and arguments
    for each in arguments:  # parallel calls allowed: every one validates
        jsonschema.validate(json.loads(each), schema)
