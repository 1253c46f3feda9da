"""The subscription service: configuration (create, get, delete, membership) under Threadline's
auth, and the delivery state machine (wake, claim, ack, release, callback) in Postgres.

Delivery states of one subscription (its row)::

    idle ──pending work──▶ woken (pull-wake: a wake event written, nobody claimed yet)
      ▲                      │ claim
      │                      ▼
      └──ack done/release── leased (a worker, or a webhook delivery, holds generation N)

Every transition runs with the row ``FOR UPDATE`` and bumps ``generation`` when it hands out work,
so a holder whose lease ran out (or that was killed) is fenced: its ack carries an old generation,
wake id or token and changes nothing. What wakes a subscription: this instance's live hub
reporting a stream's tail moved (local commits, and other instances' through ``NOTIFY``), the
end of a lease with work left, and a sweep every ``THREADLINE_SUBSCRIPTION_SWEEP_SECONDS`` that
catches any linked stream with records past its cursor that a crash or a lost notification
left unwoken. A stream a pattern matches is linked by Postgres in the transaction that creates
it (pg_migrations/0008), so no crash falls between its birth and its link; one created while its
subscription was being created is linked here, when any instance learns of a record on it (at
its first offset, so nothing it holds is skipped). A pass that fails is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from threadline.auth.principal import Action, Principal
from threadline.config import Settings
from threadline.db import ConnectionSource
from threadline.errors import (
    AlreadyClaimed,
    Fenced,
    Forbidden,
    OffsetOutOfRange,
    StreamNotFound,
    SubscriptionExists,
    SubscriptionNotFound,
    ValidationFailed,
    WebhookUrlRejected,
)
from threadline.sessions.access import stream_access
from threadline.streams.live import LiveHub
from threadline.streams.offsets import format_offset, parse_offset
from threadline.streams.service import Append, StreamService
from threadline.streams.wire import TailChange
from threadline.subscriptions import repository
from threadline.subscriptions.delivery import DeliveryFailed, WebhookSender
from threadline.subscriptions.models import (
    AckBody,
    AckItem,
    StreamCursor,
    SubscriptionSpec,
    SubscriptionView,
    Wake,
)
from threadline.subscriptions.patterns import literal_prefix, matches
from threadline.subscriptions.webhooks import SigningKey, WebhookPolicy, retry_delay_seconds

__all__ = ["SubscriptionService"]

logger = logging.getLogger(__name__)

_SWEEP_BATCH = 200
_GATHER_SECONDS = 0.02


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _new_token(pk: int) -> str:
    """A claim/callback token: opaque to clients; it names its subscription row (so an ack needs
    no other credential) and only its hash is stored."""
    return f"tlw_{pk}_{secrets.token_urlsafe(32)}"


def _token_pk(token: str) -> int | None:
    prefix, _, rest = token.partition("_")
    pk, _, secret = rest.partition("_")
    if prefix != "tlw" or not pk.isdigit() or not secret or len(pk) > 18:
        return None
    return int(pk)


@dataclass(frozen=True, slots=True)
class _Issued:
    """A wake decided under the row lock, to be delivered after the commit."""

    pk: int
    environment_id: str
    subscription_id: str
    kind: str
    webhook_url: str | None
    wake_stream: str | None
    base_url: str
    wake: Wake


class SubscriptionService:
    def __init__(
        self,
        settings: Settings,
        requests: ConnectionSource,
        background: ConnectionSource,
        streams: StreamService,
        live: LiveHub,
    ) -> None:
        self._settings = settings
        self._requests = requests
        self._background = background
        self._streams = streams
        self._live = live
        self.policy = WebhookPolicy(settings.webhook_allowed_hosts)
        self._keys: list[SigningKey] | None = None
        self._changed: set[int] = set()
        self._changed_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._deliveries: set[asyncio.Task[None]] = set()
        self._sender: WebhookSender | None = None
        self._refused_urls: set[str] = set()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._sender = WebhookSender(self.policy, timeout_seconds=self._settings.webhook_timeout_seconds)
        async with self._background.acquire() as conn:
            filled = await repository.fill_pattern_matchers(conn)
        if filled:
            logger.info("pattern subscriptions now link new streams at creation", extra={"count": filled})
        self._live.add_listener(self._on_tail_changes)
        self._tasks = [
            asyncio.create_task(self._process_changes(), name="threadline-subscription-wakes"),
            asyncio.create_task(self._sweep(), name="threadline-subscription-sweep"),
        ]

    async def stop(self) -> None:
        self._live.remove_listener(self._on_tail_changes)
        for task in [*self._tasks, *self._deliveries]:
            task.cancel()
        for task in [*self._tasks, *self._deliveries]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._sender is not None:
            await self._sender.close()

    # --- signing keys ------------------------------------------------------------------------

    async def signing_keys(self) -> list[SigningKey]:
        """The webhook signing keys, newest last; the first instance to need one creates it."""
        if self._keys is None:
            async with self._requests.acquire() as conn, conn.transaction():
                stored = await repository.signing_keys(conn)
                if not stored:
                    key = SigningKey.generate()
                    stored = await repository.add_first_signing_key(conn, key.kid, key.private_bytes())
            self._keys = [SigningKey.from_private_bytes(raw) for raw in stored]
        return self._keys

    async def jwks(self) -> dict[str, Any]:
        return {"keys": [key.jwk() for key in await self.signing_keys()]}

    # --- configuration -----------------------------------------------------------------------

    async def put(
        self, principal: Principal, subscription_id: str, spec: SubscriptionSpec, base_url: str
    ) -> tuple[SubscriptionView, bool]:
        """Create (True) or re-confirm (False) a subscription; 409 if the id has another config."""
        environment_id = principal.environment.id
        self._require(principal, Action.WRITE)
        if spec.pattern is not None and not principal.may_on_all_sessions(Action.READ):
            raise Forbidden("a pattern subscription needs the environment-wide read:sessions scope")
        explicit = await self._readable(principal, spec.streams or [])
        if spec.wake_stream is not None:
            await self._writable_wake_stream(principal, spec.wake_stream)
        if spec.webhook is not None:
            await self.policy.check_delivery(spec.webhook.url)
            await self.signing_keys()
        config_hash = spec.config_hash(explicit)
        for _ in range(2):
            try:
                async with self._requests.acquire() as conn, conn.transaction():
                    row = await repository.load(conn, environment_id, subscription_id, lock=True)
                    if row is not None:
                        if row["config_hash"] != config_hash:
                            raise SubscriptionExists(
                                f"subscription {subscription_id!r} exists with a different configuration"
                            )
                        return await self._view(conn, row), False
                    pk = await repository.insert(
                        conn, environment_id, subscription_id, spec, config_hash, base_url
                    )
                    await repository.link_at_tail(conn, pk, environment_id, explicit, explicit=True)
                    if spec.pattern is not None:
                        candidates = await repository.pattern_candidates(
                            conn, environment_id, literal_prefix(spec.pattern), spec.session_type
                        )
                        found = [
                            r["name"]
                            for r in candidates
                            if matches(spec.pattern, r["name"]) and r["name"] != spec.wake_stream
                        ]
                        await repository.link_at_tail(conn, pk, environment_id, found, explicit=False)
                    row = await repository.load(conn, environment_id, subscription_id)
                    assert row is not None
                    return await self._view(conn, row), True
            except asyncpg.UniqueViolationError:
                continue  # a concurrent PUT of the same id won: compare with it
        raise SubscriptionExists(f"subscription {subscription_id!r} is being created concurrently; retry")

    async def get(self, principal: Principal, subscription_id: str) -> SubscriptionView:
        self._require(principal, Action.READ)
        async with self._requests.acquire() as conn:
            row = await self._load(conn, principal.environment.id, subscription_id)
            return await self._view(conn, row)

    async def delete(self, principal: Principal, subscription_id: str) -> None:
        self._require(principal, Action.WRITE)
        async with self._requests.acquire() as conn, conn.transaction():
            row = await self._load(conn, principal.environment.id, subscription_id, lock=True)
            await repository.tombstone(conn, row["pk"])

    async def add_streams(self, principal: Principal, subscription_id: str, streams: Sequence[str]) -> None:
        self._require(principal, Action.WRITE)
        paths = await self._readable(principal, streams)
        environment_id = principal.environment.id
        async with self._requests.acquire() as conn, conn.transaction():
            row = await self._load(conn, environment_id, subscription_id, lock=True)
            await repository.link_at_tail(conn, row["pk"], environment_id, paths, explicit=True)

    async def remove_stream(self, principal: Principal, subscription_id: str, path: str) -> None:
        self._require(principal, Action.WRITE)
        async with self._requests.acquire() as conn, conn.transaction():
            row = await self._load(conn, principal.environment.id, subscription_id, lock=True)
            await repository.unlink_explicit(conn, row["pk"], path)

    def _require(self, principal: Principal, action: Action) -> None:
        if not principal.may_on_subscriptions(action):
            raise Forbidden(f"this credential lacks the {action.value}:subscriptions scope")

    async def _readable(self, principal: Principal, paths: Sequence[str]) -> list[str]:
        """The canonical names of ``paths``, each of which the caller must be able to read. A
        stream that does not exist yet may be linked only by an environment-wide reader."""
        found: list[str] = []
        for path in paths:
            try:
                found.append((await stream_access(self._requests, principal, Action.READ, path)).name)
            except StreamNotFound:
                if not principal.may_on_all_sessions(Action.READ):
                    raise
                found.append(path)
        return sorted(set(found))

    async def _writable_wake_stream(self, principal: Principal, name: str) -> None:
        access = await stream_access(self._requests, principal, Action.WRITE, name)
        try:
            await self._streams.head(principal.environment.id, access.name)
        except StreamNotFound:
            raise ValidationFailed(f"wake_stream {name!r} does not exist; create it first") from None

    async def _load(
        self, conn: Any, environment_id: str, subscription_id: str, *, lock: bool = False
    ) -> asyncpg.Record:
        row = await repository.load(conn, environment_id, subscription_id, lock=lock)
        if row is None:
            raise SubscriptionNotFound(f"subscription {subscription_id!r} not found")
        return row

    async def _view(self, conn: Any, row: asyncpg.Record) -> SubscriptionView:
        return SubscriptionView(
            id=row["id"],
            kind=row["kind"],
            pattern=row["pattern"],
            session_type=row["session_type"],
            webhook_url=row["webhook_url"],
            wake_stream=row["wake_stream"],
            lease_ttl_ms=row["lease_ttl_ms"],
            description=row["description"],
            created_at=row["created_at"],
            failed=row["next_attempt_at"] is not None and row["phase"] == "idle",
            base_url=row["base_url"],
            streams=await repository.cursors(conn, row["pk"], row["environment_id"]),
        )

    # --- pull-wake: claim, ack, release --------------------------------------------------------

    async def claim(self, principal: Principal, subscription_id: str, worker: str) -> Wake:
        """Take the lease (200) unless another worker holds a live one (409 ALREADY_CLAIMED). A
        claim takes over an unclaimed wake, or starts a new generation."""
        self._require(principal, Action.WRITE)
        async with self._requests.acquire() as conn, conn.transaction():
            row = await self._load(conn, principal.environment.id, subscription_id, lock=True)
            if row["kind"] != "pull-wake":
                raise ValidationFailed("only pull-wake subscriptions are claimed; webhooks are pushed")
            if row["phase"] == "leased" and row["lease_live"]:
                raise AlreadyClaimed(
                    f"subscription {subscription_id!r} is claimed by {row['holder']}",
                    current_holder=row["holder"],
                    generation=row["generation"],
                )
            take_over = row["phase"] == "woken" and row["lease_live"] and row["wake_id"] is not None
            generation = row["generation"] if take_over else row["generation"] + 1
            wake_id = row["wake_id"] if take_over else "w_" + secrets.token_hex(8)
            token = _new_token(row["pk"])
            await repository.lease(conn, row["pk"], generation, wake_id, _hash(token), worker)
            cursors = await repository.cursors(conn, row["pk"], row["environment_id"])
        return Wake(subscription_id, wake_id, generation, token, cursors, row["lease_ttl_ms"])

    async def ack(self, subscription_id: str, token: str, body: AckBody) -> bool:
        """Apply acks for the current wake (heartbeat without ``done``; release with it). Returns
        ``next_wake``: work is left after a ``done``, and another wake is on its way. The token is
        the credential (§7.2): it was handed to the claimer or the webhook, for this wake only."""
        pk, next_wake = await self._settle(subscription_id, token, body, release=False)
        if next_wake:
            self._schedule_wake(pk)
        return next_wake

    async def release(self, subscription_id: str, token: str, body: AckBody) -> None:
        pk, next_wake = await self._settle(subscription_id, token, body, release=True)
        if next_wake:
            self._schedule_wake(pk)

    async def _settle(
        self,
        subscription_id: str,
        token: str,
        body: AckBody,
        *,
        release: bool,
        source: ConnectionSource | None = None,
    ) -> tuple[int, bool]:
        pk = _token_pk(token)
        if pk is None:
            raise Fenced("not a token for this subscription's current wake")
        async with (source or self._requests).acquire() as conn, conn.transaction():
            row = await repository.load_pk(conn, pk)
            if row is None or row["id"] != subscription_id:
                raise Fenced("not a token for this subscription's current wake")
            environment_id = row["environment_id"]
            # Fencing (§7.3): the token, the generation and the wake must all be the current ones.
            # A lease that ran out but was not handed on yet still fences nobody else's work, so
            # its holder's ack is accepted; once anyone claims, the generation moves.
            if (
                row["phase"] != "leased"
                or row["token_hash"] is None
                or not secrets.compare_digest(bytes(row["token_hash"]), _hash(token))
                or row["generation"] != body.generation
                or row["wake_id"] != body.wake_id
            ):
                raise Fenced("this wake is no longer current (stale generation, wake or token)")
            cursors = {c.path: c for c in await repository.cursors(conn, row["pk"], environment_id)}
            for item in body.acks:
                cursor = cursors.get(item.stream)
                if cursor is None:
                    raise ValidationFailed(f"stream {item.stream!r} is not linked to this subscription")
                offset = parse_offset(item.offset, name="acks[].offset")
                if not isinstance(offset, int):
                    raise ValidationFailed("acks[].offset must be an offset returned by this server")
                if offset > cursor.tail:
                    raise OffsetOutOfRange(f"ack offset for {item.stream!r} is beyond the stream's tail")
                if offset > cursor.acked:
                    cursors[item.stream] = StreamCursor(cursor.path, cursor.explicit, offset, cursor.tail)
                    await repository.advance(conn, row["pk"], item.stream, offset)
            if body.done or release:
                await repository.to_idle(conn, row["pk"], reset_retries=True)
                return row["pk"], any(c.pending for c in cursors.values())
            await repository.extend_lease(conn, row["pk"])
            return row["pk"], False

    # --- waking ------------------------------------------------------------------------------

    def _on_tail_changes(self, changes: Sequence[TailChange]) -> None:
        for change in changes:
            self._changed.add(change.stream_id)
        if changes:
            self._changed_event.set()

    async def _process_changes(self) -> None:
        while True:
            await self._changed_event.wait()
            # Gather a moment's worth of commits into one pass (one query for all of them).
            await asyncio.sleep(_GATHER_SECONDS)
            self._changed_event.clear()
            batch, self._changed = self._changed, set()
            try:
                await self._wake_for_streams(sorted(batch))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Linking a newly matched stream happens only here (the sweep wakes subscriptions
                # that have links, it does not look for new streams), so the batch is not dropped:
                # it is tried again after a pause, with whatever changed meanwhile.
                logger.warning(
                    "subscription wake pass failed; retrying",
                    extra={"streams": len(batch), "error": repr(exc)[:300]},
                )
                self._changed |= batch
                self._changed_event.set()
                await asyncio.sleep(self._settings.subscription_sweep_seconds)

    async def _wake_for_streams(self, stream_ids: Sequence[int]) -> None:
        async with self._background.acquire() as conn:
            facts = await repository.changed_streams(conn, stream_ids)
            if not facts:
                return
            patterns = await repository.pattern_subscriptions(conn, sorted({f.environment_id for f in facts}))
            discovered = [
                (sub["pk"], fact.name, fact.start)
                for fact in facts
                for sub in patterns
                if sub["environment_id"] == fact.environment_id
                and matches(sub["pattern"], fact.name)
                and fact.name != sub["wake_stream"]  # its own wake events are not its work
                and (sub["session_type"] is None or sub["session_type"] == fact.session_type)
            ]
            if discovered:
                await repository.link_at(conn, discovered)
            pks = await repository.subscriptions_linking(conn, facts)
        for pk in sorted(pks):
            # One subscription's failure must not hold back the others; its links exist now,
            # so the sweep wakes it later.
            await self._wake_logged(pk)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._settings.subscription_sweep_seconds)
            try:
                async with self._background.acquire() as conn:
                    due = await repository.due_subscriptions(conn, _SWEEP_BATCH)
                for pk in due:
                    await self._wake(pk)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("subscription sweep failed", extra={"error": repr(exc)[:300]})

    def _schedule_wake(self, pk: int) -> None:
        self._track(asyncio.create_task(self._wake_logged(pk), name=f"threadline-subscription-wake-{pk}"))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _wake_logged(self, pk: int) -> None:
        try:
            await self._wake(pk)
        except Exception as exc:
            logger.warning("subscription wake failed", extra={"subscription": pk, "error": repr(exc)[:300]})

    async def _wake(self, pk: int) -> None:
        """Issue a wake if the subscription is free and has pending work, then deliver it."""
        issued = await self._issue(pk)
        if issued is None:
            return
        if issued.kind == "webhook":
            self._track(asyncio.create_task(self._deliver(issued), name=f"threadline-webhook-{pk}"))
        else:
            await self._write_wake_event(issued)

    async def _issue(self, pk: int) -> _Issued | None:
        async with self._background.acquire() as conn, conn.transaction():
            row = await repository.load_pk(conn, pk)
            if row is None:
                return None
            if row["phase"] != "idle" and row["lease_live"]:
                return None  # a wake in flight or a live lease: its holder gets the new work
            if row["phase"] == "idle" and row["backing_off"]:
                return None  # a webhook retry is scheduled later
            if row["kind"] == "webhook" and not self._may_call(row["webhook_url"], row["id"]):
                return None  # an instance whose allow-list has the host delivers it
            cursors = await repository.cursors(conn, pk, row["environment_id"])
            if not any(c.pending for c in cursors):
                if row["phase"] != "idle":
                    await repository.to_idle(conn, pk, reset_retries=False)
                return None
            generation = row["generation"] + 1
            wake_id = "w_" + secrets.token_hex(8)
            token = _new_token(row["pk"])
            ttl = row["lease_ttl_ms"] / 1000
            if row["kind"] == "webhook":
                snapshot = orjson.dumps([c.wake_entry() for c in cursors]).decode()
                await repository.wake_webhook(conn, pk, generation, wake_id, _hash(token), ttl, snapshot)
            else:
                # An unclaimed wake is re-issued with backoff, so an abandoned subscription does
                # not fill its wake stream at the lease rate.
                unclaimed = row["attempts"] + 1 if row["phase"] == "woken" else 0
                wait = ttl + (retry_delay_seconds(unclaimed) if unclaimed else 0.0)
                await repository.wake_pull(conn, pk, generation, wake_id, wait, unclaimed)
        return _Issued(
            pk=pk,
            environment_id=row["environment_id"],
            subscription_id=row["id"],
            kind=row["kind"],
            webhook_url=row["webhook_url"],
            wake_stream=row["wake_stream"],
            base_url=row["base_url"],
            wake=Wake(row["id"], wake_id, generation, token, cursors, row["lease_ttl_ms"]),
        )

    async def _write_wake_event(self, issued: _Issued) -> None:
        assert issued.wake_stream is not None
        pending = [c for c in issued.wake.streams if c.pending]
        event = {
            "type": "wake",
            "subscription_id": issued.subscription_id,
            "stream": pending[0].path if pending else None,
            "generation": issued.wake.generation,
            "ts": int(time.time() * 1000),
        }
        try:
            head = await self._streams.head(issued.environment_id, issued.wake_stream)
            await self._streams.append(
                issued.environment_id,
                issued.wake_stream,
                Append(body=orjson.dumps(event), content_type=head.content_type),
            )
        except Exception as exc:
            # The wake stays unclaimed until it expires; then the sweep issues another.
            logger.warning(
                "could not write a wake event",
                extra={"subscription": issued.subscription_id, "error": repr(exc)[:300]},
            )

    # --- webhooks ----------------------------------------------------------------------------

    def _may_call(self, url: str, subscription_id: str) -> bool:
        """Whether this instance's allow-list admits ``url``'s host (no DNS: that is checked at
        delivery). Instances are meant to share one allow-list, but during a rolling change of
        ``THREADLINE_WEBHOOK_ALLOWED_HOSTS`` they do not: an instance that may not call a host
        leaves the wake to one that may, instead of taking the lease and recording a failure
        (which would hold the delivery back by the retry backoff)."""
        try:
            self.policy.check_url(url)
        except WebhookUrlRejected as exc:
            if url not in self._refused_urls:
                self._refused_urls.add(url)
                logger.warning(
                    "webhook host not allowed on this instance; leaving its wakes to instances that allow it",
                    extra={"subscription": subscription_id, "error": str(exc)[:300]},
                )
            return False
        return True

    def _subscription_url(self, issued: _Issued, tail: str) -> str:
        return f"{issued.base_url}/v1/stream/__ds/subscriptions/{issued.subscription_id}{tail}"

    async def _deliver(self, issued: _Issued) -> None:
        assert issued.webhook_url is not None
        assert self._sender is not None
        wake = issued.wake
        payload = {
            "subscription_id": issued.subscription_id,
            "wake_id": wake.wake_id,
            "generation": wake.generation,
            "streams": [c.wake_entry() for c in wake.streams],
            "callback_url": self._subscription_url(issued, "/callback"),
            "callback_token": wake.token,
        }
        try:
            key = (await self.signing_keys())[-1]
            done = await self._sender.send(issued.webhook_url, payload, key)
        except DeliveryFailed as exc:
            await self._delivery_failed(issued, str(exc))
            return
        if done:
            # §7.1: a synchronous done acks the snapshot's tails and releases the lease.
            acks = [AckItem(stream=c.path, offset=format_offset(c.tail)) for c in wake.streams if c.pending]
            body = AckBody(wake_id=wake.wake_id, generation=wake.generation, acks=acks, done=True)
            with contextlib.suppress(Fenced):  # a callback or a new wake got there first
                pk, next_wake = await self._settle(
                    issued.subscription_id, wake.token, body, release=False, source=self._background
                )
                if next_wake:
                    await self._wake(pk)
            return
        async with self._background.acquire() as conn:
            await repository.delivered(conn, issued.pk, wake.generation)

    async def _delivery_failed(self, issued: _Issued, error: str) -> None:
        """Persist the retry schedule (§7.1): the lease is dropped and the next wake waits."""
        logger.info(
            "webhook delivery failed; retry scheduled",
            extra={"subscription": issued.subscription_id, "error": error[:300]},
        )
        async with self._background.acquire() as conn, conn.transaction():
            row = await repository.load_pk(conn, issued.pk)
            if row is None or row["generation"] != issued.wake.generation or row["phase"] != "leased":
                return
            attempts = row["attempts"] + 1
            await repository.schedule_retry(
                conn, issued.pk, attempts, retry_delay_seconds(attempts), error[:500]
            )
