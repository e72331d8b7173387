"""Memory fit with the pool's fake workers: the estimate from real GGUF metadata, eviction of idle models (least
recently used first), refusal with the numbers, and Ollama's per-request keep_alive."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, cast

import pytest

from appliance.config import GatewaySettings, LlamaCppSettings, ModelSettings, SupervisorSettings
from appliance.errors import InvalidRequest
from appliance.observability.metrics import Metrics
from appliance.registry.gguf_check import GgufInfo, read_gguf
from appliance.supervisor.placement import (
    BASE_OVERHEAD,
    GgufMemoryEstimator,
    InsufficientMemory,
    MemoryNeed,
    Placement,
    auto_slots,
    estimate_gguf,
    kv_bytes_per_token,
)
from appliance.supervisor.pool import WorkerPool, keep_alive_seconds
from tests.unit.ggufs import make_gguf
from tests.unit.test_pool import DEFAULT, Factory, FakeWorker, eventually, run, use_once

GIB = 1 << 30


class Box:
    """A machine's memory as the pool sees it: what is free shrinks with every live worker, as with a real one.
    Models named in `on_gpu` keep their weights in GPU memory (`vram` bytes; none = no GPU) and 1 GiB in RAM."""

    def __init__(self, pool_needs: dict[str, int], total: int, vram: int | None = None,
                 on_gpu: frozenset[str] = frozenset()) -> None:
        self.needs = pool_needs
        self.total = total
        self.vram = vram
        self.on_gpu = on_gpu
        self.pool: WorkerPool | None = None

    def _used(self, resource: str) -> int:
        assert self.pool is not None
        return sum(s.need.of(resource) for s in self.pool.slots.values() if s.alive and s.need)

    def free_ram(self) -> int:
        return self.total - self._used("RAM")

    def free_vram(self) -> int | None:
        return None if self.vram is None else self.vram - self._used("GPU memory")

    async def estimate(self, name: str, parallel: int) -> MemoryNeed:
        if name in self.on_gpu:
            return MemoryNeed(self.needs[name], 0, GIB, on_gpu=True)
        return MemoryNeed(self.needs[name], 0, 0)


def make_pool(factory: Factory, needs: dict[str, int], *, total: int = 100 * GIB, limit: int = 0,
              keep_alive: float = 300.0, events: list[tuple[str, str, str, dict[str, object]]] | None = None,
              vram: int | None = None, on_gpu: frozenset[str] = frozenset()) -> tuple[WorkerPool, Box]:
    box = Box(needs, total, vram, on_gpu)
    models = ModelSettings(default=DEFAULT, keep_alive=keep_alive, memory_limit_bytes=limit, memory_headroom_bytes=0)
    pool = WorkerPool(models, GatewaySettings(), SupervisorSettings(restart_backoff=0.01), factory, Metrics(),
                      on_event=(lambda *e: events.append(e)) if events is not None else None,
                      placement=Placement(models, box.estimate, box.free_ram, box.free_vram))
    box.pool = pool
    return pool, box


class Holding:
    def __init__(self) -> None:
        self.stack = contextlib.AsyncExitStack()

    async def hold(self, pool: WorkerPool, name: str) -> None:
        await self.stack.enter_async_context(pool.acquire(name))


def test_estimate_from_real_gguf_metadata(tmp_path: Path) -> None:
    info = read_gguf(make_gguf(tmp_path / "m.gguf", layers=3, embd=64, heads=4, heads_kv=2, context=256))
    need = estimate_gguf(info, parallel=2, n_batch=32)
    head_dim = 64 // 4
    assert need.kv_cache == 2 * 256 * 3 * 2 * (head_dim + head_dim) * 2  # parallel x ctx x layers x kv heads x (K+V)
    assert need.weights == info.tensor_bytes
    assert need.overhead >= BASE_OVERHEAD
    assert estimate_gguf(info, n_ctx=128).kv_cache == 128 * 3 * 2 * 32 * 2  # llamacpp.n_ctx overrides the trained one


def test_estimate_caps_the_trained_context_as_the_engine_does(tmp_path: Path) -> None:
    info = read_gguf(make_gguf(tmp_path / "m.gguf", layers=1, embd=64, heads=4, heads_kv=4, context=131072))
    assert estimate_gguf(info).kv_cache == 8192 * 1 * 4 * 32 * 2


def test_automatic_slots_from_the_memory_budget_and_the_kv_cache_per_token(tmp_path: Path) -> None:
    # SmolLM2-135M's shape: 30 layers, 3 KV heads of 64 dimensions, trained on 8192 tokens
    info = read_gguf(make_gguf(tmp_path / "m.gguf", layers=30, embd=576, heads=9, heads_kv=3, context=8192))
    assert kv_bytes_per_token(info) == 30 * 3 * (64 + 64) * 2  # 22.5 KiB of f16 K and V per token
    assert auto_slots(info, 24 * GIB) == (8, 8192)  # 1/16 of a 24 GiB box: 8 slots of the trained context
    assert auto_slots(info, 64 * GIB) == (16, 8192)  # capped: more slots add little on a CPU
    assert auto_slots(info, 8 * GIB) == (5, 4096)  # fewer than 4 slots would fit: the context is halved first
    assert auto_slots(info, 1 * GIB) == (1, 2048)  # not below 2048 tokens; one slot at least
    assert auto_slots(info, 24 * GIB, parallel=3) == (3, 8192)  # what the operator set is kept
    assert auto_slots(info, 8 * GIB, n_ctx=8192) == (2, 8192)
    need = estimate_gguf(info, parallel=8)
    assert (need.parallel, need.n_ctx, need.kv_cache) == (8, 8192, 8 * 8192 * kv_bytes_per_token(info))


def test_automatic_slots_resize_the_gate_once_placement_sized_the_model() -> None:
    models = ModelSettings(default=DEFAULT, memory_headroom_bytes=0)

    async def estimate(name: str, parallel: int) -> MemoryNeed:
        assert parallel == 0  # automatic: placement decides
        return MemoryNeed(GIB, GIB, 0, parallel=6, n_ctx=4096)

    async def main() -> None:
        pool = WorkerPool(models, GatewaySettings(), SupervisorSettings(), Factory(), Metrics(), parallel=0,
                          placement=Placement(models, estimate, lambda: 100 * GIB, lambda: None))
        holding = Holding()
        assert pool.slot(DEFAULT).parallel == 4  # before the model is sized
        for _ in range(6):  # six requests at once: the model was sized for six slots
            await asyncio.wait_for(holding.hold(pool, DEFAULT), 5)
        assert pool.slot(DEFAULT).gate.locked()
        pool.slot(DEFAULT).resize(5)  # fewer: one permit is withheld when given back
        await holding.stack.aclose()
        for _ in range(5):
            await asyncio.wait_for(holding.hold(pool, DEFAULT), 5)
        assert pool.slot(DEFAULT).gate.locked()
        await holding.stack.aclose()
        await pool.close()

    run(main)


def test_estimator_reads_the_header_through_the_store_once(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "m.gguf")
    opened: list[str] = []

    def read_header(sha256: str, size: int) -> GgufInfo:
        opened.append(sha256)
        return read_gguf(path)

    record = type("R", (), {"sha256": "ab" * 32, "format": "gguf", "size_bytes": path.stat().st_size})()
    estimator = GgufMemoryEstimator(lambda name: record, read_header, LlamaCppSettings(n_ctx=64))

    async def main() -> None:
        first = await estimator("m", 1)
        assert first == estimate_gguf(read_gguf(path), n_ctx=64)
        assert await estimator("m", 1) == first
        assert (await estimator("m", 4)).kv_cache == 4 * first.kv_cache

    run(main)
    assert opened == ["ab" * 32]
    cpu_only = GgufMemoryEstimator(lambda name: record, read_header, LlamaCppSettings(n_gpu_layers=0), gpu=lambda: True)
    assert not asyncio.run(cpu_only("m", 1)).on_gpu  # a GPU on the box, but no layers offloaded: all in RAM


def test_idle_models_are_evicted_least_recently_used_first() -> None:
    async def main() -> None:
        factory, events = Factory(), []  # type: ignore[var-annotated]
        pool, _ = make_pool(factory, {"a": 4 * GIB, "b": 4 * GIB, "c": 4 * GIB}, limit=10 * GIB, events=events)
        await use_once(pool, "a")
        await use_once(pool, "b")
        await use_once(pool, "a")  # now b is the least recently used
        await use_once(pool, "c")
        assert pool.is_ready("a") and pool.is_ready("c") and not pool.is_ready("b")
        assert factory.of("b")[0].stopped and factory.of("b")[0] in factory.released
        assert ("model.unload", "b", "ok", {"reason": "memory", "for_model": "c"}) in events
        await pool.close()

    run(main)


def test_busy_and_pinned_models_are_not_evicted_and_the_refusal_gives_the_numbers() -> None:
    async def main() -> None:
        factory = Factory()
        pool, _ = make_pool(factory, {DEFAULT: 3 * GIB, "a": 4 * GIB, "big": 6 * GIB}, total=12 * GIB)
        await use_once(pool, DEFAULT)  # pinned: stays, though idle
        holding = Holding()
        await holding.hold(pool, "a")  # busy
        with pytest.raises(InsufficientMemory) as info:
            await use_once(pool, "big")
        message = info.value.message
        assert "model 'big' needs 6.0 GiB of RAM" in message and "but 5.0 GiB is free" in message
        assert f"unload 'a', '{DEFAULT}'" in message and "smaller quantization" in message
        assert info.value.status_code == 503 and info.value.code == "insufficient_memory"
        assert pool.is_ready(DEFAULT) and pool.is_ready("a") and factory.of("big") == []
        slot = pool.slot("big")
        assert (slot.need, slot.in_use, slot.gate.locked()) == (None, 0, False)
        await holding.stack.aclose()
        await use_once(pool, "big")  # "a" is idle now: it goes, "big" comes
        assert pool.is_ready("big") and not pool.is_ready("a") and pool.is_ready(DEFAULT)
        await pool.close()

    run(main)


def test_a_model_larger_than_the_box_is_refused_without_unloading_anything() -> None:
    async def main() -> None:
        factory = Factory()
        pool, _ = make_pool(factory, {"a": 1 * GIB, "huge": 64 * GIB}, total=8 * GIB)
        await use_once(pool, "a")
        with pytest.raises(InsufficientMemory, match=r"model 'huge' needs 64\.0 GiB"):
            await use_once(pool, "huge")
        assert pool.is_ready("a")  # unloading it would not have made room: it stays
        await pool.close()

    run(main)


def test_a_loading_model_holds_its_reservation() -> None:
    async def main() -> None:
        factory, loading = Factory(), asyncio.Event()

        async def slow_factory(name: str, resources: contextlib.AsyncExitStack) -> Any:
            worker = cast(FakeWorker, await factory(name, resources))
            ready = worker.wait_ready

            async def wait_ready() -> None:
                await loading.wait()  # e.g. weights still being read
                await ready()

            worker.wait_ready = wait_ready  # type: ignore[method-assign]
            return worker

        pool, _ = make_pool(factory, {"a": 5 * GIB, "b": 5 * GIB}, total=8 * GIB)
        pool.new_worker = slow_factory
        first = asyncio.create_task(use_once(pool, "a"))
        await eventually(lambda: pool.slot("a").need is not None)
        with pytest.raises(InsufficientMemory, match=r"needs 5\.0 GiB of RAM .* but 3\.0 GiB is free"):
            await use_once(pool, "b")  # the system shows 8 GiB free, but 5 are promised to "a"
        loading.set()
        await first
        assert pool.is_ready("a") and factory.of("b") == []
        await pool.close()

    run(main)


def test_gpu_memory_is_checked_for_offloaded_models_and_freed_by_evicting_them() -> None:
    async def main() -> None:
        factory = Factory()
        gpu = frozenset({"g1", "g2", "g3"})
        pool, _ = make_pool(factory, {"g1": 30 * GIB, "g2": 30 * GIB, "g3": 50 * GIB, "cpu": 8 * GIB},
                            total=64 * GIB, vram=80 * GIB, on_gpu=gpu)
        await use_once(pool, "g1")
        await use_once(pool, "g2")
        await use_once(pool, "cpu")  # RAM only: the GPU's 20 GiB left do not matter to it
        assert all(pool.is_ready(m) for m in ("g1", "g2", "cpu"))
        await use_once(pool, "g3")  # 50 GiB of GPU memory: g1 (least recently used) goes, cpu stays
        assert not pool.is_ready("g1") and pool.is_ready("g2") and pool.is_ready("g3") and pool.is_ready("cpu")
        holding = Holding()
        await holding.hold(pool, "g2")
        await holding.hold(pool, "g3")
        with pytest.raises(InsufficientMemory) as info:
            await use_once(pool, "g1")
        assert "model 'g1' needs 30.0 GiB of GPU memory" in info.value.message
        assert "but 0 MiB is free" in info.value.message and "unload 'cpu', 'g2', 'g3'" in info.value.message
        await holding.stack.aclose()
        await pool.close()

    run(main)


def test_when_gpu_memory_cannot_be_read_only_the_ram_part_is_checked() -> None:
    async def main() -> None:
        pool, _ = make_pool(Factory(), {"g": 30 * GIB}, total=16 * GIB, vram=None, on_gpu=frozenset({"g"}))
        await use_once(pool, "g")  # its 1 GiB of buffers fits; the GPU part is the engine's to refuse
        await pool.close()

    run(main)


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), (0, 0.0), (-1, -1.0), (30, 30.0), (2.5, 2.5), ("0", 0.0), ("-1", -1.0), ("5m", 300.0),
    ("1h30m", 5400.0), ("1.5s", 1.5), ("500ms", 0.5), ("-1m", -60.0), ("10", 10.0),
])
def test_keep_alive_values(value: Any, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 m", "m", "5x", "", "1h-2m"])
def test_bad_keep_alive_is_a_400_naming_the_parameter(value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        keep_alive_seconds(value)
    assert info.value.param == "keep_alive" and info.value.status_code == 400


def test_keep_alive_zero_unloads_after_the_request_and_minus_one_keeps_it() -> None:
    async def main() -> None:
        factory = Factory()
        pool, _ = make_pool(factory, {"a": GIB, "b": GIB}, keep_alive=0.2)
        async with pool:
            async with pool.acquire("a", keep_alive=0) as worker:
                assert pool.is_ready("a")
            await eventually(lambda: cast(FakeWorker, worker).stopped)
            assert not pool.is_ready("a")
            async with pool.acquire("b", keep_alive="-1"):
                pass
            await use_once(pool, "a")  # the configured 0.2 s again: housekeeping unloads it
            await eventually(lambda: not pool.is_ready("a"))
            assert pool.is_ready("b")  # kept past the configured keep_alive
            async with pool.acquire("b", keep_alive="100ms"):
                pass
            await eventually(lambda: not pool.is_ready("b"))

    run(main)
