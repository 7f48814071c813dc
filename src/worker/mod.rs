//! The background worker: wait, observe, ask the decision core, act, report. One tick every
//! `keepalive_time` (every 100ms while a promotion is under way).

use std::ffi::CString;
use std::time::{Duration, Instant};

use keeper_core::{Action, AfterEvent, Decision, Input, Keeper, Lease, Level, Mode, Observation};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::actuators::{self, Degraded};
use crate::after_command::{AfterCommands, Context};
use crate::conninfo::{self, Conninfo};
use crate::db;
use crate::heartbeat::{shutdown_requested, Beat, Connection, Node};
use crate::identity::{self, Identity};
use crate::serving;
use crate::settings::Settings;
use crate::status;
use crate::witness::{LeaseRow, Witness};

/// What the replication view says, for the core.
#[derive(Default)]
struct ReplicationSummary {
    /// A standby is streaming (a synchronous one when synchronous_standby_names is set).
    streaming: bool,
    /// A streaming standby is within pg_keeper.sync_restore_lag.
    caught_up: bool,
    /// Commits wait for the synchronous standby now (read first).
    sync_in_force: bool,
    /// The WAL insert position (read after `sync_in_force`, before the view).
    insert_lsn: u64,
    /// The peer standby's row, if it streams.
    peer: Option<keeper_core::StandbySeen>,
    /// The peer standby replied on its stream within the failure window.
    peer_replies_recent: bool,
}

/// A promotion request is made again after this while the server is still in recovery: the
/// startup process may be sleeping out wal_retrieve_retry_interval when the first one arrives.
const PROMOTE_AGAIN_AFTER: Duration = Duration::from_millis(100);

/// How soon a promotion held because the WAL receiver still looked alive is looked at again.
const QUICK_RECHECK: Duration = Duration::from_millis(200);

/// Answers in a row that must miss this streaming standby before that is warned about.
const UNLISTED_BEFORE_WARNING: u32 = 3;

/// While the witness cannot be used, the warning is repeated this often.
const WITNESS_WARNING_EVERY: Duration = Duration::from_secs(60);

/// How often the loop looks at a promotion under way or a running after_command.
const FAST_POLL: Duration = Duration::from_millis(100);

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_keeper_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&Settings::database()), None);
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
    started: Instant,
    last_tick: Option<Instant>,
    /// The next tick comes after this rather than a full interval (once): soon after a first
    /// hold by the WAL receiver guard, or when the lease that holds a promotion expires.
    recheck_after: Option<Duration>,
    /// Consecutive answers of the primary that did not list this streaming standby.
    unlisted_answers: u32,
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
    /// The hint that goes with the current identity problem.
    identity_hint: Option<String>,
    /// What this worker last reported as its activity (see [`Worker::publish_trust`]).
    activity: String,
}

fn level_to_pg(level: Level) -> PgLogLevel {
    match level {
        Level::Debug => PgLogLevel::DEBUG1,
        Level::Log => PgLogLevel::LOG,
        Level::Warning => PgLogLevel::WARNING,
    }
}

impl Worker {
    fn new() -> Worker {
        Worker {
            settings: Settings::load(),
            keeper: Keeper::new(),
            identity: None,
            peer: None,
            after: AfterCommands::default(),
            started: Instant::now(),
            last_tick: None,
            recheck_after: None,
            unlisted_answers: 0,
            witness: None,
            lease: None,
            witness_down_since: None,
            witness_warned_at: None,
            last_event: None,
            last_note: None,
            identity_hint: None,
            activity: String::new(),
        }
    }

