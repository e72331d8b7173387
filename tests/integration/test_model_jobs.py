"""Models from the browser against the real server: the catalog, a pull of the default model's GGUF under another
name from `file:` polled to done with byte progress, a second pull of that name landing as a staging version,
verification, removal of one version and of the model (a production version refused with 409), audited as the CLI
does; a bad source or a digest that does not match ends as a failed pull with a clear message."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.registry.catalog import SHIPPED_CATALOG
from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL
from tests.unit.ggufs import make_gguf

BAD_DIGEST = "smol-bad-digest"


@pytest.fixture(scope="module")
def box(start_server: Callable[..., Running], model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Running:
    """A server whose catalog also names the default model's file under a digest it does not have."""
    catalog = tmp_path_factory.mktemp("catalog") / "catalog.toml"
    catalog.write_text(SHIPPED_CATALOG.read_text() + f'\n[models.{BAD_DIGEST}]\nsource = "file:{model_file}"\n'
                       f'sha256 = "{"0" * 64}"\nformat = "gguf"\nlicence = "Apache-2.0"\n')
    return start_server({"APPLIANCE_MODELS__CATALOG": str(catalog)})


def api(box: Running, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, box.url + path, headers=box.headers, timeout=120, **kwargs)


def pull(box: Running, source: str, name: str | None = None) -> dict[str, Any]:
    """Start a pull, check the 202, and poll it until it ends."""
    started = api(box, "POST", "/api/models/pull", json={"source": source, "name": name})
    assert started.status_code == 202, started.text
    job: dict[str, Any] = started.json()
    # the reply tells the job's state when it was sent: a pull that fails at once (a missing file) has failed already
    assert job["object"] == "model.pull" and job["status"] in ("running", "done", "failed")
    assert job["id"].startswith("pull_")
    deadline = time.monotonic() + 120
    while job["status"] == "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
        polled = api(box, "GET", f"/api/models/pulls/{job['id']}")
        assert polled.status_code == 200, polled.text
        job = polled.json()
    return job


def versions(box: Running, name: str) -> dict[int, str]:
    listing = api(box, "GET", f"/api/models/{name}/versions").json()["data"]
    return {v["version"]: v["stage"] for v in listing}


def test_the_catalog_lists_what_can_be_pulled(box: Running) -> None:
    catalog = api(box, "GET", "/api/catalog")
    assert catalog.status_code == 200, catalog.text
    entry = next(e for e in catalog.json()["data"] if e["name"] == DEFAULT_MODEL)
    assert entry["source"].startswith("pypi:") and entry["format"] == "gguf" and entry["licence"] == "Apache-2.0"
    assert entry["installed"] is True and entry["description"] and len(entry["sha256"]) == 64
    assert entry["size"] == 98_362_432


def test_pull_verify_and_remove_from_the_api(box: Running, model_file: Path, tmp_path: Path) -> None:
    done = pull(box, f"file:{model_file}", "smol-copy")
    size = model_file.stat().st_size
    assert done == {"object": "model.pull", "id": done["id"], "status": "done", "source": f"file:{model_file}",
                    "bytes": size, "total": size, "model": "smol-copy", "version": 1, "error": None}
    models = {m["name"]: m for m in api(box, "GET", "/api/models").json()["data"]}
    assert models["smol-copy"]["size_bytes"] == size and models["smol-copy"]["production_version"] == 1

    second = pull(box, f"file:{make_gguf(tmp_path / 'tiny.gguf')}", "smol-copy")
    assert second["status"] == "done" and second["version"] == 2, second
    assert versions(box, "smol-copy") == {1: "production", 2: "staging"}  # as `appliance models pull` does

    checked = api(box, "POST", "/api/models/verify")
    assert checked.status_code == 200, checked.text
    rows = {(r["model"], r["version"]): r for r in checked.json()["data"]}
    assert {("smol-copy", 1), ("smol-copy", 2), (DEFAULT_MODEL, 1)} <= set(rows)
    assert all(r["ok"] and r["error"] is None for r in rows.values())

    in_production = api(box, "DELETE", "/api/models/smol-copy@1")
    assert in_production.status_code == 409 and "in production" in in_production.json()["error"]["message"]
    assert api(box, "DELETE", "/api/models/smol-copy@2").json() == {"id": "smol-copy@2", "object": "model",
                                                                    "deleted": True}
    assert versions(box, "smol-copy") == {1: "production"}
    assert api(box, "DELETE", "/api/models/smol-copy").status_code == 200
    assert "smol-copy" not in {m["name"] for m in api(box, "GET", "/api/models").json()["data"]}
    assert api(box, "DELETE", "/api/models/smol-copy").status_code == 404

    records = api(box, "GET", "/api/audit", params={"limit": 1000}).json()["data"]
    trail = [(r["action"], r["target"], r["outcome"]) for r in records if "smol-copy" in r["target"]]
    assert trail == [("model.pull", "smol-copy", "ok"), ("model.pull", "smol-copy", "ok"),
                     ("model.remove", "smol-copy@1", "error"), ("model.remove", "smol-copy@2", "ok"),
                     ("model.remove", "smol-copy", "ok"), ("model.remove", "smol-copy", "error")]
    assert all(r["actor"] == f"key:{box.key[4:12]}" for r in records if "smol-copy" in r["target"])


@pytest.mark.parametrize(("source", "needle"), [
    ("file:/nonexistent/model.gguf", "does not exist"),
    ("ftp://example.org/model.gguf", "neither a catalog name nor a source"),
    ("https://127.0.0.1:9/model.gguf", "loopback, private or reserved address"),
    (BAD_DIGEST, "expected 0000000000"),
])
def test_a_bad_source_ends_as_a_failed_pull(box: Running, source: str, needle: str) -> None:
    failed = pull(box, source)
    assert failed["status"] == "failed" and needle in failed["error"], failed
    assert failed["model"] is None and failed["version"] is None
    assert BAD_DIGEST not in {m["name"] for m in api(box, "GET", "/api/models").json()["data"]}


def test_unknown_pulls_and_bad_bodies(box: Running) -> None:
    assert api(box, "GET", "/api/models/pulls/pull_nope").status_code == 404
    assert api(box, "POST", "/api/models/pull", json={"name": "x"}).status_code == 400
