"""Errors that become HTTP responses.

Every error a client sees has the same JSON body::

    {"error": {"code": "<machine readable>", "message": "<for humans>", "details": <any>}}

    ApiError                      400 bad_request
    ├── ValidationFailed          400 validation_error
    ├── Unauthorized              401 unauthorized
    ├── Forbidden                 403 forbidden
    ├── NotFound                  404 not_found
    ├── Conflict                  409 conflict (code varies: session_closed, external_id_conflict, ...)
    ├── PayloadTooLarge           413 payload_too_large
    └── ServiceUnavailable        503 service_unavailable (with Retry-After)

Validation uses 400 for every kind of bad input — malformed JSON, unknown fields and values out of
range alike — so clients need one rule, not two.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ApiError",
    "Conflict",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "ServiceUnavailable",
    "Unauthorized",
    "ValidationFailed",
]


class ApiError(Exception):
    status_code: ClassVar[int] = 400
    default_code: ClassVar[str] = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = details
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


class ValidationFailed(ApiError):
    default_code = "validation_error"


class Unauthorized(ApiError):
    status_code = 401
    default_code = "unauthorized"

    def __init__(self, message: str = "missing or invalid credentials", **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": 'Bearer realm="threadline"'})
        super().__init__(message, **kwargs)


class Forbidden(ApiError):
    status_code = 403
    default_code = "forbidden"


class NotFound(ApiError):
    status_code = 404
    default_code = "not_found"


class Conflict(ApiError):
    status_code = 409
    default_code = "conflict"


class PayloadTooLarge(ApiError):
    status_code = 413
    default_code = "payload_too_large"


class ServiceUnavailable(ApiError):
    status_code = 503
    default_code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"Retry-After": str(retry_after)})
        super().__init__(message, **kwargs)
