//! Behaviour on real servers: a primary and a synchronous standby, both with pg_keeper_rs and the
//! same settings (keepalive_time 1s x keepalive_count 3, a 3s budget unless a test says
//! otherwise). Each test reads as the scenario it checks.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{time_until, wait_until, Options, Pair, Single};

/// keepalive_time x keepalive_count of the default options.
const BUDGET: Duration = Duration::from_secs(3);
/// Generous allowance on top of the budget for a loaded CI machine; the benchmark gives real
/// figures.
const MARGIN: Duration = Duration::from_secs(12);

#[test]
fn both_titles_show_the_connected_states() {
    let pair = Pair::connected("titles", Options::default());
    assert!(pair
        .node1
        .title()
        .unwrap()
        .contains("pg_keeper (master mode:connected)"));
    assert!(pair
        .node2
        .title()
        .unwrap()
        .contains("pg_keeper (standby mode:connected)"));
    let log1 = pair.node1.keeper_log().join("\n");
    assert!(log1.contains("started in master mode as node1"), "{log1}");
    assert!(log1.contains("standby node2"), "{log1}");
    let log2 = pair.node2.keeper_log().join("\n");
    assert!(log2.contains("started in standby mode as node2"), "{log2}");
    assert!(log2.contains("automatic failover is armed"), "{log2}");
    assert!(pair.after_commands().is_empty());
}

