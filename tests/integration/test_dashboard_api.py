"""`GET /api/dashboard` on the real server with the real default model: the default model's worker listed with its
real process memory; requests, tokens and cache lookups counted cumulatively; TTFT quantiles once requests were
served; and cheap enough to poll (the server's own CPU time per call)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.conftest import Running
from tests.server import DEFAULT_MODEL

WORKER = f"{DEFAULT_MODEL}@1"
MODEL_FIELDS = {"model", "name", "version", "state", "healthy", "requests", "errors", "prompt_tokens",
                "completion_tokens", "ttft_p50", "ttft_p95", "queue_depth", "rss_bytes", "vram_bytes", "error"}


def dashboard(server: Running) -> dict[str, Any]:
    response = httpx.get(server.url + "/api/dashboard", headers=server.headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    return body


def entry(body: dict[str, Any], key: str = WORKER) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in body["models"] if m["model"] == key)
    return found


def chat(server: Running, **extra: Any) -> None:
    reply = server.client().chat.completions.create(
        model=DEFAULT_MODEL, max_tokens=4, **extra, messages=[{"role": "user", "content": f"Hi ({uuid.uuid4().hex})"}])
    if extra.get("stream"):
        assert list(reply)  # the request ends when the stream has been read


def test_the_snapshot_has_every_part_and_the_loaded_default_model(server: Running) -> None:
    body = dashboard(server)
    assert set(body) == {"at", "models", "cache", "memory", "gpus", "disk", "alerts"}
    assert abs(body["at"] - time.time()) < 60 and body["alerts"] == []
    model = entry(body)
    assert set(model) == MODEL_FIELDS
    assert (model["name"], model["version"], model["state"], model["healthy"]) == (DEFAULT_MODEL, 1, "ready", True)
    assert model["error"] is None and model["queue_depth"] == 0
    if server.process is not None:  # the worker's resident memory, as the OS counts it
        resident = [w.memory_info().rss for w in server.process.workers()]
        assert any(0.5 * rss < model["rss_bytes"] < 2 * rss for rss in resident), (model["rss_bytes"], resident)
    assert model["vram_bytes"] is None or model["vram_bytes"] >= 0
    memory, disk = body["memory"], body["disk"]
    assert 0 < memory["available_bytes"] <= memory["total_bytes"] and memory["models_bytes"] > 0
    assert memory["budget_bytes"] is None or memory["budget_bytes"] > 0
    assert 0 <= disk["free_bytes"] <= disk["total_bytes"] and disk["data_bytes"] > 50 << 20  # the model's blob
    assert set(body["cache"]) == {"hits", "misses", "hit_ratio"}
    assert all(set(g) == {"name", "memory_total_bytes", "memory_used_bytes"} for g in body["gpus"])


def test_counters_grow_with_requests_and_ttft_is_windowed(server: Running) -> None:
    before = dashboard(server)
    chat(server, temperature=0.7, stream=True)
    chat(server, temperature=0.7)
    after = dashboard(server)
    was, now = entry(before), entry(after)
    assert now["requests"] == was["requests"] + 2 and now["errors"] == was["errors"]
    assert now["prompt_tokens"] > was["prompt_tokens"] and now["completion_tokens"] > was["completion_tokens"]
    assert now["ttft_p50"] is not None and now["ttft_p95"] is not None
    assert 0 < now["ttft_p50"] <= now["ttft_p95"] < 120
    assert after["at"] > before["at"]


def test_cache_hits_and_misses_are_counted(server: Running) -> None:
    before = dashboard(server)["cache"]
    question = {"temperature": 0, "messages": [{"role": "user", "content": f"Cache me {uuid.uuid4().hex}"}]}
    for _ in range(2):
        server.client().chat.completions.create(model=DEFAULT_MODEL, max_tokens=4, **question)  # type: ignore[arg-type]
    after = dashboard(server)["cache"]
    assert (after["hits"], after["misses"]) == (before["hits"] + 1, before["misses"] + 1)
    assert 0 < after["hit_ratio"] <= 1


def test_polling_is_cheap(server: Running) -> None:
    """The UI polls every 2 s: a call must cost the server well under 2% of a core at one a second."""
    if server.process is None or server.process.proc is None:
        pytest.skip("needs a local server to measure")
    process = psutil.Process(server.process.proc.pid)
    dashboard(server)  # the slow parts (data dir size, GPUs) are computed once, then kept
    calls = 50
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as client:
        cpu = process.cpu_times()
        for _ in range(calls):
            assert client.get("/api/dashboard").status_code == 200
        used = process.cpu_times()
    per_call = (used.user + used.system - cpu.user - cpu.system) / calls
    print(f"dashboard: {per_call * 1000:.2f} ms of server CPU per call")
    assert per_call < 0.01  # < 1% of a core at one call a second (the server's own background work included)
