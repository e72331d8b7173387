"""The response cache's parts: keys and partitions, the diskcache store (bytes only, never pickled), eviction and
retention, the replayed response shapes, and the privacy default."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import diskcache
import msgspec
import pytest

from appliance.auth.keys import Principal
from appliance.auth.sessions import SessionPrincipal
from appliance.cache import keys, replay
from appliance.cache.disk import PAGE_CACHE_PAGES, Cache
from appliance.cache.policy import may_cache, no_pii, policy_digest, privacy_detector
from appliance.cache.response import Entry, PickleRefused, ResponseCache, open_response_cache
from appliance.engines.llamacpp_runtime import Piece, Usage
from appliance.engines.llamacpp_worker import CompletionFormat
from appliance.gateway.schemas import ChatCompletionRequest, decode_request, upstream_body
from appliance.privacy.policy import SHIPPED_PRIVACY, parse_policy
from appliance.privacy.service import Privacy

SHA = "a" * 64


def body_of(**fields: object) -> dict[str, object]:
    request = decode_request(msgspec.json.encode({"model": "smol", "messages": [{"role": "user", "content": "Hi"}],
                                                  **fields}), ChatCompletionRequest)
    return upstream_body(request)


def key_of(body: dict[str, object], partition: str = "user:u1", sha: str = SHA, **kw: object) -> str:
    return keys.cache_key(sha, body, partition, chat=True, **kw)  # type: ignore[arg-type]


def test_key_ignores_user_stream_alias_and_cache_directive() -> None:
    base = key_of(body_of(temperature=0))
    assert key_of(body_of(temperature=0, user="alice", stream=True, stream_options={"include_usage": True},
                          cache="store")) == base
    assert key_of({**body_of(temperature=0), "model": "another-alias"}) == base
    assert key_of(body_of(temperature=0.0, max_tokens=None)) == base


@pytest.mark.parametrize("change", [
    {"temperature": 0, "max_tokens": 5}, {"temperature": 0, "seed": 1}, {"temperature": 0, "stop": ["x"]},
    {"temperature": 0, "top_k": 1}, {"temperature": 0, "messages": [{"role": "user", "content": "Hi!"}]},
    {"temperature": 0, "messages": [{"role": "system", "content": "Hi"}]},
    {"temperature": 0, "response_format": {"type": "text"}},
])
def test_key_follows_everything_that_changes_the_answer(change: dict[str, object]) -> None:
    assert key_of(body_of(**change)) != key_of(body_of(temperature=0))


def test_key_separates_partitions_model_versions_and_rag_versions() -> None:
    body = body_of(temperature=0)
    base = key_of(body)
    assert key_of(body, partition="user:u2") != base
    assert key_of(body, sha="b" * 64) != base
    assert key_of(body, rag_versions={"docs": 1}) != base
    assert key_of(body, rag_versions={"docs": 2}) != key_of(body, rag_versions={"docs": 1})
    assert keys.key_partition(base) == "user:u1" and keys.key_model(base) == SHA
    assert keys.cache_key(SHA, {"prompt": "Hi", "temperature": 0}, "user:u1", chat=False) != base


def test_partition_is_the_user_else_the_key_else_a_shared_role() -> None:
    own_key = Principal(key_id="k1", name="n", role="user", owner_user_id="u1")
    service_key = Principal(key_id="k2", name="n", role="user")
    session = SessionPrincipal(user_id="u1", name="alice", role="user", session_id="s", csrf_token="c")
    assert keys.partition_of(own_key) == keys.partition_of(session) == "user:u1"
    assert keys.partition_of(service_key) == "key:k2"
    assert keys.partition_of(service_key, shared_roles=["user"]) == "role:user"
    assert keys.partition_of(Principal(key_id="k3", name="n", role="admin"), shared_roles=["user"]) == "key:k3"


def test_directive_from_body_and_headers() -> None:
    assert keys.directive_of(None, {}) is None
    assert keys.directive_of("store", {}) == "store"
    assert keys.directive_of(None, {"x-cache": "Store"}) == "store"
    assert keys.directive_of(None, {"cache-control": "max-age=0, no-store"}) == "no-store"
    assert keys.directive_of("store", {"x-cache": "no-store"}) == "no-store"  # no-store anywhere wins


def test_only_greedy_or_seeded_requests_are_deterministic() -> None:
    assert keys.is_deterministic(body_of(temperature=0))
    assert keys.is_deterministic(body_of(temperature=0.8, seed=7))
    assert not keys.is_deterministic(body_of())
    assert not keys.is_deterministic(body_of(temperature=0.2))


def entry(text: str = "Hello there, friend.", partition: str = "user:u1", sha: str = SHA, chat: bool = True) -> Entry:
    return Entry(chat, text, "stop", 12, 4, time.time(), partition, sha)


@pytest.fixture
def cache(tmp_path: Path) -> ResponseCache:
    with open_response_cache(tmp_path / "cache", 64, ttl=0) as opened:
        yield opened  # type: ignore[misc]


def test_directory_is_private_and_values_are_stored_as_raw_bytes_never_pickled(cache: ResponseCache) -> None:
    big = entry("x" * 100_000)  # above diskcache's file threshold: stored in a file of its own
    cache.put("user:u1/" + SHA + "/1", entry())
    cache.put("user:u1/" + SHA + "/2", big)
    assert (cache.directory.stat().st_mode & 0o777) == 0o700
    with sqlite3.connect(cache.directory / "cache.db") as conn:
        rows = conn.execute("SELECT key, raw, mode, value, filename FROM Cache ORDER BY key").fetchall()
    assert [(r[0], r[1]) for r in rows] == [("user:u1/" + SHA + "/1", 1), ("user:u1/" + SHA + "/2", 1)]
    assert [r[2] for r in rows] == [diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY]  # never MODE_PICKLE
    stored = [bytes(rows[0][3]), (cache.directory / rows[1][4]).read_bytes()]
    assert [msgspec.msgpack.decode(raw, type=Entry).text for raw in stored] == [entry().text, big.text]
    assert all(not raw.startswith(b"\x80") for raw in stored)  # no pickle protocol header


def test_objects_are_refused_rather_than_pickled_and_pickles_are_never_read(cache: ResponseCache) -> None:
    raw = cache._cache  # the diskcache underneath, as a careless caller would use it
    with pytest.raises(PickleRefused):
        raw.set("k", {"an": "object"})
    with pytest.raises(PickleRefused):
        raw.set(("tuple", "key"), b"bytes")
    cache.put("user:u1/" + SHA + "/1", entry())
    with sqlite3.connect(cache.directory / "cache.db") as conn:  # an attacker rewrites the row as a pickle
        conn.execute("UPDATE Cache SET mode = ?", (diskcache.core.MODE_PICKLE,))
    with pytest.raises(PickleRefused):
        cache.get("user:u1/" + SHA + "/1")


def test_damaged_value_is_a_miss_and_goes(cache: ResponseCache) -> None:
    cache._cache.set("user:u1/" + SHA + "/1", b"not msgpack of an entry")
    assert cache.get("user:u1/" + SHA + "/1") is None
    assert len(cache) == 0


def test_least_recently_used_entries_go_first_at_the_size_limit(tmp_path: Path) -> None:
    limit = 256 * 1024
    with ResponseCache(tmp_path / "lru", size_limit_bytes=limit) as small:
        small.put("p/m/keep", entry("k" * 2000))
        evicted = 0
        for i in range(400):  # about 800 KB written into 256 KiB
            assert small.get("p/m/keep") is not None  # used before every write: it stays, unused ones go
            evicted += small.put(f"p/m/{i}", entry(f"{i:04d}" * 500))
        assert small.get("p/m/keep") is not None
        assert small.get("p/m/0") is None and small.get("p/m/399") is not None
        assert evicted >= 200 and small.evictions == evicted and len(small) == 401 - evicted
        assert small.volume() <= limit + 64 * 1024


def test_ttl_expires_entries(tmp_path: Path) -> None:
    with ResponseCache(tmp_path / "ttl", size_limit_bytes=2**20, ttl=1e-9) as short:
        short.put("p/m/1", entry())
        assert short.get("p/m/1") is None


def test_clear_erase_drop_model_and_retention(cache: ResponseCache) -> None:
    for partition in ("user:u1", "user:u2", "key:k1"):
        for sha in (SHA, "b" * 64):
            cache.put(f"{partition}/{sha}/x", entry(partition=partition, sha=sha))
    report = cache.report()
    assert report.entries == 6 and report.partitions == {"user:u1": 2, "user:u2": 2, "key:k1": 2}
    assert report.oldest_age_seconds is not None and report.oldest_age_seconds < 60
    assert cache.erase_partition("user:u1") == 2
    assert cache.drop_model("b" * 64) == 2
    assert sorted(cache.keys()) == [f"key:k1/{SHA}/x", f"user:u2/{SHA}/x"]
    assert cache.purge_older_than(3600) == 0
    assert cache.purge_older_than(0) == 2
    assert cache.clear() == 0 and len(cache) == 0


def test_cache_is_shared_between_processes_opening_the_same_directory(tmp_path: Path) -> None:
    with open_response_cache(tmp_path, 64, 0) as server, open_response_cache(tmp_path, 64, 0) as cli:
        server.put("user:u1/m/1", entry())
        assert cli.clear("user:u1") == 1
        assert server.get("user:u1/m/1") is None


@pytest.mark.parametrize("store", ["response", "embedding"])
def test_every_connection_of_a_cache_keeps_its_memory_bounded(tmp_path: Path, store: str) -> None:
    """diskcache's defaults (32 MiB of SQLite pages and a 64 MiB map per connection) made the server's memory grow
    with every entry until those filled; each thread has its own connection, so it is checked on a second thread."""
    cache = ResponseCache(tmp_path, size_limit_bytes=2**26)._cache if store == "response" else Cache(tmp_path, "x")
    with cache:
        here = (cache._sql("PRAGMA cache_size").fetchone()[0], cache._sql("PRAGMA mmap_size").fetchone()[0])
        with ThreadPoolExecutor(1) as other:
            there = other.submit(lambda: (cache._sql("PRAGMA cache_size").fetchone()[0],
                                          cache._sql("PRAGMA mmap_size").fetchone()[0])).result()
    assert here == there == (PAGE_CACHE_PAGES, 0)


def events_of(data: bytes) -> list[dict[str, object]]:
    return [msgspec.json.decode(e[6:]) for e in data.split(b"\n\n") if e.startswith(b"data: {")]


def shape(obj: object) -> object:
    """Keys and value types, recursively: what a client's parser depends on."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shape(v) for v in obj[:1]]
    return type(obj).__name__


