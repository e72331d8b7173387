"""The data directory: layout, private modes, the master key, and a database with the right pragmas."""

from __future__ import annotations

import contextlib
import sqlite3
import stat
from pathlib import Path

import pytest

from appliance.datadir import MASTER_KEY_BYTES, DataDir
from appliance.db import MIGRATIONS, schema_version


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def data(tmp_path: Path) -> DataDir:
    data = DataDir(tmp_path / "data")
    assert data.initialise() is True
    return data


def test_initialise_creates_private_layout(data: DataDir) -> None:
    assert mode(data.root) == 0o700
    for sub in (data.keys, data.models, data.rag, data.cache, data.run, data.tmp):
        assert sub.is_dir(), sub
        assert mode(sub) == 0o700, sub
    assert mode(data.master_key) == 0o600
    assert mode(data.database) == 0o600
    assert len(data.master_key.read_bytes()) == MASTER_KEY_BYTES
    data.require_initialised()


def test_initialise_tightens_loose_modes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "models").mkdir(parents=True)
    root.chmod(0o755)
    (root / "models").chmod(0o777)
    data = DataDir(root)
    data.initialise()
    assert mode(root) == 0o700
    assert mode(data.models) == 0o700


def test_database_pragmas_and_schema(data: DataDir) -> None:
    with contextlib.closing(data.connect()) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"models", "api_keys"} <= tables


def test_initialise_is_idempotent(data: DataDir) -> None:
    key = data.read_master_key()
    with contextlib.closing(data.connect()) as conn:
        conn.execute("INSERT INTO models(name, source, format, sha256, size_bytes, created_at) "
                     "VALUES ('m', 'file:/m.gguf', 'gguf', ?, 1, '2024-01-01T00:00:00+00:00')", ("a" * 64,))
    assert data.initialise() is False
    assert data.read_master_key() == key
    with contextlib.closing(data.connect()) as conn:
        assert [tuple(row) for row in conn.execute("SELECT name FROM models")] == [("m",)]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_two_data_dirs_get_different_master_keys(tmp_path: Path) -> None:
    first, second = DataDir(tmp_path / "a"), DataDir(tmp_path / "b")
    first.initialise()
    second.initialise()
    assert first.read_master_key() != second.read_master_key()


@pytest.mark.parametrize("length", [0, 16, 33])
def test_damaged_master_key_is_a_clear_error(data: DataDir, length: int) -> None:
    data.master_key.write_bytes(b"k" * length)
    with pytest.raises(ValueError, match="damaged") as info:
        data.read_master_key()
    assert str(data.master_key) in str(info.value)
    assert f"{length} bytes" in str(info.value)


def test_uninitialised_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="appliance init"):
        DataDir(tmp_path / "empty").require_initialised()


def test_newer_database_is_refused(data: DataDir) -> None:
    with contextlib.closing(data.connect()) as conn:
        conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="schema version"):
        data.initialise()


def test_an_older_database_is_migrated_in_place_on_connect(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "old")
    data.initialise()
    data.database.unlink()
    with contextlib.closing(sqlite3.connect(data.database)) as raw:  # a database as the first release left it
        raw.executescript(MIGRATIONS[0] + ";PRAGMA user_version=1;")
        raw.execute("INSERT INTO api_keys(id, name, role, digest, created_at) VALUES ('k','n','admin','d','t')")
        raw.commit()
    with contextlib.closing(data.connect()) as conn:
        assert schema_version(conn) == len(MIGRATIONS)
        assert conn.execute("SELECT name FROM api_keys").fetchone()[0] == "n"
