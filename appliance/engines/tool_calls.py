"""Tool calling for the llama.cpp worker: tools into the prompt, a grammar for the calls, calls out of the text.

How a model is asked for calls depends on its chat template (probed once, as llama.cpp's server does):
* **native**: the template renders `tools` itself and writes calls Hermes-style (Qwen 2.5/3, Hermes, SmolLM3 ...):
  each call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
* **generic**: any other template. The tools and the format go into the system message, and the calls are one
  JSON list, `<tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>`, the format SmolLM2 was tuned on.

Either way, generation is constrained by a grammar built from the tools' JSON schemas, so a call always names a
given tool and its arguments validate against that tool's schema. With `tool_choice` "required" or a named
function the grammar holds from the first token. With "auto" the model writes freely and the grammar starts when
it writes `<tool_call>` (a lazy grammar): the text before is the reply's content. "none" leaves tools out.

Sampling with a grammar checks the token the unconstrained sampler picked first and only filters the whole
vocabulary when the grammar refuses it (llama.cpp's common sampler does the same), which keeps a constrained
token nearly as cheap as a free one."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.engines.chat_template import ChatTemplate, ChatTemplateError
from appliance.engines.json_grammar import SchemaNotSupported, grammar_with_root

TRIGGER = "<tool_call>"
END = "</tool_call>"
Style = Literal["native", "generic"]
_CALL_START = re.compile(r'\{\s?"name"\s?:\s?"([^"\\]*)"\s?,\s?"arguments"\s?:\s?')


class ToolRequestError(ValueError):
    """The request's tools cannot be honoured (a schema the grammar cannot express ...); `param` names the field."""

    def __init__(self, message: str, param: str = "tools") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolPlan:
    """How a request's calls are constrained: a grammar from the first token (`upfront`: "required", a named
    function, or "auto" beside a response_format), or one that starts once TRIGGER has been written (`lazy`).
    Either way the text from TRIGGER on is the calls, and the text before it the reply's content."""

    upfront: str | None  # GBNF for the whole output
    lazy: str | None  # GBNF for the text after TRIGGER


@dataclass
class ToolSet:
    """The tools of one chat request, as OpenAI's chat API gives them."""

    functions: list[dict[str, Any]]  # each {"name", "description"?, "parameters"?}
    choice: str  # "auto", "required", "none" or a function's name
    parallel: bool = True

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ToolSet | None:
        tools = body.get("tools") or []
        functions = [dict(t["function"]) for t in tools if t.get("type", "function") == "function"]
        if not functions:
            return None
        choice = body.get("tool_choice") or "auto"
        if isinstance(choice, Mapping):
            choice = str((choice.get("function") or {}).get("name") or choice.get("name") or "")
            if choice not in {f["name"] for f in functions}:
                raise ToolRequestError(f"tool_choice names {choice!r}, which is not among the tools", "tool_choice")
        parallel = body.get("parallel_tool_calls")
        return cls(functions, str(choice), True if parallel is None else bool(parallel))

    @property
    def offered(self) -> list[dict[str, Any]]:
        """The functions the model may call (all, or the named one)."""
        if self.choice in ("auto", "required", "none"):
            return self.functions
        return [f for f in self.functions if f["name"] == self.choice]

    def plan(self, style: Style, response_schema: dict[str, Any] | None = None) -> ToolPlan | None:
        """The grammar for this request's calls, or None when no call may be made. `response_schema` is the JSON
        schema of response_format, which a reply that makes no call must follow."""
        if self.choice == "none":
            return None
        schemas = {}
        names = []
        for i, function in enumerate(self.offered):
            parameters = function.get("parameters") or {"type": "object", "properties": {}}
            schemas[f"call{i}"] = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                                   "properties": {"name": {"const": function["name"]}, "arguments": parameters}}
            names.append(f"call{i}")
        call = "(" + " | ".join(names) + ")"
        if style == "generic":
            calls = f'"[" {call} ("," " "? {call})* "]"' if self.parallel else f'"[" {call} "]"'
            after = f'"\\n"? {calls} "\\n"? "{END}"'
        else:
            block = f'"\\n"? {call} "\\n"? "{END}"'
            after = f'{block} ("\\n"? "{TRIGGER}" {block})*' if self.parallel else block
        calls_only = f'"{TRIGGER}" {after}'
        try:
            if self.choice != "auto":
                return ToolPlan(grammar_with_root(calls_only, schemas, ["name", "arguments"]), None)
            if response_schema is not None:
                schemas["reply"] = response_schema
                return ToolPlan(grammar_with_root(f"reply | {calls_only}", schemas, ["name", "arguments"]), None)
            return ToolPlan(None, grammar_with_root(after, schemas, ["name", "arguments"]))
        except SchemaNotSupported as exc:
            raise ToolRequestError(f"a tool's parameters cannot be enforced: {exc}") from exc


# ---------------------------------------------------------------------------------------------------- prompting

GENERIC_PROMPT = """You can call functions (tools). These are the functions, with JSON schemas of their arguments:
<tools>{tools}</tools>

To call functions, write only a list of calls between the tags, like this:
<tool_call>[{{"name": "function_name", "arguments": {{"argument": "value"}}}}]</tool_call>
{when}"""
WHEN = {
    "auto": "Call a function when it helps to answer; otherwise answer the user directly in plain text.",
    "required": "You must call at least one function now.",
}


