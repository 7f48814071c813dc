//! What this server's own statistics views would show the keeper, read straight from shared
//! memory the way the views' functions read it, so the keeper needs no database connection.
//!
//! Connected to a database, a background worker carries that database's relation and catalog
//! caches (about 1 MB private), and running SQL on `pg_stat_replication` each tick added the
//! views' rewrite rules and the planner's memory to them. The keeper connects to no database
//! (like PostgreSQL's logical replication launcher): each reader here takes the same fields the
//! view takes, from the same shared structures (`WalSndCtl`, `WalRcv`, the backend status
//! array, `ProcGlobal`), and names the view and column it stands for.
//!
//! The walsender and WAL receiver fields are read one at a time without their spinlock: each is
//! an aligned integer of at most 8 bytes, so no read is torn, and no decision rests on two of them
//! having been written together (`pg_stat_replication` itself is a snapshot that can be out of
//! date as soon as it is taken).

use std::collections::HashMap;
use std::ffi::{c_char, CStr};
use std::ptr::{addr_of, read_volatile};

use keeper_core::StandbyRow;
use pgrx::pg_sys;

use crate::db::in_transaction;

/// The `pg_stat_activity` facts of one session that the keeper uses.
struct Session {
    pid: i32,
    application_name: String,
    backend_type: pg_sys::BackendType::Type,
    database: pg_sys::Oid,
}

/// `pg_stat_get_activity(NULL)`'s sessions (from the backend status array, as a snapshot that
/// is dropped again at once). Call in a transaction (the snapshot's memory and the end of
/// transaction clean-up).
unsafe fn sessions() -> Vec<Session> {
    let n = pg_sys::pgstat_fetch_stat_numbackends();
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for i in 1..=n {
        let entry = local_backend_entry(i);
        if entry.is_null() {
            continue;
        }
        let st = &(*entry).backendStatus;
        out.push(Session {
            pid: st.st_procpid,
            application_name: c_string(st.st_appname),
            backend_type: st.st_backendType,
            database: st.st_databaseid,
        });
    }
    pg_sys::pgstat_clear_backend_activity_snapshot();
    out
}

/// The `i`-th entry (from 1) of the local copy of the backend status array. PostgreSQL 16
/// renamed the accessor (`pgstat_fetch_stat_local_beentry` before it).
#[cfg(any(feature = "pg14", feature = "pg15"))]
unsafe fn local_backend_entry(i: i32) -> *mut pg_sys::LocalPgBackendStatus {
    pg_sys::pgstat_fetch_stat_local_beentry(i)
}

#[cfg(not(any(feature = "pg14", feature = "pg15")))]
unsafe fn local_backend_entry(i: i32) -> *mut pg_sys::LocalPgBackendStatus {
    pg_sys::pgstat_get_local_beentry_by_index(i)
}

