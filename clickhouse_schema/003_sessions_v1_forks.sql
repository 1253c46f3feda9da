-- Session fork lineage (issue 18), appended to sessions_v1 in the order of
-- sessions.fields.SESSIONS_V1_COLUMNS. Every column is '' / NULL for a root session. A mirror
-- created before these columns existed needs no re-backfill: every session it holds predates
-- forks, so it is a root, and the defaults ClickHouse gives its old rows are exactly right; rows
-- written from now on carry the values.
--
-- Applied idempotently on every start and by `threadline migrate`. Never edit a released file.
ALTER TABLE sessions_v1 ADD COLUMN IF NOT EXISTS forked_from String DEFAULT '';
ALTER TABLE sessions_v1 ADD COLUMN IF NOT EXISTS fork_out_offset Nullable(Int64);
ALTER TABLE sessions_v1 ADD COLUMN IF NOT EXISTS fork_in_offset Nullable(Int64);
ALTER TABLE sessions_v1 ADD COLUMN IF NOT EXISTS root_id String DEFAULT '';
ALTER TABLE sessions_v1 ADD INDEX IF NOT EXISTS idx_forked_from forked_from TYPE bloom_filter(0.01) GRANULARITY 1;
ALTER TABLE sessions_v1 ADD INDEX IF NOT EXISTS idx_root_id root_id TYPE bloom_filter(0.01) GRANULARITY 1;
