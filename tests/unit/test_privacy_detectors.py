"""Detectors find valid values and leave look-alikes alone; actions rewrite them as the policy says."""

from __future__ import annotations

import pytest

from appliance.privacy.actions import PiiBlocked, Placeholders, Pseudonymizer, mask
from appliance.privacy.detectors import builtin_detectors, detect, iban_ok, luhn_ok
from appliance.privacy.policy import parse_policy
from appliance.privacy.service import Privacy
from tests.privacy_canaries import CANARIES

DETECTORS = builtin_detectors(("US",), ner="off")
APL_KEY = "apl_" + "Q7x" * 15
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
       "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAuX1\nAbCdEf==\n-----END RSA PRIVATE KEY-----"


def found(text: str) -> list[tuple[str, str]]:
    return [(e.type, e.value) for e in detect(text, DETECTORS)]


@pytest.mark.parametrize(("text", "kind", "value"), [
    ("write to Jane.Doe+tag@mail.example.co.uk today", "email", "Jane.Doe+tag@mail.example.co.uk"),
    ("call +44 20 7946 0958 please", "phone", "+44 20 7946 0958"),
    ("call (415) 555-0132 please", "phone", "(415) 555-0132"),
    ("card 4111-1111-1111-1111 expires", "credit_card", "4111-1111-1111-1111"),
    ("amex 378282246310005.", "credit_card", "378282246310005"),
    ("pay to GB82 WEST 1234 5698 7654 32 now", "iban", "GB82 WEST 1234 5698 7654 32"),
    ("pay to DE89370400440532013000.", "iban", "DE89370400440532013000"),
    ("ssn 219-09-9998 on file", "us_ssn", "219-09-9998"),
    ("from 203.0.113.7:443", "ip_address", "203.0.113.7"),
    ("from 2001:db8::8a2e:370:7334 today", "ip_address", "2001:db8::8a2e:370:7334"),
    (f"key {APL_KEY} ok", "secret", APL_KEY),
    ("aws AKIAIOSFODNN7EXAMPLE ok", "secret", "AKIAIOSFODNN7EXAMPLE"),
    (f"bearer {JWT}", "secret", JWT),
    (f"here:\n{PEM}\nthanks", "secret", PEM),
])
def test_finds_valid_values(text: str, kind: str, value: str) -> None:
    assert (kind, value) in found(text)


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112 fails Luhn",
    "order 1234567890123456 is not a card",
    "IBAN DE89 3704 0044 0532 0130 01 fails mod-97",
    "ssn 000-12-3456, 666-12-3456, 912-34-5678, 123-45-6789 and 078-05-1120 are never issued",
    "version 1.2.3.4 of the tool, v10.0.0.1 too",
    "at 12:30:45 on 2024-01-05",
    "256.1.1.1 is not an address",
    "eyJub3QiOiJqd3QifQ.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV",
    "user@localhost and @handle",
])
def test_leaves_look_alikes_alone(text: str) -> None:
    assert found(text) == []


def test_checksums() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")


def test_custom_pattern_detector() -> None:
    policy = parse_policy('[custom.employee_id]\npattern = "EMP-[0-9]{6}"\n[surfaces.logs]\nemployee_id = "redact"\n')
    privacy = Privacy(policy, b"k" * 32)
    assert privacy.apply("logs", "badge EMP-004211 seen").text == "badge <EMPLOYEE_ID_1> seen"


POLICY = """
[surfaces.prompt]
email = "redact"
phone = "mask"
credit_card = "pseudonymize"
us_ssn = "block"
[surfaces.logs]
default = "redact"
"""


def test_actions_rewrite_as_the_policy_says() -> None:
    privacy = Privacy(parse_policy(POLICY), b"k" * 32)
    applied = privacy.apply("prompt", "a@example.com, b@example.com, A@Example.com; (415) 555-0132; "
                                      "4111 1111 1111 1111")
    assert applied.text.startswith("<EMAIL_1>, <EMAIL_2>, <EMAIL_1>; (***) ***-0132; <CREDIT_CARD:")
    assert applied.found == {"email", "phone", "credit_card"} and not applied.blocked
    assert privacy.apply("prompt", "card 4111111111111111").text == privacy.apply(
        "prompt", "card 4111-1111-1111-1111").text  # stable per value, whatever the spelling


def test_block_names_the_type_never_the_value() -> None:
    privacy = Privacy(parse_policy(POLICY), b"k" * 32)
    with pytest.raises(PiiBlocked) as caught:
        privacy.enforce("prompt", "my ssn is 219-09-9998")
    assert caught.value.status_code == 422 and "us_ssn" in caught.value.message
    assert "219" not in caught.value.message
    assert privacy.allows_storing("prompt", "nothing here") and not privacy.allows_storing("prompt", "219-09-9998")


def test_pseudonyms_depend_on_the_key() -> None:
    one, two = Pseudonymizer(b"a" * 32), Pseudonymizer(b"b" * 32)
    assert one("email", "x@example.com") == one("email", "X@example.com ") != two("email", "x@example.com")


def test_scrub_walks_json_values() -> None:
    privacy = Privacy(parse_policy(POLICY), b"k" * 32)
    out = privacy.scrub("logs", {"who": ["ann@example.com", 3], "path": "/api/users/bob@example.com"})
    assert out == {"who": ["<EMAIL_1>", 3], "path": "/api/users/<EMAIL_2>"}


def test_placeholders_number_per_type() -> None:
    marks = Placeholders()
    assert [marks("email", "a@x.io"), marks("phone", "1"), marks("email", "b@x.io")] == [
        "<EMAIL_1>", "<PHONE_1>", "<EMAIL_2>"]


def test_mask_keeps_what_identifies_it_to_its_owner() -> None:
    assert mask("email", "alice@example.com") == "a***@example.com"
    assert mask("credit_card", "4111 1111 1111 1111") == "**** **** **** 1111"
    assert mask("ip_address", "203.0.113.7") == "203.0.*.*"


def test_every_canary_is_detected_as_its_type() -> None:
    """The canaries the leak tests plant must be real values of their type, or those tests prove nothing."""
    for kind, value in CANARIES.items():
        assert found(f"value: {value} end") == [(kind, value)], kind
