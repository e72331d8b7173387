"""What authentication and quota checks add to a request, as a ratio to the request itself.

Two measurements in one run, on one data dir:
  in-process   the exact per-request work on the real services (file-backed SQLite, WAL): key check
               (parse, checksum, HMAC, row lookup), the role's permission, quota reserve + settle + headers,
               for an unlimited key and for a limited one
  end to end   through the real server: GET /healthz (public: no auth) against GET /api/me (auth + guard +
               a tiny handler), and a 1-token completion with an unlimited key against one with (high) limits

    .venv/bin/python -m tests.benchmarks.bench_auth [--rounds 2000] [--http-rounds 200] [--enforce]

Target (issue 3): auth + quota <= 1 ms p50 per request.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from appliance.auth.keys import ApiKeyService, derive_pepper
from appliance.auth.quotas import QuotaService
from appliance.auth.rbac import Rbac
from appliance.datadir import DataDir
from tests.server import DEFAULT_MODEL, ServerProcess, appliance

TARGET_MS = 1.0


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn: Callable[[], object], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def new_key(data: Path, *limits: str) -> str:
    return appliance("keys", "create", "--name", "bench", "--role", "user", *limits,
                     data_dir=data).stdout.strip().splitlines()[-1]


def in_process(data: Path, rounds: int) -> dict[str, list[float]]:
    unlimited, limited = new_key(data), new_key(data, "--rpm", "100000000", "--tpm", "1000000000")
    dd = DataDir(data)
    with contextlib.closing(dd.connect()) as conn:
        rbac = Rbac.load()
        keys = ApiKeyService(conn, derive_pepper(dd.read_master_key()), roles=rbac.roles)
        quotas = QuotaService(conn)

        def request(key: str) -> Callable[[], object]:
            header = f"Bearer {key}"

            def run() -> object:
                principal = keys.authenticate(header)
                assert rbac.allows(principal.role, "chat:use")
                reservation = quotas.reserve(principal.subject, principal.limits, 300)
                quotas.settle(reservation, 120)
                return reservation.status.headers()

            return run

        timed(request(limited), 50)  # warm the caches and the in-memory quota state
        return {"auth only (unlimited key)": timed(request(unlimited), rounds),
                "auth + quota (limited key)": timed(request(limited), rounds)}


def end_to_end(data: Path, rounds: int) -> dict[str, list[float]]:
    unlimited, limited = new_key(data), new_key(data, "--rpm", "100000000", "--tpm", "1000000000")
    server = ServerProcess(data).start()
    body = {"model": DEFAULT_MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    samples: dict[str, list[float]] = {name: [] for name in (
        "GET /healthz (no auth)", "GET /api/me (auth)", "completion, unlimited key", "completion, limited key")}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            def call(name: str, method: str, path: str, key: str | None, json: object = None) -> None:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                start = time.perf_counter()
                response = client.request(method, path, headers=headers, json=json)
                samples[name].append((time.perf_counter() - start) * 1000)
                assert response.status_code == 200, response.text

            for i in range(rounds + 5):  # interleaved, so both sides see the same machine
                call("GET /healthz (no auth)", "GET", "/healthz", None)
                call("GET /api/me (auth)", "GET", "/api/me", unlimited)
                call("completion, unlimited key", "POST", "/v1/completions", unlimited, body)
                call("completion, limited key", "POST", "/v1/completions", limited, body)
                if i == 4:
                    for values in samples.values():
                        values.clear()  # warm-up done
    finally:
        server.stop()
    return samples


def row(name: str, values: list[float]) -> str:
    return (f"| {name} | {statistics.median(values):.3f} | {percentile(values, 0.95):.3f} | "
            f"{percentile(values, 0.99):.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000, help="in-process iterations per case")
    parser.add_argument("--http-rounds", type=int, default=200, help="end-to-end iterations per case")
    parser.add_argument("--enforce", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="appliance-bench-auth-") as tmp:
        data = Path(tmp) / "data"
        appliance("init", data_dir=data)
        appliance("models", "pull", DEFAULT_MODEL, data_dir=data)
        local = in_process(data, args.rounds)
        http = end_to_end(data, args.http_rounds)
    print("\n## Auth and quota overhead per request\n")
    print("| measured | p50 ms | p95 ms | p99 ms |\n|---|---:|---:|---:|")
    for name, values in {**local, **http}.items():
        print(row(name, values))
    checks = statistics.median(local["auth + quota (limited key)"])
    completion = statistics.median(http["completion, unlimited key"])
    auth_http = statistics.median(http["GET /api/me (auth)"]) - statistics.median(http["GET /healthz (no auth)"])
    quota_http = statistics.median(http["completion, limited key"]) - completion
    print(f"\nauth + quota checks p50: {checks:.3f} ms (target <= {TARGET_MS} ms) "
          f"{'OK' if checks <= TARGET_MS else 'MISSED'}")
    print(f"as a share of a 1-token completion through the gateway (p50 {completion:.2f} ms): "
          f"{checks / completion:.4f}x")
    print(f"end to end, p50 differences: auth route vs public route {auth_http:+.3f} ms; "
          f"limited vs unlimited key {quota_http:+.3f} ms (noise is of the same order)")
    return 1 if args.enforce and checks > TARGET_MS else 0


if __name__ == "__main__":
    sys.exit(main())
