"""policies/alerts.toml: validated with the wrong line named, kept in step with the shipped Prometheus rules file
(which Debian's promtool accepts), and the Grafana dashboard over metric names the appliance exports."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from appliance.auth.quotas import QuotaService
from appliance.config import GatewaySettings, ModelSettings, SupervisorSettings
from appliance.db import migrate
from appliance.observability.alerts.promrules import rules_yaml
from appliance.observability.alerts.rules import (
    SHIPPED_ALERTS,
    AlertRules,
    AlertsError,
    format_duration,
    parse_duration,
)
from appliance.observability.alerts.signals import SIGNALS
from appliance.observability.alerts.state import HELP, AppState
from appliance.observability.metrics import Metrics
from appliance.resources import CHECKOUT
from appliance.supervisor.pool import WorkerPool

RULES_FILE = CHECKOUT / "deploy" / "prometheus" / "appliance-rules.yml"
DASHBOARD = CHECKOUT / "deploy" / "grafana" / "appliance.json"
# exported by the box, NVML and vLLM collectors (part A of issue 17, /work/notes/issue17-metrics.md) and Prometheus
EXTERNAL = {"DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "vllm:kv_cache_usage_perc", "appliance_gpu_xid_errors_total",
            "appliance_memory_available_bytes", "appliance_memory_total_bytes", "appliance_data_dir_disk_free_bytes",
            "appliance_data_dir_disk_total_bytes", "ALERTS"}


def test_the_shipped_rules_load_and_cover_the_issue() -> None:
    rules = AlertRules.load()
    kinds = {r.kind for r in rules.rules}
    assert kinds == {"threshold", "anomaly", "capacity"}
    watched = {r.signal for r in rules.rules}
    assert watched >= {"ttft_p95_seconds", "error_ratio", "queue_depth", "memory_available_ratio",
                       "gpu_memory_used_ratio", "kv_cache_usage_ratio", "disk_free_ratio", "disk_free_bytes",
                       "worker_restarts", "worker_stalled_seconds", "worker_up", "quota_used_ratio",
                       "audit_chain_ok"}
    anomalies = {r.signal for r in rules.rules if r.kind == "anomaly"}
    assert anomalies == {"ttft_p95_seconds", "inter_token_p95_seconds", "stream_tokens_per_second", "error_ratio"}
    stalled = next(r for r in rules.rules if r.name == "WorkerStalled")
    assert stalled.above is not None and stalled.above + stalled.for_seconds <= 40  # fires well within 60 s


@pytest.mark.parametrize(("change", "needle", "message"), [
    (('signal = "queue_depth"', 'signal = "queue_lenght"'), 'signal = "queue_lenght"', "unknown signal"),
    (('for = "2m"', 'for = "2 minutes"'), 'for = "2 minutes"', "is not a duration"),
    (('above = 16', 'above = "many"'), 'above = "many"', "Expected `float"),
    (('severity = "info"', 'severity = "page"'), 'severity = "page"', "Invalid enum value 'page'"),
    (('name = "QueueBacklog"', 'name = "Queue Backlog"'), 'name = "Queue Backlog"', "letters, digits"),
    (('name = "QueueBacklog"', 'name = "WorkerStalled"'), 'name = "WorkerStalled"', "used twice"),
    (('summary = "{{ $labels.model }}: {{ $value }} requests are waiting"',
      'summary = "{{ range .Alerts }}x{{ end }}"'), "{{ range", "only {{ $value }}"),
    (('z = 4\nmin_delta = 0.5', 'z = 4\nmin_delta = 0.5\nabove = 3'), "above = 3", "not `above`/`below`"),
    (('min_delta = 0.05\nbaseline = "1h"\nwarmup = "30m"\nfor = "10m"\nseverity = "warning"\nsummary = '
      '"{{ $labels.model }}: inter', 'min_delta = 0.05\nbaseline = "1h"\nwarmup = "30m"\nfor = "10m"\nseverity = '
      '"warning"\nwindow = "soon"\nsummary = "{{ $labels.model }}: inter'), 'window = "soon"', "window"),
    (('warmup = "1h"', 'warmup = "1h"\nhorizont = "2d"'), 'horizont = "2d"', "unknown field"),
])
def test_a_wrong_rule_names_its_line(change: tuple[str, str], needle: str, message: str) -> None:
    text = SHIPPED_ALERTS.read_text()
    assert change[0] in text
    broken = text.replace(change[0], change[1], 1)
    with pytest.raises(AlertsError) as caught:
        AlertRules.parse(broken, Path("alerts.toml"))
    # the first line that differs from the shipped text: the one changed or added
    line = next(i for i, (a, b) in enumerate(zip(text.splitlines(), broken.splitlines(), strict=False), 1) if a != b)
    assert needle in broken.splitlines()[line - 1]
    assert caught.value.line == line, (str(caught.value), line)
    assert f"alerts.toml line {line}:" in str(caught.value) and message in str(caught.value)


def test_missing_threshold_and_syntax_errors_are_located() -> None:
    with pytest.raises(AlertsError, match=r"line 4: rule X: give exactly one of `above` or `below`"):
        AlertRules.parse('version = 1\n\n[[rules]]\nname = "X"\nsignal = "queue_depth"\n')
    with pytest.raises(AlertsError, match="line 3: not valid TOML"):
        AlertRules.parse('version = 1\n[[rules]]\nname = \n')
    with pytest.raises(AlertsError, match="no alert rules at"):
        AlertRules.load("/nonexistent/alerts.toml")


def test_durations_read_and_write_as_prometheus_does() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration("0s") == 0 and parse_duration("250ms") == 0.25
    for bad in ("", "5", "1 h", "-5m", "5min"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
    assert [format_duration(s) for s in (0, 30, 90, 3600, 86400, 93784)] == ["0s", "30s", "1m30s", "1h", "1d",
                                                                               "1d2h3m4s"]


def test_the_prometheus_rules_file_is_generated_from_alerts_toml() -> None:
    assert RULES_FILE.read_text() == rules_yaml(AlertRules.load()), (
        "deploy/prometheus/appliance-rules.yml is out of step with policies/alerts.toml; run "
        "`appliance alerts rules --file policies/alerts.toml > deploy/prometheus/appliance-rules.yml`")
    text = RULES_FILE.read_text()
    for rule in AlertRules.load().rules:
        block = text.split(f"- alert: {rule.name}\n", 1)[1].split("- alert:", 1)[0]
        assert f"severity: {rule.severity}" in block
        assert (f"for: {format_duration(rule.for_seconds)}" in block) == bool(rule.for_seconds)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not found: it comes with Debian's "
                    "`prometheus` package (`apt-get install prometheus`; ./install.sh --test installs it)")
def test_promtool_accepts_the_rules_file() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(RULES_FILE)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(AlertRules.load().rules)} rules found" in result.stdout


def exported_names() -> set[str]:
    """The metric names /metrics carries: the app's metrics (as exposed, counters with _total) and AppState's."""
    metrics = Metrics()
    names = set(HELP)
    for metric in metrics.registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(metric.type, ("",))
        names |= {metric.name + s for s in suffixes}
    return names


def test_every_metric_the_rules_and_dashboard_use_is_exported() -> None:
    known = exported_names() | EXTERNAL
    expressions = [s.promql for s in SIGNALS.values()]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        expressions += [t["expr"] for t in panel.get("targets", [])]
    assert len(expressions) > 30
    functions = {"histogram_quantile", "sum", "rate", "increase", "max", "min", "count", "or", "and", "on", "by",
                 "vector", "predict_linear", "le", "model", "worker", "gpu", "subject", "route", "status", "mode",
                 "outcome", "cache", "alertstate", "alertname", "firing", "error", "exact"}
    for expr in expressions:
        for name in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", re.sub(r'"[^"]*"|\[[^\]]*\]|\$\w+', "", expr)):
            if name in functions or re.fullmatch(r"e\d*|[0-9]", name):
                continue
            assert name in known, f"{name!r} in {expr!r} is not a metric the appliance exports"


def app_state(metrics: Metrics, **options: Any) -> AppState:
    """The app state's gauges over a real pool (no worker started) and a quota service on an in-memory database."""

    async def no_worker(*_: object) -> object:
        raise AssertionError("not started here")

    pool = WorkerPool(ModelSettings(), GatewaySettings(), SupervisorSettings(), no_worker, metrics)  # type: ignore[arg-type]
    conn = sqlite3.connect(":memory:")
    migrate(conn)
    return AppState(metrics, pool, QuotaService(conn), **options)


