//! Schedules that found holes, kept as regression tests.

use keeper_core::Action;
use keeper_sim::model::Link;
use keeper_sim::world::{Ack, Config};
use keeper_sim::{run, AfterAction, Fault, Schedule, LONG_STARTUP_MS};

/// Runs the schedule, checks that it still leads where it did (`passes_through` is in the
/// trace) and that nothing unsafe happened.
fn expect_safe(s: &Schedule, passes_through: &str) {
    let out = run(&Config::default(), s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    assert!(trace.contains(passes_through), "{s}\n{trace}");
}

/// Hole 1: after a return to synchronous replication the lease named the standby as soon as
/// `sync_state` said `sync`, while it still lacked commits acknowledged asynchronously; a crash
/// of the primary then promoted it without them. The explorer found it on the code before the
/// fix (seed 11952: the primary's heartbeats dropped, so it went async, then replication
/// stalled); since hole 5's fix that schedule no longer leads to a switch, so the one kept is
/// the real-server test's: replication cut, then back over a slow link, far behind (a restore
/// lag of 200 records, six seconds of that link), and the primary crashes just after the
/// return to sync. With the trust rule taken out it loses 41 acknowledged commits.
#[test]
fn hole_1_restored_sync_is_not_trusted_before_the_standby_has_caught_up() {
    let c = Config {
        sync_restore_lag: 200,
        // Commits wait while the standby catches up over the slow link.
        check_liveness: false,
        ..Config::default()
    };
    let s = Schedule {
        seed: 1,
        faults: vec![
            (1000, Fault::Replication(Link::Drop)),
            (9000, Fault::Replication(Link::Slow)),
            (12_000, Fault::Crash(0)),
        ],
        heal_at: 24_000,
    };
    let out = run(&c, &s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    assert!(
        trace.contains("restoring synchronous replication"),
        "{s}\n{trace}"
    );
    // Held back by the lease, or (since the primary's answer says whom it trusts) already by
    // the standby's own guard.
    assert!(
        trace.contains("does not name this standby")
            || trace.contains("was not its synchronous standby"),
        "{s}\n{trace}"
    );
}

/// The longest time node `n` acknowledged nothing between `from` and `to` (ms from the start of
/// the faults).
fn longest_stall(acks: &[Ack], n: usize, from: u64, to: u64) -> u64 {
    let mut last = from;
    let mut longest = 0;
    for a in acks
        .iter()
        .filter(|a| a.node == n && a.at >= from && a.at <= to)
    {
        longest = longest.max(a.at - last);
        last = a.at;
    }
    longest.max(to - last)
}

/// Hole 4: a standby restarted into a long recovery refuses heartbeats ("the database system is
/// starting up") and does not stream. Counted as alive, it kept commits waiting for the whole
/// recovery; now it counts as failing and the primary switches to async within the budget.
#[test]
fn hole_4_a_standby_that_refuses_and_does_not_stream_counts_as_failing() {
    let c = Config::default();
    let s = Schedule {
        seed: 4,
        faults: vec![(1000, Fault::Crash(1)), (1100, Fault::StartSlowly(1))],
        heal_at: 1200,
    };
    let out = run(&c, &s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    let stall = longest_stall(&out.acks, 0, 1000, 1000 + LONG_STARTUP_MS);
    let budget = c.keepalive_ms * c.keepalive_count as u64;
    assert!(stall <= budget + 1000, "commits waited {stall} ms\n{trace}");
    assert!(
        trace.contains("refuses connections and its replication is not streaming"),
        "{trace}"
    );
}

/// Hole 2: a restarted worker forgot where it was. Each of these failed before the keeper's
/// memory was kept for the next worker (and before a taken lease meant a promotion to finish).
#[test]
fn hole_2_a_worker_restarted_between_promotion_and_the_switch_to_async_goes_on() {
    // Found by the explorer (seed 9630) with the memory left out: the new primary kept waiting
    // for the old one and never ran the promote after_command.
    let s = Schedule {
        seed: 2,
        faults: vec![
            (
                0,
                Fault::After(1, Action::Promote, AfterAction::RestartWorker),
            ),
            (1000, Fault::Crash(0)),
        ],
        heal_at: 20_000,
    };
    expect_safe(&s, "resumed in standby mode:promoting");
    let out = run(&Config::default(), &s, true);
    let trace = out.trace.join("\n");
    assert!(trace.contains("RunAfterCommand(Promote) done"), "{trace}");
}

#[test]
fn hole_2_a_standby_that_crashed_after_taking_the_lease_finishes_its_promotion() {
    // Found by the explorer (seed 6634): the standby took the lease and died before recovery
    // ended; the old primary came back and fenced itself; nobody was primary.
    expect_safe(
        &Schedule {
            seed: 3,
            faults: vec![
                (
                    0,
                    Fault::After(1, Action::TakeLease, AfterAction::CrashServer),
                ),
                (1000, Fault::Crash(0)),
            ],
            heal_at: 12_000,
        },
        "going on with the promotion",
    );
}

#[test]
fn hole_2_a_primary_whose_worker_restarts_while_the_standby_is_lost_still_switches_to_async() {
    let c = Config::default();
    let s = Schedule {
        seed: 5,
        faults: vec![(1000, Fault::Crash(1)), (2500, Fault::RestartWorker(0))],
        heal_at: 20_000,
    };
    let out = run(&c, &s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    assert!(
        trace.contains("resumed in master mode:connected"),
        "{trace}"
    );
    let stall = longest_stall(&out.acks, 0, 1000, 20_000);
    let budget = c.keepalive_ms * c.keepalive_count as u64;
    assert!(stall <= budget + 1000, "commits waited {stall} ms\n{trace}");
}

/// Hole 3: the witness row was not tied to the pair. Another cluster's lease (a second pair in
/// the same witness database) named this pair's node2 on a newer timeline: node1 took itself for
/// superseded and fenced itself, and node2 took the lease for its own. Now every statement
/// compares the cluster's system identifier and such a row is never obeyed: nothing fails over,
/// nothing is fenced, and the pair cannot use the witness until the row is its own again.
#[test]
fn hole_3_another_clusters_lease_is_never_obeyed() {
    let s = Schedule {
        seed: 6,
        faults: vec![(1000, Fault::ForeignLease)],
        heal_at: 8000,
    };
    let out = run(&Config::default(), &s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    assert!(
        !trace.contains("fence") && !trace.contains("promot"),
        "{trace}"
    );
    assert!(trace.contains("belongs to another cluster"), "{trace}");
}

/// Hole 3: a standby without `pg_keeper.witness_conninfo` beside a primary that has one. Cut
/// off from each other, the primary keeps its lease and goes on asynchronously; the standby,
/// with no lease to take, promoted too: two primaries. The primary's heartbeat answer now says
/// it uses a witness, and such a standby does not promote.
#[test]
fn hole_3_a_standby_without_the_witness_of_its_primary_does_not_promote() {
    let c = Config {
        without_witness: Some(1),
        ..Config::default()
    };
    let s = Schedule {
        seed: 7,
        faults: vec![
            (1000, Fault::Heartbeat(0, Link::Drop)),
            (1000, Fault::Heartbeat(1, Link::Drop)),
            (1000, Fault::Replication(Link::Drop)),
        ],
        heal_at: 15_000,
    };
    let out = run(&c, &s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    assert!(trace.contains("but this standby does not"), "{trace}");
}

/// Hole 10: the witness's clock stepped back after a renewal put the lease far ahead of it, and
/// a standby waited for the whole step before it could take the lease of a dead primary. A
/// lease further ahead than a renewal can put it now counts as expired.
#[test]
fn hole_10_a_lease_further_ahead_than_a_renewal_can_put_it_counts_as_expired() {
    let c = Config::default();
    let s = Schedule {
        seed: 10,
        faults: vec![
            (1000, Fault::Crash(0)),
            (1500, Fault::WitnessClock(-60_000)),
        ],
        heal_at: 20_000,
    };
    let out = run(&c, &s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    let first_on_node2 = out.acks.iter().find(|a| a.node == 1).map(|a| a.at);
    let budget = c.keepalive_ms * c.keepalive_count as u64;
    assert!(
        first_on_node2.is_some_and(|t| t <= 1000 + budget + c.lease_ms() + 1000),
        "node2 first acknowledged at {first_on_node2:?} ms\n{trace}"
    );
}

/// Hole 9: the lease lasted (keepalive_count + 2) intervals, so with a witness a primary crash
/// cost up to that long, far more than the failure budget. It is now three intervals and a
/// margin whatever the count: about the budget at `1s x 3`.
#[test]
fn hole_9_failover_with_a_witness_costs_little_more_than_without() {
    let first_write_on_node2 = |witness: bool| {
        let c = Config {
            witness,
            ..Config::default()
        };
        let s = Schedule {
            seed: 9,
            faults: vec![(1000, Fault::Crash(0))],
            heal_at: 20_000,
        };
        let out = run(&c, &s, true);
        assert!(out.violation.is_none(), "{}", out.trace.join("\n"));
        out.acks.iter().find(|a| a.node == 1).map(|a| a.at - 1000)
    };
    let (with, without) = (first_write_on_node2(true), first_write_on_node2(false));
    let (with, without) = (with.expect("failed over"), without.expect("failed over"));
    let c = Config::default();
    assert_eq!(
        c.lease_ms(),
        3 * c.keepalive_ms + keeper_core::LEASE_MARGIN_MS
    );
    // Without: (count - 1) intervals after the closed connection. With: the lease's expiry,
    // renewed up to an interval before the crash.
    assert!(
        with <= c.lease_ms() + 500,
        "with a witness: {with} ms, without: {without} ms"
    );
    assert!(
        with <= without + c.keepalive_ms + 1000,
        "with a witness: {with} ms, without: {without} ms"
    );
}

/// Hole 9: the shorter lease must not lapse under a live primary whose calls are slow: its
/// heartbeats time out (cut both ways) and each renewal reaches the witness late. The standby
/// never gets the lease, so nothing fails over.
#[test]
fn hole_9_a_live_primary_with_slow_calls_keeps_its_lease() {
    let s = Schedule {
        seed: 19,
        faults: vec![
            (1000, Fault::Heartbeat(0, Link::Swallow)),
            (1000, Fault::Heartbeat(1, Link::Swallow)),
            (1000, Fault::Replication(Link::Drop)),
            (1000, Fault::WitnessPath(0, Link::Slow)),
        ],
        heal_at: 30_000,
    };
    let out = run(&Config::default(), &s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    assert!(
        !trace.contains("TakeLease done") && !trace.contains("fence"),
        "{trace}"
    );
    assert!(
        trace.contains("lost; switching to asynchronous replication"),
        "{trace}"
    );
}

/// An idle pair: no client writes, only the keepers.
fn idle() -> Config {
    Config {
        witness: false,
        keepalive_count: 2,
        client_ms: u64::MAX / 4,
        // Nothing is written, so "the primary acknowledges commits" cannot be checked.
        check_liveness: false,
        ..Config::default()
    }
}

/// Hole 6: on an idle pair the standby's WAL receiver hears nothing for up to the walsender's
/// keepalive (30 s), so with only the standby's heartbeat path to the primary broken the guard
/// "its WAL receiver still receives from it" lapsed and the standby promoted beside a live
/// primary. The primary's keeper now writes a small WAL record every tick.
#[test]
fn hole_6_an_idle_standby_whose_heartbeats_alone_fail_does_not_promote() {
    let s = Schedule {
        seed: 61,
        faults: vec![(1000, Fault::Heartbeat(1, Link::Swallow))],
        heal_at: 15_000,
    };
    let out = run(&idle(), &s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    assert!(
        trace.contains("WAL receiver still receives from it"),
        "{trace}"
    );
    assert!(!trace.contains("promoting this standby"), "{trace}");
}

/// Hole 5: the primary had no mirror of that guard: with only its heartbeat path to a healthy,
/// streaming synchronous standby broken, it switched to async for good. The standby's replies on
/// the replication stream now count as evidence of life (on an idle pair too, thanks to the
/// pulse).
#[test]
fn hole_5_a_primary_whose_heartbeats_alone_fail_keeps_synchronous_replication() {
    for c in [idle(), Config::default()] {
        let s = Schedule {
            seed: 51,
            faults: vec![(1000, Fault::Heartbeat(0, Link::Swallow))],
            heal_at: 15_000,
        };
        let out = run(&c, &s, true);
        let trace = out.trace.join("\n");
        assert!(out.violation.is_none(), "{s}\n{trace}");
        assert!(
            trace.contains("its replication still confirms WAL"),
            "{trace}"
        );
        assert!(!trace.contains("DegradeToAsync"), "{trace}");
    }
}

/// Hole 7: a client that cancels a commit waiting for the standby (a statement_timeout, say)
/// gets it reported as done, with only a WARNING that it might not be replicated. A primary that
/// can reach neither the standby nor the witness cannot switch to async and its commits wait;
/// the standby takes the lease and promotes; every such "done" commit is lost. The keeper now
/// ends the waiting sessions (terminate: no answer to the COMMIT) every tick in that state,
/// before a client's cancel (here after 10 s) can turn a wait into a reported commit.
#[test]
fn hole_7_an_isolated_primary_ends_waiting_sessions_before_a_cancel_reports_them_done() {
    let s = Schedule {
        seed: 71,
        faults: vec![
            (1000, Fault::Heartbeat(0, Link::Drop)),
            (1000, Fault::Heartbeat(1, Link::Drop)),
            (1000, Fault::Replication(Link::Drop)),
            (1000, Fault::WitnessPath(0, Link::Drop)),
        ],
        heal_at: 30_000,
    };
    // Two failures, so that the standby is lost before the primary counts as isolated (hole
    // 8), which ends every session anyway.
    let c = Config {
        keepalive_count: 2,
        ..Config::default()
    };
    let out = run(&c, &s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    let ended = trace.find("EndWaitingCommits done").expect(&trace);
    let stopped = trace.find("StopServing done").expect(&trace);
    assert!(ended < stopped, "{trace}");
    assert_eq!(
        out.warned, 0,
        "commits reported done with a WARNING\n{trace}"
    );
}

/// Hole 8: a primary cut off from both its standby and the witness kept serving: the standby
/// took the lease and promoted while clients could still read (stale) from the old primary.
/// Check (d) catches that moment. Now the old primary stops serving (refuses sessions, ends
/// them) before the lease can be taken, by its own clock, and fences itself when the cut heals.
/// With the rule taken out of the core, (d) fails here.
#[test]
fn hole_8_an_isolated_primary_stops_serving_before_the_standby_takes_the_lease() {
    let isolated = |at| {
        vec![
            (at, Fault::Heartbeat(0, Link::Drop)),
            (at, Fault::Heartbeat(1, Link::Drop)),
            (at, Fault::Replication(Link::Drop)),
            (at, Fault::WitnessPath(0, Link::Drop)),
        ]
    };
    let s = Schedule {
        seed: 81,
        faults: isolated(1000),
        heal_at: 20_000,
    };
    let out = run(&Config::default(), &s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    let stop = trace.find("node1: StopServing done").expect(&trace);
    let take = trace.find("node2: TakeLease done").expect(&trace);
    assert!(stop < take, "{trace}");
    assert!(trace.contains("node1: Fence done"), "{trace}");
    // Swallowed rather than reset: the calls wait, but no longer than the deadline.
    let swallowed = Schedule {
        seed: 82,
        faults: vec![
            (1000, Fault::Heartbeat(0, Link::Swallow)),
            (1000, Fault::Heartbeat(1, Link::Swallow)),
            (1000, Fault::Replication(Link::Swallow)),
            (1000, Fault::WitnessPath(0, Link::Swallow)),
        ],
        heal_at: 20_000,
    };
    expect_safe(&swallowed, "node1: StopServing done");
}

/// Hole 8, the way back: when nobody took over (the standby could not reach the witness
/// either), the isolated primary serves again as soon as the cut heals.
#[test]
fn hole_8_an_isolated_primary_that_nobody_replaced_serves_again() {
    let s = Schedule {
        seed: 83,
        faults: vec![
            (1000, Fault::Heartbeat(0, Link::Drop)),
            (1000, Fault::Heartbeat(1, Link::Drop)),
            (1000, Fault::WitnessDown),
        ],
        heal_at: 12_000,
    };
    let out = run(&Config::default(), &s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    assert!(trace.contains("node1: StopServing done"), "{trace}");
    assert!(trace.contains("node1: ResumeServing done"), "{trace}");
    assert!(!trace.contains("TakeLease done"), "{trace}");
}

/// Hole 1 without a witness: the standby's own guard ("was it the synchronous standby at the
/// primary's last answer?") trusted `sync_state = 'sync'` as soon as replication was back, while
/// the standby still lacked commits acknowledged asynchronously; the primary's crash then
/// promoted it without them. Now the primary's answer also says whom its keeper trusts as
/// synchronous (the same rule as the lease's), and the standby goes by that.
#[test]
fn hole_1_without_a_witness_the_standby_trusts_only_what_the_primary_trusts() {
    let c = Config {
        witness: false,
        sync_restore_lag: 200,
        check_liveness: false,
        ..Config::default()
    };
    let s = Schedule {
        seed: 11,
        faults: vec![
            (1000, Fault::Replication(Link::Drop)),
            (9000, Fault::Replication(Link::Slow)),
            (12_000, Fault::Crash(0)),
        ],
        heal_at: 24_000,
    };
    let out = run(&c, &s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    assert!(
        trace.contains("restoring synchronous replication"),
        "{s}\n{trace}"
    );
    assert!(
        trace.contains("was not its synchronous standby"),
        "{s}\n{trace}"
    );
}

/// Hole 11: a heartbeat that reaches this server itself (the peer's address now leads here) was
/// taken for the peer's answer: a standby answering itself never counted its primary lost, so
/// when the primary then died nobody took over. The worker now counts such an answer as none
/// (modelled here as it does it): the standby promotes within the budget and the lease, before
/// anything heals.
#[test]
fn hole_11_a_heartbeat_that_reaches_this_server_itself_is_no_answer() {
    let s = Schedule {
        seed: 111,
        faults: vec![(1000, Fault::HeartbeatToSelf(1)), (2000, Fault::Crash(0))],
        heal_at: 20_000,
    };
    let out = run(&Config::default(), &s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    assert!(trace.contains("reached this server itself"), "{trace}");
    let promoted = trace
        .find("node2: standby mode:connected -> standby mode:promoting")
        .expect(&trace);
    let healed = trace.find("everything heals").expect(&trace);
    assert!(promoted < healed, "{trace}");
}

/// Hole 12: a call that never answers (a host name whose DNS does not reply: libpq resolved it
/// with no bound) held the worker, so it decided nothing at all. The keeper's calls are bounded
/// by its deadline (the real resolver thread is tested on real servers, tests/names.rs); here
/// every call of node1 hangs, and its keeper still decides every tick: it counts, holds the
/// switch, stops serving before the lease can be taken, and fences itself once healed.
#[test]
fn hole_12_calls_that_never_answer_are_given_up_at_the_deadline() {
    let s = Schedule {
        seed: 121,
        faults: vec![
            (1000, Fault::Heartbeat(0, Link::Swallow)),
            (1000, Fault::WitnessPath(0, Link::Swallow)),
            (1000, Fault::Heartbeat(1, Link::Swallow)),
            (1000, Fault::Replication(Link::Swallow)),
        ],
        heal_at: 15_000,
    };
    let out = run(&Config::default(), &s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{s}\n{trace}");
    // node1 decides while its calls hang: it stops serving at its deadline, then goes on
    // deciding every tick (each tick waits out both calls) until the heal.
    let healed = trace.find("everything heals").expect(&trace);
    let before_heal = &trace[..healed];
    assert!(
        before_heal.contains("node1: master mode:connected -> master mode:isolated"),
        "{trace}"
    );
    assert!(
        before_heal.matches("node1: StopServing done").count() >= 4,
        "{trace}"
    );
    assert!(trace.contains("node1: Fence done"), "{trace}");
}
