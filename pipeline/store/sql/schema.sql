-- The live schema: what the migrations under migrations/ leave in a database, in one file
-- to read. Written by `make schema` (scripts/dump_schema.py) with pg_dump; do not edit it by
-- hand: add a migration, then run `make schema`. tests/integration/test_schema_sql.py checks
-- that this file and the migration chain build the same tables, indexes, constraints,
-- views and functions. `pipeline db upgrade` applies the migrations, not this file.

-- Functions may call functions defined further down.
SET check_function_bodies = false;
CREATE FUNCTION public.pipeline_abandon_v1(p_file_url text, p_worker text, p_task_id text) RETURNS TABLE(status text, attempt integer, max_attempts integer)
    LANGUAGE sql
    AS $$
    SELECT * FROM pipeline_abandon_v2(p_file_url, p_worker, p_task_id)
$$;

CREATE FUNCTION public.pipeline_abandon_v2(p_file_url text, p_worker text, p_task_id text) RETURNS TABLE(status text, attempt integer, max_attempts integer)
    LANGUAGE sql
    AS $$
    SELECT * FROM pipeline_abandon_v3(p_file_url, p_worker, p_task_id)
$$;

CREATE FUNCTION public.pipeline_abandon_v3(p_file_url text, p_worker text, p_task_id text) RETURNS TABLE(status text, attempt integer, max_attempts integer)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    SET enable_seqscan TO 'off'
    AS $_$
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
$_$;

CREATE FUNCTION public.pipeline_status_valid_v1(p_status text) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE STRICT
    AS $$
BEGIN
    RETURN p_status IN ('pending', 'processing', 'completed', 'failed', 'dead', 'cancelled');
END;
$$;

CREATE TABLE public.file_checkpoints (
    file_url text NOT NULL,
    file_type text DEFAULT 'unknown'::text NOT NULL,
    file_timestamp timestamp with time zone DEFAULT now() NOT NULL,
    status text DEFAULT 'pending'::text NOT NULL,
    records_total integer DEFAULT 0 NOT NULL,
    records_filtered integer DEFAULT 0 NOT NULL,
    records_persisted integer DEFAULT 0 NOT NULL,
    processing_time_ms integer DEFAULT 0 NOT NULL,
    error_message text,
    attempt integer DEFAULT 0 NOT NULL,
    retry_count integer GENERATED ALWAYS AS (GREATEST((attempt - 1), 0)) STORED,
    max_attempts integer DEFAULT 3 NOT NULL,
    processed_by text,
    started_at timestamp with time zone,
    completed_at timestamp with time zone,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    generation integer DEFAULT 1 NOT NULL,
    token bigint,
    lease_seconds double precision,
    lease_expires_at timestamp with time zone,
    task_name text,
    task_id text,
    batch_id text,
    fingerprint text,
    details jsonb,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    retry_at timestamp with time zone,
    submitted_at timestamp with time zone DEFAULT now(),
    "position" jsonb,
    position_version text,
    progress_bytes bigint,
    size_bytes bigint,
    progress_at timestamp with time zone,
    attempt_start_position jsonb,
    attempt_chunks integer DEFAULT 0 NOT NULL,
    attempts_spent integer DEFAULT 0 NOT NULL,
    held boolean DEFAULT false NOT NULL,
    CONSTRAINT file_checkpoints_attempt_check CHECK ((attempt >= 0)),
    CONSTRAINT file_checkpoints_max_attempts_check CHECK ((max_attempts >= 1)),
    CONSTRAINT file_checkpoints_processing_has_lease CHECK (((status <> 'processing'::text) OR ((token IS NOT NULL) AND (lease_expires_at IS NOT NULL)))),
    CONSTRAINT file_checkpoints_status_check CHECK (public.pipeline_status_valid_v1(status))
);

CREATE FUNCTION public.pipeline_attempt_end_v1(r public.file_checkpoints, p_ended_at timestamp with time zone, p_outcome text, p_error_class text, p_error_message text, p_retry_at timestamp with time zone) RETURNS void
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    AS $$
BEGIN
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
     WHERE a.outcome = 'running';
END;
$$;

