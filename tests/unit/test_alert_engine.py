"""The alert rule engine with injected times and values: thresholds with `for`, the EWMA/MAD anomaly baseline and
its warm-up, the linear capacity prediction, the pending/firing/resolved lifecycle, fingerprints, and what the
service audits and hands to delivery."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter

from appliance.audit import AuditLog
from appliance.config import AlertSettings
from appliance.observability.alerts.delivery import alertmanager_alert, webhook_message
from appliance.observability.alerts.engine import RuleEngine, fingerprint
from appliance.observability.alerts.rules import AlertRules, Rule
from appliance.observability.alerts.service import AlertService, metric_snapshot, read_alerts_file
from appliance.observability.alerts.signals import (
    DISK_FREE,
    RESTARTS,
    SAMPLES,
    SIGNALS,
    STALLED,
    TTFT,
    WORKER_REQUESTS,
    History,
    Snapshot,
    labels_of,
)


class Recording(dict[str, dict[tuple[tuple[str, str], ...], float]]):
    """A snapshot that notes every sample name a signal asks it for."""

    asked: ClassVar[set[str]] = set()

    def get(self, name: str, default: object = None) -> object:  # type: ignore[override]
        Recording.asked.add(name)
        return super().get(name, default)


def test_snapshots_keep_the_samples_every_signal_reads_and_nothing_else() -> None:
    history = History()
    for at in (0.0, 400.0):
        history.add(at, Recording())
    for signal in SIGNALS.values():
        signal.compute(history)
    assert Recording.asked and Recording.asked <= SAMPLES  # a signal reading an unkept sample would see nothing

    registry = CollectorRegistry()
    Counter(WORKER_REQUESTS.removesuffix("_total"), "", ["worker", "outcome"], registry=registry).labels(
        "m@1", "ok").inc(3)
    per_key = Counter("appliance_requests_by_key", "", ["key"], registry=registry)  # a label set that grows
    for n in range(50):
        per_key.labels(f"key-{n}").inc()
    snapshot = metric_snapshot(registry)
    assert snapshot == {WORKER_REQUESTS: {labels_of({"worker": "m@1", "outcome": "ok"}): 3.0}}


def rules(text: str) -> tuple[Rule, ...]:
    return AlertRules.parse("version = 1\n" + text).rules


def stalled(**workers: float) -> Snapshot:
    return {STALLED: {labels_of({"worker": w.replace("_", "@")}): v for w, v in workers.items()}}


class Clocked:
    """An engine and its history stepped at given times with given snapshots."""

    def __init__(self, text: str) -> None:
        self.engine = RuleEngine(rules(text))
        self.history = History()

    def at(self, now: float, snapshot: Snapshot) -> list[tuple[str, str, dict[str, str]]]:
        self.history.add(now, snapshot)
        return [(a.rule.name, a.state, a.labels) for a in self.engine.step(self.history, now)]

    def states(self) -> dict[str, str]:
        return {a.labels.get("worker") or a.labels.get("model") or a.rule.name: a.state
                for a in self.engine.alerts.values()}


STALL_RULE = """
[[rules]]
name = "WorkerStalled"
signal = "worker_stalled_seconds"
above = 30
for = "20s"
severity = "critical"
summary = "{{ $labels.worker }} stalled for {{ $value }} s"
"""


def test_a_threshold_must_hold_for_its_duration_before_firing_and_resolves_when_it_stops() -> None:
    c = Clocked(STALL_RULE)
    assert c.at(0, stalled(m_1=10)) == []
    assert c.at(10, stalled(m_1=31)) == [] and c.states() == {"m@1": "pending"}
    assert c.at(20, stalled(m_1=41)) == []  # held for 10 s of 20
    fired = c.at(30, stalled(m_1=51))
    assert fired == [("WorkerStalled", "firing", {"worker": "m@1", "alertname": "WorkerStalled",
                                                  "severity": "critical"})]
    alert = next(iter(c.engine.alerts.values()))
    assert alert.annotations == {"summary": "m@1 stalled for 51 s"} and alert.active_at == 10 and alert.fired_at == 30
    assert c.at(40, stalled(m_1=61)) == []  # still firing: no new transition
    assert c.at(50, stalled(m_1=0)) == [("WorkerStalled", "resolved", alert.labels)]
    assert alert.resolved_at == 50 and c.engine.active() == []


def test_a_condition_that_stops_before_its_for_duration_is_dropped_without_firing() -> None:
    c = Clocked(STALL_RULE)
    c.at(0, stalled(m_1=40))
    assert c.at(10, stalled(m_1=0)) == [] and c.engine.alerts == {}
    c.at(20, stalled(m_1=40))
    assert c.engine.active()[0].active_at == 20  # a new pending alert counts from its own start


def test_series_are_separate_alerts_with_stable_label_fingerprints() -> None:
    c = Clocked(STALL_RULE.replace('for = "20s"', 'for = "0s"'))
    fired = c.at(0, stalled(a_1=40, b_2=45, c_3=1))
    assert sorted(labels["worker"] for _, _, labels in fired) == ["a@1", "b@2"]
    first = {a.labels["worker"]: a.fingerprint for a in c.engine.alerts.values()}
    c.at(10, stalled(a_1=0, b_2=45))
    c.at(20, stalled(a_1=40, b_2=45))  # a@1 fires again: a new alert with the same labels and fingerprint
    again = {a.labels["worker"]: a.fingerprint for a in c.engine.alerts.values()}
    assert first == again and first["a@1"] != first["b@2"]
    assert first["a@1"] == fingerprint({"worker": "a@1", "alertname": "WorkerStalled", "severity": "critical"})


def test_fingerprints_are_alertmanagers_fnv1a_of_sorted_labels() -> None:
    assert fingerprint({}) == "cbf29ce484222325"  # FNV-1a 64's offset basis: Alertmanager's empty label set
    assert fingerprint({"b": "2", "a": "1"}) == fingerprint({"a": "1", "b": "2"})
    assert fingerprint({"a": "1"}) != fingerprint({"a": "2"}) != fingerprint({"a2": ""})
    assert len(fingerprint({"alertname": "x"})) == 16


def test_resolved_alerts_are_kept_for_15_minutes_then_forgotten() -> None:
    c = Clocked(STALL_RULE.replace('for = "20s"', 'for = "0s"'))
    c.at(0, stalled(m_1=40))
    c.at(10, stalled(m_1=0))
    assert [a.state for a in c.engine.alerts.values()] == ["resolved"]
    c.at(10 + 900, stalled(m_1=0))
    assert c.engine.alerts  # kept for re-sending
    c.at(10 + 901, stalled(m_1=0))
    assert not c.engine.alerts


def test_counter_increase_over_a_window_fires_on_a_restart_and_resolves_after_the_window() -> None:
    c = Clocked("""
