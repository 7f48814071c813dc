//! The world around the keepers, modelled where safety depends on it: PostgreSQL servers with
//! their WAL, synchronous replication and promotion; the links between the parties; the witness
//! row with its compare-and-set statements and its own clock.

use keeper_core::LeaseRow;

/// Simulated time, milliseconds since the start of a run.
pub type Ms = u64;

/// The state of one directed path (or of the replication stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    /// Traffic passes.
    Up,
    /// Traffic passes at a low rate (replication only: a bandwidth-limited link).
    Slow,
    /// Connections are reset or refused at once.
    Drop,
    /// Packets are swallowed: connections stay open and nothing arrives; a caller waits out its
    /// deadline.
    Swallow,
}

/// What the primary's `pg_stat_replication` shows of its standby.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sender {
    /// The standby's flush position as last reported (a WAL length).
    pub flush: usize,
    /// When the standby last replied.
    pub last_reply: Ms,
}

/// A PostgreSQL server.
#[derive(Clone, Debug)]
pub struct Server {
    pub name: &'static str,
    /// The postmaster runs.
    pub up: bool,
    /// SIGSTOP: nothing in the server moves, connections stay open.
    pub frozen: bool,
    /// After a start, connections are refused ("the database system is starting up") until
    /// then, and there is no replication.
    pub starting_until: Ms,
    pub in_recovery: bool,
    /// `standby.signal`: the next start is in recovery.
    pub standby_signal: bool,
    pub timeline: u32,
    /// The WAL, one commit record per entry (its id); the LSN of entry `k` is `k + 1`. A standby
    /// holds what it has received and flushed.
    pub wal: Vec<u64>,
    /// `synchronous_standby_names` is not empty, as the keeper (ALTER SYSTEM) left it.
    pub sync_names: bool,
    /// `pg_keeper.saved_synchronous_standby_names` is set.
    pub saved_sync: bool,
    /// Commits wait for the standby: the checkpointer's view of the setting, which lags behind
    /// a reload.
    pub sync_in_force: bool,
    /// When the checkpointer takes in the setting after a reload.
    pub sync_change_at: Option<Ms>,
    /// Commits inserted and waiting for the synchronous standby: (id, LSN).
    pub waiting: Vec<(u64, usize)>,
    /// When the oldest waiting commit began to wait.
    pub waiting_since: Ms,
    /// A promotion was requested and takes effect then.
    pub promote_at: Option<Ms>,
    /// (Standby.) The WAL receiver is connected.
    pub receiver_streaming: bool,
    /// (Standby.) When the WAL receiver last received a message.
    pub last_receipt: Ms,
    /// (Standby.) When the primary last sent a keepalive on this stream.
    pub last_keepalive: Ms,
    /// (Primary.) The standby's stream, as `pg_stat_replication` shows it.
    pub sender: Option<Sender>,
    /// The keeper's memory in shared memory: kept across a restart of the worker, gone with
    /// the server.
    pub keeper_memory: Option<keeper_core::Memory>,
    /// The keeper refuses sessions (an isolated primary), in shared memory.
    pub refusing: bool,
    /// Whether the keeper trusts its standby as synchronous, as its worker last published it
    /// (None: no worker has since the server or the worker started).
    pub keeper_trusts: Option<bool>,
}

impl Server {
    pub fn new(name: &'static str, in_recovery: bool) -> Server {
        Server {
            name,
            up: true,
            frozen: false,
            starting_until: 0,
            in_recovery,
            standby_signal: in_recovery,
            timeline: 1,
            wal: Vec::new(),
            sync_names: true,
            saved_sync: false,
            sync_in_force: true,
            sync_change_at: None,
            waiting: Vec::new(),
            waiting_since: 0,
            promote_at: None,
            receiver_streaming: false,
            last_receipt: 0,
            last_keepalive: 0,
            sender: None,
            keeper_memory: None,
            refusing: false,
            keeper_trusts: None,
        }
    }

    /// Up, not frozen and past its start: it answers.
    pub fn running(&self, now: Ms) -> bool {
        self.up && !self.frozen && now >= self.starting_until
    }

    /// It accepts writes (a client with `target_session_attrs=read-write` would use it).
    pub fn writable(&self, now: Ms) -> bool {
        self.serves(now)
    }

    /// A primary that lets clients in: they could read from it, and write.
    pub fn serves(&self, now: Ms) -> bool {
        self.running(now) && !self.in_recovery && !self.refusing
    }

    pub fn insert_lsn(&self) -> usize {
        self.wal.len()
    }

    /// `kill -9` of the postmaster: everything in memory is gone, the WAL stays.
    pub fn crash(&mut self) {
        self.up = false;
        self.frozen = false;
        self.waiting.clear();
        self.promote_at = None;
        self.receiver_streaming = false;
        self.sender = None;
        self.sync_change_at = None;
        self.keeper_memory = None;
        // The keeper's flag was in shared memory.
        self.refusing = false;
        self.keeper_trusts = None;
    }

    /// Starts the server again: in recovery if it was a standby or has `standby.signal`.
    pub fn start(&mut self, now: Ms, startup_ms: Ms) {
        if self.up {
            return;
        }
        self.up = true;
        self.frozen = false;
        self.starting_until = now + startup_ms;
        self.in_recovery = self.in_recovery || self.standby_signal;
        self.sync_in_force = self.sync_names;
        self.sync_change_at = None;
    }

    /// A reload that changes `synchronous_standby_names`: the checkpointer takes it in later.
    fn reload(&mut self, at: Ms) {
        self.sync_change_at = Some(at);
    }

    /// What the keeper's switch to async does (ALTER SYSTEM, reload).
    pub fn degrade_to_async(&mut self, reload_at: Ms) {
        if self.sync_names {
            self.saved_sync = true;
            self.sync_names = false;
            self.reload(reload_at);
        }
    }

