"""GPU, box and vLLM-worker metrics (issue 17). NVML is faked at the library boundary: a stand-in `pynvml` module
with the functions and constants nvidia-ml-py has, holding two GPUs (one without power readings), their compute
processes and a queue of XID events. A real GPU is read in the `gpu`-marked test."""

from __future__ import annotations

import asyncio
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from appliance.observability.box import BoxCollector
from appliance.observability.engine_metrics import EngineMetrics, relabel
from appliance.observability.gpu import GpuCollector

MIB = 1 << 20


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


def fake_nvml(gpus: list[dict[str, Any]], xids: list[tuple[int, int]] | None = None,
              init_error: bool = False) -> types.ModuleType:
    """A module with nvidia-ml-py's names over `gpus` (dicts of readings; a reading that is missing raises
    NVML_ERROR_NOT_SUPPORTED as a board without it does). `xids`: (gpu index, xid) events pending."""
    nvml = types.ModuleType("pynvml")
    pending = list(xids or [])
    handles = [types.SimpleNamespace(index=i, **gpu) for i, gpu in enumerate(gpus)]

    def reading(handle: Any, name: str) -> Any:
        if not hasattr(handle, name):
            raise NVMLError(3)  # NVML_ERROR_NOT_SUPPORTED
        return getattr(handle, name)

    def init() -> None:
        if init_error:
            raise NVMLError(9)  # NVML_ERROR_DRIVER_NOT_LOADED

    def wait(_events: object, timeout_ms: int) -> Any:
        assert timeout_ms == 0  # never blocks a scrape
        if not pending:
            raise NVMLError(10)  # NVML_ERROR_TIMEOUT
        index, xid = pending.pop(0)
        return types.SimpleNamespace(device=handles[index], eventType=0x8, eventData=xid)

    nvml.__dict__.update(
        NVMLError=NVMLError, NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2,
        nvmlInit=init, nvmlDeviceGetCount=lambda: len(handles),
        nvmlDeviceGetHandleByIndex=lambda i: handles[i],
        nvmlDeviceGetUUID=lambda h: f"GPU-{h.index:04d}",
        nvmlDeviceGetName=lambda h: b"NVIDIA Fake 24GB",
        nvmlDeviceGetPciInfo=lambda h: types.SimpleNamespace(busId=f"00000000:0{h.index}:00.0".encode()),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=h.total, used=h.used, free=h.total - h.used),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=h.util, memory=h.mem_util),
        nvmlDeviceGetPowerUsage=lambda h: reading(h, "power_mw"),
        nvmlDeviceGetTotalEnergyConsumption=lambda h: reading(h, "energy_mj"),
        nvmlDeviceGetTemperature=lambda h, sensor: h.temp,
        nvmlDeviceGetClockInfo=lambda h, clock: h.sm_clock if clock == 1 else h.mem_clock,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [types.SimpleNamespace(pid=p, usedGpuMemory=b)
                                                        for p, b in h.processes],
        nvmlEventSetCreate=lambda: object(),
        nvmlDeviceRegisterEvents=lambda handle, types_, events: None,
        nvmlEventSetWait_v2=wait,
    )
    return nvml


GPUS = [
    {"total": 24576 * MIB, "used": 6144 * MIB, "util": 87, "mem_util": 40, "power_mw": 215500, "energy_mj": 9_000_000,
     "temp": 71, "sm_clock": 1980, "mem_clock": 9501, "processes": [(4101, 5000 * MIB), (4102, 1000 * MIB),
                                                                      (999, 100 * MIB)]},
    {"total": 16384 * MIB, "used": 0, "util": 0, "mem_util": 0, "temp": 35, "sm_clock": 210, "mem_clock": 405,
     "processes": []},  # no power or energy readings (NOT_SUPPORTED)
]


def scrape(*collectors: Any) -> tuple[CollectorRegistry, str]:
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return registry, generate_latest(registry).decode()


