//! The background worker: wait, observe, ask the decision core, act, report. One tick every
//! `keepalive_time` (every 100ms while a promotion is under way).

use std::time::{Duration, Instant};

use keeper_core::{Decision, Input, Keeper, Level, Mode};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::actuators;
use crate::after_command::AfterCommands;
use crate::conninfo::Conninfo;
use crate::heartbeat::{shutdown_requested, Connection, Node};
use crate::identity::{self, Identity};
use crate::settings::Settings;
use crate::status;
use crate::witness::{LeaseRow, Witness};

mod actions;
mod lease;
mod observe;
mod report;

use report::Problems;

/// A promotion request is made again after this while the server is still in recovery: the
/// startup process may be sleeping out wal_retrieve_retry_interval when the first one arrives.
const PROMOTE_AGAIN_AFTER: Duration = Duration::from_millis(100);

/// How soon a promotion held because the WAL receiver still looked alive is looked at again.
const QUICK_RECHECK: Duration = Duration::from_millis(200);

/// How often the loop looks at a promotion under way or a running after_command.
const FAST_POLL: Duration = Duration::from_millis(100);

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_keeper_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // Connected to no database, as the logical replication launcher is: the keeper reads the
    // replication state from shared memory (src/server_views.rs), and a database's relation and
    // catalog caches would cost about 1 MB of private memory (README "The HTTP endpoint's cost").
    BackgroundWorker::connect_worker_to_spi(None, None);
    let mut worker = Worker::new();
    worker.run();
    worker.log(Level::Log, "stopping", None);
    // No one may signal this pid once it is gone (it can be given to another program).
    status::publish(|s| s.worker_pid = 0);
    // A non-zero exit makes the postmaster start the worker again (after pg_terminate_backend,
    // say); when the server itself is shutting down it is not restarted.
    unsafe { pg_sys::proc_exit(1) };
}

struct Worker {
    settings: Settings,
    keeper: Keeper,
    identity: Option<Identity>,
    peer: Option<Box<Node>>,
    after: AfterCommands,
    /// Where the core's clock starts (see [`status::clock_origin`]).
    clock_origin: Instant,
    last_tick: Option<Instant>,
    /// The next tick comes after this rather than a full interval (once): soon after a first
    /// hold by the WAL receiver guard, or when the lease that holds a promotion expires.
    recheck_after: Option<Duration>,
    /// When the kept connection to the peer was closed with a clean shutdown announcement,
    /// if it was since the last tick.
    peer_announced_shutdown_ms: Option<u64>,
    /// The connection to the witness, when one is configured.
    witness: Option<Witness>,
    /// The lease as last seen on the witness.
    lease: Option<LeaseRow>,
    /// Since when the witness cannot be used, and when that was last warned about.
    witness_down_since: Option<Instant>,
    witness_warned_at: Option<Instant>,
    /// The event of the last tick's decision.
    last_event: Option<keeper_core::Event>,
    /// The last note about the replication view, so it is logged once per change.
    last_note: Option<String>,
    /// The problem each source has in force, for the status (see [`Problems`]).
    problems: Problems,
    /// The hint that goes with the current identity problem.
    identity_hint: Option<String>,
    /// What this worker last reported as its activity (see [`Worker::publish_trust`]).
    activity: String,
    /// The last warning about the peer's reserved connection slots, so it is given once.
    reserved_note: Option<String>,
}

impl Worker {
    fn new() -> Worker {
        Worker {
            settings: Settings::load(),
            keeper: Keeper::new(),
            identity: None,
            peer: None,
            after: AfterCommands::default(),
            clock_origin: status::clock_origin(),
            last_tick: None,
            recheck_after: None,
            peer_announced_shutdown_ms: None,
            witness: None,
            lease: None,
            witness_down_since: None,
            witness_warned_at: None,
            last_event: None,
            last_note: None,
            problems: Problems::default(),
            identity_hint: None,
            activity: String::new(),
            reserved_note: None,
        }
    }

    fn run(&mut self) {
        self.connect_witness();
        self.event(
            "started",
            Level::Log,
            &format!("started; {}", self.settings.summary()),
            None,
        );
        self.log_setting_warnings();
        self.set_title();
        while !shutdown_requested() {
            absorb_interrupts();
            self.reload_if_requested();
            self.follow_pause();
            let now = Instant::now();
            let mut due = self.last_tick.map_or(now, |t| t + self.tick_interval());
            // Wake up for the deadline by which an isolated primary must stop serving.
            if let (Some(t), Some(d)) = (self.last_tick, self.serve_deadline()) {
                due = due.min(d.max(t + Duration::from_millis(1)));
            }
            if now >= due {
                self.last_tick = Some(now);
                self.recheck_after = None;
                self.tick();
                continue;
            }
            self.reap_after_commands();
            let mut wait = due - now;
            if self.after.is_running() {
                wait = wait.min(FAST_POLL);
            }
            self.wait_for_next_tick(wait);
        }
    }

