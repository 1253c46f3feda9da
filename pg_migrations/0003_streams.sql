-- Channels become Durable Streams: one table for every stream (a session's `out` and `in`, and
-- stand-alone streams), the index of where each stream's records are stored in object storage,
-- and idempotent producers' state. Record bytes never live in Postgres.

CREATE TABLE streams (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    environment_id   text NOT NULL REFERENCES environments (id),
    name             text NOT NULL,              -- path below /v1/stream/
    session_id       text REFERENCES sessions (id) ON DELETE CASCADE,
    io               text CHECK (io IN ('out', 'in')),
    content_type     text NOT NULL,
    next_offset      bigint NOT NULL DEFAULT 0,  -- offset the next record will get
    trim_offset      bigint NOT NULL DEFAULT 0,  -- records before this are gone (retention)
    records          bigint NOT NULL DEFAULT 0,  -- appended to this stream (not inherited by a fork)
    bytes            bigint NOT NULL DEFAULT 0,
    first_record_at  timestamptz,
    last_record_at   timestamptz,
    closed_at        timestamptz,
    last_stream_seq  text,                       -- Stream-Seq writer coordination
    ttl_seconds      bigint,                     -- sliding TTL: expires_at moves on reads and writes
    expires_at       timestamptz,
    fork_source_id   bigint REFERENCES streams (id),
    fork_offset      bigint NOT NULL DEFAULT 0,  -- offsets below this are read from the source
    fork_sub_offset  bigint NOT NULL DEFAULT 0,  -- as requested at creation (idempotent re-create)
    deleted_at       timestamptz,                -- soft delete: a deleted source of live forks
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT streams_session_io CHECK ((session_id IS NULL) = (io IS NULL))
);
-- A name belongs to at most one stream that is not deleted; an expired one is deleted on re-create.
CREATE UNIQUE INDEX streams_name ON streams (environment_id, name) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX streams_session_channel ON streams (session_id, io) WHERE session_id IS NOT NULL;
CREATE INDEX streams_fork_source ON streams (fork_source_id) WHERE fork_source_id IS NOT NULL;

-- Objects in the bucket that hold record bytes. A `batch` object is one group commit (records of
-- many streams); a `segment` is written by the compactor for one stream. An object no chunk points
-- at is deleted from the bucket after a grace period (readers may still be fetching it).
CREATE TABLE stream_objects (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key              text NOT NULL UNIQUE,
    size             bigint NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('batch', 'segment')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    unreferenced_at  timestamptz
);

-- Where records [start_offset, end_offset) of a stream are: a byte range of one object.
CREATE TABLE stream_chunks (
    stream_id     bigint NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    start_offset  bigint NOT NULL,
    end_offset    bigint NOT NULL,
    object_id     bigint NOT NULL REFERENCES stream_objects (id),
    byte_start    bigint NOT NULL,
    byte_length   integer NOT NULL,
    PRIMARY KEY (stream_id, start_offset),
    CONSTRAINT stream_chunks_nonempty CHECK (end_offset > start_offset)
);
CREATE INDEX stream_chunks_object ON stream_chunks (object_id);

-- Idempotent producers (Producer-Id / Producer-Epoch / Producer-Seq).
CREATE TABLE stream_producers (
    stream_id         bigint NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    producer_id       text NOT NULL,
    epoch             bigint NOT NULL,
    last_seq          bigint NOT NULL,
    last_next_offset  bigint NOT NULL,  -- Stream-Next-Offset acknowledged for last_seq
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, producer_id)
);

-- Existing sessions keep their two channels, now as JSON streams.
INSERT INTO streams (environment_id, name, session_id, io, content_type, closed_at, created_at)
SELECT s.environment_id, 'sessions/' || s.id || '/' || c.io, s.id, c.io, 'application/json',
       c.closed_at, s.created_at
FROM channels c JOIN sessions s ON s.id = c.session_id;

DROP TABLE channels;