#[test]
fn standby_crash_switches_the_primary_to_async_and_releases_the_blocked_commit() {
    let pair = Pair::connected("standby-crash", Options::default());
    pair.node1
        .sql("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .unwrap();

    pair.node2.kill9();
    let killed = Instant::now();
    let mut blocked = pair.node1.sql_background("INSERT INTO t VALUES (2)");
    sleep(Duration::from_millis(500));
    assert!(
        blocked.try_wait().unwrap().is_none(),
        "the commit should wait for the lost synchronous standby"
    );

    let released = wait_until(BUDGET + MARGIN, || {
        matches!(blocked.try_wait(), Ok(Some(_)))
    });
    if !released {
        let _ = blocked.kill();
    }
    assert!(
        released,
        "the blocked commit was not released within {:?}",
        BUDGET + MARGIN
    );
    assert!(
        blocked.wait().unwrap().success(),
        "the blocked commit failed"
    );
    eprintln!(
        "standby crash: commit released {:?} after the kill",
        killed.elapsed()
    );

    assert_eq!(
        pair.node1
            .sql("INSERT INTO t VALUES (3); SELECT count(*) FROM t")
            .unwrap(),
        "3"
    );
    assert_eq!(
        pair.node1.sql("SHOW synchronous_standby_names").unwrap(),
        ""
    );
    assert_eq!(
        pair.node1
            .sql("SHOW pg_keeper.saved_synchronous_standby_names")
            .unwrap(),
        "node1, node2"
    );
    let auto_conf = std::fs::read_to_string(pair.node1.dir.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto_conf.contains("synchronous_standby_names = ''"),
        "{auto_conf}"
    );
    pair.node1
        .expect_title("master mode:async", Duration::from_secs(5));

    let run = pair.the_one_after_command();
    assert!(run.starts_with("async node1 "), "{run}");
    let log = pair.node1.keeper_log().join("\n");
    assert!(
        log.contains("(1 of 3)") && log.contains("(3 of 3)"),
        "{log}"
    );
    assert!(
        log.contains(common::SWITCHING_TO_ASYNC) && log.contains(common::SWITCHED_TO_ASYNC),
        "{log}"
    );
    assert!(log.contains("after_command for event async"), "{log}");
}

#[test]
fn primary_crash_promotes_the_standby_with_every_committed_row() {
    let pair = Pair::connected("primary-crash", Options::default());
    pair.node1
        .sql("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)")
        .unwrap();

    pair.node1.kill9();
    let took = time_until(BUDGET + MARGIN, || pair.node2.in_recovery() == Some(false))
        .expect("the standby did not promote in time");
    eprintln!("primary crash: promoted {took:?} after the kill (budget {BUDGET:?})");

    assert_eq!(pair.node2.sql("SELECT count(*) FROM t").unwrap(), "100");
    assert_eq!(
        pair.node2
            .sql("INSERT INTO t VALUES (101); SELECT count(*) FROM t")
            .unwrap(),
        "101"
    );
    pair.node2
        .expect_title("master mode:async", Duration::from_secs(5));

    let run = pair.the_one_after_command();
    assert!(run.starts_with("promote node2 "), "{run}");
    assert!(
        run.contains(&format!("port={}", pair.node1.port)),
        "peer conninfo: {run}"
    );
    let log = pair.node2.keeper_log().join("\n");
    assert!(log.contains("is now the master and node1"), "{log}");
}

#[test]
fn primary_frozen_for_less_than_the_budget_is_not_failed_over() {
    let mut pair = Pair::connected("short-freeze", Options::default());
    pair.node1.freeze();
    sleep(Duration::from_millis(1000));
    pair.node1.thaw();
    sleep(BUDGET + Duration::from_secs(3));
    assert_eq!(pair.node2.in_recovery(), Some(true), "the standby promoted");
    assert!(
        pair.node2.title_is("standby mode:connected"),
        "{:?}",
        pair.node2.title()
    );
    assert!(
        pair.node1.title_is("master mode:connected"),
        "{:?}",
        pair.node1.title()
    );
    assert!(
        pair.after_commands().is_empty(),
        "{:?}",
        pair.after_commands()
    );
    pair.node1
        .sql("CREATE TABLE after_freeze (id int); INSERT INTO after_freeze VALUES (1)")
        .unwrap();
}

#[test]
fn primary_frozen_for_longer_than_the_budget_is_failed_over_although_its_port_accepts() {
    let mut pair = Pair::connected("long-freeze", Options::default());
    pair.node1.freeze();
    let frozen = Instant::now();
    let addr: SocketAddr = format!("127.0.0.1:{}", pair.node1.port).parse().unwrap();
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok(),
        "a frozen server's port still accepts TCP connections"
    );
    let took = time_until(BUDGET + MARGIN, || pair.node2.in_recovery() == Some(false))
        .expect("the standby did not promote while the primary was frozen");
    eprintln!("primary frozen: promoted {took:?} after the freeze (budget {BUDGET:?})");
    assert!(
        frozen.elapsed() >= BUDGET - Duration::from_millis(500),
        "promoted before the budget ran out"
    );
    pair.node2
        .expect_title("master mode:async", Duration::from_secs(5));
    let log = pair.node2.keeper_log().join("\n");
    assert!(
        log.contains("before the deadline"),
        "the failures should be deadline misses: {log}"
    );
}

#[test]
fn reloading_keepalive_time_takes_effect_without_restart() {
    let pair = Pair::connected("reload", Options::default());
    let keeper = pair.node1.keeper_pid().unwrap();

    // Lengthen the interval: a lost standby is now not noticed for minutes.
    pair.node1
        .sql("ALTER SYSTEM SET pg_keeper.keepalive_time = '60s'")
        .unwrap();
    pair.node1.reload();
    pair.node1
        .expect_log("keepalive_time=60000ms", Duration::from_secs(5));
    sleep(Duration::from_millis(1500));
    pair.node2.kill9();
    sleep(BUDGET + Duration::from_secs(4));
    assert!(
        pair.node1.title_is("master mode:connected"),
        "switched although the interval is 60s"
    );
    assert!(pair.after_commands().is_empty());

    // Shorten it again: the switch follows within the short budget.
    pair.node1
        .sql("ALTER SYSTEM SET pg_keeper.keepalive_time = '1s'")
        .unwrap();
    pair.node1.reload();
    let took = time_until(BUDGET + MARGIN, || pair.node1.title_is("master mode:async"))
        .expect("the shorter interval did not take effect");
    eprintln!("reload: switched {took:?} after the reload to 1s");
    assert_eq!(
        pair.node1.keeper_pid(),
        Some(keeper),
        "the worker was restarted"
    );
    assert_eq!(
        pair.node1.sql("SHOW synchronous_standby_names").unwrap(),
        ""
    );
}

