"""Agent frameworks against the real server and default model, each changing nothing but the base URL and key:
the official openai SDK (a hand-written tool loop), LangChain (`ChatOpenAI.bind_tools`, whole and streamed), the
OpenAI Agents SDK (through Chat Completions and through Responses, run whole and streamed) and AutoGen (its model
client's tool loop, and an AgentChat `AssistantAgent`).

The default model (SmolLM2-135M) rarely calls a tool of its own accord, so the agents ask with tool_choice
"required", which the worker's grammar turns into a call whose arguments validate against the tool's schema. Each
test checks what an agent depends on: the tool really ran with arguments that validate against the schema the
framework sent, the result went back under the call's id, a final text answer came, and usage was counted. The
response cache is off on this module's server so that every request reaches the model."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from typing import Any, Literal

import jsonschema
import pytest

from tests.server import DEFAULT_MODEL, Running

QUESTION = "What is the weather in Paris, in celsius?"
INSTRUCTIONS = "You answer questions about the weather with the get_weather tool."
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "The city's name"},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a "
                                                 "city.", "parameters": WEATHER_SCHEMA}}
MAX_TOKENS = 40  # a call here takes ~30 tokens; final answers are cut short, which is enough to see them
Unit = Literal["celsius", "fahrenheit"]


class Weather:
    """The tool behind every framework's agent: records each call's arguments and answers with a fixed report."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, city: str, unit: Unit) -> str:
        self.calls.append({"city": city, "unit": unit})
        return json.dumps({"city": city, "temperature": 18 if unit == "celsius" else 64, "unit": unit,
                           "sky": "clear"})

    def function(self) -> Callable[[str, Unit], str]:
        """The tool as a plain function, whose name, annotations and docstring the frameworks read."""

        def get_weather(city: str, unit: Unit) -> str:
            """Get the current weather in a city."""
            return self(city, unit)

        return get_weather


def assert_valid_arguments(arguments: str | dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(parsed, schema)
    return parsed


@pytest.fixture(scope="module")
def agents_server(start_server: Callable[..., Running]) -> Running:
    if url := os.environ.get("APPLIANCE_TEST_URL"):
        return Running(url.rstrip("/"), os.environ["APPLIANCE_TEST_KEY"])
    return start_server({"APPLIANCE_CACHE__ENABLED": "false"})


# ---------------------------------------------------------------------------------------------------- openai SDK


def test_openai_sdk_tool_loop(agents_server: Running) -> None:
    client = agents_server.client()
    weather = Weather()
    messages: list[Any] = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
    first = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, tools=[WEATHER_TOOL],
                                           tool_choice="required", max_tokens=MAX_TOKENS, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls, choice.message
    messages.append(choice.message.model_dump(exclude_none=True))
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        arguments = assert_valid_arguments(call.function.arguments, WEATHER_SCHEMA)
        messages.append({"role": "tool", "tool_call_id": call.id, "content": weather(**arguments)})
    assert len(weather.calls) == len(choice.message.tool_calls)
    assert first.usage is not None and first.usage.completion_tokens > 0

    final = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, tools=[WEATHER_TOOL],
                                           tool_choice="none", max_tokens=MAX_TOKENS, temperature=0)
    answer = final.choices[0]
    assert answer.message.tool_calls is None
    assert answer.finish_reason in ("stop", "length")
    assert (answer.message.content or "").strip()
    assert final.usage is not None and final.usage.completion_tokens > 0


# ---------------------------------------------------------------------------------------------------- LangChain


def _langchain(agents_server: Running, weather: Weather, **kwargs: Any) -> tuple[Any, Any]:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    get_weather = tool(weather.function())
    llm = ChatOpenAI(base_url=agents_server.url + "/v1", api_key=agents_server.key, model=DEFAULT_MODEL,
                     max_tokens=MAX_TOKENS, temperature=0, max_retries=0, **kwargs)
    return llm, get_weather


