//! A deterministic simulation of pg_keeper_rs: two keepers driven by the real
//! [`keeper_core::Keeper`], a model of PostgreSQL and of the witness, links that drop, swallow
//! or slow down, and a fault scheduler. After every step the run checks the safety promise:
//!
//! - (a) every commit acknowledged to a client is in the history of the newest primary;
//! - (b) no commit is acknowledged on a timeline older than one already acknowledged on, that
//!   is, never two nodes acknowledging commits in overlapping time;
//! - (c) once every fault has healed, exactly one primary within a bounded time.
//!
//! A failing schedule is shrunk (faults removed while it still fails) and printed with its
//! seed and a readable trace. Everything is decided by the seed: the same seed gives the same
//! run.

pub mod model;
pub mod world;

use std::fmt;

use keeper_core::Action;

use model::{Link, Ms};
use world::{Config, World, NAMES};

/// A small deterministic generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// What to do right after a node performs an action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AfterAction {
    CrashServer,
    RestartWorker,
}

/// One fault (or the end of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// `kill -9` of a node's postmaster.
    Crash(usize),
    /// `pg_ctl stop -m fast` of a node: a clean shutdown, announced to the peer's kept session.
    CleanStop(usize),
    /// Start a stopped server again.
    Start(usize),
    /// Start a stopped server again, with a long recovery: it refuses connections for
    /// [`LONG_STARTUP_MS`] and does not stream meanwhile.
    StartSlowly(usize),
    Freeze(usize),
    Thaw(usize),
    /// The keeper worker alone is restarted (`pg_terminate_backend`, a crash of the worker).
    RestartWorker(usize),
    /// The path of node n's heartbeats to the other node.
    Heartbeat(usize, Link),
    /// The replication stream.
    Replication(Link),
    /// Node n's path to the witness (`Slow`: each statement arrives late, within the deadline).
    WitnessPath(usize, Link),
    WitnessDown,
    WitnessUp,
    /// The witness's clock steps by this many milliseconds.
    WitnessClock(i64),
    /// Another pair using the same witness database writes its own lease there: held by a node
    /// of the same name as this pair's node2, on a later timeline, valid for a lease time.
    ForeignLease,
    /// Node n's heartbeats reach node n itself (the peer's address now leads here: a moved
    /// address, a proxy pointed the wrong way).
    HeartbeatToSelf(usize),
    /// The next time node n performs the action, the fault strikes right after it.
    After(usize, Action, AfterAction),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Crash(n) => write!(f, "kill -9 {}", NAMES[*n]),
            Fault::CleanStop(n) => write!(f, "pg_ctl stop -m fast {}", NAMES[*n]),
            Fault::Start(n) => write!(f, "start {}", NAMES[*n]),
            Fault::StartSlowly(n) => write!(f, "start {} with a long recovery", NAMES[*n]),
            Fault::Freeze(n) => write!(f, "freeze {}", NAMES[*n]),
            Fault::Thaw(n) => write!(f, "thaw {}", NAMES[*n]),
            Fault::RestartWorker(n) => write!(f, "restart the keeper worker of {}", NAMES[*n]),
            Fault::Heartbeat(n, l) => {
                write!(f, "{}'s heartbeats to {}: {l:?}", NAMES[*n], NAMES[1 - n])
            }
            Fault::Replication(l) => write!(f, "replication link: {l:?}"),
            Fault::WitnessPath(n, l) => write!(f, "{}'s path to the witness: {l:?}", NAMES[*n]),
            Fault::WitnessDown => write!(f, "witness down"),
            Fault::WitnessUp => write!(f, "witness up"),
            Fault::WitnessClock(ms) => write!(f, "witness clock steps {ms:+} ms"),
            Fault::ForeignLease => write!(f, "another cluster writes its lease on the witness"),
            Fault::HeartbeatToSelf(n) => {
                write!(f, "{}'s heartbeats reach {} itself", NAMES[*n], NAMES[*n])
            }
            Fault::After(n, a, what) => {
                write!(f, "{what:?} of {} right after its {a:?}", NAMES[*n])
            }
        }
    }
}

