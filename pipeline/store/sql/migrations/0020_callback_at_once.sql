-- 0020: a batch's completion callback created by the completion (or the dead ending) that
-- makes the batch terminal, in its transaction, and returned to the worker to send once it
-- committed; until now only the sweep created it (up to one sweep interval late). The sweep
-- stays the safety net: it settles what no ending settled (see the race notes below), and hands
-- back a callback row whose message was never sent (a worker killed between its commit and the
-- send): a pending row, re-enqueued after PIPELINE_REAP_WAITING_SECONDS.
--
-- Exactly once: a callback is only ever created by pipeline_batch_settle_v1 (0014), under the
-- batch row's lock, and only while the batch is `open` with files added since the last one
-- (`settled_count < file_count`), which it marks `done` in the same transaction. Whoever calls
-- it (this ending, another one, the sweep), one creates `batch:NAME#N`; the row is then claimed
-- and fenced like a file. A batch that grows afterwards is `open` again (registration) and
-- fires `#N+1` for the new files, once.

-- Whether a batch has a callback, on its counter rows (0016's slots), where the completion
-- reads it for nothing: its UPDATE of the slot's row returns it. Set on a new slot row from the
-- batch row (a BEFORE INSERT trigger: slot rows are created by upserts in several functions,
-- at most 64 per batch), and on the batch's existing rows when `on_complete` is set (an AFTER
-- trigger on pipeline_batches; `on_complete` is never cleared, so the flag only turns on).
-- (Reading the batch row from the completion instead, a primary-key probe in the same
-- statement, cost ~50k backend instructions per pair, +3.1 %: callgrind.) A slot row created
-- while a concurrent submit first sets `on_complete` on an existing batch may miss it: its
-- completions leave that batch to the sweep.
ALTER TABLE pipeline_batch_counts ADD COLUMN watched boolean NOT NULL DEFAULT false;
UPDATE pipeline_batch_counts k SET watched = true
  FROM pipeline_batches b WHERE b.name = k.batch AND b.on_complete IS NOT NULL;

CREATE FUNCTION pipeline_batch_counts_watched_v1() RETURNS trigger
LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
BEGIN
    NEW.watched := EXISTS (SELECT 1 FROM pipeline_batches b
                            WHERE b.name = NEW.batch AND b.on_complete IS NOT NULL);
    RETURN NEW;
END;
$$;
CREATE TRIGGER pipeline_batch_counts_watched BEFORE INSERT ON pipeline_batch_counts
    FOR EACH ROW EXECUTE FUNCTION pipeline_batch_counts_watched_v1();

CREATE FUNCTION pipeline_batch_watch_v1() RETURNS trigger
LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
BEGIN
    UPDATE pipeline_batch_counts k SET watched = true WHERE k.batch = NEW.name AND NOT k.watched;
    RETURN NULL;
END;
$$;
CREATE TRIGGER pipeline_batches_watch AFTER INSERT OR UPDATE OF on_complete ON pipeline_batches
    FOR EACH ROW WHEN (NEW.on_complete IS NOT NULL)
    EXECUTE FUNCTION pipeline_batch_watch_v1();

