"""n > 1 and logprobs on the appliance's llama.cpp worker, through the real server (gateway, auth, worker).

    .venv/bin/python -m tests.benchmarks.bench_n_choices [--rounds 5] [--max-tokens 48] [--prompt-words 300]
        [--n 4] [--threads N] [--n-ctx 0] [--model GGUF]

1. One request with n=4 against four separate requests of the same prompt sent at once: the n choices share one
   prefill (the followers copy the leader's KV cells), the separate requests each compute the prompt. Every
   completion is forced to exactly --max-tokens tokens (end-of-generation banned with logit_bias), tokens are
   counted from `usage`, each side of each round has a prompt of its own (else the second side would find the
   first side's prompt in the worker's prefix cache), and the two sides run back to back in alternating order; the
   figure is the median of the per-round ratios (n=4 tok/s over separate tok/s), which a shared box's drifting
   speed moves on both sides alike.
2. The time cost of logprobs: one greedy request with `logprobs: true, top_logprobs: 5` (and 20) against the same
   without, alternating; the figure is the median per-round ratio of wall times (with / without).

--n-ctx 0 is the appliance's default (the model's trained length, capped at 8192 tokens per sequence): with a KV
buffer per sequence llama.cpp copies a whole buffer to share a prompt, so the copy grows with n_ctx.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from appliance.config import physical_cores
from tests.benchmarks.bench_batching import NO_EOS, BenchmarkError, Contender, appliance_server, plain_gguf

WORDS = ("river mountain lantern harbour meadow orchard glacier canyon village market bridge forest island desert "
         "library garden castle tower valley lake").split()


def prompt(round_: int, words: int) -> list[dict[str, str]]:
    """A long shared context (a new one each time: nothing finds it cached) and a short question."""
    context = " ".join(WORDS[(round_ * 7 + i * 3) % len(WORDS)] for i in range(words))
    return [{"role": "system", "content": f"Notes {round_}: {context}"},
            {"role": "user", "content": "Write a short story that uses the words in the notes."}]


async def complete(client: httpx.AsyncClient, who: Contender, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(who.url + "/v1/chat/completions", json={"model": who.model, **body},
                                 headers={**who.headers, "Cache-Control": "no-store"})
    if response.status_code != 200:
        raise BenchmarkError(f"HTTP {response.status_code}: {response.text[:300]}")
    reply: dict[str, Any] = response.json()
    return reply


async def n_side(who: Contender, args: argparse.Namespace, round_: int, together: bool) -> float:
    """tok/s of n choices: one request with n, or n separate requests at once."""
    base = {"messages": prompt(2 * round_ + together, args.prompt_words), "max_tokens": args.max_tokens,
            "temperature": 1.0, "logit_bias": NO_EOS}
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=args.n + 1)) as client:
        start = time.perf_counter()
        if together:
            replies = [await complete(client, who, {**base, "n": args.n, "seed": round_})]
        else:
            replies = await asyncio.gather(*(complete(client, who, {**base, "seed": round_ + i})
                                             for i in range(args.n)))
        wall = time.perf_counter() - start
    tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    if tokens != args.n * args.max_tokens:
        raise BenchmarkError(f"generated {tokens} tokens, not {args.n} x {args.max_tokens}")
    return tokens / wall


async def logprobs_side(who: Contender, args: argparse.Namespace, round_: int, top: int | None) -> float:
    """Wall time of one greedy completion, with `top` alternatives per token or without logprobs (each with a
    prompt of its own, which no request before it computed)."""
    which = (None, 5, 20).index(top) if top in (None, 5, 20) else 3
    body: dict[str, Any] = {"messages": prompt(1000 + 4 * round_ + which, 20), "max_tokens": args.max_tokens,
                            "temperature": 0,
                            "logit_bias": NO_EOS}
    if top is not None:
        body |= {"logprobs": True, "top_logprobs": top}
    async with httpx.AsyncClient(timeout=900) as client:
        start = time.perf_counter()
        reply = await complete(client, who, body)
        wall = time.perf_counter() - start
    if top is not None and len(reply["choices"][0]["logprobs"]["content"]) != args.max_tokens:
        raise BenchmarkError("a logprob entry per token was expected")
    return wall


def paired(first: list[float], second: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(first, second, strict=True))


def run(who: Contender, args: argparse.Namespace) -> None:
    asyncio.run(n_side(who, args, 10_000, True))  # warm-up: first-request costs stay out of the figures
    together: list[float] = []
    separate: list[float] = []
    for r in range(args.rounds if not args.logprobs_only else 0):
        for side in ((True, False) if r % 2 == 0 else (False, True)):
            (together if side else separate).append(asyncio.run(n_side(who, args, r, side)))
        print(f"  round {r + 1}: n={args.n} in one request {together[-1]:.1f} tok/s, {args.n} separate requests "
              f"{separate[-1]:.1f} tok/s", file=sys.stderr, flush=True)
    plain: list[float] = []
    with_lp: dict[int, list[float]] = {5: [], 20: []}
    for r in range(args.rounds):
        sides: list[int | None] = [None, 5, 20] if r % 2 == 0 else [20, 5, None]
        for top in sides:
            wall = asyncio.run(logprobs_side(who, args, r, top))
            (plain if top is None else with_lp[top]).append(wall)
        print(f"  round {r + 1}: greedy {plain[-1]:.2f} s, logprobs top 5 {with_lp[5][-1]:.2f} s, top 20 "
              f"{with_lp[20][-1]:.2f} s", file=sys.stderr, flush=True)
    if together:
        report_n(together, separate, args)
    print(f"\n## logprobs cost ({args.max_tokens} greedy tokens, one request)\n")
    print("| request | wall s (median) | with / without (median per round) |")
    print("|---|---|---|")
    print(f"| no logprobs | {statistics.median(plain):.2f} | 1.00x |")
    for top, walls in with_lp.items():
        print(f"| logprobs, top_logprobs={top} | {statistics.median(walls):.2f} | {paired(walls, plain):.2f}x |")


def report_n(together: list[float], separate: list[float], args: argparse.Namespace) -> None:
    print(f"\n## n={args.n} in one request vs {args.n} separate requests ({args.max_tokens} tokens per choice, "
          f"prompt of {args.prompt_words} words, threads={args.threads}, n_ctx={args.n_ctx or 'default'}, "
          f"{args.rounds} rounds, load at end {os.getloadavg()[0]:.1f})\n")
    print("| side | tok/s (median) | per round |")
    print("|---|---|---|")
    print(f"| n={args.n}, one request | {statistics.median(together):.1f} | {[round(x, 1) for x in together]} |")
    print(f"| {args.n} separate requests | {statistics.median(separate):.1f} | {[round(x, 1) for x in separate]} |")
    print(f"\nn={args.n} / separate, median of per-round ratios: {paired(together, separate):.2f}x")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per comparison (default 5)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per choice (default 48)")
    parser.add_argument("--prompt-words", type=int, default=300, help="words of shared context (default 300)")
    parser.add_argument("--n", type=int, default=4, help="choices per request (default 4)")
    parser.add_argument("--threads", type=int, default=0, help="worker threads (default: physical cores)")
    parser.add_argument("--n-ctx", type=int, default=0, help="context per sequence (default 0: the appliance's)")
    parser.add_argument("--model", help="a GGUF (default: the catalog's default model)")
    parser.add_argument("--logprobs-only", action="store_true", help="measure the logprobs cost alone")
    args = parser.parse_args(argv)
    args.threads = args.threads or physical_cores()
    args.concurrency = [args.n]  # the worker's parallel (bench_batching's appliance_server reads these)
    args.n_batch = 512
    args.stream_interval_ms = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="appliance-bench-n-") as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        gguf = stack.enter_context(plain_gguf(args, tmp))
        run(stack.enter_context(appliance_server(gguf, tmp, args)), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
