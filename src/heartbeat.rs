//! The heartbeat: one query to a node over libpq, bounded by a deadline.
//!
//! libpq is used in non-blocking mode only (`PQconnectStartParams` + `PQconnectPoll`,
//! `PQsendQuery` + `PQconsumeInput`), and every wait is a `WaitLatchOrSocket` with the time left
//! before the deadline, so a peer that swallows packets never holds the worker past the deadline
//! and SIGTERM is honoured at once. The connection is kept between beats and dropped after any
//! failure.

use std::ffi::{c_char, CStr, CString};
use std::time::Instant;

use libpq_sys as pq;
use pgrx::pg_sys;

use keeper_core::{Heartbeat, ReservedSlots};

/// What the node said about itself when it answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    pub in_recovery: bool,
    /// The timeline the node writes (primaries only).
    pub timeline: Option<u32>,
    /// The `sync_state` the node (a primary) shows for the asking standby, if it streams.
    pub sync_state_of_asker: Option<String>,
    /// The node's `pg_keeper.witness_conninfo` is set (None: hidden from this user).
    pub uses_witness: Option<bool>,
    /// (A primary.) Whom its keeper trusts as the synchronous standby: `Some("")` nobody;
    /// None when no keeper says (not running, an older version, or hidden from this user).
    pub trusted_standby: Option<String>,
    /// `pg_postmaster_start_time()` in microseconds since the Unix epoch.
    pub started_at_us: i64,
    pub port: i32,
}

/// The outcome of one beat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Beat {
    Answered(NodeFacts),
    /// The node answered but refused: alive, not a failure.
    Refused(String),
    /// No answer: the connection was refused or reset, or the name did not resolve.
    NoAnswer(String),
    /// No answer before the deadline: the node is hung or cut off (it neither answered, nor
    /// refused, nor reset the connection).
    Late(String),
    /// The worker was asked to stop while waiting.
    Interrupted,
}

/// What a server says, in English, when it goes down cleanly: a fast shutdown ends each
/// session with this (SQLSTATE 57P01, as `pg_terminate_backend` does). An immediate shutdown,
/// a crash or the postmaster's death says something else. "The database system is shutting
/// down", which refuses new sessions, does not tell: an immediate shutdown says it too. A
/// server whose messages are in another language gets no restart grace (the regular timing,
/// as for a failure).
const SHUTDOWN_PHRASES: &[&str] = &["terminating connection due to administrator command"];

/// Whether a server's message announces a clean shutdown.
pub fn announces_shutdown(message: &str) -> bool {
    SHUTDOWN_PHRASES.iter().any(|p| message.contains(p))
}

impl Beat {
    /// The part of the beat the decision core looks at.
    pub fn for_core(&self) -> Option<Heartbeat> {
        match self {
            Beat::Answered(_) => Some(Heartbeat::Answered),
            Beat::Refused(why) => Some(Heartbeat::Refused(why.clone())),
            Beat::NoAnswer(why) | Beat::Late(why) => Some(Heartbeat::NoAnswer(why.clone())),
            Beat::Interrupted => None,
        }
    }
}

/// The heartbeat: whether the node is in recovery, who it is (postmaster start and port), and on a
/// primary its timeline and the sync_state of the asking standby ($1 is its application_name).
const HEARTBEAT_SQL: &CStr = c"SELECT pg_catalog.pg_is_in_recovery(), \
    (extract(epoch FROM pg_catalog.pg_postmaster_start_time()) * 1000000)::int8, \
    pg_catalog.current_setting('port')::int4, \
    CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN ('x' || substr(pg_catalog.pg_walfile_name( \
        pg_catalog.pg_current_wal_lsn()), 1, 8))::bit(32)::int8 END, \
    CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN (SELECT sync_state::text \
        FROM pg_catalog.pg_stat_replication WHERE application_name = $1 AND state = 'streaming' \
        LIMIT 1) END, \
    (SELECT setting <> '' FROM pg_catalog.pg_settings WHERE name = 'pg_keeper.witness_conninfo'), \
    (SELECT query FROM pg_catalog.pg_stat_activity WHERE backend_type = 'pg_keeper' LIMIT 1)";

