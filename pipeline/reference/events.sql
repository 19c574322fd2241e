-- The reference task's SQL, run in the file's output transaction (see task.py).

-- delete_events --
-- Run first: a file's events are those of its latest run only (a new generation, changed
-- content or requeue --force, replaces the old records).
DELETE FROM events WHERE file_url = :file_url

-- copy_events --
-- After the delete: the file's old events are gone, so the unique (file_url, line) cannot
-- conflict and a plain COPY does (no ON CONFLICT). Rows are ingest.copy_rows() tuples, in
-- this column order.
COPY events (file_url, line, event_id, ts, type, payload) FROM STDIN
