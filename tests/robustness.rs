//! Never stop protecting silently: bad input, peers that answer but refuse, restarts and crashes
//! of the worker and its servers, the automatic return to synchronous replication, an
//! after_command that misbehaves, and passwords. Real servers, as in tests/failover.rs.

mod common;

use std::fs;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    time_until, wait_until, Node, Options, Pair, Sessions, Single, BIN, SWITCHING_TO_ASYNC,
};

const BUDGET: Duration = Duration::from_secs(3);
const MARGIN: Duration = Duration::from_secs(12);

#[test]
fn bad_settings_are_rejected_with_the_setting_named_and_the_old_value_kept() {
    let other = common::free_port();
    let single = Single::start("bad-settings", "");
    let n = &single.node;
    n.append_conf(&format!(
        "pg_keeper.node1_conninfo = '{}'\npg_keeper.node2_conninfo = 'host=127.0.0.1 port={other} dbname=postgres'\n\
         pg_keeper.keepalive_time = 2s\npg_keeper.keepalive_count = 2",
        n.conninfo()
    ));
    n.reload();
    n.expect_title("master mode", Duration::from_secs(10));
    let keeper = n.keeper_pid();
    let conf_path = n.dir.join("postgresql.conf");
    let good_conf = fs::read_to_string(&conf_path).unwrap();

    // Rejected at once when set with ALTER SYSTEM.
    let err = n
        .sql("ALTER SYSTEM SET pg_keeper.keepalive_time = '10ms'")
        .unwrap_err();
    assert!(
        err.contains("pg_keeper.keepalive_time")
            && err.contains("shortest heartbeat interval is 100ms"),
        "{err}"
    );
    // The floor itself is accepted, however its unit conversion rounds.
    n.sql("ALTER SYSTEM SET pg_keeper.keepalive_time = '100ms'")
        .unwrap();
    n.sql("ALTER SYSTEM SET pg_keeper.keepalive_time = 0.1")
        .unwrap();
    n.sql("ALTER SYSTEM RESET pg_keeper.keepalive_time")
        .unwrap();
    let err = n
        .sql("ALTER SYSTEM SET pg_keeper.node1_conninfo = 'host=x bogus'")
        .unwrap_err();
    assert!(
        err.contains("pg_keeper.node1_conninfo") && err.contains("does not parse"),
        "{err}"
    );

    // Rejected on reload from postgresql.conf, each naming the setting; the old value stays.
    let cases = [
        ("pg_keeper.keepalive_time = 0", "pg_keeper.keepalive_time", "shortest heartbeat interval is 100ms"),
        ("pg_keeper.keepalive_time = -1", "pg_keeper.keepalive_time", "outside the valid range"),
        ("pg_keeper.keepalive_time = '50ms'", "pg_keeper.keepalive_time", "shortest heartbeat interval is 100ms"),
        ("pg_keeper.keepalive_time = '99ms'", "pg_keeper.keepalive_time", "shortest heartbeat interval is 100ms"),
        ("pg_keeper.keepalive_count = 0", "pg_keeper.keepalive_count", "outside the valid range"),
        ("pg_keeper.keepalive_count = -3", "pg_keeper.keepalive_count", "outside the valid range"),
        ("pg_keeper.node1_conninfo = 'port=5432 bogus'", "pg_keeper.node1_conninfo", "does not parse"),
        ("pg_keeper.node1_conninfo = ''", "pg_keeper.node1_conninfo", "is empty"),
        (
            "pg_keeper.node2_conninfo = 'host=127.0.0.1 port=NODE1PORT dbname=postgres user=postgres'",
            "pg_keeper.node2_conninfo",
            "same as pg_keeper.node1_conninfo",
        ),
        ("pg_keeper.witness_conninfo = 'host=127.0.0.1 bogus'", "pg_keeper.witness_conninfo", "does not parse"),
        (
            "pg_keeper.witness_conninfo = 'host=127.0.0.1 port=NODE1PORT dbname=postgres user=postgres'",
            "pg_keeper.witness_conninfo",
            "the witness must be a third server",
        ),
    ];
    for (line, setting, reason) in cases {
        let line = line.replace("NODE1PORT", &n.port.to_string());
        let before = n.sql(&format!("SHOW {setting}")).unwrap();
        let errors_before = n.log_text().matches("contains errors").count();
        n.append_conf(&line);
        n.reload();
        assert!(
            wait_until(Duration::from_secs(10), || n
                .log_text()
                .matches("contains errors")
                .count()
                > errors_before),
            "no error reported for {line}:\n{}",
            n.log_text()
        );
        let log = n.log_text();
        assert!(
            log.contains(&format!("\"{setting}\"")) && log.contains(reason),
            "{line}: {log}"
        );
        assert_eq!(
            n.sql(&format!("SHOW {setting}")).unwrap(),
            before,
            "{line} changed the value"
        );
        fs::write(&conf_path, &good_conf).unwrap();
        n.reload();
    }
    assert_eq!(n.keeper_pid(), keeper, "the worker must stay up");
    assert!(n.title_is("master mode"), "{:?}", n.title());
}

#[test]
fn refused_credentials_are_reported_once_and_retried_and_no_password_is_printed() {
    // The conninfos carry passwords from the start (a reload that changes them makes PostgreSQL
    // itself log the new value; see the README on passfile).
    let (port, other) = (common::free_port(), common::free_port());
    let single = Single::start_on_port(
        "credentials",
        port,
        &format!(
            "pg_keeper.keepalive_time = 1s\n\
             pg_keeper.node1_conninfo = 'host=127.0.0.1 port={port} dbname=postgres user=keeper password=pw-cred-secret'\n\
             pg_keeper.node2_conninfo = 'postgresql://keeper:pw-uri-secret@127.0.0.1:{other}/postgres'"
        ),
        "host all keeper 127.0.0.1/32 scram-sha-256",
    );
    let n = &single.node;
    // The role does not exist yet: the server refuses, the keeper says so once, with a hint.
    n.expect_log("neither node is this server", Duration::from_secs(10));
    n.expect_title("configuration error", Duration::from_secs(5));
    sleep(Duration::from_secs(3));
    assert_eq!(
        n.log_text().matches("neither node is this server").count(),
        1
    );

    // The operator creates the role: retried every keepalive_time, no reload needed.
    n.sql("CREATE ROLE keeper LOGIN PASSWORD 'pw-cred-secret'")
        .unwrap();
    n.expect_log("started in master mode as node1", Duration::from_secs(10));
    n.expect_title("master mode", Duration::from_secs(5));

    let log = n.log_text();
    assert!(
        log.contains("password authentication failed") || log.contains("does not exist"),
        "{log}"
    );
    assert!(
        !log.contains("pw-cred-secret") && !log.contains("pw-uri-secret"),
        "a password was logged:\n{log}"
    );
    assert!(!n.title().unwrap().contains("secret"));
}

