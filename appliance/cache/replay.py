"""A cached response as the worker would have sent it, whole or streamed, and a worker's response as an `Entry`.

The shapes follow `appliance.engines.llamacpp_worker.CompletionFormat` (a test compares them key by key), with
usage reporting the whole prompt as cached (`prompt_tokens_details.cached_tokens`). The gateway always asks the
worker for usage when streaming, so every streamed chunk carries `"usage": null` and the usage chunk is passed on
only when the client asked for it; a replay does the same."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec

from appliance.cache.response import Entry

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()
_PIECE = re.compile(r"\s*\S+|\s+$")


def _usage(entry: Entry) -> dict[str, Any]:
    return {"prompt_tokens": entry.prompt_tokens, "completion_tokens": entry.completion_tokens,
            "total_tokens": entry.prompt_tokens + entry.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": entry.prompt_tokens}}


def _head(entry: Entry, model: str, chunk: bool) -> dict[str, Any]:
    kind = "chat.completion" if entry.chat else "text_completion"
    return {"id": ("chatcmpl-" if entry.chat else "cmpl-") + uuid.uuid4().hex,
            "object": kind + (".chunk" if chunk and entry.chat else ""), "created": int(time.time()),
            "model": model, "system_fingerprint": None}


def whole_body(entry: Entry, model: str) -> bytes:
    """The non-streamed response body."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": entry.finish_reason}
    if entry.chat:
        choice["message"] = {"role": "assistant", "content": entry.text}
        if entry.tool_calls:
            choice["message"] = {"role": "assistant", "content": entry.text or None, "tool_calls": entry.tool_calls}
    else:
        choice["text"] = entry.text
    return _encoder.encode({**_head(entry, model, False), "choices": [choice], "usage": _usage(entry)})


def pieces(text: str) -> list[str]:
    """The text cut into word-sized pieces (the worker streams about a token a chunk); joined, they are the text."""
    parts = [m.group(0) for m in _PIECE.finditer(text)]
    assert "".join(parts) == text, "replay pieces must rebuild the text"
    return parts or [""]


def stream_events(entry: Entry, model: str, include_usage: bool) -> Iterator[bytes]:
    """The server-sent events of a streamed response, ending with `data: [DONE]`."""
    head = _head(entry, model, True)
    out = []
    for i, text in enumerate([*pieces(entry.text), None]):
        finish = entry.finish_reason if text is None else None  # the finish in a chunk of its own, as OpenAI does
        if entry.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if i == 0 else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        out.append(b"data: " + _encoder.encode({**head, "choices": [choice], "usage": None}) + b"\n\n")
        if text is None and entry.tool_calls:  # the calls before the finish: each its name, then its arguments
            for n, call in enumerate(entry.tool_calls):
                start = {"index": n, "id": call["id"], "type": "function",
                         "function": {"name": call["function"]["name"], "arguments": ""}}
                rest = {"index": n, "function": {"arguments": call["function"]["arguments"]}}
                for part in (start, rest):
                    delta_choice = {"index": 0, "delta": {"tool_calls": [part]}, "logprobs": None,
                                    "finish_reason": None}
                    out.insert(len(out) - 1, b"data: " + _encoder.encode(
                        {**head, "choices": [delta_choice], "usage": None}) + b"\n\n")
    if include_usage:
        out.append(b"data: " + _encoder.encode({**head, "choices": [], "usage": _usage(entry)}) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    yield b"".join(out)


def entry_from_whole(body: bytes, *, chat: bool, partition: str, model_sha256: str) -> Entry | None:
    """The entry for a worker's whole response, or None when it is not a complete single answer."""
    try:
        response = _decoder.decode(body)
        choice = response["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        calls = choice["message"].get("tool_calls") if chat else None
        usage = response["usage"]
        return Entry(chat, str(text or ""), str(choice.get("finish_reason") or "stop"), int(usage["prompt_tokens"]),
                     int(usage["completion_tokens"]), time.time(), partition, model_sha256, tool_calls=calls or None)
    except (msgspec.DecodeError, KeyError, IndexError, TypeError, ValueError):
        return None


def entry_from_stream(events: bytes, *, chat: bool, partition: str, model_sha256: str) -> Entry | None:
    """The entry for a worker's streamed response (its SSE bytes, with the usage chunk), or None when the stream
    did not finish (an error event, a disconnect) or carried no usage."""
    parts: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish: str | None = None
    usage: dict[str, Any] | None = None
    for event in events.split(b"\n\n"):
        if not event.startswith(b"data: {"):
            continue
        try:
            chunk = _decoder.decode(event[6:])
        except msgspec.DecodeError:
            return None
        if "error" in chunk:
            return None
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            parts.append((choice.get("delta") or {}).get("content") or "" if chat else choice.get("text") or "")
            for call in (choice.get("delta") or {}).get("tool_calls") or () if chat else ():
                _add_call_delta(calls, call)
            finish = choice.get("finish_reason") or finish
    if finish is None or usage is None or not events.rstrip().endswith(b"data: [DONE]"):
        return None
    return Entry(chat, "".join(parts), finish, int(usage["prompt_tokens"]), int(usage["completion_tokens"]),
                 time.time(), partition, model_sha256, tool_calls=[calls[i] for i in sorted(calls)] or None)


def _add_call_delta(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    """Fold one streamed tool-call delta into the calls seen so far (by index)."""
    index = int(delta.get("index", 0))
    function = delta.get("function") or {}
    call = calls.setdefault(index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call["id"] = delta.get("id") or call["id"]
    call["function"]["name"] += function.get("name") or ""
    call["function"]["arguments"] += function.get("arguments") or ""
