"""The alert rules as a Prometheus rules file, for people who run their own Prometheus: the same names, labels,
severities, `for` durations and annotations, each signal written in PromQL over the appliance's metric names.

Threshold rules translate exactly. Anomaly rules become a z-score of the signal against its mean and standard
deviation over the `baseline` window (Prometheus has no EWMA or median absolute deviation), with the same `z`,
`min_delta` and warm-up; capacity rules become `predict_linear` over the `window`. deploy/prometheus/appliance-rules.yml
is this module's output for policies/alerts.toml (`appliance alerts rules`); a test keeps the two in step and runs
`promtool check rules` on it."""

from __future__ import annotations

import json

from appliance.observability.alerts.rules import AlertRules, Rule, format_duration
from appliance.observability.alerts.signals import SIGNALS

HEADER = """\
# Generated from policies/alerts.toml by `appliance alerts rules`; do not edit by hand (a test compares them).
# Load it with `rule_files: [appliance-rules.yml]` in prometheus.yml, next to a scrape job for the appliance's
# /metrics (a bearer API key whose role grants metrics:read, e.g. the auditor role).
"""
RESOLUTION = "1m"  # the step of the subqueries that anomaly and capacity rules evaluate


def expression(rule: Rule) -> str:
    signal = f"({SIGNALS[rule.signal].promql})"
    if rule.kind == "threshold":
        return f"{signal} {_comparison(rule)}"
    if rule.kind == "capacity":
        window = format_duration(rule.window_seconds)
        return (f"predict_linear({signal}[{window}:{RESOLUTION}], {rule.horizon_seconds:g}) {_comparison(rule)}"
                + (f" and count_over_time({signal}[{format_duration(rule.warmup_seconds)}:{RESOLUTION}]) >= "
                   f"{max(2, int(rule.warmup_seconds // 60))}" if rule.warmup_seconds else ""))
    baseline = format_duration(rule.baseline_seconds)
    mean = f"avg_over_time({signal}[{baseline}:{RESOLUTION}])"
    spread = f"stddev_over_time({signal}[{baseline}:{RESOLUTION}])"
    deviation = f"({signal} - {mean})" if rule.direction == "up" else f"({mean} - {signal})"
    warm = max(2, int(rule.warmup_seconds // 60))
    return (f"{deviation} / {spread} > {rule.z:g} and {deviation} > {rule.min_delta:g} "
            f"and count_over_time({signal}[{baseline}:{RESOLUTION}]) >= {warm}")


def _comparison(rule: Rule) -> str:
    return f"> {rule.above:g}" if rule.above is not None else f"< {rule.below:g}"


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def rules_yaml(rules: AlertRules) -> str:
    lines = [HEADER.rstrip("\n"), "groups:", "  - name: appliance", "    rules:"]
    for rule in rules.rules:
        lines += [f"      - alert: {rule.name}", f"        expr: {_quote(expression(rule))}"]
        if rule.for_seconds:
            lines.append(f"        for: {format_duration(rule.for_seconds)}")
        lines += ["        labels:", f"          severity: {rule.severity}"]
        lines += [f"          {k}: {_quote(v)}" for k, v in sorted(rule.labels.items())]
        notes = {"summary": rule.summary, "description": rule.description, "kind": rule.kind,
                 "signal": rule.signal}
        lines.append("        annotations:")
        lines += [f"          {k}: {_quote(v)}" for k, v in notes.items() if v]
    return "\n".join(lines) + "\n"
