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

/// Made once per connection; `IF NOT EXISTS` because both nodes may try (at the same moment:
/// see [`Witness::prepare`]). Every statement names the table with its schema and runs with a
/// fixed `search_path` (see [`SESSION_SQL`]).
const CREATE_SQL: &CStr = c"CREATE TABLE IF NOT EXISTS public.pg_keeper_lease (
    id int PRIMARY KEY CHECK (id = 1),
    holder text NOT NULL,
    epoch bigint NOT NULL,
    timeline int NOT NULL,
    sync_standby text,
    expires_at timestamptz NOT NULL,
    renewed_at timestamptz NOT NULL,
    promoting boolean NOT NULL DEFAULT false,
    system_identifier text)";

/// Whether the table lacks the newer columns (made by an earlier version): `t` or `f`.
const NEEDS_UPGRADE_SQL: &CStr = c"SELECT count(*) < 2 FROM pg_catalog.pg_attribute \
    WHERE attrelid = 'public.pg_keeper_lease'::pg_catalog.regclass \
      AND attname IN ('promoting', 'system_identifier') AND NOT attisdropped";

/// Adds them (only then: ALTER TABLE needs the table's owner).
const UPGRADE_SQL: &CStr = c"ALTER TABLE public.pg_keeper_lease
    ADD COLUMN IF NOT EXISTS promoting boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS system_identifier text";

/// Set once per connection: a `search_path` no other schema can take over, and commits that
/// are durable on the witness whatever its default; then whether it can hold a lease at all.
const SESSION_SQL: &CStr =
    c"SELECT pg_catalog.set_config('search_path', 'pg_catalog, public', false), \
    pg_catalog.set_config('synchronous_commit', 'on', false), \
    pg_catalog.pg_is_in_recovery(), pg_catalog.current_setting('fsync')";

/// Whether the lease has expired, for a lease of `$ms` milliseconds (parameter `ms`): past its
/// expiry, or further in the future than a renewal can put it (the witness's clock stepped
/// back after the renewal).
fn expired(table: &str, ms: &str) -> String {
    format!(
        "({table}expires_at < clock_timestamp() \
          OR {table}expires_at > clock_timestamp() + {ms}::int8 * interval '1 millisecond')"
    )
}

/// The columns every statement returns, in this order (then `mine`); `ms` is the lease
/// parameter.
fn columns(ms: &str) -> String {
    format!(
        "holder, epoch, timeline, sync_standby, {} AS expired, \
         (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::int8 AS ms_left, \
         promoting, system_identifier",
        expired("", ms)
    )
}

/// The primary's renewal. $1 this node, $2 its timeline, $3 its synchronous standby or NULL,
/// $4 the lease in milliseconds, $5 this cluster's system identifier. It renews a lease it
/// holds (unless a newer incarnation of the same name recorded a later timeline), creates a
/// missing one, and takes over an expired lease of an older timeline; never a lease of another
/// cluster. Otherwise it changes nothing and returns the row as it is.
fn claim_sql() -> CString {
    let cols = columns("$4");
    CString::new(format!(
        "WITH claimed AS (
            INSERT INTO public.pg_keeper_lease AS l
                (id, holder, epoch, timeline, sync_standby, expires_at, renewed_at, promoting,
                 system_identifier)
            VALUES (1, $1, 1, $2::int, $3, clock_timestamp() + $4::int8 * interval '1 millisecond',
                    clock_timestamp(), false, $5)
            ON CONFLICT (id) DO UPDATE SET
                epoch = CASE WHEN l.holder = EXCLUDED.holder THEN l.epoch ELSE l.epoch + 1 END,
                holder = EXCLUDED.holder, timeline = EXCLUDED.timeline,
                sync_standby = EXCLUDED.sync_standby, expires_at = EXCLUDED.expires_at,
                renewed_at = EXCLUDED.renewed_at, promoting = false,
                system_identifier = EXCLUDED.system_identifier
            WHERE (l.system_identifier IS NULL OR l.system_identifier = EXCLUDED.system_identifier)
              AND ((l.holder = EXCLUDED.holder AND l.timeline <= EXCLUDED.timeline)
                OR (l.holder <> EXCLUDED.holder AND l.timeline < EXCLUDED.timeline
                    AND {}))
            RETURNING {cols}, true AS mine)
        SELECT * FROM claimed
        UNION ALL
        SELECT {cols}, false FROM public.pg_keeper_lease
         WHERE id = 1 AND NOT EXISTS (SELECT FROM claimed)",
        expired("l.", "$4")
    ))
    .expect("no NUL in the statement")
}

