"""The Responses API's pure parts: a Responses request as a chat body, a chat answer (whole or as chunks) as a
response object and its events, and the store of responses as a privacy store."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from appliance import db
from appliance.errors import InvalidRequest
from appliance.gateway.responses.output import Draft, StreamTranslator, whole_response
from appliance.gateway.responses.protocol import (
    ResponsesRequest,
    chat_body,
    decode_responses_request,
    input_items,
)
from appliance.gateway.responses.store import ConversationStore, ResponseStore
from appliance.privacy.retention import Subject


def request(**fields: Any) -> ResponsesRequest:
    return decode_responses_request(json.dumps({"model": "m", **fields}).encode())


def body_of(**fields: Any) -> dict[str, Any]:
    req = request(**fields)
    return chat_body(req, input_items(req.input))


def refused(**fields: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        body_of(**fields)
    return caught.value


def test_text_input_and_instructions_become_system_and_user_messages() -> None:
    body = body_of(input="Hi", instructions="Be brief.", max_output_tokens=5, temperature=0, user="u1")
    assert body == {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi"}],
                    "max_tokens": 5, "temperature": 0, "user": "u1"}
    assert body_of(input="Hi", stream=True)["stream_options"] == {"include_usage": True}


def test_message_items_with_parts_roles_and_the_assistant_history() -> None:
    body = body_of(input=[
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello "},
                                                         {"type": "input_text", "text": "there"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Bonjour", "annotations": []}]},
        {"role": "user", "content": "And?"}])
    assert body["messages"] == [{"role": "system", "content": "Answer in French."},
                                {"role": "user", "content": "Hello there"},
                                {"role": "assistant", "content": "Bonjour"},
                                {"role": "user", "content": "And?"}]
    items = input_items(request(input=[{"role": "user", "content": "x"}]).input)
    assert items[0]["id"].startswith("msg_") and items[0]["content"] == [{"type": "input_text", "text": "x"}]


def test_function_calls_join_the_assistant_message_and_outputs_become_tool_messages() -> None:
    body = body_of(input=[
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "function_call", "call_id": "call_a", "name": "weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call_b", "name": "weather", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "18C"},
        {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "21C"}]}])
    assert body["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]}
    assert body["messages"][2:] == [{"role": "tool", "tool_call_id": "call_a", "content": "18C"},
                                    {"role": "tool", "tool_call_id": "call_b", "content": "21C"}]


def test_function_tools_tool_choice_and_text_format_translate_to_chat_shapes() -> None:
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = body_of(input="x", tools=[{"type": "function", "name": "weather", "description": "Weather now",
                                      "parameters": params, "strict": True}],
                   tool_choice={"type": "function", "name": "weather"}, parallel_tool_calls=False,
                   text={"format": {"type": "json_schema", "name": "out", "schema": params, "strict": True}})
    assert body["tools"] == [{"type": "function", "function": {"name": "weather", "description": "Weather now",
                                                               "strict": True, "parameters": params}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "out", "schema": params, "strict": True}}
    assert body_of(input="x", text={"format": {"type": "json_object"}})["response_format"] == {"type": "json_object"}
    assert "response_format" not in body_of(input="x", text={"format": {"type": "text"}})
    assert body_of(input="x", tools=[{"type": "function", "name": "f"}], tool_choice="required")["tool_choice"] == \
        "required"


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "no spaces"}]}, "tools[0].name"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
     "tool_choice.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "see"},
                                              {"type": "input_image", "image_url": "data:..."}]}]},
     "input[0].content[1]"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input[0]"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": []}, "input"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
])
def test_what_cannot_be_done_is_a_400_naming_the_parameter(fields: dict[str, Any], param: str) -> None:
    error = refused(**{"input": "x", **fields})
    assert error.param == param and error.status_code == 400, error.message


def draft(**fields: Any) -> Draft:
    return Draft.new(request(input="x", **fields), store=False)


def completion(content: str | None, finish: str, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13,
                      "prompt_tokens_details": {"cached_tokens": 3}}}


def test_a_whole_answer_becomes_a_response_with_usage_and_its_status() -> None:
    response = whole_response(draft(metadata={"a": "b"}), completion("Paris.", "stop"))
    assert response["id"].startswith("resp_") and response["object"] == "response"
    assert response["status"] == "completed" and response["metadata"] == {"a": "b"}
    [message] = response["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    assert message["content"][0]["type"] == "output_text" and message["content"][0]["text"] == "Paris."
    assert response["usage"] == {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 3},
                                 "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 0},
                                 "total_tokens": 13}
    cut = whole_response(draft(), completion("Par", "length"))
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["output"][0]["status"] == "incomplete"


def test_tool_calls_become_function_call_items() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]
    response = whole_response(draft(), completion(None, "tool_calls", calls))
    assert response["output"] == [{"type": "function_call", "id": response["output"][0]["id"], "call_id": "call_1",
                                   "name": "weather", "arguments": '{"city":"Paris"}', "status": "completed"}]
    assert response["output"][0]["id"].startswith("fc_")


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "c", "object": "chat.completion.chunk", "choices": choices, **({"usage": usage} if usage else {})}


def events_of(translator: StreamTranslator, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    raw = translator.encode(translator.start())
    for c in chunks:
        raw += translator.encode(translator.chunk(c))
    raw += translator.encode(translator.finish())
    events = []
    for block in raw.decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            event = json.loads(data.removeprefix("data: "))
            assert name == "event: " + event["type"]
            events.append(event)
    return events


def test_a_streamed_answer_is_the_responses_event_sequence() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    events = events_of(StreamTranslator(draft()), [
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
        chunk({}, finish="stop"), chunk(usage=usage)])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    item_id = events[2]["item"]["id"]
    assert all(e["item_id"] == item_id and e["output_index"] == 0 and e["content_index"] == 0 for e in events[3:8])
    assert events[2]["item"]["status"] == "in_progress" and events[2]["item"]["content"] == []
    assert events[6]["text"] == "Hello" and events[8]["item"]["content"][0]["text"] == "Hello"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == "Hello"
    assert final["usage"]["total_tokens"] == 7 and final["id"] == events[0]["response"]["id"]


def test_streamed_tool_calls_are_function_call_items_with_argument_deltas() -> None:
    events = events_of(StreamTranslator(draft()), [
        chunk({"role": "assistant", "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                               "function": {"name": "time", "arguments": "{}"}}]}),
        chunk({}, finish="tool_calls")])
    assert [e["type"] for e in events[2:]] == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert events[2]["item"] == {"type": "function_call", "id": events[2]["item"]["id"], "call_id": "call_1",
                                 "name": "weather", "arguments": "", "status": "in_progress"}
    assert events[5]["arguments"] == '{"city":"Paris"}' and events[7]["output_index"] == 1
    output = events[-1]["response"]["output"]
    assert [(o["call_id"], o["arguments"], o["status"]) for o in output] == [
        ("call_1", '{"city":"Paris"}', "completed"), ("call_2", "{}", "completed")]


def test_a_stream_cut_at_max_output_tokens_is_incomplete_and_a_failure_is_an_error_then_failed() -> None:
    events = events_of(StreamTranslator(draft()), [chunk({"content": "Hi"}, finish="length")])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    translator = StreamTranslator(draft())
    translator.chunk(chunk({"content": "Hi"}))
    failed = translator.fail({"message": "the worker died", "code": "worker_failed"})
    assert [e["type"] for e in failed] == ["error", "response.failed"]
    assert failed[0]["code"] == "worker_failed" and failed[1]["response"]["status"] == "failed"
    assert failed[1]["response"]["error"]["message"] == "the worker died"
    assert failed[1]["response"]["output"][0]["content"][0]["text"] == "Hi"


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    connection = db.connect(tmp_path / "a.db")
    db.migrate(connection)
    return connection


def test_stored_responses_are_purged_by_age_and_erased_by_subject(conn: sqlite3.Connection) -> None:
    store, conversations = ResponseStore(conn), ConversationStore(conn)
    for rid, owner, user, text in (("resp_a", "key:k1", "u1", "hello"), ("resp_b", "key:k2", "", "mail bob@x.org"),
                                   ("resp_c", "user:u3", "u3", "plain")):
        store.save({"id": rid, "output": []}, [{"type": "message", "content": [{"text": text}]}], owner, user)
    assert store.get("resp_a") is not None and store.get("resp_a").input[0]["content"][0]["text"] == "hello"
    assert conversations.report().count == 3
    assert conversations.count_older_than(datetime.now(UTC) - timedelta(days=1)) == 0
    assert conversations.erase_subject(Subject("alice", user_id="u1", key_ids=frozenset({"k9"}))) == 1
    assert conversations.erase_subject(Subject("Bob@x.org", terms=frozenset({"Bob@x.org"}))) == 1
    assert [r["id"] for r in conn.execute("SELECT id FROM responses")] == ["resp_c"]
    assert conversations.count_older_than(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert conversations.purge_older_than(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert store.get("resp_c") is None and not store.delete("resp_c")
    conversations.compact()


def test_request_struct_ignores_fields_it_does_not_use() -> None:
    req = request(input="x", include=["message.output_text.logprobs"], truncation="auto", service_tier="auto",
                  prompt_cache_key="k", store=False)
    assert req.store is False
    assert msgspec.to_builtins(req)["input"] == "x"


def test_the_privacy_report_shows_stored_conversations_even_when_no_new_ones_are_stored(
        conn: sqlite3.Connection) -> None:
    from appliance.audit import AuditLog
    from appliance.privacy.policy import load_policy
    from appliance.privacy.retention import Retention

    retention = Retention(load_policy, AuditLog(conn), resolve=Subject, pseudonym=lambda kind, value: value)
    retention.register(ConversationStore(conn))

    def conversations() -> list[tuple[int, str, str]]:
        return [(c.count, c.retention, c.note) for c in retention.report().classes if c.data_class == "conversations"]

    assert conversations() == [(0, "not stored", "conversations.store = false")]  # the shipped policy
    ResponseStore(conn).save({"id": "resp_a", "output": []}, [], "key:k1", None)
    assert conversations() == [(1, "30d", "no new ones stored (conversations.store = false)")]
