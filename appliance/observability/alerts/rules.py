"""Alert rules (policies/alerts.toml): loaded and validated at start like the other policies; every error names the
file, the line and what to fix.

Three kinds of rule, each over one signal (appliance.observability.alerts.signals):
* `threshold`: the signal is above `above` (or below `below`) for the `for` duration;
* `anomaly`: the signal strays from its own baseline (an exponentially weighted mean, `baseline` its time constant)
  by more than `z` robust standard deviations (1.4826 x the median absolute deviation of recent residuals) and by at
  least `min_delta`, after a `warmup`, in `direction` "up" or "down";
* `capacity`: a straight line fitted to the signal over `window` crosses `below` (or `above`) within `horizon`.
Annotations may use Prometheus' `{{ $labels.NAME }}` and `{{ $value }}`, so the same text serves both."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec

from appliance.observability.alerts.signals import SIGNALS
from appliance.resources import shipped
from appliance.toml_lines import LocatedError, locate, syntax_error_line, validation_error_path

SHIPPED_ALERTS = shipped("policies/alerts.toml")

Kind = Literal["threshold", "anomaly", "capacity"]
Severity = Literal["info", "warning", "critical"]
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TEMPLATE = re.compile(r"\{\{(.*?)\}\}")
_TEMPLATE_PART = re.compile(r"^\s*\$(value|labels\.[A-Za-z_][A-Za-z0-9_]*)\s*$")
RESERVED_LABELS = frozenset({"alertname", "severity"})


class AlertsError(LocatedError):
    """The alert rules cannot be used; the message names the file, the line and what to fix."""


class RuleEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True, rename={"for_": "for"}):
    name: str
    signal: str
    kind: Kind = "threshold"
    severity: Severity = "warning"
    above: float | None = None
    below: float | None = None
    for_: str = "0s"
    summary: str = ""
    description: str = ""
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    # anomaly
    direction: Literal["up", "down"] = "up"
    z: float = 4.0
    min_delta: float = 0.0
    baseline: str = "1h"
    warmup: str = "30m"
    # capacity
    window: str = "6h"
    horizon: str = "24h"


class AlertsFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    version: Literal[1] = 1
    rules: list[RuleEntry] = msgspec.field(default_factory=list)


@dataclass(frozen=True)
class Rule:
    """A validated rule; durations in seconds."""

    name: str
    signal: str
    kind: Kind
    severity: Severity
    above: float | None
    below: float | None
    for_seconds: float
    summary: str
    description: str
    labels: dict[str, str] = field(default_factory=dict)
    direction: Literal["up", "down"] = "up"
    z: float = 4.0
    min_delta: float = 0.0
    baseline_seconds: float = 3600.0
    warmup_seconds: float = 1800.0
    window_seconds: float = 21600.0
    horizon_seconds: float = 86400.0


@dataclass(frozen=True)
class AlertRules:
    rules: tuple[Rule, ...]
    source: Path | None = None

    @classmethod
    def load(cls, path: str | Path = "") -> AlertRules:
        source = Path(path) if path else SHIPPED_ALERTS
        try:
            text = source.read_text()
        except FileNotFoundError:
            raise AlertsError(f"no alert rules at {source}; set alerts.rules_file to the path of alerts.toml") from None
        return cls.parse(text, source)

    @classmethod
    def parse(cls, text: str, source: str | Path = "alerts.toml") -> AlertRules:
        def fail(reason: str, line: int | None) -> AlertsError:
            return AlertsError(f"{source}{f' line {line}' if line else ''}: {reason}", line=line, reason=reason)

        try:
            parsed = msgspec.convert(tomllib.loads(text), AlertsFile)
        except tomllib.TOMLDecodeError as exc:
            raise fail(f"not valid TOML: {exc}", syntax_error_line(exc, text)) from exc
        except msgspec.ValidationError as exc:
            path, message = validation_error_path(exc)
            line = _rule_line(text, path) if path[:1] == ["rules"] else locate(text, path)
            raise fail(f"{'.'.join(path)}: {message}" if path else message, line) from exc
        rules: list[Rule] = []
        for index, entry in enumerate(parsed.rules):
            def at(key: str, i: int = index) -> int | None:
                return _rule_line(text, ["rules", str(i), key])
            try:
                rules.append(_validated(entry, {r.name for r in rules}))
            except _Invalid as exc:
                raise fail(f"rule {entry.name}: {exc.reason}", at(exc.key)) from None
        return cls(tuple(rules), Path(source) if isinstance(source, Path) else None)


class _Invalid(Exception):
    def __init__(self, reason: str, key: str) -> None:
        super().__init__(reason)
        self.reason, self.key = reason, key


def _validated(entry: RuleEntry, taken: set[str]) -> Rule:
    """The rule of one [[rules]] entry, or _Invalid naming what is wrong and the key it is about."""
    if not _NAME.match(entry.name):
        raise _Invalid("the name must be letters, digits and _ (a Prometheus alertname)", "name")
    if entry.name in taken:
        raise _Invalid("the name is used twice; names must be unique", "name")
    signal = SIGNALS.get(entry.signal)
    if signal is None:
        raise _Invalid(f"unknown signal {entry.signal!r}; known: {', '.join(SIGNALS)}", "signal")
    if entry.kind != "anomaly" and (entry.above is None) == (entry.below is None):
        raise _Invalid("give exactly one of `above` or `below`", "name")
    if entry.kind == "anomaly" and (entry.above is not None or entry.below is not None):
        raise _Invalid("an anomaly rule takes `direction`, `z` and `min_delta`, not `above`/`below`",
                       "above" if entry.above is not None else "below")
    if entry.z <= 0 or entry.min_delta < 0:
        raise _Invalid("`z` must be above 0 and `min_delta` at least 0", "z" if entry.z <= 0 else "min_delta")
    durations = {}
    for key in ("for_", "baseline", "warmup", "window", "horizon"):
        name = key.rstrip("_")
        try:
            durations[name] = parse_duration(getattr(entry, key))
        except ValueError as exc:
            raise _Invalid(f"{name}: {exc}", name) from None
    if entry.kind == "capacity" and durations["window"] <= 0:
        raise _Invalid("a capacity rule needs a `window` above 0", "window")
    _check_text(entry, signal.labels)
    return Rule(entry.name, entry.signal, entry.kind, entry.severity, entry.above, entry.below, durations["for"],
                entry.summary, entry.description, dict(entry.labels), entry.direction, entry.z, entry.min_delta,
                durations["baseline"], durations["warmup"], durations["window"], durations["horizon"])


def _check_text(entry: RuleEntry, signal_labels: tuple[str, ...]) -> None:
    for key in entry.labels:
        if not _NAME.match(key) or key in RESERVED_LABELS or key in signal_labels:
            raise _Invalid(f"label {key!r} is not a valid name or is set by the rule itself "
                           f"({', '.join(sorted(RESERVED_LABELS | set(signal_labels)))})", "labels")
    for key in ("summary", "description"):
        for part in _TEMPLATE.findall(getattr(entry, key)):
            if not _TEMPLATE_PART.match(part):
                raise _Invalid(f"{key}: only {{{{ $value }}}} and {{{{ $labels.NAME }}}} may appear between "
                               f"braces, not {{{{{part}}}}}", key)


def parse_duration(text: str) -> float:
    """Prometheus' durations: "30s", "5m", "1h30m", "0s"."""
    body = text.strip()
    parts = _DURATION.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise ValueError(f"{text!r} is not a duration; write e.g. \"30s\", \"5m\", \"1h30m\"")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """Seconds as Prometheus writes a duration: "90s" -> "1m30s", 0 -> "0s"."""
    if seconds <= 0:
        return "0s"
    out, rest = "", round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out


def _rule_line(text: str, path: list[str]) -> int | None:
    """The line of `rules[i].key` (or of the i-th [[rules]] header) in the document."""
    if len(path) < 2 or not path[1].isdigit():
        return locate(text, path)
    index, key = int(path[1]), path[2] if len(path) > 2 else None
    lines = text.splitlines()
    headers = [n for n, raw in enumerate(lines, start=1) if re.match(r"^\s*\[\[\s*rules\s*\]\]", raw)]
    if index >= len(headers):
        return None
    start = headers[index]
    end = headers[index + 1] if index + 1 < len(headers) else len(lines) + 1
    if key is not None:
        for number in range(start + 1, end):
            if re.match(rf"^\s*{re.escape(key)}\s*=", lines[number - 1]):
                return number
    return start
