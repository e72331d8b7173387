"""The box's own figures on every machine, GPU or not: CPU, memory, the data dir's disk, and the memory each model
worker holds. A prometheus_client collector read when /metrics is scraped (psutil; microseconds)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import psutil
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.observability.hardware import ProcessMemory

WorkerPid = Callable[[], Mapping[str, int]]
"""worker key (NAME@N) -> the pid of its process"""


class BoxCollector(Collector):
    def __init__(self, data_dir: Path, worker_pid: WorkerPid | None = None,
                 memory: ProcessMemory | None = None) -> None:
        self.data_dir = data_dir
        self.worker_pid = worker_pid or dict
        self.memory = memory or ProcessMemory()
        psutil.cpu_percent(None)  # the first reading is against this one

    def describe(self) -> list[Metric]:
        return []

    def worker_pids(self) -> dict[str, list[int]]:
        """Each worker's process tree (a vLLM server runs its engine in a child): for the GPU memory per worker."""
        return {worker: self.memory.pids(pid) for worker, pid in self.worker_pid().items()}

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("appliance_cpu_usage_ratio", "CPU busy over all cores since the previous reading "
                                "(0-1).", value=psutil.cpu_percent(None) / 100)
        yield GaugeMetricFamily("appliance_cpu_count", "Logical CPUs.", value=psutil.cpu_count() or 1)
        yield GaugeMetricFamily("appliance_load_average_1m", "Load average over one minute.",
                                value=psutil.getloadavg()[0])
        memory = psutil.virtual_memory()
        yield GaugeMetricFamily("appliance_memory_total_bytes", "Physical memory.", value=memory.total)
        yield GaugeMetricFamily("appliance_memory_available_bytes", "Memory available to start programs without "
                                "swapping.", value=memory.available)
        yield GaugeMetricFamily("appliance_memory_used_bytes", "Memory in use (total - available).",
                                value=memory.total - memory.available)
        try:
            disk = shutil.disk_usage(self.data_dir)
        except OSError:
            pass
        else:
            yield GaugeMetricFamily("appliance_data_dir_disk_total_bytes", "Size of the data dir's filesystem.",
                                    value=disk.total)
            yield GaugeMetricFamily("appliance_data_dir_disk_free_bytes", "Space free on the data dir's filesystem "
                                    "for the service user.", value=disk.free)
            yield GaugeMetricFamily("appliance_data_dir_disk_used_bytes", "Space used on the data dir's filesystem.",
                                    value=disk.used)
        resident = GaugeMetricFamily("appliance_worker_resident_bytes", "Resident memory of a model worker and its "
                                     "child processes.", labels=["worker"])
        pids = self.worker_pid()
        self.memory.forget_others(pids.values())
        for worker, pid in sorted(pids.items()):
            if (rss := self.memory.rss(pid)) is not None:
                resident.add_metric([worker], rss)
        yield resident
