"""The vLLM engine: Hugging Face model folders served by `vllm serve` on an NVIDIA GPU.

vLLM's pins conflict with ours, so it usually runs from its own environment (`vllm.python`). It binds its
own Unix socket inside the private run directory (0700), which keeps every other user of the box out."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from appliance.config import VllmSettings
from appliance.supervisor.process import LaunchSpec


class VllmEngine:
    name = "vllm"

    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings

    @property
    def python(self) -> str:
        return self.settings.python or sys.executable

    def available(self) -> bool:
        """True when the configured interpreter can import vllm (checked without importing it here)."""
        if not shutil.which(self.python) and not Path(self.python).is_file():
            return False
        probe = subprocess.run([self.python, "-c", "import importlib.util,sys;"
                                "sys.exit(importlib.util.find_spec('vllm') is None)"],
                               capture_output=True, check=False, timeout=30)
        return probe.returncode == 0

    def launch(self, model_dir: Path, model_name: str, socket_path: Path) -> LaunchSpec:
        s = self.settings
        argv = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--served-model-name", model_name, "--uds", str(socket_path),
                "--gpu-memory-utilization", str(s.gpu_memory_utilization), "--disable-log-requests",
                *s.extra_args]
        return LaunchSpec(argv, env={"VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}, inherit_socket=False)
