"""Blue-green promote, rollback and canaries rolled back by themselves: the real registry (SQLite, stored GGUFs,
audit log) and the real WorkerPool, with fake workers standing in for the processes (tests/unit/test_pool.py);
their HTTP client answers the warm-up completion. The real engine runs in tests/integration/test_rollout.py."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.audit import AuditLog
from appliance.config import RolloutSettings
from appliance.crypto.keyring import KeyRing
from appliance.datadir import DataDir
from appliance.errors import InvalidRequest, ModelUnavailable
from appliance.registry.catalog import Catalog
from appliance.registry.rollout import RolloutService, WindowStats, p95
from appliance.registry.service import ModelRegistry
from appliance.registry.store import ModelStore
from appliance.supervisor.pool import WorkerPool
from appliance.supervisor.process import Worker
from tests.unit.ggufs import make_gguf
from tests.unit.test_pool import Factory, Holder, eventually, make_pool, run, use_once


class AnsweringFactory(Factory):
    """Fake workers whose client answers completions (the warm-up) with 200, and records them."""

    def __init__(self, failing: set[str] | None = None) -> None:
        super().__init__(failing)
        self.completions: list[str] = []

    async def __call__(self, name: str, resources: contextlib.AsyncExitStack) -> Worker:
        worker: Any = await super().__call__(name, resources)

        def answer(request: httpx.Request) -> httpx.Response:
            self.completions.append(name)
            return httpx.Response(200, json={"choices": [{"text": "!"}]})

        worker.client = httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://worker")
        return worker  # type: ignore[no-any-return]


@pytest.fixture
def registry(data: DataDir, conn: sqlite3.Connection, audit: AuditLog, tmp_path: Path) -> ModelRegistry:
    registry = ModelRegistry(conn, ModelStore(data.models, data.tmp, KeyRing(data.keys), data.wrapped_keys),
                             Catalog(models={}), audit=audit)
    for i in (1, 2, 3):
        registry.pull(f"file:{make_gguf(tmp_path / f'v{i}.gguf')}", name="m")
    return registry


def wire(registry: ModelRegistry, audit: AuditLog, factory: Factory, **settings: Any) -> tuple[WorkerPool,
                                                                                             RolloutService]:
    pool = make_pool(factory, restart_backoff=0.01, restart_backoff_max=0.02)
    pool.key = registry.versions.worker_key
    rollout = RolloutService(registry, pool, RolloutSettings(**settings), audit)
    pool.on_request = rollout.observe
    return pool, rollout


def actions(audit: AuditLog, action: str) -> list[dict[str, Any]]:
    return [r for r in audit.export() if r["action"] == action]


def stage_of(registry: ModelRegistry, version: int) -> str:
    return registry.versions.get("m", version).stage


def test_promote_warms_up_the_new_version_then_switches_then_drains_the_old_one(
    registry: ModelRegistry, audit: AuditLog
) -> None:
    async def main() -> None:
        factory = AnsweringFactory()
        pool, rollout = wire(registry, audit, factory)
        holder = Holder(pool, "m")  # a request in flight on version 1
        await holder.holding.wait()
        (old,) = factory.of("m@1")
        promoting = asyncio.create_task(rollout.promote("m", 2, actor="cli:alice"))
        await eventually(lambda: stage_of(registry, 2) == "production")
        assert factory.completions == ["m@2"]  # warmed up before the switch
        assert registry.versions.resolve("m").ref == "m@2"  # new requests go to version 2 ...
        assert not old.stopped and not promoting.done()  # ... while the old one finishes its request
        holder.release.set()
        moved = await promoting
        assert (moved.from_version, moved.to_version, moved.drained) == (1, 2, True)
        assert old.stopped and "m@1" not in pool.slots and pool.is_ready("m@2")
        assert stage_of(registry, 1) == "archived"
        (record,) = actions(audit, "model.promote")
        assert (record["actor"], record["target"], record["outcome"]) == ("cli:alice", "m", "ok")
        assert (record["details"]["version"], record["details"]["from_version"]) == (2, 1)
        await pool.close()

    run(main)


def test_a_version_that_fails_to_load_is_not_promoted(registry: ModelRegistry, audit: AuditLog) -> None:
    async def main() -> None:
        factory = AnsweringFactory(failing={"m@2"})
        pool, rollout = wire(registry, audit, factory)
        await use_once(pool, "m")
        with pytest.raises(ModelUnavailable, match="version 1 keeps serving"):
            await rollout.promote("m", 2, actor="cli:alice")
        assert stage_of(registry, 1) == "production" and stage_of(registry, 2) == "staging"
        assert pool.is_ready("m@1") and "m@2" not in pool.slots
        (record,) = actions(audit, "model.promote")
        assert record["outcome"] == "error" and record["details"]["code"] == "promote_failed"
        with pytest.raises(InvalidRequest, match="already in production"):
            await rollout.promote("m", 1, actor="cli:alice")
        await pool.close()

    run(main)


def test_rollback_returns_to_the_previous_production_version(registry: ModelRegistry, audit: AuditLog) -> None:
    async def main() -> None:
        pool, rollout = wire(registry, audit, AnsweringFactory())
        with pytest.raises(InvalidRequest, match="no earlier production version"):
            await rollout.rollback("m", actor="cli:bob")
        await rollout.promote("m", 2, actor="cli:bob")
        await rollout.promote("m", 3, actor="cli:bob")
        moved = await rollout.rollback("m", actor="cli:bob")
        assert (moved.from_version, moved.to_version) == (3, 2)
        assert [stage_of(registry, v) for v in (1, 2, 3)] == ["archived", "production", "staging"]
        assert (await rollout.rollback("m", actor="cli:bob")).to_version == 1  # and back once more
        refused, *done = actions(audit, "model.rollback")
        assert refused["outcome"] == "error" and refused["details"]["code"] == "nothing_to_roll_back"
        assert [r["details"]["to_version"] for r in done] == [2, 1]
        await pool.close()

    run(main)


def test_a_canary_that_keeps_failing_is_rolled_back_by_itself(registry: ModelRegistry, audit: AuditLog) -> None:
    async def main() -> None:
        factory = AnsweringFactory(failing={"m@2"})  # version 2's worker never loads
        pool, rollout = wire(registry, audit, factory, min_requests=4, max_error_rate=0.5)
        rollout.set_alias("chat", "m", canary=2, weight=10, actor="cli:carol")
        assert registry.versions.alias("chat").weights == {1: 90, 2: 10}  # type: ignore[union-attr]
        for _ in range(4):  # what the canary's share of the traffic would meet
            with pytest.raises(ModelUnavailable):
                await use_once(pool, "m@2")
        await eventually(lambda: registry.versions.alias("chat").weights is None)  # type: ignore[union-attr]
        assert {registry.versions.resolve("chat", f"key:{i}").ref for i in range(200)} == {"m@1"}
        (record,) = actions(audit, "model.rollback")
        assert (record["actor"], record["target"], record["outcome"]) == ("supervisor", "m", "ok")
        details = record["details"]
        assert details["automatic"] and details["aliases"] == ["chat"] and details["canary_versions"] == [2]
        assert details["error_rate"] == 1.0 and "error rate 1.00 > 0.50" in details["reason"]
        await pool.close()

    run(main)


def test_a_slow_canary_is_rolled_back_and_a_failing_non_canary_is_not(registry: ModelRegistry,
                                                                      audit: AuditLog) -> None:
    async def main() -> None:
        pool, rollout = wire(registry, audit, AnsweringFactory(), min_requests=5, max_p95_seconds=2.0)
        for _ in range(10):
            rollout.observe("m@3", True, 0.1)  # failing, but nobody routes to it by a split
        rollout.set_alias("m", "m", canary=2, weight=20, actor="cli:carol")
        for seconds in (0.1, 0.2, 0.1, 0.3):
            rollout.observe("m@2", False, seconds)
        assert registry.versions.alias("m").weights == {1: 80, 2: 20}  # type: ignore[union-attr]
        rollout.observe("m@2", False, 9.0)  # p95 of five is the slowest
        await eventually(lambda: registry.versions.alias("m").weights is None)  # type: ignore[union-attr]
        (record,) = actions(audit, "model.rollback")
        assert "p95 latency 9.00s > 2.00s" in record["details"]["reason"]
        await pool.close()

    run(main)


def test_every_version_has_window_stats_and_a_new_canary_starts_afresh(registry: ModelRegistry,
                                                                      audit: AuditLog) -> None:
    async def main() -> None:
        pool, rollout = wire(registry, audit, AnsweringFactory(), min_requests=50, window_seconds=0.5)
        assert rollout.window_stats("m@1") == WindowStats(0, 0, None, None)
        for seconds in (0.1, 0.2, 0.3, 0.4):
            rollout.observe("m@1", False, seconds)  # production traffic, no canary anywhere
        rollout.observe("m@2", True, 1.0)  # version 2 named explicitly, before it is a canary
        assert rollout.window_stats("m@1") == WindowStats(4, 0, 0.0, 0.4)
        assert rollout.window_stats("m@2").requests == 1
        rollout.set_alias("m", "m", canary=2, weight=20, actor="cli:carol")
        assert rollout.window_stats("m@2").requests == 0  # judged on its canary traffic alone
        rollout.observe("m@2", True, 2.0)
        rollout.observe("m@2", False, 1.0)
        assert rollout.window_stats("m@2") == WindowStats(2, 1, 0.5, 2.0)
        assert rollout.window_stats("m@1").to_dict() == {"requests": 4, "errors": 0, "error_rate": 0.0,
                                                         "p95_seconds": 0.4}  # production beside it
        await asyncio.sleep(0.6)
        assert rollout.window_stats("m@1").requests == rollout.window_stats("m@2").requests == 0  # out of the window
        await pool.close()

    run(main)


def test_a_canary_set_by_another_process_starts_afresh_too(registry: ModelRegistry, audit: AuditLog) -> None:
    async def main() -> None:
        pool, rollout = wire(registry, audit, AnsweringFactory(), min_requests=50)
        rollout.observe("m@2", True, 1.0)
        RolloutService(registry, None, RolloutSettings(), audit).set_alias("m", "m", canary=2, actor="cli:dave")
        rollout._canaries_seen = (-math.inf, frozenset())  # a second later: the split is noticed
        rollout.observe("m@2", False, 1.0)
        assert rollout.window_stats("m@2") == WindowStats(1, 0, 0.0, 1.0)
        await pool.close()

    run(main)


def test_p95() -> None:
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([3.0]) == 3.0 and p95([]) == 0.0


def test_promote_and_alias_work_without_a_server(registry: ModelRegistry, audit: AuditLog) -> None:
    rollout = RolloutService(registry, None, RolloutSettings(), audit)  # the CLI: the switch only
    moved = asyncio.run(rollout.promote("m", 3, actor="cli:dave"))
    assert moved.to_version == 3 and registry.versions.resolve("m").ref == "m@3"
    alias = rollout.set_alias("chat", "m@3", canary=2, weight=30, actor="cli:dave")
    assert (alias.version, alias.weights) == (3, {3: 70, 2: 30})
    with pytest.raises(InvalidRequest, match="between 1 and 99"):
        rollout.set_alias("chat", "m", canary=2, weight=100, actor="cli:dave")
    ended = asyncio.run(rollout.rollback("m", actor="cli:dave"))
    assert ended.aliases == ("chat",) and registry.versions.alias("chat").weights is None  # type: ignore[union-attr]
    assert [r["action"] for r in audit.export()][-4:] == ["model.promote", "model.alias", "model.alias",
                                                          "model.rollback"]
