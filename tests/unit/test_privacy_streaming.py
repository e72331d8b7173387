"""The streaming redactor: entities split across chunks are caught, whatever the split; little is held back."""

from __future__ import annotations

import random

import msgspec
import pytest

from appliance.privacy.actions import PiiBlocked
from appliance.privacy.detectors import secret_may_be_forming
from appliance.privacy.gateway import GatewayPrivacy, SseRedactor
from appliance.privacy.policy import parse_policy
from appliance.privacy.service import Privacy

POLICY = parse_policy('[surfaces.output]\ndefault = "redact"\nus_ssn = "block"\n[detectors]\nner = "off"\n')
TEXT = ("Sure. Write to jane.roe@example.org or call +1 (415) 555-0132. The card 4111 1111 1111 1111 and "
        "IBAN GB82 WEST 1234 5698 7654 32 are on file; the server is 203.0.113.7 and 2001:db8::1 runs "
        "version 1.2.3.4. Token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJqYW5lIn0.c2lnbmF0dXJlLXZhbHVlLTEyMzQ1 expires. "
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQ\n"
        "-----END PRIVATE KEY-----\nDone.")


def privacy() -> Privacy:
    return Privacy(POLICY, b"k" * 32)


def stream_through(text: str, sizes: list[int]) -> str:
    redactor = privacy().stream("output")
    assert redactor is not None
    out, i = [], 0
    for size in sizes:
        out.append(redactor.feed(text[i:i + size]))
        i += size
    out.append(redactor.feed(text[i:]))
    out.append(redactor.flush())
    return "".join(out)


@pytest.mark.parametrize("seed", range(30))
def test_any_split_gives_the_whole_text_result(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [rng.randint(1, 6) for _ in range(len(TEXT))]
    expected = privacy().apply("output", TEXT).text
    assert "jane.roe" not in expected and "4111" not in expected and "MIIE" not in expected
    assert stream_through(TEXT, sizes) == expected


def test_one_character_at_a_time() -> None:
    assert stream_through(TEXT, [1] * len(TEXT)) == privacy().apply("output", TEXT).text


def test_plain_words_are_held_only_until_the_next_space() -> None:
    redactor = privacy().stream("output")
    assert redactor is not None
    assert redactor.feed("Hello") == ""
    assert redactor.feed(" world") == "Hello "
    assert redactor.feed(", how") == "world, "
    assert redactor.flush() == "how"


def test_number_groups_are_held_together() -> None:
    redactor = privacy().stream("output")
    assert redactor is not None
    released = redactor.feed("card 4111 1111 ") + redactor.feed("1111 ") + redactor.feed("1111 thanks ")
    assert released == "card <CREDIT_CARD_1> thanks "


def test_the_hold_is_bounded() -> None:
    redactor = privacy().stream("output")
    assert redactor is not None
    released = redactor.feed("x" * 1000)
    assert len(released) >= 1000 - redactor.max_hold


def test_blocked_entity_raises() -> None:
    redactor = privacy().stream("output")
    assert redactor is not None
    with pytest.raises(PiiBlocked, match="us_ssn"):
        redactor.feed("ssn 219-09-") + redactor.feed("9998 is mine")


def chunk(text: str, finish: str | None = None) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
    return b"data: " + msgspec.json.encode(body)


def texts(blob: bytes) -> str:
    out = []
    for event in blob.split(b"\n\n"):
        if event.startswith(b"data: {"):
            for choice in msgspec.json.decode(event[6:])["choices"]:
                out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


def test_sse_events_are_rewritten_and_held_text_comes_before_done() -> None:
    sse = SseRedactor(privacy())
    pieces = ["Mail ", "jane", ".roe@", "example", ".org", " now", " or", " 4111 1111 1111", " 1111"]
    blob = b"".join(sse.event(chunk(p)) for p in pieces) + sse.event(b"data: [DONE]")
    assert texts(blob) == "Mail <EMAIL_1> now or <CREDIT_CARD_1>"
    assert blob.endswith(b"data: [DONE]\n\n") and b"jane" not in blob and b"4111" not in blob


def test_sse_finish_chunk_releases_the_rest() -> None:
    sse = SseRedactor(privacy())
    blob = sse.event(chunk("call 203.0.")) + sse.event(chunk("113.7", finish="stop"))
    assert texts(blob) == "call <IP_ADDRESS_1>"


def test_the_prompt_surface_rewrites_every_message_with_one_numbering() -> None:
    policy = parse_policy('[surfaces.prompt]\nemail = "redact"\nus_ssn = "block"\n[detectors]\nner = "off"\n')
    gateway = GatewayPrivacy(Privacy(policy, b"k" * 32))
    body = {"messages": [{"role": "system", "content": "Reply to ann@example.com"},
                         {"role": "user", "content": "cc bob@example.com and ann@example.com"}]}
    gateway.screen_request(body)
    assert [m["content"] for m in body["messages"]] == ["Reply to <EMAIL_1>", "cc <EMAIL_2> and <EMAIL_1>"]
    completion = {"prompt": "ssn 219-09-9998"}
    with pytest.raises(PiiBlocked):
        gateway.screen_request(completion)
    assert completion["prompt"] == "ssn 219-09-9998"  # refused, not rewritten: nothing reaches the worker


def test_whole_answers_are_rewritten_per_choice() -> None:
    gateway = GatewayPrivacy(privacy())
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "mail jane.roe@example.org"}}],
            "usage": {"prompt_tokens": 3}}
    out = msgspec.json.decode(gateway.screen_response(msgspec.json.encode(body)))
    assert out["choices"][0]["message"]["content"] == "mail <EMAIL_1>" and out["usage"] == body["usage"]


