"""Usage over JSON or CSV (`GET /api/usage`, usage:read): requests and tokens per hour or day, user, API key and
model, from the usage history the gateway records (`appliance.usage.UsageLog`)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from litestar import Response, get
from litestar.datastructures import State
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.params import QueryParameter

from appliance.auth.guards import permission
from appliance.gateway.openapi import also_served_as
from appliance.usage import UsageLog, parse_time, to_csv

CSV_HEADERS = {"content-disposition": 'attachment; filename="usage.csv"', "cache-control": "no-store"}


@get("/api/usage", summary="Requests and tokens per hour or day, user, API key and model; JSON or CSV",
     opt=permission("usage:read"), tags=["Admin"],
     operation_class=also_served_as("text/csv", Schema(type=OpenAPIType.STRING, description="format=csv")))
async def usage_report(
        state: State,
        since: Annotated[str | None, QueryParameter(description="ISO-8601 start (inclusive; UTC when no zone)")] = None,
        until: Annotated[str | None, QueryParameter(description="ISO-8601 end (exclusive; UTC when no zone)")] = None,
        bucket: Annotated[Literal["hour", "day"], QueryParameter(description="hour or day (UTC)")] = "day",
        format: Annotated[Literal["json", "csv"], QueryParameter(description="json or csv")] = "json",
) -> Response[Any]:
    usage: UsageLog = state.services.usage
    rows = usage.report(parse_time(since, "since"), parse_time(until, "until"), bucket)
    if format == "csv":
        return Response(to_csv(rows), media_type="text/csv", headers=CSV_HEADERS)
    return Response({"object": "list", "bucket": bucket, "data": [dataclasses.asdict(r) for r in rows]})


ROUTES = [usage_report]