CREATE FUNCTION public.pipeline_attempt_lost_v1(r public.file_checkpoints, p_ended_at timestamp with time zone, p_error_message text) RETURNS void
    LANGUAGE sql
    AS $$
    INSERT INTO file_attempts AS a (token, file_url, generation, attempt, worker, task_id,
                                    started_at, ended_at, outcome, error_class, error_message)
    VALUES (r.token, r.file_url, r.generation, r.attempt, r.processed_by, r.task_id,
            coalesce(r.started_at, p_ended_at), p_ended_at, 'lost', 'WorkerLost', p_error_message)
    ON CONFLICT (token) DO UPDATE
       SET outcome = 'lost', ended_at = excluded.ended_at, error_class = 'WorkerLost',
           error_message = excluded.error_message
     WHERE a.outcome = 'running'
$$;

CREATE FUNCTION public.pipeline_batch_cancel_v1(p_name text) RETURNS TABLE(cancelled bigint)
    LANGUAGE sql
    AS $$
    SELECT * FROM pipeline_batch_cancel_v2(p_name)
$$;

CREATE FUNCTION public.pipeline_batch_cancel_v2(p_name text) RETURNS TABLE(cancelled bigint)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_custom_plan'
    AS $$
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

CREATE FUNCTION public.pipeline_batch_count_deleted_v1() RETURNS trigger
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    AS $$
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

CREATE FUNCTION public.pipeline_batch_count_due_v1(p_old_status text, p_new_status text, p_old_batch text, p_new_batch text) RETURNS boolean
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
    RETURN (p_old_batch IS NOT NULL OR p_new_batch IS NOT NULL)
       AND (p_old_batch IS DISTINCT FROM p_new_batch
            OR (p_old_status IS DISTINCT FROM p_new_status
                AND NOT (p_old_status IN ('pending', 'processing')
                         AND p_new_status IN ('pending', 'processing'))))
       AND current_setting('pipeline.batch_counts', true) IS DISTINCT FROM 'off';
END;
$$;

CREATE FUNCTION public.pipeline_batch_count_inserted_v1() RETURNS trigger
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    AS $$
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

CREATE FUNCTION public.pipeline_batch_count_left_v1(p_batch text, p_status text, p_total integer, p_filtered integer, p_persisted integer, p_started_at timestamp with time zone, p_ended_at timestamp with time zone) RETURNS void
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    AS $$
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

CREATE FUNCTION public.pipeline_batch_count_truncated_v1() RETURNS trigger
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_custom_plan'
    AS $$
BEGIN
    TRUNCATE pipeline_batch_counts;
    RETURN NULL;
END;
$$;

CREATE FUNCTION public.pipeline_batch_count_v2() RETURNS trigger
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    AS $$
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

CREATE FUNCTION public.pipeline_batch_counts_watched_v1() RETURNS trigger
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    AS $$
BEGIN
    SELECT b.on_complete IS NOT NULL, b.concurrency IS NOT NULL INTO NEW.watched, NEW.limited
      FROM pipeline_batches b WHERE b.name = NEW.batch;
    NEW.watched := coalesce(NEW.watched, false);
    NEW.limited := coalesce(NEW.limited, false);
    RETURN NEW;
END;
$$;

CREATE FUNCTION public.pipeline_batch_ended_v1(p_batch text) RETURNS TABLE(file_url text, task_name text)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    SET enable_seqscan TO 'off'
    AS $$
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

CREATE FUNCTION public.pipeline_batch_limit_v1() RETURNS trigger
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    AS $$
BEGIN
    UPDATE pipeline_batch_counts k SET limited = true WHERE k.batch = NEW.name AND NOT k.limited;
    RETURN NULL;
END;
$$;

CREATE FUNCTION public.pipeline_batch_release_v1(p_batch text) RETURNS text[]
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    SET enable_seqscan TO 'off'
    SET enable_sort TO 'off'
    AS $$
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

CREATE FUNCTION public.pipeline_batch_resume_v1(p_name text) RETURNS TABLE(batch_id text, file_url text, task_name text, status text)
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION public.pipeline_batch_settle_v1(p_name text) RETURNS TABLE(file_url text, task_name text, status text)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_custom_plan'
    AS $$
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

CREATE FUNCTION public.pipeline_batch_watch_v1() RETURNS trigger
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    AS $$
BEGIN
    UPDATE pipeline_batch_counts k SET watched = true WHERE k.batch = NEW.name AND NOT k.watched;
    RETURN NULL;
END;
$$;

