"""The privacy policy file: the shipped one is valid; a wrong entity, action, surface or value is refused with the
line that is wrong."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from appliance.privacy.detectors import Entity, PatternDetector
from appliance.privacy.policy import SHIPPED_PRIVACY, PolicyError, load_policy, parse_duration, parse_policy

GOOD = """\
version = 1

[surfaces.prompt]
default = "allow"
email = "redact"

[retention]
usage = "30d"
"""


def test_shipped_policy_loads_with_the_defaults_the_issue_asks_for() -> None:
    policy = load_policy(SHIPPED_PRIVACY)
    for surface in ("logs", "audit", "usage"):
        for entity in ("email", "phone", "credit_card", "iban", "us_ssn", "ip_address", "secret"):
            assert policy.action(surface, entity) != "allow"  # type: ignore[arg-type]
    assert policy.action("cache", "email") == "block"
    assert policy.store_conversations is False
    assert policy.retention["usage"] == timedelta(days=90)
    assert policy.retention["rag_documents"] is None


def test_action_falls_back_to_the_surface_default() -> None:
    policy = parse_policy(GOOD)
    assert policy.action("prompt", "email") == "redact"
    assert policy.action("prompt", "phone") == "allow"
    assert policy.action("output", "phone") == "allow"
    assert policy.retention["usage"] == timedelta(days=30)


@pytest.mark.parametrize(("line", "text", "needle"), [
    (5, GOOD.replace('email = "redact"', 'emial = "redact"'), "unknown entity 'emial'"),
    (5, GOOD.replace('email = "redact"', 'email = "scramble"'), "unknown action 'scramble'; actions are allow, redact"),
    (3, GOOD.replace("[surfaces.prompt]", "[surfaces.prompts]"), "unknown surface 'prompts'"),
    (8, GOOD.replace('usage = "30d"', 'usage = "a month"'), "not a duration"),
    (8, GOOD.replace('usage = "30d"', 'usgae = "30d"'), "usgae"),
])
def test_a_wrong_line_is_named(line: int, text: str, needle: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "privacy.toml")
    message = str(caught.value)
    assert f"privacy.toml line {line}:" in message and needle in message


def test_block_is_refused_on_records_that_are_always_written() -> None:
    with pytest.raises(PolicyError, match=r"line 2: surfaces\.logs\.email: 'block' cannot apply"):
        parse_policy('[surfaces.logs]\nemail = "block"\n')


def test_custom_patterns_are_entities_and_bad_ones_are_refused() -> None:
    policy = parse_policy('[custom.employee_id]\npattern = "EMP-[0-9]{6}"\n[surfaces.logs]\nemployee_id = "mask"\n')
    assert "employee_id" in policy.entities and policy.action("logs", "employee_id") == "mask"
    with pytest.raises(PolicyError, match=r"line 2: custom\.bad\.pattern: RE2, .* cannot compile it: missing \]"):
        parse_policy('[custom.bad]\npattern = "EMP-[0-9"\n')
    with pytest.raises(PolicyError, match="matches empty text"):
        parse_policy('[custom.empty]\npattern = "x*"\n')


@pytest.mark.parametrize(("pattern", "says"), [
    (r"(\\w+) \\1", r"invalid escape sequence: \\1\. RE2 has no backreferences"),
    (r"(?<!x)EMP-\\d+", r"invalid perl operator: \(\?<!\. .*no lookaround"),
    (r"EMP(?=-)", r"invalid perl operator: \(\?=\. .*no lookaround"),
])
def test_patterns_re2_cannot_run_are_refused_naming_the_construct(pattern: str, says: str) -> None:
    with pytest.raises(PolicyError, match=r"line 2: custom\.bad\.pattern: RE2, the linear-time engine .*" + says):
        parse_policy(f'[custom.bad]\npattern = "{pattern}"\n')


def test_a_catastrophic_pattern_runs_in_linear_time() -> None:
    """`(a+)+$` backtracks exponentially in Python's `re` (2**40 steps here: hours); on RE2 detection is instant.
    The detection runs in a thread so that a regression fails the test instead of hanging the suite."""
    policy = parse_policy('[custom.evil]\npattern = "(a+)+$"\n[surfaces.logs]\nevil = "redact"\n')
    assert type(policy.custom["evil"]).__module__ == "re2"
    detector = PatternDetector("evil", policy.custom["evil"])
    found: list[list[Entity]] = []
    worker = threading.Thread(target=lambda: found.append(detector.detect("a" * 40 + "b")), daemon=True)
    worker.start()
    worker.join(timeout=30)  # a bound for a loaded CI box, not a measurement: RE2 needs microseconds
    assert not worker.is_alive(), "matching an administrator's pattern backtracked"
    assert found == [[]]
    assert detector.detect("xx aaaa") == [Entity(3, 7, "evil", "aaaa")]  # offsets in characters, as with re


def test_toml_syntax_errors_carry_the_line() -> None:
    with pytest.raises(PolicyError, match="line 2"):
        parse_policy('[surfaces.prompt]\nemail = \n')


def test_durations() -> None:
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("0") is None
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("-1d")
