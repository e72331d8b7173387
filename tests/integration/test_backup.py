"""Backup and restore (issue 18, item 5): a backup taken from a running server that is answering requests,
verified, tampered with (verify names the file), and restored on a fresh data dir where a server started on it
still knows the keys, users, collections, models and usage, and the audit chain and model blobs verify. The key
ring travels sealed with a passphrase (stdin or APPLIANCE_BACKUP_PASSPHRASE): a wrong or missing one restores
nothing; without a passphrase it is copied as the data dir holds it, with a warning."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.server import Running, ServerProcess, appliance

PASSWORD = "correct horse battery staple 18"
PASSPHRASE = "backup passphrase: seven random words"
WITH_PASSPHRASE = {"APPLIANCE_BACKUP_PASSPHRASE": PASSPHRASE}


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
        taken = appliance("backup", "--passphrase-stdin", str(backup), data_dir=data, input=PASSPHRASE + "\n")
    finally:
        stop.set()
        worker.join()
    assert answered, "no request finished while the backup ran"
    assert "key ring sealed with the passphrase" in taken.stdout, taken.stdout
    assert not (backup / "keys").exists()
    secrets = [p.read_bytes() for p in (data / "keys").rglob("*") if p.is_file()]
    for copied in (p for p in backup.rglob("*") if p.is_file()):  # no key file's bytes in it, plain or base64
        content = copied.read_bytes()
        assert not any(s in content or base64.b64encode(s) in content for s in secrets), copied
    assert appliance("backup", "verify", str(backup), data_dir=data).returncode == 0  # structure only
    assert appliance("backup", "verify", str(backup), "--passphrase-stdin", data_dir=data,
                     input=PASSPHRASE + "\n").returncode == 0
    wrong = appliance("backup", "verify", str(backup), data_dir=data, check=False,
                      env={"APPLIANCE_BACKUP_PASSPHRASE": "not the passphrase"})
    assert wrong.returncode == 1 and "keys.sealed: the passphrase does not open" in wrong.stderr, wrong.stderr

    # Without a passphrase the key ring goes in as the data dir holds it, with a warning that says how to seal it.
    plain = appliance("backup", str(tmp_path / "plain"), data_dir=data)
    assert "key ring UNWRAPPED" in plain.stdout and "--passphrase-stdin" in plain.stderr, plain.stderr
    assert sorted(p.name for p in (tmp_path / "plain" / "keys").rglob("*") if p.is_file()) == sorted(
        p.name for p in (data / "keys").rglob("*") if p.is_file())

    # A damaged copy (this one without the keys) does not verify and is not restored.
    damaged = tmp_path / "damaged"
    assert "WITHOUT the key ring" in appliance("backup", "--no-keys", str(damaged), data_dir=data).stdout
    assert not (damaged / "keys").exists() and not (damaged / "keys.sealed").exists()
    blob = next((damaged / "models").iterdir())
    content = bytearray(blob.read_bytes())
    content[len(content) // 2] ^= 0xFF
    blob.write_bytes(bytes(content))
    refused = appliance("backup", "verify", str(damaged), data_dir=data, check=False)
    assert refused.returncode == 1 and f"models/{blob.name}" in refused.stderr, refused.stderr
    assert appliance("restore", str(damaged), data_dir=tmp_path / "never", check=False,
                     env=WITH_PASSPHRASE).returncode == 1
    assert not (tmp_path / "never").exists()
    # Nor does restore overwrite a data dir in use, or restore without the right passphrase.
    assert appliance("restore", str(backup), data_dir=data, check=False, env=WITH_PASSPHRASE).returncode == 1
    missing = appliance("restore", str(backup), data_dir=tmp_path / "never", check=False)
    assert missing.returncode == 1 and "sealed with a passphrase" in missing.stderr, missing.stderr
    mistyped = appliance("restore", str(backup), "--passphrase-stdin", data_dir=tmp_path / "never", check=False,
                         input=PASSPHRASE[:-1] + "\n")
    assert mistyped.returncode == 1 and "does not open" in mistyped.stderr, mistyped.stderr
    assert not (tmp_path / "never").exists()

    usage_before = api.get("/api/usage").json()["data"]
    api.close()
    running.process.stop()  # one server at a time on the test box

    fresh = tmp_path / "fresh" / "data"
    restored_keys = appliance("restore", str(backup), "--passphrase-stdin", data_dir=fresh, input=PASSPHRASE + "\n")
    assert "key ring sealed" in restored_keys.stdout, restored_keys.stdout
    assert sorted(p.relative_to(fresh).as_posix() for p in (fresh / "keys").rglob("*") if p.is_file()) == sorted(
        p.relative_to(data).as_posix() for p in (data / "keys").rglob("*") if p.is_file())
    assert (fresh / "keys").stat().st_mode & 0o777 == 0o700
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