@dataclass(frozen=True)
class ToolTraits:
    """What a chat template does with tools, probed by rendering once when the model loads: `style` is "native"
    when it renders `tools` itself and writes Hermes-style calls, else "generic"; `tool_role` whether it renders
    `tool` messages (else results go back as user messages)."""

    style: Style
    tool_role: bool

    @classmethod
    def probe(cls, template: ChatTemplate) -> ToolTraits:
        style: Style = "generic"
        if TRIGGER in template.source and "tools" in template.source:
            probe = {"type": "function", "function": {"name": "probe_tool_name", "description": "d",
                                                      "parameters": {"type": "object", "properties": {}}}}
            with contextlib.suppress(ChatTemplateError):
                if "probe_tool_name" in template.render([{"role": "user", "content": "hi"}], tools=[probe]):
                    style = "native"
        try:
            tool_role = "probe_tool_result" in template.render(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                 {"role": "tool", "content": "probe_tool_result", "tool_call_id": "c1"}])
        except ChatTemplateError:
            tool_role = False
        return cls(style, tool_role)


def _calls_text(calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            parsed = arguments
        out.append({"name": function.get("name", ""), "arguments": parsed})
    return out


def render_chat(template: ChatTemplate, traits: ToolTraits, messages: Sequence[Mapping[str, Any]],
                tools: ToolSet | None) -> str:
    """The prompt for a chat whose messages may carry tool calls and results, offering `tools` (None: no tools);
    `traits` are the template's (`ToolTraits.probe`)."""
    style = traits.style
    offered = tools is not None and tools.choice != "none"
    if style == "native":
        native = [{**m, "tool_calls": [{**c, "function": {**c.get("function", {}), "arguments": a["arguments"]}}
                                       for c, a in zip(m["tool_calls"], _calls_text(m["tool_calls"]), strict=True)]}
                  if m.get("tool_calls") else dict(m) for m in messages]
        spec = [{"type": "function", "function": f} for f in tools.offered] if tools is not None and offered else None
        return template.render(native, tools=spec)
    generic: list[dict[str, Any]] = []
    tool_role = traits.tool_role
    for message in messages:
        if message.get("tool_calls"):
            calls = json.dumps(_calls_text(message["tool_calls"]), ensure_ascii=False)
            generic.append({"role": "assistant", "content": f"{message.get('content') or ''}{TRIGGER}{calls}{END}"})
        elif message.get("role") == "tool":
            result = str(message.get("content") or "")
            generic.append({"role": "tool", "content": result} if tool_role else
                           {"role": "user", "content": f"<tool_response>{result}</tool_response>"})
        else:
            generic.append({"role": message["role"], "content": message.get("content") or ""})
    if tools is not None and offered:
        described = json.dumps([{k: f[k] for k in ("name", "description", "parameters") if k in f}
                                for f in tools.offered], ensure_ascii=False)
        when = WHEN.get(tools.choice, f"You must call the function {tools.choice} now.")
        instructions = GENERIC_PROMPT.format(tools=described, when=when)
        if generic and generic[0]["role"] in ("system", "developer"):
            generic[0] = {"role": generic[0]["role"], "content": f"{generic[0]['content']}\n\n{instructions}"}
        else:
            generic.insert(0, {"role": "system", "content": instructions})
    return template.render(generic)


# ---------------------------------------------------------------------------------------------------- parsing


@dataclass
class CallDelta:
    """A piece of a streamed call: its start (`id` and `name` set, `arguments` empty) or an arguments fragment."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False


@dataclass
class ToolCallParser:
    """Reads calls out of the grammar-constrained text as it arrives (both styles: the calls are
    `{"name": N, "arguments": A}` objects, name first), handing out deltas for streaming."""

    calls: list[ToolCall] = field(default_factory=list)
    text: str = ""
    pos: int = 0  # where scanning resumes in `text`
    depth: int = 0  # nesting inside the current call's arguments (0: not inside arguments)
    in_string: bool = False
    escaped: bool = False

    def feed(self, text: str) -> list[CallDelta]:
        self.text += text
        deltas: list[CallDelta] = []
        while self.pos < len(self.text):
            if not self.calls or self.calls[-1].complete:
                match = _CALL_START.search(self.text, self.pos)
                if match is None:
                    break
                call = ToolCall("call_" + secrets.token_hex(12), match.group(1))
                self.calls.append(call)
                deltas.append(CallDelta(len(self.calls) - 1, "", call.id, call.name))
                self.pos = match.end()
                self.depth = 0
                continue
            while self.depth == 0 and self.pos < len(self.text) and self.text[self.pos].isspace():
                self.pos += 1  # the grammar's optional space before the arguments
            start = self.pos
            self.pos = self._scan_arguments(start)
            call = self.calls[-1]
            fragment = self.text[start:self.pos]
            call.arguments += fragment
            if fragment:
                deltas.append(CallDelta(len(self.calls) - 1, fragment))
        return deltas

    def _scan_arguments(self, i: int) -> int:
        """Advance over the arguments' JSON from `i`; marks the call complete at its end. Returns where it stopped."""
        text = self.text
        while i < len(text):
            c = text[i]
            i += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.calls[-1].complete = True
                    return i
        return i

    def result(self) -> list[dict[str, Any]]:
        """The calls in OpenAI's message shape; a call cut short (max_tokens) keeps the arguments it got."""
        return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.calls]
