-- 0016: a batch's counts kept beside it, so `status --batch` reads them in one index probe
-- instead of counting its files (issue 22: under 50 ms at 1,000,000 files in one batch).
--
-- Slotted counters: pipeline_batch_counts holds, per batch, up to 64 rows (slots), each with
-- the batch's files by status, the record totals of its completed files and the first start /
-- last end it saw; the batch's figures are the SUM over its slots (pipeline_batch_figures).
-- Triggers on file_checkpoints add each change of a file's status (or batch) to one slot, in
-- the transaction that made the change: every path that moves a file (claim, complete, fail,
-- abandon, a lost claim, the sweep, cancel, requeue, registration, a restart, prune's delete,
-- and any later function) is counted without naming it, and exactly: a rollback takes its
-- delta with it.
--
-- `queued` counts the files pending or processing together: a claim of a pending file (the
-- workers' most frequent move) changes no counter, so a completion costs one counter update,
-- not two. The files processing are read apart, from the (batch_id, status) index: as many as
-- run at that moment (and expired claims not yet swept); pending is queued minus those.
--
-- Which slot: the transaction's own (its id modulo 64), not the file's. Transactions running at
-- the same time have ids close together, so concurrent completions land on different rows; and a
-- transaction changes one row per batch, never several in an order of its rows: two cannot
-- deadlock on the counters, nor one with a claim (a row trigger fires at the end of its
-- statement, after the statement's file locks were all taken). Rows of two batches are changed
-- in name order.
--
-- Two kinds of trigger, for what each costs:
-- * UPDATE, per row, only when a file's batch or its counted status changed (its WHEN: a
--   heartbeat, a chunk or a claim of a pending file runs no trigger function). One file's
--   change is one UPDATE of its slot's row (a statement-level trigger with transition tables
--   would cost every UPDATE statement ~35 us, measured).
-- * INSERT and DELETE, per statement, from the statement's transition table: a registration, a
--   COPY or a prune adds one row per batch, however many files. (Per row, one transaction would
--   update its slot once per file, and each update of a row the same transaction already
--   updated walks all its versions: 10,000 files took 0.7 s, 30,000 took 11 s.)
-- The UPDATEs that move a whole batch at once (cancel, requeue) count their files themselves
-- in one upsert, with the per-row trigger switched off for the statement
-- (pipeline.batch_counts = 'off', local to the transaction, reset after).

CREATE TABLE pipeline_batch_counts (
    batch             text NOT NULL,
    slot              smallint NOT NULL,
    queued            bigint NOT NULL DEFAULT 0,  -- pending or processing
    completed         bigint NOT NULL DEFAULT 0,
    failed            bigint NOT NULL DEFAULT 0,
    dead              bigint NOT NULL DEFAULT 0,
    cancelled         bigint NOT NULL DEFAULT 0,
    -- of the files counted `completed`: what they recorded
    records_total     bigint NOT NULL DEFAULT 0,
    records_filtered  bigint NOT NULL DEFAULT 0,
    records_persisted bigint NOT NULL DEFAULT 0,
    -- the earliest start and the latest end (completed, or dead) of a file this slot counted
    first_started_at  timestamptz,
    last_ended_at     timestamptz,
    PRIMARY KEY (batch, slot)
) WITH (fillfactor = 50);  -- room on the page for the next version (HOT updates)

