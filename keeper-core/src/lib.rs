//! The decision core of pg_keeper_rs.
//!
//! This crate knows nothing of PostgreSQL, pgrx or libpq. The worker observes the world
//! (recovery state, the replication view, a heartbeat to the peer), turns what it saw into an
//! [`Input`] and asks [`Keeper::step`] what to do. The answer is a [`Decision`]: the next
//! [`Mode`], the [`Action`]s to perform in order, and one plain sentence saying what was decided
//! and why. Every legal move is a row of [`TRANSITIONS`]; a move that is not in the table does not
//! happen. Every safety rule (when to switch to async, when a standby may promote) lives here.
//!
//! Today the keeper protects one pair: a primary and one standby, its peer. A later primary
//! with two standbys would fit like this. The worker already hands over every streaming
//! standby ([`StandbyRow`]) and the core picks the peer's row ([`peer_row`]); with two peers
//! the core would follow one [`SyncTrust`] and one failure count per standby (what
//! [`StandbySeen`] describes is already one standby's row), the primary's modes would say which
//! standbys are connected, the lease would name the standby that is trusted as synchronous (it
//! records one name already), and the switch to async would wait until every synchronous
//! standby is lost. A standby's rules (its own WAL receiver, the lease naming it,
//! [`Keeper::unlisted_standby`]) are already about this one standby and would not change.

use std::fmt;

mod lease;
mod reserved;
mod trust;
mod view;
pub use lease::{lease_time_ms, LeaseRow, LEASE_MARGIN_MS};
pub use reserved::{ReservedAdvice, ReservedSlots};
pub use trust::{StandbySeen, SyncTrust};
pub use view::{peer_row, sync_standbys_in_force, ReplicationView, StandbyRow};

/// What the keeper is doing. The process title, the log and the status all show this one value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// This node has not yet been matched to `node1_conninfo` or `node2_conninfo`.
    Unidentified,
    /// Primary, no standby has streamed since the keeper started.
    MasterWaiting,
    /// Primary, heartbeating a streaming standby.
    MasterConnected,
    /// Primary whose standby was lost (or which was just promoted): replication is asynchronous
    /// and the keeper waits for a standby to stream again.
    MasterAsync,
    /// Standby that has not yet seen the primary answer since it started: failover is not armed.
    StandbyWaiting,
    /// Standby heartbeating a live primary: failover is armed.
    StandbyConnected,
    /// Standby that asked its server to promote and waits for recovery to end.
    Promoting,
    /// A primary that found the other node primary on a newer timeline: it has shut its server
    /// down, to start again only as a standby.
    Fenced,
    /// A primary that has reached neither its standby nor the witness for nearly the lease
    /// time, while the lease may name the standby: it refuses every session, strictly before the
    /// standby may take the lease, and serves again when it reaches either of them.
    Isolated,
}

impl Mode {
    /// The text shown in the process title inside `pg_keeper (...)`.
    pub fn title(self) -> &'static str {
        match self {
            Mode::Unidentified => "starting",
            Mode::MasterWaiting => "master mode",
            Mode::MasterConnected => "master mode:connected",
            Mode::MasterAsync => "master mode:async",
            Mode::StandbyWaiting => "standby mode",
            Mode::StandbyConnected => "standby mode:connected",
            Mode::Promoting => "standby mode:promoting",
            Mode::Fenced => "fenced",
            Mode::Isolated => "master mode:isolated",
        }
    }

    pub fn is_master(self) -> bool {
        matches!(
            self,
            Mode::MasterWaiting | Mode::MasterConnected | Mode::MasterAsync | Mode::Isolated
        )
    }

    /// Whether the worker heartbeats the peer in this mode. A primary heartbeats even without a
    /// standby, to find out if the other node has become a primary on a newer timeline; an
    /// isolated one, to find out when it reaches the standby again.
    pub fn heartbeats(self) -> bool {
        matches!(
            self,
            Mode::MasterWaiting
                | Mode::MasterConnected
                | Mode::MasterAsync
                | Mode::StandbyWaiting
                | Mode::StandbyConnected
                | Mode::Isolated
        )
    }

    /// Whether failed heartbeats are counted toward an action in this mode.
    pub fn counts_failures(self) -> bool {
        matches!(self, Mode::MasterConnected | Mode::StandbyConnected)
    }

    pub const ALL: [Mode; 9] = [
        Mode::Unidentified,
        Mode::MasterWaiting,
        Mode::MasterConnected,
        Mode::MasterAsync,
        Mode::StandbyWaiting,
        Mode::StandbyConnected,
        Mode::Promoting,
        Mode::Fenced,
        Mode::Isolated,
    ];
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.title())
    }
}

/// The event that `after_command` is told about in `PG_KEEPER_EVENT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AfterEvent {
    Promote,
    Async,
    SyncRestored,
}

impl AfterEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            AfterEvent::Promote => "promote",
            AfterEvent::Async => "async",
            AfterEvent::SyncRestored => "sync_restored",
        }
    }
}

/// Something the worker must do, in the order given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Save `synchronous_standby_names`, set it to `''` the way ALTER SYSTEM does, and reload.
    DegradeToAsync,
    /// Ask this server to leave recovery.
    Promote,
    /// Put back the `synchronous_standby_names` saved by `DegradeToAsync`, and reload.
    RestoreSync,
    /// Stop this server so that it can start again only as a standby.
    Fence,
    /// Record on the witness, under this primary's lease, that no standby is synchronous: from
    /// then on the standby cannot take the lease. Nothing to do without a witness.
    ReleaseStandby,
    /// Take the witness lease (expired, naming this standby as synchronous) with a new epoch.
    /// Nothing to do without a witness.
    TakeLease,
    /// End (terminate, not cancel) the sessions whose commits wait for the synchronous standby:
    /// a cancelled wait is reported to the client as a commit, with only a WARNING that it might
    /// not be replicated; a terminated session gets no answer to its COMMIT.
    EndWaitingCommits,
    /// Refuse every new session (physical replication excepted) and end every session: an
    /// isolated primary serves neither writes nor reads that could be stale. Idempotent.
    StopServing,
    /// Accept sessions again.
    ResumeServing,
    /// Start the rejoin process (`pg_keeper.auto_rejoin`): once this superseded server has
    /// stopped, it rewinds it from the new primary and starts it as its standby. Comes right
    /// before [`Action::Fence`], which stops the server; never for a node the witness lease names
    /// as its holder.
    Rejoin,
    /// (Standby.) Wake the startup process so that it starts the WAL receiver at once instead
    /// of after `wal_retrieve_retry_interval`: the primary is back after a planned restart and
    /// its commits wait for this standby. Idempotent, changes nothing else.
    WakeWalReceiver,
    /// Start `pg_keeper.after_command` for this event (when one is set).
    RunAfterCommand(AfterEvent),
}

impl Action {
    /// Whether the action changes the cluster (and so is held back while paused).
    pub fn changes_the_cluster(&self) -> bool {
        matches!(
            self,
            DegradeToAsync | Promote | RestoreSync | ReleaseStandby | TakeLease | EndWaitingCommits
        )
    }
}

/// How loudly a decision is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Nothing new: not worth a line at the default log level.
    Debug,
    Log,
    Warning,
}

/// What one heartbeat to the peer found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heartbeat {
    /// The peer ran the heartbeat query.
    Answered,
    /// The peer answered but refused the session (too many clients, starting up, shutting down,
    /// authentication failed). It is alive, so this never counts toward failover.
    Refused(String),
    /// No answer: refused or reset connection, timeout, or the deadline passed.
    NoAnswer(String),
}

