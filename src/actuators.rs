//! The two things the keeper does to its own server: switch replication to asynchronous, and
//! promote. Each reports failure as a reason; neither can end the worker.

use std::path::PathBuf;

use pgrx::pg_sys;

use crate::db;
use crate::sys;

/// What a switch to asynchronous replication changed.
pub enum Degraded {
    /// `synchronous_standby_names` was cleared; the old value is kept for a later restore.
    Switched { previous: String },
    /// It was already empty: nothing to do.
    AlreadyAsync,
}

/// Saves `synchronous_standby_names` in `pg_keeper.saved_synchronous_standby_names`, sets it to
/// `''` (both with ALTER SYSTEM, so it survives a restart) and reloads, which releases every
/// commit waiting for the lost standby.
pub fn degrade_to_async() -> Result<Degraded, String> {
    let previous = db::setting(c"synchronous_standby_names");
    if previous.trim().is_empty() {
        return Ok(Degraded::AlreadyAsync);
    }
    db::alter_system("pg_keeper.saved_synchronous_standby_names", Some(&previous))?;
    db::alter_system("synchronous_standby_names", Some(""))?;
    db::reload_configuration()?;
    Ok(Degraded::Switched { previous })
}

/// Puts back the `synchronous_standby_names` saved by [`degrade_to_async`] (with ALTER SYSTEM),
/// clears the saved value and reloads. Returns the value restored.
pub fn restore_sync() -> Result<String, String> {
    let saved = crate::settings::Settings::saved_sync_names()
        .ok_or_else(|| "no saved synchronous_standby_names to restore".to_string())?;
    db::alter_system("synchronous_standby_names", Some(&saved))?;
    db::alter_system("pg_keeper.saved_synchronous_standby_names", None)?;
    db::reload_configuration()?;
    Ok(saved)
}

/// PostgreSQL 17's `allow_alter_system = off`: ALTER SYSTEM, and so every switch to async and
/// back, fails. The setting does not exist before 17 (then it reads as empty).
pub fn alter_system_refused() -> bool {
    db::setting(c"allow_alter_system") == "off"
}

/// Requests promotion the way `pg_promote()` does: the `promote` signal file in the data
/// directory, then SIGUSR1 to the postmaster.
pub fn promote() -> Result<(), String> {
    signal_file_then_postmaster("promote", sys::SIGUSR1)
}

/// Creates an empty signal file in the data directory, then signals the postmaster.
fn signal_file_then_postmaster(name: &str, signal: i32) -> Result<(), String> {
    let file = PathBuf::from(data_directory()).join(name);
    std::fs::write(&file, b"")
        .map_err(|e| format!("could not create \"{}\": {e}", file.display()))?;
    // SAFETY: PostmasterPid is set before any worker starts.
    let postmaster = unsafe { pg_sys::PostmasterPid };
    sys::signal(postmaster, signal).map_err(|e| format!("could not signal the postmaster: {e}"))
}

/// Wakes the startup process of this standby: when it waits out `wal_retrieve_retry_interval`
/// after its WAL receiver could not connect, it tries again at once (it starts a new WAL
/// receiver), as it does on a promotion request or a reload.
pub fn wake_wal_receiver() {
    // SAFETY: sets the startup process's latch in shared memory; harmless when it is not
    // waiting (it then rechecks and waits again).
    unsafe { pg_sys::WakeupRecovery() }
}

/// Removes a `promote` signal file left behind (the postmaster ignores it outside recovery).
pub fn remove_promote_file() {
    let _ = std::fs::remove_file(PathBuf::from(data_directory()).join("promote"));
}

/// Fences this server after it was superseded: `standby.signal` first, so that it can only start
/// again as a standby, then a fast shutdown (as `pg_ctl stop -m fast`), which ends every session.
/// Unlike a read-only setting, no client can undo this.
pub fn fence() -> Result<(), String> {
    signal_file_then_postmaster("standby.signal", sys::SIGINT)
}

/// The data directory of this server.
pub fn data_directory() -> String {
    // SAFETY: DataDir is set before any worker starts.
    unsafe {
        std::ffi::CStr::from_ptr(pg_sys::DataDir)
            .to_string_lossy()
            .into_owned()
    }
}

/// Whether this server is still in recovery (a standby).
pub fn in_recovery() -> bool {
    // SAFETY: reads shared memory state; no transaction needed.
    unsafe { pg_sys::RecoveryInProgress() }
}

/// The timeline this server writes (primary) or replays (standby).
pub fn timeline() -> u32 {
    // SAFETY: both read shared memory state.
    unsafe {
        if pg_sys::RecoveryInProgress() {
            let mut tli: pg_sys::TimeLineID = 0;
            pg_sys::GetXLogReplayRecPtr(&mut tli);
            tli
        } else {
            insertion_timeline()
        }
    }
}

/// The timeline WAL is written on, outside recovery. PostgreSQL 15 added a function for it; in
/// 14 the process's `ThisTimeLineID`, which `RecoveryInProgress()` (called just before) set
/// when it saw recovery had ended, holds it.
#[cfg(not(feature = "pg14"))]
unsafe fn insertion_timeline() -> u32 {
    pg_sys::GetWALInsertionTimeLine()
}

#[cfg(feature = "pg14")]
unsafe fn insertion_timeline() -> u32 {
    pg_sys::ThisTimeLineID
}