def test_gpu_readings_under_dcgm_names_with_its_labels_and_units() -> None:
    workers = {"smol@1": [4100, 4101, 4102], "big@2": [5000]}  # a vLLM server and its engine child
    registry, text = scrape(GpuCollector(fake_nvml(GPUS), lambda: workers))
    gpu0 = {"gpu": "0", "UUID": "GPU-0000", "device": "nvidia0", "modelName": "NVIDIA Fake 24GB",
            "pci_bus_id": "00000000:00:00.0"}
    value = registry.get_sample_value
    assert value("DCGM_FI_DEV_GPU_UTIL", gpu0) == 87
    assert value("DCGM_FI_DEV_MEM_COPY_UTIL", gpu0) == 40
    assert value("DCGM_FI_DEV_FB_USED", gpu0) == 6144  # MiB, as DCGM
    assert value("DCGM_FI_DEV_FB_FREE", gpu0) == 24576 - 6144
    assert value("DCGM_FI_DEV_FB_TOTAL", gpu0) == 24576
    assert value("DCGM_FI_DEV_POWER_USAGE", gpu0) == 215.5  # W
    assert value("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", gpu0) == 9_000_000  # mJ, under DCGM's very name
    assert value("DCGM_FI_DEV_GPU_TEMP", gpu0) == 71
    assert value("DCGM_FI_DEV_SM_CLOCK", gpu0) == 1980 and value("DCGM_FI_DEV_MEM_CLOCK", gpu0) == 9501
    assert value("DCGM_FI_DEV_XID_ERRORS", gpu0) == 0
    # the worker's whole process tree; a process that is no worker's is not counted
    assert value("appliance_worker_gpu_memory_bytes", {"worker": "smol@1", "gpu": "0"}) == 6000 * MIB
    assert value("appliance_worker_gpu_memory_bytes", {"worker": "big@2", "gpu": "0"}) is None
    gpu1 = {**gpu0, "gpu": "1", "UUID": "GPU-0001", "device": "nvidia1", "pci_bus_id": "00000000:01:00.0"}
    assert value("DCGM_FI_DEV_FB_TOTAL", gpu1) == 16384
    assert value("DCGM_FI_DEV_POWER_USAGE", gpu1) is None  # not supported: left out, the rest still read
    assert value("DCGM_FI_DEV_GPU_TEMP", gpu1) == 35
    assert "\nDCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{" in text


def test_xid_errors_are_counted_as_they_arrive_and_the_last_one_is_kept() -> None:
    nvml = fake_nvml(GPUS, xids=[(1, 79), (1, 79), (0, 13)])
    collector = GpuCollector(nvml)
    registry, _ = scrape(collector)
    value = registry.get_sample_value
    assert value("appliance_gpu_xid_errors_total", {"gpu": "1", "UUID": "GPU-0001", "xid": "79"}) == 2
    assert value("appliance_gpu_xid_errors_total", {"gpu": "0", "UUID": "GPU-0000", "xid": "13"}) == 1
    gpu1 = {"gpu": "1", "UUID": "GPU-0001", "device": "nvidia1", "modelName": "NVIDIA Fake 24GB",
            "pci_bus_id": "00000000:01:00.0"}
    assert value("DCGM_FI_DEV_XID_ERRORS", gpu1) == 79
    assert value("appliance_gpu_xid_errors_total", {"gpu": "1", "UUID": "GPU-0001", "xid": "79"}) == 2  # kept


def test_without_a_driver_or_a_gpu_there_are_no_gpu_metrics() -> None:
    _, text = scrape(GpuCollector(fake_nvml(GPUS, init_error=True)))
    assert "DCGM_" not in text
    _, text = scrape(GpuCollector(fake_nvml([])))
    assert "DCGM_" not in text


def test_the_box_cpu_memory_disk_and_worker_memory(tmp_path: Path) -> None:
    registry, _ = scrape(BoxCollector(tmp_path, lambda: {"smol@1": os.getpid()}))
    value = registry.get_sample_value
    assert 0 <= (value("appliance_cpu_usage_ratio") or 0) <= 1
    assert (value("appliance_cpu_count") or 0) >= 1
    total = value("appliance_memory_total_bytes") or 0
    assert 0 < (value("appliance_memory_available_bytes") or 0) <= total
    assert (value("appliance_memory_used_bytes") or 0) > 0
    assert 0 < (value("appliance_data_dir_disk_free_bytes") or 0) < (value("appliance_data_dir_disk_total_bytes")
                                                                     or 0)
    assert (value("appliance_worker_resident_bytes", {"worker": "smol@1"}) or 0) > 10 * MIB  # this process


