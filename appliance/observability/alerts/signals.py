"""The signals alert rules watch: each is computed in process from a short history of the app's metric samples, and
written in PromQL over the same metric names for people who run their own Prometheus (deploy/prometheus/).

A `Snapshot` is one reading of the metric samples a signal needs: sample name (`appliance_worker_requests_total`,
`appliance_time_to_first_token_seconds_bucket`) -> labels -> value. `History` keeps the snapshots of the last few
minutes so that a signal can take an increase or a windowed quantile, as Prometheus' `increase` and
`histogram_quantile(rate(...))` do. Series are grouped by the signal's labels (`sum by (model)`), so the labels an
alert carries are the same here and in Prometheus."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from appliance.observability.dashboard import bucket_quantile

Labels = tuple[tuple[str, str], ...]
"""A series' labels, sorted by name."""
Series = dict[Labels, float]
Snapshot = dict[str, Series]

RATE_WINDOW = 300.0
RESTART_WINDOW = 600.0
HISTORY_SECONDS = max(RATE_WINDOW, RESTART_WINDOW)
MIN_TTFT = 5  # observations in the window before a quantile counts: one slow request is not a trend
MIN_CHUNKS = 20
MIN_REQUESTS = 10

TTFT = "appliance_time_to_first_token_seconds"
CHUNK_GAP = "appliance_inter_token_latency_seconds"
WORKER_REQUESTS = "appliance_worker_requests_total"
QUEUE_DEPTH = "appliance_queue_depth"
RESTARTS = "appliance_worker_restarts_total"
STALLED = "appliance_worker_stalled_seconds"
WORKER_UP = "appliance_worker_up"
MEMORY_AVAILABLE = "appliance_memory_available_bytes"
MEMORY_TOTAL = "appliance_memory_total_bytes"
MODELS_RESERVED = "appliance_models_memory_reserved_bytes"
MODELS_BUDGET = "appliance_models_memory_budget_bytes"
GPU_USED = "DCGM_FI_DEV_FB_USED"  # MiB, as dcgm-exporter and NVML give them
GPU_FREE = "DCGM_FI_DEV_FB_FREE"
KV_USAGE = "vllm:kv_cache_usage_perc"
DISK_FREE = "appliance_data_dir_disk_free_bytes"
DISK_TOTAL = "appliance_data_dir_disk_total_bytes"
GPU_XID = "appliance_gpu_xid_errors_total"
QUOTA_USED = "appliance_quota_daily_used_ratio"
AUDIT_OK = "appliance_audit_chain_ok"
SAMPLES = frozenset({
    f"{TTFT}_bucket", f"{CHUNK_GAP}_bucket", f"{CHUNK_GAP}_count", f"{CHUNK_GAP}_sum", WORKER_REQUESTS, QUEUE_DEPTH,
    RESTARTS, STALLED, WORKER_UP, MEMORY_AVAILABLE, MEMORY_TOTAL, MODELS_RESERVED, MODELS_BUDGET, GPU_USED, GPU_FREE,
    KV_USAGE, DISK_FREE, DISK_TOTAL, GPU_XID, QUOTA_USED, AUDIT_OK})
"""The sample names the signals read: all a snapshot keeps. The history holds `HISTORY_SECONDS` of snapshots, so
a snapshot of every sample (each route's and each key's series, every histogram bucket) would grow with whatever
label sets the app makes."""


def labels_of(mapping: dict[str, str]) -> Labels:
    return tuple(sorted(mapping.items()))


def _keep(labels: Labels, by: tuple[str, ...]) -> Labels:
    return tuple((k, v) for k, v in labels if k in by)


def _without(labels: Labels, name: str) -> Labels:
    return tuple((k, v) for k, v in labels if k != name)


