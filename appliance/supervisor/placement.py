"""Memory fit: before a model loads, estimate what it needs (weights + KV cache for its context + compute buffers,
from its GGUF metadata) and compare with what is free (RAM from psutil, an operator's budget); the pool evicts idle
models, least recently used first, or refuses with the numbers and what to do."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

import psutil

from appliance.config import UBATCH, LlamaCppSettings, ModelSettings
from appliance.errors import ModelUnavailable
from appliance.registry.gguf_check import GgufInfo

GIB = float(1 << 30)
CONTEXT_CAP = 8192  # the llama.cpp engine's cap when n_ctx = 0 (its trained length, at most this)
KV_BYTES = 2  # f16 K and V caches, llama.cpp's default
# the worker process (Python, llama-cpp-python, the scheduler) before any model: ~55 MiB measured, rounded up
BASE_OVERHEAD = 96 << 20
# Automatic slots (llamacpp.parallel = 0): the KV cache of all slots takes at most 1/KV_SHARE of the memory budget
# (models.memory_limit_bytes, else the box's RAM), leaving the rest to other models, RAG and the page cache. On a
# 24 GiB box that is 1.5 GiB: 8 slots of 8192 tokens for SmolLM2-135M (22.5 KiB of f16 KV per token).
KV_SHARE = 16
AUTO_PARALLEL_MIN = 4  # below this many slots the context is halved first (down to AUTO_CTX_MIN)
AUTO_PARALLEL_MAX = 16  # more slots than this add little throughput on a CPU and cost their KV buffers
AUTO_CTX_MIN = 2048


class InsufficientMemory(ModelUnavailable):
    """A model does not fit in the memory left, even after unloading every idle model."""

    code = "insufficient_memory"


@dataclass(frozen=True)
class MemoryNeed:
    weights: int
    kv_cache: int
    overhead: int
    on_gpu: bool = False
    """Weights and KV cache in GPU memory (llama.cpp offload, vLLM); the buffers stay in RAM either way."""
    parallel: int = 0
    """The slots (sequences) the estimate is for, as resolved from llamacpp.parallel (0: not a llama.cpp model)."""
    n_ctx: int = 0
    """The context per slot the estimate is for, in tokens (0: not a llama.cpp model)."""

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    def of(self, resource: str) -> int:
        """Bytes of `resource` ("RAM" or "GPU memory") this model takes."""
        if resource == "GPU memory":
            return self.weights + self.kv_cache if self.on_gpu else 0
        return self.overhead if self.on_gpu else self.total


@dataclass(frozen=True)
class Shortage:
    resource: str
    needed: int
    free: int


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if abs(n) >= GIB else f"{n / (1 << 20):.0f} MiB"


def kv_bytes_per_token(info: GgufInfo) -> int:
    """Bytes of f16 K and V cache one token takes over every layer's KV heads (grouped-query attention keeps
    fewer KV heads than query heads)."""
    layers = info.arch_int("block_count")
    embd = info.arch_int("embedding_length")
    heads = info.arch_int("attention.head_count", 1) or 1
    heads_kv = info.arch_int("attention.head_count_kv", heads) or heads
    head_k = info.arch_int("attention.key_length", embd // heads)
    head_v = info.arch_int("attention.value_length", embd // heads)
    return layers * heads_kv * (head_k + head_v) * KV_BYTES


def trained_context(info: GgufInfo) -> int:
    return min(info.arch_int("context_length", 4096) or 4096, CONTEXT_CAP)


def auto_slots(info: GgufInfo, budget: int, *, n_ctx: int = 0, parallel: int = 0) -> tuple[int, int]:
    """(parallel, n_ctx) for a llama.cpp model whose settings leave either at 0: as many slots of the context as
    1/KV_SHARE of `budget` holds (AUTO_PARALLEL_MAX at most); when fewer than AUTO_PARALLEL_MIN slots of the
    trained context fit, an automatic context is halved (not below AUTO_CTX_MIN) to serve more chats at once.
    A value the operator set is kept."""
    per_token = max(kv_bytes_per_token(info), 1)
    share = budget // KV_SHARE
    context = n_ctx or trained_context(info)
    if parallel:
        return parallel, context
    if not n_ctx:
        while context > AUTO_CTX_MIN and share // (context * per_token) < AUTO_PARALLEL_MIN:
            context //= 2
    slots = int(min(max(share // (context * per_token), 1), AUTO_PARALLEL_MAX))
    return slots, context


def estimate_gguf(info: GgufInfo, *, n_ctx: int = 0, parallel: int = 1, n_batch: int = 512) -> MemoryNeed:
    """What llama.cpp allocates for this model: its tensors, an f16 KV cache of parallel x n_ctx tokens over every
    layer's KV heads, and compute buffers (logits, activations) with a base for the worker process.

    Checked against the default model (n_ctx 8192, one sequence): estimated 372 MiB; a Python process that loaded
    it with llama-cpp-python and generated had 338 MiB resident (the estimate errs on the safe side)."""
    embd = info.arch_int("embedding_length")
    context = n_ctx or trained_context(info)
    kv = parallel * context * kv_bytes_per_token(info)
    tokens = info.metadata.get("tokenizer.ggml.tokens", 0)  # arrays are kept as their length
    vocab = info.arch_int("vocab_size") or (tokens if isinstance(tokens, int) else 0)
    ubatch = min(n_batch, UBATCH)  # llama.cpp computes a batch in micro-batches of at most this many tokens
    compute = parallel * vocab * 8 + ubatch * embd * 16 + BASE_OVERHEAD  # logits + sampling, activations
    return MemoryNeed(info.tensor_bytes, kv, compute, parallel=parallel, n_ctx=context)


def _llamacpp_offloads() -> bool:
    from appliance.engines.llamacpp import gpu_offload_supported

    return gpu_offload_supported()


def system_free_ram() -> int:
    return int(psutil.virtual_memory().available)


def system_total_ram() -> int:
    return int(psutil.virtual_memory().total)


class ModelRecordLike(Protocol):
    @property
    def sha256(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def size_bytes(self) -> int: ...


class GgufMemoryEstimator:
    """The need of a registered model, from its GGUF header (read through the store, so it works on encrypted
    blobs: only the first segments are decrypted). Cached per digest: a file's header never changes."""

    def __init__(self, find: Callable[[str], ModelRecordLike], read_header: Callable[[str, int], GgufInfo],
                 llamacpp: LlamaCppSettings, gpu: Callable[[], bool] = lambda: False,
                 budget: Callable[[], int] = system_total_ram) -> None:
        self.find = find
        self.read_header = read_header  # (sha256, size) -> the GGUF's header: ModelStore.gguf_header
        self.llamacpp = llamacpp
        self.gpu = gpu
        self.budget = budget  # the memory that automatic slots are sized from (models.memory_limit_bytes or RAM)
        self._headers: dict[str, GgufInfo] = {}

    async def __call__(self, name: str, parallel: int) -> MemoryNeed:
        """The need of model `name` with `parallel` slots (0: sized by `auto_slots`; the need says how many)."""
        record = self.find(name)
        if record.format == "remote":
            return MemoryNeed(0, 0, 0)
        if record.format != "gguf":  # a folder for vLLM, which sizes its own cache: count what is stored
            return MemoryNeed(record.size_bytes, 0, BASE_OVERHEAD, on_gpu=self.gpu())
        info = self._headers.get(record.sha256)
        if info is None:
            info = await asyncio.to_thread(self.read_header, record.sha256, record.size_bytes)
            self._headers[record.sha256] = info
        parallel, n_ctx = auto_slots(info, self.budget(), n_ctx=self.llamacpp.n_ctx, parallel=parallel)
        need = estimate_gguf(info, n_ctx=n_ctx, parallel=parallel, n_batch=self.llamacpp.n_batch)
        # offloaded layers (any: a partial offload is counted as whole, the safe side for the GPU)
        return replace(need, on_gpu=self.llamacpp.n_gpu_layers != 0 and self.gpu() and _llamacpp_offloads())


