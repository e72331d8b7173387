"""The roles file over the API against the real server: an edited role takes effect for a key of that role without
a restart, a new role can be given to keys at once, a bad policy changes nothing and names its line, and a policy
that would lock administration out is refused with the reason."""

from __future__ import annotations

import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.auth.permissions import PERMISSIONS
from appliance.auth.rbac import SHIPPED_RBAC
from tests.integration.conftest import Running

URL = "/api/policies/rbac"


@pytest.fixture(scope="module")
def roles_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rbac") / "rbac.toml"
    path.write_text(SHIPPED_RBAC.read_text())
    path.chmod(0o640)
    return path


@pytest.fixture(scope="module")
def box(start_server: Callable[..., Running], roles_path: Path) -> Running:
    return start_server({"APPLIANCE_AUTH__RBAC_FILE": str(roles_path)})


def key_of(box: Running, role: str) -> dict[str, str]:
    created = httpx.post(box.url + "/api/keys", json={"name": f"{role}-key", "role": role}, headers=box.headers)
    assert created.status_code == 201, created.text
    return {"Authorization": f"Bearer {created.json()['key']}"}


def put(box: Running, text: str) -> httpx.Response:
    return httpx.put(box.url + URL, json={"policy": text}, headers=box.headers)


def changes(box: Running) -> list[dict[str, Any]]:
    records = httpx.get(box.url + "/api/audit", params={"action": "policy.change"}, headers=box.headers).json()
    return [r for r in records["data"] if r["target"] == "rbac"]


def test_the_policy_in_force_its_roles_and_every_permission(box: Running, roles_path: Path) -> None:
    view = httpx.get(box.url + URL, headers=box.headers)
    assert view.status_code == 200, view.text
    body = view.json()
    assert body["policy"] == roles_path.read_text() and body["path"] == str(roles_path) and body["editable"]
    assert body["permissions"] == PERMISSIONS
    assert body["roles"]["admin"]["permissions"] == sorted(PERMISSIONS)
    assert "audit:read" in body["roles"]["auditor"]["permissions"] and body["roles"]["auditor"]["description"]


def test_an_edited_role_takes_effect_without_a_restart(box: Running, roles_path: Path) -> None:
    operator = key_of(box, "operator")
    assert httpx.get(box.url + "/api/audit", headers=operator).status_code == 403
    text = roles_path.read_text()
    widened = re.sub(r"(\[roles\.operator\][^\[]*?permissions = \[)", r'\1"audit:read", ', text, count=1)
    assert widened != text
    widened += '\n[roles.tester]\ndescription = "Tries things"\npermissions = ["chat:use"]\n'
    saved = put(box, widened)
    assert saved.status_code == 200, saved.text
    assert "audit:read" in saved.json()["roles"]["operator"]["permissions"] and "tester" in saved.json()["roles"]
    assert roles_path.read_text() == widened and stat.S_IMODE(roles_path.stat().st_mode) == 0o640
    assert httpx.get(box.url + "/api/audit", headers=operator).status_code == 200  # the same key, no restart
    key_of(box, "tester")  # a new role is a role keys can have at once
    record = changes(box)[-1]
    assert record["outcome"] == "ok" and "audit:read" in record["details"]["roles"]["operator"]


def test_a_bad_policy_changes_nothing_and_names_its_line(box: Running, roles_path: Path) -> None:
    before = roles_path.read_text()
    broken = before.replace('"self:read"]', '"self:read", "audit:raed"]', 1)
    line = next(i for i, t in enumerate(broken.splitlines(), 1) if "audit:raed" in t)
    refused = put(box, broken)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["line"] == line and error["message"].startswith(f"line {line}: ") and "audit:raed" in error["message"]
    assert error["code"] == "invalid_policy" and error["param"] == "policy"
    syntax = put(box, before.replace("[roles.user]", "[roles.user", 1))
    assert syntax.status_code == 400 and syntax.json()["error"]["line"] == next(
        i for i, t in enumerate(before.splitlines(), 1) if t.startswith("[roles.user]"))
    assert roles_path.read_text() == before
    assert httpx.get(box.url + URL, headers=box.headers).json()["policy"] == before
    assert changes(box)[-1]["outcome"] == "error"


def test_a_policy_that_locks_administration_out_is_refused(box: Running, roles_path: Path) -> None:
    before = roles_path.read_text()
    no_star = put(box, before.replace('permissions = ["*"]', 'permissions = ["chat:use"]', 1))
    assert no_star.status_code == 409 and '"*"' in no_star.json()["error"]["message"]
    assert no_star.json()["error"]["code"] == "policy_lockout"
    assert roles_path.read_text() == before
    assert httpx.get(box.url + "/api/keys", headers=box.headers).status_code == 200  # admin still admin


def test_the_shipped_roles_file_is_not_edited(server: Running) -> None:
    if server.process is None:
        pytest.skip("an installed box may have its own roles file")
    view = httpx.get(server.url + URL, headers=server.headers).json()
    assert view["editable"] is False
    refused = httpx.put(server.url + URL, json={"policy": view["policy"]}, headers=server.headers)
    assert refused.status_code == 409 and "auth.rbac_file" in refused.json()["error"]["message"]
