"""The dashboard over JSON (`GET /api/dashboard`, metrics:read): models, cache, memory, GPUs and disk in one cheap
snapshot that the web UI polls; a thin handler over `appliance.observability.dashboard.Dashboard`."""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency

from appliance.auth.guards import permission
from appliance.observability.dashboard import Dashboard, DashboardView


@get("/api/dashboard", summary="Models (state, requests, errors, tokens, TTFT p50/p95 over the last minute, queue, "
     "memory), cache hits, memory, GPUs and disk; counters are cumulative", opt=permission("metrics:read"),
     tags=["Admin"])
async def dashboard_snapshot(dashboard: NamedDependency[Dashboard]) -> Response[DashboardView]:
    return Response(await dashboard.snapshot(), headers={"cache-control": "no-store"})


ROUTES = [dashboard_snapshot]