/// $1 the lease in milliseconds.
fn read_sql() -> CString {
    CString::new(format!(
        "SELECT {}, false FROM public.pg_keeper_lease WHERE id = 1",
        columns("$1")
    ))
    .expect("no NUL in the statement")
}

/// The standby's take-over. $1 this node, $2 its timeline, $3 the lease in milliseconds, $4
/// this cluster's system identifier. Only a lease it holds, or an expired one of this cluster
/// that names it as synchronous; marked `promoting` until its first renewal as a primary.
fn take_sql() -> CString {
    CString::new(format!(
        "UPDATE public.pg_keeper_lease SET
            epoch = CASE WHEN holder = $1 THEN epoch ELSE epoch + 1 END,
            holder = $1, timeline = $2::int, sync_standby = NULL, promoting = true,
            system_identifier = $4,
            expires_at = clock_timestamp() + $3::int8 * interval '1 millisecond',
            renewed_at = clock_timestamp()
         WHERE id = 1
           AND (system_identifier IS NULL OR system_identifier = $4)
           AND (holder = $1 OR ({} AND sync_standby = $1))
         RETURNING {}, true",
        expired("", "$3"),
        columns("$3")
    ))
    .expect("no NUL in the statement")
}

/// Reads one row of [`columns`] plus `mine`.
fn parse_row(row: &[Option<String>]) -> Result<LeaseRow, String> {
    let text = |i: usize| row.get(i).cloned().flatten();
    let num = |i: usize| text(i).and_then(|v| v.parse::<i64>().ok());
    match (text(0), num(1), num(2), num(5)) {
        (Some(holder), Some(epoch), Some(timeline), Some(ms_left)) if row.len() == 9 => {
            Ok(LeaseRow {
                holder,
                epoch,
                timeline,
                sync_standby: text(3),
                expired: text(4).as_deref() == Some("t"),
                ms_left,
                promoting: text(6).as_deref() == Some("t"),
                system_identifier: text(7),
                mine: text(8).as_deref() == Some("t"),
            })
        }
        _ => Err("the witness's answer could not be read".into()),
    }
}

/// The connection to the witness, kept between ticks.
pub struct Witness {
    node: Node,
    /// The session is set up and the lease table exists (made or seen on this connection's
    /// server).
    table_ready: bool,
    /// This cluster's system identifier, recorded in the lease and compared by every statement.
    system_identifier: String,
}

fn describe_failure(beat: Beat) -> String {
    match beat {
        Beat::NoAnswer(why) | Beat::Late(why) | Beat::Refused(why) => why,
        Beat::Interrupted => "interrupted by a shutdown request".into(),
        Beat::Answered(_) => "unexpected answer".into(),
    }
}

fn text(value: impl ToString) -> CString {
    CString::new(value.to_string()).unwrap_or_default()
}

impl Witness {
    pub fn new(conninfo: &str, system_identifier: u64) -> Witness {
        Witness {
            node: Node::new(conninfo),
            table_ready: false,
            system_identifier: system_identifier.to_string(),
        }
    }

