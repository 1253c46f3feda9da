"""Durable Streams subscriptions (protocol §6-7): durable cursors over a set or glob pattern of
streams that wake workers, by webhook or by pull-wake, with leases fenced by generation.

State lives in Postgres (``pg_migrations/0006_subscriptions.sql``), so any instance serves any
subscription and every decision that hands out work (a wake, a claim, an ack) is taken under the
subscription's row lock: several server processes can share the work safely.
"""
