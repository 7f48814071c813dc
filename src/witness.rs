//! The witness: one row on a third PostgreSQL server (nothing installed there) that says which
//! node may act as the primary: the lease. Every change is a single statement that compares and
//! sets the row, so the witness orders the two nodes' moves; every expiry is judged on the
//! witness's clock, so the nodes' clocks do not matter.
//!
//! - The primary renews the lease every tick, recording its timeline and its synchronous
//!   standby (if any); it creates the row the first time, and takes over a lease that an older
//!   primary (an older timeline) let expire.
//! - Before it switches to asynchronous replication it renews once more with no synchronous
//!   standby: from then on no standby can take the lease, so nothing it acknowledges alone can be
//!   lost by a failover.
//! - A standby reads the lease every tick, and before promoting takes it: only once it has
//!   expired and only if it names this standby as synchronous, with a new epoch.

use std::ffi::{CStr, CString};
use std::time::{Duration, Instant};

pub use keeper_core::LeaseRow;

use crate::heartbeat::{Beat, Node, Reply};

/// Made once per connection; `IF NOT EXISTS` because both nodes may try.
const CREATE_SQL: &CStr = c"CREATE TABLE IF NOT EXISTS pg_keeper_lease (
    id int PRIMARY KEY CHECK (id = 1),
    holder text NOT NULL,
    epoch bigint NOT NULL,
    timeline int NOT NULL,
    sync_standby text,
    expires_at timestamptz NOT NULL,
    renewed_at timestamptz NOT NULL,
    promoting boolean NOT NULL DEFAULT false)";

/// A table made by an earlier version lacks `promoting`.
const UPGRADE_SQL: &CStr =
    c"ALTER TABLE pg_keeper_lease ADD COLUMN IF NOT EXISTS promoting boolean NOT NULL DEFAULT false";

/// The columns every statement returns, in this order.
const COLUMNS: &str = "holder, epoch, timeline, sync_standby, \
    (expires_at < clock_timestamp()) AS expired, \
    (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::int8 AS ms_left, promoting";

/// The primary's renewal. $1 this node, $2 its timeline, $3 its synchronous standby or NULL,
/// $4 the lease in milliseconds. It renews a lease it holds (unless a newer incarnation of the
/// same name recorded a later timeline), creates a missing one, and takes over an expired lease
/// of an older timeline; otherwise it changes nothing and returns the row as it is.
fn claim_sql() -> CString {
    CString::new(format!(
        "WITH claimed AS (
            INSERT INTO pg_keeper_lease AS l
                (id, holder, epoch, timeline, sync_standby, expires_at, renewed_at)
            VALUES (1, $1, 1, $2::int, $3, clock_timestamp() + $4::int * interval '1 millisecond',
                    clock_timestamp())
            ON CONFLICT (id) DO UPDATE SET
                epoch = CASE WHEN l.holder = EXCLUDED.holder THEN l.epoch ELSE l.epoch + 1 END,
                holder = EXCLUDED.holder, timeline = EXCLUDED.timeline,
                sync_standby = EXCLUDED.sync_standby, expires_at = EXCLUDED.expires_at,
                renewed_at = EXCLUDED.renewed_at, promoting = false
            WHERE (l.holder = EXCLUDED.holder AND l.timeline <= EXCLUDED.timeline)
               OR (l.holder <> EXCLUDED.holder AND l.timeline < EXCLUDED.timeline
                   AND l.expires_at < clock_timestamp())
            RETURNING {COLUMNS}, true AS mine)
        SELECT * FROM claimed
        UNION ALL
        SELECT {COLUMNS}, false FROM pg_keeper_lease
         WHERE id = 1 AND NOT EXISTS (SELECT FROM claimed)"
    ))
    .expect("no NUL in the statement")
}

fn read_sql() -> CString {
    CString::new(format!(
        "SELECT {COLUMNS}, false FROM pg_keeper_lease WHERE id = 1"
    ))
    .expect("no NUL in the statement")
}

/// The standby's take-over. $1 this node, $2 its timeline, $3 the lease in milliseconds.
fn take_sql() -> CString {
    CString::new(format!(
        "UPDATE pg_keeper_lease SET
            epoch = CASE WHEN holder = $1 THEN epoch ELSE epoch + 1 END,
            holder = $1, timeline = $2::int, sync_standby = NULL, promoting = true,
            expires_at = clock_timestamp() + $3::int * interval '1 millisecond',
            renewed_at = clock_timestamp()
         WHERE id = 1
           AND (holder = $1 OR (expires_at < clock_timestamp() AND sync_standby = $1))
         RETURNING {COLUMNS}, true"
    ))
    .expect("no NUL in the statement")
}

