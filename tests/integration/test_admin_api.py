"""The admin JSON API against the real server: /api/keys (admins), /api/me/keys (a logged-in user's own keys),
/api/users and /api/audit; secrets shown once, revocation, another user's key reading as 404 (and audited), no
changing one's own role, and the audit log filtered and exported as JSON lines."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Running, new_key
from tests.server import appliance

PASSWORD = "violet-Tangerine-87-harbour"
COOKIE = "appliance_session"


@pytest.fixture(scope="module")
def site(start_server: Callable[..., Running]) -> Running:
    running = start_server()
    assert running.process is not None
    for name, role in (("root", "admin"), ("alice", "user"), ("bob", "user")):
        appliance("users", "create", name, "--role", role, "--password-stdin", input=PASSWORD + "\n",
                  data_dir=running.process.data_dir)
    return running


@pytest.fixture(scope="module")
def user_key(site: Running) -> str:
    assert site.process is not None
    return new_key(site.process.data_dir, role="user")


@pytest.fixture(scope="module")
def auditor_key(site: Running) -> str:
    assert site.process is not None
    return new_key(site.process.data_dir, role="auditor")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def login(site: Running, name: str) -> dict[str, str]:
    """Headers for a logged-in user: the session cookie and the CSRF token."""
    response = httpx.post(site.url + "/api/auth/login", json={"username": name, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return {"Cookie": f"{COOKIE}={response.cookies[COOKIE]}", "X-CSRF-Token": response.json()["csrf_token"]}


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


def user_id(site: Running, name: str) -> str:
    users = httpx.get(site.url + "/api/users", headers=site.headers).json()["data"]
    return next(str(u["id"]) for u in users if u["name"] == name)


def models_status(site: Running, key: str) -> int:
    return httpx.get(site.url + "/v1/models", headers=bearer(key)).status_code


def test_an_admin_creates_a_key_whose_secret_is_shown_once_and_revokes_it(site: Running) -> None:
    created = httpx.post(site.url + "/api/keys", headers=site.headers,
                         json={"name": "ci", "role": "user", "expires": "30d", "rpm": 60, "tpm": None,
                               "daily_tokens": 10_000})
    assert created.status_code == 201, created.text
    body = created.json()
    secret, key_id = body["key"], body["id"]
    assert secret.startswith("apl_") and secret[4:12] == key_id
    assert body["role"] == "user" and body["rpm"] == 60 and body["daily_tokens"] == 10_000 and body["expires_at"]
    assert created.headers["cache-control"] == "no-store"
    assert models_status(site, secret) == 200

    listed = httpx.get(site.url + "/api/keys", headers=site.headers)
    assert listed.status_code == 200
    assert key_id in {k["id"] for k in listed.json()["data"]}
    assert secret not in listed.text and all("key" not in k and "digest" not in k for k in listed.json()["data"])

    revoked = httpx.delete(f"{site.url}/api/keys/{key_id}", headers=site.headers)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert models_status(site, secret) == 401
    missing = httpx.delete(f"{site.url}/api/keys/nokey123", headers=site.headers)
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"


@pytest.mark.parametrize(("body", "param"), [({"role": "user"}, None), ({"name": "x", "role": "root"}, "role"),
                                             ({"name": "x", "role": "user", "expires": "soon"}, "expires"),
                                             ({"name": "x", "role": "user", "rpm": 0}, "rpm")])
def test_bad_key_requests_are_400_with_what_to_fix(site: Running, body: dict[str, Any], param: str | None) -> None:
    response = httpx.post(site.url + "/api/keys", headers=site.headers, json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "invalid_request_error" and error_of(response)["param"] == param


def test_a_user_key_is_refused_on_the_admin_routes(site: Running, user_key: str) -> None:
    for method, path in (("GET", "/api/users"), ("POST", "/api/users"), ("PATCH", "/api/users/alice"),
                         ("GET", "/api/keys"), ("POST", "/api/keys"), ("GET", "/api/audit")):
        response = httpx.request(method, site.url + path, headers=bearer(user_key), json={"role": "admin"})
        assert response.status_code == 403, (method, path)
        assert error_of(response)["type"] == "permission_error"


def test_a_logged_in_user_manages_only_its_own_keys(site: Running, user_key: str) -> None:
    alice, bob = login(site, "alice"), login(site, "bob")
    no_csrf = {"Cookie": alice["Cookie"]}
    assert httpx.post(site.url + "/api/me/keys", headers=no_csrf, json={"name": "laptop"}).status_code == 403

    created = httpx.post(site.url + "/api/me/keys", headers=alice, json={"name": "laptop", "expires": "1d"})
    assert created.status_code == 201, created.text
    key, key_id = created.json()["key"], created.json()["id"]
    assert created.json()["role"] == "user" and created.json()["owner_user_id"] == user_id(site, "alice")
    assert models_status(site, key) == 200
    higher = httpx.post(site.url + "/api/me/keys", headers=alice, json={"name": "root", "role": "admin"})
    assert higher.status_code == 403 and error_of(higher)["code"] == "role_not_allowed"

    mine = httpx.get(site.url + "/api/me/keys", headers=alice).json()["data"]
    assert [k["id"] for k in mine] == [key_id] and key not in json.dumps(mine)
    assert httpx.get(site.url + "/api/me/keys", headers=bob).json()["data"] == []

    stolen = httpx.delete(f"{site.url}/api/me/keys/{key_id}", headers=bob)
    assert stolen.status_code == 404 and error_of(stolen)["code"] == "not_found"
    assert models_status(site, key) == 200
    denied = httpx.get(site.url + "/api/audit", headers=site.headers,
                       params={"action": "key.revoke", "actor": f"user:{user_id(site, 'bob')}"}).json()["data"]
    assert [(r["target"], r["outcome"]) for r in denied] == [(key_id, "denied")]

    with_key = httpx.get(site.url + "/api/me/keys", headers=bearer(user_key))
    assert with_key.status_code == 400 and error_of(with_key)["code"] == "needs_user"
    own = httpx.delete(f"{site.url}/api/me/keys/{key_id}", headers=alice)
    assert own.status_code == 200 and own.json()["revoked_at"]
    assert models_status(site, key) == 401


def test_admins_create_and_change_users_and_a_users_keys_follow_it(site: Running) -> None:
    weak = httpx.post(site.url + "/api/users", headers=site.headers,
                      json={"name": "carol", "role": "user", "password": "short"})
    assert weak.status_code == 400 and error_of(weak)["type"] == "invalid_request_error"
    created = httpx.post(site.url + "/api/users", headers=site.headers,
                         json={"name": "carol", "role": "user", "password": PASSWORD})
    assert created.status_code == 201, created.text
    assert created.json()["role"] == "user" and "password_hash" not in created.text and PASSWORD not in created.text
    again = httpx.post(site.url + "/api/users", headers=site.headers,
                       json={"name": "Carol", "role": "user", "password": PASSWORD})
    assert again.status_code == 400 and error_of(again)["code"] == "user_exists"

    carol_key = httpx.post(site.url + "/api/me/keys", headers=login(site, "carol"), json={"name": "cli"}).json()
    changed = httpx.patch(site.url + "/api/users/carol", headers=site.headers, json={"role": "auditor"})
    assert changed.status_code == 200 and changed.json()["role"] == "auditor"
    me = httpx.get(site.url + "/api/me", headers=bearer(carol_key["key"]))
    assert me.json()["role"] == "auditor"  # an owned key acts with its owner's role now
    disabled = httpx.patch(site.url + "/api/users/carol", headers=site.headers, json={"disabled": True})
    assert disabled.status_code == 200 and disabled.json()["disabled_at"]
    assert models_status(site, carol_key["key"]) == 401
    assert httpx.patch(site.url + "/api/users/nobody", headers=site.headers, json={"disabled": True}
                       ).status_code == 404
    assert httpx.patch(site.url + "/api/users/carol", headers=site.headers, json={}).status_code == 400


def test_an_admin_cannot_change_its_own_role_or_disable_itself(site: Running) -> None:
    root = login(site, "root")
    for change in ({"role": "user"}, {"disabled": True}):
        refused = httpx.patch(site.url + "/api/users/root", headers=root, json=change)
        assert refused.status_code == 403, refused.text
        assert error_of(refused)["code"] == "self_change_refused" and "yourself" in error_of(refused)["message"]
    assert httpx.patch(site.url + "/api/users/root", headers=root, json={"role": "admin"}).status_code == 200
    own_key = httpx.post(site.url + "/api/me/keys", headers=root, json={"name": "admin-cli"}).json()["key"]
    by_key = httpx.patch(site.url + "/api/users/root", headers=bearer(own_key), json={"role": "user"})
    assert by_key.status_code == 403  # a key its owner made counts as the owner
    assert httpx.get(site.url + "/api/me", headers={"Cookie": root["Cookie"]}).json()["role"] == "admin"
    records = httpx.get(site.url + "/api/audit", headers=site.headers, params={"action": "user.update"}).json()
    assert [r["outcome"] for r in records["data"]] == ["denied"] * 3


def test_the_audit_log_is_filtered_limited_and_exported_as_json_lines(site: Running, auditor_key: str,
                                                                     user_key: str) -> None:
    admin_actor = f"key:{site.key[4:12]}"
    assert httpx.post(site.url + "/api/keys", headers=site.headers, json={"name": "a", "role": "user"}
                      ).status_code == 201
    url = site.url + "/api/audit"
    everything = httpx.get(url, headers=bearer(auditor_key), params={"limit": 1000})
    assert everything.status_code == 200 and everything.json()["has_more"] is False
    records = everything.json()["data"]
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)

    created = httpx.get(url, headers=bearer(auditor_key), params={"action": "key.create", "actor": admin_actor})
    assert created.json()["data"] and all(r["action"] == "key.create" and r["actor"] == admin_actor
                                          for r in created.json()["data"])
    one = httpx.get(url, headers=bearer(auditor_key), params={"limit": 1}).json()
    assert len(one["data"]) == 1 and one["has_more"] is True
    later = httpx.get(url, headers=bearer(auditor_key), params={"since": "2999-01-01"}).json()
    assert later["data"] == []
    assert httpx.get(url, headers=bearer(auditor_key), params={"until": records[1]["at"]}).json()["data"] == \
        records[:1]

    lines = httpx.get(url, headers=bearer(auditor_key), params={"format": "jsonl"})
    assert lines.status_code == 200 and lines.headers["content-type"].startswith("application/x-ndjson")
    exported = [json.loads(line) for line in lines.text.splitlines()]
    assert exported[: len(records)] == records

    bad_time = httpx.get(url, headers=bearer(auditor_key), params={"since": "yesterday"})
    assert bad_time.status_code == 400 and error_of(bad_time)["param"] == "since"
    assert httpx.get(url, headers=bearer(auditor_key), params={"limit": 5000}).status_code == 400
    assert httpx.get(url, headers=bearer(user_key)).status_code == 403
    assert all(site.key not in line for line in lines.text.splitlines())
