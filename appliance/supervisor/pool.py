"""The worker pool: one worker per loaded model, a bounded queue per model, restarts, keep-alive.

It takes its factories as arguments (`new_worker`, `resolve`) so it can be tested with fakes while the
integration tests run the real engine."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from appliance.config import GatewaySettings, ModelSettings, SupervisorSettings
from appliance.errors import ApplianceError, InvalidRequest, ModelUnavailable, QueueFull
from appliance.logs import get_logger
from appliance.observability.metrics import Metrics
from appliance.supervisor.placement import AUTO_PARALLEL_MIN, MemoryNeed, Placement, gib
from appliance.supervisor.process import Worker

log = get_logger(__name__)

NewWorker = Callable[[str, contextlib.AsyncExitStack], Awaitable[Worker]]
"""Build (not start) a worker for a model name; resources it needs stay open until the stack closes."""
OnEvent = Callable[[str, str, str, dict[str, object]], None]
"""Told of lifecycle events: (action, model, outcome, details), e.g. ("model.load", "m", "ok", {...})."""
OnRequest = Callable[[str, bool, float], None]
"""Told when a request leaves a worker: (worker key, failed, seconds held); failed = a server-side failure."""
SlotState = Literal["ready", "loading", "failed", "unloaded"]

STABLE_AFTER_S = 60.0
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: str | float | None) -> float | None:
    """Ollama's `keep_alive`: seconds as a number, or a duration like "5m", "1h30m", "-1"; negative = forever,
    0 = unload right after the request. None = the configured default."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    text = value.strip()
    with contextlib.suppress(ValueError):
        return float(text)
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
    parts = _DURATION.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise InvalidRequest(f"keep_alive {value!r} is not a duration; use seconds or e.g. \"5m\", \"1h\", 0 to "
                             "unload after the request, -1 to keep the model loaded", param="keep_alive",
                             code="invalid_value")
    return sign * sum(float(n) * _UNIT_S[u] for n, u in parts)


@dataclass
class ModelSlot:
    name: str
    parallel: int
    pinned: bool
    worker: Worker | None = None
    resources: contextlib.AsyncExitStack | None = None
    in_use: int = 0
    waiting: int = 0
    last_used: float = field(default_factory=time.monotonic)
    started_at: float = 0.0
    crashes: int = 0
    not_before: float = 0.0
    need: MemoryNeed | None = None  # reserved by placement from before the load until the worker is retired
    keep_alive: float | None = None  # the last request's keep_alive; None = the configured one
    last_error: str | None = None  # why the last load failed or the worker died; cleared by a load that succeeds
    health: dict[str, object] = field(default_factory=dict)  # the last health answer (llama.cpp: decode `steps`)
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    released: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever a request lets go (drain)
    gate: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.gate = asyncio.Semaphore(self.parallel)
        self._withheld: list[asyncio.Task[object]] = []

    def resize(self, parallel: int) -> None:
        """Let `parallel` requests through at once from now on (automatic slots are known once the model's header
        is read): more permits at once, fewer by tasks that take permits as requests give them back."""
        while parallel > self.parallel and self._withheld:
            task = self._withheld.pop()
            if not task.cancel():  # it had taken its permit already
                self.gate.release()
            self.parallel += 1
        while parallel > self.parallel:
            self.gate.release()
            self.parallel += 1
        while parallel < self.parallel:
            self._withheld.append(asyncio.ensure_future(self.gate.acquire()))
            self.parallel -= 1

    @property
    def alive(self) -> bool:
        return self.worker is not None and not self.worker.exited.is_set()

    @property
    def state(self) -> SlotState:
        if self.alive:
            return "ready"
        if self.load_lock.locked():
            return "loading"
        return "failed" if self.last_error else "unloaded"


