"""The dashboard (`GET /api/dashboard`): one cheap snapshot of the models, cache, memory, GPUs and disk, polled by the
web UI every few seconds.

Counters are cumulative and never go down, so that the UI can turn the deltas between two polls into rates. Time to
first token is windowed: every `SAMPLE_SECONDS` the TTFT histogram's bucket counts are kept, and the quantiles are
computed from the buckets' growth since the sample at the start of the window (as Prometheus's
`histogram_quantile(rate(...[60s]))` does). What is slow (the data dir's size, the GPU driver) is read in a thread and
cached; every other read costs microseconds.

Requests and errors are per worker (`name@N`, one per version); tokens and TTFT are labelled by the model's name
in the metrics, so versions of one model served side by side show the same (the model's) numbers."""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import msgspec
import psutil
from prometheus_client import Counter, Histogram
from prometheus_client.samples import Sample

from appliance.errors import ModelNotFound
from appliance.observability.hardware import GpuReading, ProcessMemory, directory_bytes, read_gpus
from appliance.observability.metrics import Metrics
from appliance.observability.refresh import Refreshed
from appliance.registry.service import ModelRegistry
from appliance.registry.versions import split_ref
from appliance.supervisor.pool import ModelSlot, SlotState, WorkerPool

TTFT_WINDOW_SECONDS = 60.0
SAMPLE_SECONDS = 5.0
DATA_SIZE_SECONDS = 30.0
GPU_SECONDS = 10.0
Buckets = dict[str, tuple[float, ...]]
"""label value -> cumulative count per bucket (upper bounds in order, the last +Inf)"""


class ModelStatus(msgspec.Struct, frozen=True):
    model: str  # the worker key, `name@N`
    name: str
    version: int | None
    state: SlotState
    healthy: bool
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    ttft_p50: float | None
    ttft_p95: float | None
    queue_depth: int
    rss_bytes: int | None
    vram_bytes: int | None
    error: str | None  # why the last load failed or the worker died


class CacheStatus(msgspec.Struct, frozen=True):
    hits: int
    misses: int
    hit_ratio: float | None


class MemoryStatus(msgspec.Struct, frozen=True):
    total_bytes: int
    available_bytes: int
    budget_bytes: int | None
    models_bytes: int  # reserved by the loaded models (placement's estimates)


class GpuStatus(msgspec.Struct, frozen=True):
    name: str
    memory_total_bytes: int
    memory_used_bytes: int


class DiskStatus(msgspec.Struct, frozen=True):
    path: str
    total_bytes: int
    free_bytes: int
    data_bytes: int


class DashboardView(msgspec.Struct, frozen=True):
    at: float
    models: list[ModelStatus]
    cache: CacheStatus
    memory: MemoryStatus
    gpus: list[GpuStatus]
    disk: DiskStatus
    alerts: list[dict[str, object]]


def bucket_quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """The q-quantile of the observations in cumulative histogram buckets (`counts` per upper bound in `bounds`, the
    last +Inf), linear within its bucket as Prometheus's histogram_quantile; None without observations. A quantile in
    the +Inf bucket is the largest finite bound."""
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    below, lower = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below) if count > below else bound
        below, lower = count, bound
    return lower


def _samples(metric: Counter | Histogram, suffix: str) -> Iterator[Sample]:
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix):
                yield sample


def counter_values(counter: Counter, label: str) -> dict[str, float]:
    """A labelled counter's totals by one of its labels (summed over the others)."""
    values: dict[str, float] = {}
    for sample in _samples(counter, "_total"):
        values[sample.labels[label]] = values.get(sample.labels[label], 0.0) + sample.value
    return values