VLLM_TEXT = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smol"} %d
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="smol"} 120.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="smol"} 3.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="smol"} 4.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="smol"} 4.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="smol"} 0.9
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 10.0
"""


def test_vllm_families_of_several_workers_merge_with_a_model_label() -> None:
    registry = CollectorRegistry()
    families = relabel({"smol@1": VLLM_TEXT % 2, "smol@2": VLLM_TEXT % 5})

    class Fixed:
        def collect(self) -> Iterator[Any]:
            yield from families

    registry.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    value = registry.get_sample_value
    assert value("vllm:num_requests_running", {"engine": "0", "model_name": "smol", "model": "smol@1"}) == 2
    assert value("vllm:num_requests_running", {"engine": "0", "model_name": "smol", "model": "smol@2"}) == 5
    assert value("vllm:prompt_tokens_total", {"engine": "0", "model_name": "smol", "model": "smol@2"}) == 120
    assert value("vllm:time_to_first_token_seconds_bucket", {"engine": "0", "model_name": "smol", "model": "smol@1",
                                                             "le": "0.1"}) == 3
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1  # one family, both workers' samples
    assert "python_gc" not in text  # the worker's own process metrics are not ours to re-export


class Worker:
    """A running worker as the pool holds it: an engine name, an httpx client (here over a transport that
    answers as the engine's /metrics would) and, for llama.cpp, the health answer with the scheduler's counters."""

    def __init__(self, engine: str, answer: httpx.Response | None) -> None:
        self.engine = engine
        self.reads = 0
        self.healths = 0

        def handle(request: httpx.Request) -> httpx.Response:
            assert request.url.path == "/metrics"
            self.reads += 1
            if answer is None:
                raise httpx.ConnectError("refused", request=request)
            return answer

        self.client = httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://worker")

    async def health(self) -> dict[str, int]:
        self.healths += 1
        return {"steps": 40 + self.healths, "parallel": 8}


def test_vllm_workers_are_read_at_most_once_per_ttl_and_a_silent_one_is_left_out() -> None:
    asyncio.run(read_vllm_workers())


async def read_vllm_workers() -> None:
    now = [100.0]
    workers = {"smol@1": Worker("vllm", httpx.Response(200, text=VLLM_TEXT % 1)),
               "dead@1": Worker("vllm", None), "gguf@1": Worker("llama.cpp", httpx.Response(200, text="x 1\n"))}
    collector = EngineMetrics(lambda: workers, ttl=2.0, clock=lambda: now[0])
    await collector.refresh()
    await collector.refresh()  # within the ttl: served from what was read
    registry, _ = scrape(collector)
    assert registry.get_sample_value("vllm:num_requests_running", {"engine": "0", "model_name": "smol",
                                                                   "model": "smol@1"}) == 1
    assert workers["smol@1"].reads == 1 and workers["dead@1"].reads == 1
    assert workers["gguf@1"].reads == 0  # only vLLM workers' /metrics are read
    assert workers["gguf@1"].healths == 1  # llama.cpp workers' counters come from their health answer, once a ttl
    assert registry.get_sample_value("appliance_llamacpp_decode_steps_total", {"model": "gguf@1"}) == 41
    assert registry.get_sample_value("appliance_llamacpp_slots", {"model": "gguf@1"}) == 8
    now[0] += 2.5
    await collector.refresh()
    assert workers["smol@1"].reads == 2 and workers["gguf@1"].healths == 2
    for worker in workers.values():
        await worker.client.aclose()


@pytest.mark.gpu
def test_a_real_gpu_through_nvml() -> None:
    pynvml = pytest.importorskip("pynvml")
    registry, _ = scrape(GpuCollector(pynvml, lambda: {"me@1": [os.getpid()]}))
    samples = {s.name: s for metric in registry.collect() for s in metric.samples}
    assert samples["DCGM_FI_DEV_FB_TOTAL"].value > 0
    assert 0 <= samples["DCGM_FI_DEV_GPU_UTIL"].value <= 100
    assert samples["DCGM_FI_DEV_GPU_TEMP"].value > 0
    assert samples["DCGM_FI_DEV_SM_CLOCK"].value > 0
