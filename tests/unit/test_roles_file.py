"""Replacing the roles file while running (appliance/auth/roles_file.py): validated, refused when it would lock
administration out, written atomically with its mode kept, swapped in place for every holder, audited."""

from __future__ import annotations

import re
import stat
from collections.abc import Mapping
from pathlib import Path

import pytest

from appliance.audit import AuditLog
from appliance.auth.rbac import SHIPPED_RBAC, Rbac, RbacError
from appliance.auth.roles_file import RolesFile
from appliance.errors import Conflict

ROLES = '[roles.admin]\npermissions = ["*"]\n\n[roles.reader]\ndescription = "Reads"\npermissions = ["models:read"]\n'


@pytest.fixture
def roles_path(tmp_path: Path) -> Path:
    path = tmp_path / "rbac.toml"
    path.write_text(ROLES)
    path.chmod(0o640)
    return path


def test_a_new_policy_is_written_swapped_in_place_and_audited(roles_path: Path, audit: AuditLog) -> None:
    rbac = Rbac.load(roles_path)
    told: list[Mapping[str, frozenset[str]]] = []
    roles_file = RolesFile(rbac, audit, listeners=[told.append])
    view = roles_file.view()
    assert view.text == ROLES and view.editable
    assert view.roles["reader"] == {"description": "Reads", "permissions": ["models:read"]}
    widened = ROLES.replace('["models:read"]', '["models:read", "chat:use"]')
    assert roles_file.replace(widened, role="admin", actor="user:u1") is rbac  # the same object, new grants
    assert rbac.allows("reader", "chat:use") and told == [rbac.roles]
    assert roles_path.read_text() == widened and stat.S_IMODE(roles_path.stat().st_mode) == 0o640
    assert not list(roles_path.parent.glob(".*.tmp"))
    (record,) = audit.export(action="policy.change")
    assert record["actor"] == "user:u1" and record["target"] == "rbac" and record["outcome"] == "ok"
    assert record["details"]["roles"]["reader"] == ["chat:use", "models:read"]
    assert record["details"]["digest"] == rbac.digest
    assert not Rbac.load(roles_path).record_if_changed(audit)  # the next start finds it recorded already


@pytest.mark.parametrize(("text", "role", "needle"), [
    (ROLES.replace('["*"]', '["models:read"]'), "admin", 'no role would grant every permission ("*")'),
    (ROLES, "reader", "your role 'reader' would lose policies:manage"),
    ('[roles.root]\npermissions = ["*"]\n', "admin", "your role 'admin' would lose policies:manage (or go)"),
])
def test_a_policy_that_locks_administration_out_is_refused(roles_path: Path, audit: AuditLog, text: str, role: str,
                                                          needle: str) -> None:
    rbac = Rbac.load(roles_path)
    with pytest.raises(Conflict, match=re.escape(needle)):
        RolesFile(rbac, audit).replace(text, role=role, actor="user:u1")
    assert roles_path.read_text() == ROLES and rbac.allows("admin", "policies:manage")
    (record,) = audit.export(action="policy.change")
    assert record["outcome"] == "error" and "refused" in record["details"]["reason"]


def test_an_invalid_policy_changes_nothing_and_names_its_line(roles_path: Path, audit: AuditLog) -> None:
    rbac = Rbac.load(roles_path)
    with pytest.raises(RbacError) as caught:
        RolesFile(rbac, audit).replace(ROLES.replace('"models:read"', '"models:raed"'), role="admin", actor="u")
    assert caught.value.line == 6 and "models:raed" in caught.value.reason
    assert roles_path.read_text() == ROLES and rbac.allows("reader", "models:read")


def test_the_shipped_file_is_never_edited(audit: AuditLog) -> None:
    before = SHIPPED_RBAC.read_text()
    roles_file = RolesFile(Rbac.load(), audit)
    assert not roles_file.view().editable
    with pytest.raises(Conflict, match=r"auth\.rbac_file"):
        roles_file.replace(before, role="admin", actor="u")
    assert SHIPPED_RBAC.read_text() == before
