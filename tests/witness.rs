//! The witness: the same faults as tests/partitions.rs and tests/failover.rs, with
//! `pg_keeper.witness_conninfo` set on both nodes, each reaching the witness (a plain server)
//! through its own proxy. keepalive_time 1s x keepalive_count 3: a 3 s budget and a 3.2 s lease
//! (3 x keepalive_time + 200 ms).
//! Each test is a row of README.md's table "Split brain and lost commits" (column "with a
//! witness"): it asserts the guarantee (never two primaries accepting writes at once, no
//! acknowledged commit lost) and the availability outcome the table gives, and prints its
//! figures (run with --nocapture to see them).

mod common;

use std::thread::sleep;
use std::time::{Duration, Instant};

use common::partition::{Checker, Mode, ProxiedPair, Verdict};
use common::{time_until, wait_until, Node, Options};

/// keepalive_time x keepalive_count.
const BUDGET: Duration = Duration::from_secs(3);
/// A bound on the lease (3.2 s), with room for a loaded machine.
const LEASE: Duration = Duration::from_secs(5);
/// Generous allowance on top of the budgets for a loaded machine.
const MARGIN: Duration = Duration::from_secs(15);

fn report(scenario: &str, pp: &ProxiedPair, v: &Verdict) {
    eprintln!(
        "[{scenario}] final primary: {:?} (writable at the end: {:?}); acknowledged commits: {} \
         (node1 {}, node2 {}); lost: {}; both writable for {} ms; longest gap between \
         acknowledged commits: {} ms; stalls over 1 s (start+length, ms): {:?}; lease at the end: {:?}",
        v.final_primary,
        v.writable_at_end,
        v.acknowledged,
        v.acknowledged_by[0],
        v.acknowledged_by[1],
        v.lost.len(),
        v.overlap.as_millis(),
        v.longest_gap.as_millis(),
        v.stalls
            .iter()
            .map(|(at, len)| format!("{}+{}", at.as_millis(), len.as_millis()))
            .collect::<Vec<_>>(),
        pp.lease()
    );
    for n in pp.nodes() {
        eprintln!(
            "[{scenario}] ---- {} keeper log ----\n{}",
            n.name,
            n.keeper_log().join("\n")
        );
    }
}

/// A pair with a witness, and a checker that has been writing for 3 s.
fn writing(label: &str) -> (ProxiedPair, Checker) {
    let pp = ProxiedPair::connected_with_witness(label, Options::default());
    let checker = Checker::start(&pp.pair);
    sleep(Duration::from_secs(3));
    (pp, checker)
}

/// Waits (20 s at most) for a commit of the writer acknowledged by `node` since `since`.
fn expect_writes(checker: &Checker, node: &Node, since: Instant, what: &str) {
    assert!(
        wait_until(Duration::from_secs(20), || checker
            .writer_acked_on(node, since)),
        "{what}"
    );
}

/// Stops the checker, prints the figures, and asserts the guarantee (no acknowledged commit
/// lost, never two primaries accepting writes at once) and which node is the primary at the end.
fn conclude(scenario: &str, pp: &ProxiedPair, checker: Checker, primary: &str) -> Verdict {
    let v = checker.finish(&pp.pair);
    report(scenario, pp, &v);
    assert!(v.lost.is_empty(), "lost acknowledged commits: {v:?}");
    assert_eq!(v.overlap, Duration::ZERO, "two primaries at once: {v:?}");
    assert_eq!(v.final_primary, Some(primary), "{v:?}");
    v
}

fn holder(pp: &ProxiedPair) -> Option<String> {
    pp.lease().map(|l| l.0)
}

