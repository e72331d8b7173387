"""WorkerPool scheduling with fake workers (the pool takes its worker factory as an argument for this):
bounded queue, replacement of dead workers, crash backoff, keep-alive unloading, pinning, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest

from appliance.config import GatewaySettings, ModelSettings, SupervisorSettings
from appliance.errors import ModelUnavailable, QueueFull
from appliance.observability.metrics import Metrics
from appliance.supervisor.pool import WorkerPool
from appliance.supervisor.process import Worker, WorkerStartError

DEFAULT = "default-model"


class FakeWorker:
    """Stands in for a worker process: records what the pool did to it; `crash()` is the process dying."""

    def __init__(self, model: str, serial: int, fail_start: bool) -> None:
        self.model = model
        self.serial = serial
        self.fail_start = fail_start
        self.exited = asyncio.Event()
        self.client: Any = None
        self.started = self.ready = self.stopped = self.stopping = False
        self.wedged = False  # alive, but no longer answering (a deadlock, or SIGSTOP)
        self.loading_forever = False
        self.stopped_before_release = False

    async def start(self) -> None:
        self.started = True
        if self.fail_start:
            self.exited.set()
            raise WorkerStartError(f"model '{self.model}' failed to load: exit code 1")

    async def wait_ready(self) -> None:
        if self.loading_forever:
            await asyncio.Event().wait()
        self.ready = True

    async def health(self) -> dict[str, Any]:
        if self.wedged:
            await asyncio.Event().wait()
        return {"status": "ok"}

    async def stop(self) -> None:
        self.stopping = self.stopped = True
        self.exited.set()

    @property
    def pid(self) -> int | None:
        return 10_000 + self.serial

    def failure(self) -> str:
        return "exit code -9; last output: (none)"

    def crash(self) -> None:
        self.exited.set()


class Factory:
    """The pool's `new_worker`: builds fake workers and records when, and which resources were released."""

    def __init__(self, failing: set[str] | None = None) -> None:
        self.failing = failing or set()
        self.fail_next: dict[str, int] = {}  # model -> how many of its next starts fail
        self.slow: set[str] = set()  # models whose workers never become ready
        self.built: list[FakeWorker] = []
        self.called_at: list[float] = []
        self.released: list[FakeWorker] = []

    async def __call__(self, name: str, resources: contextlib.AsyncExitStack) -> Worker:
        self.called_at.append(time.monotonic())
        fail = name in self.failing or self.fail_next.get(name, 0) > 0
        self.fail_next[name] = self.fail_next.get(name, 0) - 1
        worker = FakeWorker(name, len(self.built), fail_start=fail)
        worker.loading_forever = name in self.slow
        resources.callback(self._release, worker)  # e.g. the decrypted weights, freed with the worker
        self.built.append(worker)
        return cast(Worker, worker)

    def _release(self, worker: FakeWorker) -> None:
        worker.stopped_before_release = worker.stopped
        self.released.append(worker)

    def of(self, name: str) -> list[FakeWorker]:
        return [w for w in self.built if w.model == name]


def make_pool(factory: Factory, metrics: Metrics | None = None, *, keep_alive: float = 300.0,
              pin_default: bool = True, max_queue: int = 32, queue_timeout: float = 120.0,
              restart_backoff: float = 0.01, restart_backoff_max: float = 30.0, health_interval: float = 10.0,
              health_timeout: float = 5.0) -> WorkerPool:
    return WorkerPool(
        ModelSettings(default=DEFAULT, keep_alive=keep_alive, pin_default=pin_default),
        GatewaySettings(max_queue=max_queue, queue_timeout=queue_timeout),
        SupervisorSettings(restart_backoff=restart_backoff, restart_backoff_max=restart_backoff_max,
                           health_interval=health_interval, health_timeout=health_timeout),
        factory, metrics or Metrics(),
    )


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition of the pool's state, bounded; for background tasks that act on their own schedule."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 30))


