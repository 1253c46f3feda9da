-- Pattern subscriptions link a stream in the transaction that creates it (issue 18).
--
-- Until now a stream a pattern matched was linked by the server when it learned of the stream's
-- first record (its own commit, or another instance's NOTIFY). If the only instance crashed
-- between acknowledging that record and linking the stream, the record waited for the stream's
-- next one before anybody was woken. Linking at creation closes that window for every way a
-- stream is born (PUT, a session's channels, a fork): the link commits with the stream or not
-- at all, at the stream's first own offset (a fork's inherited records are not its work), and
-- the sweep wakes whatever a crash left unwoken from there. The server's link-on-change path
-- stays, for the streams created while a subscription was being created.
--
-- The pattern's glob is matched here as the server compiles it (patterns.py `sql_regex`: an
-- anchored regular expression Postgres and Python read alike), after a cheap test of its
-- literal prefix. The server fills both columns when it creates a subscription and, at start,
-- for subscriptions created before this migration.

ALTER TABLE subscriptions
    ADD COLUMN pattern_prefix text,   -- the glob's text before its first wildcard
    ADD COLUMN pattern_regex  text;   -- the glob as an anchored regular expression

CREATE FUNCTION threadline_link_new_stream() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- DO NOTHING: an existing link (an explicit one, or a re-created name's) keeps its cursor,
    -- and no row lock is taken that an ack could be holding.
    INSERT INTO subscription_streams (subscription_pk, path, glob, acked_offset)
    SELECT sub.pk, NEW.name, true, NEW.fork_offset
    FROM subscriptions sub
    WHERE sub.environment_id = NEW.environment_id
      AND sub.deleted_at IS NULL
      AND sub.pattern IS NOT NULL          -- the subscriptions_patterns index
      AND sub.pattern_regex IS NOT NULL
      AND starts_with(NEW.name, sub.pattern_prefix)
      AND NEW.name ~ sub.pattern_regex
      AND NEW.name IS DISTINCT FROM sub.wake_stream
      AND (sub.session_type IS NULL
           OR sub.session_type = (SELECT se.type FROM sessions se WHERE se.id = NEW.session_id))
    ON CONFLICT (subscription_pk, path) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER streams_link_pattern_subscriptions
    AFTER INSERT ON streams
    FOR EACH ROW EXECUTE FUNCTION threadline_link_new_stream();
