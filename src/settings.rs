//! The `pg_keeper.*` settings: each declared once here, registered in `_PG_init`, validated when
//! set, and read by the worker as one [`Settings`] snapshot after each reload.

use std::ffi::{c_char, c_void, CStr, CString};
use std::time::Duration;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::conninfo;

/// Default interval between heartbeats, in seconds.
pub const DEFAULT_KEEPALIVE_TIME_S: f64 = 5.0;
/// The shortest interval accepted, in seconds.
pub const MIN_KEEPALIVE_TIME_S: f64 = 0.1;
const MAX_KEEPALIVE_TIME_S: f64 = 86_400.0;

pub static NODE1_CONNINFO: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static NODE2_CONNINFO: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static KEEPALIVE_TIME: GucSetting<f64> = GucSetting::<f64>::new(DEFAULT_KEEPALIVE_TIME_S);
pub static KEEPALIVE_COUNT: GucSetting<i32> = GucSetting::<i32>::new(1);
/// The original C spellings; 0 means "not set".
pub static KEEPALIVES_TIME: GucSetting<f64> = GucSetting::<f64>::new(0.0);
pub static KEEPALIVES_COUNT: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static WITNESS_CONNINFO: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static AFTER_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static AFTER_COMMAND_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(60);
static RESTART_GRACE: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_RESTART_GRACE_MS);
/// `pg_keeper.restart_grace` by default: 30 s, in milliseconds.
pub const DEFAULT_RESTART_GRACE_MS: i32 = 30_000;
pub static SYNC_RESTORE: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static ALLOW_DATA_LOSS_FAILOVER: GucSetting<bool> = GucSetting::<bool>::new(false);
static AUTO_REJOIN: GucSetting<bool> = GucSetting::<bool>::new(false);
/// In kB, as PostgreSQL stores memory settings.
pub static SYNC_RESTORE_LAG: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024);
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// Written by the keeper (through ALTER SYSTEM) when it switches to asynchronous replication:
/// the `synchronous_standby_names` that was in force before.
pub static SAVED_SYNC_NAMES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Written by the keeper with the above (PostgreSQL 17 and later): the
/// `synchronized_standby_slots` in force before, which logical walsenders of failover slots
/// wait for as commits wait for the synchronous standby.
pub static SAVED_STANDBY_SLOTS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

/// The HTTP listener's port; 0 (the default) starts no listener.
pub static HTTP_PORT: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static HTTP_LISTEN_ADDRESSES: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"127.0.0.1"));

/// Keeps a setting out of postgresql.conf.sample (pgrx has no name for this flag).
fn not_in_sample() -> GucFlags {
    GucFlags::from_bits_retain(pg_sys::GUC_NOT_IN_SAMPLE as i32)
}

