-- 0023: a limited batch keeps only a window of its files in the broker (issue 22, item 4).
-- A batch of 20,000 files limited to 2 put 20,000 messages in the queue at submit, and every
-- one of them was delivered, refused `limited` and put back before a batch submitted after it
-- reached a worker (the queue is first in, first out): the small batch waited for the big
-- one's whole backlog to be refused once (107-180 s for 3 s of its own work). Now:
--
-- * Submit sends messages for twice the batch's limit (its files with a message out, counted
--   at each registration statement); the rest are registered `held`: pending, no message.
-- * A claim refused because the batch is at its limit holds its file and lets the message go
--   (0021 sent it back later; no attempt is spent, as before).
-- * Each ending of one of the batch's files (completed, failed, dead) releases its next held
--   file in its own transaction, for the worker to send once it committed (as 0020's
--   callback: at most one message per ending; a batch with a file held is not terminal).
-- * The sweep: a held file is never "lost" (its waiting rule skips them), and a limited batch
--   whose files are all held, none running or waiting for a message, gets its limit's worth
--   released. A released file whose message was never sent (a worker killed between commit
--   and send) is a pending row like any other: the waiting rule sends it again.
-- * Resume (pipeline_batch_resume_v1) sends a paused batch's files that had a message out and
--   releases twice its limit of held ones; cancel clears `held` (requeue sends every file it
--   brings back).
--
-- Endings and claims of a limited batch take turns on the lock the claims count under
-- (0014's `pipeline_batch:NAME`): a claim that holds its file commits before a later ending
-- looks for held files, and an ending that committed first freed its slot before the claim
-- counted. Without it, a claim could hold the last file while the last running one ended
-- without seeing it, and the batch would wait for the sweep.
--
-- Replaced in place (same signatures): the previous release's workers get the new behaviour.
-- One difference for them: a `limited` refusal carries no retry time, so their message comes
-- back after a second (as before 0021), and a release may then send a second copy of the
-- same file, which its claim refuses.

-- Held files are found through the batch's pending index (0014: batch_id, submitted_at, for
-- pending rows), oldest submitted first: a limited batch's pending files are its held ones
-- and the few of its window, so the first held one is a few entries in. No index of their
-- own: every INSERT and UPDATE of a file opens and checks each index of the table, and one
-- more cost every claim + complete pair ~25,000 backend instructions (+1.8 %, callgrind),
-- limited batch or not.
ALTER TABLE file_checkpoints ADD COLUMN held boolean NOT NULL DEFAULT false;

-- Whether a batch has a limit, on its counter rows beside 0020's `watched`, where a
-- completion reads it for nothing. Set on a new slot row from the batch row and on a batch's
-- rows when a limit is set (`concurrency` is never cleared by a submit, only changed).
ALTER TABLE pipeline_batch_counts ADD COLUMN limited boolean NOT NULL DEFAULT false;
UPDATE pipeline_batch_counts k SET limited = true
  FROM pipeline_batches b WHERE b.name = k.batch AND b.concurrency IS NOT NULL;

CREATE OR REPLACE FUNCTION pipeline_batch_counts_watched_v1() RETURNS trigger
LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
BEGIN
    SELECT b.on_complete IS NOT NULL, b.concurrency IS NOT NULL INTO NEW.watched, NEW.limited
      FROM pipeline_batches b WHERE b.name = NEW.batch;
    NEW.watched := coalesce(NEW.watched, false);
    NEW.limited := coalesce(NEW.limited, false);
    RETURN NEW;
END;
$$;

CREATE FUNCTION pipeline_batch_limit_v1() RETURNS trigger
LANGUAGE plpgsql SET plan_cache_mode = auto AS $$
BEGIN
    UPDATE pipeline_batch_counts k SET limited = true WHERE k.batch = NEW.name AND NOT k.limited;
    RETURN NULL;
END;
$$;
CREATE TRIGGER pipeline_batches_limit AFTER INSERT OR UPDATE OF concurrency ON pipeline_batches
    FOR EACH ROW WHEN (NEW.concurrency IS NOT NULL)
    EXECUTE FUNCTION pipeline_batch_limit_v1();