/// Faults at times (milliseconds after the start of the faulty period), then everything heals
/// at `heal_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub seed: u64,
    pub faults: Vec<(Ms, Fault)>,
    pub heal_at: Ms,
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "schedule (seed {}):", self.seed)?;
        for (t, fault) in &self.faults {
            writeln!(f, "  at {:>6} ms: {fault}", t)?;
        }
        write!(f, "  at {:>6} ms: everything heals", self.heal_at)
    }
}

/// Which faults the scheduler may draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultSet {
    pub crashes: bool,
    pub freezes: bool,
    pub links: bool,
    pub witness: bool,
    pub clock: bool,
    pub worker_restarts: bool,
    /// At most this many faults (each with its end) in a schedule.
    pub episodes: u64,
}

impl FaultSet {
    pub const ALL: FaultSet = FaultSet {
        crashes: true,
        freezes: true,
        links: true,
        witness: true,
        clock: true,
        worker_restarts: true,
        episodes: 4,
    };
}

/// How long a server started by [`Fault::StartSlowly`] replays before it accepts connections.
pub const LONG_STARTUP_MS: Ms = 15_000;

/// What a run found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub at: Ms,
    pub what: String,
}

/// The outcome of one schedule.
pub struct Outcome {
    pub violation: Option<Violation>,
    pub trace: Vec<String>,
    /// Every acknowledged commit, times counted from the start of the faults.
    pub acks: Vec<world::Ack>,
    /// Commits a client cancelled and PostgreSQL reported committed with a WARNING.
    pub warned: usize,
}

/// How long after the heal exactly one primary must stand.
pub fn settle_ms(c: &Config) -> Ms {
    // A lease to expire, a failure budget, a promotion, and a margin.
    c.lease_ms()
        + 2 * c.keepalive_ms * c.keepalive_count as u64
        + 3 * c.keepalive_ms
        + c.restart_grace_ms
}

