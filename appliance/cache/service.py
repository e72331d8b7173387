"""Step 6 of the request path: look a request up in the response cache, and store its answer afterwards.

What is cached: deterministic requests (temperature 0, or a fixed seed) unless the client says `no-store` (body
`"cache": "no-store"`, header `x-cache: no-store` or `Cache-Control: no-store`); a non-deterministic one only when
the client opts in (`"cache": "store"` or `x-cache: store`). An answer is stored only when it completed and the
privacy policy's cache surface allows the request's texts (`appliance.cache.policy.may_cache`). Never cached,
whatever the client says: n > 1 (an entry holds one choice, and n samples are asked for to differ) and logprobs
(an entry holds no logprobs, and a replay must not drop them).

Quotas: a hit is a request like any other (it counts against requests per minute) but is charged no tokens, since
no model ran; its usage still reports the original token counts, with the whole prompt as
`prompt_tokens_details.cached_tokens`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from appliance.cache import keys, replay
from appliance.cache.policy import Detector, may_cache
from appliance.cache.response import CacheReport, Entry, ResponseCache, open_response_cache
from appliance.cache.semantic import Embedder, SemanticIndex, Vector
from appliance.config import CacheSettings
from appliance.logs import get_logger
from appliance.observability.metrics import Metrics

log = get_logger(__name__)
_decoder = msgspec.json.Decoder()
CacheKind = Literal["exact", "semantic"]


class CacheLookup:
    """One request's dealings with the cache: the entry to replay on a hit, else how to store the answer."""

    def __init__(self, service: ResponseCacheService | None = None, *, key: str = "", context: str = "",
                 vector: Vector | None = None, partition: str = "", model_sha256: str = "", chat: bool = True,
                 texts: list[str] | None = None, entry: Entry | None = None, owner: str = "") -> None:
        self.service = service
        self.key = key
        self.context = context
        self.vector = vector
        self.partition = partition
        self.model_sha256 = model_sha256
        self.chat = chat
        self.texts = texts or []
        self.entry = entry
        self.owner = owner
        self.served = ""  # the version (`name@N`) the request was routed to; kept with what it stores

    @property
    def records(self) -> bool:
        """Whether the answer is to be stored (a miss of a cacheable request)."""
        return self.service is not None and self.entry is None and bool(self.key)

    @property
    def headers(self) -> dict[str, str]:
        if self.service is None:
            return {}
        return {"x-cache": "hit" if self.entry is not None else "miss"}

    def whole(self, model: str) -> bytes:
        assert self.entry is not None
        return replay.whole_body(self.entry, model)

    async def stream(self, model: str, include_usage: bool) -> AsyncIterator[bytes]:
        assert self.entry is not None
        for events in replay.stream_events(self.entry, model, include_usage):
            yield events

    def store_whole(self, body: bytes) -> None:
        if self.records:
            self._store(replay.entry_from_whole(body, chat=self.chat, partition=self.partition,
                                                model_sha256=self.model_sha256))

    async def recorded(self, events: AsyncIterator[bytes], include_usage: bool) -> AsyncIterator[bytes]:
        """Relay a streamed miss (asked upstream with usage) and store it once it completed; the usage chunk is
        passed on only when the client asked for it."""
        seen: list[bytes] = []
        stored = False
        async for data in events:
            seen.append(data)
            if not stored and data.rstrip().endswith(b"data: [DONE]"):  # before the client can see the end and ask
                stored = True  # again: the same question right after gets the stored answer
                self._store(self._entry(seen))
            yield data if include_usage else b"".join(_without_usage_chunk(data))
        if not stored:  # cut short (an error, a disconnect): counted as incomplete
            self._store(self._entry(seen))

    def _entry(self, seen: list[bytes]) -> Entry | None:
        return replay.entry_from_stream(b"".join(seen), chat=self.chat, partition=self.partition,
                                        model_sha256=self.model_sha256)

    def _store(self, entry: Entry | None) -> None:
        assert self.service is not None
        self.service.store(self, entry)


NO_CACHE = CacheLookup()


def _without_usage_chunk(data: bytes) -> Iterator[bytes]:
    if b'"usage"' not in data:
        yield data
        return
    for event in data.split(b"\n\n"):
        if not event:
            continue
        if event.startswith(b"data: {") and b'"usage"' in event:
            chunk = _decoder.decode(event[6:])
            if chunk.get("usage") and not chunk.get("choices"):
                continue
        yield event + b"\n\n"