#[test]
fn restarted_servers_come_back_in_their_modes() {
    // A budget of 20s so that the restarts themselves are not taken for failures.
    let pair = Pair::connected(
        "restarts",
        Options {
            keepalive_count: 20,
            ..Options::default()
        },
    );

    let old_keeper = pair.node2.keeper_pid();
    pair.node2.restart();
    pair.node2
        .expect_title("standby mode:connected", Duration::from_secs(30));
    assert_ne!(pair.node2.keeper_pid(), old_keeper);
    assert_eq!(pair.node2.in_recovery(), Some(true));

    let old_keeper = pair.node1.keeper_pid();
    pair.node1.restart();
    pair.node1
        .expect_title("master mode:connected", Duration::from_secs(30));
    assert_ne!(pair.node1.keeper_pid(), old_keeper);
    assert_eq!(pair.node1.in_recovery(), Some(false));
    assert_eq!(pair.node2.in_recovery(), Some(true));
    assert!(
        pair.node2.title_is("standby mode:connected"),
        "{:?}",
        pair.node2.title()
    );
    pair.node1
        .sql("CREATE TABLE after_restart (id int); INSERT INTO after_restart VALUES (1)")
        .unwrap();
    assert!(
        pair.after_commands().is_empty(),
        "{:?}",
        pair.after_commands()
    );
}

#[test]
fn sigterm_is_honoured_while_a_heartbeat_waits_on_a_frozen_peer() {
    let mut pair = Pair::connected(
        "sigterm",
        Options {
            keepalive_time: "30s",
            keepalive_count: 5,
            ..Options::default()
        },
    );
    pair.node1.freeze();
    // Let the standby's keeper start a heartbeat that will wait up to 30s.
    sleep(Duration::from_secs(1));
    let start = Instant::now();
    pair.node2.stop("fast");
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "shutdown waited {took:?} for the keeper"
    );
    pair.node1.thaw();
}

#[test]
fn neither_conninfo_reaching_this_server_is_a_clear_error_and_the_worker_stays_up() {
    let (a, b) = (common::free_port(), common::free_port());
    let single = Single::start(
        "config-neither",
        &format!(
            "pg_keeper.keepalive_time = 1s\n\
             pg_keeper.node1_conninfo = 'host=127.0.0.1 port={a} dbname=postgres'\n\
             pg_keeper.node2_conninfo = 'host=127.0.0.1 port={b} dbname=postgres'"
        ),
    );
    let n = &single.node;
    n.expect_log("neither node is this server", Duration::from_secs(10));
    n.expect_title("configuration error", Duration::from_secs(5));
    assert!(
        n.log_text().contains("HINT:"),
        "the error comes with a hint"
    );
    let keeper = n.keeper_pid();
    sleep(Duration::from_secs(3));
    assert_eq!(n.keeper_pid(), keeper, "the worker must stay up");
    assert_eq!(
        n.log_text().matches("neither node is this server").count(),
        1,
        "the same problem is logged once"
    );
    assert_eq!(n.sql("SELECT 1").unwrap(), "1");

    // Fixed by a reload: the keeper identifies itself and starts in master mode.
    n.sql(&format!(
        "ALTER SYSTEM SET pg_keeper.node1_conninfo = '{}'",
        n.conninfo()
    ))
    .unwrap();
    n.reload();
    n.expect_log("started in master mode as node1", Duration::from_secs(10));
    n.expect_title("master mode", Duration::from_secs(5));
}

