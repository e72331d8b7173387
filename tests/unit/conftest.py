"""Shared unit-test fixtures: a real, initialised data dir and a connection to its SQLite database."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit import AuditLog
from appliance.datadir import DataDir


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
