-- 0018: the batch counters of 0016 off the workers' hot path (issues 22 and 24). 0016's triggers
-- cost every claim + complete pair: +18 % backend instructions for a new URL in no batch (the
-- INSERT statement trigger and its transition table, the UPDATE trigger's WHEN call), +21 % for
-- a file of a batch (the trigger, its counter UPDATE, the completions index). Figures before and
-- after each change below: bench/RESULTS.md, "Batch counters".
--
-- The rule changes in one place: a file LEAVING `queued` (pending or processing) for another
-- status is counted by the function that moves it, in the same transaction, after the file's
-- row lock (as the trigger did: at the end of the statement that moved it): complete, fail, a
-- lost attempt (pipeline_lose_v1: the sweep, abandon, a claim's take-over), a cancelled chunk,
-- the claim's refusals that end a pending file (dead, cancelled), and a batch's cancel (0016
-- already). Every other change of a file's status or batch (a claim of a failed file, requeue,
-- a new generation or another batch at registration, the cancel of a failed file, an UPDATE
-- written by hand of a file in neither status) is still counted by the per-row trigger, and
-- inserts, deletes and TRUNCATE by the statement triggers, as in 0016. A function added later
-- that moves a file out of pending or processing counts it with pipeline_batch_count_left_v1.
-- (An UPDATE written by hand of pending or processing files, e.g. `SET status = 'completed'`
-- on a batch's pending files, or a change of their batch, is no longer counted: 0016 counted
-- it.)

-- (1) The INSERT statement trigger returns at once when no inserted row is in a batch (a claim's
-- new URL never is): one look at the transition table instead of the grouping upsert.
CREATE OR REPLACE FUNCTION pipeline_batch_count_inserted_v1() RETURNS trigger
LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pipeline_batch_count_new_rows r WHERE r.batch_id IS NOT NULL)
    THEN
        RETURN NULL;
    END IF;
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

-- (2) A file of batch p_batch left `queued` for p_status (completed, failed, dead, cancelled):
-- its slot's row (the transaction's, as 0016) takes it from queued to that status, with the
-- records of a completed file and its start and end. One UPDATE when the row is there, else an
-- upsert. For the functions that move files out of pending or processing (the rule above).
CREATE FUNCTION pipeline_batch_count_left_v1(
    p_batch text, p_status text, p_total integer, p_filtered integer, p_persisted integer,
    p_started_at timestamptz, p_ended_at timestamptz
) RETURNS void
LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
DECLARE
    v_slot smallint := (txid_current() % 64)::smallint;
BEGIN
    UPDATE pipeline_batch_counts k
       SET queued = k.queued - 1,
           completed = k.completed + (p_status = 'completed')::int,
           failed = k.failed + (p_status = 'failed')::int,
           dead = k.dead + (p_status = 'dead')::int,
           cancelled = k.cancelled + (p_status = 'cancelled')::int,
           records_total = k.records_total + p_total,
           records_filtered = k.records_filtered + p_filtered,
           records_persisted = k.records_persisted + p_persisted,
           first_started_at = least(k.first_started_at, p_started_at),
           last_ended_at = greatest(k.last_ended_at, p_ended_at)
     WHERE k.batch = p_batch AND k.slot = v_slot;
    IF FOUND THEN
        RETURN;
    END IF;
    INSERT INTO pipeline_batch_counts AS k (
        batch, slot, queued, completed, failed, dead, cancelled, records_total,
        records_filtered, records_persisted, first_started_at, last_ended_at)
    VALUES (p_batch, v_slot, -1, (p_status = 'completed')::int, (p_status = 'failed')::int,
            (p_status = 'dead')::int, (p_status = 'cancelled')::int, p_total, p_filtered,
            p_persisted, p_started_at, p_ended_at)
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
END;
$$;

