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

/// Whether commits wait for a synchronous standby now, from the byte of PostgreSQL's
/// `WalSndCtlData` that the checkpointer sets from `synchronous_standby_names` (read by the
/// worker), the running server's `server_version_num`, and this process's own copy of the
/// setting (`own_setting`).
///
/// The minor releases of May 2025 (14.18, 15.13, 16.9, 17.5; 18 from the start) turned that
/// byte, `bool sync_standbys_defined`, into the flags `sync_standbys_status` at the same place:
/// `SYNC_STANDBY_INIT` (the checkpointer has processed the setting once) and
/// `SYNC_STANDBY_DEFINED`. Before the checkpointer has processed it, backends go by their own
/// copy, and so does this. A library built against a newer minor's headers may run on an older
/// server of the same major, where the byte is the bool.
pub fn sync_standbys_in_force(byte: u8, server_version_num: i64, own_setting: bool) -> bool {
    const SYNC_STANDBY_INIT: u8 = 1 << 0;
    const SYNC_STANDBY_DEFINED: u8 = 1 << 1;
    let first_with_flags = match server_version_num / 10_000 {
        ..=13 => i64::MAX,
        14 => 140_018,
        15 => 150_013,
        16 => 160_009,
        17 => 170_005,
        _ => 0,
    };
    if server_version_num < first_with_flags {
        byte != 0
    } else if byte & SYNC_STANDBY_INIT == 0 {
        own_setting
    } else {
        byte & SYNC_STANDBY_DEFINED != 0
    }
}

#[cfg(test)]
mod layout_tests {
    use super::sync_standbys_in_force as in_force;

    #[test]
    fn the_byte_is_read_as_flags_from_the_minor_that_made_it_flags() {
        // INIT | DEFINED, INIT alone, not yet initialised.
        for v in [
            140_018, 150_013, 150_020, 160_009, 170_005, 170_011, 180_000, 180_006,
        ] {
            assert!(in_force(0b11, v, false), "{v}");
            assert!(!in_force(0b01, v, true), "{v}");
            assert!(in_force(0b00, v, true), "{v}");
            assert!(!in_force(0b00, v, false), "{v}");
        }
    }

    #[test]
    fn before_that_minor_the_byte_is_the_bool_sync_standbys_defined() {
        for v in [140_017, 150_012, 150_000, 160_008, 170_004, 130_020] {
            assert!(in_force(1, v, false), "{v}");
            assert!(!in_force(0, v, true), "{v}");
        }
    }
}
