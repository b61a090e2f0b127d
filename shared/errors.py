"""Ferry's one error hierarchy. Lower-library errors are translated into these at the boundary;
the api's middleware turns them into Anthropic's error envelope."""

from __future__ import annotations

from shared.wire import ErrorEnvelope, error_type_for_status


class FerryError(Exception):
    status: int = 500
    error_type: str = "api_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def envelope(self, request_id: str | None = None) -> ErrorEnvelope:
        return ErrorEnvelope.of(self.error_type, self.message, request_id)


class InvalidRequest(FerryError):
    status = 400
    error_type = "invalid_request_error"


class NotFound(FerryError):
    status = 404
    error_type = "not_found_error"


class Conflict(FerryError):
    status = 409
    error_type = "conflict_error"


class RequestTimeout(FerryError):
    status = 408
    error_type = "timeout_error"


class AuthenticationFailed(FerryError):
    status = 401
    error_type = "authentication_error"


class RateLimited(FerryError):
    status = 429
    error_type = "rate_limit_error"


class RequestTooLarge(FerryError):
    status = 413
    error_type = "request_too_large"


class Overloaded(FerryError):
    """The queue is full or no worker answered in time: the client should back off."""

    status = 529
    error_type = "overloaded_error"


class Unavailable(FerryError):
    """A dependency (database, broker) cannot take the request right now."""

    status = 503
    error_type = "api_error"


class UpstreamError(FerryError):
    """An error answered by the provider, relayed with its status and type."""

    def __init__(self, status: int, error_type: str | None, message: str,
                 *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.status = status
        self.error_type = error_type or error_type_for_status(status)