/// Reads one row of [`COLUMNS`] plus `mine`.
fn parse_row(row: &[Option<String>]) -> Result<LeaseRow, String> {
    let text = |i: usize| row.get(i).cloned().flatten();
    let num = |i: usize| text(i).and_then(|v| v.parse::<i64>().ok());
    match (text(0), num(1), num(2), num(5)) {
        (Some(holder), Some(epoch), Some(timeline), Some(ms_left)) if row.len() == 8 => {
            Ok(LeaseRow {
                holder,
                epoch,
                timeline,
                sync_standby: text(3),
                expired: text(4).as_deref() == Some("t"),
                ms_left,
                promoting: text(6).as_deref() == Some("t"),
                mine: text(7).as_deref() == Some("t"),
            })
        }
        _ => Err("the witness's answer could not be read".into()),
    }
}

/// The connection to the witness, kept between ticks.
pub struct Witness {
    node: Node,
    /// The lease table exists (made or seen on this connection's server).
    table_ready: bool,
}

fn describe_failure(beat: Beat) -> String {
    match beat {
        Beat::NoAnswer(why) | Beat::Refused(why) => why,
        Beat::Interrupted => "interrupted by a shutdown request".into(),
        Beat::Answered(_) => "unexpected answer".into(),
    }
}

fn text(value: impl ToString) -> CString {
    CString::new(value.to_string()).unwrap_or_default()
}

impl Witness {
    pub fn new(conninfo: &str) -> Witness {
        Witness {
            node: Node::new(conninfo),
            table_ready: false,
        }
    }

    /// Runs one statement, making the table first if need be; `Ok(None)` when it returned no
    /// row.
    fn run(
        &mut self,
        sql: &CStr,
        params: &[Option<&CStr>],
        deadline: Instant,
    ) -> Result<Option<LeaseRow>, String> {
        if !self.table_ready {
            let made = self
                .node
                .run(CREATE_SQL, &[], deadline)
                .and_then(|r| match r {
                    Reply::Rows(_) => self.node.run(UPGRADE_SQL, &[], deadline),
                    error => Ok(error),
                });
            match made {
                Ok(Reply::Rows(_)) => self.table_ready = true,
                Ok(Reply::Error(msg)) => {
                    return Err(format!("could not create table pg_keeper_lease: {msg}"))
                }
                Err(beat) => return Err(describe_failure(beat)),
            }
        }
        match self.node.run(sql, params, deadline) {
            Ok(Reply::Rows(rows)) => rows.first().map(|r| parse_row(r)).transpose(),
            Ok(Reply::Error(msg)) => {
                // The table may have been dropped by hand: make it again next time.
                self.table_ready = false;
                Err(msg)
            }
            Err(beat) => {
                self.table_ready = false;
                Err(describe_failure(beat))
            }
        }
    }

    /// The primary's renewal (see [`claim_sql`]): the row as it stands afterwards, with `mine`
    /// set when this node holds the lease now.
    pub fn claim(
        &mut self,
        me: &str,
        timeline: u32,
        sync_standby: Option<&str>,
        lease: Duration,
        deadline: Instant,
    ) -> Result<Option<LeaseRow>, String> {
        let sync = sync_standby.map(text);
        let (me, tl, ms) = (text(me), text(timeline), text(lease.as_millis()));
        let params = [Some(&*me), Some(&*tl), sync.as_deref(), Some(&*ms)];
        self.run(&claim_sql(), &params, deadline)
    }

    /// The lease as it stands (a standby's look).
    pub fn read(&mut self, deadline: Instant) -> Result<Option<LeaseRow>, String> {
        self.run(&read_sql(), &[], deadline)
    }

    /// The standby's take-over (see [`take_sql`]): the new row, or why it was not taken.
    pub fn take(
        &mut self,
        me: &str,
        timeline: u32,
        lease: Duration,
        deadline: Instant,
    ) -> Result<LeaseRow, String> {
        let (me_t, tl, ms) = (text(me), text(timeline), text(lease.as_millis()));
        match self.run(
            &take_sql(),
            &[Some(&*me_t), Some(&*tl), Some(&*ms)],
            deadline,
        )? {
            Some(row) => Ok(row),
            None => {
                let now = self
                    .read(deadline)
                    .ok()
                    .flatten()
                    .map(|r| r.describe())
                    .unwrap_or_else(|| "no lease".into());
                Err(format!(
                    "the lease is not expired or does not name {me} as synchronous: {now}"
                ))
            }
        }
    }
}
