"""Bandit routing: the Thompson sampler (properties with hypothesis), and bandit aliases through the real registry,
rollout and feedback services (tests/quality_loop.py): traffic moves off a target rated -1, failed requests count
against their target, the shares show with the floor, bad bodies are refused, and strategy changes are audited."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import InvalidRequest, ModelNotFound
from appliance.registry.bandit import ArmStats, max_floor, pick, shares
from tests.quality_loop import QualityLoop

counts = st.integers(min_value=0, max_value=500)
arms_st = st.lists(st.builds(ArmStats, counts, counts, st.integers(min_value=0, max_value=50)), min_size=1,
                   max_size=6)


@settings(max_examples=60, deadline=None)
@given(arms=arms_st, floor_part=st.floats(min_value=0, max_value=1), seed=st.integers(0, 2**32 - 1))
def test_shares_sum_to_one_and_respect_the_floor(arms: list[ArmStats], floor_part: float, seed: int) -> None:
    floor = floor_part * max_floor(len(arms))
    found = shares(arms, floor, np.random.default_rng(seed), draws=2000)
    assert sum(found) == pytest.approx(1.0)
    assert all(s >= floor - 1e-9 for s in found)
    assert 0 <= pick(arms, floor, np.random.default_rng(seed)) < len(arms)


@settings(max_examples=40, deadline=None)
@given(up=counts, down=counts, extra=st.integers(min_value=20, max_value=300), seed=st.integers(0, 2**32 - 1))
def test_more_failures_never_raise_an_arms_share(up: int, down: int, extra: int, seed: int) -> None:
    """Two arms alike but for `extra` failures of the first: the first never gets more than half (up to the noise
    of the estimate), and the share it loses grows with the evidence."""
    first = shares([ArmStats(up, down + extra), ArmStats(up, down)], 0.05, np.random.default_rng(seed), draws=4000)
    assert first[0] <= 0.5 + 0.03
    assert first[0] <= first[1] + 0.06


def test_picks_follow_the_shares_and_a_hopeless_arm_keeps_only_the_floor() -> None:
    rng = np.random.default_rng(7)
    arms = [ArmStats(up=30, down=10), ArmStats(up=20, down=20), ArmStats(up=0, down=500)]
    expected = shares(arms, 0.05, rng, draws=20000)
    picked = Counter(pick(arms, 0.05, rng) for _ in range(20000))
    for i, share in enumerate(expected):
        assert picked[i] / 20000 == pytest.approx(share, abs=0.02)
    assert expected[2] == pytest.approx(0.05, abs=0.005)  # the floor, and no more
    assert shares(arms, 0.0, rng)[2] == 0.0
    with pytest.raises(ValueError, match="at least one arm"):
        pick([], 0.05, rng)


def test_a_target_always_rated_down_loses_its_traffic(tmp_path: Path) -> None:
    with QualityLoop(tmp_path, seed=3) as loop:
        alias = loop.rollout.set_alias("arena", strategy="bandit", targets=["m@1", "m@2"], actor="key:admin")
        assert (alias.strategy, alias.targets, alias.model, alias.version) == ("bandit", ("m@1", "m@2"), "m", 1)
        served = []
        for _ in range(150):
            response, route = loop.serve("arena")
            assert route.alias == "arena" and route.ref in ("m@1", "m@2")
            assert loop.rate(response, -1 if route.ref == "m@2" else 1)["served_model"] == route.ref
            served.append(route.ref)
        assert 2 <= served.count("m@2") <= 40  # it was tried (and keeps the floor), then left
        assert served[-50:].count("m@2") <= 15
        status = loop.rollout.alias_status(loop.registry.versions.alias("arena"))  # type: ignore[arg-type]
        assert status["shares"]["m@2"] < 0.1 and status["floor"] == 0.05
        arms = {a["target"]: a for a in status["arms"]}
        assert arms["m@2"]["down"] == served.count("m@2") and arms["m@2"]["up"] == 0
        assert arms["m@1"]["up"] == served.count("m@1")
        loop.rollout.refresh_metrics()
        gauge = loop.metrics.get_sample_value("appliance_alias_share", {"alias": "arena", "target": "m@2"})
        assert gauge is not None and gauge < 0.1


def test_failed_requests_count_against_the_target_that_served_them(tmp_path: Path) -> None:
    with QualityLoop(tmp_path, seed=5) as loop:
        loop.rollout.set_alias("arena", strategy="bandit", targets=["m", "m@2"], floor=0.0, actor="key:admin")
        loop.serve("arena")  # the arms are known once the alias has routed a request
        for _ in range(40):
            loop.rollout.observe("m@2", True, 0.1)
            loop.rollout.observe("m@1", False, 0.1)
        status = loop.rollout.alias_status(loop.registry.versions.alias("arena"))  # type: ignore[arg-type]
        assert {a["target"]: (a["served"], a["errors"]) for a in status["arms"]} == {"m": ("m@1", 0),
                                                                                     "m@2": ("m@2", 40)}
        assert status["shares"]["m@2"] < 0.05
        assert Counter(loop.serve("arena")[1].ref for _ in range(100))["m@2"] < 20


def test_bad_bandit_bodies_are_refused_and_strategy_changes_are_audited(tmp_path: Path) -> None:
    with QualityLoop(tmp_path, versions=3) as loop:
        r = loop.rollout

        def refused(param: str, **body: object) -> None:
            with pytest.raises((InvalidRequest, ModelNotFound)) as caught:
                r.set_alias("arena", actor="key:admin", **body)  # type: ignore[arg-type]
            assert caught.value.param == param, caught.value.message

        refused("strategy", strategy="thompson", targets=["m@1", "m@2"])
        refused("targets", strategy="bandit")
        refused("targets", strategy="bandit", targets=["m@1"])
        refused("targets", strategy="bandit", targets=["m@1", "m@1"])
        refused("targets", strategy="bandit", targets=["m@1", "nope"])
        refused("targets", strategy="bandit", targets=["m@1", "m@9"])
        refused("targets", strategy="bandit", targets=["m@1", "m@x"])
        refused("floor", strategy="bandit", targets=["m@1", "m@2"], floor=0.6)
        refused("floor", strategy="bandit", targets=["m@1", "m@2"], floor=-0.1)
        refused("canary", strategy="bandit", targets=["m@1", "m@2"], canary=2)
        refused("targets", target="m", targets=["m@1", "m@2"])
        refused("target")
        assert loop.registry.versions.alias("arena") is None  # nothing half-written
        r.set_alias("arena", "m", actor="key:admin")
        r.set_alias("arena", strategy="bandit", targets=["m@1", "m@2", "m@3"], floor=0.1, actor="key:admin")
        with pytest.raises(Exception, match="routed to by the alias arena"):
            loop.registry.remove("m@3", actor="key:admin")
        r.set_alias("arena", "m@2", actor="key:admin")
        assert loop.registry.versions.alias("arena").strategy == "static"  # type: ignore[union-attr]
        records = [x for x in loop.actions("model.alias") if x["outcome"] == "ok"]
        assert [(x["details"]["from_strategy"], x["details"]["strategy"]) for x in records] == [
            (None, "static"), ("static", "bandit"), ("bandit", "static")]
        assert records[1]["details"]["targets"] == ["m@1", "m@2", "m@3"] and records[1]["details"]["floor"] == 0.1
        assert sum(1 for x in loop.actions("model.alias") if x["outcome"] != "ok") == 12  # every refusal too
