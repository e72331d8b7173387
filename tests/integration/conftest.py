"""Fixtures for the real server: a prepared data dir with the default model, servers, keys and clients.

Set APPLIANCE_TEST_URL (and APPLIANCE_TEST_KEY) to run the client-side tests against an installed box."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from tests.server import DEFAULT_MODEL, ServerProcess, appliance, clone_data_dir


@pytest.fixture(scope="session")
def template_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised data dir holding the default model, pulled once through the real catalog source."""
    data = tmp_path_factory.mktemp("template") / "data"
    appliance("init", data_dir=data)
    appliance("models", "pull", DEFAULT_MODEL, data_dir=data)
    return data


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


def new_key(data_dir: Path, role: str = "admin", expires: str | None = None,
            env: dict[str, str] | None = None) -> str:
    args = ["keys", "create", "--name", "test", "--role", role] + (["--expires", expires] if expires else [])
    return appliance(*args, data_dir=data_dir, env=env).stdout.strip().splitlines()[-1]


OPEN_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    """Close every SDK client a test made, so no socket is left for the garbage collector to find."""
    yield
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()


class Running:
    """A server under test: its URL, an admin key, and (when local) the process and data dir."""

    def __init__(self, url: str, key: str, process: ServerProcess | None = None) -> None:
        self.url = url
        self.key = key
        self.process = process

    def client(self, key: str | None = None, **kwargs: object) -> openai.OpenAI:
        """An openai SDK client for this server (the admin key unless `key`); closed after the test."""
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.key, max_retries=0,
                               **kwargs)  # type: ignore[arg-type]
        OPEN_CLIENTS.append(client)
        return client

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="session")
def start_server(template_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Running]]:
    """Start a fresh server with its own copy of the data dir; extra settings as APPLIANCE_* variables."""
    started: list[ServerProcess] = []

    def start(env: dict[str, str] | None = None, wait_ready: bool = True) -> Running:
        data = clone_data_dir(template_dir, tmp_path_factory.mktemp("server") / "data")
        key = new_key(data)
        process = ServerProcess(data, env)
        started.append(process)
        process.start(wait_ready=wait_ready)
        return Running(process.url, key, process)

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def server(start_server: Callable[..., Running]) -> Running:
    """The shared server for tests that do not change its state."""
    if url := os.environ.get("APPLIANCE_TEST_URL"):
        return Running(url.rstrip("/"), os.environ["APPLIANCE_TEST_KEY"])
    return start_server()


@pytest.fixture
def client(server: Running) -> openai.OpenAI:
    return server.client()
