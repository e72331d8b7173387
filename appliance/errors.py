"""Typed errors raised by services; one exception handler turns them into HTTP and the OpenAI error shape."""

from __future__ import annotations

import math
from typing import Any


class ApplianceError(Exception):
    """An error a client or operator can act on. `message` says what failed and what to do."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def to_body(self) -> dict[str, dict[str, Any]]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        """HTTP headers that go with this error: `Retry-After` in whole seconds, rounded up, when known."""
        return {"retry-after": str(max(1, math.ceil(self.retry_after)))} if self.retry_after else {}


class InvalidRequest(ApplianceError):
    status_code = 400
    error_type = "invalid_request_error"


class InvalidPolicy(InvalidRequest):
    """A policy document (privacy.toml, rbac.toml) that cannot be used. Where the line to fix can be told, the
    message starts with "line N: " and the error object carries `"line": N` besides the usual fields."""

    code = "invalid_policy"

    def __init__(self, reason: str, *, line: int | None = None, param: str | None = "policy") -> None:
        super().__init__(f"line {line}: {reason}" if line else reason, param=param)
        self.line = line

    def to_body(self) -> dict[str, dict[str, Any]]:
        body = super().to_body()
        body["error"]["line"] = self.line
        return body


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class Conflict(ApplianceError):
    """The change cannot be made in the present state (a version in production, the last admin role); the
    message says what to change first."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class Unauthenticated(ApplianceError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ApplianceError):
    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


class NotFound(ApplianceError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class KeyNotFound(InvalidRequest):
    """No such API key (or, for `/api/me/keys`, none of the caller's). A 404, kept an InvalidRequest for callers
    that caught the 400 it used to be."""

    status_code = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class QueueFull(ApplianceError):
    status_code = 429
    error_type = "rate_limit_exceeded"
    code = "queue_full"


class RateLimited(ApplianceError):
    """A quota (requests/min, tokens/min or the daily token budget) has no room for this request.

    `limit` names it (`rpm`, `tpm`, `daily_tokens`); `retry_after` is None when waiting cannot help (the request
    alone is larger than the limit), and then clients are told not to retry. `rate_headers` are the key's
    `x-ratelimit-*` headers at refusal time, as OpenAI sends them on a 429 too."""

    status_code = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, retry_after: float | None,
                 rate_headers: dict[str, str] | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.limit = limit
        self.error_type = "requests" if limit == "rpm" else "tokens"  # OpenAI's types for rate limits
        self.rate_headers = rate_headers or {}

    def headers(self) -> dict[str, str]:
        never = {} if self.retry_after else {"x-should-retry": "false"}  # honoured by the openai SDKs
        return {**self.rate_headers, **super().headers(), **never}


class LoginThrottled(ApplianceError):
    """Too many failed logins for this user name or from this address; `retry_after` says when to try again."""

    status_code = 429
    error_type = "rate_limit_exceeded"
    code = "too_many_login_attempts"


class ModelUnavailable(ApplianceError):
    """The model's worker is not running (crashed, failed to load, or timed out in the queue)."""

    status_code = 503
    error_type = "server_error"
    code = "model_unavailable"


class WorkerFailed(ApplianceError):
    """The worker died or broke the connection while serving this request."""

    status_code = 502
    error_type = "server_error"
    code = "worker_failed"


class RegistryError(ApplianceError):
    """A model could not be fetched, imported, verified or removed."""

    status_code = 400
    error_type = "invalid_request_error"
