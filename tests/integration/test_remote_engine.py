"""The `remote` engine against real upstreams: other real appliances (llama.cpp and the default model) behind the
first one's gateway, with the upstreams' keys kept secret; a pool of two upstreams that loses one mid-run and gets it
back."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.integration.conftest import Running
from tests.integration.test_workers import NO_EOS, metric, wait_until
from tests.server import DEFAULT_MODEL, appliance


def add_remote(front: Running, name: str, upstream: Running, key: str, upstream_model: str = DEFAULT_MODEL) -> str:
    assert front.process is not None
    return appliance("models", "add-remote", name, "--url", upstream.url + "/v1", "--upstream-model", upstream_model,
                     "--api-key-stdin", data_dir=front.process.data_dir, input=key + "\n").stdout


@pytest.fixture(scope="module")
def front(start_server: Callable[..., Running]) -> Running:
    return start_server({"APPLIANCE_REMOTE__HEALTH_INTERVAL": "0.5"})  # an upstream back in half a second


def test_chat_through_a_remote_upstream(front: Running, server: Running) -> None:
    out = add_remote(front, "upstream-smol", server, server.key)
    assert "with an API key" in out and server.key not in out
    assert front.process is not None
    key_file = front.process.data_dir / "keys" / "remote" / "upstream-smol.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    client = front.client()
    reply = client.chat.completions.create(model="upstream-smol", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens > 0

    stream = client.chat.completions.create(model="upstream-smol", messages=[{"role": "user", "content": "Count"}],
                                            max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    listed = appliance("models", "list", data_dir=front.process.data_dir).stdout
    assert "upstream-smol\tremote" in listed and server.key not in listed
    doctor = appliance("doctor", data_dir=front.process.data_dir, check=False).stdout
    assert "upstream-smol (remote 'smollm2-135m-instruct' at " in doctor and "-> remote on upstream" in doctor
    assert server.key not in doctor
    assert server.key not in front.process.log_path.read_text()  # the secret is never logged


def test_a_refused_key_is_a_clear_503(front: Running, server: Running) -> None:
    add_remote(front, "upstream-badkey", server, "sk-not-a-real-key")
    with pytest.raises(openai.APIStatusError) as caught:
        front.client().chat.completions.create(model="upstream-badkey", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4)
    assert caught.value.status_code == 503
    assert "the API key was refused" in str(caught.value)


def test_an_unknown_upstream_model_says_what_is_there(front: Running, server: Running) -> None:
    add_remote(front, "upstream-missing", server, server.key, upstream_model="no-such-model")
    with pytest.raises(openai.APIStatusError) as caught:
        front.client().chat.completions.create(model="upstream-missing", messages=[{"role": "user", "content": "x"}],
                                               max_tokens=4)
    assert caught.value.status_code == 503
    assert "no model 'no-such-model'" in str(caught.value) and DEFAULT_MODEL in str(caught.value)


def test_removing_a_remote_model_deletes_its_key(front: Running, server: Running) -> None:
    add_remote(front, "upstream-gone", server, server.key)
    assert front.process is not None
    key_file: Path = front.process.data_dir / "keys" / "remote" / "upstream-gone.key"
    assert key_file.exists()
    appliance("models", "rm", "upstream-gone", data_dir=front.process.data_dir)
    assert not key_file.exists()
    with pytest.raises(openai.NotFoundError):
        front.client().chat.completions.create(model="upstream-gone", messages=[{"role": "user", "content": "x"}],
                                               max_tokens=4)


NO_STORE = {"cache": "no-store"}


def upstreams(front: Running, model: str) -> dict[str, dict[str, Any]]:
    listed = httpx.get(front.url + "/api/models", headers=front.headers, timeout=30).json()["data"]
    [record] = [m for m in listed if m["name"] == model]
    return {u["url"]: u for u in record["upstreams"]}


def ask(client: openai.OpenAI, stream: bool) -> str:
    """One short chat through the pool (never from the response cache); a stream must end with a finish reason (an
    SSE error raises)."""
    messages = [{"role": "user", "content": "Say hi"}]
    if not stream:
        reply = client.chat.completions.create(model="pool-smol", messages=messages, max_tokens=2, temperature=0,
                                               extra_body=NO_STORE)
        return reply.choices[0].finish_reason or ""
    chunks = list(client.chat.completions.create(model="pool-smol", messages=messages, max_tokens=2, temperature=0,
                                                 stream=True, extra_body=NO_STORE))
    return next((c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), "")


def test_a_pool_of_two_upstreams_survives_losing_one_and_takes_it_back(
        front: Running, server: Running, start_server: Callable[..., Running]) -> None:
    second = start_server()
    assert front.process is not None and second.process is not None and second.process.proc is not None
    a, b = server.url + "/v1", second.url + "/v1"
    out = appliance("models", "add-remote", "pool-smol", "--url", a, "--url", b, "--upstream-model", DEFAULT_MODEL,
                    "--api-key-stdin", data_dir=front.process.data_dir, input=f"{server.key}\n{second.key}\n").stdout
    assert "with 2 API keys" in out and second.key not in out
    client = front.client()
    assert [ask(client, stream=False), ask(client, stream=True)] == ["length"] * 2
    state = upstreams(front, "pool-smol")
    assert state[a]["state"] == state[b]["state"] == "up"
    assert state[a]["requests"] == state[b]["requests"] == 1  # least outstanding, ties in turn

    # two long streams, one on each upstream, both started; then the second upstream dies under one of them
    streams = [client.chat.completions.create(model="pool-smol", messages=[{"role": "user", "content": "A story"}],
                                              max_tokens=400, temperature=0, stream=True, logit_bias=NO_EOS,
                                              extra_body=NO_STORE)
               for _ in range(2)]
    iterators = [iter(s) for s in streams]
    for it in iterators:
        next(it)
    assert {u: s["outstanding"] for u, s in upstreams(front, "pool-smol").items()} == {a: 1, b: 1}
    os.kill(second.process.proc.pid, signal.SIGKILL)  # its worker follows its supervisor
    second.process.proc.wait(10)
    cut = []
    for stream, it in zip(streams, iterators, strict=True):
        try:
            for _ in range(8):
                next(it)
        except openai.APIError as exc:  # an SSE error event in the OpenAI error shape, never a silent end
            cut.append(str(exc))
        stream.close()
    assert len(cut) == 1 and all("the upstream serving 'pool-smol' failed during the request" in m for m in cut)

    # every request from now on is served: those sent to the dead upstream fail over, then it is out
    with ThreadPoolExecutor(3) as run:
        finished = list(run.map(lambda i: ask(front.client(), stream=i % 2 == 0), range(6)))
    assert finished == ["length"] * 6
    wait_until(lambda: upstreams(front, "pool-smol")[b]["state"] == "down", what="the dead upstream out")
    state = upstreams(front, "pool-smol")
    assert state[a]["state"] == "up" and state[b]["failures"] >= 2 and "Error" in state[b]["last_error"]
    assert metric(front, f'appliance_upstream_up{{model="pool-smol@1",upstream="{b}"}}') == 0
    assert metric(front, f'appliance_upstream_up{{model="pool-smol@1",upstream="{a}"}}') == 1
    doctor = appliance("doctor", data_dir=front.process.data_dir, check=False).stdout
    assert f"upstream {a}: up" in doctor and f"upstream {b} of model 'pool-smol' does not serve it" in doctor
    assert second.key not in doctor and second.key not in front.process.log_path.read_text()

    # back on the same port: the health checks bring it back and it serves again
    second.process.start()
    wait_until(lambda: upstreams(front, "pool-smol")[b]["state"] == "up", what="the upstream back")
    served_before = upstreams(front, "pool-smol")[b]["requests"]
    assert [ask(client, stream=False) for _ in range(2)] == ["length"] * 2
    assert upstreams(front, "pool-smol")[b]["requests"] == served_before + 1
    workers = second.process.workers()
    second.process.stop()
    psutil.wait_procs(workers, timeout=10)