    /// Starts or ends a pause asked for from SQL, or ends one whose interval has passed.
    fn follow_pause(&mut self) {
        let (mut paused, until) = status::pause_state();
        if paused && until != 0 && status::now() >= until {
            status::publish(|s| {
                s.paused = false;
                s.pause_until = 0;
            });
            paused = false;
        }
        if paused == self.keeper.paused() {
            return;
        }
        self.keeper.set_paused(paused);
        if paused {
            let how_long = if until == 0 {
                "until pg_keeper_resume()".to_string()
            } else {
                "for the interval given".to_string()
            };
            self.event(
                "paused",
                Level::Log,
                &format!("paused {how_long}: heartbeating and reporting, but not promoting or switching replication"),
                None,
            );
        } else {
            self.event(
                "resumed",
                Level::Log,
                "resumed: automatic actions are enabled again",
                None,
            );
        }
        self.set_title();
    }

    /// Waits on the latch and, while heartbeating, on the kept connection to the peer: when the
    /// peer's server goes away its backend closes that connection, and the next heartbeat is
    /// made at once instead of at the next tick (it still takes keepalive_count failures).
    fn wait_for_next_tick(&mut self, wait: Duration) {
        let sock = match self.peer.as_ref() {
            Some(peer) if self.keeper.mode().heartbeats() => peer.socket(),
            _ => None,
        };
        let Some(sock) = sock else {
            wait_latch(wait, None);
            return;
        };
        if wait_latch(wait, Some(sock)) {
            let state = self
                .peer
                .as_mut()
                .map_or(Connection::Lost, |p| p.check_connection());
            match state {
                Connection::Open => {}
                // A planned restart of the peer: the core decides what it means (a standby
                // waits out pg_keeper.restart_grace before counting failures).
                Connection::ClosedByShutdown => {
                    self.peer_announced_shutdown_ms = Some(self.now_ms());
                    if self.keeper.mode().is_master() {
                        self.log(
                            Level::Log,
                            "the peer is shutting down; heartbeating it at the usual interval",
                            None,
                        );
                    } else {
                        // Heartbeat at once: the grace starts now, and the primary is then
                        // polled quickly to see it back.
                        self.last_tick = None;
                    }
                }
                Connection::Lost => {
                    self.log(
                        Level::Debug,
                        "the connection to the peer was lost; heartbeating now",
                        None,
                    );
                    self.last_tick = None;
                }
            }
        }
    }

    fn tick_interval(&self) -> Duration {
        if self.keeper.mode() == Mode::Promoting {
            FAST_POLL
        } else if self.keeper.polls_fast(self.now_ms(), &self.core_settings()) {
            self.settings.keepalive_time.min(FAST_POLL)
        } else if let Some(soon) = self.recheck_after {
            self.settings.keepalive_time.min(soon)
        } else {
            self.settings.keepalive_time
        }
    }

