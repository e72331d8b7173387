"""GPU paths: run on a box with an NVIDIA GPU, skipped elsewhere."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.engines.llamacpp import gpu_offload_supported
from appliance.engines.select import _probe_nvidia_smi, probe_gpus
from tests.integration.conftest import Running
from tests.integration.test_vllm_cpu import (  # noqa: F401 - fixtures shared with the CPU test of vLLM
    HF_MODEL,
    hf_template,
    vllm_build,
    vllm_processes,
    vllm_server,
)
from tests.server import DEFAULT_MODEL, appliance, clone_data_dir

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1500)]


def test_doctor_sees_the_gpu_and_routes_gguf_to_it(template_dir: Path, tmp_path: Path) -> None:
    out = appliance("doctor", data_dir=clone_data_dir(template_dir, tmp_path / "d")).stdout
    assert "none (NVIDIA driver not found)" not in out
    if gpu_offload_supported():
        assert f"{DEFAULT_MODEL} (default) (gguf" in out and "llamacpp on GPU" in out


def test_nvml_finds_what_nvidia_smi_lists() -> None:
    pytest.importorskip("pynvml", reason="the `gpu` extra (nvidia-ml-py) is not installed")
    gpus, listed = probe_gpus(), _probe_nvidia_smi()
    assert gpus and [(g.name, g.memory_mib) for g in gpus] == [(g.name, g.memory_mib) for g in listed]
    assert all(g.free_mib is not None and 0 <= g.free_mib <= g.memory_mib for g in gpus)


def test_default_model_serves_with_full_offload(server: Running) -> None:
    if not gpu_offload_supported():
        pytest.skip("llama.cpp was built without GPU offload; reinstall with CMAKE_ARGS=-DGGML_CUDA=on")
    reply = server.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None


def test_vllm_serves_the_folder_on_the_gpu(vllm_build: str, hf_template: Path, vllm_server: Running) -> None:  # noqa: F811
    if vllm_build != "cuda":
        pytest.skip("the engine environment holds vllm-cpu; rerun install.sh on the GPU box for upstream vllm")
    assert f"{HF_MODEL} (hf, 260 MiB) -> vllm on GPU" in appliance("doctor", data_dir=hf_template, check=False).stdout
    argv = " ".join(" ".join(p.cmdline()) for p in vllm_processes(vllm_server))
    assert "--gpu-memory-utilization" in argv and "--enforce-eager" not in argv
    used = subprocess.run([shutil.which("nvidia-smi") or "nvidia-smi", "--query-compute-apps=pid",
                           "--format=csv,noheader"], capture_output=True, text=True, check=True).stdout
    assert used.strip(), "vLLM should hold GPU memory"
    reply = vllm_server.client().chat.completions.create(
        model=HF_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
    assert reply.choices[0].message.content
