//! Two servers with a keeper each, a witness, the links between them, and clients; advanced in
//! steps of [`Config::step_ms`]. Each keeper is the real [`Keeper`] from `keeper-core`, driven
//! through the same cycle as `src/worker.rs`: read the replication view, heartbeat the peer,
//! renew or read the lease, step the core, perform the actions in order (a failed one told to
//! the core).

use keeper_core::{
    lease_time_ms, Action, Event, Heartbeat, Input, Keeper, Lease, LeaseRow, Level, Mode,
    Observation, PeerAnswer, Settings, StandbySeen,
};

use crate::model::{Link, Ms, Sender, Server, Witness};

/// The knobs of a run.
#[derive(Clone, Debug)]
pub struct Config {
    pub step_ms: Ms,
    pub keepalive_ms: Ms,
    pub keepalive_count: u32,
    pub witness: bool,
    /// A client commits on every writable server this often.
    pub client_ms: Ms,
    /// `pg_keeper.sync_restore_lag`, in records.
    pub sync_restore_lag: usize,
    /// Records a fast replication link carries per step; a slow one carries one every
    /// `slow_every` steps.
    pub fast_rate: usize,
    pub slow_every: u64,
    /// How long a started server refuses connections.
    pub startup_ms: Ms,
    /// How long after a request a promotion ends recovery.
    pub promote_ms: Ms,
    /// The checkpointer takes in a reload this long after it (at most; the run draws it).
    pub max_reload_ms: Ms,
    /// `wal_sender_timeout` / `wal_receiver_timeout`.
    pub stream_timeout_ms: Ms,
    /// The walsender sends a keepalive on an idle stream this often.
    pub stream_keepalive_ms: Ms,
    /// Check (c) at the end of a run.
    pub check_liveness: bool,
    /// A client cancels a commit that has waited this long for the synchronous standby (a
    /// statement_timeout, a user's Ctrl-C); PostgreSQL then acknowledges it, committed locally,
    /// with a WARNING.
    pub client_cancel_ms: Option<Ms>,
    /// A node whose `pg_keeper.witness_conninfo` is not set while the other's is.
    pub without_witness: Option<usize>,
    /// `pg_keeper.restart_grace`.
    pub restart_grace_ms: Ms,
    /// `pg_keeper.auto_rejoin`.
    pub auto_rejoin: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            step_ms: 10,
            keepalive_ms: 1000,
            keepalive_count: 3,
            witness: true,
            client_ms: 50,
            sync_restore_lag: 40,
            fast_rate: 1000,
            slow_every: 3,
            startup_ms: 300,
            promote_ms: 30,
            max_reload_ms: 60,
            stream_timeout_ms: 60_000,
            stream_keepalive_ms: 30_000,
            check_liveness: true,
            client_cancel_ms: Some(10_000),
            without_witness: None,
            restart_grace_ms: 3_000,
            auto_rejoin: false,
        }
    }
}

impl Config {
    /// Whether node n has a witness configured.
    pub fn has_witness(&self, n: usize) -> bool {
        self.witness && self.without_witness != Some(n)
    }

    pub fn lease_ms(&self) -> u64 {
        lease_time_ms(self.keepalive_ms)
    }
}

/// How far a worker is into its tick.
#[derive(Clone, Debug)]
enum Phase {
    /// Waiting for the next tick.
    Idle,
    /// The heartbeat is on its way; what was seen before it.
    Heartbeat { until: Ms, tick: Partial },
    /// The lease statement is on its way.
    Lease { until: Ms, tick: Partial },
}

/// What a tick has seen so far.
#[derive(Clone, Debug)]
struct Partial {
    /// When the tick began (its calls were sent no earlier).
    started: Ms,
    in_recovery: bool,
    mode: Mode,
    sync_configured: bool,
    streaming: bool,
    caught_up: bool,
    sync_in_force: bool,
    insert_lsn: u64,
    standby: Option<StandbySeen>,
    replies_recent: bool,
    heartbeat: Option<Heartbeat>,
    /// The heartbeat waited out its deadline.
    timed_out: bool,
    peer: Option<PeerFacts>,
    wal_receiver_recent: bool,
    lease: Lease,
    /// The slow path to the witness has been waited out.
    witness_waited: bool,
    /// The worker stopped waiting for the slow witness at its serving deadline.
    witness_gave_up: bool,
}

/// What the peer said of itself in its heartbeat answer.
#[derive(Clone, Debug)]
struct PeerFacts {
    in_recovery: bool,
    timeline: u32,
    /// The sync_state it shows for the asking standby, if that one streams.
    sync_state_of_asker: Option<&'static str>,
    /// Its witness setting is not empty.
    uses_witness: bool,
    /// Whom its keeper trusts as synchronous (pg_stat_activity), if it said.
    trusted_standby: Option<&'static str>,
}