CREATE FUNCTION public.pipeline_claim_v1(p_file_url text, p_worker text, p_lease_seconds double precision, p_max_attempts integer, p_file_type text, p_task_name text, p_task_id text, p_resume_tokens bigint[] DEFAULT NULL::bigint[], p_token bigint DEFAULT NULL::bigint) RETURNS TABLE(outcome text, token bigint, attempt integer, max_attempts integer, generation integer, retry_in double precision, records_total integer, records_filtered integer, records_persisted integer, error_message text)
    LANGUAGE sql
    AS $$
    SELECT CASE WHEN c.outcome = 'not_due' THEN 'busy' ELSE c.outcome END, c.token, c.attempt,
           c.max_attempts, c.generation, c.retry_in, c.records_total, c.records_filtered,
           c.records_persisted, c.error_message
      FROM pipeline_claim_v3(p_file_url, p_worker, p_lease_seconds, p_max_attempts,
          p_file_type, p_task_name, p_task_id, p_resume_tokens, p_token) c
$$;

CREATE FUNCTION public.pipeline_claim_v2(p_file_url text, p_worker text, p_lease_seconds double precision, p_max_attempts integer, p_file_type text, p_task_name text, p_task_id text, p_resume_tokens bigint[] DEFAULT NULL::bigint[], p_token bigint DEFAULT NULL::bigint) RETURNS TABLE(outcome text, token bigint, attempt integer, max_attempts integer, generation integer, retry_in double precision, records_total integer, records_filtered integer, records_persisted integer, error_message text)
    LANGUAGE sql
    AS $$
    SELECT * FROM pipeline_claim_v3(p_file_url, p_worker, p_lease_seconds, p_max_attempts,
        p_file_type, p_task_name, p_task_id, p_resume_tokens, p_token)
$$;

CREATE FUNCTION public.pipeline_claim_v3(p_file_url text, p_worker text, p_lease_seconds double precision, p_max_attempts integer, p_file_type text, p_task_name text, p_task_id text, p_resume_tokens bigint[] DEFAULT NULL::bigint[], p_token bigint DEFAULT NULL::bigint) RETURNS TABLE(outcome text, token bigint, attempt integer, max_attempts integer, generation integer, retry_in double precision, records_total integer, records_filtered integer, records_persisted integer, error_message text)
    LANGUAGE sql
    AS $$
    SELECT c.outcome, c.token, c.attempt, c.max_attempts, c.generation, c.retry_in,
           c.records_total, c.records_filtered, c.records_persisted, c.error_message
      FROM pipeline_claim_v4(p_file_url, p_worker, p_lease_seconds, p_max_attempts,
          p_file_type, p_task_name, p_task_id, p_resume_tokens, p_token) c
$$;

CREATE FUNCTION public.pipeline_claim_v4(p_file_url text, p_worker text, p_lease_seconds double precision, p_max_attempts integer, p_file_type text, p_task_name text, p_task_id text, p_resume_tokens bigint[] DEFAULT NULL::bigint[], p_token bigint DEFAULT NULL::bigint) RETURNS TABLE(outcome text, token bigint, attempt integer, max_attempts integer, generation integer, retry_in double precision, records_total integer, records_filtered integer, records_persisted integer, error_message text, "position" jsonb, position_version text)
    LANGUAGE sql
    AS $$
    SELECT * FROM pipeline_claim_v5(p_file_url, p_worker, p_lease_seconds, p_max_attempts,
        p_file_type, p_task_name, p_task_id, p_resume_tokens, p_token)
$$;

CREATE FUNCTION public.pipeline_claim_v5(p_file_url text, p_worker text, p_lease_seconds double precision, p_max_attempts integer, p_file_type text, p_task_name text, p_task_id text, p_resume_tokens bigint[] DEFAULT NULL::bigint[], p_token bigint DEFAULT NULL::bigint) RETURNS TABLE(outcome text, token bigint, attempt integer, max_attempts integer, generation integer, retry_in double precision, records_total integer, records_filtered integer, records_persisted integer, error_message text, "position" jsonb, position_version text)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    SET enable_seqscan TO 'off'
    AS $$
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

