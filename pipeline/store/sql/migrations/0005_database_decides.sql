-- 0005: Postgres decides, the broker only delivers.
-- * `retry_at`: when a failed row's next attempt may start (backoff on the database clock), and
--   by when a message for it is expected: a claim before then is refused 'not_due'; a row still
--   failed well after it (its message lost) is handed back by the sweep.
-- * Every transition stamps the time of the event (clock_timestamp()), not the start of the
--   transaction it runs in: a completion inside a long output transaction is dated when it
--   happens, so completed_at, attempt ends and the activity figures agree with the worker.
-- * The v1 functions keep their names and signatures (old workers keep working during a
--   rolling upgrade) and get the real timestamps too; the new behaviour has v2 names.
ALTER TABLE file_checkpoints ADD COLUMN retry_at timestamptz;
-- Kept on the failed attempt too: the history shows each attempt started no earlier.
ALTER TABLE file_attempts ADD COLUMN retry_at timestamptz;

-- Failed rows the sweep may have to hand back (their retry overdue).
CREATE INDEX file_checkpoints_retry_at_idx ON file_checkpoints (retry_at) WHERE status = 'failed';

-- Claim: as v1, plus 'not_due' (a failed row before its retry_at, with the seconds left), and
-- every time taken from clock_timestamp().
CREATE FUNCTION pipeline_claim_v2(
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
    error_message       text
)
LANGUAGE plpgsql AS $$
DECLARE
    r       file_checkpoints%ROWTYPE;
    v_cap   integer;
    v_old   bigint;
    v_now   timestamptz := clock_timestamp();
BEGIN
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
        INSERT INTO file_attempts (token, file_url, generation, attempt, worker, task_id, started_at)
        VALUES (r.token, r.file_url, r.generation, r.attempt, p_worker, p_task_id, v_now);
        RETURN QUERY SELECT 'granted'::text, r.token, r.attempt, r.max_attempts, r.generation,
            NULL::double precision, 0, 0, 0, NULL::text;
        RETURN;
    END IF;

    -- See pipeline_claim_v1: end a zombie's output session before waiting for its row lock.
    PERFORM pipeline_fence_v1(c.token) FROM file_checkpoints c
      WHERE c.file_url = p_file_url AND c.status = 'processing' AND c.lease_expires_at <= v_now;

    SELECT * INTO STRICT r FROM file_checkpoints c WHERE c.file_url = p_file_url FOR UPDATE;
    -- The lock may have been waited for: decide on the time it was granted.
    v_now := clock_timestamp();
    v_cap := coalesce(p_max_attempts, r.max_attempts);

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
            NULL::double precision, 0, 0, 0, NULL::text;
        RETURN;
    END IF;

    IF r.status = 'completed' THEN
        RETURN QUERY SELECT 'done'::text, NULL::bigint, r.attempt, r.max_attempts, r.generation,
            NULL::double precision, r.records_total, r.records_filtered, r.records_persisted,
            NULL::text;
        RETURN;
    ELSIF r.status = 'dead' THEN
        RETURN QUERY SELECT 'dead'::text, NULL::bigint, r.attempt, r.max_attempts, r.generation,
            NULL::double precision, 0, 0, 0, r.error_message;
        RETURN;
    ELSIF r.status = 'processing' AND r.lease_expires_at > v_now THEN
        RETURN QUERY SELECT 'busy'::text, NULL::bigint, r.attempt, r.max_attempts, r.generation,
            extract(epoch FROM r.lease_expires_at - v_now)::double precision, 0, 0, 0, NULL::text;
        RETURN;
    ELSIF r.status = 'failed' AND r.retry_at > v_now AND r.attempt < v_cap THEN
        -- Its backoff is not over: an early delivery (a copy, a restored message) is dropped;
        -- the retry message, or the sweep once the retry is overdue, brings the file back.
        RETURN QUERY SELECT 'not_due'::text, NULL::bigint, r.attempt, r.max_attempts, r.generation,
            extract(epoch FROM r.retry_at - v_now)::double precision, 0, 0, 0, r.error_message;
        RETURN;
    ELSIF r.status = 'processing' THEN
        PERFORM pipeline_fence_v1(r.token);
        UPDATE file_attempts a
           SET outcome = 'lost', ended_at = v_now, error_class = 'WorkerLost',
               error_message = format('lease expired at %s; worker %s lost', r.lease_expires_at, r.processed_by)
         WHERE a.token = r.token AND a.outcome = 'running';
    END IF;

    IF r.attempt >= v_cap THEN
        UPDATE file_checkpoints c
           SET status = 'dead', lease_expires_at = NULL, retry_at = NULL, max_attempts = v_cap,
               updated_at = v_now,
               error_message = CASE WHEN r.status = 'processing'
                   THEN format('worker lost: lease expired on attempt %s of %s (held by %s)', r.attempt, v_cap, r.processed_by)
                   ELSE coalesce(r.error_message, format('no attempts left (%s of %s used)', r.attempt, v_cap)) END
         WHERE c.file_url = p_file_url
        RETURNING c.* INTO r;
        RETURN QUERY SELECT 'dead'::text, NULL::bigint, r.attempt, r.max_attempts, r.generation,
            NULL::double precision, 0, 0, 0, r.error_message;
        RETURN;
    END IF;

    UPDATE file_checkpoints c
       SET status = 'processing', attempt = r.attempt + 1, max_attempts = v_cap,
           token = coalesce(p_token, nextval('file_checkpoints_token_seq')),
           lease_seconds = p_lease_seconds,
           lease_expires_at = v_now + make_interval(secs => p_lease_seconds), retry_at = NULL,
           processed_by = p_worker, task_name = coalesce(p_task_name, r.task_name),
           task_id = p_task_id, file_type = coalesce(p_file_type, r.file_type),
           started_at = v_now, updated_at = v_now
     WHERE c.file_url = p_file_url
    RETURNING c.* INTO r;
    INSERT INTO file_attempts (token, file_url, generation, attempt, worker, task_id, started_at)
    VALUES (r.token, r.file_url, r.generation, r.attempt, p_worker, p_task_id, v_now);
    RETURN QUERY SELECT 'granted'::text, r.token, r.attempt, r.max_attempts, r.generation,
        NULL::double precision, 0, 0, 0, NULL::text;
