//! Split brain and lost commits: the guards on the standby's promotion and the fencing of a
//! superseded old primary, on real servers as in tests/failover.rs.

mod common;

use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use common::{time_until, Options, Pair};

const BUDGET: Duration = Duration::from_secs(3);
const MARGIN: Duration = Duration::from_secs(12);

#[test]
fn an_old_primary_that_comes_back_after_a_failover_fences_itself() {
    let pair = Pair::connected("fence", Options::default());
    pair.node1
        .sql("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 10)")
        .unwrap();
    pair.node1.kill9();
    time_until(BUDGET + MARGIN, || pair.node2.in_recovery() == Some(false)).expect("no failover");
    pair.node2.sql("INSERT INTO t VALUES (11)").unwrap();

    // The old primary starts as a primary on the old timeline: it finds node2 on a newer one (so
    // quickly that pg_ctl may see it stop while it waits for the start).
    pair.node1.start_superseded();
    assert!(pair.node1.dir.join("standby.signal").exists());
    let log = pair.node1.log_text();
    assert!(
        log.contains(
            "HINT:  To rejoin it as a standby of the new primary, run: bin/rejoin --datadir"
        ),
        "{log}"
    );
    assert!(!log.contains("password"), "{log}");

    // Started again, it is a standby: it cannot accept a write, whatever the client sets.
    pair.node1.start();
    assert_eq!(pair.node1.in_recovery(), Some(true));
    let refused = pair
        .node1
        .sql("SET transaction_read_only = off; INSERT INTO t VALUES (12)")
        .unwrap_err();
    assert!(
        refused.contains("read-only") || refused.contains("recovery"),
        "{refused}"
    );
    // And it is not a candidate for promotion: it was never node2's synchronous standby.
    assert_eq!(pair.node2.sql("SELECT count(*) FROM t").unwrap(), "11");
}

#[test]
fn an_asynchronous_standby_is_not_promoted_unless_data_loss_is_allowed() {
    let pair = Pair::connected(
        "async-standby",
        Options {
            extra: "synchronous_standby_names = ''".into(),
            ..Options::default()
        },
    );
    sleep(Duration::from_secs(2));
    pair.node1.kill9();
    pair.node2
        .expect_log("was not its synchronous standby", BUDGET + MARGIN);
    sleep(Duration::from_secs(3));
    assert_eq!(
        pair.node2.in_recovery(),
        Some(true),
        "an asynchronous standby promoted"
    );
    assert_eq!(
        pair.node2
            .log_text()
            .matches("was not its synchronous standby")
            .count(),
        1,
        "said once"
    );

    pair.node2
        .sql("ALTER SYSTEM SET pg_keeper.allow_data_loss_failover = on")
        .unwrap();
    pair.node2.reload();
    time_until(BUDGET + MARGIN, || pair.node2.in_recovery() == Some(false))
        .expect("allow_data_loss_failover = on did not promote");
}

#[test]
fn a_standby_still_receiving_wal_does_not_promote_when_only_heartbeats_fail() {
    let mut pair = Pair::connected("wal-still-flows", Options::default());
    pair.node1
        .sql(
            "CREATE TABLE t (id int); \
             CREATE PROCEDURE w() LANGUAGE plpgsql AS $$ BEGIN FOR i IN 1..100 LOOP \
             INSERT INTO t VALUES (i); COMMIT; PERFORM pg_sleep(0.1); END LOOP; END $$",
        )
        .unwrap();
    // The standby's heartbeat session on the primary.
    let heartbeat_backend = pair
        .node1
        .sql("SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_keeper' AND backend_type = 'client backend'")
        .unwrap();
    assert!(!heartbeat_backend.is_empty(), "no heartbeat session found");
    // A writer keeps WAL flowing through the existing walsender.
    let mut writer = pair.node1.sql_background("CALL w()");
    sleep(Duration::from_millis(500));
    // Freeze only the postmaster: no new connection is answered, existing sessions run on.
    let postmaster = pair.node1.postmaster_pid().unwrap();
    let _ = Command::new("kill")
        .args(["-STOP", &postmaster.to_string()])
        .status();
    for pid in heartbeat_backend.lines() {
        let _ = Command::new("kill").args(["-TERM", pid]).status();
    }
    pair.node2
        .expect_log("still receives from it", BUDGET + MARGIN);
    let held = pair.node2.in_recovery() == Some(true);
    let _ = Command::new("kill")
        .args(["-CONT", &postmaster.to_string()])
        .status();
    let _ = writer.kill();
    let _ = writer.wait();
    assert!(held, "the standby promoted while it still received WAL");
    let problem = pair.node2.log_text();
    assert!(
        problem.contains("not promoting: primary node1"),
        "{problem}"
    );
    // The primary answers again: the pair is connected as before.
    pair.node2
        .expect_title("standby mode:connected", Duration::from_secs(10));
    assert_eq!(pair.node2.in_recovery(), Some(true));
    pair.node1.thaw();
}