/// What a node says of its reserved connection slots and of the heartbeat's user (see
/// keeper_core::ReservedSlots). `reserved_connections` and `pg_use_reserved_connections` exist
/// from PostgreSQL 16: NULL before.
const RESERVED_SLOTS_SQL: &CStr =
    c"SELECT pg_catalog.current_setting('server_version_num')::int4, \
    current_user::text, pg_catalog.current_setting('is_superuser')::bool, \
    pg_catalog.current_setting('superuser_reserved_connections')::int4, \
    pg_catalog.current_setting('reserved_connections', true)::int4, \
    (SELECT pg_catalog.pg_has_role(oid, 'USAGE') FROM pg_catalog.pg_roles \
        WHERE rolname = 'pg_use_reserved_connections')";

/// How the keeper's activity in `pg_stat_activity` says whom it trusts as the synchronous
/// standby (see `Worker::publish_trust`): this, then the node name, or nothing for nobody.
pub const TRUST_PREFIX: &str = "pg_keeper: trusts as synchronous standby: ";

/// Server answers that mean "alive, but not letting you in right now". libpq reports a server's
/// refusal with the server's severity (`FATAL:`); the phrases cover servers that answer in
/// English with another severity wording.
const ALIVE_PHRASES: &[&str] = &[
    "FATAL:",
    "too many clients",
    "remaining connection slots are reserved",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
];

fn classify_connect_failure(message: &str) -> Beat {
    if message.contains(crate::serving::REFUSAL) {
        // It refuses because it cannot serve: for the standby that is a lost primary.
        return Beat::NoAnswer(message.to_string());
    }
    if ALIVE_PHRASES.iter().any(|p| message.contains(p)) {
        Beat::Refused(message.to_string())
    } else {
        Beat::NoAnswer(message.to_string())
    }
}

/// Whether the worker has been asked to stop (pgrx's SIGTERM handler sets this flag).
pub fn shutdown_requested() -> bool {
    // SAFETY: a sig_atomic_t written by the signal handler.
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

enum Wait {
    Ready,
    Deadline,
    Interrupted,
}

/// Waits until `sock` is ready for `events`, the deadline passes, or SIGTERM arrives.
fn wait_socket(sock: i32, events: u32, deadline: Instant) -> Wait {
    loop {
        if shutdown_requested() {
            return Wait::Interrupted;
        }
        let now = Instant::now();
        if now >= deadline {
            return Wait::Deadline;
        }
        let timeout_ms =
            (deadline - now).as_millis().clamp(1, i64::MAX as u128) as std::ffi::c_long;
        // SAFETY: MyLatch is this process's latch; the socket belongs to a live PGconn.
        let rc = unsafe {
            pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | events | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH)
                    as i32,
                sock as pg_sys::pgsocket,
                timeout_ms,
                pg_sys::PG_WAIT_EXTENSION,
            )
        };
        if rc & pg_sys::WL_LATCH_SET as i32 != 0 {
            unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
        }
        if rc & (pg_sys::WL_SOCKET_READABLE | pg_sys::WL_SOCKET_WRITEABLE) as i32 != 0 {
            return Wait::Ready;
        }
    }
}

/// A node the worker heartbeats, with the connection kept between beats.
pub struct Node {
    conninfo: CString,
    conn: *mut pq::PGconn,
    /// This node's application_name as a standby, which the peer shows in pg_stat_replication.
    asker: CString,
    /// The last message the node sent outside a query (a server that shuts down cleanly says
    /// so to its clients before closing); written by [`receive_notice`].
    notice: Box<Notice>,
    /// The node announced a clean shutdown on a connection since this was last taken
    /// ([`Node::take_announcement`]): between queries (the notice receiver) or as a query's
    /// error, before the connection was replaced.
    announced: bool,
    /// A connection was made since this was last taken ([`Node::take_new_connection`]).
    new_connection: bool,
}

#[derive(Default)]
struct Notice {
    sqlstate: [u8; 5],
    /// The message is the one of a clean shutdown (see [`SHUTDOWN_PHRASES`]), not, say, the
    /// postmaster's death (also SQLSTATE 57P01, but a crash).
    clean: bool,
}