CREATE FUNCTION public.pipeline_commit_chunk_v1(p_file_url text, p_token bigint, p_position jsonb, p_version text, p_total integer, p_filtered integer, p_persisted integer, p_progress_bytes bigint, p_size_bytes bigint) RETURNS TABLE(lease_left double precision)
    LANGUAGE sql
    AS $$
    SELECT * FROM pipeline_commit_chunk_v2(p_file_url, p_token, p_position, p_version, p_total,
        p_filtered, p_persisted, p_progress_bytes, p_size_bytes)
$$;

CREATE FUNCTION public.pipeline_commit_chunk_v2(p_file_url text, p_token bigint, p_position jsonb, p_version text, p_total integer, p_filtered integer, p_persisted integer, p_progress_bytes bigint, p_size_bytes bigint) RETURNS TABLE(lease_left double precision)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    SET enable_seqscan TO 'off'
    AS $$
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

CREATE FUNCTION public.pipeline_complete_v1(p_file_url text, p_token bigint, p_total integer, p_filtered integer, p_persisted integer, p_processing_time_ms integer, p_details jsonb) RETURNS boolean
    LANGUAGE sql
    AS $$
    SELECT pipeline_complete_v2(p_file_url, p_token, p_total, p_filtered, p_persisted,
        p_processing_time_ms, p_details)
$$;

CREATE FUNCTION public.pipeline_complete_v2(p_file_url text, p_token bigint, p_total integer, p_filtered integer, p_persisted integer, p_processing_time_ms integer, p_details jsonb) RETURNS boolean
    LANGUAGE sql
    AS $$
    SELECT pipeline_complete_v3(p_file_url, p_token, p_total, p_filtered, p_persisted,
        p_processing_time_ms, p_details)
$$;

CREATE FUNCTION public.pipeline_complete_v3(p_file_url text, p_token bigint, p_total integer, p_filtered integer, p_persisted integer, p_processing_time_ms integer, p_details jsonb) RETURNS boolean
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    SET enable_seqscan TO 'off'
    AS $$
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

CREATE FUNCTION public.pipeline_complete_v4(p_file_url text, p_token bigint, p_total integer, p_filtered integer, p_persisted integer, p_processing_time_ms integer, p_details jsonb) RETURNS text[]
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    SET enable_seqscan TO 'off'
    AS $$
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

CREATE FUNCTION public.pipeline_contact_v1(p_gap_seconds double precision) RETURNS double precision
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_custom_plan'
    AS $$
DECLARE
    v_now  timestamptz := clock_timestamp();
    v_last timestamptz;
    v_gap  interval;
    v_n    integer;
BEGIN
    SELECT answered_at INTO v_last FROM pipeline_fleet_contact WHERE id FOR UPDATE;
    IF v_last IS NULL THEN
        INSERT INTO pipeline_fleet_contact (answered_at) VALUES (v_now)
            ON CONFLICT (id) DO UPDATE SET answered_at = greatest(
                pipeline_fleet_contact.answered_at, excluded.answered_at);
        RETURN NULL;
    END IF;
    v_gap := v_now - v_last;
    IF p_gap_seconds IS NULL OR v_gap <= make_interval(secs => p_gap_seconds) THEN
        UPDATE pipeline_fleet_contact SET answered_at = greatest(answered_at, v_now) WHERE id;
        RETURN NULL;
    END IF;
    UPDATE file_checkpoints c
       SET lease_expires_at = least(c.lease_expires_at + v_gap,
                                    v_now + make_interval(secs => c.lease_seconds))
     WHERE c.status = 'processing'
       -- live when the gap began ...
       AND c.lease_expires_at > v_last
       -- ... and not written (claimed, renewed, a chunk) in the last p_gap_seconds: its
       -- holder had no answer either (a lease claimed in the gap, when the database answered
       -- only its holder, gets at most a full lease from now)
       AND c.updated_at < v_now - make_interval(secs => p_gap_seconds);
    GET DIAGNOSTICS v_n = ROW_COUNT;
    UPDATE pipeline_fleet_contact
       SET answered_at = v_now, gap_started_at = v_last, gap_ended_at = v_now,
           leases_extended = v_n
     WHERE id;
    RETURN extract(epoch FROM v_gap)::double precision;
END;
$$;

CREATE FUNCTION public.pipeline_fail_v1(p_file_url text, p_token bigint, p_error_class text, p_error_message text, p_retryable boolean) RETURNS TABLE(status text, attempt integer, max_attempts integer)
    LANGUAGE sql
    AS $$
    SELECT f.status, f.attempt, f.max_attempts
      FROM pipeline_fail_v2(p_file_url, p_token, p_error_class, p_error_message, p_retryable, NULL) f
