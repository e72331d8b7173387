"""The privacy policy on the completion path: the `prompt` surface on what goes to the model (block -> 422;
redact, mask, pseudonymize rewrite the messages) and the `output` surface on what comes back, whole or streamed
(SSE events are rewritten in place; text that might still be part of an entity is held back briefly, see
appliance/privacy/streaming.py). Called from appliance/gateway/service.py.

Every choice of an n > 1 response is screened on its own. Logprobs spell out the text token by token, so they follow
their text: a stream's logprobs are held back while their choice's text is, and a choice whose text the policy
rewrote loses its logprobs (whole: that choice's; streamed: from the rewrite on), rather than show what was hidden."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import msgspec

from appliance.privacy.actions import PiiBlocked, Placeholders
from appliance.privacy.service import Privacy
from appliance.privacy.streaming import StreamRedactor

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_OUTPUT = "the model's answer"


class GatewayPrivacy:
    def __init__(self, privacy: Privacy) -> None:
        self.privacy = privacy

    def screen_request(self, body: dict[str, Any]) -> None:
        """Rewrite the upstream body's messages (or prompt) in place; PiiBlocked (422) when the policy blocks."""
        if self.privacy.passes_everything("prompt"):
            return
        marks = Placeholders()  # one numbering across the messages: the same value is the same placeholder
        if "messages" in body:
            for message in body["messages"]:
                if message.get("content"):
                    message["content"] = self.privacy.enforce("prompt", message["content"], marks)
                for call in message.get("tool_calls") or []:  # arguments the model wrote earlier
                    call["function"]["arguments"] = self._arguments("prompt", call["function"]["arguments"], marks)
            for tool in body.get("tools") or []:  # definitions are prompt text too: descriptions, enums, examples
                tool["function"] = _strings(tool["function"], lambda t: self.privacy.enforce("prompt", t, marks))
        elif isinstance(body.get("prompt"), str):
            body["prompt"] = self.privacy.enforce("prompt", body["prompt"], marks)

    def screen_response(self, content: bytes) -> bytes:
        """A whole OpenAI response body with the output surface applied to each choice's text."""
        if self.privacy.passes_everything("output"):
            return content
        document = _decoder.decode(content)
        marks = Placeholders()
        for choice in document.get("choices") or []:
            message = choice.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                message["content"] = self._output(choice, message["content"], marks)
            if isinstance(message, dict):
                for call in message.get("tool_calls") or []:
                    call["function"]["arguments"] = self._arguments("output", call["function"]["arguments"], marks)
            if isinstance(choice.get("text"), str):
                choice["text"] = self._output(choice, choice["text"], marks)
        return _encoder.encode(document)

    def _output(self, choice: dict[str, Any], text: str, marks: Placeholders) -> str:
        """A choice's text with the output surface applied; its logprobs go when they would spell out a rewrite."""
        screened = self.privacy.enforce("output", text, marks, _OUTPUT)
        if screened != text:
            choice["logprobs"] = None
        return screened

    def _arguments(self, surface: Literal["prompt", "output"], arguments: str, marks: Placeholders) -> str:
        """Tool-call arguments (JSON text) with the surface applied to each string in them, so they stay JSON."""
        where = _OUTPUT if surface == "output" else "the request"
        try:
            document = json.loads(arguments)
        except ValueError:
            return self.privacy.enforce(surface, arguments, marks, where)
        screened = _strings(document, lambda t: self.privacy.enforce(surface, t, marks, where))
        return arguments if screened == document else json.dumps(screened, ensure_ascii=False)

    def screen_stream(self, events: AsyncIterator[bytes], error_event: Any) -> AsyncIterator[bytes]:
        """The relayed SSE bytes (whole events, `\\n\\n`-terminated) with the output surface applied; a blocked
        entity ends the stream with `error_event(PiiBlocked)`."""
        if self.privacy.passes_everything("output"):
            return events
        return SseRedactor(self.privacy).run(events, error_event)


class ChoiceLogprobs:
    """A streamed choice's logprobs, released only with text that was released as the model wrote it."""

    def __init__(self) -> None:
        self.unreleased = ""  # text fed to the redactor and not yet released
        self.held: list[dict[str, Any]] = []
        self.rewritten = False

    def follow(self, fed: str, released: str, logprobs: dict[str, Any] | None) -> dict[str, Any] | None:
        """The logprobs to send with `released`, the text released for `fed` (and `logprobs`, its chunk's)."""
        if self.rewritten:
            return None
        self.unreleased += fed
        if not self.unreleased.startswith(released):
            self.rewritten, self.held = True, []
            return None
        self.unreleased = self.unreleased[len(released):]
        if logprobs is not None:
            self.held.append(logprobs)
        if self.unreleased or not self.held:
            return None
        out = self.held[0] if len(self.held) == 1 else merge_logprobs(self.held)  # the same object: no re-encoding
        self.held = []
        return out