/// Registers every setting. Called once from `_PG_init`.
pub fn register() {
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"pg_keeper.node1_conninfo",
            c"Connection string of the node that is the master first.",
            c"Both servers carry the same value; each works out which node it is itself.",
            &NODE1_CONNINFO,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY,
            Some(check_node1_conninfo),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"pg_keeper.node2_conninfo",
            c"Connection string of the node that is the standby first.",
            c"Both servers carry the same value; each works out which node it is itself.",
            &NODE2_CONNINFO,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY,
            Some(check_node2_conninfo),
            None,
            None,
        );
    }
    GucRegistry::define_float_guc_with_hooks(
        c"pg_keeper.keepalive_time",
        c"Interval between heartbeats to the peer.",
        c"A plain number is seconds; units work ('500ms', '2s'). Each heartbeat must answer within this time.",
        &KEEPALIVE_TIME,
        0.0,
        MAX_KEEPALIVE_TIME_S,
        GucContext::Sighup,
        GucFlags::UNIT_S,
        Some(check_keepalive_time),
        None,
        None,
    );
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"pg_keeper.witness_conninfo",
            c"Connection string of a third PostgreSQL server that holds the failover lease.",
            c"Optional. Both nodes must reach it; nothing needs to be installed on it. Without it, a network cut between the nodes can give two primaries.",
            &WITNESS_CONNINFO,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY,
            Some(check_witness_conninfo),
            None,
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"pg_keeper.keepalive_count",
        c"Consecutive failed heartbeats before the keeper acts.",
        c"",
        &KEEPALIVE_COUNT,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc_with_hooks(
        c"pg_keeper.keepalives_time",
        c"Old spelling of pg_keeper.keepalive_time; 0 means not set.",
        c"",
        &KEEPALIVES_TIME,
        0.0,
        MAX_KEEPALIVE_TIME_S,
        GucContext::Sighup,
        GucFlags::UNIT_S | not_in_sample(),
        Some(check_alias_time),
        None,
        None,
    );
    GucRegistry::define_int_guc(
        c"pg_keeper.keepalives_count",
        c"Old spelling of pg_keeper.keepalive_count; 0 means not set.",
        c"",
        &KEEPALIVES_COUNT,
        0,
        1_000_000,
        GucContext::Sighup,
        not_in_sample(),
    );
    GucRegistry::define_string_guc(
        c"pg_keeper.after_command",
        c"Shell command run after the keeper promotes this server or switches it to asynchronous replication.",
        c"Run through /bin/sh -c with PG_KEEPER_EVENT and the node and peer in its environment.",
        &AFTER_COMMAND,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"pg_keeper.after_command_timeout",
        c"Time after which a running after_command is killed.",
        c"",
        &AFTER_COMMAND_TIMEOUT,
        1,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"pg_keeper.sync_restore",
        c"Restore synchronous replication once a lost standby is back and has caught up.",
        c"Off keeps replication asynchronous until an operator acts.",
        &SYNC_RESTORE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_keeper.restart_grace",
        c"How long a standby waits for a primary that announced a clean shutdown before counting failed heartbeats.",
        c"A planned restart (pg_ctl restart) is then not failed over; a crash or an immediate shutdown is counted at once. 0 counts at once.",
        &RESTART_GRACE,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"pg_keeper.auto_rejoin",
        c"A primary superseded by a failover rewinds itself and starts again as a standby of the new primary.",
        c"Off (the default) fences it and leaves the rejoin to an operator (bin/rejoin). Never for a node the witness lease names as its holder.",
        &AUTO_REJOIN,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_keeper.allow_data_loss_failover",
        c"Promote a standby that was not synchronous when the primary was lost.",
        c"Off (the default) never promotes a standby that could be missing acknowledged commits.",
        &ALLOW_DATA_LOSS_FAILOVER,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_keeper.sync_restore_lag",
        c"Largest replication lag at which synchronous replication is restored.",
        c"",
        &SYNC_RESTORE_LAG,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_string_guc(
        c"pg_keeper.database",
        c"Not used: the keeper connects to no database.",
        c"Accepted so that configurations written for earlier versions still load; the keeper reads the replication state from shared memory.",
        &DATABASE,
        GucContext::Postmaster,
        not_in_sample(),
    );
    GucRegistry::define_string_guc(
        c"pg_keeper.saved_synchronous_standby_names",
        c"synchronous_standby_names before the keeper switched to asynchronous replication.",
        c"Written by pg_keeper with ALTER SYSTEM; not meant to be set by hand.",
        &SAVED_SYNC_NAMES,
        GucContext::Sighup,
        not_in_sample() | GucFlags::SUPERUSER_ONLY,
    );
    // synchronized_standby_slots exists from PostgreSQL 17.
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    GucRegistry::define_string_guc(
        c"pg_keeper.saved_synchronized_standby_slots",
        c"synchronized_standby_slots before the keeper switched to asynchronous replication.",
        c"Written by pg_keeper with ALTER SYSTEM; not meant to be set by hand.",
        &SAVED_STANDBY_SLOTS,
        GucContext::Sighup,
        not_in_sample() | GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"pg_keeper.http_port",
        c"TCP port of the HTTP health and metrics listener; 0 starts no listener.",
        c"Read at server start: a change takes effect at the next restart.",
        &HTTP_PORT,
        0,
        65_535,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_keeper.http_listen_addresses",
        c"Comma-separated IP addresses the HTTP listener binds to; '*' means every IPv4 address, 'localhost' 127.0.0.1.",
        c"Read at server start: a change takes effect at the next restart.",
        &HTTP_LISTEN_ADDRESSES,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    // Misspelled pg_keeper.* settings are reported. PostgreSQL 15 renamed the call and made it
    // also remove them.
    #[cfg(not(feature = "pg14"))]
    unsafe {
        pg_sys::MarkGUCPrefixReserved(c"pg_keeper".as_ptr())
    };
    #[cfg(feature = "pg14")]
    unsafe {
        pg_sys::EmitWarningsOnPlaceholders(c"pg_keeper".as_ptr())
    };
}

/// Sets the detail of a check hook's rejection.
unsafe fn check_detail(detail: &str) {
    if let Ok(c) = CString::new(detail) {
        pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(c.as_ptr());
    }
}

/// Parses a conninfo being set; on failure, gives the reason as the rejection's detail.
unsafe fn parse_for_check(value: &str) -> Option<conninfo::Conninfo> {
    match conninfo::Conninfo::parse(value) {
        Ok(p) => match p.failover_hazard() {
            Some(why) => {
                check_detail(&why);
                None
            }
            None => Some(p),
        },
        Err(why) => {
            check_detail(&format!("The connection string does not parse: {why}"));
            None
        }
    }
}

/// Whether a conninfo names the same server as another setting's (which may be unset).
fn same_server(parsed: &conninfo::Conninfo, other: &GucSetting<Option<CString>>) -> bool {
    let other = other.get().map(|c| c.to_string_lossy().into_owned());
    matches!(other.as_deref().map(conninfo::Conninfo::parse), Some(Ok(o)) if &o == parsed)
}

/// Validates a node conninfo: it must parse, and must not be the other node's.
unsafe fn check_conninfo(
    newval: *mut *mut c_char,
    other: &GucSetting<Option<CString>>,
    other_name: &str,
) -> bool {
    if newval.is_null() || (*newval).is_null() {
        return true; // not set: reported by the worker as a configuration problem
    }
    let value = CStr::from_ptr(*newval).to_string_lossy();
    if value.trim().is_empty() {
        check_detail("The connection string is empty; give the node's host, port and dbname.");
        return false;
    }
    let Some(parsed) = parse_for_check(&value) else {
        return false;
    };
    if same_server(&parsed, other) {
        check_detail(&format!(
            "It is the same as {other_name}; the two must name different servers."
        ));
        return false;
    }
    true
}

#[pg_guard]
unsafe extern "C-unwind" fn check_node1_conninfo(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    check_conninfo(newval, &NODE2_CONNINFO, "pg_keeper.node2_conninfo")
}

#[pg_guard]
unsafe extern "C-unwind" fn check_node2_conninfo(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    check_conninfo(newval, &NODE1_CONNINFO, "pg_keeper.node1_conninfo")
}

/// Validates the witness conninfo: empty (no witness) or a connection string that parses and
/// names neither node.
#[pg_guard]
unsafe extern "C-unwind" fn check_witness_conninfo(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    if newval.is_null() || (*newval).is_null() {
        return true;
    }
    let value = CStr::from_ptr(*newval).to_string_lossy();
    if value.trim().is_empty() {
        return true;
    }
    let Some(parsed) = parse_for_check(&value) else {
        return false;
    };
    for (node, name) in [
        (&NODE1_CONNINFO, "pg_keeper.node1_conninfo"),
        (&NODE2_CONNINFO, "pg_keeper.node2_conninfo"),
    ] {
        if same_server(&parsed, node) {
            check_detail(&format!(
                "It is the same as {name}; the witness must be a third server."
            ));
            return false;
        }
    }
    true
}

/// Whether an interval (seconds) is under the 100ms floor; '100ms' itself converts to a double a
/// hair under 0.1, so the comparison allows for that.
fn below_floor(seconds: f64) -> bool {
    seconds < MIN_KEEPALIVE_TIME_S - 1e-9
}

#[pg_guard]
unsafe extern "C-unwind" fn check_keepalive_time(
    newval: *mut f64,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    if below_floor(*newval) {
        check_detail("The shortest heartbeat interval is 100ms.");
        return false;
    }
    true
}

#[pg_guard]
unsafe extern "C-unwind" fn check_alias_time(
    newval: *mut f64,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    let v = *newval;
    if v != 0.0 && below_floor(v) {
        check_detail("The shortest heartbeat interval is 100ms; 0 means not set.");
        return false;
    }
    true
}

/// One consistent reading of the settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub node1: Option<String>,
    pub node2: Option<String>,
    pub keepalive_time: Duration,
    pub keepalive_count: u32,
    pub after_command: Option<String>,
    pub after_command_timeout: Duration,
    pub sync_restore: bool,
    pub sync_restore_lag_bytes: i64,
    pub allow_data_loss_failover: bool,
    /// `pg_keeper.restart_grace`.
    pub restart_grace: Duration,
    /// `pg_keeper.auto_rejoin`.
    pub auto_rejoin: bool,
    /// `pg_keeper.witness_conninfo`, when set.
    pub witness: Option<String>,
    /// Warnings about how the settings were combined (old and new spellings).
    pub warnings: Vec<String>,
}