def test_app_state_gauges_are_collected_in_the_registry() -> None:
    metrics = Metrics()
    state = app_state(metrics, memory_budget=1 << 30)
    metrics.registry.register(state)
    text = metrics.render().decode()
    assert "appliance_models_memory_budget_bytes 1.073741824e+09" in text
    assert "appliance_models_memory_reserved_bytes 0.0" in text
    assert "appliance_audit_chain_ok" not in text  # unknown until the first check
    state.audit_ok = False
    assert "appliance_audit_chain_ok 0.0" in metrics.render().decode()


def test_a_busy_worker_without_progress_is_stalled_and_its_decode_steps_count_as_progress() -> None:
    now = [0.0]
    metrics = Metrics()
    state = app_state(metrics, clock=lambda: now[0])
    slot = state.pool.slot("m@1")
    now[0] = 100
    assert state.stalled() == {"m@1": 0.0}  # idle is never stalled
    slot.in_use = 1
    assert state.stalled() == {"m@1": 0.0}
    now[0] = 120
    assert state.stalled() == {"m@1": 20.0}
    slot.health = {"status": "ok", "steps": 7}  # the health check saw the decode loop move
    now[0] = 125
    assert state.stalled() == {"m@1": 0.0}
    now[0] = 140
    assert state.stalled() == {"m@1": 15.0}
    metrics.inter_token.labels("m").observe(0.1)  # a streamed chunk of any version of the model
    assert state.stalled() == {"m@1": 0.0}
    slot.in_use, slot.waiting = 0, 1  # a queued request counts as held too
    now[0] = 175
    assert state.stalled() == {"m@1": 35.0}
    text = metrics.render().decode()
    assert 'appliance_worker_stalled_seconds{worker="m@1"}' not in text  # not registered in this test
    metrics.registry.register(state)
    assert 'appliance_worker_stalled_seconds{worker="m@1"} 35.0' in metrics.render().decode()