/// Runs a schedule and checks (a), (b) after every step and (c) at the end.
pub fn run(c: &Config, s: &Schedule, trace: bool) -> Outcome {
    let mut w = World::new(c.clone(), s.seed);
    if trace {
        w.trace = Some(Vec::new());
    }
    let start = w.now;
    w.epoch = start;
    let mut end = start + s.heal_at + settle_ms(c);
    let mut faults = s.faults.clone();
    faults.sort_by_key(|(t, _)| *t);
    let mut next = 0;
    let mut healed = false;
    let mut max_acked_tl = 0;
    let mut checked_acks = 0;
    let mut primary_was = newest_primary(&w);
    let mut violation = None;
    while w.now < end && violation.is_none() {
        while next < faults.len() && start + faults[next].0 <= w.now {
            let f = faults[next].1;
            w.say(|| format!("fault: {f}"));
            apply(&mut w, f);
            next += 1;
        }
        if !healed && w.now >= start + s.heal_at {
            healed = true;
            w.say(|| "fault: everything heals".into());
            heal(&mut w);
        }
        w.step();
        // A server still recovering at the heal has healed once it runs.
        if healed {
            let started = w
                .servers
                .iter()
                .map(|s| s.starting_until)
                .max()
                .unwrap_or(0);
            end = end.max(started + settle_ms(c));
        }
        // (b) nothing acknowledged on a timeline older than one already acknowledged on.
        for a in &w.acks[checked_acks..] {
            if a.timeline < max_acked_tl {
                violation = Some(Violation {
                    at: w.now,
                    what: format!(
                        "(b) {} acknowledged commit {} on timeline {} after commits were acknowledged on timeline {max_acked_tl}: two primaries acknowledging",
                        NAMES[a.node], a.id, a.timeline
                    ),
                });
                break;
            }
            max_acked_tl = max_acked_tl.max(a.timeline);
        }
        // (a) every acknowledged commit is in the newest primary's history.
        let p = newest_primary(&w);
        if violation.is_none() && (p != primary_was || w.acks.len() > checked_acks) {
            let from = if p != primary_was { 0 } else { checked_acks };
            primary_was = p;
            if let Some(p) = p {
                let wal = &w.servers[p].wal;
                let lost: Vec<u64> = w.acks[from..]
                    .iter()
                    .map(|a| a.id)
                    .filter(|id| !wal.contains(id))
                    .collect();
                if !lost.is_empty() {
                    violation = Some(Violation {
                        at: w.now,
                        what: format!(
                            "(a) {} acknowledged commit(s) missing from {}, the newest primary (timeline {}): {:?}{}",
                            lost.len(),
                            NAMES[p],
                            w.servers[p].timeline,
                            &lost[..lost.len().min(8)],
                            if lost.len() > 8 { " ..." } else { "" }
                        ),
                    });
                }
            }
        }
        checked_acks = w.acks.len();
        // (d) nobody took the lease while the other node served.
        if violation.is_none() {
            if let Some(what) = w.served_past_lease.take() {
                violation = Some(Violation { at: w.now, what });
            }
        }
    }
    if violation.is_none() && c.check_liveness {
        // (c) exactly one primary once everything healed.
        let primaries: Vec<&str> = (0..2)
            .filter(|&n| w.servers[n].writable(w.now))
            .map(|n| NAMES[n])
            .collect();
        let window = c.keepalive_ms * c.keepalive_count as u64 + 2000;
        let last_ack = w.acks.last().map_or(0, |a| a.at);
        if primaries.len() == 1 && last_ack + window < w.now {
            violation = Some(Violation {
                at: w.now,
                what: format!(
                    "(c) {} s after every fault healed {} is the primary but has acknowledged nothing for {} ms (mode: {})",
                    settle_ms(c) / 1000,
                    primaries[0],
                    w.now - last_ack,
                    mode_of(&w, if primaries[0] == NAMES[0] { 0 } else { 1 })
                ),
            });
        } else if primaries.len() != 1 {
            violation = Some(Violation {
                at: w.now,
                what: format!(
                    "(c) {} s after every fault healed there are {} writable primaries {:?} (modes: {}, {})",
                    settle_ms(c) / 1000,
                    primaries.len(),
                    primaries,
                    mode_of(&w, 0),
                    mode_of(&w, 1)
                ),
            });
        }
    }
    if let Some(v) = &violation {
        let v = v.clone();
        w.say(|| format!("VIOLATION: {}", v.what));
    }
    Outcome {
        violation,
        trace: w.trace.take().unwrap_or_default(),
        acks: w
            .acks
            .iter()
            .map(|a| world::Ack {
                at: a.at.saturating_sub(start),
                ..a.clone()
            })
            .collect(),
        warned: w.warned.len(),
    }
}

fn mode_of(w: &World, n: usize) -> String {
    match &w.workers[n] {
        Some(k) => k.keeper.mode().to_string(),
        None if w.servers[n].up => "no worker".into(),
        None => "server down".into(),
    }
}

/// The node out of recovery on the newest timeline (up or not: its WAL is on disk).
fn newest_primary(w: &World) -> Option<usize> {
    (0..2)
        .filter(|&n| !w.servers[n].in_recovery)
        .max_by_key(|&n| w.servers[n].timeline)
}

