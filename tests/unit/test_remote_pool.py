"""A remote model's pool of upstreams: its source string (old single-URL sources included), the keys given on stdin,
weighted least-outstanding routing with a limit per upstream, and passive health. The requests themselves, failover
and the health checks that bring an upstream back run against real appliances in
tests/integration/test_remote_engine.py."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from appliance.config import RemoteSettings
from appliance.engines.remote import RemoteCredentials, keys_from_lines
from appliance.engines.remote_pool import NoUpstream, Upstream, UpstreamPool
from appliance.errors import RegistryError
from appliance.observability.metrics import Metrics
from appliance.registry.remote import RemoteSpec, UpstreamSpec, parse_remote_source, remote_source


def test_a_pool_source_round_trips_and_an_old_one_is_a_pool_of_one() -> None:
    source = remote_source(["http://a:8000/v1/", "https://b/v1"], "m", weights=[3, 1], concurrency=[8, 2])
    assert source == "remote:http://a:8000/v1;weight=3;concurrency=8 https://b/v1;concurrency=2#m"
    assert parse_remote_source(source) == RemoteSpec(
        [UpstreamSpec("http://a:8000/v1", 3, 8), UpstreamSpec("https://b/v1", 1, 2)], "m")
    # as the single-URL remote engine stored it: still served, weight 1, the default limit
    assert parse_remote_source("remote:http://gpu-box:8000/v1#llama") == RemoteSpec(
        [UpstreamSpec("http://gpu-box:8000/v1")], "llama")


@pytest.mark.parametrize(("urls", "weights", "needle"), [
    ([], [], "at least one upstream"),
    (["ftp://a/v1"], [], "not an upstream base URL"),
    (["http://a/v1;x=1"], [], "not an upstream base URL"),
    (["http://user:secret@a/v1"], [], "carries credentials"),
    (["http://a/v1", "http://a/v1/"], [], "twice"),
    (["http://a/v1", "http://b/v1"], [2], "one --weight per --url"),
    (["http://a/v1"], [0], "from 1 to 10000"),
])
def test_bad_pools_are_refused_with_the_reason(urls: list[str], weights: list[int], needle: str) -> None:
    with pytest.raises(RegistryError) as caught:
        remote_source(urls, "m", weights=weights)
    assert needle in caught.value.message
    assert "secret" not in caught.value.message


def test_keys_one_per_upstream_or_one_for_all(tmp_path: object) -> None:
    assert keys_from_lines(["k1", "", "k2\n"], 2) == ["k1", "k2"]
    assert keys_from_lines(["only"], 3) == ["only"]
    with pytest.raises(RegistryError, match="2 API keys for 3 upstreams"):
        keys_from_lines(["k1", "k2"], 3)


def test_keys_are_kept_a_line_each_and_an_old_single_key_file_still_reads(tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path)) / "remote"
    credentials = RemoteCredentials(folder)
    credentials.save_all("m", ["k1", "k2"])
    assert credentials.load_all("m") == ["k1", "k2"] and credentials.load("m") == "k1"
    (folder / "old.key").write_text("sk-old\n")  # the shape an earlier version wrote
    assert credentials.load_all("old") == ["sk-old"]


def pool(*weights: int, limit: int = 4, **settings: float) -> UpstreamPool:
    spec = RemoteSpec([UpstreamSpec(f"http://u{i}/v1", w, limit) for i, w in enumerate(weights)], "m")
    return UpstreamPool("m", spec, [], RemoteSettings(**settings), queue_timeout=0.2, metrics=Metrics())  # type: ignore[arg-type]


def test_idle_upstreams_share_requests_by_weight() -> None:
    p = pool(3, 1)

    async def run() -> Counter[str]:
        seen: Counter[str] = Counter()
        for _ in range(400):
            upstream = await p.take(set())
            seen[upstream.url] += 1
            p.release(upstream, ok=True)
        await p.close()
        return seen

    assert asyncio.run(run()) == {"http://u0/v1": 300, "http://u1/v1": 100}


def test_the_upstream_with_fewest_requests_in_flight_per_weight_gets_the_next() -> None:
    p = pool(1, 1, 2)

    async def run() -> list[str]:
        held = [await p.take(set()) for _ in range(4)]  # u2 (weight 2) takes two of four
        busy = Counter(u.url for u in held)
        assert busy == {"http://u0/v1": 1, "http://u1/v1": 1, "http://u2/v1": 2}
        p.release(held[[u.url for u in held].index("http://u0/v1")], ok=True)
        nxt = await p.take(set())
        await p.close()
        return [nxt.url]

    assert asyncio.run(run()) == ["http://u0/v1"]


def test_a_request_waits_for_room_and_gives_up_with_503_after_the_queue_timeout() -> None:
    p = pool(1, limit=1)

    async def run() -> None:
        first = await p.take(set())
        waiting = asyncio.ensure_future(p.take(set()))
        await asyncio.sleep(0)
        assert not waiting.done()
        p.release(first, ok=True)
        second = await waiting  # the freed slot goes to the waiter
        with pytest.raises(NoUpstream) as caught:
            await p.take(set())
        assert caught.value.status_code == 503 and "concurrency limit" in caught.value.message
        p.release(second, ok=True)
        await p.close()

    asyncio.run(run())


def test_max_fails_within_fail_timeout_take_an_upstream_out_and_the_others_serve() -> None:
    p = pool(1, 1, max_fails=2, fail_timeout=60)
    bad, good = p.upstreams

    async def run() -> None:
        p.failed(bad, "ConnectError")
        assert bad.up  # one failure is not enough
        p.failed(bad, "ConnectError")
        assert not bad.up
        assert p.state()["status"] == "degraded"
        for _ in range(5):
            upstream = await p.take(set())
            assert upstream is good
            p.release(upstream, ok=True)
        with pytest.raises(NoUpstream) as caught:  # this request already failed on the good one
            await p.take({good})
        assert "http://u0/v1: out (ConnectError)" in caught.value.message
        await p.close()

    asyncio.run(run())
    text = p.metrics.render().decode() if p.metrics else ""
    assert 'appliance_upstream_failures_total{model="m",upstream="http://u0/v1"} 2.0' in text


def test_failures_older_than_fail_timeout_do_not_count() -> None:
    p = pool(1, max_fails=2, fail_timeout=60)
    upstream: Upstream = p.upstreams[0]
    p.failed(upstream, "ReadTimeout")
    upstream.recent[0] -= 61  # as if it had failed a minute ago
    p.failed(upstream, "ReadTimeout")
    assert upstream.up and upstream.failures == 2
    asyncio.run(p.close())