impl Notice {
    /// A clean shutdown announced by the server: SQLSTATE 57P01 (admin_shutdown) with the
    /// message of a fast shutdown. With server messages in another language that cannot be
    /// told, and the keeper falls back to its regular timing.
    fn announces_shutdown(&self) -> bool {
        &self.sqlstate == b"57P01" && self.clean
    }
}

/// How the kept connection stands after the node sent something (or closed it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    Open,
    /// Closed after the server announced a clean shutdown (SQLSTATE 57P01).
    ClosedByShutdown,
    /// Closed or broken with no such announcement: a crash, a kill, a lost host.
    Lost,
}

/// libpq notice receiver: keeps what tells a shutdown from a crash and drops the text (the
/// default would print it to the server log without context).
unsafe extern "C" fn receive_notice(arg: *mut std::ffi::c_void, res: *const pq::PGresult) {
    if arg.is_null() {
        return;
    }
    let notice = &mut *(arg as *mut Notice);
    let code = pq::PQresultErrorField(res, pq::PG_DIAG_SQLSTATE as i32);
    if !code.is_null() && CStr::from_ptr(code).to_bytes().len() == 5 {
        notice
            .sqlstate
            .copy_from_slice(CStr::from_ptr(code).to_bytes());
    }
    let text = pq::PQresultErrorField(res, pq::PG_DIAG_MESSAGE_PRIMARY as i32);
    notice.clean = !text.is_null() && announces_shutdown(&CStr::from_ptr(text).to_string_lossy());
}

impl Drop for Node {
    fn drop(&mut self) {
        self.disconnect();
    }
}

fn error_message(conn: *const pq::PGconn) -> String {
    // SAFETY: PQerrorMessage returns a string owned by the connection.
    let raw = unsafe { CStr::from_ptr(pq::PQerrorMessage(conn)) }.to_string_lossy();
    let text = raw
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if text.is_empty() {
        "connection lost".into()
    } else {
        text
    }
}

impl Node {
    pub fn new(conninfo: &str) -> Node {
        Node {
            conninfo: CString::new(conninfo).unwrap_or_default(),
            conn: std::ptr::null_mut(),
            notice: Box::default(),
            announced: false,
            asker: CString::default(),
            new_connection: false,
        }
    }

    /// Sets the application_name under which this server streams from the node (if it does).
    pub fn set_asker(&mut self, application_name: &str) {
        self.asker = CString::new(application_name).unwrap_or_default();
    }

    /// The socket of the kept connection, if there is one.
    pub fn socket(&self) -> Option<i32> {
        // SAFETY: the connection is live while it is not null.
        (!self.conn.is_null())
            .then(|| unsafe { pq::PQsocket(self.conn) })
            .filter(|&s| s >= 0)
    }