fn apply(w: &mut World, f: Fault) {
    match f {
        Fault::Crash(n) => w.crash(n),
        Fault::CleanStop(n) => w.clean_stop(n),
        Fault::Start(n) => w.start(n),
        Fault::StartSlowly(n) => {
            w.start(n);
            w.servers[n].starting_until = w.now + LONG_STARTUP_MS;
        }
        Fault::Freeze(n) => w.servers[n].frozen = w.servers[n].up,
        Fault::Thaw(n) => w.servers[n].frozen = false,
        Fault::RestartWorker(n) => w.restart_worker(n),
        Fault::Heartbeat(n, l) => w.hb[n] = l,
        Fault::Replication(l) => w.repl = l,
        Fault::WitnessPath(n, l) => w.wit[n] = l,
        Fault::WitnessDown => w.witness.down = true,
        Fault::WitnessUp => w.witness.down = false,
        Fault::WitnessClock(ms) => {
            w.witness.offset += ms;
            w.witness_clock_stepped = true;
        }
        Fault::HeartbeatToSelf(n) => w.hb_to_self[n] = true,
        Fault::ForeignLease => {
            let expires_at = w.witness.clock(w.now) + w.c.lease_ms() as i64;
            w.witness.row = Some(model::Row {
                holder: NAMES[1],
                epoch: 7,
                timeline: 9,
                sync_standby: None,
                expires_at,
                promoting: false,
                system_identifier: world::SYSTEM_IDENTIFIER + 1,
            });
        }
        Fault::After(n, a, what) => w.after_action.push((n, a, what)),
    }
}

/// Every link passes, every server runs, the witness is up. (A slow replication link stays
/// slow: it is not a fault that stops anything.)
fn heal(w: &mut World) {
    w.hb = [Link::Up; 2];
    w.hb_to_self = [false; 2];
    w.wit = [Link::Up; 2];
    if w.repl != Link::Slow {
        w.repl = Link::Up;
    }
    w.witness.down = false;
    // The operator removes another cluster's lease (the keepers' warning says how).
    if w.witness
        .row
        .as_ref()
        .is_some_and(|r| r.system_identifier != world::SYSTEM_IDENTIFIER)
    {
        w.witness.row = None;
    }
    w.after_action.clear();
    for n in 0..2 {
        w.servers[n].frozen = false;
        w.start(n);
    }
}

/// The faults the scheduler may draw for node `n`, each with the fault that ends it (if any).
/// `clock_step` is how far a clock fault steps the witness's clock.
fn episodes(set: FaultSet, n: usize, clock_step: i64) -> Vec<(Fault, Option<Fault>)> {
    let mut kinds: Vec<(Fault, Option<Fault>)> = Vec::new();
    let cuts = [Link::Drop, Link::Swallow];
    if set.crashes {
        kinds.push((Fault::Crash(n), Some(Fault::Start(n))));
        kinds.push((Fault::Crash(n), Some(Fault::StartSlowly(n))));
        kinds.push((Fault::Crash(n), None));
        kinds.push((Fault::CleanStop(n), Some(Fault::Start(n))));
        kinds.push((Fault::CleanStop(n), None));
    }
    if set.freezes {
        kinds.push((Fault::Freeze(n), Some(Fault::Thaw(n))));
    }
    if set.links {
        for l in cuts {
            kinds.push((Fault::Heartbeat(n, l), Some(Fault::Heartbeat(n, Link::Up))));
            kinds.push((Fault::Replication(l), Some(Fault::Replication(Link::Up))));
            // A replication link that comes back slow.
            kinds.push((Fault::Replication(l), Some(Fault::Replication(Link::Slow))));
        }
    }
    if set.witness {
        for l in [Link::Drop, Link::Swallow, Link::Slow] {
            kinds.push((
                Fault::WitnessPath(n, l),
                Some(Fault::WitnessPath(n, Link::Up)),
            ));
        }
        kinds.push((Fault::WitnessDown, Some(Fault::WitnessUp)));
        kinds.push((Fault::ForeignLease, None));
    }
    if set.clock {
        kinds.push((Fault::WitnessClock(clock_step), None));
    }
    if set.worker_restarts {
        kinds.push((Fault::RestartWorker(n), None));
        for a in [
            Action::Promote,
            Action::TakeLease,
            Action::DegradeToAsync,
            Action::ReleaseStandby,
        ] {
            kinds.push((Fault::After(n, a, AfterAction::RestartWorker), None));
        }
        kinds.push((
            Fault::After(n, Action::TakeLease, AfterAction::CrashServer),
            None,
        ));
    }
    kinds
}

fn schedule(seed: u64, mut faults: Vec<(Ms, Fault)>, c: &Config) -> Schedule {
    faults.sort_by_key(|(t, _)| *t);
    let heal_at = faults.iter().map(|(t, _)| *t).max().unwrap_or(0) + c.keepalive_ms;
    Schedule {
        seed,
        faults,
        heal_at,
    }
}