fn string_setting(s: &GucSetting<Option<CString>>) -> Option<String> {
    s.get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|v| !v.trim().is_empty())
}

/// Combines a setting with its old spelling: the documented name wins when both are set.
fn resolve<T: PartialEq + Copy + std::fmt::Display>(
    name: &str,
    value: T,
    default: T,
    old_name: &str,
    old_value: Option<T>,
    warnings: &mut Vec<String>,
) -> T {
    match old_value {
        None => value,
        Some(old) if value == default => old,
        Some(old) if old == value => value,
        Some(old) => {
            warnings.push(format!(
                "both {name} ({value}) and {old_name} ({old}) are set; {name} wins"
            ));
            value
        }
    }
}

impl Settings {
    pub fn load() -> Settings {
        let mut warnings = Vec::new();
        let old_time = KEEPALIVES_TIME.get();
        let time_s = resolve(
            "pg_keeper.keepalive_time",
            KEEPALIVE_TIME.get(),
            DEFAULT_KEEPALIVE_TIME_S,
            "pg_keeper.keepalives_time",
            (old_time > 0.0).then_some(old_time),
            &mut warnings,
        );
        let old_count = KEEPALIVES_COUNT.get();
        let count = resolve(
            "pg_keeper.keepalive_count",
            KEEPALIVE_COUNT.get(),
            1,
            "pg_keeper.keepalives_count",
            (old_count > 0).then_some(old_count),
            &mut warnings,
        );
        Settings {
            node1: string_setting(&NODE1_CONNINFO),
            node2: string_setting(&NODE2_CONNINFO),
            keepalive_time: Duration::from_secs_f64(time_s.max(MIN_KEEPALIVE_TIME_S)),
            keepalive_count: count.max(1) as u32,
            after_command: string_setting(&AFTER_COMMAND),
            after_command_timeout: Duration::from_secs(AFTER_COMMAND_TIMEOUT.get().max(1) as u64),
            sync_restore: SYNC_RESTORE.get(),
            allow_data_loss_failover: ALLOW_DATA_LOSS_FAILOVER.get(),
            restart_grace: Duration::from_millis(RESTART_GRACE.get().max(0) as u64),
            auto_rejoin: AUTO_REJOIN.get(),
            sync_restore_lag_bytes: SYNC_RESTORE_LAG.get() as i64 * 1024,
            witness: string_setting(&WITNESS_CONNINFO),
            warnings,
        }
    }