class History:
    """Snapshots of the last `HISTORY_SECONDS`, oldest first, each with the time it was read."""

    def __init__(self, keep: float = HISTORY_SECONDS) -> None:
        self.keep = keep
        self.snapshots: deque[tuple[float, Snapshot]] = deque()

    def add(self, at: float, snapshot: Snapshot) -> None:
        self.snapshots.append((at, snapshot))
        while len(self.snapshots) > 1 and self.snapshots[1][0] <= at - self.keep:
            self.snapshots.popleft()  # keep one snapshot at or before the longest window's start

    @property
    def now(self) -> Snapshot:
        return self.snapshots[-1][1] if self.snapshots else {}

    def _start(self, window: float) -> Snapshot:
        """The newest snapshot at or before the window's start (the oldest one while the history is shorter)."""
        if not self.snapshots:
            return {}
        start = self.snapshots[-1][0] - window
        chosen = self.snapshots[0][1]
        for at, snapshot in self.snapshots:
            if at > start:
                break
            chosen = snapshot
        return chosen

    def latest(self, name: str, by: tuple[str, ...], combine: Callable[[Iterable[float]], float] = max) -> Series:
        grouped: dict[Labels, list[float]] = {}
        for labels, value in self.now.get(name, {}).items():
            grouped.setdefault(_keep(labels, by), []).append(value)
        return {labels: combine(values) for labels, values in grouped.items()}

    def increase(self, name: str, window: float, by: tuple[str, ...], where: dict[str, str] | None = None
                 ) -> Series:
        """Growth of a counter over the window, summed by `by`; a series absent at the start counts from 0, and a
        counter that went down (a restart) counts from 0 again."""
        before = self._start(window).get(name, {})
        result: Series = {}
        for labels, value in self.now.get(name, {}).items():
            if where and any(dict(labels).get(k) != v for k, v in where.items()):
                continue
            old = before.get(labels, 0.0)
            key = _keep(labels, by)
            result[key] = result.get(key, 0.0) + (value - old if value >= old else value)
        return result

    def quantile(self, name: str, q: float, window: float, by: tuple[str, ...], min_count: int) -> Series:
        """`histogram_quantile(q, sum by (by, le) (rate(name_bucket[window])))` where the window saw at least
        `min_count` observations."""
        buckets: dict[Labels, dict[float, float]] = {}
        for labels, growth in self.increase(f"{name}_bucket", window, (*by, "le")).items():
            le = float(dict(labels)["le"])
            buckets.setdefault(_without(labels, "le"), {})[le] = growth
        result: Series = {}
        for labels, counts in buckets.items():
            bounds = sorted(counts)
            cumulative = [counts[b] for b in bounds]
            if cumulative and cumulative[-1] >= min_count:
                value = bucket_quantile(q, bounds, cumulative)
                if value is not None:
                    result[labels] = value
        return result


def _ratio(top: Series, bottom: Series, minimum: float = 0.0) -> Series:
    return {labels: top.get(labels, 0.0) / value for labels, value in bottom.items() if value > 0 and value >= minimum}


@dataclass(frozen=True)
class Signal:
    name: str
    help: str
    labels: tuple[str, ...]
    promql: str
    compute: Callable[[History], Series]
    unit: str = ""


def _quantile_promql(metric: str, by: str, minimum: int) -> str:
    return (f"histogram_quantile(0.95, sum by ({by}, le) (rate({metric}_bucket[5m]))) "
            f"and on ({by}) sum by ({by}) (increase({metric}_count[5m])) >= {minimum}")


def _error_ratio(h: History) -> Series:
    every = h.increase(WORKER_REQUESTS, RATE_WINDOW, ("worker",))
    errors = h.increase(WORKER_REQUESTS, RATE_WINDOW, ("worker",), where={"outcome": "error"})
    return _ratio(errors, every, MIN_REQUESTS)


def _stream_speed(h: History) -> Series:
    chunks = h.increase(f"{CHUNK_GAP}_count", RATE_WINDOW, ("model",))
    seconds = h.increase(f"{CHUNK_GAP}_sum", RATE_WINDOW, ("model",))
    return {labels: n / seconds[labels] for labels, n in chunks.items()
            if n >= MIN_CHUNKS and seconds.get(labels, 0.0) > 0}


def _pair_ratio(top: str, bottom: str, by: tuple[str, ...] = ()) -> Callable[[History], Series]:
    return lambda h: _ratio(h.latest(top, by), h.latest(bottom, by))


def _gpu_used(h: History) -> Series:
    used, free = h.latest(GPU_USED, ("gpu",)), h.latest(GPU_FREE, ("gpu",))
    return {labels: u / (u + free[labels]) for labels, u in used.items() if labels in free and u + free[labels] > 0}


