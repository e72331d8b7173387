"""SIGKILL of the whole process tree (the server and its model workers, group by group) while an ingestion job, a
model import and a promote are each half way, and again right after a promote was acknowledged (issue 18, item 4).
Each operation is seen to be half way by what it reports, not by a sleep: the ingestion job's progress, the
import's byte count (its source sends half the file, then holds the connection), the new version's worker
process. The restart repairs and loses nothing that was acknowledged: documents and keys added before are there,
the ingestion job (acknowledged by its 202) runs again to the end, the interrupted import leaves no file behind,
the interrupted promote leaves the old version in production, the acknowledged one the new; and the checks of
`audit verify`, `models verify` and `rag check` pass (asked through the API of the restarted server).

Key rotation killed at every step is tests/integration/test_encrypted_store.py
(test_rotation_killed_at_any_point_leaves_every_model_loadable)."""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import gguf
import httpx
import pytest

from tests.integration.test_rollout import with_metadata
from tests.server import DEFAULT_MODEL, ServerProcess, appliance, clone_data_dir, new_key, wait_until
from tests.unit.ggufs import make_gguf

SETTINGS = {"APPLIANCE_MODELS__ALLOW_PRIVATE_SOURCES": "true"}  # the import's source is a local stand-in
WORDS = ("harbour lantern copper meadow glacier falcon canyon ember quartz thunder saddle velvet compass marble "
         "tundra beacon river mountain library engine harvest violin orbit puzzle").split()


class HeldSource:
    """An HTTP file whose first half is sent at once; the rest waits until `release()` (or the client is gone)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.released = threading.Event()
        source = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                half = len(source.body) // 2
                self.send_response(200)
                self.send_header("Content-Length", str(len(source.body)))
                self.end_headers()
                self.wfile.write(source.body[:half])
                self.wfile.flush()
                source.released.wait(120)
                with contextlib.suppress(ConnectionError):  # the importer was killed: nobody reads the rest
                    self.wfile.write(source.body[half:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/model.gguf"

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def held_source(tmp_path: Path) -> Iterator[HeldSource]:
    source = HeldSource(make_gguf(tmp_path / "held.gguf", payload_bytes=4 << 20).read_bytes())
    yield source
    source.close()


def big_document(size: int, seed: int = 18) -> str:
    """Text of about `size` bytes in paragraphs: a large document, ingested as a job of many chunks."""
    rng = random.Random(seed)
    paragraphs, total = [], 0
    while total < size:
        paragraph = " ".join(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(6))
        paragraphs.append(paragraph)
        total += len(paragraph) + 2
    return "\n\n".join(paragraphs)




def started(data: Path, key: str) -> tuple[ServerProcess, httpx.Client]:
    process = ServerProcess(data, SETTINGS, own_group=True).start()
    return process, httpx.Client(base_url=process.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


class Promote(threading.Thread):
    """A promote to version 2 from a thread of its own: its answer, or the error of a connection cut by the kill."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url, self.headers = url, headers
        self.outcome: httpx.Response | httpx.HTTPError | None = None

    def run(self) -> None:
        try:
            self.outcome = httpx.post(f"{self.url}/api/models/{DEFAULT_MODEL}/promote", json={"version": 2},
                                      headers=self.headers, timeout=120)
        except httpx.HTTPError as exc:
            self.outcome = exc


def stages(api: httpx.Client) -> dict[int, str]:
    return {v["version"]: v["stage"] for v in api.get(f"/api/models/{DEFAULT_MODEL}/versions").json()["data"]}


def chat_ok(api: httpx.Client) -> bool:
    reply = api.post("/v1/chat/completions", json={"model": DEFAULT_MODEL, "max_tokens": 4,
                                                   "messages": [{"role": "user", "content": "Hi"}]})
    return reply.status_code == 200 and bool(reply.json()["choices"][0]["message"]["content"])


