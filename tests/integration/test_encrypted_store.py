"""The encrypted model store with the real server, the real llama.cpp worker and the real default model: weights
are plaintext only in memory (never in the data dir or temp dirs, loaded or unloaded), a tampered model fails to
load with a clear error and an audit record, plaintext blobs of an earlier version are encrypted at start, and a
key rotation killed with SIGKILL at any point leaves every model loadable."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from appliance.config import CryptoSettings
from appliance.crypto.streaming import MAGIC
from appliance.datadir import DataDir
from appliance.registry.store import ModelStore, open_model_store
from tests.integration.conftest import Running, new_key
from tests.integration.test_workers import wait_until
from tests.server import DEFAULT_MODEL, ServerProcess, appliance, clone_data_dir

PROMPT = [{"role": "user", "content": "Say hello."}]


def store_of(data_dir: Path) -> ModelStore:
    return open_model_store(DataDir(data_dir), CryptoSettings())


def only_blob(data_dir: Path) -> Path:
    [blob] = (data_dir / "models").glob("sha256-*")
    return blob


@pytest.fixture(scope="module")
def plaintext(template_dir: Path) -> bytes:
    """The default model's GGUF, decrypted from the template's store (its digest is its name)."""
    sha256 = only_blob(template_dir).name.removeprefix("sha256-")
    with store_of(template_dir).open_for_load(sha256) as weights:
        content = weights.path.read_bytes()
    assert hashlib.sha256(content).hexdigest() == sha256 and content.startswith(b"GGUF")
    return content


def slices(plaintext: bytes) -> list[bytes]:
    """Known 4 KiB pieces of the weights (tensor data, near the start, the middle and the end)."""
    n = len(plaintext)
    return [plaintext[at : at + 4096] for at in (n // 10, n // 2, n - 8192)]


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                if path.is_file() and not path.is_symlink():
                    yield path


def assert_no_plaintext(pieces: list[bytes], *roots: Path) -> int:
    scanned = 0
    for path in files_under(*roots):
        with contextlib.suppress(FileNotFoundError):
            content = path.read_bytes()
            scanned += 1
            for piece in pieces:
                assert piece not in content, f"plaintext weights found in {path}"
    return scanned


@contextlib.contextmanager
def server_on(data_dir: Path, env: dict[str, str] | None = None, wait_ready: bool = True) -> Iterator[Running]:
    key = new_key(data_dir)
    process = ServerProcess(data_dir, env)
    try:
        process.start(wait_ready=wait_ready)
        yield Running(process.url, key, process)
    finally:
        process.stop()


def chat(running: Running) -> str:
    client = running.client()
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=PROMPT, max_tokens=4,  # type: ignore[arg-type]
                                           temperature=0)
    return reply.choices[0].message.content or ""


def memfds(pid: int) -> list[str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    links = []
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            links.append(os.readlink(fd))
    return [link for link in links if "memfd:appliance-model-" in link]


def test_weights_are_plaintext_only_in_memory(
    template_dir: Path, plaintext: bytes, tmp_path: Path, start_server: Callable[..., Running]
) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    running = start_server({"APPLIANCE_MODELS__PIN_DEFAULT": "false", "APPLIANCE_MODELS__KEEP_ALIVE": "2",
                            "TMPDIR": str(private_tmp)})
    assert running.process is not None
    data_dir, pieces = running.process.data_dir, slices(plaintext)
    assert chat(running)
    [worker] = running.process.workers()
    # loaded: the worker maps the weights from a memfd it inherited, not from any file on disk
    maps = Path(f"/proc/{worker.pid}/maps").read_text()
    assert "/memfd:appliance-model-" in maps
    assert str(data_dir) not in maps and ".gguf" not in maps
    assert "--model /proc/self/fd/" in " ".join(worker.cmdline())
    assert memfds(running.process.proc.pid)  # type: ignore[union-attr]  # held by the supervisor until unload
    assert only_blob(data_dir).read_bytes().startswith(MAGIC)
    assert assert_no_plaintext(pieces, data_dir, private_tmp) >= 3
    # unloaded (idle): the worker is gone and the supervisor has dropped (and emptied) the memfd
    wait_until(lambda: not running.process.workers(), what="idle unload")  # type: ignore[union-attr]
    wait_until(lambda: not memfds(running.process.proc.pid), what="memfd released")  # type: ignore[union-attr]
    assert assert_no_plaintext(pieces, data_dir, private_tmp) >= 3
    assert chat(running)  # and it loads again from the encrypted store


def test_a_tampered_model_fails_to_load_with_a_clear_error_and_an_audit_record(
    template_dir: Path, tmp_path: Path
) -> None:
    data_dir = clone_data_dir(template_dir, tmp_path / "data")
    blob = only_blob(data_dir)
    content = bytearray(blob.read_bytes())
    content[len(content) // 2] ^= 0x01  # one flipped bit in the middle of the weights
    blob.unlink()  # hard-linked to the template: replace the link, never write through it
    blob.write_bytes(bytes(content))
    verify = appliance("models", "verify", data_dir=data_dir, check=False)
    assert verify.returncode == 1
    assert f"DAMAGED {DEFAULT_MODEL}" in verify.stderr and "failed authentication" in verify.stderr
    with server_on(data_dir, wait_ready=False) as running:
        with pytest.raises(openai.APIStatusError) as caught:
            chat(running)
        assert caught.value.status_code == 503
        error = caught.value.body
        assert isinstance(error, dict) and error["code"] == "model_damaged", error
        assert "failed its integrity check" in error["message"] and "models verify" in error["message"]
        assert httpx.get(running.url + "/readyz").status_code == 503
        out = appliance("audit", "export", "--action", "model.load", data_dir=data_dir).stdout
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        failed = [r for r in records if r["outcome"] == "error" and r["target"] == DEFAULT_MODEL]
        assert failed and "integrity check" in failed[0]["details"]["reason"]
        assert not running.process.workers()  # type: ignore[union-attr]  # no worker ever saw the weights


def test_plaintext_blob_of_an_earlier_version_is_encrypted_at_start(
    template_dir: Path, plaintext: bytes, tmp_path: Path
) -> None:
    data_dir = clone_data_dir(template_dir, tmp_path / "data")
    blob = only_blob(data_dir)
    blob.unlink()
    blob.write_bytes(plaintext)  # what an earlier version stored
    for wrapped in (data_dir / "keys" / "wrapped").iterdir():
        wrapped.unlink()
    with server_on(data_dir) as running:
        assert chat(running)
    assert blob.read_bytes().startswith(MAGIC)
    assert assert_no_plaintext(slices(plaintext), data_dir / "models") == 1
    assert appliance("models", "verify", data_dir=data_dir).returncode == 0


CRASH_POINTS = ["new-key:1", "rewrap-tmp:1", "rewrap-done:1", "rewrap-tmp:2", "rewrap-done:3", "rewrap-all:1"]


def test_rotation_killed_at_any_point_leaves_every_model_loadable(template_dir: Path, tmp_path: Path) -> None:
    data_dir = clone_data_dir(template_dir, tmp_path / "data")
    store = store_of(data_dir)
    extra = {store.put(iter([b"GGUF extra blob %d " % i + os.urandom(3 << 20)])).sha256: i for i in range(2)}
    digests = store.stored_digests()
    assert len(digests) == 3
    blobs_before = {d: hashlib.sha256((data_dir / "models" / f"sha256-{d}").read_bytes()).hexdigest()
                    for d in digests}
    env = {**os.environ, "APPLIANCE_DATA_DIR": str(data_dir)}
    for point in CRASH_POINTS:
        killed = subprocess.run([sys.executable, "-m", "appliance", "crypto", "rotate"],
                                env={**env, "APPLIANCE_CRYPTO_CRASH_AT": point}, capture_output=True, text=True,
                                timeout=300, check=False)
        assert killed.returncode == -9, (point, killed.stderr)
        fresh = store_of(data_dir)  # a new process's view: only what reached the disk
        assert {d: fresh.problem(d) for d in digests} == dict.fromkeys(digests), point
    assert len(store_of(data_dir).ring.versions()) == 1 + len(CRASH_POINTS)
    done = appliance("crypto", "rotate", "--retire", data_dir=data_dir)
    assert "weights untouched" in done.stdout
    final = store_of(data_dir)
    assert final.ring.versions() == [len(CRASH_POINTS) + 2]
    assert set(final.key_versions_in_use().values()) == {len(CRASH_POINTS) + 2}
    assert {d: hashlib.sha256((data_dir / "models" / f"sha256-{d}").read_bytes()).hexdigest()
            for d in digests} == blobs_before  # rewrapped, never re-encrypted
    assert not list((data_dir / "keys" / "wrapped").glob(".*.tmp"))
    for sha256 in extra:
        final.delete(sha256)
    with server_on(data_dir) as running:  # the real worker serves the real model under the rotated key
        assert chat(running)
    status = appliance("crypto", "status", data_dir=data_dir).stdout
    assert f"version {len(CRASH_POINTS) + 2}: wraps 1 model blob(s)" in status