class ResponseCacheService:
    """The exact cache, the optional semantic index and the policy, with their metrics."""

    def __init__(self, cache: ResponseCache, metrics: Metrics, *, shared_roles: Collection[str] = (),
                 semantic: SemanticIndex | None = None, embedder: Embedder | None = None,
                 detector: Detector | None = None, policy: Callable[[], str] | None = None) -> None:
        self.cache = cache
        self.policy = policy or (lambda: "")  # the privacy policy in force, as part of every key
        self.metrics = metrics
        self.shared_roles = frozenset(shared_roles)
        self.semantic = semantic if embedder is not None else None
        self.embedder = embedder
        self.detector = detector
        metrics.cache_bytes.labels("exact").set_function(cache.volume)
        metrics.cache_entries.labels("exact").set_function(lambda: len(cache))
        if self.semantic is not None:
            index = self.semantic
            metrics.cache_bytes.labels("semantic").set_function(lambda: index.nbytes)
            metrics.cache_entries.labels("semantic").set_function(lambda: len(index))

    async def lookup(self, body: Mapping[str, Any], *, chat: bool, model_sha256: str, principal: Any,
                     directive: keys.Directive | None = None,
                     rag_versions: Mapping[str, int] | None = None) -> CacheLookup:
        """The cached answer for this request (upstream body), or a lookup that stores the coming answer. A cache
        that fails (a full disk, a locked database, an embedder error) is a miss, never a failed request."""
        try:
            return await self._lookup(body, chat, model_sha256, principal, directive, rag_versions)
        except Exception as exc:
            log.warning("cache.lookup_failed", error_type=type(exc).__name__)  # no text: it could quote a prompt
            return CacheLookup(self)

    async def _lookup(self, body: Mapping[str, Any], chat: bool, model_sha256: str, principal: Any,
                      directive: keys.Directive | None, rag_versions: Mapping[str, int] | None) -> CacheLookup:
        started = time.perf_counter()
        reason = self._skip_reason(body, directive)
        if reason is not None:
            self.metrics.cache_skipped.labels(reason).inc()
            return CacheLookup(self)
        partition = keys.partition_of(principal, self.shared_roles)
        key = keys.cache_key(model_sha256, body, partition, chat=chat, rag_versions=rag_versions,
                             policy=self.policy())
        lookup = CacheLookup(self, key=key, partition=partition, model_sha256=model_sha256, chat=chat,
                             texts=keys.request_texts(body), owner=getattr(principal, "subject", ""))
        entry = self.cache.get(key)
        kind: CacheKind = "exact"
        if entry is None:
            self.metrics.cache_misses.labels("exact").inc()
            if self.semantic is not None:
                kind = "semantic"
                entry = await self._semantic(lookup, body, rag_versions)
        if entry is not None and entry.partition == partition and entry.model_sha256 == model_sha256:
            lookup.entry = entry
            self.metrics.cache_hits.labels(kind).inc()
            self.metrics.cache_hit_seconds.labels(kind).observe(time.perf_counter() - started)
        return lookup

    @staticmethod
    def _skip_reason(body: Mapping[str, Any], directive: keys.Directive | None) -> str | None:
        if (body.get("n") or 1) > 1:
            return "n"
        if body.get("logprobs") not in (None, False):  # the legacy completions' logprobs=0 asks for them too
            return "logprobs"
        if directive == "no-store":
            return "no-store"
        if directive != "store" and not keys.is_deterministic(body):
            return "nondeterministic"
        return None

    async def _semantic(self, lookup: CacheLookup, body: Mapping[str, Any],
                        rag_versions: Mapping[str, int] | None) -> Entry | None:
        assert self.semantic is not None and self.embedder is not None
        lookup.context = keys.context_key(lookup.model_sha256, body, lookup.partition, chat=lookup.chat,
                                          rag_versions=rag_versions, policy=self.policy())
        lookup.vector = (await self.embedder.embed([keys.prompt_text(body)]))[0]
        match = self.semantic.match(lookup.context, lookup.vector)
        if match is None:
            self.metrics.cache_misses.labels("semantic").inc()
            return None
        entry = self.cache.get(match[0])
        if entry is None:  # cleared or evicted from the exact cache since
            self.semantic.forget(match[0])
            self.metrics.cache_misses.labels("semantic").inc()
        return entry

    def store(self, lookup: CacheLookup, entry: Entry | None) -> None:
        """Keep a completed answer, unless the privacy policy says no."""
        if entry is None:
            self.metrics.cache_skipped.labels("incomplete").inc()
            return
        if not may_cache(lookup.texts, self.detector):
            self.metrics.cache_skipped.labels("privacy").inc()
            return
        try:
            kept = msgspec.structs.replace(entry, owner=lookup.owner, served=lookup.served)
            evicted = self.cache.put(lookup.key, kept)
        except Exception as exc:
            log.warning("cache.store_failed", error_type=type(exc).__name__)
            return
        if evicted:
            self.metrics.cache_evictions.labels("exact").inc(evicted)
        if self.semantic is not None and lookup.vector is not None:
            if evicted := self.semantic.add(lookup.context, lookup.key, lookup.vector):
                self.metrics.cache_evictions.labels("semantic").inc(evicted)

    def clear(self, partition: str | None = None) -> int:
        if self.semantic is not None:
            if partition is None:
                self.semantic.clear()
            else:
                self.semantic.forget_where(partition + "/")
        return self.cache.clear(partition)

    def erase_partition(self, subject: str) -> int:
        return self.clear(subject)

    def erase_owner(self, owners: Collection[str]) -> int:
        return self.cache.erase_owner(owners)

    def purge_older_than(self, seconds: float) -> int:
        return self.cache.purge_older_than(seconds)

    def drop_model(self, model_sha256: str) -> int:
        if self.semantic is not None:
            for key in [k for k in self.cache.keys() if keys.key_model(k) == model_sha256]:
                self.semantic.forget(key)
        return self.cache.drop_model(model_sha256)

    def report(self) -> CacheReport:
        return self.cache.report()

    def close(self) -> None:
        self.cache.close()


def open_cache(settings: CacheSettings, cache_root: Path) -> ResponseCache:
    """The response cache of a data dir (`DataDir.cache`), as the settings size it."""
    return open_response_cache(cache_root, settings.size_limit_mb, settings.ttl)


def build_cache_service(settings: CacheSettings, cache: ResponseCache, metrics: Metrics,
                        embedder: Embedder | None = None, detector: Detector | None = None,
                        policy: Callable[[], str] | None = None) -> ResponseCacheService:
    """The gateway's cache step; the semantic index only when the settings turn it on and an embedder is there."""
    semantic = None
    if settings.semantic:
        if embedder is None:
            log.warning("cache.semantic_unavailable", reason="no embedding model; only exact hits are served")
        else:
            semantic = SemanticIndex(settings.semantic_threshold, settings.semantic_max_prompts)
    return ResponseCacheService(cache, metrics, shared_roles=settings.shared_roles, semantic=semantic,
                                embedder=embedder, detector=detector, policy=policy)