/// Draws a schedule: a few faults, each at a random time, most followed by their end.
pub fn random_schedule(seed: u64, set: FaultSet, c: &Config) -> Schedule {
    let mut rng = Rng::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let span = 12 * c.keepalive_ms;
    let mut faults = Vec::new();
    for _ in 0..1 + rng.below(set.episodes) {
        let at = rng.below(span);
        let len = c.keepalive_ms / 2 + rng.below(3 * c.lease_ms());
        let n = rng.below(2) as usize;
        let step = rng.below(2 * c.lease_ms()) as i64 - c.lease_ms() as i64;
        let kinds = episodes(set, n, step);
        if kinds.is_empty() {
            break;
        }
        let (f, end) = kinds[rng.below(kinds.len() as u64) as usize];
        faults.push((at, f));
        if let Some(end) = end {
            faults.push((at + len, end));
        }
    }
    schedule(seed, faults, c)
}

/// Every schedule of one or two faults from the whole set, each starting at one of a few
/// points of the heartbeat cycle and lasting briefly (half an interval) or long (two leases).
pub fn short_schedules(set: FaultSet, c: &Config) -> Vec<Schedule> {
    let kt = c.keepalive_ms;
    let starts = [0, kt / 3, 2 * kt + kt / 2];
    let lengths = [kt / 2, 2 * c.lease_ms()];
    let mut one = Vec::new();
    for n in 0..2 {
        for (f, end) in episodes(set, n, 2 * c.lease_ms() as i64) {
            for &at in &starts {
                match end {
                    Some(end) => {
                        for &len in &lengths {
                            one.push(vec![(at, f), (at + len, end)]);
                        }
                    }
                    None => one.push(vec![(at, f)]),
                }
            }
        }
    }
    let mut all: Vec<Vec<(Ms, Fault)>> = one.clone();
    for a in &one {
        for b in &one {
            if a[0].0 < b[0].0 {
                all.push(a.iter().chain(b).copied().collect());
            }
        }
    }
    all.into_iter()
        .enumerate()
        .map(|(i, f)| schedule(i as u64, f, c))
        .collect()
}

/// Removes faults while the schedule still fails, to a schedule where every fault matters.
pub fn shrink(c: &Config, s: &Schedule) -> Schedule {
    let mut best = s.clone();
    loop {
        let mut smaller = None;
        for i in 0..best.faults.len() {
            let mut t = best.clone();
            t.faults.remove(i);
            if run(c, &t, false).violation.is_some() {
                smaller = Some(t);
                break;
            }
        }
        match smaller {
            Some(t) => best = t,
            None => return best,
        }
    }
}

/// Runs seeds `from..from + count`; the first failure, shrunk, with its trace.
pub fn search(c: &Config, set: FaultSet, from: u64, count: u64) -> Result<u64, String> {
    check_all(
        c,
        (from..from + count).map(|seed| random_schedule(seed, set, c)),
    )
}

/// Runs every schedule; the acknowledged commits checked, or the first failure, shrunk, with
/// its trace.
pub fn check_all(c: &Config, schedules: impl IntoIterator<Item = Schedule>) -> Result<u64, String> {
    let mut acks = 0;
    for s in schedules {
        let out = run(c, &s, false);
        acks += out.acks.len() as u64;
        if out.violation.is_some() {
            return Err(report(c, &s));
        }
    }
    Ok(acks)
}

/// The shrunk schedule of a failure and its trace, for a person to read.
pub fn report(c: &Config, s: &Schedule) -> String {
    let small = shrink(c, s);
    let out = run(c, &small, true);
    let v = out
        .violation
        .map(|v| v.what)
        .unwrap_or_else(|| "no violation after shrinking".into());
    format!(
        "seed {} fails: {v}\nshrunk {small}\ntrace:\n{}",
        s.seed,
        out.trace.join("\n")
    )
}
