-- One-round-trip group commits (issue 14, item 2).
--
-- threadline_flush_write applies a flush the committer has already decided: the batch object's
-- row, its chunk index rows, the moved heads, the producer states and the NOTIFY. The
-- lock-and-decide transaction calls it after locking and deciding; threadline_guarded_flush calls
-- it in the steady state, where the committer decided against heads it remembers from its own
-- last commit of those streams.
--
-- threadline_guarded_flush is one statement, so one round trip and its own transaction: it locks
-- the flush's stream rows in id order (the order the lock-and-decide transaction uses, so the two
-- never deadlock), and writes only if every head still holds exactly what the committer expected
-- (next offset, Stream-Seq, open, not deleted, not expired, its session not expired) and every
-- producer's state is the expected one (absent when expected absent). Anything else — another
-- worker or instance appended, closed, deleted; a producer the committer did not know — returns
-- false having written nothing, and the committer falls back to lock-and-decide. Row locks make
-- the check exact: a row another transaction changed is re-read after it commits (READ COMMITTED
-- re-checks a locked row's condition on its newest version), and producer states only change
-- under their stream's row lock, which this function holds when it reads them.

CREATE FUNCTION threadline_flush_write(
    object_key text,
    object_size bigint,
    chunk_streams bigint[], chunk_starts bigint[], chunk_ends bigint[], chunk_byte_starts bigint[],
    chunk_byte_lengths int[],
    head_ids bigint[], head_next_offsets bigint[], head_records bigint[], head_bytes bigint[],
    head_close_now bool[], head_stream_seqs text[],
    producer_streams bigint[], producer_ids text[], producer_epochs bigint[], producer_seqs bigint[],
    producer_next_offsets bigint[],
    notifications text[],
    channel text
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    new_object_id bigint;
BEGIN
    IF object_key IS NOT NULL AND cardinality(chunk_streams) > 0 THEN
        INSERT INTO stream_objects (key, size, kind) VALUES (object_key, object_size, 'batch')
        RETURNING id INTO new_object_id;
        INSERT INTO stream_chunks (stream_id, start_offset, end_offset, object_id, byte_start, byte_length)
        SELECT c.stream_id, c.start_offset, c.end_offset, new_object_id, c.byte_start, c.byte_length
        FROM unnest(chunk_streams, chunk_starts, chunk_ends, chunk_byte_starts, chunk_byte_lengths)
             AS c (stream_id, start_offset, end_offset, byte_start, byte_length);
    END IF;
    UPDATE streams s SET
        next_offset = u.next_offset,
        records = s.records + u.records,
        bytes = s.bytes + u.bytes,
        first_record_at = CASE WHEN u.records > 0 THEN coalesce(s.first_record_at, now())
                               ELSE s.first_record_at END,
        last_record_at = CASE WHEN u.records > 0 THEN now() ELSE s.last_record_at END,
        closed_at = CASE WHEN u.close_now THEN coalesce(s.closed_at, now()) ELSE s.closed_at END,
        last_stream_seq = coalesce(u.stream_seq, s.last_stream_seq),
        expires_at = CASE WHEN s.ttl_seconds IS NOT NULL
                          THEN now() + s.ttl_seconds * interval '1 second'
                          ELSE s.expires_at END
    FROM unnest(head_ids, head_next_offsets, head_records, head_bytes, head_close_now, head_stream_seqs)
         AS u (id, next_offset, records, bytes, close_now, stream_seq)
    WHERE s.id = u.id;
    INSERT INTO stream_producers (stream_id, producer_id, epoch, last_seq, last_next_offset)
    SELECT * FROM unnest(producer_streams, producer_ids, producer_epochs, producer_seqs, producer_next_offsets)
    ON CONFLICT (stream_id, producer_id) DO UPDATE
    SET epoch = excluded.epoch, last_seq = excluded.last_seq,
        last_next_offset = excluded.last_next_offset, updated_at = now();
    PERFORM pg_notify(channel, n) FROM unnest(notifications) AS n;
END
$$;

CREATE FUNCTION threadline_guarded_flush(
    -- the expected heads: every stream of the flush
    expected_ids bigint[], expected_next_offsets bigint[], expected_stream_seqs text[],
    -- the expected producer states: every producer of the flush (NULL epoch: expected absent)
    expected_producer_streams bigint[], expected_producer_ids text[], expected_producer_epochs bigint[],
    expected_producer_seqs bigint[], expected_producer_next_offsets bigint[],
    -- what to write, as threadline_flush_write takes it
    object_key text,
    object_size bigint,
    chunk_streams bigint[], chunk_starts bigint[], chunk_ends bigint[], chunk_byte_starts bigint[],
    chunk_byte_lengths int[],
    head_ids bigint[], head_next_offsets bigint[], head_records bigint[], head_bytes bigint[],
    head_close_now bool[], head_stream_seqs text[],
    producer_streams bigint[], producer_ids text[], producer_epochs bigint[], producer_seqs bigint[],
    producer_next_offsets bigint[],
    notifications text[],
    channel text
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    matched integer;
BEGIN
    -- Lock first (the lock-and-decide transaction's plan: by id, in id order), then compare
    -- the locked rows' newest versions with what was expected.
    SELECT count(*) INTO matched
    FROM (SELECT s.id, s.next_offset, s.last_stream_seq, s.closed_at, s.deleted_at, s.expires_at, s.session_id
          FROM streams s WHERE s.id = ANY(expected_ids) ORDER BY s.id FOR UPDATE) s
    JOIN unnest(expected_ids, expected_next_offsets, expected_stream_seqs)
         AS e (id, next_offset, stream_seq) ON s.id = e.id
    WHERE s.next_offset = e.next_offset
      AND s.last_stream_seq IS NOT DISTINCT FROM e.stream_seq
      AND s.closed_at IS NULL
      AND s.deleted_at IS NULL
      AND (s.expires_at IS NULL OR s.expires_at > now())
      AND NOT EXISTS (SELECT 1 FROM sessions ss WHERE ss.id = s.session_id AND ss.expires_at <= now());
    IF matched <> cardinality(expected_ids) THEN
        RETURN false;
    END IF;
    -- A new statement, so a new snapshot: it sees every producer state committed before the row
    -- locks above were granted, and none can change while they are held.
    IF EXISTS (
        SELECT 1
        FROM unnest(expected_producer_streams, expected_producer_ids, expected_producer_epochs,
                    expected_producer_seqs, expected_producer_next_offsets)
             AS e (stream_id, producer_id, epoch, last_seq, last_next_offset)
        LEFT JOIN stream_producers p ON p.stream_id = e.stream_id AND p.producer_id = e.producer_id
        WHERE (p.epoch, p.last_seq, p.last_next_offset) IS DISTINCT FROM (e.epoch, e.last_seq, e.last_next_offset)
    ) THEN
        RETURN false;
    END IF;
    PERFORM threadline_flush_write(
        object_key, object_size,
        chunk_streams, chunk_starts, chunk_ends, chunk_byte_starts, chunk_byte_lengths,
        head_ids, head_next_offsets, head_records, head_bytes, head_close_now, head_stream_seqs,
        producer_streams, producer_ids, producer_epochs, producer_seqs, producer_next_offsets,
        notifications, channel
    );
    RETURN true;
END
$$;