    /// Reads whatever arrived on the idle kept connection, and says whether the node closed it
    /// and how: a connection lost without a shutdown announcement is evidence that the node's
    /// server is gone.
    /// The host and port of the server the kept connection is on, as libpq connected it (for a
    /// host name: the name; a conninfo can differ from where the connection went).
    pub fn live_address(&self) -> Option<(String, String)> {
        if self.conn.is_null() {
            return None;
        }
        // SAFETY: a live PGconn; libpq returns strings it owns (or NULL).
        unsafe {
            if pq::PQstatus(self.conn) != pq::ConnStatusType::CONNECTION_OK {
                return None;
            }
            let text = |p: *const c_char| {
                (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
            };
            Some((text(pq::PQhost(self.conn))?, text(pq::PQport(self.conn))?))
        }
    }

    pub fn check_connection(&mut self) -> Connection {
        if self.conn.is_null() {
            return Connection::Lost;
        }
        // SAFETY: a live connection in non-blocking mode; consuming input never blocks.
        // PQisBusy parses what was read, which hands a shutdown announcement to the notice
        // receiver.
        let open = unsafe {
            let read = pq::PQconsumeInput(self.conn) != 0;
            pq::PQisBusy(self.conn);
            read && pq::PQstatus(self.conn) == pq::ConnStatusType::CONNECTION_OK
        };
        if open {
            return Connection::Open;
        }
        let announced = self.notice.announces_shutdown();
        self.announced |= announced;
        self.disconnect();
        if announced {
            Connection::ClosedByShutdown
        } else {
            Connection::Lost
        }
    }

    pub fn disconnect(&mut self) {
        if !self.conn.is_null() {
            // SAFETY: the connection was made by PQconnectStartParams and is finished once.
            unsafe { pq::PQfinish(self.conn) };
            self.conn = std::ptr::null_mut();
        }
    }

    /// Opens a connection, polling it until it is made or the deadline passes.
    fn connect(&mut self, deadline: Instant) -> Result<(), Beat> {
        self.disconnect();
        // A host name is resolved here, within the deadline: libpq would resolve it without one.
        let host = crate::resolve::host_keywords(self.conninfo.to_str().unwrap_or(""), deadline)?;
        let mut keywords = vec![c"dbname".as_ptr(), c"fallback_application_name".as_ptr()];
        let mut values = vec![self.conninfo.as_ptr(), c"pg_keeper".as_ptr()];
        // After the expanded dbname, so that they override the connection string's own.
        for (k, v) in &host {
            keywords.push(k.as_ptr());
            values.push(v.as_ptr());
        }
        keywords.push(std::ptr::null());
        values.push(std::ptr::null());
        // SAFETY: the arrays are NULL-terminated and outlive the call.
        let conn = unsafe { pq::PQconnectStartParams(keywords.as_ptr(), values.as_ptr(), 1) };
        if conn.is_null() {
            return Err(Beat::NoAnswer("out of memory starting a connection".into()));
        }
        self.conn = conn;
        if unsafe { pq::PQstatus(conn) } == pq::ConnStatusType::CONNECTION_BAD {
            let why = error_message(conn);
            self.disconnect();
            return Err(classify_connect_failure(&why));
        }
        let mut poll = pq::PostgresPollingStatusType::PGRES_POLLING_WRITING;
        loop {
            let events = match poll {
                pq::PostgresPollingStatusType::PGRES_POLLING_OK => break,
                pq::PostgresPollingStatusType::PGRES_POLLING_FAILED => {
                    let why = error_message(conn);
                    self.disconnect();
                    return Err(classify_connect_failure(&why));
                }
                pq::PostgresPollingStatusType::PGRES_POLLING_READING => pg_sys::WL_SOCKET_READABLE,
                _ => pg_sys::WL_SOCKET_WRITEABLE,
            };
            let sock = unsafe { pq::PQsocket(conn) };
            match wait_socket(sock, events, deadline) {
                Wait::Ready => {}
                Wait::Deadline => {
                    self.disconnect();
                    return Err(Beat::Late(
                        "no answer to the connection attempt before the deadline".into(),
                    ));
                }
                Wait::Interrupted => {
                    self.disconnect();
                    return Err(Beat::Interrupted);
                }
            }
            poll = unsafe { pq::PQconnectPoll(conn) };
        }
        *self.notice = Notice::default();
        self.new_connection = true;
        // SAFETY: the box outlives the connection (both belong to self; the connection is
        // finished first, in disconnect).
        unsafe {
            pq::PQsetnonblocking(conn, 1);
            let slot: *mut Notice = &mut *self.notice;
            pq::PQsetNoticeReceiver(conn, Some(receive_notice), slot.cast());
        }
        Ok(())
    }

    /// Sends one query on the open connection and reads its whole answer.
    fn query(
        &mut self,
        sql: &CStr,
        params: &[Option<&CStr>],
        deadline: Instant,
    ) -> Result<Reply, Beat> {
        let conn = self.conn;
        let values: Vec<*const c_char> = params
            .iter()
            .map(|p| p.map_or(std::ptr::null(), CStr::as_ptr))
            .collect();
        // SAFETY: text parameters (NULL as a null pointer), NUL-terminated, alive for the call.
        let sent = unsafe {
            pq::PQsendQueryParams(
                conn,
                sql.as_ptr(),
                values.len() as i32,
                std::ptr::null(),
                values.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                0,
            )
        };
        if sent == 0 {
            return Err(Beat::NoAnswer(error_message(conn)));
        }
        let sock = unsafe { pq::PQsocket(conn) };
        let late = || Beat::Late("no answer before the deadline".into());
        // Flush the query out.
        loop {
            match unsafe { pq::PQflush(conn) } {
                0 => break,
                1 => match wait_socket(sock, pg_sys::WL_SOCKET_WRITEABLE, deadline) {
                    Wait::Ready => {}
                    Wait::Deadline => return Err(late()),
                    Wait::Interrupted => return Err(Beat::Interrupted),
                },
                _ => return Err(Beat::NoAnswer(error_message(conn))),
            }
        }
        // Wait for the whole answer.
        while unsafe { pq::PQisBusy(conn) } != 0 {
            match wait_socket(sock, pg_sys::WL_SOCKET_READABLE, deadline) {
                Wait::Ready => {}
                Wait::Deadline => return Err(late()),
                Wait::Interrupted => return Err(Beat::Interrupted),
            }
            if unsafe { pq::PQconsumeInput(conn) } == 0 {
                return Err(Beat::NoAnswer(error_message(conn)));
            }
        }
        let mut outcome = None;
        loop {
            let res = unsafe { pq::PQgetResult(conn) };
            if res.is_null() {
                break;
            }
            if outcome.is_none() {
                outcome = Some(read_reply(res));
            }
            unsafe { pq::PQclear(res) };
        }
        if unsafe { pq::PQstatus(conn) } == pq::ConnStatusType::CONNECTION_BAD {
            return Err(Beat::NoAnswer(error_message(conn)));
        }
        outcome.ok_or_else(|| Beat::NoAnswer("empty answer".into()))
    }

    /// Runs one query: reuse the connection if there is one, else connect; anything but a
    /// reply drops the connection. A kept connection that turns out broken is replaced by a
    /// fresh one within the same deadline, so a restarted node is not mistaken for a dead one.
    /// `Err` is never `Beat::Answered`.
    pub fn run(
        &mut self,
        sql: &CStr,
        params: &[Option<&CStr>],
        deadline: Instant,
    ) -> Result<Reply, Beat> {
        self.run_on(sql, params, deadline, true)
    }

    /// Like [`Node::run`], but never on a connection made during the call after the kept one
    /// failed: for sessions set up once per connection (the witness's), which must be set up
    /// again first. Connects only when there is no connection.
    pub fn run_once(
        &mut self,
        sql: &CStr,
        params: &[Option<&CStr>],
        deadline: Instant,
    ) -> Result<Reply, Beat> {
        self.run_on(sql, params, deadline, false)
    }

    /// Notes a clean shutdown announced by the node during a query: as the query's error, or
    /// as a notice just before the connection broke.
    fn note_announcement(&mut self, reply: &Result<Reply, Beat>) {
        let said = match reply {
            Ok(Reply::Error(msg))
            | Err(Beat::NoAnswer(msg) | Beat::Late(msg) | Beat::Refused(msg)) => {
                announces_shutdown(msg)
            }
            _ => false,
        };
        self.announced |= said || self.notice.announces_shutdown();
    }

    /// Whether the node announced a clean shutdown since the last call.
    pub fn take_announcement(&mut self) -> bool {
        std::mem::take(&mut self.announced)
    }

    /// Whether a connection was made since the last call (the kept connection is a new one).
    pub fn take_new_connection(&mut self) -> bool {
        std::mem::take(&mut self.new_connection)
    }

    /// Asks the node, on the kept connection, about its reserved connection slots and the
    /// heartbeat's user (see [`RESERVED_SLOTS_SQL`]). Never connects: it is asked right after
    /// an answered heartbeat on a new connection.
    pub fn reserved_slots(&mut self, deadline: Instant) -> Result<ReservedSlots, String> {
        if self.conn.is_null() {
            return Err("no connection".into());
        }
        match self.run_once(RESERVED_SLOTS_SQL, &[], deadline) {
            Ok(Reply::Rows(rows)) => read_reserved_slots(&rows),
            Ok(Reply::Error(msg)) => Err(msg),
            Err(Beat::NoAnswer(why) | Beat::Late(why) | Beat::Refused(why)) => Err(why),
            Err(_) => Err("interrupted".into()),
        }
    }

    /// Whether a connection is kept.
    pub fn is_connected(&self) -> bool {
        !self.conn.is_null()
    }

    fn run_on(
        &mut self,
        sql: &CStr,
        params: &[Option<&CStr>],
        deadline: Instant,
        retry: bool,
    ) -> Result<Reply, Beat> {
        let reused = !self.conn.is_null();
        if !reused {
            self.connect(deadline)?;
        }
        let mut reply = self.query(sql, params, deadline);
        self.note_announcement(&reply);
        // A kept connection that broke (not one that waited out the deadline): once more on a
        // new one.
        if retry && reused && matches!(reply, Err(Beat::NoAnswer(_))) && Instant::now() < deadline {
            reply = self
                .connect(deadline)
                .and_then(|()| self.query(sql, params, deadline));
            self.note_announcement(&reply);
        }
        if reply.is_err() {
            self.disconnect();
        }
        reply
    }

    /// One heartbeat (see [`HEARTBEAT_SQL`]).
    pub fn beat(&mut self, deadline: Instant) -> Beat {
        let asker = self.asker.clone();
        let beat = match self.run(HEARTBEAT_SQL, &[Some(&asker)], deadline) {
            Ok(Reply::Rows(rows)) => read_facts(&rows),
            // The server ran something and answered with an error: it is alive.
            Ok(Reply::Error(msg)) => Beat::Refused(format!("heartbeat query failed: {msg}")),
            Err(beat) => beat,
        };
        if !matches!(beat, Beat::Answered(_)) {
            self.disconnect();
        }
        beat
    }
}

/// A server's reply to one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The rows, each field as text (None for NULL).
    Rows(Vec<Vec<Option<String>>>),
    /// The server answered with an error (its message).
    Error(String),
}

