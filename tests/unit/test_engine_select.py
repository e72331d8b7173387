"""Engine choice from (hardware, installed engines, model format), and the llama.cpp worker command line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from appliance.config import LlamaCppSettings, VllmSettings, physical_cores
from appliance.engines.llamacpp import WORKER_MODULE, LlamaCppEngine, gpu_offload_supported
from appliance.engines.select import Gpu, choose_engine
from appliance.engines.vllm import VllmEngine

H100 = Gpu("NVIDIA H100 80GB HBM3", 81559)


def test_gguf_on_cpu() -> None:
    choice = choose_engine("gguf", [], vllm_available=True, llamacpp_gpu=True)
    assert (choice.engine, choice.device) == ("llamacpp", "CPU")
    assert "no GPU" in choice.reason


def test_gguf_with_gpu_and_gpu_build() -> None:
    choice = choose_engine("gguf", [H100], vllm_available=False, llamacpp_gpu=True)
    assert choice.engine == "llamacpp"
    assert choice.device == f"GPU ({H100.name})"


def test_gguf_with_gpu_but_cpu_only_build() -> None:
    choice = choose_engine("gguf", [H100], vllm_available=True, llamacpp_gpu=False)
    assert (choice.engine, choice.device) == ("llamacpp", "CPU")
    assert "without GPU support" in choice.reason


def test_hf_without_gpu_cannot_run() -> None:
    choice = choose_engine("hf", [], vllm_available=True, llamacpp_gpu=False)
    assert choice.engine == "none"
    assert "no NVIDIA GPU" in choice.reason and "GGUF" in choice.reason


def test_hf_with_gpu_but_no_vllm_cannot_run() -> None:
    choice = choose_engine("hf", [H100], vllm_available=False, llamacpp_gpu=True)
    assert choice.engine == "none"
    assert "vLLM is not installed" in choice.reason


def test_hf_with_gpu_and_vllm() -> None:
    choice = choose_engine("hf", [H100, Gpu("second", 1024)], vllm_available=True, llamacpp_gpu=False)
    assert (choice.engine, choice.device) == ("vllm", f"GPU ({H100.name})")


def test_unknown_format() -> None:
    assert choose_engine("onnx", [H100], vllm_available=True, llamacpp_gpu=True).engine == "none"


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_llamacpp_launch_defaults() -> None:
    spec = LlamaCppEngine(LlamaCppSettings()).launch(Path("/data/models/sha256-abc"), "smol")
    argv = list(spec.argv)
    assert argv[:3] == [sys.executable, "-m", WORKER_MODULE]
    assert option(argv, "--fd") == "{fd}"  # replaced by the inherited socket's descriptor at spawn
    assert option(argv, "--threads") == str(physical_cores())
    assert option(argv, "--model") == "/data/models/sha256-abc"
    assert option(argv, "--name") == "smol"
    assert option(argv, "--n-ctx") == "0" and option(argv, "--n-batch") == "512"
    assert option(argv, "--n-gpu-layers") == ("-1" if gpu_offload_supported() else "0")
    assert "--flash-attn" in argv
    assert spec.inherit_socket


def test_llamacpp_launch_follows_settings() -> None:
    settings = LlamaCppSettings(threads=3, n_ctx=2048, n_batch=64, n_gpu_layers=10, flash_attn=False,
                                python="/opt/llama/bin/python")
    argv = list(LlamaCppEngine(settings).launch(Path("/m.gguf"), "m").argv)
    assert argv[0] == "/opt/llama/bin/python"
    assert option(argv, "--threads") == "3"
    assert option(argv, "--n-ctx") == "2048" and option(argv, "--n-batch") == "64"
    assert "--flash-attn" not in argv


@pytest.mark.skipif(gpu_offload_supported(), reason="checks the CPU-only build of llama.cpp")
def test_cpu_build_never_asks_for_gpu_layers() -> None:
    argv = list(LlamaCppEngine(LlamaCppSettings(n_gpu_layers=99)).launch(Path("/m.gguf"), "m").argv)
    assert option(argv, "--n-gpu-layers") == "0"


def test_vllm_launch_binds_its_own_socket_offline() -> None:
    settings = VllmSettings(python="/opt/vllm/bin/python", gpu_memory_utilization=0.5, extra_args=["--x", "1"])
    spec = VllmEngine(settings).launch(Path("/models/qwen"), "qwen", Path("/run/w.sock"))
    argv = list(spec.argv)
    assert argv[0] == "/opt/vllm/bin/python"
    assert option(argv, "--uds") == "/run/w.sock"
    assert option(argv, "--served-model-name") == "qwen"
    assert option(argv, "--gpu-memory-utilization") == "0.5"
    assert argv[-2:] == ["--x", "1"]
    assert not spec.inherit_socket
    assert spec.env["HF_HUB_OFFLINE"] == "1"
