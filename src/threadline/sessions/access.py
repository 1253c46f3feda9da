"""Who may do what to which session, and to which stream (SPEC §2).

Sessions are addressed by id or externalId; a session of another environment is a 404, never a
403, so existence is never revealed. A session's channels (``sessions/<id>/out|in``) follow the
session's scopes; stand-alone streams need an environment-wide scope (or a secret key).
"""

from __future__ import annotations

from dataclasses import dataclass

from threadline.auth.principal import Action, Principal, SessionRef
from threadline.db import Conn, ConnectionSource
from threadline.errors import Forbidden, SessionClosed, SessionExpired, StreamNotFound
from threadline.sessions import repository
from threadline.sessions.models import SessionView
from threadline.streams.names import SESSION_PREFIX, parse_session_channel, session_channel_name

__all__ = [
    "StreamAccess",
    "authorized_session",
    "channel_session",
    "refuse_appends_to",
    "require_scope",
    "stream_access",
]


def require_scope(principal: Principal, action: Action, *, environment_wide: bool = False) -> None:
    """403 unless the credential could ``action`` some session (or every one, when
    ``environment_wide``: create, list and count need that). Answered before any lookup."""
    allowed = (
        principal.may_on_all_sessions(action) if environment_wide else principal.may_on_any_session(action)
    )
    if not allowed:
        scope = f"{action.value}:sessions"
        raise Forbidden(
            f"this credential lacks the {scope} scope" + ("" if environment_wide else f" (or {scope}:<id>)")
        )


async def authorized_session(conn: Conn, principal: Principal, action: Action, ref: str) -> SessionView:
    """Load ``ref`` in the caller's environment (404 otherwise) and check the scope on it (403)."""
    session = await repository.get_session(conn, principal.environment.id, ref)
    if not principal.may_on_session(action, SessionRef(session.id, session.external_id)):
        raise Forbidden(f"this credential has no {action.value} scope for session {session.id}")
    return session


async def channel_session(
    pool: ConnectionSource, principal: Principal, action: Action, ref: str
) -> SessionView:
    """The session owning a channel, if the caller may ``action`` its channels (403 / 404)."""
    if not principal.may_on_any_session(action):
        raise Forbidden(f"this credential lacks the {action.value}:sessions scope")
    async with pool.acquire() as conn:
        return await authorized_session(conn, principal, action, ref)


def refuse_appends_to(session: SessionView) -> None:
    """409 with a clear code when a session's channels cannot take appends. The committer checks
    again under the stream's row lock, so an append racing a close is refused too."""
    if session.status == "CLOSED":
        raise SessionClosed(f"session {session.id} is closed; its channels take no appends")
    if session.status == "EXPIRED":
        raise SessionExpired(f"session {session.id} has expired; its channels take no appends")


@dataclass(frozen=True, slots=True)
class StreamAccess:
    """A stream the caller may use: its canonical name, and its session for a channel."""

    name: str
    session_id: str | None


async def stream_access(
    pool: ConnectionSource, principal: Principal, action: Action, name: str
) -> StreamAccess:
    """Check the caller may ``action`` the stream ``name`` (already validated). A channel named by
    its session's externalId resolves to the canonical ``sessions/<session id>/<io>``."""
    channel = parse_session_channel(name)
    if channel is None:
        if name.startswith(SESSION_PREFIX):
            raise StreamNotFound(f"stream {name!r} not found")
        if not principal.may_on_all_sessions(action):
            raise Forbidden(f"stand-alone streams need the environment-wide {action.value}:sessions scope")
        return StreamAccess(name, None)
    ref, io = channel
    session = await channel_session(pool, principal, action, ref)
    return StreamAccess(session_channel_name(session.id, io), session.id)