#[test]
fn both_conninfos_reaching_this_server_is_a_clear_error() {
    let single = Single::start("config-both", "pg_keeper.keepalive_time = 1s");
    let n = &single.node;
    n.append_conf(&format!(
        "pg_keeper.node1_conninfo = 'host=127.0.0.1 port={p} dbname=postgres'\n\
         pg_keeper.node2_conninfo = 'host=localhost port={p} dbname=postgres'",
        p = n.port
    ));
    n.reload();
    n.expect_log("reach this server", Duration::from_secs(10));
    n.expect_title("configuration error", Duration::from_secs(5));
}

#[test]
fn the_original_spellings_work_and_a_conflict_says_which_wins() {
    let other = common::free_port();
    let single = Single::start(
        "spellings",
        "pg_keeper.keepalives_time = 2\npg_keeper.keepalives_count = 4",
    );
    let n = &single.node;
    n.expect_log(
        "keepalive_time=2000ms keepalive_count=4",
        Duration::from_secs(10),
    );
    n.append_conf(&format!(
        "pg_keeper.node1_conninfo = '{}'\npg_keeper.node2_conninfo = 'host=127.0.0.1 port={other}'\n\
         pg_keeper.keepalive_time = 1\npg_keeper.keepalive_tme = 7",
        n.conninfo()
    ));
    n.reload();
    let secs = Duration::from_secs(10);
    n.expect_log(
        "both pg_keeper.keepalive_time (1) and pg_keeper.keepalives_time (2) are set; \
         pg_keeper.keepalive_time wins",
        secs,
    );
    n.expect_log("keepalive_time=1000ms keepalive_count=4", secs);
    // A misspelled name is warned about by the server: the prefix is reserved.
    n.expect_log(
        "invalid configuration parameter name \"pg_keeper.keepalive_tme\"",
        secs,
    );
    assert_eq!(n.sql("SHOW pg_keeper.keepalive_time").unwrap(), "1s");
}

/// A connected pair whose keepers tick a minute apart, with keepalive_count 1.
fn slow_ticking_pair(label: &str) -> Pair {
    let pair = Pair::connected(
        label,
        Options {
            keepalive_count: 1,
            ..Options::default()
        },
    );
    for node in [&pair.node1, &pair.node2] {
        node.sql("ALTER SYSTEM SET pg_keeper.keepalive_time = '60s'")
            .unwrap();
        node.reload();
        node.expect_log("keepalive_time=60000ms", Duration::from_secs(5));
    }
    sleep(Duration::from_secs(1));
    pair
}

#[test]
fn a_closed_heartbeat_connection_is_acted_on_before_the_next_tick() {
    // Only the evidence of the closed connection can explain a quick failover.
    let pair = slow_ticking_pair("evidence");
    let killed = Instant::now();
    pair.node1.kill9();
    let promoted = wait_until(Duration::from_secs(20), || {
        pair.node2.in_recovery() == Some(false)
    });
    assert!(
        promoted,
        "the standby waited for the next tick instead of acting on the closed connection"
    );
    eprintln!(
        "evidence: promoted {:?} after the kill with 60s ticks",
        killed.elapsed()
    );
    pair.node2
        .expect_title("master mode:async", Duration::from_secs(5));
}

#[test]
fn a_clean_restart_of_the_primary_keeps_the_usual_timing() {
    // The primary announces its shutdown to its clients: not evidence of a crash.
    let pair = slow_ticking_pair("clean-restart");
    pair.node1.restart();
    pair.node2.expect_log(
        "announced a clean shutdown; not counting failed heartbeats",
        Duration::from_secs(5),
    );
    sleep(Duration::from_secs(3));
    assert_eq!(
        pair.node2.in_recovery(),
        Some(true),
        "a planned restart was failed over"
    );
    assert!(pair.after_commands().is_empty());
}
