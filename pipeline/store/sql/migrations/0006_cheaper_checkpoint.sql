-- 0006: a cheaper checkpoint, with the same guarantees (issue 12, item 3).
-- Measured by bench/profile_checkpoint.py before this migration: a claim + complete pair wrote
-- two file_checkpoints versions (never HOT: status, lease_expires_at and updated_at are indexed,
-- in keys or partial-index predicates), one file_attempts row at the claim and a second version
-- of it at the end, and ten index entries.
-- * file_checkpoints_status_idx goes: every status has a partial index of its own (lease_idx
--   for processing, waiting_idx for pending and failed, completed_at_idx, dead_idx), and the
--   counts per batch use batch_status_idx; it only cost an entry at every transition.
-- * The attempt row is written once, when the attempt ends (completed, failed, or lost: found
--   lost by whoever takes the file over, the sweep, or the worker that saw its process die,
--   from the checkpoint row, which holds the running attempt's token, attempt, worker, task
--   and start until then). A running attempt is read from the checkpoint row: the view
--   `pipeline_attempts` is the history with it, and what the store reads.
-- * The claim locks an existing row first and inserts only a file seen for the first time
--   (rows registered by `pipeline submit` no longer pay a speculative INSERT ... ON CONFLICT).
-- A claim is still durable before the function runs (its own commit), and completion and output
-- still commit together. Older names keep working for workers not yet upgraded: each now calls
-- the new version (an attempt row an older claim wrote at its start is ended in place).

DROP INDEX IF EXISTS file_checkpoints_status_idx;