#[test]
fn primary_crash_the_standby_takes_the_lease_and_the_old_primary_is_fenced_by_the_witness_alone() {
    let (pp, checker) = writing("w-crash");
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);

    node1.kill9();
    let killed = Instant::now();
    let promoted = time_until(BUDGET + LEASE + MARGIN, || {
        node2.in_recovery() == Some(false)
    })
    .expect("node2 did not promote");
    node2.expect_log("took the lease on the witness", Duration::from_secs(5));
    let (h, epoch, sync, valid) = pp.lease().expect("no lease on the witness");
    assert_eq!((h.as_str(), epoch), ("node2", 2), "{:?}", pp.lease());
    assert!(valid, "the new primary does not renew its lease");
    expect_writes(&checker, node2, killed, "the writer did not move to node2");

    // The old primary comes back while it cannot reach node2 (its heartbeats are swallowed):
    // only the witness can tell it that it was superseded.
    pp.to_node2.set_mode(Mode::Blackhole);
    let _ = node1.try_start();
    node1.expect_log(
        "the lease on the witness names node2",
        Duration::from_secs(20),
    );
    let fenced = time_until(Duration::from_secs(30), || node1.postmaster_pid().is_none())
        .expect("the superseded primary did not shut down");
    assert!(node1.dir.join("standby.signal").exists());
    pp.to_node2.set_mode(Mode::Pass);

    eprintln!(
        "[w-crash] node2 promoted {} ms after the kill (lease {} ms); the returning node1 shut \
         down {} ms after it was started; lease sync standby after the failover: {sync:?}",
        promoted.as_millis(),
        LEASE.as_millis(),
        fenced.as_millis()
    );
    conclude("w-crash", &pp, checker, "node2");
}

#[test]
fn standby_crash_the_primary_releases_the_standby_on_the_witness_then_goes_async() {
    let (pp, checker) = writing("w-standby-crash");
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    assert_eq!(
        pp.lease().and_then(|l| l.2).as_deref(),
        Some("node2"),
        "{:?}",
        pp.lease()
    );

    node2.kill9();
    let killed = Instant::now();
    node1.expect_log(
        "recorded on the witness that no standby is synchronous",
        BUDGET + MARGIN,
    );
    node1.expect_log(
        "switching to asynchronous replication",
        Duration::from_secs(5),
    );
    let lease = pp.lease().expect("no lease");
    assert_eq!((lease.0.as_str(), lease.2.as_deref()), ("node1", None));
    // The release comes before the switch in the log.
    let log = node1.keeper_log().join("\n");
    assert!(
        log.find("recorded on the witness") < log.find("changed replication mode to asynchronous"),
        "{log}"
    );
    expect_writes(
        &checker,
        node1,
        killed + BUDGET,
        "writes did not resume on node1",
    );

    // The standby comes back: synchronous again, and the lease names it again.
    node2.start();
    assert!(
        wait_until(Duration::from_secs(30), || pp
            .lease()
            .and_then(|l| l.2)
            .as_deref()
            == Some("node2")),
        "the lease does not name node2 again: {:?}",
        pp.lease()
    );
    assert_eq!(
        node1.sql("SHOW synchronous_standby_names").unwrap(),
        "node1, node2"
    );

    conclude("w-standby-crash", &pp, checker, "node1");
}

#[test]
fn primary_frozen_the_standby_takes_over_and_the_thawed_primary_fences_itself() {
    let (mut pp, checker) = writing("w-frozen");

    pp.pair.node1.freeze();
    let frozen = Instant::now();
    let promoted = time_until(BUDGET + LEASE + MARGIN, || {
        pp.pair.node2.in_recovery() == Some(false)
    });
    let took = pp.pair.node2.keeper_log().join("\n");
    pp.pair.node1.thaw();
    let promoted = promoted.expect("node2 did not promote");
    assert!(took.contains("took the lease on the witness"), "{took}");
    pp.pair
        .node1
        .expect_log("superseded", Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(30), || pp
            .pair
            .node1
            .postmaster_pid()
            .is_none()),
        "the thawed primary did not shut down"
    );
    expect_writes(
        &checker,
        &pp.pair.node2,
        frozen,
        "the writer did not move to node2",
    );

    eprintln!(
        "[w-frozen] node2 promoted {} ms after the freeze",
        promoted.as_millis()
    );
    conclude("w-frozen", &pp, checker, "node2");
}

