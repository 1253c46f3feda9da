"""Every error Threadline raises, in one tree.

An :class:`ApiError` becomes an HTTP response; every one has the same JSON body::

    {"error": {"code": "<machine readable>", "message": "<for humans>", "details": <any>}}

Each code is one class here, with its status, so callers catch by meaning (``except
StreamClosed``), never by comparing code strings, and a client's ``code`` is defined once::

    ThreadlineError
    ├── ApiError                        400 bad_request
    │   ├── ValidationFailed            400 validation_error
    │   │   ├── InvalidJson                 invalid_json
    │   │   ├── UnknownParameter            unknown_parameter
    │   │   ├── InvalidCursor               invalid_cursor
    │   │   ├── InvalidOffset               invalid_offset
    │   │   ├── OffsetOutOfRange            offset_out_of_range
    │   │   ├── InvalidStreamName           invalid_stream_name
    │   │   ├── InvalidForkOffset           invalid_fork_offset
    │   │   ├── InvalidTimeout              invalid_timeout
    │   │   ├── EmptyAppend                 empty_append
    │   │   ├── ProducerEpochSeq            producer_epoch_seq
    │   │   └── WebhookUrlRejected          WEBHOOK_URL_REJECTED (the protocol's code)
    │   ├── Unauthorized                401 unauthorized
    │   ├── Forbidden                   403 forbidden
    │   │   └── ProducerFenced              producer_fenced
    │   ├── NotFound                    404 not_found
    │   │   ├── RouteNotFound               route_not_found
    │   │   ├── SessionNotFound             session_not_found
    │   │   ├── StreamNotFound              stream_not_found
    │   │   ├── ChannelNotFound             channel_not_found
    │   │   ├── ForkSourceNotFound          fork_source_not_found
    │   │   └── SubscriptionNotFound        subscription_not_found
    │   ├── MethodNotAllowed            405 method_not_allowed
    │   ├── Conflict                    409 conflict
    │   │   ├── SessionClosed               session_closed
    │   │   ├── SessionExpired              session_expired
    │   │   ├── SessionChannel              session_channel
    │   │   ├── ExternalIdConflict          external_id_conflict
    │   │   ├── StreamClosed                stream_closed
    │   │   ├── StreamExists                stream_exists
    │   │   ├── StreamDeleted               stream_deleted
    │   │   ├── StreamSeqConflict           stream_seq_conflict
    │   │   ├── ContentTypeMismatch         content_type_mismatch
    │   │   ├── ProducerSeqGap              producer_seq_gap
    │   │   ├── ForkSourceDeleted           fork_source_deleted
    │   │   ├── SubscriptionExists          subscription_exists
    │   │   ├── Fenced                      FENCED (the protocol's code)
    │   │   └── AlreadyClaimed              ALREADY_CLAIMED (+ current_holder, generation)
    │   ├── Gone                        410 gone
    │   │   ├── StreamGone                  stream_gone
    │   │   └── OffsetTrimmed               offset_trimmed
    │   ├── PayloadTooLarge             413 payload_too_large
    │   │   ├── RecordTooLarge              record_too_large
    │   │   └── BatchTooLarge               batch_too_large
    │   ├── HttpError                   any other status starlette raises: http_error
    │   ├── InternalError               500 internal_error
    │   └── ServiceUnavailable          503 service_unavailable (with Retry-After)
    │       ├── DatabaseUnavailable         database_unavailable
    │       ├── StorageUnavailable          storage_unavailable
    │       ├── OutcomeUnknown              outcome_unknown
    │       ├── ReplicationLagging          replication_lagging
    │       └── ShuttingDown                shutting_down
    └── EngineError                     not an HTTP answer: the code that calls the engine maps it
        ├── DependencyUnavailable       a service did not answer (ObjectStoreUnavailable,
        │                               ClickHouseUnavailable: see ``storage/``)
        └── DependencyRefused           a service answered with an error (ClickHouseError)

Validation uses 400 for every kind of bad input — malformed JSON, unknown fields and values out of
range alike — so clients need one rule, not two.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AlreadyClaimed",
    "ApiError",
    "BatchTooLarge",
    "ChannelNotFound",
    "Conflict",
    "ContentTypeMismatch",
    "DatabaseUnavailable",
    "DependencyRefused",
    "DependencyUnavailable",
    "EmptyAppend",
    "EngineError",
    "ExternalIdConflict",
    "Fenced",
    "Forbidden",
    "ForkSourceDeleted",
    "ForkSourceNotFound",
    "Gone",
    "HttpError",
    "InternalError",
    "InvalidCursor",
    "InvalidForkOffset",
    "InvalidJson",
    "InvalidOffset",
    "InvalidStreamName",
    "InvalidTimeout",
    "MethodNotAllowed",
    "NotFound",
    "OffsetOutOfRange",
    "OffsetTrimmed",
    "OutcomeUnknown",
    "PayloadTooLarge",
    "ProducerEpochSeq",
    "ProducerFenced",
    "ProducerSeqGap",
    "RecordTooLarge",
    "ReplicationLagging",
    "RouteNotFound",
    "ServiceUnavailable",
    "SessionChannel",
    "SessionClosed",
    "SessionExpired",
    "SessionNotFound",
    "ShuttingDown",
    "StorageUnavailable",
    "StreamClosed",
    "StreamDeleted",
    "StreamExists",
    "StreamGone",
    "StreamNotFound",
    "StreamSeqConflict",
    "SubscriptionExists",
    "SubscriptionNotFound",
    "ThreadlineError",
    "Unauthorized",
    "UnknownParameter",
    "ValidationFailed",
    "WebhookUrlRejected",
    "api_error_classes",
]


class ThreadlineError(Exception):
    """The root of every error this package raises on purpose."""


class ApiError(ThreadlineError):
    """An answer to the client: ``status_code`` and ``code`` are the class's, never per instance."""

    status_code: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, message: str, *, details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


