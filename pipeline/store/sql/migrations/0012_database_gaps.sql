-- 0012: database trouble is never the file's fault (issue 25).
-- A lease cannot tell a dead worker from a dead database: while nobody can reach the
-- database, no lease is renewed, and when it answers again every lease has run out. The
-- fleet's contact (every worker's heartbeat and every sweep) records when the database last
-- answered it; after a gap longer than `p_gap_seconds` the leases that were live when the gap
-- began (and not renewed since) get the gap back (at most a full lease from now) before
-- anything is reaped. So only a worker that stays silent after the database is back loses its
-- files, one lease later.

-- One row: when the database last answered the fleet, and the last gap made good.
CREATE TABLE pipeline_fleet_contact (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    answered_at timestamptz NOT NULL,
    gap_started_at timestamptz,
    gap_ended_at timestamptz,
    leases_extended integer NOT NULL DEFAULT 0
);
INSERT INTO pipeline_fleet_contact (answered_at) VALUES (now());

-- Database trouble the workers saw (disk full, too many connections, unreachable, ...),
-- written once the database answers them again: `pipeline status` and the metrics say when
-- it last failed and why. One row per cause, the latest spell.
CREATE TABLE pipeline_database_trouble (
    cause text PRIMARY KEY,
    message text NOT NULL,
    seen_by text,
    first_at timestamptz NOT NULL,
    last_at timestamptz NOT NULL,
    reported_at timestamptz NOT NULL DEFAULT now()
);

-- The fleet reached the database: after a gap longer than p_gap_seconds, the leases live when
-- it began and not renewed in the last p_gap_seconds are extended by it (never past a full
-- lease from now). Returns the gap in seconds
-- when one was made good, else NULL. Contacts queue on the one row, so a gap is made good once.
CREATE FUNCTION pipeline_contact_v1(p_gap_seconds double precision)
RETURNS double precision
LANGUAGE plpgsql AS $$
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

-- The sweep (pipeline_reap_v4's), with the gap rule first: every sweep records the fleet's
-- contact (and makes a gap good) before expired leases are reaped, whether or not it is the
-- one let through; rows pending since before the end of the last gap (their message may have
-- been acked while the database could not take the claim) are handed back at once, not after
-- p_waiting_seconds (only when waiting rows are handed back at all: p_waiting_seconds set).
CREATE FUNCTION pipeline_reap_v5(
    p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision,
    p_gap_seconds double precision
) RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE plpgsql AS $$
DECLARE
    r         file_checkpoints%ROWTYPE;
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

-- Older name, for workers not yet upgraded: the same signature, the new behaviour, with the
-- gap rule at twice the default sweep interval (5 s).
CREATE OR REPLACE FUNCTION pipeline_reap_v4(
    p_waiting_seconds double precision, p_limit integer, p_overdue_seconds double precision
) RETURNS TABLE (file_url text, task_name text, status text)
LANGUAGE sql AS $$
    SELECT * FROM pipeline_reap_v5(p_waiting_seconds, p_limit, p_overdue_seconds, 10.0)
$$;