#[test]
fn link_cut_between_the_nodes_the_primary_holds_the_lease_and_goes_on_the_standby_waits() {
    let (pp, checker) = writing("w-cut");
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);

    pp.link(Mode::Blackhole);
    let cut = Instant::now();
    node1.expect_log("switching to asynchronous replication", BUDGET + MARGIN);
    node2.expect_log("not promoting", BUDGET + MARGIN);
    expect_writes(
        &checker,
        node1,
        cut + BUDGET,
        "writes did not resume on node1",
    );
    // Well past the lease: node2 still waits, since the lease stays node1's.
    sleep(LEASE + Duration::from_secs(3));
    assert_eq!(node2.in_recovery(), Some(true), "node2 promoted");
    assert_eq!(holder(&pp).as_deref(), Some("node1"));
    let waited = node2.keeper_log().join("\n");
    assert!(
        waited.contains("the primary's lease has not expired")
            || waited.contains("does not name this standby"),
        "{waited}"
    );

    pp.link(Mode::Pass);
    let healed = Instant::now();
    node1.expect_title("master mode:connected", Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || pp
            .lease()
            .and_then(|l| l.2)
            .as_deref()
            == Some("node2")),
        "synchronous replication (and the lease's standby) not back: {:?}",
        pp.lease()
    );

    eprintln!("[w-cut] cut for {} ms", (healed - cut).as_millis());
    let v = conclude("w-cut", &pp, checker, "node1");
    assert_eq!(v.acknowledged_by[1], 0, "{v:?}");
}

#[test]
fn primary_isolated_from_both_keeps_commits_waiting_and_the_standby_takes_over() {
    let (pp, checker) = writing("w-isolate-primary");
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);

    pp.isolate(node1, Mode::Blackhole);
    let cut = Instant::now();
    // node1 loses its standby but cannot renew its lease: it stays synchronous, so what it is
    // sent now is never acknowledged.
    node1.expect_log("not switching to asynchronous replication", BUDGET + MARGIN);
    assert!(
        wait_until(BUDGET + LEASE + MARGIN, || node2.in_recovery()
            == Some(false)),
        "node2 did not promote"
    );
    let promoted = cut.elapsed();
    assert_eq!(holder(&pp).as_deref(), Some("node2"));
    // node2 takes writes (the probe writes to it directly; the writer, which still reaches the
    // isolated node1 first, waits there).
    sleep(Duration::from_secs(2));
    let on_node2 = checker
        .acks()
        .iter()
        .filter(|a| a.port == node2.port && a.start >= cut)
        .count();
    assert!(on_node2 > 0, "node2 accepted no write after it promoted");
    let log1 = node1.keeper_log().join("\n");
    assert!(
        !log1.contains("changed replication mode to asynchronous"),
        "{log1}"
    );

    // Healed: node1 learns it was superseded, and shuts down.
    pp.isolate(node1, Mode::Pass);
    let healed = Instant::now();
    node1.expect_log("superseded", Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(30), || node1.postmaster_pid().is_none()),
        "the superseded primary did not shut down"
    );
    expect_writes(&checker, node2, healed, "the writer did not move to node2");

    eprintln!(
        "[w-isolate-primary] node2 promoted {} ms after the cut; it accepted {on_node2} probe \
         writes within 2 s; isolated for {} ms",
        promoted.as_millis(),
        (healed - cut).as_millis()
    );
    conclude("w-isolate-primary", &pp, checker, "node2");
}

