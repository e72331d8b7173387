"""Typed errors raised by services; one exception handler turns them into HTTP and the OpenAI error shape."""

from __future__ import annotations


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

    def to_body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}


class InvalidRequest(ApplianceError):
    status_code = 400
    error_type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


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


class ModelNotFound(NotFound):
    code = "model_not_found"


class QueueFull(ApplianceError):
    status_code = 429
    error_type = "rate_limit_exceeded"
    code = "queue_full"


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