$$;

CREATE FUNCTION public.pipeline_fail_v2(p_file_url text, p_token bigint, p_error_class text, p_error_message text, p_retryable boolean, p_retry_in double precision) RETURNS TABLE(status text, attempt integer, max_attempts integer, retry_in double precision)
    LANGUAGE sql
    AS $$
    SELECT * FROM pipeline_fail_v3(p_file_url, p_token, p_error_class, p_error_message,
        p_retryable, p_retry_in)
$$;

CREATE FUNCTION public.pipeline_fail_v3(p_file_url text, p_token bigint, p_error_class text, p_error_message text, p_retryable boolean, p_retry_in double precision) RETURNS TABLE(status text, attempt integer, max_attempts integer, retry_in double precision)
    LANGUAGE sql
    AS $$
    SELECT * FROM pipeline_fail_v4(p_file_url, p_token, p_error_class, p_error_message,
        p_retryable, p_retry_in)
$$;

CREATE FUNCTION public.pipeline_fail_v4(p_file_url text, p_token bigint, p_error_class text, p_error_message text, p_retryable boolean, p_retry_in double precision) RETURNS TABLE(status text, attempt integer, max_attempts integer, retry_in double precision)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    SET enable_seqscan TO 'off'
    AS $$
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

CREATE FUNCTION public.pipeline_fail_v5(p_file_url text, p_token bigint, p_error_class text, p_error_message text, p_retryable boolean, p_retry_in double precision) RETURNS TABLE(status text, attempt integer, max_attempts integer, retry_in double precision, callback_url text, callback_task text)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'auto'
    SET enable_seqscan TO 'off'
    AS $$
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

CREATE FUNCTION public.pipeline_fence_v1(p_token bigint) RETURNS integer
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_custom_plan'
    AS $$
DECLARE
    v_pid   integer;
    v_n     integer := 0;
BEGIN
    FOR v_pid IN
        SELECT a.pid FROM pg_stat_activity a
         WHERE a.application_name = 'pipeline-claim:' || p_token
           AND a.datname = current_database() AND a.pid <> pg_backend_pid()
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

CREATE FUNCTION public.pipeline_lose_v1(r public.file_checkpoints, p_now timestamp with time zone, p_why text, p_failed text, p_dead text, p_retry_at timestamp with time zone) RETURNS public.file_checkpoints
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_custom_plan'
    AS $$
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

CREATE FUNCTION public.pipeline_outcome_valid_v1(p_outcome text) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE STRICT
    AS $$
BEGIN
    RETURN p_outcome IN ('running', 'completed', 'failed', 'lost', 'cancelled');
END;
$$;

CREATE FUNCTION public.pipeline_reap_v1(p_waiting_seconds double precision, p_limit integer) RETURNS TABLE(file_url text, task_name text, status text)
    LANGUAGE sql
    AS $$
    SELECT * FROM pipeline_reap_v3(p_waiting_seconds, p_limit, 5.0)
$$;

CREATE FUNCTION public.pipeline_reap_v2(p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision) RETURNS TABLE(file_url text, task_name text, status text)
    LANGUAGE sql
    AS $$
    SELECT * FROM pipeline_reap_v3(p_waiting_seconds, p_limit, p_overdue_seconds)
$$;

CREATE FUNCTION public.pipeline_reap_v3(p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision) RETURNS TABLE(file_url text, task_name text, status text)
    LANGUAGE sql
    AS $$
    SELECT * FROM pipeline_reap_v4(p_waiting_seconds, p_limit, p_overdue_seconds)
$$;

CREATE FUNCTION public.pipeline_reap_v4(p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision) RETURNS TABLE(file_url text, task_name text, status text)
    LANGUAGE sql
    AS $$
    SELECT * FROM pipeline_reap_v6(p_waiting_seconds, p_limit, p_overdue_seconds, 10.0)
$$;

CREATE FUNCTION public.pipeline_reap_v5(p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision, p_gap_seconds double precision) RETURNS TABLE(file_url text, task_name text, status text)
    LANGUAGE sql
    AS $$
    SELECT * FROM pipeline_reap_v6(p_waiting_seconds, p_limit, p_overdue_seconds, p_gap_seconds)