/// What the witness said this tick about the lease (see the README's "The witness").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Lease {
    /// No witness is configured: the lease plays no part.
    #[default]
    NotConfigured,
    /// The witness could not be reached, or its answer could not be read, or its lease is not
    /// this cluster's (see [`LeaseRow::foreign`]): it cannot be used.
    Unreachable(String),
    /// The witness holds no lease yet (a primary creates it on its first renewal).
    Missing,
    /// This node holds the lease. On a primary: renewed (or taken) this tick, so valid now.
    Held,
    /// (Standby.) This standby took the lease to promote, and has not promoted yet: a worker or
    /// a server restart came in between. The decision stands: it goes on with the promotion.
    Taken,
    /// The other node holds the lease.
    Peer {
        /// The holder recorded a timeline at least this node's: a primary that sees this was
        /// superseded (the holder took the lease to promote, or is a newer primary).
        newer: bool,
        /// The lease expired on the witness's clock.
        expired: bool,
        /// The lease names this node as the synchronous standby at its last renewal.
        names_me: bool,
    },
}

/// What the worker saw during one tick.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// Monotonic clock, milliseconds, when the observations are complete.
    pub now_ms: u64,
    /// Monotonic clock, milliseconds, when the tick began: its heartbeat and its lease
    /// statement were sent no earlier than this.
    pub tick_started_ms: u64,
    /// This server is in recovery (a standby).
    pub in_recovery: bool,
    /// `synchronous_standby_names` is not empty on this server.
    pub sync_configured: bool,
    /// (Primary only.) A standby is streaming and, when `synchronous_standby_names` is set, it is
    /// a synchronous one.
    pub standby_streaming: bool,
    /// The heartbeat made this tick, if one was due.
    pub heartbeat: Option<Heartbeat>,
    /// (Primary only.) The keeper switched to async earlier, a saved value is waiting to be put
    /// back, and `pg_keeper.sync_restore` is on.
    pub restore_wanted: bool,
    /// (Primary only.) A streaming standby is within `pg_keeper.sync_restore_lag`.
    pub standby_caught_up: bool,
    /// (Primary only.) The standby's replication replied within the failure window
    /// (`pg_stat_replication.reply_time`): it is alive and confirms WAL, whatever the heartbeat
    /// says. The primary writes a small WAL record every tick, so this holds on an idle pair too.
    pub standby_replies_recent: bool,
    /// (Standby only.) The WAL receiver streams and heard from the primary within the failure
    /// window (`keepalive_time x keepalive_count`): the primary is alive. The primary's keeper
    /// writes a small WAL record every tick, so this holds on an idle pair too.
    pub wal_receiver_recent: bool,
    /// (Standby only.) What the primary's answer said of this standby: synchronous (true), not
    /// synchronous (false), or nothing (None).
    pub peer_says_synchronous: Option<bool>,
    /// (Primary only.) The peer answered as a primary on a newer timeline than this server's.
    pub peer_newer_primary: bool,
    /// (Standby only.) What the primary's answer said of its own witness: configured (true),
    /// not (false), or nothing (None: no answer, or its settings are hidden from this user).
    pub peer_uses_witness: Option<bool>,
    /// The lease on the witness, as renewed (primary) or read (standby) this tick.
    pub lease: Lease,
    /// When (monotonic clock, milliseconds) the peer was last seen announcing a clean shutdown
    /// since the last tick (its server ended the kept session as a fast shutdown does, or
    /// refused the heartbeat as shutting down), if it was.
    pub peer_announced_shutdown_ms: Option<u64>,
    /// This tick's heartbeat waited out its deadline (a hung or unreachable peer, not one that
    /// refuses at once).
    pub heartbeat_timed_out: bool,
}

/// What the peer said of itself in its heartbeat answer, as the heartbeat query returns it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerAnswer {
    pub in_recovery: bool,
    /// The timeline it writes (a primary), if it said.
    pub timeline: Option<u32>,
    /// The `sync_state` it shows in `pg_stat_replication` for the asking standby, if that one
    /// streams from it.
    pub sync_state_of_asker: Option<String>,
    /// Its `pg_keeper.witness_conninfo` is set (None: hidden from the heartbeat's user).
    pub uses_witness: Option<bool>,
    /// (A primary.) Whom its keeper trusts as the synchronous standby ([`SyncTrust`], the same
    /// rule as for the lease): `Some("")` nobody, `None` not said (no keeper there, or hidden
    /// from the heartbeat's user).
    pub trusted_standby: Option<String>,
}

impl Observation {
    /// Fills in what the peer's answer (if it answered) means for this node (`me`, its node
    /// name), on `my_timeline` and in recovery or not: whether it counts this standby as
    /// synchronous (listed as `sync`, and trusted by its keeper when that says whom it trusts:
    /// a standby back from async is listed `sync` before it holds what was acknowledged without
    /// it), whether it is a newer primary, whether it uses a witness.
    pub fn with_answer(
        mut self,
        answer: Option<&PeerAnswer>,
        my_timeline: u32,
        me: &str,
    ) -> Observation {
        let from_primary = answer.filter(|a| self.in_recovery && !a.in_recovery);
        self.peer_says_synchronous = from_primary.map(|a| {
            matches!(a.sync_state_of_asker.as_deref(), Some("sync" | "quorum"))
                && a.trusted_standby.as_deref().is_none_or(|t| t == me)
        });
        self.peer_uses_witness = from_primary.and_then(|a| a.uses_witness);
        self.peer_newer_primary = answer.is_some_and(|a| {
            !self.in_recovery && !a.in_recovery && a.timeline.is_some_and(|t| t > my_timeline)
        });
        self
    }
}

/// One input to the core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// The worker matched this server to one of the two conninfos.
    Identified { in_recovery: bool },
    /// The worker could not (yet) tell which node this server is.
    IdentityProblem(String),
    /// A tick's observations.
    Tick(Observation),
    /// An action of the last decision failed; the reason is for the log.
    ActionFailed(Action, String),
}

/// The events the transition table is keyed on. The core derives exactly one from each input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    IdentifiedAsMaster,
    IdentifiedAsStandby,
    IdentityProblem,
    /// Nothing of interest this tick.
    Idle,
    StandbyStreaming,
    HeartbeatOk,
    HeartbeatRefused,
    /// A failed heartbeat, below `keepalive_count`.
    HeartbeatFailed,
    /// `keepalive_count` consecutive failures with synchronous replication configured.
    PeerLostSync,
    /// `keepalive_count` consecutive failures with replication already asynchronous.
    PeerLostAsync,
    /// `keepalive_count` consecutive failures of the primary, seen by a standby.
    PeerLost,
    /// The standby answered and has caught up, and a saved synchronous setting waits.
    StandbyCaughtUp,
    /// The primary stopped answering heartbeats but this standby's WAL receiver still hears
    /// from it: only the heartbeat path is broken.
    PeerLostButStreaming,
    /// The primary is lost but this standby was not synchronous at the last answer: promoting
    /// could lose acknowledged commits.
    PeerLostNotSynchronous,
    /// The other node is a primary on a newer timeline: this primary was superseded.
    Superseded,
    /// The witness lease names the other node with a timeline at least this one's: this primary
    /// was superseded (the other node took the lease to promote).
    SupersededByLease,
    /// The standby is lost, but this primary could not renew its lease on the witness this
    /// tick, so it may not switch to asynchronous replication.
    PeerLostNoLease,
    /// The primary is lost, but the witness lease cannot be taken (not expired, not naming this
    /// standby, missing, or the witness cannot be reached).
    PeerLostLeaseWithheld,
    /// Recording on the witness that no standby is synchronous failed.
    ReleaseFailed,
    /// Taking the lease on the witness failed (taken by someone else, or the witness is gone).
    TakeFailed,
    FenceFailed,
    RestoreFailed,
    EndWaitingFailed,
    /// (Primary.) Neither the standby nor the witness answered for nearly the lease time, and
    /// the lease may name the standby: it may take the lease soon.
    Isolated,
    /// (Isolated.) Still neither.
    StillIsolated,
    /// (Isolated.) The witness renewed the lease, or the standby answered.
    ContactRegained,
    StopServingFailed,
    ResumeFailed,
    /// The rejoin process could not be started: the fence goes on, and an operator rejoins.
    RejoinFailed,
    /// The primary has not answered yet since this standby started; failover is not armed.
    PeerNotYetSeen,
    /// (Standby.) The primary announced a clean shutdown less than `restart_grace_ms` ago and
    /// has not answered since: a planned restart, so failed heartbeats are not counted yet.
    PeerRestarting,
    /// (Standby.) The primary answers again after announcing a clean shutdown, and this
    /// standby's WAL receiver does not stream yet: wake it.
    PeerBack,
    /// (Standby.) Still waiting for the WAL receiver to stream again after the primary's
    /// restart: wake it again (a wake-up can land while the startup process is busy).
    PeerBackNotStreaming,
    /// This standby took the lease to promote before a restart: it goes on with the promotion.
    PromotionUnfinished,
    /// The primary is lost, and it uses a witness that this standby does not: promoting without
    /// the lease could give two primaries.
    PeerLostWitnessMismatch,
    RecoveryEnded,
    PromotionSlow,
    DegradeFailed,
    PromoteFailed,
    AfterCommandFailed,
}

