//! Schedules that found holes, kept as regression tests.

use keeper_sim::model::Link;
use keeper_sim::world::Config;
use keeper_sim::{run, Fault, Schedule};

fn expect_violation(s: &Schedule, kind: &str) {
    let out = run(&Config::default(), s, true);
    let v = out.violation.expect("the hole is found");
    assert!(v.what.starts_with(kind), "{}", v.what);
}

/// Hole 1 (open): after a return to synchronous replication the lease named the standby as soon as
/// `sync_state` said `sync`, while it still lacked commits acknowledged asynchronously (here its
/// replication stalled); a crash of the primary then promoted it without them. Found by the
/// explorer (seed 11952) on the code before the fix, shrunk to these four faults.
#[test]
fn hole_1_restored_sync_is_trusted_too_early() {
    expect_violation(
        &Schedule {
            seed: 11952,
            faults: vec![
                (1891, Fault::Heartbeat(0, Link::Drop)),
                (6327, Fault::Replication(Link::Swallow)),
                (7407, Fault::Heartbeat(0, Link::Up)),
                (9473, Fault::Crash(0)),
            ],
            heal_at: 17737,
        },
        "(a)",
    );
}
