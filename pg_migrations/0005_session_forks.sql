-- Session forks (issue 18): a session made by POST /api/v1/sessions/{session}/fork records where
-- it came from. Its `out` and `in` channels are stream forks of the parent's (streams.fork_source_id),
-- so no record bytes are copied; these columns are the session-level lineage.
--
-- All four are NULL for a root session (every session that existed before this migration is one),
-- so adding them rewrites no row and needs no backfill, in Postgres or in the ClickHouse mirror
-- (whose new columns default to '' / NULL, the same "root" values). The API renders a root's
-- `rootId` as its own id. forked_from is not a foreign key: lineage is history, and names the
-- parent even if that row were ever removed.
ALTER TABLE sessions ADD COLUMN forked_from text;
ALTER TABLE sessions ADD COLUMN fork_out_offset bigint;
ALTER TABLE sessions ADD COLUMN fork_in_offset bigint;
ALTER TABLE sessions ADD COLUMN root_id text;

ALTER TABLE sessions ADD CONSTRAINT sessions_fork_lineage CHECK (
    (forked_from IS NULL) = (root_id IS NULL)
    AND (forked_from IS NULL) = (fork_out_offset IS NULL)
    AND (forked_from IS NULL) = (fork_in_offset IS NULL)
);

-- filter[forkedFrom] and filter[rootId] on the Postgres list path (roots match filter[rootId]
-- through the primary key: see sessions.fields).
CREATE INDEX sessions_env_forked_from ON sessions (environment_id, forked_from) WHERE forked_from IS NOT NULL;
CREATE INDEX sessions_env_root ON sessions (environment_id, root_id) WHERE root_id IS NOT NULL;
