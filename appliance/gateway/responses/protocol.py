"""Responses API requests: the body as a msgspec struct, its input items in one canonical form (what is stored and
listed by `GET /v1/responses/{id}/input_items`), and their translation into a chat-completions body. Pure: no I/O.

What the chat path cannot do is refused here with a 400 naming the parameter: built-in tools (web_search,
file_search, ...), background responses, reasoning, stored prompts and conversations, images, files and audio."""

from __future__ import annotations

import re
import secrets
from typing import Annotated, Any, Literal

import msgspec

from appliance.errors import InvalidRequest
from appliance.gateway.schemas import PositiveInt, Temperature, TopP, decode_json

Item = dict[str, Any]
ROLES = ("user", "assistant", "system", "developer")
TOOL_CHOICES = ("none", "auto", "required")
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # as chat's tools take them
_MEDIA = {"input_image": "images", "input_file": "files", "input_audio": "audio"}


class ResponsesRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The body of `POST /v1/responses`. Fields this server ignores (include, truncation, service_tier,
    prompt_cache_key, safety_identifier, max_tool_calls, stream_options) are accepted and dropped."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | list[Item]
    instructions: str | None = None
    tools: list[Item] | None = None
    tool_choice: str | Item | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    text: Item | None = None
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    # refused unless empty (see check_request)
    background: bool | None = None
    reasoning: Item | None = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: int | None = None
    # extensions, as in chat: the response cache directive and a sampling seed
    cache: Literal["store", "no-store"] | None = None
    seed: int | None = None


def new_id(prefix: str) -> str:
    """An id in OpenAI's style: `resp_`, `msg_`, `fc_` and 48 hex digits."""
    return f"{prefix}_{secrets.token_hex(24)}"


def unsupported(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="unsupported_parameter")


def invalid(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def decode_responses_request(body: bytes) -> ResponsesRequest:
    """The body as a `ResponsesRequest`, or a 400 naming the bad or unsupported parameter."""
    request = decode_json(body, ResponsesRequest)
    check_request(request)
    return request


def check_request(request: ResponsesRequest) -> None:
    if request.background:
        raise unsupported("background", "background responses are not supported here; send the request without "
                          "'background' (stream=true shows progress as it happens)")
    if request.conversation is not None:
        raise unsupported("conversation", "conversation objects are not supported; chain responses with "
                          "'previous_response_id', or send the whole conversation as 'input'")
    if request.prompt is not None:
        raise unsupported("prompt", "stored prompt templates are not supported; send the text as 'instructions' "
                          "and 'input'")
    reasoning = request.reasoning or {}
    if reasoning.get("effort") not in (None, "none") or reasoning.get("summary") is not None:
        raise unsupported("reasoning", "the models on this server do not reason in separate tokens; remove "
                          "'reasoning'")
    if request.top_logprobs:
        raise unsupported("top_logprobs", "logprobs are not available through /v1/responses; remove "
                          "'top_logprobs' (or use /v1/chat/completions)")
    if isinstance(request.input, list) and not request.input:
        raise invalid("input", "'input' is an empty list; send a string or at least one item")
    _check_metadata(request.metadata)


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if not metadata:
        return
    if len(metadata) > METADATA_PAIRS:
        raise invalid("metadata", f"metadata holds at most {METADATA_PAIRS} pairs; it has {len(metadata)}")
    for key, value in metadata.items():
        if len(key) > METADATA_KEY or len(value) > METADATA_VALUE:
            raise invalid(f"metadata.{key[:METADATA_KEY]}", f"metadata keys are at most {METADATA_KEY} characters "
                          f"and values at most {METADATA_VALUE}")


# --- input items, canonical form ---------------------------------------------------------------------------------

def message_item(role: str, text: str, item_id: str | None = None, status: str = "completed") -> Item:
    """A message item with one text part: `input_text` for the caller's roles, `output_text` for the assistant."""
    return {"type": "message", "id": item_id or new_id("msg"), "role": role, "content": [text_part(role, text)],
            "status": status}


def text_part(role: str, text: str) -> Item:
    if role == "assistant":
        return {"type": "output_text", "text": text, "annotations": []}
    return {"type": "input_text", "text": text}


def input_items(value: str | list[Item]) -> list[Item]:
    """The request's `input` as canonical items, each with an id; a 400 naming the item that cannot be used."""
    if isinstance(value, str):
        return [message_item("user", value)]
    return [_item(raw, f"input[{i}]") for i, raw in enumerate(value)]


def _item(raw: Item, where: str) -> Item:
    kind = raw.get("type", "message" if "role" in raw else None)
    if kind == "message":
        return _message(raw, where)
    if kind == "function_call":
        return {"type": "function_call", "id": _str(raw, "id", where, optional=True) or new_id("fc"),
                "call_id": _str(raw, "call_id", where), "name": _str(raw, "name", where),
                "arguments": _str(raw, "arguments", where), "status": "completed"}
    if kind == "function_call_output":
        return {"type": "function_call_output", "id": _str(raw, "id", where, optional=True) or new_id("fco"),
                "call_id": _str(raw, "call_id", where), "output": _output_text(raw.get("output"), f"{where}.output"),
                "status": "completed"}
    if kind == "reasoning":
        raise unsupported(where, "reasoning items are not supported: the models here do not produce them; leave "
                          "them out of 'input'")
    if kind == "item_reference":
        raise unsupported(where, "item references are not supported; send the item itself, or chain with "
                          "'previous_response_id'")
    raise unsupported(f"{where}.type", f"input items of type {kind!r} are not supported; this server takes "
                      "message, function_call and function_call_output items")


def _str(raw: Item, key: str, where: str, optional: bool = False) -> str:
    value = raw.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str) or (not value and key != "arguments"):
        raise invalid(f"{where}.{key}", f"'{key}' must be a non-empty string")
    return value


