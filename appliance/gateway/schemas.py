"""OpenAI request bodies as msgspec structs, and their decoding into clear 400s naming the bad parameter."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from appliance.errors import InvalidRequest

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=4)] | None
Choices = Annotated[int, msgspec.Meta(ge=1, le=128)]  # n, as OpenAI bounds it; beyond a worker's parallel they queue
KeepAlive = Annotated[str, msgspec.Meta(pattern=r"^-?([0-9.]+(ns|us|µs|ms|s|m|h)?)+$", max_length=32)]


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class TextPart(msgspec.Struct, tag_field="type", tag="text", frozen=True):
    text: str


class ImagePart(msgspec.Struct, tag_field="type", tag="image_url", frozen=True):
    image_url: Any


ToolName = Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionCall(msgspec.Struct, frozen=True):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(msgspec.Struct, frozen=True):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class Message(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class FunctionDefinition(msgspec.Struct, frozen=True, omit_defaults=True):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object
    strict: bool | None = None


class Tool(msgspec.Struct, frozen=True):
    function: FunctionDefinition
    type: Literal["function"] = "function"


class FunctionName(msgspec.Struct, frozen=True):
    name: str


class NamedToolChoice(msgspec.Struct, frozen=True):
    function: FunctionName
    type: Literal["function"] = "function"


class SamplingFields(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Choices = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = None
    logit_bias: dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]] | None = None
    user: str | None = None
    # the response cache (appliance/cache): "no-store" never caches this request, "store" caches even a
    # non-deterministic one; left out, deterministic requests (temperature 0 or a seed) are cached
    cache: Literal["store", "no-store"] | None = None
    # llama.cpp / vLLM extensions that OpenAI clients pass through `extra_body`
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: TopP | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0, le=2)] | None = None
    # Ollama's: how long the model stays loaded after this request (seconds or "5m"; 0 = unload, -1 = for ever)
    keep_alive: KeepAlive | float | None = None


class RagRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The `rag` extension of a chat request: answer from these collections (appliance.rag.chat)."""

    collections: Annotated[list[str], msgspec.Meta(min_length=1, max_length=16)]
    top_k: Annotated[int, msgspec.Meta(ge=1, le=50)] = 4
    mode: Literal["hybrid", "vector", "keyword"] = "hybrid"


class ChatCompletionRequest(SamplingFields, frozen=True, omit_defaults=True, kw_only=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    rag: RagRequest | None = None
    max_completion_tokens: PositiveInt | None = None
    tools: Annotated[list[Tool], msgspec.Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None


class CompletionRequest(SamplingFields, frozen=True, omit_defaults=True, kw_only=True):
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None  # the legacy form: alternatives per token


R = TypeVar("R", bound=SamplingFields)
_PATH = re.compile(r"at `\$\.?([^`]*)`")


def decode_request(body: bytes, kind: type[R]) -> R:
    return _check_semantics(decode_json(body, kind))


S = TypeVar("S", bound=msgspec.Struct)


def decode_json(body: bytes, kind: type[S]) -> S:
    """`body` as `kind`, or a 400 naming the bad parameter."""
    if not body.strip():
        raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_body")
    try:
        request = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH.search(text)
        param = match.group(1) if match else None
        message = _PATH.sub("", text).strip(" -")
        raise InvalidRequest(f"{message}" + (f" at '{param}'" if param else ""), param=param,
                             code="invalid_value") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    return request


RESPONSE_FORMATS = ("text", "json_object", "json_schema")  # the last two: grammar-constrained by the engine


def _check_semantics(request: R) -> R:
    if request.logit_bias:
        for key in request.logit_bias:
            if not key.isdigit():
                raise InvalidRequest(f"logit_bias keys are token ids; {key!r} is not", param="logit_bias",
                                     code="invalid_value")
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        _check_tools(request)
        if request.response_format and request.response_format.get("type") not in (None, *RESPONSE_FORMATS):
            raise InvalidRequest("response_format type must be one of " + ", ".join(RESPONSE_FORMATS),
                                 param="response_format", code="unsupported_value")
        for i, message in enumerate(request.messages):
            if isinstance(message.content, list) and any(isinstance(p, ImagePart) for p in message.content):
                raise InvalidRequest("this model does not accept images", param=f"messages[{i}].content",
                                     code="unsupported_value")
    return request


def _check_tools(request: ChatCompletionRequest) -> None:
    """OpenAI's rules for tools, tool_choice and the messages that carry calls and their results."""
    names = [t.function.name for t in request.tools or []]
    if len(set(names)) != len(names):
        raise InvalidRequest("two tools have the same name; each function needs its own name", param="tools",
                             code="invalid_value")
    for i, tool in enumerate(request.tools or []):
        schema = tool.function.parameters
        if schema is not None and schema.get("type", "object") != "object":
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema of type 'object'",
                                 param=f"tools[{i}].function.parameters", code="invalid_value")
    if request.tool_choice is not None and not names:
        raise InvalidRequest("'tool_choice' is only allowed when 'tools' are given", param="tool_choice",
                             code="invalid_value")
    if isinstance(request.tool_choice, NamedToolChoice) and request.tool_choice.function.name not in names:
        raise InvalidRequest(f"tool_choice names the function {request.tool_choice.function.name!r}, which is not "
                             "among the tools", param="tool_choice", code="invalid_value")
    called: set[str] = set()
    for i, message in enumerate(request.messages):
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequest("only assistant messages carry tool_calls", param=f"messages[{i}].tool_calls",
                                 code="invalid_value")
        called.update(c.id for c in message.tool_calls or [])
        if message.role == "tool":
            if not message.tool_call_id:
                raise InvalidRequest("a message with role 'tool' needs the tool_call_id of the call it answers",
                                     param=f"messages[{i}].tool_call_id", code="missing_required_parameter")
            if message.tool_call_id not in called:
                raise InvalidRequest(f"messages[{i}] answers the tool call {message.tool_call_id!r}, but no earlier "
                                     "assistant message made that call", param=f"messages[{i}].tool_call_id",
                                     code="invalid_value")


def upstream_body(request: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """The body sent to a worker: plain text content, usage always requested when streaming."""
    body: dict[str, Any] = msgspec.to_builtins(request)
    body.pop("rag", None)  # the gateway's own extension, answered before the worker
    if isinstance(request, ChatCompletionRequest):
        body["messages"] = [
            {**msgspec.to_builtins(m), "content": _text_of(m.content)} for m in request.messages
        ]
        if request.max_completion_tokens is not None:
            body["max_tokens"] = request.max_completion_tokens
    elif isinstance(request.prompt, list):
        body["prompt"] = request.prompt[0]
    body.pop("cache", None)  # ours, not the worker's
    if request.stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _text_of(content: str | list[TextPart | ImagePart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content if isinstance(p, TextPart))
