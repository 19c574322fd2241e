-- 0007: the hot functions keep their statements' plans (issue 12, item 3).
-- The store connects with plan_cache_mode = force_custom_plan (the stale-generic-plan trap of
-- shared/BASELINE.md), and plpgsql inherits it: every statement inside claim, complete and fail
-- was planned again on every call. Profiled with perf on the backend (bench/RESULTS.md), that
-- planning was a quarter of the database's CPU per claim + complete pair.
-- Inside these functions a generic plan is safe, and is what they now use: every statement
-- looks one file up by its primary key (the URL), so the right plan does not depend on the
-- parameters; what made a cached generic plan dangerous was a sequential scan chosen while the
-- table was small and kept as it grew. With enable_seqscan off for the length of the call, the
-- planner never chooses one where an index serves, at any table size, so the plan cached on an
-- empty table is the primary-key lookup it is at a million rows
-- (tests/integration/test_plans.py warms the caches on a near-empty table and reads the plans
-- used at 20,000 rows). The connection's own setting still applies everywhere else (the sweep,
-- register, status), where parameters do matter.
ALTER FUNCTION pipeline_claim_v3(text, text, double precision, integer, text, text, text,
                                 bigint[], bigint)
    SET plan_cache_mode = auto
    SET enable_seqscan = off;
ALTER FUNCTION pipeline_complete_v2(text, bigint, integer, integer, integer, integer, jsonb)
    SET plan_cache_mode = auto
    SET enable_seqscan = off;
ALTER FUNCTION pipeline_fail_v3(text, bigint, text, text, boolean, double precision)
    SET plan_cache_mode = auto
    SET enable_seqscan = off;
ALTER FUNCTION pipeline_abandon_v2(text, text, text)
    SET plan_cache_mode = auto
    SET enable_seqscan = off;
