"""`appliance users` as administrators and scripts run it: the password comes from a pipe or a terminal, never an
argument, and it is found nowhere on disk or in the audit log afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.server import appliance, clone_data_dir

PASSWORD = "violet-Tangerine-87-harbour"


@pytest.fixture
def data_dir(template_dir: Path, tmp_path: Path) -> Path:
    return clone_data_dir(template_dir, tmp_path / "data")


def test_users_lifecycle_from_the_command_line(data_dir: Path) -> None:
    created = appliance("users", "create", "alice", "--role", "user", "--password-stdin", data_dir=data_dir,
                        input=PASSWORD + "\n")
    assert "alice" in created.stdout and PASSWORD not in created.stdout + created.stderr

    listed = appliance("users", "list", data_dir=data_dir).stdout
    [line] = [line for line in listed.splitlines() if line.startswith("alice\t")]
    assert line.split("\t")[:3] == ["alice", "user", "active"]
    assert "argon2" not in listed and "$" not in listed

    again = appliance("users", "create", "ALICE", "--role", "admin", "--password-stdin", data_dir=data_dir,
                      input="another long passphrase\n", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr

    appliance("users", "set-role", "alice", "auditor", data_dir=data_dir)
    appliance("users", "disable", "alice", data_dir=data_dir)
    listed = appliance("users", "list", data_dir=data_dir).stdout
    assert "alice\tauditor\tdisabled\t" in listed

    assert appliance("audit", "verify", data_dir=data_dir).returncode == 0
    exported = appliance("audit", "export", "--action", "user.create", data_dir=data_dir).stdout
    records = [json.loads(line) for line in exported.splitlines()]
    assert [(r["outcome"], r["details"].get("name")) for r in records] == [("ok", "alice"), ("error", "ALICE")]
    everything = appliance("audit", "export", data_dir=data_dir).stdout
    actions = {json.loads(line)["action"] for line in everything.splitlines()}
    assert {"user.create", "user.set_role", "user.disable"} <= actions

    for path in data_dir.glob("appliance.db*"):  # the database, its WAL and shared memory
        assert PASSWORD.encode() not in path.read_bytes(), path
    assert PASSWORD not in everything and "argon2" not in everything


def test_create_without_a_terminal_asks_for_password_stdin(data_dir: Path) -> None:
    result = appliance("users", "create", "bob", "--role", "user", data_dir=data_dir, input=PASSWORD + "\n",
                       check=False)
    assert result.returncode == 1
    assert "no terminal: pass --password-stdin and pipe the password" in result.stderr
    assert "bob" not in appliance("users", "list", data_dir=data_dir).stdout


def test_weak_or_missing_piped_password_is_refused(data_dir: Path) -> None:
    for given, says in (("", "no password on standard input"), ("short\n", "too short"),
                        ("carol.example\n", "must not be the user name")):
        result = appliance("users", "create", "carol.example", "--role", "user", "--password-stdin",
                           data_dir=data_dir, input=given, check=False)
        assert result.returncode == 1 and says in result.stderr, result.stderr
    assert appliance("users", "list", data_dir=data_dir).stdout == ""


def test_password_is_never_an_argument(data_dir: Path) -> None:
    result = appliance("users", "create", "dave", "--role", "user", "--password", PASSWORD, data_dir=data_dir,
                       check=False)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def test_user_limits_from_the_command_line(data_dir: Path) -> None:
    created = appliance("users", "create", "carol", "--role", "user", "--rpm", "5", "--daily-tokens", "1000",
                        "--password-stdin", data_dir=data_dir, input=PASSWORD + "\n")
    assert "rpm=5 daily_tokens=1000" in created.stdout
    changed = appliance("users", "set-limits", "carol", "--rpm", "none", "--tpm", "100", data_dir=data_dir)
    assert "tpm=100 daily_tokens=1000" in changed.stdout and "rpm=" not in changed.stdout
    [line] = [row for row in appliance("users", "list", data_dir=data_dir).stdout.splitlines()
              if row.startswith("carol\t")]
    assert line.endswith("tpm=100 daily_tokens=1000")
    nothing = appliance("users", "set-limits", "carol", data_dir=data_dir, check=False)
    assert nothing.returncode == 1 and "--rpm" in nothing.stderr
    records = [json.loads(r) for r in appliance("audit", "export", "--action", "user.update",
                                                data_dir=data_dir).stdout.splitlines()]
    assert len(records) == 1 and records[0]["details"]["tpm"] == 100 and records[0]["details"]["rpm"] is None


def _verifies(data_dir: Path, name: str, password: str) -> bool:
    """Whether the stored hash takes this password, checked as the server's login checks it."""
    from appliance.auth.passwords import derive_password_pepper
    from appliance.auth.users import UserService
    from appliance.datadir import DataDir

    data = DataDir(data_dir)
    conn = data.connect()
    try:
        return UserService(conn, derive_password_pepper(data.read_master_key())).verify_password(name, password) \
            is not None
    finally:
        conn.close()


def test_generated_password_is_printed_once_alone_on_the_last_line(data_dir: Path) -> None:
    from appliance.auth.passwords import check_password

    created = appliance("users", "create", "admin", "--role", "admin", "--generate-password", data_dir=data_dir)
    [password] = created.stdout.splitlines()  # stdout holds the password alone; what was done goes to stderr
    check_password(password, "admin")
    assert "created user admin (role admin" in created.stderr and password not in created.stderr
    assert _verifies(data_dir, "admin", password) and not _verifies(data_dir, "admin", password + "x")

    other = appliance("users", "create", "admin2", "--role", "admin", "--generate-password", data_dir=data_dir)
    assert other.stdout.strip() != password

    everything = appliance("audit", "export", data_dir=data_dir).stdout
    assert password not in everything and "user.create" in everything
    for path in data_dir.glob("appliance.db*"):
        assert password.encode() not in path.read_bytes(), path
    for path in data_dir.rglob("*.log"):
        assert password not in path.read_text(errors="replace"), path


def test_generate_password_and_password_stdin_exclude_each_other(data_dir: Path) -> None:
    result = appliance("users", "create", "erin", "--role", "user", "--generate-password", "--password-stdin",
                       data_dir=data_dir, input=PASSWORD + "\n", check=False)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
    assert appliance("users", "list", data_dir=data_dir).stdout == ""


def test_has_admin_means_an_enabled_admin_user(data_dir: Path) -> None:
    def has_admin() -> int:
        return appliance("users", "has-admin", data_dir=data_dir, check=False).returncode

    assert has_admin() == 1  # no users yet
    appliance("users", "create", "frank", "--role", "user", "--password-stdin", data_dir=data_dir,
              input=PASSWORD + "\n")
    assert has_admin() == 1
    appliance("users", "create", "grace", "--role", "admin", "--password-stdin", data_dir=data_dir,
              input=PASSWORD + "\n")
    assert has_admin() == 0
    appliance("users", "disable", "grace", data_dir=data_dir)
    assert has_admin() == 1
    appliance("users", "set-role", "frank", "admin", data_dir=data_dir)
    assert has_admin() == 0