-- A batch's figures: the sum over its slots, its files processing from the index. Read with
-- `WHERE batch = ...` (pushed into the grouping: one batch's slots).
CREATE VIEW pipeline_batch_figures AS
SELECT t.batch, t.queued - t.processing AS pending, t.processing, t.completed, t.failed,
       t.dead, t.cancelled, t.records_total, t.records_filtered, t.records_persisted,
       t.first_started_at, t.last_ended_at
  FROM (SELECT k.batch, sum(k.queued) AS queued,
               (SELECT count(*) FROM file_checkpoints c
                 WHERE c.batch_id = k.batch AND c.status = 'processing') AS processing,
               sum(k.completed) AS completed, sum(k.failed) AS failed, sum(k.dead) AS dead,
               sum(k.cancelled) AS cancelled, sum(k.records_total) AS records_total,
               sum(k.records_filtered) AS records_filtered,
               sum(k.records_persisted) AS records_persisted,
               min(k.first_started_at) AS first_started_at,
               max(k.last_ended_at) AS last_ended_at
          FROM pipeline_batch_counts k
         GROUP BY k.batch) t;

-- Whether a file's change moves a counter: it is in a batch (or was), and its batch changed or
-- its status changed other than between pending and processing (a claim), and no statement
-- counting for itself is running (pipeline.batch_counts = 'off'). A function call, not the expression: PostgreSQL reads a
-- trigger's WHEN back from its stored text at each statement that may fire it (as it does a
-- CHECK, see 0015), and the expression's text cost a claim + complete pair ~300k
-- instructions (callgrind); the call's is a fraction of it. The trigger names its columns,
-- so an UPDATE that does not set status or batch_id (a heartbeat, a chunk) skips it before.
CREATE FUNCTION pipeline_batch_count_due_v1(
    p_old_status text, p_new_status text, p_old_batch text, p_new_batch text
) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (p_old_batch IS NOT NULL OR p_new_batch IS NOT NULL)
       AND (p_old_batch IS DISTINCT FROM p_new_batch
            OR (p_old_status IS DISTINCT FROM p_new_status
                AND NOT (p_old_status IN ('pending', 'processing')
                         AND p_new_status IN ('pending', 'processing'))))
       AND current_setting('pipeline.batch_counts', true) IS DISTINCT FROM 'off';
END;
$$;