SIGNALS: dict[str, Signal] = {s.name: s for s in (
    Signal("ttft_p95_seconds", "95th percentile of the time to first token over 5 minutes (at least 5 requests)",
           ("model",), _quantile_promql(TTFT, "model", MIN_TTFT),
           lambda h: h.quantile(TTFT, 0.95, RATE_WINDOW, ("model",), MIN_TTFT), "s"),
    Signal("inter_token_p95_seconds", "95th percentile of the gap between streamed chunks over 5 minutes",
           ("model",), _quantile_promql(CHUNK_GAP, "model", MIN_CHUNKS),
           lambda h: h.quantile(CHUNK_GAP, 0.95, RATE_WINDOW, ("model",), MIN_CHUNKS), "s"),
    Signal("stream_tokens_per_second", "Chunks per second of a streamed answer, over 5 minutes (decoding speed)",
           ("model",), f"sum by (model) (increase({CHUNK_GAP}_count[5m])) / sum by (model) "
           f"(increase({CHUNK_GAP}_sum[5m])) and on (model) sum by (model) (increase({CHUNK_GAP}_count[5m])) "
           f">= {MIN_CHUNKS}", _stream_speed, "/s"),
    Signal("error_ratio", "Share of a worker's requests that failed on the server side, over 5 minutes (at least "
           "10 requests)", ("worker",),
           f'(sum by (worker) (increase({WORKER_REQUESTS}{{outcome="error"}}[5m])) or sum by (worker) '
           f"(increase({WORKER_REQUESTS}[5m])) * 0) / sum by (worker) (increase({WORKER_REQUESTS}[5m])) and on "
           f"(worker) sum by (worker) (increase({WORKER_REQUESTS}[5m])) >= {MIN_REQUESTS}", _error_ratio),
    Signal("queue_depth", "Requests waiting for a model", ("model",), f"max by (model) ({QUEUE_DEPTH})",
           lambda h: h.latest(QUEUE_DEPTH, ("model",))),
    Signal("worker_restarts", "Workers of a model that died or failed their health check, over 10 minutes",
           ("model",), f"sum by (model) (increase({RESTARTS}[10m]))",
           lambda h: h.increase(RESTARTS, RESTART_WINDOW, ("model",))),
    Signal("worker_stalled_seconds", "Seconds a worker holding requests (active or queued) has gone without a "
           "streamed token or a finished request", ("worker",), f"max by (worker) ({STALLED})",
           lambda h: h.latest(STALLED, ("worker",)), "s"),
    Signal("worker_up", "1 while a started worker runs, 0 while it is loading again or failed", ("worker",),
           f"min by (worker) ({WORKER_UP})", lambda h: h.latest(WORKER_UP, ("worker",), min)),
    Signal("memory_available_ratio", "Share of the box's RAM available", (),
           f"min({MEMORY_AVAILABLE}) / max({MEMORY_TOTAL})", _pair_ratio(MEMORY_AVAILABLE, MEMORY_TOTAL)),
    Signal("model_memory_budget_ratio", "Share of models.memory_limit_bytes reserved by loaded models", (),
           f"max({MODELS_RESERVED}) / max({MODELS_BUDGET})", _pair_ratio(MODELS_RESERVED, MODELS_BUDGET)),
    Signal("gpu_memory_used_ratio", "Share of a GPU's memory in use", ("gpu",),
           f"max by (gpu) ({GPU_USED} / ({GPU_USED} + {GPU_FREE}))", _gpu_used),
    Signal("gpu_xid_errors", "XID errors a GPU reported over 10 minutes (driver-reported faults)", ("gpu",),
           f"sum by (gpu) (increase({GPU_XID}[10m]))", lambda h: h.increase(GPU_XID, RESTART_WINDOW, ("gpu",))),
    Signal("kv_cache_usage_ratio", "Share of a vLLM worker's KV cache in use", ("model",),
           f"max by (model) ({KV_USAGE})",
           lambda h: h.latest(KV_USAGE, ("model",))),
    Signal("disk_free_ratio", "Share of the data dir's file system that is free", (),
           f"min({DISK_FREE}) / max({DISK_TOTAL})", _pair_ratio(DISK_FREE, DISK_TOTAL)),
    Signal("disk_free_bytes", "Free bytes on the data dir's file system", (), f"min({DISK_FREE})",
           lambda h: h.latest(DISK_FREE, ()), "B"),
    Signal("quota_used_ratio", "Share of a key's or user's daily token budget spent today", ("subject",),
           f"max by (subject) ({QUOTA_USED})", lambda h: h.latest(QUOTA_USED, ("subject",))),
    Signal("audit_chain_ok", "1 when the audit log's hash chain verified at its last check, 0 when it did not", (),
           f"min({AUDIT_OK})", lambda h: h.latest(AUDIT_OK, (), min)),
)}