/// The background worker of one server.
#[derive(Clone, Debug)]
pub struct Worker {
    pub keeper: Keeper,
    identified: bool,
    last_tick: Option<Ms>,
    recheck_after: Option<Ms>,
    last_event: Option<Event>,
    /// No tick before this (a call that waited out its deadline).
    busy_until: Ms,
    phase: Phase,
    /// When the peer ended this worker's kept connection with a clean shutdown announcement,
    /// since the last tick.
    announced: Option<Ms>,
}

impl Worker {
    fn new() -> Worker {
        Worker {
            keeper: Keeper::new(),
            identified: false,
            last_tick: None,
            recheck_after: None,
            last_event: None,
            busy_until: 0,
            phase: Phase::Idle,
            announced: None,
        }
    }

    fn interval(&self, c: &Config, now: Ms, s: &Settings) -> Ms {
        if self.keeper.mode() == Mode::Promoting {
            100
        } else if self.keeper.polls_fast(now, s) {
            c.keepalive_ms.min(100)
        } else if let Some(soon) = self.recheck_after {
            c.keepalive_ms.min(soon)
        } else {
            c.keepalive_ms
        }
    }
}

/// A commit acknowledged to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub id: u64,
    pub node: usize,
    pub timeline: u32,
    pub at: Ms,
}

/// The whole simulated world.
pub struct World {
    pub c: Config,
    pub now: Ms,
    pub servers: [Server; 2],
    pub workers: [Option<Worker>; 2],
    pub witness: Witness,
    /// `hb[n]`: the path of node n's heartbeats (and connections) to the other node.
    pub hb: [Link; 2],
    /// `hb_to_self[n]`: node n's heartbeats reach node n's own server.
    pub hb_to_self: [bool; 2],
    /// The replication stream between the nodes.
    pub repl: Link,
    /// `wit[n]`: node n's path to the witness.
    pub wit: [Link; 2],
    pub acks: Vec<Ack>,
    /// Commits a client cancelled while they waited for the standby: PostgreSQL reports them
    /// committed with a WARNING that they might not be replicated.
    pub warned: Vec<Ack>,
    next_id: u64,
    next_client: Ms,
    rng: crate::Rng,
    /// Lines of the trace (faults, decisions, actions), when tracing.
    pub trace: Option<Vec<String>>,
    /// The trace counts time from here (the start of a schedule's faults).
    pub epoch: Ms,
    /// The last reason each node could not use the witness, logged once per change as the
    /// worker warns.
    witness_problem: [Option<String>; 2],
    /// A crash or worker restart to inject right after a node performs an action.
    pub after_action: Vec<(usize, Action, crate::AfterAction)>,
    /// The witness's clock has been stepped: check (d) rests on its rate, so it is not made.
    pub witness_clock_stepped: bool,
    /// What check (d) found, if anything: a node took the lease while the other still served.
    pub served_past_lease: Option<String>,
    /// When each node's worker last began a tick that reached the witness (renewed the lease)
    /// or its streaming standby (heartbeat answered, replication streaming).
    pub last_reached: [Option<Ms>; 2],
    /// (auto_rejoin) The rejoin process of node n runs and waits for its server to stop.
    rejoin_waiting: [bool; 2],
    /// (auto_rejoin) When node n's rejoin process, its server stopped, has rewound it.
    rejoin_at: [Option<Ms>; 2],
}

/// How long a rejoin takes once the server has stopped (pg_rewind, the start).
pub const REJOIN_MS: Ms = 1500;

pub const NAMES: [&str; 2] = ["node1", "node2"];

/// The id of the keeper's pulse records in the WAL (commits have ids from 1).
pub const PULSE: u64 = 0;

/// The pair's `system_identifier` (a standby made by a base backup shares its primary's).
pub const SYSTEM_IDENTIFIER: u64 = 7_000_000_000_000_000_001;

impl World {
    /// node1 primary, node2 its synchronous standby, both keepers connected, the lease (with a
    /// witness) naming node2.
    pub fn new(c: Config, seed: u64) -> World {
        let mut w = World {
            c,
            now: 0,
            servers: [Server::new(NAMES[0], false), Server::new(NAMES[1], true)],
            workers: [Some(Worker::new()), Some(Worker::new())],
            witness: Witness::default(),
            hb: [Link::Up; 2],
            hb_to_self: [false; 2],
            repl: Link::Up,
            wit: [Link::Up; 2],
            acks: Vec::new(),
            warned: Vec::new(),
            next_id: 1,
            next_client: 0,
            rng: crate::Rng::new(seed),
            trace: None,
            epoch: 0,
            witness_problem: [None, None],
            after_action: Vec::new(),
            witness_clock_stepped: false,
            served_past_lease: None,
            last_reached: [None, None],
            rejoin_waiting: [false; 2],
            rejoin_at: [None, None],
        };
        // Settle: both keepers connected and synchronous.
        for _ in 0..(5 * w.c.keepalive_ms / w.c.step_ms) {
            w.step();
        }
        w
    }

