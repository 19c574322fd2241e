-- 0013: no session settings from the connection (issue 21, item 1).
-- The store used to connect with `options=-c plan_cache_mode=force_custom_plan`, a startup
-- parameter PgBouncer refuses ("unsupported startup parameter: options"). Behind a
-- transaction pooler a session setting cannot be relied on either: the next transaction may
-- run on another server connection. So every plpgsql function (the only ones whose plans
-- PostgreSQL caches across calls) carries the setting it needs itself: the hot ones keep the
-- cached primary-key plans of migrations 0007 and 0011 (plan_cache_mode = auto with
-- enable_seqscan off); every other one (the sweep, the fence, a lost claim, and whatever an
-- earlier migration of this chain added since) plans each statement with its parameters, as
-- the connection's setting made them do. A function added later must say its own.
-- The client's statements: behind a transaction pooler they are never prepared (each is
-- planned with its parameters); otherwise the store sets the session itself after connecting
-- (pipeline/store/postgres/link.py).
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure
          FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = current_schema()::regnamespace
           AND p.proname LIKE 'pipeline\_%'
           AND l.lanname = 'plpgsql'
           AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) AS c(setting)
                            WHERE c.setting LIKE 'plan\_cache\_mode=%')
         ORDER BY p.proname
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET plan_cache_mode = force_custom_plan', f);
    END LOOP;
END
$$;
