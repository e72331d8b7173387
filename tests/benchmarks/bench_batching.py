"""Continuous batching: the appliance (gateway with auth + batching llama.cpp worker) against llama.cpp's own C++
`llama-server`, same GGUF, same threads, same context per sequence, same prompts, in one run.

    .venv/bin/python -m tests.benchmarks.bench_batching [--concurrency 1,4,8] [--rounds 5] [--max-tokens 128]
        [--threads N] [--n-ctx 1024] [--n-batch 512] [--stream-interval-ms MS] [--model GGUF] [--llama-server PATH]
        [--defaults] [--prompts stories|rag] [--enforce]

--defaults runs each side at its own defaults (issue 16): the appliance with only the threads set (its slots,
context and batch sized by itself), llama-server with only the threads, the slots (the highest concurrency, else it
queues) and the context of a slot (--n-ctx) set. --prompts rag asks each stream to answer from sources it must
quote (where the appliance's prompt-lookup drafts help a stream decoding alone).

llama-server is built by tests/benchmarks/build_llama_server.sh from the llama.cpp vendored in the pinned
llama-cpp-python sdist (cached in .bench/), as upstream ships it: without the appliance's patches
(appliance/engines/patches/llama.cpp), whose effect is part of what is compared. Both servers run for the whole
benchmark with --parallel equal to the highest concurrency; at each concurrency, rounds alternate between the two
(the idle one uses no CPU). A round starts that many streaming chat completions at once, each with its own prompt,
each forced to exactly --max-tokens tokens (end-of-generation tokens banned with logit_bias), and measures aggregate
tokens/s (all tokens over the round's wall time) and every request's time to first token. The table shows medians
over rounds (tok/s) and p50/p95 over all requests (TTFT), with the appliance/llama-server ratio against the targets
of issue 6. The tok/s ratio checked is the median of the per-round ratios: the two sides of a round run back to
back, so a box whose speed drifts between rounds (a shared host) moves both; the ratio of the medians is shown
beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from appliance.config import LlamaCppSettings, physical_cores
from appliance.registry.sources import open_source, parse_source
from tests.server import DEFAULT_MODEL, ServerProcess, appliance, free_port

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "tests" / "benchmarks" / "build_llama_server.sh"
BENCH_MODEL = "bench-model"
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end-of-text and <|im_end|>; override with --ban
TOPICS = ["a lighthouse keeper", "a lost robot", "the first city on Mars", "a talking cat", "an old clockmaker",
          "a dragon who hates fire", "a deep-sea diver", "a village baker", "a time traveller", "a chess prodigy"]
# (concurrency, metric) -> (comparison, bound) from the issue: ratio = appliance / llama-server
TARGETS = {(8, "tok/s"): (">=", 1.1), (1, "tok/s"): (">=", 1.0), (8, "ttft p50"): ("<=", 1.0)}  # issue 16


class BenchmarkError(Exception):
    pass


@dataclass
class Contender:
    name: str
    url: str
    headers: dict[str, str]
    model: str
    rounds: dict[int, list[float]] = field(default_factory=dict)  # concurrency -> aggregate tok/s per round
    ttfts: dict[int, list[float]] = field(default_factory=dict)  # concurrency -> every request's TTFT


def prompt(i: int, kind: str = "stories") -> list[dict[str, str]]:
    topic = TOPICS[i % len(TOPICS)]
    if kind == "rag":
        sources = "\n".join(f"[{n}] Report {i}.{n} on {topic}: " + RAG_FACTS[(i + n) % len(RAG_FACTS)]
                             for n in range(1, 4))
        return [{"role": "system", "content": "Answer from the sources only. Quote each sentence you use word for "
                 "word, with its number in brackets."},
                {"role": "user", "content": f"{sources}\n\nQuestion {i}: what do the reports on {topic} say? "
                 "Quote them."}]
    return [{"role": "user", "content": f"Story {i}: tell me a long, detailed story about {topic}."}]


RAG_FACTS = ["The survey counted 412 households, of which 57 had no running water in the winter months.",
             "Maintenance costs rose from 18,000 to 26,500 euros between 2019 and 2023, mostly for the roof.",
             "The committee approved the plan on 14 March after two readings and a public consultation.",
             "Visitors must register at the front desk and wear the badge at all times inside the building.",
             "The pump station runs two diesel engines of 75 kW each and is inspected every six months."]


async def one_stream(client: httpx.AsyncClient, who: Contender, i: int, args: argparse.Namespace,
                     start: float) -> tuple[float, int]:
    """Stream one completion; returns (time to first text, completion tokens)."""
    body = {"model": who.model, "messages": prompt(i, args.prompts), "max_tokens": args.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "logit_bias": args.ban}
    ttft, tokens = -1.0, 0
    async with client.stream("POST", who.url + "/v1/chat/completions", json=body,
                             headers={**who.headers, "Cache-Control": "no-store"}) as response:
        if response.status_code != 200:
            raise BenchmarkError(f"{who.name}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft < 0 and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens != args.max_tokens:
        raise BenchmarkError(f"{who.name}: generated {tokens} tokens, not {args.max_tokens}: the logit_bias ban on "
                             "end-of-generation did not hold (pass --ban with this model's EOG token ids)")
    return ttft, tokens


async def one_round(who: Contender, concurrency: int, offset: int, args: argparse.Namespace) -> None:
    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, who, offset + i, args, start)
                                          for i in range(concurrency)))
        wall = time.perf_counter() - start
    who.rounds.setdefault(concurrency, []).append(sum(tokens for _, tokens in results) / wall)
    who.ttfts.setdefault(concurrency, []).extend(ttft for ttft, _ in results)


def run_rounds(contenders: list[Contender], args: argparse.Namespace) -> None:
    for who in contenders:  # warm-up: first-request costs (graph reservation, page faults) stay out of the table
        asyncio.run(one_round(who, 1, 10_000, args))
        who.rounds.clear()
        who.ttfts.clear()
    offset = 0
    for concurrency in args.concurrency:
        for r in range(args.rounds):
            order = contenders if r % 2 == 0 else contenders[::-1]
            for who in order:  # same prompts for both sides in a round; new prompts each round
                asyncio.run(one_round(who, concurrency, offset, args))
            offset += concurrency
            print(f"  concurrency {concurrency} round {r + 1}: " + ", ".join(
                f"{w.name} {w.rounds[concurrency][-1]:.1f} tok/s" for w in contenders), file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the two servers


@contextlib.contextmanager
def plain_gguf(args: argparse.Namespace, tmp: Path) -> Iterator[Path]:
    if args.model:
        yield Path(args.model).expanduser().resolve()
        return
    catalog = tomllib.loads((ROOT / "models" / "catalog.toml").read_text())
    target = tmp / "model.gguf"
    with open_source(parse_source(catalog["models"][DEFAULT_MODEL]["source"])) as download, target.open("wb") as fh:
        for block in download:
            fh.write(block)
    yield target


@contextlib.contextmanager
def appliance_server(gguf: Path, tmp: Path, args: argparse.Namespace) -> Iterator[Contender]:
    data = tmp / "data"
    appliance("init", data_dir=data)
    appliance("models", "pull", f"file:{gguf}", "--name", BENCH_MODEL, data_dir=data)
    key = appliance("keys", "create", "--name", "bench", "--role", "admin", data_dir=data).stdout.strip()
    env = {"APPLIANCE_MODELS__DEFAULT": BENCH_MODEL, "APPLIANCE_LLAMACPP__THREADS": str(args.threads),
           "APPLIANCE_GATEWAY__MAX_QUEUE": "64"}
    if not args.defaults:
        env |= {"APPLIANCE_LLAMACPP__N_CTX": str(args.n_ctx), "APPLIANCE_LLAMACPP__N_BATCH": str(args.n_batch),
                "APPLIANCE_LLAMACPP__PARALLEL": str(max(args.concurrency)), "APPLIANCE_LLAMACPP__FLASH_ATTN": "true"}
    if args.lookup:
        env["APPLIANCE_LLAMACPP__LOOKUP"] = args.lookup
    if args.stream_interval_ms is not None:
        env["APPLIANCE_LLAMACPP__STREAM_INTERVAL_MS"] = str(args.stream_interval_ms)
    server = ServerProcess(data, env)
    try:
        server.start(wait_ready=True)
        yield Contender("appliance", server.url, {"Authorization": f"Bearer {key.splitlines()[-1]}"}, BENCH_MODEL)
    finally:
        server.stop()


@contextlib.contextmanager
def reference_server(binary: Path, gguf: Path, args: argparse.Namespace,
                     extra: Sequence[str] = ()) -> Iterator[Contender]:
    """llama-server at the appliance's settings; `extra` arguments after them (e.g. --jinja)."""
    port = free_port()
    parallel = max(args.concurrency)
    argv = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
            "-tb", str(args.threads), "-c", str(args.n_ctx * parallel), "-np", str(parallel), "--no-webui",
            "--log-disable", *extra]
    if not args.defaults:
        argv += ["-b", str(args.n_batch), "-ub", str(args.n_batch), "-fa", "on"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                raise BenchmarkError(f"llama-server exited: {tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise BenchmarkError("llama-server did not become healthy in 300 s")
        yield Contender("llama-server", url, {}, "model")
    finally:
        proc.terminate()
        proc.wait(30)


def build_reference(args: argparse.Namespace) -> Path:
    if args.llama_server:
        return Path(args.llama_server)
    out = subprocess.run([str(BUILD_SCRIPT)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(app: Contender, ref: Contender, args: argparse.Namespace) -> bool:
    met = True
    sides = "each at its defaults" if args.defaults else f"n_ctx={args.n_ctx}/sequence, n_batch={args.n_batch}"
    print(f"\n## Continuous batching: appliance vs llama-server ({args.max_tokens} tokens per stream, "
          f"{args.prompts} prompts, threads={args.threads}, {sides}, appliance stream interval "
          f"{_interval(args)} ms, {args.rounds} rounds, load at end "
          f"{os.getloadavg()[0]:.1f})\n")
    print("| concurrency | appliance tok/s | llama-server tok/s | ratio per round (median) | ratio of medians "
          "| TTFT p50 app / ref (s) | ratio | TTFT p95 app / ref (s) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        tok = (statistics.median(app.rounds[c]), statistics.median(ref.rounds[c]))
        p50 = (percentile(app.ttfts[c], 0.5), percentile(ref.ttfts[c], 0.5))
        p95 = (percentile(app.ttfts[c], 0.95), percentile(ref.ttfts[c], 0.95))
        cells = [str(c)]
        paired = statistics.median(a / r for a, r in zip(app.rounds[c], ref.rounds[c], strict=True) if r)
        for metric, (a, r) in (("tok/s", tok), ("ttft p50", p50), ("ttft p95", p95)):
            ratio = paired if metric == "tok/s" else a / r if r else float("nan")
            mark = ""
            if (c, metric) in TARGETS:
                op, bound = TARGETS[c, metric]
                ok = ratio >= bound if op == ">=" else ratio <= bound
                met &= ok
                mark = f" {'ok' if ok else 'MISSED'} ({op} {bound})"
            if metric == "tok/s":
                cells += [f"{a:.1f}", f"{r:.1f}", f"{ratio:.2f}x{mark}", f"{a / r:.2f}x"]
            else:
                cells += [f"{a:.3f} / {r:.3f}", f"{ratio:.2f}x{mark}"]
        print("| " + " | ".join(cells) + " |")
    print("\nPer-round tok/s: " + "; ".join(
        f"c={c}: app {[round(x, 1) for x in app.rounds[c]]} ref {[round(x, 1) for x in ref.rounds[c]]}"
        for c in args.concurrency))
    return met


def _interval(args: argparse.Namespace) -> float:
    return args.stream_interval_ms if args.stream_interval_ms is not None else LlamaCppSettings().stream_interval_ms


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated concurrency levels (default 1,4,8)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per concurrency and side (default 5)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens streamed per request (default 128)")
    parser.add_argument("--threads", type=int, default=0, help="threads for both servers (default: physical cores)")
    parser.add_argument("--n-ctx", type=int, default=1024, help="context per sequence for both (default 1024)")
    parser.add_argument("--n-batch", type=int, default=512, help="batch size for both (default 512)")
    parser.add_argument("--stream-interval-ms", type=float, help="the appliance's llamacpp.stream_interval_ms "
                        "(default: its default; 0 = one SSE event per token, as llama-server sends)")
    parser.add_argument("--model", help="a GGUF for both sides (default: the catalog's default model)")
    parser.add_argument("--ban", default=json.dumps(NO_EOS),
                        help="logit_bias JSON banning end-of-generation tokens (default: SmolLM2's)")
    parser.add_argument("--llama-server", help="a llama-server binary (default: build or reuse .bench/'s)")
    parser.add_argument("--defaults", action="store_true", help="each side at its own defaults (see above)")
    parser.add_argument("--prompts", choices=("stories", "rag"), default="stories",
                        help="stories (default) or RAG-style answers that quote their sources")
    parser.add_argument("--lookup", choices=("auto", "on", "off"), help="the appliance's llamacpp.lookup "
                        "(default: its default, auto)")
    parser.add_argument("--enforce", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.threads = args.threads or physical_cores()
    args.ban = json.loads(args.ban)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    binary = build_reference(args)
    with tempfile.TemporaryDirectory(prefix="appliance-bench-batching-") as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        gguf = stack.enter_context(plain_gguf(args, tmp))
        app = stack.enter_context(appliance_server(gguf, tmp, args))
        ref = stack.enter_context(reference_server(binary, gguf, args))
        run_rounds([app, ref], args)
        met = report(app, ref, args)
    return 0 if met or not args.enforce else 1


if __name__ == "__main__":
    raise SystemExit(main())
