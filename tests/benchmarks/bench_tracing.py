"""What tracing costs the gateway: CPU seconds of the gateway process per streamed token, tracing on (exporting to
an OTLP/HTTP receiver in this process) vs off, and off vs the code from before tracing was added.

    .venv/bin/python -m tests.benchmarks.bench_tracing [--rounds 7] [--requests 4] [--max-tokens 64]
                                                       [--before REV | --no-before]

Three real `appliance serve` processes run side by side on copies of one data dir with the default model, each with
its own llama.cpp worker (one thread, one SSE event per token: the relay loop runs once per token, its worst case):
  off     this checkout, no OTLP endpoint
  on      this checkout, [telemetry] endpoint = the receiver (every request sampled and exported)
  before  the tree of REV (default: the commit before tracing came, f2535c7~1) run from a `git archive` of it
          through PYTHONPATH, with the same interpreter and packages
Each round every contender streams --requests chats (temperature 0, not cached), all contenders at the same time
(on a shared box the load changes from minute to minute, and contenders measured in turn would see different loads;
`--one-at-a-time` streams them in turn, starting one further along the list each round). Per round and contender:
the gateway's own CPU time (every thread of the server process, not its worker) over the completion tokens its usage
reported. The ratios are per round; their medians are the figures. Targets: on/off <= 1.03; off/before not
measurable (within the rounds' spread).
The box's load average is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from tests.otlp import OtlpReceiver
from tests.server import DEFAULT_MODEL, ServerProcess, appliance, clone_data_dir, new_key

REPO = Path(__file__).resolve().parents[2]
TARGET_ON_RATIO = 1.03
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
ENGINE_ENV = {"APPLIANCE_LLAMACPP__THREADS": "1", "APPLIANCE_LLAMACPP__PARALLEL": "1",
              "APPLIANCE_LLAMACPP__STREAM_INTERVAL_MS": "0", "APPLIANCE_CACHE__ENABLED": "false"}


@dataclass
class Contender:
    name: str
    server: ServerProcess
    key: str
    cpu_per_token: list[float] = field(default_factory=list)  # one figure per round
    tokens: int = 0

    def gateway_cpu(self) -> float:
        assert self.server.proc is not None
        return process_cpu(self.server.proc.pid)

    def stream(self, client: httpx.Client, max_tokens: int) -> int:
        body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
                "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        tokens = 0
        with client.stream("POST", self.server.url + "/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {self.key}", "Cache-Control": "no-store"}) as response:
            if response.status_code != 200:
                raise SystemExit(f"{self.name}: {response.status_code} {response.read()!r}")
            for line in response.iter_lines():
                if line.startswith("data: {") and (usage := json.loads(line[6:]).get("usage")):
                    tokens = int(usage["completion_tokens"])
        return tokens

    def round(self, client: httpx.Client, requests: int, max_tokens: int) -> None:
        before, tokens = self.gateway_cpu(), 0
        for _ in range(requests):
            tokens += self.stream(client, max_tokens)
        self.cpu_per_token.append((self.gateway_cpu() - before) / max(tokens, 1))
        self.tokens += tokens


def process_cpu(pid: int) -> float:
    """CPU seconds of every live thread of `pid`, in nanoseconds' resolution from the scheduler's accounting
    (/proc/PID/task/*/schedstat); psutil's user + system (10 ms ticks: a round of a few hundred ms would be
    measured in steps of several per cent) where schedstat is not available. The gateway's threads (the event loop,
    the span exporter, the thread pool) live as long as the server."""
    total, found = 0, False
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(stat.read_text().split()[0])
            found = True
    if found and total > 0:
        return total / 1e9
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def export_tree(rev: str, target: Path) -> Path:
    """The appliance package (and models/, policies/) as they were at `rev`, for PYTHONPATH."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, "appliance", "models",
                              "policies", "webui"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


@contextlib.contextmanager
def servers(args: argparse.Namespace, receiver: OtlpReceiver, tmp: Path) -> Iterator[list[Contender]]:
    template = tmp / "template"
    appliance("init", data_dir=template)
    appliance("models", "pull", DEFAULT_MODEL, data_dir=template)
    variants: list[tuple[str, dict[str, str]]] = [
        ("off", {}),
        ("on", {"APPLIANCE_TELEMETRY__ENDPOINT": receiver.endpoint}),
    ]
    if args.before:
        old = export_tree(args.before, tmp / "before-tree")
        variants.append(("before", {"PYTHONPATH": os.pathsep.join([str(old), os.environ.get("PYTHONPATH", "")])}))
    started: list[Contender] = []
    try:
        for name, env in variants:
            data = clone_data_dir(template, tmp / name)
            key = new_key(data)
            server = ServerProcess(data, {**ENGINE_ENV, **env})
            started.append(Contender(name, server, key))
            server.start(wait_ready=True, timeout=600)  # a loaded box loads models slowly
        yield started
    finally:
        for contender in started:
            contender.server.stop()


def ratios(a: Contender, b: Contender) -> list[float]:
    return [x / y for x, y in zip(a.cpu_per_token, b.cpu_per_token, strict=True) if y > 0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=4, help="streamed chats per contender per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--before", default="f2535c7~1", help="the revision without tracing ('' = leave it out)")
    parser.add_argument("--no-before", dest="before", action="store_const", const="")
    parser.add_argument("--one-at-a-time", dest="together", action="store_false",
                        help="contenders stream in turn (default: at the same time, so that a round's contenders share "
                             "the same load of a shared box; each server's CPU is its own either way)")
    args = parser.parse_args()
    load_start = os.getloadavg()
    with OtlpReceiver() as receiver, tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp, \
            servers(args, receiver, Path(tmp)) as contenders, httpx.Client(timeout=300) as client:
        for contender in contenders:  # warm-up: the first requests load code paths and caches
            contender.stream(client, 8)
        for r in range(args.rounds):
            if args.together:  # all at once: each round's contenders share the same load of the box
                with ThreadPoolExecutor(len(contenders)) as pool:
                    for done in [pool.submit(c.round, client, args.requests, args.max_tokens) for c in contenders]:
                        done.result()
                continue
            for contender in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
                contender.round(client, args.requests, args.max_tokens)
        spans = len(receiver.spans)
    by_name = {c.name: c for c in contenders}
    print(f"bench_tracing: {args.rounds} rounds x {args.requests} streamed chats x {args.max_tokens} tokens, "
          f"{DEFAULT_MODEL}, one SSE event per token; load average {load_start[0]:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end; {psutil.cpu_count()} CPUs; {spans} spans received")
    print(f"{'contender':<10} {'gateway CPU us/token (median)':>30} {'min':>8} {'max':>8} {'tokens':>8}")
    for c in contenders:
        us = [x * 1e6 for x in c.cpu_per_token]
        print(f"{c.name:<10} {statistics.median(us):>30.1f} {min(us):>8.1f} {max(us):>8.1f} {c.tokens:>8}")
    on_off = ratios(by_name["on"], by_name["off"])
    print(f"on/off     median {statistics.median(on_off):.3f}  per round {' '.join(f'{x:.3f}' for x in on_off)}  "
          f"target <= {TARGET_ON_RATIO}")
    if "before" in by_name:
        off_before = ratios(by_name["off"], by_name["before"])
        spread = statistics.pstdev(off_before)
        print(f"off/before median {statistics.median(off_before):.3f}  per round "
              f"{' '.join(f'{x:.3f}' for x in off_before)}  (rounds' spread {spread:.3f}: not measurable when "
              f"|median - 1| is within it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