#[test]
fn a_peer_at_max_connections_is_alive_and_not_failed_over() {
    let pair = Pair::connected(
        "max-connections",
        Options {
            extra: "max_connections = 8\nsuperuser_reserved_connections = 1".into(),
            ..Options::default()
        },
    );
    // The standby's keeper reconnects when it starts again, while the primary is full.
    pair.node2.stop("fast");
    let mut sessions = Sessions(Vec::new());
    let full = wait_until(Duration::from_secs(30), || {
        match pair.node1.sql("SELECT 1") {
            Err(e) if e.contains("too many clients") => true,
            _ => {
                sessions
                    .0
                    .push(pair.node1.sql_background("SELECT pg_sleep(60)"));
                sleep(Duration::from_millis(200));
                false
            }
        }
    });
    assert!(full, "could not fill the primary's connections");
    pair.node2.start();
    pair.node2
        .expect_log("too many clients", Duration::from_secs(10));
    sleep(BUDGET * 3);
    assert_eq!(
        pair.node2.in_recovery(),
        Some(true),
        "the standby promoted although the primary answered"
    );
    let log = pair.node2.keeper_log().join("\n");
    assert!(log.contains("is alive but refused the heartbeat"), "{log}");
    assert!(!log.contains("promoting this standby"), "{log}");
    // The primary may have switched to async (and back) while the standby was down; the
    // standby must not have promoted.
    let runs = pair.after_commands();
    assert!(!runs.iter().any(|r| r.starts_with("promote")), "{runs:?}");
    drop(sessions);
    pair.node2
        .expect_title("standby mode:connected", Duration::from_secs(10));
}

#[test]
fn a_standby_started_while_the_primary_is_down_waits_to_see_it_before_arming() {
    let pair = Pair::connected("never-seen", Options::default());
    pair.node2.stop("fast");
    pair.node1.stop("fast");
    pair.node2.start();
    pair.node2
        .expect_title("standby mode", Duration::from_secs(10));
    sleep(BUDGET * 3);
    assert_eq!(
        pair.node2.in_recovery(),
        Some(true),
        "a fresh standby promoted itself"
    );
    assert!(
        pair.node2.title_is("standby mode"),
        "{:?}",
        pair.node2.title()
    );
    let log = pair.node2.log_text();
    assert_eq!(
        log.matches("automatic failover is not armed").count(),
        1,
        "said once: {log}"
    );

    // Once the primary has answered, failover is armed.
    pair.node1.start();
    pair.node2
        .expect_title("standby mode:connected", Duration::from_secs(15));
    pair.wait_synchronous();
    pair.node1.kill9();
    time_until(BUDGET + MARGIN, || pair.node2.in_recovery() == Some(false))
        .expect("no promotion after arming");
}

#[test]
fn the_worker_comes_back_after_termination_and_after_its_own_crash() {
    let pair = Pair::connected(
        "worker-crash",
        Options {
            keepalive_count: 10,
            ..Options::default()
        },
    );

    // pg_terminate_backend (SIGTERM): restarted by the postmaster, same mode.
    pair.node1.kill_keeper("-TERM");
    pair.node1
        .expect_title("master mode:connected", Duration::from_secs(15));

    // kill -9 of the worker: the server goes through crash recovery and the worker resumes.
    pair.node2.kill_keeper("-9");
    pair.node2
        .expect_title("standby mode:connected", Duration::from_secs(30));
    assert_eq!(pair.node2.in_recovery(), Some(true));
    pair.node1.kill_keeper("-9");
    pair.node1
        .expect_title("master mode:connected", Duration::from_secs(30));
    assert_eq!(
        pair.node2.in_recovery(),
        Some(true),
        "a crash-restart of the primary is not a failover"
    );
    assert!(
        pair.after_commands().is_empty(),
        "{:?}",
        pair.after_commands()
    );
}

#[test]
fn a_second_standby_is_warned_about_and_losing_the_peer_still_degrades() {
    let mut pair = Pair::connected("second-standby", Options::default());
    pair.add_standby("node3");
    pair.node1
        .expect_log("2 standbys are streaming", Duration::from_secs(15));
    assert!(
        pair.node1.log_text().contains("heartbeats node2"),
        "{}",
        pair.node1.log_text()
    );
    pair.node2.kill9();
    pair.node1
        .expect_title("master mode:async", BUDGET + MARGIN);
    assert!(pair.the_one_after_command().starts_with("async node1"));
    assert_eq!(
        pair.node1.sql("SHOW synchronous_standby_names").unwrap(),
        ""
    );
}

