-- Background maintenance of stored records: compaction, garbage collection, trim, expiry.

-- An object is garbage once no chunk points at it. Chunks go away through stream deletion
-- (cascade), trim and compaction; this trigger marks their objects on every one of those paths,
-- and the collector deletes marked objects from the bucket after a grace period.
CREATE FUNCTION threadline_mark_unreferenced_objects() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE stream_objects o SET unreferenced_at = now()
    FROM (SELECT DISTINCT object_id FROM gone) g
    WHERE o.id = g.object_id
      AND o.unreferenced_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM stream_chunks c WHERE c.object_id = o.id);
    RETURN NULL;
END
$$;

CREATE TRIGGER stream_chunks_unreference
AFTER DELETE ON stream_chunks
REFERENCING OLD TABLE AS gone
FOR EACH STATEMENT EXECUTE FUNCTION threadline_mark_unreferenced_objects();

CREATE INDEX stream_objects_unreferenced ON stream_objects (unreferenced_at)
    WHERE unreferenced_at IS NOT NULL;

-- Stand-alone streams past their expiry, for the janitor. Session channels have no TTL, so the
-- hot path's head updates stay HOT.
CREATE INDEX streams_expiry ON streams (expires_at)
    WHERE expires_at IS NOT NULL AND deleted_at IS NULL AND session_id IS NULL;

-- The compactor's own bookkeeping, off the append path: how many chunks each stream has in
-- shared batch objects, counted from batch objects the compactor has not looked at yet.
CREATE TABLE stream_compaction (
    stream_id     bigint PRIMARY KEY REFERENCES streams (id) ON DELETE CASCADE,
    batch_chunks  integer NOT NULL
);

CREATE TABLE compactor_progress (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_object_id  bigint NOT NULL
);
INSERT INTO compactor_progress (last_object_id) VALUES (0);