END;
$$;

-- Complete: as before, dated when the completion happens (it runs at the end of the task's
-- output transaction, which may have been open for minutes).
CREATE OR REPLACE FUNCTION pipeline_complete_v1(
    p_file_url text, p_token bigint, p_total integer, p_filtered integer, p_persisted integer,
    p_processing_time_ms integer, p_details jsonb
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
BEGIN
    UPDATE file_checkpoints c
       SET status = 'completed', records_total = p_total, records_filtered = p_filtered,
           records_persisted = p_persisted,
           processing_time_ms = coalesce(p_processing_time_ms,
               (extract(epoch FROM v_now - c.started_at) * 1000)::integer),
           details = coalesce(p_details, c.details), retry_at = NULL,
           error_message = NULL, lease_expires_at = NULL, completed_at = v_now, updated_at = v_now
     WHERE c.file_url = p_file_url AND c.token = p_token AND c.status = 'processing';
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE file_attempts a SET outcome = 'completed', ended_at = v_now WHERE a.token = p_token;
    RETURN true;
END;
$$;

-- Fail, with the backoff stored on the row: `retry_at` = now + p_retry_in. Returns the
-- seconds left until then, measured after the write, for the retry message's countdown.
CREATE FUNCTION pipeline_fail_v2(
    p_file_url text, p_token bigint, p_error_class text, p_error_message text,
    p_retryable boolean, p_retry_in double precision
) RETURNS TABLE (status text, attempt integer, max_attempts integer, retry_in double precision)
LANGUAGE plpgsql AS $$
DECLARE
    r     file_checkpoints%ROWTYPE;
    v_now timestamptz := clock_timestamp();
BEGIN
    UPDATE file_checkpoints c
       SET status = CASE WHEN p_retryable AND c.attempt < c.max_attempts THEN 'failed' ELSE 'dead' END,
           -- NULL p_retry_in: no backoff stored; the row waits for its message like a pending one
           retry_at = CASE WHEN p_retryable AND c.attempt < c.max_attempts AND p_retry_in IS NOT NULL
               THEN v_now + make_interval(secs => greatest(p_retry_in, 0)) END,
           error_message = p_error_message, lease_expires_at = NULL, updated_at = v_now
     WHERE c.file_url = p_file_url AND c.token = p_token AND c.status = 'processing'
    RETURNING c.* INTO r;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE file_attempts a
       SET outcome = 'failed', ended_at = v_now, error_class = p_error_class,
           error_message = p_error_message, retry_at = r.retry_at
     WHERE a.token = p_token;
    RETURN QUERY SELECT r.status, r.attempt, r.max_attempts,
        -- NULL when no retry time was stored (greatest() would make that 0)
        CASE WHEN r.retry_at IS NOT NULL
             THEN greatest(extract(epoch FROM r.retry_at - clock_timestamp()), 0)::double precision
        END;
END;
$$;

-- v1 fail for old workers: no backoff stored, real timestamps.
CREATE OR REPLACE FUNCTION pipeline_fail_v1(
    p_file_url text, p_token bigint, p_error_class text, p_error_message text, p_retryable boolean
) RETURNS TABLE (status text, attempt integer, max_attempts integer)
LANGUAGE sql AS $$
    SELECT f.status, f.attempt, f.max_attempts
      FROM pipeline_fail_v2(p_file_url, p_token, p_error_class, p_error_message, p_retryable, NULL) f
$$;

-- Abandon (a pool process seen dead by its worker): due at once, since Celery requeues the
-- message; if that message never comes, the sweep hands the file back once overdue.
CREATE OR REPLACE FUNCTION pipeline_abandon_v1(p_file_url text, p_worker text, p_task_id text)
RETURNS TABLE (status text, attempt integer, max_attempts integer)
LANGUAGE plpgsql AS $$
DECLARE
    r     file_checkpoints%ROWTYPE;
    v_now timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO r FROM file_checkpoints c
     WHERE c.file_url = p_file_url AND c.status = 'processing'
       AND c.processed_by = p_worker AND c.task_id IS NOT DISTINCT FROM p_task_id
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM pipeline_fence_v1(r.token);
    UPDATE file_attempts a
       SET outcome = 'lost', ended_at = v_now, error_class = 'WorkerLost',
           error_message = format('process %s died while running the file', p_worker)
     WHERE a.token = r.token AND a.outcome = 'running';
    UPDATE file_checkpoints c
       SET status = CASE WHEN c.attempt < c.max_attempts THEN 'failed' ELSE 'dead' END,
           retry_at = CASE WHEN c.attempt < c.max_attempts THEN v_now END,
           error_message = CASE WHEN c.attempt < c.max_attempts
               THEN format('worker process %s died on attempt %s of %s; will retry', p_worker, c.attempt, c.max_attempts)
               ELSE format('worker lost: process %s died on attempt %s of %s', p_worker, c.attempt, c.max_attempts) END,
           lease_expires_at = NULL, updated_at = v_now
     WHERE c.file_url = p_file_url
    RETURNING c.* INTO r;
    RETURN QUERY SELECT r.status, r.attempt, r.max_attempts;
END;
$$;

-- The sweep. One at a time (a transaction-level advisory lock: a second sweeper returns
-- nothing at once), so every worker can run it without duplicating its re-enqueues:
--  1. expired claims move on (their attempt recorded lost) and are handed back;
--  2. failed rows whose retry is overdue by p_overdue_seconds (their message lost) are handed
--     back once; retry_at is cleared, so from then on they wait like pending rows;
--  3. with p_waiting_seconds, pending rows (and failed ones with no retry time) that waited
--     longer than that are handed back (the caller passes NULL while the queue has messages).
CREATE FUNCTION pipeline_reap_v2(
    p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision
) RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
BEGIN
    IF NOT pg_try_advisory_xact_lock(1885958258) THEN  -- 'pipr'
        RETURN;
    END IF;
    PERFORM pipeline_fence_v1(c.token) FROM file_checkpoints c
      WHERE c.status = 'processing' AND c.lease_expires_at <= v_now;

    RETURN QUERY
    WITH expired AS (
        SELECT c.file_url, c.token, c.lease_expires_at, c.processed_by,
               pipeline_fence_v1(c.token) AS fenced
          FROM file_checkpoints c
         WHERE c.status = 'processing' AND c.lease_expires_at <= v_now
         ORDER BY c.lease_expires_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    ), lost AS (
        UPDATE file_attempts a
           SET outcome = 'lost', ended_at = v_now, error_class = 'WorkerLost',
               error_message = format('lease expired at %s; worker %s lost', e.lease_expires_at, e.processed_by)
          FROM expired e
         WHERE a.token = e.token AND a.outcome = 'running'
    )
    UPDATE file_checkpoints c
       SET status = CASE WHEN c.attempt < c.max_attempts THEN 'failed' ELSE 'dead' END,
           error_message = CASE WHEN c.attempt < c.max_attempts
               THEN format('worker lost on attempt %s of %s (held by %s); will retry', c.attempt, c.max_attempts, c.processed_by)
               ELSE format('worker lost: lease expired on attempt %s of %s (held by %s)', c.attempt, c.max_attempts, c.processed_by) END,
           lease_expires_at = NULL, retry_at = NULL, updated_at = v_now
      FROM expired e
     WHERE c.file_url = e.file_url
    RETURNING c.file_url, c.task_name, c.status;

    RETURN QUERY
    WITH overdue AS (
        SELECT c.file_url
          FROM file_checkpoints c
         WHERE c.status = 'failed'
           AND c.retry_at < v_now - make_interval(secs => p_overdue_seconds)
         ORDER BY c.retry_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    )
    UPDATE file_checkpoints c SET retry_at = NULL, updated_at = v_now
      FROM overdue o
     WHERE c.file_url = o.file_url
    RETURNING c.file_url, c.task_name, c.status;

    RETURN QUERY
    WITH waiting AS (
        SELECT c.file_url
          FROM file_checkpoints c
         WHERE p_waiting_seconds IS NOT NULL
           AND (c.status = 'pending' OR (c.status = 'failed' AND c.retry_at IS NULL))
           AND c.updated_at < v_now - make_interval(secs => p_waiting_seconds)
         ORDER BY c.updated_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    )
    UPDATE file_checkpoints c SET updated_at = v_now
      FROM waiting w
     WHERE c.file_url = w.file_url
    RETURNING c.file_url, c.task_name, c.status;
END;
$$;
