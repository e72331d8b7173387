"""The dashboard's pure parts (quantiles from histogram buckets, the TTFT window, values computed in a thread at most
once per interval) and its snapshot over the real WorkerPool (fake workers, tests/unit/test_pool.py), the real
registry and the real metrics."""

from __future__ import annotations

import asyncio
import math
import sqlite3
from pathlib import Path

import pytest

from appliance.audit import AuditLog
from appliance.crypto.keyring import KeyRing
from appliance.datadir import DataDir
from appliance.errors import ModelUnavailable
from appliance.observability.dashboard import Dashboard, HistogramWindow, bucket_quantile
from appliance.observability.metrics import Metrics
from appliance.observability.refresh import Refreshed
from appliance.registry.catalog import Catalog
from appliance.registry.service import ModelRegistry
from appliance.registry.store import ModelStore
from tests.unit.ggufs import make_gguf
from tests.unit.test_pool import Factory, make_pool, run

INF = math.inf


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_quantiles_interpolate_within_a_bucket_as_prometheus_does() -> None:
    bounds = (0.1, 0.5, 1.0, INF)
    assert bucket_quantile(0.5, bounds, (0, 10, 10, 10)) == pytest.approx(0.3)  # 10 in (0.1, 0.5]
    assert bucket_quantile(0.95, bounds, (0, 10, 10, 10)) == pytest.approx(0.48)
    assert bucket_quantile(0.5, bounds, (4, 4, 8, 8)) == pytest.approx(0.1)  # the 4th of 8 tops the first bucket
    assert bucket_quantile(0.5, bounds, (2, 2, 2, 2)) == pytest.approx(0.05)  # from 0 up to the first bound
    assert bucket_quantile(0.95, bounds, (0, 0, 1, 4)) == 1.0  # in +Inf: the largest finite bound
    assert bucket_quantile(0.5, bounds, (0, 0, 0, 0)) is None


def test_the_ttft_window_counts_only_the_last_minute() -> None:
    metrics, clock = Metrics(), Clock()
    window = HistogramWindow(metrics.ttft, "model", window=60.0, clock=clock)
    assert window.quantiles(0.5) == {}  # nothing observed yet
    for _ in range(4):
        metrics.ttft.labels("m").observe(20.0)  # slow, at t=0
    assert window.quantiles(0.5, 0.95)["m"] == (pytest.approx(20.0), pytest.approx(29.0))  # in (10, 30]
    for _ in range(14):  # sampled every 5 s, as the app does
        clock.now += 5
        window.sample()
    assert window.quantiles(0.5)["m"] == (None,)  # 70 s later: the slow ones left the window
    for _ in range(10):
        metrics.ttft.labels("m").observe(0.3)
    metrics.ttft.labels("other").observe(0.007)
    found = window.quantiles(0.5, 0.95)
    assert 0.25 < found["m"][0] <= 0.5 and found["m"][1] is not None and found["m"][1] <= 0.5  # type: ignore[operator]
    assert 0.005 < found["other"][0] <= 0.01  # type: ignore[operator]
    assert len(window._samples) <= 14  # one sample at or before the window's start is kept, no more


def test_a_slow_value_is_computed_once_per_interval_and_served_stale_meanwhile() -> None:
    async def main() -> None:
        clock, calls = Clock(), []

        def compute() -> int:
            calls.append(clock.now)
            return len(calls)

        value = Refreshed(compute, ttl=30.0, clock=clock)
        assert await value.get() == 1
        assert await asyncio.gather(value.get(), value.get()) == [1, 1] and len(calls) == 1
        clock.now += 31
        assert await value.get() == 1  # stale, while the next one is computed in a thread
        while value._task is not None:
            await asyncio.sleep(0.01)
        assert await value.get() == 2 and len(calls) == 2

        def broken() -> int:
            raise OSError("no such device")

        with pytest.raises(RuntimeError, match="could not be read"):
            await Refreshed(broken, ttl=30.0).get()

    run(main)


@pytest.fixture
def registry(data: DataDir, conn: sqlite3.Connection, audit: AuditLog, tmp_path: Path) -> ModelRegistry:
    registry = ModelRegistry(conn, ModelStore(data.models, data.tmp, KeyRing(data.keys), data.wrapped_keys),
                             Catalog(models={}), audit=audit)
    for i in (1, 2):
        registry.pull(f"file:{make_gguf(tmp_path / f'v{i}.gguf')}", name="m")
    return registry


def test_the_snapshot_lists_each_version_with_cumulative_counters(registry: ModelRegistry, data: DataDir) -> None:
    async def main() -> None:
        factory, metrics = Factory(failing={"m@2"}), Metrics()
        pool = make_pool(factory, metrics)
        pool.key = registry.versions.worker_key
        dashboard = Dashboard(metrics, pool, registry, data.root, memory_budget=8 << 30)
        (before,) = dashboard.models(await dashboard.gpus.get())
        assert (before.model, before.name, before.version, before.state, before.requests) == ("m@1", "m", 1,
                                                                                            "unloaded", 0)
        async with pool.acquire("m"):
            pass
        with pytest.raises(RuntimeError):
            async with pool.acquire("m"):
                raise RuntimeError("the worker's connection broke")
        with pytest.raises(ModelUnavailable):
            async with pool.acquire("m@2"):
                pass
        metrics.prompt_tokens.labels("m").inc(12)
        metrics.completion_tokens.labels("m").inc(5)
        metrics.ttft.labels("m").observe(0.3)
        metrics.cache_hits.labels("exact").inc(3)
        metrics.cache_misses.labels("exact").inc(2)
        snapshot = await dashboard.snapshot()
        one, two = snapshot.models
        assert (one.model, one.state, one.healthy, one.requests, one.errors, one.error) == ("m@1", "ready", True, 2,
                                                                                           1, None)
        assert (one.prompt_tokens, one.completion_tokens, one.queue_depth) == (12, 5, 0)
        assert one.ttft_p50 is not None and 0.25 < one.ttft_p50 <= 0.5
        assert (two.model, two.version, two.state, two.healthy, two.requests, two.errors) == ("m@2", 2, "failed",
                                                                                             False, 1, 1)
        assert two.error is not None and "failed to load" in two.error and two.rss_bytes is None
        assert (snapshot.cache.hits, snapshot.cache.misses, snapshot.cache.hit_ratio) == (3, 2, 0.6)
        assert snapshot.memory.budget_bytes == 8 << 30 and 0 < snapshot.memory.available_bytes <= \
            snapshot.memory.total_bytes
        assert snapshot.disk.path == str(data.root) and snapshot.disk.data_bytes > 0
        assert snapshot.disk.free_bytes <= snapshot.disk.total_bytes and snapshot.alerts == []
        await pool.close()

    run(main)


def test_with_the_semantic_cache_a_miss_is_a_lookup_that_found_nothing(registry: ModelRegistry,
                                                                       data: DataDir) -> None:
    metrics = Metrics()
    dashboard = Dashboard(metrics, make_pool(Factory(), metrics), registry, data.root, semantic_cache=True)
    assert dashboard.cache().hit_ratio is None
    metrics.cache_misses.labels("exact").inc(4)  # four lookups missed the exact cache ...
    metrics.cache_hits.labels("semantic").inc(1)  # ... one found a close prompt, three nothing
    metrics.cache_misses.labels("semantic").inc(3)
    metrics.cache_hits.labels("exact").inc(2)
    found = dashboard.cache()
    assert (found.hits, found.misses, found.hit_ratio) == (3, 3, 0.5)
