"""Backup and restore (issue 18, item 5): a backup taken from a running server that is answering requests,
verified, tampered with (verify names the file), and restored on a fresh data dir where a server started on it
still knows the keys, users, collections, models and usage, and the audit chain and model blobs verify."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.server import Running, ServerProcess, appliance

PASSWORD = "correct horse battery staple 18"


def test_backup_under_load_restores_on_a_fresh_data_dir(
        start_server: Callable[..., Running], tmp_path: Path) -> None:
    running = start_server()
    assert running.process is not None
    data = running.process.data_dir
    api = httpx.Client(base_url=running.url, headers=running.headers, timeout=120)
    assert api.post("/api/users", json={"name": "dora", "role": "user", "password": PASSWORD}).status_code == 201
    assert api.post("/api/collections", json={"name": "kept"}).status_code == 201
    model = running.client().models.list().data[0].id
    running.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi."}], max_tokens=4)
    deadline = time.monotonic() + 60  # usage is written behind the answer
    while not api.get("/api/usage").json()["data"] and time.monotonic() < deadline:
        threading.Event().wait(0.2)
    assert api.get("/api/usage").json()["data"], "the request's usage was never recorded"
    # Requests keep writing usage and audit rows while the backup copies the databases.
    stop = threading.Event()
    answered: list[int] = []

    def load() -> None:
        while not stop.is_set():
            reply = running.client().chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
            answered.append(reply.usage.total_tokens if reply.usage else 0)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        backup = tmp_path / "backup"
        taken = appliance("backup", str(backup), data_dir=data)
    finally:
        stop.set()
        worker.join()
    assert answered, "no request finished while the backup ran"
    assert "with the key ring" in taken.stdout, taken.stdout
    assert appliance("backup", "verify", str(backup), data_dir=data).returncode == 0

    # A damaged copy does not verify and is not restored.
    damaged = tmp_path / "damaged"
    appliance("backup", str(damaged), data_dir=data)
    blob = next((damaged / "models").iterdir())
    content = bytearray(blob.read_bytes())
    content[len(content) // 2] ^= 0xFF
    blob.write_bytes(bytes(content))
    refused = appliance("backup", "verify", str(damaged), data_dir=data, check=False)
    assert refused.returncode == 1 and f"models/{blob.name}" in refused.stderr, refused.stderr
    assert appliance("restore", str(damaged), data_dir=tmp_path / "never", check=False).returncode == 1
    assert not (tmp_path / "never" / "appliance.db").exists()
    # Nor does restore overwrite a data dir in use.
    assert appliance("restore", str(backup), data_dir=data, check=False).returncode == 1

    usage_before = api.get("/api/usage").json()["data"]
    api.close()
    running.process.stop()  # one server at a time on the test box

    fresh = tmp_path / "fresh" / "data"
    appliance("restore", str(backup), data_dir=fresh)
    appliance("audit", "verify", data_dir=fresh)
    appliance("models", "verify", data_dir=fresh)
    restored = ServerProcess(fresh)
    try:
        restored.start()
        again = httpx.Client(base_url=restored.url, headers=running.headers, timeout=120)
        assert again.get("/v1/models").json()["data"][0]["id"] == model  # the old admin key, the model
        assert "dora" in {u["name"] for u in again.get("/api/users").json()["data"]}
        assert "kept" in {c["name"] for c in again.get("/api/collections").json()["data"]}
        usage_after = again.get("/api/usage").json()["data"]
        assert sum(r["requests"] for r in usage_after) >= 1
        assert sum(r["requests"] for r in usage_after) <= sum(r["requests"] for r in usage_before)
        reply = again.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4})
        assert reply.status_code == 200, reply.text  # the restored key ring decrypts the model
        again.close()
    finally:
        restored.stop()
