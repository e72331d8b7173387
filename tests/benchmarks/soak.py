"""The soak run (issue 18, item 3): a mixed load of chat (whole and streamed), RAG (ingestion, queries, chat with
citations, deletions), embeddings and admin calls (keys created and revoked, users, usage, audit, metrics) against
one real server for `--minutes` (30 by default), while the resident memory (RSS) and the open file descriptors of
the server and of each of its workers are sampled every `--interval` seconds.

Sampling starts after one call of each kind (the embedding model, Chroma and the model's worker are loaded on first
use). At the end it reports, per process kind and in total, the first and last value and the least-squares slope over
the samples after a further warm-up (`--warmup` share of the run), in MiB per hour and descriptors per hour (RSS
also over the second half alone: a cache that fills levels off there, a leak does not), and
every request that did not succeed, by call and status.
A 429 or 503 with Retry-After is the bounded queue doing its job and is counted apart; anything else is an error.

    nice -n 10 .venv/bin/python -m tests.benchmarks.soak [--minutes 30] [--clients 4] [--json out.json]
    nice -n 10 .venv/bin/python -m tests.benchmarks.soak --url http://box:8080 --key KEY   # an installed box

With `--enforce` it exits 1 when there were errors or a slope is above `--max-rss-slope` (MiB/h) or
`--max-fd-slope` (descriptors/h).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.server import DEFAULT_MODEL, ServerProcess, appliance, new_key

EMBEDDING_MODEL = "all-minilm-l6-v2"
WORDS = ("river mountain library engine harvest violin lantern orbit copper meadow glacier puzzle falcon canyon "
         "ember harbour quartz thunder saddle velvet compass marble tundra beacon").split()


@dataclass
class Tally:
    ok: Counter[str] = field(default_factory=Counter)
    shed: Counter[str] = field(default_factory=Counter)  # 429/503 with Retry-After: the queue's bound
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def note(self, call: str, response: httpx.Response | None, error: str = "", also_ok: tuple[int, ...] = ()
             ) -> None:
        if response is not None and (response.status_code < 300 or response.status_code in also_ok):
            self.ok[call] += 1
        elif response is not None and response.status_code in (429, 503) and response.headers.get("retry-after"):
            self.shed[call] += 1
        else:
            what = f"{call} {response.status_code if response is not None else error}"
            self.errors[what] += 1
            if response is not None:
                self.examples.setdefault(what, response.text[:300])


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


class Load:
    """The mixed calls; each client loops over them in a random order until the deadline."""

    def __init__(self, client: httpx.AsyncClient, tally: Tally, max_tokens: int) -> None:
        self.client = client
        self.tally = tally
        self.max_tokens = max_tokens

    async def call(self, name: str, method: str, path: str, also_ok: tuple[int, ...] = (), **kwargs: Any
                   ) -> httpx.Response | None:
        try:
            response = await self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self.tally.note(name, None, type(exc).__name__)
            return None
        self.tally.note(name, response, also_ok=also_ok)
        return response

    async def chat(self, rng: random.Random) -> None:
        body = {"model": DEFAULT_MODEL, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": f"Tell me about {rng.choice(WORDS)}."}]}
        if rng.random() < 0.5:
            await self.call("chat", "POST", "/v1/chat/completions", json=body)
            return
        try:
            async with self.client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                if response.status_code != 200:
                    await response.aread()
                    self.tally.note("chat stream", response)
                    return
                tail = ""
                async for line in response.aiter_lines():
                    tail = line or tail
                if tail != "data: [DONE]":
                    self.tally.note("chat stream", None, "incomplete stream")
                    return
                self.tally.note("chat stream", response)
        except httpx.HTTPError as exc:
            self.tally.note("chat stream", None, type(exc).__name__)

    async def rag(self, rng: random.Random, collection: str) -> None:
        doc = f"d{rng.randrange(50)}"
        text = "\n\n".join(sentence(rng, 40) for _ in range(rng.randint(2, 6)))
        await self.call("rag add", "POST", f"/api/collections/{collection}/documents",
                        json={"id": doc, "text": text})
        await self.call("rag query", "POST", f"/api/collections/{collection}/query",
                        json={"query": sentence(rng, 4), "top_k": 5, "mode": rng.choice(["hybrid", "vector",
                                                                                           "keyword"])})
        if rng.random() < 0.3:
            await self.call("rag chat", "POST", "/v1/chat/completions",
                            json={"model": DEFAULT_MODEL, "max_tokens": self.max_tokens,
                                  "messages": [{"role": "user", "content": sentence(rng, 5)}],
                                  "rag": {"collections": [collection], "top_k": 3}})
        if rng.random() < 0.2:
            await self.call("rag delete", "DELETE", f"/api/collections/{collection}/documents/{doc}",
                            also_ok=(404,))  # deleted before, or never added by this seed: not an error

    async def embeddings(self, rng: random.Random) -> None:
        await self.call("embeddings", "POST", "/v1/embeddings",
                        json={"model": EMBEDDING_MODEL, "input": [sentence(rng) for _ in range(rng.randint(1, 8))]})

    async def admin(self, rng: random.Random) -> None:
        name = f"soak-{uuid.uuid4().hex[:8]}"
        created = await self.call("admin key create", "POST", "/api/keys", json={"name": name, "role": "user"})
        if created is not None and created.status_code < 300:
            await self.call("admin key revoke", "DELETE", f"/api/keys/{created.json()['id']}")
        for path in rng.sample(["/api/keys", "/api/users", "/api/usage", "/api/audit?limit=20", "/api/models",
                                "/api/dashboard", "/metrics", "/v1/models", "/api/collections"], 3):
            await self.call(f"admin GET {path.split('?')[0]}", "GET", path)


async def client_loop(load: Load, seed: int, collection: str, deadline: float, skip: frozenset[str] = frozenset()
                      ) -> None:
    rng = random.Random(seed)
    kinds = [k for k in ["chat"] * 4 + ["rag"] * 3 + ["embeddings"] * 2 + ["admin"] * 2 if k not in skip]
    calls = {"chat": load.chat, "embeddings": load.embeddings, "admin": load.admin,
             "rag": lambda rng: load.rag(rng, collection)}
    while time.monotonic() < deadline:
        kind = rng.choice(kinds)
        try:
            await calls[kind](rng)
        except Exception as exc:  # a failure of the client's own is a finding too, and the run goes on
            load.tally.note(kind, None, f"{type(exc).__name__}: {exc}"[:200])


def kind_of(proc: psutil.Process) -> str:
    """A child's kind: the appliance module it runs (`llamacpp_worker`), else its program's name."""
    cmdline = proc.cmdline()
    module = next((part for part in cmdline if part.startswith("appliance.")), None)
    return module.rsplit(".", 1)[-1] if module else Path(cmdline[0]).name if cmdline else "child"


def processes(root: psutil.Process) -> list[tuple[str, psutil.Process]]:
    """The server and its descendants (model workers), each with its kind."""
    out = [("server", root)]
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                out.append((kind_of(child), child))
    return out


def sample(root: psutil.Process) -> dict[str, tuple[float, int]]:
    """kind -> (RSS in MiB, open descriptors), summed over processes of the same kind, plus 'total'."""
    seen: dict[str, tuple[float, int]] = {}
    for kind, proc in processes(root):
        with contextlib.suppress(psutil.Error):
            rss, fds = proc.memory_info().rss / 2**20, proc.num_fds()
            old = seen.get(kind, (0.0, 0))
            seen[kind] = (old[0] + rss, old[1] + fds)
    seen["total"] = (sum(v[0] for v in seen.values()), sum(v[1] for v in seen.values()))
    return seen


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var * 3600


async def sampler(pid: int, started: float, deadline: float, interval: float,
                  samples: list[tuple[float, dict[str, tuple[float, int]]]]) -> None:
    root = psutil.Process(pid)
    while True:
        samples.append((time.monotonic() - started, await asyncio.to_thread(sample, root)))
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))


async def soak(url: str, key: str, pid: int, args: argparse.Namespace
               ) -> tuple[Tally, list[tuple[float, dict[str, tuple[float, int]]]]]:
    tally = Tally()
    samples: list[tuple[float, dict[str, tuple[float, int]]]] = []
    headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-store"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        collection = f"soak-{uuid.uuid4().hex[:6]}"
        created = await client.post("/api/collections", json={"name": collection})
        assert created.status_code in (200, 201), created.text
        load = Load(client, tally, args.max_tokens)
        warm = random.Random(args.seed - 1)  # each kind once before sampling: the embedding model's first load
        for first in (load.chat, load.embeddings, lambda rng: load.rag(rng, collection), load.admin):  # is no leak
            await first(warm)
        started = time.monotonic()
        deadline = started + args.minutes * 60
        watcher = asyncio.create_task(sampler(pid, started, deadline, args.interval, samples))
        await asyncio.gather(*(client_loop(load, args.seed + i, collection, deadline, frozenset(args.skip))
                               for i in range(args.clients)))
        await watcher
        samples.append((time.monotonic() - started, await asyncio.to_thread(sample, psutil.Process(pid))))
    return tally, samples


def report(tally: Tally, samples: list[tuple[float, dict[str, tuple[float, int]]]], args: argparse.Namespace
           ) -> dict[str, Any]:
    cut = samples[-1][0] * args.warmup
    kept = [(t, s) for t, s in samples if t >= cut]
    kinds = sorted({k for _, s in samples for k in s}, key=lambda k: (k == "total", k))
    figures: dict[str, Any] = {}
    for kind in kinds:
        present = [(t, s[kind]) for t, s in kept if kind in s]
        if not present:
            continue
        figures[kind] = {
            "rss_mib_first": round(present[0][1][0], 1), "rss_mib_last": round(present[-1][1][0], 1),
            "rss_mib_max": round(max(v[0] for _, v in present), 1),
            "rss_mib_per_hour": round(slope_per_hour([(t, v[0]) for t, v in present]), 2),
            # the second half alone: a cache filling up levels off, a leak keeps its slope
            "rss_mib_per_hour_late": round(slope_per_hour([(t, v[0]) for t, v in present[len(present) // 2:]]), 2),
            "fds_first": present[0][1][1], "fds_last": present[-1][1][1], "fds_max": max(v[1] for _, v in present),
            "fds_per_hour": round(slope_per_hour([(t, float(v[1])) for t, v in present]), 2),
        }
    return {"minutes": args.minutes, "clients": args.clients, "samples": len(samples), "samples_after_warmup":
            len(kept), "warmup_s": round(cut, 1), "requests_ok": sum(tally.ok.values()), "ok": dict(tally.ok),
            "shed_with_retry_after": dict(tally.shed), "errors": {k: v for k, v in tally.errors.items() if v},
            "error_examples": tally.examples, "processes": figures}


def print_report(result: dict[str, Any]) -> None:
    print(f"\nsoak: {result['minutes']} min, {result['clients']} clients, {result['samples']} samples "
          f"({result['samples_after_warmup']} after a {result['warmup_s']} s warm-up)")
    print(f"requests ok: {result['requests_ok']}  {json.dumps(result['ok'])}")
    print(f"shed (429/503 with Retry-After): {json.dumps(result['shed_with_retry_after'])}")
    print(f"errors: {json.dumps(result['errors']) or 'none'}")
    for what, example in result["error_examples"].items():
        print(f"  {what}: {example}")
    print(f"{'process':<22}{'RSS MiB first':>14}{'last':>8}{'max':>8}{'MiB/h':>9}{'late':>7}{'fds first':>11}"
          f"{'last':>6}{'max':>6}{'fds/h':>8}")
    for kind, f in result["processes"].items():
        print(f"{kind:<22}{f['rss_mib_first']:>14}{f['rss_mib_last']:>8}{f['rss_mib_max']:>8}"
              f"{f['rss_mib_per_hour']:>9}{f['rss_mib_per_hour_late']:>7}{f['fds_first']:>11}{f['fds_last']:>6}"
              f"{f['fds_max']:>6}"
              f"{f['fds_per_hour']:>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run (default 30)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each chat (default 16)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the run left out of the slopes")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--skip", action="append", default=[], choices=("chat", "rag", "embeddings", "admin"),
                        help="leave a kind of call out (repeatable): which kind's data makes memory grow")
    parser.add_argument("--url", help="an installed appliance instead of a fresh server (with --key and --pid)")
    parser.add_argument("--key", help="with --url: an admin key")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for the samples")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--enforce", action="store_true", help="exit 1 on errors or slopes above the limits")
    parser.add_argument("--max-rss-slope", type=float, default=20.0, help="MiB per hour, total (default 20)")
    parser.add_argument("--max-fd-slope", type=float, default=10.0, help="descriptors per hour, total (default 10)")
    args = parser.parse_args(argv)
    if set(args.skip) >= {"chat", "rag", "embeddings", "admin"}:
        parser.error("--skip leaves no kind of call to make: skip three kinds at most")
    server = None
    if args.url:
        if not (args.key and args.pid):
            parser.error("--url needs --key and --pid")
        url, key, pid = args.url.rstrip("/"), args.key, args.pid
    else:
        data = Path(tempfile.mkdtemp(prefix="soak-")) / "data"
        appliance("init", data_dir=data)
        appliance("models", "pull", DEFAULT_MODEL, data_dir=data)
        key = new_key(data)
        server = ServerProcess(data).start()
        assert server.proc is not None
        url, pid = server.url, server.proc.pid
    try:
        tally, samples = asyncio.run(soak(url, key, pid, args))
    finally:
        if server is not None:
            server.stop()
    result = report(tally, samples, args)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    total = result["processes"].get("total", {})
    failed = bool(result["errors"]) or total.get("rss_mib_per_hour", 0) > args.max_rss_slope or \
        total.get("fds_per_hour", 0) > args.max_fd_slope
    return 1 if args.enforce and failed else 0


if __name__ == "__main__":
    sys.exit(main())