-- UPDATE, per row: the file's old status taken away, its new one added.
CREATE FUNCTION pipeline_batch_count_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_slot smallint := (txid_current() % 64)::smallint;
BEGIN
    -- A file that stays in its batch (every move but a registration into another one): one
    -- UPDATE of its slot's row when the row is there (the workers' path).
    IF OLD.batch_id = NEW.batch_id THEN
        UPDATE pipeline_batch_counts k
           SET queued = k.queued + (NEW.status IN ('pending', 'processing'))::int
                        - (OLD.status IN ('pending', 'processing'))::int,
               completed = k.completed + (NEW.status = 'completed')::int
                           - (OLD.status = 'completed')::int,
               failed = k.failed + (NEW.status = 'failed')::int - (OLD.status = 'failed')::int,
               dead = k.dead + (NEW.status = 'dead')::int - (OLD.status = 'dead')::int,
               cancelled = k.cancelled + (NEW.status = 'cancelled')::int
                           - (OLD.status = 'cancelled')::int,
               records_total = k.records_total
                   + CASE WHEN NEW.status = 'completed' THEN NEW.records_total ELSE 0 END
                   - CASE WHEN OLD.status = 'completed' THEN OLD.records_total ELSE 0 END,
               records_filtered = k.records_filtered
                   + CASE WHEN NEW.status = 'completed' THEN NEW.records_filtered ELSE 0 END
                   - CASE WHEN OLD.status = 'completed' THEN OLD.records_filtered ELSE 0 END,
               records_persisted = k.records_persisted
                   + CASE WHEN NEW.status = 'completed' THEN NEW.records_persisted ELSE 0 END
                   - CASE WHEN OLD.status = 'completed' THEN OLD.records_persisted ELSE 0 END,
               first_started_at = least(k.first_started_at, NEW.started_at),
               last_ended_at = greatest(k.last_ended_at, CASE NEW.status
                   WHEN 'completed' THEN NEW.completed_at WHEN 'dead' THEN NEW.updated_at END)
         WHERE k.batch = NEW.batch_id AND k.slot = v_slot;
        IF FOUND THEN
            RETURN NULL;
        END IF;
    END IF;
    -- Otherwise (the slot's first row for the batch, or a file moved between batches): an
    -- upsert, one row per batch, in name order.
    INSERT INTO pipeline_batch_counts AS k (
        batch, slot, queued, completed, failed, dead, cancelled, records_total,
        records_filtered, records_persisted, first_started_at, last_ended_at)
    SELECT d.batch, v_slot,
           coalesce(sum(d.sign) FILTER (WHERE d.status IN ('pending', 'processing')), 0),
           coalesce(sum(d.sign) FILTER (WHERE d.status = 'completed'), 0),
           coalesce(sum(d.sign) FILTER (WHERE d.status = 'failed'), 0),
           coalesce(sum(d.sign) FILTER (WHERE d.status = 'dead'), 0),
           coalesce(sum(d.sign) FILTER (WHERE d.status = 'cancelled'), 0),
           coalesce(sum(d.sign * d.total) FILTER (WHERE d.status = 'completed'), 0),
           coalesce(sum(d.sign * d.filtered) FILTER (WHERE d.status = 'completed'), 0),
           coalesce(sum(d.sign * d.persisted) FILTER (WHERE d.status = 'completed'), 0),
           min(d.started_at) FILTER (WHERE d.sign > 0),
           max(d.ended_at) FILTER (WHERE d.sign > 0)
      FROM (VALUES (OLD.batch_id, OLD.status, -1, OLD.records_total, OLD.records_filtered,
                    OLD.records_persisted, NULL::timestamptz, NULL::timestamptz),
                   (NEW.batch_id, NEW.status, 1, NEW.records_total, NEW.records_filtered,
                    NEW.records_persisted, NEW.started_at,
                    CASE NEW.status WHEN 'completed' THEN NEW.completed_at
                                    WHEN 'dead' THEN NEW.updated_at END))
           AS d (batch, status, sign, total, filtered, persisted, started_at, ended_at)
     WHERE d.batch IS NOT NULL
     GROUP BY d.batch
     ORDER BY d.batch
    ON CONFLICT (batch, slot) DO UPDATE
       SET queued = k.queued + excluded.queued,
           completed = k.completed + excluded.completed,
           failed = k.failed + excluded.failed,
           dead = k.dead + excluded.dead,
           cancelled = k.cancelled + excluded.cancelled,
           records_total = k.records_total + excluded.records_total,
           records_filtered = k.records_filtered + excluded.records_filtered,
           records_persisted = k.records_persisted + excluded.records_persisted,
           first_started_at = least(k.first_started_at, excluded.first_started_at),
           last_ended_at = greatest(k.last_ended_at, excluded.last_ended_at);
    RETURN NULL;
END;
$$;

-- INSERT and DELETE: the statement's rows, added (taken away) per batch in one upsert.
CREATE FUNCTION pipeline_batch_count_inserted_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pipeline_batch_counts AS k (
        batch, slot, queued, completed, failed, dead, cancelled, records_total,
        records_filtered, records_persisted, first_started_at, last_ended_at)
    SELECT r.batch_id, (txid_current() % 64)::smallint,
           count(*) FILTER (WHERE r.status IN ('pending', 'processing')),
           count(*) FILTER (WHERE r.status = 'completed'),
           count(*) FILTER (WHERE r.status = 'failed'),
           count(*) FILTER (WHERE r.status = 'dead'),
           count(*) FILTER (WHERE r.status = 'cancelled'),
           coalesce(sum(r.records_total) FILTER (WHERE r.status = 'completed'), 0),
           coalesce(sum(r.records_filtered) FILTER (WHERE r.status = 'completed'), 0),
           coalesce(sum(r.records_persisted) FILTER (WHERE r.status = 'completed'), 0),
           min(r.started_at),
           max(CASE r.status WHEN 'completed' THEN r.completed_at WHEN 'dead' THEN r.updated_at END)
      FROM pipeline_batch_count_new_rows r
     WHERE r.batch_id IS NOT NULL
     GROUP BY r.batch_id
     ORDER BY r.batch_id
    ON CONFLICT (batch, slot) DO UPDATE
       SET queued = k.queued + excluded.queued,
           completed = k.completed + excluded.completed,
           failed = k.failed + excluded.failed,
           dead = k.dead + excluded.dead,
           cancelled = k.cancelled + excluded.cancelled,
           records_total = k.records_total + excluded.records_total,
           records_filtered = k.records_filtered + excluded.records_filtered,
           records_persisted = k.records_persisted + excluded.records_persisted,
           first_started_at = least(k.first_started_at, excluded.first_started_at),
           last_ended_at = greatest(k.last_ended_at, excluded.last_ended_at);
    RETURN NULL;
END;
$$;

CREATE FUNCTION pipeline_batch_count_deleted_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pipeline_batch_counts AS k (
        batch, slot, queued, completed, failed, dead, cancelled, records_total,
        records_filtered, records_persisted)
    SELECT r.batch_id, (txid_current() % 64)::smallint,
           -count(*) FILTER (WHERE r.status IN ('pending', 'processing')),
           -count(*) FILTER (WHERE r.status = 'completed'),
           -count(*) FILTER (WHERE r.status = 'failed'),
           -count(*) FILTER (WHERE r.status = 'dead'),
           -count(*) FILTER (WHERE r.status = 'cancelled'),
           -coalesce(sum(r.records_total) FILTER (WHERE r.status = 'completed'), 0),
           -coalesce(sum(r.records_filtered) FILTER (WHERE r.status = 'completed'), 0),
           -coalesce(sum(r.records_persisted) FILTER (WHERE r.status = 'completed'), 0)
      FROM pipeline_batch_count_old_rows r
     WHERE r.batch_id IS NOT NULL
     GROUP BY r.batch_id
     ORDER BY r.batch_id
    ON CONFLICT (batch, slot) DO UPDATE
       SET queued = k.queued + excluded.queued,
           completed = k.completed + excluded.completed,
           failed = k.failed + excluded.failed,
           dead = k.dead + excluded.dead,
           cancelled = k.cancelled + excluded.cancelled,
           records_total = k.records_total + excluded.records_total,
           records_filtered = k.records_filtered + excluded.records_filtered,
           records_persisted = k.records_persisted + excluded.records_persisted;
    RETURN NULL;
END;
$$;

-- TRUNCATE fires no row or DELETE trigger: the counters go with the files.
CREATE FUNCTION pipeline_batch_count_truncated_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE pipeline_batch_counts;
    RETURN NULL;
END;
$$;

-- Their statements' plans kept for the session (0013: every function says its own setting).
ALTER FUNCTION pipeline_batch_count_v1() SET plan_cache_mode = auto;
ALTER FUNCTION pipeline_batch_count_inserted_v1() SET plan_cache_mode = auto;
ALTER FUNCTION pipeline_batch_count_deleted_v1() SET plan_cache_mode = auto;
ALTER FUNCTION pipeline_batch_count_truncated_v1() SET plan_cache_mode = force_custom_plan;

-- The table is locked from here to the end of the migration (CREATE TRIGGER takes SHARE ROW
-- EXCLUSIVE): no file changes between the backfill's read and the triggers counting.
CREATE TRIGGER file_checkpoints_batch_count_upd AFTER UPDATE OF status, batch_id
    ON file_checkpoints
    FOR EACH ROW WHEN (pipeline_batch_count_due_v1(OLD.status, NEW.status, OLD.batch_id,
                                                   NEW.batch_id))
    EXECUTE FUNCTION pipeline_batch_count_v1();
CREATE TRIGGER file_checkpoints_batch_count_ins AFTER INSERT ON file_checkpoints
    REFERENCING NEW TABLE AS pipeline_batch_count_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_batch_count_inserted_v1();
CREATE TRIGGER file_checkpoints_batch_count_del AFTER DELETE ON file_checkpoints
    REFERENCING OLD TABLE AS pipeline_batch_count_old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_batch_count_deleted_v1();
CREATE TRIGGER file_checkpoints_batch_count_trunc AFTER TRUNCATE ON file_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_batch_count_truncated_v1();

-- The files there already, in slot 0 of their batch.
INSERT INTO pipeline_batch_counts (
    batch, slot, queued, completed, failed, dead, cancelled, records_total,
    records_filtered, records_persisted, first_started_at, last_ended_at)
SELECT c.batch_id, 0,
       count(*) FILTER (WHERE c.status IN ('pending', 'processing')),
       count(*) FILTER (WHERE c.status = 'completed'),
       count(*) FILTER (WHERE c.status = 'failed'),
       count(*) FILTER (WHERE c.status = 'dead'),
       count(*) FILTER (WHERE c.status = 'cancelled'),
       coalesce(sum(c.records_total) FILTER (WHERE c.status = 'completed'), 0),
       coalesce(sum(c.records_filtered) FILTER (WHERE c.status = 'completed'), 0),
       coalesce(sum(c.records_persisted) FILTER (WHERE c.status = 'completed'), 0),
       min(c.started_at),
       max(CASE c.status WHEN 'completed' THEN c.completed_at WHEN 'dead' THEN c.updated_at END)
  FROM file_checkpoints c
 WHERE c.batch_id IS NOT NULL
 GROUP BY c.batch_id;

-- A batch's completions of the last minute (its rate and ETA in `status --batch`) in one
-- index range, not a walk of every batch's recent completions. An entry is added only when a
-- file completes (the predicate).
CREATE INDEX file_checkpoints_batch_completed_idx ON file_checkpoints (batch_id, completed_at)
 WHERE status = 'completed';

-- Cancel a batch: as v1, its waiting files counted in one upsert (the per-row trigger off for
-- the two UPDATEs; pending and failed apart, to know what each file was).
CREATE FUNCTION pipeline_batch_cancel_v2(p_name text)
RETURNS TABLE (cancelled bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_pending bigint;
    v_failed  bigint;
BEGIN
    UPDATE pipeline_batches b SET state = 'cancelled', updated_at = clock_timestamp()
     WHERE b.name = p_name;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM set_config('pipeline.batch_counts', 'off', true);
    UPDATE file_checkpoints c
       SET status = 'cancelled', retry_at = NULL, updated_at = clock_timestamp()
     WHERE c.batch_id = p_name AND c.status = 'pending';
    GET DIAGNOSTICS v_pending = ROW_COUNT;
    UPDATE file_checkpoints c
       SET status = 'cancelled', retry_at = NULL, updated_at = clock_timestamp()
     WHERE c.batch_id = p_name AND c.status = 'failed';
    GET DIAGNOSTICS v_failed = ROW_COUNT;
    PERFORM set_config('pipeline.batch_counts', 'on', true);
    IF v_pending + v_failed > 0 THEN
        INSERT INTO pipeline_batch_counts AS k (batch, slot, queued, failed, cancelled)
        VALUES (p_name, (txid_current() % 64)::smallint, -v_pending, -v_failed,
                v_pending + v_failed)
        ON CONFLICT (batch, slot) DO UPDATE
           SET queued = k.queued + excluded.queued, failed = k.failed + excluded.failed,
               cancelled = k.cancelled + excluded.cancelled;
    END IF;
    RETURN QUERY SELECT v_pending + v_failed;
END;
$$;

-- Operator requeue (the `requeue` query before this migration, as a function): dead / failed
-- (and completed with force) rows back to pending in a new generation, cancelled ones as they
-- stood, their batches open again; the files moved counted per batch in one upsert, from what
-- each was when this statement locked it (the per-row trigger off for the statement).
CREATE FUNCTION pipeline_requeue_v1(
    p_statuses text[], p_force boolean, p_file_url text, p_batch_id text
) RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('pipeline.batch_counts', 'off', true);
    RETURN QUERY
    WITH locked AS (
        SELECT c.file_url, c.status, c.batch_id, c.records_total, c.records_filtered,
               c.records_persisted
          FROM file_checkpoints c
         WHERE c.status = ANY(p_statuses)
           AND (c.status IN ('dead', 'failed', 'cancelled') OR (c.status = 'completed' AND p_force))
           AND (p_file_url IS NULL OR c.file_url = p_file_url)
           AND (p_batch_id IS NULL OR c.batch_id = p_batch_id)
         ORDER BY c.file_url
           FOR UPDATE
    ), fresh AS (
        UPDATE file_checkpoints c
           SET status = 'pending', attempt = 0, generation = c.generation + 1, token = NULL,
               lease_expires_at = NULL, retry_at = NULL, error_message = NULL,
               completed_at = NULL, records_total = 0, records_filtered = 0,
               records_persisted = 0, processing_time_ms = 0, details = NULL,
               attempts_spent = 0, attempt_chunks = 0, position = NULL,
               position_version = NULL, attempt_start_position = NULL, progress_bytes = NULL,
               size_bytes = NULL, progress_at = NULL, submitted_at = now(), updated_at = now()
          FROM locked l
         WHERE c.file_url = l.file_url AND l.status <> 'cancelled'
        RETURNING c.file_url, c.task_name, c.status, c.batch_id, l.status AS was,
                  l.records_total, l.records_filtered, l.records_persisted
    ), resumed AS (
        UPDATE file_checkpoints c
           SET status = 'pending', token = NULL, lease_expires_at = NULL, retry_at = NULL,
               submitted_at = now(), updated_at = now()
          FROM locked l
         WHERE c.file_url = l.file_url AND l.status = 'cancelled'
        RETURNING c.file_url, c.task_name, c.status, c.batch_id, l.status AS was,
                  0 AS records_total, 0 AS records_filtered, 0 AS records_persisted
    ), moved AS (
        SELECT * FROM fresh UNION ALL SELECT * FROM resumed
    ), reopened AS (
        -- their batches have files to run again: open (a done one settles again once they
        -- end, firing its callback only if files were added since the last)
        UPDATE pipeline_batches b SET state = 'open', updated_at = now()
         WHERE b.state IN ('cancelled', 'done')
           AND b.name IN (SELECT m.batch_id FROM moved m)
    ), counted AS (
        INSERT INTO pipeline_batch_counts AS k (
            batch, slot, queued, completed, failed, dead, cancelled, records_total,
            records_filtered, records_persisted)
        SELECT m.batch_id, (txid_current() % 64)::smallint, count(*),
               -count(*) FILTER (WHERE m.was = 'completed'),
               -count(*) FILTER (WHERE m.was = 'failed'),
               -count(*) FILTER (WHERE m.was = 'dead'),
               -count(*) FILTER (WHERE m.was = 'cancelled'),
               -coalesce(sum(m.records_total) FILTER (WHERE m.was = 'completed'), 0),
               -coalesce(sum(m.records_filtered) FILTER (WHERE m.was = 'completed'), 0),
               -coalesce(sum(m.records_persisted) FILTER (WHERE m.was = 'completed'), 0)
          FROM moved m
         WHERE m.batch_id IS NOT NULL
         GROUP BY m.batch_id
         ORDER BY m.batch_id
        ON CONFLICT (batch, slot) DO UPDATE
           SET queued = k.queued + excluded.queued,
               completed = k.completed + excluded.completed,
               failed = k.failed + excluded.failed, dead = k.dead + excluded.dead,
               cancelled = k.cancelled + excluded.cancelled,
               records_total = k.records_total + excluded.records_total,
               records_filtered = k.records_filtered + excluded.records_filtered,
               records_persisted = k.records_persisted + excluded.records_persisted
    )
    SELECT m.file_url, m.task_name, m.status FROM moved m;
    PERFORM set_config('pipeline.batch_counts', 'on', true);
END;
$$;

-- Each plans its statements with its parameters (0013's rule for all but the hot functions).
ALTER FUNCTION pipeline_batch_cancel_v2(text) SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION pipeline_requeue_v1(text[], boolean, text, text)
    SET plan_cache_mode = force_custom_plan;

-- The older name, for a CLI not yet upgraded: the same signature, the new behaviour.
CREATE OR REPLACE FUNCTION pipeline_batch_cancel_v1(p_name text)
RETURNS TABLE (cancelled bigint)
LANGUAGE sql AS $$
    SELECT * FROM pipeline_batch_cancel_v2(p_name)
$$;
