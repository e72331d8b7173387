"""Bandit routing: Thompson sampling over an alias's targets, on the feedback their responses got.

Each arm (a target: a model's production version or `name@N`) has a Beta(1 + up, 1 + down + errors) posterior of
its chance of a good response: +1 ratings are successes, -1 ratings and failed requests (server errors, worker
failures) are failures. Per request, with probability `floor * K` a uniformly chosen arm serves (exploration: every
arm keeps at least `floor` of the traffic, so a version that improves, or one unlucky early, is seen again);
otherwise each arm's posterior is sampled once and the highest draw serves. An arm's share of the traffic is thus
`floor + (1 - K floor) * P(arm is best)`, which `shares` estimates by drawing the posteriors many times at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SHARE_DRAWS = 4000


@dataclass(frozen=True)
class ArmStats:
    """What one arm's responses got since the bandit was set: ratings and failed requests."""

    up: int = 0
    down: int = 0
    errors: int = 0

    @property
    def successes(self) -> int:
        return self.up

    @property
    def failures(self) -> int:
        return self.down + self.errors


def max_floor(arms: int) -> float:
    """The largest floor `arms` arms allow (all of them at the floor: a uniform split)."""
    return 1.0 / arms


def _posteriors(arms: Sequence[ArmStats]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([1.0 + a.successes for a in arms]), np.array([1.0 + a.failures for a in arms]))


def pick(arms: Sequence[ArmStats], floor: float, rng: np.random.Generator) -> int:
    """The index of the arm that serves the next request."""
    if not arms:
        raise ValueError("a bandit needs at least one arm")
    if rng.random() < floor * len(arms):
        return int(rng.integers(len(arms)))
    a, b = _posteriors(arms)
    return int(np.argmax(rng.beta(a, b)))


def shares(arms: Sequence[ArmStats], floor: float, rng: np.random.Generator,
           draws: int = SHARE_DRAWS) -> list[float]:
    """Each arm's expected share of the traffic (they sum to 1): `floor` plus its part of the rest, in proportion
    to its chance of drawing the highest sample (estimated from `draws` joint draws)."""
    if not arms:
        return []
    a, b = _posteriors(arms)
    samples = rng.beta(a[:, None], b[:, None], size=(len(arms), draws))
    best = np.bincount(np.argmax(samples, axis=0), minlength=len(arms)) / draws
    rest = 1.0 - floor * len(arms)
    return [float(floor + rest * p) for p in best]
