"""A full disk in each store, for real (issue 18, item 4): the data dir and its cache/, rag/ and rag/chroma/ folders
are small tmpfs mounts of their own, and a test fills one of them to the last byte (a fallocated balloon file) while
the real server runs. A write to the full store gets a 507 in the OpenAI error shape naming the store, its path and
what to do, never a 500; the server goes on serving what does not need that store; once the balloon is gone the
store works again, and at the end every integrity check passes (`rag check`, `audit verify`, `models verify` and
SQLite's integrity_check on every database).

Mounting needs root (CAP_SYS_ADMIN); without it the module is skipped and says why."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL, ServerProcess, appliance, new_key
from tests.unit.ggufs import make_gguf

MOUNT = shutil.which("mount")
UMOUNT = shutil.which("umount")
# sizes: the root holds the default model (94 MiB) and the database; the others start nearly empty
SIZES = {"": "160m", "cache": "16m", "rag": "16m", "rag/chroma": "32m"}
ATTEMPTS = 40  # writes tried against a full store before it must have refused one (SQLite reuses WAL pages first)


def _mount(path: Path, size: str) -> None:
    assert MOUNT is not None
    subprocess.run([MOUNT, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True,
                   capture_output=True, text=True)


def _umount(path: Path) -> None:
    assert UMOUNT is not None
    subprocess.run([UMOUNT, "-l", str(path)], check=False, capture_output=True)


def mount_refusal(probe: Path) -> str | None:
    """Why this box cannot mount a tmpfs (not root, no CAP_SYS_ADMIN, a container), or None when it can."""
    if MOUNT is None or UMOUNT is None:
        return "mount/umount not found"
    probe.mkdir()
    try:
        _mount(probe, "1m")
    except subprocess.CalledProcessError as exc:
        return f"this box does not allow `mount -t tmpfs` ({exc.stderr.strip() or exc.returncode})"
    _umount(probe)
    return None


@contextlib.contextmanager
def full(folder: Path) -> Iterator[None]:
    """The filesystem holding `folder` filled to its last byte, for the block; emptied again after it."""
    balloon = folder / ".balloon"
    with balloon.open("wb", buffering=0) as fh:
        stat = os.statvfs(folder)
        with contextlib.suppress(OSError):
            os.posix_fallocate(fh.fileno(), 0, stat.f_bavail * stat.f_frsize)
        fh.seek(0, os.SEEK_END)
        try:
            while True:  # what fallocate could not take, page by page
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    assert os.statvfs(folder).f_bavail == 0
    try:
        yield
    finally:
        balloon.unlink()


@pytest.fixture(scope="module")
def box(template_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A server whose data dir, cache/, rag/ and rag/chroma/ are tmpfs mounts of their own."""
    work = tmp_path_factory.mktemp("disk-full")
    if (reason := mount_refusal(work / "probe")) is not None:
        pytest.skip(reason)
    data = work / "data"
    mounted: list[Path] = []
    try:
        for sub, size in SIZES.items():
            path = data / sub
            path.mkdir(parents=True, exist_ok=True)
            _mount(path, size)
            mounted.append(path)
        shutil.copytree(template_dir, data, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock"))
        key = new_key(data)
        process = ServerProcess(data)
        try:
            process.start()
            yield Running(process.url, key, process)
        finally:
            process.stop()
    finally:
        for path in reversed(mounted):
            _umount(path)


@pytest.fixture(scope="module")
def api(box: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=box.url, headers=box.headers, timeout=120) as client:
        assert client.post("/api/collections", json={"name": "notes"}).status_code == 201
        assert client.post("/api/collections/notes/documents",
                           json={"id": "first", "text": "The lighthouse keeper logs every passing ship."}
                           ).status_code == 201
        yield client


def data_dir(box: Running) -> Path:
    assert box.process is not None
    return box.process.data_dir


def chat(api: httpx.Client, content: str, **headers: str) -> httpx.Response:
    return api.post("/v1/chat/completions", headers=headers, json={
        "model": DEFAULT_MODEL, "temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": content}]})


def assert_storage_full(response: httpx.Response, store: str, folder: Path) -> None:
    assert response.status_code == 507, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == "storage_full" and error["type"] == "server_error" and error["store"] == store, error
    assert error["message"].startswith(f"{store} ({folder}") and "is full" in error["message"], error
    assert "free disk space there" in error["message"].lower(), error


def until_refused(write: Callable[[int], httpx.Response]) -> tuple[int, httpx.Response]:
    """Writes until one is refused: the first few may still fit in pages SQLite or Chroma had already allocated.
    Every answer is a success or a 507, never a 500. Returns the refused attempt and its answer."""
    for attempt in range(ATTEMPTS):
        response = write(attempt)
        if response.status_code == 507:
            return attempt, response
        assert response.status_code in (200, 201), response.text
    raise AssertionError(f"{ATTEMPTS} writes to a full store all succeeded")


