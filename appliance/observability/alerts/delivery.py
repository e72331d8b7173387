"""Sending alerts out: to an Alertmanager (POST /api/v2/alerts, the way Prometheus does it) and to a webhook in
Alertmanager's webhook format (version "4"). Batches go through a bounded queue to one sender task with a timeout
and a few attempts each, so a slow or absent receiver never holds up an evaluation, let alone a request; when the
queue is full the oldest batch is dropped (firing alerts are re-sent anyway)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import httpx

from appliance.config import public_value
from appliance.logs import get_logger
from appliance.observability.alerts.engine import Alert, iso

log = get_logger(__name__)
QUEUE_BATCHES = 64


def alertmanager_alert(alert: Alert, ends_at: float, generator_url: str) -> dict[str, object]:
    """One alert as Alertmanager's API v2 takes it (postableAlert)."""
    return {"labels": alert.labels, "annotations": alert.annotations, "startsAt": iso(alert.fired_at or
            alert.active_at), "endsAt": iso(ends_at), "generatorURL": generator_url}


def webhook_message(alerts: Sequence[Alert], ends: dict[str, float], generator_url: str, external_url: str
                    ) -> dict[str, object]:
    """Alertmanager's webhook payload (version 4) for a group of alerts."""
    items = [{"status": "resolved" if a.state == "resolved" else "firing", "labels": a.labels,
              "annotations": a.annotations, "startsAt": iso(a.fired_at or a.active_at),
              "endsAt": iso(ends[a.fingerprint]) if a.state == "resolved" else "0001-01-01T00:00:00Z",
              "generatorURL": generator_url, "fingerprint": a.fingerprint} for a in alerts]
    common_labels = _common([a.labels for a in alerts])
    return {"version": "4", "groupKey": "{}:{}", "truncatedAlerts": 0,
            "status": "firing" if any(i["status"] == "firing" for i in items) else "resolved",
            "receiver": "appliance", "groupLabels": {}, "commonLabels": common_labels,
            "commonAnnotations": _common([a.annotations for a in alerts]), "externalURL": external_url,
            "alerts": items}


def _common(sets: Sequence[dict[str, str]]) -> dict[str, str]:
    if not sets:
        return {}
    return {k: v for k, v in sets[0].items() if all(s.get(k) == v for s in sets[1:])}


class Delivery:
    """The sender task and its queue; `submit` never waits."""

    def __init__(self, alertmanager_url: str, webhook_url: str, *, timeout: float, attempts: int,
                 generator_url: str, external_url: str) -> None:
        self.alertmanager_url = alertmanager_url.rstrip("/")
        self.webhook_url = webhook_url
        self.timeout = timeout
        self.attempts = attempts
        self.generator_url = generator_url
        self.external_url = external_url
        self.queue: asyncio.Queue[tuple[list[Alert], dict[str, float]]] = asyncio.Queue(QUEUE_BATCHES)
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return bool(self.alertmanager_url or self.webhook_url)

    def submit(self, alerts: list[Alert], ends: dict[str, float]) -> None:
        """Queue a batch (alerts with each one's endsAt by fingerprint); drops the oldest batch when full."""
        if not self.enabled or not alerts:
            return
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
                log.warning("alerts.dropped", reason="the delivery queue is full; the receiver is slow or down")
        self.queue.put_nowait((alerts, ends))

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout, headers={"user-agent": "appliance-alerts"}) as client:
            while True:
                alerts, ends = await self.queue.get()
                if self.alertmanager_url:
                    body = [alertmanager_alert(a, ends[a.fingerprint], self.generator_url) for a in alerts]
                    await self._post(client, f"{self.alertmanager_url}/api/v2/alerts", body)
                if self.webhook_url:
                    await self._post(client, self.webhook_url,
                                     webhook_message(alerts, ends, self.generator_url, self.external_url))

    async def _post(self, client: httpx.AsyncClient, url: str, body: object) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                response = await client.post(url, json=body)
                if response.status_code < 300:
                    self.sent += 1
                    return
                reason = f"HTTP {response.status_code}: {response.text[:200]}"
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    break  # the receiver refuses this body: sending it again will not help
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}"[:300]
            if attempt < self.attempts:
                await asyncio.sleep(min(8.0, 0.5 * 2 ** (attempt - 1)))
        self.failed += 1
        log.warning("alerts.delivery_failed", url=public_value("url", url), attempts=self.attempts, reason=reason)
