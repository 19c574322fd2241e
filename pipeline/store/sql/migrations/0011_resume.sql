-- 0011: resume inside a file (issue 20).
-- A task may commit its work in chunks: each chunk's output, the position reached (opaque JSON
-- the task chooses), the object version it was read from and the running stats commit in one
-- transaction, fenced by the claim's token like a completion, and extend the lease. The next
-- attempt of the same generation is handed the last committed position; a new generation
-- starts at the beginning.
-- Progress is not a failure: an attempt that committed at least one chunk which moved the
-- position on does not spend the attempt cap (`attempts_spent` counts those that did not; the
-- cap is checked against it). `attempt` still numbers every attempt, so a file on a preempted
-- fleet may reach attempt 7 of 3 while it keeps advancing; attempts stay bounded because a
-- file's positions are finite.

ALTER TABLE file_checkpoints
    -- the last position committed in this generation (NULL: from the beginning)
    ADD COLUMN position jsonb,
    -- the version of the object that position was read from (ETag, Last-Modified, size+mtime+inode)
    ADD COLUMN position_version text,
    -- for `status`: bytes of the raw stream done, and the object's size when known
    ADD COLUMN progress_bytes bigint,
    ADD COLUMN size_bytes bigint,
    -- when the last chunk committed
    ADD COLUMN progress_at timestamptz,
    -- the running attempt: where it started, how many chunks it committed that moved on
    ADD COLUMN attempt_start_position jsonb,
    ADD COLUMN attempt_chunks integer NOT NULL DEFAULT 0,
    -- attempts of this generation that ended without progress: the cap counts these
    ADD COLUMN attempts_spent integer NOT NULL DEFAULT 0;

-- Rows claimed before this migration: every attempt so far spent one (none could commit a
-- chunk), except a running one, which is decided when it ends.
UPDATE file_checkpoints
   SET attempts_spent = CASE WHEN status = 'processing' THEN greatest(attempt - 1, 0) ELSE attempt END
 WHERE attempt > 0;

ALTER TABLE file_attempts
    ADD COLUMN start_position jsonb,
    ADD COLUMN end_position jsonb,
    ADD COLUMN chunks integer NOT NULL DEFAULT 0;

-- The history, the running attempt included, now with where each attempt started and ended.
CREATE OR REPLACE VIEW pipeline_attempts AS
SELECT a.token, a.file_url, a.generation, a.attempt, a.worker, a.task_id, a.started_at,
       a.ended_at, a.outcome, a.error_class, a.error_message, a.retry_at,
       a.start_position, a.end_position, a.chunks
  FROM file_attempts a
UNION ALL
SELECT c.token, c.file_url, c.generation, c.attempt, c.processed_by, c.task_id, c.started_at,
       NULL::timestamptz, 'running'::text, NULL::text, NULL::text, NULL::timestamptz,
       c.attempt_start_position, c.position, c.attempt_chunks
  FROM file_checkpoints c
 WHERE c.status = 'processing'
   AND NOT EXISTS (SELECT 1 FROM file_attempts a WHERE a.token = c.token);

-- The end of an attempt, written once from the checkpoint row that holds it: its outcome, and
-- where it started and ended. (An older claim function may have written the row at the start.)
CREATE FUNCTION pipeline_attempt_end_v1(
    r file_checkpoints, p_ended_at timestamptz, p_outcome text, p_error_class text,
    p_error_message text, p_retry_at timestamptz
) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO file_attempts AS a (token, file_url, generation, attempt, worker, task_id,
                                    started_at, ended_at, outcome, error_class, error_message,
                                    retry_at, start_position, end_position, chunks)
    VALUES (r.token, r.file_url, r.generation, r.attempt, r.processed_by, r.task_id,
            coalesce(r.started_at, p_ended_at), p_ended_at, p_outcome, p_error_class,
            p_error_message, p_retry_at, r.attempt_start_position, r.position, r.attempt_chunks)
    ON CONFLICT (token) DO UPDATE
       SET outcome = excluded.outcome, ended_at = excluded.ended_at,
           error_class = excluded.error_class, error_message = excluded.error_message,
           retry_at = excluded.retry_at, start_position = excluded.start_position,
           end_position = excluded.end_position, chunks = excluded.chunks
     WHERE a.outcome = 'running'
$$;

-- A lost attempt (its lease ran out, or its process died): recorded from the row, then the row
-- moves on to failed (attempts left) or dead. Only an attempt without progress spends one.
-- `p_why` goes into the history; the row's error says `p_failed` or `p_dead` (format strings
-- taking the attempt, the cap and the holder).
CREATE FUNCTION pipeline_lose_v1(
    r file_checkpoints, p_now timestamptz, p_why text, p_failed text, p_dead text,
    p_retry_at timestamptz
) RETURNS file_checkpoints
LANGUAGE plpgsql AS $$
DECLARE
    v_spent integer := r.attempts_spent + CASE WHEN r.attempt_chunks > 0 THEN 0 ELSE 1 END;
    v_left  boolean := v_spent < r.max_attempts;
    v_kept  text := CASE WHEN r.attempt_chunks > 0
        THEN format(' (it committed %s chunks: no attempt spent)', r.attempt_chunks) ELSE '' END;
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
    RETURN r;
