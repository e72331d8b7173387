"""Canaries judged on quality: the sequential test (appliance.registry.quality) on simulated rating streams, read
after every rating as the server does (a canary as good as production is rarely rolled back, a worse one soon, and
never on the first few ratings), and the rollback itself through the real rollout and feedback services: audited
like the error and latency rollbacks, and shown in the canary's status."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.registry.quality import QualityTest, Ratings
from tests.quality_loop import QualityLoop

TEST = QualityTest(alpha=0.05, tau=0.1, margin=0.0, min_ratings=20)


def first_rollback(test: QualityTest, canary_rate: float, production_rate: float, ratings: int, seed: int,
                   canary_share: float = 0.5) -> int | None:
    """Ratings of the canary when the test first says 'worse' (None: never within `ratings` ratings in all),
    reading the test after every canary rating."""
    rng = random.Random(seed)
    canary, production = [0, 0], [0, 0]  # up, down
    for _ in range(ratings):
        if rng.random() < canary_share:
            canary[rng.random() < canary_rate] += 1
            if test.judge(Ratings(*canary), Ratings(*production)).decision == "worse":
                return sum(canary)
        else:
            production[rng.random() < production_rate] += 1
    return None


def test_a_canary_as_good_as_production_is_rarely_rolled_back() -> None:
    runs = [first_rollback(TEST, 0.2, 0.2, 1000, seed) for seed in range(200)]
    false_rollbacks = sum(r is not None for r in runs) / len(runs)
    assert false_rollbacks <= TEST.alpha  # the documented error rate, under continuous monitoring


def test_a_worse_canary_is_rolled_back_soon_and_never_on_its_first_ratings() -> None:
    delays = [first_rollback(TEST, 0.6, 0.1, 2000, seed) for seed in range(100)]
    assert all(d is not None and TEST.min_ratings <= d <= 80 for d in delays)
    assert sorted(d for d in delays if d is not None)[50] <= 40


def test_a_better_canary_is_never_worse_and_the_minimum_holds_whatever_the_ratings() -> None:
    assert all(first_rollback(TEST, 0.1, 0.4, 2000, seed) is None for seed in range(50))
    waiting = TEST.judge(Ratings(0, 19), Ratings(100, 0))  # 19 ratings, all -1, against a spotless production
    assert (waiting.decision, waiting.difference) == ("waiting", None)
    assert TEST.judge(Ratings(0, 20), Ratings(100, 0)).decision == "worse"
    assert TEST.judge(Ratings(0, 20), Ratings(19, 0)).decision == "waiting"  # production needs its ratings too


@settings(max_examples=300, deadline=None)
@given(up=st.integers(0, 400), down=st.integers(0, 400), p_up=st.integers(0, 400), p_down=st.integers(0, 400),
       min_ratings=st.integers(1, 30), margin=st.sampled_from([0.0, 0.05]))
def test_only_a_higher_negative_rate_is_ever_worse(up: int, down: int, p_up: int, p_down: int, min_ratings: int,
                                                   margin: float) -> None:
    test = QualityTest(min_ratings=min_ratings, margin=margin)
    canary, production = Ratings(up, down), Ratings(p_up, p_down)
    verdict = test.judge(canary, production)
    assert test.judge(canary, canary).decision != "worse"
    if verdict.decision == "worse":
        assert min(canary.total, production.total) >= min_ratings
        assert (canary.negative_rate() or 0) > (production.negative_rate() or 0) + margin / 2
        assert verdict.e_value >= test.threshold
        assert test.judge(production, canary).decision != "worse"  # the roles swapped: production is not worse


def test_a_canary_rated_down_is_rolled_back_audited_and_its_status_shows_the_test(tmp_path: Path) -> None:
    async def main() -> None:
        with QualityLoop(tmp_path, quality_min_ratings=5) as loop:
            loop.rollout.set_alias("chat", "m", canary=2, weight=50, actor="key:admin")
            statuses = []
            for _ in range(200):
                response = loop.serve("m@2")[0]
                loop.rate(response, -1)
                loop.rate(loop.serve("m@1")[0], 1)
                statuses.append(loop.rollout.alias_status(loop.registry.versions.alias("chat"))  # type: ignore[arg-type]
                                .get("quality", {}).get("2"))
                await asyncio.sleep(0)  # the rollback runs as a task, as in the server
                if loop.registry.versions.alias("chat").weights is None:  # type: ignore[union-attr]
                    break
            assert loop.registry.versions.alias("chat").weights is None  # type: ignore[union-attr]
            assert statuses[0]["decision"] == "waiting" and statuses[0]["canary"] == {"up": 0, "down": 1}
            (record,) = loop.actions("model.rollback")
            assert (record["actor"], record["outcome"]) == ("supervisor", "ok")
            details = record["details"]
            assert details["trigger"] == "quality" and details["automatic"] is True
            assert details["canary_versions"] == [2] and details["aliases"] == ["chat"]
            assert details["canary_ratings"]["down"] >= 5 and details["production_ratings"]["up"] >= 5
            assert details["e_value"] >= details["threshold"] == 20.0
            assert "share of -1 ratings" in details["reason"]

    asyncio.run(main())


def test_a_canary_rated_like_production_stays(tmp_path: Path) -> None:
    async def main() -> None:
        with QualityLoop(tmp_path, quality_min_ratings=5) as loop:
            loop.rollout.set_alias("chat", "m", canary=2, weight=50, actor="key:admin")
            for n in range(60):
                for version in (1, 2):
                    loop.rate(loop.serve(f"m@{version}")[0], -1 if n % 4 == 0 else 1)
                await asyncio.sleep(0)
            assert loop.registry.versions.alias("chat").weights == {1: 50, 2: 50}  # type: ignore[union-attr]
            status = loop.rollout.alias_status(loop.registry.versions.alias("chat"))  # type: ignore[arg-type]
            assert status["quality"]["2"]["decision"] == "watching"
            assert status["quality"]["2"]["canary"] == status["quality"]["2"]["production"] == {"up": 45, "down": 15}
            assert loop.actions("model.rollback") == []

    asyncio.run(main())


@pytest.mark.parametrize("alpha", [0.01, 0.2])
def test_the_threshold_is_one_over_alpha(alpha: float) -> None:
    assert QualityTest(alpha=alpha).threshold == pytest.approx(1 / alpha)
