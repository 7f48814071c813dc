//! When a primary may count its standby as synchronous.
//!
//! `sync_state = 'sync'` in `pg_stat_replication` only says that the standby is the one commits
//! will wait for. After a switch to async and back, the standby may still lack commits that were
//! acknowledged while nothing waited for it (and, until the checkpointer has taken in the
//! restored setting, commits are still acknowledged without it). A standby promoted then would
//! lose them. So the standby is trusted only once its flush position has passed the primary's
//! insert position read after synchronous replication was seen in force: every commit
//! acknowledged without it lies before that position, and every later one waits for it.

/// What the primary's replication view shows of its standby this tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StandbySeen {
    /// Streaming with `sync_state` `sync` (or `quorum`).
    pub synchronous: bool,
    /// Its flush position (an LSN), as it last reported it.
    pub flush_lsn: u64,
}

/// The primary's trust in its standby.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncTrust {
    /// Not synchronous, or synchronous replication is not in force.
    #[default]
    Untrusted,
    /// Synchronous and in force since the insert position was here; trusted once the
    /// standby's flush position reaches it.
    CatchingUp { until_lsn: u64 },
    /// Has every commit acknowledged so far; each later one waits for it.
    Confirmed,
}

impl SyncTrust {
    /// One tick's look. `sync_in_force` must be read before `insert_lsn`.
    pub fn follow(
        &mut self,
        sync_in_force: bool,
        insert_lsn: u64,
        standby: Option<StandbySeen>,
    ) -> bool {
        let Some(seen) = standby.filter(|s| s.synchronous && sync_in_force) else {
            *self = SyncTrust::Untrusted;
            return false;
        };
        if *self == SyncTrust::Untrusted {
            *self = SyncTrust::CatchingUp {
                until_lsn: insert_lsn,
            };
        }
        if let SyncTrust::CatchingUp { until_lsn } = *self {
            if seen.flush_lsn >= until_lsn {
                *self = SyncTrust::Confirmed;
            }
        }
        *self == SyncTrust::Confirmed
    }
}
