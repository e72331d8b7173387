"""Supervision through the real server: disconnects, worker crashes, drains, parent death, queueing, keep-alive."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL, appliance, wait_until

NO_EOS = {"0": -100, "2": -100}
PROMPT = [{"role": "user", "content": "Tell me a very long story about a lighthouse."}]




def worker_health(data_dir: Path) -> dict[str, int]:
    """Ask the worker directly over its Unix socket (the test runs as the service user)."""
    sockets = list((data_dir / "run").glob("*.sock"))
    assert len(sockets) == 1, sockets
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sockets[0])), base_url="http://worker") as worker:
        result: dict[str, int] = worker.get("/health").json()
        return result


def metric(running: Running, name: str) -> float:
    text = httpx.get(running.url + "/metrics", headers=running.headers).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.split()[-1])
    return total


def audit_records(running: Running, action: str) -> list[dict[str, str]]:
    assert running.process is not None
    out = appliance("audit", "export", "--action", action, data_dir=running.process.data_dir).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def long_stream(running: Running, max_tokens: int = 3000) -> openai.Stream:  # type: ignore[type-arg]
    return running.client().chat.completions.create(  # type: ignore[no-any-return]
        model=DEFAULT_MODEL, messages=PROMPT, max_tokens=max_tokens, temperature=0, stream=True,
        logit_bias=NO_EOS)


def test_worker_socket_is_private(server: Running) -> None:
    assert server.process is not None
    run_dir = server.process.data_dir / "run"
    assert oct(run_dir.stat().st_mode & 0o777) == "0o700"
    for sock in run_dir.glob("*.sock"):
        assert oct(sock.stat().st_mode & 0o777) == "0o600"


def test_client_disconnect_stops_generation_and_frees_the_worker(start_server: Callable[..., Running]) -> None:
    running = start_server()
    assert running.process is not None
    stream = long_stream(running, max_tokens=4000)
    received = 0
    for _ in stream:
        received += 1
        if received == 5:
            break
    stream.close()
    reply = running.client().chat.completions.create(model=DEFAULT_MODEL, messages=PROMPT, max_tokens=3,
                                                     temperature=0)
    assert reply.choices[0].message.content is not None
    health = worker_health(running.process.data_dir)
    # the abandoned request must not have generated its 4000 tokens before the next one ran
    assert health["generated_tokens"] < 1000, health
    assert health["cancelled"] == 1


def test_worker_killed_mid_stream_gives_clean_error_and_restarts(start_server: Callable[..., Running]) -> None:
    running = start_server()
    assert running.process is not None
    [worker] = running.process.workers()
    stream = long_stream(running)
    with pytest.raises(openai.APIError) as caught:
        for received, _ in enumerate(stream):
            if received == 3:
                worker.send_signal(signal.SIGKILL)
    assert "worker" in caught.value.message and "retry" in caught.value.message
    wait_until(lambda: httpx.get(running.url + "/readyz").status_code == 200, "restart")
    reply = running.client().chat.completions.create(model=DEFAULT_MODEL, messages=PROMPT, max_tokens=4,
                                                     temperature=0)
    assert reply.choices[0].message.content
    [new_worker] = running.process.workers()
    assert new_worker.pid != worker.pid
    assert metric(running, "appliance_worker_restarts_total") == 1
    assert [r["outcome"] for r in audit_records(running, "model.crash")] == ["error"]
    assert [r["outcome"] for r in audit_records(running, "model.load")] == ["ok", "ok"]


def test_sigterm_drains_the_stream_in_flight(start_server: Callable[..., Running]) -> None:
    running = start_server()
    process = running.process
    assert process is not None and process.proc is not None
    workers = process.workers()
    stream = long_stream(running, max_tokens=150)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 3:
            process.proc.send_signal(signal.SIGTERM)
    assert chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) > 100
    assert process.proc.wait(60) == 0
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, "workers outlived the supervisor"
    with pytest.raises(httpx.ConnectError):
        httpx.get(running.url + "/healthz")


def test_workers_die_with_a_killed_supervisor(start_server: Callable[..., Running]) -> None:
    running = start_server()
    assert running.process is not None and running.process.proc is not None
    workers = running.process.workers()
    assert workers
    os.kill(running.process.proc.pid, signal.SIGKILL)
    running.process.proc.wait(10)
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, "a worker survived kill -9 of its supervisor"


def test_full_queue_answers_429_with_retry_after(start_server: Callable[..., Running]) -> None:
    running = start_server({"APPLIANCE_GATEWAY__MAX_QUEUE": "1", "APPLIANCE_LLAMACPP__PARALLEL": "1"})
    holder = long_stream(running, max_tokens=4000)
    next(iter(holder))  # the model's only slot is now busy
    results: list[object] = []
    waiter = threading.Thread(target=lambda: results.append(running.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=PROMPT, max_tokens=2, temperature=0)))
    waiter.start()
    wait_until(lambda: metric(running, "appliance_queue_depth") == 1, "one queued request")
    response = httpx.post(running.url + "/v1/chat/completions", headers=running.headers,
                          json={"model": DEFAULT_MODEL, "messages": PROMPT, "max_tokens": 2})
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "queue_full"
    holder.close()
    waiter.join(60)
    assert len(results) == 1, "the queued request should complete once the slot frees"


def test_idle_model_unloads_after_keep_alive_and_reloads_on_demand(start_server: Callable[..., Running]) -> None:
    running = start_server({"APPLIANCE_MODELS__PIN_DEFAULT": "false", "APPLIANCE_MODELS__KEEP_ALIVE": "1"})
    assert running.process is not None
    wait_until(lambda: not running.process.workers(), "idle unload")  # type: ignore[union-attr]
    assert httpx.get(running.url + "/readyz").status_code == 503
    reply = running.client().chat.completions.create(model=DEFAULT_MODEL, messages=PROMPT, max_tokens=3,
                                                     temperature=0)
    assert reply.choices[0].message.content is not None
    assert metric(running, "appliance_model_load_seconds_count") == 2
    unloads = audit_records(running, "model.unload")  # a second once the reloaded model idles a second again
    assert unloads and all(u["actor"] == "supervisor" and u["target"] == DEFAULT_MODEL for u in unloads)


def test_a_wedged_worker_is_found_by_health_checks_and_replaced(start_server: Callable[..., Running]) -> None:
    running = start_server({"APPLIANCE_SUPERVISOR__HEALTH_INTERVAL": "0.5",
                            "APPLIANCE_SUPERVISOR__HEALTH_TIMEOUT": "1", "APPLIANCE_SUPERVISOR__STOP_TIMEOUT": "1"})
    assert running.process is not None
    [worker] = running.process.workers()
    worker.suspend()  # SIGSTOP: the process lives on but answers nothing, as a deadlocked one would
    wait_until(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE,
               "the hung worker killed")
    wait_until(lambda: len(running.process.workers()) == 1  # type: ignore[union-attr]
               and httpx.get(running.url + "/readyz").status_code == 200, "a new worker")
    reply = running.client().chat.completions.create(model=DEFAULT_MODEL, messages=PROMPT, max_tokens=3,
                                                     temperature=0)
    assert reply.choices[0].message.content is not None
    assert metric(running, "appliance_worker_restarts_total") == 1
    [crash] = audit_records(running, "model.crash")
    assert "health check failed" in crash["details"]["reason"]  # type: ignore[index]
