-- sessions_v1: the ClickHouse copy of Postgres `sessions` that serves session lists and counts
-- (SPEC §3 list filters and sorts, §5 replication). The replication consumer writes one row per
-- change: `_version` is the commit LSN, so ReplacingMergeTree keeps the newest row per sort key,
-- and a delete is a row with `_is_deleted = 1`. Lists read with FINAL, which dedups and hides
-- deleted rows. Status is not stored: it is derived at query time from closed_at / expires_at.
-- The sort key columns (environment_id, created_at, session_id) never change for a session.
-- Optional strings (external_id, task_identifier, closed_reason) are '' when unset: none of them
-- can be empty when set.
--
-- Applied idempotently (IF NOT EXISTS) on every start and by `threadline migrate`. Never edit a
-- released file: add a new numbered one.
CREATE TABLE IF NOT EXISTS sessions_v1
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
    INDEX idx_tags tags TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_external_id external_id TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_task_identifier task_identifier TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = ReplacingMergeTree(_version, _is_deleted)
PARTITION BY toYYYYMM(created_at)
ORDER BY (environment_id, created_at, session_id);
