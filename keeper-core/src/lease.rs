//! The lease on the witness, as the core reasons about it: the row every witness statement
//! returns, and what it means for this node. The statements themselves (compare-and-set SQL)
//! live in the worker; `keeper-sim` models them with the same semantics.

use crate::Lease;

/// The lease row as the witness returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRow {
    pub holder: String,
    pub epoch: i64,
    pub timeline: i64,
    pub sync_standby: Option<String>,
    /// Expired on the witness's clock.
    pub expired: bool,
    /// Milliseconds until it expires (negative: since it expired).
    pub ms_left: i64,
    /// The statement renewed or took the lease for this node.
    pub mine: bool,
    /// The holder took the lease as a standby, to promote, and has not renewed it as a primary
    /// since.
    pub promoting: bool,
    /// The `system_identifier` of the cluster whose lease this is (`None`: written by an
    /// earlier version, before the row recorded it).
    pub system_identifier: Option<String>,
}

impl LeaseRow {
    /// One line for the status and the log.
    pub fn describe(&self) -> String {
        let sync = self.sync_standby.as_deref().unwrap_or("none");
        let when = if self.expired {
            format!("expired {} ms ago", -self.ms_left)
        } else {
            format!("valid for {} ms", self.ms_left)
        };
        format!(
            "lease held by {} (epoch {}, timeline {}, synchronous standby {sync}), {when}",
            self.holder, self.epoch, self.timeline
        )
    }

    /// Why the row is not this cluster's (`system_identifier` of this server), if it is not:
    /// another pair uses the same witness database, or a pair that no longer exists left it.
    /// Such a row is never obeyed (every statement also compares it).
    pub fn foreign(&self, system_identifier: &str) -> Option<String> {
        match &self.system_identifier {
            Some(theirs) if theirs != system_identifier => Some(format!(
                "the lease on the witness belongs to another cluster (system identifier {theirs}; this cluster's is {system_identifier})"
            )),
            _ => None,
        }
    }

    /// What the row means for node `me` on `timeline`. A primary holds the lease when this
    /// tick's renewal went through (`mine`); a standby when it is the holder (it took the lease
    /// to promote).
    pub fn view(&self, me: &str, timeline: u32, primary: bool) -> Lease {
        let held = if primary {
            self.mine
        } else {
            self.holder == me
        };
        if held && !primary && self.promoting {
            return Lease::Taken;
        }
        if held {
            return Lease::Held;
        }
        Lease::Peer {
            // The same name on a later timeline is a newer incarnation of this node: superseded
            // too.
            newer: self.timeline >= timeline as i64 || self.holder == me,
            expired: self.expired,
            names_me: self.sync_standby.as_deref() == Some(me),
        }
    }
}

/// The margin of [`lease_time_ms`] over three intervals.
pub const LEASE_MARGIN_MS: u64 = 200;

/// How long a lease lasts on the witness's clock, in milliseconds: three `keepalive_time`s and
/// a margin, whatever `keepalive_count`. A live primary renews at least that often: a tick
/// starts every interval, and its heartbeat and its renewal each answer within one interval or
/// give up, so two successful renewals are at most three intervals apart; the margin covers the
/// worker's scheduling and the statement's round trip. Safety does not rest on this length
/// (the compare-and-set does); it only decides how soon the standby of a dead primary may take
/// over, which is then about when it has counted its failures anyway.
pub fn lease_time_ms(keepalive_time_ms: u64) -> u64 {
    keepalive_time_ms
        .saturating_mul(3)
        .saturating_add(LEASE_MARGIN_MS)
}
