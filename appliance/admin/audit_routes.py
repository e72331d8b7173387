"""The audit log over HTTP (`GET /api/audit`, audit:read): filtered records as a JSON list, or all matching records
as JSON lines (application/x-ndjson), the same lines `appliance audit export` prints."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from litestar import Response, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter
from litestar.response import Stream

from appliance.audit import AuditLog, utc_bound
from appliance.auth.guards import permission
from appliance.errors import InvalidRequest

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


@get("/api/audit", summary="Audit records, oldest first: a JSON list (format=json) or JSON lines (format=jsonl)",
     opt=permission("audit:read"), tags=["Admin"])
async def audit_records(
    audit_log: NamedDependency[AuditLog],
    since: Annotated[str | None, QueryParameter(description="ISO-8601 time, inclusive (no zone: UTC)")] = None,
    until: Annotated[str | None, QueryParameter(description="ISO-8601 time, exclusive")] = None,
    action: Annotated[str | None, QueryParameter(description="exact action, e.g. key.revoke")] = None,
    actor: Annotated[str | None, QueryParameter(description="exact actor, e.g. user:<id> or key:<id>")] = None,
    output: Annotated[Literal["json", "jsonl"], QueryParameter(name="format")] = "json",
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_LIMIT, description="records in a JSON list")] = DEFAULT_LIMIT,
) -> Response[dict[str, Any]] | Stream:
    _check_bound(since, "since")
    _check_bound(until, "until")
    records = audit_log.export(since=since, until=until, action=action, actor=actor)
    if output == "jsonl":  # read whole before streaming: the connection is shared, a cursor must not stay open
        return Stream(_lines(list(records)), media_type="application/x-ndjson", headers={"cache-control": "no-store"})
    page = list(itertools.islice(records, limit + 1))
    return Response({"object": "list", "data": page[:limit], "has_more": len(page) > limit},
                    headers={"cache-control": "no-store"})


ROUTES = [audit_records]