@pytest.mark.parametrize("chat", [True, False])
def test_replayed_stream_has_the_workers_chunk_shape(chat: bool) -> None:
    fmt = CompletionFormat(chat, "smol")
    worker = [fmt.chunk(Piece("Hello"), first=True, with_usage_field=True),
              fmt.chunk(Piece(" there"), with_usage_field=True),
              fmt.chunk(Piece(" friend"), with_usage_field=True),
              fmt.chunk(Piece("", "stop"), with_usage_field=True),
              fmt.chunk(None, usage=Usage(12, 3))]
    replayed = events_of(b"".join(replay.stream_events(entry("Hello there friend", chat=chat), "smol", True)))
    expected = events_of(b"".join(worker))
    assert [shape(e) for e in replayed[:-1]] == [shape(e) for e in expected[:-1]]
    usage = replayed[-1]["usage"]
    assert shape({**replayed[-1], "usage": None}) == shape({**expected[-1], "usage": None})
    assert usage == {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16,
                     "prompt_tokens_details": {"cached_tokens": 12}}
    whole = msgspec.json.decode(replay.whole_body(entry("Hello there.", chat=chat), "smol"))
    assert shape({**whole, "usage": None}) == shape({**msgspec.json.decode(fmt.whole("x", "stop", Usage(1, 1))),
                                                     "usage": None})


