"""The Responses API (`/v1/responses`) through the real server and model, driven by the official openai SDK: whole
and streamed answers agree with the chat path they are built on, the event sequence and its numbering, storing and
chaining only where the privacy policy allows it (changed at run time through the policy API), ownership of stored
responses, the conversations surface on what is stored, erasure, refusals in OpenAI's error shape."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from appliance.privacy.policy import SHIPPED_PRIVACY
from tests.integration.conftest import Running, new_key
from tests.server import DEFAULT_MODEL

QUESTION = "What is the capital of France?"
SHIPPED = SHIPPED_PRIVACY.read_text()
STORING = SHIPPED.replace("store = false", "store = true").replace('ner = "auto"', 'ner = "off"')
STORING_PSEUDONYMS = STORING.replace('[surfaces.conversations]\ndefault = "block"',
                                     '[surfaces.conversations]\ndefault = "pseudonymize"')


@pytest.fixture(scope="module")
def box(start_server: Callable[..., Running]) -> Running:
    return start_server()


@pytest.fixture(scope="module")
def keys(box: Running) -> dict[str, str]:
    assert box.process is not None
    data = box.process.data_dir
    return {"alice": new_key(data, role="user"), "bob": new_key(data, role="user"),
            "auditor": new_key(data, role="auditor")}


def use_policy(box: Running, text: str) -> None:
    changed = httpx.put(box.url + "/api/privacy/policy", headers=box.headers, json={"policy": text})
    assert changed.status_code == 200, changed.text


@pytest.fixture
def forbidding(box: Running) -> Running:
    use_policy(box, SHIPPED)
    return box


@pytest.fixture
def storing(box: Running) -> Iterator[Running]:
    use_policy(box, STORING)
    yield box
    use_policy(box, SHIPPED)


def chat(box: Running, messages: list[dict[str, Any]], max_tokens: int) -> tuple[str, int]:
    """The chat path's answer to the same messages, and its prompt tokens."""
    reply = box.client().chat.completions.create(model=DEFAULT_MODEL, messages=messages,  # type: ignore[arg-type]
                                                 max_tokens=max_tokens, temperature=0)
    assert reply.usage is not None
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens


def chat_text(box: Running, messages: list[dict[str, Any]], max_tokens: int) -> str:
    return chat(box, messages, max_tokens)[0]


def test_text_input_gives_the_chat_paths_answer_with_usage(forbidding: Running) -> None:
    response = forbidding.client().responses.create(model=DEFAULT_MODEL, input=QUESTION, max_output_tokens=12,
                                                    temperature=0)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.model == DEFAULT_MODEL and response.status in ("completed", "incomplete")
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.output_text.strip()
    assert response.output_text == chat_text(forbidding, [{"role": "user", "content": QUESTION}], 12)
    usage = response.usage
    assert usage is not None and usage.input_tokens > 5 and 0 < usage.output_tokens <= 12
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert response.store is False  # the shipped policy stores no conversations


