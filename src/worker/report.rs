//! What the worker tells: the log (every line scrubbed of passwords), the event history, the
//! process title and the status.

use std::ffi::CString;

use keeper_core::{Decision, Level, Mode};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use super::Worker;
use crate::conninfo;
use crate::heartbeat::Beat;
use crate::status;

fn level_to_pg(level: Level) -> PgLogLevel {
    match level {
        Level::Debug => PgLogLevel::DEBUG1,
        Level::Log => PgLogLevel::LOG,
        Level::Warning => PgLogLevel::WARNING,
    }
}

/// The problem each source has in force, for the status `problem`. The sources set and clear
/// their own slot; [`Worker::publish_problem`] alone writes the status, once per decision, the
/// first slot set in this order:
///
/// 1. `identity`: which node this server is cannot be told (nothing else runs until it can);
/// 2. `promotion_held`: why this standby does not promote though the primary is lost;
/// 3. `replication`: a replication set-up problem seen this tick;
/// 4. `refused`: the peer is alive but refused the heartbeat.
#[derive(Default)]
pub(super) struct Problems {
    /// Set while identification fails; cleared (with every other slot) once it succeeds.
    pub(super) identity: Option<String>,
    /// The decision that held a promotion; cleared when the primary answers again or the
    /// keeper is no longer a standby.
    pub(super) promotion_held: Option<String>,
    /// The last note raised this tick (see [`Worker::note_once`]): the primary's
    /// pg_stat_replication, its WAL pulse, this standby's WAL receiver, or this standby missing
    /// from the primary's view. Emptied at the start of every observation.
    pub(super) replication: Option<String>,
    /// The last heartbeat's refusal; cleared by the next answer.
    pub(super) refused: Option<String>,
}

impl Problems {
    /// The one problem shown (empty: none).
    fn shown(&self) -> &str {
        [
            &self.identity,
            &self.promotion_held,
            &self.replication,
            &self.refused,
        ]
        .into_iter()
        .find_map(|p| p.as_deref())
        .unwrap_or("")
    }
}

impl Worker {
    /// Removes any password of the node conninfos from a text.
    pub(super) fn scrub(&self, text: &str) -> String {
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
    pub(super) fn event(&self, name: &str, level: Level, message: &str, hint: Option<&str>) {
        self.log(level, message, hint);
        status::record(name, &self.scrub(message));
    }

    /// Logs one line, prefixed `pg_keeper: `, with any password removed.
    pub(super) fn log(&self, level: Level, message: &str, hint: Option<&str>) {
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

    pub(super) fn log_setting_warnings(&self) {
        for w in &self.settings.warnings {
            self.log(Level::Warning, w, None);
        }
    }

    /// Says in this worker's `pg_stat_activity` row whom it trusts as the synchronous standby
    /// (the peer, or nobody), for the standby's heartbeat: a standby listed `sync` but not yet
    /// holding what was acknowledged without it does not count itself synchronous.
    pub(super) fn publish_trust(&mut self, trusted: bool) {
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

    /// Logs a condition that can repeat every tick once, until it changes.
    /// It is the replication problem in force this tick either way.
    pub(super) fn note_once(&mut self, level: Level, message: String, hint: Option<&str>) {
        self.problems.replication = Some(self.scrub(&message));
        if self.last_note.as_ref() != Some(&message) {
            self.event("replication_problem", level, &message, hint);
            self.last_note = Some(message);
        }
    }

    /// Shows the problem in force (see [`Problems`]) in the status.
    pub(super) fn publish_problem(&self) {
        let shown = self.problems.shown();
        status::publish(|s| s.problem.set(shown));
    }

    /// Tells a decision: its log line (and history entry), then the state it left in the title
    /// and the status.
    pub(super) fn report(&mut self, d: &Decision) {
        let hint = if d.event == keeper_core::Event::IdentityProblem {
            self.identity_hint.as_deref()
        } else {
            None
        };
        // A held promotion is shown in the status until the primary answers again, or until
        // the keeper is no longer a standby (it promoted).
        match d.history_name() {
            "promotion_held" => self.problems.promotion_held = Some(self.scrub(&d.sentence)),
            "heartbeat_ok" | "primary_seen" if d.from != Mode::MasterConnected => {
                self.problems.promotion_held = None
            }
            _ if !matches!(d.to, Mode::StandbyWaiting | Mode::StandbyConnected) => {
                self.problems.promotion_held = None
            }
            _ => {}
        }
        if d.level == Level::Debug {
            self.log(d.level, &d.sentence, hint);
        } else {
            self.event(d.history_name(), d.level, &d.sentence, hint);
        }
        self.publish_problem();
        self.set_title();
    }

    /// Keeps the last answer and the last failure (with its reason) for the status.
    pub(super) fn publish_beat(&mut self, beat: &Beat) {
        let now = status::now();
        // Made (answered, refused or not answered), and not answered.
        let (made, failed) = (
            !matches!(beat, Beat::Interrupted),
            matches!(beat, Beat::NoAnswer(_) | Beat::Late(_)),
        );
        let sync_state = match beat {
            Beat::Answered(f) => f.sync_state_of_asker.clone(),
            _ => None,
        };
        status::publish_http(|h| {
            h.beats += made as u64;
            h.heartbeat_failures_total += failed as u64;
            if let Some(state) = sync_state {
                h.sync_state.set(&state);
            } else if made && !failed {
                h.sync_state.set("");
            }
        });
        match beat {
            Beat::Answered(_) => {
                self.problems.refused = None;
                status::publish(|s| s.last_answer = now)
            }
            Beat::Refused(why) => {
                self.problems.refused = Some(self.scrub(&format!("answered but refused: {why}")));
                status::publish(|s| s.last_answer = now)
            }
            Beat::NoAnswer(why) | Beat::Late(why) => {
                let why = self.scrub(why);
                status::publish(|s| {
                    s.last_failure = now;
                    s.last_failure_reason.set(&why);
                })
            }
            Beat::Interrupted => {}
        }
    }

    /// Shows the keeper's state: the process title and the status, from the one value the core
    /// holds.
    pub(super) fn set_title(&self) {
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
        let (mode, trusts, now) = (
            self.keeper.mode(),
            self.keeper.trusts_standby(),
            status::now(),
        );
        status::publish(|s| {
            // SAFETY: MyProcPid is this process's pid.
            let pid = unsafe { pg_sys::MyProcPid };
            if s.worker_pid != pid {
                // A new worker has made no heartbeat yet.
                s.http.beats = 0;
                s.http.decided_after_beat = false;
            }
            s.http.decided_after_beat |= s.http.beats > 0;
            s.http.mode = Some(mode);
            s.http.trusts_standby = trusts;
            s.http.published_at = now;
            s.worker_pid = pid;
            s.state.set(&state);
            s.failures = failures;
            s.keepalive_count = count;
            s.keepalive_time_ms = time_ms;
        });
    }
}