#[test]
fn standby_isolated_from_both_does_not_promote_and_the_primary_goes_on() {
    let (pp, checker) = writing("w-isolate-standby");
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);

    pp.isolate(node2, Mode::Blackhole);
    let cut = Instant::now();
    node1.expect_log("switching to asynchronous replication", BUDGET + MARGIN);
    node2.expect_log("the witness cannot be reached", BUDGET + MARGIN);
    expect_writes(
        &checker,
        node1,
        cut + BUDGET,
        "writes did not resume on node1",
    );
    sleep(LEASE + Duration::from_secs(3));
    assert_eq!(
        node2.in_recovery(),
        Some(true),
        "the isolated standby promoted"
    );
    node2.expect_log("cannot use the witness", Duration::from_secs(1));

    pp.isolate(node2, Mode::Pass);
    assert!(
        wait_until(Duration::from_secs(40), || pp
            .lease()
            .and_then(|l| l.2)
            .as_deref()
            == Some("node2")),
        "synchronous replication not back: {:?}",
        pp.lease()
    );
    node2.expect_log("the witness is usable again", Duration::from_secs(10));

    let v = conclude("w-isolate-standby", &pp, checker, "node1");
    assert_eq!(v.acknowledged_by[1], 0, "{v:?}");
}

#[test]
fn witness_down_nothing_fails_over_both_warn_and_a_lost_primary_waits_for_the_witness() {
    let (pp, checker) = writing("w-down");
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    node1.sql("CREATE EXTENSION pg_keeper_rs").unwrap();
    for node in pp.nodes() {
        let shown = node.sql("SELECT witness FROM pg_keeper_status").unwrap();
        assert!(shown.starts_with("lease held by node1"), "{shown}");
    }

    let witness = pp.witness.as_ref().expect("a witness");
    witness.stop();
    let down = Instant::now();
    for node in pp.nodes() {
        node.expect_log("cannot use the witness", Duration::from_secs(10));
    }
    sleep(LEASE + Duration::from_secs(3));
    // Nothing failed over; commits go on; the warning is not repeated every tick.
    assert_eq!(node2.in_recovery(), Some(true));
    assert!(checker.writer_acked_on(node1, down + Duration::from_secs(5)));
    for node in pp.nodes() {
        let warnings = node.log_text().matches("cannot use the witness").count();
        assert_eq!(warnings, 1, "{}: warned {warnings} times in 8 s", node.name);
        let shown = node.sql("SELECT witness FROM pg_keeper_status").unwrap();
        assert!(shown.starts_with("unusable for"), "{}: {shown}", node.name);
    }

    // The primary is lost too (a second fault): no failover without the witness.
    node1.kill9();
    node2.expect_log("the witness cannot be reached", BUDGET + MARGIN);
    sleep(Duration::from_secs(3));
    assert_eq!(
        node2.in_recovery(),
        Some(true),
        "promoted without the witness"
    );

    // The witness is back: node2 takes the expired lease, which names it, and promotes.
    witness.start();
    let back = Instant::now();
    let promoted = time_until(BUDGET + MARGIN, || node2.in_recovery() == Some(false))
        .expect("node2 did not promote once the witness was back");
    node2.expect_log("the witness is usable again", Duration::from_secs(5));
    expect_writes(&checker, node2, back, "the writer did not move to node2");

    eprintln!(
        "[w-down] node2 promoted {} ms after the witness came back",
        promoted.as_millis()
    );
    conclude("w-down", &pp, checker, "node2");
}

#[test]
fn flapping_link_with_a_witness_never_gives_two_primaries_nor_loses_a_commit() {
    let (pp, checker) = writing("w-flapping");
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);

    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        pp.link(Mode::Drop);
        sleep(Duration::from_secs(1));
        pp.link(Mode::Pass);
        sleep(Duration::from_secs(1));
    }
    let healed = Instant::now();
    // node1 holds the lease throughout, so node2 never takes it.
    sleep(BUDGET + Duration::from_secs(3));
    assert_eq!(node2.in_recovery(), Some(true), "node2 promoted");
    assert_eq!(holder(&pp).as_deref(), Some("node1"));
    expect_writes(&checker, node1, healed, "no commit after the link settled");

    let v = conclude("w-flapping", &pp, checker, "node1");
    assert_eq!(v.acknowledged_by[1], 0, "{v:?}");
}

