"""vLLM workers' own Prometheus metrics (`vllm:*`: running and waiting requests, KV-cache use, its latency
histograms), re-exported through the appliance's /metrics with a `model` label naming the worker (NAME@N); and the
llama.cpp workers' counters from their /health (`appliance_llamacpp_*`: decoding steps, prompt-lookup drafts and
the draft tokens accepted, prompt tokens whose KV cells were reused rather than computed).

Each worker is read over its Unix socket when /metrics is scraped, at most once per `ttl` seconds (`refresh`); the
collector then serves what was read. A worker that does not answer is left out of that scrape."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import httpx
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from appliance.logs import get_logger

log = get_logger(__name__)
PREFIX = "vllm:"
LLAMACPP = "llama.cpp"
# the llama.cpp worker's /health counters (appliance.engines.llamacpp_scheduler.Scheduler.stats) -> /metrics
LLAMACPP_COUNTERS = {
    "steps": ("appliance_llamacpp_decode_steps", "llama_decode calls of the worker's batching loop"),
    "generated_tokens": ("appliance_llamacpp_generated_tokens", "Tokens the worker generated"),
    "drafted_tokens": ("appliance_llamacpp_draft_tokens",
                       "Prompt-lookup draft tokens decoded beside a request's sampled token"),
    "accepted_draft_tokens": ("appliance_llamacpp_draft_tokens_accepted",
                              "Prompt-lookup draft tokens kept: tokens that cost no step of their own"),
    "prefix_reused_tokens": ("appliance_llamacpp_prefix_reused_tokens",
                             "Prompt tokens whose KV cells a slot held or copied from another slot, not computed"),
    "shared_prompt_tokens": ("appliance_llamacpp_prefix_shared_tokens",
                             "Prompt tokens whose KV cells were copied from another slot holding the same prefix "
                             "(a shared system prompt), part of the reused ones"),
}
Workers = Callable[[], Mapping[str, Any]]
"""worker key (NAME@N) -> a running worker (with `engine` and an httpx `client`)"""


def relabel(texts: Mapping[str, str], label: str = "model") -> list[Metric]:
    """The `vllm:*` families of several workers' exposition texts, merged by name, each sample with `label` set to
    its worker's key (a `model` label of vLLM's own is replaced: the key says which version served)."""
    families: dict[str, Metric] = {}
    for worker, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(PREFIX):
                continue
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples += [Sample(s.name, {**s.labels, label: worker}, s.value, s.timestamp, s.exemplar)
                               for s in family.samples]
    return list(families.values())


class EngineMetrics(Collector):
    def __init__(self, workers: Workers, ttl: float = 2.0, timeout: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.workers = workers
        self.ttl = ttl
        self.timeout = timeout
        self.clock = clock
        self._families: list[Metric] = []
        self._read_at: float | None = None
        self._lock = asyncio.Lock()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._families

    async def refresh(self) -> None:
        """Read the vLLM workers' metrics, unless they were read less than `ttl` seconds ago."""
        async with self._lock:
            if self._read_at is not None and self.clock() - self._read_at < self.ttl:
                return
            workers = self.workers()
            vllm = {key: w for key, w in workers.items() if getattr(w, "engine", "") == PREFIX[:-1]}
            llama = {key: w for key, w in workers.items() if getattr(w, "engine", "") == LLAMACPP}
            texts = await asyncio.gather(*(self._scrape(key, w) for key, w in vllm.items()))
            healths = await asyncio.gather(*(self._health(key, w) for key, w in llama.items()))
            self._families = relabel({key: text for key, text in zip(vllm, texts, strict=True) if text})
            self._families += llamacpp_families({key: h for key, h in zip(llama, healths, strict=True) if h})
            self._read_at = self.clock()

    async def _health(self, key: str, worker: Any) -> dict[str, Any]:
        try:
            return dict(await asyncio.wait_for(worker.health(), self.timeout))
        except (httpx.HTTPError, TimeoutError, ValueError) as exc:
            log.info("metrics.worker_unread", worker=key, error=type(exc).__name__)
            return {}

    async def _scrape(self, key: str, worker: Any) -> str:
        try:
            response = await worker.client.get("/metrics", timeout=self.timeout)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            log.info("metrics.worker_unread", worker=key, error=type(exc).__name__)
            return ""
        return str(response.text)


def llamacpp_families(healths: Mapping[str, Mapping[str, Any]], label: str = "model") -> list[Metric]:
    """The llama.cpp workers' counters (and their slots) as metric families, a sample per worker key."""
    counters = {key: CounterMetricFamily(name, doc, labels=[label]) for key, (name, doc) in LLAMACPP_COUNTERS.items()}
    slots = GaugeMetricFamily("appliance_llamacpp_slots", "Sequences the worker decodes together (llamacpp.parallel, "
                              "as sized for the model)", labels=[label])
    for worker, health in sorted(healths.items()):
        values = {**health, "prefix_reused_tokens": sum(
            int(health.get(k) or 0) for k in ("reused_prompt_tokens", "copied_prompt_tokens"))}
        for key, family in counters.items():
            if isinstance(values.get(key), int):
                family.add_metric([worker], values[key])
        if isinstance(health.get("parallel"), int):
            slots.add_metric([worker], health["parallel"])
    return [*counters.values(), slots]


def live_workers(slots: Iterable[Any]) -> dict[str, Any]:
    """The pool's running workers by key."""
    return {slot.name: slot.worker for slot in slots if slot.alive and slot.worker is not None}
