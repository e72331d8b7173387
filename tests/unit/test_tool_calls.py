"""The pure parts of tool calling: prompts per template style, grammars from schemas, calls parsed as they stream,
cached calls replayed, and the privacy screening of arguments."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.cache import replay
from appliance.cache.response import Entry
from appliance.engines.chat_template import CHATML, ChatTemplate
from appliance.engines.json_grammar import SchemaNotSupported, integer_range, schema_to_gbnf
from appliance.engines.tool_calls import (
    END,
    TRIGGER,
    ToolCallParser,
    ToolRequestError,
    ToolSet,
    ToolTraits,
    render_chat,
)
from appliance.privacy.gateway import GatewayPrivacy, SseRedactor
from appliance.privacy.policy import parse_policy
from appliance.privacy.service import Privacy

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}
# A Hermes-style template (the shape of Qwen 2.5's): tools in the system turn, calls in <tool_call> blocks.
HERMES = (
    "{% if tools %}<|im_start|>system\nTools: <tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}"
    "{% endif %}{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
HISTORY = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
           {"role": "tool", "tool_call_id": "call_1", "content": "rain, 4 C"}]


def _regex(expression: str) -> re.Pattern[str]:
    """A GBNF expression of literals, character classes and repetitions as a Python regex."""
    return re.compile(expression.replace('" "', "").replace('"', "").replace(" ", ""))


@given(st.one_of(st.none(), st.integers(-3000, 3000)), st.integers(0, 3000), st.booleans())
def test_integer_ranges_match_exactly_the_integers_in_range(lo: int | None, span: int, open_top: bool) -> None:
    hi = None if open_top or lo is None else lo + span
    pattern = _regex(integer_range(lo, hi))
    for n in range(-4000, 4000, 7):
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert bool(pattern.fullmatch(str(n))) == inside, (lo, hi, n)


def test_impossible_bounds_are_refused() -> None:
    with pytest.raises(SchemaNotSupported):
        schema_to_gbnf({"type": "integer", "minimum": 3, "maximum": 1})
    with pytest.raises(ToolRequestError) as info:
        ToolSet.from_body({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "integer", "minimum": 3, "maximum": 1}}}}}],
            "tool_choice": "required"}).plan("generic")  # type: ignore[union-attr]
    assert info.value.param == "tools"


@pytest.mark.parametrize("bounds", [{"minimum": -0.75, "maximum": -1.0}, {"minimum": 2.5, "maximum": 0.5},
                                    {"exclusiveMinimum": -0.5, "maximum": -0.5},
                                    {"minimum": 0.25, "exclusiveMaximum": 0.25}])
def test_numbers_no_value_satisfies_are_refused(bounds: dict[str, float]) -> None:
    with pytest.raises(SchemaNotSupported, match="no number lies between"):
        schema_to_gbnf({"type": "number", **bounds})


@pytest.mark.parametrize(("bounds", "value"), [({"minimum": -0.5, "maximum": -0.5}, "-0.5"),
                                               ({"minimum": 0.25, "maximum": 0.25}, "0.25"),
                                               ({"minimum": -0.75, "maximum": -0.25}, "-0.5"),
                                               ({"exclusiveMinimum": 0.2, "exclusiveMaximum": 0.6}, "0.4")])
def test_numbers_between_two_integers_get_the_one_value_the_grammar_can_name(bounds: dict[str, float],
                                                                              value: str) -> None:
    """A range that holds no integer: the grammar allows its midpoint, which the bounds admit (a single value when
    both bounds are that value and inclusive)."""
    grammar = schema_to_gbnf({"type": "number", **bounds})
    assert f'"{value}"' in grammar
    assert jsonschema.Draft202012Validator({"type": "number", **bounds}).is_valid(float(value))


def test_strings_in_grammars_exclude_control_characters() -> None:
    grammar = schema_to_gbnf({"type": "object", "properties": {"s": {"type": "string"}}})
    assert r"\x00-\x1F" in grammar


def test_plans_by_tool_choice() -> None:
    both = {"tools": [WEATHER, ADD]}
    assert ToolSet.from_body({**both, "tool_choice": "none"}).plan("generic") is None  # type: ignore[union-attr]
    auto = ToolSet.from_body(both).plan("generic")  # type: ignore[union-attr]
    assert auto is not None and auto.upfront is None and auto.lazy is not None and TRIGGER not in auto.lazy
    required = ToolSet.from_body({**both, "tool_choice": "required"}).plan("generic")  # type: ignore[union-attr]
    assert required is not None and required.upfront is not None and TRIGGER in required.upfront
    named = ToolSet.from_body({**both, "tool_choice": {"type": "function", "function": {"name": "add"}}})
    assert named is not None and named.offered == [ADD["function"]]
    plan = named.plan("generic")
    assert plan is not None and plan.upfront is not None
    assert '\\"add\\"' in plan.upfront and "get_weather" not in plan.upfront
    with_format = ToolSet.from_body(both).plan("generic", {"type": "object"})  # type: ignore[union-attr]
    assert with_format is not None and with_format.upfront is not None and "reply |" in with_format.upfront


def test_the_generic_prompt_describes_the_tools_and_renders_calls_and_results() -> None:
    template = ChatTemplate(CHATML)
    traits = ToolTraits.probe(template)
    assert traits == ToolTraits("generic", tool_role=True)
    prompt = render_chat(template, traits, HISTORY, ToolSet.from_body({"tools": [WEATHER], "tool_choice": "required"}))
    assert prompt.startswith("<|im_start|>system\n") and '"name": "get_weather"' in prompt
    assert "You must call at least one function" in prompt
    assert f'{TRIGGER}[{{"name": "get_weather", "arguments": {{"city": "Oslo"}}}}]{END}' in prompt
    assert "<|im_start|>tool\nrain, 4 C" in prompt
    assert "get_weather" not in render_chat(template, traits, HISTORY[:1], ToolSet.from_body(
        {"tools": [WEATHER], "tool_choice": "none"}))


def test_a_template_with_tools_renders_them_itself() -> None:
    template = ChatTemplate(HERMES)
    traits = ToolTraits.probe(template)
    assert traits.style == "native"
    prompt = render_chat(template, traits, HISTORY, ToolSet.from_body({"tools": [WEATHER]}))
    assert prompt.startswith("<|im_start|>system\nTools: <tools>") and "You can call functions" not in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in prompt


GENERIC_OUTPUT = (f'{TRIGGER}[{{"name": "get_weather", "arguments": {{"city": "Os\\"lo}}"}}}}, '
                  f'{{"name":"add","arguments": {{"a": 1, "b": [2, {{"c": 3}}]}}}}]{END}')
HERMES_OUTPUT = (f'{TRIGGER}\n{{"name": "add", "arguments": {{"a": 1}}}}\n{END}\n'
                 f'{TRIGGER}\n{{"name": "get_weather", "arguments": {{"city": "x"}}}}\n{END}')


@pytest.mark.parametrize("output", [GENERIC_OUTPUT, HERMES_OUTPUT])
@given(cuts=st.lists(st.integers(1, 200), max_size=20))
def test_calls_parse_the_same_however_the_text_is_cut(output: str, cuts: list[int]) -> None:
    whole = ToolCallParser()
    whole.feed(output)
    expected = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole.result()]
    assert len(expected) == 2
    streamed = ToolCallParser()
    deltas = []
    pos = 0
    for cut in [*sorted({c for c in cuts if c < len(output)}), len(output)]:
        deltas += streamed.feed(output[pos:cut])
        pos = cut
    starts = [d for d in deltas if d.id is not None]
    assert [d.name for d in starts] == [name for name, _ in expected]
    for index, (_, arguments) in enumerate(expected):
        text = "".join(d.arguments for d in deltas if d.index == index)
        assert json.loads(text) == arguments and text == text.strip()


def test_cached_calls_replay_whole_and_streamed() -> None:
    entry = Entry(True, "", "tool_calls", 10, 5, 0.0, "p", "0" * 64, tool_calls=[CALL])
    whole = json.loads(replay.whole_body(entry, "m"))
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": None, "tool_calls": [CALL]}
    events = b"".join(replay.stream_events(entry, "m", include_usage=True))
    again = replay.entry_from_stream(events, chat=True, partition="p", model_sha256="0" * 64)
    assert again is not None and again.tool_calls == [CALL] and again.finish_reason == "tool_calls"
    assert replay.entry_from_whole(json.dumps(whole).encode(), chat=True, partition="p",
                                   model_sha256="0" * 64).tool_calls == [CALL]  # type: ignore[union-attr]


def test_tool_arguments_pass_the_output_surface_whole_and_streamed() -> None:
    privacy = Privacy(parse_policy('[surfaces.output]\ndefault = "redact"\n[detectors]\nner = "off"\n'), b"k" * 32)
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [
        {**CALL, "function": {"name": "mail", "arguments": '{"to": "alice@example.com", "n": 1}'}}]}}]}
    whole = json.loads(GatewayPrivacy(privacy).screen_response(json.dumps(body).encode()))
    arguments = json.loads(whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    assert "alice@example.com" not in json.dumps(arguments) and arguments["n"] == 1
    redactor = SseRedactor(privacy)
    head = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + json.dumps({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                                      ).encode()

    out = b""
    for fragment in ['{"to": "ali', 'ce@exam', 'ple.com", "n": 1}']:
        out += redactor.event(event({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}))
    out += redactor.event(event({}, "tool_calls"))
    arguments = "".join(d["function"]["arguments"] for e in out.split(b"\n\n") if e.startswith(b"data: {")
                        for c in json.loads(e[6:])["choices"] for d in c["delta"].get("tool_calls", []))
    assert "alice@example.com" not in arguments and json.loads(arguments)["n"] == 1
