-- Named queries: each block starts with `-- name --` and a line describing it.
-- Parameters use SQLAlchemy's :name form.

-- claim --
-- Claim a file (grant, with the position to resume from, or refuse with done / busy / not_due /
-- dead); see pipeline_claim_v4.
SELECT * FROM pipeline_claim_v4(:file_url, :worker, :lease_seconds, :max_attempts,
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
-- Mark the current claim completed with its stats; false when the token is stale.
SELECT pipeline_complete_v3(:file_url, :token, :total, :filtered, :persisted,
                            :processing_time_ms, CAST(:details AS jsonb)) AS ok

-- fail --
-- Record a failed execution: failed (retry no earlier than :retry_in seconds from now) or
-- dead; no row when the token is stale.
SELECT * FROM pipeline_fail_v4(:file_url, :token, :error_class, :error_message, :retryable,
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
-- The attempt history of one file, oldest first, the running one included (pipeline_attempts).
SELECT generation, attempt, token, worker, started_at, ended_at, outcome, error_class,
       error_message, start_position, end_position, chunks
  FROM pipeline_attempts WHERE file_url = :file_url ORDER BY token

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
           c.file_url IS NULL
           OR (c.status IN ('completed', 'dead')
               AND i.fingerprint IS NOT NULL AND c.fingerprint IS NOT NULL
               AND i.fingerprint <> c.fingerprint) AS candidate
      FROM input i
      LEFT JOIN file_checkpoints c ON c.file_url = i.file_url
), upserted AS (
    INSERT INTO file_checkpoints AS c (file_url, file_type, status, max_attempts, task_name,
                                       batch_id, fingerprint)
    SELECT k.file_url, :file_type, 'pending', :max_attempts, :task_name, :batch_id, k.fingerprint
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
           fingerprint = excluded.fingerprint, batch_id = excluded.batch_id,
           task_name = excluded.task_name, max_attempts = excluded.max_attempts,
           updated_at = now()
     -- checked again on the row as it is now: a concurrent register (another watch of the
     -- same prefix) may have inserted or regenerated it since the snapshot; then it is theirs
     WHERE c.status IN ('completed', 'dead')
       AND excluded.fingerprint IS NOT NULL AND c.fingerprint IS NOT NULL
       AND excluded.fingerprint <> c.fingerprint
    RETURNING c.file_url, c.status, c.task_name
)
SELECT k.file_url,
       -- 'pending' when a concurrent register inserted the row after this statement's
       -- snapshot: it is theirs to enqueue, and this statement cannot see it
       coalesce(u.status, k.status, 'pending') AS status,
       u.file_url IS NOT NULL OR coalesce(k.status = 'pending', false) AS needs_task,
       coalesce(u.task_name, k.task_name) AS task_name,
       CASE WHEN u.file_url IS NULL THEN 'unchanged'
            WHEN k.existed THEN 'changed'
            ELSE 'new' END AS change
  FROM known k
  LEFT JOIN upserted u ON u.file_url = k.file_url
 WHERE NOT CAST(:changes_only AS boolean) OR u.file_url IS NOT NULL

-- requeue --
-- Operator requeue: dead / failed (and completed with force) rows back to pending, in a new
-- generation; the attempt history is kept.
UPDATE file_checkpoints
   SET status = 'pending', attempt = 0, generation = generation + 1, token = NULL,
       lease_expires_at = NULL, retry_at = NULL, error_message = NULL, completed_at = NULL,
       records_total = 0, records_filtered = 0, records_persisted = 0, processing_time_ms = 0,
       details = NULL, attempts_spent = 0, attempt_chunks = 0, position = NULL,
       position_version = NULL, attempt_start_position = NULL, progress_bytes = NULL,
       size_bytes = NULL, progress_at = NULL, updated_at = now()
 WHERE status = ANY(CAST(:statuses AS text[]))
   AND (status IN ('dead', 'failed') OR (status = 'completed' AND :force))
   AND (CAST(:file_url AS text) IS NULL OR file_url = :file_url)
   AND (CAST(:batch_id AS text) IS NULL OR batch_id = :batch_id)
RETURNING file_url, task_name, status

-- reap --
-- The sweep: expired claims, overdue retries, rows waiting too long; see pipeline_reap_v4.
SELECT * FROM pipeline_reap_v4(:waiting_seconds, :limit, :overdue_seconds)

-- summary --
-- Counts by batch and status.
SELECT batch_id, status, count(*) AS n FROM file_checkpoints
 WHERE CAST(:batch_id AS text) IS NULL OR batch_id = :batch_id
 GROUP BY batch_id, status

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
-- first claim to its last file's end (completed, or dead), on the database's clock.
SELECT coalesce(sum(records_total) FILTER (WHERE status = 'completed'), 0) AS total,
       coalesce(sum(records_filtered) FILTER (WHERE status = 'completed'), 0) AS filtered,
       coalesce(sum(records_persisted) FILTER (WHERE status = 'completed'), 0) AS persisted,
       extract(epoch FROM
           max(CASE status WHEN 'completed' THEN completed_at WHEN 'dead' THEN updated_at END)
           - min(started_at)) AS seconds
  FROM file_checkpoints
 WHERE batch_id = :batch_id

-- dead --
-- The latest dead files with their errors.
SELECT file_url, error_message, updated_at, attempt FROM file_checkpoints
 WHERE status = 'dead' AND (CAST(:batch_id AS text) IS NULL OR batch_id = :batch_id)
 ORDER BY updated_at DESC
 LIMIT :limit

-- attempt_outcomes --
-- Executions by outcome, for the metrics (the running ones from the checkpoint rows).
SELECT outcome, count(*) AS n FROM pipeline_attempts GROUP BY outcome

-- abandon --
-- Release the claim of a process known to be dead; see pipeline_abandon_v3.
SELECT * FROM pipeline_abandon_v3(:file_url, :worker, :task_id)

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
-- by the token; extends the lease. No row when the token is stale. See pipeline_commit_chunk_v1.
SELECT * FROM pipeline_commit_chunk_v1(:file_url, :token, CAST(:position AS jsonb), :version,
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