-- (3) The per-row UPDATE trigger no longer fires for a file that was pending or processing: the
-- claim of a pending file (no counter moves), and every move out of queued (counted by its
-- function). PostgreSQL reads a trigger's WHEN back from its stored text at every statement
-- that may fire it (0016's note): 0016's call with four arguments cost the claim's and the
-- completion's UPDATE ~25k instructions each, a longer test ~50k. So the WHEN is the shortest
-- test that tells those rows apart: the old status sorts before 'pending' (cancelled,
-- completed, dead, failed do; pending and processing do not; in the "C" collation whatever the
-- database's), and 0016's test (a batch, a counted change, counting not switched off) moves
-- into the trigger function, for the rows that pass. (A later status that sorts at or after
-- 'pending' would be left to its functions: name it so, or change this test.)
CREATE FUNCTION pipeline_batch_count_v2() RETURNS trigger
LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
DECLARE
    v_slot smallint := (txid_current() % 64)::smallint;
BEGIN
    -- 0016's test, from the trigger's WHEN: in a batch, a counted change, counting not off.
    IF NOT pipeline_batch_count_due_v1(OLD.status, NEW.status, OLD.batch_id, NEW.batch_id) THEN
        RETURN NULL;
    END IF;
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

DROP TRIGGER file_checkpoints_batch_count_upd ON file_checkpoints;
CREATE TRIGGER file_checkpoints_batch_count_upd AFTER UPDATE OF status, batch_id
    ON file_checkpoints
    FOR EACH ROW WHEN (OLD.status < 'pending' COLLATE "C")
    EXECUTE FUNCTION pipeline_batch_count_v2();
DROP FUNCTION pipeline_batch_count_v1();

-- (4) The functions that move a file out of queued, counting it. Same signatures, same
-- outcomes, same locks as before (0011, 0015, 0016); the counter change after the file's.
-- (CREATE OR REPLACE drops a function's settings: each says its own again.)

-- complete: its own UPDATE of the slot's row (the workers' most frequent counted move), and
-- the attempt row written here rather than by a PERFORM of pipeline_attempt_end_v1 (the same
-- statement: a call less, -21k to -27k instructions per pair, a file in a batch or not).
CREATE OR REPLACE FUNCTION pipeline_complete_v3(
    p_file_url text, p_token bigint, p_total integer, p_filtered integer, p_persisted integer,
    p_processing_time_ms integer, p_details jsonb
) RETURNS boolean
LANGUAGE plpgsql SET plan_cache_mode = auto SET enable_seqscan = off AS $$
DECLARE
    r     file_checkpoints%ROWTYPE;
    v_now timestamptz := clock_timestamp();
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
        RETURN false;
    END IF;
    -- pipeline_attempt_end_v1's statement, here: one PERFORM and one function call less
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
    IF r.batch_id IS NOT NULL THEN
        UPDATE pipeline_batch_counts k
           SET queued = k.queued - 1, completed = k.completed + 1,
               records_total = k.records_total + r.records_total,
               records_filtered = k.records_filtered + r.records_filtered,
               records_persisted = k.records_persisted + r.records_persisted,
               first_started_at = least(k.first_started_at, r.started_at),
               last_ended_at = greatest(k.last_ended_at, v_now)
         WHERE k.batch = r.batch_id AND k.slot = (txid_current() % 64)::smallint;
        IF NOT FOUND THEN
            PERFORM pipeline_batch_count_left_v1(r.batch_id, 'completed', r.records_total,
                r.records_filtered, r.records_persisted, r.started_at, v_now);
        END IF;
    END IF;
    RETURN true;
END;
$$;

CREATE OR REPLACE FUNCTION pipeline_fail_v4(
    p_file_url text, p_token bigint, p_error_class text, p_error_message text,
    p_retryable boolean, p_retry_in double precision
) RETURNS TABLE (status text, attempt integer, max_attempts integer, retry_in double precision)
LANGUAGE plpgsql SET plan_cache_mode = auto SET enable_seqscan = off AS $$
DECLARE
    r        file_checkpoints%ROWTYPE;
    v_now    timestamptz := clock_timestamp();
    v_spent  integer;
    v_left   boolean;
    v_retry  timestamptz;
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
    END IF;
    RETURN QUERY SELECT r.status, r.attempt, r.max_attempts,
        CASE WHEN r.retry_at IS NOT NULL
             THEN greatest(extract(epoch FROM r.retry_at - clock_timestamp()), 0)::double precision
        END;
END;
$$;

-- A lost attempt (the sweep, abandon, a claim taking over an expired lease): always from
-- processing.
CREATE OR REPLACE FUNCTION pipeline_lose_v1(
    r file_checkpoints, p_now timestamptz, p_why text, p_failed text, p_dead text,
    p_retry_at timestamptz
) RETURNS file_checkpoints
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
DECLARE
    v_spent integer := r.attempts_spent + CASE WHEN r.attempt_chunks > 0 THEN 0 ELSE 1 END;
    v_left  boolean := v_spent < r.max_attempts;
    v_kept  text := CASE WHEN r.attempt_chunks > 0
        THEN format(' (it committed %s chunks: no attempt spent)', r.attempt_chunks) ELSE '' END;
    v_was   text := r.status;
BEGIN
    PERFORM pipeline_attempt_end_v1(r, p_now, 'lost', 'WorkerLost', p_why || v_kept, NULL);
    UPDATE file_checkpoints c
       SET status = CASE WHEN v_left THEN 'failed' ELSE 'dead' END,
           attempts_spent = v_spent, attempt_chunks = 0, max_attempts = r.max_attempts,
           retry_at = CASE WHEN v_left THEN p_retry_at END,
           error_message = CASE WHEN v_left
               THEN format(p_failed, c.attempt, r.max_attempts, c.processed_by) || v_kept
               ELSE format(p_dead, c.attempt, r.max_attempts, c.processed_by) END,
           lease_expires_at = NULL, updated_at = p_now
     WHERE c.file_url = r.file_url
    RETURNING c.* INTO r;
    IF r.batch_id IS NOT NULL AND v_was IN ('pending', 'processing') THEN
        PERFORM pipeline_batch_count_left_v1(r.batch_id, r.status, 0, 0, 0, r.started_at,
            CASE WHEN r.status = 'dead' THEN r.updated_at END);
    END IF;
    RETURN r;
END;
$$;

-- A chunk committed while its batch was cancelled: the file stops there, cancelled.
CREATE OR REPLACE FUNCTION pipeline_commit_chunk_v2(
    p_file_url text, p_token bigint, p_position jsonb, p_version text, p_total integer,
    p_filtered integer, p_persisted integer, p_progress_bytes bigint, p_size_bytes bigint
) RETURNS TABLE (lease_left double precision)
LANGUAGE plpgsql SET plan_cache_mode = auto SET enable_seqscan = off AS $$
DECLARE
    r     file_checkpoints%ROWTYPE;
    v_now timestamptz := clock_timestamp();
BEGIN
    UPDATE file_checkpoints c
       SET attempt_chunks = c.attempt_chunks
               + CASE WHEN c.position IS DISTINCT FROM p_position THEN 1 ELSE 0 END,
           position = p_position, position_version = p_version,
           records_total = p_total, records_filtered = p_filtered, records_persisted = p_persisted,
           progress_bytes = p_progress_bytes, size_bytes = coalesce(p_size_bytes, c.size_bytes),
           progress_at = v_now,
           lease_expires_at = v_now + make_interval(secs => c.lease_seconds),
           updated_at = v_now
     WHERE c.file_url = p_file_url AND c.token = p_token AND c.status = 'processing'
    RETURNING c.* INTO r;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF r.batch_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM pipeline_batches b WHERE b.name = r.batch_id AND b.state = 'cancelled'
    ) THEN
        PERFORM pipeline_attempt_end_v1(r, v_now, 'cancelled', NULL, 'batch cancelled', NULL);
        UPDATE file_checkpoints c
           SET status = 'cancelled', lease_expires_at = NULL, attempt_chunks = 0,
               updated_at = v_now
         WHERE c.file_url = p_file_url;
        PERFORM pipeline_batch_count_left_v1(r.batch_id, 'cancelled', 0, 0, 0, r.started_at,
                                             NULL);
        RETURN QUERY SELECT 0.0::double precision;
        RETURN;
    END IF;
    RETURN QUERY SELECT extract(epoch FROM r.lease_expires_at - clock_timestamp())::double precision;
END;
$$;

-- The claim (0015's, whole): its refusals that end a pending file of a batch (no attempts left,
-- its batch cancelled) count it.
CREATE OR REPLACE FUNCTION pipeline_claim_v5(
    p_file_url      text,
    p_worker        text,
    p_lease_seconds double precision,
    p_max_attempts  integer,
    p_file_type     text,
    p_task_name     text,
    p_task_id       text,
    p_resume_tokens bigint[] DEFAULT NULL,
    p_token         bigint DEFAULT NULL
) RETURNS TABLE (
    outcome             text,
    token               bigint,
    attempt             integer,
    max_attempts        integer,
    generation          integer,
    retry_in            double precision,
    records_total       integer,
    records_filtered    integer,
    records_persisted   integer,
    error_message       text,
    "position"          jsonb,
    position_version    text
)
LANGUAGE plpgsql SET plan_cache_mode = auto SET enable_seqscan = off AS $$
DECLARE
    r       file_checkpoints%ROWTYPE;
    v_cap   integer;
    v_old   bigint;
    v_error text;
    v_now   timestamptz := clock_timestamp();
    b       pipeline_batches%ROWTYPE;
    v_busy  bigint;
    v_status text;
    v_batch  text;
    v_was    text;
    v_open   boolean;
BEGIN
    -- Fast paths, decided on a look at the row without a lock: a new file is inserted
    -- already claimed, a pending one (registered, not claimed in this generation) is claimed
    -- by one UPDATE; each re-checks on the row itself (ON CONFLICT; `pending` and the cap in
    -- the WHERE, re-checked on the latest version if a concurrent claim changed it), and when
    -- that fails the claim goes the long way below, as before. Neither can wait on a zombie's
    -- row lock (what the fence below is for): no row has no holder, and a pending row is not
    -- one a claim holds, so no output transaction has it locked. Nothing else of the long way
    -- applies to them: no holder to take over, no resume token, no refusal.
    SELECT c.status, c.batch_id INTO v_status, v_batch
      FROM file_checkpoints c WHERE c.file_url = p_file_url;
    IF v_batch IS NOT NULL THEN
        -- A pending file of a batch takes the fast path only while its batch is open and has
        -- no limit: a cancelled, paused or limited batch decides on the long way (its end).
        -- The same plain read of the batch row the long way makes, and the same race with a
        -- cancel: one that commits first moved the file off `pending` (the UPDATE's re-check
        -- sends the claim the long way), one that commits later finds this claim started.
        -- (Two columns read, not the row into `b`: 0018.)
        SELECT pb.state = 'open' AND pb.concurrency IS NULL INTO v_open
          FROM pipeline_batches pb WHERE pb.name = v_batch;
        IF v_open IS NOT TRUE THEN
            v_status := NULL;  -- the long way
        END IF;
    END IF;
    IF NOT FOUND THEN
        INSERT INTO file_checkpoints AS c (
            file_url, file_type, status, attempt, max_attempts, token, lease_seconds,
            lease_expires_at, processed_by, task_name, task_id, started_at, updated_at)
        VALUES (
            p_file_url, coalesce(p_file_type, 'unknown'), 'processing', 1, coalesce(p_max_attempts, 3),
            coalesce(p_token, nextval('file_checkpoints_token_seq')), p_lease_seconds,
            v_now + make_interval(secs => p_lease_seconds), p_worker, p_task_name, p_task_id, v_now, v_now)
        ON CONFLICT (file_url) DO NOTHING
        RETURNING c.* INTO r;
        IF FOUND THEN
            RETURN QUERY SELECT 'granted'::text, r.token, r.attempt, r.max_attempts, r.generation,
                NULL::double precision, 0, 0, 0, NULL::text, NULL::jsonb, NULL::text;
            RETURN;
        END IF;
    ELSIF v_status = 'pending' THEN
        -- as the grant at the end of the long way; error_message stays the row's (v_error)
        UPDATE file_checkpoints c
           SET status = 'processing', attempt = c.attempt + 1,
               max_attempts = coalesce(p_max_attempts, c.max_attempts),
               token = coalesce(p_token, nextval('file_checkpoints_token_seq')),
               lease_seconds = p_lease_seconds,
               lease_expires_at = v_now + make_interval(secs => p_lease_seconds), retry_at = NULL,
               processed_by = p_worker, task_name = coalesce(p_task_name, c.task_name),
               task_id = p_task_id, file_type = coalesce(p_file_type, c.file_type),
               attempt_start_position = c.position, attempt_chunks = 0,
               started_at = v_now, updated_at = v_now
         WHERE c.file_url = p_file_url AND c.status = 'pending'
           AND c.attempts_spent < coalesce(p_max_attempts, c.max_attempts)
        RETURNING c.* INTO r;
        IF FOUND THEN
            RETURN QUERY SELECT 'granted'::text, r.token, r.attempt, r.max_attempts,
                r.generation, NULL::double precision, r.records_total, r.records_filtered,
                r.records_persisted, NULL::text, r.position, r.position_version;
            RETURN;
        END IF;
    END IF;

    -- See pipeline_claim_v1: end a zombie's output session before waiting for its row lock.
    PERFORM pipeline_fence_v1(c.token) FROM file_checkpoints c
      WHERE c.file_url = p_file_url AND c.status = 'processing' AND c.lease_expires_at <= v_now;

    SELECT * INTO r FROM file_checkpoints c WHERE c.file_url = p_file_url FOR UPDATE;
    IF NOT FOUND THEN
        -- First sight of the file: insert it already claimed.
        INSERT INTO file_checkpoints AS c (
            file_url, file_type, status, attempt, max_attempts, token, lease_seconds,
            lease_expires_at, processed_by, task_name, task_id, started_at, updated_at)
        VALUES (
            p_file_url, coalesce(p_file_type, 'unknown'), 'processing', 1, coalesce(p_max_attempts, 3),
            coalesce(p_token, nextval('file_checkpoints_token_seq')), p_lease_seconds,
            v_now + make_interval(secs => p_lease_seconds), p_worker, p_task_name, p_task_id, v_now, v_now)
        ON CONFLICT (file_url) DO NOTHING
        RETURNING c.* INTO r;
        IF FOUND THEN
            RETURN QUERY SELECT 'granted'::text, r.token, r.attempt, r.max_attempts, r.generation,
                NULL::double precision, 0, 0, 0, NULL::text, NULL::jsonb, NULL::text;
            RETURN;
        END IF;
        -- Another claimant inserted it between our look and our insert: decide on its row.
        SELECT * INTO STRICT r FROM file_checkpoints c WHERE c.file_url = p_file_url FOR UPDATE;
    END IF;
    -- The lock may have been waited for: decide on the time it was granted.
    v_now := clock_timestamp();
    v_cap := coalesce(p_max_attempts, r.max_attempts);
    -- A row taken over keeps the error it had (the lost attempt's is in its history).
    v_error := r.error_message;

    IF r.status = 'processing' AND r.token = ANY(p_resume_tokens) THEN
        -- This task chain's own claim, whose reply was lost: hand it over, same attempt.
        v_old := r.token;
        UPDATE file_checkpoints c
           SET token = coalesce(p_token, nextval('file_checkpoints_token_seq')),
               lease_seconds = p_lease_seconds,
               lease_expires_at = v_now + make_interval(secs => p_lease_seconds),
               processed_by = p_worker, task_id = p_task_id, updated_at = v_now
         WHERE c.file_url = p_file_url
        RETURNING c.* INTO r;
        UPDATE file_attempts a SET token = r.token, worker = p_worker, task_id = p_task_id
         WHERE a.token = v_old;
        RETURN QUERY SELECT 'granted'::text, r.token, r.attempt, r.max_attempts, r.generation,
            NULL::double precision, r.records_total, r.records_filtered, r.records_persisted,
            NULL::text, r.position, r.position_version;
        RETURN;
    END IF;

    IF r.status = 'completed' THEN
        RETURN QUERY SELECT 'done'::text, NULL::bigint, r.attempt, r.max_attempts, r.generation,
            NULL::double precision, r.records_total, r.records_filtered, r.records_persisted,
            NULL::text, NULL::jsonb, NULL::text;
        RETURN;
    ELSIF r.status = 'dead' THEN
        RETURN QUERY SELECT 'dead'::text, NULL::bigint, r.attempt, r.max_attempts, r.generation,
            NULL::double precision, 0, 0, 0, r.error_message, NULL::jsonb, NULL::text;
        RETURN;
    ELSIF r.status = 'processing' AND r.lease_expires_at > v_now THEN
        RETURN QUERY SELECT 'busy'::text, NULL::bigint, r.attempt, r.max_attempts, r.generation,
            extract(epoch FROM r.lease_expires_at - v_now)::double precision, 0, 0, 0,
            NULL::text, NULL::jsonb, NULL::text;
        RETURN;
    ELSIF r.status = 'failed' AND r.retry_at > v_now AND r.attempts_spent < v_cap THEN
        RETURN QUERY SELECT 'not_due'::text, NULL::bigint, r.attempt, r.max_attempts, r.generation,
            extract(epoch FROM r.retry_at - v_now)::double precision, 0, 0, 0, r.error_message,
            NULL::jsonb, NULL::text;
        RETURN;
    ELSIF r.status = 'processing' THEN
        -- The holder's lease ran out: its execution is lost, recorded here from the row, and
        -- spends an attempt unless it made progress; the row moves on before it is claimed.
        PERFORM pipeline_fence_v1(r.token);
        r.max_attempts := v_cap;  -- the cap this claim gives decides, as below
        r := pipeline_lose_v1(r, v_now,
            format('lease expired at %s; worker %s lost', r.lease_expires_at, r.processed_by),
            'worker lost on attempt %s of %s (held by %s); will retry',
            'worker lost: lease expired on attempt %s of %s (held by %s)', NULL);
    END IF;

    IF r.attempts_spent >= v_cap OR r.status = 'dead' THEN
        v_was := r.status;
        UPDATE file_checkpoints c
           SET status = 'dead', lease_expires_at = NULL, retry_at = NULL, max_attempts = v_cap,
               updated_at = v_now,
               error_message = coalesce(r.error_message,
                   format('no attempts left (%s of %s spent)', r.attempts_spent, v_cap))
         WHERE c.file_url = p_file_url
        RETURNING c.* INTO r;
        IF r.batch_id IS NOT NULL AND v_was IN ('pending', 'processing') THEN
            PERFORM pipeline_batch_count_left_v1(r.batch_id, 'dead', 0, 0, 0, r.started_at,
                                                 r.updated_at);
        END IF;
        RETURN QUERY SELECT 'dead'::text, NULL::bigint, r.attempt, r.max_attempts, r.generation,
            NULL::double precision, 0, 0, 0, r.error_message, NULL::jsonb, NULL::text;
        RETURN;
    END IF;

    -- The file's batch decides last: a file done, dead or held by a live claim answers as
    -- before whatever the batch's state. A plain read of the batch row (no lock: every claim
    -- of a batch reads it, and a shared lock would make it the hot row). A cancel that
    -- committed before this read refuses the claim; one that commits after it finds this claim
    -- started before it (started_at is taken above), so no claim starts after a cancel returns.
    IF r.batch_id IS NOT NULL THEN
        SELECT * INTO b FROM pipeline_batches pb WHERE pb.name = r.batch_id;
    END IF;
    IF b.state = 'cancelled' THEN
        -- A waiting file of a cancelled batch: it stays where it got to (its generation, its
        -- position) until `requeue` brings it back; no attempt is spent.
        v_was := r.status;
        UPDATE file_checkpoints c
           SET status = 'cancelled', lease_expires_at = NULL, retry_at = NULL, updated_at = v_now
         WHERE c.file_url = p_file_url
        RETURNING c.* INTO r;
        IF v_was IN ('pending', 'processing') THEN  -- r.batch_id is set: its batch refused
            PERFORM pipeline_batch_count_left_v1(r.batch_id, 'cancelled', 0, 0, 0, r.started_at,
                                                 NULL);
        END IF;
        RETURN QUERY SELECT 'cancelled'::text, NULL::bigint, r.attempt, r.max_attempts,
            r.generation, NULL::double precision, 0, 0, 0, NULL::text, NULL::jsonb, NULL::text;
        RETURN;
    ELSIF b.state = 'paused' THEN
        -- Held, not spent: the file keeps its row as it is; `resume` enqueues it again.
        RETURN QUERY SELECT 'paused'::text, NULL::bigint, r.attempt, r.max_attempts,
            r.generation, NULL::double precision, 0, 0, 0, NULL::text, NULL::jsonb, NULL::text;
        RETURN;
    ELSIF b.concurrency IS NOT NULL THEN
        -- The batch's limit on files running at once. Claims of a limited batch take turns on
        -- a lock of their own (not the batch row, which cancel updates before the files: taking
        -- both in the other order could deadlock); each counts after the previous one
        -- committed, so the limit holds exactly. Batches without a limit never take it.
        PERFORM pg_advisory_xact_lock(hashtextextended('pipeline_batch:' || r.batch_id, 0));
        SELECT count(*) INTO v_busy FROM file_checkpoints c
         WHERE c.batch_id = r.batch_id AND c.status = 'processing'
           AND c.lease_expires_at > clock_timestamp();
        IF v_busy >= b.concurrency THEN
            -- Not now, like a backoff: no attempt, the message comes back in `retry_in`.
            RETURN QUERY SELECT 'limited'::text, NULL::bigint, r.attempt, r.max_attempts,
                r.generation, 1.0::double precision, 0, 0, 0, NULL::text, NULL::jsonb,
                NULL::text;
            RETURN;
        END IF;
    END IF;

    UPDATE file_checkpoints c
       SET status = 'processing', attempt = r.attempt + 1, max_attempts = v_cap,
           token = coalesce(p_token, nextval('file_checkpoints_token_seq')),
           lease_seconds = p_lease_seconds,
           lease_expires_at = v_now + make_interval(secs => p_lease_seconds), retry_at = NULL,
           processed_by = p_worker, task_name = coalesce(p_task_name, r.task_name),
           task_id = p_task_id, file_type = coalesce(p_file_type, r.file_type),
           attempt_start_position = r.position, attempt_chunks = 0, error_message = v_error,
           started_at = v_now, updated_at = v_now
     WHERE c.file_url = p_file_url
    RETURNING c.* INTO r;
    RETURN QUERY SELECT 'granted'::text, r.token, r.attempt, r.max_attempts, r.generation,
        NULL::double precision, r.records_total, r.records_filtered, r.records_persisted,
        NULL::text, r.position, r.position_version;
END;
$$;

-- (5) One index for a batch's files by status and its completions of the last minute (`status
-- --batch`'s rate): (batch_id, status, completed_at) instead of (batch_id, status) and 0016's
-- (batch_id, completed_at) WHERE status = 'completed'. A file's change of status writes an
-- entry in the first anyway (status is in its key); the second cost every completion one more
-- entry, batch or not. Same name as the first, which earlier migrations' notes cite.
DROP INDEX file_checkpoints_batch_completed_idx;
DROP INDEX file_checkpoints_batch_status_idx;
CREATE INDEX file_checkpoints_batch_status_idx
    ON file_checkpoints (batch_id, status, completed_at);