SECRETS_ONLY = parse_policy('[surfaces.output]\ndefault = "allow"\nsecret = "redact"\n[detectors]\nner = "off"\n')
SECRET_TEXT = ("Use key apl_" + "A1b2C3d4" * 6 + " (or AKIAIOSFODNN7EXAMPLE) with sk-proj-" + "x" * 40 + ". A JWT: "
               "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJqYW5lIn0.c2lnbmF0dXJlLXZhbHVlLTEyMzQ1 then -----BEGIN RSA PRIVATE "
               "KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQ\n-----END RSA PRIVATE KEY-----\nand "
               "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY ok, mail jane@example.org.")


@pytest.mark.parametrize("seed", range(30))
def test_secrets_only_surface_catches_secrets_whatever_the_split(seed: int) -> None:
    """The default output surface acts only on secrets: words that cannot begin one are not held, and a secret
    split anywhere is still redacted whole."""
    rng = random.Random(seed)
    guard = Privacy(SECRETS_ONLY, b"k" * 32)
    redactor = guard.stream("output")
    assert redactor is not None
    out, i = [], 0
    while i < len(SECRET_TEXT):
        size = rng.randint(1, 7)
        out.append(redactor.feed(SECRET_TEXT[i:i + size]))
        i += size
    out.append(redactor.flush())
    expected = guard.apply("output", SECRET_TEXT).text
    assert "A1b2C3d4" not in expected and "MIIE" not in expected and "wJalrXUtn" not in expected
    assert "jane@example.org" in expected  # allowed on this surface
    assert "".join(out) == expected


def test_secrets_only_surface_releases_plain_words_at_once() -> None:
    redactor = Privacy(SECRETS_ONLY, b"k" * 32).stream("output")
    assert redactor is not None
    assert redactor.feed("Once") == "Once"
    assert redactor.feed(" upon") == " upon"
    assert redactor.feed(" a") == " "  # "a" may begin "apl_": held until the word goes on
    assert redactor.feed(" time, call 415") == "a time, call 415"  # numbers are no secret
    assert redactor.feed(" sk") == " "
    assert redactor.feed("-") == ""
    assert redactor.feed("proj-" + "y" * 40 + " done") == "<SECRET_1> "  # near a secret: the usual word hold
    assert redactor.flush() == "done"


@pytest.mark.parametrize(("text", "forming"), [
    ("Once", False), ("hello world", False), ("the end.", False), ("q", False), ("x", True), ("kiwi", False),
    ("a", True), ("then A", True), ("the AKI", True), ("key=ey", True), ("---", True), ("use gh", True),
    ("AWS_SEC", True), ("id apl_123", True), ("Theme", False), ("Thesk", False), ("(sk-", True),
])
def test_secret_may_be_forming(text: str, forming: bool) -> None:
    assert secret_may_be_forming(text) is forming


def test_sse_events_without_anything_to_rewrite_pass_byte_for_byte() -> None:
    sse = SseRedactor(Privacy(SECRETS_ONLY, b"k" * 32))
    plain = chunk("Once upon")
    assert sse.event(plain) == plain + b"\n\n"
    secret = "sk-proj-" + "z" * 40
    blob = sse.event(chunk(" key " + secret[:10])) + sse.event(chunk(secret[10:] + " end", finish="stop"))
    assert texts(blob) == " key <SECRET_1> end" and b"zzzz" not in blob
