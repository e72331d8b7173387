"""`GET /api/settings` on the real server: every setting it runs with, each with its value, where it came from (the
command line, the environment, the config file, the default) and its help; the doctor's findings; and no secret,
even one passed in an engine's arguments."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from appliance.config import Settings, iter_documented_fields
from tests.integration.conftest import Running, new_key
from tests.server import DEFAULT_MODEL


def settings_of(server: Running, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else server.headers
    return httpx.get(server.url + "/api/settings", headers=headers, timeout=60)


def by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in body["settings"]}


def test_every_setting_with_its_value_source_and_help(server: Running) -> None:
    response = settings_of(server)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"settings", "config_file", "doctor"}
    settings = by_name(body)
    assert set(settings) == {key for key, _ in iter_documented_fields(Settings)}
    for setting in settings.values():
        assert setting["source"] in ("default", "file", "env", "cli") and setting["help"], setting
    assert settings["models.default"]["value"] == DEFAULT_MODEL
    if server.process is not None:  # started as `appliance serve --port P` with APPLIANCE_* variables
        assert settings["server.port"] == {**settings["server.port"], "value": server.process.port, "source": "cli",
                                           "origin": "command line"}
        assert (settings["logging.format"]["value"], settings["logging.format"]["source"]) == ("json", "env")
        assert settings["logging.format"]["origin"] == "env APPLIANCE_LOGGING__FORMAT"
        assert settings["data_dir"]["source"] == "env" and body["config_file"] is None
        assert settings["server.host"]["source"] == "default"


def test_the_doctors_findings_come_with_the_settings(server: Running) -> None:
    findings = settings_of(server).json()["doctor"]["findings"]
    assert all(set(f) == {"level", "topic", "message", "fix"} and f["level"] in ("ok", "problem") for f in findings)
    topics = {f["topic"] for f in findings if f["level"] == "ok"}
    assert {"cpu", "memory", "disk", "gpu", "engines", "data", "models"} <= topics
    assert any(f["topic"] == "models" and f["message"].startswith(f"{DEFAULT_MODEL} (default)") for f in findings)
    assert all(f["fix"] is None for f in findings if f["level"] == "ok")


def test_secrets_are_never_shown(start_server: Callable[..., Running]) -> None:
    extra = ["--api-key", "sk-upstream-s3cret", "--hf-token=hf_t0ken", "--max-num-seqs", "4"]
    server = start_server({"APPLIANCE_VLLM__EXTRA_ARGS": json.dumps(extra)}, wait_ready=False)
    response = settings_of(server)
    assert response.status_code == 200, response.text
    setting = by_name(response.json())["vllm.extra_args"]
    assert setting["value"] == ["--api-key", "(set)", "--hf-token=(set)", "--max-num-seqs", "4"]
    assert setting["source"] == "env"
    assert "s3cret" not in response.text and "hf_t0ken" not in response.text
    assert server.process is not None
    assert settings_of(server, new_key(server.process.data_dir, role="operator")).status_code == 200
    user = settings_of(server, new_key(server.process.data_dir, role="user"))
    assert user.status_code == 403 and "settings:read" in user.json()["error"]["message"]
