"""diskcache's `Cache`, fit for a full disk: a write whose COMMIT fails (SQLITE_FULL) leaves no transaction open.

diskcache rolls back what fails inside its transaction but not a failed COMMIT, and then the connection it keeps per
thread stays inside that transaction: every later write on the thread fails ("cannot start a transaction within a
transaction", raised as `Timeout`) long after space is back. With the least-recently-used policy even a read
writes (the access time). Here the failed transaction is rolled back, so the cache works again as soon as there is
room. A full disk itself is `StorageFull` naming the store."""

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
        try:
            with full_disk_is(self.store, self.path), super()._transact(retry, filename) as transaction:
                yield transaction
        except BaseException:
            # The outermost transaction has ended (its owner is cleared) but SQLite kept it open: COMMIT failed.
            con = self._con
            if self._txn_id is None and con.in_transaction:
                con.execute("ROLLBACK")
            raise
