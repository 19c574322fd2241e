-- Named queries: each block starts with `-- name --` and a line describing it.
-- Parameters use SQLAlchemy's :name form.

-- claim --
-- Claim a file (grant, with the position to resume from, or refuse with done / busy / not_due /
-- dead, or for its batch: cancelled / paused / limited); see pipeline_claim_v5.
SELECT * FROM pipeline_claim_v5(:file_url, :worker, :lease_seconds, :max_attempts,
                                :file_type, :task_name, :task_id,
                                CAST(:resume_tokens AS bigint[]), :token)

-- reserve_tokens --
-- Fencing tokens taken from the sequence in advance, for claims to propose (see claim).
SELECT nextval('file_checkpoints_token_seq') AS token FROM generate_series(1, :n)

-- heartbeat --
-- Extend the lease of the current claim; no row when the token is stale.
UPDATE file_checkpoints
   SET lease_expires_at = clock_timestamp() + make_interval(secs => lease_seconds),
       updated_at = clock_timestamp()
 WHERE file_url = :file_url AND token = :token AND status = 'processing'
RETURNING extract(epoch FROM lease_expires_at - clock_timestamp())::double precision AS lease_left

-- complete --
-- Mark the current claim completed with its stats; NULL when the token is stale, else an
-- array: empty, or when this completion made its batch terminal, the batch's callback row it
-- created, {file_url, task_name}, to send once the transaction committed.
SELECT pipeline_complete_v4(:file_url, :token, :total, :filtered, :persisted,
                            :processing_time_ms, CAST(:details AS jsonb)) AS done

-- fail --
-- Record a failed execution: failed (retry no earlier than :retry_in seconds from now) or
-- dead (and then, if that made its batch terminal, the callback row created, as complete);
-- no row when the token is stale.
SELECT * FROM pipeline_fail_v5(:file_url, :token, :error_class, :error_message, :retryable,
                               :retry_in)

-- get --
-- One checkpoint row.
SELECT file_url, file_type, status, attempt, max_attempts, generation, token, records_total,
       records_filtered, records_persisted, processing_time_ms, error_message, processed_by,
       task_name, task_id, batch_id, fingerprint, lease_expires_at, retry_at, started_at,
       completed_at, created_at, updated_at, position, position_version, progress_bytes,
       size_bytes, progress_at, attempts_spent
  FROM file_checkpoints WHERE file_url = :file_url

-- attempts --
-- The attempt history of one file, oldest first, the running one included (pipeline_attempts),
-- with where each started and ended and the trace each ran in. In the order of generation and
-- attempt, not of token: each process reserves its tokens in blocks, so a later attempt may
-- hold a smaller token.
SELECT a.generation, a.attempt, a.token, a.worker, a.started_at, a.ended_at, a.outcome,
       a.error_class, a.error_message, a.start_position, a.end_position, a.chunks, t.trace_id
  FROM pipeline_attempts a LEFT JOIN file_attempts t ON t.token = a.token
 WHERE a.file_url = :file_url ORDER BY a.generation, a.attempt, a.started_at

