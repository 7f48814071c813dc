//! What one tick observes, turned into the core's [`Observation`]: the primary's replication
//! view, the heartbeat's facts, this standby's WAL receiver and the name it streams under.

use keeper_core::{Input, Level, Observation, ReplicationView, ReservedSlots};

use super::Worker;
use crate::actuators;
use crate::conninfo::Conninfo;
use crate::db;
use crate::heartbeat::Beat;
use crate::identity;
use crate::server_views;
use crate::settings::Settings;
use crate::status;

/// The primary's replication view this tick, for the core.
#[derive(Default)]
struct ReplicationSummary {
    /// Commits wait for the synchronous standby now (read first).
    sync_in_force: bool,
    /// The WAL insert position (read after `sync_in_force`, before the view).
    insert_lsn: u64,
    /// What the streaming standbys say (the core picks the peer's row).
    view: ReplicationView,
}

impl Worker {
    /// Everything this tick observes, in order, as the core's input: the replication view
    /// (primary), the heartbeat, the WAL receiver (standby), the trust in the standby and the
    /// lease. None when the heartbeat was interrupted by a shutdown.
    pub(super) fn observe(&mut self, tick_started_ms: u64, in_recovery: bool) -> Option<Input> {
        self.problems.replication = None;
        let mode = self.keeper.mode();
        let sync_configured = !db::setting(c"synchronous_standby_names").trim().is_empty();
        let replication = if mode.is_master() && !in_recovery {
            self.read_replication_view(sync_configured)
        } else {
            ReplicationSummary::default()
        };
        if replication.view.streaming {
            if let Err(why) = server_views::pulse() {
                self.note_once(
                    Level::Warning,
                    format!("could not write the keeper's WAL pulse: {why}"),
                    Some("Without it, an idle pair's replication evidence can look stale."),
                );
            }
        }
        let asker = if in_recovery {
            own_application_name()
        } else {
            String::new()
        };
        let mut reserved = None;
        let beat = if mode.heartbeats() {
            let deadline = self.call_deadline();
            let peer = self.peer.as_mut()?;
            peer.set_asker(&asker);
            let mut beat = peer.beat(deadline);
            if beat == Beat::Interrupted {
                return None;
            }
            // On a new connection, ask once whether the heartbeat's user could still get in
            // were the peer full (a reserved slot).
            if let Beat::Answered(f) = &beat {
                if !identity::is_me(f) && peer.take_new_connection() {
                    reserved = Some((peer.reserved_slots(deadline), f.in_recovery));
                }
            }
            if matches!(&beat, Beat::Answered(f) if identity::is_me(f)) {
                // The peer's conninfo now reaches this very server (a moved address, say): that
                // is no answer from the peer.
                beat =
                    Beat::NoAnswer("the heartbeat reached this server itself, not the peer".into());
            }
            self.publish_beat(&beat);
            Some(beat)
        } else {
            None
        };
        if let Some((slots, peer_in_recovery)) = reserved {
            self.follow_reserved_slots(slots, peer_in_recovery);
        }
        let facts = match &beat {
            Some(Beat::Answered(f)) => Some(f),
            _ => None,
        };
        // Announced between ticks (the kept session was ended), or during this tick's heartbeat.
        let during_tick = self.peer.as_mut().is_some_and(|p| p.take_announcement());
        let announced = self
            .peer_announced_shutdown_ms
            .take()
            .or(during_tick.then_some(tick_started_ms));
        let my_timeline = actuators::timeline();
        let wal_receiver_recent =
            in_recovery && server_views::wal_receiver_recent(self.failure_window_ms());
        let answered_by_primary = facts.is_some_and(|f| in_recovery && !f.in_recovery);
        let listed = facts.is_some_and(|f| f.sync_state_of_asker.is_some());
        if self
            .keeper
            .unlisted_standby(answered_by_primary, listed, wal_receiver_recent)
        {
            self.note_once(
                Level::Warning,
                format!(
                    "the primary does not show this standby (application_name '{asker}') in pg_stat_replication to the heartbeat's user, so this standby cannot know it is synchronous and will not promote"
                ),
                Some("Use a superuser or a member of pg_monitor in the node conninfos, and set application_name in primary_conninfo."),
            );
        }
        let sync_standby_now = self.keeper.lease_names_standby(
            replication.sync_in_force,
            replication.insert_lsn,
            replication.view.peer,
        );
        self.publish_trust(self.keeper.trusts_standby());
        let lease = self.observe_lease(mode, in_recovery, my_timeline, sync_standby_now);
        let obs = Observation {
            now_ms: self.now_ms(),
            tick_started_ms,
            in_recovery,
            sync_configured,
            standby_streaming: replication.view.streaming,
            heartbeat: beat.as_ref().and_then(Beat::for_core),
            restore_wanted: self.settings.sync_restore
                && (Settings::saved_sync_names().is_some()
                    || Settings::saved_standby_slots().is_some()),
            standby_replies_recent: replication.view.peer_replies_recent,
            standby_caught_up: replication.view.caught_up,
            wal_receiver_recent,
            lease,
            peer_announced_shutdown_ms: announced,
            heartbeat_timed_out: matches!(beat, Some(Beat::Late(_))),
            ..Observation::default()
        };
        let answer = facts.map(|f| keeper_core::PeerAnswer {
            in_recovery: f.in_recovery,
            timeline: f.timeline,
            sync_state_of_asker: f.sync_state_of_asker.clone(),
            uses_witness: f.uses_witness,
            trusted_standby: f.trusted_standby.clone(),
        });
        let me = self.names().map_or("", |(me, _)| me);
        Some(Input::Tick(obs.with_answer(
            answer.as_ref(),
            my_timeline,
            me,
        )))
    }