@pytest.mark.parametrize("text", ["Hello there, friend.", "", "  spaced\n\nlines  ", "one"])
def test_stream_replay_round_trips_through_the_recorder(text: str) -> None:
    original = entry(text)
    data = b"".join(replay.stream_events(original, "smol", True))
    again = replay.entry_from_stream(data, chat=True, partition="user:u1", model_sha256=SHA)
    assert again is not None and (again.text, again.finish_reason, again.prompt_tokens) == (text, "stop", 12)
    without_usage = b"".join(replay.stream_events(original, "smol", False))
    assert b'"cached_tokens"' not in without_usage and without_usage.endswith(b"data: [DONE]\n\n")


def test_unfinished_or_failed_streams_are_not_recorded() -> None:
    data = b"".join(replay.stream_events(entry(), "smol", True))
    cut = data[: data.index(b"data: [DONE]")]
    assert replay.entry_from_stream(cut, chat=True, partition="p", model_sha256=SHA) is None
    error = data.replace(b"data: [DONE]", b'data: {"error": {"message": "worker died"}}\n\ndata: [DONE]')
    assert replay.entry_from_stream(error, chat=True, partition="p", model_sha256=SHA) is None


@pytest.mark.parametrize("text", [
    "mail me at jane.doe@example.com", "my card is 4111 1111 1111 1111", "call +1 415 555 2671",
    "IBAN DE89 3704 0044 0532 0130 00", "SSN 536-22-8741", "key AKIAIOSFODNN7EXAMPLE",
])
def test_requests_carrying_pii_are_not_cached_by_default(text: str, privacy: Privacy) -> None:
    assert not no_pii(["Hello", text])
    assert not may_cache(["Hello", text], privacy_detector(privacy))


