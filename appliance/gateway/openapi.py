"""The OpenAPI document tells the truth about errors: every operation lists the statuses the app answers with
besides success, each in the OpenAI error shape that `error_response` sends (not Litestar's default
`{status_code, detail, extra}`), so that clients and schemathesis can check them."""

from __future__ import annotations

from dataclasses import dataclass

from litestar import Litestar
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Operation, Schema
from litestar.routes import HTTPRoute


@dataclass
class ErrorDetail:
    message: str
    """What failed, why, and what to do."""
    type: str
    """invalid_request_error, authentication_error, permission_error, not_found_error, rate_limit_error,
    server_error, ..."""
    param: str | None
    """The request parameter at fault, if one is."""
    code: str | None
    """A machine-readable reason, if there is one."""


@dataclass
class ErrorBody:
    """The OpenAI error shape."""

    error: ErrorDetail


ERROR_STATUSES: dict[int, str] = {
    400: "The request is invalid: a parameter, the body or a policy text (`error.param` names which).",
    401: "No credentials, or an API key or session that is unknown, expired or revoked.",
    403: "The key's role lacks the permission, or a key restriction (models, collections, IPs) refuses it.",
    404: "No such model, collection, document, key, user, job or response.",
    409: "The name is taken, or the state forbids it (e.g. promoting a version that is already live).",
    413: "The body is larger than server.max_body_bytes.",
    429: "A rate limit, quota or login throttle; `Retry-After` says when to try again.",
    503: "The model's worker is starting, failed or its queue is full; `Retry-After` says when to try again.",
}
"""Statuses any operation may answer besides its success status."""


def error_responses() -> dict[int, ResponseSpec]:
    return {
        status: ResponseSpec(data_container=ErrorBody, description=description, generate_examples=False)
        for status, description in ERROR_STATUSES.items()
    }


def document_errors(app: Litestar) -> Litestar:
    """Add the error responses to every operation of `app`'s schema, keeping any a handler documents itself.
    Call it before the schema is first served (it is built on the first request for it)."""
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            if isinstance(handler, HTTPRouteHandler) and handler.resolve_include_in_schema():
                handler.responses = {**error_responses(), **(handler.responses or {})}
    return app


def also_served_as(media_type: str, schema: Schema, status: int = 200) -> type[Operation]:
    """An `operation_class` for a handler whose `status` answer also comes as `media_type` (e.g. CSV next to
    JSON, picked by a query parameter): Litestar documents one content type per status."""

    @dataclass
    class WithAlternative(Operation):
        def __post_init__(self) -> None:
            response = (self.responses or {}).get(str(status))
            if isinstance(response, OpenAPIResponse):
                response.content = {**(response.content or {}), media_type: OpenAPIMediaType(schema=schema)}

    return WithAlternative