    /// Warns, once per change, when the heartbeat's user cannot use a reserved connection slot
    /// on the peer (keeper_core::ReservedSlots says when, and what to do).
    fn follow_reserved_slots(
        &mut self,
        slots: Result<ReservedSlots, String>,
        peer_in_recovery: bool,
    ) {
        let Some(id) = &self.identity else {
            return;
        };
        let role = if peer_in_recovery {
            "standby"
        } else {
            "primary"
        };
        let server = format!("{role} {}", id.peer_display());
        match slots {
            Ok(slots) => match slots.advice(&server, id.peer_name) {
                Some(a) if self.reserved_note.as_ref() != Some(&a.message) => {
                    self.event(
                        "configuration_problem",
                        Level::Warning,
                        &a.message,
                        Some(&a.hint),
                    );
                    self.reserved_note = Some(a.message);
                }
                Some(_) => {}
                None => self.reserved_note = None,
            },
            Err(why) => self.log(
                Level::Debug,
                &format!("could not ask {server} about its reserved connection slots: {why}"),
                None,
            ),
        }
    }

    /// Reads `pg_stat_replication` and says what matters to the core; unusual set-ups (a second
    /// standby, a standby that synchronous_standby_names does not name) are warned about once
    /// per change.
    fn read_replication_view(&mut self, sync_configured: bool) -> ReplicationSummary {
        // The order matters (see keeper_core::SyncTrust): in force, then insert position, then
        // the standbys' flush positions.
        let sync_in_force = db::sync_in_force(sync_configured);
        let insert_lsn = db::insert_lsn();
        let standbys = match server_views::streaming_standbys() {
            Ok(s) => s,
            Err(why) => {
                status::publish_http(|h| h.standby_lag_bytes = -1);
                self.note_once(
                    Level::Warning,
                    format!("could not read pg_stat_replication: {why}"),
                    None,
                );
                return ReplicationSummary::default();
            }
        };
        let names = || {
            standbys
                .iter()
                .map(|s| format!("'{}' ({})", s.application_name, s.sync_state))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let synchronous = standbys.iter().any(|s| s.is_synchronous());
        if standbys.len() > 1 {
            let peer = self
                .identity
                .as_ref()
                .map(|i| i.peer_display())
                .unwrap_or_default();
            self.note_once(
                Level::Warning,
                format!(
                    "{} standbys are streaming: {}; pg_keeper protects one pair and heartbeats {peer} only",
                    standbys.len(),
                    names()
                ),
                Some("Losing the peer switches replication to asynchronous even if another standby streams."),
            );
        } else if sync_configured
            && !standbys.is_empty()
            // A standby that has not yet reported a flush position is shown 'potential' for its
            // first moments on the stream; that is no misconfiguration.
            && standbys.iter().all(|s| s.flush_lsn.is_some())
            && !synchronous
        {
            self.note_once(
                Level::Warning,
                format!(
                    "standby {} is streaming but is not synchronous; synchronous_standby_names is '{}'",
                    names(),
                    db::setting(c"synchronous_standby_names")
                ),
                Some("Set application_name in the standby's primary_conninfo to a name listed in synchronous_standby_names."),
            );
        } else {
            self.last_note = None;
        }
        let peer_name = self.identity.as_ref().map(|i| i.peer_name);
        let lag = keeper_core::peer_row(&standbys, peer_name)
            .and_then(|r| r.lag_bytes)
            .unwrap_or(-1);
        status::publish_http(|h| h.standby_lag_bytes = lag);
        ReplicationSummary {
            sync_in_force,
            insert_lsn,
            view: ReplicationView::of(
                &standbys,
                peer_name,
                sync_configured,
                self.failure_window_ms(),
                self.settings.sync_restore_lag_bytes,
            ),
        }
    }
}

/// The application_name under which this server streams as a standby (from primary_conninfo,
/// else cluster_name, as the WAL receiver does), to find itself in the primary's
/// pg_stat_replication.
fn own_application_name() -> String {
    let from_conninfo = Conninfo::parse(&db::setting(c"primary_conninfo"))
        .ok()
        .and_then(|c| c.get("application_name").map(str::to_string))
        .filter(|n| !n.is_empty());
    from_conninfo
        .or_else(|| Some(db::setting(c"cluster_name")).filter(|n| !n.is_empty()))
        .unwrap_or_else(|| "walreceiver".to_string())
}
