-- 0014: batches as rows of their own (issue 22).
-- A batch row says what was submitted (task, who, when, how many files), its state (open, done,
-- cancelled, paused), an optional limit on its files running at once, and the task to run once
-- every file is terminal. Its counts are never kept on it: they come from the files' own
-- (batch_id, status) index, so completions never queue on one hot row. The claim reads the
-- batch row (no lock) and refuses with its own outcome: cancelled, paused, limited.

ALTER TABLE file_checkpoints DROP CONSTRAINT file_checkpoints_status_check;
ALTER TABLE file_checkpoints ADD CONSTRAINT file_checkpoints_status_check
    CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'dead', 'cancelled'));
ALTER TABLE file_attempts DROP CONSTRAINT file_attempts_outcome_check;
ALTER TABLE file_attempts ADD CONSTRAINT file_attempts_outcome_check
    CHECK (outcome IN ('running', 'completed', 'failed', 'lost', 'cancelled'));

CREATE TABLE pipeline_batches (
    name          text PRIMARY KEY,
    task_name     text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    submitted_by  text,
    -- files registered into the batch (new or regenerated), added by each registration
    -- statement, never by a completion
    file_count    bigint NOT NULL DEFAULT 0,
    state         text NOT NULL DEFAULT 'open'
                  CHECK (state IN ('open', 'done', 'cancelled', 'paused')),
    -- at most this many of its files processing at once (NULL: no limit)
    concurrency   integer CHECK (concurrency > 0),
    -- the Celery task run once every file is terminal (NULL: none)
    on_complete   text,
    -- callbacks created so far (the next is `batch:NAME#<callbacks + 1>`), and the file count
    -- the last one covered: a batch that grows after its callback fires again, once
    callbacks     integer NOT NULL DEFAULT 0,
    settled_count bigint NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Each completion callback created: its row's URL (`batch:NAME#N`), and the batch's summary
-- as it was when it settled, which the callback task reads (pipeline.batch_summary).
CREATE TABLE pipeline_batch_callbacks (
    file_url   text PRIMARY KEY,
    batch      text NOT NULL REFERENCES pipeline_batches (name) ON DELETE CASCADE,
    callback   integer NOT NULL,
    summary    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The batches that existed before this migration, from their files.
INSERT INTO pipeline_batches (name, task_name, created_at, file_count, state)
SELECT batch_id, min(task_name), min(created_at), count(*),
       CASE WHEN bool_and(status IN ('completed', 'dead')) THEN 'done' ELSE 'open' END
  FROM file_checkpoints WHERE batch_id IS NOT NULL GROUP BY batch_id;

-- A batch's oldest waiting file in one index probe (`status --batch`). Completions do not
-- touch it: a row leaves the index when it is claimed.
CREATE INDEX file_checkpoints_batch_pending_idx ON file_checkpoints (batch_id, submitted_at)
 WHERE status = 'pending';

-- Claim: as v4, then the file's batch: cancelled, paused, or at its limit of files running.
CREATE FUNCTION pipeline_claim_v5(
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
    b       pipeline_batches%ROWTYPE;
    v_busy  bigint;
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
        UPDATE file_checkpoints c
           SET status = 'cancelled', lease_expires_at = NULL, retry_at = NULL, updated_at = v_now
         WHERE c.file_url = p_file_url
        RETURNING c.* INTO r;
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

-- A chunk: as v1; when the file's batch was cancelled, the chunk commits and the file stops
-- here, `cancelled` where it got to (its attempt ends `cancelled`, spending nothing): the
-- lease left is then 0, which tells the worker to stop. `requeue` resumes it from this chunk.
CREATE FUNCTION pipeline_commit_chunk_v2(
    p_file_url text, p_token bigint, p_position jsonb, p_version text, p_total integer,
    p_filtered integer, p_persisted integer, p_progress_bytes bigint, p_size_bytes bigint
) RETURNS TABLE (lease_left double precision)
LANGUAGE plpgsql AS $$
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
        RETURN QUERY SELECT 0.0::double precision;
        RETURN;
    END IF;
    RETURN QUERY SELECT extract(epoch FROM r.lease_expires_at - clock_timestamp())::double precision;
END;
$$;

-- Cancel a batch: no claim of its files starts once this commits; its waiting files become
-- `cancelled` now (running ones at their next chunk, or they finish). The batch row first,
-- then the files: a claim holds a file and only reads the batch, so the order cannot
-- deadlock. The files cancelled now; no row when there is no such batch.
CREATE FUNCTION pipeline_batch_cancel_v1(p_name text)
RETURNS TABLE (cancelled bigint)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pipeline_batches b SET state = 'cancelled', updated_at = clock_timestamp()
     WHERE b.name = p_name;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH moved AS (
        UPDATE file_checkpoints c
           SET status = 'cancelled', retry_at = NULL, updated_at = clock_timestamp()
         WHERE c.batch_id = p_name AND c.status IN ('pending', 'failed')
        RETURNING 1
    )
    SELECT count(*) FROM moved;
END;
$$;

-- Settle a batch whose files are all terminal (completed or dead): it is `done`, and when it
-- has an `on_complete` task, its callback is created as a row of its own, `batch:NAME#N`,
-- pending, its summary kept beside it (pipeline_batch_callbacks): from there it is claimed, leased, retried
-- and fenced like any file (its message sent by the caller, or re-sent by the sweep if lost).
-- Exactly once per growth of the batch: under the batch row's lock, only when files were
-- added since the last callback (`settled_count < file_count`). A batch row another session
-- holds (a submit adding files) is skipped: the next sweep settles it. The callback row, or
-- no row.
CREATE FUNCTION pipeline_batch_settle_v1(p_name text)
RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE plpgsql AS $$
DECLARE
    b       pipeline_batches%ROWTYPE;
    v_url   text;
    v_now   timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO b FROM pipeline_batches pb WHERE pb.name = p_name AND pb.state = 'open'
       FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Read after the lock: a file that ended since is seen; one still running keeps it open
    -- (its completion commits later, and a later sweep settles).
    IF EXISTS (SELECT 1 FROM file_checkpoints c
                WHERE c.batch_id = p_name
                  AND c.status IN ('pending', 'processing', 'failed', 'cancelled')) THEN
        RETURN;
    END IF;
    UPDATE pipeline_batches pb
       SET state = 'done', settled_count = b.file_count,
           callbacks = b.callbacks
               + CASE WHEN b.on_complete IS NOT NULL AND b.settled_count < b.file_count
                      THEN 1 ELSE 0 END,
           updated_at = v_now
     WHERE pb.name = p_name;
    IF b.on_complete IS NULL OR b.settled_count >= b.file_count THEN
        RETURN;  -- nothing new since the last callback (a requeue that ended as before)
    END IF;
    v_url := format('batch:%s#%s', p_name, b.callbacks + 1);
    INSERT INTO file_checkpoints AS c (file_url, file_type, status, max_attempts, task_name,
                                       updated_at)
    VALUES (v_url, 'batch-callback', 'pending', 3, b.on_complete, v_now)
    ON CONFLICT ON CONSTRAINT file_checkpoints_pkey DO NOTHING;
    INSERT INTO pipeline_batch_callbacks (file_url, batch, callback, summary)
    VALUES (v_url, p_name, b.callbacks + 1,
        jsonb_build_object(
            'batch', p_name, 'callback', b.callbacks + 1, 'files', b.file_count,
            'counts', (SELECT coalesce(jsonb_object_agg(s.status, s.n), '{}'::jsonb)
                         FROM (SELECT c2.status, count(*) AS n FROM file_checkpoints c2
                                WHERE c2.batch_id = p_name GROUP BY c2.status) s),
            'dead', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                               'file_url', d.file_url, 'error', d.error_message,
                               'attempts', d.attempt) ORDER BY d.updated_at), '[]'::jsonb)
                       FROM (SELECT c3.file_url, c3.error_message, c3.attempt, c3.updated_at
                               FROM file_checkpoints c3
                              WHERE c3.batch_id = p_name AND c3.status = 'dead'
                              ORDER BY c3.updated_at LIMIT 1000) d)))
    ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT v_url, b.on_complete, 'pending'::text;
