-- Durable Streams subscriptions (protocol §6-7): durable cursors over streams that wake workers
-- by webhook or pull-wake. Every hand-out of work (a wake, a claim, an ack) happens under the
-- subscription row's lock, and a holder is fenced by `generation` + `wake_id` + its token's hash,
-- so any number of server processes share subscriptions safely and restarts lose nothing.

CREATE TABLE subscriptions (
    pk                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    environment_id    text NOT NULL REFERENCES environments (id),
    id                text NOT NULL,                 -- client-provided
    kind              text NOT NULL CHECK (kind IN ('webhook', 'pull-wake')),
    pattern           text,                          -- glob over stream names
    session_type      text,                          -- Threadline extension: only channels of sessions of this type
    webhook_url       text,
    wake_stream       text,
    lease_ttl_ms      integer NOT NULL,
    description       text,
    config_hash       text NOT NULL,                 -- idempotent re-confirmation (§6.2)
    base_url          text NOT NULL,                 -- where callback_url / jwks_url point
    created_at        timestamptz NOT NULL DEFAULT now(),
    deleted_at        timestamptz,                   -- tombstone (§6.3)
    -- Delivery state.
    phase             text NOT NULL DEFAULT 'idle' CHECK (phase IN ('idle', 'woken', 'leased')),
    generation        bigint NOT NULL DEFAULT 0,     -- +1 per wake: the fencing counter
    wake_id           text,
    token_hash        bytea,                         -- sha256 of the current claim/callback token
    holder            text,
    lease_expires_at  timestamptz,                   -- 'woken': when an unclaimed wake is re-issued
    snapshot          jsonb,                         -- webhook: the wake's stream tails ({"done": true} acks them)
    -- Webhook retry schedule, persisted so a restarted server keeps it (§7.1).
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz,
    last_error        text
);
CREATE UNIQUE INDEX subscriptions_id ON subscriptions (environment_id, id) WHERE deleted_at IS NULL;
CREATE INDEX subscriptions_patterns ON subscriptions (environment_id) WHERE deleted_at IS NULL AND pattern IS NOT NULL;

-- One cursor per linked stream. A link is explicit, glob (matched by the pattern) or both;
-- `acked_offset` is the position the next read starts at (acks are last-processed inclusive).
CREATE TABLE subscription_streams (
    subscription_pk  bigint NOT NULL REFERENCES subscriptions (pk) ON DELETE CASCADE,
    path             text NOT NULL,
    explicit         boolean NOT NULL DEFAULT false,
    glob             boolean NOT NULL DEFAULT false,
    acked_offset     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (subscription_pk, path)
);

-- The Ed25519 keys webhooks are signed with; every instance signs with the same key and the
-- JWKS endpoint publishes every key kept here.
CREATE TABLE webhook_signing_keys (
    kid          text PRIMARY KEY,
    private_key  bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