def ingest(api: httpx.Client, doc: str) -> Callable[[int], httpx.Response]:
    return lambda i: api.post("/api/collections/notes/documents", json={
        "id": f"{doc}-{i}", "text": f"Entry {i}: " + "the tide tables of the northern harbour. " * 200})


def documents(api: httpx.Client) -> set[str]:
    return {d["id"] for d in api.get("/api/collections/notes/documents").json()["data"]}


def test_a_full_cache_only_stops_caching(box: Running, api: httpx.Client) -> None:
    with full(data_dir(box) / "cache"):
        for _ in range(2):
            answer = chat(api, "Name a colour.")
            assert answer.status_code == 200 and answer.headers["x-cache"] == "miss", answer.text
        embedded = api.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["a new sentence"]})
        assert embedded.status_code == 200, embedded.text
        assert api.post("/api/collections/notes/query", json={"query": "lighthouse"}).status_code == 200
    # space is back: the cache stores again (no transaction was left open on the server's connections)
    assert chat(api, "Name a colour.").headers["x-cache"] == "miss"
    assert chat(api, "Name a colour.").headers["x-cache"] == "hit"


@pytest.mark.parametrize(("folder", "store"), [("rag/chroma", "the vector index (Chroma)"),
                                               ("rag", "the keyword index")])
def test_a_full_index_refuses_ingestion_and_goes_on_answering(box: Running, api: httpx.Client, folder: str,
                                                               store: str) -> None:
    tag = folder.replace("/", "-")
    with full(data_dir(box) / folder):
        attempt, refused = until_refused(ingest(api, tag))
        assert_storage_full(refused, store, data_dir(box) / folder)
        found = api.post("/api/collections/notes/query", json={"query": "lighthouse keeper", "mode": "hybrid"})
        assert found.status_code == 200 and found.json()["data"][0]["document_id"] == "first", found.text
        assert chat(api, "Say hi.", **{"x-cache": "no-store"}).status_code == 200
    assert f"{tag}-{attempt}" not in documents(api)  # the refused document is not there, not even half
    assert api.post("/api/collections/notes/documents", json={"id": f"{tag}-later", "text": "Space is back."}
                    ).status_code == 201
    check = api.post("/api/rag/check").json()
    assert check["consistent"] is True, check


def test_a_full_database_refuses_changes_and_goes_on_serving(box: Running, api: httpx.Client, tmp_path: Path
                                                              ) -> None:
    data = data_dir(box)
    gguf = make_gguf(tmp_path / "tiny.gguf", payload_bytes=1 << 20)
    with full(data):
        _, refused = until_refused(lambda i: api.post("/api/keys", json={"name": f"k{i}", "role": "user"}))
        store = refused.json()["error"]["store"]
        assert store in ("the database", "the audit log"), refused.text
        assert_storage_full(refused, store, data / "appliance.db")
        assert api.get("/api/keys").status_code == 200  # reads go on
        assert api.get("/v1/models").status_code == 200
        answer = chat(api, "Say hello.", **{"x-cache": "no-store"})  # usage and quotas are noted best effort
        assert answer.status_code == 200, answer.text
        pull = api.post("/api/models/pull", json={"source": f"file:{gguf}", "name": "tiny"})
        assert pull.status_code == 202, pull.text
        job = pull.json()
        while job["status"] == "running":
            time.sleep(0.1)
            job = api.get(f"/api/models/pulls/{job['id']}").json()
        assert job["status"] == "failed" and job["error"].startswith(f"the model store ({data / 'tmp'}) is full"), job
        assert not list((data / "tmp").iterdir())  # the import left nothing behind
    created = api.post("/api/keys", json={"name": "after", "role": "user"})
    assert created.status_code == 201, created.text


def test_every_integrity_check_passes_once_space_is_back(box: Running, api: httpx.Client) -> None:
    assert box.process is not None
    box.process.stop()
    data = data_dir(box)
    rag = appliance("rag", "check", data_dir=data, check=False)
    assert rag.returncode == 0, rag.stdout + rag.stderr
    assert appliance("audit", "verify", data_dir=data, check=False).returncode == 0
    assert appliance("models", "verify", data_dir=data, check=False).returncode == 0
    databases = [data / "appliance.db", data / "rag" / "index.db", data / "rag" / "chroma" / "chroma.sqlite3",
                 *(data / "cache").glob("*/cache.db")]
    assert len(databases) >= 5
    for path in databases:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], path