    /// The `synchronous_standby_names` saved when the keeper switched to async, if any.
    pub fn saved_sync_names() -> Option<String> {
        string_setting(&SAVED_SYNC_NAMES)
    }

    /// The `synchronized_standby_slots` saved when the keeper switched to async (17 and later).
    pub fn saved_standby_slots() -> Option<String> {
        string_setting(&SAVED_STANDBY_SLOTS)
    }

    /// The HTTP listener's port (0: none) and addresses, as set at server start.
    pub fn http() -> (u16, Vec<String>) {
        let addresses = string_setting(&HTTP_LISTEN_ADDRESSES)
            .unwrap_or_else(|| "127.0.0.1".into())
            .split(',')
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        (HTTP_PORT.get().clamp(0, 65_535) as u16, addresses)
    }

    /// How long a lease renewal is valid on the witness's clock (see
    /// [`keeper_core::lease_time_ms`]: three keepalive_times and a margin).
    pub fn lease_time(&self) -> Duration {
        Duration::from_millis(keeper_core::lease_time_ms(
            self.keepalive_time.as_millis() as u64
        ))
    }

    /// A short description of the settings that matter for failover timing, for the log.
    pub fn summary(&self) -> String {
        let witness = match &self.witness {
            Some(w) => format!(
                "; witness {} with a lease of {}ms",
                conninfo::Conninfo::parse(w)
                    .map(|c| c.redacted())
                    .unwrap_or_else(|_| "(unparsable)".into()),
                self.lease_time().as_millis()
            ),
            None => "; no witness".into(),
        };
        format!(
            "keepalive_time={}ms keepalive_count={} (failover after about {}ms without an answer{witness}); restart_grace={}ms",
            self.keepalive_time.as_millis(),
            self.keepalive_count,
            self.keepalive_time.as_millis() * self.keepalive_count as u128,
            self.restart_grace.as_millis()
        )
    }
}