[[rules]]
name = "WorkerRestarted"
signal = "worker_restarts"
above = 0
""")
    series = labels_of({"model": "m"})
    for t in range(0, 60, 10):
        assert c.at(t, {RESTARTS: {series: 0.0}}) == []
    assert c.at(60, {RESTARTS: {series: 1.0}})[0][:2] == ("WorkerRestarted", "firing")
    for t in range(70, 660, 10):
        assert c.at(t, {RESTARTS: {series: 1.0}}) == []
    assert c.at(670, {RESTARTS: {series: 1.0}})[0][1] == "resolved"  # the restart left the 10-minute window


def test_windowed_quantile_and_error_ratio_need_enough_observations() -> None:
    c = Clocked("""
[[rules]]
name = "Slow"
signal = "ttft_p95_seconds"
above = 10

[[rules]]
name = "Errors"
signal = "error_ratio"
above = 0.1
""")

    def reading(slow: int, fast: int, ok: int, errors: int) -> Snapshot:
        bounds = ["1.0", "10.0", "30.0", "+Inf"]
        counts = [fast, fast, fast + slow, fast + slow]
        return {f"{TTFT}_bucket": {labels_of({"model": "m", "le": b}): float(n) for b, n in zip(bounds, counts,
                                                                                                  strict=True)},
                WORKER_REQUESTS: {labels_of({"worker": "m@1", "outcome": "ok"}): float(ok),
                                  labels_of({"worker": "m@1", "outcome": "error"}): float(errors)}}

    assert c.at(0, reading(0, 0, 0, 0)) == []
    assert c.at(10, reading(4, 0, 3, 1)) == []  # 4 slow requests and 4 requests: too few to judge
    fired = {name for name, _, _ in c.at(20, reading(5, 0, 8, 2))}
    assert fired == {"Slow", "Errors"}
    assert c.engine.alerts[("Slow", labels_of({"model": "m"}))].value > 10
    assert math.isclose(c.engine.alerts[("Errors", labels_of({"worker": "m@1"}))].value, 0.2)


ANOMALY = """
[[rules]]
name = "TtftAnomaly"
kind = "anomaly"
signal = "worker_stalled_seconds"
direction = "up"
z = 4
min_delta = 0.5
baseline = "1h"
warmup = "30m"
"""


def test_anomaly_stays_quiet_through_warm_up_and_noise_then_fires_on_a_jump_and_keeps_its_baseline() -> None:
    c = Clocked(ANOMALY)
    rng = random.Random(7)
    t = 0
    for _ in range(200):  # 200 samples 10 s apart: normal values around 2 s, noise of +-0.2 s
        assert c.at(t, stalled(m_1=2 + rng.uniform(-0.2, 0.2))) == []
        t += 10
    assert c.at(t, stalled(m_1=5.0))[0][:2] == ("TtftAnomaly", "firing")  # a jump of 3 s, many MADs
    for _ in range(60):  # ten minutes of the anomaly: the baseline moves only as far as z spreads allow
        t += 10
        c.at(t, stalled(m_1=5.0))
    assert c.engine.active()[0].state == "firing"
    baseline = c.engine.states[0].baselines[labels_of({"worker": "m@1"})]
    assert baseline.mean < 3.0
    t += 10
    assert c.at(t, stalled(m_1=2.0))[0][1] == "resolved"


def test_anomaly_warm_up_keeps_a_young_series_quiet() -> None:
    c = Clocked(ANOMALY)
    for t in range(0, 1800, 10):
        assert c.at(t, stalled(m_1=2.0 if t < 1000 else 50.0)) == []  # within the first 30 minutes


def test_anomaly_needs_min_delta_even_when_the_series_was_constant() -> None:
    c = Clocked(ANOMALY)
    for t in range(0, 2000, 10):
        c.at(t, stalled(m_1=1.0))
    assert c.at(2000, stalled(m_1=1.4)) == []  # infinitely many MADs (they are 0) but under min_delta
    assert c.at(2010, stalled(m_1=1.6))[0][1] == "firing"


def test_anomaly_down_watches_drops() -> None:
    c = Clocked(ANOMALY.replace('"up"', '"down"'))
    for t in range(0, 2000, 10):
        c.at(t, stalled(m_1=20.0 + (t % 30) / 100))
    assert c.at(2000, stalled(m_1=25.0)) == []
    assert c.at(2010, stalled(m_1=10.0))[0][1] == "firing"


CAPACITY = """
[[rules]]
name = "DiskFills"
kind = "capacity"
signal = "disk_free_bytes"
below = 0
window = "6h"
horizon = "24h"
warmup = "1h"
for = "30m"
"""


def disk(free: float) -> Snapshot:
    return {DISK_FREE: {(): free}}


def test_capacity_predicts_a_linear_fill_and_fires_after_warm_up_and_for() -> None:
    c = Clocked(CAPACITY)
    gib = float(1 << 30)
    fired_at = None
    for minute in range(0, 180):
        now = minute * 60.0
        free = 100 * gib - minute * 0.1 * gib  # 6 GiB an hour: 100 GiB are gone in under 17 h
        if c.at(now, disk(free)):
            fired_at = minute
            break
    assert fired_at == 90  # warm-up (1 h of points) then `for` (30 min)
    assert c.engine.active()[0].value < 0  # the predicted free bytes 24 h ahead


def test_capacity_stays_quiet_when_the_disk_fills_slower_than_the_horizon() -> None:
    c = Clocked(CAPACITY)
    gib = float(1 << 30)
    for minute in range(0, 600):
        assert c.at(minute * 60.0, disk(100 * gib - minute * 0.01 * gib)) == []  # 0.6 GiB/h: 7 days of room


def test_the_service_audits_firing_with_labels_and_delivers_alertmanager_and_webhook_shapes(
        audit: AuditLog, tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    service = AlertService(AlertSettings(alertmanager_url="http://127.0.0.1:9", resend_interval=60),
                           AlertRules.parse("version = 1\n" + STALL_RULE.replace('for = "20s"', 'for = "0s"')),
                           None, None, audit, tmp_path, generator_url="http://box/ui/#/dashboard",  # type: ignore[arg-type]
                           clock=lambda: now[0])
    service.evaluate(stalled(m_1=45))
    records = list(audit.export(action="alert.firing"))
    assert len(records) == 1 and records[0]["target"] == "WorkerStalled"
    assert records[0]["details"]["labels"] == {"worker": "m@1", "alertname": "WorkerStalled", "severity": "critical"}
    batch, ends = service.delivery.queue.get_nowait()
    sent = alertmanager_alert(batch[0], ends[batch[0].fingerprint], "http://box/ui/#/dashboard")
    assert sent["startsAt"] == "2023-11-14T22:13:20Z" and sent["endsAt"] == "2023-11-14T22:17:20Z"  # 4 resends ahead
    assert batch[0].labels["alertname"] == "WorkerStalled" and sent["generatorURL"] == "http://box/ui/#/dashboard"
    listed = read_alerts_file(tmp_path)
    assert listed is not None and [a["name"] for a in listed["alerts"]] == ["WorkerStalled"]
    now[0] += 10
    service.evaluate(stalled(m_1=55))
    assert service.delivery.queue.empty()  # re-sent only every resend_interval
    now[0] += 60
    service.evaluate(stalled(m_1=65))
    assert service.delivery.queue.get_nowait()[0][0].state == "firing"
    now[0] += 10
    service.evaluate(stalled(m_1=0))
    batch, ends = service.delivery.queue.get_nowait()
    message = webhook_message(batch, ends, "http://box/ui/#/dashboard", "http://box")
    assert message["version"] == "4" and message["status"] == "resolved"
    assert message["commonLabels"] == {"worker": "m@1", "alertname": "WorkerStalled", "severity": "critical"}
    item = message["alerts"][0]  # type: ignore[index]
    assert item["status"] == "resolved" and item["endsAt"] == "2023-11-14T22:14:40Z"
    assert item["fingerprint"] == batch[0].fingerprint
    assert len(list(audit.export(action="alert.firing"))) == 1  # resolving is not a firing
    assert read_alerts_file(tmp_path)["alerts"] == []  # type: ignore[index]
