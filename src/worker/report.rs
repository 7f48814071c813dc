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
    pub(super) fn note_once(&mut self, level: Level, message: String, hint: Option<&str>) {
        if self.last_note.as_ref() != Some(&message) {
            self.event("replication_problem", level, &message, hint);
            let shown = self.scrub(&message);
            status::publish(|s| s.problem.set(&shown));
            self.last_note = Some(message);
        }
    }

    /// Tells a decision: its log line (and history entry), then the state it left in the title
    /// and the status.
    pub(super) fn report(&self, d: &Decision) {
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
        self.set_title();
    }

    /// Keeps the last answer and the last failure (with its reason) for the status.
    pub(super) fn publish_beat(&self, beat: &Beat) {
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
