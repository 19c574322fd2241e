-- 0004: release the claim of a process known to be dead, without waiting for its lease.
-- The worker's main process sees its pool child die (SIGKILL, OOM) and calls this for the
-- task the child was running; the claim is matched by the child's `node:pid` and the task id,
-- which no live execution can share, so it is treated as an expired lease now.
CREATE FUNCTION pipeline_abandon_v1(p_file_url text, p_worker text, p_task_id text)
RETURNS TABLE (status text, attempt integer, max_attempts integer)
LANGUAGE plpgsql AS $$
DECLARE
    r file_checkpoints%ROWTYPE;
BEGIN
    SELECT * INTO r FROM file_checkpoints c
     WHERE c.file_url = p_file_url AND c.status = 'processing'
       AND c.processed_by = p_worker AND c.task_id IS NOT DISTINCT FROM p_task_id
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;  -- completed, failed or taken over already: nothing of the dead process left
    END IF;
    PERFORM pipeline_fence_v1(r.token);
    UPDATE file_attempts a
       SET outcome = 'lost', ended_at = now(), error_class = 'WorkerLost',
           error_message = format('process %s died while running the file', p_worker)
     WHERE a.token = r.token AND a.outcome = 'running';
    UPDATE file_checkpoints c
       SET status = CASE WHEN c.attempt < c.max_attempts THEN 'failed' ELSE 'dead' END,
           error_message = CASE WHEN c.attempt < c.max_attempts
               THEN format('worker process %s died on attempt %s of %s; will retry', p_worker, c.attempt, c.max_attempts)
               ELSE format('worker lost: process %s died on attempt %s of %s', p_worker, c.attempt, c.max_attempts) END,
           lease_expires_at = NULL, updated_at = now()
     WHERE c.file_url = p_file_url
    RETURNING c.* INTO r;
    RETURN QUERY SELECT r.status, r.attempt, r.max_attempts;
END;
$$;
