"""The response cache as the composition root builds it: the exact cache, the semantic index on the RAG embedding
model when the settings turn it on, the privacy policy's `cache` surface, and its entries under retention."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from appliance.cache.policy import policy_digest, privacy_detector
from appliance.cache.retention import CacheEntriesStore
from appliance.cache.semantic import RagEmbedder
from appliance.cache.service import ResponseCacheService, build_cache_service, open_cache
from appliance.config import CacheSettings
from appliance.observability.metrics import Metrics

if TYPE_CHECKING:
    from appliance.privacy.controls import PrivacyControls
    from appliance.rag.embeddings import EmbeddingService


def build_response_cache(settings: CacheSettings, cache_root: Path, metrics: Metrics, *,
                         embeddings: EmbeddingService | None = None,
                         privacy: PrivacyControls | None = None) -> ResponseCacheService:
    embedder = RagEmbedder(embeddings) if embeddings is not None and settings.semantic else None
    detector = privacy_detector(privacy.privacy) if privacy is not None else None
    policy = policy_digest(privacy.privacy) if privacy is not None else None
    service = build_cache_service(settings, open_cache(settings, cache_root), metrics, embedder, detector, policy)
    if privacy is not None:
        privacy.retention.register(CacheEntriesStore(service))
    return service


def cache_entries(settings: CacheSettings, cache_root: Path) -> CacheEntriesStore:
    """The cache's entries for a retention run outside the server (`appliance privacy purge|erase|report`:
    `controls.retention.register(cache_entries(settings.cache, data.cache))`)."""
    return CacheEntriesStore(build_cache_service(settings, open_cache(settings, cache_root), Metrics()))
