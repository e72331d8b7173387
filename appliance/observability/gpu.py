"""GPU metrics through NVML (`nvidia-ml-py`, the `gpu` extra), under DCGM-exporter's names and units where DCGM has
one (DCGM_FI_DEV_GPU_UTIL, DCGM_FI_DEV_FB_USED, ...), so that dashboards and rules written for dcgm-exporter work.

A prometheus_client collector, read when /metrics is scraped. The NVML module is passed in (`pynvml`, or a stand-in
with the same functions in the unit tests); without NVML, a driver or a GPU it yields nothing. XID errors arrive as
NVML events: an event set is registered once and drained at each read."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.logs import get_logger

log = get_logger(__name__)
MIB = 1 << 20
GPU_LABELS = ("gpu", "UUID", "device", "modelName", "pci_bus_id")
XID_CRITICAL_ERROR = 0x8  # nvmlEventTypeXidCriticalError
WorkerPids = Callable[[], Mapping[str, Sequence[int]]]
"""worker key (NAME@N) -> the pids of its process tree"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GpuCollector(Collector):
    """DCGM-named gauges per GPU, XID error counts, and the GPU memory each worker's processes hold."""

    def __init__(self, nvml: Any, worker_pids: WorkerPids | None = None) -> None:
        self.nvml = nvml
        self.worker_pids = worker_pids or dict
        self._ready: bool | None = None  # None: NVML not initialised yet; False: no NVML, driver or GPU
        self._events: Any = None
        self._lock = threading.Lock()  # scrapes and alert evaluations may read from two threads
        self._xid_counts: dict[tuple[int, int], int] = {}  # (gpu index, xid) -> errors seen since start
        self._last_xid: dict[int, int] = {}

    @classmethod
    def installed(cls, worker_pids: WorkerPids | None = None) -> GpuCollector | None:
        """A collector over `pynvml` when nvidia-ml-py is installed, else None."""
        try:
            import pynvml
        except ImportError:
            return None
        return cls(pynvml, worker_pids)

    def describe(self) -> list[Metric]:
        return []  # names depend on the GPUs found; nothing to check at registration

    def _start(self) -> bool:
        if self._ready is None:
            try:
                self.nvml.nvmlInit()
                self._ready = self.nvml.nvmlDeviceGetCount() > 0
            except self.nvml.NVMLError as exc:
                log.info("gpu.nvml_unavailable", error=str(exc))
                self._ready = False
            if self._ready:
                self._events = self._register_xid_events()
        return bool(self._ready)

    def _register_xid_events(self) -> Any:
        try:
            events = self.nvml.nvmlEventSetCreate()
        except self.nvml.NVMLError:
            return None
        for index in range(self.nvml.nvmlDeviceGetCount()):
            with contextlib.suppress(self.nvml.NVMLError):  # not every GPU reports XIDs as events
                self.nvml.nvmlDeviceRegisterEvents(self.nvml.nvmlDeviceGetHandleByIndex(index), XID_CRITICAL_ERROR,
                                                   events)
        return events

    def _drain_xid_events(self, index_of: Mapping[str, int]) -> None:
        """Count the XID events that arrived since the last read (a wait of 0 ms: never blocks)."""
        if self._events is None:
            return
        for _ in range(1000):  # bounded: a GPU in an error storm must not hold the scrape
            try:
                event = self.nvml.nvmlEventSetWait_v2(self._events, 0)
            except self.nvml.NVMLError:  # NVML_ERROR_TIMEOUT: nothing pending
                return
            if not int(event.eventType) & XID_CRITICAL_ERROR:
                continue
            try:
                index = index_of.get(_text(self.nvml.nvmlDeviceGetUUID(event.device)), 0)
            except self.nvml.NVMLError:
                index = 0
            xid = int(event.eventData)
            self._xid_counts[(index, xid)] = self._xid_counts.get((index, xid), 0) + 1
            self._last_xid[index] = xid
            log.error("gpu.xid_error", gpu=index, xid=xid)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if not self._start():
                return
            try:
                yield from self._read()
            except self.nvml.NVMLError as exc:  # a GPU that fell off the bus: say so, keep serving the rest
                log.warning("gpu.read_failed", error=str(exc))

    def _read(self) -> Iterator[Metric]:
        nvml = self.nvml
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        self._drain_xid_events({uuid: index for index, uuid in enumerate(uuids)})
        gauges = {name: GaugeMetricFamily(name, doc, labels=GPU_LABELS) for name, doc in _GAUGES}
        # a counter in DCGM, typed gauge here: a prometheus_client counter would be exposed as ..._total, and the
        # name is what dashboards match (rate() reads it all the same)
        energy = GaugeMetricFamily("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
                                   "Total energy consumption since boot (in mJ; only grows).", labels=GPU_LABELS)
        vram = GaugeMetricFamily("appliance_worker_gpu_memory_bytes", "GPU memory held by a model worker's processes.",
                                 labels=("worker", "gpu"))
        owner = {pid: worker for worker, pids in self.worker_pids().items() for pid in pids}
        for index, (handle, uuid) in enumerate(zip(handles, uuids, strict=True)):
            labels = [str(index), uuid, f"nvidia{index}", _text(nvml.nvmlDeviceGetName(handle)),
                      _text(nvml.nvmlDeviceGetPciInfo(handle).busId)]
            for name, value in self._device(handle):
                gauges[name].add_metric(labels, value)
            gauges["DCGM_FI_DEV_XID_ERRORS"].add_metric(labels, float(self._last_xid.get(index, 0)))
            with contextlib.suppress(nvml.NVMLError):
                energy.add_metric(labels, float(nvml.nvmlDeviceGetTotalEnergyConsumption(handle)))
            for worker, used in sorted(self._held(handle, owner).items()):
                vram.add_metric([worker, str(index)], used)
        xids = CounterMetricFamily("appliance_gpu_xid_errors", "XID errors seen on a GPU since the appliance started.",
                                   labels=("gpu", "UUID", "xid"))
        for (index, xid), count in sorted(self._xid_counts.items()):
            xids.add_metric([str(index), uuids[index] if index < len(uuids) else "", str(xid)], count)
        yield from gauges.values()
        yield from (energy, xids, vram)

    def _device(self, handle: Any) -> Iterator[tuple[str, float]]:
        """(DCGM name, value) of one GPU; a reading the board does not support (NOT_SUPPORTED) is left out."""
        nvml = self.nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        yield "DCGM_FI_DEV_FB_USED", int(memory.used) / MIB
        yield "DCGM_FI_DEV_FB_FREE", int(memory.free) / MIB
        yield "DCGM_FI_DEV_FB_TOTAL", int(memory.total) / MIB
        with contextlib.suppress(nvml.NVMLError):
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            yield "DCGM_FI_DEV_GPU_UTIL", float(rates.gpu)
            yield "DCGM_FI_DEV_MEM_COPY_UTIL", float(rates.memory)
        with contextlib.suppress(nvml.NVMLError):
            yield "DCGM_FI_DEV_POWER_USAGE", nvml.nvmlDeviceGetPowerUsage(handle) / 1000  # mW
        with contextlib.suppress(nvml.NVMLError):
            yield "DCGM_FI_DEV_GPU_TEMP", float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        with contextlib.suppress(nvml.NVMLError):
            yield "DCGM_FI_DEV_SM_CLOCK", float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
        with contextlib.suppress(nvml.NVMLError):
            yield "DCGM_FI_DEV_MEM_CLOCK", float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM))

    def _held(self, handle: Any, owner: Mapping[int, str]) -> dict[str, int]:
        """GPU memory per worker on one GPU, from the compute processes NVML lists."""
        held: dict[str, int] = {}
        with contextlib.suppress(self.nvml.NVMLError):
            for process in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if (worker := owner.get(int(process.pid))) is not None:
                    held[worker] = held.get(worker, 0) + int(getattr(process, "usedGpuMemory", None) or 0)
        return held


_GAUGES = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilisation (in %)."),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilisation (in %)."),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB)."),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB)."),
    ("DCGM_FI_DEV_FB_TOTAL", "Framebuffer memory total (in MiB)."),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W)."),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C)."),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz)."),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz)."),
    ("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered (0: none since start)."),
)