def merge_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several chunks' logprobs as one: chat's `content` lists, or the legacy completions' parallel lists, joined."""
    merged = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            if isinstance(value, list) and isinstance(merged.get(key), list):
                merged[key] = [*merged[key], *value]
    return merged
def _strings(value: Any, apply: Callable[[str], str]) -> Any:
    """`value` (JSON-like) with `apply` run on every string in it, keys aside."""
    if isinstance(value, str):
        return apply(value)
    if isinstance(value, dict):
        return {k: _strings(v, apply) for k, v in value.items()}
    if isinstance(value, list):
        return [_strings(v, apply) for v in value]
    return value


class SseRedactor:
    """Rewrites OpenAI SSE chunks: each choice's text goes through its own StreamRedactor; held text is released
    with the choice's finish chunk, or in a chunk of its own before `[DONE]`."""

    def __init__(self, privacy: Privacy) -> None:
        self.privacy = privacy
        self.redactors: dict[int, StreamRedactor] = {}
        self.logprobs: dict[int, ChoiceLogprobs] = {}
        self.call_redactors: dict[tuple[int, int], StreamRedactor] = {}  # (choice, call): its arguments' text
        self.template: dict[str, Any] | None = None
        self.chat = True

    def _redactor(self, index: int) -> StreamRedactor:
        if index not in self.redactors:
            redactor = self.privacy.stream("output", _OUTPUT)
            assert redactor is not None
            self.redactors[index] = redactor
            self.logprobs[index] = ChoiceLogprobs()
        return self.redactors[index]

    async def run(self, events: AsyncIterator[bytes], error_event: Any) -> AsyncIterator[bytes]:
        try:
            async for blob in events:
                out = b"".join(self.event(e) for e in blob.split(b"\n\n") if e)
                if out:
                    yield out
            yield self.flush()
        except PiiBlocked as exc:
            yield error_event(exc)

    def event(self, event: bytes) -> bytes:
        if event == b"data: [DONE]":
            return self.flush() + event + b"\n\n"
        if not event.startswith(b"data: {"):
            return event + b"\n\n"
        chunk = _decoder.decode(event[6:])
        choices = chunk.get("choices")
        if not choices:
            return event + b"\n\n"
        self.template = chunk
        changed = False
        for choice in choices:
            index = int(choice.get("index", 0))
            redactor = self._redactor(index)
            delta = choice.get("delta")
            self.chat = isinstance(delta, dict)
            holder, key = (delta, "content") if isinstance(delta, dict) else (choice, "text")
            text = holder.get(key)
            released = redactor.feed(text) if isinstance(text, str) else ""
            if choice.get("finish_reason") is not None:
                released += redactor.flush()
            if (isinstance(text, str) or released) and released != text:
                holder[key] = released
                changed = True
            logprobs = choice.get("logprobs")  # only with the text they spell out
            if logprobs is not None or self.logprobs[index].held:
                shown = self.logprobs[index].follow(text if isinstance(text, str) else "", released, logprobs)
                if shown is not logprobs:
                    choice["logprobs"] = shown
                    changed = True
            if isinstance(delta, dict) and (delta.get("tool_calls") or choice.get("finish_reason") is not None):
                changed = self._calls(int(choice.get("index", 0)), delta, choice.get("finish_reason")) or changed
        if not changed:  # passed through as it came (most tokens): no re-encoding
            return event + b"\n\n"
        return b"data: " + _encoder.encode(chunk) + b"\n\n"

    def _calls(self, index: int, delta: dict[str, Any], finish: str | None) -> bool:
        """Redact streamed tool-call arguments, one redactor per call; at the finish, release what each held."""
        changed = False
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            fragment = function.get("arguments")
            if not isinstance(fragment, str):
                continue
            key = (index, int(call.get("index", 0)))
            if key not in self.call_redactors:
                redactor = self.privacy.stream("output", _OUTPUT)
                assert redactor is not None
                self.call_redactors[key] = redactor
            released = self.call_redactors[key].feed(fragment)
            if released != fragment:
                function["arguments"] = released
                changed = True
        if finish is not None:
            held = [(key[1], r.flush()) for key, r in self.call_redactors.items() if key[0] == index]
            tail = [{"index": i, "function": {"arguments": text}} for i, text in held if text]
            if tail:
                delta["tool_calls"] = [*(delta.get("tool_calls") or []), *tail]
                changed = True
        return changed

    def flush(self) -> bytes:
        """Held text of every choice, as one last chunk per choice (empty when nothing is held)."""
        out = []
        for index, redactor in self.redactors.items():
            text = redactor.flush()
            if text and self.template is not None:
                piece = {"index": index, "delta": {"content": text}} if self.chat else {"index": index, "text": text}
                logprobs = self.logprobs[index].follow("", text, None)
                chunk = {**self.template, "choices": [{**piece, "logprobs": logprobs, "finish_reason": None}]}
                chunk.pop("usage", None)
                out.append(b"data: " + _encoder.encode(chunk) + b"\n\n")
        return b"".join(out)
