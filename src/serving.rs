//! Whether this server serves clients: a primary isolated from both its standby and the
//! witness stops serving (every new session is refused, every session ended) strictly before
//! its standby may take the lease, and serves again once it reaches either of them.
//! The flag lives in shared memory, set by the worker and read by every backend as it
//! authenticates.

/// The start of the message a refused client gets. The other node's heartbeat recognises it: a
/// primary that refuses because it is isolated counts as lost, not as alive and refusing.
pub const REFUSAL: &str = "pg_keeper: this primary is isolated from its standby and the witness";

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};

/// Set while this server refuses sessions (shared memory: every backend reads it as it logs in).
static REFUSING: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"pg_keeper_rs refusing") };

/// The hook that was installed before ours, called first.
static mut PREVIOUS_HOOK: pg_sys::libpq::ClientAuthentication_hook_type = None;

/// Requests the flag's shared memory and installs the authentication hook; called from
/// `_PG_init` under shared_preload_libraries, in the postmaster.
pub fn init() {
    pg_shmem_init!(REFUSING);
    // SAFETY: the postmaster is single-threaded while it loads shared_preload_libraries.
    unsafe {
        PREVIOUS_HOOK = pg_sys::libpq::ClientAuthentication_hook;
        pg_sys::libpq::ClientAuthentication_hook = Some(authenticate);
    }
}

/// Every new session passes here once authenticated. While the flag is set it is refused with
/// a FATAL error, except a physical replication connection (the standby's WAL receiver, which
/// serves no client and lets the pair come back quickly).
#[pg_guard]
unsafe extern "C-unwind" fn authenticate(port: *mut pg_sys::libpq::be::Port, status: i32) {
    // SAFETY: the previous hook takes the same arguments.
    if let Some(previous) = unsafe { PREVIOUS_HOOK } {
        unsafe { previous(port, status) };
    }
    // STATUS_OK: a failed authentication is reported by PostgreSQL as usual.
    if status != 0 || !REFUSING.get().load(Ordering::SeqCst) {
        return;
    }
    // SAFETY: plain globals of this backend, set from its startup packet.
    let physical_replication = unsafe { pg_sys::am_walsender && !pg_sys::am_db_walsender };
    if physical_replication {
        return;
    }
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_CANNOT_CONNECT_NOW,
        REFUSAL,
        "pg_keeper",
    )
    .set_detail("It could not renew its lease on the witness nor reach its streaming standby for nearly the lease time, so the standby may take over; it serves no session until it reaches one of them.")
    .set_hint("Connect to the other node; if it has not taken over, this server serves again by itself once the witness or the standby is reachable.")
    .report(PgLogLevel::FATAL);
}

/// Refuses every new session and ends every session (the keeper's own excepted): no write
/// and no read that could be stale. Returns how many sessions were ended.
pub fn stop() -> Result<i64, String> {
    REFUSING.get().store(true, Ordering::SeqCst);
    crate::server_views::end_client_sessions()
}

/// Accepts sessions again.
pub fn resume() {
    REFUSING.get().store(false, Ordering::SeqCst);
}
