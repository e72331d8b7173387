"""Every route the app registers declares a registered permission and enforces it: no key -> 401, a role that
lacks the permission -> 403, a role that grants it -> through. The probes and the web UI's sign-in (password and
single sign-on) are the only public routes."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from appliance.app import create_app
from appliance.auth.guards import PUBLIC
from appliance.auth.permissions import PERMISSIONS
from appliance.auth.rbac import SHIPPED_RBAC, Rbac
from appliance.config import load_settings
from tests.integration.conftest import Running, new_key
from tests.server import clone_data_dir

Route = tuple[str, str, str]  # method, path, permission


def registered_routes(template_dir: Path, tmp_path: Path) -> list[Route]:
    data = clone_data_dir(template_dir, tmp_path / "routes-data")
    app = create_app(load_settings(env={}, data_dir=data).settings)
    routes: list[Route] = []
    for route in app.routes:
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        for handler in getattr(route, "route_handlers", []):
            for method in sorted(handler.http_methods - {"HEAD", "OPTIONS"}):
                routes.append((method, path, handler.opt.get("permission", "")))
    return routes


@pytest.fixture(scope="module")
def routes(template_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Route]:
    return registered_routes(template_dir, tmp_path_factory.mktemp("routes"))


@pytest.fixture(scope="module")
def rbac_server(start_server: Callable[..., Running], tmp_path_factory: pytest.TempPathFactory) -> Running:
    """A server whose roles file adds 'powerless' (a role that no route accepts) to the shipped roles."""
    rbac_file = tmp_path_factory.mktemp("rbac") / "rbac.toml"
    rbac_file.write_text(SHIPPED_RBAC.read_text() + '\n[roles.powerless]\npermissions = ["keys:own"]\n')
    return start_server({"APPLIANCE_AUTH__RBAC_FILE": str(rbac_file)})


def test_every_route_declares_a_registered_permission(routes: list[Route]) -> None:
    assert ("POST", "/v1/chat/completions", "chat:use") in routes
    assert ("GET", "/api/alerts", "metrics:read") in routes
    assert ("POST", "/api/feedback", "chat:use") in routes
    assert ("POST", "/api/watermark/detect", "watermark:detect") in routes
    assert {("POST", "/v1/responses", "chat:use"), ("GET", "/v1/responses/x", "chat:use"),
            ("DELETE", "/v1/responses/x", "chat:use"),
            ("GET", "/v1/responses/x/input_items", "chat:use")} <= set(routes)
    for method, path, permission in routes:
        assert permission in PERMISSIONS or permission == PUBLIC, (method, path, permission)
    public = {path for _, path, permission in routes if permission == PUBLIC}
    # the web UI's files hold no data: the page shell and its scripts load before anyone signs in
    assert public == {"/healthz", "/readyz", "/api/auth/login", "/api/auth/methods", "/api/auth/oidc/login",
                      "/api/auth/oidc/callback", "/", "/ui", "/ui/x"}


def test_every_permission_is_documented_and_every_shipped_role_is_valid() -> None:
    assert all(text.endswith(".") and len(text) > 20 for text in PERMISSIONS.values())
    shipped = tomllib.loads(SHIPPED_RBAC.read_text())["roles"]
    assert set(shipped) >= {"admin", "operator", "user", "auditor"}
    rbac = Rbac.load()
    assert rbac.roles["admin"] == frozenset(PERMISSIONS)
    assert not rbac.allows("auditor", "chat:use") and rbac.allows("user", "chat:use")


def test_anonymous_callers_get_401_everywhere_but_the_probes(server: Running, routes: list[Route]) -> None:
    for method, path, permission in routes:
        response = httpx.request(method, server.url + path, json={})
        if path == "/api/auth/login":  # public, and a body without credentials is malformed
            assert response.status_code == 400, (method, path, response.status_code)
        elif path == "/":
            assert response.status_code == 302, (method, path)
        elif path.startswith("/api/auth/oidc/"):  # single sign-on, not configured on this server
            assert response.status_code == 404, (method, path, response.status_code)
            assert response.json()["error"]["code"] == "oidc_not_configured"
        elif path in ("/ui", "/ui/x"):  # the shell
            assert response.status_code == 200 and "text/html" in response.headers["content-type"]
        elif permission == PUBLIC:
            assert response.status_code in (200, 503), (method, path)
        else:
            assert response.status_code == 401, (method, path, response.status_code)
            assert response.json()["error"]["type"] == "authentication_error"


def test_roles_without_the_permission_get_403_and_roles_with_it_pass(rbac_server: Running,
                                                                      routes: list[Route]) -> None:
    assert rbac_server.process is not None
    data = rbac_server.process.data_dir
    rbac_file = rbac_server.process.env["APPLIANCE_AUTH__RBAC_FILE"]
    rbac = Rbac.load(Path(rbac_file))
    keys = {role: new_key(data, role=role, env={"APPLIANCE_AUTH__RBAC_FILE": rbac_file}) for role in rbac.roles}
    checked = 0
    for method, path, permission in routes:
        if permission == PUBLIC:
            continue
        for role, key in keys.items():
            response = httpx.request(method, rbac_server.url + path, headers={"Authorization": f"Bearer {key}"},
                                     json={})
            if rbac.allows(role, permission):
                assert response.status_code not in (401, 403), (role, method, path, response.text)
            else:
                assert response.status_code == 403, (role, method, path, response.status_code)
                error = response.json()["error"]
                assert error["type"] == "permission_error" and permission in error["message"]
                checked += 1
    assert checked >= len([r for r in routes if r[2] != PUBLIC])  # 'powerless' alone is refused on each


def test_unknown_permission_in_the_roles_file_stops_the_server(template_dir: Path, tmp_path: Path) -> None:
    from tests.server import appliance

    rbac_file = tmp_path / "rbac.toml"
    rbac_file.write_text('[roles.admin]\npermissions = ["chat:use", "root:everything"]\n')
    data = clone_data_dir(template_dir, tmp_path / "d")
    result = appliance("serve", "--port", "1", data_dir=data, env={"APPLIANCE_AUTH__RBAC_FILE": str(rbac_file)},
                       check=False)
    assert result.returncode == 1
    assert "root:everything" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("path", ["/v1/models?api_key=x", "/schema/swagger"])
def test_keys_in_query_strings_are_not_credentials(server: Running, path: str) -> None:
    assert httpx.get(server.url + path).status_code == 401


def test_a_scoped_admin_key_may_chat_and_nothing_more(server: Running) -> None:
    """Effective permissions are the role's intersected with the key's scopes: admin + chat:use may only chat."""
    if server.process is None:
        pytest.skip("needs a local server to create keys on")
    from tests.server import DEFAULT_MODEL, appliance

    created = appliance("keys", "create", "--name", "chat-only", "--role", "admin", "--scopes", "chat:use",
                        data_dir=server.process.data_dir)
    assert "scopes=chat:use" in created.stderr
    headers = {"Authorization": f"Bearer {created.stdout.strip().splitlines()[-1]}"}
    chat = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=120, json={
        "model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    assert chat.status_code == 200, chat.text
    for method, path, permission in (("GET", "/metrics", "metrics:read"), ("GET", "/api/keys", "keys:manage"),
                                     ("POST", "/api/keys", "keys:manage"), ("GET", "/v1/models", "models:read")):
        response = httpx.request(method, server.url + path, headers=headers, json={})
        assert response.status_code == 403, (method, path, response.text)
        error = response.json()["error"]
        assert error["type"] == "permission_error" and permission in error["message"] and "scopes" in error["message"]