#[test]
fn a_lagging_standby_is_not_named_by_the_lease_and_does_not_promote() {
    let (pp, checker) = writing("w-lagging");
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);

    // Replication is cut, heartbeats still pass: node1 counts the standby as failing and, once
    // the witness says no standby is synchronous, switches to async; node2 falls behind.
    pp.repl_to_node1.set_mode(Mode::Drop);
    let cut = Instant::now();
    node1.expect_log("switching to asynchronous replication", BUDGET + MARGIN);
    expect_writes(
        &checker,
        node1,
        cut + BUDGET,
        "writes did not resume on node1",
    );
    assert_eq!(pp.lease().and_then(|l| l.2), None, "{:?}", pp.lease());
    sleep(Duration::from_secs(2));

    node1.kill9();
    node2.expect_log("not promoting", BUDGET + LEASE + MARGIN);
    sleep(LEASE + Duration::from_secs(3));
    assert_eq!(
        node2.in_recovery(),
        Some(true),
        "a lagging standby promoted"
    );

    // The old primary is restarted: it is the primary again (it still holds the lease), and
    // nothing it acknowledged is lost.
    node1.start();
    let restarted = Instant::now();
    node1.expect_title("master mode", Duration::from_secs(20));
    pp.repl_to_node1.set_mode(Mode::Pass);
    expect_writes(
        &checker,
        node1,
        restarted,
        "writes did not resume on the restarted node1",
    );

    conclude("w-lagging", &pp, checker, "node1");
    assert_eq!(holder(&pp).as_deref(), Some("node1"));
}

/// The WAL position `node` has written up to (`pg_current_wal_insert_lsn()`), if it answers.
fn insert_lsn(node: &Node) -> Option<String> {
    node.sql("SELECT pg_current_wal_insert_lsn()").ok()
}

/// How far node2 is behind node1 as node1 sees it: `pg_current_wal_lsn() - flush_lsn` of
/// node2's walsender (bytes), and its state.
fn lag_on_primary(node1: &Node) -> Option<String> {
    node1
        .sql(
            "SELECT state || ' ' || sync_state || ' lag ' || \
             pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint || ' bytes' \
             FROM pg_stat_replication WHERE application_name = 'node2'",
        )
        .ok()
        .filter(|s| !s.is_empty())
}

/// The slow link's bandwidth in the catch-up test, bytes per second each way.
const SLOW_LINK: u64 = 200_000;

