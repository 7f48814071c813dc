//! The two things the keeper does to its own server: switch replication to asynchronous, and
//! promote. Each reports failure as a reason; neither can end the worker.

use std::ffi::CStr;
use std::path::PathBuf;

use pgrx::pg_sys;

use crate::db;
use crate::sys;

/// PostgreSQL 17's failover slots: logical walsenders wait for the standbys of the physical
/// slots named here before they send a change, as commits wait for `synchronous_standby_names`;
/// a lost standby stops logical replication as it stops commits. The setting does not exist
/// before 17 (then it reads as empty and is never written).
const STANDBY_SLOTS: &CStr = c"synchronized_standby_slots";

/// What a switch to asynchronous replication changed: the old values, kept for a later restore
/// (None: that setting was already empty).
pub struct SyncSettings {
    pub names: Option<String>,
    pub slots: Option<String>,
}

/// Saves `synchronous_standby_names` in `pg_keeper.saved_synchronous_standby_names` and, from
/// PostgreSQL 17, `synchronized_standby_slots` in `pg_keeper.saved_synchronized_standby_slots`,
/// sets both to `''` (with ALTER SYSTEM, so it survives a restart) and reloads, which releases
/// every commit and every logical walsender waiting for the lost standby. Nothing to do when
/// both are empty already.
pub fn degrade_to_async() -> Result<SyncSettings, String> {
    let set = |name: &CStr| Some(db::setting(name)).filter(|v| !v.trim().is_empty());
    let (names, slots) = (set(c"synchronous_standby_names"), set(STANDBY_SLOTS));
    // Every old value is saved before anything is cleared.
    if let Some(v) = &names {
        db::alter_system("pg_keeper.saved_synchronous_standby_names", Some(v))?;
    }
    if let Some(v) = &slots {
        db::alter_system("pg_keeper.saved_synchronized_standby_slots", Some(v))?;
    }
    if names.is_some() {
        db::alter_system("synchronous_standby_names", Some(""))?;
    }
    if slots.is_some() {
        db::alter_system("synchronized_standby_slots", Some(""))?;
    }
    if names.is_some() || slots.is_some() {
        db::reload_configuration()?;
    }
    Ok(SyncSettings { names, slots })
}

/// Puts back what [`degrade_to_async`] saved (with ALTER SYSTEM), clears the saved values and
/// reloads. Returns the values restored.
pub fn restore_sync() -> Result<SyncSettings, String> {
    use crate::settings::Settings;
    let (names, slots) = (
        Settings::saved_sync_names(),
        Settings::saved_standby_slots(),
    );
    if names.is_none() && slots.is_none() {
        return Err("no saved synchronous_standby_names to restore".to_string());
    }
    if let Some(v) = &names {
        db::alter_system("synchronous_standby_names", Some(v))?;
    }
    if let Some(v) = &slots {
        db::alter_system("synchronized_standby_slots", Some(v))?;
    }
    if names.is_some() {
        db::alter_system("pg_keeper.saved_synchronous_standby_names", None)?;
    }
    if slots.is_some() {
        db::alter_system("pg_keeper.saved_synchronized_standby_slots", None)?;
    }
    db::reload_configuration()?;
    Ok(SyncSettings { names, slots })
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
