-- 0022: the takeover fence ends the sessions of its own database only.
-- pipeline_fence_v1 ended every session named `pipeline-claim:<token>` on the server. Tokens
-- are numbered per database (each has its own sequence), so two pipeline databases on one
-- server (two teams, staging beside production, a test suite's databases) share token
-- numbers: a takeover in one ended the output transaction of a live, healthy claim in the
-- other, which then rolled back and ran its file again. Same signature and settings, so
-- workers of the previous release get the fix with the upgrade.
CREATE OR REPLACE FUNCTION pipeline_fence_v1(p_token bigint) RETURNS integer
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    v_pid   integer;
    v_n     integer := 0;
BEGIN
    FOR v_pid IN
        SELECT a.pid FROM pg_stat_activity a
         WHERE a.application_name = 'pipeline-claim:' || p_token
           AND a.datname = current_database() AND a.pid <> pg_backend_pid()
    LOOP
        BEGIN
            IF pg_terminate_backend(v_pid) THEN
                v_n := v_n + 1;
            END IF;
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;
        END;
    END LOOP;
    RETURN v_n;
END;
$$;
