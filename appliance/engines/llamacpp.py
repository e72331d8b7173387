"""The llama.cpp engine: GGUF files served by `appliance.engines.llamacpp_worker` on CPU or offloaded to a GPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from appliance.config import LlamaCppSettings, physical_cores
from appliance.supervisor.placement import AUTO_PARALLEL_MIN, MemoryNeed
from appliance.supervisor.process import LaunchSpec

WORKER_MODULE = "appliance.engines.llamacpp_worker"


def gpu_offload_supported() -> bool:
    """Whether the installed llama.cpp was built with a GPU backend (CUDA, Vulkan, Metal ...)."""
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


class LlamaCppEngine:
    name = "llamacpp"

    def __init__(self, settings: LlamaCppSettings) -> None:
        self.settings = settings

    @property
    def threads(self) -> int:
        return self.settings.threads or physical_cores()

    def launch(self, model_path: Path, model_name: str, sized: MemoryNeed | None = None) -> LaunchSpec:
        """The worker's command; `sized`: placement's estimate, whose slots and context replace automatic (0)
        settings (without one, automatic slots are AUTO_PARALLEL_MIN)."""
        s = self.settings
        parallel = s.parallel or (sized.parallel if sized is not None and sized.parallel else AUTO_PARALLEL_MIN)
        n_ctx = s.n_ctx or (sized.n_ctx if sized is not None else 0)
        gpu_layers = s.n_gpu_layers if gpu_offload_supported() else 0
        argv = [s.python or sys.executable, "-m", WORKER_MODULE, "--fd", "{fd}", "--parent-pid", str(os.getpid()),
                "--model", str(model_path), "--name", model_name, "--threads", str(self.threads),
                "--n-ctx", str(n_ctx), "--n-batch", str(s.n_batch), "--n-gpu-layers", str(gpu_layers),
                "--parallel", str(parallel), "--stream-interval-ms", str(s.stream_interval_ms),
                "--lookup-draft", str(s.lookup_draft), "--lookup", s.lookup]
        if s.flash_attn:
            argv.append("--flash-attn")
        return LaunchSpec(argv)