def test_langchain_tool_loop(agents_server: Running) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
    from langchain_core.utils.function_calling import convert_to_openai_tool

    weather = Weather()
    llm, get_weather = _langchain(agents_server, weather)
    schema = convert_to_openai_tool(get_weather)["function"]["parameters"]
    messages: list[Any] = [SystemMessage(INSTRUCTIONS), HumanMessage(QUESTION)]
    ai = llm.bind_tools([get_weather], tool_choice="required").invoke(messages)
    assert isinstance(ai, AIMessage)
    assert ai.tool_calls and not ai.invalid_tool_calls, ai
    assert ai.response_metadata["finish_reason"] == "tool_calls"
    assert ai.usage_metadata is not None and ai.usage_metadata["output_tokens"] > 0
    messages.append(ai)
    for call in ai.tool_calls:
        assert call["name"] == "get_weather" and call["id"]
        assert_valid_arguments(call["args"], schema)
        result = get_weather.invoke(call)  # a ToolMessage answering call["id"]
        assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
        messages.append(result)
    assert len(weather.calls) == len(ai.tool_calls)

    final = llm.invoke(messages)
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert isinstance(final.content, str) and final.content.strip()
    assert final.usage_metadata is not None and final.usage_metadata["output_tokens"] > 0


def test_langchain_streams_tool_call_chunks(agents_server: Running) -> None:
    from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
    from langchain_core.utils.function_calling import convert_to_openai_tool

    weather = Weather()
    llm, get_weather = _langchain(agents_server, weather, stream_usage=True)
    schema = convert_to_openai_tool(get_weather)["function"]["parameters"]
    chunks = list(llm.bind_tools([get_weather], tool_choice="get_weather").stream(
        [SystemMessage(INSTRUCTIONS), HumanMessage(QUESTION)]))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    fragments = [tc for c in chunks for tc in c.tool_call_chunks]
    assert len(fragments) > 2, "the arguments arrive in pieces, not in one chunk at the end"
    assert fragments[0]["name"] == "get_weather" and fragments[0]["id"], "the name and id come first"
    assert all(f["name"] is None for f in fragments[1:])
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    assert isinstance(whole, AIMessageChunk)
    assert len(whole.tool_calls) == 1 and not whole.invalid_tool_calls, whole
    assert_valid_arguments(whole.tool_calls[0]["args"], schema)
    get_weather.invoke(whole.tool_calls[0])
    assert len(weather.calls) == 1
    assert whole.response_metadata["finish_reason"] == "tool_calls"
    assert whole.usage_metadata is not None and whole.usage_metadata["output_tokens"] > 0


# ---------------------------------------------------------------------------------------------------- OpenAI Agents SDK


@pytest.mark.parametrize(("api", "streamed"), [("chat_completions", False), ("chat_completions", True),
                                               ("responses", False), ("responses", True)])
def test_openai_agents_sdk(agents_server: Running, api: str, streamed: bool) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        ToolCallItem,
        ToolCallOutputItem,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # no trace export: nothing leaves the box
    weather = Weather()

    get_weather = function_tool(weather.function())

    async def run() -> Any:
        async with AsyncOpenAI(base_url=agents_server.url + "/v1", api_key=agents_server.key,
                               max_retries=0) as client:
            model = (OpenAIChatCompletionsModel(model=DEFAULT_MODEL, openai_client=client) if api == "chat_completions"
                     else OpenAIResponsesModel(model=DEFAULT_MODEL, openai_client=client))
            # "required" for the first turn; the SDK's reset_tool_choice makes the next turn "auto", so it ends
            agent = Agent(name="weather", instructions=INSTRUCTIONS, tools=[get_weather], model=model,
                          model_settings=ModelSettings(tool_choice="required", max_tokens=MAX_TOKENS, temperature=0,
                                                       include_usage=True))
            if not streamed:
                return await Runner.run(agent, QUESTION, max_turns=4)
            result = Runner.run_streamed(agent, QUESTION, max_turns=4)
            events = [e.data.type async for e in result.stream_events() if e.type == "raw_response_event"]
            assert "response.function_call_arguments.delta" in events and "response.output_text.delta" in events
            assert events.count("response.completed") == 2, events
            return result

    result = asyncio.run(run())
    calls = [item.raw_item for item in result.new_items if isinstance(item, ToolCallItem)]
    outputs = [item.raw_item for item in result.new_items if isinstance(item, ToolCallOutputItem)]
    assert len(calls) == len(weather.calls) >= 1
    for call in calls:
        assert call.name == "get_weather"
        assert_valid_arguments(call.arguments, get_weather.params_json_schema)
    assert {o["call_id"] for o in outputs} == {c.call_id for c in calls}
    assert isinstance(result.final_output, str) and result.final_output.strip()
    usage = result.context_wrapper.usage
    assert usage.requests == 2
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


