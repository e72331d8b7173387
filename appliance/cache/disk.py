"""diskcache's `Cache` for the appliance's caches: a write that meets a full disk raises `StorageFull` naming the
cache and its folder (with the least-recently-used policy even a read writes: the access time). The callers treat
that as "not cached" and go on serving."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache

from appliance.storage import full_disk_is


class Cache(diskcache.Cache):  # type: ignore[misc]
    def __init__(self, directory: Path, store: str, **settings: Any) -> None:
        super().__init__(str(directory), **settings)
        self.store = store
        self.path = directory

    def set(self, *args: Any, **kwargs: Any) -> bool:
        with full_disk_is(self.store, self.path):  # a large value's file is written before the transaction
            return bool(super().set(*args, **kwargs))

    @contextlib.contextmanager
    def _transact(self, retry: bool = False, filename: str | None = None) -> Iterator[Any]:
        with full_disk_is(self.store, self.path), super()._transact(retry, filename) as transaction:
            yield transaction
