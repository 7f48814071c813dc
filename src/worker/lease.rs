//! The conversation with the witness: the lease renewed (primary) or read (standby) every tick,
//! released when the standby is lost, taken before a promotion, and whether the witness can be
//! used at all.

use std::time::{Duration, Instant};

use keeper_core::{Lease, Level, Mode};
use pgrx::pg_sys;

use super::Worker;
use crate::actuators;
use crate::status;
use crate::witness::{LeaseRow, Witness};

/// While the witness cannot be used, the warning is repeated this often.
const WITNESS_WARNING_EVERY: Duration = Duration::from_secs(60);

impl Worker {
    /// (Re)makes the witness connection from the settings, and says so in the status.
    pub(super) fn connect_witness(&mut self) {
        // SAFETY: set at start-up from pg_control, before any worker starts.
        let system_identifier = unsafe { pg_sys::GetSystemIdentifier() };
        self.witness = self
            .settings
            .witness
            .as_deref()
            .map(|w| Witness::new(w, system_identifier));
        self.lease = None;
        self.witness_down_since = None;
        self.witness_warned_at = None;
        let shown = if self.witness.is_some() {
            "not contacted yet"
        } else {
            ""
        };
        status::publish(|s| s.witness.set(shown));
        let uses_witness = self.witness.is_some();
        status::publish_http(|h| {
            h.uses_witness = uses_witness;
            h.lease_mine = false;
        });
    }

    /// The primary renews the lease (recording its synchronous standby when it has one); a
    /// standby reads it. Nothing in the other modes, or without a witness.
    pub(super) fn observe_lease(
        &mut self,
        mode: Mode,
        in_recovery: bool,
        timeline: u32,
        synchronous_peer: bool,
    ) -> Lease {
        let Some((me, peer)) = self.names() else {
            return Lease::NotConfigured;
        };
        let primary = mode.is_master() && !in_recovery;
        let standby = matches!(mode, Mode::StandbyWaiting | Mode::StandbyConnected);
        let lease_time = self.settings.lease_time();
        let deadline = self.call_deadline();
        let Some(witness) = self.witness.as_mut() else {
            return Lease::NotConfigured;
        };
        let asked_at = status::now();
        let result = if primary {
            let sync = synchronous_peer.then_some(peer);
            witness.claim(me, timeline, sync, lease_time, deadline)
        } else if standby {
            witness.read(lease_time, deadline)
        } else {
            return Lease::NotConfigured;
        };
        self.witness_result(&result);
        // An unreachable witness changes nothing: the lease as last renewed runs out by itself.
        if let Ok(row) = &result {
            let held = row
                .as_ref()
                .filter(|r| primary && r.mine && !r.expired)
                .map(|r| r.ms_left);
            publish_lease(held, asked_at);
        }
        match result {
            Err(why) => Lease::Unreachable(self.scrub(&why)),
            Ok(None) => Lease::Missing,
            Ok(Some(row)) => {
                let lease = row.view(me, timeline, primary);
                let was_mine = self
                    .lease
                    .as_ref()
                    .is_some_and(|l| l.holder == me && l.epoch == row.epoch);
                if primary && row.mine && !was_mine {
                    self.event(
                        "lease_acquired",
                        Level::Log,
                        &format!(
                            "this primary holds the lease on the witness: {}",
                            row.describe()
                        ),
                        None,
                    );
                }
                if let (false, Lease::Peer { expired: false, .. }) = (primary, &lease) {
                    // A promotion held by the lease is looked at again as soon as it expires.
                    let left = Duration::from_millis(row.ms_left.max(0) as u64);
                    self.recheck_after = Some(left + Duration::from_millis(20));
                }
                self.lease = Some(row);
                lease
            }
        }
    }