# ---------------------------------------------------------------------------------------------------- AutoGen

MODEL_INFO: dict[str, Any] = {"vision": False, "function_calling": True, "json_output": True, "family": "unknown",
                              "structured_output": True, "multiple_system_messages": False}


def _autogen_client(agents_server: Running) -> Any:
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    return OpenAIChatCompletionClient(model=DEFAULT_MODEL, base_url=agents_server.url + "/v1",
                                      api_key=agents_server.key, model_info=MODEL_INFO,  # type: ignore[arg-type]
                                      max_tokens=MAX_TOKENS, temperature=0, max_retries=0)


def test_autogen_model_client_tool_loop(agents_server: Running) -> None:
    """AutoGen's own tool loop (its model client, FunctionTool and result messages) with tool_choice "required":
    AgentChat's AssistantAgent always asks with "auto", which the default model answers in text."""
    from autogen_core import CancellationToken, FunctionCall
    from autogen_core.models import (
        AssistantMessage,
        FunctionExecutionResult,
        FunctionExecutionResultMessage,
        SystemMessage,
        UserMessage,
    )
    from autogen_core.tools import FunctionTool

    weather = Weather()
    tool = FunctionTool(weather.function(), description="Get the current weather in a city.")

    async def run() -> tuple[Any, Any]:
        client = _autogen_client(agents_server)
        try:
            messages: list[Any] = [SystemMessage(content=INSTRUCTIONS), UserMessage(content=QUESTION, source="user")]
            first = await client.create(messages, tools=[tool], tool_choice="required")
            assert first.finish_reason == "function_calls"
            assert isinstance(first.content, list) and first.content, first
            results = []
            for call in first.content:
                assert isinstance(call, FunctionCall) and call.name == "get_weather"
                arguments = assert_valid_arguments(call.arguments, tool.schema["parameters"])  # type: ignore[arg-type]
                output = await tool.run_json(arguments, CancellationToken(), call_id=call.id)
                results.append(FunctionExecutionResult(content=tool.return_value_as_string(output), call_id=call.id,
                                                       name=call.name, is_error=False))
            messages += [AssistantMessage(content=first.content, source="weather"),
                         FunctionExecutionResultMessage(content=results)]
            final = await client.create(messages, tools=[tool], tool_choice="none")
            return first, final
        finally:
            await client.close()

    first, final = asyncio.run(run())
    assert len(weather.calls) == len(first.content)
    assert isinstance(final.content, str) and final.content.strip()
    assert first.usage.completion_tokens > 0 and final.usage.completion_tokens > 0


def test_autogen_assistant_agent_with_a_tool(agents_server: Running) -> None:
    """An AgentChat AssistantAgent offered a tool ends with a final message and counted usage; whatever the model
    chooses under "auto", a call it makes runs with valid arguments and is reflected on."""
    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.messages import TextMessage, ToolCallExecutionEvent, ToolCallRequestEvent

    weather = Weather()

    async def run() -> Any:
        client = _autogen_client(agents_server)
        try:
            agent = AssistantAgent("weather", model_client=client, tools=[weather.function()],
                                   system_message=INSTRUCTIONS, reflect_on_tool_use=True)
            return await agent.run(task=QUESTION)
        finally:
            await client.close()

    result = asyncio.run(run())
    final = result.messages[-1]
    assert isinstance(final, TextMessage) and final.source == "weather" and final.content.strip()
    assert final.models_usage is not None and final.models_usage.completion_tokens > 0
    requests = [m for m in result.messages if isinstance(m, ToolCallRequestEvent)]
    executions = [m for m in result.messages if isinstance(m, ToolCallExecutionEvent)]
    assert len(weather.calls) == sum(len(r.content) for r in requests)
    for request in requests:
        for call in request.content:
            assert_valid_arguments(call.arguments, WEATHER_SCHEMA | {"additionalProperties": True})
    assert all(not r.is_error for e in executions for r in e.content)
