"""The SDK's exceptions: the server's error catalogue, plus what only a client can run into.

Every error code the API answers with is one class in :mod:`threadline.errors` (pure Python, no
server dependencies), and the SDK raises exactly that class, so the code-to-class table exists
once for the server and its clients. What a client adds sits beside it under the same root::

    ThreadlineError                     threadline.errors: the root of everything raised on purpose
    ├── ApiError                        the server answered with an error (every code its own class,
    │   ├── ValidationFailed 400 ...    see threadline.errors; .code, .status_code, .message,
    │   ├── Unauthorized 401            .details, and the answer's .headers)
    │   ├── Forbidden 403, ProducerFenced
    │   ├── NotFound 404, SessionNotFound, StreamNotFound, ...
    │   ├── Conflict 409, SessionClosed, StreamClosed, ProducerSeqGap, ...
    │   ├── Gone 410, PayloadTooLarge 413, InternalError 500
    │   └── ServiceUnavailable 503 ...  retried by the SDK first (Retry-After honoured)
    └── ClientError                     raised by the SDK itself
        ├── ConnectionFailed            no answer: refused, reset, dropped (after the retries)
        │   ├── RequestTimedOut         no answer in time (after the retries)
        │   └── GatewayFailed           a proxy's bare 502/504: the request may have been applied
        ├── UnexpectedResponse          an answer the SDK cannot read (not Threadline's JSON)
        ├── WriterFailed                a writer stopped on an error; the error is its __cause__
        └── ClientClosed                the client (or writer) was used after close()

An unknown ``code`` (a newer server) maps to the class of its status, so ``except NotFound``
keeps working.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from threadline.errors import (
    ApiError,
    Conflict,
    Forbidden,
    Gone,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    ThreadlineError,
    Unauthorized,
    ValidationFailed,
    api_error_classes,
)

__all__ = [
    "ClientClosed",
    "ClientError",
    "ConnectionFailed",
    "GatewayFailed",
    "RequestTimedOut",
    "UnexpectedResponse",
    "WriterFailed",
    "error_from_response",
]


class ClientError(ThreadlineError):
    """Raised by the SDK itself, not answered by the server."""


class ConnectionFailed(ClientError):
    """The server could not be reached, or the connection broke before an answer."""


class RequestTimedOut(ConnectionFailed):
    """No answer within the configured timeout."""


class GatewayFailed(ConnectionFailed):
    """A proxy in front of the server (nginx, a cloud load balancer) answered 502 or 504 with a
    page of its own: it lost the server's answer or gave up waiting for it, so the request may or
    may not have been applied. Treated like a dropped connection: retried when a repeat cannot
    apply twice, raised otherwise. (Threadline's own HAProxy config answers 503
    ``outcome_unknown`` instead.)"""

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class UnexpectedResponse(ClientError):
    """An answer that is not Threadline's (a proxy's error page, a truncated body)."""

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class WriterFailed(ClientError):
    """A writer stopped on an error (its ``__cause__``); records not acknowledged were not written."""


class ClientClosed(ClientError):
    """A client or writer used after it was closed."""


_BY_CODE: dict[str, type[ApiError]] = {cls.code: cls for cls in api_error_classes()}
_BY_STATUS: dict[int, type[ApiError]] = {
    400: ValidationFailed,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    410: Gone,
    413: PayloadTooLarge,
    503: ServiceUnavailable,
}


# A bare 502/504 is a proxy's: Threadline never answers them itself.
_GATEWAY_STATUSES = frozenset({502, 504})


def error_from_response(status_code: int, headers: Mapping[str, str], body: bytes) -> ThreadlineError:
    """The exception for an error answer: the catalogue's class for its ``code``."""
    try:
        error = json.loads(body)["error"]
        code = str(error["code"])
        message = str(error.get("message") or code)
        details: Any = error.get("details")
    except (ValueError, KeyError, TypeError):
        if status_code in _GATEWAY_STATUSES:
            return GatewayFailed(
                f"HTTP {status_code} from a proxy in front of the server: the request may or may not "
                "have been applied",
                status_code=status_code,
            )
        if status_code in _BY_STATUS or status_code >= 500:
            # Durable Streams answers without a body (HEAD) and proxies answer with pages: the
            # status alone still says what happened.
            code, message, details = "", f"HTTP {status_code}", None
        else:
            return UnexpectedResponse(f"unexpected HTTP {status_code}", status_code=status_code)
    cls = _BY_CODE.get(code)
    if cls is None or cls.status_code != status_code:
        cls = _BY_STATUS.get(status_code, InternalError if status_code >= 500 else ApiError)
    return cls(message, details=details, headers=dict(headers))
