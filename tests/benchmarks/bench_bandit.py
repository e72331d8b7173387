"""The quality loop's statistics, simulated against the real code (issue 19, items 3, 4 and 6).

  bandit   requests until a bandit alias has moved 80% of its traffic off a target that is always rated -1 (its
           share in GET /api/aliases <= 0.2, from 0.5), through the real RolloutService routing and the real
           FeedbackService taking the ratings (SQLite in a temp dir; no worker runs: a request here is its routing,
           its ledger entry and its rating). Median and p90 over seeds, for a few rating mixes; then the bad
           target's actual share of the next 200 requests. Baseline in the same run: the same bandit with no
           exploration floor (pure Thompson sampling), which moves fastest and never looks back.
  canary   the sequential quality test (appliance.registry.quality, default settings) read after every rating of
           the canary, as the server does: the false-rollback rate when canary and production are equally good,
           and the detection delay (canary ratings until the rollback) when the canary is worse. Baseline in the
           same run: a one-sided two-proportion z-test at the same alpha read after every rating (what one gets by
           peeking at a fixed-sample test), whose false-rollback rate the sequential test is there to avoid. Last,
           a few canaries rated through the real RolloutService, to show the rollback path itself.

    .venv/bin/python -m tests.benchmarks.bench_bandit [--seeds 51] [--runs 500] [--horizon 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from appliance.config import RolloutSettings
from appliance.registry.quality import QualityTest, Ratings
from tests.quality_loop import QualityLoop

MAX_REQUESTS = 3000


def requests_to_move(loop: QualityLoop, seed: int, good_rate: float, rated: float, floor: float | None
                     ) -> tuple[int | None, float]:
    """Requests until the bad target's share is <= 0.2, and its actual share of the 200 requests after that."""
    loop.forget_ratings()
    loop.rollout.set_alias("arena", strategy="bandit", targets=["m@1", "m@2"], floor=floor, actor="bench")
    loop.rollout.rng = np.random.default_rng(seed)
    rng = random.Random(seed)

    def one() -> str:
        response, route = loop.serve("arena")
        if rng.random() < rated:
            loop.rate(response, -1 if route.ref == "m@2" else (1 if rng.random() < good_rate else -1))
        return route.ref

    alias = loop.registry.versions.alias("arena")
    assert alias is not None
    moved = None
    for n in range(1, MAX_REQUESTS + 1):
        one()
        if loop.rollout.alias_status(alias)["shares"]["m@2"] <= 0.2:
            moved = n
            break
    after = [one() for _ in range(200)] if moved else []
    return moved, (after.count("m@2") / len(after) if after else math.nan)


def summary(values: list[int | None]) -> str:
    found = sorted(v for v in values if v is not None)
    if not found:
        return "never"
    p90 = found[min(len(found) - 1, math.ceil(0.9 * len(found)) - 1)]
    missed = len(values) - len(found)
    return f"median {statistics.median(found):.0f}, p90 {p90}" + (f", {missed} never" if missed else "")


def bench_bandit(seeds: int) -> None:
    print(f"bandit: requests until 80% of the traffic is off a target always rated -1 ({seeds} seeds)")
    floor = RolloutSettings().bandit_floor
    with tempfile.TemporaryDirectory() as tmp, QualityLoop(Path(tmp)) as loop:
        for good_rate, rated in ((1.0, 1.0), (0.8, 1.0), (0.8, 0.3), (0.5, 1.0)):
            rows = {}
            for label, f in ((f"floor {floor}", None), ("no floor (baseline)", 0.0)):
                started = time.perf_counter()
                runs = [requests_to_move(loop, seed, good_rate, rated, f) for seed in range(seeds)]
                rows[label] = [r for r, _ in runs]
                after = [a for _, a in runs if not math.isnan(a)]
                print(f"  good target +1 {good_rate:.0%} of the time, {rated:.0%} of responses rated, {label}: "
                      f"{summary(rows[label])} requests; bad target's share of the next 200: "
                      f"{statistics.mean(after):.3f}  ({time.perf_counter() - started:.1f}s)")
            ours = [r for r in rows[f"floor {floor}"] if r is not None]
            base = [r for r in rows["no floor (baseline)"] if r is not None]
            if ours and base:
                ratio = statistics.median(ours) / statistics.median(base)
                print(f"    ratio of medians (floor / no floor): {ratio:.2f}")


