"""The output surface on responses with several choices and logprobs: every choice is screened on its own, and
logprobs never spell out what the policy rewrote (they follow their choice's text, and stop at a rewrite)."""

from __future__ import annotations

from typing import Any

import msgspec

from appliance.privacy.gateway import GatewayPrivacy, SseRedactor, merge_logprobs
from appliance.privacy.policy import parse_policy
from appliance.privacy.service import Privacy

POLICY = parse_policy('[surfaces.output]\ndefault = "redact"\n[detectors]\nner = "off"\n')
SECRETS_ONLY = parse_policy('[surfaces.output]\ndefault = "allow"\nsecret = "redact"\n[detectors]\nner = "off"\n')


def entries(*tokens: str) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": []} for t in tokens]}


def chunk(index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None = None) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": finish}]}
    return b"data: " + msgspec.json.encode(body)


def shown(blob: bytes) -> dict[int, tuple[str, list[str]]]:
    """Per choice: the text and the logprob tokens that reached the client."""
    out: dict[int, tuple[str, list[str]]] = {}
    for event in blob.split(b"\n\n"):
        if event.startswith(b"data: {"):
            for choice in msgspec.json.decode(event[6:])["choices"]:
                text, tokens = out.get(choice["index"], ("", []))
                logprobs = choice.get("logprobs") or {"content": []}
                out[choice["index"]] = (text + (choice["delta"].get("content") or ""),
                                        tokens + [e["token"] for e in logprobs["content"]])
    return out


def test_whole_answers_screen_every_choice_and_drop_logprobs_of_rewritten_ones() -> None:
    gateway = GatewayPrivacy(Privacy(POLICY, b"k" * 32))
    body = {"choices": [
        {"index": 0, "message": {"role": "assistant", "content": "mail jane.roe@example.org"},
         "logprobs": entries("mail", " jane", ".roe", "@example", ".org")},
        {"index": 1, "message": {"role": "assistant", "content": "no mail"}, "logprobs": entries("no", " mail")},
        {"index": 2, "message": {"role": "assistant", "content": "write to ann@example.com"}, "logprobs": None}]}
    out = msgspec.json.decode(gateway.screen_response(msgspec.json.encode(body)))["choices"]
    assert [c["message"]["content"] for c in out] == ["mail <EMAIL_1>", "no mail", "write to <EMAIL_2>"]
    assert out[0]["logprobs"] is None and out[1]["logprobs"] == body["choices"][1]["logprobs"]


def test_streamed_choices_are_screened_apart_and_logprobs_follow_their_text() -> None:
    sse = SseRedactor(Privacy(POLICY, b"k" * 32))
    blob = b"".join([
        sse.event(chunk(0, "Mail ", entries("Mail "))), sse.event(chunk(1, "Hello", entries("Hello"))),
        sse.event(chunk(0, "jane", entries("jane"))), sse.event(chunk(1, " there", entries(" there"))),
        sse.event(chunk(0, ".roe@example.org", entries(".roe", "@example", ".org"))),
        sse.event(chunk(1, " friend", entries(" friend"), "stop")),
        sse.event(chunk(0, " now", entries(" now"), "stop")), sse.event(b"data: [DONE]")])
    got = shown(blob)
    assert got[0][0] == "Mail <EMAIL_1> now" and b"jane" not in blob
    assert got[0][1] == ["Mail "]  # the logprobs stop where the text was rewritten
    assert got[1] == ("Hello there friend", ["Hello", " there", " friend"])  # held with the text, then all shown


def test_logprobs_pass_unchanged_when_nothing_is_held() -> None:
    sse = SseRedactor(Privacy(SECRETS_ONLY, b"k" * 32))
    plain = chunk(0, "Once upon", entries("Once", " upon"))
    assert sse.event(plain) == plain + b"\n\n"


def test_legacy_logprobs_merge_list_by_list() -> None:
    a = {"tokens": ["a"], "token_logprobs": [-1.0], "top_logprobs": [{"a": -1.0}], "text_offset": [0]}
    b = {"tokens": ["b"], "token_logprobs": [-2.0], "top_logprobs": [{"b": -2.0}], "text_offset": [1]}
    assert merge_logprobs([a, b]) == {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0],
                                      "top_logprobs": [{"a": -1.0}, {"b": -2.0}], "text_offset": [0, 1]}