    /// Removes any password of the node conninfos from a text.
    fn scrub(&self, text: &str) -> String {
        let secrets: Vec<&str> = [
            self.settings.node1.as_deref(),
            self.settings.node2.as_deref(),
            self.settings.witness.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect();
        conninfo::scrub(text, &secrets)
    }

    /// Logs a line and records it in the event history as `name`.
    fn event(&self, name: &str, level: Level, message: &str, hint: Option<&str>) {
        self.log(level, message, hint);
        status::record(name, &self.scrub(message));
    }

    /// Logs one line, prefixed `pg_keeper: `, with any password removed.
    fn log(&self, level: Level, message: &str, hint: Option<&str>) {
        let message = self.scrub(message);
        let mut report = ErrorReport::new(
            PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
            format!("pg_keeper: {message}"),
            "pg_keeper",
        );
        if let Some(h) = hint {
            report = report.set_hint(self.scrub(h));
        }
        report.report(level_to_pg(level));
    }

    /// (Re)makes the witness connection from the settings, and says so in the status.
    fn connect_witness(&mut self) {
        // SAFETY: set at start-up from pg_control, before any worker starts.
        let system_identifier = unsafe { pg_sys::GetSystemIdentifier() };
        self.witness = self
            .settings
            .witness
            .as_deref()
            .map(|w| Witness::new(w, system_identifier));
        self.lease = None;
        self.witness_down_since = None;
        self.witness_warned_at = None;
        let shown = if self.witness.is_some() {
            "not contacted yet"
        } else {
            ""
        };
        status::publish(|s| s.witness.set(shown));
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
                // A planned restart of the peer keeps the usual timing.
                Connection::ClosedByShutdown => self.log(
                    Level::Log,
                    "the peer is shutting down; heartbeating it at the usual interval",
                    None,
                ),
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
        } else if let Some(soon) = self.recheck_after {
            self.settings.keepalive_time.min(soon)
        } else {
            self.settings.keepalive_time
        }
    }

    fn log_setting_warnings(&self) {
        for w in &self.settings.warnings {
            self.log(Level::Warning, w, None);
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
            self.identity = None;
            self.peer = None;
            self.keeper = Keeper::new();
            status::publish(|s| s.memory = None);
            self.last_tick = None;
            self.set_title();
        }
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
        Some(self.started + Duration::from_millis(ms))
    }

    /// How long one call (heartbeat, lease statement) may wait: an interval, and no later than
    /// the serving deadline, which the core must see passed when it comes.
    fn call_deadline(&self) -> Instant {
        let interval = Instant::now() + self.settings.keepalive_time;
        self.serve_deadline().map_or(interval, |d| d.min(interval))
    }

    fn tick(&mut self) {
        let tick_started_ms = self.started.elapsed().as_millis() as u64;
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
        let mode = self.keeper.mode();
        let sync_configured = !db::setting(c"synchronous_standby_names").trim().is_empty();
        let view = if mode.is_master() && !in_recovery {
            self.read_replication_view(sync_configured)
        } else {
            ReplicationSummary::default()
        };
        if view.streaming {
            if let Err(why) = db::pulse() {
                self.note_once(
                    Level::Warning,
                    format!("could not write the keeper's WAL pulse: {why}"),
                    Some("Without it, an idle pair's replication evidence can look stale."),
                );
            }
        }
        let asker = if in_recovery {
            own_application_name()
        } else {
            String::new()
        };
        let beat = if mode.heartbeats() {
            let deadline = self.call_deadline();
            let Some(peer) = self.peer.as_mut() else {
                return;
            };
            peer.set_asker(&asker);
            let mut beat = peer.beat(deadline);
            if beat == Beat::Interrupted {
                return;
            }
            if matches!(&beat, Beat::Answered(f) if identity::is_me(f)) {
                // The peer's conninfo now reaches this very server (a moved address, say): that
                // is no answer from the peer.
                beat =
                    Beat::NoAnswer("the heartbeat reached this server itself, not the peer".into());
            }
            self.publish_beat(&beat);
            Some(beat)
        } else {
            None
        };
        let facts = match &beat {
            Some(Beat::Answered(f)) => Some(f),
            _ => None,
        };
        let my_timeline = actuators::timeline();
        let wal_receiver_recent = in_recovery && self.wal_receiver_recent();
        let unlisted = facts.is_some_and(|f| {
            in_recovery && !f.in_recovery && wal_receiver_recent && f.sync_state_of_asker.is_none()
        });
        // A link reset ends the primary's WAL sender before this standby's receiver notices:
        // only an absence that lasts a few answers is a configuration problem.
        self.unlisted_answers = if unlisted {
            self.unlisted_answers + 1
        } else {
            0
        };
        if self.unlisted_answers >= UNLISTED_BEFORE_WARNING {
            self.note_once(
                Level::Warning,
                format!(
                    "the primary does not show this standby (application_name '{asker}') in pg_stat_replication to the heartbeat's user, so this standby cannot know it is synchronous and will not promote"
                ),
                Some("Use a superuser or a member of pg_monitor in the node conninfos, and set application_name in primary_conninfo."),
            );
        }
        let sync_standby_now =
            self.keeper
                .lease_names_standby(view.sync_in_force, view.insert_lsn, view.peer);
        self.publish_trust(self.keeper.trusts_standby());
        let lease = self.observe_lease(mode, in_recovery, my_timeline, sync_standby_now);
        let obs = Observation {
            now_ms: self.started.elapsed().as_millis() as u64,
            tick_started_ms,
            in_recovery,
            sync_configured,
            standby_streaming: view.streaming,
            heartbeat: beat.as_ref().and_then(Beat::for_core),
            restore_wanted: self.settings.sync_restore && Settings::saved_sync_names().is_some(),
            standby_replies_recent: view.peer_replies_recent,
            standby_caught_up: view.caught_up,
            wal_receiver_recent,
            lease,
            ..Observation::default()
        };
        let answer = facts.map(|f| keeper_core::PeerAnswer {
            in_recovery: f.in_recovery,
            timeline: f.timeline,
            sync_state_of_asker: f.sync_state_of_asker.clone(),
            uses_witness: f.uses_witness,
            trusted_standby: f.trusted_standby.clone(),
        });
        let me = self.names().map_or("", |(me, _)| me);
        self.decide(Input::Tick(obs.with_answer(
            answer.as_ref(),
            my_timeline,
            me,
        )));
    }