def _message(raw: Item, where: str) -> Item:
    role = raw.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role", f"role must be one of {', '.join(ROLES)}; got {role!r}")
    content = raw.get("content")
    if isinstance(content, str):
        parts = [text_part(role, content)]
    elif isinstance(content, list):
        parts = [text_part(role, _part_text(p, f"{where}.content[{j}]")) for j, p in enumerate(content)]
    else:
        raise invalid(f"{where}.content", "content must be a string or a list of input_text parts")
    item = message_item(role, "", _str(raw, "id", where, optional=True) or None)
    item["content"] = parts
    return item


def _part_text(part: Any, where: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
        return str(part["text"])
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return str(part["refusal"])
    if kind in _MEDIA:
        raise unsupported(where, f"{_MEDIA[kind]} are not supported by the models on this server; send text only "
                          "(input_text parts)")
    raise invalid(f"{where}.type", f"content parts must be input_text (or output_text for the assistant); got "
                  f"{kind!r}")


def _output_text(output: Any, where: str) -> str:
    """A function_call_output's `output`: a string, or a list of text parts joined."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "".join(_part_text(p, f"{where}[{j}]") for j, p in enumerate(output))
    raise invalid(where, "a function_call_output's 'output' must be a string or a list of input_text parts")


def item_text(item: Item) -> str:
    return "".join(str(p.get("text", "")) for p in item.get("content") or [])


# --- the chat-completions body -----------------------------------------------------------------------------------

def chat_messages(instructions: str | None, items: list[Item]) -> list[Item]:
    """Chat messages: instructions as the system message, then the items in order; function calls join the
    assistant message right before them (parallel calls are one message), outputs become `tool` messages."""
    messages: list[Item] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        if item["type"] == "message":
            role = "system" if item["role"] == "developer" else item["role"]  # small models' templates know system
            messages.append({"role": role, "content": item_text(item)})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def chat_tools(tools: list[Item]) -> list[Item]:
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise unsupported(f"tools[{i}].type", f"tools of type {kind!r} (built-in tools) are not available on "
                              "this server; define a function tool ({\"type\": \"function\", \"name\": ..., "
                              "\"parameters\": {...}}) and run it yourself")
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise invalid(f"tools[{i}].name", "a function tool needs a 'name' of 1 to 64 letters, digits, _ or -")
        function: Item = {"name": name}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        parameters = tool.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise invalid(f"tools[{i}].parameters", "'parameters' must be a JSON schema object")
            function["parameters"] = parameters
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: str | Item | None, names: list[str]) -> str | Item | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise invalid("tool_choice", f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or "
                          "{\"type\": \"function\", \"name\": ...}")
        if choice == "required" and not names:
            raise invalid("tool_choice", "tool_choice 'required' needs at least one function in 'tools'")
        return choice
    if choice.get("type") != "function":
        raise unsupported("tool_choice", f"tool_choice of type {choice.get('type')!r} is not supported; use none, "
                          "auto, required or {\"type\": \"function\", \"name\": ...}")
    name = choice.get("name")
    if name not in names:
        raise invalid("tool_choice.name", f"tool_choice names the function {name!r}, which is not among 'tools'")
    return {"type": "function", "function": {"name": name}}


def chat_response_format(text: Item | None) -> Item | None:
    """`text.format` as chat's `response_format` (json_schema and json_object are grammar-constrained)."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        if not isinstance(fmt.get("schema"), dict):
            raise invalid("text.format.schema", "a json_schema format needs a 'schema' object")
        schema: Item = {"name": fmt.get("name") or "response", "schema": fmt["schema"]}
        for key in ("strict", "description"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        return {"type": "json_schema", "json_schema": schema}
    raise invalid("text.format.type", "text.format.type must be text, json_object or json_schema")


def chat_body(request: ResponsesRequest, items: list[Item]) -> Item:
    """The chat-completions body for `items` (the chained history, then this request's input)."""
    body: Item = {"model": request.model, "messages": chat_messages(request.instructions, items)}
    optional = {"max_tokens": request.max_output_tokens, "temperature": request.temperature, "top_p": request.top_p,
                "user": request.user, "seed": request.seed, "cache": request.cache,
                "response_format": chat_response_format(request.text)}
    body.update({k: v for k, v in optional.items() if v is not None})
    if request.tools:
        body["tools"] = chat_tools(request.tools)
        names = [t["function"]["name"] for t in body["tools"]]
        choice = chat_tool_choice(request.tool_choice, names)
        if choice is not None:
            body["tool_choice"] = choice
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
    elif request.tool_choice not in (None, "none", "auto"):
        raise invalid("tool_choice", "tool_choice asks for a tool call but 'tools' is empty")
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # the usage for response.completed
    return body


def echo_tools(tools: list[Item] | None) -> list[Item]:
    """The request's function tools as the response object shows them."""
    return [{"type": "function", "name": t.get("name"), "description": t.get("description"),
             "parameters": t.get("parameters"), "strict": t.get("strict")} for t in tools or []]