-- After a file of limited batch p_batch left `processing` in the caller's transaction: its
-- next held file, no longer held, as {file_url, task_name} to send once the transaction
-- committed; '{}' when none is held or the batch is not open (a paused batch's files are
-- sent by resume). Under the batch's claim lock (see the top), held to commit. A held row
-- another session has locked is skipped (a claim of it is deciding, or another ending is
-- releasing it). Sorts off: on a table not yet analysed the planner may choose to read the
-- batch's pending files in another order and sort them all for each release (30 ms at 20,000
-- held, against 0.4 ms in the pending index's order).
CREATE FUNCTION pipeline_batch_release_v1(p_batch text) RETURNS text[]
LANGUAGE plpgsql SET plan_cache_mode = auto SET enable_seqscan = off SET enable_sort = off AS $$
DECLARE
    v_url  text;
    v_task text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('pipeline_batch:' || p_batch, 0));
    IF NOT EXISTS (SELECT 1 FROM pipeline_batches b WHERE b.name = p_batch AND b.state = 'open')
    THEN
        RETURN '{}';
    END IF;
    UPDATE file_checkpoints c SET held = false, updated_at = clock_timestamp()
     WHERE c.file_url = (SELECT h.file_url FROM file_checkpoints h
                          WHERE h.batch_id = p_batch AND h.held AND h.status = 'pending'
                          ORDER BY h.submitted_at
                          LIMIT 1
                            FOR UPDATE SKIP LOCKED)
    RETURNING c.file_url, c.task_name INTO v_url, v_task;
    IF v_url IS NULL THEN
        RETURN '{}';
    END IF;
    RETURN ARRAY[v_url, v_task];
END;
$$;

