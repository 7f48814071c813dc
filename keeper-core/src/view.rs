//! What the primary's replication view (`pg_stat_replication`) says for the core: which row is
//! the peer's, whether a standby streams as required, and whether one has caught up.

use crate::StandbySeen;

/// One row of the primary's `pg_stat_replication` in state `streaming`, as the worker read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StandbyRow {
    pub application_name: String,
    pub sync_state: String,
    /// Bytes of WAL the standby has yet to flush; `None` before it has reported.
    pub lag_bytes: Option<i64>,
    /// The standby's flush position, as an LSN; `None` before it has reported.
    pub flush_lsn: Option<u64>,
    /// Milliseconds since the standby's last reply on the stream; `None` before its first.
    pub reply_age_ms: Option<i64>,
}

impl StandbyRow {
    /// `sync_state` is `sync` or `quorum`: commits wait for it.
    pub fn is_synchronous(&self) -> bool {
        matches!(self.sync_state.as_str(), "sync" | "quorum")
    }
}

/// The peer's row among the streaming standbys: the peer streams under its node name (the
/// README: `application_name` in `primary_conninfo`); a single standby under another name is
/// taken for it. With several and none under the peer's name, none is the peer.
pub fn peer_row<'a>(standbys: &'a [StandbyRow], peer_name: Option<&str>) -> Option<&'a StandbyRow> {
    standbys
        .iter()
        .find(|s| Some(s.application_name.as_str()) == peer_name)
        .or(if standbys.len() == 1 {
            standbys.first()
        } else {
            None
        })
}

/// What the replication view says this tick.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicationView {
    /// A standby is streaming (a synchronous one when synchronous_standby_names is set): see
    /// [`crate::Observation::standby_streaming`].
    pub streaming: bool,
    /// A streaming standby is within `pg_keeper.sync_restore_lag`.
    pub caught_up: bool,
    /// The peer's row ([`peer_row`]), once it has reported a flush position.
    pub peer: Option<StandbySeen>,
    /// The peer replied on its stream within the failure window.
    pub peer_replies_recent: bool,
}

impl ReplicationView {
    /// Reads the streaming standbys for the peer `peer_name`, with `synchronous_standby_names`
    /// set or not, the failure window and `pg_keeper.sync_restore_lag` (both as the worker
    /// measures them: milliseconds and bytes).
    pub fn of(
        standbys: &[StandbyRow],
        peer_name: Option<&str>,
        sync_configured: bool,
        failure_window_ms: i64,
        restore_lag_bytes: i64,
    ) -> ReplicationView {
        let peer = peer_row(standbys, peer_name);
        ReplicationView {
            streaming: standbys
                .iter()
                .any(|s| !sync_configured || s.is_synchronous()),
            caught_up: standbys
                .iter()
                .any(|s| s.lag_bytes.is_some_and(|lag| lag <= restore_lag_bytes)),
            peer: peer.and_then(|s| {
                s.flush_lsn.map(|flush_lsn| StandbySeen {
                    synchronous: sync_configured && s.is_synchronous(),
                    flush_lsn,
                })
            }),
            peer_replies_recent: peer
                .and_then(|s| s.reply_age_ms)
                .is_some_and(|age| age <= failure_window_ms),
        }
    }
}
