"""Trying the privacy policy on a sample (appliance/privacy/preview.py): the policy's own detectors and actions,
per surface."""

from __future__ import annotations

import pytest

from appliance.errors import PayloadTooLarge
from appliance.privacy.policy import SURFACES, parse_policy
from appliance.privacy.preview import MAX_SAMPLE_CHARS, preview
from appliance.privacy.service import Privacy

POLICY = """
[detectors]
ner = "off"
[surfaces.prompt]
email = "redact"
us_ssn = "block"
[surfaces.output]
email = "mask"
ip_address = "pseudonymize"
[surfaces.logs]
default = "redact"
"""
SAMPLE = "Mail zebra.canary.7731@example.org from 198.51.100.213, ssn 287-65-4321."


def test_findings_and_what_each_surface_passes_on() -> None:
    privacy = Privacy(parse_policy(POLICY), b"k" * 32)
    result = preview(privacy, SAMPLE)
    assert [(e.type, SAMPLE[e.start:e.end]) for e in result.findings] == [
        ("email", "zebra.canary.7731@example.org"), ("ip_address", "198.51.100.213"), ("us_ssn", "287-65-4321")]
    assert set(result.surfaces) == set(SURFACES)
    prompt = result.surfaces["prompt"]
    assert prompt.blocked and prompt.action == "block" and prompt.text is None
    assert prompt.actions == {"email": "redact", "ip_address": "allow", "us_ssn": "block"}
    output = result.surfaces["output"]
    assert not output.blocked and output.action == "mixed" and output.text is not None
    assert "z***@example.org" in output.text and "<IP_ADDRESS:" in output.text and "287-65-4321" in output.text
    logs = result.surfaces["logs"]
    assert logs.action == "redact" and logs.text == "Mail <EMAIL_1> from <IP_ADDRESS_1>, ssn <US_SSN_1>."
    rag = result.surfaces["rag"]
    assert rag.action == "allow" and rag.text == SAMPLE and not rag.blocked


def test_a_sample_without_pii_and_one_too_long() -> None:
    privacy = Privacy(parse_policy(POLICY), b"k" * 32)
    result = preview(privacy, "nothing to see")
    assert result.findings == [] and all(s.action == "allow" and s.text == "nothing to see"
                                         for s in result.surfaces.values())
    with pytest.raises(PayloadTooLarge, match=str(MAX_SAMPLE_CHARS)):
        preview(privacy, "x" * (MAX_SAMPLE_CHARS + 1))
