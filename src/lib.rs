//! pg_keeper_rs: automatic failover for a PostgreSQL primary/standby pair, from a background
//! worker loaded with `shared_preload_libraries`.
//!
//! The decision logic is the `keeper-core` crate (pure, no I/O); this crate is the shell around
//! it: settings, the heartbeat over libpq, the actions on the server, and the worker loop.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::pg_sys;
use pgrx::prelude::*;

mod actuators;
mod after_command;
mod conninfo;
mod db;
mod heartbeat;
mod http;
mod identity;
mod rejoin;
mod resolve;
mod server_views;
mod serving;
mod settings;
mod sql_api;
mod status;
mod sys;
mod witness;
mod worker;

::pgrx::pg_module_magic!();

/// How soon the postmaster restarts the worker if it ever exits with an error.
const WORKER_RESTART: Duration = Duration::from_secs(1);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::register();
    // SAFETY: a plain global of the postmaster.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        warning!(
            "pg_keeper_rs must be loaded with shared_preload_libraries to protect this server"
        );
        return;
    }
    status::init();
    serving::init();
    status::mark_available();
    warn_if_standby_without_hot_standby();
    BackgroundWorkerBuilder::new("pg_keeper")
        .set_type("pg_keeper")
        .set_library("pg_keeper_rs")
        .set_function("pg_keeper_main")
        .enable_spi_access()
        // enable_spi_access() alone would never start the worker on a standby.
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(WORKER_RESTART))
        .load();
    // A process of its own, so that no HTTP client can delay the keeper.
    http::register();
}

/// The worker runs on a standby only as a hot-standby process; without hot_standby it never
/// starts there, so say so now, while the postmaster is starting.
fn warn_if_standby_without_hot_standby() {
    // SAFETY: DataDir and EnableHotStandby are set before shared_preload_libraries are loaded.
    let (data_dir, hot_standby) = unsafe {
        if pg_sys::DataDir.is_null() {
            return;
        }
        let dir = std::ffi::CStr::from_ptr(pg_sys::DataDir)
            .to_string_lossy()
            .into_owned();
        (dir, pg_sys::EnableHotStandby)
    };
    let standby = std::path::Path::new(&data_dir)
        .join("standby.signal")
        .exists();
    if standby && !hot_standby {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR,
            "pg_keeper: hot_standby is off on this standby, so pg_keeper cannot run here and will not promote it",
            "pg_keeper",
        )
        .set_hint("Set hot_standby = on and restart this server.")
        .report(PgLogLevel::WARNING);
    }
}
