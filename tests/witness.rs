//! The witness: the same faults as tests/partitions.rs and tests/failover.rs, with
//! `pg_keeper.witness_conninfo` set on both nodes, each reaching the witness (a plain server)
//! through its own proxy. keepalive_time 1s x keepalive_count 3: a 3 s budget and a 3.2 s lease
//! (3 x keepalive_time + 200 ms).
//! Each test is a row of README.md's table "Split brain and lost commits" (column "with a
//! witness"): it asserts the guarantee (never two primaries accepting writes at once, no
//! acknowledged commit lost) and the availability outcome the table gives, and prints its
//! figures (run with --nocapture to see them).

mod common;

use std::io::Write;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::partition::{Checker, Mode, ProxiedPair, Verdict, Witness};
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
    node1.expect_switch_to_async(Duration::from_secs(5));
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
    node1.expect_switch_to_async(BUDGET + MARGIN);
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
    // sent now is never acknowledged, and before its lease can be taken it stops serving
    // (hole 8; tests/holes.rs times that against the take-over).
    node1.expect_log(
        "isolated: this primary has reached neither",
        BUDGET + MARGIN,
    );
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
    node1.expect_switch_to_async(BUDGET + MARGIN);
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
    node1.expect_switch_to_async(BUDGET + MARGIN);
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
    slow_catchup("w-slow-catchup", true);
}

/// Hole 1 without a witness: the standby's own guard went by `sync_state = 'sync'` in the
/// primary's answer, which a standby far behind shows as soon as it streams again; now the
/// answer also says whom the primary's keeper trusts, by the same rule as the lease.
#[test]
fn without_a_witness_a_standby_back_over_a_slow_link_does_not_count_itself_synchronous() {
    slow_catchup("slow-catchup", false);
}

