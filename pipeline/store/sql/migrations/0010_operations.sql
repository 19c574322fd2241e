-- 0010: what the dashboard, the alert rules and the traces read (issue 23).
-- (0008 and 0009 are reserved for work on other branches; the chain applies by number.)

-- When the current generation was submitted (register, a regeneration, a requeue): the start
-- of the pickup latency and of a pending file's age. `created_at` is the first submit only,
-- and `updated_at` moves with the sweep. No backfill: a rewrite of every row would lock a big
-- table for the length of the upgrade; readers take coalesce(submitted_at, created_at).
ALTER TABLE file_checkpoints ADD COLUMN submitted_at timestamptz;
ALTER TABLE file_checkpoints ALTER COLUMN submitted_at SET DEFAULT now();

-- The OpenTelemetry trace an attempt ran in (32 hex digits), written after a granted claim
-- when tracing is on; `pipeline status --file` prints it.
ALTER TABLE file_attempts ADD COLUMN trace_id text;

-- Attempts that ended in the last window (the metrics' window), without reading the history.
CREATE INDEX file_attempts_ended_at_idx ON file_attempts (ended_at);

-- Worker main processes, seen by their sweep thread every PIPELINE_REAP_INTERVAL: the
-- dashboard's live workers and the "no worker heartbeat" alert. A clean stop deletes its row;
-- a lost worker's row stays with its last `seen_at` until a day later.
CREATE TABLE pipeline_workers (
    worker text PRIMARY KEY,
    pid integer NOT NULL,
    interval_seconds double precision NOT NULL CHECK (interval_seconds > 0),
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now()
);