/// One legal move.
#[derive(Debug)]
pub struct Transition {
    pub from: Mode,
    pub on: Event,
    pub to: Mode,
    pub actions: &'static [Action],
    pub level: Level,
    /// What the move means, the start of the sentence the log shows.
    pub says: &'static str,
}

const fn row(
    from: Mode,
    on: Event,
    to: Mode,
    actions: &'static [Action],
    level: Level,
    says: &'static str,
) -> Transition {
    Transition {
        from,
        on,
        to,
        actions,
        level,
        says,
    }
}

use Action::*;
use Event as E;
use Level::{Debug as Dbg, Log, Warning as Warn};
use Mode::*;

/// The witness is told first that no standby is synchronous any more: a commit acknowledged
/// asynchronously is then never behind a standby that could take the lease.
const ASYNC: &[Action] = &[
    ReleaseStandby,
    DegradeToAsync,
    RunAfterCommand(AfterEvent::Async),
];
/// The lease first: no promotion without it. Then promote before the switch to async: a reload
/// before the request would wake the startup process too early, and it could then sleep out
/// wal_retrieve_retry_interval before it sees the request.
const PROMOTE: &[Action] = &[TakeLease, Promote, DegradeToAsync];
/// The switch to async again: it is idempotent, and a worker restarted between the promotion
/// request and the switch would otherwise leave the new primary waiting for the old one.
const AFTER_PROMOTE: &[Action] = &[DegradeToAsync, RunAfterCommand(AfterEvent::Promote)];
const RESTORE: &[Action] = &[RestoreSync, RunAfterCommand(AfterEvent::SyncRestored)];
const FENCE: &[Action] = &[Fence];
/// Neither the standby nor the witness: no commit may be reported as done, not even one whose
/// wait a client cancels; every tick, the sessions waiting are ended.
const END_WAITING: &[Action] = &[EndWaitingCommits];
const STOP_SERVING: &[Action] = &[StopServing];
const RESUME_SERVING: &[Action] = &[ResumeServing];
const WAKE: &[Action] = &[WakeWalReceiver];
const NONE: &[Action] = &[];