    pub fn say(&mut self, line: impl FnOnce() -> String) {
        if let Some(t) = self.trace.as_mut() {
            let at = self.now as f64 - self.epoch as f64;
            t.push(format!("[{:>8} ms] {}", at, line()));
        }
    }

    fn settings(&self, n: usize) -> Settings {
        Settings {
            keepalive_count: self.c.keepalive_count,
            keepalive_time_ms: self.c.keepalive_ms,
            promote_timeout_ms: 100,
            allow_data_loss_failover: false,
            restart_grace_ms: self.c.restart_grace_ms,
            auto_rejoin: self.c.auto_rejoin,
            me_name: NAMES[n].into(),
            peer_name: NAMES[1 - n].into(),
        }
    }

    /// Advances the world by one step.
    pub fn step(&mut self) {
        self.now += self.c.step_ms;
        self.background();
        self.replicate();
        self.clients();
        self.rejoins();
        for n in 0..2 {
            self.run_worker(n);
        }
    }

    /// The rejoin processes (src/rejoin.rs): once its server has stopped, bin/rejoin refuses a
    /// server started meanwhile, needs the other node up as a primary and reachable, rewinds
    /// to the history the two share, and starts the server as a standby.
    fn rejoins(&mut self) {
        for (n, name) in NAMES.into_iter().enumerate() {
            let Some(at) = self.rejoin_at[n] else {
                continue;
            };
            if self.now < at {
                continue;
            }
            self.rejoin_at[n] = None;
            let p = 1 - n;
            let source = &self.servers[p];
            if self.servers[n].up {
                self.say(|| format!("{}: rejoin: the server is running; refusing", name));
                continue;
            }
            if !source.running(self.now) || source.in_recovery || self.hb[n] != Link::Up {
                self.say(|| format!("{}: rejoin: the new primary cannot be reached as a primary; the server stays stopped", name));
                continue;
            }
            let shared = self.servers[n]
                .wal
                .iter()
                .zip(&source.wal)
                .take_while(|(a, b)| a == b)
                .count();
            let (wal, tl) = (source.wal[..shared].to_vec(), source.timeline);
            let srv = &mut self.servers[n];
            let discarded = srv.wal.len() - shared;
            srv.wal = wal;
            srv.timeline = tl;
            srv.in_recovery = true;
            srv.standby_signal = true;
            self.say(|| {
                format!("{}: rejoin: rewound ({discarded} record(s) of its own discarded), starting as a standby", name)
            });
            self.start(n);
        }
    }

    fn next_timeline(&self) -> u32 {
        self.servers.iter().map(|s| s.timeline).max().unwrap_or(1) + 1
    }

    fn background(&mut self) {
        let next_tl = self.next_timeline();
        for (n, name) in NAMES.iter().enumerate() {
            let was_recovery = self.servers[n].in_recovery;
            let tl = self.servers[n].timeline;
            let released = self.servers[n].background(self.now, next_tl);
            for id in released {
                self.ack(n, id, tl);
            }
            if was_recovery && !self.servers[n].in_recovery {
                self.say(|| format!("{name}: recovery ended, timeline {next_tl}"));
            }
        }
    }

