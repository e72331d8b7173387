"""The app's own state as gauges, for the alert rules and for /metrics: which workers serve, which are stalled,
memory reserved by models against the budget, keys' daily budgets and the audit chain. (RAM, disk and GPUs are
the box's and NVML's collectors', appliance.observability.box and .gpu.)

A worker is *stalled* while it holds requests (running or queued) and none of them made progress: no streamed chunk
(the inter-token histogram), no first token (TTFT), no finished request, and no decode step in the worker's own
health answer (the llama.cpp worker counts `steps`; the supervisor asks every supervisor.health_interval seconds,
so a long answer that is not streamed still shows progress). It is read from counters the gateway, the pool and
the health checks already keep, so the request path pays nothing for it. The gauges are computed when read (a scrape, an
evaluation), which costs microseconds."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import Counter, Histogram, Metric
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from appliance.auth.quotas import QuotaService
from appliance.observability.alerts import signals as names
from appliance.observability.alerts.signals import Snapshot, labels_of
from appliance.observability.metrics import Metrics
from appliance.supervisor.pool import WorkerPool

HELP = {
    names.STALLED: "Seconds a worker holding requests has gone without a streamed token or a finished request.",
    names.WORKER_UP: "1 while a started worker runs; 0 while it loads again or after its load failed.",
    names.MODELS_RESERVED: "Memory reserved by the loaded models (placement's estimates).",
    names.MODELS_BUDGET: "models.memory_limit_bytes, when set.",
    names.QUOTA_USED: "Share of a key's or user's daily token budget spent today (subjects with a budget).",
    names.AUDIT_OK: "1 when the audit chain verified at its last check (alerts.audit_verify_interval), else 0.",
}


def _sum_by(metric: Counter | Histogram, suffix: str, label: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix):
                key = sample.labels[label]
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


@dataclass
class _Progress:
    count: float
    since: float


class AppState(Collector):
    """Reads the app's state as gauges; registered in the app's metrics registry, so /metrics carries them too."""

    def __init__(self, metrics: Metrics, pool: WorkerPool, quotas: QuotaService, *, memory_budget: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.pool = pool
        self.quotas = quotas
        self.memory_budget = memory_budget
        self.clock = clock
        self.audit_ok: bool | None = None  # unknown until the first check
        self._progress: dict[str, _Progress] = {}

    def stalled(self) -> dict[str, float]:
        """Worker key -> seconds without progress while it holds requests (0 while idle or progressing)."""
        now = self.clock()
        finished = _sum_by(self.metrics.worker_requests, "_total", "worker")
        tokens = _sum_by(self.metrics.inter_token, "_count", "model")
        first = _sum_by(self.metrics.ttft, "_count", "model")
        result: dict[str, float] = {}
        for key, slot in list(self.pool.slots.items()):
            name = key.partition("@")[0]
            steps = slot.health.get("steps")
            count = (finished.get(key, 0.0) + tokens.get(name, 0.0) + first.get(name, 0.0)
                     + (float(steps) if isinstance(steps, int | float) else 0.0))
            seen = self._progress.get(key)
            busy = slot.in_use + slot.waiting > 0
            if seen is None or seen.count != count or not busy:
                seen = self._progress[key] = _Progress(count, now)
            result[key] = now - seen.since if busy else 0.0
        for gone in set(self._progress) - set(result):
            del self._progress[gone]
        return result

    def read(self) -> Snapshot:
        snapshot: Snapshot = {names.STALLED: {labels_of({"worker": k}): v for k, v in self.stalled().items()}}
        up = {}
        for key, slot in list(self.pool.slots.items()):
            if slot.alive or slot.state == "failed" or (slot.state == "loading" and slot.started_at):
                up[labels_of({"worker": key})] = 1.0 if slot.alive else 0.0  # a first load is not "down"
        snapshot[names.WORKER_UP] = up
        reserved = sum(s.need.total for s in list(self.pool.slots.values()) if s.need is not None)
        snapshot[names.MODELS_RESERVED] = {(): float(reserved)}
        if self.memory_budget:
            snapshot[names.MODELS_BUDGET] = {(): float(self.memory_budget)}
        snapshot[names.QUOTA_USED] = {labels_of({"subject": s}): v for s, v in self.quotas.daily_use().items()}
        if self.audit_ok is not None:
            snapshot[names.AUDIT_OK] = {(): 1.0 if self.audit_ok else 0.0}
        return snapshot

    def collect(self) -> Iterator[Metric]:
        for name, series in self.read().items():
            if not series:
                continue
            label_names = [k for k, _ in next(iter(series))]
            family = GaugeMetricFamily(name, HELP[name], labels=label_names)
            for labels, value in series.items():
                family.add_metric([v for _, v in labels], value)
            yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())  # computed when collected; nothing to check at registration
