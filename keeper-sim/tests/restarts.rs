//! Planned restarts of the primary (issue 13): `pg_ctl restart -m fast` at any point of the
//! heartbeat cycle is never failed over, at any setting, with or without a witness; a clean
//! stop that does not come back is failed over after the grace, with no commit lost.

use keeper_sim::world::Config;
use keeper_sim::{run, Fault, Schedule};

/// The settings the README and the real-server tests use: (keepalive_time, keepalive_count).
const SETTINGS: [(u64, u32); 3] = [(5000, 1), (1000, 3), (100, 3)];

fn config(kt: u64, count: u32, witness: bool) -> Config {
    Config {
        keepalive_ms: kt,
        keepalive_count: count,
        witness,
        restart_grace_ms: 30_000,
        // A restart takes a few hundred milliseconds; the restarted server replays nothing.
        startup_ms: 300,
        step_ms: 10,
        ..Config::default()
    }
}

/// Runs `s`: no violation, node2 never promoted nor took a write, and node1 wrote again after
/// it was started again at `back_at`.
fn expect_not_failed_over(c: &Config, s: &Schedule, back_at: u64) {
    let what = format!(
        "{}x{}, witness {}",
        c.keepalive_ms, c.keepalive_count, c.witness
    );
    let out = run(c, s, true);
    let trace = out.trace.join("\n");
    assert!(out.violation.is_none(), "{what}: {s}\n{trace}");
    assert!(
        !out.acks.iter().any(|a| a.node == 1) && !trace.contains("promoting this standby"),
        "{what}: node2 took over after a planned restart: {s}\n{trace}"
    );
    assert!(
        out.acks.iter().any(|a| a.node == 0 && a.at > back_at),
        "{what}: no commit after the restart: {s}\n{trace}"
    );
}

#[test]
fn a_planned_restart_of_the_primary_is_never_failed_over() {
    let mut runs = 0;
    for (kt, count) in SETTINGS {
        for witness in [false, true] {
            let c = config(kt, count, witness);
            // Twelve points of the heartbeat cycle, and a restart that takes 0.3 s or 3 s.
            for i in 0..12 {
                for down_ms in [300, 3000] {
                    let at = 1000 + i * kt / 12;
                    let s = Schedule {
                        seed: i,
                        faults: vec![(at, Fault::CleanStop(0)), (at + down_ms, Fault::Start(0))],
                        heal_at: at + down_ms + 1000,
                    };
                    expect_not_failed_over(&c, &s, at + down_ms);
                    runs += 1;
                }
            }
        }
    }
    assert_eq!(runs, 3 * 2 * 12 * 2);
}

/// The standby's keeper worker restarts while the primary is down for a planned restart (at
/// three points of it), and the primary stays away well past the failover budget: the new
/// worker keeps the grace, so nothing is failed over, and writes go on after the restart.
#[test]
fn a_standby_worker_restarted_during_a_planned_restart_keeps_the_grace() {
    for (kt, count) in SETTINGS {
        for witness in [false, true] {
            let c = config(kt, count, witness);
            let budget = kt * count as u64;
            let down_ms = 2 * budget.max(c.lease_ms()) + 3000;
            for (i, into) in [50, down_ms / 3, 2 * down_ms / 3].into_iter().enumerate() {
                let at = 1000 + kt / 3;
                let s = Schedule {
                    seed: i as u64,
                    faults: vec![
                        (at, Fault::CleanStop(0)),
                        (at + into, Fault::RestartWorker(1)),
                        (at + down_ms, Fault::Start(0)),
                    ],
                    heal_at: at + down_ms + 2000,
                };
                expect_not_failed_over(&c, &s, at + down_ms);
            }
        }
    }
}

/// Without the grace (0), the same restarts at `5s x 1` are failed over when a heartbeat lands
/// in the restart: the check above can fail.
#[test]
fn without_the_grace_a_restart_at_one_failure_is_failed_over() {
    let c = Config {
        restart_grace_ms: 0,
        ..config(5000, 1, false)
    };
    let failed_over = (0..12).any(|i| {
        let at = 1000 + i * 5000 / 12;
        let s = Schedule {
            seed: i,
            faults: vec![(at, Fault::CleanStop(0)), (at + 3000, Fault::Start(0))],
            heal_at: at + 4000,
        };
        run(&c, &s, false).acks.iter().any(|a| a.node == 1)
    });
    assert!(failed_over);
}

#[test]
fn a_planned_stop_that_does_not_come_back_is_failed_over_after_the_grace_with_no_commit_lost() {
    for (kt, count) in SETTINGS {
        for witness in [false, true] {
            let c = config(kt, count, witness);
            let at = 1000 + kt / 3;
            let s = Schedule {
                seed: 1,
                faults: vec![(at, Fault::CleanStop(0))],
                // node1 stays down until well after the grace (the heal starts it again).
                heal_at: at + c.restart_grace_ms + 3 * kt * count as u64 + c.lease_ms() + 5000,
            };
            let out = run(&c, &s, true);
            let trace = out.trace.join("\n");
            // (a): every acknowledged commit is on node2 when it is the newest primary.
            assert!(
                out.violation.is_none(),
                "{kt}x{count}, witness {witness}: {s}\n{trace}"
            );
            let first = out
                .acks
                .iter()
                .find(|a| a.node == 1)
                .unwrap_or_else(|| panic!("{kt}x{count}: never failed over: {s}\n{trace}"))
                .at;
            let after = first - at;
            // Not before the grace; within the grace, the budget (with a witness: the lease's
            // expiry, counted from the last renewal) and a promotion.
            let budget = kt * count as u64;
            let limit = c.restart_grace_ms + budget.max(c.lease_ms()) + kt + 500;
            assert!(
                after >= c.restart_grace_ms && after <= limit,
                "{kt}x{count}, witness {witness}: first write on node2 {after} ms after the stop (grace {}, limit {limit}): {s}\n{trace}",
                c.restart_grace_ms
            );
        }
    }
}

/// auto_rejoin: node1 killed and started again after the failover rewinds itself and streams
/// from node2 by itself; twice in a row, the roles swap back and forth with no commit lost.
#[test]
fn with_auto_rejoin_an_old_primary_comes_back_as_a_standby_by_itself() {
    for witness in [false, true] {
        let c = Config {
            auto_rejoin: true,
            check_liveness: true,
            ..config(1000, 3, witness)
        };
        let s = Schedule {
            seed: 3,
            faults: vec![
                (1000, Fault::Crash(0)),
                (9000, Fault::Start(0)),
                (20_000, Fault::Crash(1)),
                (28_000, Fault::Start(1)),
            ],
            heal_at: 40_000,
        };
        let out = run(&c, &s, true);
        let trace = out.trace.join("\n");
        assert!(out.violation.is_none(), "witness {witness}: {s}\n{trace}");
        assert_eq!(
            trace.matches("rewound").count(),
            2,
            "witness {witness}: {s}\n{trace}"
        );
        // node1 took writes again after the second failover.
        assert!(
            out.acks.iter().any(|a| a.node == 0 && a.at > 28_000),
            "witness {witness}: {s}\n{trace}"
        );
    }
}
