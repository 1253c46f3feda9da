-- Threadline's ClickHouse tables on a replicated cluster (docs/production.md#clickhouse).
-- Run once, before the first Threadline start, with your cluster's name in place of
-- `threadline_cluster`; the `{shard}` / `{replica}` macros come from each server's config.
-- Threadline's own schema files (clickhouse_schema/) then find the tables and leave them alone
-- (CREATE ... IF NOT EXISTS; their ALTER ... IF NOT EXISTS replicate through Keeper).
-- Same columns, partitioning and order key as clickhouse_schema/ (tests/test_deploy.py compares
-- them with the tables those files create); only the engines differ.

CREATE TABLE IF NOT EXISTS sessions_v1 ON CLUSTER threadline_cluster
(
    environment_id   String,
    organization_id  String,
    project_id       String,
    session_id       String,
    external_id      String DEFAULT '',
    type             LowCardinality(String),
    task_identifier  String DEFAULT '',
    tags             Array(String),
    metadata         String DEFAULT '{}' COMMENT 'JSON object as text',
    closed_at        Nullable(DateTime64(6, 'UTC')),
    closed_reason    String DEFAULT '',
    expires_at       Nullable(DateTime64(6, 'UTC')),
    created_at       DateTime64(6, 'UTC'),
    updated_at       DateTime64(6, 'UTC'),
    last_active_at   DateTime64(6, 'UTC'),
    _version         UInt64,
    _is_deleted      UInt8 DEFAULT 0,
    forked_from      String DEFAULT '',
    fork_out_offset  Nullable(Int64),
    fork_in_offset   Nullable(Int64),
    root_id          String DEFAULT '',
    INDEX idx_tags tags TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_external_id external_id TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_task_identifier task_identifier TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_forked_from forked_from TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_root_id root_id TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/threadline/sessions_v1', '{replica}', _version, _is_deleted)
PARTITION BY toYYYYMM(created_at)
ORDER BY (environment_id, created_at, session_id);

CREATE TABLE IF NOT EXISTS replication_state ON CLUSTER threadline_cluster
(
    slot           String,
    backfill_lsn   UInt64,
    backfilled_at  DateTime64(6, 'UTC')
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/threadline/replication_state', '{replica}', backfilled_at)
ORDER BY slot;
