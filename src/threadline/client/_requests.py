"""Sans-I/O: every API call as a :class:`Request` value, and every answer parsed into a model.

The sync and async clients differ only in how they send; what they send and how they read the
answer is written here once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal
from urllib.parse import quote

import httpx

from threadline.client._errors import UnexpectedResponse
from threadline.client._models import AppendResult, ReadResult, Record, StreamInfo, parse_datetime

__all__ = [
    "JSON",
    "UNSET",
    "Producer",
    "Request",
    "SessionFilters",
    "SortOrder",
    "encode_batch",
    "encode_record",
    "format_offset",
    "offset_position",
]

JSON: Final = "application/json"
SortOrder = Literal["-createdAt", "createdAt", "-lastActiveAt", "lastActiveAt"]
Status = Literal["ACTIVE", "CLOSED", "EXPIRED"]


class _Unset:
    """Marks an argument not given, where ``None`` means "clear it" (``expires_at=None``)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # Safe to send again after it may have reached the server (it cannot apply twice).
    idempotent: bool = False

    def build(self, http: httpx.Client | httpx.AsyncClient, token: str, **extra: Any) -> httpx.Request:
        headers = {"Authorization": f"Bearer {token}", **self.headers}
        return http.build_request(
            self.method, self.path, params=self.params, content=self.body, headers=headers, **extra
        )