#[test]
fn a_standby_back_over_a_slow_link_is_not_trusted_before_it_has_caught_up() {
    let (pp, checker) = writing("w-slow-catchup");
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);

    // Replication is cut: node1 releases node2 on the witness and goes on asynchronously.
    pp.repl_to_node1.set_mode(Mode::Drop);
    node1.expect_log("switching to asynchronous replication", BUDGET + MARGIN);
    let async_since = Instant::now();
    expect_writes(
        &checker,
        node1,
        async_since,
        "writes did not resume on node1",
    );

    // Several MB that only node1 has (below pg_keeper.sync_restore_lag = 16MB, so that
    // synchronous replication is put back while node2 is still far behind), then a little more
    // of the writer's acknowledged commits on top.
    let before = insert_lsn(node1).expect("node1 answers");
    node1
        .sql(
            "CREATE TABLE fill (id int, pad text); \
             INSERT INTO fill SELECT g, repeat('x', 1000) FROM generate_series(1, 6000) g",
        )
        .expect("fill");
    let written = node1
        .sql(&format!(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '{before}')::bigint"
        ))
        .expect("node1 answers");
    sleep(Duration::from_secs(1));
    let acked_async = checker
        .acks()
        .iter()
        .filter(|a| a.id.is_some() && a.start >= async_since)
        .count();
    eprintln!(
        "[w-slow-catchup] node1 wrote {written} bytes of WAL while asynchronous; the writer had \
         {acked_async} commits acknowledged since the switch"
    );

    // node2 comes back over a slow link: it streams again, far behind.
    pp.repl_to_node1.set_rate(Some(SLOW_LINK));
    pp.repl_to_node1.set_mode(Mode::Pass);
    let back = Instant::now();
    // The walsender is back to "streaming" (and node1 restores sync) once what it has not sent
    // yet fits in the socket buffers on the way, measured at about 4 MB on loopback.
    let restored = time_until(Duration::from_secs(45), || {
        node1
            .log_text()
            .contains("restored synchronous replication")
    });
    let lag_at_restore = lag_on_primary(node1);
    eprintln!(
        "[w-slow-catchup] synchronous replication restored {:?} ms after the link came back \
         ({} kB/s); node2 as node1 sees it then: {lag_at_restore:?}",
        restored.map(|d| d.as_millis()),
        SLOW_LINK / 1000
    );
    assert!(
        restored.is_some(),
        "node1 did not restore synchronous replication within 45 s of the link coming back \
         (over a {} kB/s link): {:?}\n{}",
        SLOW_LINK / 1000,
        lag_on_primary(node1),
        node1.keeper_log().join("\n")
    );
    // The lease names node2 (the hole) or, fixed, it does not while node2 is behind.
    let named = time_until(Duration::from_secs(10), || {
        pp.lease().and_then(|l| l.2).as_deref() == Some("node2")
    });
    let lag_at_crash = lag_on_primary(node1);
    let lsn_at_crash = insert_lsn(node1).unwrap_or_default();
    let lease_at_crash = pp.lease();

    // The primary's host dies: the backlog still in flight never arrives.
    pp.repl_to_node1.set_mode(Mode::Drop);
    node1.kill9();
    let crashed = Instant::now();
    let received = node2
        .sql(&format!(
            "SELECT pg_last_wal_receive_lsn() || ' (' || \
             pg_wal_lsn_diff('{lsn_at_crash}', pg_last_wal_receive_lsn())::bigint || ' bytes behind)'"
        ))
        .unwrap_or_else(|e| e);
    eprintln!(
        "[w-slow-catchup] lease named node2 {:?} ms after the restore; at the crash ({} ms after \
         the link came back): node2 as node1 saw it: {lag_at_crash:?}; node1 insert LSN \
         {lsn_at_crash}; node2 received up to {received}; lease {lease_at_crash:?}",
        named.map(|d| d.as_millis()),
        (crashed - back).as_millis()
    );

    // Either node2 promotes (then it must have every acknowledged commit), or it says why not:
    // the lease does not name it (or it was not synchronous at the primary's last answer).
    let refused = |log: &str| {
        log.contains("does not name this standby")
            || log.contains("was not its synchronous standby at the last answer")
    };
    let settled = wait_until(BUDGET + LEASE + MARGIN, || {
        node2.in_recovery() == Some(false) || refused(&node2.log_text())
    });
    let promoted = node2.in_recovery() == Some(false);
    eprintln!(
        "[w-slow-catchup] {} ms after the crash: node2 {} (settled: {settled})",
        crashed.elapsed().as_millis(),
        if promoted {
            "promoted"
        } else {
            "did not promote"
        }
    );
    if promoted {
        node2.expect_log("took the lease on the witness", Duration::from_secs(5));
        expect_writes(&checker, node2, crashed, "the writer did not move to node2");
        conclude("w-slow-catchup", &pp, checker, "node2");
        return;
    }

    // Not trusted: node2 waits well past the lease, and says it is not named.
    assert!(settled, "node2 neither promoted nor said why not");
    sleep(LEASE + Duration::from_secs(3));
    assert_eq!(node2.in_recovery(), Some(true), "a standby behind promoted");
    let waited = node2.keeper_log().join("\n");
    assert!(
        waited.contains("not promoting") && refused(&waited),
        "{waited}"
    );

    // The old primary comes back with its links healed: primary again, nothing lost.
    pp.repl_to_node1.set_rate(None);
    pp.repl_to_node1.set_mode(Mode::Pass);
    node1.start();
    let restarted = Instant::now();
    node1.expect_title("master mode", Duration::from_secs(20));
    expect_writes(
        &checker,
        node1,
        restarted,
        "writes did not resume on the restarted node1",
    );
    conclude("w-slow-catchup", &pp, checker, "node1");
    assert_eq!(holder(&pp).as_deref(), Some("node1"));
}

