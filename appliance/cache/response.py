"""The exact response cache: diskcache in <data_dir>/cache/responses (0700), values as msgpack bytes, never pickled.

diskcache pickles any value or key that is not bytes, str, int or float, and unpickles what it reads back; the
`BytesOnlyDisk` below refuses both, so a value that slipped through as an object fails loudly, and a tampered
cache database cannot make the server unpickle anything. Several processes may open the cache at once (the
server and `appliance cache clear`): diskcache keeps its state in SQLite (WAL) and is safe for that.

Eviction: least recently used first once the size limit is reached, and a TTL per entry. Retention (the privacy
jobs) uses `purge_older_than`, `erase_partition` and `report`."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import diskcache
import msgspec

from appliance.cache.disk import Cache
from appliance.cache.keys import key_model, key_partition

MIB = 1024 * 1024
RESPONSE_STORE = "the response cache"


class Entry(msgspec.Struct, array_like=True, frozen=True):
    """One cached response: enough to replay it whole or as a stream, and who and when it was for."""

    chat: bool
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    created: float  # epoch seconds when stored
    partition: str
    model_sha256: str
    owner: str = ""  # who asked (`user:<id>`, `key:<id>`): erasure finds their entries in shared partitions
    tool_calls: list[dict[str, Any]] | None = None  # a chat answer's calls, in OpenAI's message shape
    served: str = ""  # the version that produced it (`name@N`), for the `x-served-model` of a replay


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Entry).decode


class PickleRefused(TypeError):
    """Something other than bytes or str reached the response cache, which never pickles."""


class BytesOnlyDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache's Disk for str keys and bytes values only: no pickling on the way in, no unpickling on the way out."""

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) is not str:
            raise PickleRefused(f"response cache keys are str, not {type(key).__name__}")
        return super().put(key)  # type: ignore[no-any-return]

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise PickleRefused("the response cache holds a pickled key; run `appliance cache clear`")
        return super().get(key, raw)

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> tuple[Any, ...]:
        if type(value) is not bytes:
            raise PickleRefused(f"response cache values are bytes, not {type(value).__name__}")
        return super().store(value, read, key)  # type: ignore[no-any-return]

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY):
            raise PickleRefused("the response cache holds a non-bytes value; run `appliance cache clear`")
        return super().fetch(mode, filename, value, read)


class CacheReport(msgspec.Struct, frozen=True):
    directory: str
    entries: int
    bytes: int
    size_limit_bytes: int
    partitions: dict[str, int]
    oldest_age_seconds: float | None


