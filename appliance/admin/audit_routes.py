"""The audit log over HTTP (audit:read): `GET /api/audit`, filtered records as a JSON list paged by seq, or all
matching records as JSON lines (application/x-ndjson), the same lines `appliance audit export` prints; and
`POST /api/audit/verify`, the check `appliance audit verify` makes."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from litestar import Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.params import QueryParameter
from litestar.response import Stream

from appliance.audit import AuditLog, Outcome, utc_bound
from appliance.auth.guards import permission
from appliance.errors import InvalidRequest
from appliance.gateway.openapi import also_served_as

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000


def _check_bound(text: str | None, name: str) -> None:
    """Refuse a bad time up front: the export reads it lazily, after the response has started."""
    if text is not None:
        try:
            utc_bound(text, name)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param=name, code="invalid_time") from None


def _lines(records: list[dict[str, Any]]) -> Iterator[bytes]:
    for record in records:
        yield (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode()


@get("/api/audit", summary="Audit records, oldest first (order=desc: newest first), paged by seq (before_seq, "
     "after_seq): a JSON list (format=json) or every matching record as JSON lines (format=jsonl)",
     opt=permission("audit:read"), tags=["Admin"],
     operation_class=also_served_as("application/x-ndjson",
                                    Schema(type=OpenAPIType.STRING, description="format=jsonl: one record a line")))
async def audit_records(
    audit_log: NamedDependency[AuditLog],
    since: Annotated[str | None, QueryParameter(description="ISO-8601 time, inclusive (no zone: UTC)")] = None,
    until: Annotated[str | None, QueryParameter(description="ISO-8601 time, exclusive")] = None,
    action: Annotated[str | None, QueryParameter(description="exact action, e.g. key.revoke, or a prefix ending "
                                                 "in *, e.g. model.*")] = None,
    actor: Annotated[str | None, QueryParameter(description="exact actor, e.g. user:<id> or key:<id>")] = None,
    outcome: Annotated[Outcome | None, QueryParameter(description="ok, denied or error")] = None,
    order: Annotated[Literal["asc", "desc"], QueryParameter(description="asc: oldest first; desc: newest "
                                                            "first")] = "asc",
    before_seq: Annotated[int | None, QueryParameter(ge=0, description="only records whose seq is lower (the "
                                                     "next page, newest first)")] = None,
    after_seq: Annotated[int | None, QueryParameter(ge=0, description="only records whose seq is higher (the "
                                                    "next page, oldest first)")] = None,
    output: Annotated[Literal["json", "jsonl"], QueryParameter(name="format")] = "json",
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_LIMIT, description="records in a JSON list")] = DEFAULT_LIMIT,
) -> Response[dict[str, Any]] | Stream:
    _check_bound(since, "since")
    _check_bound(until, "until")
    export = functools.partial(audit_log.export, since=since, until=until, action=action, actor=actor,
                               outcome=outcome, before_seq=before_seq, after_seq=after_seq,
                               newest_first=order == "desc")
    if output == "jsonl":  # read whole before streaming: the connection is shared, a cursor must not stay open
        return Stream(_lines(list(export())), media_type="application/x-ndjson", headers={"cache-control": "no-store"})
    page = list(export(limit=limit + 1))
    return Response({"object": "list", "data": page[:limit], "has_more": len(page) > limit},
                    headers={"cache-control": "no-store"})


@post("/api/audit/verify", summary="Check the audit log's hash chain: intact, or the first broken record and why",
      status_code=200, opt=permission("audit:read"), tags=["Admin"])
async def audit_verify(audit_log: NamedDependency[AuditLog]) -> Response[dict[str, Any]]:
    result = await asyncio.to_thread(audit_log.verify_apart)  # a long chain: off the event loop
    return Response({"intact": result.ok, "records": result.count, "first_broken": result.first_broken_seq,
                     "reason": result.reason or None, "last_hash": result.last_hash,
                     "warnings": list(result.warnings)}, headers={"cache-control": "no-store"})


ROUTES = [audit_records, audit_verify]
