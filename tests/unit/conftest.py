"""Shared unit-test fixtures: a real, initialised data dir and a connection to its SQLite database."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit import AuditLog
from appliance.auth.keys import ApiKeyService, derive_pepper
from appliance.auth.passwords import Argon2Params, derive_password_pepper
from appliance.auth.users import UserService
from appliance.datadir import DataDir

ROLES = ("admin", "operator", "user", "auditor")
CHEAP = Argon2Params(memory_kib=64, iterations=1)  # fast hashes where a test is not about the parameters
PASSWORD = "violet-Tangerine-87-harbour"


@pytest.fixture
def data(tmp_path: Path) -> DataDir:
    data = DataDir(tmp_path / "data")
    data.initialise()
    return data


@pytest.fixture
def conn(data: DataDir) -> Iterator[sqlite3.Connection]:
    with contextlib.closing(data.connect()) as conn:
        yield conn


@pytest.fixture
def audit(conn: sqlite3.Connection) -> AuditLog:
    return AuditLog(conn)


@pytest.fixture
def users(data: DataDir, conn: sqlite3.Connection, audit: AuditLog) -> UserService:
    return UserService(conn, derive_password_pepper(data.read_master_key()), audit=audit, roles=ROLES, params=CHEAP)


@pytest.fixture
def api_keys(data: DataDir, conn: sqlite3.Connection, audit: AuditLog) -> ApiKeyService:
    return ApiKeyService(conn, derive_pepper(data.read_master_key()), audit=audit, roles=ROLES)
