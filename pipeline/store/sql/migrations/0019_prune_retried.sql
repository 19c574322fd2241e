-- 0019: the prune reads only files that can have history to prune (issue 21, item 4).
-- A file's attempt rows are written one per claim: within a generation the claim counts them
-- (`attempt`), and earlier generations' rows exist only once `generation` > 1. So a file with
-- more attempt rows than the `keep` the prune leaves has generation > 1 or attempt > keep, and
-- a file claimed once (most files) never has anything to prune. The prune used to take its
-- candidates from every old attempt and check each for newer ones: with one attempt per file
-- a round read the whole old history to delete nothing (19.8 s at 10,000,000 rows,
-- bench/RESULTS.md). This index holds the files that have been claimed more than once; the
-- prune (queries.sql `prune_attempts`) starts from it. A claim's first UPDATE (attempt 0 to 1)
-- leaves the file out of it; only a retried file enters.
CREATE INDEX file_checkpoints_retried_idx ON file_checkpoints (file_url)
    WHERE generation > 1 OR attempt > 1;
