"""What issue 17 adds to an app's observability, built once by the composition root: the tracer (off until an OTLP
endpoint is configured) and the collectors of GPU (NVML), box (CPU, memory, disk) and vLLM workers' metrics in the
app's Prometheus registry."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from appliance.config import Settings
from appliance.observability.box import BoxCollector
from appliance.observability.engine_metrics import EngineMetrics, live_workers
from appliance.observability.gpu import GpuCollector
from appliance.observability.metrics import Metrics
from appliance.observability.tracing import Tracing

Slots = Callable[[], Iterable[Any]]
"""The worker pool's slots (each with `name`, `alive`, `worker`)."""


class Telemetry:
    def __init__(self, settings: Settings, metrics: Metrics, slots: Slots, env: Mapping[str, str] | None = None,
                 nvml: Any = None) -> None:
        """`nvml`: the NVML module to read GPUs through (default: `pynvml` when nvidia-ml-py is installed)."""
        self.settings = settings.telemetry
        self.tracing = Tracing.from_settings(settings.telemetry, os.environ if env is None else env)
        self.slots = slots
        self.box = BoxCollector(settings.data_path, self._worker_pids)
        self.gpu = GpuCollector(nvml, self.box.worker_pids) if nvml is not None else GpuCollector.installed(
            self.box.worker_pids)
        self.engines = EngineMetrics(lambda: live_workers(self.slots()))
        for collector in (self.box, self.gpu, self.engines):
            if collector is not None:
                metrics.registry.register(collector)

    def _worker_pids(self) -> dict[str, int]:
        return {key: worker.pid for key, worker in live_workers(self.slots()).items() if worker.pid}

    async def refresh(self) -> None:
        """Before /metrics renders: read the vLLM workers' own metrics (cached for a moment)."""
        await self.engines.refresh()

    def vllm_tracing(self) -> dict[str, Any]:
        """The vLLM launch's tracing arguments: its own spans go where ours do, joining the trace through the
        traceparent the gateway sends."""
        if self.tracing.endpoint is None:
            return {}
        return {"otlp_traces_endpoint": self.tracing.endpoint, "otlp_headers": dict(self.settings.headers)}

    def close(self) -> None:
        self.tracing.shutdown()