def test_concurrent_loads_start_one_worker() -> None:
    async def main() -> None:
        factory, metrics = Factory(), Metrics()
        pool = make_pool(factory, metrics)
        first, second = await asyncio.gather(pool.ensure_loaded("m"), pool.ensure_loaded("m"))
        assert first is second
        assert len(factory.built) == 1
        assert factory.built[0].started and factory.built[0].ready
        assert pool.is_ready("m") and not pool.is_ready("other")
        assert sample(metrics, "appliance_models_loaded") == 1
        assert sample(metrics, "appliance_model_load_seconds_count", model="m") == 1
        await pool.close()

    run(main)


class Holder:
    """Holds the model's only slot until released."""

    def __init__(self, pool: WorkerPool, name: str) -> None:
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.task = asyncio.create_task(self._hold(pool, name))

    async def _hold(self, pool: WorkerPool, name: str) -> None:
        async with pool.acquire(name):
            self.holding.set()
            await self.release.wait()


async def use_once(pool: WorkerPool, name: str) -> Worker:
    async with pool.acquire(name) as worker:
        return worker


def test_queue_full_when_max_queue_requests_already_wait() -> None:
    async def main() -> None:
        factory, metrics = Factory(), Metrics()
        pool = make_pool(factory, metrics, max_queue=2)
        holder = Holder(pool, "m")
        await holder.holding.wait()
        queued = [asyncio.create_task(use_once(pool, "m")) for _ in range(2)]
        await eventually(lambda: pool.slot("m").waiting == 2)
        assert sample(metrics, "appliance_queue_depth", model="m") == 2

        with pytest.raises(QueueFull) as info:
            await use_once(pool, "m")
        assert info.value.status_code == 429
        assert info.value.retry_after is not None and info.value.retry_after >= 1
        assert "2 requests are already waiting" in info.value.message

        holder.release.set()
        assert await asyncio.gather(*queued) == [factory.built[0]] * 2  # the queued requests were served
        await holder.task
        slot = pool.slot("m")
        assert (slot.waiting, slot.in_use, slot.gate.locked()) == (0, 0, False)
        await pool.close()

    run(main)


def test_zero_queue_refuses_as_soon_as_the_model_is_busy() -> None:
    async def main() -> None:
        pool = make_pool(Factory(), max_queue=0)
        holder = Holder(pool, "m")
        await holder.holding.wait()
        with pytest.raises(QueueFull):
            await use_once(pool, "m")
        holder.release.set()
        await holder.task
        await use_once(pool, "m")  # free again: served without queueing
        await pool.close()

    run(main)


def test_queue_timeout_gives_503_with_retry_after() -> None:
    async def main() -> None:
        pool = make_pool(Factory(), queue_timeout=0.05)
        holder = Holder(pool, "m")
        await holder.holding.wait()
        with pytest.raises(ModelUnavailable) as info:
            await use_once(pool, "m")
        assert info.value.status_code == 503
        assert info.value.retry_after is not None
        assert pool.slot("m").waiting == 0
        holder.release.set()
        await holder.task
        await pool.close()

    run(main)


def test_exited_worker_is_replaced_on_next_ensure_loaded() -> None:
    async def main() -> None:
        factory, metrics = Factory(), Metrics()
        pool = make_pool(factory, metrics)
        first = cast(FakeWorker, await pool.ensure_loaded("m"))
        first.crash()
        await eventually(lambda: sample(metrics, "appliance_worker_restarts_total", model="m") == 1)
        assert not pool.is_ready("m")
        assert pool.slot("m").crashes == 1
        assert len(factory.built) == 1  # not pinned: no restart until someone asks for it

        second = await pool.ensure_loaded("m")
        assert second is not first
        assert pool.is_ready("m")
        assert first.stopped  # the dead worker was reaped
        assert factory.released == [first]  # and its resources released
        await pool.close()

    run(main)