-- After a file of batch p_batch ended (completed, or dead) in the caller's transaction: is this
-- the batch's last file? Read from its counters (0016's slots, at most 64 rows): the files not
-- terminal are `queued` (pending or processing) + `failed` + `cancelled`, summed, this ending
-- included (the caller's own slot update is visible to it). Only worth asking further in the
-- batch's tail, when at most TAIL (128) are left in this snapshot: then the endings of the tail
-- take turns on a lock of their own, held to their commit, and read the sum again. Two workers
-- finishing the last two files at once each see the other's file still `processing` in their
-- first read, so neither would settle; with the lock, the later one reads again after the
-- earlier one committed (a new snapshot per statement: READ COMMITTED), sees 0, and
-- pipeline_batch_settle_v1 decides, from the files themselves, under the batch row's lock.
-- Not an index probe of the batch's waiting files: the (batch_id, 'pending') range keeps an
-- entry for every file claimed since the last vacuum, and an EXISTS walks them all before the
-- first live one (callgrind: +800k instructions per pair on average over a batch's first 500
-- completions). An advisory lock, not the batch row: a caller holds its file and its counter
-- slot's row, and cancel and requeue take the batch row before counter rows, so waiting for
-- the batch row here could deadlock; nobody holding this lock waits for anything its waiters
-- hold. The callback created (file_url, task), or no row. Left to the sweep: more than TAIL
-- endings of the batch in flight at once when it ends, a file still waiting in the first read
-- that is then claimed and ends before this transaction commits, a batch row another session
-- holds at that moment (pipeline_batch_settle_v1 skips it), counters off by a hand-written
-- UPDATE (0018).
CREATE FUNCTION pipeline_batch_ended_v1(p_batch text)
RETURNS TABLE (file_url text, task_name text)
LANGUAGE plpgsql SET plan_cache_mode = auto SET enable_seqscan = off AS $$
DECLARE
    v_left bigint;
BEGIN
    SELECT sum(k.queued + k.failed + k.cancelled) INTO v_left
      FROM pipeline_batch_counts k WHERE k.batch = p_batch;
    IF v_left > 128 THEN
        RETURN;  -- not the tail
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('pipeline_batch_end:' || p_batch, 0));
    SELECT sum(k.queued + k.failed + k.cancelled) INTO v_left
      FROM pipeline_batch_counts k WHERE k.batch = p_batch;
    IF v_left > 0 THEN
        RETURN;  -- files of the batch still running or waiting, seen after the lock
    END IF;
    RETURN QUERY SELECT s.file_url, s.task_name FROM pipeline_batch_settle_v1(p_batch) s;
END;
$$;

-- complete: as v3, and the callback its ending created, if any: NULL when the token is stale
-- (nothing changed), else an array, empty, or {callback_url, callback_task}. A scalar, not a
-- row: a set-returning function (RETURN QUERY, its tuplestore) cost every pair ~80k backend
-- instructions more (callgrind, +5.8 %). Whether to ask at all: the `watched` flag its counter
-- UPDATE returns; only a file of a batch with a callback asks pipeline_batch_ended_v1. (A
-- callback row has no batch: it never asks.)
CREATE FUNCTION pipeline_complete_v4(
    p_file_url text, p_token bigint, p_total integer, p_filtered integer, p_persisted integer,
    p_processing_time_ms integer, p_details jsonb
) RETURNS text[]
LANGUAGE plpgsql SET plan_cache_mode = auto SET enable_seqscan = off AS $$
DECLARE
    r         file_checkpoints%ROWTYPE;
    v_now     timestamptz := clock_timestamp();
    v_watched boolean;
    v_url     text;
    v_task    text;
