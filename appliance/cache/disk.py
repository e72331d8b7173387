"""diskcache's `Cache` for the appliance's caches: a write that meets a full disk raises `StorageFull` naming the
cache and its folder (with the least-recently-used policy even a read writes: the access time). The callers treat
that as "not cached" and go on serving.

diskcache's own defaults give every connection (one per thread that touches the cache) a 32 MiB SQLite page cache and
a 64 MiB memory map of the database file; both fill as the cache grows, so a server's memory rose with every new
embedding or answer cached (tests/benchmarks/soak.py: 316 MiB/h under embeddings alone). The appliance's caches keep
4 MiB of pages per connection and no map: a lookup is one indexed read of a few pages, served by the kernel's page
cache just as well."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache

from appliance.storage import full_disk_is

PAGE_CACHE_PAGES = 1024  # SQLite pages (4 KiB) per connection: 4 MiB
MEMORY_MAP_BYTES = 0


class Cache(diskcache.Cache):  # type: ignore[misc]
    def __init__(self, directory: Path, store: str, **settings: Any) -> None:
        settings.setdefault("sqlite_cache_size", PAGE_CACHE_PAGES)
        settings.setdefault("sqlite_mmap_size", MEMORY_MAP_BYTES)
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