def test_load_failure_releases_the_slot_and_resources() -> None:
    async def main() -> None:
        factory = Factory(failing={"bad"})
        pool = make_pool(factory)
        with pytest.raises(WorkerStartError):
            await use_once(pool, "bad")
        slot = pool.slot("bad")
        assert (slot.waiting, slot.in_use, slot.gate.locked(), slot.worker) == (0, 0, False, None)
        assert factory.released == factory.built
        await pool.close()

    run(main)


def test_a_load_cut_short_stops_the_worker_before_its_weights_are_released() -> None:
    """The request that started a load goes away (a client disconnect): the half-started worker process is stopped,
    and only then are its resources (the decrypted weights it maps) released."""
    async def main() -> None:
        factory = Factory()
        factory.slow.add("big")
        pool = make_pool(factory)
        loading = asyncio.ensure_future(use_once(pool, "big"))
        await eventually(lambda: bool(factory.of("big")) and factory.of("big")[0].started)
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        worker = factory.of("big")[0]
        assert worker.stopped and factory.released == [worker] and worker.stopped_before_release
        await pool.close()

    run(main)


def test_crash_backoff_grows_and_is_enforced() -> None:
    async def main() -> None:
        factory = Factory(failing={"bad"})
        pool = make_pool(factory, restart_backoff=0.01, restart_backoff_max=0.04)
        slot = pool.slot("bad")
        for attempt, delay in enumerate([0.01, 0.02, 0.04, 0.04], start=1):
            previous_not_before = slot.not_before
            before = time.monotonic()
            with pytest.raises(WorkerStartError):
                await pool.ensure_loaded("bad")
            after = time.monotonic()
            assert slot.crashes == attempt
            assert before + delay <= slot.not_before <= after + delay  # doubles, then capped at the maximum
            assert factory.called_at[-1] >= previous_not_before  # no start before the backoff elapsed
        assert len(factory.built) == 4
        assert factory.released == factory.built
        assert not pool.is_ready("bad")
        await pool.close()

    run(main)


def test_idle_model_is_unloaded_but_pinned_default_is_kept() -> None:
    async def main() -> None:
        factory, metrics = Factory(), Metrics()
        keep_alive = 0.2
        async with make_pool(factory, metrics, keep_alive=keep_alive) as pool:
            await use_once(pool, DEFAULT)  # released first, so it is idle for at least as long as "other"
            await use_once(pool, "other")
            assert pool.is_ready(DEFAULT) and pool.is_ready("other")
            await eventually(lambda: not pool.is_ready("other"))
            other = factory.of("other")[0]
            assert other.stopped and other in factory.released
            assert time.monotonic() - pool.slot(DEFAULT).last_used > keep_alive
            assert pool.is_ready(DEFAULT)
            assert not factory.of(DEFAULT)[0].stopped
            assert sample(metrics, "appliance_models_loaded") == 1
            # a request after unloading loads the model again
            assert await use_once(pool, "other") is not other
            assert pool.is_ready("other")

    run(main)


def test_default_is_not_pinned_when_pinning_is_off() -> None:
    async def main() -> None:
        factory = Factory()
        async with make_pool(factory, keep_alive=0.2, pin_default=False) as pool:
            await use_once(pool, DEFAULT)
            await eventually(lambda: not pool.is_ready(DEFAULT))
            assert factory.of(DEFAULT)[0].stopped

    run(main)


def test_model_in_use_is_not_unloaded() -> None:
    async def main() -> None:
        factory = Factory()
        keep_alive = 0.1
        async with make_pool(factory, keep_alive=keep_alive) as pool:
            holder = Holder(pool, "busy")
            await holder.holding.wait()
            await use_once(pool, "idle")
            await eventually(lambda: not pool.is_ready("idle"))
            # housekeeping has run past keep_alive; the held model must have survived it
            assert time.monotonic() - pool.slot("busy").last_used > keep_alive
            assert pool.is_ready("busy")
            holder.release.set()
            await holder.task

    run(main)