    /// Says in this worker's `pg_stat_activity` row whom it trusts as the synchronous standby
    /// (the peer, or nobody), for the standby's heartbeat: a standby listed `sync` but not yet
    /// holding what was acknowledged without it does not count itself synchronous.
    fn publish_trust(&mut self, trusted: bool) {
        let name = match self.names() {
            Some((_, peer)) if trusted => peer,
            _ => "",
        };
        let activity = format!("{}{name}", crate::heartbeat::TRUST_PREFIX);
        if activity == self.activity {
            return;
        }
        if let Ok(text) = CString::new(activity.as_str()) {
            // SAFETY: copies the string into this backend's status entry.
            unsafe {
                pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, text.as_ptr())
            };
            self.activity = activity;
        }
    }

    /// This node's name and the peer's, once identified.
    fn names(&self) -> Option<(&'static str, &'static str)> {
        self.identity.as_ref().map(|id| (id.me_name, id.peer_name))
    }

    /// The primary renews the lease (recording its synchronous standby when it has one); a
    /// standby reads it. Nothing in the other modes, or without a witness.
    fn observe_lease(
        &mut self,
        mode: Mode,
        in_recovery: bool,
        timeline: u32,
        synchronous_peer: bool,
    ) -> Lease {
        let Some((me, peer)) = self.names() else {
            return Lease::NotConfigured;
        };
        let primary = mode.is_master() && !in_recovery;
        let standby = matches!(mode, Mode::StandbyWaiting | Mode::StandbyConnected);
        let lease_time = self.settings.lease_time();
        let deadline = self.call_deadline();
        let Some(witness) = self.witness.as_mut() else {
            return Lease::NotConfigured;
        };
        let result = if primary {
            let sync = synchronous_peer.then_some(peer);
            witness.claim(me, timeline, sync, lease_time, deadline)
        } else if standby {
            witness.read(lease_time, deadline)
        } else {
            return Lease::NotConfigured;
        };
        self.witness_result(&result);
        match result {
            Err(why) => Lease::Unreachable(self.scrub(&why)),
            Ok(None) => Lease::Missing,
            Ok(Some(row)) => {
                let lease = row.view(me, timeline, primary);
                let was_mine = self
                    .lease
                    .as_ref()
                    .is_some_and(|l| l.holder == me && l.epoch == row.epoch);
                if primary && row.mine && !was_mine {
                    self.event(
                        "lease_acquired",
                        Level::Log,
                        &format!(
                            "this primary holds the lease on the witness: {}",
                            row.describe()
                        ),
                        None,
                    );
                }
                if let (false, Lease::Peer { expired: false, .. }) = (primary, &lease) {
                    // A promotion held by the lease is looked at again as soon as it expires.
                    let left = Duration::from_millis(row.ms_left.max(0) as u64);
                    self.recheck_after = Some(left + Duration::from_millis(20));
                }
                self.lease = Some(row);
                lease
            }
        }
    }

    /// Follows whether the witness can be used: a warning when it cannot (repeated every
    /// minute), a line when it can again, and the lease or the reason in the status.
    fn witness_result(&mut self, result: &Result<Option<LeaseRow>, String>) {
        let now = Instant::now();
        match result {
            Ok(row) => {
                if let Some(since) = self.witness_down_since.take() {
                    self.witness_warned_at = None;
                    self.event(
                        "witness_reachable",
                        Level::Log,
                        &format!(
                            "the witness is usable again after {} s",
                            since.elapsed().as_secs()
                        ),
                        None,
                    );
                }
                let shown = row
                    .as_ref()
                    .map_or("no lease yet".to_string(), LeaseRow::describe);
                status::publish(|s| s.witness.set(&shown));
            }
            Err(why) => {
                let since = *self.witness_down_since.get_or_insert(now);
                let why = self.scrub(why);
                let due = self
                    .witness_warned_at
                    .is_none_or(|t| now.duration_since(t) >= WITNESS_WARNING_EVERY);
                if due {
                    self.witness_warned_at = Some(now);
                    let hint = if self.keeper.mode().is_master() {
                        "Until it is back, this primary cannot switch to asynchronous replication: if the standby is lost, commits wait for it, and after three keepalive_times without either this primary stops serving."
                    } else {
                        "Until it is back, this standby cannot take the lease: it does not promote if the primary is lost."
                    };
                    let message = if self.witness_warned_at == Some(since) {
                        format!("cannot use the witness: {why}")
                    } else {
                        format!(
                            "still cannot use the witness after {} s: {why}",
                            since.elapsed().as_secs()
                        )
                    };
                    self.event("witness_unreachable", Level::Warning, &message, Some(hint));
                }
                let shown = format!("unusable for {} s: {why}", since.elapsed().as_secs());
                status::publish(|s| s.witness.set(&shown));
            }
        }
    }

    /// What a change of the lease needs: this node's name, the lease time, this server's
    /// timeline and a deadline.
    fn lease_change(&self) -> Result<(&'static str, Duration, u32, Instant), String> {
        let (me, _) = self.names().ok_or("this node is not identified")?;
        Ok((
            me,
            self.settings.lease_time(),
            actuators::timeline(),
            Instant::now() + self.settings.keepalive_time,
        ))
    }

    /// Records on the witness that this primary has no synchronous standby.
    fn release_standby(&mut self) -> Result<(), String> {
        let (me, lease_time, timeline, deadline) = self.lease_change()?;
        let Some(witness) = self.witness.as_mut() else {
            return Ok(());
        };
        let result = witness.claim(me, timeline, None, lease_time, deadline);
        self.witness_result(&result);
        match result? {
            Some(row) if row.mine => {
                self.event(
                    "lease_released_standby",
                    Level::Log,
                    &format!(
                        "recorded on the witness that no standby is synchronous: {}",
                        row.describe()
                    ),
                    None,
                );
                Ok(())
            }
            Some(row) => Err(format!(
                "this primary does not hold the lease: {}",
                row.describe()
            )),
            None => Err("the witness holds no lease".into()),
        }
    }

    /// Takes the lease on the witness for this standby before it promotes.
    fn take_lease(&mut self) -> Result<(), String> {
        let (me, lease_time, timeline, deadline) = self.lease_change()?;
        let Some(witness) = self.witness.as_mut() else {
            return Ok(());
        };
        let row = witness.take(me, timeline, lease_time, deadline)?;
        self.event(
            "lease_taken",
            Level::Log,
            &format!("took the lease on the witness: {}", row.describe()),
            None,
        );
        status::publish(|s| s.witness.set(&row.describe()));
        self.lease = Some(row);
        Ok(())
    }

    fn identify(&mut self, in_recovery: bool) {
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
                    s.problem.set("");
                });
                self.identity = Some(id);
                self.peer = Some(peer);
                self.identity_hint = None;
                match status::memory().filter(|m| m.mode != Mode::Unidentified) {
                    // A restarted worker (not server) goes on where the last one stopped.
                    Some(m) => {
                        self.keeper = Keeper::resume(&m);
                        let pending = m.pending.iter().flatten().count();
                        self.event(
                            "resumed_after_restart",
                            Level::Log,
                            &format!(
                                "the keeper worker was restarted; going on in {} with {pending} action(s) of the last decision still to perform",
                                m.mode
                            ),
                            None,
                        );
                        self.set_title();
                        self.perform();
                    }
                    None => self.decide(Input::Identified { in_recovery }),
                }
            }
            identity::Outcome::Problem { message, hint } => {
                let shown = self.scrub(&message);
                status::publish(|s| s.problem.set(&shown));
                self.identity_hint = Some(hint);
                self.decide(Input::IdentityProblem(message));
            }
            identity::Outcome::Interrupted => {}
        }
    }

    /// `keepalive_time x keepalive_count`, in milliseconds: how recent replication evidence
    /// must be to count.
    fn failure_window_ms(&self) -> i64 {
        self.settings.keepalive_time.as_millis() as i64 * self.settings.keepalive_count as i64
    }

    /// Whether this standby's WAL receiver heard from the primary within the failure window.
    fn wal_receiver_recent(&mut self) -> bool {
        match db::wal_receiver_recent(self.failure_window_ms()) {
            Ok(recent) => recent,
            Err(why) => {
                self.note_once(
                    Level::Warning,
                    format!("could not read pg_stat_wal_receiver: {why}"),
                    None,
                );
                false
            }
        }
    }

    /// Reads `pg_stat_replication` and says what matters to the core; unusual set-ups (a second
    /// standby, a standby that synchronous_standby_names does not name) are warned about once
    /// per change.
    fn read_replication_view(&mut self, sync_configured: bool) -> ReplicationSummary {
        // The order matters (see keeper_core::SyncTrust): in force, then insert position, then
        // the standbys' flush positions.
        let sync_in_force = db::sync_in_force(sync_configured);
        let insert_lsn = db::insert_lsn();
        let standbys = match db::streaming_standbys() {
            Ok(s) => s,
            Err(why) => {
                self.note_once(
                    Level::Warning,
                    format!("could not read pg_stat_replication: {why}"),
                    None,
                );
                return ReplicationSummary::default();
            }
        };
        let names = || {
            standbys
                .iter()
                .map(|s| format!("'{}' ({})", s.application_name, s.sync_state))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let synchronous = standbys.iter().any(|s| s.is_synchronous());
        if standbys.len() > 1 {
            let peer = self
                .identity
                .as_ref()
                .map(|i| i.peer_display())
                .unwrap_or_default();
            self.note_once(
                Level::Warning,
                format!(
                    "{} standbys are streaming: {}; pg_keeper protects one pair and heartbeats {peer} only",
                    standbys.len(),
                    names()
                ),
                Some("Losing the peer switches replication to asynchronous even if another standby streams."),
            );
        } else if sync_configured && !standbys.is_empty() && !synchronous {
            self.note_once(
                Level::Warning,
                format!(
                    "standby {} is streaming but is not synchronous; synchronous_standby_names is '{}'",
                    names(),
                    db::setting(c"synchronous_standby_names")
                ),
                Some("Set application_name in the standby's primary_conninfo to a name listed in synchronous_standby_names."),
            );
        } else if self.last_note.take().is_some() {
            status::publish(|s| s.problem.set(""));
        }
        let peer_name = self.identity.as_ref().map(|i| i.peer_name);
        // The peer streams under its node name (README: application_name in primary_conninfo);
        // a single standby under another name is taken for it.
        let peer_row = standbys
            .iter()
            .find(|s| Some(s.application_name.as_str()) == peer_name)
            .or(if standbys.len() == 1 {
                standbys.first()
            } else {
                None
            });
        let window = self.failure_window_ms();
        ReplicationSummary {
            peer_replies_recent: peer_row
                .and_then(|s| s.reply_age_ms)
                .is_some_and(|age| age <= window),
            sync_in_force,
            insert_lsn,
            peer: peer_row.and_then(|s| {
                s.flush_lsn.map(|flush_lsn| keeper_core::StandbySeen {
                    synchronous: sync_configured && s.is_synchronous(),
                    flush_lsn,
                })
            }),
            streaming: standbys
                .iter()
                .any(|s| !sync_configured || s.is_synchronous()),
            caught_up: standbys.iter().any(|s| {
                s.lag_bytes
                    .is_some_and(|lag| lag <= self.settings.sync_restore_lag_bytes)
            }),
        }
    }

    /// Logs a condition that can repeat every tick once, until it changes.
    fn note_once(&mut self, level: Level, message: String, hint: Option<&str>) {
        if self.last_note.as_ref() != Some(&message) {
            self.event("replication_problem", level, &message, hint);
            let shown = self.scrub(&message);
            status::publish(|s| s.problem.set(&shown));
            self.last_note = Some(message);
        }
    }

    fn report(&self, d: &Decision) {
        let hint = if d.event == keeper_core::Event::IdentityProblem {
            self.identity_hint.as_deref()
        } else {
            None
        };
        // A held promotion is shown in the status until the primary answers again.
        match d.history_name() {
            "promotion_held" => {
                let why = self.scrub(&d.sentence);
                status::publish(|s| s.problem.set(&why));
            }
            "heartbeat_ok" | "primary_seen" if d.from != Mode::MasterConnected => {
                status::publish(|s| s.problem.set(""))
            }
            _ => {}
        }
        if d.level == Level::Debug {
            self.log(d.level, &d.sentence, hint);
        } else {
            self.event(d.history_name(), d.level, &d.sentence, hint);
        }
    }

    /// Keeps the last answer and the last failure (with its reason) for the status.
    fn publish_beat(&self, beat: &Beat) {
        let now = status::now();
        match beat {
            Beat::Answered(_) => status::publish(|s| s.last_answer = now),
            Beat::Refused(why) => {
                let why = self.scrub(&format!("answered but refused: {why}"));
                status::publish(|s| {
                    s.last_answer = now;
                    s.problem.set(&why);
                })
            }
            Beat::NoAnswer(why) => {
                let why = self.scrub(why);
                status::publish(|s| {
                    s.last_failure = now;
                    s.last_failure_reason.set(&why);
                })
            }
            Beat::Interrupted => {}
        }
    }

    fn decide(&mut self, input: Input) {
        let d = self.keeper.step(&input, &self.core_settings());
        // A primary that has just crashed may still look streaming to this standby's WAL
        // receiver for a few milliseconds: the first time that holds a promotion, look again
        // soon rather than a whole interval later.
        let holding = keeper_core::Event::PeerLostButStreaming;
        if d.event == holding && self.last_event != Some(holding) {
            self.recheck_after = Some(QUICK_RECHECK);
        }
        self.last_event = Some(d.event);
        self.report(&d);
        self.set_title();
        self.perform();
    }

    /// Performs the core's actions in order, keeping the core's memory in shared memory before
    /// each one, so that a restarted worker redoes the one under way and goes on with the rest.
    /// A failed action is told to the core, whose answer says whether to go on with the rest.
    fn perform(&mut self) {
        loop {
            let memory = self.keeper.memory();
            status::publish(|s| s.memory = Some(memory));
            let Some(action) = self.keeper.next_action() else {
                return;
            };
            let result = match action {
                Action::DegradeToAsync => self.degrade_to_async(),
                Action::Promote => actuators::promote().map(|()| {
                    self.event(
                        "promote_requested",
                        Level::Log,
                        "promotion requested; waiting for recovery to end",
                        None,
                    )
                }),
                Action::RestoreSync => actuators::restore_sync().map(|names| {
                    self.event(
                        "sync_restored",
                        Level::Log,
                        &format!("restored synchronous replication: synchronous_standby_names is '{names}' again"),
                        None,
                    )
                }),
                Action::Fence => self.fence(),
                Action::ReleaseStandby => self.release_standby(),
                Action::TakeLease => self.take_lease(),
                Action::EndWaitingCommits => db::end_waiting_commits().map(|n| {
                    if n > 0 {
                        self.event(
                            "waiting_commits_ended",
                            Level::Warning,
                            &format!("ended {n} session(s) waiting for synchronous replication: neither the standby nor the witness can be reached, so their commits are not reported as done"),
                            Some("Their transactions committed locally but may be lost in a failover; a client must treat a COMMIT without an answer, or one answered with the WARNING \"might not have been replicated to the standby\", as of unknown outcome."),
                        );
                    }
                }),
                Action::StopServing => serving::stop().map(|n| {
                    if n > 0 {
                        self.event(
                            "sessions_ended",
                            Level::Warning,
                            &format!("ended {n} session(s): this primary is isolated and serves no session until it reaches the standby or the witness"),
                            Some("A COMMIT that got no answer is of unknown outcome; a client should reconnect to whichever node is primary."),
                        );
                    }
                }),
                Action::ResumeServing => {
                    serving::resume();
                    Ok(())
                }
                Action::RunAfterCommand(event) => self.run_after_command(event),
            };
            match result {
                Ok(()) => self.keeper.action_done(action),
                Err(why) => {
                    let d = self
                        .keeper
                        .step(&Input::ActionFailed(action, why), &self.core_settings());
                    self.report(&d);
                    self.set_title();
                }
            }
        }
    }

    /// Shuts this superseded server down so that it starts again only as a standby, and says how
    /// to rejoin it.
    fn fence(&self) -> Result<(), String> {
        let (me, peer) = match &self.identity {
            Some(id) => (id.me_name, Conninfo::parse(&id.peer_conninfo)?.redacted()),
            None => return Err("this node is not identified".into()),
        };
        actuators::fence()?;
        self.event(
            "fenced",
            Level::Warning,
            "this server was superseded and is shutting down; it will start again only as a standby",
            Some(&format!(
                "To rejoin it as a standby of the new primary, run: bin/rejoin --datadir {} --primary '{peer}' --name {me}",
                actuators::data_directory()
            )),
        );
        Ok(())
    }

    fn degrade_to_async(&self) -> Result<(), String> {
        match actuators::degrade_to_async()? {
            Degraded::Switched { previous } => self.event(
                "degraded_to_async",
                Level::Log,
                &format!(
                    "changed replication mode to asynchronous: synchronous_standby_names was '{previous}' and is now '' \
                     (the old value is kept in pg_keeper.saved_synchronous_standby_names)"
                ),
                None,
            ),
            Degraded::AlreadyAsync => {
                self.log(Level::Log, "synchronous_standby_names is already empty; replication is asynchronous", None)
            }
        }
        Ok(())
    }

    fn run_after_command(&mut self, event: AfterEvent) -> Result<(), String> {
        let Some(command) = self.settings.after_command.clone() else {
            return Ok(());
        };
        let Some(id) = self.identity.clone() else {
            return Err("this node is not identified".into());
        };
        let me = Conninfo::parse(&id.me_conninfo)?;
        let peer = Conninfo::parse(&id.peer_conninfo)?;
        // Where the heartbeats really go, when connected; else what the conninfo says.
        let (peer_host, peer_port) = self
            .peer
            .as_ref()
            .and_then(|p| p.live_address())
            .unwrap_or_else(|| (peer.host(), peer.port()));
        let ctx = Context {
            event: event.as_str(),
            node_name: id.me_name.to_string(),
            node_conninfo: me.redacted(),
            node_host: me.host(),
            node_port: me.port(),
            peer_name: id.peer_name.to_string(),
            peer_conninfo: peer.redacted(),
            peer_host,
            peer_port,
            timeline: actuators::timeline(),
        };
        let pid = self
            .after
            .start(&command, &ctx, self.settings.after_command_timeout)?;
        self.event(
            "after_command",
            Level::Log,
            &format!(
                "running after_command for event {} (pid {pid})",
                event.as_str()
            ),
            None,
        );
        Ok(())
    }

    fn reap_after_commands(&mut self) {
        for f in self.after.poll() {
            let level = if f.success {
                Level::Log
            } else {
                Level::Warning
            };
            self.event(
                "after_command",
                level,
                &format!(
                    "after_command for event {} (pid {}) {}",
                    f.event, f.pid, f.outcome
                ),
                None,
            );
        }
    }

    /// Shows the keeper's state: the process title and the status, from the one value the core
    /// holds.
    fn set_title(&self) {
        let state = self.keeper.title();
        if let Ok(title) = CString::new(format!("({state})")) {
            // SAFETY: set_ps_display copies the string.
            unsafe { pg_sys::set_ps_display(title.as_ptr()) };
        }
        let (failures, count, time_ms) = (
            self.keeper.failures() as i32,
            self.settings.keepalive_count as i32,
            self.settings.keepalive_time.as_millis() as i64,
        );
        status::publish(|s| {
            // SAFETY: MyProcPid is this process's pid.
            s.worker_pid = unsafe { pg_sys::MyProcPid };
            s.state.set(&state);
            s.failures = failures;
            s.keepalive_count = count;
            s.keepalive_time_ms = time_ms;
        });
    }
}

/// The application_name under which this server streams as a standby (from primary_conninfo,
/// else cluster_name, as the WAL receiver does), to find itself in the primary's
/// pg_stat_replication.
fn own_application_name() -> String {
    let from_conninfo = Conninfo::parse(&db::setting(c"primary_conninfo"))
        .ok()
        .and_then(|c| c.get("application_name").map(str::to_string))
        .filter(|n| !n.is_empty());
    from_conninfo
        .or_else(|| Some(db::setting(c"cluster_name")).filter(|n| !n.is_empty()))
        .unwrap_or_else(|| "walreceiver".to_string())
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
