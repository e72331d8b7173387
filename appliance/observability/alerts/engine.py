"""The rule engine: evaluates the alert rules over the signals' history and keeps each alert's lifecycle as
Prometheus does: a condition that starts to hold makes a *pending* alert, which *fires* once it has held for the
rule's `for` duration and is *resolved* when it stops holding (a pending one is dropped). An alert is one rule and one
set of labels; its fingerprint is Alertmanager's hash of those labels (FNV-1a 64 over the sorted names and values),
so the same alert has the same fingerprint here, in the API and in Alertmanager.

Pure: the clock and the signal values come in as arguments, so tests drive it with numbers, without sleeping."""

from __future__ import annotations

import math
import re
import statistics
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from appliance.observability.alerts.rules import Rule
from appliance.observability.alerts.signals import SIGNALS, History, Labels, Series

State = Literal["pending", "firing", "resolved"]
KEEP_RESOLVED = 900.0  # resolved alerts are re-sent for 15 minutes, as Prometheus does
MAD_SCALE = 1.4826  # MAD x this = the standard deviation of normally distributed values
MAX_RESIDUALS = 360
MIN_RESIDUALS = 5
CAPACITY_POINTS = 120
_TEMPLATE = re.compile(r"\{\{\s*\$(value|labels\.([A-Za-z_][A-Za-z0-9_]*))\s*\}\}")


def fingerprint(labels: dict[str, str]) -> str:
    """Alertmanager's fingerprint of a label set (prometheus/common model.LabelSet.Fingerprint)."""
    h = 14695981039346656037
    for name in sorted(labels):
        for chunk in (name.encode(), b"\xff", labels[name].encode(), b"\xff"):
            for byte in chunk:
                h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def render(template: str, labels: dict[str, str], value: float) -> str:
    def one(match: re.Match[str]) -> str:
        return _number(value) if match.group(1) == "value" else labels.get(match.group(2), "")
    return _TEMPLATE.sub(one, template)


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def iso(at: float | None) -> str | None:
    return None if at is None else datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Alert:
    rule: Rule
    labels: dict[str, str]
    active_at: float  # when the condition started to hold
    value: float
    state: State = "pending"
    fired_at: float | None = None
    resolved_at: float | None = None
    last_sent: float | None = None
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = fingerprint(self.labels)

    @property
    def annotations(self) -> dict[str, str]:
        notes = {"summary": render(self.rule.summary, self.labels, self.value),
                 "description": render(self.rule.description, self.labels, self.value)}
        return {k: v for k, v in notes.items() if v}

    def to_dict(self) -> dict[str, object]:
        notes = self.annotations
        return {"name": self.rule.name, "state": self.state, "severity": self.rule.severity,
                "labels": dict(self.labels), "annotations": notes, "summary": notes.get("summary", ""),
                "value": self.value if math.isfinite(self.value) else None, "fingerprint": self.fingerprint,
                "active_at": iso(self.active_at), "since": iso(self.fired_at or self.active_at),
                "resolved_at": iso(self.resolved_at)}


@dataclass
class Baseline:
    """One series' robust baseline: an exponentially weighted mean and the recent residuals around it."""

    first_at: float
    last_at: float
    mean: float
    residuals: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_RESIDUALS))

    def spread(self) -> float:
        if len(self.residuals) < MIN_RESIDUALS:
            return math.inf
        middle = statistics.median(self.residuals)
        return MAD_SCALE * statistics.median(abs(r - middle) for r in self.residuals)


@dataclass
class Trend:
    points: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, at: float, value: float, window: float) -> None:
        if not self.points or at - self.points[-1][0] >= window / CAPACITY_POINTS:
            self.points.append((at, value))
        while self.points and self.points[0][0] < at - window:
            self.points.popleft()

    def predict(self, at: float) -> float | None:
        """Least squares over the points, extrapolated to `at`; None with fewer than 3 points."""
        if len(self.points) < 3:
            return None
        xs, ys = [p[0] for p in self.points], [p[1] for p in self.points]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx == 0:
            return None
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        return my + slope * (at - mx)


