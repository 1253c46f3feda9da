-- Which replication slot's backfill this ClickHouse holds. A ClickHouse without a row here
-- (a new, empty one) gets every existing session copied before replication resumes.
-- Applied idempotently (IF NOT EXISTS) on every start and by `threadline migrate`.
CREATE TABLE IF NOT EXISTS replication_state
(
    slot           String,
    backfill_lsn   UInt64,
    backfilled_at  DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree(backfilled_at)
ORDER BY slot;