# --- 400 ---------------------------------------------------------------------------------------


class ValidationFailed(ApiError):
    code = "validation_error"


class InvalidJson(ValidationFailed):
    code = "invalid_json"


class UnknownParameter(ValidationFailed):
    code = "unknown_parameter"


class InvalidCursor(ValidationFailed):
    code = "invalid_cursor"


class InvalidOffset(ValidationFailed):
    code = "invalid_offset"


class OffsetOutOfRange(ValidationFailed):
    code = "offset_out_of_range"


class InvalidStreamName(ValidationFailed):
    code = "invalid_stream_name"


class InvalidForkOffset(ValidationFailed):
    code = "invalid_fork_offset"


class InvalidTimeout(ValidationFailed):
    code = "invalid_timeout"


class EmptyAppend(ValidationFailed):
    code = "empty_append"


class ProducerEpochSeq(ValidationFailed):
    code = "producer_epoch_seq"


class WebhookUrlRejected(ValidationFailed):
    """A webhook URL the server will not call (SSRF guard, allow-list): the Durable Streams
    protocol names this code, so it is spelled as the protocol spells it."""

    code = "WEBHOOK_URL_REJECTED"


# --- 401 / 403 ---------------------------------------------------------------------------------


class Unauthorized(ApiError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str = "missing or invalid credentials", **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": 'Bearer realm="threadline"'})
        super().__init__(message, **kwargs)


class Forbidden(ApiError):
    status_code = 403
    code = "forbidden"


class ProducerFenced(Forbidden):
    code = "producer_fenced"


# --- 404 / 405 ---------------------------------------------------------------------------------


class NotFound(ApiError):
    status_code = 404
    code = "not_found"


class RouteNotFound(NotFound):
    code = "route_not_found"


class SessionNotFound(NotFound):
    code = "session_not_found"


class StreamNotFound(NotFound):
    code = "stream_not_found"


class ChannelNotFound(NotFound):
    code = "channel_not_found"


class ForkSourceNotFound(NotFound):
    code = "fork_source_not_found"


class SubscriptionNotFound(NotFound):
    code = "subscription_not_found"


class MethodNotAllowed(ApiError):
    status_code = 405
    code = "method_not_allowed"


# --- 409 ---------------------------------------------------------------------------------------


class Conflict(ApiError):
    status_code = 409
    code = "conflict"


class SessionClosed(Conflict):
    code = "session_closed"


class SessionExpired(Conflict):
    code = "session_expired"


class SessionChannel(Conflict):
    code = "session_channel"


class ExternalIdConflict(Conflict):
    code = "external_id_conflict"


class StreamClosed(Conflict):
    code = "stream_closed"


class StreamExists(Conflict):
    code = "stream_exists"


class StreamDeleted(Conflict):
    code = "stream_deleted"


class StreamSeqConflict(Conflict):
    code = "stream_seq_conflict"


class ContentTypeMismatch(Conflict):
    code = "content_type_mismatch"


class ProducerSeqGap(Conflict):
    code = "producer_seq_gap"


class ForkSourceDeleted(Conflict):
    code = "fork_source_deleted"


class SubscriptionExists(Conflict):
    """A PUT of a subscription id that exists with a different configuration (protocol §6.2)."""

    code = "subscription_exists"


class Fenced(Conflict):
    """An ack, release or callback for a wake that is no longer current: a newer generation, a
    different wake, a wrong token or a lease already handed on (protocol §7.3)."""

    code = "FENCED"


class AlreadyClaimed(Conflict):
    """Another worker holds the subscription's lease (protocol §7.2). The protocol puts
    ``current_holder`` and ``generation`` beside the code; ``details`` carries them too, so
    clients that read only ``details`` (the SDK) see them."""

    code = "ALREADY_CLAIMED"

    def __init__(
        self, message: str, *, current_holder: str | None = None, generation: int | None = None, **kwargs: Any
    ) -> None:
        details = kwargs.pop("details", None) or {}
        self.current_holder = current_holder if current_holder is not None else details.get("current_holder")
        self.generation = generation if generation is not None else details.get("generation")
        details = {"current_holder": self.current_holder, "generation": self.generation}
        super().__init__(message, details=details, **kwargs)

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"].update(current_holder=self.current_holder, generation=self.generation)
        return body


# --- 410 / 413 ---------------------------------------------------------------------------------


class Gone(ApiError):
    status_code = 410
    code = "gone"


class StreamGone(Gone):
    """A deleted stream that still has live forks."""

    code = "stream_gone"

    def __init__(self, message: str = "stream is gone", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)


class OffsetTrimmed(Gone):
    """A read before the trim point."""

    code = "offset_trimmed"


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "payload_too_large"


class RecordTooLarge(PayloadTooLarge):
    code = "record_too_large"


class BatchTooLarge(PayloadTooLarge):
    code = "batch_too_large"


class HttpError(ApiError):
    """Another error starlette raised itself (its status is the exception's, not this class's)."""

    code = "http_error"


# --- 5xx ---------------------------------------------------------------------------------------


class InternalError(ApiError):
    """A bug: logged with its traceback, answered without details."""

    status_code = 500
    code = "internal_error"


class ServiceUnavailable(ApiError):
    status_code = 503
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"Retry-After": str(retry_after)})
        super().__init__(message, **kwargs)


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"


class OutcomeUnknown(ServiceUnavailable):
    """The append may or may not have committed: Postgres did not confirm either way in time.
    Unlike every other 503 this one does not mean "nothing happened"."""

    code = "outcome_unknown"


class ReplicationLagging(ServiceUnavailable):
    code = "replication_lagging"


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


# --- not HTTP answers --------------------------------------------------------------------------


class EngineError(ThreadlineError):
    """Raised inside the engine and storage layers; callers map it to an :class:`ApiError` (or
    handle it) at the boundary."""


class DependencyUnavailable(EngineError):
    """A service (Postgres, S3, ClickHouse) did not answer, or not in time."""


class DependencyRefused(EngineError):
    """A service answered, with an error: a bug or a schema problem, not an outage."""


def api_error_classes() -> list[type[ApiError]]:
    """Every :class:`ApiError` class, the root first (for docs and the catalogue's own checks)."""
    found: list[type[ApiError]] = []
    pending: list[type[ApiError]] = [ApiError]
    while pending:
        cls = pending.pop(0)
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found