def test_pinned_default_is_restarted_after_a_crash_and_others_are_not() -> None:
    async def main() -> None:
        factory, metrics = Factory(), Metrics()
        async with make_pool(factory, metrics, restart_backoff=0.01) as pool:
            default = cast(FakeWorker, await pool.ensure_loaded(DEFAULT))
            other = cast(FakeWorker, await pool.ensure_loaded("other"))
            default.crash()
            other.crash()
            await eventually(lambda: pool.is_ready(DEFAULT) and pool.slot(DEFAULT).worker is not default)
            assert sample(metrics, "appliance_worker_restarts_total", model=DEFAULT) == 1
            assert sample(metrics, "appliance_worker_restarts_total", model="other") == 1
            assert not pool.is_ready("other")
            assert factory.of("other") == [other]

    run(main)


def test_close_stops_every_worker() -> None:
    async def main() -> None:
        factory, metrics = Factory(), Metrics()
        pool = make_pool(factory, metrics)
        async with pool:
            for name in (DEFAULT, "a", "b"):
                await pool.ensure_loaded(name)
        assert len(factory.built) == 3
        assert all(w.stopped for w in factory.built)
        assert sorted(w.model for w in factory.released) == sorted([DEFAULT, "a", "b"])
        assert not any(pool.is_ready(name) for name in (DEFAULT, "a", "b"))
        assert sample(metrics, "appliance_models_loaded") == 0
        assert factory.of(DEFAULT) == factory.built[:1]  # closing is not a crash: nothing was restarted

    run(main)


def test_pinned_default_keeps_being_restarted_until_it_comes_back() -> None:
    async def main() -> None:
        factory = Factory()
        async with make_pool(factory, restart_backoff=0.01, restart_backoff_max=0.05) as pool:
            first = cast(FakeWorker, await pool.ensure_loaded(DEFAULT))
            factory.fail_next[DEFAULT] = 1  # e.g. memory still held by the dying process
            first.crash()
            await eventually(lambda: len(factory.of(DEFAULT)) >= 2)  # the failed restart
            await eventually(lambda: pool.is_ready(DEFAULT), timeout=3.0)

    run(main)


def test_a_worker_that_stops_answering_health_checks_is_replaced() -> None:
    async def main() -> None:
        factory = Factory()
        metrics = Metrics()
        async with make_pool(factory, metrics, health_interval=0.05, health_timeout=0.1) as pool:
            first = cast(FakeWorker, await pool.ensure_loaded(DEFAULT))
            other = cast(FakeWorker, await pool.ensure_loaded("other"))
            first.wedged = True
            await eventually(lambda: first.stopped and pool.is_ready(DEFAULT), timeout=3.0)
            assert factory.of(DEFAULT)[-1] is not first  # the pinned default came back as a new worker
            assert not other.stopped  # a healthy worker is left alone
            assert metrics.worker_restarts.labels(DEFAULT)._value.get() == 1

    run(main)



def test_each_engine_admits_its_own_number_of_requests_at_once() -> None:
    """llama.cpp's `parallel` is not the limit of a vLLM or remote model: the app's `admission` says, per worker."""
    async def main() -> None:
        factory = Factory()
        pool = make_pool(factory, max_queue=0)
        pool.parallel = 1
        pool.parallel_of = lambda key: {"remote@1": 3}.get(key, 1)
        async with contextlib.AsyncExitStack() as held:
            for _ in range(3):
                await held.enter_async_context(pool.acquire("remote@1"))
            with pytest.raises(QueueFull):  # the fourth finds the remote model's three slots taken
                await held.enter_async_context(pool.acquire("remote@1"))
            await held.enter_async_context(pool.acquire("local"))
            with pytest.raises(QueueFull):  # the llama.cpp one has its own single slot
                await held.enter_async_context(pool.acquire("local"))
        await pool.close()

    run(main)