    /// Sets up the session, refuses a witness that cannot keep a lease, makes the table.
    fn prepare(&mut self, deadline: Instant) -> Result<(), String> {
        self.table_ready = false;
        let run = |node: &mut Node, sql: &CStr| match node.run_once(sql, &[], deadline) {
            Ok(Reply::Rows(rows)) => Ok(rows),
            Ok(Reply::Error(msg)) => Err(msg),
            Err(beat) => Err(describe_failure(beat)),
        };
        let rows = run(&mut self.node, SESSION_SQL)?;
        let field = |i: usize| rows.first().and_then(|r| r.get(i).cloned().flatten());
        if field(2).as_deref() == Some("t") {
            return Err("the witness server is in recovery (a standby): a lease there could not be written, and could be lost with its primary".into());
        }
        if field(3).as_deref() == Some("off") {
            return Err("the witness server runs with fsync = off: a lease there could be lost in a crash and then taken twice".into());
        }
        // Both nodes may make it at the same moment: the one whose CREATE waited on the other's
        // gets a duplicate-key error once that one commits, and then finds the table there.
        run(&mut self.node, CREATE_SQL)
            .or_else(|_| run(&mut self.node, CREATE_SQL))
            .and_then(|_| run(&mut self.node, NEEDS_UPGRADE_SQL))
            .and_then(
                |rows| match rows.first().and_then(|r| r.first().cloned().flatten()) {
                    Some(t) if t == "t" => run(&mut self.node, UPGRADE_SQL).map(|_| ()),
                    _ => Ok(()),
                },
            )
            .map_err(|msg| format!("could not create table pg_keeper_lease: {msg}"))?;
        self.table_ready = true;
        Ok(())
    }

    /// Runs one statement, making the table first if need be; `Ok(None)` when it returned no
    /// row.
    fn run(
        &mut self,
        sql: &CStr,
        params: &[Option<&CStr>],
        deadline: Instant,
    ) -> Result<Option<LeaseRow>, String> {
        // A new connection is a new session: set up and checked again before any statement.
        if !self.node.is_connected() {
            self.table_ready = false;
        }
        let kept = self.table_ready;
        if !self.table_ready {
            self.prepare(deadline)?;
        }
        let mut reply = self.node.run_once(sql, params, deadline);
        if kept && Instant::now() < deadline {
            // The kept connection had broken (the witness restarted, say): once more on a new
            // one, set up first, within the same deadline.
            if let Err(Beat::NoAnswer(_)) = &reply {
                self.prepare(deadline)?;
                reply = self.node.run_once(sql, params, deadline);
            }
        }
        match reply {
            Ok(Reply::Rows(rows)) => match rows.first().map(|r| parse_row(r)).transpose()? {
                Some(row) => match row.foreign(&self.system_identifier) {
                    Some(why) => Err(why),
                    None => Ok(Some(row)),
                },
                None => Ok(None),
            },
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
        let sysid = text(&self.system_identifier);
        let params = [
            Some(&*me),
            Some(&*tl),
            sync.as_deref(),
            Some(&*ms),
            Some(&*sysid),
        ];
        self.run(&claim_sql(), &params, deadline)
    }

    /// The lease as it stands (a standby's look), judged for a lease of `lease`.
    pub fn read(&mut self, lease: Duration, deadline: Instant) -> Result<Option<LeaseRow>, String> {
        let ms = text(lease.as_millis());
        self.run(&read_sql(), &[Some(&*ms)], deadline)
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
        let sysid = text(&self.system_identifier);
        match self.run(
            &take_sql(),
            &[Some(&*me_t), Some(&*tl), Some(&*ms), Some(&*sysid)],
            deadline,
        )? {
            Some(row) => Ok(row),
            None => {
                let now = self
                    .read(lease, deadline)
                    .ok()
                    .flatten()
                    .map(|r| r.describe())
                    .unwrap_or_else(|| "no lease".into());
                Err(format!(
                    "the lease is not expired, does not name {me} as synchronous, or is another cluster's: {now}"
                ))
            }
        }
    }
}
