"""`appliance audit verify|export` as operators run them, on a real data dir changed through the real CLI."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import new_key
from tests.server import DEFAULT_MODEL, appliance, clone_data_dir


@pytest.fixture
def data_dir(template_dir: Path, tmp_path: Path) -> Path:
    return clone_data_dir(template_dir, tmp_path / "data")


def export(data_dir: Path, *args: str) -> list[dict[str, Any]]:
    out = appliance("audit", "export", *args, data_dir=data_dir).stdout
    return [json.loads(line) for line in out.splitlines()]


def change_things(data_dir: Path) -> str:
    """Create and revoke a key and remove the model; returns the key (its secret must appear nowhere)."""
    key = new_key(data_dir)
    appliance("keys", "revoke", key[4:12], data_dir=data_dir)
    appliance("models", "rm", DEFAULT_MODEL, data_dir=data_dir)
    return key


def test_cli_changes_are_exported_without_secrets_and_verify(data_dir: Path) -> None:
    key = change_things(data_dir)
    key_id, secret_part = key[4:12], key[12:-6]
    records = export(data_dir)
    # the template's pull of the default model was audited too
    assert [(r["action"], r["target"], r["outcome"]) for r in records] == [
        ("model.pull", DEFAULT_MODEL, "ok"), ("key.create", key_id, "ok"), ("key.revoke", key_id, "ok"),
        ("model.remove", DEFAULT_MODEL, "ok")]
    assert all(r["actor"].startswith("cli:") for r in records)
    assert records[1]["details"] == {"name": "test", "role": "admin", "expires_at": None}
    assert len(records[0]["details"]["sha256"]) == 64 and records[0]["details"]["size_bytes"] > 0
    assert [r["seq"] for r in export(data_dir, "--action", "key.create")] == [2]
    assert export(data_dir, "--since", "2999-01-01") == []
    assert len(export(data_dir, "--since", records[1]["at"], "--until", records[3]["at"])) == 2

    raw_export = appliance("audit", "export", data_dir=data_dir).stdout
    on_disk = b"".join(p.read_bytes() for p in data_dir.glob("appliance.db*"))
    for text in (raw_export, on_disk.decode("latin-1")):
        assert key not in text and secret_part not in text

    verified = appliance("audit", "verify", data_dir=data_dir)
    assert verified.stdout.startswith("audit log intact: 4 records (last hash ")
    assert records[-1]["hash"] in verified.stdout


def tamper(data_dir: Path, *statements: str) -> None:
    """What someone with the database file and the sqlite3 module can do."""
    with contextlib.closing(sqlite3.connect(data_dir / "appliance.db", isolation_level=None)) as conn:
        conn.execute("DROP TRIGGER audit_log_no_update")
        conn.execute("DROP TRIGGER audit_log_no_delete")
        for statement in statements:
            conn.execute(statement)


@pytest.mark.parametrize(("statement", "says"), [
    ("UPDATE audit_log SET actor = 'cli:someone-else' WHERE seq = 2",
     "audit log BROKEN at record 2: hash does not match its contents (altered)"),
    ("DELETE FROM audit_log WHERE seq = 3", "audit log BROKEN at record 3: record 3 is missing (removed)"),
    ("DELETE FROM audit_log WHERE seq = 4", "audit log BROKEN at record 4: record 4 missing from the end"),
], ids=["altered", "removed", "truncated"])
def test_verify_names_the_first_broken_record(data_dir: Path, statement: str, says: str) -> None:
    change_things(data_dir)
    tamper(data_dir, statement)
    result = appliance("audit", "verify", data_dir=data_dir, check=False)
    assert result.returncode == 1
    assert says in result.stderr
    assert "audit_log_no_update" in result.stderr  # the dropped triggers are reported too
    assert result.stdout == ""


def test_export_refuses_a_bad_time(data_dir: Path) -> None:
    result = appliance("audit", "export", "--since", "last tuesday", data_dir=data_dir, check=False)
    assert result.returncode == 1 and "not an ISO-8601 time" in result.stderr