    /// Follows whether the witness can be used: a warning when it cannot (repeated every
    /// minute), a line when it can again, and the lease or the reason in the status.
    fn witness_result(&mut self, result: &Result<Option<LeaseRow>, String>) {
        let now = Instant::now();
        match result {
            Ok(row) => {
                if let Some(since) = self.witness_down_since.take() {
                    self.witness_warned_at = None;
                    self.event(
                        "witness_reachable",
                        Level::Log,
                        &format!(
                            "the witness is usable again after {} s",
                            since.elapsed().as_secs()
                        ),
                        None,
                    );
                }
                let shown = row
                    .as_ref()
                    .map_or("no lease yet".to_string(), LeaseRow::describe);
                status::publish(|s| s.witness.set(&shown));
            }
            Err(why) => {
                let since = *self.witness_down_since.get_or_insert(now);
                let why = self.scrub(why);
                let due = self
                    .witness_warned_at
                    .is_none_or(|t| now.duration_since(t) >= WITNESS_WARNING_EVERY);
                if due {
                    self.witness_warned_at = Some(now);
                    let hint = if self.keeper.mode().is_master() {
                        "Until it is back, this primary cannot switch to asynchronous replication: if the standby is lost, commits wait for it, and after three keepalive_times without either this primary stops serving."
                    } else {
                        "Until it is back, this standby cannot take the lease: it does not promote if the primary is lost."
                    };
                    let message = if self.witness_warned_at == Some(since) {
                        format!("cannot use the witness: {why}")
                    } else {
                        format!(
                            "still cannot use the witness after {} s: {why}",
                            since.elapsed().as_secs()
                        )
                    };
                    self.event("witness_unreachable", Level::Warning, &message, Some(hint));
                }
                let shown = format!("unusable for {} s: {why}", since.elapsed().as_secs());
                status::publish(|s| s.witness.set(&shown));
            }
        }
    }

    /// What a change of the lease needs: this node's name, the lease time, this server's
    /// timeline and a deadline.
    fn lease_change(&self) -> Result<(&'static str, Duration, u32, Instant), String> {
        let (me, _) = self.names().ok_or("this node is not identified")?;
        Ok((
            me,
            self.settings.lease_time(),
            actuators::timeline(),
            Instant::now() + self.settings.keepalive_time,
        ))
    }

    /// Records on the witness that this primary has no synchronous standby.
    pub(super) fn release_standby(&mut self) -> Result<(), String> {
        let (me, lease_time, timeline, deadline) = self.lease_change()?;
        let Some(witness) = self.witness.as_mut() else {
            return Ok(());
        };
        let result = witness.claim(me, timeline, None, lease_time, deadline);
        self.witness_result(&result);
        match result? {
            Some(row) if row.mine => {
                self.event(
                    "lease_released_standby",
                    Level::Log,
                    &format!(
                        "recorded on the witness that no standby is synchronous: {}",
                        row.describe()
                    ),
                    None,
                );
                Ok(())
            }
            Some(row) => Err(format!(
                "this primary does not hold the lease: {}",
                row.describe()
            )),
            None => Err("the witness holds no lease".into()),
        }
    }

    /// Takes the lease on the witness for this standby before it promotes.
    pub(super) fn take_lease(&mut self) -> Result<(), String> {
        let (me, lease_time, timeline, deadline) = self.lease_change()?;
        let Some(witness) = self.witness.as_mut() else {
            return Ok(());
        };
        let row = witness.take(me, timeline, lease_time, deadline)?;
        self.event(
            "lease_taken",
            Level::Log,
            &format!("took the lease on the witness: {}", row.describe()),
            None,
        );
        status::publish(|s| s.witness.set(&row.describe()));
        self.lease = Some(row);
        Ok(())
    }
}

/// Tells the HTTP listener whether this primary holds the lease and until when: `ms_left` as
/// the witness answered, counted from before the statement was sent.
fn publish_lease(ms_left: Option<i64>, asked_at: i64) {
    status::publish_http(|h| {
        h.lease_mine = ms_left.is_some();
        h.lease_expires_at = asked_at + ms_left.unwrap_or(0).max(0) * 1000;
    });
}
