"""What the dashboard reads from the box besides the metrics: GPU memory (NVML, else `nvidia-smi`), the memory the
model worker processes hold (psutil), and the size of the data directory. Each read is cheap, or is called through
`appliance.observability.refresh.Refreshed` so that it runs in a thread at most once per interval."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from appliance.logs import get_logger

log = get_logger(__name__)
MIB = 1 << 20


@dataclass(frozen=True)
class GpuUsage:
    name: str
    memory_total_bytes: int
    memory_used_bytes: int


@dataclass(frozen=True)
class GpuReading:
    """The GPUs, and the GPU memory each process holds (pid -> bytes, over all GPUs)."""

    gpus: tuple[GpuUsage, ...] = ()
    process_bytes: dict[int, int] = field(default_factory=dict)


class _Nvml:
    """NVML, initialised once for the process (nvmlInit is reference counted, so `probe_gpus` elsewhere still
    pairs its own init and shutdown)."""

    def __init__(self) -> None:
        self.ready: bool | None = None  # None: not tried; False: no NVML, no driver or no device

    def read(self) -> GpuReading | None:
        try:
            import pynvml
        except ImportError:
            return None
        if self.ready is None:
            try:
                pynvml.nvmlInit()
                self.ready = True
            except pynvml.NVMLError:
                self.ready = False
        if not self.ready:
            return None
        gpus: list[GpuUsage] = []
        processes: dict[int, int] = {}
        try:
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                name = pynvml.nvmlDeviceGetName(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                gpus.append(GpuUsage(name.decode() if isinstance(name, bytes) else str(name), int(memory.total),
                                     int(memory.used)))
                for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    used = getattr(process, "usedGpuMemory", None) or 0
                    processes[int(process.pid)] = processes.get(int(process.pid), 0) + int(used)
        except pynvml.NVMLError as exc:
            log.warning("gpu.read_failed", error=str(exc))
            return GpuReading()
        return GpuReading(tuple(gpus), processes)


_NVML = _Nvml()


def _smi(*query: str) -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    return [[part.strip() for part in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def _read_nvidia_smi() -> GpuReading:
    if shutil.which("nvidia-smi") is None:
        return GpuReading()
    try:
        gpus = tuple(GpuUsage(",".join(row[:-2]), int(float(row[-2])) * MIB, int(float(row[-1])) * MIB)
                     for row in _smi("--query-gpu=name,memory.total,memory.used") if len(row) >= 3)
        processes: dict[int, int] = {}
        for row in _smi("--query-compute-apps=pid,used_memory"):
            with contextlib.suppress(ValueError, IndexError):
                processes[int(row[0])] = processes.get(int(row[0]), 0) + int(float(row[1])) * MIB
    except (subprocess.SubprocessError, OSError, ValueError):
        return GpuReading()
    return GpuReading(gpus, processes)


def read_gpus() -> GpuReading:
    """NVIDIA GPUs and their memory in use, through NVML when `nvidia-ml-py` is installed, else `nvidia-smi`;
    nothing without a driver. Slow with `nvidia-smi` (two processes): call it through `Refreshed`."""
    return _NVML.read() or _read_nvidia_smi()


def directory_bytes(root: Path) -> int:
    """Disk space used by the files under `root` (allocated blocks, as `du` counts; links are not followed)."""
    total, pending = 0, [str(root)]
    while pending:
        with contextlib.suppress(OSError), os.scandir(pending.pop()) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    else:
                        st = entry.stat(follow_symlinks=False)
                        total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


class ProcessMemory:
    """Resident memory of a worker and the processes it started (vLLM runs its engine in a child). The children
    are looked up again at most every `children_ttl` seconds: finding them reads every process on the box."""

    def __init__(self, children_ttl: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.children_ttl = children_ttl
        self.clock = clock
        self._trees: dict[int, tuple[float, list[psutil.Process]]] = {}

    def tree(self, pid: int) -> list[psutil.Process]:
        """The process and its descendants (cached); empty when it is gone."""
        found = self._trees.get(pid)
        if found is None or self.clock() - found[0] >= self.children_ttl:
            try:
                root = psutil.Process(pid)
                found = (self.clock(), [root, *root.children(recursive=True)])
            except psutil.Error:
                self._trees.pop(pid, None)
                return []
            self._trees[pid] = found
        return found[1]

    def rss(self, pid: int) -> int | None:
        total, seen = 0, False
        for process in self.tree(pid):
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
                seen = True
        return total if seen else None

    def pids(self, pid: int) -> list[int]:
        return [p.pid for p in self.tree(pid)]

    def forget_others(self, alive: Iterable[int]) -> None:
        """Drop what is cached about processes that no longer serve a model."""
        keep = set(alive)
        for pid in [p for p in self._trees if p not in keep]:
            del self._trees[pid]
