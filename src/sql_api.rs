//! The SQL surface (`CREATE EXTENSION pg_keeper_rs`): the status, the event history, and the
//! maintenance pause. Everything reads or writes shared memory only, so it works on a hot standby
//! too; the view, the grants and the comments are in `sql/pg_keeper_rs.sql`.

use std::time::Duration;

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;

use crate::actuators;
use crate::db;
use crate::status::{self, opt};

fn timestamp(ts: i64) -> Option<TimestampWithTimeZone> {
    (ts != 0)
        .then(|| TimestampWithTimeZone::try_from(ts).ok())
        .flatten()
}

/// One row: what the keeper of this server is doing, as the process title shows it, and why.
// pgrx reads the column names from the tuple written out here, so it cannot be a type alias.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe)]
fn pg_keeper_status() -> TableIterator<
    'static,
    (
        name!(node_name, Option<String>),
        name!(role, String),
        name!(state, Option<String>),
        name!(paused, bool),
        name!(paused_until, Option<TimestampWithTimeZone>),
        name!(peer_name, Option<String>),
        name!(peer_host, Option<String>),
        name!(peer_port, Option<i32>),
        name!(failed_heartbeats, i32),
        name!(keepalive_count, i32),
        name!(keepalive_time_ms, i64),
        name!(last_heartbeat_ok, Option<TimestampWithTimeZone>),
        name!(last_failure, Option<TimestampWithTimeZone>),
        name!(last_failure_reason, Option<String>),
        name!(synchronous, bool),
        name!(synchronous_standby_names, String),
        name!(timeline, i64),
        name!(witness, String),
        name!(problem, Option<String>),
        name!(last_event, Option<String>),
        name!(last_event_time, Option<TimestampWithTimeZone>),
        name!(last_event_detail, Option<String>),
        name!(worker_pid, Option<i32>),
    ),
> {
    status::require();
    let s = status::snapshot();
    let last = s.last_event();
    let sync_names = db::setting(c"synchronous_standby_names");
    let row = (
        opt(&s.node_name),
        if actuators::in_recovery() {
            "standby"
        } else {
            "primary"
        }
        .to_string(),
        opt(&s.state),
        s.paused,
        if s.paused {
            timestamp(s.pause_until)
        } else {
            None
        },
        opt(&s.peer_name),
        opt(&s.peer_host),
        (s.peer_port != 0).then_some(s.peer_port),
        s.failures,
        s.keepalive_count,
        s.keepalive_time_ms,
        timestamp(s.last_answer),
        timestamp(s.last_failure),
        opt(&s.last_failure_reason),
        !sync_names.trim().is_empty(),
        sync_names,
        actuators::timeline() as i64,
        opt(&s.witness).unwrap_or_else(|| "not configured".to_string()),
        opt(&s.problem),
        last.map(|e| e.name.get().to_string()),
        last.and_then(|e| timestamp(e.at)),
        last.map(|e| e.detail.get().to_string()),
        (s.worker_pid != 0).then_some(s.worker_pid),
    );
    TableIterator::once(row)
}

/// The keeper's recent events on this server, oldest first (the last 128, kept across worker
/// restarts).
#[pg_extern(volatile, parallel_safe)]
fn pg_keeper_events() -> TableIterator<
    'static,
    (
        name!(at, Option<TimestampWithTimeZone>),
        name!(event, String),
        name!(detail, String),
    ),
> {
    status::require();
    let rows: Vec<_> = status::snapshot()
        .history()
        .into_iter()
        .map(|e| {
            (
                timestamp(e.at),
                e.name.get().to_string(),
                e.detail.get().to_string(),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Wakes the worker so that it sees a pause or resume at once: by its latch, and only if the
/// pid recorded is still a server process (a signal to a pid the system has since given to
/// another program could kill it).
fn wake_worker() {
    let pid = status::snapshot().worker_pid;
    if pid > 0 {
        // SAFETY: BackendPidGetProc returns a live PGPROC or NULL; SetLatch may be called on
        // any process's latch.
        unsafe {
            let proc_ = pg_sys::BackendPidGetProc(pid);
            if !proc_.is_null() {
                pg_sys::SetLatch(&raw mut (*proc_).procLatch);
            }
        }
    }
}

/// Pauses the keeper of this server: it heartbeats and reports but takes no action (no
/// promotion, no switch to or from asynchronous replication). With a duration, the pause ends by
/// itself. Returns true.
#[pg_extern(volatile)]
fn pg_keeper_pause(duration: default!(Option<Interval>, "NULL")) -> bool {
    status::require();
    let until = match duration {
        None => 0,
        Some(iv) => {
            let d = Duration::try_from(iv).unwrap_or_else(|_| {
                error!("pg_keeper_pause: the duration must be positive and without months")
            });
            if d.is_zero() {
                error!("pg_keeper_pause: the duration must be positive");
            }
            status::now() + d.as_micros() as i64
        }
    };
    status::publish(|s| {
        s.paused = true;
        s.pause_until = until;
    });
    wake_worker();
    true
}

/// Ends a pause. Returns whether the keeper was paused.
#[pg_extern(volatile)]
fn pg_keeper_resume() -> bool {
    status::require();
    let mut was = false;
    status::publish(|s| {
        was = s.paused;
        s.paused = false;
        s.pause_until = 0;
    });
    wake_worker();
    was
}

extension_sql_file!(
    "../sql/pg_keeper_rs.sql",
    name = "views_and_grants",
    requires = [
        pg_keeper_status,
        pg_keeper_events,
        pg_keeper_pause,
        pg_keeper_resume
    ],
    finalize
);