def z_test(alpha: float, min_ratings: int) -> Callable[[Ratings, Ratings], bool]:
    """The baseline: a one-sided two-proportion z-test (pooled), as if read once, but read after every rating."""
    from statistics import NormalDist

    critical = NormalDist().inv_cdf(1 - alpha)

    def worse(canary: Ratings, production: Ratings) -> bool:
        if min(canary.total, production.total) < min_ratings:
            return False
        pooled = (canary.down + production.down) / (canary.total + production.total)
        spread = math.sqrt(pooled * (1 - pooled) * (1 / canary.total + 1 / production.total)) or 1e-12
        return (canary.down / canary.total - production.down / production.total) / spread >= critical

    return worse


def first_rollback(worse: Callable[[Ratings, Ratings], bool], canary_rate: float, production_rate: float,
                   share: float, horizon: int, seed: int) -> int | None:
    rng = random.Random(seed)
    canary, production = [0, 0], [0, 0]
    for _ in range(horizon):
        if rng.random() < share:
            canary[rng.random() < canary_rate] += 1
            if worse(Ratings(*canary), Ratings(*production)):
                return sum(canary)
        else:
            production[rng.random() < production_rate] += 1
    return None


def bench_canary(runs: int, horizon: int) -> None:
    s = RolloutSettings()
    test = QualityTest(s.quality_alpha, s.quality_tau, s.quality_margin, s.quality_min_ratings)
    tests = {"sequential (mSPRT)": lambda c, p: test.judge(c, p).decision == "worse",
             "peeking z-test (baseline)": z_test(s.quality_alpha, s.quality_min_ratings)}
    print(f"\ncanary: alpha {test.alpha}, tau {test.tau}, margin {test.margin}, min {test.min_ratings} ratings a "
          f"side; {runs} runs of up to {horizon} ratings in all, read after every canary rating")
    for share in (0.5, 0.1):
        for rate in (0.05, 0.2, 0.5):
            line = []
            for label, worse in tests.items():
                found = [first_rollback(worse, rate, rate, share, horizon, seed) for seed in range(runs)]
                line.append(f"{label} {sum(f is not None for f in found) / runs:.3f}")
            print(f"  equal -1 rates {rate:.2f}, canary share {share:.0%}: false rollbacks: {'; '.join(line)}")
    for share in (0.5, 0.1):
        for canary_rate, production_rate in ((0.3, 0.2), (0.4, 0.2), (0.6, 0.1), (1.0, 0.1)):
            found = [first_rollback(tests["sequential (mSPRT)"], canary_rate, production_rate, share, horizon, seed)
                     for seed in range(runs)]
            detected = sum(f is not None for f in found) / runs
            print(f"  canary {canary_rate:.2f} vs production {production_rate:.2f}, canary share {share:.0%}: "
                  f"detected {detected:.3f}; canary ratings until rollback: {summary(found)}")


def bench_canary_service(seeds: int) -> None:
    """Canaries rated -1 60% of the time against production's 10%, through RolloutService.rated: ratings of the
    canary until the server's own rollback ended the split."""

    async def one(seed: int) -> int | None:
        with tempfile.TemporaryDirectory() as tmp, QualityLoop(Path(tmp)) as loop:
            rng = random.Random(seed)
            loop.rollout.set_alias("chat", "m", canary=2, weight=50, actor="bench")
            canary = 0
            while canary < 2000:
                version = 2 if rng.random() < 0.5 else 1
                response = loop.serve(f"m@{version}")[0]
                canary += version == 2
                loop.rate(response, -1 if rng.random() < (0.6 if version == 2 else 0.1) else 1)
                await asyncio.sleep(0)
                alias = loop.registry.versions.alias("chat")
                if alias is not None and alias.weights is None:
                    assert loop.actions("model.rollback")[0]["details"]["trigger"] == "quality"
                    return canary
            return None

    found = [asyncio.run(one(seed)) for seed in range(seeds)]
    print(f"  through RolloutService (canary 0.6 vs 0.1, 50% share, {seeds} seeds): canary ratings until the "
          f"split ended: {summary(found)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=51)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--horizon", type=int, default=3000)
    args = parser.parse_args()
    bench_bandit(args.seeds)
    bench_canary(args.runs, args.horizon)
    bench_canary_service(min(args.seeds, 10))


if __name__ == "__main__":
    main()