    /// Applies a reload: the new settings take effect on the next tick, which is re-timed from
    /// the last one with the new interval.
    fn reload_if_requested(&mut self) {
        // SAFETY: a sig_atomic_t set by the SIGHUP handler; cleared here before reloading.
        let pending =
            unsafe { std::ptr::read_volatile(&raw const pg_sys::ConfigReloadPending) != 0 };
        if !pending {
            return;
        }
        unsafe {
            std::ptr::write_volatile(&raw mut pg_sys::ConfigReloadPending, 0);
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
        let _ = BackgroundWorker::sighup_received();
        // PostgreSQL 17's allow_alter_system turned off by this reload: the next switch to
        // async or back would fail. Stop protecting now and say so (see identify()), rather
        // than at failover time.
        if self.identity.is_some() && actuators::alter_system_refused() {
            self.forget_identity();
        } else if self.identity.is_none() {
            // Not identified yet: the reload may have fixed what was in the way; try now.
            self.last_tick = None;
        }
        let new = Settings::load();
        if new == self.settings {
            return;
        }
        let nodes_changed = new.node1 != self.settings.node1 || new.node2 != self.settings.node2;
        let witness_changed = new.witness != self.settings.witness;
        self.settings = new;
        if witness_changed {
            self.connect_witness();
        }
        self.log(
            Level::Log,
            &format!("configuration reloaded; {}", self.settings.summary()),
            None,
        );
        self.log_setting_warnings();
        if nodes_changed {
            self.log(
                Level::Log,
                "node conninfo changed; identifying this node again",
                None,
            );
            self.forget_identity();
        }
    }

    /// Starts again from identification, at once: this keeper protects nothing until then.
    fn forget_identity(&mut self) {
        self.identity = None;
        self.peer = None;
        self.keeper = Keeper::new();
        self.reserved_note = None;
        status::publish(|s| s.memory = None);
        self.last_tick = None;
        self.set_title();
    }

    fn core_settings(&self) -> keeper_core::Settings {
        let (me, peer) = match &self.identity {
            Some(id) => (id.me_display(), id.peer_display()),
            None => ("this node".into(), "the peer".into()),
        };
        keeper_core::Settings {
            allow_data_loss_failover: self.settings.allow_data_loss_failover,
            keepalive_count: self.settings.keepalive_count,
            keepalive_time_ms: self.settings.keepalive_time.as_millis() as u64,
            restart_grace_ms: self.settings.restart_grace.as_millis() as u64,
            auto_rejoin: self.settings.auto_rejoin,
            promote_timeout_ms: PROMOTE_AGAIN_AFTER.as_millis() as u64,
            me_name: me,
            peer_name: peer,
        }
    }

    /// When this primary must have stopped serving unless it reaches the standby or the
    /// witness first (with a witness; see [`Keeper::serve_deadline_ms`]).
    fn serve_deadline(&self) -> Option<Instant> {
        self.witness.as_ref()?;
        let ms = self.keeper.serve_deadline_ms(&self.core_settings())?;
        Some(self.clock_origin + Duration::from_millis(ms))
    }

    /// How long one call (heartbeat, lease statement) may wait: an interval, and no later than
    /// the serving deadline, which the core must see passed when it comes.
    fn call_deadline(&self) -> Instant {
        let interval = Instant::now() + self.settings.keepalive_time;
        self.serve_deadline().map_or(interval, |d| d.min(interval))
    }

    /// Milliseconds on the worker's monotonic clock (the core's clock).
    fn now_ms(&self) -> u64 {
        self.clock_origin.elapsed().as_millis() as u64
    }

    fn tick(&mut self) {
        let tick_started_ms = self.now_ms();
        if let Some(d) = self.keeper.serve_deadline_ms(&self.core_settings()) {
            self.log(
                Level::Debug,
                &format!("tick at {tick_started_ms} ms; stops serving at {d} ms unless it reaches the standby or the witness"),
                None,
            );
        }
        let in_recovery = actuators::in_recovery();
        if self.identity.is_none() {
            self.identify(in_recovery);
            return;
        }
        if !in_recovery {
            // A request made just as recovery ended would otherwise stay for a later start.
            actuators::remove_promote_file();
        }
        let Some(input) = self.observe(tick_started_ms, in_recovery) else {
            return;
        };
        let d = self.step(&input);
        self.report(&d);
        self.perform();
    }

    /// This node's name and the peer's, once identified.
    fn names(&self) -> Option<(&'static str, &'static str)> {
        self.identity.as_ref().map(|id| (id.me_name, id.peer_name))
    }

    fn identify(&mut self, in_recovery: bool) {
        // PostgreSQL 17's allow_alter_system = off would make every switch to async and back
        // fail at failover time: refuse to protect the server now, and say what to set.
        if actuators::alter_system_refused() {
            let message = "allow_alter_system is off, so this keeper could not switch synchronous_standby_names to async when the standby is lost, nor restore it (both use ALTER SYSTEM); not protecting this server".to_string();
            self.problems.identity = Some(message.clone());
            self.identity_hint = Some(
                "Set allow_alter_system = on (the keeper changes only synchronous_standby_names, synchronized_standby_slots and their saved values pg_keeper.saved_* in postgresql.auto.conf) and reload.".into(),
            );
            let d = self.step(&Input::IdentityProblem(message));
            self.report(&d);
            return;
        }
        match identity::identify(&self.settings, self.settings.keepalive_time) {
            identity::Outcome::Found(id, peer) => {
                // The first heartbeat follows at once: a returning old primary must learn quickly
                // whether it was superseded.
                self.last_tick = None;
                let (me, peer_display) = (id.me_name, Conninfo::parse(&id.peer_conninfo).ok());
                status::publish(|s| {
                    s.node_name.set(me);
                    s.peer_name.set(id.peer_name);
                    s.peer_host
                        .set(&peer_display.as_ref().map(|c| c.host()).unwrap_or_default());
                    s.peer_port = peer_display
                        .as_ref()
                        .and_then(|c| c.port().parse().ok())
                        .unwrap_or(0);
                });
                self.identity = Some(id);
                self.peer = Some(peer);
                self.identity_hint = None;
                self.problems = Problems::default();
                match status::memory().filter(|m| m.mode != Mode::Unidentified) {
                    // A restarted worker (not server) goes on where the last one stopped.
                    Some(m) => {
                        self.keeper = Keeper::resume(&m);
                        let pending = m.pending.iter().flatten().count();
                        let grace = if self
                            .keeper
                            .in_restart_grace(self.now_ms(), &self.core_settings())
                        {
                            "; the primary's planned restart is still under way (not counting failed heartbeats until pg_keeper.restart_grace is over)"
                        } else {
                            ""
                        };
                        self.event(
                            "resumed_after_restart",
                            Level::Log,
                            &format!(
                                "the keeper worker was restarted; going on in {} with {pending} action(s) of the last decision still to perform{grace}",
                                m.mode
                            ),
                            None,
                        );
                        self.publish_problem();
                        self.set_title();
                        self.perform();
                    }
                    None => {
                        let d = self.step(&Input::Identified { in_recovery });
                        self.report(&d);
                        self.perform();
                    }
                }
            }
            identity::Outcome::Problem { message, hint } => {
                self.problems.identity = Some(self.scrub(&message));
                self.identity_hint = Some(hint);
                let d = self.step(&Input::IdentityProblem(message));
                self.report(&d);
                self.perform();
            }
            identity::Outcome::Interrupted => {}
        }
    }

    /// `keepalive_time x keepalive_count`, in milliseconds: how recent replication evidence
    /// must be to count.
    fn failure_window_ms(&self) -> i64 {
        self.settings.keepalive_time.as_millis() as i64 * self.settings.keepalive_count as i64
    }

    /// Asks the core about one input (a tick's observations, or the identification).
    fn step(&mut self, input: &Input) -> Decision {
        let d = self.keeper.step(input, &self.core_settings());
        // A primary that has just crashed may still look streaming to this standby's WAL
        // receiver for a few milliseconds: the first time that holds a promotion, look again
        // soon rather than a whole interval later.
        let holding = keeper_core::Event::PeerLostButStreaming;
        if d.event == holding && self.last_event != Some(holding) {
            self.recheck_after = Some(QUICK_RECHECK);
        }
        self.last_event = Some(d.event);
        d
    }
}

/// Answers what the server asks of every process through its procsignal slot, the way the
/// checkpointer answers it: a global barrier (DROP DATABASE waits, on the primary and in its
/// replay on a standby, until every process has absorbed one) and
/// `pg_log_backend_memory_contexts()`. A backend answers them in passing while it runs a query
/// (CHECK_FOR_INTERRUPTS); the keeper runs none, so it does it here, on every wake-up.
fn absorb_interrupts() {
    // SAFETY: sig_atomic_t flags set by the procsignal handler, which also sets the latch.
    let (barrier, contexts) = unsafe {
        (
            std::ptr::read_volatile(&raw const pg_sys::ProcSignalBarrierPending) != 0,
            std::ptr::read_volatile(&raw const pg_sys::LogMemoryContextPending) != 0,
        )
    };
    if !barrier && !contexts {
        return;
    }
    // In a transaction of its own, so that an ERROR inside is caught and cannot end the worker.
    let outcome = crate::db::in_transaction(|| {
        // SAFETY: the functions the checkpointer calls for the same flags.
        unsafe {
            if barrier {
                pg_sys::ProcessProcSignalBarrier();
            }
            if contexts {
                pg_sys::ProcessLogMemoryContextInterrupt();
            }
        }
        Ok(())
    });
    if let Err(why) = outcome {
        warning!("pg_keeper: could not absorb a signal barrier or log the memory contexts: {why}");
    }
}

/// Sleeps on the latch (and on `socket`, when given, for reading) for at most `timeout`; wakes
/// early on a signal. Returns whether the socket became readable.
fn wait_latch(timeout: Duration, socket: Option<i32>) -> bool {
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as std::ffi::c_long;
    let mut events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
    if socket.is_some() {
        events |= pg_sys::WL_SOCKET_READABLE;
    }
    // SAFETY: MyLatch is this process's latch; the socket belongs to a live connection.
    let rc = unsafe {
        let rc = pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            events as i32,
            socket.unwrap_or(-1) as pg_sys::pgsocket,
            ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
        rc
    };
    rc & pg_sys::WL_SOCKET_READABLE as i32 != 0
}