fn read_reply(res: *mut pq::PGresult) -> Reply {
    // SAFETY: a live result; every index is within PQntuples x PQnfields.
    unsafe {
        match pq::PQresultStatus(res) {
            pq::ExecStatusType::PGRES_TUPLES_OK | pq::ExecStatusType::PGRES_COMMAND_OK => {
                let rows = (0..pq::PQntuples(res))
                    .map(|r| {
                        (0..pq::PQnfields(res))
                            .map(|f| {
                                (pq::PQgetisnull(res, r, f) == 0).then(|| {
                                    CStr::from_ptr(pq::PQgetvalue(res, r, f))
                                        .to_string_lossy()
                                        .into_owned()
                                })
                            })
                            .collect()
                    })
                    .collect();
                Reply::Rows(rows)
            }
            _ => Reply::Error(
                CStr::from_ptr(pq::PQresultErrorMessage(res))
                    .to_string_lossy()
                    .trim()
                    .to_string(),
            ),
        }
    }
}

fn read_reserved_slots(rows: &[Vec<Option<String>>]) -> Result<ReservedSlots, String> {
    let [row] = rows else {
        return Err("the answer could not be read".into());
    };
    let field = |i: usize| row.get(i).cloned().flatten();
    let number = |i: usize| field(i).and_then(|v| v.parse::<u32>().ok());
    match (number(0), field(1), field(2), number(3)) {
        (Some(server_version_num), Some(user), Some(superuser), Some(superuser_reserved)) => {
            Ok(ReservedSlots {
                server_version_num,
                user,
                superuser: superuser == "t",
                superuser_reserved,
                reserved: number(4),
                member_of_reserved_role: field(5).map(|v| v == "t"),
            })
        }
        _ => Err("the answer could not be read".into()),
    }
}

fn read_facts(rows: &[Vec<Option<String>>]) -> Beat {
    let [row] = rows else {
        return Beat::Refused("the heartbeat answer could not be read".into());
    };
    let field = |i: usize| row.get(i).cloned().flatten();
    match (
        field(1).and_then(|v| v.parse::<i64>().ok()),
        field(2).and_then(|v| v.parse::<i32>().ok()),
    ) {
        (Some(started_at_us), Some(port)) if row.len() == 7 => Beat::Answered(NodeFacts {
            in_recovery: field(0).as_deref() == Some("t"),
            timeline: field(3).and_then(|t| t.parse().ok()),
            sync_state_of_asker: field(4),
            uses_witness: field(5).map(|v| v == "t"),
            trusted_standby: field(6)
                .and_then(|a| a.strip_prefix(TRUST_PREFIX).map(|n| n.trim().to_string())),
            started_at_us,
            port,
        }),
        _ => Beat::Refused("the heartbeat answer could not be read".into()),
    }
}