def _json_body(data: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
    return json.dumps(data, separators=(",", ":")).encode(), {"Content-Type": JSON}


def _iso(value: datetime | str) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("datetimes sent to Threadline need a time zone")
        return value.isoformat()
    return value


def _segment(value: str) -> str:
    return quote(value, safe="")


# --- offsets ---------------------------------------------------------------------------------


def offset_position(offset: str) -> int:
    """The record position an offset stands for (offsets are ``<16 digits>_<16 digits>``)."""
    try:
        return int(offset.split("_", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"not an offset: {offset!r}") from None


def format_offset(position: int) -> str:
    return f"{0:016d}_{position:016d}"


# --- sessions --------------------------------------------------------------------------------


def create_session(
    type: str,
    *,
    external_id: str | None,
    task_identifier: str | None,
    tags: Sequence[str] | None,
    metadata: Mapping[str, Any] | None,
    expires_at: datetime | str | None,
) -> Request:
    data: dict[str, Any] = {"type": type}
    if external_id is not None:
        data["externalId"] = external_id
    if task_identifier is not None:
        data["taskIdentifier"] = task_identifier
    if tags is not None:
        data["tags"] = list(tags)
    if metadata is not None:
        data["metadata"] = dict(metadata)
    if expires_at is not None:
        data["expiresAt"] = _iso(expires_at)
    body, headers = _json_body(data)
    # With an externalId a repeated create answers with the same session: safe to retry.
    return Request("POST", "/api/v1/sessions", body=body, headers=headers, idempotent=external_id is not None)


def get_session(ref: str) -> Request:
    return Request("GET", f"/api/v1/sessions/{_segment(ref)}")


def update_session(
    ref: str,
    *,
    tags: Sequence[str] | _Unset,
    metadata: Mapping[str, Any] | _Unset,
    external_id: str | _Unset | None,
    expires_at: datetime | str | _Unset | None,
) -> Request:
    data: dict[str, Any] = {}
    if not isinstance(tags, _Unset):
        data["tags"] = list(tags)
    if not isinstance(metadata, _Unset):
        data["metadata"] = dict(metadata)
    if not isinstance(external_id, _Unset):
        data["externalId"] = external_id
    if not isinstance(expires_at, _Unset):
        data["expiresAt"] = None if expires_at is None else _iso(expires_at)
    body, headers = _json_body(data)
    return Request("PATCH", f"/api/v1/sessions/{_segment(ref)}", body=body, headers=headers, idempotent=True)


def close_session(ref: str, reason: str | None) -> Request:
    body, headers = _json_body({"reason": reason} if reason is not None else {})
    # A second close answers the first close unchanged.
    return Request(
        "POST", f"/api/v1/sessions/{_segment(ref)}/close", body=body, headers=headers, idempotent=True
    )


def fork_session(
    ref: str,
    *,
    out_offset: str | None,
    in_offset: str | None,
    external_id: str | None,
    type: str | None,
    tags: Sequence[str] | None,
    metadata: Mapping[str, Any] | None,
) -> Request:
    data: dict[str, Any] = {}
    given = (("outOffset", out_offset), ("inOffset", in_offset), ("externalId", external_id), ("type", type))
    for name, value in given:
        if value is not None:
            data[name] = value
    if tags is not None:
        data["tags"] = list(tags)
    if metadata is not None:
        data["metadata"] = dict(metadata)
    body, headers = _json_body(data)
    # With an externalId a repeated fork answers with the same fork: safe to retry.
    return Request(
        "POST",
        f"/api/v1/sessions/{_segment(ref)}/fork",
        body=body,
        headers=headers,
        idempotent=external_id is not None,
    )


def mint_token(ref: str, *, expires_in_seconds: int | None, scopes: Sequence[str] | None) -> Request:
    data: dict[str, Any] = {}
    if expires_in_seconds is not None:
        data["expiresInSeconds"] = expires_in_seconds
    if scopes is not None:
        data["scopes"] = list(scopes)
    body, headers = _json_body(data)
    return Request(
        "POST", f"/api/v1/sessions/{_segment(ref)}/tokens", body=body, headers=headers, idempotent=True
    )


@dataclass(frozen=True, slots=True)
class SessionFilters:
    """Every list/count filter; a sequence means "any of these"."""

    type: Sequence[str] | None = None
    tags: Sequence[str] | None = None
    task_identifier: Sequence[str] | None = None
    external_id: Sequence[str] | None = None
    forked_from: Sequence[str] | None = None  # forks made directly from these sessions
    root_id: Sequence[str] | None = None  # every session of these fork trees, roots included
    status: Sequence[Status] | None = None
    period: str | None = None  # "30m", "12h", "7d", "2w"
    created_from: datetime | str | None = None
    created_to: datetime | str | None = None
    min_lsn: str | None = None

    def params(self) -> list[tuple[str, str]]:
        params: list[tuple[str, str]] = []
        lists = (
            ("type", self.type),
            ("tags", self.tags),
            ("taskIdentifier", self.task_identifier),
            ("externalId", self.external_id),
            ("forkedFrom", self.forked_from),
            ("rootId", self.root_id),
            ("status", self.status),
        )
        for name, values in lists:
            if values is not None:
                values = [values] if isinstance(values, str) else values
                params.append((f"filter[{name}]", ",".join(values)))
        if self.period is not None:
            params.append(("filter[createdAt][period]", self.period))
        if self.created_from is not None:
            params.append(("filter[createdAt][from]", _iso(self.created_from)))
        if self.created_to is not None:
            params.append(("filter[createdAt][to]", _iso(self.created_to)))
        if self.min_lsn is not None:
            params.append(("minLsn", self.min_lsn))
        return params


def list_sessions(
    filters: SessionFilters, *, sort: SortOrder, page_size: int | None, after: str | None
) -> Request:
    params = [*filters.params(), ("sort", sort)]
    if page_size is not None:
        params.append(("page[size]", str(page_size)))
    if after is not None:
        params.append(("page[after]", after))
    return Request("GET", "/api/v1/sessions", params=tuple(params))


def count_sessions(filters: SessionFilters) -> Request:
    return Request("GET", "/api/v1/sessions/count", params=tuple(filters.params()))


def json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise UnexpectedResponse(
            f"expected JSON from {response.request.url.path}", status_code=response.status_code
        ) from None


def list_page(response: httpx.Response) -> tuple[list[Mapping[str, Any]], str | None]:
    """A list page's sessions and the cursor of the next page (``None`` on the last)."""
    data = json_body(response)
    return list(data["data"]), data["pagination"].get("next")


# --- streams and channels --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Producer:
    """An idempotent producer's identity and the sequence number of one append."""

    id: str
    epoch: int
    seq: int

    def headers(self) -> dict[str, str]:
        return {"Producer-Id": self.id, "Producer-Epoch": str(self.epoch), "Producer-Seq": str(self.seq)}


def encode_record(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def encode_batch(records: Iterable[bytes]) -> bytes:
    """Encoded records as one JSON array: one record per element, appended atomically."""
    return b"[" + b",".join(records) + b"]"


def stream_path(name: str) -> str:
    return "/v1/stream/" + quote(name, safe="/")


def realtime_path(session: str, io: str) -> str:
    return f"/realtime/v1/sessions/{_segment(session)}/{io}"


def realtime_append(session: str, io: str, body: bytes, producer: Producer | None) -> Request:
    headers = {"Content-Type": JSON, **(producer.headers() if producer else {})}
    return Request(
        "POST",
        realtime_path(session, io) + "/append",
        body=body,
        headers=headers,
        idempotent=producer is not None,
    )


def stream_append(
    name: str, body: bytes, content_type: str, producer: Producer | None, *, close: bool = False
) -> Request:
    headers = {"Content-Type": content_type, **(producer.headers() if producer else {})}
    if close:
        headers["Stream-Closed"] = "true"
    return Request("POST", stream_path(name), body=body, headers=headers, idempotent=producer is not None)


def append_result(response: httpx.Response, records: int | None) -> AppendResult:
    """The acknowledgement of either append route (the realtime one answers JSON, Durable
    Streams answers with headers only)."""
    next_offset = response.headers.get("Stream-Next-Offset")
    if response.headers.get("content-type", "").startswith(JSON):
        data = json_body(response)
        return AppendResult(
            next_offset=str(data["nextOffset"]),
            records=int(data["records"]),
            offset=str(data["offset"]),
            duplicate=bool(data.get("duplicate", False)),
        )
    if next_offset is None:
        raise UnexpectedResponse(
            "append answered without Stream-Next-Offset", status_code=response.status_code
        )
    duplicate = response.status_code == 204 and "Producer-Seq" in response.headers
    start = None
    if records is not None and not duplicate:
        start = format_offset(offset_position(next_offset) - records)
    return AppendResult(
        next_offset=next_offset, records=0 if duplicate else records, offset=start, duplicate=duplicate
    )


def read_stream(name: str, offset: str, *, live: Literal["long-poll"] | None = None) -> Request:
    params = [("offset", offset)]
    if live is not None:
        params.append(("live", live))
    return Request("GET", stream_path(name), params=tuple(params))


def read_result(response: httpx.Response) -> ReadResult:
    """A catch-up or long-poll answer. A JSON stream's records each get the offset after them;
    a byte stream's answer is one record of bytes."""
    next_offset = response.headers.get("Stream-Next-Offset")
    if next_offset is None:
        raise UnexpectedResponse("read answered without Stream-Next-Offset", status_code=response.status_code)
    up_to_date = response.headers.get("Stream-Up-To-Date") == "true"
    closed = response.headers.get("Stream-Closed") == "true"
    records: tuple[Record, ...] = ()
    if response.status_code == 200 and response.content:
        if response.headers.get("content-type", "").startswith(JSON):
            values = json_body(response)
            end = offset_position(next_offset)
            first = end - len(values)
            records = tuple(Record(value, format_offset(first + i + 1)) for i, value in enumerate(values))
        else:
            records = (Record(response.content, next_offset),)
    return ReadResult(records, next_offset, up_to_date, closed)


def head_stream(name: str) -> Request:
    return Request("HEAD", stream_path(name))


def stream_info(name: str, response: httpx.Response) -> StreamInfo:
    headers = response.headers
    ttl = headers.get("Stream-TTL")
    return StreamInfo(
        name=name,
        content_type=headers.get("content-type", ""),
        next_offset=headers.get("Stream-Next-Offset", ""),
        closed=headers.get("Stream-Closed") == "true",
        ttl_seconds=int(ttl) if ttl is not None else None,
        expires_at=parse_datetime(headers.get("Stream-Expires-At")),
    )


def create_stream(
    name: str,
    *,
    content_type: str,
    ttl_seconds: int | None,
    expires_at: datetime | str | None,
    closed: bool,
    fork_from: str | None,
    fork_offset: str | None,
    body: bytes | None,
) -> Request:
    headers = {"Content-Type": content_type}
    if ttl_seconds is not None:
        headers["Stream-TTL"] = str(ttl_seconds)
    if expires_at is not None:
        headers["Stream-Expires-At"] = _iso(expires_at)
    if closed:
        headers["Stream-Closed"] = "true"
    if fork_from is not None:
        headers["Stream-Forked-From"] = stream_path(fork_from)
        if fork_offset is not None:
            headers["Stream-Fork-Offset"] = fork_offset
    # Creating with the same settings again answers 200: safe to retry.
    return Request("PUT", stream_path(name), body=body, headers=headers, idempotent=True)


def delete_stream(name: str) -> Request:
    return Request("DELETE", stream_path(name), idempotent=True)


def subscribe_channel(session: str, io: str, offset: str, timeout_seconds: int | None) -> Request:
    headers = {"Accept": "text/event-stream"}
    if timeout_seconds is not None:
        headers["Timeout-Seconds"] = str(timeout_seconds)
    return Request("GET", realtime_path(session, io), params=(("offset", offset),), headers=headers)
