"""Every route the app registers refuses a caller without a key, except the two public probes."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from appliance.app import PUBLIC_PATHS, create_app
from appliance.config import load_settings
from tests.integration.conftest import Running
from tests.server import clone_data_dir


def registered_routes(template_dir: Path, tmp_path: Path) -> list[tuple[str, str]]:
    data = clone_data_dir(template_dir, tmp_path / "data")
    app = create_app(load_settings(env={}, data_dir=data).settings)
    routes = []
    for route in app.routes:
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        for method in sorted(getattr(route, "methods", {"GET"}) - {"HEAD", "OPTIONS"}):
            routes.append((method, path))
    return routes


def test_every_route_but_the_probes_needs_a_key(server: Running, template_dir: Path, tmp_path: Path) -> None:
    routes = registered_routes(template_dir, tmp_path)
    assert ("POST", "/v1/chat/completions") in routes and ("GET", "/metrics") in routes
    checked = 0
    for method, path in routes:
        response = httpx.request(method, server.url + path, json={})
        if path in PUBLIC_PATHS:
            assert response.status_code in (200, 503), (method, path)
            continue
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.json()["error"]["type"] == "authentication_error"
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("path", ["/v1/models?api_key=x", "/schema/swagger"])
def test_keys_in_query_strings_are_not_credentials(server: Running, path: str) -> None:
    assert httpx.get(server.url + path).status_code == 401