$$;

CREATE FUNCTION public.pipeline_reap_v6(p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision, p_gap_seconds double precision) RETURNS TABLE(file_url text, task_name text, status text)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_custom_plan'
    AS $$
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

CREATE FUNCTION public.pipeline_requeue_v1(p_statuses text[], p_force boolean, p_file_url text, p_batch_id text) RETURNS TABLE(file_url text, task_name text, status text)
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_custom_plan'
    AS $$
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

CREATE FUNCTION public.pipeline_restart_v1(p_file_url text, p_token bigint, p_version text, p_fingerprint text) RETURNS TABLE(generation integer)
    LANGUAGE sql
    AS $$
    UPDATE file_checkpoints c
       SET generation = c.generation + 1, attempt = 1, attempts_spent = 0,
           position = NULL, position_version = p_version, attempt_start_position = NULL,
           attempt_chunks = 0, progress_bytes = NULL, size_bytes = NULL, progress_at = NULL,
           records_total = 0, records_filtered = 0, records_persisted = 0,
           fingerprint = coalesce(p_fingerprint, c.fingerprint), updated_at = clock_timestamp()
     WHERE c.file_url = p_file_url AND c.token = p_token AND c.status = 'processing'
    RETURNING c.generation
$$;

CREATE TABLE public.events (
    id bigint NOT NULL,
    file_url text NOT NULL,
    line integer NOT NULL,
    event_id text NOT NULL,
    ts timestamp with time zone NOT NULL,
    type text NOT NULL,
    payload jsonb DEFAULT '{}'::jsonb NOT NULL,
    inserted_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT events_line_check CHECK ((line >= 1))
);

CREATE SEQUENCE public.events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.events_id_seq OWNED BY public.events.id;

CREATE TABLE public.file_attempts (
    token bigint NOT NULL,
    file_url text NOT NULL,
    generation integer NOT NULL,
    attempt integer NOT NULL,
    worker text,
    task_id text,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    ended_at timestamp with time zone,
    outcome text DEFAULT 'running'::text NOT NULL,
    error_class text,
    error_message text,
    retry_at timestamp with time zone,
    trace_id text,
    start_position jsonb,
    end_position jsonb,
    chunks integer DEFAULT 0 NOT NULL,
    CONSTRAINT file_attempts_outcome_check CHECK (public.pipeline_outcome_valid_v1(outcome))
);

CREATE SEQUENCE public.file_checkpoints_token_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

CREATE VIEW public.pipeline_attempts AS
 SELECT a.token,
    a.file_url,
    a.generation,
    a.attempt,
    a.worker,
    a.task_id,
    a.started_at,
    a.ended_at,
    a.outcome,
    a.error_class,
    a.error_message,
    a.retry_at,
    a.start_position,
    a.end_position,
    a.chunks
   FROM public.file_attempts a
UNION ALL
 SELECT c.token,
    c.file_url,
    c.generation,
    c.attempt,
    c.processed_by AS worker,
    c.task_id,
    c.started_at,
    NULL::timestamp with time zone AS ended_at,
    'running'::text AS outcome,
    NULL::text AS error_class,
    NULL::text AS error_message,
    NULL::timestamp with time zone AS retry_at,
    c.attempt_start_position AS start_position,
    c."position" AS end_position,
    c.attempt_chunks AS chunks
   FROM public.file_checkpoints c
  WHERE ((c.status = 'processing'::text) AND (NOT (EXISTS ( SELECT 1
           FROM public.file_attempts a
          WHERE (a.token = c.token)))));

