-- 0017: chores the fleet's sweeps take in turn (issue 21, item 4).
-- Every worker runs the sweep; a chore it may do besides (the prune of attempt history,
-- PIPELINE_PRUNE_AFTER) must run once per interval in the whole fleet, not once per worker,
-- and never twice at once. Each chore has a row here with when its last turn started; a
-- worker takes a turn with one statement (queries.sql `chore_turn`) that succeeds for one
-- caller per interval.
CREATE TABLE pipeline_chores (
    name       text PRIMARY KEY,
    started_at timestamptz NOT NULL
);