    /// What the keeper's return to sync does; false if nothing was saved.
    pub fn restore_sync(&mut self, reload_at: Ms) -> bool {
        if !self.saved_sync {
            return false;
        }
        self.sync_names = true;
        self.saved_sync = false;
        self.reload(reload_at);
        true
    }

    /// The checkpointer and the startup process: the reload taking effect, a promotion ending
    /// recovery. Returns the waiting commits released by a switch to async.
    pub fn background(&mut self, now: Ms, next_timeline: u32) -> Vec<u64> {
        let mut released = Vec::new();
        if !self.running(now) {
            return released;
        }
        if self.sync_change_at.is_some_and(|at| at <= now) {
            self.sync_change_at = None;
            self.sync_in_force = self.sync_names;
            if !self.sync_in_force {
                released = self.waiting.drain(..).map(|(id, _)| id).collect();
            }
        }
        if self.promote_at.is_some_and(|at| at <= now) && self.in_recovery {
            // Replays what it has received, then a new timeline.
            self.promote_at = None;
            self.in_recovery = false;
            self.standby_signal = false;
            self.timeline = next_timeline;
            self.receiver_streaming = false;
            self.sender = None;
        }
        released
    }
}

/// The lease row as the witness stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub holder: &'static str,
    pub epoch: i64,
    pub timeline: i64,
    pub sync_standby: Option<&'static str>,
    /// On the witness's clock.
    pub expires_at: i64,
    /// Taken by a standby to promote; cleared by its first renewal as a primary.
    pub promoting: bool,
    /// The cluster whose lease this is.
    pub system_identifier: u64,
}

/// The witness server: one row, its own clock, and the statements of `src/witness.rs`.
#[derive(Clone, Debug, Default)]
pub struct Witness {
    pub down: bool,
    /// The witness's clock minus the simulation's.
    pub offset: i64,
    pub row: Option<Row>,
}

impl Witness {
    pub fn clock(&self, now: Ms) -> i64 {
        now as i64 + self.offset
    }

    /// Past its expiry, or further ahead than a renewal of `lease_ms` can put it (the clock
    /// stepped back after the renewal): `expired()` in `src/witness.rs`.
    fn expired(r: &Row, clock: i64, lease_ms: u64) -> bool {
        r.expires_at < clock || r.expires_at > clock + lease_ms as i64
    }

    /// A row of another cluster, or one this cluster may change.
    fn ours(r: &Row, system_identifier: u64) -> bool {
        r.system_identifier == system_identifier
    }

    fn answer(&self, now: Ms, mine: bool, lease_ms: u64) -> Option<LeaseRow> {
        let clock = self.clock(now);
        self.row.as_ref().map(|r| LeaseRow {
            holder: r.holder.to_string(),
            epoch: r.epoch,
            timeline: r.timeline,
            sync_standby: r.sync_standby.map(str::to_string),
            expired: Self::expired(r, clock, lease_ms),
            ms_left: r.expires_at - clock,
            mine,
            promoting: r.promoting,
            system_identifier: Some(r.system_identifier.to_string()),
        })
    }

    /// The primary's renewal (`claim_sql`): renews a lease it holds (unless a newer incarnation
    /// of the same name recorded a later timeline), creates a missing one, takes over an expired
    /// lease of an older timeline; otherwise returns the row as it is.
    pub fn claim(
        &mut self,
        me: &'static str,
        timeline: u32,
        sync: Option<&'static str>,
        lease_ms: u64,
        system_identifier: u64,
        now: Ms,
    ) -> Option<LeaseRow> {
        let clock = self.clock(now);
        let tl = timeline as i64;
        let new_row = |epoch| Row {
            holder: me,
            epoch,
            timeline: tl,
            sync_standby: sync,
            expires_at: clock + lease_ms as i64,
            promoting: false,
            system_identifier,
        };
        match &self.row {
            None => {
                self.row = Some(new_row(1));
                self.answer(now, true, lease_ms)
            }
            Some(r) => {
                let renew = r.holder == me && r.timeline <= tl;
                let take_over =
                    r.holder != me && r.timeline < tl && Self::expired(r, clock, lease_ms);
                if Self::ours(r, system_identifier) && (renew || take_over) {
                    let epoch = if r.holder == me { r.epoch } else { r.epoch + 1 };
                    self.row = Some(new_row(epoch));
                    self.answer(now, true, lease_ms)
                } else {
                    self.answer(now, false, lease_ms)
                }
            }
        }
    }

    /// A standby's look at the lease.
    pub fn read(&self, lease_ms: u64, now: Ms) -> Option<LeaseRow> {
        self.answer(now, false, lease_ms)
    }

    /// The standby's take-over (`take_sql`): only a lease it holds, or an expired one that
    /// names it as synchronous; `None` when not taken.
    pub fn take(
        &mut self,
        me: &'static str,
        timeline: u32,
        lease_ms: u64,
        system_identifier: u64,
        now: Ms,
    ) -> Option<LeaseRow> {
        let clock = self.clock(now);
        let r = self.row.as_ref()?;
        let may =
            r.holder == me || (Self::expired(r, clock, lease_ms) && r.sync_standby == Some(me));
        if !Self::ours(r, system_identifier) || !may {
            return None;
        }
        let epoch = if r.holder == me { r.epoch } else { r.epoch + 1 };
        self.row = Some(Row {
            holder: me,
            epoch,
            timeline: timeline as i64,
            sync_standby: None,
            expires_at: clock + lease_ms as i64,
            promoting: true,
            system_identifier,
        });
        self.answer(now, true, lease_ms)
    }
}
