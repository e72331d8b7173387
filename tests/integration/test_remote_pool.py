"""The remote engine's pool over real sockets, without an appliance: two OpenAI-compatible stand-ins
(tests/openai_standin.py) behind a `RemoteWorker`, as the gateway uses it. Failover before the first byte, per-URL
keys, 503/429 answers, streams cut mid-body or ended without [DONE], and an upstream back after a health check; the
same with real appliances is in test_remote_engine.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from appliance.config import RemoteSettings
from appliance.engines.remote import RemoteWorker
from appliance.engines.remote_pool import NoUpstream
from appliance.observability.metrics import Metrics
from appliance.registry.remote import parse_remote_source, remote_source
from tests.openai_standin import OpenAIStandIn

CHAT = {"model": "pool", "messages": [{"role": "user", "content": "hi"}]}


def worker(*urls: str, keys: list[str], **settings: float) -> RemoteWorker:
    spec = parse_remote_source(remote_source(list(urls), "standin"))
    options = {"health_interval": 60.0, **settings}
    return RemoteWorker("pool@1", spec, keys, RemoteSettings(**options), request_timeout=10,  # type: ignore[arg-type]
                        metrics=Metrics())


def run(test: Callable[[RemoteWorker], Awaitable[None]], w: RemoteWorker) -> None:
    async def go() -> None:
        await w.wait_ready()
        try:
            await test(w)
        finally:
            await w.stop()

    # in a thread of its own: a browser test earlier in the session may leave its event loop set on this thread
    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, go()).result()


async def chat(w: RemoteWorker) -> httpx.Response:
    return await w.client.post("/v1/chat/completions", json=CHAT)


async def stream(w: RemoteWorker) -> AsyncIterator[bytes]:
    async with w.client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.status_code == 200
        async for data in response.aiter_raw():
            yield data


def test_a_dead_upstream_costs_no_request_and_each_upstream_gets_its_own_key() -> None:
    with OpenAIStandIn(key="key-a") as a, OpenAIStandIn(key="key-b") as b:
        w = worker(a.url, b.url, keys=["key-a", "key-b"], max_fails=2)

        async def test(w: RemoteWorker) -> None:
            assert [(await chat(w)).status_code for _ in range(4)] == [200] * 4
            assert a.chats == b.chats == 2
            b.stop()
            replies = [await chat(w) for _ in range(6)]
            assert all(r.status_code == 200 and r.json()["choices"][0]["message"]["content"] for r in replies)
            assert a.chats == 8  # the two sent to b failed over to a, then b was out
            state = {u["url"]: u for u in w.pool.state()["upstreams"]}
            assert state[b.url]["state"] == "down" and state[b.url]["failures"] == 2
            assert "ConnectError" in state[b.url]["last_error"]

        run(test, w)
        assert set(a.keys) == {"key-a"} and set(b.keys) == {"key-b"}  # the model's name upstream, its own key


def test_503_fails_over_and_counts_429_fails_over_only_and_all_down_is_a_clear_503() -> None:
    with OpenAIStandIn() as a, OpenAIStandIn() as b:
        w = worker(a.url, b.url, keys=[], max_fails=1)

        async def test(w: RemoteWorker) -> None:
            b.mode = "429"
            assert [(await chat(w)).status_code for _ in range(4)] == [200] * 4
            assert all(u.up for u in w.pool.upstreams)  # a full upstream is not a failing one
            b.mode = "503"
            assert [(await chat(w)).status_code for _ in range(2)] == [200] * 2
            assert [u.up for u in w.pool.upstreams] == [True, False]
            a.mode = "503"  # the last upstream's own answer is passed on
            response = await chat(w)
            assert response.status_code == 503 and "stand-in says 503" in response.text
            with pytest.raises(NoUpstream) as caught:  # now nothing is left in the rotation
                await chat(w)
            assert caught.value.status_code == 503 and caught.value.retry_after == 60.0
            assert f"{a.url}: out (HTTP 503)" in caught.value.message

        run(test, w)


@pytest.mark.parametrize("mode", ["cut", "nodone"])
def test_a_started_stream_that_breaks_raises_and_counts_against_its_upstream(mode: str) -> None:
    with OpenAIStandIn() as a:
        w = worker(a.url, keys=[], max_fails=5)

        async def test(w: RemoteWorker) -> None:
            assert b"data: [DONE]" in b"".join([chunk async for chunk in stream(w)])
            a.mode = mode
            got = b""
            with pytest.raises(httpx.RemoteProtocolError):
                async for chunk in stream(w):
                    got += chunk
            assert b'"finish_reason": "stop"' in got  # relayed up to the break, then the error
            [upstream] = w.pool.upstreams
            assert upstream.failures == 1 and upstream.outstanding == 0

        run(test, w)


def test_an_upstream_out_rejoins_after_a_health_check_finds_it_serving() -> None:
    a = OpenAIStandIn().__enter__()
    b = OpenAIStandIn().__enter__()
    w = worker(a.url, b.url, keys=[], max_fails=1, health_interval=0.05)

    async def test(w: RemoteWorker) -> None:
        nonlocal b
        port = b.port
        b.stop()
        await chat(w)
        await chat(w)
        assert not w.pool.upstreams[1].up
        b = OpenAIStandIn(port=port).__enter__()  # back on the same port
        for _ in range(100):
            if w.pool.upstreams[1].up:
                break
            await asyncio.sleep(0.05)
        assert w.pool.upstreams[1].up
        await chat(w)
        await chat(w)
        assert b.chats == 1  # in turn again

    try:
        run(test, w)
    finally:
        a.stop()
        b.stop()
    text = w.pool.metrics.render().decode() if w.pool.metrics else ""
    assert f'appliance_upstream_requests_total{{model="pool@1",outcome="error",upstream="{b.url}"}} 1.0' in text
    assert json.dumps(w.pool.state())  # what /api/models shows is plain JSON