-- Resume (0014's `batch_resume` query, a function since 0023): a paused batch open again; its
-- files whose messages were dropped while it was paused (pending or failed, not held), to send
-- again, and twice its limit of held files released as an ending releases one. No row: it was
-- not paused; the first row names the batch with no file (resumed, perhaps nothing to send).
CREATE FUNCTION pipeline_batch_resume_v1(p_name text)
RETURNS TABLE (batch_id text, file_url text, task_name text, status text)
LANGUAGE plpgsql AS $$
DECLARE
    v_limit integer;
    v_next  text[];
BEGIN
    UPDATE pipeline_batches b SET state = 'open', updated_at = clock_timestamp()
     WHERE b.name = p_name AND b.state = 'paused'
    RETURNING b.concurrency INTO v_limit;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    batch_id := p_name;
    RETURN NEXT;
    RETURN QUERY
    SELECT p_name, c.file_url, c.task_name, c.status FROM file_checkpoints c
     WHERE c.batch_id = p_name AND c.status IN ('pending', 'failed') AND NOT c.held;
    FOR i IN 1 .. 2 * coalesce(v_limit, 0) LOOP
        v_next := pipeline_batch_release_v1(p_name);
        EXIT WHEN v_next = '{}';
        file_url := v_next[1];
        task_name := v_next[2];
        status := 'pending';
        RETURN NEXT;
    END LOOP;
END;
$$;

-- Cancel (0016's), clearing `held`: requeue sends every file it brings back.
CREATE OR REPLACE FUNCTION pipeline_batch_cancel_v2(p_name text)
RETURNS TABLE (cancelled bigint)
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
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
       SET status = 'cancelled', retry_at = NULL, held = false, updated_at = clock_timestamp()
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

-- The claim (0021's, whole): its limited branch holds the file; a grant clears `held` (a
-- held file claimed by a copy of its message).
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
            -- Not now, and no message kept for it (0023): the file is held, and the next of
            -- its batch's files to end (pipeline_batch_release_v1) sends it again. No attempt
            -- spent. Counted under the lock an ending of the batch takes to release: an ending
            -- that commits after this claim finds this file held; one that committed before it
            -- freed its slot before the count above.
            UPDATE file_checkpoints c SET held = true, updated_at = v_now
             WHERE c.file_url = p_file_url;
            RETURN QUERY SELECT 'limited'::text, NULL::bigint, r.attempt, r.max_attempts,
                r.generation, NULL::double precision, 0, 0, 0, NULL::text, NULL::jsonb, NULL::text;
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
           held = false, started_at = v_now, updated_at = v_now
     WHERE c.file_url = p_file_url
    RETURNING c.* INTO r;
    RETURN QUERY SELECT 'granted'::text, r.token, r.attempt, r.max_attempts, r.generation,
        NULL::double precision, r.records_total, r.records_filtered, r.records_persisted,
        NULL::text, r.position, r.position_version;
END;
$$;

-- complete (0020's, whole): a file of a limited batch releases the next held one.
CREATE OR REPLACE FUNCTION pipeline_complete_v4(
    p_file_url text, p_token bigint, p_total integer, p_filtered integer, p_persisted integer,
    p_processing_time_ms integer, p_details jsonb
) RETURNS text[]
LANGUAGE plpgsql SET plan_cache_mode = auto SET enable_seqscan = off AS $$
DECLARE
    r         file_checkpoints%ROWTYPE;
    v_now     timestamptz := clock_timestamp();
    v_watched boolean;
    v_limited boolean;
    v_next    text[];
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
    RETURNING k.watched, k.limited INTO v_watched, v_limited;
    IF NOT FOUND THEN
        PERFORM pipeline_batch_count_left_v1(r.batch_id, 'completed', r.records_total,
            r.records_filtered, r.records_persisted, r.started_at, v_now);
        SELECT b.on_complete IS NOT NULL, b.concurrency IS NOT NULL INTO v_watched, v_limited
          FROM pipeline_batches b WHERE b.name = r.batch_id;
    END IF;
    IF v_limited THEN
        -- A slot of a limited batch freed: its next held file, to send (a batch with files
        -- held is not terminal: no callback to ask for then).
        v_next := pipeline_batch_release_v1(r.batch_id);
        IF v_next <> '{}' THEN
            RETURN v_next;
        END IF;
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

-- fail (0020's, whole): as complete, for a failed or dead ending.
CREATE OR REPLACE FUNCTION pipeline_fail_v5(
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
    v_watched boolean;
    v_limited boolean;
    v_next   text[];
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
        SELECT b.on_complete IS NOT NULL, b.concurrency IS NOT NULL INTO v_watched, v_limited
          FROM pipeline_batches b WHERE b.name = r.batch_id;
        IF v_limited THEN
            -- its slot freed (failed or dead): the batch's next held file, to send
            v_next := pipeline_batch_release_v1(r.batch_id);
            v_url := v_next[1];
            v_task := v_next[2];
        END IF;
        IF v_url IS NULL AND r.status = 'dead' AND v_watched THEN
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

-- The sweep (0014's, whole): held rows are not lost; a stalled limited batch released.
CREATE OR REPLACE FUNCTION pipeline_reap_v6(
    p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision,
    p_gap_seconds double precision
) RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
DECLARE
    r         file_checkpoints%ROWTYPE;
    v_state   text;
    v_now     timestamptz;
    v_gap_end timestamptz;
    v_stalled record;
    v_next    text[];
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
           AND ((c.status = 'pending' AND NOT c.held)
                OR (c.status = 'failed' AND c.retry_at IS NULL))
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

    -- A limited batch whose files are all held, with none running or waiting for a message
    -- of its own: nothing would end to release them (a release lost to a race, a resume
    -- that found its slots taken): its limit's worth released, as an ending releases one.
    FOR v_stalled IN
        SELECT b.name, b.concurrency FROM pipeline_batches b
         WHERE b.state = 'open' AND b.concurrency IS NOT NULL
           AND EXISTS (SELECT 1 FROM file_checkpoints h
                        WHERE h.batch_id = b.name AND h.held AND h.status = 'pending')
           -- running first: what a batch that is not stalled has, found in a few entries
           AND NOT EXISTS (SELECT 1 FROM file_checkpoints c
                            WHERE c.batch_id = b.name AND c.status = 'processing')
           AND NOT EXISTS (SELECT 1 FROM file_checkpoints c
                            WHERE c.batch_id = b.name AND c.status = 'failed')
           AND NOT EXISTS (SELECT 1 FROM file_checkpoints c
                            WHERE c.batch_id = b.name AND c.status = 'pending' AND NOT c.held)
    LOOP
        FOR i IN 1 .. v_stalled.concurrency LOOP
            v_next := pipeline_batch_release_v1(v_stalled.name);
            EXIT WHEN v_next = '{}';
            file_url := v_next[1];
            task_name := v_next[2];
            status := 'pending';
            RETURN NEXT;
        END LOOP;
    END LOOP;

    RETURN QUERY
    SELECT st.* FROM pipeline_batches b
         CROSS JOIN LATERAL pipeline_batch_settle_v1(b.name) st
     WHERE b.state = 'open'
       AND NOT EXISTS (SELECT 1 FROM file_checkpoints c
                        WHERE c.batch_id = b.name
                          AND c.status IN ('pending', 'processing', 'failed', 'cancelled'));
END;
$$;