class WorkerPool:
    def __init__(self, models: ModelSettings, gateway: GatewaySettings, supervisor: SupervisorSettings,
                 new_worker: NewWorker, metrics: Metrics, parallel: int = 1, on_event: OnEvent | None = None,
                 placement: Placement | None = None) -> None:
        self.models = models
        self.gateway = gateway
        self.supervisor = supervisor
        self.new_worker = new_worker
        self.metrics = metrics
        self.parallel = parallel
        self.on_event = on_event
        self.placement = placement
        self.slots: dict[str, ModelSlot] = {}
        # which worker serves a name: versions are keyed `name@N` (appliance.registry.versions.worker_key)
        self.key: Callable[[str], str] = lambda name: name
        # requests a worker takes at once, by worker key: each engine has its own setting (the app's `admission`)
        self.parallel_of: Callable[[str], int] = lambda _: self.parallel
        self.on_request: OnRequest | None = None  # the canary monitor (appliance.registry.rollout)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def __aenter__(self) -> WorkerPool:
        self._spawn(self._housekeeping())
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def slot(self, name: str) -> ModelSlot:
        name = self.key(name)
        if name not in self.slots:
            # automatic slots (0) let AUTO_PARALLEL_MIN through until placement has sized the model
            self.slots[name] = ModelSlot(name, self.parallel_of(name) or AUTO_PARALLEL_MIN, self._pinned(name))
            self.metrics.worker_restarts.labels(name)  # the series exists at 0, so the first restart is an increase
        return self.slots[name]

    def _pinned(self, key: str) -> bool:
        return self.models.pin_default and key == self.key(self.models.default)

    def repin(self) -> None:
        """After the default model's production version changed: pin the new one's worker, unpin the old one's."""
        for slot in self.slots.values():
            slot.pinned = self._pinned(slot.name)

    def is_ready(self, name: str) -> bool:
        slot = self.slots.get(self.key(name))
        return slot is not None and slot.alive

    async def drain(self, name: str, timeout: float) -> bool:
        """Stop a worker once its requests are done (at most `timeout` seconds, then stop it anyway) and forget
        its slot; requests still routed to it meanwhile are served. True when it drained without cutting any."""
        slot = self.slots.get(name)
        if slot is None:
            return True
        slot.pinned = False
        deadline = time.monotonic() + timeout
        while slot.in_use or slot.waiting:
            slot.released.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(slot.released.wait(), max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                break
        clean = not (slot.in_use or slot.waiting)
        async with slot.load_lock:
            if slot.alive:
                self._event("model.unload", name, "ok", reason="drain", drained=clean)
            await self._retire(slot)
        if clean and self.slots.get(name) is slot and not (slot.in_use or slot.waiting):
            del self.slots[name]
        self.metrics.models_loaded.set(sum(s.alive for s in self.slots.values()))
        return clean

    async def ensure_loaded(self, name: str) -> Worker:
        slot = self.slot(name)
        name = slot.name
        async with slot.load_lock:
            if slot.alive:
                assert slot.worker is not None
                return slot.worker
            await self._retire(slot)
            if (delay := slot.not_before - time.monotonic()) > 0:
                await asyncio.sleep(delay)  # crash backoff: a model that keeps dying must not spin
            await self._make_room(slot)
            started = time.monotonic()
            stack = contextlib.AsyncExitStack()
            worker: Worker | None = None
            try:
                worker = await self.new_worker(name, stack)
                await worker.start()
                await worker.wait_ready()
            except BaseException as exc:
                if worker is not None:  # a start cut short (an error, a cancelled request) leaves no process behind,
                    with contextlib.suppress(Exception):  # and none that would read weights about to be wiped
                        await worker.stop()
                await stack.aclose()
                slot.need = None
                self._note_crash(slot)
                slot.last_error = str(getattr(exc, "message", type(exc).__name__))[:300]
                self._event("model.load", name, "error", reason=slot.last_error)
                raise
            slot.worker, slot.resources, slot.started_at = worker, stack, time.monotonic()
            slot.last_error = None
            slot.last_used = slot.started_at  # idle time counts from readiness, not from the first request
            self.metrics.model_load_seconds.labels(name).observe(slot.started_at - started)
            self.metrics.models_loaded.set(sum(s.alive for s in self.slots.values()))
            log.info("model.loaded", model=name, pid=worker.pid, seconds=round(slot.started_at - started, 3))
            self._event("model.load", name, "ok", seconds=round(slot.started_at - started, 3))
            self._spawn(self._watch(slot, worker))
            return worker

    def _event(self, action: str, model: str, outcome: str, **details: object) -> None:
        if self.on_event is not None:
            try:
                self.on_event(action, model, outcome, details)
            except Exception:  # an audit failure must not take a model down; it is logged
                log.exception("model.event_failed", action=action, model=model)

    def _note_crash(self, slot: ModelSlot) -> None:
        if slot.started_at and time.monotonic() - slot.started_at > STABLE_AFTER_S:
            slot.crashes = 0
        delay = min(self.supervisor.restart_backoff * 2**slot.crashes, self.supervisor.restart_backoff_max)
        slot.crashes += 1
        slot.not_before = time.monotonic() + delay

    async def _watch(self, slot: ModelSlot, worker: Worker) -> None:
        """Notice a worker that died on its own; restart pinned models with backoff."""
        await worker.exited.wait()
        if self._closing or slot.worker is not worker or getattr(worker, "stopping", False):
            return
        self.metrics.worker_restarts.labels(slot.name).inc()
        self.metrics.models_loaded.set(sum(s.alive for s in self.slots.values()))
        slot.need = None  # the dead process's memory is free again
        self._note_crash(slot)
        slot.last_error = f"the worker exited on its own (crash {slot.crashes})"
        log.error("model.crashed", model=slot.name, detail=worker.failure(), crashes=slot.crashes)
        self._event("model.crash", slot.name, "error", crashes=slot.crashes)
        if slot.pinned:
            self._spawn(self.keep_loaded(slot.name))

    async def keep_loaded(self, name: str) -> None:
        """Load a model and keep trying until it serves; the crash backoff paces the attempts."""
        while not self._closing:
            try:
                await self.ensure_loaded(name)
                return
            except ApplianceError as exc:
                log.error("model.load_failed", model=name, error=exc.message, retry_in_s=round(
                    max(0.0, self.slot(name).not_before - time.monotonic()), 1))

    def start_loading(self, name: str) -> None:
        self._spawn(self.keep_loaded(name))

    async def _make_room(self, slot: ModelSlot) -> None:
        """Reserve the model's memory: unload idle models, least recently used first, until it fits, or refuse."""
        if self.placement is None:
            return
        need = await self.placement.need(slot.name, self.parallel_of(slot.name))
        if need.parallel:
            slot.resize(need.parallel)
        while True:
            others = [s for s in self.slots.values() if s is not slot and s.need is not None]
            held = [s.need for s in others if s.need is not None]
            loading = [s.need for s in others if s.need is not None and not s.alive]  # not taken their memory yet
            short = self.placement.shortage(need, held, loading)
            if short is None:
                slot.need = need
                return
            idle = [s for s in others if s.alive and not s.pinned and s.in_use == 0 and s.waiting == 0
                    and not s.load_lock.locked()]
            if not idle or short.needed > short.free + sum(s.need.of(short.resource) for s in idle if s.need):
                # nothing to unload, or unloading every idle model would not make room: leave them be
                self._event("model.load", slot.name, "refused", reason=f"{short.resource}", need_bytes=short.needed,
                            free_bytes=max(short.free, 0))
                raise self.placement.refusal(slot.name, need, short, [s.name for s in others if s.alive])
            victim = min(idle, key=lambda s: s.last_used)
            log.info("model.evict", model=victim.name, for_model=slot.name, resource=short.resource,
                     need=gib(short.needed), free=gib(short.free))
            self._event("model.unload", victim.name, "ok", reason="memory", for_model=slot.name)
            async with victim.load_lock:
                await self._retire(victim)
            self.metrics.models_loaded.set(sum(s.alive for s in self.slots.values()))

    async def _retire(self, slot: ModelSlot) -> None:
        worker, resources = slot.worker, slot.resources
        slot.worker = slot.resources = None
        slot.need = None
        if worker is not None:
            await worker.stop()
        if resources is not None:
            await resources.aclose()

    @contextlib.asynccontextmanager
    async def acquire(self, name: str, keep_alive: str | float | None = None) -> AsyncIterator[Worker]:
        """Wait for a free slot of the model (bounded queue), load it if needed, and hold it. `keep_alive` (Ollama's)
        sets how long the model stays loaded after this request: 0 = unload at once, negative = for ever."""
        keep = keep_alive_seconds(keep_alive)
        slot = self.slot(name)
        name = slot.name
        if slot.waiting >= self.gateway.max_queue and slot.gate.locked():
            raise QueueFull(
                f"model '{name}' is busy and {slot.waiting} requests are already waiting; retry shortly",
                retry_after=self._retry_after(slot),
            )
        slot.waiting += 1
        self.metrics.queue_depth.labels(name).set(slot.waiting)
        queued = time.monotonic()
        try:
            await asyncio.wait_for(slot.gate.acquire(), self.gateway.queue_timeout)
        except TimeoutError:
            raise ModelUnavailable(
                f"model '{name}' stayed busy for {self.gateway.queue_timeout:.0f}s; retry later",
                retry_after=self._retry_after(slot),
            ) from None
        finally:
            slot.waiting -= 1
            self.metrics.queue_depth.labels(name).set(slot.waiting)
        self.metrics.queue_wait.labels(name).observe(time.monotonic() - queued)
        slot.in_use += 1
        started, failed, worker = time.monotonic(), False, None
        try:
            worker = await self.ensure_loaded(name)
            yield worker
        except Exception as exc:  # a client's own error (4xx) is not the worker's failure
            failed = not (isinstance(exc, ApplianceError) and exc.status_code < 500)
            raise
        finally:
            slot.in_use -= 1
            slot.last_used = time.monotonic()
            slot.gate.release()
            slot.released.set()
            # a worker that died under a stream failed it, even if relayed as SSE
            failed = failed or (worker is not None and worker.exited.is_set()
                                and not getattr(worker, "stopping", False))
            self.metrics.worker_requests.labels(name, "error" if failed else "ok").inc()
            if self.on_request is not None:
                try:
                    self.on_request(name, failed, slot.last_used - started)
                except Exception:  # the monitor must not fail the request it watched
                    log.exception("model.observe_failed", model=name)
            if keep is not None:
                slot.keep_alive = keep
            if slot.keep_alive == 0 and slot.in_use == 0 and slot.waiting == 0 and not slot.pinned:
                self._spawn(self._unload_idle(0.0, only=slot))

    def _retry_after(self, slot: ModelSlot) -> float:
        return float(max(1, min(30, slot.waiting)))

    async def _housekeeping(self) -> None:
        """Unload models idle for longer than keep_alive; replace workers that stop answering health checks."""
        keep_alive, interval = self.models.keep_alive, self.supervisor.health_interval
        tick = min(x for x in (1.0, keep_alive / 2 if keep_alive > 0 else 1.0, interval or 1.0))
        next_check = time.monotonic() + interval
        while not self._closing:
            await asyncio.sleep(tick)
            self.repin()  # a promote made by the CLI: the old version's worker may idle out now
            await self._unload_idle(keep_alive)
            if interval and time.monotonic() >= next_check:
                next_check = time.monotonic() + interval
                await asyncio.gather(*(self._check_health(s) for s in list(self.slots.values()) if s.alive))

    async def _check_health(self, slot: ModelSlot) -> None:
        worker = slot.worker
        if worker is None or slot.load_lock.locked():
            return
        try:
            slot.health = await asyncio.wait_for(worker.health(), self.supervisor.health_timeout)
            return
        except Exception as exc:  # no answer, a broken answer or a refused connection: the worker is wedged
            reason = type(exc).__name__
        if slot.worker is not worker or worker.exited.is_set():
            return  # replaced or exited meanwhile: the exit watcher handles it
        log.error("model.hung", model=slot.name, pid=worker.pid, reason=reason,
                  timeout_s=self.supervisor.health_timeout)
        self.metrics.worker_restarts.labels(slot.name).inc()
        self._note_crash(slot)
        slot.last_error = f"health check failed: {reason}"
        self._event("model.crash", slot.name, "error", crashes=slot.crashes, reason=slot.last_error)
        async with slot.load_lock:
            if slot.worker is worker:
                await self._retire(slot)  # SIGTERM, then SIGKILL: a stopped or deadlocked process goes too
        self.metrics.models_loaded.set(sum(s.alive for s in self.slots.values()))
        if slot.pinned:
            self._spawn(self.keep_loaded(slot.name))

    async def _unload_idle(self, keep_alive: float, only: ModelSlot | None = None) -> None:
        """Unload models idle for longer than their keep-alive: the last request's, else the configured one
        (a configured 0 means for ever; a request's 0 means at once, a negative one for ever)."""
        now = time.monotonic()
        for slot in [only] if only else list(self.slots.values()):
            limit = slot.keep_alive if slot.keep_alive is not None else (keep_alive or -1.0)
            idle = slot.in_use == 0 and slot.waiting == 0 and limit >= 0 and now - slot.last_used >= limit
            if slot.alive and not slot.pinned and idle and not slot.load_lock.locked():
                log.info("model.unload", model=slot.name, idle_s=round(now - slot.last_used, 1))
                self._event("model.unload", slot.name, "ok", reason="idle", idle_s=round(now - slot.last_used, 1))
                async with slot.load_lock:
                    await self._retire(slot)
                self.metrics.models_loaded.set(sum(s.alive for s in self.slots.values()))

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._retire(s) for s in self.slots.values()), return_exceptions=True)
        self.metrics.models_loaded.set(0)
