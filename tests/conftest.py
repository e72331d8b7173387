"""Suite-wide fixtures and hooks: the prepared data dir and `start_server` that the integration and e2e tests
share, the OpenID Provider and the two single sign-on appliances they share, closing SDK clients, and GPU-only tests
skipping cleanly on boxes without an NVIDIA GPU."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.oidc_provider import OpenIdProvider, install, node_missing
from tests.server import DEFAULT_MODEL, OPEN_CLIENTS, Running, ServerProcess, appliance, clone_data_dir, new_key

OIDC_ROLE_MAP = json.dumps({"appliance-admins": "admin", "appliance-auditors": "auditor"})
OIDC_LOCAL_ADMIN = ("local-admin", "violet-Tangerine-87-harbour")  # a local user of `sso_server`
NO_MODEL = {"APPLIANCE_MODELS__DEFAULT": "none-needed-here"}  # sign-in tests need /healthz only, no model loaded


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Browser tests last: Playwright's session keeps an event loop set on the main thread until the session ends,
    # and asyncio.run() refuses to start under it.
    items.sort(key=lambda item: "/e2e/" in f"/{item.nodeid}")
    if shutil.which("nvidia-smi"):
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi not found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def template_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised data dir holding the default model, pulled once through the real catalog source."""
    data = tmp_path_factory.mktemp("template") / "data"
    appliance("init", data_dir=data)
    appliance("models", "pull", DEFAULT_MODEL, data_dir=data)
    return data


@pytest.fixture(autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    """Close every SDK client a test made, so no socket is left for the garbage collector to find."""
    yield
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()


@pytest.fixture(scope="session")
def server_factory(template_dir: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Callable[..., Running]]:
    """Start a fresh server with its own copy of the data dir; extra settings as APPLIANCE_* variables. `prepare`,
    when given, is called with the data dir before the server starts (e.g. to create users with the CLI). Servers
    started through this session-wide factory run until the session ends: only the shared `server` fixtures use it
    directly; tests and module fixtures use `start_server`, whose servers stop with their module."""
    started: list[ServerProcess] = []

    def start(env: dict[str, str] | None = None, wait_ready: bool = True,
              prepare: Callable[[Path], None] | None = None) -> Running:
        data = clone_data_dir(template_dir, tmp_path_factory.mktemp("server") / "data")
        key = new_key(data)
        if prepare is not None:
            prepare(data)
        process = ServerProcess(data, env)
        started.append(process)
        process.start(wait_ready=wait_ready)
        return Running(process.url, key, process)

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def start_server(server_factory: Callable[..., Running]) -> Iterator[Callable[..., Running]]:
    """`server_factory` for one test module: the servers it starts are stopped when the module's tests are done, so
    that a whole run holds a few servers (each with a loaded model, ~1 GiB) at a time instead of one per module."""
    mine: list[Running] = []

    def start(*args: object, **kwargs: object) -> Running:
        running = server_factory(*args, **kwargs)
        mine.append(running)
        return running

    yield start
    for running in mine:
        if running.process is not None:
            running.process.stop()


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenIdProvider]:
    """The OpenID Provider (npm oidc-provider on Node, tests/oidc_provider.py); skips without node and npm."""
    if reason := node_missing():
        pytest.skip(reason)
    install()
    provider = OpenIdProvider("appliance", "test-client-secret-" + "k" * 24,
                              tmp_path_factory.mktemp("oidc") / "provider.log").start()
    yield provider
    provider.stop()


@pytest.fixture(scope="session")
def sso_server(oidc_provider: OpenIdProvider, server_factory: Callable[..., Running]) -> Running:
    """An appliance signing in at `oidc_provider` as a confidential client (its secret set with `appliance oidc
    set-secret`), local passwords on (with the local admin OIDC_LOCAL_ADMIN), default role `user`; no model."""

    def prepare(data: Path) -> None:
        appliance("oidc", "set-secret", data_dir=data, input=oidc_provider.client_secret + "\n")

    env = oidc_provider.env(role_map=OIDC_ROLE_MAP, default_role="user")
    running = server_factory({**env, **NO_MODEL}, wait_ready=False, prepare=prepare)
    name, password = OIDC_LOCAL_ADMIN  # through the admin API: quicker than one more CLI process
    created = httpx.post(running.url + "/api/users", json={"name": name, "role": "admin", "password": password},
                         headers=running.headers, timeout=30)
    assert created.status_code == 201, created.text
    return running


@pytest.fixture(scope="session")
def sso_only_server(oidc_provider: OpenIdProvider, server_factory: Callable[..., Running]) -> Running:
    """An appliance signing in at `oidc_provider` as a public client (no secret: PKCE alone), local passwords off,
    no default role, the provider shown as "Staff Login"; no model."""
    env = oidc_provider.env(role_map=OIDC_ROLE_MAP, default_role="", local_passwords="false",
                            provider_name="Staff Login", client_id=oidc_provider.client_id + "-public")
    return server_factory({**env, **NO_MODEL}, wait_ready=False)
