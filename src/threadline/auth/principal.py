"""Who is calling, and what they may do.

Scopes (SPEC §2)::

    admin                       everything in the environment
    read:all                    every read
    admin:sessions              read, write and mint tokens for every session
    write:sessions              create / patch / close / append on every session
    read:sessions               get / list / count / subscribe on every session
    admin:sessions:<id>         read, write and mint tokens for one session
    write:sessions:<id>         patch / close / append on one session
    read:sessions:<id>          get / subscribe on one session
    write:subscriptions         create / delete Durable Streams subscriptions, change their
                                streams, claim their work (plus read on every stream matched)
    read:subscriptions          get a subscription (its streams and cursors)

``<id>`` is a friendly id (``session_…``) or an external id. Write does not imply read: a token
that should also read asks for both scopes (minted session tokens carry both). Secret API keys
hold ``admin``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

__all__ = ["Action", "Environment", "Principal", "SessionRef"]


class Action(Enum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


# Which scope verbs grant which action.
_GRANTS: dict[Action, frozenset[str]] = {
    Action.READ: frozenset({"read", "admin"}),
    Action.WRITE: frozenset({"write", "admin"}),
    Action.ADMIN: frozenset({"admin"}),
}


@dataclass(frozen=True, slots=True)
class Environment:
    id: str
    project_id: str
    organization_id: str


@dataclass(frozen=True, slots=True)
class SessionRef:
    """The two names a session-scoped grant may use."""

    id: str
    external_id: str | None


@dataclass(frozen=True, slots=True)
class Principal:
    environment: Environment
    kind: Literal["secret_key", "jwt"]
    subject: str
    scopes: frozenset[str]

    def _environment_wide(self, action: Action) -> bool:
        if "admin" in self.scopes:
            return True
        if action is Action.READ and "read:all" in self.scopes:
            return True
        return any(f"{verb}:sessions" in self.scopes for verb in _GRANTS[action])

    def _granted_session_ids(self, action: Action) -> set[str]:
        granted: set[str] = set()
        for scope in self.scopes:
            verb, sep, rest = scope.partition(":sessions:")
            if sep and rest and verb in _GRANTS[action]:
                granted.add(rest)
        return granted

    def may_on_any_session(self, action: Action) -> bool:
        """True when some session could allow ``action``: used to answer 403 before any lookup."""
        return self._environment_wide(action) or bool(self._granted_session_ids(action))

    def may_on_all_sessions(self, action: Action) -> bool:
        """Environment-wide grant: needed to create, list and count."""
        return self._environment_wide(action)

    def may_on_subscriptions(self, action: Action) -> bool:
        """Subscriptions are environment resources: ``<verb>:subscriptions``, or ``admin``
        (``read:all`` reads them too)."""
        if "admin" in self.scopes or (action is Action.READ and "read:all" in self.scopes):
            return True
        return any(f"{verb}:subscriptions" in self.scopes for verb in _GRANTS[action])

    def may_on_session(self, action: Action, session: SessionRef) -> bool:
        if self._environment_wide(action):
            return True
        granted = self._granted_session_ids(action)
        return session.id in granted or (session.external_id is not None and session.external_id in granted)