-- register --
-- Register URLs as pending in one statement. New URLs are inserted; a completed or dead file
-- whose content fingerprint changed starts a new generation; anything else is left alone.
-- Returns every input URL with its status, whether it was `new`, `changed` (a new
-- generation) or `unchanged`, and whether a task must be enqueued for it: a new or
-- regenerated row, or one still `pending` (its message may have been lost, e.g. by an
-- interrupted submit; a duplicate message costs one claim, a lost one strands the file).
-- Only the rows that are new or changed in the statement's snapshot reach the upsert: an
-- unchanged URL is neither written nor locked (ON CONFLICT DO UPDATE locks every conflicting
-- row, even when its WHERE is false), so a scan of known files writes no WAL at all.
-- With :changes_only, only the new and changed rows come back (a watch needs no others).
WITH input AS (
    SELECT DISTINCT ON (u.file_url) u.file_url, u.fingerprint
      FROM unnest(CAST(:urls AS text[]), CAST(:fingerprints AS text[])) AS u(file_url, fingerprint)
     ORDER BY u.file_url
), known AS (
    SELECT i.file_url, i.fingerprint, c.file_url IS NOT NULL AS existed, c.status, c.task_name,
           coalesce(c.held, false) AS held,
           c.file_url IS NULL
           OR (c.status IN ('completed', 'dead')
               AND i.fingerprint IS NOT NULL AND c.fingerprint IS NOT NULL
               AND i.fingerprint <> c.fingerprint) AS candidate
      FROM input i
      LEFT JOIN file_checkpoints c ON c.file_url = i.file_url
), room AS (
    -- A limited batch (migration 0023): messages for twice its limit, less its files with
    -- a message out (pending or running); the rest are registered held, sent one by one as
    -- its files end. A batch with files held already has its window out: every new file
    -- joins the held ones (oldest submitted are released first), and no statement walks
    -- them (a chunk of a big submit would otherwise count every file held so far).
    -- No row: no limit, every new row gets its message.
    SELECT CASE WHEN EXISTS (SELECT 1 FROM file_checkpoints h
                              WHERE h.batch_id = b.name AND h.held AND h.status = 'pending')
                THEN 0
                ELSE greatest(0, 2 * b.concurrency - (
                         SELECT count(*) FROM (
                             SELECT 1 FROM file_checkpoints c
                              WHERE c.batch_id = b.name AND c.status IN ('pending', 'processing')
                              LIMIT 2 * b.concurrency) o)) END AS slots
      FROM pipeline_batches b
     WHERE b.name = CAST(:batch_id AS text) AND b.concurrency IS NOT NULL
), upserted AS (
    INSERT INTO file_checkpoints AS c (file_url, file_type, status, max_attempts, task_name,
                                       batch_id, fingerprint, held)
    SELECT k.file_url, :file_type, 'pending', :max_attempts, :task_name, :batch_id, k.fingerprint,
           coalesce(row_number() OVER (ORDER BY k.file_url) > (SELECT r.slots FROM room r),
                    false)
      FROM known k
     WHERE k.candidate
     -- one order for every registering session: concurrent ones wait, never deadlock
     ORDER BY k.file_url
    ON CONFLICT (file_url) DO UPDATE
       SET status = 'pending', attempt = 0, generation = c.generation + 1, token = NULL,
           lease_expires_at = NULL, error_message = NULL, completed_at = NULL,
           records_total = 0, records_filtered = 0, records_persisted = 0,
           processing_time_ms = 0, details = NULL, attempts_spent = 0, attempt_chunks = 0,
           position = NULL, position_version = NULL, attempt_start_position = NULL,
           progress_bytes = NULL, size_bytes = NULL, progress_at = NULL,
           fingerprint = excluded.fingerprint, batch_id = excluded.batch_id, held = excluded.held,
           task_name = excluded.task_name, max_attempts = excluded.max_attempts,
           submitted_at = now(), updated_at = now()
     -- checked again on the row as it is now: a concurrent register (another watch of the
     -- same prefix) may have inserted or regenerated it since the snapshot; then it is theirs
     WHERE c.status IN ('completed', 'dead')
       AND excluded.fingerprint IS NOT NULL AND c.fingerprint IS NOT NULL
       AND excluded.fingerprint <> c.fingerprint
    RETURNING c.file_url, c.status, c.task_name, c.held
), counted AS (
    -- The batch's file count grows with the rows this statement created or regenerated (a
    -- batch done so far is open again: it has new files). Once per registration statement,
    -- never per completion; nothing is written when nothing was.
    INSERT INTO pipeline_batches AS b (name, task_name, file_count)
    SELECT CAST(:batch_id AS text), :task_name, count(*) FROM upserted
     WHERE CAST(:batch_id AS text) IS NOT NULL
    HAVING count(*) > 0
    ON CONFLICT (name) DO UPDATE
       SET file_count = b.file_count + excluded.file_count,
           state = CASE WHEN b.state = 'done' THEN 'open' ELSE b.state END, updated_at = now()
)
SELECT k.file_url,
       -- 'pending' when a concurrent register inserted the row after this statement's
       -- snapshot: it is theirs to enqueue, and this statement cannot see it
       coalesce(u.status, k.status, 'pending') AS status,
       CASE WHEN u.file_url IS NOT NULL THEN NOT u.held
            ELSE coalesce(k.status = 'pending' AND NOT k.held, false) END AS needs_task,
       coalesce(u.held, k.held, false) AS held,
       coalesce(u.task_name, k.task_name) AS task_name,
       CASE WHEN u.file_url IS NULL THEN 'unchanged'
            WHEN k.existed THEN 'changed'
            ELSE 'new' END AS change
  FROM known k
  LEFT JOIN upserted u ON u.file_url = k.file_url
 WHERE NOT CAST(:changes_only AS boolean) OR u.file_url IS NOT NULL