    /// The replication stream from whichever node is a primary to the other.
    fn replicate(&mut self) {
        let now = self.now;
        for p in 0..2 {
            let s = 1 - p;
            let (prim, stby) = (self.servers[p].clone(), self.servers[s].clone());
            if prim.in_recovery || !stby.in_recovery {
                continue;
            }
            let compatible = stby.wal.len() <= prim.wal.len()
                && stby
                    .wal
                    .last()
                    .is_none_or(|id| prim.wal[stby.wal.len() - 1] == *id)
                && stby.timeline <= prim.timeline;
            let reset = !prim.up
                || !stby.up
                || now < prim.starting_until
                || now < stby.starting_until
                || !compatible
                || self.repl == Link::Drop;
            let stalled = prim.frozen || stby.frozen || self.repl == Link::Swallow;
            if reset {
                self.servers[p].sender = None;
                self.servers[s].receiver_streaming = false;
                continue;
            }
            if stalled {
                // An open connection with nothing on it, until a timeout ends it.
                let to = self.c.stream_timeout_ms;
                if let Some(snd) = &self.servers[p].sender {
                    if now.saturating_sub(snd.last_reply) > to && !prim.frozen {
                        self.servers[p].sender = None;
                    }
                }
                if now.saturating_sub(self.servers[s].last_receipt) > to && !stby.frozen {
                    self.servers[s].receiver_streaming = false;
                }
                continue;
            }
            let rate = match self.repl {
                Link::Slow if (now / self.c.step_ms).is_multiple_of(self.c.slow_every) => 1,
                Link::Slow => 0,
                _ => self.c.fast_rate,
            };
            let have = self.servers[s].wal.len();
            let end = (have + rate).min(self.servers[p].wal.len());
            let new: Vec<u64> = self.servers[p].wal[have..end].to_vec();
            let moved = !new.is_empty();
            let tl = self.servers[p].timeline;
            let stby = &mut self.servers[s];
            stby.wal.extend(new);
            stby.timeline = tl;
            stby.receiver_streaming = true;
            if moved || now.saturating_sub(stby.last_keepalive) >= self.c.stream_keepalive_ms {
                stby.last_receipt = now;
                stby.last_keepalive = now;
            }
            let flush = stby.wal.len();
            self.servers[p].sender = Some(Sender {
                flush,
                last_reply: now,
            });
            // Commits waiting for this standby's flush are acknowledged.
            let prim = &mut self.servers[p];
            let (done, still): (Vec<_>, Vec<_>) =
                prim.waiting.drain(..).partition(|(_, lsn)| *lsn <= flush);
            prim.waiting = still;
            for (id, _) in done {
                self.ack(p, id, tl);
            }
        }
    }

    fn ack(&mut self, node: usize, id: u64, timeline: u32) {
        self.acks.push(Ack {
            id,
            node,
            timeline,
            at: self.now,
        });
    }

