"""Subscription SQL. Every function takes a connection; callers own transactions and row locks
(a decision about a subscription's lease is always taken with its row ``FOR UPDATE``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from threadline.db import Conn
from threadline.subscriptions.models import StreamCursor, SubscriptionSpec
from threadline.subscriptions.patterns import literal_prefix, sql_regex

__all__ = [
    "StreamFacts",
    "add_first_signing_key",
    "advance",
    "changed_streams",
    "cursors",
    "delivered",
    "due_subscriptions",
    "extend_lease",
    "fill_pattern_matchers",
    "insert",
    "lease",
    "link_at",
    "link_at_tail",
    "load",
    "load_pk",
    "pattern_candidates",
    "pattern_subscriptions",
    "schedule_retry",
    "signing_keys",
    "subscriptions_linking",
    "to_idle",
    "tombstone",
    "unlink_explicit",
    "wake_pull",
    "wake_webhook",
]

# The lock every delivery decision takes on its subscription row. NO KEY UPDATE, not UPDATE: it
# excludes the other decisions all the same, but not the KEY SHARE lock a foreign-key check takes,
# so linking a newly matched stream (an insert into subscription_streams) never waits on an ack
# that is itself about to update a link: no deadlock between the two.
_ROW_LOCK = "FOR NO KEY UPDATE"

_COLUMNS = """pk, environment_id, id, kind, pattern, session_type, webhook_url, wake_stream, lease_ttl_ms,
    description, config_hash, base_url, created_at, phase, generation, wake_id, token_hash, holder,
    lease_expires_at, snapshot, attempts, next_attempt_at, last_error,
    coalesce(lease_expires_at > now(), false) AS lease_live,
    coalesce(next_attempt_at > now(), false) AS backing_off"""


async def load(
    conn: Conn, environment_id: str, subscription_id: str, *, lock: bool = False
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM subscriptions WHERE environment_id = $1 AND id = $2 AND deleted_at IS NULL"
        + (f" {_ROW_LOCK}" if lock else ""),
        environment_id,
        subscription_id,
    )


async def load_pk(conn: Conn, pk: int) -> asyncpg.Record | None:
    """The live subscription ``pk``, locked."""
    return await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM subscriptions WHERE pk = $1 AND deleted_at IS NULL {_ROW_LOCK}", pk
    )


async def insert(
    conn: Conn,
    environment_id: str,
    subscription_id: str,
    spec: SubscriptionSpec,
    config_hash: str,
    base_url: str,
) -> int:
    pk: int = await conn.fetchval(
        """INSERT INTO subscriptions (environment_id, id, kind, pattern, session_type, webhook_url, wake_stream,
                                      lease_ttl_ms, description, config_hash, base_url,
                                      pattern_prefix, pattern_regex)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING pk""",
        environment_id,
        subscription_id,
        spec.type,
        spec.pattern,
        spec.session_type,
        None if spec.webhook is None else spec.webhook.url,
        spec.wake_stream,
        spec.lease_ttl_ms,
        spec.description,
        config_hash,
        base_url,
        None if spec.pattern is None else literal_prefix(spec.pattern),
        None if spec.pattern is None else sql_regex(spec.pattern),
    )
    return pk


async def fill_pattern_matchers(conn: Conn) -> int:
    """Give subscriptions created before migration 0008 the prefix and expression its trigger
    matches new streams with (until then, their matches are linked on a stream's first record)."""
    rows = await conn.fetch(
        "SELECT pk, pattern FROM subscriptions WHERE pattern IS NOT NULL AND pattern_regex IS NULL"
    )
    if rows:
        await conn.executemany(
            "UPDATE subscriptions SET pattern_prefix = $2, pattern_regex = $3 WHERE pk = $1",
            [(r["pk"], literal_prefix(r["pattern"]), sql_regex(r["pattern"])) for r in rows],
        )
    return len(rows)


async def tombstone(conn: Conn, pk: int) -> None:
    """Deleted: in-flight acks find no live row and fail; the cursors go with it."""
    await conn.execute(
        """UPDATE subscriptions SET deleted_at = now(), phase = 'idle', token_hash = NULL, holder = NULL,
                  lease_expires_at = NULL, snapshot = NULL WHERE pk = $1""",
        pk,
    )
    await conn.execute("DELETE FROM subscription_streams WHERE subscription_pk = $1", pk)


async def link_at_tail(
    conn: Conn, pk: int, environment_id: str, paths: Sequence[str], *, explicit: bool
) -> None:
    """Link ``paths`` at their current tails (creation never replays history); a missing stream
    is linked at 0. An existing link keeps its cursor and gains the link type."""
    await conn.execute(
        """INSERT INTO subscription_streams (subscription_pk, path, explicit, glob, acked_offset)
           SELECT $1, p, $3, NOT $3,
                  coalesce((SELECT s.next_offset FROM streams s
                            WHERE s.environment_id = $4 AND s.name = p AND s.deleted_at IS NULL), 0)
           FROM unnest($2::text[]) AS p
           ON CONFLICT (subscription_pk, path) DO UPDATE
             SET explicit = subscription_streams.explicit OR EXCLUDED.explicit,
                 glob = subscription_streams.glob OR EXCLUDED.glob""",
        pk,
        list(paths),
        explicit,
        environment_id,
    )


async def link_at(conn: Conn, links: Iterable[tuple[int, str, int]]) -> None:
    """Glob links for streams discovered by an append: ``(subscription pk, path, offset)``, the
    offset being where the stream's own records begin, so the append that found it is pending."""
    rows = list(links)
    if not rows:
        return
    pks, paths, offsets = [row[0] for row in rows], [row[1] for row in rows], [row[2] for row in rows]
    # Existing links are not touched (DO NOTHING takes no row lock), except the rare explicit link
    # that the pattern now also matches; an ack may be updating those rows right now.
    await conn.execute(
        """INSERT INTO subscription_streams (subscription_pk, path, glob, acked_offset)
           SELECT u.pk, u.p, true, u.o FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS u(pk, p, o)
           ON CONFLICT (subscription_pk, path) DO NOTHING""",
        pks,
        paths,
        offsets,
    )
    await conn.execute(
        """UPDATE subscription_streams l SET glob = true
           FROM unnest($1::bigint[], $2::text[]) AS u(pk, p)
           WHERE l.subscription_pk = u.pk AND l.path = u.p AND NOT l.glob""",
        pks,
        paths,
    )


async def unlink_explicit(conn: Conn, pk: int, path: str) -> None:
    await conn.execute(
        "UPDATE subscription_streams SET explicit = false WHERE subscription_pk = $1 AND path = $2", pk, path
    )
    await conn.execute(
        "DELETE FROM subscription_streams WHERE subscription_pk = $1 AND path = $2 AND NOT explicit AND NOT glob",
        pk,
        path,
    )


async def cursors(conn: Conn, pk: int, environment_id: str) -> list[StreamCursor]:
    rows = await conn.fetch(
        """SELECT l.path, l.explicit, l.acked_offset, coalesce(s.next_offset, 0) AS tail
           FROM subscription_streams l
           LEFT JOIN streams s ON s.environment_id = $2 AND s.name = l.path AND s.deleted_at IS NULL
           WHERE l.subscription_pk = $1 ORDER BY l.path""",
        pk,
        environment_id,
    )
    return [StreamCursor(r["path"], r["explicit"], r["acked_offset"], r["tail"]) for r in rows]


async def pattern_candidates(
    conn: Conn, environment_id: str, prefix: str, session_type: str | None
) -> list[asyncpg.Record]:
    """Live streams whose names start with ``prefix`` (and, with ``session_type``, that are
    channels of sessions of that type): what a pattern may match."""
    return await conn.fetch(
        """SELECT s.name FROM streams s LEFT JOIN sessions se ON se.id = s.session_id
           WHERE s.environment_id = $1 AND s.deleted_at IS NULL AND starts_with(s.name, $2)
             AND ($3::text IS NULL OR se.type = $3)""",
        environment_id,
        prefix,
        session_type,
    )


@dataclass(frozen=True, slots=True)
class StreamFacts:
    environment_id: str
    name: str
    session_type: str | None
    start: int  # where the stream's own records begin (a fork's inherited prefix is history)


async def changed_streams(conn: Conn, stream_ids: Sequence[int]) -> list[StreamFacts]:
    """The changed streams of environments that have subscriptions (one query: most appends
    belong to environments without any, and cost nothing more)."""
    rows = await conn.fetch(
        """SELECT s.environment_id, s.name, se.type AS session_type, s.fork_offset
           FROM streams s LEFT JOIN sessions se ON se.id = s.session_id
           WHERE s.id = ANY($1::bigint[]) AND s.deleted_at IS NULL
             AND EXISTS (SELECT 1 FROM subscriptions sub
                         WHERE sub.environment_id = s.environment_id AND sub.deleted_at IS NULL)""",
        list(stream_ids),
    )
    return [StreamFacts(r["environment_id"], r["name"], r["session_type"], r["fork_offset"]) for r in rows]


async def pattern_subscriptions(conn: Conn, environment_ids: Sequence[str]) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT pk, environment_id, pattern, session_type, wake_stream FROM subscriptions
           WHERE environment_id = ANY($1::text[]) AND deleted_at IS NULL AND pattern IS NOT NULL""",
        list(environment_ids),
    )


async def subscriptions_linking(conn: Conn, streams: Sequence[StreamFacts]) -> set[int]:
    """Live subscriptions with a link to any of ``streams``."""
    rows = await conn.fetch(
        """SELECT DISTINCT l.subscription_pk
           FROM unnest($1::text[], $2::text[]) AS c(environment_id, name)
           JOIN subscriptions sub ON sub.environment_id = c.environment_id AND sub.deleted_at IS NULL
           JOIN subscription_streams l ON l.subscription_pk = sub.pk AND l.path = c.name""",
        [s.environment_id for s in streams],
        [s.name for s in streams],
    )
    return {r["subscription_pk"] for r in rows}


async def due_subscriptions(conn: Conn, limit: int) -> list[int]:
    """Subscriptions the sweeper must look at: an expired lease or unclaimed wake, or idle with
    pending work (a wake lost to a crash, a retry that is due)."""
    rows = await conn.fetch(
        """SELECT sub.pk FROM subscriptions sub
           WHERE sub.deleted_at IS NULL AND (
             (sub.phase <> 'idle' AND sub.lease_expires_at <= now())
             OR (sub.phase = 'idle' AND coalesce(sub.next_attempt_at <= now(), true) AND EXISTS (
                   SELECT 1 FROM subscription_streams l
                   JOIN streams s ON s.environment_id = sub.environment_id AND s.name = l.path
                                  AND s.deleted_at IS NULL
                   WHERE l.subscription_pk = sub.pk AND s.next_offset > l.acked_offset)))
           LIMIT $1""",
        limit,
    )
    return [r["pk"] for r in rows]


async def delivered(conn: Conn, pk: int, generation: int) -> None:
    """A webhook took wake ``generation``: its retry schedule starts over."""
    await conn.execute(
        """UPDATE subscriptions SET attempts = 0, next_attempt_at = NULL, last_error = NULL
           WHERE pk = $1 AND generation = $2""",
        pk,
        generation,
    )


# --- delivery state transitions (callers hold the row lock) ---------------------------------

_KEY_LOCK = 0x7468_7765_626B  # advisory lock: one instance creates the first signing key
_LEASE = "now() + make_interval(secs => lease_ttl_ms / 1000.0)"


async def lease(conn: Conn, pk: int, generation: int, wake_id: str, token_hash: bytes, holder: str) -> None:
    """A claim: ``holder`` has generation ``generation`` for ``lease_ttl_ms``."""
    await conn.execute(
        f"""UPDATE subscriptions SET phase = 'leased', generation = $2, wake_id = $3, token_hash = $4,
                  holder = $5, lease_expires_at = {_LEASE}, attempts = 0, next_attempt_at = NULL
           WHERE pk = $1""",
        pk,
        generation,
        wake_id,
        token_hash,
        holder,
    )


async def extend_lease(conn: Conn, pk: int) -> None:
    await conn.execute(f"UPDATE subscriptions SET lease_expires_at = {_LEASE} WHERE pk = $1", pk)


async def advance(conn: Conn, pk: int, path: str, offset: int) -> None:
    """Move one cursor forward (never back)."""
    await conn.execute(
        """UPDATE subscription_streams SET acked_offset = greatest(acked_offset, $3)
           WHERE subscription_pk = $1 AND path = $2""",
        pk,
        path,
        offset,
    )


async def to_idle(conn: Conn, pk: int, *, reset_retries: bool) -> None:
    """No wake in flight, no holder, no token: any old token is fenced from here on."""
    await conn.execute(
        """UPDATE subscriptions SET phase = 'idle', token_hash = NULL, holder = NULL, lease_expires_at = NULL,
                  snapshot = NULL,
                  attempts = CASE WHEN $2 THEN 0 ELSE attempts END,
                  next_attempt_at = CASE WHEN $2 THEN NULL ELSE next_attempt_at END
           WHERE pk = $1""",
        pk,
        reset_retries,
    )


async def wake_webhook(
    conn: Conn, pk: int, generation: int, wake_id: str, token_hash: bytes, ttl_seconds: float, snapshot: str
) -> None:
    """A webhook wake: the delivery holds the lease from now, with the streams' snapshot."""
    await conn.execute(
        """UPDATE subscriptions SET phase = 'leased', generation = $2, wake_id = $3, token_hash = $4,
                  holder = 'webhook', lease_expires_at = now() + make_interval(secs => $5), snapshot = $6::jsonb
           WHERE pk = $1""",
        pk,
        generation,
        wake_id,
        token_hash,
        ttl_seconds,
        snapshot,
    )


async def wake_pull(
    conn: Conn, pk: int, generation: int, wake_id: str, wait_seconds: float, unclaimed: int
) -> None:
    """A pull-wake wake: claimable until it is re-issued after ``wait_seconds``."""
    await conn.execute(
        """UPDATE subscriptions SET phase = 'woken', generation = $2, wake_id = $3, token_hash = NULL,
                  holder = NULL, lease_expires_at = now() + make_interval(secs => $4), attempts = $5
           WHERE pk = $1""",
        pk,
        generation,
        wake_id,
        wait_seconds,
        unclaimed,
    )


async def schedule_retry(conn: Conn, pk: int, attempts: int, delay_seconds: float, error: str) -> None:
    """A failed webhook delivery: drop the lease; the next wake waits ``delay_seconds`` (§7.1)."""
    await conn.execute(
        """UPDATE subscriptions SET phase = 'idle', token_hash = NULL, holder = NULL, lease_expires_at = NULL,
                  snapshot = NULL, attempts = $2, next_attempt_at = now() + make_interval(secs => $3),
                  last_error = $4
           WHERE pk = $1""",
        pk,
        attempts,
        delay_seconds,
        error,
    )


async def signing_keys(conn: Conn) -> list[bytes]:
    rows = await conn.fetch("SELECT private_key FROM webhook_signing_keys ORDER BY created_at, kid")
    return [bytes(row["private_key"]) for row in rows]


async def add_first_signing_key(conn: Conn, kid: str, private_key: bytes) -> list[bytes]:
    """Store ``private_key`` unless another instance stored a key first (in a transaction)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _KEY_LOCK)
    existing = await signing_keys(conn)
    if existing:
        return existing
    await conn.execute(
        "INSERT INTO webhook_signing_keys (kid, private_key) VALUES ($1, $2)", kid, private_key
    )
    return [private_key]
