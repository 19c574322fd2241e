-- 0021: a claim refused because its batch is at its concurrency limit comes back later the
-- longer the batch's backlog (issue 22, item 4). It came back after a fixed second: a batch of
-- 20,000 files limited to 2 had its 20,000 messages refused every second, each a claim and a
-- broker round trip, which took the workers from every other batch. Now `retry_in` is drawn
-- within the batch's expected time to drain (see the limited branch), and the refused row
-- is marked with the time its message comes back, so that the sweep does not send copies of
-- files that wait long behind the limit.

-- The claim (0018's, whole), its limited branch changed.
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
    v_left   numeric;
    v_done   numeric;
    v_span   double precision;
    v_wait   double precision;
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
            -- Not now, like a backoff: no attempt, the message comes back in `retry_in`,
            -- drawn at random within the time the batch needs to work off what waits (0021):
            -- its files waiting (its counters) times its pace so far (the time from its first
            -- start to its last end per file it completed), between 1 s (a batch that has
            -- completed nothing yet) and 300 s. The refused messages of a big backlog come
            -- back spread over that time, about two per file completed, instead of every one
            -- of them every second.
            SELECT sum(k.queued) - v_busy, sum(k.completed),
                   extract(epoch FROM max(k.last_ended_at) - min(k.first_started_at))
              INTO v_left, v_done, v_span
              FROM pipeline_batch_counts k WHERE k.batch = r.batch_id;
            v_wait := CASE WHEN v_done > 0 AND v_span > 0 AND v_left > 0
                           THEN (v_left * v_span / v_done)::double precision END;
            v_wait := least(300.0, greatest(1.0, coalesce(v_wait, 1.0))) * (0.05 + 0.95 * random());
            -- The row says when its message comes back: the sweep takes a pending row left
            -- alone for its waiting time (120 s) for one whose message was lost, and would
            -- send a copy of every refused file of a long backlog.
            UPDATE file_checkpoints c SET updated_at = v_now + make_interval(secs => v_wait)
             WHERE c.file_url = p_file_url;
            RETURN QUERY SELECT 'limited'::text, NULL::bigint, r.attempt, r.max_attempts,
                r.generation, v_wait, 0, 0, 0, NULL::text, NULL::jsonb, NULL::text;
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
