"""The alert service: every `alerts.interval` seconds, read the signals, step the rules, audit each firing
(`alert.firing`, with the rule and labels, never content), hand new, resolved and due re-sends to the delivery task,
and write the current alerts to `alerts.json` in the data dir for `appliance alerts list`. Cheap: one evaluation
reads a few hundred samples and costs well under a millisecond of CPU per rule."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from appliance.config import AlertSettings
from appliance.logs import get_logger
from appliance.observability.alerts.delivery import Delivery
from appliance.observability.alerts.engine import Alert, RuleEngine, iso
from appliance.observability.alerts.rules import AlertRules
from appliance.observability.alerts.signals import SAMPLES, History, Snapshot, labels_of
from appliance.observability.alerts.state import AppState
from appliance.observability.metrics import Metrics

if TYPE_CHECKING:
    from appliance.audit import AuditLog

log = get_logger(__name__)
STATE_FILE = "alerts.json"


def metric_snapshot(registry: CollectorRegistry) -> Snapshot:
    """The samples of a registry that the signals read (`SAMPLES`), by sample name and labels."""
    snapshot: Snapshot = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in SAMPLES:
                snapshot.setdefault(sample.name, {})[labels_of(sample.labels)] = sample.value
    return snapshot


def read_alerts_file(data_root: Path) -> dict[str, Any] | None:
    """What the server last wrote (`appliance alerts list`); None when it never evaluated in this data dir."""
    try:
        loaded: dict[str, Any] = json.loads((data_root / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    return loaded


class AlertService:
    def __init__(self, settings: AlertSettings, rules: AlertRules, metrics: Metrics, state: AppState,
                 audit: AuditLog | None, data_root: Path, *, generator_url: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.rules = rules
        self.metrics = metrics
        self.state = state
        self.audit = audit
        self.data_root = data_root
        self.clock = clock
        self.engine = RuleEngine(rules.rules)
        self.history = History()
        self.evaluated_at: float | None = None
        self.delivery = Delivery(settings.alertmanager_url, settings.webhook_url, timeout=settings.send_timeout,
                                 attempts=settings.send_attempts, generator_url=generator_url,
                                 external_url=generator_url.rsplit("/ui", 1)[0])
        self._last_written = ""
        self._written_at = 0.0

    def read(self) -> Snapshot:
        """Every sample in the app's registry: its own metrics, the app state's gauges, and the box, GPU and vLLM
        collectors' (which may ask NVML: call it in a thread)."""
        return metric_snapshot(self.metrics.registry)

    def evaluate(self, snapshot: Snapshot) -> list[Alert]:
        """One evaluation of `snapshot` at the clock's time; returns the alerts that fired or resolved in it."""
        now = self.clock()
        self.history.add(now, snapshot)
        changed = self.engine.step(self.history, now)
        self.evaluated_at = now
        for alert in changed:
            if alert.state == "firing":
                log.warning("alert.firing", alert=alert.rule.name, labels=alert.labels, value=alert.value)
                self._audit(alert)
            else:
                log.info("alert.resolved", alert=alert.rule.name, labels=alert.labels)
        self._deliver(now)
        self._write_state()
        return changed

    def _audit(self, alert: Alert) -> None:
        if self.audit is None:
            return
        try:
            self.audit.record("supervisor", "alert.firing", alert.rule.name, severity=alert.rule.severity,
                              labels=alert.labels, fingerprint=alert.fingerprint)
        except (ValueError, OSError) as exc:  # a label named like a secret, a full disk: log, keep alerting
            log.error("alert.audit_failed", alert=alert.rule.name, error=str(exc))

    def _deliver(self, now: float) -> None:
        """Send what changed and re-send what still fires every resend_interval. A firing alert's endsAt lies
        four intervals ahead (Prometheus' rule), so Alertmanager resolves it by itself if the appliance goes away."""
        due: list[Alert] = []
        ends: dict[str, float] = {}
        hold = 4 * max(self.settings.interval, self.settings.resend_interval)
        for alert in self.engine.alerts.values():
            if alert.state == "pending":
                continue
            if alert.state == "resolved" and alert.resolved_at is not None:
                if alert.last_sent is not None and alert.last_sent >= alert.resolved_at:
                    continue
                ends[alert.fingerprint] = alert.resolved_at
            elif alert.last_sent is not None and now - alert.last_sent < self.settings.resend_interval:
                continue
            else:
                ends[alert.fingerprint] = now + hold
            alert.last_sent = now
            due.append(alert)
        self.delivery.submit(due, ends)

    def listing(self) -> dict[str, Any]:
        return {"evaluated_at": iso(self.evaluated_at), "interval": self.settings.interval,
                "alerts": [a.to_dict() for a in self.engine.active()]}

    def for_dashboard(self) -> list[dict[str, object]]:
        return [a.to_dict() for a in self.engine.active()]

    def _write_state(self) -> None:
        """alerts.json for `appliance alerts list`: written when the alerts change, and at least once a minute
        so that the command can tell a stopped server from a quiet one."""
        listing = self.listing()
        text = json.dumps(listing, sort_keys=True)
        body = json.dumps(listing["alerts"], sort_keys=True)
        stamp = self.evaluated_at or 0.0
        if body == self._last_written and stamp - self._written_at < 60:
            return
        target = self.data_root / STATE_FILE
        temp = target.with_suffix(".tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(text)
            temp.replace(target)
        except OSError as exc:
            log.warning("alerts.state_not_written", error=str(exc))
            return
        self._last_written, self._written_at = body, stamp

    async def verify_audit(self) -> None:
        """Check the audit chain now and then, in a thread on a connection of its own."""
        if self.audit is None or not self.settings.audit_verify_interval:
            return
        while True:
            try:
                result = await asyncio.to_thread(self.audit.verify_apart)
                self.state.audit_ok = result.ok
                if not result.ok:
                    log.error("audit.chain_broken", first_broken=result.first_broken_seq, reason=result.reason)
            except Exception:  # a locked or unreadable database: unknown, not broken; tried again next time
                log.exception("audit.verify_failed")
            await asyncio.sleep(self.settings.audit_verify_interval)

    async def run(self) -> None:
        """Evaluate for as long as the app runs, and deliver alongside."""
        tasks = [asyncio.create_task(self.delivery.run()), asyncio.create_task(self.verify_audit())]
        try:
            while True:
                await asyncio.sleep(self.settings.interval)
                try:
                    self.evaluate(await asyncio.to_thread(self.read))
                except Exception:  # a rule that cannot be evaluated must not end alerting
                    log.exception("alerts.evaluation_failed")
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
