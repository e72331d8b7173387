"""What the gateway adds in front of a remote upstream: latency p50/p95 and CPU per request, gateway vs the same
upstream called directly, side by side in one run.

    .venv/bin/python -m tests.benchmarks.bench_remote [--requests 400] [--real-requests 60] [--no-real] [--enforce]

Phase 1, a fast upstream: tests/openai_standin.py in its own process (an OpenAI-compatible server that answers at
once), so that model time does not swamp the overhead. Phase 2 (unless --no-real): a real appliance serving the
default model (SmolLM2-135M on llama.cpp) with max_tokens=1 and the response cache off on both sides.

Contenders, interleaved in blocks of --block requests so both see the same machine conditions:
  direct    POST /v1/chat/completions straight to the upstream (httpx, one kept-alive connection)
  gateway   the same through the appliance's gateway, a `remote` model served by that upstream (auth, privacy,
            quotas, usage, metrics, the pool's routing), with an admin key
Each is run whole and streamed (SSE). The gateway runs with no local model loaded (models.pin_default = false), so
its process's CPU is the gateway's own. Target: at most 2 ms p50 added (LiteLLM's published overhead), phase 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.server import DEFAULT_MODEL, ServerProcess, appliance, free_port, new_key

TARGET_ADDED_P50_MS = 2.0
BUSY_LOAD = 0.5


@dataclass
class Side:
    name: str
    url: str
    model: str
    key: str | None
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by process role, summed over requests


def request_body(model: str, stream: bool, real: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Say hi"}], "stream": stream}
    if real:  # greedy, so both sides do the same work; never from either side's response cache
        body.update(max_tokens=1, temperature=0, cache="no-store")
    return body


def call(client: httpx.Client, side: Side, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    if body["stream"]:
        with client.stream("POST", side.url + "/chat/completions", json=body) as response:
            data = b"".join(response.iter_raw())
            if response.status_code != 200 or b"data: [DONE]" not in data:
                raise SystemExit(f"{side.name}: HTTP {response.status_code} {data[:300]!r}")
    else:
        response = client.post(side.url + "/chat/completions", json=body)
        if response.status_code != 200:
            raise SystemExit(f"{side.name}: HTTP {response.status_code} {response.text[:300]}")
    return time.perf_counter() - started


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for role, process in processes.items():
        with contextlib.suppress(psutil.Error):
            times = [process.cpu_times(), *(c.cpu_times() for c in process.children(recursive=True))]
            out[role] = sum(t.user + t.system for t in times)
    return out


def compare(direct: Side, gateway: Side, processes: dict[str, psutil.Process], requests: int, block: int,
            stream: bool, real: bool) -> None:
    clients = {s.name: httpx.Client(headers={"authorization": f"Bearer {s.key}"} if s.key else {}, timeout=120,
                                    trust_env=False) for s in (direct, gateway)}
    try:
        for side in (direct, gateway):  # warm-up: connections, the remote model's load, caches
            for _ in range(10):
                call(clients[side.name], side, request_body(side.model, stream, real))
        done = 0
        while done < requests:
            n = min(block, requests - done)
            for side in (direct, gateway) if (done // block) % 2 == 0 else (gateway, direct):
                body = request_body(side.model, stream, real)
                before = cpu_seconds(processes)
                side.latencies += [call(clients[side.name], side, body) for _ in range(n)]
                after = cpu_seconds(processes)
                for role in after:
                    side.cpu[role] = side.cpu.get(role, 0.0) + after[role] - before.get(role, after[role])
            done += n
    finally:
        for client in clients.values():
            client.close()


def ms(x: float) -> str:
    return f"{x * 1000:7.2f}"


def report(title: str, direct: Side, gateway: Side) -> float:
    d50, g50 = statistics.median(direct.latencies), statistics.median(gateway.latencies)
    d95 = statistics.quantiles(direct.latencies, n=20)[18]
    g95 = statistics.quantiles(gateway.latencies, n=20)[18]
    n = len(gateway.latencies)
    print(f"\n{title} ({n} requests each)")
    print(f"  {'':10} {'p50 ms':>8} {'p95 ms':>8}  CPU ms per request by process")
    for side, p50, p95 in ((direct, d50, d95), (gateway, g50, g95)):
        cpu = "  ".join(f"{role} {ms(seconds / len(side.latencies)).strip()}" for role, seconds in side.cpu.items())
        print(f"  {side.name:10} {ms(p50)} {ms(p95)}  {cpu}")
    added = g50 - d50
    gateway_cpu = (gateway.cpu.get("gateway", 0.0) - direct.cpu.get("gateway", 0.0)) / n
    print(f"  added by the gateway: p50 {added * 1000:.2f} ms (x{g50 / d50:.2f}), p95 {(g95 - d95) * 1000:.2f} ms, "
          f"gateway CPU {gateway_cpu * 1000:.2f} ms per request")
    return added


@contextlib.contextmanager
def standin_process() -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.openai_standin", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "listening on ..."
        yield f"http://127.0.0.1:{port}/v1", psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def gateway_server(data: Path, upstream: str, upstream_model: str, upstream_key: str | None) -> ServerProcess:
    appliance("models", "add-remote", "bench-remote", "--url", upstream, "--upstream-model", upstream_model,
              *(["--api-key-stdin"] if upstream_key else []), data_dir=data, input=(upstream_key or "") + "\n")
    env = {"APPLIANCE_MODELS__PIN_DEFAULT": "false", "APPLIANCE_LOGGING__LEVEL": "warning"}
    return ServerProcess(data, env).start(wait_ready=False)


def phase(title: str, upstream: str, upstream_model: str, upstream_key: str | None,
          extra: dict[str, psutil.Process], args: argparse.Namespace, real: bool, root: Path) -> list[float]:
    data = root / f"gateway-{len(list(root.iterdir()))}" / "data"
    appliance("init", data_dir=data)
    key = new_key(data)
    gateway = gateway_server(data, upstream, upstream_model, upstream_key)
    added = []
    try:
        assert gateway.proc is not None
        processes = {"gateway": psutil.Process(gateway.proc.pid), **extra}
        requests = args.real_requests if real else args.requests
        for stream in (False, True):
            direct = Side("direct", upstream, upstream_model, upstream_key)
            through = Side("gateway", gateway.url + "/v1", "bench-remote", key)
            compare(direct, through, processes, requests, args.block, stream, real)
            added.append(report(f"{title}, {'streamed' if stream else 'whole'}", direct, through))
    finally:
        gateway.stop()
    return added


def real_upstream(root: Path) -> tuple[ServerProcess, str]:
    data = root / "upstream" / "data"
    appliance("init", data_dir=data)
    appliance("models", "pull", DEFAULT_MODEL, data_dir=data)
    key = new_key(data)
    upstream = ServerProcess(data, {"APPLIANCE_CACHE__ENABLED": "false", "APPLIANCE_LOGGING__LEVEL": "warning"})
    return upstream.start(), key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per side and mode, fast upstream")
    parser.add_argument("--real-requests", type=int, default=60, help="requests per side and mode, real appliance")
    parser.add_argument("--block", type=int, default=20, help="requests in a row before the other side's turn")
    parser.add_argument("--no-real", action="store_true", help="skip the phase against a real appliance")
    parser.add_argument("--enforce", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"bench_remote: {psutil.cpu_count(logical=False)} cores, load average {load[0]:.2f} at the start"
          + ("  (busy box: the figures are noisy)" if load[0] > BUSY_LOAD * (psutil.cpu_count() or 1) else ""))
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        root = Path(tmp)
        with standin_process() as (url, standin):
            added = phase("fast upstream (tests/openai_standin.py)", url, "standin", None, {"upstream": standin},
                          args, False, root)
        if not args.no_real:
            upstream, key = real_upstream(root)
            try:
                assert upstream.proc is not None
                phase(f"real appliance upstream ({DEFAULT_MODEL}, max_tokens=1)", upstream.url + "/v1",
                      DEFAULT_MODEL, key, {"upstream": psutil.Process(upstream.proc.pid)}, args, True, root)
            finally:
                upstream.stop()
    worst = max(added)
    verdict = "met" if worst * 1000 <= TARGET_ADDED_P50_MS else "MISSED"
    print(f"\ntarget: <= {TARGET_ADDED_P50_MS} ms p50 added in front of a fast upstream: {verdict} "
          f"(worst {worst * 1000:.2f} ms); load average at the end {os.getloadavg()[0]:.2f}")
    return 1 if args.enforce and verdict != "met" else 0


if __name__ == "__main__":
    sys.exit(main())
