//! The explorer: seeded random schedules, `SIM_SCHEDULES` of them for each setting (default
//! 2000), from seed `SIM_FROM` (default 0). A failure prints its seed, the shrunk schedule and
//! its trace; `cargo test -p keeper-sim --test explore` with a larger `SIM_SCHEDULES` explores
//! further.

use keeper_sim::world::Config;
use keeper_sim::{check_all, search, short_schedules, FaultSet};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn explore(c: &Config, set: FaultSet) {
    let (from, n) = (env("SIM_FROM", 0), env("SIM_SCHEDULES", 5000));
    let t = std::time::Instant::now();
    match search(c, set, from, n) {
        Ok(acks) => eprintln!(
            "{n} schedules from seed {from}: {acks} acknowledged commits checked in {:?}",
            t.elapsed()
        ),
        Err(report) => panic!("{report}"),
    }
}

/// Every fault the scheduler knows: crashes (also right after an action), freezes, worker
/// restarts, each link dropping, swallowing or coming back slow, the witness down, its clock
/// stepping.
#[test]
fn with_a_witness_no_schedule_loses_a_commit_or_gives_two_primaries() {
    explore(&Config::default(), FaultSet::ALL);
}

/// Without a witness a cut between two live servers is the documented risk (both promote), and
/// so is a second fault that leaves a returning old primary unable to learn it was superseded
/// (frozen, then the new primary crashes before it thaws). What must hold is any one crash,
/// freeze, worker restart, or replication alone failing or slowing.
#[test]
fn without_a_witness_no_single_crash_freeze_or_restart_loses_a_commit() {
    let c = Config {
        witness: false,
        ..Config::default()
    };
    let set = FaultSet {
        links: false,
        witness: false,
        clock: false,
        episodes: 1,
        ..FaultSet::ALL
    };
    explore(&c, set);
}

/// Exhaustively: every one- and two-fault schedule from the whole set at a few points of the
/// heartbeat cycle.
#[test]
fn with_a_witness_every_short_schedule_is_safe() {
    let c = Config::default();
    let all = short_schedules(FaultSet::ALL, &c);
    let t = std::time::Instant::now();
    let n = all.len();
    match check_all(&c, all) {
        Ok(acks) => eprintln!(
            "{n} short schedules: {acks} acknowledged commits checked in {:?}",
            t.elapsed()
        ),
        Err(report) => panic!("{report}"),
    }
}

/// With `auto_rejoin` on both nodes (a superseded primary rewinds itself and starts as a
/// standby, src/rejoin.rs): the same checks hold, and (c) also means the rejoined node is a
/// standby again, not a second primary.
#[test]
fn with_auto_rejoin_no_schedule_loses_a_commit_or_gives_two_primaries() {
    let c = Config {
        auto_rejoin: true,
        ..Config::default()
    };
    let (from, n) = (env("SIM_FROM", 0), env("SIM_SCHEDULES", 5000) / 5);
    match search(&c, FaultSet::ALL, from, n) {
        Ok(acks) => eprintln!(
            "auto_rejoin: {n} schedules from seed {from}: {acks} acknowledged commits checked"
        ),
        Err(report) => panic!("{report}"),
    }
}