CREATE TABLE public.pipeline_batch_callbacks (
    file_url text NOT NULL,
    batch text NOT NULL,
    callback integer NOT NULL,
    summary jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE public.pipeline_batch_counts (
    batch text NOT NULL,
    slot smallint NOT NULL,
    queued bigint DEFAULT 0 NOT NULL,
    completed bigint DEFAULT 0 NOT NULL,
    failed bigint DEFAULT 0 NOT NULL,
    dead bigint DEFAULT 0 NOT NULL,
    cancelled bigint DEFAULT 0 NOT NULL,
    records_total bigint DEFAULT 0 NOT NULL,
    records_filtered bigint DEFAULT 0 NOT NULL,
    records_persisted bigint DEFAULT 0 NOT NULL,
    first_started_at timestamp with time zone,
    last_ended_at timestamp with time zone,
    watched boolean DEFAULT false NOT NULL,
    limited boolean DEFAULT false NOT NULL
)
WITH (fillfactor='50');

CREATE VIEW public.pipeline_batch_figures AS
 SELECT t.batch,
    (t.queued - (t.processing)::numeric) AS pending,
    t.processing,
    t.completed,
    t.failed,
    t.dead,
    t.cancelled,
    t.records_total,
    t.records_filtered,
    t.records_persisted,
    t.first_started_at,
    t.last_ended_at
   FROM ( SELECT k.batch,
            sum(k.queued) AS queued,
            ( SELECT count(*) AS count
                   FROM public.file_checkpoints c
                  WHERE ((c.batch_id = k.batch) AND (c.status = 'processing'::text))) AS processing,
            sum(k.completed) AS completed,
            sum(k.failed) AS failed,
            sum(k.dead) AS dead,
            sum(k.cancelled) AS cancelled,
            sum(k.records_total) AS records_total,
            sum(k.records_filtered) AS records_filtered,
            sum(k.records_persisted) AS records_persisted,
            min(k.first_started_at) AS first_started_at,
            max(k.last_ended_at) AS last_ended_at
           FROM public.pipeline_batch_counts k
          GROUP BY k.batch) t;

CREATE TABLE public.pipeline_batches (
    name text NOT NULL,
    task_name text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    submitted_by text,
    file_count bigint DEFAULT 0 NOT NULL,
    state text DEFAULT 'open'::text NOT NULL,
    concurrency integer,
    on_complete text,
    callbacks integer DEFAULT 0 NOT NULL,
    settled_count bigint DEFAULT 0 NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT pipeline_batches_concurrency_check CHECK ((concurrency > 0)),
    CONSTRAINT pipeline_batches_state_check CHECK ((state = ANY (ARRAY['open'::text, 'done'::text, 'cancelled'::text, 'paused'::text])))
);

CREATE TABLE public.pipeline_chores (
    name text NOT NULL,
    started_at timestamp with time zone NOT NULL
);

CREATE TABLE public.pipeline_database_trouble (
    cause text NOT NULL,
    message text NOT NULL,
    seen_by text,
    first_at timestamp with time zone NOT NULL,
    last_at timestamp with time zone NOT NULL,
    reported_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE public.pipeline_fleet_contact (
    id boolean DEFAULT true NOT NULL,
    answered_at timestamp with time zone NOT NULL,
    gap_started_at timestamp with time zone,
    gap_ended_at timestamp with time zone,
    leases_extended integer DEFAULT 0 NOT NULL,
    CONSTRAINT pipeline_fleet_contact_id_check CHECK (id)
);

CREATE TABLE public.pipeline_workers (
    worker text NOT NULL,
    pid integer NOT NULL,
    interval_seconds double precision NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    seen_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT pipeline_workers_interval_seconds_check CHECK ((interval_seconds > (0)::double precision))
);

ALTER TABLE ONLY public.events ALTER COLUMN id SET DEFAULT nextval('public.events_id_seq'::regclass);

ALTER TABLE ONLY public.events
    ADD CONSTRAINT events_file_line_key UNIQUE (file_url, line);

ALTER TABLE ONLY public.events
    ADD CONSTRAINT events_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.file_attempts
    ADD CONSTRAINT file_attempts_pkey PRIMARY KEY (token);

ALTER TABLE ONLY public.file_checkpoints
    ADD CONSTRAINT file_checkpoints_pkey PRIMARY KEY (file_url);

ALTER TABLE ONLY public.pipeline_batch_callbacks
    ADD CONSTRAINT pipeline_batch_callbacks_pkey PRIMARY KEY (file_url);

ALTER TABLE ONLY public.pipeline_batch_counts
    ADD CONSTRAINT pipeline_batch_counts_pkey PRIMARY KEY (batch, slot);

ALTER TABLE ONLY public.pipeline_batches
    ADD CONSTRAINT pipeline_batches_pkey PRIMARY KEY (name);

ALTER TABLE ONLY public.pipeline_chores
    ADD CONSTRAINT pipeline_chores_pkey PRIMARY KEY (name);

ALTER TABLE ONLY public.pipeline_database_trouble
    ADD CONSTRAINT pipeline_database_trouble_pkey PRIMARY KEY (cause);

ALTER TABLE ONLY public.pipeline_fleet_contact
    ADD CONSTRAINT pipeline_fleet_contact_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.pipeline_workers
    ADD CONSTRAINT pipeline_workers_pkey PRIMARY KEY (worker);

CREATE INDEX events_type_ts_idx ON public.events USING btree (type, ts);

CREATE INDEX file_attempts_ended_at_idx ON public.file_attempts USING btree (ended_at);

CREATE INDEX file_attempts_file_idx ON public.file_attempts USING btree (file_url, token);

CREATE INDEX file_checkpoints_batch_pending_idx ON public.file_checkpoints USING btree (batch_id, submitted_at) WHERE (status = 'pending'::text);

CREATE INDEX file_checkpoints_batch_status_idx ON public.file_checkpoints USING btree (batch_id, status, completed_at);

CREATE INDEX file_checkpoints_completed_at_idx ON public.file_checkpoints USING btree (completed_at) WHERE (status = 'completed'::text);

CREATE INDEX file_checkpoints_dead_idx ON public.file_checkpoints USING btree (updated_at) WHERE (status = 'dead'::text);

CREATE INDEX file_checkpoints_lease_idx ON public.file_checkpoints USING btree (lease_expires_at) WHERE (status = 'processing'::text);

CREATE INDEX file_checkpoints_retried_idx ON public.file_checkpoints USING btree (file_url) WHERE ((generation > 1) OR (attempt > 1));

CREATE INDEX file_checkpoints_retry_at_idx ON public.file_checkpoints USING btree (retry_at) WHERE (status = 'failed'::text);

CREATE INDEX file_checkpoints_waiting_idx ON public.file_checkpoints USING btree (updated_at) WHERE (status = ANY (ARRAY['pending'::text, 'failed'::text]));

CREATE TRIGGER file_checkpoints_batch_count_del AFTER DELETE ON public.file_checkpoints REFERENCING OLD TABLE AS pipeline_batch_count_old_rows FOR EACH STATEMENT EXECUTE FUNCTION public.pipeline_batch_count_deleted_v1();

CREATE TRIGGER file_checkpoints_batch_count_ins AFTER INSERT ON public.file_checkpoints REFERENCING NEW TABLE AS pipeline_batch_count_new_rows FOR EACH STATEMENT EXECUTE FUNCTION public.pipeline_batch_count_inserted_v1();

CREATE TRIGGER file_checkpoints_batch_count_trunc AFTER TRUNCATE ON public.file_checkpoints FOR EACH STATEMENT EXECUTE FUNCTION public.pipeline_batch_count_truncated_v1();

CREATE TRIGGER file_checkpoints_batch_count_upd AFTER UPDATE OF status, batch_id ON public.file_checkpoints FOR EACH ROW WHEN ((old.status < ('pending'::text COLLATE "C"))) EXECUTE FUNCTION public.pipeline_batch_count_v2();

CREATE TRIGGER pipeline_batch_counts_watched BEFORE INSERT ON public.pipeline_batch_counts FOR EACH ROW EXECUTE FUNCTION public.pipeline_batch_counts_watched_v1();

CREATE TRIGGER pipeline_batches_limit AFTER INSERT OR UPDATE OF concurrency ON public.pipeline_batches FOR EACH ROW WHEN ((new.concurrency IS NOT NULL)) EXECUTE FUNCTION public.pipeline_batch_limit_v1();

CREATE TRIGGER pipeline_batches_watch AFTER INSERT OR UPDATE OF on_complete ON public.pipeline_batches FOR EACH ROW WHEN ((new.on_complete IS NOT NULL)) EXECUTE FUNCTION public.pipeline_batch_watch_v1();

ALTER TABLE ONLY public.file_attempts
    ADD CONSTRAINT file_attempts_file_url_fkey FOREIGN KEY (file_url) REFERENCES public.file_checkpoints(file_url) ON DELETE CASCADE;

ALTER TABLE ONLY public.pipeline_batch_callbacks
    ADD CONSTRAINT pipeline_batch_callbacks_batch_fkey FOREIGN KEY (batch) REFERENCES public.pipeline_batches(name) ON DELETE CASCADE;
