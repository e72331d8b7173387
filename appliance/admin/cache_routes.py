"""The response cache over JSON (`/api/cache`, cache:admin): its size and partitions, and clearing it (all of it or
one partition); thin handlers over `appliance.cache.service.ResponseCacheService`. Never a prompt or an answer."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, delete, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from appliance.admin.keys_routes import actor_of
from appliance.audit import AuditLog, audited
from appliance.auth.guards import permission
from appliance.cache.service import ResponseCacheService
from appliance.errors import InvalidRequest

PARTITION_HELP = "user:<id>, key:<id> or role:<name>, as `GET /api/cache` lists them"


@get("/api/cache", summary="Response cache: entries, bytes, size limit, entries per partition",
     opt=permission("cache:admin"), tags=["Admin"])
async def cache_stats(response_cache: NamedDependency[ResponseCacheService]) -> dict[str, Any]:
    return msgspec.to_builtins(response_cache.report())  # type: ignore[no-any-return]


@delete("/api/cache", summary="Clear the response cache, or one partition of it", status_code=200,
        opt=permission("cache:admin"), tags=["Admin"])
async def cache_clear(request: Request[Any, Any, Any], response_cache: NamedDependency[ResponseCacheService],
                      audit_log: NamedDependency[AuditLog],
                      partition: Annotated[str | None, QueryParameter(description=PARTITION_HELP)] = None,
                      ) -> dict[str, Any]:
    if partition is not None and (not partition or "/" in partition or len(partition) > 200):
        raise InvalidRequest(f"'partition' must be one of {PARTITION_HELP}", param="partition")
    with audited(audit_log, actor_of(request), "cache.clear", partition or "*") as event:
        cleared = response_cache.clear(partition)
        event.details["entries"] = cleared
    return {"cleared": cleared, "partition": partition}


ROUTES = [cache_stats, cache_clear]
