-- Progress of the sessions -> ClickHouse mirror that must survive restarts and leader changes.
-- `backfilled_at` is cleared before the replication slot is (re)created and set once every
-- existing session has been copied, so a consumer that dies mid-backfill is followed by one
-- that copies again instead of trusting a half-filled ClickHouse.
CREATE TABLE replication_state (
    slot_name      text PRIMARY KEY,
    backfill_lsn   pg_lsn,
    backfilled_at  timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
