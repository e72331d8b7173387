"""Fixtures for the real server: the shared server, its clients, and the default model in plaintext.

The data dir template, `start_server`, `Running` and `new_key` are suite-wide (tests/conftest.py, tests/server.py),
as the e2e tests start servers too; the names are re-exported here for the tests that import them from here.

Set APPLIANCE_TEST_URL (and APPLIANCE_TEST_KEY) to run the client-side tests against an installed box."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.server import OPEN_CLIENTS, Running, new_key

__all__ = ["OPEN_CLIENTS", "Running", "new_key"]


@pytest.fixture(scope="session")
def model_file(template_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default GGUF in plaintext, decrypted from the template's (encrypted) store into the test's temp dir,
    for tests that craft variants of it."""
    from appliance.config import CryptoSettings
    from appliance.datadir import DataDir
    from appliance.registry.store import open_model_store

    blobs = list((template_dir / "models").glob("sha256-*"))
    assert len(blobs) == 1
    target = tmp_path_factory.mktemp("plain") / "model.gguf"
    store = open_model_store(DataDir(template_dir), CryptoSettings())
    with store.open_for_load(blobs[0].name.removeprefix("sha256-")) as weights:
        shutil.copyfile(weights.path, target)
    return target


@pytest.fixture(scope="session")
def server(server_factory: Callable[..., Running]) -> Running:
    """The shared server for tests that do not change its state."""
    if url := os.environ.get("APPLIANCE_TEST_URL"):
        return Running(url.rstrip("/"), os.environ["APPLIANCE_TEST_KEY"])
    return server_factory()


@pytest.fixture
def client(server: Running) -> openai.OpenAI:
    return server.client()
