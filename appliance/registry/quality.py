"""Canaries judged on quality: is a canary's share of negative ratings worse than production's? A sequential test
that may be looked at after every rating without inflating its error rate.

The test is the mixture sequential probability ratio test (mSPRT) of Johari, Pekelis and Walsh, "Always Valid
Inference: Continuous Monitoring of A/B Tests" (Operations Research, 2022), on the difference of two proportions
with the normal approximation they use for A/B tests. With `d` the canary's negative rate minus production's, its
estimate `d_hat` of variance `V` (each rate smoothed by half a rating per side, so that an arm with no -1 yet still
has a variance), and a normal mixture N(margin, tau^2) over the alternatives,

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 * (d_hat - margin)^2 / (2 V (V + tau^2)))

is a test martingale under H0 (d = margin), so by Ville's inequality the chance that it *ever* reaches 1/alpha is at
most alpha: a canary as good as production (up to `margin`) is rolled back with probability at most alpha however
often the test is read. Only the canary-is-worse side counts (`d_hat > margin`), which halves that bound. The bound
is asymptotic (the normal approximation); ratings start counting only once both sides have `min_ratings`, and
tests/benchmarks/bench_bandit.py measures the false-rollback rate and the detection delay with the real function."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Decision = Literal["waiting", "watching", "worse"]


@dataclass(frozen=True)
class Ratings:
    """Ratings of one version's responses: +1 (`up`) and -1 (`down`)."""

    up: int = 0
    down: int = 0

    @property
    def total(self) -> int:
        return self.up + self.down

    def negative_rate(self) -> float | None:
        return self.down / self.total if self.total else None


@dataclass(frozen=True)
class QualityTest:
    """The test's settings: error rate `alpha`, mixture scale `tau` (the size of difference it is tuned to find),
    the tolerated `margin`, and the ratings each side needs before the test is read."""

    alpha: float = 0.05
    tau: float = 0.1
    margin: float = 0.0
    min_ratings: int = 20

    @property
    def threshold(self) -> float:
        return 1.0 / self.alpha

    def judge(self, canary: Ratings, production: Ratings) -> QualityVerdict:
        if min(canary.total, production.total) < self.min_ratings:
            return QualityVerdict(canary, production, None, 0.0, self, "waiting")
        difference = _smoothed(canary) - _smoothed(production)
        log_e = log_mixture_ratio(difference - self.margin, _variance(canary) + _variance(production), self.tau)
        worse = difference > self.margin and log_e >= math.log(self.threshold)
        return QualityVerdict(canary, production, difference, math.exp(min(log_e, 700.0)), self,
                              "worse" if worse else "watching")


@dataclass(frozen=True)
class QualityVerdict:
    canary: Ratings
    production: Ratings
    difference: float | None  # the canary's negative rate minus production's (smoothed); None while waiting
    e_value: float  # the mixture likelihood ratio; the canary is worse once it reaches 1/alpha
    test: QualityTest
    decision: Decision

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.decision,
                "canary": {"up": self.canary.up, "down": self.canary.down},
                "production": {"up": self.production.up, "down": self.production.down},
                "difference": None if self.difference is None else round(self.difference, 4),
                "e_value": round(self.e_value, 4), "threshold": round(self.test.threshold, 4),
                "min_ratings": self.test.min_ratings, "margin": self.test.margin}


def log_mixture_ratio(shift: float, variance: float, tau: float) -> float:
    """log Lambda for an estimate `shift` away from H0 with variance `variance`, mixture N(0, tau^2)."""
    spread = variance + tau * tau
    return 0.5 * math.log(variance / spread) + tau * tau * shift * shift / (2.0 * variance * spread)


def _smoothed(r: Ratings) -> float:
    return (r.down + 0.5) / (r.total + 1.0)


def _variance(r: Ratings) -> float:
    p = _smoothed(r)
    return p * (1.0 - p) / (r.total + 1.0)