    /// A client with a session on each writable server commits once per interval, one commit in
    /// flight per server.
    fn clients(&mut self) {
        if self.now < self.next_client {
            return;
        }
        self.next_client = self.now + self.c.client_ms;
        for n in 0..2 {
            let srv = &self.servers[n];
            let cancel = self.c.client_cancel_ms.is_some_and(|ms| {
                !srv.waiting.is_empty() && self.now.saturating_sub(srv.waiting_since) >= ms
            });
            if cancel && srv.running(self.now) {
                // Committed locally and reported as a success with a WARNING that it might not
                // be replicated: not an acknowledgment a client may count on (README).
                let (tl, now) = (srv.timeline, self.now);
                let cancelled: Vec<u64> = self.servers[n]
                    .waiting
                    .drain(..)
                    .map(|(id, _)| id)
                    .collect();
                self.warned.extend(cancelled.into_iter().map(|id| Ack {
                    id,
                    node: n,
                    timeline: tl,
                    at: now,
                }));
                continue;
            }
            let srv = &self.servers[n];
            if !srv.writable(self.now) || !srv.waiting.is_empty() {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let srv = &mut self.servers[n];
            srv.wal.push(id);
            if srv.sync_in_force {
                let lsn = srv.wal.len();
                srv.waiting.push((id, lsn));
                srv.waiting_since = self.now;
            } else {
                let tl = srv.timeline;
                self.ack(n, id, tl);
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // The worker's cycle, as in src/worker.rs.

    fn run_worker(&mut self, n: usize) {
        let now = self.now;
        let s = self.settings(n);
        if !self.servers[n].running(now) {
            return;
        }
        let Some(w) = self.workers[n].as_mut() else {
            // The postmaster starts the worker once the server is up.
            self.workers[n] = Some(Worker::new());
            return;
        };
        match w.phase.clone() {
            Phase::Idle => {
                let mut due = w
                    .last_tick
                    .map_or(now, |t| t + w.interval(&self.c, now, &s));
                // The worker also wakes up for the deadline by which it must stop serving.
                if let (Some(t), Some(d)) = (w.last_tick, w.keeper.serve_deadline_ms(&s)) {
                    due = due.min(d.max(t + 1));
                }
                if now >= due && now >= w.busy_until {
                    w.last_tick = Some(now);
                    w.recheck_after = None;
                    self.tick_start(n);
                }
            }
            Phase::Heartbeat { until, tick } if now >= until => self.tick_lease(n, tick),
            Phase::Lease { until, tick } if now >= until => self.tick_decide(n, tick),
            _ => {}
        }
    }

    fn worker(&mut self, n: usize) -> &mut Worker {
        self.workers[n].as_mut().expect("a running worker")
    }

    fn tick_start(&mut self, n: usize) {
        let now = self.now;
        let srv = &self.servers[n];
        let in_recovery = srv.in_recovery;
        if !self.worker(n).identified {
            self.worker(n).identified = true;
            // The first heartbeat follows at once.
            self.worker(n).last_tick = None;
            match self.servers[n].keeper_memory {
                // A restarted worker goes on where the last one stopped (src/worker.rs).
                Some(m) => {
                    self.worker(n).keeper = Keeper::resume(&m);
                    self.say(|| format!("{}: resumed in {}", NAMES[n], m.mode));
                    self.perform_pending(n);
                }
                None => self.decide(n, Input::Identified { in_recovery }),
            }
            return;
        }
        let mode = self.worker(n).keeper.mode();
        let srv = &self.servers[n];
        let sync_configured = srv.sync_names;
        let (streaming, caught_up) = match (&srv.sender, mode.is_master() && !in_recovery) {
            (Some(snd), true) => (
                true,
                srv.insert_lsn() - snd.flush.min(srv.insert_lsn()) <= self.c.sync_restore_lag,
            ),
            _ => (false, false),
        };
        // In force first, then the insert position, then the standby's flush (src/worker.rs).
        let primary_view = mode.is_master() && !in_recovery;
        let sync_in_force = primary_view && srv.sync_in_force;
        let insert_lsn = srv.insert_lsn() as u64;
        let standby = srv
            .sender
            .as_ref()
            .filter(|_| primary_view)
            .map(|snd| StandbySeen {
                synchronous: sync_configured,
                flush_lsn: snd.flush as u64,
            });
        let window = self.c.keepalive_ms * self.c.keepalive_count as u64;
        let replies_recent = srv
            .sender
            .as_ref()
            .is_some_and(|snd| primary_view && now.saturating_sub(snd.last_reply) <= window);
        if streaming {
            // The keeper's pulse: a WAL record every tick (src/db.rs).
            self.servers[n].wal.push(PULSE);
        }
        let (heartbeat, peer, delay) = if mode.heartbeats() {
            self.heartbeat(n)
        } else {
            (None, None, 0)
        };
        let tick = Partial {
            started: now,
            in_recovery,
            mode,
            sync_configured,
            streaming,
            caught_up,
            sync_in_force,
            insert_lsn,
            standby,
            replies_recent,
            timed_out: matches!(&heartbeat, Some(Heartbeat::NoAnswer(why)) if why == "timeout"),
            heartbeat,
            peer,
            wal_receiver_recent: false,
            lease: Lease::NotConfigured,
            witness_waited: false,
            witness_gave_up: false,
        };
        self.worker(n).phase = Phase::Heartbeat {
            until: now + delay,
            tick,
        };
        if delay == 0 {
            self.run_worker(n);
        }
    }

    /// How long node n's worker may wait for one call: an interval, and no later than the
    /// deadline by which it must stop serving (src/worker.rs).
    fn call_budget(&self, n: usize) -> Ms {
        let kt = self.c.keepalive_ms;
        let deadline = self.workers[n]
            .as_ref()
            .and_then(|w| w.keeper.serve_deadline_ms(&self.settings(n)));
        match deadline {
            Some(d) => kt.min(d.saturating_sub(self.now)),
            None => kt,
        }
    }

    /// Node n's heartbeat to the other: the outcome and how long it took.
    fn heartbeat(&self, n: usize) -> (Option<Heartbeat>, Option<PeerFacts>, Ms) {
        let peer = &self.servers[1 - n];
        let kt = self.call_budget(n);
        let no = |why: &str, after| (Some(Heartbeat::NoAnswer(why.into())), None, after);
        match self.hb[n] {
            Link::Drop => return no("connection reset", 0),
            Link::Swallow => return no("timeout", kt),
            _ => {}
        }
        if self.hb_to_self[n] {
            // This server answers (it is up: its worker runs), but the worker sees that the
            // answer is its own (src/worker/observe.rs): no answer from the peer.
            return no("the heartbeat reached this server itself, not the peer", 0);
        }
        if !peer.up {
            return no("connection refused", 0);
        }
        if peer.frozen {
            return no("timeout", kt);
        }
        if self.now < peer.starting_until {
            return (
                Some(Heartbeat::Refused(
                    "FATAL: the database system is starting up".into(),
                )),
                None,
                0,
            );
        }
        // The sync_state the peer shows for the asker, if the asker streams from it.
        let sync_state = match (&peer.sender, peer.in_recovery) {
            (Some(_), false) if peer.sync_names => Some("sync"),
            (Some(_), false) => Some("async"),
            _ => None,
        };
        let facts = PeerFacts {
            in_recovery: peer.in_recovery,
            timeline: peer.timeline,
            sync_state_of_asker: sync_state,
            uses_witness: self.c.has_witness(1 - n),
            trusted_standby: peer
                .keeper_trusts
                .map(|trusts| if trusts { NAMES[n] } else { "" }),
        };
        (Some(Heartbeat::Answered), Some(facts), 0)
    }

    fn tick_lease(&mut self, n: usize, mut tick: Partial) {
        let now = self.now;
        if self.wit[n] == Link::Slow && !tick.witness_waited && self.c.has_witness(n) {
            // The statement reaches the witness late, within the interval; the worker waits
            // for it no longer than its serving deadline, and then gives up (the statement
            // still takes effect on the witness).
            let (late, budget) = (self.c.keepalive_ms * 9 / 10, self.call_budget(n));
            tick.witness_waited = true;
            tick.witness_gave_up = late > budget;
            self.worker(n).phase = Phase::Heartbeat {
                until: now + late.min(budget),
                tick,
            };
            return;
        }
        let srv = &self.servers[n];
        let window = self.c.keepalive_ms * self.c.keepalive_count as u64;
        tick.wal_receiver_recent = tick.in_recovery
            && srv.receiver_streaming
            && now.saturating_sub(srv.last_receipt) <= window;
        let primary = tick.mode.is_master() && !tick.in_recovery;
        let standby = matches!(tick.mode, Mode::StandbyWaiting | Mode::StandbyConnected);
        let mut delay = 0;
        let sync_standby_now = self.worker(n).keeper.lease_names_standby(
            tick.sync_in_force,
            tick.insert_lsn,
            tick.standby,
        );
        // Published for the standby's heartbeat (src/worker.rs, pg_stat_activity).
        self.servers[n].keeper_trusts = Some(self.worker(n).keeper.trusts_standby());
        if self.c.has_witness(n) && (primary || standby) {
            let timeline = self.servers[n].timeline;
            let lease_ms = self.c.lease_ms();
            let me = NAMES[n];
            let result = self.witness_call(n, |wt, now| {
                if primary {
                    wt.claim(
                        me,
                        timeline,
                        sync_standby_now.then_some(NAMES[1 - n]),
                        lease_ms,
                        SYSTEM_IDENTIFIER,
                        now,
                    )
                } else {
                    wt.read(lease_ms, now)
                }
            });
            let result = match result {
                Ok(_) if tick.witness_gave_up => Err(("no answer before the deadline".into(), 0)),
                other => other,
            };
            tick.lease = match result {
                Err((why, after)) => {
                    delay = after;
                    Lease::Unreachable(why)
                }
                Ok(None) => Lease::Missing,
                Ok(Some(row)) => {
                    let lease = row.view(me, timeline, primary);
                    if let (false, Lease::Peer { expired: false, .. }) = (primary, &lease) {
                        self.worker(n).recheck_after = Some(row.ms_left.max(0) as u64 + 20);
                    }
                    lease
                }
            };
        }
        self.worker(n).phase = Phase::Lease {
            until: now + delay,
            tick,
        };
        if delay == 0 {
            self.run_worker(n);
        }
    }

    /// One statement on the witness through node n's path: its answer, or why not and how long
    /// the caller waited.
    fn witness_call(
        &mut self,
        n: usize,
        f: impl FnOnce(&mut Witness, Ms) -> Option<LeaseRow>,
    ) -> Result<Option<LeaseRow>, (String, Ms)> {
        match self.wit[n] {
            Link::Drop => return Err(("connection reset".into(), 0)),
            Link::Swallow => return Err(("timeout".into(), self.call_budget(n))),
            _ => {}
        }
        if self.witness.down {
            return Err(("connection refused".into(), 0));
        }
        // Another cluster's row is never obeyed (src/witness.rs).
        let result = match f(&mut self.witness, self.now) {
            Some(row) => match row.foreign(&SYSTEM_IDENTIFIER.to_string()) {
                Some(why) => Err((why, 0)),
                None => Ok(Some(row)),
            },
            None => Ok(None),
        };
        let problem = result.as_ref().err().map(|(why, _)| why.clone());
        if problem.is_some() && problem != self.witness_problem[n] {
            let why = problem.clone().unwrap_or_default();
            self.say(|| format!("{}: cannot use the witness: {why}", NAMES[n]));
        }
        self.witness_problem[n] = problem;
        result
    }

    fn tick_decide(&mut self, n: usize, tick: Partial) {
        self.worker(n).phase = Phase::Idle;
        let reached_standby = tick.heartbeat == Some(Heartbeat::Answered) && tick.streaming;
        if tick.lease == Lease::Held || reached_standby {
            self.last_reached[n] = Some(tick.started);
        }
        let my_timeline = self.servers[n].timeline;
        let facts = tick.peer.as_ref();
        let in_recovery = tick.in_recovery;
        let obs = Observation {
            now_ms: self.now,
            tick_started_ms: tick.started,
            in_recovery,
            sync_configured: tick.sync_configured,
            standby_streaming: tick.streaming,
            heartbeat: tick.heartbeat.clone(),
            restore_wanted: self.servers[n].saved_sync,
            standby_caught_up: tick.caught_up,
            standby_replies_recent: tick.replies_recent,
            wal_receiver_recent: tick.wal_receiver_recent,
            lease: tick.lease,
            peer_announced_shutdown_ms: self.worker(n).announced.take(),
            heartbeat_timed_out: tick.timed_out,
            ..Observation::default()
        };
        let answer = facts.map(|f| PeerAnswer {
            in_recovery: f.in_recovery,
            timeline: (!f.in_recovery).then_some(f.timeline),
            sync_state_of_asker: f.sync_state_of_asker.map(str::to_string),
            uses_witness: Some(f.uses_witness),
            trusted_standby: f.trusted_standby.map(str::to_string),
        });
        self.decide(
            n,
            Input::Tick(obs.with_answer(answer.as_ref(), my_timeline, NAMES[n])),
        );
    }

    fn decide(&mut self, n: usize, input: Input) {
        let s = self.settings(n);
        let d = self.worker(n).keeper.step(&input, &s);
        let holding = Event::PeerLostButStreaming;
        if d.event == holding && self.worker(n).last_event != Some(holding) {
            self.worker(n).recheck_after = Some(200);
        }
        self.worker(n).last_event = Some(d.event);
        if d.level > Level::Debug || d.changed_mode() {
            self.say(|| format!("{}: {} -> {}: {}", NAMES[n], d.from, d.to, d.sentence));
        }
        self.perform_pending(n);
    }

    /// Performs the keeper's actions in order, keeping its memory up to date before each one
    /// (as the worker does in shared memory), so that a restart redoes the one under way.
    fn perform_pending(&mut self, n: usize) {
        let s = self.settings(n);
        loop {
            let memory = self.worker(n).keeper.memory();
            self.servers[n].keeper_memory = Some(memory);
            let Some(action) = self.worker(n).keeper.next_action() else {
                return;
            };
            let result = self.perform(n, action);
            self.say(|| {
                let outcome = match &result {
                    Ok(()) => "done".to_string(),
                    Err(why) => format!("failed: {why}"),
                };
                format!("{}: {action:?} {outcome}", NAMES[n])
            });
            if self.inject_after(n, action) {
                return;
            }
            let Some(w) = self.workers[n].as_mut() else {
                // Fenced: the server is gone.
                return;
            };
            match result {
                Ok(()) => w.keeper.action_done(action),
                Err(why) => {
                    w.keeper.step(&Input::ActionFailed(action, why), &s);
                }
            }
        }
    }

    /// Crashes the server or restarts the worker right after this action, if asked to.
    fn inject_after(&mut self, n: usize, action: Action) -> bool {
        let Some(i) = self
            .after_action
            .iter()
            .position(|(node, a, _)| *node == n && *a == action)
        else {
            return false;
        };
        let (_, _, what) = self.after_action.remove(i);
        self.say(|| format!("{}: fault: {what:?} right after {action:?}", NAMES[n]));
        match what {
            crate::AfterAction::CrashServer => self.crash(n),
            crate::AfterAction::RestartWorker => self.restart_worker(n),
        }
        true
    }

    fn perform(&mut self, n: usize, action: Action) -> Result<(), String> {
        let reload_at = self.now + self.rng.below(self.c.max_reload_ms + 1);
        let lease_ms = self.c.lease_ms();
        let (me, timeline) = (NAMES[n], self.servers[n].timeline);
        match action {
            Action::DegradeToAsync => {
                self.servers[n].degrade_to_async(reload_at);
                Ok(())
            }
            Action::RestoreSync => {
                if self.servers[n].restore_sync(reload_at) {
                    Ok(())
                } else {
                    Err("no saved synchronous_standby_names to restore".into())
                }
            }
            Action::Promote => {
                if self.servers[n].in_recovery {
                    self.servers[n].promote_at = Some(self.now + self.c.promote_ms);
                }
                Ok(())
            }
            Action::Fence => {
                self.servers[n].standby_signal = true;
                self.stop(n);
                Ok(())
            }
            Action::ReleaseStandby if self.c.has_witness(n) => {
                let released = |wt: &mut Witness, now| {
                    wt.claim(me, timeline, None, lease_ms, SYSTEM_IDENTIFIER, now)
                };
                match self.witness_call(n, released) {
                    Ok(Some(row)) if row.mine => Ok(()),
                    Ok(Some(row)) => Err(format!("not the holder: {}", row.describe())),
                    Ok(None) => Err("the witness holds no lease".into()),
                    Err((why, after)) => {
                        self.worker(n).busy_until = self.now + after;
                        Err(why)
                    }
                }
            }
            Action::TakeLease if self.c.has_witness(n) => {
                let taken =
                    |wt: &mut Witness, now| wt.take(me, timeline, lease_ms, SYSTEM_IDENTIFIER, now);
                match self.witness_call(n, taken) {
                    Ok(Some(_)) => {
                        self.check_nobody_serves_but(n);
                        Ok(())
                    }
                    Ok(None) => Err("the lease is not expired or does not name this node".into()),
                    Err((why, after)) => {
                        self.worker(n).busy_until = self.now + after;
                        Err(why)
                    }
                }
            }
            Action::Rejoin => {
                self.rejoin_waiting[n] = true;
                Ok(())
            }
            Action::EndWaitingCommits => {
                // The sessions end without an answer to their COMMIT.
                self.servers[n].waiting.clear();
                Ok(())
            }
            Action::StopServing => {
                // New sessions are refused and every session ends, without an answer to a
                // COMMIT under way.
                self.servers[n].refusing = true;
                self.servers[n].waiting.clear();
                Ok(())
            }
            Action::ResumeServing => {
                self.servers[n].refusing = false;
                Ok(())
            }
            // The stream here starts again as soon as it can (no retry interval is modelled).
            Action::ReleaseStandby
            | Action::TakeLease
            | Action::WakeWalReceiver
            | Action::RunAfterCommand(_) => Ok(()),
        }
    }

    /// Check (d): when node n takes the lease, the other node serves no session if it has been
    /// isolated, that is, has reached neither the witness nor its streaming standby for the
    /// lease time less the margin (unless the witness's clock was stepped, which the lease's
    /// timing cannot survive). One that reached its standby more recently may still serve
    /// (a one-way cut; the README's Known limits).
    fn check_nobody_serves_but(&mut self, n: usize) {
        let other = &self.servers[1 - n];
        let budget = self.c.lease_ms() - keeper_core::LEASE_MARGIN_MS;
        let isolated_for = self.last_reached[1 - n].map(|t| self.now.saturating_sub(t));
        let isolated = isolated_for.is_none_or(|ms| ms >= budget);
        if other.serves(self.now) && isolated && !self.witness_clock_stepped {
            let what = format!(
                "(d) {} took the lease while {}, a primary that had reached neither the witness nor its standby for {}, still served sessions",
                NAMES[n],
                NAMES[1 - n],
                isolated_for.map_or("ever".into(), |ms| format!("{ms} ms"))
            );
            self.say(|| what.clone());
            self.served_past_lease.get_or_insert(what);
        }
    }

    // ------------------------------------------------------------------------------------
    // Faults.

    /// `kill -9` of node n's postmaster.
    pub fn crash(&mut self, n: usize) {
        self.stop(n);
        // A server that goes away closes the peer's kept heartbeat connection: the peer's keeper
        // heartbeats at once (src/worker.rs, wait_for_next_tick).
        let p = 1 - n;
        if self.hb[p] == Link::Up {
            if let Some(w) = self.workers[p].as_mut() {
                if w.keeper.mode().heartbeats() {
                    w.last_tick = None;
                }
            }
        }
    }

    /// `pg_ctl stop -m fast` of node n: its sessions are ended (a commit under way gets no
    /// answer), the peer's kept heartbeat session among them, with the announcement of a clean
    /// shutdown; the walsender sends the standby every WAL record over a link that passes, and
    /// the server stops.
    pub fn clean_stop(&mut self, n: usize) {
        let p = 1 - n;
        let (prim, stby) = (&self.servers[n], &self.servers[p]);
        let streams = !prim.in_recovery
            && stby.in_recovery
            && stby.running(self.now)
            && prim.running(self.now)
            && stby.wal.len() <= prim.wal.len()
            && matches!(self.repl, Link::Up | Link::Slow);
        if streams {
            let rest = self.servers[n].wal[self.servers[p].wal.len()..].to_vec();
            let tl = self.servers[n].timeline;
            self.servers[p].wal.extend(rest);
            self.servers[p].timeline = tl;
        }
        self.stop(n);
        if self.hb[p] == Link::Up {
            let now = self.now;
            if let Some(w) = self.workers[p].as_mut() {
                if w.keeper.mode().heartbeats() {
                    w.announced = Some(now);
                    if !w.keeper.mode().is_master() {
                        // The standby's worker heartbeats at once (src/worker/mod.rs).
                        w.last_tick = None;
                    }
                }
            }
        }
    }

    fn stop(&mut self, n: usize) {
        self.servers[n].crash();
        self.workers[n] = None;
        // A rejoin process waiting for this server goes on, however it stopped.
        if std::mem::take(&mut self.rejoin_waiting[n]) {
            self.rejoin_at[n] = Some(self.now + REJOIN_MS);
        }
    }

    pub fn restart_worker(&mut self, n: usize) {
        if self.workers[n].is_some() {
            self.workers[n] = Some(Worker::new());
            // Its row in pg_stat_activity went with it.
            self.servers[n].keeper_trusts = None;
        }
    }

    pub fn start(&mut self, n: usize) {
        let startup = self.c.startup_ms;
        self.servers[n].start(self.now, startup);
    }
}
