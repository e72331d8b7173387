"""A value that is slow to get, computed in a thread at most once per interval and served stale meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from appliance.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")


class Refreshed(Generic[T]):
    """A value that is slow to get (it walks a directory, asks the GPU driver, runs the doctor): computed in a thread,
    at most once per `ttl` seconds. The first caller waits for it; after that a stale value is served while the next
    one is computed in the background, so no caller waits again."""

    def __init__(self, compute: Callable[[], T], ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.compute = compute
        self.ttl = ttl
        self.name = getattr(compute, "__qualname__", repr(compute))
        self.clock = clock
        self._value: tuple[float, T] | None = None
        self._task: asyncio.Task[None] | None = None

    async def get(self) -> T:
        if self._value is None:
            if self._task is None:
                self._task = asyncio.ensure_future(self._refresh())
            await asyncio.shield(self._task)
        elif self._task is None and self.clock() - self._value[0] >= self.ttl:
            self._task = asyncio.ensure_future(self._refresh())
        if self._value is None:
            raise RuntimeError(f"{self.name} could not be read; the server log says why")
        return self._value[1]

    async def _refresh(self) -> None:
        try:
            self._value = (self.clock(), await asyncio.to_thread(self.compute))
        except Exception:  # logged; a stale value is kept and tried again after `ttl`
            log.exception("refresh.failed", what=self.name)
            if self._value is not None:
                self._value = (self.clock(), self._value[1])
        finally:
            self._task = None
