-- 0015: less database CPU per claim + complete pair (issue 24). Same signatures, same
-- outcomes, same locks; each change below is separate, with the instructions per pair it saved
-- (callgrind on PostgreSQL 15, bench/profile_instructions.py; figures in bench/RESULTS.md).

-- (1) The end of an attempt in PL/pgSQL instead of SQL. PostgreSQL up to 17 parses, analyses
-- and plans the statement of a LANGUAGE sql function on every call (it is not inlined: it
-- writes); PL/pgSQL keeps the prepared statement for the session. Every completion, failure
-- and lost attempt calls this once. The statement is the one of migration 0011, unchanged.
CREATE OR REPLACE FUNCTION pipeline_attempt_end_v1(
    r file_checkpoints, p_ended_at timestamptz, p_outcome text, p_error_class text,
    p_error_message text, p_retry_at timestamptz
) RETURNS void
LANGUAGE plpgsql AS $$
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