def system_free_vram() -> int | None:
    """Free memory over every NVIDIA GPU (NVML or nvidia-smi); None without a GPU."""
    from appliance.engines.select import probe_gpus

    gpus = [g for g in probe_gpus() if g.free_mib is not None]
    return sum(g.free_mib or 0 for g in gpus) << 20 if gpus else None


class Placement:
    """Decides whether a model fits next to the loaded ones. `estimate(name, parallel)` is awaited for the need;
    `free_ram()` / `free_vram()` say what the system has free now (fakes in unit tests; psutil and NVML here)."""

    def __init__(self, models: ModelSettings, estimate: Callable[[str, int], Awaitable[MemoryNeed]],
                 free_ram: Callable[[], int] = system_free_ram,
                 free_vram: Callable[[], int | None] = system_free_vram) -> None:
        self.models = models
        self.estimate = estimate
        self.free_ram = free_ram
        self.free_vram = free_vram

    async def need(self, name: str, parallel: int) -> MemoryNeed:
        return await self.estimate(name, parallel)

    def shortage(self, need: MemoryNeed, held: Iterable[MemoryNeed], loading: Iterable[MemoryNeed]
                 ) -> Shortage | None:
        """What is short for `need` next to the models `held` (of which `loading` have not taken their memory yet),
        or None when it fits: RAM less the headroom, GPU memory, and the operator's budget over both."""
        held, loading = list(held), list(loading)
        checks = [("RAM", self.free_ram() - self.models.memory_headroom_bytes)]
        if need.on_gpu and (vram := self.free_vram()) is not None:
            checks.append(("GPU memory", vram))
        for resource, free in checks:
            free -= sum(n.of(resource) for n in loading)
            if need.of(resource) > free:
                return Shortage(resource, need.of(resource), free)
        if self.models.memory_limit_bytes:
            free = self.models.memory_limit_bytes - sum(n.total for n in held)
            if need.total > free:
                return Shortage("memory", need.total, free)
        return None

    def refusal(self, name: str, need: MemoryNeed, short: Shortage, others: Iterable[str]) -> InsufficientMemory:
        loaded = sorted(others)
        unload = (f"unload {', '.join(repr(o) for o in loaded)} (busy or pinned now)" if loaded
                  else "free memory on the box")
        budget = (f" (models.memory_limit_bytes = {gib(self.models.memory_limit_bytes)})"
                  if short.resource == "memory" else "")
        parts = f"weights {gib(need.weights)}, KV cache {gib(need.kv_cache)}, buffers {gib(need.overhead)}"
        return InsufficientMemory(
            f"model '{name}' needs {gib(short.needed)} of {short.resource} ({parts}) but {gib(max(short.free, 0))} "
            f"is free{budget}; {unload}, lower the context (llamacpp.n_ctx) or pick a smaller quantization",
            param="model")