fn c_string(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: a NUL-terminated string of the status snapshot, alive while it is read.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Primary only: the streaming standbys, as
/// `SELECT application_name, sync_state, pg_current_wal_lsn() - flush_lsn, flush_lsn,
/// clock_timestamp() - reply_time FROM pg_stat_replication WHERE state = 'streaming' AND
/// application_name <> 'pg_basebackup' ORDER BY application_name` gives them (the WAL stream of
/// a running pg_basebackup is not a standby). `sync_state` is decided the way
/// `pg_stat_get_wal_senders` decides it: priority 0 is `async`; a walsender among
/// `SyncRepGetCandidateStandbys` is `sync` (or `quorum` with `ANY`); any other is `potential`.
pub fn streaming_standbys() -> Result<Vec<StandbyRow>, String> {
    // SAFETY: the shared structures exist before any worker starts; palloc'd memory belongs to
    // the transaction, which also catches an ERROR.
    in_transaction(|| unsafe {
        let ctl = pg_sys::WalSndCtl;
        if ctl.is_null() {
            return Ok(Vec::new());
        }
        let mut candidates: *mut pg_sys::SyncRepStandbyData = std::ptr::null_mut();
        let n = pg_sys::SyncRepGetCandidateStandbys(&mut candidates);
        let synchronous: Vec<i32> = (0..n.max(0) as usize)
            .map(|j| (*candidates.add(j)).walsnd_index)
            .collect();
        let config = pg_sys::SyncRepConfig;
        let quorum =
            !config.is_null() && u32::from((*config).syncrep_method) == pg_sys::SYNC_REP_QUORUM;
        let names: HashMap<i32, String> = sessions()
            .into_iter()
            .map(|s| (s.pid, s.application_name))
            .collect();
        let written = pg_sys::GetXLogWriteRecPtr();
        let now = pg_sys::GetCurrentTimestamp();
        let senders = (*ctl).walsnds.as_ptr();
        let mut rows = Vec::new();
        for i in 0..pg_sys::max_wal_senders.max(0) as usize {
            let w = senders.add(i);
            let pid = read_volatile(addr_of!((*w).pid));
            if pid == 0
                || read_volatile(addr_of!((*w).state)) != pg_sys::WalSndState::WALSNDSTATE_STREAMING
            {
                continue;
            }
            // The view joins the walsender to its session; one not (yet) there has no row.
            let Some(name) = names.get(&pid) else {
                continue;
            };
            if name == "pg_basebackup" {
                continue;
            }
            let flush = read_volatile(addr_of!((*w).flush));
            let reply = read_volatile(addr_of!((*w).replyTime));
            let priority = read_volatile(addr_of!((*w).sync_standby_priority));
            let sync_state = if priority == 0 {
                "async"
            } else if synchronous.contains(&(i as i32)) {
                if quorum {
                    "quorum"
                } else {
                    "sync"
                }
            } else {
                "potential"
            };
            rows.push(StandbyRow {
                application_name: name.clone(),
                sync_state: sync_state.into(),
                lag_bytes: (flush != 0).then(|| written as i64 - flush as i64),
                flush_lsn: (flush != 0).then_some(flush),
                reply_age_ms: (reply != 0).then(|| (now - reply) / 1000),
            });
        }
        pg_sys::pfree(candidates.cast());
        rows.sort_by(|a, b| a.application_name.cmp(&b.application_name));
        Ok(rows)
    })
}

/// Standby only: whether `pg_stat_wal_receiver` shows `status = 'streaming'` with a
/// `last_msg_receipt_time` within the last `window_ms` (the view has no row while the receiver
/// is not running or not ready to be shown).
pub fn wal_receiver_recent(window_ms: i64) -> bool {
    // SAFETY: WalRcv is set up in shared memory before any worker starts.
    unsafe {
        let rcv = pg_sys::WalRcv;
        if rcv.is_null() {
            return false;
        }
        let pid = read_volatile(addr_of!((*rcv).pid));
        let ready = read_volatile(addr_of!((*rcv).ready_to_display));
        let state = read_volatile(addr_of!((*rcv).walRcvState));
        let received = read_volatile(addr_of!((*rcv).lastMsgReceiptTime));
        pid != 0
            && ready
            && state == pg_sys::WalRcvState::WALRCV_STREAMING
            && received != 0
            && received > pg_sys::GetCurrentTimestamp() - window_ms.saturating_mul(1000)
    }
}

/// The processes to end with SIGTERM, as `pg_terminate_backend` ends them (a backend is a
/// process group leader; the signal goes to the group, as there). Returns how many were
/// signalled.
fn terminate(pids: impl IntoIterator<Item = i32>) -> i64 {
    // SAFETY: MyProcPid is this process's pid.
    let me = unsafe { pg_sys::MyProcPid };
    pids.into_iter()
        .filter(|&pid| pid > 0 && pid != me)
        .filter(|&pid| crate::sys::signal(-pid, crate::sys::SIGTERM).is_ok())
        .count() as i64
}

/// Primary only: terminates the sessions whose commits wait for synchronous replication
/// (`wait_event = 'SyncRep'`; terminate, not cancel: a cancelled wait is reported to the client
/// as a commit). Returns how many.
pub fn end_waiting_commits() -> i64 {
    // SAFETY: ProcGlobal's array is fixed in shared memory; a PGPROC's pid and syncRepState are
    // aligned ints, read as pg_stat_activity reads the wait event: without a lock.
    let waiting: Vec<i32> = unsafe {
        let procs = pg_sys::ProcGlobal;
        if procs.is_null() {
            return 0;
        }
        let all = (*procs).allProcs;
        (0..(*procs).allProcCount as usize)
            .map(|i| all.add(i))
            .filter(|&p| {
                read_volatile(addr_of!((*p).syncRepState)) == pg_sys::SYNC_REP_WAITING as i32
            })
            .map(|p| read_volatile(addr_of!((*p).pid)))
            .collect()
    };
    terminate(waiting)
}

/// Terminates every client session and every logical replication session (a walsender
/// connected to a database), not this process and not the physical WAL senders, and returns
/// how many were ended.
pub fn end_client_sessions() -> Result<i64, String> {
    // SAFETY: reads the backend status snapshot inside a transaction.
    let pids = in_transaction(|| unsafe {
        Ok(sessions()
            .into_iter()
            .filter(|s| {
                s.backend_type == pg_sys::BackendType::B_BACKEND
                    || (s.backend_type == pg_sys::BackendType::B_WAL_SENDER
                        && s.database != pg_sys::InvalidOid)
            })
            .map(|s| s.pid)
            .collect::<Vec<_>>())
    })?;
    Ok(terminate(pids))
}

/// `replication/message.h` (not in pgrx's bindings): writes a logical decoding message.
/// PostgreSQL 17 added `flush`. Called through `pg_guard_ffi_boundary`, so that an ERROR
/// inside becomes a Rust panic that [`in_transaction`] catches.
#[cfg(any(feature = "pg14", feature = "pg15", feature = "pg16"))]
mod message {
    unsafe extern "C-unwind" {
        pub fn LogLogicalMessage(
            prefix: *const std::ffi::c_char,
            message: *const std::ffi::c_char,
            size: usize,
            transactional: bool,
        ) -> pgrx::pg_sys::XLogRecPtr;
    }
}

#[cfg(not(any(feature = "pg14", feature = "pg15", feature = "pg16")))]
mod message {
    unsafe extern "C-unwind" {
        pub fn LogLogicalMessage(
            prefix: *const std::ffi::c_char,
            message: *const std::ffi::c_char,
            size: usize,
            transactional: bool,
            flush: bool,
        ) -> pgrx::pg_sys::XLogRecPtr;
    }
}

/// Primary only: writes a small WAL record (a non-transactional logical message with the prefix
/// `pg_keeper`, as `pg_logical_emit_message(false, 'pg_keeper', '')` writes it; it needs no
/// transaction id and works at wal_level replica) and flushes it, so that the standby's WAL
/// receiver hears from this primary, and replies to it, on every tick even when nothing else is
/// written: both sides' replication evidence then holds on an idle pair. The keeper is
/// connected to no database, so the message names none, and no logical decoding consumer of a
/// database sees it.
pub fn pulse() -> Result<(), String> {
    // SAFETY: a WAL insert from a process attached to shared memory (not in recovery: primary
    // only); an ERROR rolls back the transaction and becomes Err.
    let lsn = in_transaction(|| unsafe {
        let (prefix, empty) = (c"pg_keeper".as_ptr(), c"".as_ptr());
        Ok(pg_sys::ffi::pg_guard_ffi_boundary(|| {
            #[cfg(any(feature = "pg14", feature = "pg15", feature = "pg16"))]
            let lsn = message::LogLogicalMessage(prefix, empty, 0, false);
            #[cfg(not(any(feature = "pg14", feature = "pg15", feature = "pg16")))]
            let lsn = message::LogLogicalMessage(prefix, empty, 0, false, false);
            lsn
        }))
    })?;
    // SAFETY: flushing WAL up to a position this server wrote.
    unsafe { pg_sys::XLogFlush(lsn) };
    Ok(())
}
