"""Roles file loading and validation (appliance/auth/rbac.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.audit import AuditLog
from appliance.auth.guards import permission
from appliance.auth.permissions import PERMISSIONS
from appliance.auth.rbac import Rbac, RbacError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rbac.toml"
    path.write_text(text)
    return path


def test_star_grants_every_registered_permission(tmp_path: Path) -> None:
    rbac = Rbac.load(write(tmp_path, '[roles.root]\npermissions = ["*"]\n[roles.reader]\npermissions = '
                                     '["models:read"]\n'))
    assert rbac.roles["root"] == frozenset(PERMISSIONS)
    assert rbac.allows("reader", "models:read") and not rbac.allows("reader", "chat:use")
    assert not rbac.allows("nobody", "models:read")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[roles.a]\npermissions = ["chat:use", "root:all"]\n', "root:all"),
        ("[roles.a]\npermissions = []\n", "grants nothing"),
        ("[roles]\n", "no roles"),
        ('[roles.a]\npermissions = "chat:use"\n', "Expected `array`"),
        ('[roles.a]\npermissions = ["chat:use"]\ncolour = "red"\n', "colour"),
        ("roles = [", "rbac.toml"),
    ],
)
def test_invalid_roles_files_are_refused_with_the_reason(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(RbacError) as caught:
        Rbac.load(write(tmp_path, text))
    assert needle in str(caught.value)


def test_missing_roles_file_says_which_setting_to_fix(tmp_path: Path) -> None:
    with pytest.raises(RbacError, match=r"auth\.rbac_file"):
        Rbac.load(tmp_path / "absent.toml")


def test_check_role_names_the_known_roles() -> None:
    rbac = Rbac.load()
    assert rbac.check_role("user") == "user"
    with pytest.raises(RbacError, match="admin"):
        rbac.check_role("wizard")


def test_a_route_cannot_declare_an_unregistered_permission() -> None:
    assert permission("chat:use") == {"permission": "chat:use"}
    with pytest.raises(ValueError, match="unregistered permission"):
        permission("chat:abuse")


def test_a_change_of_roles_is_audited_once(tmp_path: Path, audit: AuditLog) -> None:
    first = Rbac.load(write(tmp_path, '[roles.a]\npermissions = ["chat:use"]\n'))
    assert first.record_if_changed(audit)
    assert not first.record_if_changed(audit)  # same grants: nothing new
    relaid = Rbac.load(write(tmp_path, '# a comment\n[roles.a]\npermissions = [ "chat:use" ]\n'))
    assert not relaid.record_if_changed(audit)  # layout and comments are not policy
    widened = Rbac.load(write(tmp_path, '[roles.a]\npermissions = ["chat:use", "metrics:read"]\n'))
    assert widened.record_if_changed(audit)
    records = list(audit.export(action="policy.change"))
    assert [r["details"]["roles"]["a"] for r in records] == [["chat:use"], ["chat:use", "metrics:read"]]
    assert audit.verify().ok


@pytest.mark.parametrize(("text", "line", "needle"), [
    ('[roles.a]\npermissions = ["chat:use"]\n\n[roles.b]\npermissions = [\n  "chat:use",\n  "root:all",\n]\n', 7,
     "root:all"),
    ('[roles.a]\npermissions = ["chat:use"]\n[roles.b]\npermissions = []\n', 4, "grants nothing"),
    ('[roles.a]\npermissions = ["chat:use"]\ncolour = "red"\n', 3, "colour"),
    ('[roles.a]\npermissions = "chat:use"\n', 2, "Expected `array`"),
    ('[roles.a]\npermissions = ["chat:use"\n', 2, "not valid TOML"),  # unclosed: the last line
    ('[roles.a]\npermissions = ]\n', 2, "not valid TOML"),
])
def test_errors_name_the_line_to_fix(text: str, line: int, needle: str) -> None:
    with pytest.raises(RbacError) as caught:
        Rbac.parse(text, "rbac.toml")
    assert caught.value.line == line and needle in caught.value.reason
    assert str(caught.value).startswith(f"rbac.toml line {line}: ")
