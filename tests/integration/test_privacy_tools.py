"""Privacy helpers against the real server: the detectors of the policy in force tried on a sample, a purge's dry
run, and policy errors that point at their line."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from appliance.privacy.policy import SHIPPED_PRIVACY, SURFACES
from tests.integration.conftest import Running
from tests.privacy_canaries import CANARIES


@pytest.fixture(scope="module")
def box(start_server: Callable[..., Running]) -> Running:
    return start_server()


def test_a_sample_shows_findings_and_what_each_surface_passes_on(box: Running) -> None:
    sample = f"Reach me at {CANARIES['email']}, key {CANARIES['secret']}."
    response = httpx.post(box.url + "/api/privacy/detect", json={"text": sample}, headers=box.headers)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    found = {(f["kind"], f["text"]) for f in body["findings"]}
    assert {("email", CANARIES["email"]), ("secret", CANARIES["secret"])} <= found
    assert all(sample[f["start"]:f["end"]] == f["text"] for f in body["findings"])
    surfaces = body["surfaces"]
    assert set(surfaces) == set(SURFACES)
    prompt = surfaces["prompt"]  # the shipped policy: secrets redacted, the rest allowed
    assert prompt["action"] == "redact" and not prompt["blocked"]
    assert CANARIES["email"] in prompt["text"] and CANARIES["secret"] not in prompt["text"]
    assert surfaces["logs"]["text"] is not None and CANARIES["email"] not in surfaces["logs"]["text"]
    assert surfaces["audit"]["action"] == "pseudonymize"
    assert surfaces["cache"] == {"action": "block", "blocked": True, "text": None,
                                 "actions": surfaces["cache"]["actions"]}

    too_long = httpx.post(box.url + "/api/privacy/detect", json={"text": "x" * 20_001}, headers=box.headers)
    assert too_long.status_code == 413 and too_long.json()["error"]["param"] == "text"


def test_a_dry_run_counts_and_deletes_nothing(box: Running) -> None:
    before = httpx.get(box.url + "/api/privacy/report", headers=box.headers).json()
    dry = httpx.post(box.url + "/api/privacy/purge", params={"dry_run": "true"}, headers=box.headers)
    assert dry.status_code == 200, dry.text
    assert dry.json()["dry_run"] is True and {"usage", "audit", "sessions"} <= set(dry.json()["would_delete"])
    assert all(isinstance(n, int) for n in dry.json()["would_delete"].values())
    after = httpx.get(box.url + "/api/privacy/report", headers=box.headers).json()
    counts = {c["data_class"]: c["count"] for c in before["classes"]}
    assert {c["data_class"]: c["count"] for c in after["classes"]}["audit"] == counts["audit"]
    assert after["last_purge"] == before["last_purge"]
    real = httpx.post(box.url + "/api/privacy/purge", headers=box.headers)
    assert real.status_code == 200 and "deleted" in real.json()


@pytest.mark.parametrize(("broken", "needle"), [
    (lambda t: t.replace('secret = "redact"', 'secret = "shred"', 1), 'secret = "shred"'),
    (lambda t: t.replace('default = "redact"', 'default = = "redact"', 1), 'default = = "redact"'),  # TOML syntax
])
def test_policy_errors_point_at_their_line(box: Running, broken: Callable[[str], str], needle: str) -> None:
    text = broken(SHIPPED_PRIVACY.read_text())
    line = next(i for i, t in enumerate(text.splitlines(), 1) if needle in t)
    refused = httpx.put(box.url + "/api/privacy/policy", json={"policy": text}, headers=box.headers)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["line"] == line and error["message"].startswith(f"line {line}: ")
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_policy" and error["param"] == "policy"
