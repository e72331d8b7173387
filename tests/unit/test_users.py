"""Users against a real SQLite database: create, list, disable, enable, set-role, log-in checks, and the audit."""

from __future__ import annotations

import json
import sqlite3

import pytest

from appliance.audit import AuditLog
from appliance.auth.passwords import Argon2Params, PasswordHasher, derive_password_pepper, parse_hash
from appliance.auth.users import UserService
from appliance.datadir import DataDir
from appliance.errors import InvalidRequest, NotFound

CHEAP = Argon2Params(memory_kib=64, iterations=1)
ROLES = ("admin", "operator", "user", "auditor")
PASSWORD = "correct horse battery staple"


@pytest.fixture
def pepper(data: DataDir) -> bytes:
    return derive_password_pepper(data.read_master_key())


@pytest.fixture
def users(conn: sqlite3.Connection, audit: AuditLog, pepper: bytes) -> UserService:
    return UserService(conn, pepper, audit=audit, roles=ROLES, params=CHEAP)


def stored_hash(conn: sqlite3.Connection, name: str) -> str:
    return str(conn.execute("SELECT password_hash FROM users WHERE name = ?", (name,)).fetchone()[0])


def test_a_fresh_data_dir_has_no_users(users: UserService) -> None:
    """No default user, so no default password: the first account is made by whoever installs the box."""
    assert users.list() == []
    assert users.verify_password("admin", "admin") is None


def test_create_list_and_verify(users: UserService, conn: sqlite3.Connection) -> None:
    alice = users.create("alice", "user", PASSWORD, actor="cli:root")
    assert (alice.name, alice.role, alice.disabled) == ("alice", "user", False)
    assert alice.created_at == alice.password_changed_at
    users.create("bob.smith@example.com", "operator", "another long passphrase")
    assert [(u.name, u.role) for u in users.list()] == [("alice", "user"), ("bob.smith@example.com", "operator")]
    assert users.get("ALICE") == alice  # names ignore case
    assert users.verify_password("alice", PASSWORD) == alice
    assert users.verify_password("Alice", PASSWORD) == alice
    assert users.verify_password("alice", "correct horse battery stapler") is None
    assert users.verify_password("bob.smith@example.com", PASSWORD) is None
    assert stored_hash(conn, "alice").startswith("$argon2id$v=19$m=64,t=1,p=1,keyid=")
    assert PASSWORD not in stored_hash(conn, "alice")


def test_user_struct_never_carries_the_hash(users: UserService) -> None:
    alice = users.create("alice", "user", PASSWORD)
    assert "password_hash" not in type(alice).__struct_fields__
    assert "argon2" not in repr(alice) and "argon2" not in repr(users.list())


def test_unknown_user_costs_a_hash_too(users: UserService, monkeypatch: pytest.MonkeyPatch) -> None:
    users.create("alice", "user", PASSWORD)
    verified: list[str] = []
    real_verify = users.hasher.verify

    def counting(password: str, stored: str) -> bool:
        verified.append(stored)
        return real_verify(password, stored)

    monkeypatch.setattr(users.hasher, "verify", counting)
    for name in ("nobody", "not a valid name!", "x" * 500):
        assert users.verify_password(name, PASSWORD) is None
    assert users.verify_password("alice", "x" * 100_000) is None  # too long to be anyone's: still one hash
    assert len(verified) == 4
    assert all(parse_hash(s).params == CHEAP for s in verified)


def test_unknown_role_is_refused(users: UserService) -> None:
    with pytest.raises(InvalidRequest, match=r"unknown role 'root'; roles: admin, operator, user, auditor"):
        users.create("alice", "root", PASSWORD)
    with pytest.raises(InvalidRequest, match="unknown role"):
        users.check_new("alice", "root")
    assert users.list() == []


def test_duplicate_name_is_refused_whatever_its_case(users: UserService) -> None:
    users.create("alice", "user", PASSWORD)
    for name in ("alice", "ALICE", "Alice"):
        with pytest.raises(InvalidRequest, match="already exists") as info:
            users.create(name, "admin", PASSWORD + "!")
        assert info.value.code == "user_exists"
    assert [u.role for u in users.list()] == ["user"]
    assert users.verify_password("alice", PASSWORD + "!") is None


@pytest.mark.parametrize("name", ["", "a" * 65, "alice smith", "alice/..", "ålice", "alice\n", "'; DROP TABLE users;--",
                                  "apl_" + "a" * 44])
