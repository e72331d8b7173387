"""The `logs` surface: structlog records and standard-library records lose their PII before they are written."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from appliance import logs
from appliance.config import LoggingSettings
from appliance.privacy.policy import SHIPPED_PRIVACY, load_policy
from appliance.privacy.service import Privacy
from tests.privacy_canaries import CANARIES


@pytest.fixture
def captured(capsys: pytest.CaptureFixture[str]) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure(LoggingSettings(format="json"))
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=stream))
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    privacy = Privacy(load_policy(SHIPPED_PRIVACY), b"k" * 32)
    logs.install_scrubber(lambda text: privacy.apply("logs", text).text)
    yield stream
    logs.install_scrubber(None)
    root.removeHandler(handler)
    structlog.reset_defaults()


def test_structlog_records_are_scrubbed(captured: io.StringIO) -> None:
    logs.get_logger("t").warning("login.failed", user=CANARIES["email"], path=f"/api/users/{CANARIES['phone']}",
                                 note="nothing personal")
    record = json.loads(captured.getvalue().splitlines()[-1])
    assert record["user"] == "<EMAIL_1>" and record["path"] == "/api/users/<PHONE_1>"
    assert record["note"] == "nothing personal" and record["event"] == "login.failed"


def test_stdlib_records_and_their_tracebacks_are_scrubbed(captured: io.StringIO) -> None:
    log = logging.getLogger("some.library")
    try:
        raise ValueError(f"bad card {CANARIES['credit_card']}")
    except ValueError:
        log.exception("failed for %s", CANARIES["ip_address"])
    text = captured.getvalue()
    assert "failed for <IP_ADDRESS_1>" in text and "ValueError: bad card <CREDIT_CARD_1>" in text
    assert all(value not in text for value in CANARIES.values())