class RuleState:
    """A rule's memory between evaluations: anomaly baselines or capacity trends, per series."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.baselines: dict[Labels, Baseline] = {}
        self.trends: dict[Labels, Trend] = {}

    def matches(self, values: Series, now: float) -> Series:
        """The series for which the rule's condition holds now, with the value an alert reports."""
        rule = self.rule
        if rule.kind == "threshold":
            return {k: v for k, v in values.items() if _crosses(rule, v)}
        if rule.kind == "capacity":
            found: Series = {}
            for labels, value in values.items():
                trend = self.trends.setdefault(labels, Trend())
                trend.add(now, value, rule.window_seconds)
                if trend.points[-1][0] - trend.points[0][0] < rule.warmup_seconds:
                    continue
                predicted = trend.predict(now + rule.horizon_seconds)
                if predicted is not None and _crosses(rule, predicted):
                    found[labels] = predicted
            for gone in set(self.trends) - set(values):
                del self.trends[gone]
            return found
        return self._anomalies(values, now)

    def _anomalies(self, values: Series, now: float) -> Series:
        rule = self.rule
        found: Series = {}
        for labels, value in values.items():
            base = self.baselines.get(labels)
            if base is None:
                self.baselines[labels] = Baseline(now, now, value)
                continue
            residual = value - base.mean
            spread = base.spread()
            deviation = residual if rule.direction == "up" else -residual
            warm = now - base.first_at >= rule.warmup_seconds and math.isfinite(spread)
            anomalous = warm and deviation > rule.min_delta and (
                deviation > rule.z * spread if spread > 0 else deviation > 0)
            if anomalous:
                found[labels] = value
            # learn, but let an outlier move the baseline only as far as z spreads: an ongoing anomaly must not
            # become the new normal within minutes
            bound = rule.z * spread if math.isfinite(spread) and spread > 0 else abs(residual)
            clipped = max(-bound, min(bound, residual)) if warm else residual
            alpha = 1 - math.exp(-max(0.0, now - base.last_at) / rule.baseline_seconds)
            base.mean += alpha * clipped
            base.residuals.append(clipped)
            base.last_at = now
        stale = [k for k, b in self.baselines.items() if now - b.last_at > 2 * rule.baseline_seconds]
        for labels in stale:
            del self.baselines[labels]
        return found


def _crosses(rule: Rule, value: float) -> bool:
    if rule.above is not None:
        return value > rule.above
    return rule.below is not None and value < rule.below


class RuleEngine:
    """All rules' alerts, stepped once per evaluation with the history's newest snapshot."""

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.states = [RuleState(rule) for rule in rules]
        self.alerts: dict[tuple[str, Labels], Alert] = {}

    def step(self, history: History, now: float) -> list[Alert]:
        """Evaluate every rule at `now`; returns the alerts that started firing or were resolved in this step."""
        changed: list[Alert] = []
        for state in self.states:
            rule = state.rule
            matching = state.matches(SIGNALS[rule.signal].compute(history), now)
            for labels, value in matching.items():
                key = (rule.name, labels)
                alert = self.alerts.get(key)
                if alert is None or alert.state == "resolved":
                    alert = self.alerts[key] = Alert(rule, {**rule.labels, **dict(labels), "alertname": rule.name,
                                                            "severity": rule.severity}, now, value)
                alert.value = value
                if alert.state == "pending" and now - alert.active_at >= rule.for_seconds:
                    alert.state, alert.fired_at = "firing", now
                    changed.append(alert)
            for key, alert in list(self.alerts.items()):
                if key[0] != rule.name or key[1] in matching:
                    continue
                if alert.state == "pending":
                    del self.alerts[key]
                elif alert.state == "firing":
                    alert.state, alert.resolved_at = "resolved", now
                    changed.append(alert)
                elif alert.resolved_at is not None and now - alert.resolved_at > KEEP_RESOLVED:
                    del self.alerts[key]
        return changed

    def active(self) -> list[Alert]:
        """Pending and firing alerts, firing first, then by severity and age."""
        order = {"critical": 0, "warning": 1, "info": 2}
        return sorted((a for a in self.alerts.values() if a.state != "resolved"),
                      key=lambda a: (a.state != "firing", order[a.rule.severity], a.active_at, a.rule.name))
