//! The keeper's status and event history in shared memory: written by the worker (the state the
//! decision core decided, the same one the process title shows), read by the SQL functions on
//! either node. It outlives worker restarts (not server restarts). The pause flag lives here too,
//! set from SQL and read by the worker.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

/// How many events the history keeps (the oldest are overwritten).
pub const HISTORY: usize = 128;

/// A string of at most `N` bytes, stored inline (shared memory cannot hold pointers).
#[derive(Clone, Copy)]
pub struct Text<const N: usize> {
    len: u16,
    bytes: [u8; N],
}

impl<const N: usize> Default for Text<N> {
    fn default() -> Self {
        Text {
            len: 0,
            bytes: [0; N],
        }
    }
}

impl<const N: usize> Text<N> {
    pub fn set(&mut self, s: &str) {
        let mut end = s.len().min(N);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        self.len = end as u16;
    }

    pub fn get(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }

    fn opt(&self) -> Option<String> {
        (self.len > 0).then(|| self.get().to_string())
    }
}

#[derive(Clone, Copy, Default)]
pub struct EventRecord {
    /// TimestampTz (microseconds since 2000-01-01).
    pub at: i64,
    pub name: Text<32>,
    pub detail: Text<480>,
}

#[derive(Clone, Copy)]
pub struct Shared {
    pub worker_pid: i32,
    pub node_name: Text<16>,
    pub state: Text<64>,
    pub peer_name: Text<16>,
    pub peer_host: Text<128>,
    pub peer_port: i32,
    pub failures: i32,
    pub keepalive_count: i32,
    pub keepalive_time_ms: i64,
    pub last_answer: i64,
    pub last_failure: i64,
    pub last_failure_reason: Text<480>,
    /// The configuration or replication problem in force, if any.
    pub problem: Text<480>,
    /// The witness: the lease as last seen, or why it cannot be used; empty without one.
    pub witness: Text<480>,
    pub paused: bool,
    /// TimestampTz at which the pause ends by itself; 0 = until resumed.
    pub pause_until: i64,
    pub events: [EventRecord; HISTORY],
    /// Events recorded so far (the next slot is `total % HISTORY`).
    pub total: u64,
    /// What the decision core needs to go on after a restart of the worker (not of the server):
    /// written after every decision and every action.
    pub memory: Option<keeper_core::Memory>,
    /// Where the core's clock starts: when this server's first keeper worker started. A
    /// restarted worker's clock goes on from there, so the times in `memory` stay right.
    /// (`Instant` is CLOCK_MONOTONIC, the same in every process.)
    pub clock_origin: Option<std::time::Instant>,
    /// What the HTTP listener answers from (see `src/http`), published by the keeper.
    pub http: ForHttp,
}

/// The part of the status the HTTP endpoints and metrics need beyond the rest, kept by the
/// keeper. Times are TimestampTz (microseconds since 2000-01-01) on this server's clock.
#[derive(Clone, Copy, Default)]
pub struct ForHttp {
    /// The mode the decision core is in (None before this server's first keeper reported).
    pub mode: Option<keeper_core::Mode>,
    /// When the keeper last published its state (every decision does): the listener judges the
    /// keeper stale by it.
    pub published_at: i64,
    /// Heartbeats made by the current keeper worker (reset when a new worker starts).
    pub beats: u64,
    /// A decision was published after this worker's first heartbeat: until then a primary has
    /// not yet asked the peer whether it was superseded.
    pub decided_after_beat: bool,
    /// (Primary.) The keeper trusts the peer as its synchronous standby.
    pub trusts_standby: bool,
    /// (Primary.) The peer's lag in pg_stat_replication at the last tick, in bytes; -1 unknown.
    pub standby_lag_bytes: i64,
    /// (Standby.) How the primary's pg_stat_replication lists this standby, from its last
    /// answer ("sync", "async", "potential", "quorum"; empty: not listed or never asked).
    pub sync_state: Text<16>,
    /// A witness is configured.
    pub uses_witness: bool,
    /// (Primary.) This node holds the lease, until `lease_expires_at` (conservatively: counted
    /// from before the statement that renewed it).
    pub lease_mine: bool,
    pub lease_expires_at: i64,
    /// Since the server started: heartbeats without an answer, promotions requested, switches
    /// to asynchronous replication, after_command runs.
    pub heartbeat_failures_total: u64,
    pub failovers_total: u64,
    pub async_switches_total: u64,
    pub after_command_runs_total: u64,
    /// The last after_command's exit status (128 + the signal when killed; -1 when it could
    /// not be waited for); meaningful once a run ended.
    pub after_command_last_exit: i32,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            worker_pid: 0,
            node_name: Text::default(),
            state: Text::default(),
            peer_name: Text::default(),
            peer_host: Text::default(),
            peer_port: 0,
            failures: 0,
            keepalive_count: 0,
            keepalive_time_ms: 0,
            last_answer: 0,
            last_failure: 0,
            last_failure_reason: Text::default(),
            problem: Text::default(),
            witness: Text::default(),
            paused: false,
            pause_until: 0,
            events: [EventRecord::default(); HISTORY],
            total: 0,
            memory: None,
            clock_origin: None,
            http: ForHttp {
                standby_lag_bytes: -1,
                ..ForHttp::default()
            },
        }
    }
}