class ResponseCache:
    """Stored responses by key (`appliance.cache.keys.cache_key`)."""

    def __init__(self, directory: Path, *, size_limit_bytes: int, ttl: float = 0.0) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        self.directory = directory
        self.ttl = ttl
        self.size_limit_bytes = size_limit_bytes
        # a short busy timeout: the server reads on its event loop, and a lookup that waits on another process's
        # write (`appliance cache clear`) had better be a miss than a stall
        self._cache = Cache(directory, RESPONSE_STORE, timeout=2, disk=BytesOnlyDisk, size_limit=size_limit_bytes,
                                      eviction_policy="least-recently-used", tag_index=True,
                                      statistics=False, sqlite_secure_delete=1)  # deleted entries are zeroed
        self.evictions = 0

    def close(self) -> None:
        self._cache.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def get(self, key: str) -> Entry | None:
        raw = self._cache.get(key)
        if raw is None:
            return None
        try:
            return _decode(raw)
        except msgspec.DecodeError:  # a damaged entry is a miss, and goes
            self._cache.delete(key)
            return None

    def put(self, key: str, entry: Entry) -> int:
        """Store `entry`; returns how many older entries the size limit or their TTL pushed out to make room."""
        before = len(self._cache)
        replaced = key in self._cache
        self._cache.set(key, _encode(entry), expire=self.ttl or None, tag=entry.partition)
        evicted = max(0, before + (0 if replaced else 1) - len(self._cache))
        self.evictions += evicted
        return evicted

    def delete(self, key: str) -> bool:
        return bool(self._cache.delete(key))

    def volume(self) -> int:
        """Bytes on disk: the SQLite file plus value files."""
        return int(self._cache.volume())

    def __len__(self) -> int:
        return len(self._cache)

    def keys(self) -> Iterator[str]:
        return iter(list(self._cache.iterkeys()))

    def clear(self, partition: str | None = None) -> int:
        """Drop every entry, or one partition's; returns how many."""
        if partition is None:
            return int(self._cache.clear())
        return self.erase_partition(partition)

    def erase_partition(self, subject: str) -> int:
        """Drop everything cached for one partition (`user:<id>`, `key:<id>`, `role:<name>`): erasure on request."""
        return int(self._cache.evict(subject))

    def erase_owner(self, owners: Collection[str]) -> int:
        """Drop the entries these principals added to shared (`role:`) partitions."""
        dropped = 0
        for key in self.keys():
            if key.startswith("role:") and (entry := self.get(key)) is not None and entry.owner in owners:
                dropped += self.delete(key)
        return dropped

    def expire(self) -> int:
        """Drop the entries past their TTL now (otherwise they go when next read or culled)."""
        return int(self._cache.expire())

    def drop_model(self, model_sha256: str) -> int:
        """Drop every entry answered by one model version (it was removed or replaced)."""
        return self._drop(lambda key: key_model(key) == model_sha256)

    def drop_models_except(self, model_sha256s: Collection[str]) -> int:
        """Drop every entry answered by a model version no longer installed."""
        return self._drop(lambda key: key_model(key) not in model_sha256s)

    def purge_older_than(self, seconds: float) -> int:
        """Retention: drop entries stored more than `seconds` ago, and any expired ones."""
        return self.expire() + sum(1 for key in self._stored_before(seconds) if self._cache.delete(key))

    def count_older_than(self, seconds: float) -> int:
        """How many entries were stored more than `seconds` ago (what a purge would drop besides expired ones)."""
        return len(self._stored_before(seconds))

    def _stored_before(self, seconds: float) -> list[str]:
        cutoff = time.time() - seconds
        return [key for key, stored in self._stored_times() if stored < cutoff]

    def report(self) -> CacheReport:
        partitions: dict[str, int] = {}
        times = self._stored_times()
        for key, _ in times:
            partitions[key_partition(key)] = partitions.get(key_partition(key), 0) + 1
        oldest = min((stored for _, stored in times), default=None)
        return CacheReport(str(self.directory), len(times), self.volume(), self.size_limit_bytes, partitions,
                           None if oldest is None else max(0.0, time.time() - oldest))

    def _stored_times(self) -> list[tuple[str, float]]:
        """(key, store time) of every entry, read on a connection of our own: reading through diskcache's `get`
        would count as a use and keep old entries alive under the LRU policy. `Cache` and its `key`, `raw` and
        `store_time` columns are diskcache's table (stable since diskcache 3)."""
        uri = (self.directory / diskcache.core.DBNAME).as_uri() + "?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=60)) as conn:
            rows = conn.execute("SELECT key, store_time FROM Cache WHERE raw = 1").fetchall()
        return [(str(key), float(stored)) for key, stored in rows if isinstance(key, str)]

    def _drop(self, predicate: Any) -> int:
        return sum(1 for key in self.keys() if predicate(key) and self._cache.delete(key))


def open_response_cache(cache_root: Path, size_limit_mb: int, ttl: float) -> ResponseCache:
    """The response cache under a data dir's cache/ folder (DataDir.cache)."""
    old = os.umask(0o077)  # diskcache's files: owner only
    try:
        return ResponseCache(cache_root / "responses", size_limit_bytes=size_limit_mb * MIB, ttl=ttl)
    finally:
        os.umask(old)