#[test]
fn synchronous_replication_is_restored_after_the_standby_returns_and_catches_up() {
    // A 5s budget leaves room to show a commit blocking on a frozen standby.
    let mut pair = Pair::connected(
        "sync-restore",
        Options {
            keepalive_count: 5,
            ..Options::default()
        },
    );
    pair.node1
        .sql("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .unwrap();

    pair.node2.kill9();
    pair.node1
        .expect_title("master mode:async", Duration::from_secs(5) + MARGIN);
    assert_eq!(
        pair.node1.sql("SHOW synchronous_standby_names").unwrap(),
        ""
    );
    pair.node1
        .sql("INSERT INTO t SELECT generate_series(2, 5000)")
        .unwrap();

    // The saved value survives a restart of the primary.
    pair.node1.restart();
    pair.node1
        .expect_title("master mode", Duration::from_secs(15));
    assert_eq!(
        pair.node1
            .sql("SHOW pg_keeper.saved_synchronous_standby_names")
            .unwrap(),
        "node1, node2"
    );

    pair.node2.start();
    let took = time_until(Duration::from_secs(30), || {
        pair.node1
            .sql("SHOW synchronous_standby_names")
            .ok()
            .as_deref()
            == Some("node1, node2")
    })
    .expect("synchronous replication was not restored");
    eprintln!("sync restore: {took:?} after the standby started");
    pair.node1
        .expect_log("restored synchronous replication", Duration::from_secs(5));
    pair.node1
        .expect_title("master mode:connected", Duration::from_secs(5));
    assert_eq!(
        pair.node1
            .sql("SHOW pg_keeper.saved_synchronous_standby_names")
            .unwrap(),
        ""
    );
    assert_eq!(pair.node2.sql("SELECT count(*) FROM t").unwrap(), "5000");

    // Synchronous for real: a commit waits while the standby is frozen.
    pair.node2.freeze();
    let mut blocked = pair.node1.sql_background("INSERT INTO t VALUES (5001)");
    sleep(Duration::from_millis(1500));
    let waited = blocked.try_wait().unwrap().is_none();
    pair.node2.thaw();
    assert!(
        waited,
        "the commit did not wait for the synchronous standby"
    );
    assert!(wait_until(Duration::from_secs(10), || matches!(
        blocked.try_wait(),
        Ok(Some(_))
    )));
    assert!(blocked.wait().unwrap().success());

    // A second loss degrades again.
    pair.node2.kill9();
    pair.node1
        .expect_title("master mode:async", Duration::from_secs(5) + MARGIN);
    assert!(wait_until(Duration::from_secs(10), || pair
        .after_commands()
        .len()
        >= 3));
    let events: Vec<String> = pair
        .after_commands()
        .iter()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(events, ["async", "sync_restored", "async"]);
}

#[test]
fn with_sync_restore_off_replication_stays_asynchronous() {
    let pair = Pair::connected(
        "sync-restore-off",
        Options {
            extra: "pg_keeper.sync_restore = off".into(),
            ..Options::default()
        },
    );
    pair.node2.kill9();
    pair.node1
        .expect_title("master mode:async", BUDGET + MARGIN);
    pair.node2.start();
    pair.node1
        .expect_title("master mode:connected", Duration::from_secs(20));
    sleep(Duration::from_secs(4));
    assert_eq!(
        pair.node1.sql("SHOW synchronous_standby_names").unwrap(),
        ""
    );
    assert_eq!(
        pair.the_one_after_command().split(' ').next(),
        Some("async")
    );
}

#[test]
fn after_command_that_prints_hangs_or_fails_cannot_hurt() {
    let extra = "pg_keeper.after_command_timeout = 2s\n\
        pg_keeper.after_command = 'echo \"marker-out $PG_KEEPER_EVENT $PG_KEEPER_PEER_NAME $PG_KEEPER_PEER_HOST:$PG_KEEPER_PEER_PORT tl=$PG_KEEPER_TIMELINE\"; \
        echo marker-err >&2; if [ $PG_KEEPER_EVENT = async ]; then sleep 600; else exit 3; fi'";
    let pair = Pair::connected(
        "after-command",
        Options {
            extra: extra.into(),
            ..Options::default()
        },
    );
    pair.node1.sql("CREATE TABLE t (id int)").unwrap();

    pair.node2.kill9();
    let started = Instant::now();
    pair.node1
        .expect_title("master mode:async", BUDGET + MARGIN);
    // Printed, to the server log.
    pair.node1.expect_log(
        &format!("marker-out async node2 127.0.0.1:{} tl=1", pair.node2.port),
        Duration::from_secs(5),
    );
    pair.node1.expect_log("marker-err", Duration::from_secs(5));
    // While it hangs, the keeper goes on: commits work and the title is current.
    pair.node1.sql("INSERT INTO t VALUES (1)").unwrap();
    pair.node1.expect_log(
        "did not finish within pg_keeper.after_command_timeout (2s) and was killed",
        Duration::from_secs(10),
    );
    assert!(started.elapsed() < BUDGET + MARGIN + Duration::from_secs(10));
    let sleepers = std::process::Command::new("pgrep")
        .args(["-f", "sleep 600"])
        .output()
        .unwrap();
    assert!(
        sleepers.stdout.is_empty(),
        "the command's children were not killed"
    );

    // A failing command: its status is logged as a warning.
    pair.node2.start();
    pair.node1.expect_log(
        "after_command for event sync_restored",
        Duration::from_secs(30),
    );
    pair.node1
        .expect_log("exited with status 3", Duration::from_secs(10));
    assert!(pair
        .node1
        .log_text()
        .contains("WARNING:  pg_keeper: after_command for event sync_restored"));
}

#[test]
fn no_password_reaches_the_log_the_title_or_after_command() {
    // A witness whose conninfo carries a password too (trust authentication: never checked).
    // fsync = on: the keepers refuse a witness without it.
    let witness = Single::start("passwords-witness", "fsync = on");
    let pair = Pair::connected(
        "passwords",
        Options {
            passwords: true,
            extra: format!(
                "pg_keeper.after_command = 'env | grep ^PG_KEEPER_ | sort >> @ROOT@/env.txt'\n\
                 pg_keeper.witness_conninfo = 'host=127.0.0.1 port={} dbname=postgres user=postgres password=pw-witness-secret'",
                witness.node.port
            ),
            ..Options::default()
        },
    );
    assert!(
        wait_until(Duration::from_secs(20), || witness
            .node
            .sql("SELECT sync_standby FROM pg_keeper_lease")
            .is_ok_and(|s| s == "node2")),
        "the lease does not name node2"
    );
    pair.node1.kill9();
    time_until(BUDGET + MARGIN, || pair.node2.in_recovery() == Some(false)).expect("no promotion");
    let env_file = pair.root.join("env.txt");
    assert!(wait_until(Duration::from_secs(10), || fs::read_to_string(
        &env_file
    )
    .is_ok_and(|t| t.contains("PG_KEEPER_EVENT=promote"))));
    sleep(Duration::from_secs(1));
    let env = fs::read_to_string(&env_file).unwrap();
    let peer = env
        .lines()
        .find(|l| l.starts_with("PG_KEEPER_PEER_CONNINFO="))
        .unwrap_or_default();
    let port = format!("port={}", pair.node1.port);
    assert!(
        peer.contains("host=127.0.0.1") && peer.contains(&port),
        "{env}"
    );
    assert!(
        env.contains("PG_KEEPER_NODE_CONNINFO=") && env.contains("user=postgres"),
        "{env}"
    );
    let titles = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    let everything = format!(
        "{}\n{}\n{}\n{}",
        pair.node1.log_text(),
        pair.node2.log_text(),
        env,
        String::from_utf8_lossy(&titles.stdout)
    );
    assert!(everything.contains("took the lease on the witness"));
    for secret in ["pw-kv-secret", "pw-uri-secret", "pw-witness-secret"] {
        assert!(!everything.contains(secret), "{secret} was printed");
    }
}

#[test]
fn hot_standby_off_on_the_standby_is_reported_and_replication_is_untouched() {
    let pair = Pair::connected("hot-standby-off", Options::default());
    pair.node1
        .sql("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .unwrap();
    pair.node2.stop("fast");
    pair.node2.append_conf("hot_standby = off");
    pair.node2.start();
    pair.node2.expect_log(
        "hot_standby is off on this standby",
        Duration::from_secs(10),
    );
    assert!(pair
        .node2
        .log_text()
        .contains("HINT:  Set hot_standby = on"));
    // Replication goes on: the primary's commits are confirmed by the standby as before.
    assert!(wait_until(Duration::from_secs(20), || pair
        .node1
        .sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'node2'")
        .is_ok_and(|s| s == "sync")));
    pair.node1.sql("INSERT INTO t VALUES (2)").unwrap();
    pair.node1
        .expect_title("master mode:connected", Duration::from_secs(5));
    assert!(
        pair.node2.title().is_none(),
        "no keeper can run on a cold standby"
    );
}

#[test]
fn a_standby_that_synchronous_standby_names_does_not_name_is_reported() {
    let pair = Pair::connected("sync-name-mismatch", Options::default());
    pair.node1.sql("CREATE EXTENSION pg_keeper_rs").unwrap();
    let keeper = pair.node1.keeper_pid();
    pair.node1
        .sql("ALTER SYSTEM SET synchronous_standby_names = 'elsewhere'")
        .unwrap();
    pair.node1.reload();
    pair.node1.expect_log(
        "is streaming but is not synchronous",
        Duration::from_secs(10),
    );
    let log = pair.node1.log_text();
    assert!(
        log.contains("HINT:  Set application_name in the standby's primary_conninfo"),
        "{log}"
    );
    // Shown in the status while it lasts (reading it commits nothing, so it does not wait).
    let problem = pair
        .node1
        .sql("SELECT problem FROM pg_keeper_status")
        .unwrap();
    assert!(
        problem.contains("not synchronous"),
        "status problem: {problem:?}"
    );
    sleep(Duration::from_secs(3));
    assert_eq!(
        pair.node1
            .log_text()
            .matches("is streaming but is not synchronous")
            .count(),
        1,
        "said once"
    );
    // Fixed by a reload: the problem is gone from the status, the worker stayed up.
    pair.node1
        .sql("ALTER SYSTEM SET synchronous_standby_names = 'node1, node2'")
        .unwrap();
    pair.node1.reload();
    assert!(wait_until(Duration::from_secs(10), || pair
        .node1
        .sql("SELECT coalesce(problem, '') FROM pg_keeper_status")
        .is_ok_and(|p| p.is_empty())));
    assert_eq!(pair.node1.keeper_pid(), keeper, "the worker stays up");
    pair.node1
        .sql("CREATE TABLE after_fix (id int); INSERT INTO after_fix VALUES (1)")
        .unwrap();
}

/// psql running `sql` on `node` in the background with no statement timeout (a statement timeout
/// would cancel a commit waiting for its synchronous standby and report it committed).
fn commit_in_background(node: &Node, sql: &str) -> Child {
    Command::new(format!("{BIN}/psql"))
        .args(["-X", "-Atq", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args([
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-p",
            &node.port.to_string(),
        ])
        .args(["-c", sql])
        .env("PGCONNECT_TIMEOUT", "3")
        .env("PGOPTIONS", "-c statement_timeout=0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start psql")
}

#[test]
fn a_standby_that_refuses_and_does_not_stream_counts_as_lost() {
    // 2s x 3: a 6 s budget, so that the standby's restart (well under 2 s) shows the primary
    // refusals rather than a dead standby.
    let keepalive = Duration::from_secs(2);
    let budget = keepalive * 3;
    let pair = Pair::connected(
        "refusing-standby",
        Options {
            keepalive_time: "2s",
            keepalive_count: 3,
            ..Options::default()
        },
    );
    let (node1, node2) = (&pair.node1, &pair.node2);
    node1.sql("CREATE TABLE t (id int)").unwrap();

    // node2 comes back at once as a server that answers every connection with "not accepting
    // connections ... Hot standby mode is disabled" (alive but refused, to the keeper) and that
    // does not stream: its primary_conninfo names a port nothing listens on.
    let nowhere = common::free_port();
    node2.append_conf(&format!(
        "hot_standby = off
         primary_conninfo = 'host=127.0.0.1 port={nowhere} user=postgres application_name=node2'"
    ));
    let restarting = Instant::now();
    node2.restart();
    let downtime = restarting.elapsed();
    let refusal = node2.sql("SELECT 1").unwrap_err();
    assert!(
        refusal.contains("not accepting connections") || refusal.contains("starting up"),
        "node2 does not refuse: {refusal}"
    );
    let streaming = node1
        .sql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'node2'")
        .unwrap();
    eprintln!(
        "[refusing-standby] node2 restarted in {} ms; it answers: {refusal:?}; walsenders for \
         node2 on node1: {streaming}",
        downtime.as_millis()
    );

    // A commit on node1 waits for a standby that does not stream: node1 must count node2 as
    // lost and switch to async within the budget, which releases it.
    let mut sessions = Sessions(vec![commit_in_background(
        node1,
        "INSERT INTO t VALUES (1)",
    )]);
    let started = Instant::now();
    let limit = budget + Duration::from_secs(10);
    let done = time_until(limit, || matches!(sessions.0[0].try_wait(), Ok(Some(_))));
    let log = node1.keeper_log();
    let refused = log
        .iter()
        .filter(|l| l.contains("is alive but refused the heartbeat"))
        .count();
    eprintln!(
        "[refusing-standby] the commit {} {} ms after it was sent; node1 logged {refused} \
         refused heartbeats; switched to async: {}",
        if done.is_some() {
            "returned"
        } else {
            "was still waiting"
        },
        started.elapsed().as_millis(),
        log.iter().any(|l| l.contains(SWITCHING_TO_ASYNC))
    );
    assert!(
        done.is_some(),
        "the commit still waits {} ms after it was sent (budget {} ms): node1 did not count \
         the refusing, not streaming standby as lost\n{}",
        limit.as_millis(),
        budget.as_millis(),
        log.join("\n")
    );
    assert!(sessions.0[0].wait().unwrap().success(), "the commit failed");
    node1.expect_switch_to_async(Duration::from_secs(1));
    assert_eq!(node1.sql("SHOW synchronous_standby_names").unwrap(), "");
    assert_eq!(node1.sql("SELECT count(*) FROM t").unwrap(), "1");
    drop(sessions);
}

#[test]
fn a_primary_keeper_restarted_while_the_standby_is_lost_still_switches_to_async() {
    // 2s x 3: a 6 s budget, long enough to restart the primary's worker between the first
    // failed heartbeat and the switch to async.
    let budget = Duration::from_secs(2) * 3;
    let pair = Pair::connected(
        "restart-while-losing",
        Options {
            keepalive_time: "2s",
            keepalive_count: 3,
            ..Options::default()
        },
    );
    let (node1, node2) = (&pair.node1, &pair.node2);
    node1.sql("CREATE TABLE t (id int)").unwrap();

    node2.kill9();
    let killed = Instant::now();
    // The first failed heartbeat: the primary has begun to count the standby's loss.
    let first_failure = |log: &[String]| {
        log.iter()
            .any(|l| l.contains("heartbeat to standby") && l.contains("(1 of 3)"))
    };
    let counting = wait_until(Duration::from_secs(10), || {
        first_failure(&node1.keeper_log())
    });
    assert!(
        counting,
        "node1 logged no first failed heartbeat to the dead standby:\n{}",
        node1.keeper_log().join("\n")
    );
    let counted_after = killed.elapsed();

    // Only the worker is restarted (SIGTERM: the postmaster starts a new one after a second;
    // shared memory, and with it the keeper's memory, is kept).
    let old_keeper = node1.keeper_pid().expect("node1's keeper runs");
    let terminated = node1
        .sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'pg_keeper'")
        .expect("pg_terminate_backend");
    assert_eq!(terminated, "t", "no pg_keeper backend was terminated");
    let terminated_after = killed.elapsed();

    // A commit now waits for the dead synchronous standby (no statement timeout: a timeout
    // would cancel it and report it committed).
    let mut sessions = Sessions(vec![commit_in_background(
        node1,
        "INSERT INTO t VALUES (1)",
    )]);
    let back = wait_until(Duration::from_secs(15), || {
        node1.keeper_pid().is_some_and(|p| p != old_keeper)
    });
    assert!(
        back,
        "node1's keeper did not come back after pg_terminate_backend"
    );
    node1.expect_log(
        "the keeper worker was restarted; going on in master mode:connected",
        Duration::from_secs(10),
    );

    // Before the fix a restarted worker started afresh in "master mode", waiting for a standby
    // to stream: the dead standby was never counted as lost again, synchronous_standby_names
    // stayed set, and this commit hung forever. Now the worker goes on counting and switches
    // within the budget (plus the worker's restart delay).
    let limit = Duration::from_secs(20);
    let done = time_until(limit.saturating_sub(killed.elapsed()), || {
        matches!(sessions.0[0].try_wait(), Ok(Some(_)))
    });
    let log = node1.keeper_log();
    let switched = log.iter().any(|l| l.contains(SWITCHING_TO_ASYNC));
    eprintln!(
        "[restart-while-losing] first failed heartbeat {} ms after the kill; worker terminated \
         at {} ms; the commit {} {} ms after the kill (budget {} ms); switched to async: \
         {switched}; failed heartbeats logged: {:?}",
        counted_after.as_millis(),
        terminated_after.as_millis(),
        if done.is_some() {
            "returned"
        } else {
            "was still waiting"
        },
        killed.elapsed().as_millis(),
        budget.as_millis(),
        log.iter()
            .filter(|l| l.contains("heartbeat to standby")
                || l.contains("was restarted")
                || l.contains("switching to"))
            .collect::<Vec<_>>()
    );
    assert!(
        done.is_some(),
        "the commit still waits {} ms after the standby was killed: the restarted worker did \
         not switch to async\n{}",
        killed.elapsed().as_millis(),
        log.join("\n")
    );
    assert!(sessions.0[0].wait().unwrap().success(), "the commit failed");
    assert!(switched, "{}", log.join("\n"));
    assert_eq!(node1.sql("SHOW synchronous_standby_names").unwrap(), "");
    assert_eq!(node1.sql("SELECT count(*) FROM t").unwrap(), "1");
    node1.expect_title("master mode:async", Duration::from_secs(5));
    drop(sessions);
}

/// Hole 11: a node or witness conninfo that lets libpq choose among servers (several hosts or
/// ports, target_session_attrs, load_balance_hosts) or that opens a replication connection would
/// let a heartbeat or a lease statement reach another server than the one meant. Before the
/// fix every one of them was accepted; now each is refused when set, by ALTER SYSTEM and on a
/// reload, naming the setting with a DETAIL saying why, and the old value stays in force.
/// (tests/holes.rs has a shorter version; this one checks the DETAIL of every kind, the URI
/// form, hostaddr, the witness conninfo and the reload path.)
#[test]
fn conninfos_that_let_libpq_choose_the_server_are_refused_with_a_detail_by_alter_system_and_on_reload(
) {
    let other = common::free_port();
    let single = Single::start("choosing-conninfos", "");
    let n = &single.node;
    n.append_conf(&format!(
        "pg_keeper.node1_conninfo = '{}'\npg_keeper.node2_conninfo = 'host=127.0.0.1 port={other} dbname=postgres'",
        n.conninfo()
    ));
    n.reload();
    n.expect_title("master mode", Duration::from_secs(10));
    let keeper = n.keeper_pid();
    let conf_path = n.dir.join("postgresql.conf");
    let good_conf = fs::read_to_string(&conf_path).unwrap();
    let several = |key: &str| {
        format!("It names several servers ({key}=...,...); the keeper must reach exactly one server through it.")
    };
    let chooses = |key: &str| {
        format!("It sets {key}, which lets libpq choose among servers; name one server instead.")
    };
    let replication =
        "It sets replication=; the keeper needs an ordinary session, not a replication connection."
            .to_string();
    let cases = [
        (
            "pg_keeper.node1_conninfo",
            "host=127.0.0.1,127.0.0.2 port=5432 dbname=postgres",
            several("host"),
        ),
        (
            "pg_keeper.node2_conninfo",
            "host=127.0.0.1 port=5432,5433 dbname=postgres",
            several("port"),
        ),
        (
            "pg_keeper.node2_conninfo",
            "hostaddr=127.0.0.1,127.0.0.2 dbname=postgres",
            several("hostaddr"),
        ),
        (
            "pg_keeper.node1_conninfo",
            "postgresql://127.0.0.1:5432,127.0.0.2:5433/postgres",
            several("host"),
        ),
        (
            "pg_keeper.witness_conninfo",
            "host=127.0.0.3,127.0.0.4 dbname=w",
            several("host"),
        ),
        (
            "pg_keeper.node2_conninfo",
            "host=127.0.0.1 dbname=postgres target_session_attrs=read-write",
            chooses("target_session_attrs"),
        ),
        (
            "pg_keeper.witness_conninfo",
            "host=127.0.0.3 dbname=w target_session_attrs=primary",
            chooses("target_session_attrs"),
        ),
        (
            "pg_keeper.node1_conninfo",
            "host=127.0.0.1 dbname=postgres replication=database",
            replication.clone(),
        ),
        (
            "pg_keeper.witness_conninfo",
            "host=127.0.0.3 dbname=w replication=true",
            replication.clone(),
        ),
    ];
    for (setting, value, detail) in &cases {
        let before = n.sql(&format!("SHOW {setting}")).unwrap();
        let err = n
            .sql(&format!("ALTER SYSTEM SET {setting} = '{value}'"))
            .unwrap_err();
        assert!(
            err.contains(&format!("invalid value for parameter \"{setting}\""))
                && err.contains(&format!("DETAIL:  {detail}")),
            "ALTER SYSTEM SET {setting} = '{value}': {err}"
        );
        assert_eq!(n.sql(&format!("SHOW {setting}")).unwrap(), before);
    }
    // load_balance_hosts is a libpq 16 keyword: with an older libpq it does not even parse.
    // Either way it is refused, naming the setting.
    let err = n
        .sql("ALTER SYSTEM SET pg_keeper.node2_conninfo = 'host=127.0.0.1 dbname=postgres load_balance_hosts=random'")
        .unwrap_err();
    eprintln!("[choosing-conninfos] load_balance_hosts=random: {err}");
    assert!(
        err.contains("\"pg_keeper.node2_conninfo\"")
            && (err.contains(&chooses("load_balance_hosts")) || err.contains("does not parse")),
        "{err}"
    );
    let auto = fs::read_to_string(n.dir.join("postgresql.auto.conf")).unwrap();
    assert!(
        !auto.contains("127.0.0.2")
            && !auto.contains("replication")
            && !auto.contains("target_session_attrs"),
        "a refused value reached postgresql.auto.conf:\n{auto}"
    );
    // The harmless spelling of target_session_attrs is accepted.
    n.sql(&format!(
        "ALTER SYSTEM SET pg_keeper.node2_conninfo = 'host=127.0.0.1 port={other} dbname=postgres target_session_attrs=any'"
    ))
    .unwrap();
    n.sql("ALTER SYSTEM RESET pg_keeper.node2_conninfo")
        .unwrap();

    // On a reload from postgresql.conf: the file is reported to contain errors, the setting and
    // the DETAIL are in the log, and the old value stays in force.
    for (setting, value, detail) in [&cases[0], &cases[6], &cases[7]] {
        let before = n.sql(&format!("SHOW {setting}")).unwrap();
        let errors_before = n.log_text().matches("contains errors").count();
        n.append_conf(&format!("{setting} = '{value}'"));
        n.reload();
        assert!(
            wait_until(Duration::from_secs(10), || n
                .log_text()
                .matches("contains errors")
                .count()
                > errors_before),
            "no error reported for {setting} = '{value}':\n{}",
            n.log_text()
        );
        let log = n.log_text();
        assert!(
            log.contains(&format!("invalid value for parameter \"{setting}\""))
                && log.contains(&format!("DETAIL:  {detail}")),
            "{setting} = '{value}':\n{log}"
        );
        assert_eq!(
            n.sql(&format!("SHOW {setting}")).unwrap(),
            before,
            "{setting} = '{value}' changed the value in force"
        );
        fs::write(&conf_path, &good_conf).unwrap();
        n.reload();
    }
    assert_eq!(n.keeper_pid(), keeper, "the worker must stay up");
    assert!(n.title_is("master mode"), "{:?}", n.title());
}

/// Hole 13: after_command inherited the server process's signal state (SIGPIPE ignored, and
/// whatever was blocked when the keeper forked) and its open descriptors (data files, the
/// latch's pipe and epoll descriptors, libpq sockets). Now the command starts with every signal
/// at its default action, none blocked, and nothing open but stdin, stdout and stderr. Checked
/// on the shell itself (its own /proc entry, after `exec >file` so that the shell keeps no saved
/// copy of stdout), with every descriptor's target; the keeper's own state is printed beside it.
#[test]
fn after_command_gets_no_socket_pipe_or_server_file_and_no_ignored_or_blocked_signal() {
    let pair = Pair::connected(
        "after-command-clean-fds",
        Options {
            // The shell reads its own status with builtins only: while it waits for a child
            // (grep, say), dash blocks every signal for a moment around its wait, and a child
            // reading /proc/$$/status then could see that mask instead of the one it started with.
            extra: "pg_keeper.after_command = 'exec > @ROOT@/inherited.tmp; \
                    while read -r k v; do case $k in SigBlk:|SigIgn:) echo \"$k $v\";; esac; \
                    done < /proc/$$/status; ls -l /proc/$$/fd; \
                    grep -E \"^(SigBlk|SigIgn)\" /proc/$PPID/status | sed \"s/^/keeper /\"; \
                    mv @ROOT@/inherited.tmp @ROOT@/inherited.txt'"
                .into(),
            ..Options::default()
        },
    );
    let file = pair.root.join("inherited.txt");
    // The standby dies: the primary switches to async and runs after_command (event async).
    pair.node2.kill9();
    pair.node1
        .expect_title("master mode:async", BUDGET + MARGIN);
    let written = wait_until(Duration::from_secs(15), || file.exists());
    assert!(
        written,
        "after_command left no file:\n{}",
        pair.node1.keeper_log().join("\n")
    );
    let text = fs::read_to_string(&file).unwrap();
    eprintln!("[after-command-clean-fds] what the shell had (and the keeper, its parent):\n{text}");
    let mask = |field: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} line:\n{text}"));
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap_or(""), 16)
            .unwrap_or_else(|_| panic!("{line}"))
    };
    assert_eq!(
        mask("SigBlk"),
        0,
        "signals blocked in after_command:\n{text}"
    );
    // Signals 32 and 33 are glibc's own (SIGCANCEL, SIGSETXID): its sigaction() refuses to touch
    // them, and glibc installs its handler before it uses them. Every other one, the standard
    // signals 1 to 31 and the real-time ones from SIGRTMIN (34) on, must be at its default.
    let glibc_internal = (1u64 << 31) | (1u64 << 32);
    assert_eq!(
        mask("SigIgn") & !glibc_internal,
        0,
        "signals ignored in after_command:\n{text}"
    );
    // `ls -l` lines: "... <fd> -> <target>".
    let fds: Vec<(u32, String)> = text
        .lines()
        .filter_map(|l| {
            let (left, target) = l.split_once(" -> ")?;
            let fd = left.split_whitespace().last()?.parse().ok()?;
            Some((fd, target.to_string()))
        })
        .collect();
    let numbers: Vec<u32> = fds.iter().map(|(fd, _)| *fd).collect();
    assert_eq!(
        numbers,
        [0, 1, 2],
        "after_command has descriptors beyond stdin, stdout and stderr:\n{text}"
    );
    // stdin is /dev/null, stdout the file, stderr the server's log.
    assert_eq!(fds[0].1, "/dev/null", "{text}");
    assert!(fds[2].1.ends_with("node1.log"), "{text}");
}

/// Runs `sql` on `node` and parses the one value it returns; panics with psql's error.
fn sql_value<T: std::str::FromStr>(node: &Node, sql: &str) -> T {
    let text = node.sql(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    text.parse()
        .unwrap_or_else(|_| panic!("{sql}: unexpected answer {text:?}"))
}

/// Hole 11: a peer address that comes to lead to this very server (a moved address, a name or a
/// proxy turned round) must not count as the peer's answer, or a primary would go on believing
/// in a standby it no longer reaches. node1's heartbeats go through a proxy that is turned to
/// node1's own port; its conninfo stays as it is (a reload that changed it would make the keeper
/// identify itself again, which reports "both ... reach this server", another path). Each
/// heartbeat is then counted as a failure with that reason; only the standby's replication,
/// which still confirms WAL, keeps node1 synchronous. Once the proxy leads to node2 again the
/// count goes back to zero.
#[test]
fn a_heartbeat_that_reaches_this_server_itself_counts_as_a_failure() {
    use common::partition::{Mode, ProxiedPair};
    let pp = ProxiedPair::connected("heartbeat-reaches-itself", Options::default());
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    node1.sql("CREATE EXTENSION pg_keeper_rs").unwrap();
    let failures = || -> i32 { sql_value(node1, "SELECT failed_heartbeats FROM pg_keeper_status") };
    assert_eq!(failures(), 0);

    // Turned round; the reset ends the kept heartbeat connection, so the next one is made anew,
    // to node1.
    let turn_to = |port: u16| {
        pp.to_node2.set_target(port);
        pp.to_node2.set_mode(Mode::Drop);
        let closed = wait_until(Duration::from_secs(5), || {
            pp.to_node2.open_connections() == 0
        });
        pp.to_node2.set_mode(Mode::Pass);
        assert!(closed, "the proxy to node2 still has connections open");
    };
    turn_to(node1.port);
    const ITSELF: &str = "the heartbeat reached this server itself, not the peer";
    node1.expect_log(&format!("failed: {ITSELF} ("), BUDGET + MARGIN);
    let reason = node1
        .sql("SELECT last_failure_reason FROM pg_keeper_status")
        .unwrap();
    assert_eq!(reason, ITSELF);
    assert!(failures() >= 1, "no failure counted");
    // At the count: held, not switched, since node2's replication still confirms WAL.
    node1.expect_log(
        &format!("its replication still confirms WAL: {ITSELF} (3 of 3)"),
        BUDGET + MARGIN,
    );
    let log1 = node1.keeper_log().join("\n");
    assert!(!log1.contains(common::SWITCHING_TO_ASYNC), "{log1}");
    assert_eq!(
        node1.sql("SHOW synchronous_standby_names").unwrap(),
        "node1, node2"
    );
    assert_eq!(node2.in_recovery(), Some(true));

    // Back to node2: answered again, and the count is cleared.
    turn_to(node2.port);
    assert!(
        wait_until(Duration::from_secs(15), || failures() == 0),
        "node1 still counts {} failed heartbeats after the proxy leads to node2 again:\n{}",
        failures(),
        node1.keeper_log().join("\n")
    );
    node1.expect_title("master mode:connected", Duration::from_secs(5));
}

/// Hole 11: after_command is told where the heartbeats really went (the live connection's host
/// and port), not a guess from the conninfo. node2's conninfo names no host, so libpq reaches it
/// through the Unix socket in its default directory; a guess from the conninfo would say
/// "localhost". The event `sync_restored` is run while the connection to node2 is up.
#[test]
fn after_command_is_given_the_host_and_port_the_heartbeats_reach() {
    let pair = Pair::connected(
        "after-command-live-address",
        Options {
            extra: "pg_keeper.after_command = 'echo \"$PG_KEEPER_EVENT $PG_KEEPER_PEER_NAME $PG_KEEPER_PEER_HOST $PG_KEEPER_PEER_PORT\" >> @ROOT@/after_command.log'".into(),
            ..Options::default()
        },
    );
    let (node1, node2) = (&pair.node1, &pair.node2);
    let socket_dir = node2
        .sql("SELECT split_part(current_setting('unix_socket_directories'), ',', 1)")
        .unwrap();
    assert!(
        std::path::Path::new(&format!("{socket_dir}/.s.PGSQL.{}", node2.port)).exists(),
        "node2 has no socket in {socket_dir:?}"
    );
    let hostless = format!(
        "pg_keeper.node2_conninfo = 'port={} dbname=postgres user=postgres'",
        node2.port
    );
    for node in [node1, node2] {
        node.append_conf(&hostless);
        node.reload();
    }
    for node in [node1, node2] {
        node.expect_log(
            "node conninfo changed; identifying this node again",
            Duration::from_secs(10),
        );
    }
    node1.expect_title("master mode:connected", Duration::from_secs(30));
    node2.expect_title("standby mode:connected", Duration::from_secs(30));
    pair.wait_synchronous();

    // Lost (async, while no connection is up), then back and caught up: sync_restored.
    node2.stop("fast");
    node1.expect_title("master mode:async", BUDGET + MARGIN);
    node2.start();
    assert!(
        wait_until(Duration::from_secs(30), || pair
            .after_commands()
            .iter()
            .any(|l| l.starts_with("sync_restored "))),
        "no sync_restored after_command: {:?}\n{}",
        pair.after_commands(),
        node1.keeper_log().join("\n")
    );
    let runs = pair.after_commands();
    eprintln!("[after-command-live-address] after_command runs: {runs:?}");
    let restored = runs
        .iter()
        .find(|l| l.starts_with("sync_restored "))
        .unwrap();
    let fields: Vec<&str> = restored.split(' ').collect();
    let [_, name, host, port] = fields[..] else {
        panic!("{restored:?}");
    };
    assert_eq!(name, "node2", "{runs:?}");
    assert_eq!(port, node2.port.to_string(), "{runs:?}");
    // The socket directory libpq used (its default), where node2 listens; not "localhost".
    assert!(
        std::path::Path::new(&format!("{host}/.s.PGSQL.{port}")).exists(),
        "PG_KEEPER_PEER_HOST {host:?} is not where node2's socket is ({socket_dir:?}): {runs:?}"
    );
}

/// Hole 13: pg_keeper_pause() and pg_keeper_resume() wake the worker through the latch of the
/// live process with the pid recorded, and the worker clears that pid when it stops, so no one
/// signals a pid the system may have given to another program. The worker is terminated: once
/// it is gone, the status shows no pid until the new worker shows its own, never the old one;
/// a pause asked for meanwhile signals no one and is taken up by the new worker. Then each pause
/// and resume takes effect at once, although the worker's next tick is up to 10 s away.
#[test]
fn pause_and_resume_wake_the_live_worker_and_the_pid_of_a_stopped_one_is_cleared() {
    let keepalive = Duration::from_secs(10);
    let pair = Pair::connected(
        "pause-latch",
        Options {
            keepalive_time: "10s",
            ..Options::default()
        },
    );
    let node1 = &pair.node1;
    node1.sql("CREATE EXTENSION pg_keeper_rs").unwrap();
    let recorded = || -> i32 {
        sql_value(
            node1,
            "SELECT coalesce(worker_pid, 0) FROM pg_keeper_status",
        )
    };
    let old = node1.keeper_pid().expect("node1's keeper runs");
    assert_eq!(recorded(), old);

    let terminated = node1
        .sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'pg_keeper'")
        .unwrap();
    assert_eq!(terminated, "t");
    let gone = wait_until(Duration::from_secs(10), || {
        !std::path::Path::new(&format!("/proc/{old}")).exists()
    });
    assert!(gone, "the terminated worker {old} did not exit");
    // The postmaster starts the next worker a second later: sampled until then.
    let mut samples = Vec::new();
    let mut paused_in_gap = false;
    let new = wait_until(Duration::from_secs(15), || {
        let pid = recorded();
        samples.push(pid);
        if pid == 0 && !paused_in_gap {
            assert_eq!(node1.sql("SELECT pg_keeper_pause()").unwrap(), "t");
            paused_in_gap = true;
        }
        pid != 0 && pid != old
    });
    assert!(new, "no new worker pid recorded: {samples:?}");
    assert!(
        !samples.contains(&old),
        "the stopped worker's pid {old} stayed recorded: {samples:?}"
    );
    assert!(
        paused_in_gap,
        "no sample between the two workers showed the pid cleared: {samples:?}"
    );
    let new_pid = *samples.last().unwrap();
    assert_eq!(node1.keeper_pid(), Some(new_pid));
    node1.expect_title("master mode:connected, paused", Duration::from_secs(15));

    // Each call must take effect well before the next tick would.
    let prompt = Duration::from_secs(2);
    assert!(prompt * 4 < keepalive);
    let count = |needle: &str| {
        node1
            .keeper_log()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    };
    const PAUSED: &str = "pg_keeper: paused until pg_keeper_resume()";
    const RESUMED: &str = "pg_keeper: resumed: automatic actions are enabled again";
    let mut took = Vec::new();
    for (call, needle, title) in [
        ("pg_keeper_resume()", RESUMED, "master mode:connected"),
        ("pg_keeper_pause()", PAUSED, "master mode:connected, paused"),
        ("pg_keeper_resume()", RESUMED, "master mode:connected"),
        ("pg_keeper_pause()", PAUSED, "master mode:connected, paused"),
    ] {
        let before = count(needle);
        assert_eq!(node1.sql(&format!("SELECT {call}")).unwrap(), "t");
        let Some(t) = time_until(prompt, || count(needle) > before) else {
            panic!(
                "{call} did not take effect within {prompt:?}:\n{}",
                node1.keeper_log().join("\n")
            );
        };
        took.push(t.as_millis());
        node1.expect_title(title, Duration::from_secs(1));
    }
    eprintln!("[pause-latch] status pids sampled between the workers: {samples:?}; pause/resume took {took:?} ms");
    assert_eq!(node1.keeper_pid(), Some(new_pid));
}

/// The keeper runs no query (it reads shared memory), so it answers the server's procsignal
/// requests itself: DROP DATABASE, which waits until every process has absorbed a global
/// barrier, on the primary and in its replay on the standby, completes on both; and
/// pg_log_backend_memory_contexts() reaches the keeper.
#[test]
fn drop_database_and_memory_context_requests_are_answered_by_the_keeper() {
    let pair = Pair::connected("barriers", Options::default());
    pair.node1.sql("CREATE DATABASE scratch").unwrap();
    let started = Instant::now();
    // Bounded by the harness's statement_timeout.
    pair.node1.sql("DROP DATABASE scratch").unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "DROP DATABASE took {:?}",
        started.elapsed()
    );
    // The standby's replay went past the drop when a later table shows there.
    pair.node1.sql("CREATE TABLE after_drop (id int)").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || pair
            .node2
            .sql("SELECT to_regclass('after_drop') IS NOT NULL")
            .is_ok_and(|t| t == "t")),
        "the standby did not replay past DROP DATABASE"
    );
    for node in [&pair.node1, &pair.node2] {
        let pid = node.keeper_pid().expect("the keeper runs");
        node.sql(&format!("SELECT pg_log_backend_memory_contexts({pid})"))
            .unwrap();
        node.expect_log(
            &format!("logging memory contexts of PID {pid}"),
            Duration::from_secs(5),
        );
    }
    pair.node1
        .expect_title("master mode:connected", Duration::from_secs(5));
    pair.node2
        .expect_title("standby mode:connected", Duration::from_secs(5));
}