-- requeue --
-- Operator requeue: dead / failed (and completed with force) rows back to pending, in a new
-- generation; the attempt history is kept. Cancelled rows go back to pending as they stood
-- (same generation, resumed from their last chunk), and their batch is open again. See
-- pipeline_requeue_v1.
SELECT * FROM pipeline_requeue_v1(CAST(:statuses AS text[]), CAST(:force AS boolean),
                                  CAST(:file_url AS text), CAST(:batch_id AS text))

-- reap --
-- The sweep: the fleet's contact (the gap rule), expired claims, overdue retries, rows waiting
-- too long, none of a paused or cancelled batch; see pipeline_reap_v6.
SELECT * FROM pipeline_reap_v6(:waiting_seconds, :limit, :overdue_seconds, :gap_seconds)

-- contact --
-- The fleet reached the database (a worker's heartbeat): a gap longer than :gap_seconds since
-- the last contact is made good to the leases live when it began; see pipeline_contact_v1.
SELECT pipeline_contact_v1(:gap_seconds) AS gap

-- summary --
-- Counts by batch and status.
SELECT batch_id, status, count(*) AS n FROM file_checkpoints
 WHERE CAST(:batch_id AS text) IS NULL OR batch_id = :batch_id
 GROUP BY batch_id, status

-- batch_summary --
-- One batch's files by status, from its counters (pipeline_batch_figures, migration 0016).
SELECT f.batch AS batch_id, s.status, s.n
  FROM pipeline_batch_figures f
 CROSS JOIN LATERAL (VALUES ('pending', f.pending), ('processing', f.processing),
                            ('completed', f.completed), ('failed', f.failed), ('dead', f.dead),
                            ('cancelled', f.cancelled)) AS s (status, n)
 WHERE f.batch = :batch_id AND s.n <> 0

-- activity --
-- Recent throughput, the oldest live lease, expired leases waiting for the reaper, and the
-- record totals, for one batch or all.
SELECT
    (SELECT count(*) FROM file_checkpoints
      WHERE status = 'completed' AND completed_at > now() - interval '60 seconds'
        AND (CAST(:batch_id AS text) IS NULL OR batch_id = :batch_id)) AS completed_last_minute,
    (SELECT min(started_at) FROM file_checkpoints
      WHERE status = 'processing' AND lease_expires_at > now()
        AND (CAST(:batch_id AS text) IS NULL OR batch_id = :batch_id)) AS oldest_live_start,
    (SELECT count(*) FROM file_checkpoints
      WHERE status = 'processing' AND lease_expires_at <= now()
        AND (CAST(:batch_id AS text) IS NULL OR batch_id = :batch_id)) AS expired_leases,
    now() AS db_now

-- totals --
-- Record totals of the completed files of one batch, and its running time so far: from its
-- first start to its last file's end (completed, or dead), on the database's clock. From the
-- batch's counters (pipeline_batch_counts, migration 0016): its slots, not its files. (A start
-- is counted when its file ends, fails or leaves the batch: a file still on its first attempt
-- does not move the batch's start.)
SELECT coalesce(sum(k.records_total), 0) AS total,
       coalesce(sum(k.records_filtered), 0) AS filtered,
       coalesce(sum(k.records_persisted), 0) AS persisted,
       extract(epoch FROM max(k.last_ended_at) - min(k.first_started_at)) AS seconds
  FROM pipeline_batch_counts k
 WHERE k.batch = :batch_id

-- dead --
-- The latest dead files with their errors.
SELECT file_url, error_message, updated_at, attempt FROM file_checkpoints
 WHERE status = 'dead' AND (CAST(:batch_id AS text) IS NULL OR batch_id = :batch_id)
 ORDER BY updated_at DESC
 LIMIT :limit

-- ops_state --
-- The exporter's single figures in one read, on the database's clock: the oldest pending file
-- (since its submit) and the oldest failed one (since its failure), live and expired leases,
-- what finished in the last minute and in the last :window seconds, the workers' heartbeats.
SELECT
    (SELECT min(coalesce(submitted_at, created_at)) FROM file_checkpoints
      WHERE status = 'pending') AS oldest_pending,
    (SELECT min(coalesce(a.ended_at, c.updated_at)) FROM file_checkpoints c
       LEFT JOIN file_attempts a ON a.token = c.token
      WHERE c.status = 'failed') AS oldest_failed,
    (SELECT min(started_at) FROM file_checkpoints
      WHERE status = 'processing' AND lease_expires_at > now()) AS oldest_live_start,
    (SELECT count(*) FROM file_checkpoints
      WHERE status = 'processing' AND lease_expires_at <= now()) AS expired_leases,
    (SELECT min(lease_expires_at) FROM file_checkpoints
      WHERE status = 'processing' AND lease_expires_at <= now()) AS oldest_expiry,
    (SELECT count(*) FROM file_checkpoints
      WHERE status = 'completed'
        AND completed_at > now() - interval '60 seconds') AS completed_last_minute,
    (SELECT count(*) FROM file_checkpoints
      WHERE status = 'completed'
        AND completed_at > now() - make_interval(secs => :window)) AS window_completed,
    (SELECT coalesce(sum(records_persisted), 0) FROM file_checkpoints
      WHERE status = 'completed'
        AND completed_at > now() - make_interval(secs => :window)) AS window_records,
    (SELECT coalesce(sum(records_total), 0) FROM file_checkpoints
      WHERE status = 'processing') AS records_in_flight,
    (SELECT count(*) FROM file_checkpoints
      WHERE status = 'dead' AND updated_at > now() - make_interval(secs => :window)) AS window_dead,
    (SELECT count(*) FROM pipeline_workers
      WHERE seen_at > now() - make_interval(secs => 3 * interval_seconds)) AS workers_live,
    (SELECT max(seen_at) FROM pipeline_workers) AS last_heartbeat,
    now() AS db_now

-- ops_batches --
-- Files by status, overall (batch_id NULL) and for the batches an operator follows: those with
-- a file not yet terminal or finished in the last :window seconds, the latest finishing first,
-- at most :limit; with how many files each finished in the window and when the first of those
-- finished, and how many batches are active in all. One parallel pass over the (batch_id,
-- status) index for the counts (GROUPING SETS would do the overall sums in the same pass, but
-- without parallel workers: 4x slower at a million rows); the window's finishes come from
-- their own indexes.
WITH counts AS (
    SELECT batch_id, status, count(*) AS n FROM file_checkpoints GROUP BY batch_id, status
), finished AS (
    SELECT f.batch_id, count(*) AS n, min(f.at) AS first_at, max(f.at) AS last_at
      FROM (SELECT batch_id, completed_at AS at FROM file_checkpoints
             WHERE status = 'completed'
               AND completed_at > now() - make_interval(secs => :window)
            UNION ALL
            SELECT batch_id, updated_at FROM file_checkpoints
             WHERE status = 'dead' AND updated_at > now() - make_interval(secs => :window)) f
     WHERE f.batch_id IS NOT NULL
     GROUP BY f.batch_id
), open AS (
    SELECT batch_id FROM counts
     WHERE batch_id IS NOT NULL AND status IN ('pending', 'processing', 'failed')
     GROUP BY batch_id
), active AS (
    SELECT coalesce(o.batch_id, f.batch_id) AS batch_id, f.n, f.first_at, f.last_at
      FROM open o FULL JOIN finished f ON f.batch_id = o.batch_id
), shown AS (
    -- default batch names carry their submit time: the newest first among the quiet ones
    SELECT * FROM active ORDER BY last_at DESC NULLS LAST, batch_id DESC LIMIT :limit
)
SELECT NULL::text AS batch_id, c.status, sum(c.n)::bigint AS n, 0::bigint AS finished,
       NULL::timestamptz AS first_finished, (SELECT count(*) FROM active) AS active
  FROM counts c GROUP BY c.status
UNION ALL
SELECT s.batch_id, c.status, c.n, coalesce(s.n, 0), s.first_at, NULL
  FROM shown s JOIN counts c ON c.batch_id = s.batch_id

-- ops_attempts --
-- Attempts that ended in the last :window seconds, by outcome and error class, with their run
-- times bucketed by the ascending :bounds (width_bucket: bucket i holds times from bounds[i]
-- up to bounds[i + 1], 0 those below bounds[1]) and summed.
SELECT outcome, coalesce(error_class, '') AS error_class,
       width_bucket(extract(epoch FROM ended_at - started_at)::double precision,
                    CAST(:bounds AS double precision[])) AS bucket,
       count(*) AS n, sum(extract(epoch FROM ended_at - started_at))::double precision AS seconds
  FROM file_attempts
 WHERE ended_at > now() - make_interval(secs => :window)
 GROUP BY 1, 2, 3

-- ops_pickup --
-- Pickup latency, submit to first claim, of the files whose first attempt of their current
-- generation started in the last :window seconds (ended since, or still running), bucketed
-- like ops_attempts.
WITH firsts AS (
    SELECT greatest(extract(epoch FROM a.started_at - coalesce(c.submitted_at, c.created_at)),
                    0)::double precision AS wait
      FROM file_attempts a
      JOIN file_checkpoints c ON c.file_url = a.file_url AND c.generation = a.generation
     WHERE a.attempt = 1
       AND a.ended_at > now() - make_interval(secs => :window)
       AND a.started_at > now() - make_interval(secs => :window)
    UNION ALL
    SELECT greatest(extract(epoch FROM c.started_at - coalesce(c.submitted_at, c.created_at)),
                    0)::double precision
      FROM file_checkpoints c
     WHERE c.status = 'processing' AND c.attempt = 1
       AND c.started_at > now() - make_interval(secs => :window)
)
SELECT width_bucket(wait, CAST(:bounds AS double precision[])) AS bucket, count(*) AS n,
       sum(wait) AS seconds
  FROM firsts GROUP BY 1

-- worker_seen --
-- A worker's main process is alive (its sweep thread, every PIPELINE_REAP_INTERVAL); the rows
-- of workers not seen for a day go.
WITH gone AS (DELETE FROM pipeline_workers WHERE seen_at < now() - interval '1 day')
INSERT INTO pipeline_workers AS w (worker, pid, interval_seconds)
VALUES (:worker, :pid, :interval)
ON CONFLICT (worker) DO UPDATE
   SET started_at = CASE WHEN w.pid = excluded.pid THEN w.started_at ELSE now() END,
       pid = excluded.pid, interval_seconds = excluded.interval_seconds, seen_at = now()
RETURNING w.seen_at

-- worker_stopped --
-- A worker's main process stops cleanly.
DELETE FROM pipeline_workers WHERE worker = :worker AND pid = :pid RETURNING worker

-- record_trace --
-- The trace a granted claim runs in, on its attempt row (written now, ended in place by
-- complete, fail or a lost attempt, as a row an older claim function wrote); nothing when the
-- claim is no longer current.
INSERT INTO file_attempts AS a (token, file_url, generation, attempt, worker, task_id,
                                started_at, trace_id)
SELECT c.token, c.file_url, c.generation, c.attempt, c.processed_by, c.task_id,
       coalesce(c.started_at, now()), :trace_id
  FROM file_checkpoints c
 WHERE c.file_url = :file_url AND c.token = :token AND c.status = 'processing'
ON CONFLICT (token) DO UPDATE SET trace_id = excluded.trace_id
RETURNING a.token

-- abandon --
-- Release the claim of a process known to be dead; see pipeline_abandon_v3.
SELECT * FROM pipeline_abandon_v3(:file_url, :worker, :task_id)

-- task_settings --
-- The first statement of a task's output transaction on the store's own session (no pooler, or
-- one in session mode): the settings made for the store's calls give way, for this transaction
-- only, to the database's own. The statement timeout: a task's statements take as long as they
-- need. The custom plans: forced on every execution they re-plan each row of a task's
-- executemany (10,000 rows of INSERT ... ON CONFLICT: about 50 ms more backend CPU, issue 24);
-- the store's own statements in the transaction are functions with plan settings of their own.
-- No parameters: sent as one simple query (with name_session written in, see _first), never
-- prepared.
SET LOCAL statement_timeout TO DEFAULT; SET LOCAL plan_cache_mode TO DEFAULT

-- name_session --
-- Name this session after a claim for the rest of the transaction only, so that a takeover
-- can end it if the holder turns zombie (pipeline_fence_v1).
SELECT set_config('application_name', :name, true)

-- migration_lock --
-- Held for the whole of `db upgrade`, so concurrent upgrades run one after another.
SELECT pg_advisory_xact_lock(:key)

-- schema_version_table --
-- The applied migrations, made on the first upgrade (before any migration exists).
CREATE TABLE IF NOT EXISTS pipeline_schema_version (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- applied_versions --
-- The migrations applied so far.
SELECT version FROM pipeline_schema_version

-- record_version --
-- A migration just applied.
INSERT INTO pipeline_schema_version (version, name) VALUES (:version, :name)

-- schema_exists --
-- Whether any migration was ever applied here.
SELECT to_regclass('pipeline_schema_version') IS NOT NULL

-- schema_version --
-- The newest migration applied.
SELECT max(version) FROM pipeline_schema_version

-- commit_chunk --
-- A chunk's position, version and running stats, in the chunk's own output transaction, fenced
-- by the token; extends the lease. No row when the token is stale; 0 left when the file's batch
-- was cancelled (the chunk committed and the file stopped there). See pipeline_commit_chunk_v2.
SELECT * FROM pipeline_commit_chunk_v2(:file_url, :token, CAST(:position AS jsonb), :version,
                                       :total, :filtered, :persisted, :progress_bytes,
                                       :size_bytes)

-- restart --
-- The object changed under a resumed file: a new generation from the beginning, same claim.
-- No row when the token is stale. See pipeline_restart_v1.
SELECT * FROM pipeline_restart_v1(:file_url, :token, :version, :fingerprint)

-- running --
-- Files being processed, oldest claim first, with how far their committed chunks got and
-- the seconds since their generation's first attempt started (for a rate and an ETA); and
-- every running file's committed records, in the first row's `in_flight`.
SELECT c.file_url, c.attempt, c.records_total, c.progress_bytes, c.size_bytes,
       extract(epoch FROM clock_timestamp() - coalesce(
           (SELECT min(a.started_at) FROM file_attempts a
             WHERE a.file_url = c.file_url AND a.generation = c.generation),
           c.started_at))::double precision AS seconds,
       sum(c.records_total) OVER () AS in_flight
  FROM file_checkpoints c
 WHERE c.status = 'processing' AND (CAST(:batch_id AS text) IS NULL OR c.batch_id = :batch_id)
 ORDER BY c.started_at
 LIMIT :limit

-- batch_open --
-- A submit's batch: created, or its settings updated when it exists (a later submit under the
-- same name adds files to it). Its state as it is now.
INSERT INTO pipeline_batches AS b (name, task_name, submitted_by, concurrency, on_complete)
VALUES (:name, :task_name, :submitted_by, :concurrency, :on_complete)
ON CONFLICT (name) DO UPDATE
   SET task_name = coalesce(excluded.task_name, b.task_name),
       submitted_by = coalesce(excluded.submitted_by, b.submitted_by),
       concurrency = coalesce(excluded.concurrency, b.concurrency),
       on_complete = coalesce(excluded.on_complete, b.on_complete), updated_at = now()
RETURNING b.state

-- batch_cancel --
-- Cancel a batch: the files cancelled now; no row when there is no such batch. See
-- pipeline_batch_cancel_v2.
SELECT * FROM pipeline_batch_cancel_v2(:name)

-- batch_pause --
-- Hold a batch's claims (an open or done batch); its state after, no row when there is no such
-- batch.
UPDATE pipeline_batches b
   SET state = CASE WHEN b.state IN ('open', 'done') THEN 'paused' ELSE b.state END,
       updated_at = now()
 WHERE b.name = :name
RETURNING b.state

-- batch_resume --
-- Release a paused batch's claims: its waiting files, to enqueue again (their messages were
-- dropped while it was paused), and a limited batch's window of held files (migration 0023);
-- no row when it was not paused, a first row with no file when it was.
SELECT * FROM pipeline_batch_resume_v1(:name)

