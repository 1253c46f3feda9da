"""One definition per session list filter, per derived status and per mirrored session column.

Everything that used to be written once per place is derived from the tables here:

- the accepted ``filter[...]`` query keys and their parsing (``listing.parse_list_query`` /
  ``parse_count_query``) and their OpenAPI description (``api.openapi``);
- the WHERE conditions for Postgres (``repository``) and for ClickHouse (``clickhouse_listing``),
  rendered through one :class:`SqlParams` per dialect, so both stores filter on exactly the same
  set of conditions;
- the derived status (ACTIVE/CLOSED/EXPIRED): :func:`session_status` in Python and its SQL
  conditions and per-status counts in both dialects come from :data:`STATUS_RULES`;
- the ``sessions_v1`` columns the replication consumer writes (:data:`SESSIONS_V1_COLUMNS`).

A new "any of these values" filter on a column is one :class:`AnyOfFilter` entry in
:data:`ANY_OF_FILTERS` (plus, for a new column, a :class:`MirrorColumn` entry, a Postgres
migration and a ClickHouse schema file).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from threadline.errors import ValidationFailed

__all__ = [
    "ANY_OF_FILTERS",
    "CREATED_FROM",
    "CREATED_PERIOD",
    "CREATED_TO",
    "FILTER_KEYS",
    "FILTER_PARAMS",
    "SESSIONS_V1_COLUMNS",
    "STATUSES",
    "STATUS_PARAM",
    "STATUS_RULES",
    "AnyOfFilter",
    "ClickHouseParams",
    "MirrorColumn",
    "MirroredRow",
    "PostgresParams",
    "QueryParam",
    "SessionFilters",
    "SqlParams",
    "Status",
    "StatusRule",
    "filter_conditions",
    "parse_filters",
    "session_status",
    "single_value",
    "status_condition",
    "status_counts",
    "to_micros",
]

# --- Query parameters ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueryParam:
    """A query-string parameter as the OpenAPI document describes it."""

    name: str
    description: str

    def openapi(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": "query",
            "schema": {"type": "string"},
            "description": self.description,
        }


@dataclass(frozen=True, slots=True)
class AnyOfFilter:
    """``filter[<key>]=a,b``: sessions whose ``column`` is any of the values.

    ``key`` names the filter in :attr:`SessionFilters.any_of` and as a ClickHouse parameter;
    ``column`` is the same in Postgres ``sessions`` and ClickHouse ``sessions_v1``. With
    ``array`` the column holds several values and a session matches when they overlap. With
    ``own_id_when_unset`` a session whose column is unset (NULL / '') counts as holding its own
    id: how ``rootId`` is stored (NULL for a root) and rendered (the root's own id).
    """

    key: str
    column: str
    description: str
    array: bool = False
    max_items: int = 100
    own_id_when_unset: bool = False

    @property
    def param(self) -> str:
        return f"filter[{self.key}]"

    @property
    def query_param(self) -> QueryParam:
        return QueryParam(self.param, self.description)


# Values are never empty (the parser drops empty items), so a ClickHouse '' (unset optional
# string) never matches, as NULL never matches in Postgres.
ANY_OF_FILTERS: tuple[AnyOfFilter, ...] = (
    AnyOfFilter("type", "type", "Comma-separated types (any of)."),
    AnyOfFilter("tags", "tags", "Comma-separated tags (any of), at most 10.", array=True, max_items=10),
    AnyOfFilter("taskIdentifier", "task_identifier", "Comma-separated task identifiers (any of)."),
    AnyOfFilter("externalId", "external_id", "Comma-separated external ids (any of)."),
    AnyOfFilter(
        "forkedFrom", "forked_from", "Comma-separated session ids (any of): forks made directly from them."
    ),
    AnyOfFilter(
        "rootId",
        "root_id",
        "Comma-separated session ids (any of): every session of those fork trees, the roots included.",
        own_id_when_unset=True,
    ),
)

# --- Derived status -----------------------------------------------------------------------------

Status = Literal["ACTIVE", "CLOSED", "EXPIRED"]


@dataclass(frozen=True, slots=True)
class StatusRule:
    """When a session has a status: closed or not, and where ``expires_at`` stands against now.

    ``expiry`` is ``"passed"`` (``expires_at <= now``), ``"pending"`` (no expiry, or later than
    now) or None (not looked at). The rules partition sessions: exactly one matches any session.
    """

    closed: bool
    expiry: Literal["passed", "pending"] | None

    def matches(self, closed_at: datetime | None, expires_at: datetime | None, now: datetime) -> bool:
        if (closed_at is not None) != self.closed:
            return False
        if self.expiry is None:
            return True
        passed = expires_at is not None and expires_at <= now
        return passed == (self.expiry == "passed")


# The order is the order of error messages, OpenAPI text and ``byStatus``.
STATUS_RULES: dict[Status, StatusRule] = {
    "ACTIVE": StatusRule(closed=False, expiry="pending"),
    "CLOSED": StatusRule(closed=True, expiry=None),
    "EXPIRED": StatusRule(closed=False, expiry="passed"),
}
STATUSES: tuple[Status, ...] = tuple(STATUS_RULES)


def session_status(
    closed_at: datetime | None, expires_at: datetime | None, now: datetime | None = None
) -> Status:
    """A session's status: stored nowhere, derived from ``closed_at``/``expires_at`` at read time."""
    at = now or datetime.now(UTC)
    return next(status for status, rule in STATUS_RULES.items() if rule.matches(closed_at, expires_at, at))


STATUS_PARAM = QueryParam("filter[status]", f"Comma-separated statuses: {', '.join(STATUSES)}.")
CREATED_PERIOD = QueryParam("filter[createdAt][period]", "Created within this period: 30m, 12h, 7d, 2w.")
CREATED_FROM = QueryParam("filter[createdAt][from]", "Created at or after (ISO 8601 or epoch ms).")
CREATED_TO = QueryParam("filter[createdAt][to]", "Created at or before (ISO 8601 or epoch ms).")

FILTER_PARAMS: tuple[QueryParam, ...] = (
    *(f.query_param for f in ANY_OF_FILTERS),
    STATUS_PARAM,
    CREATED_PERIOD,
    CREATED_FROM,
    CREATED_TO,
)
FILTER_KEYS: frozenset[str] = frozenset(p.name for p in FILTER_PARAMS)

# --- Parsed filters -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionFilters:
    """A list/count request's filters. ``any_of`` maps an :class:`AnyOfFilter` key to its values
    and holds only the filters that were given."""

    any_of: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    statuses: tuple[Status, ...] = ()
    created_from: datetime | None = None
    created_to: datetime | None = None


_PERIOD = re.compile(r"^(\d{1,6})([smhdw])$")
_PERIOD_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def single_value(params: Mapping[str, list[str]], key: str) -> str | None:
    """The one value of ``key``; given twice is a 400 rather than a silent pick."""
    values = params.get(key)
    if not values:
        return None
    if len(values) > 1:
        raise ValidationFailed(f"{key} was given {len(values)} times; give it once")
    if "\x00" in values[0]:
        raise ValidationFailed(f"{key} may not contain NUL (%00)")
    return values[0]


def _csv(params: Mapping[str, list[str]], key: str, *, max_items: int = 100) -> tuple[str, ...]:
    raw = single_value(params, key)
    if raw is None:
        return ()
    items = tuple(dict.fromkeys(item.strip() for item in raw.split(",") if item.strip()))
    if not items:
        raise ValidationFailed(f"{key} is empty")
    if len(items) > max_items:
        raise ValidationFailed(f"{key} has {len(items)} values; at most {max_items}")
    return items


def _timestamp(params: Mapping[str, list[str]], key: str) -> datetime | None:
    raw = single_value(params, key)
    if raw is None:
        return None
    try:
        if raw.isascii() and raw.isdigit():
            return datetime.fromtimestamp(int(raw) / 1000, UTC)  # epoch milliseconds
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise ValidationFailed(f"{key} must be an ISO 8601 timestamp or epoch milliseconds") from None
    if value.tzinfo is None:
        raise ValidationFailed(f"{key} must include a timezone (e.g. 2026-01-01T00:00:00Z)")
    return value


def _statuses(params: Mapping[str, list[str]]) -> tuple[Status, ...]:
    given = tuple(s.upper() for s in _csv(params, STATUS_PARAM.name))
    bad = [s for s in given if s not in STATUS_RULES]
    if bad:
        raise ValidationFailed(
            f"{STATUS_PARAM.name} values must be among {', '.join(STATUSES)}; got {', '.join(bad)}"
        )
    return tuple(s for g in given for s in STATUSES if s == g)  # as given, typed as Status


def _created_range(params: Mapping[str, list[str]], now: datetime) -> tuple[datetime | None, datetime | None]:
    period = single_value(params, CREATED_PERIOD.name)
    created_from = _timestamp(params, CREATED_FROM.name)
    created_to = _timestamp(params, CREATED_TO.name)
    if period is not None:
        if created_from is not None or created_to is not None:
            raise ValidationFailed("filter[createdAt][period] cannot be combined with [from]/[to]")
        match = _PERIOD.match(period)
        if match is None:
            raise ValidationFailed("filter[createdAt][period] must look like 30m, 12h, 7d or 2w")
        created_from = now - timedelta(seconds=int(match[1]) * _PERIOD_UNITS[match[2]])
    if created_from is not None and created_to is not None and created_from > created_to:
        raise ValidationFailed("filter[createdAt][from] is after filter[createdAt][to]")
    return created_from, created_to


def parse_filters(params: Mapping[str, list[str]], now: datetime) -> SessionFilters:
    """The filters in a query string (keys already checked against :data:`FILTER_KEYS`).

    Status and createdAt are checked before the any-of filters: when several are wrong, the
    error names the same one it always did.
    """
    statuses = _statuses(params)
    created_from, created_to = _created_range(params, now)
    any_of = {
        f.key: values for f in ANY_OF_FILTERS if (values := _csv(params, f.param, max_items=f.max_items))
    }
    return SessionFilters(any_of=any_of, statuses=statuses, created_from=created_from, created_to=created_to)


# --- SQL in two dialects ------------------------------------------------------------------------


def to_micros(value: datetime) -> int:
    """Microseconds since the epoch, exactly (no float): cursors and ClickHouse keys need it."""
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


class SqlParams(ABC):
    """The bound values of one statement in one SQL dialect, and how that dialect spells things.

    Each filter and status rule is rendered through this, so Postgres and ClickHouse get their
    conditions from the same definitions. ``now`` is bound once, and only when a condition uses it.
    """

    def __init__(self, now: datetime) -> None:
        self._now = now
        self._now_placeholder: str | None = None

    def now(self) -> str:
        if self._now_placeholder is None:
            self._now_placeholder = self.timestamp("now", self._now)
        return self._now_placeholder

    @abstractmethod
    def column(self, name: str) -> str: ...

    @abstractmethod
    def unset(self, column: str) -> str:
        """``column`` (an optional string) holds no value."""

    @property
    @abstractmethod
    def id_column(self) -> str:
        """The session's own id."""

    @abstractmethod
    def texts(self, name: str, values: Sequence[str]) -> str:
        """A placeholder for an array of strings."""

    @abstractmethod
    def timestamp(self, name: str, value: datetime) -> str:
        """A placeholder for a point in time, usable against the timestamp columns."""

    @abstractmethod
    def any_of(self, column: str, values: str, *, array: bool) -> str:
        """``column`` is one of ``values`` (or, for an array column, shares one with them)."""

    @abstractmethod
    def count_if(self, condition: str) -> str: ...


class PostgresParams(SqlParams):
    """Positional ``$n`` parameters, in ``args`` order; columns of ``sessions s``.

    Binding ``now`` only on use matters here: an unused parameter has no type and Postgres refuses
    the statement (``filter[status]=CLOSED`` alone).
    """

    def __init__(self, now: datetime, args: list[Any] | None = None) -> None:
        super().__init__(now)
        self.args: list[Any] = [] if args is None else args

    def bind(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"

    def column(self, name: str) -> str:
        return f"s.{name}"

    def unset(self, column: str) -> str:
        return f"{column} IS NULL"

    @property
    def id_column(self) -> str:
        return "s.id"

    def texts(self, name: str, values: Sequence[str]) -> str:
        return f"{self.bind(list(values))}::text[]"

    def timestamp(self, name: str, value: datetime) -> str:
        return self.bind(value)

    def any_of(self, column: str, values: str, *, array: bool) -> str:
        return f"{column} && {values}" if array else f"{column} = ANY({values})"

    def count_if(self, condition: str) -> str:
        return f"count(*) FILTER (WHERE {condition})"


class ClickHouseParams(SqlParams):
    """Server-side ``{name:Type}`` parameters in ``params``; columns of ``sessions_v1``.

    Timestamps travel as Int64 microseconds through ``fromUnixTimestamp64Micro``:
    clickhouse-connect formats a ``datetime`` parameter to whole seconds.
    """

    def __init__(self, now: datetime, params: dict[str, Any] | None = None) -> None:
        super().__init__(now)
        self.params: dict[str, Any] = {} if params is None else params

    def bind(self, name: str, type_: str, value: Any) -> str:
        self.params[name] = value
        return f"{{{name}:{type_}}}"

    def timestamp_us(self, name: str, micros: int) -> str:
        return f"fromUnixTimestamp64Micro({self.bind(f'{name}_us', 'Int64', micros)}, 'UTC')"

    def column(self, name: str) -> str:
        return name

    def unset(self, column: str) -> str:
        return f"{column} = ''"

    @property
    def id_column(self) -> str:
        return "session_id"

    def texts(self, name: str, values: Sequence[str]) -> str:
        return self.bind(name, "Array(String)", list(values))

    def timestamp(self, name: str, value: datetime) -> str:
        return self.timestamp_us(name, to_micros(value))

    def any_of(self, column: str, values: str, *, array: bool) -> str:
        return f"hasAny({column}, {values})" if array else f"has({values}, {column})"

    def count_if(self, condition: str) -> str:
        return f"countIf({condition})"


def status_condition(status: Status, sql: SqlParams) -> str:
    """The SQL form of ``STATUS_RULES[status]``."""
    rule = STATUS_RULES[status]
    closed_at, expires_at = sql.column("closed_at"), sql.column("expires_at")
    parts = [f"{closed_at} IS NOT NULL" if rule.closed else f"{closed_at} IS NULL"]
    if rule.expiry == "passed":
        parts.append(f"{expires_at} <= {sql.now()}")
    elif rule.expiry == "pending":
        parts.append(f"({expires_at} IS NULL OR {expires_at} > {sql.now()})")
    return parts[0] if len(parts) == 1 else f"({' AND '.join(parts)})"


def status_counts(sql: SqlParams) -> list[str]:
    """Select expressions counting each status, aliased by its lower-case name."""
    return [f"{sql.count_if(status_condition(status, sql))} AS {status.lower()}" for status in STATUSES]


def _any_of_condition(definition: AnyOfFilter, values: Sequence[str], sql: SqlParams) -> str:
    column = sql.column(definition.column)
    bound = sql.texts(definition.key, values)  # bound once, used twice below when needed
    condition = sql.any_of(column, bound, array=definition.array)
    if not definition.own_id_when_unset:
        return condition
    # Not coalesce(column, id): each side can use its own index (Postgres) or skip index.
    own = sql.any_of(sql.id_column, bound, array=False)
    return f"({condition} OR ({sql.unset(column)} AND {own}))"


def filter_conditions(filters: SessionFilters, sql: SqlParams) -> list[str]:
    """The WHERE conditions for ``filters`` (to AND with the environment condition)."""
    where = [
        _any_of_condition(f, filters.any_of[f.key], sql) for f in ANY_OF_FILTERS if filters.any_of.get(f.key)
    ]
    if filters.statuses:
        where.append("(" + " OR ".join(status_condition(status, sql) for status in filters.statuses) + ")")
    if filters.created_from is not None:
        where.append(f"{sql.column('created_at')} >= {sql.timestamp('created_from', filters.created_from)}")
    if filters.created_to is not None:
        where.append(f"{sql.column('created_at')} <= {sql.timestamp('created_to', filters.created_to)}")
    return where


# --- The ClickHouse mirror ----------------------------------------------------------------------


class MirroredRow(Protocol):
    """One version of a Postgres ``sessions`` row on its way to ClickHouse."""

    @property
    def values(self) -> dict[str, Any]: ...
    @property
    def version(self) -> int: ...
    @property
    def deleted(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class MirrorColumn:
    """A ``sessions_v1`` column and its value for a row version."""

    name: str
    value: Callable[[MirroredRow], Any]


def _value(name: str) -> Callable[[MirroredRow], Any]:
    return lambda row: row.values[name]


def _nullable(name: str) -> Callable[[MirroredRow], Any]:
    return lambda row: row.values.get(name)


def _text(name: str) -> Callable[[MirroredRow], Any]:
    """Optional strings are '' when unset in ClickHouse (none can be '' when set)."""
    return lambda row: row.values.get(name) or ""


def _metadata(row: MirroredRow) -> str:
    # Backfill reads jsonb as text, the stream as parsed JSON: store one canonical form.
    metadata = row.values.get("metadata")
    return json.dumps(
        json.loads(metadata) if isinstance(metadata, str) else metadata or {}, separators=(",", ":")
    )


# In the order of the clickhouse_schema/ files (a unit test checks it).
SESSIONS_V1_COLUMNS: tuple[MirrorColumn, ...] = (
    MirrorColumn("environment_id", _value("environment_id")),
    MirrorColumn("organization_id", _value("organization_id")),
    MirrorColumn("project_id", _value("project_id")),
    MirrorColumn("session_id", _value("id")),
    MirrorColumn("external_id", _text("external_id")),
    MirrorColumn("type", _value("type")),
    MirrorColumn("task_identifier", _text("task_identifier")),
    MirrorColumn("tags", lambda row: list(row.values.get("tags") or [])),
    MirrorColumn("metadata", _metadata),
    MirrorColumn("closed_at", _nullable("closed_at")),
    MirrorColumn("closed_reason", _text("closed_reason")),
    MirrorColumn("expires_at", _nullable("expires_at")),
    MirrorColumn("created_at", _value("created_at")),
    MirrorColumn("updated_at", _value("updated_at")),
    MirrorColumn("last_active_at", _value("last_active_at")),
    MirrorColumn("_version", lambda row: row.version),
    MirrorColumn("_is_deleted", lambda row: 1 if row.deleted else 0),
    # clickhouse_schema/003_sessions_v1_forks.sql: fork lineage, '' / NULL for a root.
    MirrorColumn("forked_from", _text("forked_from")),
    MirrorColumn("fork_out_offset", _nullable("fork_out_offset")),
    MirrorColumn("fork_in_offset", _nullable("fork_in_offset")),
    MirrorColumn("root_id", _text("root_id")),
)
