"""Responses API output: the response object built from a chat completion, and `StreamTranslator`, which turns
chat-completion chunks into the Responses event sequence (response.created, response.in_progress, output items and
content parts opened, text and argument deltas, each closed, then response.completed, .incomplete or .failed), with
`sequence_number` on every event. Pure: no I/O."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import msgspec

from appliance.gateway.responses.protocol import Item, ResponsesRequest, echo_tools, new_id

_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class Draft:
    """What a response is before the model answers: its id, creation time, request and whether it is stored."""

    id: str
    created_at: int
    request: ResponsesRequest
    store: bool

    @classmethod
    def new(cls, request: ResponsesRequest, store: bool) -> Draft:
        return cls(new_id("resp"), int(time.time()), request, store)


def response_object(draft: Draft, status: str, output: list[Item], usage: Item | None = None,
                    incomplete_details: Item | None = None, error: Item | None = None) -> Item:
    request = draft.request
    text_format = (request.text or {}).get("format") or {"type": "text"}
    return {
        "id": draft.id, "object": "response", "created_at": draft.created_at, "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "background": False, "error": error, "incomplete_details": incomplete_details,
        "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": None, "model": request.model, "output": output,
        "parallel_tool_calls": True if request.parallel_tool_calls is None else request.parallel_tool_calls,
        "previous_response_id": request.previous_response_id, "reasoning": {"effort": None, "summary": None},
        "service_tier": "default", "store": draft.store, "temperature": request.temperature,
        "text": {"format": text_format}, "tool_choice": request.tool_choice or "auto",
        "tools": echo_tools(request.tools), "top_p": request.top_p, "truncation": "disabled", "usage": usage,
        "user": request.user, "metadata": request.metadata or {},
    }


def response_usage(usage: Item | None) -> Item | None:
    """Chat usage as Responses usage."""
    if usage is None:
        return None
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


def final_status(finish_reason: str | None) -> tuple[str, Item | None]:
    """(status, incomplete_details) for a chat finish_reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def output_message(text: str, status: str, item_id: str | None = None) -> Item:
    return {"type": "message", "id": item_id or new_id("msg"), "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def function_call(call_id: str, name: str, arguments: str, status: str, item_id: str | None = None) -> Item:
    return {"type": "function_call", "id": item_id or new_id("fc"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def whole_response(draft: Draft, completion: Item) -> Item:
    """The response object for a whole chat completion."""
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    status, incomplete = final_status(choice.get("finish_reason"))
    text = message.get("content") or ""
    calls = message.get("tool_calls") or []
    output: list[Item] = []
    if text or not calls:
        output.append(output_message(text, "incomplete" if incomplete else "completed"))
    for call in calls:
        function = call.get("function") or {}
        output.append(function_call(call.get("id") or new_id("call"), function.get("name", ""),
                                    function.get("arguments", ""), "completed"))
    return response_object(draft, status, output, response_usage(completion.get("usage")), incomplete)


class StreamTranslator:
    """Chat-completion chunks in, Responses events out. Events are dicts; `encode` numbers them in order."""

    def __init__(self, draft: Draft) -> None:
        self.draft = draft
        self.output: list[Item] = []
        self.open: Item | None = None  # the output item receiving deltas
        self.pieces: list[str] = []  # the open message's text so far
        self.calls: dict[int, Item] = {}  # chat tool-call index -> its function_call item
        self.finish_reason: str | None = None
        self.usage: Item | None = None
        self.sequence = 0
        self.response: Item | None = None  # the final response object, once finished

    def encode(self, events: list[Item]) -> bytes:
        out = []
        for event in events:
            event["sequence_number"] = self.sequence
            self.sequence += 1
            out.append(b"event: " + event["type"].encode() + b"\ndata: " + _encoder.encode(event) + b"\n\n")
        return b"".join(out)

    def start(self) -> list[Item]:
        snapshot = response_object(self.draft, "in_progress", [])
        return [{"type": "response.created", "response": snapshot},
                {"type": "response.in_progress", "response": copy.deepcopy(snapshot)}]

    def chunk(self, chunk: Item) -> list[Item]:
        events: list[Item] = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def _added(self, item: Item) -> list[Item]:
        self.open = item
        self.output.append(item)
        return [{"type": "response.output_item.added", "output_index": len(self.output) - 1,
                 "item": copy.deepcopy(item)}]

    def _text(self, text: str) -> list[Item]:
        events: list[Item] = []
        if self.open is None or self.open["type"] != "message":
            events += self.close()
            item = output_message("", "in_progress")
            part = item["content"].pop()
            events += self._added(item)
            item["content"].append(part)
            self.pieces = []
            events.append({"type": "response.content_part.added", "item_id": item["id"],
                           "output_index": len(self.output) - 1, "content_index": 0, "part": copy.deepcopy(part)})
        assert self.open is not None
        self.pieces.append(text)
        events.append({"type": "response.output_text.delta", "item_id": self.open["id"],
                       "output_index": len(self.output) - 1, "content_index": 0, "delta": text, "logprobs": []})
        return events

    def _call(self, call: Item) -> list[Item]:
        events: list[Item] = []
        index = int(call.get("index", 0))
        function = call.get("function") or {}
        item = self.calls.get(index)
        if item is None:
            events += self.close()
            item = function_call(call.get("id") or new_id("call"), function.get("name") or "", "", "in_progress")
            self.calls[index] = item
            events += self._added(item)
        arguments = function.get("arguments")
        if arguments:
            item["arguments"] += arguments
            events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                           "output_index": self.output.index(item), "delta": arguments})
        return events

    def close(self, status: str = "completed") -> list[Item]:
        """Events that finish the open output item (none when none is open)."""
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.output.index(item)
        item["status"] = status
        if item["type"] == "function_call":
            return [{"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": index,
                     "name": item["name"], "arguments": item["arguments"]},
                    {"type": "response.output_item.done", "output_index": index, "item": copy.deepcopy(item)}]
        part = item["content"][0]
        part["text"] = "".join(self.pieces)
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [{"type": "response.output_text.done", **where, "text": part["text"], "logprobs": []},
                {"type": "response.content_part.done", **where, "part": copy.deepcopy(part)},
                {"type": "response.output_item.done", "output_index": index, "item": copy.deepcopy(item)}]

    def finish(self) -> list[Item]:
        """The closing events: the open item done, then response.completed (or .incomplete at max_output_tokens)."""
        status, incomplete = final_status(self.finish_reason)
        events = self.close("incomplete" if incomplete else "completed")
        if not self.output:  # nothing generated at all: an empty message, as a whole response has
            events += self._text("")[:-1] + self.close("incomplete" if incomplete else "completed")
        self.response = response_object(self.draft, status, self.output, response_usage(self.usage), incomplete)
        return [*events, {"type": f"response.{status}", "response": self.response}]

    def fail(self, error: Item) -> list[Item]:
        """An `error` event, then response.failed carrying what was generated so far."""
        if self.open is not None:
            self.open["status"] = "incomplete"
            if self.open["type"] == "message":
                self.open["content"][0]["text"] = "".join(self.pieces)
            self.open = None
        message = str(error.get("message") or "the response failed")
        failed = response_object(self.draft, "failed", self.output, response_usage(self.usage),
                                 error={"code": "server_error", "message": message})
        return [{"type": "error", "code": error.get("code"), "message": message, "param": error.get("param")},
                {"type": "response.failed", "response": failed}]
