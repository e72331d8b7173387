"""The effective configuration over JSON (`GET /api/settings`, settings:read): every setting with its value, source
and help (secrets shown as "(set)"), the config file, and the doctor's findings; a thin handler over
`appliance.settings_report.SettingsReport`."""

from __future__ import annotations

from typing import Any

from litestar import Response, get
from litestar.di import NamedDependency

from appliance.auth.guards import permission
from appliance.settings_report import SettingsReport


@get("/api/settings", summary="Every setting with its value and source (default, file, env, cli), the config file, "
     "and the doctor's findings (refreshed every 30 s)", opt=permission("settings:read"), tags=["Admin"])
async def settings_report(settings_view: NamedDependency[SettingsReport]) -> Response[dict[str, Any]]:
    return Response(await settings_view.report(), headers={"cache-control": "no-store"})


ROUTES = [settings_report]