END;
$$;

-- The sweep: as v5 (the gap rule of 0012 first), except that it hands out no file of a
-- paused or cancelled batch (an expired claim there still moves on, to `cancelled` in a
-- cancelled batch; `resume` and `requeue` enqueue them again); and it settles the open batches
-- whose files are all terminal (their callbacks come back with the rest, to be sent).
CREATE FUNCTION pipeline_reap_v6(
    p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision,
    p_gap_seconds double precision
) RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE plpgsql AS $$
DECLARE
    r         file_checkpoints%ROWTYPE;
    v_state   text;
    v_now     timestamptz;
    v_gap_end timestamptz;
BEGIN
    PERFORM pipeline_contact_v1(p_gap_seconds);
    v_now := clock_timestamp();
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
        v_state := (SELECT b.state FROM pipeline_batches b WHERE b.name = r.batch_id);
        IF v_state = 'cancelled' AND r.status = 'failed' THEN
            UPDATE file_checkpoints c SET status = 'cancelled', retry_at = NULL
             WHERE c.file_url = r.file_url
            RETURNING c.* INTO r;
        END IF;
        IF v_state IS NULL OR v_state NOT IN ('paused', 'cancelled') OR r.status = 'dead' THEN
            file_url := r.file_url;
            task_name := r.task_name;
            status := r.status;
            RETURN NEXT;
        END IF;
    END LOOP;

    RETURN QUERY
    WITH overdue AS (
        SELECT c.file_url
          FROM file_checkpoints c
         WHERE c.status = 'failed'
           AND c.retry_at < v_now - make_interval(secs => p_overdue_seconds)
           AND NOT EXISTS (SELECT 1 FROM pipeline_batches b
                            WHERE b.name = c.batch_id AND b.state IN ('paused', 'cancelled'))
         ORDER BY c.retry_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    )
    UPDATE file_checkpoints c SET retry_at = NULL, updated_at = v_now
      FROM overdue o
     WHERE c.file_url = o.file_url
    RETURNING c.file_url, c.task_name, c.status;

    -- Rows that waited through the last gap: handed back once, while the gap is recent.
    SELECT f.gap_ended_at INTO v_gap_end FROM pipeline_fleet_contact f
     WHERE f.id AND f.gap_ended_at > v_now - make_interval(secs => p_waiting_seconds);

    RETURN QUERY
    WITH waiting AS (
        SELECT c.file_url
          FROM file_checkpoints c
         WHERE p_waiting_seconds IS NOT NULL
           AND (c.status = 'pending' OR (c.status = 'failed' AND c.retry_at IS NULL))
           AND (c.updated_at < v_now - make_interval(secs => p_waiting_seconds)
                OR c.updated_at <= v_gap_end)
           AND NOT EXISTS (SELECT 1 FROM pipeline_batches b
                            WHERE b.name = c.batch_id AND b.state IN ('paused', 'cancelled'))
         ORDER BY c.updated_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    )
    UPDATE file_checkpoints c SET updated_at = v_now
      FROM waiting w
     WHERE c.file_url = w.file_url
    RETURNING c.file_url, c.task_name, c.status;

    RETURN QUERY
    SELECT st.* FROM pipeline_batches b
         CROSS JOIN LATERAL pipeline_batch_settle_v1(b.name) st
     WHERE b.state = 'open'
       AND NOT EXISTS (SELECT 1 FROM file_checkpoints c
                        WHERE c.batch_id = b.name
                          AND c.status IN ('pending', 'processing', 'failed', 'cancelled'));
