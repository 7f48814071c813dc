//! The background worker: wait, observe, ask the decision core, act, report. One tick every
//! `keepalive_time` (every 100ms while a promotion is under way).

use std::ffi::CString;
use std::time::{Duration, Instant};

use keeper_core::{Action, AfterEvent, Decision, Input, Keeper, Level, Mode, Observation};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::actuators::{self, Degraded};
use crate::after_command::{AfterCommands, Context};
use crate::conninfo::{self, Conninfo};
use crate::db;
use crate::heartbeat::{shutdown_requested, Beat, Node};
use crate::identity::{self, Identity};
use crate::settings::Settings;

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
}

struct Worker {
    settings: Settings,
    keeper: Keeper,
    identity: Option<Identity>,
    peer: Option<Box<Node>>,
    after: AfterCommands,
    started: Instant,
    last_tick: Option<Instant>,
    /// The last replication-view error logged, so it is logged once per change.
    last_view_error: Option<String>,
    /// The hint that goes with the current identity problem.
    identity_hint: Option<String>,
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
            last_view_error: None,
            identity_hint: None,
        }
    }

    /// Logs one line, prefixed `pg_keeper: `, with any password removed.
    fn log(&self, level: Level, message: &str, hint: Option<&str>) {
        let secrets: Vec<&str> = [
            self.settings.node1.as_deref(),
            self.settings.node2.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect();
        let message = conninfo::scrub(message, &secrets);
        let mut report = ErrorReport::new(
            PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
            format!("pg_keeper: {message}"),
            "pg_keeper",
        );
        if let Some(h) = hint {
            report = report.set_hint(conninfo::scrub(h, &secrets));
        }
        report.report(level_to_pg(level));
    }

    fn run(&mut self) {
        self.log(
            Level::Log,
            &format!("started; {}", self.settings.summary()),
            None,
        );
        self.log_setting_warnings();
        self.set_title();
        while !shutdown_requested() {
            self.reload_if_requested();
            let now = Instant::now();
            let due = self.last_tick.map_or(now, |t| t + self.tick_interval());
            if now >= due {
                self.last_tick = Some(now);
                self.tick();
                continue;
            }
            self.reap_after_commands();
            let mut wait = due - now;
            if self.after.is_running() {
                wait = wait.min(FAST_POLL);
            }
            wait_latch(wait);
        }
    }

    fn tick_interval(&self) -> Duration {
        if self.keeper.mode() == Mode::Promoting {
            FAST_POLL
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
        self.settings = new;
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
            keepalive_count: self.settings.keepalive_count,
            promote_timeout_ms: 60_000,
            me_name: me,
            peer_name: peer,
        }
    }

    fn tick(&mut self) {
        let in_recovery = actuators::in_recovery();
        if self.identity.is_none() {
            self.identify(in_recovery);
            return;
        }
        let mode = self.keeper.mode();
        let standby_streaming =
            if matches!(mode, Mode::MasterWaiting | Mode::MasterAsync) && !in_recovery {
                self.read_replication_view()
            } else {
                false
            };
        let heartbeat = if mode.heartbeats() {
            let deadline = Instant::now() + self.settings.keepalive_time;
            let Some(peer) = self.peer.as_mut() else {
                return;
            };
            match peer.beat(deadline) {
                Beat::Interrupted => return,
                beat => beat.for_core(),
            }
        } else {
            None
        };
        let obs = Observation {
            now_ms: self.started.elapsed().as_millis() as u64,
            in_recovery,
            sync_configured: !db::setting(c"synchronous_standby_names").trim().is_empty(),
            standby_streaming,
            heartbeat,
        };
        self.decide(Input::Tick(obs));
    }

    fn identify(&mut self, in_recovery: bool) {
        match identity::identify(&self.settings, self.settings.keepalive_time) {
            identity::Outcome::Found(id, peer) => {
                self.identity = Some(id);
                self.peer = Some(peer);
                self.identity_hint = None;
                self.decide(Input::Identified { in_recovery });
            }
            identity::Outcome::Problem { message, hint } => {
                self.identity_hint = Some(hint);
                self.decide(Input::IdentityProblem(message));
            }
            identity::Outcome::Interrupted => {}
        }
    }

    fn read_replication_view(&mut self) -> bool {
        match db::standby_streaming() {
            Ok(streaming) => {
                self.last_view_error = None;
                streaming
            }
            Err(why) => {
                if self.last_view_error.as_ref() != Some(&why) {
                    self.log(
                        Level::Warning,
                        &format!("could not read pg_stat_replication: {why}"),
                        None,
                    );
                    self.last_view_error = Some(why);
                }
                false
            }
        }
    }

    fn report(&self, d: &Decision) {
        let hint = if d.event == keeper_core::Event::IdentityProblem {
            self.identity_hint.as_deref()
        } else {
            None
        };
        self.log(d.level, &d.sentence, hint);
    }

    fn decide(&mut self, input: Input) {
        let d = self.keeper.step(&input, &self.core_settings());
        self.report(&d);
        self.set_title();
        self.perform(&d.actions);
    }

    /// Performs the actions in order. A failed action is told to the core, whose answer says
    /// whether to go on with the rest.
    fn perform(&mut self, actions: &[Action]) {
        for &action in actions {
            let result = match action {
                Action::DegradeToAsync => self.degrade_to_async(),
                Action::Promote => actuators::promote().map(|()| {
                    self.log(
                        Level::Log,
                        "promotion requested; waiting for recovery to end",
                        None,
                    )
                }),
                Action::RunAfterCommand(event) => self.run_after_command(event),
            };
            if let Err(why) = result {
                let before = self.keeper.mode();
                let d = self
                    .keeper
                    .step(&Input::ActionFailed(action, why), &self.core_settings());
                self.report(&d);
                self.set_title();
                if d.to != before {
                    break;
                }
            }
        }
    }

    fn degrade_to_async(&self) -> Result<(), String> {
        match actuators::degrade_to_async()? {
            Degraded::Switched { previous } => self.log(
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
        let ctx = Context {
            event: event.as_str(),
            node_name: id.me_name.to_string(),
            node_conninfo: me.redacted(),
            node_host: me.host(),
            node_port: me.port(),
            peer_name: id.peer_name.to_string(),
            peer_conninfo: peer.redacted(),
            peer_host: peer.host(),
            peer_port: peer.port(),
            timeline: actuators::timeline(),
        };
        let pid = self
            .after
            .start(&command, &ctx, self.settings.after_command_timeout)?;
        self.log(
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
            self.log(
                level,
                &format!(
                    "after_command for event {} (pid {}) {}",
                    f.event, f.pid, f.outcome
                ),
                None,
            );
        }
    }

    fn set_title(&self) {
        if let Ok(title) = CString::new(format!("({})", self.keeper.title())) {
            // SAFETY: set_ps_display copies the string.
            unsafe { pg_sys::set_ps_display(title.as_ptr()) };
        }
    }
}

/// Sleeps on the latch for at most `timeout`; wakes early on a signal.
fn wait_latch(timeout: Duration) {
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as std::ffi::c_long;
    // SAFETY: MyLatch is this process's latch.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}
