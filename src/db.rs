//! Reads and writes inside this server: each in its own transaction, with any ERROR caught and
//! returned as a reason, so a failed read or write never ends the worker.

use std::ffi::{CStr, CString};
use std::panic::{RefUnwindSafe, UnwindSafe};

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

fn caught_message(e: &CaughtError) -> String {
    match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r.message().to_string(),
        CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
    }
}

/// Runs `body` in a transaction of its own; an ERROR inside rolls it back and becomes `Err`.
pub fn in_transaction<R>(
    body: impl FnOnce() -> Result<R, String> + UnwindSafe + RefUnwindSafe,
) -> Result<R, String> {
    // SAFETY: the worker is connected to a database and no transaction is open between ticks.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let outcome = PgTryBuilder::new(body)
        .catch_others(|e| Err(caught_message(&e)))
        .execute();
    unsafe {
        match outcome {
            Ok(_) => {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Err(_) => pg_sys::AbortCurrentTransaction(),
        }
    }
    outcome
}

/// Whether commits wait for a synchronous standby now: the checkpointer has taken in a
/// non-empty `synchronous_standby_names` (the setting in the file, or even in this process, may
/// be ahead of it). Before the checkpointer first processed the setting, backends go by their
/// own copy of it, and so does this (`own_setting`). How the byte reads depends on the running
/// server's minor version ([`keeper_core::sync_standbys_in_force`]).
pub fn sync_in_force(own_setting: bool) -> bool {
    // Unknown (never, in practice): the layout of the headers this was built against.
    static VERSION: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let version =
        *VERSION.get_or_init(|| setting(c"server_version_num").parse().unwrap_or(i64::MAX));
    // SAFETY: WalSndCtl is set up in shared memory before any worker starts; one byte, read
    // without the lock as SyncRepWaitForLSN does first.
    let byte = unsafe {
        let ctl = pg_sys::WalSndCtl;
        if ctl.is_null() {
            return own_setting;
        }
        std::ptr::read_volatile(&raw const (*ctl).sync_standbys_status)
    };
    keeper_core::sync_standbys_in_force(byte, version, own_setting)
}

/// The WAL insert position, as an LSN.
pub fn insert_lsn() -> u64 {
    // SAFETY: reads shared memory under its own lock; primary only.
    unsafe { pg_sys::GetXLogInsertRecPtr() }
}

/// The value of a server setting as `SHOW` gives it.
pub fn setting(name: &CStr) -> String {
    // SAFETY: GetConfigOption returns a pointer into the GUC tables (or NULL with missing_ok).
    unsafe {
        let p = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// `ALTER SYSTEM SET name = 'value'` (or `RESET name` for `None`), the way the command does it
/// (postgresql.auto.conf), from inside the worker: ALTER SYSTEM cannot run through SPI.
pub fn alter_system(name: &str, value: Option<&str>) -> Result<(), String> {
    let value = value
        .map(|v| CString::new(v).map_err(|_| "value contains a NUL byte".to_string()))
        .transpose()?;
    let name = name.to_string();
    in_transaction(move || unsafe {
        let sql = match &value {
            Some(v) => {
                let quoted = CStr::from_ptr(pg_sys::quote_literal_cstr(v.as_ptr()));
                format!("ALTER SYSTEM SET {name} = {}", quoted.to_string_lossy())
            }
            None => format!("ALTER SYSTEM RESET {name}"),
        };
        let sql = CString::new(sql).map_err(|e| e.to_string())?;
        let parsed = pg_sys::raw_parser(sql.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        if parsed.is_null() || (*parsed).length != 1 {
            return Err("could not parse the ALTER SYSTEM statement".into());
        }
        let raw = (*(*parsed).elements).ptr_value as *mut pg_sys::RawStmt;
        let stmt = (*raw).stmt as *mut pg_sys::AlterSystemStmt;
        if (*stmt).type_ != pg_sys::NodeTag::T_AlterSystemStmt {
            return Err("the statement is not ALTER SYSTEM".into());
        }
        pg_sys::AlterSystemSetConfigFile(stmt);
        Ok(())
    })
}

/// Asks the postmaster to reload the configuration files, as `pg_reload_conf()` does.
pub fn reload_configuration() -> Result<(), String> {
    // SAFETY: PostmasterPid is set before any worker starts.
    let pid = unsafe { pg_sys::PostmasterPid };
    crate::sys::signal(pid, crate::sys::SIGHUP)
        .map_err(|e| format!("could not signal the postmaster: {e}"))
}
