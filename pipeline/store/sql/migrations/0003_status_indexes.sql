-- 0003: indexes for `pipeline status` and the metrics: recent completions, latest dead files.
CREATE INDEX file_checkpoints_completed_at_idx
    ON file_checkpoints (completed_at) WHERE status = 'completed';
CREATE INDEX file_checkpoints_dead_idx
    ON file_checkpoints (updated_at) WHERE status = 'dead';