/// Replication is cut, node1 goes on asynchronously and writes several MB, node2 comes back
/// over a slow link and synchronous replication is put back while it is still far behind; then
/// node1's host dies. node2 must either not promote, or promote with every acknowledged commit.
fn slow_catchup(label: &str, with_witness: bool) {
    let (pp, checker) = if with_witness {
        writing(label)
    } else {
        let pp = ProxiedPair::connected(label, Options::default());
        let checker = Checker::start(&pp.pair);
        sleep(Duration::from_secs(3));
        (pp, checker)
    };
    let label = label.to_string();
    let label = label.as_str();
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);

    // Replication is cut: node1 releases node2 on the witness and goes on asynchronously.
    pp.repl_to_node1.set_mode(Mode::Drop);
    node1.expect_switch_to_async(BUDGET + MARGIN);
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
        "[{label}] node1 wrote {written} bytes of WAL while asynchronous; the writer had \
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
        "[{label}] synchronous replication restored {:?} ms after the link came back \
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
    let named = if with_witness {
        time_until(Duration::from_secs(10), || {
            pp.lease().and_then(|l| l.2).as_deref() == Some("node2")
        })
    } else {
        // The standby's own guard: what the primary says of it (the lease plays no part).
        sleep(Duration::from_secs(2));
        None
    };
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
        "[{label}] lease named node2 {:?} ms after the restore; at the crash ({} ms after \
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
        "[{label}] {} ms after the crash: node2 {} (settled: {settled})",
        crashed.elapsed().as_millis(),
        if promoted {
            "promoted"
        } else {
            "did not promote"
        }
    );
    if promoted {
        if with_witness {
            node2.expect_log("took the lease on the witness", Duration::from_secs(5));
        }
        expect_writes(&checker, node2, crashed, "the writer did not move to node2");
        conclude(label, &pp, checker, "node2");
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
    conclude(label, &pp, checker, "node1");
    if with_witness {
        assert_eq!(holder(&pp).as_deref(), Some("node1"));
    }
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
    // A killed postmaster can linger a moment as a zombie that start still sees as running: try
    // again, bounded (it fences itself once it runs).
    let started = wait_until(Duration::from_secs(20), || {
        node1.try_start() || node1.log_text().contains("superseded")
    });
    assert!(started, "node1 could not be started again");
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

/// A psql session whose statement is expected to wait (a commit for its synchronous standby):
/// no statement timeout (a timeout would cancel the wait and report the commit done), output
/// kept; killed if still running when dropped.
struct Waiting(Option<std::process::Child>);

impl Waiting {
    fn start(node: &Node, sql: &str) -> Waiting {
        let child = std::process::Command::new(format!("{}/psql", common::BIN))
            .args(["-X", "-Atq", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args(["-U", "postgres", "-d", "postgres"])
            .args(["-p", &node.port.to_string(), "-c", sql])
            .env("PGCONNECT_TIMEOUT", "3")
            .env("PGOPTIONS", "-c statement_timeout=0")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start psql");
        Waiting(Some(child))
    }

    fn finished(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Its exit status and output (stdout then stderr), once it has finished.
    fn outcome(&mut self) -> (bool, String) {
        let out = self
            .0
            .take()
            .expect("psql")
            .wait_with_output()
            .expect("psql output");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sessions of `node` waiting for synchronous replication, asked on its direct port.
fn waiting_for_sync_rep(node: &Node) -> Option<u32> {
    node.sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
        .ok()?
        .parse()
        .ok()
}

/// Hole 7: the primary is cut off from both the standby and the witness. It cannot renew its
/// lease, so it rightly does not switch to async, and a commit made now waits for a standby it
/// cannot reach. Before the fix that session just waited: the client's own timeout or cancel
/// then got the COMMIT reported as done (PostgreSQL's "canceling wait for synchronous
/// replication" WARNING) although the standby, about to promote, never had it. Now the keeper
/// ends (terminates, not cancels) every session waiting for synchronous replication, at every
/// tick, so the client gets no answer rather than a false success.
#[test]
fn a_primary_isolated_from_both_ends_the_sessions_waiting_for_synchronous_replication() {
    // One failure: the standby counts as lost (and the waiting sessions are ended) before the
    // primary counts as isolated (3 s after its last contact), which ends every session anyway.
    let pp = ProxiedPair::connected_with_witness(
        "w-end-waiting",
        Options {
            keepalive_count: 1,
            ..Options::default()
        },
    );
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    node1.sql("CREATE TABLE t (id int)").unwrap();

    // Reset rather than black-holed, so that each call fails at once and the lost standby is
    // decided on well before the isolation deadline (a black-holed tick waits out both calls,
    // and then hole 8's isolation, which ends every session, comes first).
    pp.isolate(node1, Mode::Drop);
    let cut = Instant::now();
    // A commit on node1 (direct port): it waits for node2, which no longer hears from node1.
    let mut commit = Waiting::start(node1, "INSERT INTO t VALUES (1)");
    let waited = wait_until(Duration::from_secs(5), || {
        waiting_for_sync_rep(node1).is_some_and(|n| n >= 1)
    });
    assert!(
        waited || commit.finished(),
        "the commit neither waits for synchronous replication nor finished: {:?}",
        waiting_for_sync_rep(node1)
    );
    node1.expect_log(
        "session(s) waiting for synchronous replication",
        BUDGET + MARGIN,
    );
    let ended_after = cut.elapsed();
    let finished = wait_until(Duration::from_secs(10), || commit.finished());
    assert!(
        finished,
        "the waiting commit is still running although node1 logged that it ended the sessions:\n{}",
        node1.keeper_log().join("\n")
    );
    let (success, output) = commit.outcome();
    eprintln!(
        "[w-end-waiting] the commit waited: {waited}; node1 ended the waiting sessions {} ms \
         after the cut; psql: success {success}, output {output:?}",
        ended_after.as_millis()
    );
    assert!(!success, "the waiting COMMIT was reported done: {output}");
    assert!(
        output.contains("terminating connection")
            || output.contains("server closed the connection")
            || output.contains("connection to server was lost"),
        "psql did not see its connection ended: {output}"
    );
    // PostgreSQL says "canceling the wait for synchronous replication and terminating
    // connection due to administrator command" and closes the session: no COMMIT answer. A
    // cancel ("... due to user request") would have answered COMMIT.
    assert!(!output.contains("due to user request"), "{output}");
    // None waits any more; or node1 has since stopped serving at all (hole 8: isolated).
    let isolated = || {
        node1
            .sql("SELECT 1")
            .is_err_and(|e| e.contains("isolated from its standby and the witness"))
    };
    assert!(
        wait_until(Duration::from_secs(5), || waiting_for_sync_rep(node1)
            == Some(0)
            || isolated()),
        "sessions still wait for synchronous replication on node1: {:?}",
        waiting_for_sync_rep(node1)
    );
    let line = node1
        .keeper_log()
        .into_iter()
        .find(|l| l.contains("session(s) waiting for synchronous replication"))
        .unwrap_or_default();
    assert!(line.contains("ended "), "{line}");
    let log1 = node1.keeper_log().join("\n");
    assert!(
        !log1.contains("changed replication mode to asynchronous"),
        "{log1}"
    );

    // node2 takes over once node1's lease has expired.
    assert!(
        wait_until(BUDGET + LEASE + MARGIN, || node2.in_recovery()
            == Some(false)),
        "node2 did not promote"
    );
    let promoted = cut.elapsed();
    assert_eq!(holder(&pp).as_deref(), Some("node2"));

    // Healed: node1 learns that it was superseded and shuts down; one primary.
    pp.isolate(node1, Mode::Pass);
    node1.expect_log("superseded", Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(30), || node1.postmaster_pid().is_none()),
        "the superseded primary did not shut down"
    );
    assert_eq!(node2.in_recovery(), Some(false));
    node2
        .sql("CREATE TABLE after_heal (id int); INSERT INTO after_heal VALUES (1)")
        .expect("node2 takes writes");
    eprintln!(
        "[w-end-waiting] {line}\n[w-end-waiting] node2 promoted {} ms after the cut; rows of t \
         on node2 (the ended commit was never acknowledged): {:?}",
        promoted.as_millis(),
        node2.sql("SELECT count(*) FROM t")
    );
}

/// What `node` shows about the witness in pg_keeper_status.
/// Waits (at most 20 s) for a valid lease held by node1 that names node2 as synchronous.
fn expect_lease_of_node1_naming_node2(pp: &ProxiedPair) {
    assert!(
        wait_until(Duration::from_secs(20), || pp
            .lease()
            .is_some_and(|l| l.0 == "node1"
                && l.2.as_deref() == Some("node2")
                && l.3)),
        "no lease held by node1 naming node2: {:?}",
        pp.lease()
    );
}

fn witness_status(node: &Node) -> String {
    node.sql("SELECT witness FROM pg_keeper_status")
        .unwrap_or_else(|e| e)
}

/// Hole 10: a witness that cannot keep a lease safely, a standby (in recovery) or a server with
/// fsync = off, was used as any other: a lease written there could be lost (with its primary,
/// or in a crash) and then taken twice. Now both keepers refuse it and say why, and use it once
/// it is fit: here a standby of a witness (refused), promoted but with fsync = off (refused),
/// then with fsync = on (usable, the lease is made).
#[test]
fn a_witness_in_recovery_or_with_fsync_off_is_refused_until_it_is_fit() {
    let mut pp = ProxiedPair::connected("w-unfit-witness", Options::default());
    pp.pair.node1.sql("CREATE EXTENSION pg_keeper_rs").unwrap();
    let first = Witness::create(&pp.pair.root);
    let standby = first.standby(&pp.pair.root, "witness2");
    standby.node.append_conf("fsync = off");
    standby.node.reload();
    assert_eq!(
        standby.sql("SELECT pg_is_in_recovery()").as_deref(),
        Ok("t")
    );
    assert_eq!(standby.sql("SHOW fsync").as_deref(), Ok("off"));
    // The keepers are given the standby as their witness (through their witness proxies).
    pp.use_witness(standby.port());
    for node in pp.nodes() {
        node.expect_log(
            "cannot use the witness: the witness server is in recovery (a standby)",
            Duration::from_secs(15),
        );
    }
    sleep(Duration::from_secs(2));
    assert_eq!(
        first
            .sql("SELECT to_regclass('pg_keeper_lease') IS NULL")
            .as_deref(),
        Ok("t"),
        "a lease table was made although the witness is a standby"
    );
    for node in pp.nodes() {
        let shown = witness_status(node);
        assert!(
            shown.starts_with("unusable for") && shown.contains("in recovery"),
            "{}: {shown}",
            node.name
        );
    }

    // Promoted, but with fsync = off: still refused (the warning is said once per outage; the
    // status shows the reason in force).
    standby.sql("SELECT pg_promote()").unwrap();
    let refused_fsync = wait_until(Duration::from_secs(15), || {
        pp.nodes()
            .iter()
            .all(|n| witness_status(n).contains("runs with fsync = off"))
    });
    assert!(
        refused_fsync,
        "the promoted witness with fsync = off is not refused: node1 {:?}, node2 {:?}\n{}\n{}",
        witness_status(&pp.pair.node1),
        witness_status(&pp.pair.node2),
        pp.pair.node1.keeper_log().join("\n"),
        pp.pair.node2.keeper_log().join("\n")
    );
    assert_eq!(
        standby
            .sql("SELECT to_regclass('pg_keeper_lease') IS NULL")
            .as_deref(),
        Ok("t"),
        "a lease table was made on a witness with fsync = off"
    );

    // fsync = on: the witness is usable, and node1 makes its lease there.
    standby
        .sql("ALTER SYSTEM SET fsync = on")
        .and_then(|_| standby.sql("SELECT pg_reload_conf()"))
        .unwrap();
    for node in pp.nodes() {
        node.expect_log("the witness is usable again", Duration::from_secs(15));
    }
    pp.witness = Some(standby);
    expect_lease_of_node1_naming_node2(&pp);
    for node in pp.nodes() {
        eprintln!(
            "[w-unfit-witness] {}: {}",
            node.name,
            node.keeper_log()
                .iter()
                .filter(|l| l.contains("witness"))
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // Dropped before the pair (its directory is inside the pair's).
    drop(first);
}

/// Hole 10, after a restart: the witness is fine, then restarted with fsync = off. Before the
/// fix nothing about the witness server was checked; now the keepers must find it unusable
/// once they reconnect, and usable again once fsync is back on.
#[test]
fn a_witness_restarted_with_fsync_off_is_refused_and_usable_again_with_fsync_on() {
    let pp = ProxiedPair::connected_with_witness("w-fsync-restart", Options::default());
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    node1.sql("CREATE EXTENSION pg_keeper_rs").unwrap();
    let witness = pp.witness.as_ref().expect("a witness");
    assert_eq!(witness.sql("SHOW fsync").as_deref(), Ok("on"));

    witness.sql("ALTER SYSTEM SET fsync = off").unwrap();
    witness.node.restart();
    assert_eq!(witness.sql("SHOW fsync").as_deref(), Ok("off"));
    let refused = time_until(Duration::from_secs(15), || {
        pp.nodes()
            .iter()
            .all(|n| witness_status(n).contains("runs with fsync = off"))
    });
    let logged: Vec<String> = pp
        .nodes()
        .iter()
        .flat_map(|n| {
            n.keeper_log()
                .into_iter()
                .filter(|l| l.contains("cannot use the witness"))
                .map(move |l| format!("{}: {l}", n.name))
        })
        .collect();
    eprintln!(
        "[w-fsync-restart] refused {:?} ms after the restart; status node1 {:?}, node2 {:?}; \
         warnings: {logged:#?}",
        refused.map(|d| d.as_millis()),
        witness_status(node1),
        witness_status(node2)
    );
    assert!(
        refused.is_some(),
        "a witness restarted with fsync = off is still used: node1 {:?}, node2 {:?}; lease {:?}\n{}\n{}",
        witness_status(node1),
        witness_status(node2),
        pp.lease(),
        node1.keeper_log().join("\n"),
        node2.keeper_log().join("\n")
    );
    // The warning is said once per outage: it names fsync unless a keeper saw the witness down
    // during the restart first.
    for node in pp.nodes() {
        node.expect_log("cannot use the witness", Duration::from_secs(1));
    }

    witness
        .sql("ALTER SYSTEM RESET fsync")
        .and_then(|_| witness.sql("SELECT pg_reload_conf()"))
        .unwrap();
    for node in pp.nodes() {
        node.expect_log("the witness is usable again", Duration::from_secs(15));
    }
    assert!(
        wait_until(Duration::from_secs(15), || pp
            .lease()
            .is_some_and(|l| l.0 == "node1" && l.3)),
        "node1 does not hold the lease again: {:?}",
        pp.lease()
    );
    assert_eq!(node2.in_recovery(), Some(true));
}

/// Hole 10, a reconnect with the witness up: fsync is turned off on the witness by a reload and
/// the keepers' sessions there are ended (what a restart of the witness between two of their
/// ticks looks like to them: a broken connection, and a fresh one to a server that now runs
/// with fsync = off). The keepers must check the server again on the new connection and refuse
/// it.
#[test]
fn a_witness_found_with_fsync_off_on_a_new_connection_is_refused() {
    let pp = ProxiedPair::connected_with_witness("w-fsync-reconnect", Options::default());
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    node1.sql("CREATE EXTENSION pg_keeper_rs").unwrap();
    let witness = pp.witness.as_ref().expect("a witness");
    // Both keepers have their session on the witness (node2's comes at its first look at the
    // lease).
    let sessions = || {
        witness
            .sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_keeper'")
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(10), || sessions() == "2"),
        "keeper sessions on the witness: {}",
        sessions()
    );
    witness
        .sql("ALTER SYSTEM SET fsync = off")
        .and_then(|_| witness.sql("SELECT pg_reload_conf()"))
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || witness
        .sql("SHOW fsync")
        .as_deref()
        == Ok("off")));
    let ended = witness
        .sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'pg_keeper' AND pid <> pg_backend_pid()",
        )
        .unwrap();
    eprintln!("[w-fsync-reconnect] ended {ended} keeper session(s) on the witness");
    assert!(ended.parse::<u32>().unwrap_or(0) >= 2, "{ended}");
    let refused = time_until(Duration::from_secs(10), || {
        pp.nodes()
            .iter()
            .all(|n| witness_status(n).contains("runs with fsync = off"))
    });
    let reconnected = witness
        .sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_keeper'")
        .unwrap_or_default();
    eprintln!(
        "[w-fsync-reconnect] refused: {:?} ms; keeper sessions on the witness now: \
         {reconnected}; status node1 {:?}, node2 {:?}; lease {:?}",
        refused.map(|d| d.as_millis()),
        witness_status(node1),
        witness_status(node2),
        pp.lease()
    );
    assert!(
        refused.is_some(),
        "the keepers reconnected to a witness with fsync = off and kept using it: node1 {:?}, \
         node2 {:?}\n{}\n{}",
        witness_status(node1),
        witness_status(node2),
        node1.keeper_log().join("\n"),
        node2.keeper_log().join("\n")
    );
    for node in pp.nodes() {
        node.expect_log(
            "cannot use the witness: the witness server runs with fsync = off",
            Duration::from_secs(1),
        );
    }
}

/// Hole 3: a lease row of another cluster (another pair on the same witness database, or one
/// that no longer exists) was obeyed like this pair's: a row naming "node2" made node1 fence
/// itself, and an expired one could let node2 promote. Every statement now compares the
/// cluster's system identifier: both keepers report the row as another cluster's and ignore it;
/// node1 stays the primary, node2 a standby. Put back, the row is this cluster's again and
/// node1 renews it.
#[test]
fn a_lease_of_another_cluster_is_never_obeyed() {
    let (pp, checker) = writing("w-foreign-lease");
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    let witness = pp.witness.as_ref().expect("a witness");
    let sysid = node1
        .sql("SELECT system_identifier FROM pg_control_system()")
        .unwrap();
    let stored = witness
        .sql("SELECT system_identifier FROM pg_keeper_lease WHERE id = 1")
        .unwrap();
    assert_eq!(stored, sysid, "the lease does not record this cluster");

    let changed = Instant::now();
    witness
        .sql(
            "UPDATE pg_keeper_lease SET system_identifier = '12345', holder = 'node2', \
             timeline = 99, expires_at = clock_timestamp() + interval '1 hour' WHERE id = 1",
        )
        .unwrap();
    for node in pp.nodes() {
        node.expect_log(
            "the lease on the witness belongs to another cluster (system identifier 12345",
            Duration::from_secs(10),
        );
    }
    // Well past a lease: nobody obeyed the row.
    sleep(LEASE + Duration::from_secs(3));
    assert_eq!(
        node1.in_recovery(),
        Some(false),
        "node1 is no longer a primary"
    );
    assert_eq!(node2.in_recovery(), Some(true), "node2 promoted");
    let (log1, log2) = (node1.keeper_log().join("\n"), node2.keeper_log().join("\n"));
    assert!(
        !log1.contains("superseded"),
        "node1 obeyed another cluster's lease:\n{log1}"
    );
    assert!(
        !log2.contains("took the lease") && !log2.contains("promoting this standby"),
        "{log2}"
    );
    assert_eq!(
        witness
            .sql("SELECT system_identifier, holder, timeline FROM pg_keeper_lease WHERE id = 1")
            .as_deref(),
        Ok("12345|node2|99"),
        "another cluster's row was overwritten"
    );
    expect_writes(
        &checker,
        node1,
        changed + Duration::from_secs(2),
        "node1 stopped committing",
    );

    // The row is put back as this cluster's: node1 renews it.
    let restored = Instant::now();
    witness
        .sql(&format!(
            "UPDATE pg_keeper_lease SET system_identifier = '{sysid}', holder = 'node1', \
             timeline = 1, expires_at = clock_timestamp() WHERE id = 1"
        ))
        .unwrap();
    for node in pp.nodes() {
        node.expect_log("the witness is usable again", Duration::from_secs(15));
    }
    assert!(
        wait_until(Duration::from_secs(15), || pp
            .lease()
            .is_some_and(|l| l.0 == "node1"
                && l.2.as_deref() == Some("node2")
                && l.3)),
        "node1 does not hold the lease again: {:?}",
        pp.lease()
    );
    eprintln!(
        "[w-foreign-lease] lease renewed by node1 {} ms after the row was put back",
        restored.elapsed().as_millis()
    );
    let v = conclude("w-foreign-lease", &pp, checker, "node1");
    assert_eq!(v.acknowledged_by[1], 0, "{v:?}");
}

/// Hole 3b: a standby without pg_keeper.witness_conninfo beside a primary with one. Before the
/// fix it acted as if there were no witness: a cut between the servers made it promote while
/// the primary, holding the lease, switched to async and went on: two primaries. The primary's
/// heartbeat answer now says that it uses a witness, and such a standby does not promote.
#[test]
fn a_standby_without_the_witness_beside_a_primary_with_one_does_not_promote() {
    let (pp, checker) = writing("w-standby-without-witness");
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    let no_witness_reloads = || {
        node2
            .keeper_log()
            .iter()
            .filter(|l| l.contains("configuration reloaded") && l.contains("no witness"))
            .count()
    };
    let before = no_witness_reloads();
    node2.append_conf("pg_keeper.witness_conninfo = ''");
    node2.reload();
    assert!(
        wait_until(Duration::from_secs(10), || no_witness_reloads() > before),
        "node2 did not take in the empty witness_conninfo:\n{}",
        node2.keeper_log().join("\n")
    );
    // A few heartbeats, so that node2 has heard from node1 that it uses a witness.
    sleep(Duration::from_secs(3));

    pp.link(Mode::Drop);
    let cut = Instant::now();
    node2.expect_log(
        "but this standby does not, so it cannot take the lease",
        BUDGET + MARGIN,
    );
    node1.expect_log("changed replication mode to asynchronous", BUDGET + MARGIN);
    expect_writes(
        &checker,
        node1,
        cut + BUDGET,
        "writes did not resume on node1",
    );
    sleep(LEASE + Duration::from_secs(3));
    assert_eq!(node2.in_recovery(), Some(true), "node2 promoted");
    let log2 = node2.keeper_log().join("\n");
    assert!(!log2.contains("promoting this standby"), "{log2}");

    pp.link(Mode::Pass);
    node1.expect_title("master mode:connected", Duration::from_secs(30));
    eprintln!(
        "[w-standby-without-witness] cut for {} ms; node2: {}",
        cut.elapsed().as_millis(),
        log2.lines()
            .find(|l| l.contains("cannot take the lease"))
            .unwrap_or_default()
    );
    let v = conclude("w-standby-without-witness", &pp, checker, "node1");
    assert_eq!(v.acknowledged_by[1], 0, "{v:?}");
}

/// Both keepers make the lease table on a new witness. When one's `CREATE TABLE IF NOT EXISTS`
/// waits on the other's, it fails with a duplicate key once that one commits: a CI run saw a
/// keeper warn "cannot use the witness" so, for a witness that was fine. Here the race is made
/// certain: a session holds the same table uncommitted while the keepers are given the witness;
/// it commits once a keeper waits on it. No keeper may warn, and the lease is made.
#[test]
fn keepers_making_the_lease_table_at_the_same_moment_do_not_warn() {
    let mut pp = ProxiedPair::connected("w-create-race", Options::default());
    let witness = Witness::create(&pp.pair.root);
    let mut session = witness.node.session();
    let mut stdin = session.stdin.take().expect("psql's stdin");
    writeln!(
        stdin,
        "BEGIN;\nCREATE TABLE public.pg_keeper_lease (id int PRIMARY KEY CHECK (id = 1), \
         holder text NOT NULL, epoch bigint NOT NULL, timeline int NOT NULL, sync_standby text, \
         expires_at timestamptz NOT NULL, renewed_at timestamptz NOT NULL, \
         promoting boolean NOT NULL DEFAULT false, system_identifier text);"
    )
    .expect("write to psql");
    stdin.flush().expect("write to psql");
    let waiting = || {
        witness
            .sql(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND query LIKE 'CREATE TABLE IF NOT EXISTS%'",
            )
            .ok()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    };
    pp.use_witness(witness.port());
    let waited = wait_until(Duration::from_secs(15), || waiting() >= 1);
    writeln!(stdin, "COMMIT;").expect("write to psql");
    drop(stdin);
    let ended = wait_until(Duration::from_secs(10), || {
        session.try_wait().ok().flatten().is_some()
    });
    assert!(waited, "no keeper's CREATE TABLE waited on the session's");
    assert!(ended, "the psql session did not end");
    pp.witness = Some(witness);
    expect_lease_of_node1_naming_node2(&pp);
    for node in pp.nodes() {
        let warned: Vec<String> = node
            .keeper_log()
            .into_iter()
            .filter(|l| l.contains("cannot use the witness"))
            .collect();
        assert!(warned.is_empty(), "{}: {warned:?}", node.name);
    }
}
