-- 0001: the checkpoint table, its attempt history, and the claim function.
-- Columns of the reference design keep their names and meanings; the rest is added.

CREATE SEQUENCE IF NOT EXISTS file_checkpoints_token_seq;

CREATE TABLE file_checkpoints (
    file_url            text PRIMARY KEY,
    file_type           text NOT NULL DEFAULT 'unknown',
    file_timestamp      timestamptz NOT NULL DEFAULT now(),
    status              text NOT NULL DEFAULT 'pending'
        CONSTRAINT file_checkpoints_status_check
        CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'dead')),
    records_total       integer NOT NULL DEFAULT 0,
    records_filtered    integer NOT NULL DEFAULT 0,
    records_persisted   integer NOT NULL DEFAULT 0,
    processing_time_ms  integer NOT NULL DEFAULT 0,
    error_message       text,
    -- attempts started in the current generation; retry_count keeps the reference's meaning
    -- (re-claims after the first) and is derived so the two can never disagree.
    attempt             integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    retry_count         integer GENERATED ALWAYS AS (greatest(attempt - 1, 0)) STORED,
    max_attempts        integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    processed_by        text,
    started_at          timestamptz,
    completed_at        timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    -- added by this project
    generation          integer NOT NULL DEFAULT 1,
    token               bigint,
    lease_seconds       double precision,
    lease_expires_at    timestamptz,
    task_name           text,
    task_id             text,
    batch_id            text,
    fingerprint         text,
    details             jsonb,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- a live claim always has a token and a lease
    CONSTRAINT file_checkpoints_processing_has_lease
        CHECK (status <> 'processing' OR (token IS NOT NULL AND lease_expires_at IS NOT NULL))
);

-- The reaper's scan: only live claims are indexed, ordered by when they expire.
CREATE INDEX file_checkpoints_lease_idx
    ON file_checkpoints (lease_expires_at) WHERE status = 'processing';
-- The reaper's second scan: rows waiting for a task, oldest first.
CREATE INDEX file_checkpoints_waiting_idx
    ON file_checkpoints (updated_at) WHERE status IN ('pending', 'failed');
