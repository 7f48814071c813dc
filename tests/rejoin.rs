//! `pg_keeper.auto_rejoin` (README "Rejoining by itself"): an old primary superseded by a
//! failover rewinds itself and comes back as a streaming, synchronous standby, with every
//! acknowledged row; a rewind that cannot work leaves it stopped with what to run; the lease's
//! holder is never rejoined (decision core tests). Run with --nocapture for the figures.

mod common;

use std::thread::sleep;
use std::time::Duration;

use common::partition::{Checker, Mode, ProxiedPair, Verdict};
use common::{expect_promoted, start_and_expect_rejoined, wait_until, Node, Options, Pair};

fn rejoining() -> Options {
    Options {
        extra: "pg_keeper.auto_rejoin = on\n".into(),
        ..Options::default()
    }
}

fn expect_every_row(v: &Verdict, primary: &str) {
    assert_eq!(v.final_primary, Some(primary), "{v:?}");
    assert!(v.lost.is_empty(), "acknowledged rows lost: {v:?}");
}

#[test]
fn after_a_crash_the_old_primary_rejoins_by_itself_as_a_synchronous_standby() {
    let pair = Pair::connected("rejoin-crash", rejoining());
    let checker = Checker::start(&pair);
    sleep(Duration::from_secs(2));
    pair.node1.kill9();
    expect_promoted(&pair.node2);
    let took = start_and_expect_rejoined(&pair.node1, &pair.node2, true);
    eprintln!(
        "[rejoin-crash] node1 rejoined as a synchronous standby {} ms after its start",
        took.as_millis()
    );
    // The rejoined standby holds what the new primary acknowledged.
    sleep(Duration::from_secs(1));
    let v = checker.finish(&pair);
    expect_every_row(&v, "node2");
    let count = |n: &Node| n.sql("SELECT count(*) FROM checker_writes").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || count(&pair.node1)
            == count(&pair.node2)),
        "node1 has {} rows, node2 {}",
        count(&pair.node1),
        count(&pair.node2)
    );
}

#[test]
fn after_a_cut_that_ended_in_a_failover_the_old_primary_rejoins_by_itself() {
    let pp = ProxiedPair::connected_with_witness("rejoin-cut", rejoining());
    let checker = Checker::start(&pp.pair);
    sleep(Duration::from_secs(3));
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    pp.isolate(node1, Mode::Blackhole);
    expect_promoted(node2);
    sleep(Duration::from_secs(1));
    pp.isolate(node1, Mode::Pass);
    // Superseded by the lease: the rejoin starts, then the fence stops the server.
    node1.expect_log("superseded", Duration::from_secs(20));
    let took = start_and_expect_rejoined(node1, node2, false);
    eprintln!(
        "[rejoin-cut] node1 rejoined {} ms after the heal; lease at the end: {:?}",
        took.as_millis(),
        pp.lease()
    );
    let v = checker.finish(&pp.pair);
    expect_every_row(&v, "node2");
    assert_eq!(v.overlap, Duration::ZERO, "two primaries at once: {v:?}");
}

#[test]
fn a_rewind_that_cannot_work_leaves_the_old_primary_stopped_with_what_to_run() {
    let pair = Pair::connected("rejoin-norewind", rejoining());
    // pg_rewind needs wal_log_hints (or data checksums) on the server it rewinds.
    pair.node1.append_conf("wal_log_hints = off\n");
    pair.node1.restart();
    pair.wait_synchronous();
    pair.node1.kill9();
    expect_promoted(&pair.node2);
    let _ = pair.node1.try_start();
    let stopped = wait_until(Duration::from_secs(90), || {
        pair.node1.postmaster_pid().is_none()
            && pair
                .node1
                .log_text()
                .contains("pg_keeper: auto_rejoin: failed")
    });
    let log = pair.node1.log_text();
    assert!(stopped, "node1 is not stopped with a message:\n{log}");
    assert!(
        log.contains("wal_log_hints")
            && log.contains("the server stays stopped")
            && log.contains("--basebackup"),
        "{log}"
    );
    // Nothing was copied over it, and it did not start.
    sleep(Duration::from_secs(3));
    assert!(pair.node1.postmaster_pid().is_none(), "{log}");
    assert_eq!(pair.node2.in_recovery(), Some(false));
}

#[test]
fn two_failovers_in_a_row_end_with_one_primary_and_one_streaming_standby() {
    let pair = Pair::connected("rejoin-twice", rejoining());
    let checker = Checker::start(&pair);
    sleep(Duration::from_secs(2));
    pair.node1.kill9();
    expect_promoted(&pair.node2);
    start_and_expect_rejoined(&pair.node1, &pair.node2, true);
    pair.wait_synchronous();
    pair.node2.kill9();
    expect_promoted(&pair.node1);
    start_and_expect_rejoined(&pair.node2, &pair.node1, true);
    sleep(Duration::from_secs(1));
    let v = checker.finish(&pair);
    expect_every_row(&v, "node1");
    assert_eq!(pair.node2.in_recovery(), Some(true));
    let a = pair.after_commands();
    assert_eq!(
        a.iter().filter(|l| l.starts_with("promote")).count(),
        2,
        "{a:?}"
    );
}

/// With a witness, a superseded primary that holds the lease is never rejoined: node2 promoted
/// by hand (outside the keeper) while node1 renews its lease; node1 finds a newer primary,
/// fences itself, and leaves the rewind to an operator (its commits under the lease would be
/// thrown away).
#[test]
fn the_lease_holder_is_fenced_but_never_rejoined() {
    let pp = ProxiedPair::connected_with_witness("rejoin-holder", rejoining());
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    node2.sql("SELECT pg_promote()").unwrap();
    node1.expect_log("superseded: node2", Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(30), || node1.postmaster_pid().is_none()),
        "node1 did not fence itself"
    );
    // Long enough for a rejoin process to have started, rewound and started the server.
    sleep(Duration::from_secs(8));
    let log = node1.log_text();
    assert!(node1.postmaster_pid().is_none(), "node1 runs again:\n{log}");
    assert!(!log.contains("auto_rejoin:"), "{log}");
    assert!(log.contains("HINT:  To rejoin it as a standby"), "{log}");
    eprintln!("[rejoin-holder] lease at the end: {:?}", pp.lease());
}
