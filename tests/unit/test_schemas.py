"""OpenAI request decoding: valid bodies pass, each bad one is a 400 naming its parameter; the worker body."""

from __future__ import annotations

import json
from typing import Any

import pytest

from appliance.errors import InvalidRequest
from appliance.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    TextPart,
    decode_request,
    upstream_body,
)

USER = {"role": "user", "content": "Hello"}


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": [USER], **fields}).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "prompt": "Once upon a time", **fields}).encode()


def test_valid_chat_body_decodes() -> None:
    body = json.dumps({
        "model": "smollm2", "messages": [{"role": "system", "content": "Be brief."}, USER,
                                         {"role": "assistant", "content": None},
                                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 16, "temperature": 0, "top_p": 0.9, "stop": ["\n", "END"], "seed": 7, "stream": True,
        "logit_bias": {"42": -100}, "top_k": 20, "presence_penalty": -2, "user": "u1",
    }).encode()
    request = decode_request(body, ChatCompletionRequest)
    assert request.model == "smollm2"
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "user"]
    assert request.messages[3].content == [TextPart("Hi")]
    assert request.max_tokens == 16 and request.temperature == 0 and request.stop == ["\n", "END"]
    assert request.logit_bias == {"42": -100}
    assert request.n == 1


def test_valid_completion_body_decodes() -> None:
    request = decode_request(completion(max_tokens=8, stop="."), CompletionRequest)
    assert request.prompt == "Once upon a time"
    assert request.stop == "."
    assert decode_request(completion(prompt=["one"]), CompletionRequest).prompt == ["one"]


@pytest.mark.parametrize(("body", "param"), [
    (chat(temperature=2.5), "temperature"),
    (chat(temperature=-0.1), "temperature"),
    (chat(top_p=1.5), "top_p"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(presence_penalty=3), "presence_penalty"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat(stream="yes"), "stream"),
    (chat(model=""), "model"),
    (chat(messages=[]), "messages"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    (chat(messages=[USER, {"role": "user", "content": 5}]), "messages[1].content"),
    (chat(messages=[{"role": "user", "content": [{"type": "audio", "data": "x"}]}]),
     "messages[0].content[0].type"),
    (chat(n=0), "n"),
    (chat(n=129), "n"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    (chat(logprobs=3), "logprobs"),
    (completion(logprobs=6), "logprobs"),
    (completion(logprobs=True), "logprobs"),
    (completion(prompt=["one", "two"]), "prompt"),
    (completion(prompt=[]), "prompt"),
])
def test_invalid_values_name_their_parameter(body: bytes, param: str) -> None:
    kind = CompletionRequest if b'"prompt"' in body else ChatCompletionRequest
    with pytest.raises(InvalidRequest) as info:
        decode_request(body, kind)
    error = info.value
    assert error.param == param, error.message
    assert error.status_code == 400
    assert error.to_body()["error"]["type"] == "invalid_request_error"
    assert param in error.message


@pytest.mark.parametrize(("body", "param", "says"), [
    (chat(top_logprobs=2), "top_logprobs", "logprobs: true"),
    (chat(logprobs=False, top_logprobs=2), "top_logprobs", "logprobs: true"),
    (chat(logit_bias={"hello": 1}), "logit_bias", "token ids"),
    (chat(logit_bias={"-3": 1}), "logit_bias", "token ids"),
    (chat(tool_choice="required"), "tool_choice", "only allowed when 'tools'"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"type": "function",
                                                                                "function": {"name": "g"}}),
     "tool_choice", "not among the tools"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
     "tools", "same name"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
     "tools[0].function.parameters", "type 'object'"),
    (chat(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]),
     "messages[1].tool_call_id", "tool_call_id"),
    (chat(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "42", "tool_call_id": "c9"}]),
     "messages[1].tool_call_id", "no earlier assistant message"),
    (chat(messages=[{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]),
     "messages[0].tool_calls", "only assistant"),
    (chat(response_format={"type": "regex"}), "response_format", "json_schema"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                 {"type": "image_url", "image_url": {"url": "data:,"}}]}]),
     "messages[0].content", "images"),
])
def test_unsupported_features_are_refused_clearly(body: bytes, param: str, says: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(body, ChatCompletionRequest)
    assert info.value.param == param
    assert says in info.value.message


@pytest.mark.parametrize(("body", "code"), [
    (b"", "invalid_body"),
    (b"  \n", "invalid_body"),
    (b"{not json", "invalid_json"),
    (b'{"model": "m", "messages": [', "invalid_json"),
    (b"[]", "invalid_value"),
])
def test_bodies_that_are_not_a_request(body: bytes, code: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(body, ChatCompletionRequest)
    assert info.value.code == code
    assert info.value.status_code == 400


def test_logit_bias_value_out_of_range() -> None:
    with pytest.raises(InvalidRequest, match="100") as info:
        decode_request(chat(logit_bias={"12": 101}), ChatCompletionRequest)
    assert info.value.param is not None and info.value.param.startswith("logit_bias")


def test_missing_required_field_is_named() -> None:
    with pytest.raises(InvalidRequest, match="model"):
        decode_request(json.dumps({"messages": [USER]}).encode(), ChatCompletionRequest)
    with pytest.raises(InvalidRequest, match="messages"):
        decode_request(json.dumps({"model": "m"}).encode(), ChatCompletionRequest)


def test_upstream_body_flattens_content_parts_to_text() -> None:
    request = decode_request(chat(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": None, "name": "bot"},
    ]), ChatCompletionRequest)
    body = upstream_body(request)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, world"},
        {"role": "assistant", "content": "", "name": "bot"},
    ]
    json.dumps(body)  # plain builtins only, ready for the worker


def test_upstream_body_forces_usage_when_streaming() -> None:
    body = upstream_body(decode_request(chat(stream=True), ChatCompletionRequest))
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    asked = upstream_body(decode_request(chat(stream=True, stream_options={"include_usage": False}),
                                         ChatCompletionRequest))
    assert asked["stream_options"] == {"include_usage": True}
    assert "stream_options" not in upstream_body(decode_request(chat(), ChatCompletionRequest))


def test_upstream_body_maps_max_completion_tokens() -> None:
    body = upstream_body(decode_request(chat(max_completion_tokens=12), ChatCompletionRequest))
    assert body["max_tokens"] == 12
    both = upstream_body(decode_request(chat(max_tokens=50, max_completion_tokens=12), ChatCompletionRequest))
    assert both["max_tokens"] == 12


def test_upstream_body_omits_unset_fields_and_unwraps_prompt_list() -> None:
    body = upstream_body(decode_request(completion(prompt=["only one"], temperature=0), CompletionRequest))
    assert body == {"model": "m", "prompt": "only one", "temperature": 0}


def test_logprobs_and_n_reach_the_worker() -> None:
    request = decode_request(chat(n=3, logprobs=True, top_logprobs=20), ChatCompletionRequest)
    assert {k: upstream_body(request)[k] for k in ("n", "logprobs", "top_logprobs")} == {
        "n": 3, "logprobs": True, "top_logprobs": 20}
    legacy = decode_request(completion(logprobs=0, n=2), CompletionRequest)
    assert (upstream_body(legacy)["logprobs"], upstream_body(legacy)["n"]) == (0, 2)
    plain = upstream_body(decode_request(chat(), ChatCompletionRequest))
    assert not {"n", "logprobs", "top_logprobs"} & plain.keys()  # absent stays absent: cache keys are unchanged