-- Status counts per batch (and the reference's status index).
CREATE INDEX file_checkpoints_batch_status_idx ON file_checkpoints (batch_id, status);
CREATE INDEX file_checkpoints_status_idx ON file_checkpoints (status);

CREATE TABLE file_attempts (
    token           bigint PRIMARY KEY,
    file_url        text NOT NULL REFERENCES file_checkpoints (file_url) ON DELETE CASCADE,
    generation      integer NOT NULL,
    attempt         integer NOT NULL,
    worker          text,
    task_id         text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    ended_at        timestamptz,
    outcome         text NOT NULL DEFAULT 'running'
        CONSTRAINT file_attempts_outcome_check
        CHECK (outcome IN ('running', 'completed', 'failed', 'lost')),
    error_class     text,
    error_message   text
);
CREATE INDEX file_attempts_file_idx ON file_attempts (file_url, token);

-- End the database sessions of a claim being taken over. A task writes its output in a
-- transaction whose session is named after its claim's token; a zombie (frozen, or cut off)
-- would keep that transaction's row locks and stall the execution taking its file over. Its
-- writes could never commit (completion is fenced by token), so ending the session loses
-- nothing. Without the privilege to signal that backend, the new holder waits instead.
CREATE FUNCTION pipeline_fence_v1(p_token bigint) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_pid   integer;
    v_n     integer := 0;
BEGIN
    FOR v_pid IN
        SELECT a.pid FROM pg_stat_activity a
         WHERE a.application_name = 'pipeline-claim:' || p_token AND a.pid <> pg_backend_pid()
    LOOP
        BEGIN
            IF pg_terminate_backend(v_pid) THEN
                v_n := v_n + 1;
            END IF;
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;
        END;
    END LOOP;
    RETURN v_n;
END;
$$;

-- Claim a file for one execution. One call decides everything under the row's lock, on the
-- database's clock: grant (insert or take over), or refuse with done / busy / dead.
CREATE FUNCTION pipeline_claim_v1(
    p_file_url      text,
    p_worker        text,
    p_lease_seconds double precision,
    p_max_attempts  integer,
    p_file_type     text,
    p_task_name     text,
    p_task_id       text,
    -- Tokens this task chain held before it had to step back (database unreachable, or the
    -- reply to its claim lost): if the claim is still one of them, it is handed over under a
    -- new token, same attempt.
    p_resume_tokens bigint[] DEFAULT NULL,
    -- The token a granted claim gets, reserved from file_checkpoints_token_seq in advance by
    -- the caller, so the caller knows it even when this call's reply is lost. NULL: take one.
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
BEGIN
    -- First sight of the file: insert it already claimed.
    INSERT INTO file_checkpoints AS c (
        file_url, file_type, status, attempt, max_attempts, token, lease_seconds,
        lease_expires_at, processed_by, task_name, task_id, started_at, updated_at)
    VALUES (
        p_file_url, coalesce(p_file_type, 'unknown'), 'processing', 1, coalesce(p_max_attempts, 3),
        coalesce(p_token, nextval('file_checkpoints_token_seq')), p_lease_seconds,
        now() + make_interval(secs => p_lease_seconds), p_worker, p_task_name, p_task_id, now(), now())
    ON CONFLICT (file_url) DO NOTHING
    RETURNING c.* INTO r;
    IF FOUND THEN
        INSERT INTO file_attempts (token, file_url, generation, attempt, worker, task_id)
        VALUES (r.token, r.file_url, r.generation, r.attempt, p_worker, p_task_id);
        RETURN QUERY SELECT 'granted'::text, r.token, r.attempt, r.max_attempts, r.generation,
            NULL::double precision, 0, 0, 0, NULL::text;
        RETURN;
    END IF;

    -- A holder whose lease ran out may be a zombie frozen inside its output transaction,
    -- after its completion but before COMMIT: that transaction holds the row lock we are
    -- about to wait for. End its session first (read without a lock; its writes could only
    -- land if nobody took the file over, and we are about to).
    PERFORM pipeline_fence_v1(c.token) FROM file_checkpoints c
      WHERE c.file_url = p_file_url AND c.status = 'processing' AND c.lease_expires_at <= now();

    -- The row exists (rows are never deleted while workers run): decide under its lock, so
    -- two claimants are serialised here and the second sees the first one's result.
    SELECT * INTO STRICT r FROM file_checkpoints c WHERE c.file_url = p_file_url FOR UPDATE;
    v_cap := coalesce(p_max_attempts, r.max_attempts);

    IF r.status = 'processing' AND r.token = ANY(p_resume_tokens) THEN
        -- The execution that held this token has ended (it scheduled us); a duplicate of this
        -- message carrying the same token finds the token already swapped and is refused.
        v_old := r.token;
        UPDATE file_checkpoints c
           SET token = coalesce(p_token, nextval('file_checkpoints_token_seq')),
               lease_seconds = p_lease_seconds,
               lease_expires_at = now() + make_interval(secs => p_lease_seconds),
               processed_by = p_worker, task_id = p_task_id, updated_at = now()
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
    ELSIF r.status = 'processing' AND r.lease_expires_at > now() THEN
        RETURN QUERY SELECT 'busy'::text, NULL::bigint, r.attempt, r.max_attempts, r.generation,
            extract(epoch FROM r.lease_expires_at - now())::double precision, 0, 0, 0, NULL::text;
        RETURN;
    ELSIF r.status = 'processing' THEN
        -- The holder's lease ran out: its execution is lost and counts as an attempt, so a
        -- file that kills its worker every time cannot loop forever.
        PERFORM pipeline_fence_v1(r.token);
        UPDATE file_attempts a
           SET outcome = 'lost', ended_at = now(), error_class = 'WorkerLost',
               error_message = format('lease expired at %s; worker %s lost', r.lease_expires_at, r.processed_by)
         WHERE a.token = r.token AND a.outcome = 'running';
    END IF;

    IF r.attempt >= v_cap THEN
        -- No attempt left (a lost last attempt, or a cap lowered since): dead, not granted.
        UPDATE file_checkpoints c
           SET status = 'dead', lease_expires_at = NULL, max_attempts = v_cap, updated_at = now(),
               error_message = CASE WHEN r.status = 'processing'
                   THEN format('worker lost: lease expired on attempt %s of %s (held by %s)', r.attempt, v_cap, r.processed_by)
                   ELSE coalesce(r.error_message, format('no attempts left (%s of %s used)', r.attempt, v_cap)) END
         WHERE c.file_url = p_file_url
        RETURNING c.* INTO r;
        RETURN QUERY SELECT 'dead'::text, NULL::bigint, r.attempt, r.max_attempts, r.generation,
            NULL::double precision, 0, 0, 0, r.error_message;
        RETURN;
    END IF;

    -- pending, failed with attempts left, or a lost claim with attempts left: take it.
    UPDATE file_checkpoints c
       SET status = 'processing', attempt = r.attempt + 1, max_attempts = v_cap,
           token = coalesce(p_token, nextval('file_checkpoints_token_seq')),
           lease_seconds = p_lease_seconds,
           lease_expires_at = now() + make_interval(secs => p_lease_seconds),
           processed_by = p_worker, task_name = coalesce(p_task_name, r.task_name),
           task_id = p_task_id, file_type = coalesce(p_file_type, r.file_type),
           started_at = now(), updated_at = now()
     WHERE c.file_url = p_file_url
    RETURNING c.* INTO r;
    INSERT INTO file_attempts (token, file_url, generation, attempt, worker, task_id)
    VALUES (r.token, r.file_url, r.generation, r.attempt, p_worker, p_task_id);
    RETURN QUERY SELECT 'granted'::text, r.token, r.attempt, r.max_attempts, r.generation,
        NULL::double precision, 0, 0, 0, NULL::text;
END;
$$;

-- Complete a claim: fenced by the token, so a zombie's completion changes nothing. Called in
-- the caller's transaction when it writes output, so output and 'completed' commit together.
CREATE FUNCTION pipeline_complete_v1(
    p_file_url text, p_token bigint, p_total integer, p_filtered integer, p_persisted integer,
    p_processing_time_ms integer, p_details jsonb
) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE file_checkpoints c
       SET status = 'completed', records_total = p_total, records_filtered = p_filtered,
           records_persisted = p_persisted,
           processing_time_ms = coalesce(p_processing_time_ms,
               (extract(epoch FROM now() - c.started_at) * 1000)::integer),
           details = coalesce(p_details, c.details),
           error_message = NULL, lease_expires_at = NULL, completed_at = now(), updated_at = now()
     WHERE c.file_url = p_file_url AND c.token = p_token AND c.status = 'processing';
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE file_attempts a SET outcome = 'completed', ended_at = now() WHERE a.token = p_token;
    RETURN true;
END;
$$;

-- Fail a claim: 'failed' while attempts are left and the error is retryable, else 'dead'.
-- Returns no row when the token is stale.
CREATE FUNCTION pipeline_fail_v1(
    p_file_url text, p_token bigint, p_error_class text, p_error_message text, p_retryable boolean
) RETURNS TABLE (status text, attempt integer, max_attempts integer)
LANGUAGE plpgsql AS $$
DECLARE
    r file_checkpoints%ROWTYPE;
BEGIN
    UPDATE file_checkpoints c
       SET status = CASE WHEN p_retryable AND c.attempt < c.max_attempts THEN 'failed' ELSE 'dead' END,
           error_message = p_error_message, lease_expires_at = NULL, updated_at = now()
     WHERE c.file_url = p_file_url AND c.token = p_token AND c.status = 'processing'
    RETURNING c.* INTO r;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE file_attempts a
       SET outcome = 'failed', ended_at = now(), error_class = p_error_class,
           error_message = p_error_message
     WHERE a.token = p_token;
    RETURN QUERY SELECT r.status, r.attempt, r.max_attempts;
END;
$$;

-- The reaper: expired claims move on (their attempt recorded as lost), and rows waiting for a
-- task longer than p_waiting_seconds are handed back to be re-enqueued. SKIP LOCKED lets
-- several reapers run at once without waiting on each other or on claimants.
CREATE FUNCTION pipeline_reap_v1(p_waiting_seconds double precision, p_limit integer)
RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE plpgsql AS $$
BEGIN
    -- End zombie sessions first (see pipeline_claim_v1): a row locked by one would otherwise
    -- be skipped below until that zombie wakes up.
    PERFORM pipeline_fence_v1(c.token) FROM file_checkpoints c
      WHERE c.status = 'processing' AND c.lease_expires_at <= now();

    RETURN QUERY
    WITH expired AS (
        -- pipeline_fence_v1 runs once per row locked here (the CTE is evaluated once).
        SELECT c.file_url, c.token, c.lease_expires_at, c.processed_by,
               pipeline_fence_v1(c.token) AS fenced
          FROM file_checkpoints c
         WHERE c.status = 'processing' AND c.lease_expires_at <= now()
         ORDER BY c.lease_expires_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    ), lost AS (
        UPDATE file_attempts a
           SET outcome = 'lost', ended_at = now(), error_class = 'WorkerLost',
               error_message = format('lease expired at %s; worker %s lost', e.lease_expires_at, e.processed_by)
          FROM expired e
         WHERE a.token = e.token AND a.outcome = 'running'
    )
    UPDATE file_checkpoints c
       SET status = CASE WHEN c.attempt < c.max_attempts THEN 'failed' ELSE 'dead' END,
           error_message = CASE WHEN c.attempt < c.max_attempts
               THEN format('worker lost on attempt %s of %s (held by %s); will retry', c.attempt, c.max_attempts, c.processed_by)
               ELSE format('worker lost: lease expired on attempt %s of %s (held by %s)', c.attempt, c.max_attempts, c.processed_by) END,
           lease_expires_at = NULL, updated_at = now()
      FROM expired e
     WHERE c.file_url = e.file_url
    RETURNING c.file_url, c.task_name, c.status;

    RETURN QUERY
    WITH waiting AS (
        SELECT c.file_url
          FROM file_checkpoints c
         WHERE p_waiting_seconds IS NOT NULL  -- NULL: expired leases only
           AND c.status IN ('pending', 'failed')
           -- strictly before: rows moved by the first statement (updated_at = now()) are
           -- already handed back, even with p_waiting_seconds = 0
           AND c.updated_at < now() - make_interval(secs => p_waiting_seconds)
         ORDER BY c.updated_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    )
    -- Touch the row so the next sweep waits another p_waiting_seconds before re-enqueueing it.
    UPDATE file_checkpoints c SET updated_at = now()
      FROM waiting w
     WHERE c.file_url = w.file_url
    RETURNING c.file_url, c.task_name, c.status;
END;
$$;