// SAFETY: plain data, no pointers.
unsafe impl PGRXSharedMemory for Shared {}

pub static STATUS: PgLwLock<Shared> = unsafe { PgLwLock::new(c"pg_keeper_rs status") };

/// Set in the postmaster once the shared memory is requested; inherited by every backend.
static AVAILABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Requests the shared memory; called from `_PG_init` under shared_preload_libraries.
pub fn init() {
    pg_shmem_init!(STATUS);
}

pub fn mark_available() {
    AVAILABLE.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Raises an ERROR in a session where the status cannot exist.
pub fn require() {
    if !AVAILABLE.load(std::sync::atomic::Ordering::Relaxed) {
        error!("pg_keeper_rs is not loaded with shared_preload_libraries on this server");
    }
}

pub fn now() -> i64 {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Appends an event to the history.
pub fn record(name: &str, detail: &str) {
    let mut s = STATUS.exclusive();
    let slot = (s.total % HISTORY as u64) as usize;
    let e = &mut s.events[slot];
    e.at = now();
    e.name.set(name);
    e.detail.set(detail);
    s.total += 1;
}

/// Updates the status.
pub fn publish(update: impl FnOnce(&mut Shared)) {
    let mut s = STATUS.exclusive();
    update(&mut s);
}

/// Whether a pause is asked for, and when it ends by itself (0: never).
pub fn pause_state() -> (bool, i64) {
    let s = STATUS.share();
    (s.paused, s.pause_until)
}

/// The keeper's memory left by an earlier worker of this server, if any.
pub fn memory() -> Option<keeper_core::Memory> {
    STATUS.share().memory
}

/// The start of the core's clock: set by this server's first keeper worker, the same for every
/// worker after it.
pub fn clock_origin() -> std::time::Instant {
    *STATUS
        .exclusive()
        .clock_origin
        .get_or_insert_with(std::time::Instant::now)
}

/// Updates the part of the status the HTTP listener reads.
pub fn publish_http(update: impl FnOnce(&mut ForHttp)) {
    let mut s = STATUS.exclusive();
    update(&mut s.http);
}

/// What the HTTP listener reads, copied under the lock (without the event history).
#[derive(Clone, Copy)]
pub struct HttpCopy {
    pub worker_pid: i32,
    pub state: Text<64>,
    pub failures: i32,
    pub keepalive_time_ms: i64,
    pub last_answer: i64,
    pub problem: Text<480>,
    pub paused: bool,
    pub http: ForHttp,
}

/// The status for the HTTP listener; from a backend's main thread only, like every LWLock.
pub fn http_copy() -> HttpCopy {
    let s = STATUS.share();
    HttpCopy {
        worker_pid: s.worker_pid,
        state: s.state,
        failures: s.failures,
        keepalive_time_ms: s.keepalive_time_ms,
        last_answer: s.last_answer,
        problem: s.problem,
        paused: s.paused,
        http: s.http,
    }
}

/// A copy of the status for reading without holding the lock.
pub fn snapshot() -> Shared {
    *STATUS.share()
}

impl Shared {
    /// The events, oldest first.
    pub fn history(&self) -> Vec<EventRecord> {
        let n = (self.total as usize).min(HISTORY);
        let first = self.total as usize - n;
        (first..self.total as usize)
            .map(|i| self.events[i % HISTORY])
            .collect()
    }

    pub fn last_event(&self) -> Option<EventRecord> {
        let last = self.total.checked_sub(1)?;
        Some(self.events[(last % HISTORY as u64) as usize])
    }
}

/// Optional text of any size, for the SQL functions.
pub fn opt<const N: usize>(t: &Text<N>) -> Option<String> {
    t.opt()
}
