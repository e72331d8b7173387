"""A full disk as one domain error (appliance.storage), on a real full filesystem where the box lets a test mount a
small tmpfs: SQLite's SQLITE_FULL from a `db.Database` connection, the caches' diskcache, and staging files of killed
imports told apart from live ones by their lock."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import db
from appliance.cache.disk import Cache
from appliance.registry.store import _mkstemp, remove_abandoned_imports
from appliance.storage import StorageFull, full_disk_is, is_disk_full, storage_full_from


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, or a skip saying why there is none."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("mount/umount not found")
    folder = tmp_path / "disk"
    folder.mkdir()
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"this box does not allow `mount -t tmpfs` ({done.stderr.strip()})")
    yield folder
    subprocess.run([umount, "-l", str(folder)], check=False)


@contextlib.contextmanager
def filled(folder: Path) -> Iterator[None]:
    balloon = folder / ".balloon"
    with balloon.open("wb", buffering=0) as fh:
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 4096)
    try:
        yield
    finally:
        balloon.unlink()


def test_the_shapes_of_a_full_disk_are_recognised() -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert is_disk_full(RuntimeError("Error executing plan: Internal error: error returned from database: (code: "
                                     "13) database or disk is full"))  # Chroma's engine
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("write failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)  # through the chain
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))


def test_the_error_names_the_store_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StorageFull) as caught, full_disk_is("the model store", tmp_path):
        raise OSError(errno.ENOSPC, "No space left on device")
    error = caught.value
    assert error.status_code == 507 and error.code == "storage_full"
    body = error.to_body()["error"]
    assert body["store"] == "the model store" and body["type"] == "server_error"
    assert body["message"].startswith(f"the model store ({tmp_path}) is full") and "then retry" in body["message"]
    with pytest.raises(ValueError, match="other"), full_disk_is("the model store", tmp_path):
        raise ValueError("other errors pass unchanged")


def test_an_unwrapped_error_is_named_by_its_file(tmp_path: Path) -> None:
    stores = {"the database": tmp_path / "appliance.db", "the model store": tmp_path / "models"}
    found = storage_full_from(OSError(errno.ENOSPC, "No space", str(tmp_path / "models" / "x")), stores)
    assert found is not None and found.store == "the model store"
    assert storage_full_from(ValueError("no"), stores) is None


def test_sqlite_full_is_a_database_full_that_sqlite_handlers_still_catch(small_disk: Path) -> None:
    conn = db.connect(small_disk / "t.db", store="the keyword index")
    conn.execute("CREATE TABLE t (x BLOB)")
    with filled(small_disk):
        with pytest.raises(sqlite3.Error) as caught:  # what the usage and quota writers catch
            for _ in range(100):
                conn.execute("INSERT INTO t VALUES (randomblob(8192))")
        assert isinstance(caught.value, db.DatabaseFull) and caught.value.store == "the keyword index"
        assert caught.value.path == str(small_disk / "t.db")
        assert not conn.in_transaction
    conn.execute("INSERT INTO t VALUES (randomblob(8192))")  # space is back
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_full_diskcache_names_itself_and_works_again_once_space_is_back(small_disk: Path) -> None:
    cache = Cache(small_disk / "c", "the response cache", eviction_policy="least-recently-used")
    cache.set("before", b"value")
    with filled(small_disk):
        with pytest.raises(StorageFull) as caught:
            for i in range(200):
                cache.set(f"k{i}", os.urandom(2048))
        assert caught.value.store == "the response cache" and caught.value.path == str(small_disk / "c")
        with pytest.raises(StorageFull):  # under LRU a read notes its use, a write: the callers take it as a miss
            cache.get("before")
    assert cache.set("after", b"value") and cache.get("after") == b"value"
    cache.close()


def test_only_abandoned_staging_files_are_removed(tmp_path: Path) -> None:
    live_fd, live = _mkstemp(tmp_path)
    dead_fd, dead = _mkstemp(tmp_path)
    os.close(dead_fd)  # the lock goes with the last descriptor, as with a killed process
    assert remove_abandoned_imports(tmp_path) == [Path(dead).name]
    assert Path(live).exists() and not Path(dead).exists()
    os.close(live_fd)