def test_instructions_and_message_items_reach_the_model_as_chat_messages(forbidding: Running) -> None:
    client = forbidding.client()
    items: list[Any] = [
        {"role": "user", "content": [{"type": "input_text", "text": "My name is Ada."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello Ada!"}]},
        {"role": "user", "content": "What is my name?"}]
    response = client.responses.create(model=DEFAULT_MODEL, instructions="You are a terse assistant.", input=items,
                                       max_output_tokens=10, temperature=0)
    expected, prompt_tokens = chat(forbidding, [{"role": "system", "content": "You are a terse assistant."},
                                                {"role": "user", "content": "My name is Ada."},
                                                {"role": "assistant", "content": "Hello Ada!"},
                                                {"role": "user", "content": "What is my name?"}], 10)
    assert response.output_text == expected and response.instructions == "You are a terse assistant."
    assert usage_of(response)[0] == prompt_tokens  # the very prompt, the instructions as its system message
    plain = client.responses.create(model=DEFAULT_MODEL, input=items, max_output_tokens=10, temperature=0)
    assert usage_of(plain)[0] != prompt_tokens


def usage_of(response: Any) -> tuple[int, int]:
    assert response.usage is not None
    return response.usage.input_tokens, response.usage.output_tokens


def test_max_output_tokens_makes_an_incomplete_response(forbidding: Running) -> None:
    response = forbidding.client().responses.create(model=DEFAULT_MODEL, input="Count from 1 to 100 in words.",
                                                    max_output_tokens=3, temperature=0)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert usage_of(response)[1] == 3 and response.max_output_tokens == 3


def test_a_stream_is_the_responses_event_sequence_numbered_in_order(forbidding: Running) -> None:
    client = forbidding.client()
    whole = client.responses.create(model=DEFAULT_MODEL, input=QUESTION, max_output_tokens=12, temperature=0)
    events = list(client.responses.create(model=DEFAULT_MODEL, input=QUESTION, max_output_tokens=12,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed" if whole.status == "completed" else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    item_ids = {getattr(e, "item_id", None) for e in events[3:-2]}
    assert item_ids == {events[2].item.id}  # type: ignore[union-attr]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.id == events[0].response.id and final.output_text == text  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.output_tokens == usage_of(whole)[1]


def test_the_sdks_stream_helper_accumulates_the_final_response(forbidding: Running) -> None:
    # room to finish: the helper's final response is the one response.completed carries
    with forbidding.client().responses.stream(model=DEFAULT_MODEL, input="Hi!", max_output_tokens=30,
                                              temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(deltas) and final.output_text.strip()


def test_storing_and_chaining_are_refused_when_the_policy_forbids_them(forbidding: Running) -> None:
    client = forbidding.client()
    with pytest.raises(openai.BadRequestError) as stored:
        client.responses.create(model=DEFAULT_MODEL, input=QUESTION, max_output_tokens=4, store=True)
    error: Any = stored.value.body  # the SDK keeps the error object
    assert error["param"] == "store" and error["type"] == "invalid_request_error"
    assert "privacy policy" in error["message"] and "store = true" in error["message"]
    with pytest.raises(openai.BadRequestError) as chained:
        client.responses.create(model=DEFAULT_MODEL, input=QUESTION, max_output_tokens=4,
                                previous_response_id="resp_123")
    assert chained.value.param == "previous_response_id" and "privacy policy" in chained.value.message
    response = client.responses.create(model=DEFAULT_MODEL, input=QUESTION, max_output_tokens=4)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_stored_responses_chain_and_belong_to_their_owner(storing: Running, keys: dict[str, str]) -> None:
    alice, bob, admin = storing.client(keys["alice"]), storing.client(keys["bob"]), storing.client()
    first = alice.responses.create(model=DEFAULT_MODEL, input="My name is Ada.", max_output_tokens=6, temperature=0,
                                   metadata={"topic": "names"})
    assert first.store is True
    got = alice.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text and got.metadata == {"topic": "names"}
    second = alice.responses.create(model=DEFAULT_MODEL, input="What is my name?", previous_response_id=first.id,
                                    max_output_tokens=6, temperature=0)
    assert second.previous_response_id == first.id
    expected = chat_text(storing, [{"role": "user", "content": "My name is Ada."},
                                   {"role": "assistant", "content": first.output_text},
                                   {"role": "user", "content": "What is my name?"}], 6)
    assert second.output_text == expected
    items = alice.responses.input_items.list(second.id, order="asc").data
    assert [(i.type, getattr(i, "role", None)) for i in items] == [
        ("message", "user"), ("message", "assistant"), ("message", "user")]
    assert [i.content[0].text for i in items] == [  # type: ignore[union-attr]
        "My name is Ada.", first.output_text, "What is my name?"]
    for call in (lambda: bob.responses.retrieve(first.id), lambda: bob.responses.delete(first.id),
                 lambda: bob.responses.create(model=DEFAULT_MODEL, input="x", previous_response_id=first.id,
                                              max_output_tokens=2)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert admin.responses.retrieve(first.id).id == first.id  # an admin holds privacy:admin
    alice.responses.delete(first.id)
    records = httpx.get(storing.url + "/api/audit", headers=storing.headers,
                        params={"action": "response.*", "limit": 1000}).json()["data"]
    assert sorted(r["action"] for r in records if r["target"] == first.id) == ["response.delete", "response.read"]
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(first.id)
    assert alice.responses.retrieve(second.id).id == second.id  # its own copy of the conversation stays
    unstored = alice.responses.create(model=DEFAULT_MODEL, input="x", max_output_tokens=2, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(unstored.id)


def test_a_streamed_response_is_stored_when_it_completes(storing: Running) -> None:
    client = storing.client()
    events = list(client.responses.create(model=DEFAULT_MODEL, input=QUESTION, max_output_tokens=6, temperature=0,
                                          stream=True))
    final = events[-1].response  # type: ignore[union-attr]
    assert final.store is True
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_stored_text_passes_the_conversations_surface_and_erasure(box: Running) -> None:
    email = "zebra.canary.4471@example.org"
    client = box.client()
    use_policy(box, STORING)  # conversations: default = "block"
    try:
        blocked = client.responses.create(model=DEFAULT_MODEL, input=f"Write to {email} please.",
                                          max_output_tokens=4)
        assert blocked.store is False  # personal data the surface blocks: not stored at all
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(blocked.id)
        use_policy(box, STORING_PSEUDONYMS)
        kept = client.responses.create(model=DEFAULT_MODEL, input=f"Write to {email} please.", max_output_tokens=4)
        assert kept.store is True
        raw = httpx.get(f"{box.url}/v1/responses/{kept.id}/input_items", headers=box.headers).text
        assert email not in raw and "<EMAIL:" in raw
        erased = httpx.post(box.url + "/api/privacy/erasures", headers=box.headers, json={"subject": email})
        assert erased.status_code == 200 and erased.json()["deleted"]["conversations"] == 1
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(kept.id)
    finally:
        use_policy(box, SHIPPED)


def test_callers_without_credentials_or_permission_are_refused(box: Running, keys: dict[str, str]) -> None:
    body = {"model": DEFAULT_MODEL, "input": "Hi", "max_output_tokens": 2}
    for method, path in (("POST", "/v1/responses"), ("GET", "/v1/responses/resp_1"),
                         ("DELETE", "/v1/responses/resp_1"), ("GET", "/v1/responses/resp_1/input_items")):
        anonymous = httpx.request(method, box.url + path, json=body)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
        auditor = httpx.request(method, box.url + path, json=body, headers={"Authorization": f"Bearer "
                                                                                             f"{keys['auditor']}"})
        assert auditor.status_code == 403 and "chat:use" in auditor.json()["error"]["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "Hi", "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0].type"),
    ({"input": "Hi", "background": True}, "background"),
    ({"input": "Hi", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input[0]"),
    ({"input": 42}, "input"),
    ({"input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
])
def test_bad_or_unsupported_input_is_a_400_in_openais_shape(box: Running, body: dict[str, Any], param: str) -> None:
    response = httpx.post(box.url + "/v1/responses", headers=box.headers, json={"model": DEFAULT_MODEL, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_an_unknown_model_is_a_404_before_any_event(box: Running) -> None:
    with pytest.raises(openai.NotFoundError):
        box.client().responses.create(model="no-such-model", input="Hi", stream=True)


def test_the_routes_are_in_the_openapi_document_and_the_metrics_label_them_by_template(box: Running) -> None:
    paths = httpx.get(box.url + "/schema/openapi.json", headers=box.headers).json()["paths"]
    assert {"post"} <= set(paths["/v1/responses"])
    assert {"get", "delete"} <= set(paths["/v1/responses/{response_id}"])
    assert "get" in paths["/v1/responses/{response_id}/input_items"]
    assert httpx.get(box.url + "/v1/responses/resp_label_probe", headers=box.headers).status_code == 404
    metrics = httpx.get(box.url + "/metrics", headers=box.headers).text
    assert 'route="/v1/responses/{response_id}"' in metrics and "resp_label_probe" not in metrics


class City(BaseModel):
    name: str
    country: str


def test_text_format_json_schema_constrains_the_answer_and_the_sdk_parses_it(forbidding: Running) -> None:
    client = forbidding.client()
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["name", "country"], "additionalProperties": False}
    response = client.responses.create(model=DEFAULT_MODEL, input=QUESTION, max_output_tokens=60, temperature=0,
                                       text={"format": {"type": "json_schema", "name": "city", "schema": schema,
                                                        "strict": True}})
    assert set(json.loads(response.output_text)) == {"name", "country"}
    assert response.text.format.type == "json_schema"  # type: ignore[union-attr]
    parsed = client.responses.parse(model=DEFAULT_MODEL, input=QUESTION, max_output_tokens=100, temperature=0,
                                    text_format=City)
    assert isinstance(parsed.output_parsed, City)


WEATHER: Any = {"type": "function", "name": "get_weather", "description": "The weather in a city now",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                               "additionalProperties": False}}
CLOCK: Any = {"type": "function", "name": "get_time", "description": "The time in a time zone",
              "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                             "required": ["zone"]}}
ASK_WEATHER = "What is the weather in Paris?"


def calls_of(response: Any) -> list[Any]:
    return [item for item in response.output if item.type == "function_call"]


def test_a_required_tool_call_is_a_function_call_item_and_its_output_gets_an_answer(forbidding: Running) -> None:
    client = forbidding.client()
    first = client.responses.create(model=DEFAULT_MODEL, input=ASK_WEATHER, tools=[WEATHER, CLOCK],
                                    tool_choice="required", max_output_tokens=40, temperature=0)
    [call, *_] = calls_of(first)
    assert call.name in ("get_weather", "get_time") and call.call_id and call.id.startswith("fc_")
    arguments = json.loads(call.arguments)
    assert set(arguments) == ({"city"} if call.name == "get_weather" else {"zone"})
    assert first.status == "completed" and [t.name for t in first.tools] == ["get_weather", "get_time"]
    named = client.responses.create(model=DEFAULT_MODEL, input=ASK_WEATHER, tools=[WEATHER, CLOCK],
                                    tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=40,
                                    temperature=0)
    [timed] = calls_of(named)
    assert timed.name == "get_time" and json.loads(timed.arguments)["zone"] in ("UTC", "CET")
    answer = client.responses.create(
        model=DEFAULT_MODEL, tools=[WEATHER], max_output_tokens=20, temperature=0, tool_choice="none",
        input=[{"role": "user", "content": ASK_WEATHER},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"}])
    assert answer.output[0].type == "message" and answer.output_text.strip() and not calls_of(answer)


def test_a_streamed_tool_call_is_argument_deltas_then_done(forbidding: Running) -> None:
    events = list(forbidding.client().responses.create(
        model=DEFAULT_MODEL, input=ASK_WEATHER, tools=[WEATHER], tool_choice="required", max_output_tokens=40,
        temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    assert set(kinds[3:-3]) == {"response.function_call_arguments.delta"}
    added = events[2].item  # type: ignore[union-attr]
    assert added.type == "function_call" and added.name == "get_weather" and added.status == "in_progress"
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert events[-3].arguments == streamed and set(json.loads(streamed)) == {"city"}  # type: ignore[union-attr]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    [call] = calls_of(events[-1].response)  # type: ignore[union-attr]
    assert call.arguments == streamed and call.call_id == added.call_id and call.status == "completed"


def test_a_stored_tool_call_continues_with_previous_response_id(storing: Running) -> None:
    client = storing.client()
    first = client.responses.create(model=DEFAULT_MODEL, input=ASK_WEATHER, tools=[WEATHER],
                                    tool_choice="required", max_output_tokens=40, temperature=0)
    [call] = calls_of(first)
    answer = client.responses.create(model=DEFAULT_MODEL, previous_response_id=first.id, tools=[WEATHER],
                                     tool_choice="none", max_output_tokens=20, temperature=0,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "Sunny, 24 C"}])
    assert answer.output_text.strip()
    items = client.responses.input_items.list(answer.id, order="asc").data
    assert [i.type for i in items] == ["message", "function_call", "function_call_output"]
    assert items[1].call_id == call.call_id == items[2].call_id  # type: ignore[union-attr]


def test_a_worker_dying_mid_stream_is_an_error_event_then_response_failed(forbidding: Running) -> None:
    assert forbidding.process is not None
    events = []
    stream = forbidding.client().responses.create(model=DEFAULT_MODEL, input="Count from 1 to 500 in words.",
                                                  max_output_tokens=1000, stream=True)
    for event in stream:
        events.append(event)
        if event.type == "response.output_text.delta" and len(events) == 6:
            for worker in forbidding.process.workers():
                worker.send_signal(signal.SIGKILL)
    kinds = [e.type for e in events]
    assert kinds[-2:] == ["error", "response.failed"], kinds[-4:]
    assert "worker" in events[-2].message  # type: ignore[union-attr]
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None and "worker" in failed.error.message
    assert [e.sequence_number for e in events] == list(range(len(events)))