class HistogramWindow:
    """Quantiles of a labelled histogram over the last `window` seconds, from its bucket counts sampled every few
    seconds (`sample`): the counts now less those of the newest sample at or before the window's start."""

    def __init__(self, histogram: Histogram, label: str, window: float = TTFT_WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.histogram = histogram
        self.label = label
        self.window = window
        self.clock = clock
        self.bounds: tuple[float, ...] = ()
        self._samples: deque[tuple[float, Buckets]] = deque()
        self.sample()

    def read(self) -> Buckets:
        pairs: dict[str, list[tuple[float, float]]] = {}
        for sample in _samples(self.histogram, "_bucket"):
            pairs.setdefault(sample.labels[self.label], []).append((float(sample.labels["le"]), sample.value))
        if pairs and not self.bounds:
            self.bounds = tuple(bound for bound, _ in next(iter(pairs.values())))
        return {label: tuple(count for _, count in found) for label, found in pairs.items()}

    def sample(self) -> None:
        now = self.clock()
        self._samples.append((now, self.read()))
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()  # keep one sample at or before the window's start

    def quantiles(self, *qs: float) -> dict[str, tuple[float | None, ...]]:
        """label value -> the quantiles `qs` over the window (None where it saw no observation)."""
        start, current = self.clock() - self.window, self.read()
        baseline = self._samples[0][1]
        for at, buckets in self._samples:
            if at > start:
                break
            baseline = buckets
        result = {}
        for label, counts in current.items():
            before = baseline.get(label)
            delta = [c - b for c, b in zip(counts, before, strict=True)] if before else counts
            result[label] = tuple(bucket_quantile(q, self.bounds, delta) for q in qs)
        return result


def _split(key: str) -> tuple[str, int | None]:
    try:
        return split_ref(key)
    except ModelNotFound:
        return key, None


class Dashboard:
    """Builds the dashboard's snapshot from the app's metrics, worker pool and registry."""

    def __init__(self, metrics: Metrics, pool: WorkerPool, registry: ModelRegistry, data_root: Path, *,
                 memory_budget: int | None = None, semantic_cache: bool = False) -> None:
        self.metrics = metrics
        self.pool = pool
        self.registry = registry
        self.data_root = data_root
        self.memory_budget = memory_budget or None
        self.semantic_cache = semantic_cache
        self.ttft = HistogramWindow(metrics.ttft, "model")
        self.processes = ProcessMemory()
        self.gpus = Refreshed(read_gpus, GPU_SECONDS)
        self.data_bytes = Refreshed(lambda: directory_bytes(data_root), DATA_SIZE_SECONDS)
        self.alerts: Callable[[], list[dict[str, object]]] = list  # pending and firing alerts (the alert service)

    async def run(self) -> None:
        """Sample the TTFT buckets for the window, for as long as the app runs."""
        while True:
            await asyncio.sleep(SAMPLE_SECONDS)
            self.ttft.sample()

    async def snapshot(self) -> DashboardView:
        gpus, data_bytes = await self.gpus.get(), await self.data_bytes.get()
        disk = shutil.disk_usage(self.data_root)
        return DashboardView(
            at=time.time(), models=self.models(gpus), cache=self.cache(), memory=self.memory(),
            gpus=[GpuStatus(g.name, g.memory_total_bytes, g.memory_used_bytes) for g in gpus.gpus],
            disk=DiskStatus(str(self.data_root), disk.total, disk.free, data_bytes), alerts=self.alerts())

    def worker_keys(self, served: dict[str, float]) -> list[str]:
        """The installed models' production versions, the versions the pool knows (loaded, loading, failed), and
        those that served requests and are still installed."""
        versions = self.registry.versions.all()
        production = {v.model: v.ref for v in versions if v.stage == "production"}
        keys = {production.get(record.name, record.name) for record in self.registry.list()}
        keys |= set(self.pool.slots)
        refs = {v.ref for v in versions}
        return sorted(keys | {key for key in served if key in refs})

    def models(self, gpus: GpuReading) -> list[ModelStatus]:
        served: dict[str, float] = {}
        failed: dict[str, float] = {}
        for sample in _samples(self.metrics.worker_requests, "_total"):
            worker = sample.labels["worker"]
            served[worker] = served.get(worker, 0.0) + sample.value
            if sample.labels["outcome"] == "error":
                failed[worker] = sample.value
        prompt = counter_values(self.metrics.prompt_tokens, "model")
        completion = counter_values(self.metrics.completion_tokens, "model")
        ttft = self.ttft.quantiles(0.5, 0.95)
        statuses, pids = [], []
        for key in self.worker_keys(served):
            name, version = _split(key)
            slot = self.pool.slots.get(key)
            pid = slot.worker.pid if slot is not None and slot.alive and slot.worker is not None else None
            if pid is not None:
                pids.append(pid)
            p50, p95 = ttft.get(key) or ttft.get(name) or (None, None)
            statuses.append(ModelStatus(
                key, name, version, slot.state if slot else "unloaded", slot is not None and slot.alive,
                int(served.get(key, 0)), int(failed.get(key, 0)), int(prompt.get(key, prompt.get(name, 0))),
                int(completion.get(key, completion.get(name, 0))), p50, p95, slot.waiting if slot else 0,
                self.processes.rss(pid) if pid else None, self._vram(pid, gpus), _error(slot)))
        self.processes.forget_others(pids)
        return statuses

    def _vram(self, pid: int | None, gpus: GpuReading) -> int | None:
        if pid is None or not gpus.gpus:
            return None
        return sum(gpus.process_bytes.get(p, 0) for p in self.processes.pids(pid))

    def cache(self) -> CacheStatus:
        hits = sum(counter_values(self.metrics.cache_hits, "cache").values())
        # every lookup misses the exact cache before the semantic index is asked: with it, its misses are the
        # lookups that found nothing
        misses = counter_values(self.metrics.cache_misses, "cache").get(
            "semantic" if self.semantic_cache else "exact", 0.0)
        looked_up = hits + misses
        return CacheStatus(int(hits), int(misses), round(hits / looked_up, 4) if looked_up else None)

    def memory(self) -> MemoryStatus:
        ram = psutil.virtual_memory()
        reserved = sum(s.need.total for s in list(self.pool.slots.values()) if s.need is not None)
        return MemoryStatus(int(ram.total), int(ram.available), self.memory_budget, reserved)


def _error(slot: ModelSlot | None) -> str | None:
    return None if slot is None or slot.alive else slot.last_error
