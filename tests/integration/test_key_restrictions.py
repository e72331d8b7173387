"""Keys narrowed to some models and collections against the real server: another model answers exactly as an
unknown one (and the refusal is audited), /v1/models lists only the allowed, and both listings (CLI and API) show
each key's scopes, models, collections and limits without a secret."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL, appliance


def make_key(server: Running, *options: str) -> str:
    if server.process is None:
        pytest.skip("needs a local server to create keys on")
    return appliance("keys", "create", "--name", "narrow", "--role", "user", *options,
                     data_dir=server.process.data_dir).stdout.strip().splitlines()[-1]


def chat(server: Running, key: str, model: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                      json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})


def test_a_model_the_key_may_not_use_reads_as_unknown_and_is_audited(server: Running) -> None:
    only_other = make_key(server, "--models", "some-other-model")
    allowed = make_key(server, "--models", f"{DEFAULT_MODEL},some-other-model")
    refused, unknown = chat(server, only_other, DEFAULT_MODEL), chat(server, allowed, "no-such-model")
    assert refused.status_code == unknown.status_code == 404
    body: dict[str, Any] = refused.json()
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["message"] == unknown.json()["error"]["message"].replace("no-such-model", DEFAULT_MODEL)
    assert chat(server, allowed, DEFAULT_MODEL).status_code == 200

    listed = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {only_other}"})
    assert listed.status_code == 200 and listed.json()["data"] == []
    listed = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {allowed}"})
    assert [m["id"] for m in listed.json()["data"]] == [DEFAULT_MODEL]

    audit = httpx.get(server.url + "/api/audit", headers=server.headers, params={"action": "model.use"}).json()
    denied = [r for r in audit["data"] if r["actor"] == f"key:{only_other[4:12]}"]
    assert len(denied) == 1 and denied[0]["outcome"] == "denied" and denied[0]["target"] == DEFAULT_MODEL


def test_listings_show_scopes_models_collections_and_limits_never_secrets(server: Running) -> None:
    key = make_key(server, "--scopes", "chat:use,models:read", "--models", DEFAULT_MODEL, "--collections",
                   "hr,eng", "--rpm", "60", "--daily-tokens", "5000")
    assert server.process is not None
    listed = appliance("keys", "list", data_dir=server.process.data_dir).stdout
    line = next(row for row in listed.splitlines() if row.startswith(key[4:12]))
    assert "scopes=chat:use,models:read" in line and f"models={DEFAULT_MODEL}" in line
    assert "collections=hr,eng" in line and "rpm=60" in line and "daily_tokens=5000" in line
    assert key not in listed

    response = httpx.get(server.url + "/api/keys", headers=server.headers)
    entry = next(k for k in response.json()["data"] if k["id"] == key[4:12])
    assert entry["scopes"] == ["chat:use", "models:read"] and entry["models"] == [DEFAULT_MODEL]
    assert entry["collections"] == ["hr", "eng"] and (entry["rpm"], entry["tpm"], entry["daily_tokens"]) == (
        60, None, 5000)
    assert key not in response.text


def test_the_api_takes_scopes_models_and_collections_and_names_a_bad_scope(server: Running) -> None:
    created = httpx.post(server.url + "/api/keys", headers=server.headers, json={
        "name": "rag-bot", "role": "user", "scopes": ["rag:read"], "models": [DEFAULT_MODEL], "collections": ["hr"]})
    assert created.status_code == 201, created.text
    assert (created.json()["scopes"], created.json()["collections"]) == (["rag:read"], ["hr"])
    secret = created.json()["key"]
    me = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert me.status_code == 403  # models:read is not among its scopes

    for scopes, named in ((["chat:use", "keys:manage"], "keys:manage"), (["fly:away"], "fly:away")):
        refused = httpx.post(server.url + "/api/keys", headers=server.headers,
                             json={"name": "x", "role": "user", "scopes": scopes})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "scopes" and named in refused.json()["error"]["message"]