@pytest.mark.parametrize("text", ["What is the capital of France?", "Order 1234 shipped in 2024", "pi is 3.14159"])
def test_plain_requests_may_be_cached(text: str, privacy: Privacy) -> None:
    assert no_pii([text]) and may_cache([text], privacy_detector(privacy))


def test_the_policy_in_force_decides(privacy: Privacy) -> None:
    text = ["write to jane.doe@example.com"]
    assert not may_cache(text, privacy_detector(privacy))
    allow = parse_policy(SHIPPED_PRIVACY.read_text().replace('[surfaces.cache]\ndefault = "block"',
                                                                    '[surfaces.cache]\ndefault = "allow"'))
    privacy.use_policy(allow)
    assert may_cache(text, privacy_detector(privacy))


@pytest.fixture
def privacy() -> Privacy:
    return Privacy(parse_policy(SHIPPED_PRIVACY.read_text()), b"k" * 32)


def test_entries_of_models_no_longer_installed_are_dropped(cache: ResponseCache) -> None:
    cache.put(f"user:u1/{SHA}/x", entry())
    cache.put(f"user:u1/{'b' * 64}/x", entry(sha="b" * 64))
    assert cache.drop_models_except({SHA}) == 1
    assert list(cache.keys()) == [f"user:u1/{SHA}/x"]


def test_a_changed_privacy_policy_changes_every_key(privacy: Privacy) -> None:
    digest = policy_digest(privacy)
    before = digest()
    assert before == privacy.policy.digest and digest() is before  # computed once per policy
    body = body_of(temperature=0)
    privacy.use_policy(parse_policy(SHIPPED_PRIVACY.read_text().replace('[surfaces.output]\ndefault = "allow"',
                                                                        '[surfaces.output]\ndefault = "redact"')))
    assert digest() != before
    assert key_of(body, policy=before) != key_of(body, policy=digest())
