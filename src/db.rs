//! Reads and writes inside this server: each in its own transaction, with any ERROR caught and
//! returned as a reason, so a failed read or write never ends the worker.

use std::ffi::{CStr, CString};
use std::panic::{RefUnwindSafe, UnwindSafe};

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::spi::Spi;

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

/// Primary only: is a standby streaming and, when `synchronous_standby_names` is set, is it a
/// synchronous one? Read-only, so it also works while commits wait for a lost standby.
pub fn standby_streaming() -> Result<bool, String> {
    in_transaction(|| {
        Spi::connect(|client| {
            let rows = client
                .select(
                    "SELECT count(*)::int4 FROM pg_catalog.pg_stat_replication \
                     WHERE state = 'streaming' \
                       AND (pg_catalog.current_setting('synchronous_standby_names') = '' \
                            OR sync_state IN ('sync', 'quorum'))",
                    Some(1),
                    &[],
                )
                .map_err(|e| e.to_string())?;
            let n: Option<i32> = rows.first().get_one().map_err(|e| e.to_string())?;
            Ok(n.unwrap_or(0) > 0)
        })
    })
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

/// `ALTER SYSTEM SET name = 'value'`, the way the command does it (postgresql.auto.conf), from
/// inside the worker: ALTER SYSTEM cannot run through SPI.
pub fn alter_system(name: &str, value: &str) -> Result<(), String> {
    let value = CString::new(value).map_err(|_| "value contains a NUL byte".to_string())?;
    let name = name.to_string();
    in_transaction(move || unsafe {
        let quoted = CStr::from_ptr(pg_sys::quote_literal_cstr(value.as_ptr()))
            .to_string_lossy()
            .into_owned();
        let sql = CString::new(format!("ALTER SYSTEM SET {name} = {quoted}"))
            .map_err(|e| e.to_string())?;
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
