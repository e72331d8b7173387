"""A full disk, as one domain error: SQLite's "database or disk is full", an OSError with ENOSPC or EDQUOT, and the
same conditions as Chroma and diskcache report them, from whichever store met them, become `StorageFull` (HTTP 507,
in the OpenAI error shape) naming the store and the folder whose filesystem is full and what to do.

Stores wrap their writes in `full_disk_is(store, path)`; an error that escapes unwrapped is still recognised by the
app's last-resort handler (`storage_full_from`), which names the stores whose filesystems have no room left. Caches
do not fail a request over a full disk: they log it and serve without storing (`is_disk_full`)."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# How the same condition reads when a library turns it into text: SQLite's message for SQLITE_FULL, strerror of
# ENOSPC and EDQUOT, and Rust's io::Error (Chroma's engine) "... (os error 28)".
FULL_TEXTS = ("database or disk is full", "no space left on device", "disk quota exceeded", "os error 28",
              "os error 122", "file too large")
SQLITE_FULL = 13
# Below this many free bytes a filesystem counts as full when the error itself does not say where it happened.
NEARLY_FULL_BYTES = 1 << 20


class StorageFull(ApplianceError):
    """A store could not write because its filesystem is full (or the owner's quota is spent)."""

    status_code = 507
    error_type = "server_error"
    code = "storage_full"

    def __init__(self, store: str, path: Path | str | None, *, hint: str = "") -> None:
        where = f" ({path})" if path else ""
        free = free_bytes(path) if path else None
        room = f"; {free / 2**20:.1f} MiB free there" if free is not None else ""
        message = (f"{store}{where} is full: no space left on the disk that holds it{room}. Free disk space there "
                   f"(or grow the volume), then retry{'; ' + hint if hint else ''}")
        super().__init__(message)
        self.store = store
        self.path = str(path) if path else None

    def to_body(self) -> dict[str, dict[str, Any]]:
        body = super().to_body()
        body["error"]["store"] = self.store
        return body


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(exc: BaseException) -> bool:
    """Whether this error (or one it was raised from) is a full disk or a spent quota."""
    for error in _chain(exc):
        if isinstance(error, StorageFull):
            return True
        if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
            return True
        if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) == SQLITE_FULL:
            return True
        text = str(error).lower()
        if any(marker in text for marker in FULL_TEXTS):
            return True
    return False


def free_bytes(path: Path | str) -> int | None:
    """Free bytes for an unprivileged writer on the filesystem holding `path` (its nearest existing parent)."""
    candidate = Path(path)
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    try:
        stat = os.statvfs(candidate)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


@contextlib.contextmanager
def full_disk_is(store: str, path: Path | str, hint: str = "", *, rename: bool = False) -> Iterator[None]:
    """Inside: a full disk met by any write becomes `StorageFull(store, path)`; other errors pass unchanged. A
    `StorageFull` raised inside keeps its store, unless `rename` (this store is the more telling name for it, as the
    audit log is for the database that holds it); its class is kept either way."""
    try:
        yield
    except StorageFull as exc:
        if not rename or exc.store == store:
            raise
        raise type(exc)(store, exc.path or path, hint=hint) from exc
    except Exception as exc:
        if is_disk_full(exc):
            raise StorageFull(store, path, hint=hint) from exc
        raise


def storage_full_from(exc: BaseException, stores: Mapping[str, Path]) -> StorageFull | None:
    """For an unwrapped error: a `StorageFull` naming the stores whose filesystems have (almost) no room left, or
    the data dir when none can be told; None when the error is no full disk."""
    if not is_disk_full(exc):
        return None
    for error in _chain(exc):
        if isinstance(error, StorageFull):
            return error
        if isinstance(error, OSError) and error.filename:
            named = next((name for name, path in stores.items() if str(error.filename).startswith(str(path))), None)
            if named:
                return StorageFull(named, stores[named])
    full = [(name, path) for name, path in stores.items() if (free_bytes(path) or 0) < NEARLY_FULL_BYTES]
    if len(full) == 1:
        return StorageFull(*full[0])
    root = Path(os.path.commonpath([str(path) for path in stores.values()])) if stores else None
    named = f" ({', '.join(name for name, _ in full)})" if full else ""
    return StorageFull(f"the data directory{named}", root)
