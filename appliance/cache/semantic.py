"""The semantic cache: recent cached prompts as embeddings, so that a differently worded question with the same
meaning gets the stored answer.

Prompts are grouped by context (`appliance.cache.keys.context_key`: partition, model version and everything in the
request but the compared prompt text); a lookup compares the prompt's embedding (L2-normalised, so the dot product
is the cosine similarity) with the group's and returns the exact-cache key of the best one at or above the
threshold. The index lives in memory and holds the most recent prompts over all groups; the answers stay in the
exact cache, so an entry cleared or evicted there is simply a miss here."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from appliance.rag.embeddings import EmbeddingService

Vector = npt.NDArray[np.float32]


class Embedder(Protocol):
    async def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """One float32 row per text, L2-normalised."""
        ...


class RagEmbedder:
    """The RAG embedding model (`appliance.rag.embeddings.EmbeddingService`: its own thread, its own cache of
    vectors keyed by text digest) as the semantic cache's `Embedder`."""

    def __init__(self, service: EmbeddingService) -> None:
        self.service = service

    async def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        return (await self.service.embed(texts)).vectors


class _Group:
    def __init__(self) -> None:
        self.keys: list[str] = []
        self.vectors: list[Vector] = []
        self._matrix: Vector | None = None

    def add(self, key: str, vector: Vector) -> None:
        self.remove(key)
        self.keys.append(key)
        self.vectors.append(vector)
        self._matrix = None

    def remove(self, key: str) -> None:
        if key in self.keys:
            i = self.keys.index(key)
            del self.keys[i], self.vectors[i]
            self._matrix = None

    def best(self, vector: Vector) -> tuple[str, float] | None:
        if not self.keys:
            return None
        if self._matrix is None:
            self._matrix = np.stack(self.vectors)
        scores = self._matrix @ vector
        i = int(np.argmax(scores))
        return self.keys[i], float(scores[i])


class SemanticIndex:
    """Recent prompts by context; at most `max_prompts` in all, the oldest going first."""

    def __init__(self, threshold: float, max_prompts: int) -> None:
        self.threshold = threshold
        self.max_prompts = max_prompts
        self._groups: dict[str, _Group] = {}
        self._order: OrderedDict[str, str] = OrderedDict()  # exact key -> context, oldest first

    def __len__(self) -> int:
        return len(self._order)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for g in self._groups.values() for v in g.vectors)

    def add(self, context: str, key: str, vector: Vector) -> int:
        """Index a prompt; returns how many of the oldest went to make room."""
        self.forget(key)
        self._groups.setdefault(context, _Group()).add(key, np.asarray(vector, dtype=np.float32))
        self._order[key] = context
        evicted = 0
        while len(self._order) > self.max_prompts:
            self.forget(next(iter(self._order)))
            evicted += 1
        return evicted

    def match(self, context: str, vector: Vector) -> tuple[str, float] | None:
        """The exact key of the closest prompt at or above the threshold, with its similarity."""
        group = self._groups.get(context)
        best = group.best(np.asarray(vector, dtype=np.float32)) if group else None
        return best if best is not None and best[1] >= self.threshold else None

    def forget(self, key: str) -> None:
        context = self._order.pop(key, None)
        if context is not None:
            group = self._groups[context]
            group.remove(key)
            if not group.keys:
                del self._groups[context]

    def forget_where(self, prefix: str) -> None:
        """Forget every prompt whose exact key starts with `prefix` (a partition, or a partition and model)."""
        for key in [k for k in self._order if k.startswith(prefix)]:
            self.forget(key)

    def clear(self) -> None:
        self._groups.clear()
        self._order.clear()
