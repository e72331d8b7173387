"""Which engine serves a model: a function of (hardware, installed engines, model format)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mib: int


@dataclass(frozen=True)
class EngineChoice:
    engine: str
    device: str
    reason: str


def probe_gpus() -> list[Gpu]:
    """NVIDIA GPUs as nvidia-smi reports them; none when the tool or the driver is missing."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, mem = line.rpartition(",")
        if name:
            gpus.append(Gpu(name.strip(), int(float(mem))))
    return gpus


def choose_engine(model_format: str, gpus: list[Gpu], *, vllm_available: bool, llamacpp_gpu: bool) -> EngineChoice:
    if model_format == "hf":
        if gpus and vllm_available:
            return EngineChoice("vllm", f"GPU ({gpus[0].name})", "Hugging Face folder, NVIDIA GPU and vLLM present")
        missing = "no NVIDIA GPU" if not gpus else "vLLM is not installed (install the `gpu` extra)"
        return EngineChoice("none", "-", f"Hugging Face folders need vLLM on a GPU: {missing}; use a GGUF instead")
    if model_format == "gguf":
        if gpus and llamacpp_gpu:
            return EngineChoice("llamacpp", f"GPU ({gpus[0].name})", "GGUF, llama.cpp built with GPU offload")
        why = "no GPU" if not gpus else "llama.cpp was built without GPU support (reinstall with CMAKE_ARGS)"
        return EngineChoice("llamacpp", "CPU", f"GGUF on CPU: {why}")
    return EngineChoice("none", "-", f"unknown model format {model_format!r}")
