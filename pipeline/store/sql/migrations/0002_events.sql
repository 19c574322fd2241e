-- 0002: the reference ingest task's sink, written inside the checkpoint transaction.
-- One row per valid record; (file_url, line) is its identity, so a re-run of a file
-- (requeue --force, changed content) cannot insert a record twice.

CREATE TABLE events (
    id          bigserial PRIMARY KEY,
    file_url    text NOT NULL,
    line        integer NOT NULL CHECK (line >= 1),
    event_id    text NOT NULL,
    ts          timestamptz NOT NULL,
    type        text NOT NULL,
    payload     jsonb NOT NULL DEFAULT '{}',
    inserted_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_file_line_key UNIQUE (file_url, line)
);

-- Queries over the sink read one type over a time range.
CREATE INDEX events_type_ts_idx ON events (type, ts);