-- batch --
-- One batch as `status --batch` shows it, in one read over its own rows and indexes: the batch
-- row, its files by status (its counters' slots and its files processing, migration 0016), its
-- oldest waiting file (the pending index) and what it completed in the last minute (its
-- completions index). No row: no such batch.
SELECT b.name, b.task_name, b.created_at, b.submitted_by, b.file_count, b.state, b.concurrency,
       b.on_complete, b.callbacks,
       (SELECT coalesce(jsonb_object_agg(s.status, s.n) FILTER (WHERE s.n <> 0), '{}'::jsonb)
          FROM pipeline_batch_figures f
         CROSS JOIN LATERAL (VALUES ('pending', f.pending), ('processing', f.processing),
                                    ('completed', f.completed), ('failed', f.failed),
                                    ('dead', f.dead), ('cancelled', f.cancelled))
                            AS s (status, n)
         WHERE f.batch = b.name) AS counts,
       (SELECT min(c.submitted_at) FROM file_checkpoints c
         WHERE c.batch_id = b.name AND c.status = 'pending') AS oldest_waiting,
       (SELECT count(*) FROM file_checkpoints c
         WHERE c.status = 'completed' AND c.completed_at > now() - interval '60 seconds'
           AND c.batch_id = b.name) AS completed_last_minute,
       -- a limited batch's files held (0023; among its pending files); no other batch has any
       CASE WHEN b.concurrency IS NOT NULL THEN
           (SELECT count(*) FROM file_checkpoints c
             WHERE c.batch_id = b.name AND c.held AND c.status = 'pending') END AS held,
       now() AS db_now
  FROM pipeline_batches b
 WHERE b.name = :name

-- callback_summary --
-- The batch summary a completion callback row carries (written when the batch settled); no row
-- when the URL is not a callback's.
SELECT summary AS details FROM pipeline_batch_callbacks WHERE file_url = :file_url

-- database_trouble --
-- Database trouble the workers saw in the last day, one row per cause, the latest first.
SELECT cause, message, seen_by, first_at, last_at FROM pipeline_database_trouble
 WHERE last_at > now() - interval '1 day'
 ORDER BY last_at DESC

-- database_gap --
-- The last gap the database answered nobody of the fleet (the gap rule), if any.
SELECT gap_started_at, gap_ended_at, leases_extended FROM pipeline_fleet_contact
 WHERE gap_ended_at IS NOT NULL

-- record_trouble --
-- A spell of database trouble a worker saw, written once the database answers it again: the
-- same cause's row keeps the latest spell (a continuing spell keeps its first_at).
INSERT INTO pipeline_database_trouble AS t (cause, message, seen_by, first_at, last_at)
VALUES (:cause, :message, :seen_by, :first_at, :last_at)
ON CONFLICT (cause) DO UPDATE
   SET message = excluded.message, seen_by = excluded.seen_by, reported_at = now(),
       first_at = CASE WHEN t.last_at >= excluded.first_at - interval '1 minute'
                       THEN least(t.first_at, excluded.first_at) ELSE excluded.first_at END,
       last_at = greatest(t.last_at, excluded.last_at)
RETURNING cause

-- prune_attempts --
-- Up to :batch ended attempts that ended more than :older_than seconds ago, except each
-- file's :keep latest ones (by generation, attempt), deleted; the number deleted. The running
-- attempt lives on the checkpoint row and is never touched. Only files claimed more than once
-- can have more than :keep attempt rows (migration 0019): the files come from the partial
-- index of those, each one's attempts past its :keep latest from the (file_url, token) index.
WITH doomed AS (
    SELECT old.token
      FROM file_checkpoints c
     CROSS JOIN LATERAL (
           SELECT a.token, a.ended_at FROM file_attempts a
            WHERE a.file_url = c.file_url
            ORDER BY a.generation DESC, a.attempt DESC, a.token DESC
           OFFSET :keep) AS old
     WHERE (c.generation > 1 OR c.attempt > 1)
       AND (c.generation > 1 OR c.attempt > :keep)
       AND old.ended_at < clock_timestamp() - make_interval(secs => :older_than)
     LIMIT :batch
)
DELETE FROM file_attempts a USING doomed d WHERE a.token = d.token

-- chore_turn --
-- The turn of the periodic chore :name, taken if its last turn started :interval seconds ago
-- or more (or never): a row back means the caller does it now. One statement: of the sweeps
-- asking at once, the row lock lets one move the time on, and the others find it not due.
INSERT INTO pipeline_chores AS c (name, started_at) VALUES (:name, clock_timestamp())
ON CONFLICT (name) DO UPDATE SET started_at = excluded.started_at
 WHERE c.started_at <= excluded.started_at - make_interval(secs => :interval)
RETURNING c.started_at

-- forget_completed --
-- Up to :batch completed files completed more than :older_than seconds ago, deleted with
-- their history (ON DELETE CASCADE); the number of files. A resubmission of such a file runs
-- it again: its row was the memory that made one a no-op.
DELETE FROM file_checkpoints c
 WHERE c.file_url IN (
    SELECT f.file_url FROM file_checkpoints f
     WHERE f.status = 'completed'
       AND f.completed_at < clock_timestamp() - make_interval(secs => :older_than)
     LIMIT :batch
     FOR UPDATE SKIP LOCKED)
   AND c.status = 'completed'
