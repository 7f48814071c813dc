-- The status view, and who may read the status or pause the keeper.

CREATE VIEW pg_keeper_status AS SELECT * FROM pg_keeper_status();
COMMENT ON VIEW pg_keeper_status IS
    'What the pg_keeper_rs worker of this server is doing, as its process title shows it, and why';
COMMENT ON FUNCTION pg_keeper_events() IS
    'The recent events of the pg_keeper_rs worker of this server, oldest first';
COMMENT ON FUNCTION pg_keeper_pause(interval) IS
    'Pause automatic actions (promotion, switch to or from async); heartbeats and reporting go on';
COMMENT ON FUNCTION pg_keeper_resume() IS 'End a pause of pg_keeper_rs';

-- Monitoring roles read the status; only superusers (or roles granted EXECUTE) pause.
REVOKE ALL ON FUNCTION pg_keeper_status() FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_keeper_events() FROM PUBLIC;
REVOKE ALL ON pg_keeper_status FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pg_keeper_status() TO pg_monitor;
GRANT EXECUTE ON FUNCTION pg_keeper_events() TO pg_monitor;
GRANT SELECT ON pg_keeper_status TO pg_monitor;
REVOKE ALL ON FUNCTION pg_keeper_pause(interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION pg_keeper_resume() FROM PUBLIC;