END;
$$;

-- Older names, for workers not yet upgraded: the same signatures, the new behaviour. (A v4
-- caller may now be answered `cancelled`, `paused` or `limited`, which its code does not
-- know: it fails that delivery loudly rather than guess.)
CREATE OR REPLACE FUNCTION pipeline_claim_v4(
    p_file_url text, p_worker text, p_lease_seconds double precision, p_max_attempts integer,
    p_file_type text, p_task_name text, p_task_id text,
    p_resume_tokens bigint[] DEFAULT NULL, p_token bigint DEFAULT NULL
) RETURNS TABLE (
    outcome text, token bigint, attempt integer, max_attempts integer, generation integer,
    retry_in double precision, records_total integer, records_filtered integer,
    records_persisted integer, error_message text, "position" jsonb, position_version text
)
LANGUAGE sql AS $$
    SELECT * FROM pipeline_claim_v5(p_file_url, p_worker, p_lease_seconds, p_max_attempts,
        p_file_type, p_task_name, p_task_id, p_resume_tokens, p_token)
$$;

CREATE OR REPLACE FUNCTION pipeline_commit_chunk_v1(
    p_file_url text, p_token bigint, p_position jsonb, p_version text, p_total integer,
    p_filtered integer, p_persisted integer, p_progress_bytes bigint, p_size_bytes bigint
) RETURNS TABLE (lease_left double precision)
LANGUAGE sql AS $$
    SELECT * FROM pipeline_commit_chunk_v2(p_file_url, p_token, p_position, p_version, p_total,
        p_filtered, p_persisted, p_progress_bytes, p_size_bytes)
$$;

CREATE OR REPLACE FUNCTION pipeline_reap_v4(
    p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision
) RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE sql AS $$
    SELECT * FROM pipeline_reap_v6(p_waiting_seconds, p_limit, p_overdue_seconds, 10.0)
$$;

CREATE OR REPLACE FUNCTION pipeline_reap_v5(
    p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision,
    p_gap_seconds double precision
) RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE sql AS $$
    SELECT * FROM pipeline_reap_v6(p_waiting_seconds, p_limit, p_overdue_seconds, p_gap_seconds)
$$;

ALTER FUNCTION pipeline_claim_v5(text, text, double precision, integer, text, text, text,
                                 bigint[], bigint)
    SET plan_cache_mode = auto SET enable_seqscan = off;
ALTER FUNCTION pipeline_commit_chunk_v2(text, bigint, jsonb, text, integer, integer, integer,
                                        bigint, bigint)
    SET plan_cache_mode = auto SET enable_seqscan = off;
-- Every other plpgsql function of this migration plans each statement with its parameters, as
-- 0013 set for those before it (no session setting is relied on: a transaction pooler).
ALTER FUNCTION pipeline_reap_v6(double precision, integer, double precision, double precision)
    SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION pipeline_batch_cancel_v1(text) SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION pipeline_batch_settle_v1(text) SET plan_cache_mode = force_custom_plan;