/// Every legal move of the keeper. A (mode, event) pair that is not here leaves the mode as it is
/// and does nothing.
pub const TRANSITIONS: &[Transition] = &[
    // Start-up: which node am I, and what is my server doing?
    row(Unidentified, E::IdentifiedAsMaster, MasterWaiting, NONE, Log, "started in master mode as {me}; the peer is {peer}"),
    row(Unidentified, E::IdentifiedAsStandby, StandbyWaiting, NONE, Log, "started in standby mode as {me}; the peer is {peer}"),
    row(Unidentified, E::IdentityProblem, Unidentified, NONE, Warn, "cannot tell which node this server is"),
    // Primary.
    row(MasterWaiting, E::StandbyStreaming, MasterConnected, NONE, Log, "standby {peer} connected; heartbeating it"),
    row(MasterAsync, E::StandbyStreaming, MasterConnected, NONE, Log, "standby {peer} connected again; heartbeating it"),
    row(MasterConnected, E::HeartbeatOk, MasterConnected, NONE, Dbg, "standby {peer} answered"),
    row(MasterConnected, E::HeartbeatRefused, MasterConnected, NONE, Warn, "standby {peer} is alive but refused the heartbeat; not counted as a failure"),
    row(MasterConnected, E::HeartbeatFailed, MasterConnected, NONE, Log, "heartbeat to standby {peer} failed"),
    row(MasterConnected, E::PeerLostSync, MasterAsync, ASYNC, Log, "standby {peer} lost; switching to asynchronous replication"),
    row(MasterConnected, E::PeerLostAsync, MasterAsync, NONE, Log, "standby {peer} lost; replication is already asynchronous, nothing to switch"),
    row(MasterConnected, E::PeerLostButStreaming, MasterConnected, NONE, Log, "not switching to asynchronous replication: standby {peer} does not answer heartbeats but its replication still confirms WAL"),
    row(MasterConnected, E::PeerLostNoLease, MasterConnected, END_WAITING, Warn, "not switching to asynchronous replication: standby {peer} is lost but this primary could not renew its lease on the witness, so commits wait for the standby, and sessions already waiting are ended"),
    row(MasterConnected, E::EndWaitingFailed, MasterConnected, NONE, Warn, "could not end the sessions waiting for synchronous replication"),
    row(MasterAsync, E::ReleaseFailed, MasterConnected, NONE, Warn, "not switching to asynchronous replication: could not record on the witness that no standby is synchronous; will retry"),
    row(MasterAsync, E::DegradeFailed, MasterConnected, NONE, Warn, "could not switch to asynchronous replication; will retry"),
    row(MasterConnected, E::StandbyCaughtUp, MasterConnected, RESTORE, Log, "standby {peer} has caught up; restoring synchronous replication"),
    row(MasterConnected, E::RestoreFailed, MasterConnected, NONE, Warn, "could not restore synchronous replication; will retry"),
    row(MasterConnected, E::AfterCommandFailed, MasterConnected, NONE, Warn, "could not start after_command"),
    row(MasterAsync, E::AfterCommandFailed, MasterAsync, NONE, Warn, "could not start after_command"),
    // A primary cut off from both its standby and the witness stops serving before the standby
    // may take the lease (see the README's "An isolated primary").
    row(MasterWaiting, E::Isolated, Isolated, STOP_SERVING, Warn, ISOLATED_SAYS),
    row(MasterConnected, E::Isolated, Isolated, STOP_SERVING, Warn, ISOLATED_SAYS),
    row(MasterAsync, E::Isolated, Isolated, STOP_SERVING, Warn, ISOLATED_SAYS),
    row(Isolated, E::StillIsolated, Isolated, STOP_SERVING, Dbg, "still isolated; ending any session that began meanwhile"),
    row(Isolated, E::StopServingFailed, Isolated, NONE, Warn, "could not stop serving; will retry"),
    row(Isolated, E::ContactRegained, MasterConnected, RESUME_SERVING, Log, "serving again"),
    row(MasterConnected, E::ResumeFailed, Isolated, NONE, Warn, "could not accept sessions again; will retry"),
    // Standby.
    row(StandbyWaiting, E::HeartbeatOk, StandbyConnected, NONE, Log, "primary {peer} is alive; automatic failover is armed"),
    row(StandbyWaiting, E::HeartbeatRefused, StandbyConnected, NONE, Warn, "primary {peer} is alive but refused the heartbeat; automatic failover is armed"),
    row(StandbyWaiting, E::PeerNotYetSeen, StandbyWaiting, NONE, Log, "primary {peer} has not answered since this standby started; automatic failover is not armed until it does"),
    row(StandbyConnected, E::HeartbeatOk, StandbyConnected, NONE, Dbg, "primary {peer} answered"),
    // A planned restart of the primary is not a failover (see the README's "Planned restarts").
    row(StandbyConnected, E::PeerRestarting, StandbyConnected, NONE, Log, "primary {peer} announced a clean shutdown; not counting failed heartbeats for pg_keeper.restart_grace, so that a planned restart is not failed over"),
    row(StandbyConnected, E::PeerBack, StandbyConnected, WAKE, Log, "primary {peer} is back after its restart; starting this standby's WAL receiver at once"),
    row(StandbyConnected, E::PeerBackNotStreaming, StandbyConnected, WAKE, Dbg, "the WAL receiver does not stream yet; waking it again"),
    row(StandbyConnected, E::HeartbeatRefused, StandbyConnected, NONE, Warn, "primary {peer} is alive but refused the heartbeat; not counted as a failure"),
    row(StandbyConnected, E::HeartbeatFailed, StandbyConnected, NONE, Log, "heartbeat to primary {peer} failed"),
    row(StandbyConnected, E::PeerLost, Promoting, PROMOTE, Log, "primary {peer} lost; promoting this standby"),
    row(StandbyWaiting, E::PromotionUnfinished, Promoting, PROMOTE, Log, "this standby took the lease on the witness to promote before a restart; going on with the promotion"),
    row(StandbyConnected, E::PromotionUnfinished, Promoting, PROMOTE, Log, "this standby took the lease on the witness to promote before a restart; going on with the promotion"),
    row(StandbyConnected, E::PeerLostButStreaming, StandbyConnected, NONE, Log, "not promoting: primary {peer} does not answer heartbeats but this standby's WAL receiver still receives from it"),
    row(StandbyConnected, E::PeerLostLeaseWithheld, StandbyConnected, NONE, Warn, "not promoting: primary {peer} is lost but the lease on the witness cannot be taken"),
    row(StandbyConnected, E::PeerLostWitnessMismatch, StandbyConnected, NONE, Warn, "not promoting: primary {peer} is lost, and it uses a witness (pg_keeper.witness_conninfo) but this standby does not, so it cannot take the lease"),
    row(StandbyConnected, E::PeerLostNotSynchronous, StandbyConnected, NONE, Warn, "not promoting: primary {peer} is lost but this standby was not its synchronous standby at the last answer, so acknowledged commits could be lost (pg_keeper.allow_data_loss_failover = on promotes anyway)"),
    // A primary that finds the other node primary on a newer timeline was superseded.
    row(MasterWaiting, E::Superseded, Fenced, FENCE, Warn, "superseded: {peer} is a primary on a newer timeline; fencing this server"),
    row(MasterConnected, E::Superseded, Fenced, FENCE, Warn, "superseded: {peer} is a primary on a newer timeline; fencing this server"),
    row(MasterAsync, E::Superseded, Fenced, FENCE, Warn, "superseded: {peer} is a primary on a newer timeline; fencing this server"),
    row(MasterWaiting, E::SupersededByLease, Fenced, FENCE, Warn, "superseded: the lease on the witness names {peer}, on a timeline not older than this server's; fencing this server"),
    row(MasterConnected, E::SupersededByLease, Fenced, FENCE, Warn, "superseded: the lease on the witness names {peer}, on a timeline not older than this server's; fencing this server"),
    row(MasterAsync, E::SupersededByLease, Fenced, FENCE, Warn, "superseded: the lease on the witness names {peer}, on a timeline not older than this server's; fencing this server"),
    row(Isolated, E::Superseded, Fenced, FENCE, Warn, "superseded: {peer} is a primary on a newer timeline; fencing this server"),
    row(Isolated, E::SupersededByLease, Fenced, FENCE, Warn, "superseded: the lease on the witness names {peer}, on a timeline not older than this server's; fencing this server"),
    row(Fenced, E::FenceFailed, Fenced, NONE, Warn, "could not fence this server; stop it by hand"),
    row(Fenced, E::RejoinFailed, Fenced, FENCE, Warn, "could not start the rejoin process (pg_keeper.auto_rejoin); fencing this server anyway"),
    row(Promoting, E::DegradeFailed, Promoting, NONE, Warn, "could not switch to asynchronous replication after the promotion request; commits may wait for a synchronous standby until it is fixed"),
    row(Promoting, E::TakeFailed, StandbyConnected, NONE, Warn, "not promoting: could not take the lease on the witness; will retry"),
    row(Promoting, E::PromoteFailed, StandbyConnected, NONE, Warn, "promotion request failed; will retry"),
    row(Promoting, E::PromotionSlow, Promoting, &[Promote], Dbg, "server is still in recovery after the promotion request; asking again"),
    row(Promoting, E::RecoveryEnded, MasterAsync, AFTER_PROMOTE, Log, "promoted: {me} is now the master and {peer} is regarded as the standby"),
    row(Promoting, E::AfterCommandFailed, Promoting, NONE, Warn, "could not start after_command"),
    // Promoted by someone else (pg_ctl promote, pg_promote()).
    row(StandbyWaiting, E::RecoveryEnded, MasterWaiting, NONE, Log, "server was promoted outside pg_keeper; switching to master mode"),
    row(StandbyConnected, E::RecoveryEnded, MasterWaiting, NONE, Log, "server was promoted outside pg_keeper; switching to master mode"),
];

const ISOLATED_SAYS: &str = "isolated: this primary has reached neither standby {peer} nor the witness for nearly the lease time, so the standby may take the lease; refusing new sessions and ending every session until it reaches one of them";

/// Conditions that can repeat every tick: logged once per distinct reason.
const ONCE_PER_REASON: &[Event] = &[
    E::IdentityProblem,
    E::PeerRestarting,
    E::PeerNotYetSeen,
    E::HeartbeatRefused,
    E::PeerLostNotSynchronous,
    E::PeerLostNoLease,
    E::PeerLostLeaseWithheld,
    E::PeerLostWitnessMismatch,
];

/// Looks up the move for a mode and an event.
pub fn transition(from: Mode, on: Event) -> Option<&'static Transition> {
    TRANSITIONS.iter().find(|t| t.from == from && t.on == on)
}

/// Settings the core decides with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Consecutive failed heartbeats before acting (at least 1).
    pub keepalive_count: u32,
    /// `pg_keeper.keepalive_time` in milliseconds (the lease lasts [`lease_time_ms`] of it).
    pub keepalive_time_ms: u64,
    /// How long after a promotion request it is made again while the server is still in
    /// recovery (a startup process waiting to retry WAL can sleep past a first request).
    pub promote_timeout_ms: u64,
    /// `pg_keeper.allow_data_loss_failover`: promote even a standby that was not synchronous.
    pub allow_data_loss_failover: bool,
    /// `pg_keeper.restart_grace` in milliseconds: how long after the primary announced a clean
    /// shutdown a standby does not count failed heartbeats (0: counted at once).
    pub restart_grace_ms: u64,
    /// `pg_keeper.auto_rejoin`: a superseded primary brings itself back as a standby.
    pub auto_rejoin: bool,
    /// How the log names this node and the peer, e.g. `node1 (10.0.0.1:5432)`.
    pub me_name: String,
    pub peer_name: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            keepalive_count: 1,
            keepalive_time_ms: 1000,
            promote_timeout_ms: 60_000,
            allow_data_loss_failover: false,
            restart_grace_ms: 0,
            auto_rejoin: false,
            me_name: "this node".into(),
            peer_name: "peer".into(),
        }
    }
}

/// The answer to one input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub from: Mode,
    pub event: Event,
    pub to: Mode,
    pub actions: Vec<Action>,
    pub level: Level,
    /// One plain sentence: what was decided and why.
    pub sentence: String,
    /// The move's actions were held back by a maintenance pause.
    pub held: bool,
}

