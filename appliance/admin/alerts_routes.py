"""Alerts over JSON (`GET /api/alerts`, metrics:read): the pending and firing alerts of the appliance's own rules,
with when the rules were last evaluated; a thin handler over `appliance.observability.alerts.service.AlertService`."""

from __future__ import annotations

from typing import Any

from litestar import Response, get
from litestar.di import NamedDependency

from appliance.auth.guards import permission
from appliance.observability.alerts.service import AlertService


@get("/api/alerts", summary="Pending and firing alerts (name, state, severity, labels, annotations, value, "
     "fingerprint, since) and when the rules were last evaluated", opt=permission("metrics:read"), tags=["Admin"])
async def list_alerts(alerts: NamedDependency[AlertService]) -> Response[dict[str, Any]]:
    return Response(alerts.listing(), headers={"cache-control": "no-store"})


ROUTES = [list_alerts]