def test_bad_names_are_refused(users: UserService, name: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        users.create(name, "user", PASSWORD)
    assert info.value.param == "name"
    assert users.list() == []


def test_weak_password_is_refused_and_nothing_is_stored(users: UserService) -> None:
    for weak, says in (("short", "too short"), (" " * 20, "only whitespace"),
                       ("alice.wonderland", "must not be the user name")):
        with pytest.raises(InvalidRequest, match=says):
            users.create("alice.wonderland", "user", weak)
    assert users.list() == []


def test_disable_and_enable(users: UserService) -> None:
    users.create("alice", "user", PASSWORD)
    disabled = users.disable("alice", actor="cli:root")
    assert disabled.disabled and disabled.disabled_at is not None
    assert users.verify_password("alice", PASSWORD) is None
    assert users.disable("alice").disabled_at == disabled.disabled_at  # idempotent
    enabled = users.enable("ALICE")
    assert not enabled.disabled
    assert users.verify_password("alice", PASSWORD) == enabled


def test_set_role(users: UserService) -> None:
    users.create("alice", "user", PASSWORD)
    assert users.set_role("alice", "auditor").role == "auditor"
    with pytest.raises(InvalidRequest, match="unknown role"):
        users.set_role("alice", "superuser")
    assert users.get("alice").role == "auditor"


def test_unknown_user_is_not_found(users: UserService) -> None:
    for change in (users.disable, users.enable, users.get):
        with pytest.raises(NotFound, match=r"no user named 'ghost'; `appliance users list`"):
            change("ghost")
    with pytest.raises(NotFound):
        users.set_role("ghost", "user")


def test_outdated_hash_is_upgraded_at_login(conn: sqlite3.Connection, audit: AuditLog, pepper: bytes) -> None:
    old = UserService(conn, None, audit=audit, roles=ROLES, params=CHEAP)  # before peppers and stronger settings
    old.create("alice", "user", PASSWORD)
    before = stored_hash(conn, "alice")
    stronger = Argon2Params(memory_kib=128, iterations=2)
    users = UserService(conn, pepper, audit=audit, roles=ROLES, params=stronger)
    assert users.verify_password("alice", "wrong password here") is None
    assert stored_hash(conn, "alice") == before  # a failed login changes nothing
    assert users.verify_password("alice", PASSWORD) is not None
    after = stored_hash(conn, "alice")
    assert after != before and parse_hash(after).params == stronger and parse_hash(after).keyid is not None
    assert not users.hasher.needs_rehash(after)
    assert users.verify_password("alice", PASSWORD) is not None
    assert stored_hash(conn, "alice") == after


def test_disabled_user_is_not_rehashed(conn: sqlite3.Connection, pepper: bytes) -> None:
    UserService(conn, None, roles=ROLES, params=CHEAP).create("alice", "user", PASSWORD)
    users = UserService(conn, pepper, roles=ROLES, params=CHEAP)
    before = stored_hash(conn, "alice")
    users.disable("alice")
    assert users.verify_password("alice", PASSWORD) is None
    assert stored_hash(conn, "alice") == before


def test_real_parameters_are_the_default(conn: sqlite3.Connection, pepper: bytes) -> None:
    users = UserService(conn, pepper, roles=ROLES)
    assert users.hasher.params == PasswordHasher().params
    users.create("alice", "user", PASSWORD)
    assert stored_hash(conn, "alice").startswith("$argon2id$v=19$m=19456,t=2,p=1,keyid=")
    assert users.verify_password("alice", PASSWORD) is not None


def test_audit_records_changes_and_never_the_password(users: UserService, audit: AuditLog,
                                                     conn: sqlite3.Connection, data: DataDir) -> None:
    alice = users.create("alice", "user", PASSWORD, actor="cli:root")
    users.set_role("alice", "auditor", actor="cli:root")
    users.disable("alice", actor="cli:root")
    users.enable("alice", actor="cli:root")
    with pytest.raises(InvalidRequest):
        users.create("bob", "user", "hunter2!", actor="cli:root")
    records = list(audit.export())
    assert [(r["action"], r["outcome"]) for r in records] == [
        ("user.create", "ok"), ("user.set_role", "ok"), ("user.disable", "ok"), ("user.enable", "ok"),
        ("user.create", "error")]
    assert all(r["actor"] == "cli:root" for r in records)
    assert records[0]["target"] == alice.id
    assert records[0]["details"] == {"name": "alice", "role": "user"}
    assert records[1]["details"] == {"name": "alice", "role": "auditor", "previous_role": "user"}
    assert audit.verify().ok
    exported = json.dumps(records)
    password_hash = stored_hash(conn, "alice")
    for secret in (PASSWORD, "hunter2!", password_hash, password_hash.rsplit("$", 1)[1], "argon2"):
        assert secret not in exported
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert PASSWORD.encode() not in data.database.read_bytes()


class FakeTerminal:
    """Standard input that is a terminal; getpass is replaced by the answers typed at it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *answers: str) -> None:
        self.prompts: list[str] = []
        self.answers = list(answers)
        monkeypatch.setattr("sys.stdin", self)
        monkeypatch.setattr("getpass.getpass", self.getpass)

    def isatty(self) -> bool:
        return True

    def getpass(self, prompt: str = "") -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0)


def run_cli(data: DataDir, *args: str) -> int:
    from appliance.cli import main

    return main(["--data-dir", str(data.root), *args])


def test_cli_prompts_twice_at_a_terminal(data: DataDir, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    terminal = FakeTerminal(monkeypatch, PASSWORD, PASSWORD)
    assert run_cli(data, "users", "create", "alice", "--role", "user") == 0
    assert terminal.prompts == ["password for alice: ", "repeat it: "]
    assert "created user alice" in capsys.readouterr().out

    terminal = FakeTerminal(monkeypatch, PASSWORD, PASSWORD + "x")
    assert run_cli(data, "users", "create", "bob", "--role", "user") == 1
    assert "the two passwords differ" in capsys.readouterr().err

    terminal = FakeTerminal(monkeypatch, "short")
    assert run_cli(data, "users", "create", "bob", "--role", "user") == 1
    assert len(terminal.prompts) == 1 and "too short" in capsys.readouterr().err  # told before typing it twice

    terminal = FakeTerminal(monkeypatch)
    assert run_cli(data, "users", "create", "bob", "--role", "root") == 1
    assert run_cli(data, "users", "create", "Alice", "--role", "user") == 1
    assert terminal.prompts == []  # a wrong role or a taken name fails before any password is asked for
    err = capsys.readouterr().err
    assert "unknown role 'root'" in err and "already exists" in err