impl Decision {
    pub fn changed_mode(&self) -> bool {
        self.from != self.to
    }

    /// The name of this decision in the event history.
    pub fn history_name(&self) -> &'static str {
        if self.held {
            return "action_held";
        }
        match self.event {
            E::IdentifiedAsMaster | E::IdentifiedAsStandby => "identified",
            E::IdentityProblem => "configuration_problem",
            E::Idle => "idle",
            E::StandbyStreaming => "standby_connected",
            E::HeartbeatOk if self.from == StandbyWaiting => "primary_seen",
            E::HeartbeatOk => "heartbeat_ok",
            E::HeartbeatRefused => "peer_refused",
            E::HeartbeatFailed => "heartbeat_failed",
            E::PeerLostSync | E::PeerLostAsync => "standby_lost",
            E::PeerLost => "primary_lost",
            E::PeerNotYetSeen => "primary_not_seen",
            E::PeerRestarting => "primary_restarting",
            E::PeerBack => "primary_back",
            E::PeerBackNotStreaming => "heartbeat_ok",
            E::PromotionUnfinished => "promotion_resumed",
            E::StandbyCaughtUp => "standby_caught_up",
            E::RecoveryEnded if self.from == Promoting => "promoted",
            E::RecoveryEnded => "promoted_outside",
            E::PromotionSlow => "promotion_slow",
            E::PeerLostButStreaming if self.from == MasterConnected => "async_held",
            E::PeerLostButStreaming => "promotion_held",
            E::PeerLostNotSynchronous => "promotion_held",
            E::Superseded | E::SupersededByLease => "superseded",
            E::PeerLostNoLease => "async_held",
            E::Isolated | E::StillIsolated => "isolated",
            E::ContactRegained => "serving_again",
            E::PeerLostLeaseWithheld | E::PeerLostWitnessMismatch => "promotion_held",
            E::DegradeFailed
            | E::PromoteFailed
            | E::RestoreFailed
            | E::FenceFailed
            | E::ReleaseFailed
            | E::TakeFailed
            | E::EndWaitingFailed
            | E::StopServingFailed
            | E::ResumeFailed
            | E::RejoinFailed
            | E::AfterCommandFailed => "action_failed",
        }
    }
}

/// The keeper's state between ticks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keeper {
    mode: Mode,
    /// Consecutive heartbeats without an answer.
    failures: u32,
    /// When the promotion was last requested.
    promote_requested_at: Option<u64>,
    /// The last repeated condition logged (see [`ONCE_PER_REASON`]).
    last_said: Option<(Event, String)>,
    /// Maintenance pause: heartbeat and report, but take no action.
    paused: bool,
    /// At the last answer of the primary, this standby was its synchronous standby.
    was_synchronous: bool,
    /// At the last answer of the primary, it said it uses a witness.
    peer_used_witness: bool,
    /// (Primary.) Whether the standby counts as synchronous (see [`SyncTrust`]).
    trust: SyncTrust,
    /// The actions of the last decision not yet performed, in order (see [`Keeper::next_action`]).
    pending: Vec<Action>,
    /// (Primary.) The start of the last tick in which the witness renewed the lease or the
    /// standby answered; None: not since this keeper started.
    last_contact_ms: Option<u64>,
    /// (Primary.) The lease on the witness may name the standby: a renewal that named it was
    /// sent (answered or not) since the last one that named nobody went through. Until a
    /// renewal says otherwise, it may (a restarted server does not know).
    lease_may_name_standby: bool,
    /// (Primary.) Whether this tick's renewal names the standby ([`Keeper::lease_names_standby`]).
    naming_standby: bool,
    /// (Standby.) Answers of the primary in a row that did not list this streaming standby
    /// (see [`Keeper::unlisted_standby`]).
    unlisted_answers: u32,
    /// (Standby.) The primary's last clean shutdown announcement, until it streams again.
    restart: Option<PeerRestart>,
}

/// (Standby.) A planned restart of the primary, from its announcement until this standby's
/// WAL receiver streams again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerRestart {
    /// When the primary announced its clean shutdown.
    announced_ms: u64,
    /// When it answered again, if it has.
    back_ms: Option<u64>,
}

/// How long after the primary is back the WAL receiver is woken (every tick) until it streams.
pub const WAKE_FOR_MS: u64 = 10_000;

impl PeerRestart {
    /// Whether the primary is back and its standby's WAL receiver is still being woken: less
    /// than [`WAKE_FOR_MS`] since it answered again.
    fn waking(&self, now_ms: u64) -> bool {
        self.back_ms.is_some_and(|b| now_ms < b + WAKE_FOR_MS)
    }
}

/// What a restarted worker needs to go on where the last one stopped: the worker keeps it in
/// shared memory, which lasts as long as the server runs. The log's once-per-reason memory and
/// the promotion request time are not kept (a resumed promotion is asked for again). Its times
/// are on the core's clock, which must go on across a worker's restart (the worker's clock
/// starts with the server's first worker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    pub mode: Mode,
    pub failures: u32,
    pub was_synchronous: bool,
    pub peer_used_witness: bool,
    pub trust: SyncTrust,
    pub pending: [Option<Action>; MAX_ACTIONS],
    pub lease_may_name_standby: bool,
    /// (Standby.) A planned restart of the primary under way: a worker restarted during its
    /// grace keeps not counting failures.
    pub restart: Option<PeerRestart>,
}

/// Answers in a row that must miss a streaming standby before that is warned about (see
/// [`Keeper::unlisted_standby`]).
pub const UNLISTED_BEFORE_WARNING: u32 = 3;

/// The most actions a decision has.
pub const MAX_ACTIONS: usize = 4;

impl Default for Keeper {
    fn default() -> Self {
        Self::new()
    }
}

