"""Privacy against the real server and model: canaries of every PII type through chat (whole and streamed), a login
and an unknown model leave no trace in the data dir or the server log; the prompt surface rewrites what the worker
sees and blocks with 422; the output surface rewrites whole and streamed answers alike; the policy API versions and
audits changes; erasure leaves nothing of the subject on disk; `appliance policies check` names the wrong line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from appliance.privacy.policy import SHIPPED_PRIVACY
from tests.integration.conftest import Running
from tests.privacy_canaries import CANARIES, scan
from tests.server import DEFAULT_MODEL, appliance

PASSWORD = "violet-Tangerine-87-harbour"
AGENT = "CanaryBrowser/9.31 (agent-canary-5521)"
CUSTOM_POLICY = """
[detectors]
ner = "off"
[custom.word]
pattern = '[A-Za-z]{3,}'
[surfaces.prompt]
email = "redact"
us_ssn = "block"
[surfaces.output]
word = "redact"
[surfaces.logs]
default = "redact"
[surfaces.audit]
default = "pseudonymize"
"""


@pytest.fixture(scope="module")
def box(start_server: Callable[..., Running]) -> Running:
    return start_server()


@pytest.fixture(scope="module")
def strict(start_server: Callable[..., Running], tmp_path_factory: pytest.TempPathFactory) -> Running:
    policy = tmp_path_factory.mktemp("policy") / "privacy.toml"
    policy.write_text(CUSTOM_POLICY)
    return start_server({"APPLIANCE_PRIVACY__POLICY_FILE": str(policy)})


def canary_text() -> str:
    return "My details: " + "; ".join(f"{kind} {value}" for kind, value in CANARIES.items()) + ". Summarise."


def test_canaries_through_chat_leave_no_trace_on_disk_or_in_the_log(box: Running) -> None:
    assert box.process is not None
    client = box.client()
    reply = client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": canary_text()}])
    assert reply.choices[0].message.content is not None
    chunks = list(client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=16, stream=True,
                                                 messages=[{"role": "user", "content": canary_text()}]))
    assert chunks
    list(client.completions.create(model=DEFAULT_MODEL, prompt=canary_text(), max_tokens=8, stream=True))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=CANARIES["email"], messages=[{"role": "user", "content": "hi"}])
    refused = httpx.post(box.url + "/api/auth/login", json={"username": CANARIES["email"], "password": "wrong-Pass-1"})
    assert refused.status_code == 401
    assert httpx.get(box.url + f"/api/users/{CANARIES['email']}", headers=box.headers).status_code in (404, 405)
    logins = httpx.get(box.url + "/api/audit", params={"action": "user.login"}, headers=box.headers).json()["data"]
    assert logins and CANARIES["email"] not in json.dumps(logins)
    log = box.process.log_path
    assert '"path": "/v1/chat/completions"' in log.read_text()
    assert scan(box.process.data_dir, CANARIES, [log]) == []


def test_the_prompt_surface_sends_placeholders_to_the_model(strict: Running) -> None:
    client = strict.client()

    def prompt_tokens(text: str) -> int:
        reply = client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=1, temperature=0,
                                               messages=[{"role": "user", "content": text}])
        assert reply.usage is not None
        return reply.usage.prompt_tokens

    seen = prompt_tokens(f"Write to {CANARIES['email']} and to {CANARIES['email']} today")
    assert seen == prompt_tokens("Write to <EMAIL_1> and to <EMAIL_1> today")
    spelled = CANARIES["email"].replace("@", " at ")  # not an address: reaches the model as written
    assert seen != prompt_tokens(f"Write to {spelled} and to {spelled} today")


@pytest.mark.parametrize("stream", [False, True])
def test_a_blocked_entity_is_refused_with_422_naming_its_type(strict: Running, stream: bool) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        strict.client().chat.completions.create(model=DEFAULT_MODEL, max_tokens=4, stream=stream,
                                                messages=[{"role": "user", "content": f"ssn {CANARIES['us_ssn']}"}])
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "pii_blocked" and "us_ssn" in error["message"]
    assert CANARIES["us_ssn"] not in json.dumps(error)


def test_the_output_surface_rewrites_whole_and_streamed_answers(strict: Running) -> None:
    client = strict.client()
    messages = [{"role": "user", "content": "Tell me a short story about a cat."}]
    whole = client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=24, temperature=0,
                                           messages=messages)  # type: ignore[arg-type]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=DEFAULT_MODEL, max_tokens=24, temperature=0, stream=True, messages=messages)  # type: ignore[arg-type]
        if c.choices)
    text = whole.choices[0].message.content or ""
    assert "<WORD_1>" in text
    assert streamed == text  # the same answer, split into chunks, redacted the same way
    for piece in text.replace("<WORD_", " ").split():
        assert sum(ch.isalpha() for ch in piece) < 3 or piece.endswith(">"), piece


def test_policy_changes_are_validated_versioned_and_audited(box: Running) -> None:
    url = box.url + "/api/privacy/policy"
    current = httpx.get(url, headers=box.headers).json()
    assert current["version"] is None and current["policy"] == SHIPPED_PRIVACY.read_text()
    bad = current["policy"].replace('secret = "redact"', 'secret = "shred"', 1)
    refused = httpx.put(url, json={"policy": bad}, headers=box.headers)
    assert refused.status_code == 400
    line = next(i for i, text in enumerate(bad.splitlines(), 1) if "shred" in text)
    assert f"line {line}:" in refused.json()["error"]["message"]
    changed = current["policy"].replace('[surfaces.output]\ndefault = "allow"', '[surfaces.output]\ndefault = "mask"')
    saved = httpx.put(url, json={"policy": changed}, headers=box.headers)
    assert saved.status_code == 200 and saved.json()["version"] >= 1
    now = httpx.get(url, headers=box.headers).json()
    assert now["version"] == saved.json()["version"] and now["policy"] == changed
    records = httpx.get(box.url + "/api/audit", params={"action": "policy.change"}, headers=box.headers).json()
    assert [r["target"] for r in records["data"]][-2:] == ["privacy", "privacy"]  # the refusal and the change
    assert records["data"][-1]["details"]["version"] == saved.json()["version"]
    httpx.put(url, json={"policy": current["policy"]}, headers=box.headers).raise_for_status()


def test_a_custom_pattern_re2_cannot_run_is_a_400_naming_the_problem(box: Running) -> None:
    url = box.url + "/api/privacy/policy"
    current = httpx.get(url, headers=box.headers).json()
    backreference = current["policy"] + '\n[custom.twice]\npattern = "(\\\\w+) \\\\1"\n'
    refused = httpx.put(url, json={"policy": backreference}, headers=box.headers)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "custom.twice.pattern" in error["message"] and "no backreferences" in error["message"], error
    assert httpx.get(url, headers=box.headers).json()["version"] == current["version"]  # nothing changed


def test_report_and_erasure_leave_nothing_of_the_subject(box: Running) -> None:
    assert box.process is not None
    appliance("users", "create", "erin", "--role", "user", "--password-stdin", input=PASSWORD + "\n",
              data_dir=box.process.data_dir)
    login = httpx.post(box.url + "/api/auth/login", json={"username": "erin", "password": PASSWORD},
                       headers={"User-Agent": AGENT})
    assert login.status_code == 200
    report = httpx.get(box.url + "/api/privacy/report", headers=box.headers).json()
    by_class = {c["data_class"]: c for c in report["classes"]}
    assert by_class["sessions"]["count"] >= 1 and by_class["audit"]["retention"] == "400d"
    assert report["next_purge"] is not None
    erased = httpx.post(box.url + "/api/privacy/erasures", json={"subject": "erin"}, headers=box.headers)
    assert erased.status_code == 200 and erased.json()["deleted"]["sessions"] == 1
    assert erased.json()["deleted"]["accounts"] == 1
    assert httpx.get(box.url + "/api/me", cookies=login.cookies).status_code == 401
    again = httpx.post(box.url + "/api/privacy/erasures", json={"subject": "erin"}, headers=box.headers)
    assert again.status_code == 404
    assert scan(box.process.data_dir, [AGENT], [box.process.log_path]) == []
    assert appliance("audit", "verify", data_dir=box.process.data_dir).returncode == 0
    purged = httpx.post(box.url + "/api/privacy/purge", headers=box.headers)
    assert purged.status_code == 200 and "audit" in purged.json()["deleted"]


def test_policies_check_names_the_wrong_line(tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "rbac.toml").write_text(Path(SHIPPED_PRIVACY.parent / "rbac.toml").read_text())
    text = SHIPPED_PRIVACY.read_text()
    (folder / "privacy.toml").write_text(text)
    assert appliance("policies", "check", str(folder), data_dir=tmp_path / "data").returncode == 0
    for wrong, needle in (('secret = "redact"', 'secret = "obliterate"'), ('secret = "redact"', 'passport = "redact"')):
        broken = text.replace(wrong, needle, 1)
        (folder / "privacy.toml").write_text(broken)
        result = appliance("policies", "check", str(folder), data_dir=tmp_path / "data", check=False)
        line = next(i for i, t in enumerate(broken.splitlines(), 1) if needle in t)
        assert result.returncode == 1 and f"line {line}:" in result.stderr, result.stderr
