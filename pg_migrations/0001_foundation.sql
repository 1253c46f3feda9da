-- Threadline foundation: tenancy, API keys, sessions and their channel heads.
-- Forward-only: never edit an applied migration; add a new numbered file instead.

CREATE TABLE organizations (
    id          text PRIMARY KEY,
    slug        text NOT NULL UNIQUE,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projects (
    id               text PRIMARY KEY,
    organization_id  text NOT NULL REFERENCES organizations (id),
    slug             text NOT NULL,
    name             text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (organization_id, slug)
);

CREATE TABLE environments (
    id               text PRIMARY KEY,
    organization_id  text NOT NULL REFERENCES organizations (id),
    project_id       text NOT NULL REFERENCES projects (id),
    slug             text NOT NULL,
    -- HS256 secret for this environment's JWTs. It must be readable to verify tokens,
    -- so it is stored as is; API keys below are stored hashed.
    signing_secret   text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, slug)
);

CREATE TABLE api_keys (
    id              text PRIMARY KEY,
    environment_id  text NOT NULL REFERENCES environments (id),
    name            text NOT NULL,
    key_prefix      text NOT NULL,          -- shown in listings so a key can be recognised
    key_hash        bytea NOT NULL UNIQUE,  -- sha256 of the whole key; keys are 256-bit random
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,
    revoked_at      timestamptz
);
CREATE INDEX api_keys_environment ON api_keys (environment_id);

CREATE TABLE sessions (
    id               text PRIMARY KEY,      -- session_<sortable random id>, immutable
    environment_id   text NOT NULL REFERENCES environments (id),
    project_id       text NOT NULL,
    organization_id  text NOT NULL,
    external_id      text,
    type             text NOT NULL,
    task_identifier  text,
    tags             text[] NOT NULL DEFAULT '{}',
    metadata         jsonb NOT NULL DEFAULT '{}',
    closed_at        timestamptz,
    closed_reason    text,
    expires_at       timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- Set to created_at on insert so that "sort by lastActiveAt" needs no NULL rules.
    last_active_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sessions_external_id_unique UNIQUE (environment_id, external_id),
    CONSTRAINT sessions_external_id_not_friendly CHECK (external_id NOT LIKE 'session\_%')
);
-- Logical replication to ClickHouse needs the old row on UPDATE/DELETE.
ALTER TABLE sessions REPLICA IDENTITY FULL;
-- Keyset pagination for the Postgres list path (fallback when ClickHouse is down).
CREATE INDEX sessions_env_created ON sessions (environment_id, created_at, id);
CREATE INDEX sessions_env_last_active ON sessions (environment_id, last_active_at, id);

CREATE TABLE channels (
    session_id       text NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    io               text NOT NULL CHECK (io IN ('out', 'in')),
    next_offset      bigint NOT NULL DEFAULT 0,   -- offset the next record will get
    trim_offset      bigint NOT NULL DEFAULT 0,   -- records before this are gone
    records          bigint NOT NULL DEFAULT 0,
    bytes            bigint NOT NULL DEFAULT 0,
    first_record_at  timestamptz,
    last_record_at   timestamptz,
    closed_at        timestamptz,
    PRIMARY KEY (session_id, io)
);