BEGIN
    UPDATE file_checkpoints c
       SET status = 'completed', records_total = p_total, records_filtered = p_filtered,
           records_persisted = p_persisted,
           processing_time_ms = coalesce(p_processing_time_ms,
               (extract(epoch FROM v_now - c.started_at) * 1000)::integer),
           details = coalesce(p_details, c.details), retry_at = NULL,
           error_message = NULL, lease_expires_at = NULL, completed_at = v_now, updated_at = v_now
     WHERE c.file_url = p_file_url AND c.token = p_token AND c.status = 'processing'
    RETURNING c.* INTO r;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO file_attempts AS a (token, file_url, generation, attempt, worker, task_id,
                                    started_at, ended_at, outcome, error_class, error_message,
                                    retry_at, start_position, end_position, chunks)
    VALUES (r.token, r.file_url, r.generation, r.attempt, r.processed_by, r.task_id,
            coalesce(r.started_at, v_now), v_now, 'completed', NULL, NULL, NULL,
            r.attempt_start_position, r.position, r.attempt_chunks)
    ON CONFLICT (token) DO UPDATE
       SET outcome = excluded.outcome, ended_at = excluded.ended_at,
           error_class = excluded.error_class, error_message = excluded.error_message,
           retry_at = excluded.retry_at, start_position = excluded.start_position,
           end_position = excluded.end_position, chunks = excluded.chunks
     WHERE a.outcome = 'running';
    IF r.batch_id IS NULL THEN
        RETURN '{}';
    END IF;
    UPDATE pipeline_batch_counts k
       SET queued = k.queued - 1, completed = k.completed + 1,
           records_total = k.records_total + r.records_total,
           records_filtered = k.records_filtered + r.records_filtered,
           records_persisted = k.records_persisted + r.records_persisted,
           first_started_at = least(k.first_started_at, r.started_at),
           last_ended_at = greatest(k.last_ended_at, v_now)
     WHERE k.batch = r.batch_id AND k.slot = (txid_current() % 64)::smallint
    RETURNING k.watched INTO v_watched;
    IF NOT FOUND THEN
        PERFORM pipeline_batch_count_left_v1(r.batch_id, 'completed', r.records_total,
            r.records_filtered, r.records_persisted, r.started_at, v_now);
        SELECT b.on_complete IS NOT NULL INTO v_watched FROM pipeline_batches b
         WHERE b.name = r.batch_id;
    END IF;
    IF v_watched THEN
        SELECT e.file_url, e.task_name INTO v_url, v_task
          FROM pipeline_batch_ended_v1(r.batch_id) e;
        IF v_url IS NOT NULL THEN
            RETURN ARRAY[v_url, v_task];
        END IF;
    END IF;
    RETURN '{}';
END;
$$;

-- fail: as v4, and when the file ends dead, the callback its ending created, if any.
CREATE FUNCTION pipeline_fail_v5(
    p_file_url text, p_token bigint, p_error_class text, p_error_message text,
    p_retryable boolean, p_retry_in double precision
) RETURNS TABLE (status text, attempt integer, max_attempts integer, retry_in double precision,
                 callback_url text, callback_task text)
LANGUAGE plpgsql SET plan_cache_mode = auto SET enable_seqscan = off AS $$
DECLARE
    r        file_checkpoints%ROWTYPE;
    v_now    timestamptz := clock_timestamp();
    v_spent  integer;
    v_left   boolean;
    v_retry  timestamptz;
    v_url    text;
    v_task   text;
BEGIN
    SELECT * INTO r FROM file_checkpoints c
     WHERE c.file_url = p_file_url AND c.token = p_token AND c.status = 'processing'
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    v_spent := r.attempts_spent + CASE WHEN r.attempt_chunks > 0 THEN 0 ELSE 1 END;
    v_left := p_retryable AND v_spent < r.max_attempts;
    v_retry := CASE WHEN v_left AND p_retry_in IS NOT NULL
        THEN v_now + make_interval(secs => greatest(p_retry_in, 0)) END;
    PERFORM pipeline_attempt_end_v1(r, v_now, 'failed', p_error_class, p_error_message, v_retry);
    UPDATE file_checkpoints c
       SET status = CASE WHEN v_left THEN 'failed' ELSE 'dead' END, retry_at = v_retry,
           attempts_spent = v_spent, attempt_chunks = 0,
           error_message = p_error_message, lease_expires_at = NULL, updated_at = v_now
     WHERE c.file_url = p_file_url
    RETURNING c.* INTO r;
    IF r.batch_id IS NOT NULL THEN
        PERFORM pipeline_batch_count_left_v1(r.batch_id, r.status, 0, 0, 0, r.started_at,
            CASE WHEN r.status = 'dead' THEN r.updated_at END);
        IF r.status = 'dead' AND EXISTS (SELECT 1 FROM pipeline_batches b
                                          WHERE b.name = r.batch_id AND b.on_complete IS NOT NULL)
        THEN
            SELECT e.file_url, e.task_name INTO v_url, v_task
              FROM pipeline_batch_ended_v1(r.batch_id) e;
        END IF;
    END IF;
    RETURN QUERY SELECT r.status, r.attempt, r.max_attempts,
        CASE WHEN r.retry_at IS NOT NULL
             THEN greatest(extract(epoch FROM r.retry_at - clock_timestamp()), 0)::double precision
        END,
        v_url, v_task;
END;
$$;
