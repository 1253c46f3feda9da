"""``client.sessions``: create, get, update, close, fork, list (auto-paging), count, mint_token."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import httpx

from threadline.client import _requests as rq
from threadline.client._channels import AsyncChannel, Channel
from threadline.client._models import Io, Session, SessionCounts, SessionToken
from threadline.client._requests import UNSET, SessionFilters, SortOrder, Status, _Unset
from threadline.client._transport import AsyncTransport, SyncTransport

__all__ = ["AsyncSessions", "Sessions"]

LSN_HEADER = "Threadline-Lsn"


def _filters(
    *,
    type: str | Sequence[str] | None,
    tags: str | Sequence[str] | None,
    task_identifier: str | Sequence[str] | None,
    external_id: str | Sequence[str] | None,
    forked_from: str | Sequence[str] | None,
    root_id: str | Sequence[str] | None,
    status: Status | Sequence[Status] | None,
    period: str | None,
    created_from: datetime | str | None,
    created_to: datetime | str | None,
    min_lsn: str | None,
) -> SessionFilters:
    def many(value: str | Sequence[str] | None) -> Sequence[str] | None:
        return [value] if isinstance(value, str) else value

    return SessionFilters(
        type=many(type),
        tags=many(tags),
        task_identifier=many(task_identifier),
        external_id=many(external_id),
        forked_from=many(forked_from),
        root_id=many(root_id),
        status=many(status),  # type: ignore[arg-type]
        period=period,
        created_from=created_from,
        created_to=created_to,
        min_lsn=min_lsn,
    )


class _SessionsBase:
    """Request building shared by both resources (the HTTP verbs differ only in ``await``)."""

    def _session(self, response: httpx.Response) -> Session[Any]:
        return Session.from_json(
            rq.json_body(response), lsn=response.headers.get(LSN_HEADER), channel=self._channel_factory()
        )

    def _channel_factory(self) -> Any:
        raise NotImplementedError


class Sessions(_SessionsBase):
    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def _channel_factory(self) -> Any:
        return self.channel

    def channel(self, session: str, io: Io) -> Channel:
        """A handle on a session's channel by id or externalId (sends nothing)."""
        return Channel.of_session(self._t, session, io)

    def create(
        self,
        type: str,
        *,
        external_id: str | None = None,
        task_identifier: str | None = None,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        expires_at: datetime | str | None = None,
    ) -> Session[Channel]:
        """Create a session; with ``external_id``, an existing one with it is returned instead."""
        request = rq.create_session(
            type,
            external_id=external_id,
            task_identifier=task_identifier,
            tags=tags,
            metadata=metadata,
            expires_at=expires_at,
        )
        return self._session(self._t.send(request))

    def get(self, session: str) -> Session[Channel]:
        """By id (``session_…``) or externalId."""
        return self._session(self._t.send(rq.get_session(session)))

    def update(
        self,
        session: str,
        *,
        tags: Sequence[str] | _Unset = UNSET,
        metadata: Mapping[str, Any] | _Unset = UNSET,
        external_id: str | _Unset | None = UNSET,
        expires_at: datetime | str | _Unset | None = UNSET,
    ) -> Session[Channel]:
        """Change what is given (``None`` clears ``external_id`` / ``expires_at``)."""
        request = rq.update_session(
            session, tags=tags, metadata=metadata, external_id=external_id, expires_at=expires_at
        )
        return self._session(self._t.send(request))

    def close(self, session: str, *, reason: str | None = None) -> Session[Channel]:
        """Close the session and both its channels (a second close returns the first)."""
        return self._session(self._t.send(rq.close_session(session, reason)))

    def fork(
        self,
        session: str,
        *,
        out_offset: str | None = None,
        in_offset: str | None = None,
        external_id: str | None = None,
        type: str | None = None,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Session[Channel]:
        """A new session whose ``out``/``in`` continue this one's from ``out_offset``/``in_offset``
        (default: the tails; offsets as the server returns them, ``-1`` or ``now``), with this
        one's type, tags and metadata unless given. Nothing is copied; the fork is open even if
        ``session`` is closed. Needs environment-wide write (a secret key has it)."""
        request = rq.fork_session(
            session,
            out_offset=out_offset,
            in_offset=in_offset,
            external_id=external_id,
            type=type,
            tags=tags,
            metadata=metadata,
        )
        return self._session(self._t.send(request))

    def mint_token(
        self, session: str, *, expires_in_seconds: int | None = None, scopes: Sequence[str] | None = None
    ) -> SessionToken:
        """A JWT for this session alone (``scopes`` of ``read`` / ``write``; default both, 1 h)."""
        request = rq.mint_token(session, expires_in_seconds=expires_in_seconds, scopes=scopes)
        return SessionToken.from_json(rq.json_body(self._t.send(request)))

    def count(
        self,
        *,
        type: str | Sequence[str] | None = None,
        tags: str | Sequence[str] | None = None,
        task_identifier: str | Sequence[str] | None = None,
        external_id: str | Sequence[str] | None = None,
        forked_from: str | Sequence[str] | None = None,
        root_id: str | Sequence[str] | None = None,
        status: Status | Sequence[Status] | None = None,
        period: str | None = None,
        created_from: datetime | str | None = None,
        created_to: datetime | str | None = None,
        min_lsn: str | None = None,
    ) -> SessionCounts:
        filters = _filters(**{k: v for k, v in locals().items() if k != "self"})
        return SessionCounts.from_json(rq.json_body(self._t.send(rq.count_sessions(filters))))

    def list(
        self,
        *,
        type: str | Sequence[str] | None = None,
        tags: str | Sequence[str] | None = None,
        task_identifier: str | Sequence[str] | None = None,
        external_id: str | Sequence[str] | None = None,
        forked_from: str | Sequence[str] | None = None,
        root_id: str | Sequence[str] | None = None,
        status: Status | Sequence[Status] | None = None,
        period: str | None = None,
        created_from: datetime | str | None = None,
        created_to: datetime | str | None = None,
        min_lsn: str | None = None,
        sort: SortOrder = "-createdAt",
        page_size: int | None = None,
    ) -> Iterator[Session[Channel]]:
        """Every matching session, fetching pages as the iteration needs them. A sequence filter
        means any of its values; ``period`` is ``30m``, ``12h``, ``7d``, ``2w``."""
        args = {k: v for k, v in locals().items() if k not in ("self", "sort", "page_size")}
        filters = _filters(**args)
        after: str | None = None
        while True:
            response = self._t.send(rq.list_sessions(filters, sort=sort, page_size=page_size, after=after))
            sessions, after = rq.list_page(response)
            for data in sessions:
                yield Session.from_json(data, channel=self.channel)
            if after is None:
                return


class AsyncSessions(_SessionsBase):
    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    def _channel_factory(self) -> Any:
        return self.channel

    def channel(self, session: str, io: Io) -> AsyncChannel:
        return AsyncChannel.of_session(self._t, session, io)

    async def create(
        self,
        type: str,
        *,
        external_id: str | None = None,
        task_identifier: str | None = None,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        expires_at: datetime | str | None = None,
    ) -> Session[AsyncChannel]:
        request = rq.create_session(
            type,
            external_id=external_id,
            task_identifier=task_identifier,
            tags=tags,
            metadata=metadata,
            expires_at=expires_at,
        )
        return self._session(await self._t.send(request))

    async def get(self, session: str) -> Session[AsyncChannel]:
        return self._session(await self._t.send(rq.get_session(session)))

    async def update(
        self,
        session: str,
        *,
        tags: Sequence[str] | _Unset = UNSET,
        metadata: Mapping[str, Any] | _Unset = UNSET,
        external_id: str | _Unset | None = UNSET,
        expires_at: datetime | str | _Unset | None = UNSET,
    ) -> Session[AsyncChannel]:
        request = rq.update_session(
            session, tags=tags, metadata=metadata, external_id=external_id, expires_at=expires_at
        )
        return self._session(await self._t.send(request))

    async def close(self, session: str, *, reason: str | None = None) -> Session[AsyncChannel]:
        return self._session(await self._t.send(rq.close_session(session, reason)))

    async def fork(
        self,
        session: str,
        *,
        out_offset: str | None = None,
        in_offset: str | None = None,
        external_id: str | None = None,
        type: str | None = None,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Session[AsyncChannel]:
        request = rq.fork_session(
            session,
            out_offset=out_offset,
            in_offset=in_offset,
            external_id=external_id,
            type=type,
            tags=tags,
            metadata=metadata,
        )
        return self._session(await self._t.send(request))

    async def mint_token(
        self, session: str, *, expires_in_seconds: int | None = None, scopes: Sequence[str] | None = None
    ) -> SessionToken:
        request = rq.mint_token(session, expires_in_seconds=expires_in_seconds, scopes=scopes)
        return SessionToken.from_json(rq.json_body(await self._t.send(request)))

    async def count(
        self,
        *,
        type: str | Sequence[str] | None = None,
        tags: str | Sequence[str] | None = None,
        task_identifier: str | Sequence[str] | None = None,
        external_id: str | Sequence[str] | None = None,
        forked_from: str | Sequence[str] | None = None,
        root_id: str | Sequence[str] | None = None,
        status: Status | Sequence[Status] | None = None,
        period: str | None = None,
        created_from: datetime | str | None = None,
        created_to: datetime | str | None = None,
        min_lsn: str | None = None,
    ) -> SessionCounts:
        filters = _filters(**{k: v for k, v in locals().items() if k != "self"})
        return SessionCounts.from_json(rq.json_body(await self._t.send(rq.count_sessions(filters))))

    async def list(
        self,
        *,
        type: str | Sequence[str] | None = None,
        tags: str | Sequence[str] | None = None,
        task_identifier: str | Sequence[str] | None = None,
        external_id: str | Sequence[str] | None = None,
        forked_from: str | Sequence[str] | None = None,
        root_id: str | Sequence[str] | None = None,
        status: Status | Sequence[Status] | None = None,
        period: str | None = None,
        created_from: datetime | str | None = None,
        created_to: datetime | str | None = None,
        min_lsn: str | None = None,
        sort: SortOrder = "-createdAt",
        page_size: int | None = None,
    ) -> AsyncIterator[Session[AsyncChannel]]:
        args = {k: v for k, v in locals().items() if k not in ("self", "sort", "page_size")}
        filters = _filters(**args)
        after: str | None = None
        while True:
            response = await self._t.send(
                rq.list_sessions(filters, sort=sort, page_size=page_size, after=after)
            )
            sessions, after = rq.list_page(response)
            for data in sessions:
                yield Session.from_json(data, channel=self.channel)
            if after is None:
                return