impl Keeper {
    pub fn new() -> Self {
        Keeper {
            mode: Unidentified,
            failures: 0,
            promote_requested_at: None,
            last_said: None,
            paused: false,
            was_synchronous: false,
            peer_used_witness: false,
            trust: SyncTrust::default(),
            pending: Vec::new(),
            last_contact_ms: None,
            lease_may_name_standby: true,
            naming_standby: false,
            unlisted_answers: 0,
            restart: None,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The text of the process title inside `pg_keeper (...)`.
    pub fn title(&self) -> String {
        let base = if self.mode == Unidentified && self.last_said.is_some() {
            "configuration error"
        } else {
            self.mode.title()
        };
        if self.paused {
            format!("{base}, paused")
        } else {
            base.to_string()
        }
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Starts or ends a maintenance pause.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// (Primary.) Follows the standby from the replication view, once per tick before the lease
    /// is renewed, and says whether the lease may name it as the synchronous standby: only in
    /// master mode with a connected standby that [`SyncTrust`] confirms, that is, whose flush
    /// position has passed every commit acknowledged without it.
    pub fn lease_names_standby(
        &mut self,
        sync_in_force: bool,
        insert_lsn: u64,
        standby: Option<StandbySeen>,
    ) -> bool {
        let confirmed = self.trust.follow(sync_in_force, insert_lsn, standby);
        self.naming_standby = self.mode == MasterConnected && confirmed;
        self.lease_may_name_standby |= self.naming_standby;
        self.naming_standby
    }

    /// (Standby.) Follows, once per tick, whether the primary's answer lists this standby in
    /// its `pg_stat_replication` while this standby's WAL receiver streams from it, and says
    /// whether that absence is to be warned about: the primary hides the view from the
    /// heartbeat's user, or this standby streams under another name, so it can never know it is
    /// synchronous and will not promote. A link reset ends the primary's WAL sender before this
    /// standby's receiver notices: only an absence that lasts [`UNLISTED_BEFORE_WARNING`]
    /// answers in a row is a configuration problem.
    pub fn unlisted_standby(
        &mut self,
        answered_by_primary: bool,
        listed: bool,
        wal_receiver_recent: bool,
    ) -> bool {
        let unlisted = answered_by_primary && !listed && wal_receiver_recent;
        self.unlisted_answers = if unlisted {
            self.unlisted_answers.saturating_add(1)
        } else {
            0
        };
        self.unlisted_answers >= UNLISTED_BEFORE_WARNING
    }

    /// (Primary.) By when, on the monotonic clock of [`Observation::now_ms`], this primary must
    /// have stopped serving unless it reaches the standby or the witness first; None when no
    /// deadline runs (no contact yet since it started: it stops at its first tick without one).
    /// The standby may take the lease no sooner than [`lease_time_ms`] after the last renewal
    /// was sent, on the witness's clock; this is [`LEASE_MARGIN_MS`] earlier. The worker bounds
    /// its calls by it and wakes up for it.
    pub fn serve_deadline_ms(&self, s: &Settings) -> Option<u64> {
        if !matches!(self.mode, MasterWaiting | MasterConnected | MasterAsync)
            || !self.lease_may_name_standby
        {
            return None;
        }
        let budget = lease_time_ms(s.keepalive_time_ms).saturating_sub(LEASE_MARGIN_MS);
        self.last_contact_ms.map(|t| t.saturating_add(budget))
    }

    /// (Primary.) Whether this tick leaves the primary isolated: a witness is configured, the
    /// lease may name the standby, and neither answered since the deadline.
    fn isolated(&self, obs: &Observation, s: &Settings) -> bool {
        if matches!(obs.lease, Lease::NotConfigured) || contact(obs) {
            return false;
        }
        if !self.lease_may_name_standby {
            return false;
        }
        self.serve_deadline_ms(s)
            .is_none_or(|deadline| obs.now_ms >= deadline)
    }

    /// What to keep for a restarted worker.
    pub fn memory(&self) -> Memory {
        let mut pending = [None; MAX_ACTIONS];
        for (slot, a) in pending.iter_mut().zip(&self.pending) {
            *slot = Some(*a);
        }
        Memory {
            mode: self.mode,
            failures: self.failures,
            was_synchronous: self.was_synchronous,
            peer_used_witness: self.peer_used_witness,
            trust: self.trust,
            pending,
            lease_may_name_standby: self.lease_may_name_standby,
            restart: self.restart,
        }
    }

    /// A keeper that goes on from `m`: same mode, count and trust, the same actions still to
    /// perform, a planned restart of the primary still under way; a promotion under way is
    /// asked for again.
    pub fn resume(m: &Memory) -> Keeper {
        Keeper {
            mode: m.mode,
            failures: m.failures,
            promote_requested_at: (m.mode == Promoting).then_some(0),
            was_synchronous: m.was_synchronous,
            peer_used_witness: m.peer_used_witness,
            trust: m.trust,
            pending: m.pending.iter().flatten().copied().collect(),
            lease_may_name_standby: m.lease_may_name_standby,
            restart: m.restart,
            ..Keeper::new()
        }
    }

    /// The next action to perform, if any: the worker performs them in order, telling the
    /// keeper of each outcome ([`Keeper::action_done`], or an [`Input::ActionFailed`] step).
    pub fn next_action(&self) -> Option<Action> {
        self.pending.first().copied()
    }

    /// `action` (the next one) was performed.
    pub fn action_done(&mut self, action: Action) {
        if self.pending.first() == Some(&action) {
            self.pending.remove(0);
        }
        if matches!(action, ReleaseStandby | TakeLease) {
            // The lease now records no synchronous standby.
            self.lease_may_name_standby = false;
        }
    }

    /// (Primary.) How the standby stands with [`SyncTrust`], for the status.
    pub fn trust(&self) -> SyncTrust {
        self.trust
    }

    /// (Primary.) Whether the standby is trusted as synchronous this tick ([`SyncTrust`] as of
    /// the last [`Keeper::lease_names_standby`], in any primary mode): the heartbeat answer tells
    /// the standby so, for its own promotion guard.
    pub fn trusts_standby(&self) -> bool {
        self.mode.is_master() && self.trust == SyncTrust::Confirmed
    }

    /// Consecutive failed heartbeats so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// (Standby.) The primary announced a clean shutdown less than `restart_grace_ms` before
    /// `now_ms` and has not answered since.
    pub fn in_restart_grace(&self, now_ms: u64, s: &Settings) -> bool {
        self.restart.is_some_and(|r| {
            r.back_ms.is_none() && now_ms < r.announced_ms.saturating_add(s.restart_grace_ms)
        })
    }

    /// Whether the worker should heartbeat quickly (every 100 ms or so) rather than every `keepalive_time`: a standby in the grace of a planned
    /// restart of its primary, to see it back at once, and until its WAL receiver streams
    /// again. Failures are not counted meanwhile, so this acts on nothing sooner.
    pub fn polls_fast(&self, now_ms: u64, s: &Settings) -> bool {
        matches!(self.mode, StandbyConnected)
            && (self.in_restart_grace(now_ms, s) || self.restart.is_some_and(|r| r.waking(now_ms)))
    }

    /// (Standby.) Notes the primary's announcement of a clean shutdown, before the tick's
    /// event is derived.
    fn note_announcement(&mut self, obs: &Observation) {
        if !matches!(self.mode, StandbyConnected) {
            self.restart = None;
            return;
        }
        if let Some(at) = obs.peer_announced_shutdown_ms {
            // A new announcement after the primary was back is a new restart; one while it
            // is still away keeps the first (the grace is counted from there).
            if self.restart.is_none_or(|r| r.back_ms.is_some()) {
                self.restart = Some(PeerRestart {
                    announced_ms: at,
                    back_ms: None,
                });
            }
        }
        // A server that restarts refuses or answers at once; one that lets a heartbeat wait
        // out its deadline is hung or cut off, whatever it said before (its heartbeat session
        // ended by pg_terminate_backend says the same words as a shutdown): no grace.
        if obs.heartbeat_timed_out && self.restart.is_some_and(|r| r.back_ms.is_none()) {
            self.restart = None;
        }
    }

    /// (Standby.) After the tick's event: the primary is back (the WAL receiver is woken from
    /// then on), or the restart is over (the WAL receiver streams, or waking it stopped).
    fn follow_return(&mut self, obs: &Observation) {
        if obs.heartbeat == Some(Heartbeat::Answered) {
            if let Some(r) = &mut self.restart {
                if obs.wal_receiver_recent {
                    self.restart = None;
                } else if r.back_ms.is_none() {
                    r.back_ms = Some(obs.now_ms);
                } else if !r.waking(obs.now_ms) {
                    self.restart = None;
                }
            }
        }
    }

    /// Derives the one event this input means in the current mode.
    fn event_for(&self, input: &Input, s: &Settings) -> (Event, String) {
        match input {
            Input::Identified { in_recovery: false } => (E::IdentifiedAsMaster, String::new()),
            Input::Identified { in_recovery: true } => (E::IdentifiedAsStandby, String::new()),
            Input::IdentityProblem(why) => (E::IdentityProblem, why.clone()),
            Input::ActionFailed(action, why) => {
                let e = match action {
                    DegradeToAsync => E::DegradeFailed,
                    Promote => E::PromoteFailed,
                    RestoreSync => E::RestoreFailed,
                    Fence => E::FenceFailed,
                    ReleaseStandby => E::ReleaseFailed,
                    TakeLease => E::TakeFailed,
                    EndWaitingCommits => E::EndWaitingFailed,
                    StopServing => E::StopServingFailed,
                    ResumeServing => E::ResumeFailed,
                    RunAfterCommand(_) => E::AfterCommandFailed,
                    // Setting a latch cannot fail; the next tick wakes it again anyway.
                    WakeWalReceiver => E::Idle,
                    Rejoin => E::RejoinFailed,
                };
                (e, why.clone())
            }
            Input::Tick(obs) => self.event_for_tick(obs, s),
        }
    }

    /// Derives the event of a tick: each role has its own chain of guards, in which the first
    /// that holds wins (the order is the priority).
    fn event_for_tick(&self, obs: &Observation, s: &Settings) -> (Event, String) {
        match self.mode {
            Unidentified | Fenced => (E::Idle, String::new()),
            MasterWaiting | MasterConnected | MasterAsync | Isolated => {
                self.event_as_primary(obs, s)
            }
            StandbyWaiting | StandbyConnected => self.event_as_standby(obs, s),
            Promoting => self.event_while_promoting(obs, s),
        }
    }

    /// (MasterWaiting, MasterConnected, MasterAsync, Isolated.) In this order:
    /// 1. superseded: the peer answered as a primary on a newer timeline;
    /// 2. superseded by the lease: it names the peer on a timeline not older than this one;
    /// 3. (isolated) contact regained with the witness or the standby, else still isolated;
    /// 4. isolated now: neither the standby nor the witness since the serving deadline;
    /// 5. (waiting, async) a standby streams, else nothing;
    /// 6. (connected) the heartbeat: ok, caught up, refused, or a failure (a standby that answers
    ///    or refuses but does not stream counts as one), and at `keepalive_count` failures: held
    ///    while the standby's replication still replies, else lost (held without the lease when
    ///    synchronous, see [`Event::PeerLostNoLease`]).
    fn event_as_primary(&self, obs: &Observation, s: &Settings) -> (Event, String) {
        if obs.peer_newer_primary && obs.heartbeat == Some(Heartbeat::Answered) {
            return (E::Superseded, String::new());
        }
        if matches!(obs.lease, Lease::Peer { newer: true, .. }) {
            return (E::SupersededByLease, String::new());
        }
        if self.mode == Isolated {
            return if contact(obs) {
                (E::ContactRegained, regained(obs, s))
            } else {
                (E::StillIsolated, String::new())
            };
        }
        if self.isolated(obs, s) {
            let since = match self.last_contact_ms {
                Some(t) => format!(
                    "no answer for {} ms; the lease lasts {} ms",
                    obs.now_ms.saturating_sub(t),
                    lease_time_ms(s.keepalive_time_ms)
                ),
                None => "no answer since the keeper started".to_string(),
            };
            return (E::Isolated, since);
        }
        if self.mode != MasterConnected {
            return if obs.standby_streaming {
                (E::StandbyStreaming, String::new())
            } else {
                (E::Idle, String::new())
            };
        }
        // A standby that answers but whose replication does not stream cannot confirm
        // commits: for the primary that is a failure too (a flapping link, say).
        let not_streaming = !obs.standby_streaming;
        let failure = match &obs.heartbeat {
            None => return (E::Idle, String::new()),
            Some(Heartbeat::NoAnswer(why)) => why.clone(),
            Some(Heartbeat::Answered) if not_streaming => {
                "the standby answers but its replication is not streaming".to_string()
            }
            Some(Heartbeat::Answered)
                if obs.restore_wanted && obs.standby_caught_up && !obs.sync_configured =>
            {
                return (E::StandbyCaughtUp, String::new());
            }
            Some(Heartbeat::Answered) => return (E::HeartbeatOk, String::new()),
            // Alive, but a standby that refuses (starting up, replaying) and does not
            // stream confirms no commit either: counted, or commits hang all along.
            Some(Heartbeat::Refused(why)) if not_streaming => format!(
                "the standby refuses connections and its replication is not streaming: {why}"
            ),
            Some(Heartbeat::Refused(why)) => return (E::HeartbeatRefused, why.clone()),
        };
        let (at_the_limit, detail) = self.count_failure(&failure, s);
        if !at_the_limit {
            return (E::HeartbeatFailed, detail);
        }
        if obs.standby_replies_recent {
            // Only the heartbeat path is broken: the standby still confirms WAL, so
            // commits are acknowledged and nothing needs switching.
            (E::PeerLostButStreaming, detail)
        } else if obs.sync_configured {
            match &obs.lease {
                Lease::NotConfigured | Lease::Held => (E::PeerLostSync, detail),
                other => (
                    E::PeerLostNoLease,
                    format!("{}; {detail}", lease_problem(other)),
                ),
            }
        } else {
            (E::PeerLostAsync, detail)
        }
    }

    /// (StandbyWaiting, StandbyConnected.) In this order:
    /// 1. recovery ended: the server was promoted outside the keeper;
    /// 2. this standby took the lease to promote before a restart;
    /// 3. the heartbeat: ok or refused (alive), else a failure; while waiting, a failure only
    ///    says the primary was not seen yet; at `keepalive_count` failures the promotion is held,
    ///    first match wins: the WAL receiver still receives, this standby was not synchronous
    ///    (unless data loss is allowed), the primary uses a witness this standby does not, the
    ///    lease cannot be taken; else the primary is lost.
    fn event_as_standby(&self, obs: &Observation, s: &Settings) -> (Event, String) {
        if !obs.in_recovery {
            return (E::RecoveryEnded, String::new());
        }
        if obs.lease == Lease::Taken {
            return (E::PromotionUnfinished, String::new());
        }
        let grace = self.mode == StandbyConnected && self.in_restart_grace(obs.now_ms, s);
        let restarting = || {
            (
                E::PeerRestarting,
                format!("the grace is {} ms", s.restart_grace_ms),
            )
        };
        let failure = match &obs.heartbeat {
            None => return (E::Idle, String::new()),
            Some(Heartbeat::NoAnswer(why)) => why.clone(),
            Some(Heartbeat::Answered) => return self.answered_as_standby(obs),
            // Starting up or shutting down is what a planned restart says.
            Some(Heartbeat::Refused(_)) if grace => return restarting(),
            Some(Heartbeat::Refused(why)) => return (E::HeartbeatRefused, why.clone()),
        };
        if self.mode == StandbyWaiting {
            return (E::PeerNotYetSeen, failure);
        }
        if grace {
            return restarting();
        }
        let (at_the_limit, detail) = self.count_failure(&failure, s);
        if !at_the_limit {
            return (E::HeartbeatFailed, detail);
        }
        if obs.wal_receiver_recent {
            (E::PeerLostButStreaming, detail)
        } else if !self.was_synchronous && !s.allow_data_loss_failover {
            (E::PeerLostNotSynchronous, detail)
        } else if self.peer_used_witness && obs.lease == Lease::NotConfigured {
            // Without the lease this standby could promote while a primary cut off from
            // it goes on asynchronously under its own lease.
            (E::PeerLostWitnessMismatch, detail)
        } else {
            match lease_withheld(&obs.lease) {
                Some(why) => (E::PeerLostLeaseWithheld, format!("{why}; {detail}")),
                None => (E::PeerLost, detail),
            }
        }
    }

    /// (Standby.) The primary answered: back after a planned restart (and this standby's WAL
    /// receiver does not stream yet: wake it), or just alive.
    fn answered_as_standby(&self, obs: &Observation) -> (Event, String) {
        match self.restart {
            Some(r) if self.mode == StandbyConnected && !obs.wal_receiver_recent => {
                match r.back_ms {
                    None => (
                        E::PeerBack,
                        format!(
                            "{} ms after it announced a clean shutdown",
                            obs.now_ms.saturating_sub(r.announced_ms)
                        ),
                    ),
                    Some(_) if r.waking(obs.now_ms) => (E::PeerBackNotStreaming, String::new()),
                    Some(_) => (E::HeartbeatOk, String::new()),
                }
            }
            _ => (E::HeartbeatOk, String::new()),
        }
    }

    /// (Promoting.) In this order: recovery ended (promoted); the request is older than
    /// `promote_timeout_ms` (ask again); else nothing.
    fn event_while_promoting(&self, obs: &Observation, s: &Settings) -> (Event, String) {
        if !obs.in_recovery {
            return (E::RecoveryEnded, String::new());
        }
        match self.promote_requested_at {
            Some(at) if obs.now_ms.saturating_sub(at) >= s.promote_timeout_ms => (
                E::PromotionSlow,
                format!("waited {} ms", obs.now_ms.saturating_sub(at)),
            ),
            _ => (E::Idle, String::new()),
        }
    }

    /// This failed heartbeat with its running count (`reason (n of count)`), and whether it
    /// reaches `keepalive_count`.
    fn count_failure(&self, failure: &str, s: &Settings) -> (bool, String) {
        let (n, count) = (self.failures + 1, s.keepalive_count.max(1));
        (n >= count, format!("{failure} ({n} of {count})"))
    }

    /// Decides what to do about one input, and moves to the next mode.
    pub fn step(&mut self, input: &Input, s: &Settings) -> Decision {
        if let Input::Tick(Observation {
            heartbeat: Some(Heartbeat::Answered),
            peer_says_synchronous: Some(sync),
            ..
        }) = input
        {
            self.was_synchronous = *sync;
        }
        if let Input::Tick(Observation {
            heartbeat: Some(Heartbeat::Answered),
            peer_uses_witness: Some(uses),
            ..
        }) = input
        {
            self.peer_used_witness = *uses;
        }
        if let Input::ActionFailed(action, _) = input {
            if self.pending.first() == Some(action) {
                self.pending.remove(0);
            }
        }
        if let Input::Tick(obs) = input {
            self.note_announcement(obs);
        }
        let (event, detail) = self.event_for(input, s);
        if let Input::Tick(obs) = input {
            self.follow_return(obs);
            if self.mode.is_master() && contact(obs) {
                self.last_contact_ms = Some(obs.tick_started_ms);
            }
            if self.mode.is_master() && obs.lease == Lease::Held {
                self.lease_may_name_standby = self.naming_standby;
            }
        }
        let from = self.mode;
        let now = match input {
            Input::Tick(obs) => Some(obs.now_ms),
            _ => None,
        };
        let Some(t) = transition(from, event) else {
            return Decision {
                from,
                event,
                to: from,
                actions: Vec::new(),
                level: Dbg,
                sentence: format!("no action: {}", from.title()),
                held: false,
            };
        };

        // Bookkeeping that goes with the event.
        match event {
            E::HeartbeatOk
            | E::HeartbeatRefused
            | E::StandbyCaughtUp
            | E::PeerRestarting
            | E::PeerBack
            | E::PeerBackNotStreaming => self.failures = 0,
            E::HeartbeatFailed
            | E::PeerLost
            | E::PeerLostSync
            | E::PeerLostAsync
            | E::PeerLostButStreaming
            | E::PeerLostNotSynchronous
            | E::PeerLostWitnessMismatch => self.failures += 1,
            _ => {}
        }
        if self.paused && t.actions.iter().any(Action::changes_the_cluster) {
            // Paused: keep the mode (and the count, so that a resume acts on the next failure).
            let says = sentence_for(t, &detail, s);
            let repeated = self.last_said.as_ref().is_some_and(|(e, _)| *e == event);
            self.last_said = Some((event, String::new()));
            return Decision {
                from,
                event,
                to: from,
                actions: Vec::new(),
                level: if repeated { Dbg } else { Warn },
                sentence: format!("paused, so not acting on: {says}"),
                held: true,
            };
        }
        let mut level = t.level;
        if ONCE_PER_REASON.contains(&event) {
            // Said once per distinct reason, then kept quiet until something else happens.
            let key = (event, reason_key(&detail).to_string());
            if self.last_said.as_ref() == Some(&key) {
                level = Dbg;
            }
            self.last_said = Some(key);
        } else if event != E::Idle {
            self.last_said = None;
        }
        if t.to != from {
            // Counting starts afresh on entering a heartbeating mode, except when a failed action
            // sends the keeper back: then the count is kept so that the next failure retries.
            if t.to.counts_failures()
                && !matches!(
                    event,
                    E::DegradeFailed | E::PromoteFailed | E::ReleaseFailed | E::TakeFailed
                )
            {
                self.failures = 0;
            }
        }
        if t.actions.contains(&Promote) {
            self.promote_requested_at = now.or(self.promote_requested_at);
        }
        let mut actions = t.actions.to_vec();
        if let Input::Tick(obs) = input {
            let wanted = s.auto_rejoin && !self.paused && may_rejoin(&obs.lease);
            if actions.first() == Some(&Fence) && wanted {
                actions.insert(0, Rejoin);
            }
        }
        if t.to != from || !actions.is_empty() {
            // A failed action that sends the keeper to another mode ends the rest of its
            // decision; a new decision replaces what was left.
            self.pending = actions.clone();
        }
        self.mode = t.to;

        let sentence = sentence_for(t, &detail, s);
        Decision {
            from,
            event,
            to: t.to,
            actions,
            level,
            sentence,
            held: false,
        }
    }
}

/// (Primary.) This tick reached the witness (the lease was renewed) or the standby: its
/// heartbeat was answered and it streams from this primary, so its WAL receiver guard holds it
/// back from promoting. An answer alone is not enough: a standby that no longer streams and
/// cannot reach this primary may take an expired lease while this primary still reaches it.
fn contact(obs: &Observation) -> bool {
    obs.lease == Lease::Held
        || (obs.heartbeat == Some(Heartbeat::Answered) && obs.standby_streaming)
}

/// Whether a superseded primary may rejoin as a standby by itself: not while the witness lease
/// names it as the holder (renewed or taken this tick), since it may then hold commits
/// acknowledged under that lease which a rewind would throw away; an operator must look.
fn may_rejoin(lease: &Lease) -> bool {
    !matches!(lease, Lease::Held | Lease::Taken)
}

/// What an isolated primary reached again.
fn regained(obs: &Observation, s: &Settings) -> String {
    match (&obs.lease, &obs.heartbeat) {
        (Lease::Held, _) => "the witness renewed this primary's lease".into(),
        (lease, _) => format!(
            "standby {} answered, but {}",
            s.peer_name,
            lease_problem(lease)
        ),
    }
}

/// Why a standby may not take the lease, or None when it may (or no witness is configured).
fn lease_withheld(lease: &Lease) -> Option<String> {
    match lease {
        Lease::NotConfigured | Lease::Held | Lease::Taken => None,
        Lease::Peer {
            expired: true,
            names_me: true,
            ..
        } => None,
        Lease::Peer {
            names_me: false, ..
        } => Some("the lease does not name this standby as synchronous".into()),
        Lease::Peer { .. } => Some("the primary's lease has not expired".into()),
        other => Some(lease_problem(other)),
    }
}

/// What keeps a primary from holding the lease this tick.
fn lease_problem(lease: &Lease) -> String {
    match lease {
        Lease::Unreachable(why) => format!("the witness cannot be reached ({why})"),
        Lease::Missing => "the witness holds no lease".into(),
        Lease::Peer { .. } => "the lease is held by the other node".into(),
        Lease::NotConfigured | Lease::Held | Lease::Taken => "the lease is held".into(),
    }
}

/// A reason without its running count (`... (3 of 5)`), to tell repeats apart.
fn reason_key(detail: &str) -> &str {
    match detail.rfind(" (") {
        Some(i) if detail.ends_with(')') && detail[i..].contains(" of ") => &detail[..i],
        _ => detail,
    }
}

fn sentence_for(t: &Transition, detail: &str, s: &Settings) -> String {
    let mut out = t
        .says
        .replace("{peer}", &s.peer_name)
        .replace("{me}", &s.me_name);
    if !detail.is_empty() {
        out.push_str(": ");
        out.push_str(detail);
    }
    out
}

#[cfg(test)]
mod tests;