#[test]
fn a_standby_that_took_the_lease_and_crashed_before_promoting_promotes_when_it_starts_again() {
    let (pp, checker) = writing("w-took-then-crashed");
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    let witness = pp.witness.as_ref().expect("a witness");
    // The hand-made take-over below is only valid for the standby the lease names.
    let before = pp.lease().expect("no lease on the witness");
    assert_eq!(
        (before.0.as_str(), before.2.as_deref()),
        ("node1", Some("node2")),
        "{before:?}"
    );

    // The primary dies, and the standby's server at once too: long before it could take the
    // lease (it needs three failed heartbeats, then the lease to expire, 5 s after node1's last
    // renewal).
    node1.kill9();
    let killed = Instant::now();
    node2.stop("immediate");
    let stopped = killed.elapsed();
    let log2 = node2.keeper_log().join("\n");
    assert!(
        !log2.contains("took the lease") && !log2.contains("promoting this standby"),
        "node2 acted before it was stopped:\n{log2}"
    );
    let still = pp.lease().expect("no lease on the witness");
    assert_eq!(
        (still.0.as_str(), still.1, still.2.as_deref()),
        ("node1", before.1, Some("node2")),
        "the lease changed before the hand-made take-over: {still:?}"
    );

    // What node2's take-over would have written, had it died right after it: the state a
    // standby leaves when its server crashes (or its worker restarts) between taking the lease
    // and the end of recovery.
    let taken = witness
        .sql(
            "UPDATE pg_keeper_lease SET holder = 'node2', epoch = epoch + 1, sync_standby = NULL, \
             promoting = true, expires_at = clock_timestamp() + interval '5 seconds', \
             renewed_at = clock_timestamp() WHERE id = 1 RETURNING holder, epoch, promoting",
        )
        .expect("take the lease by hand");
    assert_eq!(taken, format!("node2|{}|t", before.1 + 1));

    // node2 starts again, node1 stays down. Before the fix node2 started in "standby mode",
    // never saw the primary (so failover was not armed) and waited: nobody was primary, and
    // the lease it held kept anyone else from taking over.
    node2.start();
    let started = Instant::now();
    node2.expect_log("going on with the promotion", Duration::from_secs(15));
    let promoted = time_until(Duration::from_secs(15), || {
        node2.in_recovery() == Some(false)
    })
    .map(|_| started.elapsed())
    .expect("node2 did not promote within 15 s of its start");
    expect_writes(&checker, node2, started, "the writer did not move to node2");
    // Its first renewal as a primary (at its next tick) records its new timeline and clears
    // `promoting`, in the same epoch.
    let row = || {
        witness
            .sql(
                "SELECT holder, epoch, timeline, promoting, expires_at > clock_timestamp() \
                 FROM pg_keeper_lease WHERE id = 1",
            )
            .unwrap_or_else(|e| e)
    };
    let renewed_row = format!("node2|{}|2|f|t", before.1 + 1);
    let renewed =
        time_until(Duration::from_secs(10), || row() == renewed_row).map(|_| started.elapsed());
    assert!(
        renewed.is_some(),
        "node2 did not renew its lease as a primary (holder|epoch|timeline|promoting|valid: \
         {}, expected {renewed_row})",
        row()
    );

    // The old primary comes back: the lease names node2, so it fences itself.
    let restarting = Instant::now();
    let _ = node1.try_start();
    node1.expect_log("superseded", Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(30), || node1.postmaster_pid().is_none()),
        "the superseded primary did not shut down"
    );
    let fenced = restarting.elapsed();
    assert!(node1.dir.join("standby.signal").exists());

    eprintln!(
        "[w-took-then-crashed] node2 stopped {} ms after node1's kill; node2 promoted {} ms \
         after its start and had renewed the lease as a primary {} ms after its start; the \
         returning node1 was down again {} ms after pg_ctl start began",
        stopped.as_millis(),
        promoted.as_millis(),
        renewed.unwrap().as_millis(),
        fenced.as_millis()
    );
    conclude("w-took-then-crashed", &pp, checker, "node2");
}