def test_killed_mid_way_the_restart_repairs_and_loses_nothing_acknowledged(
    template_dir: Path, model_file: Path, tmp_path: Path, held_source: HeldSource
) -> None:
    data = clone_data_dir(template_dir, tmp_path / "data")
    admin = new_key(data)
    name = bytes(gguf.GGUFReader(model_file).fields["general.name"].parts[-1])
    renamed = with_metadata(model_file, tmp_path / "renamed.gguf", "general.name", b"T" + name[1:])
    appliance("models", "pull", f"file:{renamed}", "--name", DEFAULT_MODEL, data_dir=data)  # version 2, in staging
    process, api = started(data, admin)
    try:
        assert stages(api) == {1: "production", 2: "staging"}
        # acknowledged before the kill: a collection, a document, a key
        assert api.post("/api/collections", json={"name": "kept"}).status_code == 201
        assert api.post("/api/collections/kept/documents", json={"id": "small", "text": "The harbour lantern."}
                        ).status_code == 201
        key = api.post("/api/keys", json={"name": "acknowledged", "role": "user"})
        assert key.status_code == 201, key.text

        # three operations, each seen half way: the import (held by its source), the ingestion job, the promote
        pull = api.post("/api/models/pull", json={"source": held_source.url, "name": "held"}).json()
        wait_until(lambda: api.get(f"/api/models/pulls/{pull['id']}").json()["bytes"] > 0, "the import half way", 120)
        job = api.post("/api/collections/kept/documents", json={"id": "big", "text": big_document(300_000)})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        wait_until(lambda: (j := api.get(f"/api/jobs/{job_id}").json())["stage"] == "embedding"
                   and j["done"] < j["total"], "the ingestion half way", 120)  # steps of 512: none indexed
        promote = Promote(process.url, dict(api.headers))
        promote.start()
        wait_until(lambda: any(f"{DEFAULT_MODEL}@2" in " ".join(w.cmdline()) for w in process.workers()),
                   "the new version loading", 120)
        assert promote.outcome is None  # still warming the new version up
        assert api.get(f"/api/jobs/{job_id}").json()["stage"] == "embedding"
        assert api.get(f"/api/models/pulls/{pull['id']}").json()["status"] == "running"
        assert process.kill_tree() >= 3  # the server and both versions' workers
        promote.join(30)
        assert isinstance(promote.outcome, httpx.HTTPError)
        api.close()

        process, api = started(data, admin)
        assert stages(api) == {1: "production", 2: "staging"}  # the promote was never acknowledged
        assert chat_ok(api)
        # the job (acknowledged with its 202) runs again from its stored copy, to the end
        finished = wait_until(lambda: (j := api.get(f"/api/jobs/{job_id}").json())["state"] in ("done", "failed")
                              and j, "the job run again", timeout=300)
        assert finished["state"] == "done", finished
        docs = {d["id"]: d for d in api.get("/api/collections/kept/documents").json()["data"]}
        assert "small" in docs and docs["big"]["chunks"] == finished["total"]
        assert api.post("/api/rag/check").json()["consistent"] is True
        assert "held" not in {m["name"] for m in api.get("/api/models").json()["data"]}
        assert not list((data / "tmp").iterdir())  # the import's staging file is gone
        assert key.json()["id"] in {k["id"] for k in api.get("/api/keys").json()["data"]}

        # acknowledged, then killed at once: the new version stays in production
        done = api.post(f"/api/models/{DEFAULT_MODEL}/promote", json={"version": 2})
        assert done.status_code == 200, done.text
        process.kill_tree()
        api.close()
        process, api = started(data, admin)
        assert stages(api)[2] == "production" and stages(api)[1] != "production"
        assert chat_ok(api)
        # the integrity checks, through the server (the CLI's `audit verify`, `models verify` and `rag check`)
        assert api.post("/api/audit/verify").json()["intact"] is True
        assert all(row["ok"] for row in api.post("/api/models/verify").json()["data"])
        assert api.post("/api/rag/check").json()["consistent"] is True
    finally:
        api.close()
        process.stop()
