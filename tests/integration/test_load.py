"""200 concurrent streaming clients against the real server with its default settings and the real default model
(issue 18, item 3): each client gets a complete stream or a 429/503 with Retry-After, the memory of the server and
its workers stays bounded, and a plain request succeeds right after. The bounded queue (llamacpp.parallel admitted,
gateway.max_queue waiting, the rest refused at once with 429) and a short queue timeout (those still waiting after it
get 503) are what keep this short on a slow or busy box."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable

import openai
import psutil
import pytest

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL

CLIENTS = 200
MAX_TOKENS = 8
QUEUE_TIMEOUT = 5  # seconds; the default (120) would let the last of 32 waiting requests wait minutes on a busy box
# What 200 clients may add to the resident memory of the server and its workers: their connections, request
# states and stream buffers are kilobytes each; a leak per request or an unbounded queue of bodies would show as
# tens of MiB over this many requests, and a second model load (a whole extra worker) as hundreds.
RSS_GROWTH_LIMIT = 64 << 20


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (the supervisor and its model workers)."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


@pytest.fixture(scope="module")
def loaded(start_server: Callable[..., Running]) -> Running:
    return start_server({"APPLIANCE_GATEWAY__QUEUE_TIMEOUT": str(QUEUE_TIMEOUT)})


async def one_client(client: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
    """One streaming chat: ('complete', text), or (status, retry-after) when refused."""
    try:
        stream = await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": f"Count to {i % 10 + 3}."}],
            max_tokens=MAX_TOKENS, stream=True)
        finish, text = None, []
        async for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        return ("complete" if finish in ("stop", "length") else f"incomplete:{finish}"), "".join(text)
    except openai.APIStatusError as exc:
        return str(exc.status_code), exc.response.headers.get("retry-after", "")


async def storm(running: Running, peak: list[int]) -> list[tuple[str, str]]:
    assert running.process is not None and running.process.proc is not None
    pid = running.process.proc.pid
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key=running.key, max_retries=0,
                                timeout=QUEUE_TIMEOUT * 6, default_headers={"Cache-Control": "no-store"})
    done = asyncio.Event()

    async def sample() -> None:  # the peak while the storm runs, not only what is left after it
        while not done.is_set():
            peak.append(await asyncio.to_thread(tree_rss, pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.2)

    sampler = asyncio.create_task(sample())
    try:
        return await asyncio.gather(*(one_client(client, i) for i in range(CLIENTS)))
    finally:
        done.set()
        await sampler
        await client.close()


def test_200_streaming_clients_get_a_stream_or_a_retry_after(loaded: Running) -> None:
    assert loaded.process is not None and loaded.process.proc is not None
    client = loaded.client(default_headers={"Cache-Control": "no-store"})
    client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    before = tree_rss(loaded.process.proc.pid)  # the model loaded and warmed up once

    peak: list[int] = []
    results = asyncio.run(storm(loaded, peak))

    outcomes = Counter(kind for kind, _ in results)
    assert set(outcomes) <= {"complete", "429", "503"}, outcomes
    assert outcomes["complete"] >= 4, outcomes  # at least the first batch was served in full
    assert outcomes["429"] + outcomes["503"] > 0, outcomes  # 200 is beyond the queue's bound: some were refused
    refused = [retry for kind, retry in results if kind in ("429", "503")]
    assert all(retry.isdigit() and int(retry) >= 1 for retry in refused), refused[:5]
    assert all(text for kind, text in results if kind == "complete")
    growth = max(peak) - before
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.0f} MiB under load ({outcomes})"
    print(f"\n200 clients: {dict(outcomes)}; RSS before {before / 2**20:.0f} MiB, peak +{growth / 2**20:.1f} MiB")

    after = client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4)
    assert after.choices[0].finish_reason in ("stop", "length") and after.choices[0].message.content