-- The attempt history, the running attempt included (read from its checkpoint row until the
-- attempt ends; an older worker's claim may have written its row already: that one is shown).
CREATE VIEW pipeline_attempts AS
SELECT a.token, a.file_url, a.generation, a.attempt, a.worker, a.task_id, a.started_at,
       a.ended_at, a.outcome, a.error_class, a.error_message, a.retry_at
  FROM file_attempts a
UNION ALL
SELECT c.token, c.file_url, c.generation, c.attempt, c.processed_by, c.task_id, c.started_at,
       NULL::timestamptz, 'running'::text, NULL::text, NULL::text, NULL::timestamptz
  FROM file_checkpoints c
 WHERE c.status = 'processing'
   AND NOT EXISTS (SELECT 1 FROM file_attempts a WHERE a.token = c.token);

-- Record the end of the attempt a checkpoint row holds (lost, from the cold paths): one row,
-- or the end of the row an older claim function wrote at the start.
CREATE FUNCTION pipeline_attempt_lost_v1(
    r file_checkpoints, p_ended_at timestamptz, p_error_message text
) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO file_attempts AS a (token, file_url, generation, attempt, worker, task_id,
                                    started_at, ended_at, outcome, error_class, error_message)
    VALUES (r.token, r.file_url, r.generation, r.attempt, r.processed_by, r.task_id,
            coalesce(r.started_at, p_ended_at), p_ended_at, 'lost', 'WorkerLost', p_error_message)
    ON CONFLICT (token) DO UPDATE
       SET outcome = 'lost', ended_at = excluded.ended_at, error_class = 'WorkerLost',
           error_message = excluded.error_message
     WHERE a.outcome = 'running'
$$;

-- Claim: as v2 (grant, or refuse with done / busy / not_due / dead, on the database clock),
-- without an attempt row at the start.
CREATE FUNCTION pipeline_claim_v3(
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
    -- See pipeline_claim_v1: end a zombie's output session before waiting for its row lock.
    PERFORM pipeline_fence_v1(c.token) FROM file_checkpoints c
      WHERE c.file_url = p_file_url AND c.status = 'processing' AND c.lease_expires_at <= v_now;

    -- The common case (registered by submit, or seen before): decide under the row's lock.
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
                NULL::double precision, 0, 0, 0, NULL::text;
            RETURN;
        END IF;
        -- Another claimant inserted it between our look and our insert (its transaction has
        -- committed, or the conflict would still be waiting): decide on its row, under its lock.
        SELECT * INTO STRICT r FROM file_checkpoints c WHERE c.file_url = p_file_url FOR UPDATE;
    END IF;
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
        -- Only a claim made by an older function has a row yet.
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
        RETURN QUERY SELECT 'not_due'::text, NULL::bigint, r.attempt, r.max_attempts, r.generation,
            extract(epoch FROM r.retry_at - v_now)::double precision, 0, 0, 0, r.error_message;
        RETURN;
    ELSIF r.status = 'processing' THEN
        -- The holder's lease ran out: its execution is lost and counts as an attempt; it is
        -- recorded here, from the row, before the row moves on.
        PERFORM pipeline_fence_v1(r.token);
        PERFORM pipeline_attempt_lost_v1(r, v_now,
            format('lease expired at %s; worker %s lost', r.lease_expires_at, r.processed_by));
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
    RETURN QUERY SELECT 'granted'::text, r.token, r.attempt, r.max_attempts, r.generation,
        NULL::double precision, 0, 0, 0, NULL::text;
END;
$$;

-- Complete: as v1, and the attempt's row written now, once, from the checkpoint row.
CREATE FUNCTION pipeline_complete_v2(
    p_file_url text, p_token bigint, p_total integer, p_filtered integer, p_persisted integer,
    p_processing_time_ms integer, p_details jsonb
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    r     record;
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
    RETURNING c.generation, c.attempt, c.processed_by, c.task_id, c.started_at INTO r;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO file_attempts AS a (token, file_url, generation, attempt, worker, task_id,
                                    started_at, ended_at, outcome)
    VALUES (p_token, p_file_url, r.generation, r.attempt, r.processed_by, r.task_id,
            coalesce(r.started_at, v_now), v_now, 'completed')
    -- a claim made by an older function wrote its row at the start
    ON CONFLICT (token) DO UPDATE SET outcome = 'completed', ended_at = v_now;
    RETURN true;
END;
$$;

-- Fail: as v2 (retry_at stored, the seconds left returned), the attempt's row written now.
CREATE FUNCTION pipeline_fail_v3(
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
           retry_at = CASE WHEN p_retryable AND c.attempt < c.max_attempts AND p_retry_in IS NOT NULL
               THEN v_now + make_interval(secs => greatest(p_retry_in, 0)) END,
           error_message = p_error_message, lease_expires_at = NULL, updated_at = v_now
     WHERE c.file_url = p_file_url AND c.token = p_token AND c.status = 'processing'
    RETURNING c.* INTO r;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO file_attempts AS a (token, file_url, generation, attempt, worker, task_id,
                                    started_at, ended_at, outcome, error_class, error_message,
                                    retry_at)
    VALUES (p_token, p_file_url, r.generation, r.attempt, r.processed_by, r.task_id,
            coalesce(r.started_at, v_now), v_now, 'failed', p_error_class, p_error_message,
            r.retry_at)
    ON CONFLICT (token) DO UPDATE
       SET outcome = 'failed', ended_at = v_now, error_class = p_error_class,
           error_message = p_error_message, retry_at = r.retry_at;
    RETURN QUERY SELECT r.status, r.attempt, r.max_attempts,
        CASE WHEN r.retry_at IS NOT NULL
             THEN greatest(extract(epoch FROM r.retry_at - clock_timestamp()), 0)::double precision
        END;
END;
$$;

-- Abandon: as v1, the lost attempt recorded from the row.
CREATE FUNCTION pipeline_abandon_v2(p_file_url text, p_worker text, p_task_id text)
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
    PERFORM pipeline_attempt_lost_v1(r, v_now,
        format('process %s died while running the file', p_worker));
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

-- The sweep: as v2, the lost attempts recorded from their rows.
CREATE FUNCTION pipeline_reap_v3(
    p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision
) RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
BEGIN
    IF NOT pg_try_advisory_xact_lock(1885958258) THEN  -- 'pipr', as pipeline_reap_v2
        RETURN;
    END IF;
    PERFORM pipeline_fence_v1(c.token) FROM file_checkpoints c
      WHERE c.status = 'processing' AND c.lease_expires_at <= v_now;

    RETURN QUERY
    WITH expired AS (
        SELECT c.file_url, c.token, c.generation, c.attempt, c.task_id, c.started_at,
               c.lease_expires_at, c.processed_by, pipeline_fence_v1(c.token) AS fenced
          FROM file_checkpoints c
         WHERE c.status = 'processing' AND c.lease_expires_at <= v_now
         ORDER BY c.lease_expires_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    ), lost AS (
        INSERT INTO file_attempts AS a (token, file_url, generation, attempt, worker, task_id,
                                        started_at, ended_at, outcome, error_class, error_message)
        SELECT e.token, e.file_url, e.generation, e.attempt, e.processed_by, e.task_id,
               coalesce(e.started_at, v_now), v_now, 'lost', 'WorkerLost',
               format('lease expired at %s; worker %s lost', e.lease_expires_at, e.processed_by)
          FROM expired e
        ON CONFLICT (token) DO UPDATE
           SET outcome = 'lost', ended_at = excluded.ended_at, error_class = 'WorkerLost',
               error_message = excluded.error_message
         WHERE a.outcome = 'running'
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

-- Older names, for workers not yet upgraded: the same signatures, the new behaviour, so an
-- old and a new worker can share a table (an old worker's claim needs no attempt row either:
-- the new functions write it when the attempt ends).
CREATE OR REPLACE FUNCTION pipeline_claim_v2(
    p_file_url text, p_worker text, p_lease_seconds double precision, p_max_attempts integer,
    p_file_type text, p_task_name text, p_task_id text,
    p_resume_tokens bigint[] DEFAULT NULL, p_token bigint DEFAULT NULL
) RETURNS TABLE (
    outcome text, token bigint, attempt integer, max_attempts integer, generation integer,
    retry_in double precision, records_total integer, records_filtered integer,
    records_persisted integer, error_message text
)
LANGUAGE sql AS $$
    SELECT * FROM pipeline_claim_v3(p_file_url, p_worker, p_lease_seconds, p_max_attempts,
        p_file_type, p_task_name, p_task_id, p_resume_tokens, p_token)
$$;

-- v1 knew no 'not_due': a claim before the retry is due is 'busy' to it (it comes back later).
CREATE OR REPLACE FUNCTION pipeline_claim_v1(
    p_file_url text, p_worker text, p_lease_seconds double precision, p_max_attempts integer,
    p_file_type text, p_task_name text, p_task_id text,
    p_resume_tokens bigint[] DEFAULT NULL, p_token bigint DEFAULT NULL
) RETURNS TABLE (
    outcome text, token bigint, attempt integer, max_attempts integer, generation integer,
    retry_in double precision, records_total integer, records_filtered integer,
    records_persisted integer, error_message text
)
LANGUAGE sql AS $$
    SELECT CASE WHEN c.outcome = 'not_due' THEN 'busy' ELSE c.outcome END, c.token, c.attempt,
           c.max_attempts, c.generation, c.retry_in, c.records_total, c.records_filtered,
           c.records_persisted, c.error_message
      FROM pipeline_claim_v3(p_file_url, p_worker, p_lease_seconds, p_max_attempts,
          p_file_type, p_task_name, p_task_id, p_resume_tokens, p_token) c
$$;

CREATE OR REPLACE FUNCTION pipeline_complete_v1(
    p_file_url text, p_token bigint, p_total integer, p_filtered integer, p_persisted integer,
    p_processing_time_ms integer, p_details jsonb
) RETURNS boolean
LANGUAGE sql AS $$
    SELECT pipeline_complete_v2(p_file_url, p_token, p_total, p_filtered, p_persisted,
        p_processing_time_ms, p_details)
$$;

CREATE OR REPLACE FUNCTION pipeline_fail_v2(
    p_file_url text, p_token bigint, p_error_class text, p_error_message text,
    p_retryable boolean, p_retry_in double precision
) RETURNS TABLE (status text, attempt integer, max_attempts integer, retry_in double precision)
LANGUAGE sql AS $$
    SELECT * FROM pipeline_fail_v3(p_file_url, p_token, p_error_class, p_error_message,
        p_retryable, p_retry_in)
$$;
-- (pipeline_fail_v1 calls pipeline_fail_v2.)

CREATE OR REPLACE FUNCTION pipeline_abandon_v1(p_file_url text, p_worker text, p_task_id text)
RETURNS TABLE (status text, attempt integer, max_attempts integer)
LANGUAGE sql AS $$
    SELECT * FROM pipeline_abandon_v2(p_file_url, p_worker, p_task_id)
$$;

CREATE OR REPLACE FUNCTION pipeline_reap_v2(
    p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision
) RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE sql AS $$
    SELECT * FROM pipeline_reap_v3(p_waiting_seconds, p_limit, p_overdue_seconds)
$$;

-- v1 had no overdue retries: 5 s, the sweep's default.
CREATE OR REPLACE FUNCTION pipeline_reap_v1(p_waiting_seconds double precision, p_limit integer)
RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE sql AS $$
    SELECT * FROM pipeline_reap_v3(p_waiting_seconds, p_limit, 5.0)
$$;