END;
$$;

-- Claim: as v3, with the cap on attempts spent, and the granted claim handed the position to
-- resume from (with its version and the stats committed with it).
CREATE FUNCTION pipeline_claim_v4(
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
LANGUAGE plpgsql AS $$
DECLARE
    r       file_checkpoints%ROWTYPE;
    v_cap   integer;
    v_old   bigint;
    v_error text;
    v_now   timestamptz := clock_timestamp();
BEGIN
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
        UPDATE file_checkpoints c
           SET status = 'dead', lease_expires_at = NULL, retry_at = NULL, max_attempts = v_cap,
               updated_at = v_now,
               error_message = coalesce(r.error_message,
                   format('no attempts left (%s of %s spent)', r.attempts_spent, v_cap))
         WHERE c.file_url = p_file_url
        RETURNING c.* INTO r;
        RETURN QUERY SELECT 'dead'::text, NULL::bigint, r.attempt, r.max_attempts, r.generation,
            NULL::double precision, 0, 0, 0, r.error_message, NULL::jsonb, NULL::text;
        RETURN;
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

-- A chunk: its output is in the caller's transaction; this records where it got to, with the
-- running stats, fenced by the token, and extends the lease. A chunk counts as progress only
-- when it moves the position on. The seconds left on the lease, or no row when the token is
-- stale (the caller then rolls its output back).
CREATE FUNCTION pipeline_commit_chunk_v1(
    p_file_url text, p_token bigint, p_position jsonb, p_version text, p_total integer,
    p_filtered integer, p_persisted integer, p_progress_bytes bigint, p_size_bytes bigint
) RETURNS TABLE (lease_left double precision)
LANGUAGE sql AS $$
    UPDATE file_checkpoints c
       SET attempt_chunks = c.attempt_chunks
               + CASE WHEN c.position IS DISTINCT FROM p_position THEN 1 ELSE 0 END,
           position = p_position, position_version = p_version,
           records_total = p_total, records_filtered = p_filtered, records_persisted = p_persisted,
           progress_bytes = p_progress_bytes, size_bytes = coalesce(p_size_bytes, c.size_bytes),
           progress_at = clock_timestamp(),
           lease_expires_at = clock_timestamp() + make_interval(secs => c.lease_seconds),
           updated_at = clock_timestamp()
     WHERE c.file_url = p_file_url AND c.token = p_token AND c.status = 'processing'
    RETURNING extract(epoch FROM c.lease_expires_at - clock_timestamp())::double precision
$$;

-- The object changed under a file being resumed: a new generation starts at the beginning,
-- under the same claim (attempts counted afresh, the history kept). The new generation number,
-- or no row when the token is stale.
CREATE FUNCTION pipeline_restart_v1(
    p_file_url text, p_token bigint, p_version text, p_fingerprint text
) RETURNS TABLE (generation integer)
LANGUAGE sql AS $$
    UPDATE file_checkpoints c
       SET generation = c.generation + 1, attempt = 1, attempts_spent = 0,
           position = NULL, position_version = p_version, attempt_start_position = NULL,
           attempt_chunks = 0, progress_bytes = NULL, size_bytes = NULL, progress_at = NULL,
           records_total = 0, records_filtered = 0, records_persisted = 0,
           fingerprint = coalesce(p_fingerprint, c.fingerprint), updated_at = clock_timestamp()
     WHERE c.file_url = p_file_url AND c.token = p_token AND c.status = 'processing'
    RETURNING c.generation
$$;

-- Complete: as v2, the attempt's row with where it started and ended.
CREATE FUNCTION pipeline_complete_v3(
    p_file_url text, p_token bigint, p_total integer, p_filtered integer, p_persisted integer,
    p_processing_time_ms integer, p_details jsonb
) RETURNS boolean
LANGUAGE plpgsql AS $$
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
    PERFORM pipeline_attempt_end_v1(r, v_now, 'completed', NULL, NULL, NULL);
    RETURN true;
END;
$$;

-- Fail: as v3, with the cap on attempts spent (an attempt that made progress spends none; a
-- permanent error is dead whatever the progress).
CREATE FUNCTION pipeline_fail_v4(
    p_file_url text, p_token bigint, p_error_class text, p_error_message text,
    p_retryable boolean, p_retry_in double precision
) RETURNS TABLE (status text, attempt integer, max_attempts integer, retry_in double precision)
LANGUAGE plpgsql AS $$
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
    RETURN QUERY SELECT r.status, r.attempt, r.max_attempts,
        CASE WHEN r.retry_at IS NOT NULL
             THEN greatest(extract(epoch FROM r.retry_at - clock_timestamp()), 0)::double precision
        END;
END;
$$;

-- Abandon: as v2, through pipeline_lose_v1 (an attempt that made progress spends none).
CREATE FUNCTION pipeline_abandon_v3(p_file_url text, p_worker text, p_task_id text)
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
    r := pipeline_lose_v1(r, v_now, format('process %s died while running the file', p_worker),
        'worker process %3$s died on attempt %1$s of %2$s; will retry',
        'worker lost: process %3$s died on attempt %1$s of %2$s', v_now);
    RETURN QUERY SELECT r.status, r.attempt, r.max_attempts;
END;
$$;

-- The sweep: as v3, the expired claims through pipeline_lose_v1, one by one.
CREATE FUNCTION pipeline_reap_v4(
    p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision
) RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE plpgsql AS $$
DECLARE
    r     file_checkpoints%ROWTYPE;
    v_now timestamptz := clock_timestamp();
BEGIN
    IF NOT pg_try_advisory_xact_lock(1885958258) THEN  -- 'pipr', as pipeline_reap_v2
        RETURN;
    END IF;
    PERFORM pipeline_fence_v1(c.token) FROM file_checkpoints c
      WHERE c.status = 'processing' AND c.lease_expires_at <= v_now;

    FOR r IN
        SELECT * FROM file_checkpoints c
         WHERE c.status = 'processing' AND c.lease_expires_at <= v_now
         ORDER BY c.lease_expires_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM pipeline_fence_v1(r.token);
        r := pipeline_lose_v1(r, v_now,
            format('lease expired at %s; worker %s lost', r.lease_expires_at, r.processed_by),
            'worker lost on attempt %s of %s (held by %s); will retry',
            'worker lost: lease expired on attempt %s of %s (held by %s)', NULL);
        file_url := r.file_url;
        task_name := r.task_name;
        status := r.status;
        RETURN NEXT;
    END LOOP;

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

-- Older names, for workers not yet upgraded: the same signatures, the new behaviour.
CREATE OR REPLACE FUNCTION pipeline_claim_v3(
    p_file_url text, p_worker text, p_lease_seconds double precision, p_max_attempts integer,
    p_file_type text, p_task_name text, p_task_id text,
    p_resume_tokens bigint[] DEFAULT NULL, p_token bigint DEFAULT NULL
) RETURNS TABLE (
    outcome text, token bigint, attempt integer, max_attempts integer, generation integer,
    retry_in double precision, records_total integer, records_filtered integer,
    records_persisted integer, error_message text
)
LANGUAGE sql AS $$
    SELECT c.outcome, c.token, c.attempt, c.max_attempts, c.generation, c.retry_in,
           c.records_total, c.records_filtered, c.records_persisted, c.error_message
      FROM pipeline_claim_v4(p_file_url, p_worker, p_lease_seconds, p_max_attempts,
          p_file_type, p_task_name, p_task_id, p_resume_tokens, p_token) c
$$;

CREATE OR REPLACE FUNCTION pipeline_complete_v2(
    p_file_url text, p_token bigint, p_total integer, p_filtered integer, p_persisted integer,
    p_processing_time_ms integer, p_details jsonb
) RETURNS boolean
LANGUAGE sql AS $$
    SELECT pipeline_complete_v3(p_file_url, p_token, p_total, p_filtered, p_persisted,
        p_processing_time_ms, p_details)
$$;

CREATE OR REPLACE FUNCTION pipeline_fail_v3(
    p_file_url text, p_token bigint, p_error_class text, p_error_message text,
    p_retryable boolean, p_retry_in double precision
) RETURNS TABLE (status text, attempt integer, max_attempts integer, retry_in double precision)
LANGUAGE sql AS $$
    SELECT * FROM pipeline_fail_v4(p_file_url, p_token, p_error_class, p_error_message,
        p_retryable, p_retry_in)
$$;

CREATE OR REPLACE FUNCTION pipeline_abandon_v2(p_file_url text, p_worker text, p_task_id text)
RETURNS TABLE (status text, attempt integer, max_attempts integer)
LANGUAGE sql AS $$
    SELECT * FROM pipeline_abandon_v3(p_file_url, p_worker, p_task_id)
$$;

CREATE OR REPLACE FUNCTION pipeline_reap_v3(
    p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision
) RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE sql AS $$
    SELECT * FROM pipeline_reap_v4(p_waiting_seconds, p_limit, p_overdue_seconds)
$$;

-- The hot functions keep their cached plans, every statement in them a primary-key lookup
-- (as migration 0007 set for the versions before).
ALTER FUNCTION pipeline_claim_v4(text, text, double precision, integer, text, text, text,
                                 bigint[], bigint)
    SET plan_cache_mode = auto SET enable_seqscan = off;
ALTER FUNCTION pipeline_complete_v3(text, bigint, integer, integer, integer, integer, jsonb)
    SET plan_cache_mode = auto SET enable_seqscan = off;
ALTER FUNCTION pipeline_fail_v4(text, bigint, text, text, boolean, double precision)
    SET plan_cache_mode = auto SET enable_seqscan = off;
ALTER FUNCTION pipeline_abandon_v3(text, text, text)
    SET plan_cache_mode = auto SET enable_seqscan = off;
