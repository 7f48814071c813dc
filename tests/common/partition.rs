//! Fault injection between the two servers of a pair: TCP proxies in front of the servers whose
//! links can be reset or black-holed at run time, a pair whose server-to-server traffic goes
//! through those proxies, and a checker that writes all the time (as a client would) and tells
//! afterwards which acknowledged commits were lost and whether two servers accepted writes at
//! the same time.
//!
//! A [`Witness`] (a plain server, without pg_keeper) can run beside the pair, reached by each
//! node's keeper through a proxy of its own.
//!
//! Only 127.0.0.1 is used. Every wait is bounded; dropping a [`Proxy`] ends its threads (bounded
//! joins), dropping a [`ProxiedPair`] stops the servers (the witness, then the pair) first, then
//! the proxies.

use std::collections::HashSet;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

// `partition` is a child module of `common`, so the harness's private helpers (Node::new,
// new_root, init_primary_with_hba, Node::destroy) are in reach and the witness reuses them.
use super::{free_port, init_primary_with_hba, new_root, wait_until, Node, Options, Pair, BIN};

// ---------------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------------

/// What a [`Proxy`] does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forwards both ways.
    Pass,
    /// Closes every connection and every new one at once (like a reset / refused connection).
    Drop,
    /// Accepts connections but forwards nothing either way and keeps the sockets open (like a
    /// link that swallows packets). Data already read is held, not discarded, and goes through
    /// when the mode is back to `Pass`, as TCP retransmission would do after a healed link; a
    /// connection accepted while black-holed reaches the server only then.
    Blackhole,
}

impl Mode {
    fn code(self) -> u8 {
        match self {
            Mode::Pass => 0,
            Mode::Drop => 1,
            Mode::Blackhole => 2,
        }
    }

    fn of(code: u8) -> Mode {
        match code {
            0 => Mode::Pass,
            1 => Mode::Drop,
            _ => Mode::Blackhole,
        }
    }
}

struct Shared {
    mode: AtomicU8,
    /// The port forwarded to; 0 (not set yet) behaves as [`Mode::Drop`].
    target: AtomicU16,
    stop: AtomicBool,
    /// Connections currently open through the proxy.
    open: AtomicUsize,
    /// Connections accepted in all.
    accepted: AtomicUsize,
    /// Bandwidth limit in bytes per second for each direction of each connection; 0: none.
    rate: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    /// The mode in force, `Drop` when stopping or when no target is set.
    fn mode(&self) -> Mode {
        if self.stop.load(Ordering::SeqCst) || self.target.load(Ordering::SeqCst) == 0 {
            Mode::Drop
        } else {
            Mode::of(self.mode.load(Ordering::SeqCst))
        }
    }

    fn spawn(self: &Arc<Self>, f: impl FnOnce() + Send + 'static) {
        let handle = std::thread::spawn(f);
        let mut threads = self.threads.lock().unwrap();
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
    }
}

/// A TCP proxy on 127.0.0.1:`port` to 127.0.0.1:`target`, one thread per direction per
/// connection.
pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(20);
const IO_TIMEOUT: Duration = Duration::from_millis(100);

impl Proxy {
    /// Listens on a free port; forwards nothing (refuses) until [`Proxy::set_target`].
    pub fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(Mode::Pass.code()),
            target: AtomicU16::new(0),
            stop: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            rate: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || accept_loop(listener, s));
        Proxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    pub fn set_target(&self, port: u16) {
        self.shared.target.store(port, Ordering::SeqCst);
    }

    /// Switches the mode; applies to the open connections too (within ~100 ms).
    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.store(mode.code(), Ordering::SeqCst);
    }

    pub fn mode(&self) -> Mode {
        Mode::of(self.shared.mode.load(Ordering::SeqCst))
    }

    /// Limits each direction of every connection (the open ones too) to `bytes_per_second`
    /// (a slow link); `None` lifts the limit. The modes work as before: `Drop` still closes at
    /// once, `Blackhole` still holds what was read. `Some(0)` is taken as `None`.
    pub fn set_rate(&self, bytes_per_second: Option<u64>) {
        self.shared
            .rate
            .store(bytes_per_second.unwrap_or(0), Ordering::SeqCst);
    }

    /// The bandwidth limit in force (bytes per second per direction), if any.
    pub fn rate(&self) -> Option<u64> {
        Some(self.shared.rate.load(Ordering::SeqCst)).filter(|&r| r > 0)
    }

    /// Connections open through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    pub fn accepted_connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut handles: Vec<JoinHandle<()>> = self.accept.take().into_iter().collect();
        // The accept loop is joined first so that no thread is added after this.
        while let Some(h) = handles.pop() {
            while !h.is_finished() && Instant::now() < deadline {
                sleep(POLL);
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        let rest: Vec<JoinHandle<()>> = std::mem::take(&mut *self.shared.threads.lock().unwrap());
        for h in rest {
            while !h.is_finished() && Instant::now() < deadline {
                sleep(POLL);
            }
            if h.is_finished() {
                let _ = h.join();
            }
            // A thread still running after the deadline is left behind rather than hanging the
            // test; it ends at its next poll of the stop flag.
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                if shared.mode() == Mode::Drop {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let s = shared.clone();
                shared.spawn(move || connection(client, s));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => sleep(POLL),
            Err(_) => sleep(POLL),
        }
    }
}

/// One accepted connection: waits while black-holed, then connects to the target and pumps
/// both ways.
fn connection(client: TcpStream, shared: Arc<Shared>) {
    let _ = client.set_nonblocking(false);
    shared.open.fetch_add(1, Ordering::SeqCst);
    let _open = OpenGuard(shared.clone());
    loop {
        match shared.mode() {
            Mode::Drop => {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            Mode::Blackhole => sleep(POLL),
            Mode::Pass => break,
        }
    }
    let target = SocketAddr::from(([127, 0, 0, 1], shared.target.load(Ordering::SeqCst)));
    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
        return;
    };
    let s = shared.clone();
    let back = std::thread::spawn(move || pump(s2, c2, s));
    pump(client, server, shared.clone());
    // The other direction ends within a poll once this one has shut the sockets, or at its own
    // end of stream.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !back.is_finished() && Instant::now() < deadline {
        sleep(POLL);
    }
    if back.is_finished() {
        let _ = back.join();
    }
}

struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn close_both(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Largest read while a rate limit is in force, so that the pacing is smooth.
const LIMITED_CHUNK: usize = 8 * 1024;

/// Waits, while a rate limit is in force, until the `n` bytes just read may be passed on:
/// `due` is when the link is free again (no credit is saved up while it idles). Returns false
/// if the mode turned to `Drop` meanwhile. Lifting the limit ends the wait at once.
fn pace(shared: &Shared, due: &mut Instant, n: usize) -> bool {
    let rate = shared.rate.load(Ordering::SeqCst);
    if rate == 0 {
        return true;
    }
    let now = Instant::now();
    if *due < now {
        *due = now;
    }
    *due += Duration::from_secs_f64(n as f64 / rate as f64);
    loop {
        if shared.mode() == Mode::Drop {
            return false;
        }
        let now = Instant::now();
        if now >= *due || shared.rate.load(Ordering::SeqCst) == 0 {
            return true;
        }
        sleep((*due - now).min(POLL));
    }
}

/// Copies `from` to `to` while the mode allows, at most at the rate limit if one is set;
/// closes both sockets on `Drop`, stop or error.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: Arc<Shared>) {
    let _ = from.set_read_timeout(Some(IO_TIMEOUT));
    let _ = to.set_write_timeout(Some(IO_TIMEOUT));
    let mut buf = vec![0u8; 32 * 1024];
    let mut due = Instant::now();
    loop {
        match shared.mode() {
            Mode::Drop => return close_both(&from, &to),
            Mode::Blackhole => {
                sleep(POLL);
                continue;
            }
            Mode::Pass => {}
        }
        let limited = shared.rate.load(Ordering::SeqCst) > 0;
        let room = if limited { LIMITED_CHUNK } else { buf.len() };
        let n = match from.read(&mut buf[..room]) {
            Ok(0) => {
                // End of stream one way: pass it on; the other direction goes on until its own.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if timed_out(&e) => continue,
            Err(_) => return close_both(&from, &to),
        };
        if !pace(&shared, &mut due, n) {
            return close_both(&from, &to);
        }
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            match shared.mode() {
                Mode::Drop => return close_both(&from, &to),
                Mode::Blackhole => {
                    // Read just before the cut: held until the link is back.
                    sleep(POLL);
                    continue;
                }
                Mode::Pass => {}
            }
            match to.write(pending) {
                Ok(0) => return close_both(&from, &to),
                Ok(k) => pending = &pending[k..],
                Err(e) if timed_out(&e) => {}
                Err(_) => return close_both(&from, &to),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The witness
// ---------------------------------------------------------------------------------------------

/// A plain PostgreSQL 15 server, without pg_keeper, for `pg_keeper.witness_conninfo`: initdb with
/// trust authentication and user postgres, `listen_addresses = '127.0.0.1'`, a free port,
/// `fsync = on` (the keepers refuse a witness without it), no `shared_preload_libraries`; run as
/// the `postgres` OS user. Dropping it stops the server whatever its state (bounded), prints its
/// log if the test panicked, and removes its directory when it has one of its own.
pub struct Witness {
    /// The server (named `witness`; `node.port` is its real port).
    pub node: Node,
    /// A directory made for this witness alone, removed on drop.
    own_root: Option<PathBuf>,
}

impl Witness {
    /// Initializes and starts a witness in `root/witness` (a pair's directory, which the pair
    /// removes).
    pub fn create(root: &Path) -> Witness {
        let witness = Witness {
            node: Node::new("witness", root, free_port()),
            own_root: None,
        };
        witness.init_and_start();
        witness
    }

    /// Initializes and starts a witness in a fresh directory of its own, for tests without a
    /// pair.
    pub fn alone(label: &str) -> Witness {
        let root = new_root(label);
        let witness = Witness {
            node: Node::new("witness", &root, free_port()),
            own_root: Some(root),
        };
        witness.init_and_start();
        witness
    }

    fn init_and_start(&self) {
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nfsync = on\nlog_line_prefix = '%m [%p] '",
            self.node.port
        );
        init_primary_with_hba(&self.node, &conf, "");
        self.node.start();
    }

    /// A standby of this witness in `root/<name>` (pg_basebackup, streaming from it, started):
    /// a witness server in recovery, which a keeper must refuse.
    pub fn standby(&self, root: &Path, name: &'static str) -> Witness {
        let standby = Witness {
            node: Node::new(name, root, free_port()),
            own_root: None,
        };
        standby.node.make_standby_of(&self.node, false);
        standby
    }

    /// Its real port (not a proxy's).
    pub fn port(&self) -> u16 {
        self.node.port
    }

    /// Runs SQL through psql on its real port (bounded connect and statement times); `Err`
    /// carries psql's error output.
    pub fn sql(&self, sql: &str) -> Result<String, String> {
        self.node.sql(sql)
    }

    /// `pg_ctl -m fast stop` (waits at most 60 s; panics if it fails).
    pub fn stop(&self) {
        self.node.stop("fast");
    }

    /// `pg_ctl start` (waits at most 60 s; panics if it fails).
    pub fn start(&self) {
        self.node.start();
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.node.destroy();
        if std::thread::panicking() {
            eprintln!("---- witness log ----\n{}", self.node.log_text());
        }
        if let Some(root) = &self.own_root {
            let _ = fs::remove_dir_all(root);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A pair whose links go through proxies
// ---------------------------------------------------------------------------------------------

/// A [`Pair`] (node1 primary, node2 synchronous standby) in which everything one server sends to
/// the other goes through a proxy:
///
/// - `to_node1` is in front of node1: `pg_keeper.node1_conninfo` names it, so node2's heartbeats
///   to node1 go through it;
/// - `repl_to_node1` is in front of node1 too, and only node2's `primary_conninfo` names it, so
///   it carries node2's replication and nothing else: cutting it alone cuts replication while
///   the heartbeats pass;
/// - `to_node2` is in front of node2: `pg_keeper.node2_conninfo` and node1's `primary_conninfo`
///   (used only once node1 is a standby) name it, so node1's heartbeats to node2 go through it.
///
/// Each server also identifies itself through its own proxy when its keeper starts (the keeper
/// compares the postmaster start time and port it reaches with its own, so a proxy in between
/// is fine while it passes). Clients in the tests use the direct ports (`node.port`). Cutting
/// the three proxies ([`ProxiedPair::link`]) cuts the link between the servers symmetrically and
/// nothing else.
///
/// With [`ProxiedPair::connected_with_witness`], a [`Witness`] runs beside the pair and each
/// node's keeper reaches it through a proxy of its own (`witness_from_node1`,
/// `witness_from_node2`), so that each node's link to the witness can be cut alone. Without a
/// witness those two proxies have no target and refuse every connection.
pub struct ProxiedPair {
    // Dropped in this order: the witness (whose directory is inside the pair's) and the servers
    // stop first, then the proxies.
    pub witness: Option<Witness>,
    pub pair: Pair,
    pub to_node1: Proxy,
    pub to_node2: Proxy,
    pub repl_to_node1: Proxy,
    pub witness_from_node1: Proxy,
    pub witness_from_node2: Proxy,
}

fn node_conninfo(port: u16) -> String {
    format!("host=127.0.0.1 port={port} dbname=postgres user=postgres")
}

/// Runs `sql` as postgres on 127.0.0.1:`port` (a server's or a proxy's) with psql, with a 2 s
/// connect timeout and killed after 10 s; its output, or `None` if it failed.
pub fn query(port: u16, sql: &str) -> Option<String> {
    psql_once(10, &node_conninfo(port), sql)
}

impl ProxiedPair {
    /// Starts the pair with the node conninfos on the proxies, moves node2's replication onto
    /// `repl_to_node1`, and waits until both keepers are connected and node2 is synchronous.
    pub fn connected(label: &str, opts: Options) -> ProxiedPair {
        let to_node1 = Proxy::start();
        let to_node2 = Proxy::start();
        let repl_to_node1 = Proxy::start();
        let witness_from_node1 = Proxy::start();
        let witness_from_node2 = Proxy::start();
        let mut opts = opts;
        // Later lines of the shared postgresql.conf win over Pair::start's conninfos.
        opts.extra = format!(
            "{}\npg_keeper.node1_conninfo = '{}'\npg_keeper.node2_conninfo = '{}'",
            opts.extra,
            node_conninfo(to_node1.port),
            node_conninfo(to_node2.port)
        );
        // Until the targets are set the proxies refuse: the keepers report that they cannot
        // identify themselves and retry every keepalive_time.
        let pair = Pair::start(label, opts);
        to_node1.set_target(pair.node1.port);
        to_node2.set_target(pair.node2.port);
        repl_to_node1.set_target(pair.node1.port);
        let pp = ProxiedPair {
            witness: None,
            pair,
            to_node1,
            to_node2,
            repl_to_node1,
            witness_from_node1,
            witness_from_node2,
        };
        let (n1, n2) = (&pp.pair.node1, &pp.pair.node2);
        n2.append_conf(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name=node2'",
            pp.repl_to_node1.port
        ));
        n1.append_conf(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name=node1'",
            pp.to_node2.port
        ));
        n2.reload();
        n1.reload();
        let through_proxy = wait_until(Duration::from_secs(30), || {
            n2.sql("SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'")
                .is_ok_and(|p| p == pp.repl_to_node1.port.to_string())
        });
        assert!(
            through_proxy,
            "node2 does not stream through the replication proxy (port {}): {:?}",
            pp.repl_to_node1.port,
            n2.sql("SELECT status, sender_port FROM pg_stat_wal_receiver")
        );
        n1.expect_title("master mode:connected", Duration::from_secs(30));
        n2.expect_title("standby mode:connected", Duration::from_secs(30));
        pp.pair.wait_synchronous();
        pp
    }

    /// Like [`ProxiedPair::connected`], with a [`Witness`]: starts it, points
    /// `witness_from_node1` and `witness_from_node2` at it, sets each node's
    /// `pg_keeper.witness_conninfo` to its own witness proxy, reloads, and waits until the
    /// witness's lease names node1 as the holder and node2 as the synchronous standby.
    pub fn connected_with_witness(label: &str, opts: Options) -> ProxiedPair {
        let mut pp = ProxiedPair::connected(label, opts);
        let witness = Witness::create(&pp.pair.root);
        pp.use_witness(witness.port());
        pp.witness = Some(witness);
        let witness = pp.witness.as_ref().unwrap();
        // The table's existence is checked first so that the polling does not fill the
        // witness's log with errors until the keeper has created it.
        let held = wait_until(Duration::from_secs(30), || {
            witness.sql("SELECT to_regclass('pg_keeper_lease') IS NOT NULL") == Ok("t".into())
                && witness
                    .sql("SELECT holder, sync_standby FROM pg_keeper_lease")
                    .is_ok_and(|row| row == "node1|node2")
        });
        assert!(
            held,
            "the witness has no lease held by node1 with node2 synchronous after 30 s; \
             pg_keeper_lease on the witness: {:?}; connections accepted by the witness proxies: \
             {} from node1, {} from node2\n---- node1 keeper log ----\n{}\n---- node2 keeper log ----\n{}",
            witness.sql("SELECT * FROM pg_keeper_lease"),
            pp.witness_from_node1.accepted_connections(),
            pp.witness_from_node2.accepted_connections(),
            pp.pair.node1.keeper_log().join("\n"),
            pp.pair.node2.keeper_log().join("\n")
        );
        pp
    }

    /// Points both witness proxies at the server on `port` and sets each node's
    /// `pg_keeper.witness_conninfo` to its own witness proxy (then reloads it). Connections
    /// already open through the proxies stay with the server they reached.
    pub fn use_witness(&self, port: u16) {
        self.witness_from_node1.set_target(port);
        self.witness_from_node2.set_target(port);
        for (node, proxy) in [
            (&self.pair.node1, &self.witness_from_node1),
            (&self.pair.node2, &self.witness_from_node2),
        ] {
            node.append_conf(&format!(
                "pg_keeper.witness_conninfo = '{} connect_timeout=2'",
                node_conninfo(proxy.port)
            ));
            node.reload();
        }
    }

    /// The lease as the witness has it now, read on its real port: (holder, epoch,
    /// sync_standby, still valid: `expires_at > clock_timestamp()`); `None` without a witness or
    /// when it cannot be read.
    pub fn lease(&self) -> Option<(String, i64, Option<String>, bool)> {
        let row = self
            .witness
            .as_ref()?
            .sql(
                "SELECT coalesce(holder, ''), epoch, expires_at > clock_timestamp(), \
                 sync_standby IS NULL, coalesce(sync_standby, '') FROM pg_keeper_lease WHERE id = 1",
            )
            .ok()?;
        // sync_standby last, so that a '|' in it stays in it.
        let mut fields = row.splitn(5, '|');
        let holder = fields.next()?.to_string();
        let epoch = fields.next()?.parse().ok()?;
        let valid = fields.next()? == "t";
        let sync_null = fields.next()? == "t";
        let sync = fields.next()?.to_string();
        Some((holder, epoch, (!sync_null).then_some(sync), valid))
    }

    /// Sets the three proxies between the servers: `Pass` heals the link, `Drop`/`Blackhole`
    /// cut it both ways (heartbeats and replication). The witness proxies are left as they are.
    pub fn link(&self, mode: Mode) {
        self.to_node1.set_mode(mode);
        self.to_node2.set_mode(mode);
        self.repl_to_node1.set_mode(mode);
    }

    /// Sets everything between `node` and the two other parties: the link between the servers
    /// and `node`'s link to the witness.
    pub fn isolate(&self, node: &Node, mode: Mode) {
        self.link(mode);
        self.witness_link(node, mode);
    }

    /// Sets only `node`'s link to the witness.
    pub fn witness_link(&self, node: &Node, mode: Mode) {
        self.witness_proxy(node).set_mode(mode);
    }

    /// The proxy through which `node`'s keeper reaches the witness.
    pub fn witness_proxy(&self, node: &Node) -> &Proxy {
        if node.port == self.pair.node1.port {
            &self.witness_from_node1
        } else if node.port == self.pair.node2.port {
            &self.witness_from_node2
        } else {
            panic!(
                "{} (port {}) is not a node of this pair",
                node.name, node.port
            )
        }
    }

    /// The two servers of the pair (not the witness).
    pub fn nodes(&self) -> [&Node; 2] {
        [&self.pair.node1, &self.pair.node2]
    }
}

// ---------------------------------------------------------------------------------------------
// The checker
// ---------------------------------------------------------------------------------------------

/// A write a server acknowledged.
#[derive(Clone, Debug)]
pub struct Ack {
    /// The port (direct) of the server that acknowledged it.
    pub port: u16,
    /// The writer's id, or None for a probe.
    pub id: Option<i64>,
    /// The client sent it at or after `start` and had the acknowledgement at `end`.
    pub start: Instant,
    pub end: Instant,
}

/// Writes all the time while a scenario runs:
///
/// - a writer commits increasing ids every ~20 ms through a multi-host conninfo with
///   `target_session_attrs=read-write` (as an application would), one psql per commit, and
///   records what was acknowledged and by which server;
/// - a probe per server tries an `INSERT` directly on it every ~300 ms and records when it was
///   acknowledged.
pub struct Checker {
    ports: [u16; 2],
    names: [&'static str; 2],
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
    threads: Vec<JoinHandle<()>>,
    pub started: Instant,
}

/// What the checker found, after the link healed.
#[derive(Debug)]
pub struct Verdict {
    /// The names of the servers that accepted a direct write at the end.
    pub writable_at_end: Vec<&'static str>,
    /// The final primary (the only writable server), if there is exactly one.
    pub final_primary: Option<&'static str>,
    /// Ids the writer had acknowledged.
    pub acknowledged: usize,
    /// Acknowledged per server (node1, node2).
    pub acknowledged_by: [usize; 2],
    /// Acknowledged ids missing on the final primary.
    pub lost: Vec<i64>,
    /// How long both servers certainly accepted writes at the same time (zero if they did not).
    pub overlap: Duration,
    /// The longest time without any acknowledged write of the writer (an availability figure).
    pub longest_gap: Duration,
    /// Every stretch of more than a second without an acknowledged write of the writer: when it
    /// began (since the checker started) and how long it was.
    pub stalls: Vec<(Duration, Duration)>,
}

/// psql with no statement timeout (a statement timeout would turn a commit still waiting for
/// its synchronous standby into a success), killed by `timeout` instead; stdout on success.
fn psql_once(seconds: u32, conninfo: &str, sql: &str) -> Option<String> {
    let out = Command::new("timeout")
        .args(["-s", "KILL", &seconds.to_string(), &format!("{BIN}/psql")])
        .args([
            "-X",
            "-Atq",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            sql,
        ])
        .env_remove("PGOPTIONS")
        .env("PGCONNECT_TIMEOUT", "2")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Checker {
    /// Creates the tables on node1 (the primary) and starts writing.
    pub fn start(pair: &Pair) -> Checker {
        pair.node1
            .sql(
                "CREATE TABLE checker_writes (id bigint PRIMARY KEY, port int, at timestamptz DEFAULT clock_timestamp());
                 CREATE TABLE checker_probes (port int, at timestamptz DEFAULT clock_timestamp())",
            )
            .expect("create the checker's tables");
        let ports = [pair.node1.port, pair.node2.port];
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();

        let (s, a) = (stop.clone(), acks.clone());
        let multi = format!(
            "host=127.0.0.1,127.0.0.1 port={},{} target_session_attrs=read-write connect_timeout=2 dbname=postgres user=postgres",
            ports[0], ports[1]
        );
        threads.push(std::thread::spawn(move || {
            let mut id = 0i64;
            while !s.load(Ordering::SeqCst) {
                id += 1;
                let start = Instant::now();
                let sql = format!(
                    "INSERT INTO checker_writes (id, port) VALUES ({id}, current_setting('port')::int) RETURNING port"
                );
                if let Some(port) = psql_once(10, &multi, &sql).and_then(|p| p.parse().ok()) {
                    a.lock().unwrap().push(Ack {
                        port,
                        id: Some(id),
                        start,
                        end: Instant::now(),
                    });
                }
                sleep(Duration::from_millis(20));
            }
        }));

        for port in ports {
            let (s, a) = (stop.clone(), acks.clone());
            threads.push(std::thread::spawn(move || {
                let conninfo = node_conninfo(port);
                while !s.load(Ordering::SeqCst) {
                    let start = Instant::now();
                    if psql_once(
                        3,
                        &conninfo,
                        "INSERT INTO checker_probes (port) VALUES (current_setting('port')::int)",
                    )
                    .is_some()
                    {
                        a.lock().unwrap().push(Ack {
                            port,
                            id: None,
                            start,
                            end: Instant::now(),
                        });
                    }
                    let next = start + Duration::from_millis(300);
                    let now = Instant::now();
                    if next > now {
                        sleep(next - now);
                    }
                }
            }));
        }
        Checker {
            ports,
            names: [pair.node1.name, pair.node2.name],
            stop,
            acks,
            threads,
            started: Instant::now(),
        }
    }

    /// Acknowledged writes so far.
    pub fn acks(&self) -> Vec<Ack> {
        self.acks.lock().unwrap().clone()
    }

    /// Whether the writer has had a commit acknowledged by `node` since `since`.
    pub fn writer_acked_on(&self, node: &Node, since: Instant) -> bool {
        self.acks
            .lock()
            .unwrap()
            .iter()
            .any(|a| a.id.is_some() && a.port == node.port && a.start >= since)
    }

    /// Stops writing (bounded: a psql is killed after at most 10 s).
    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        for h in self.threads.drain(..) {
            while !h.is_finished() && Instant::now() < deadline {
                sleep(POLL);
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }

    /// Stops writing and checks the servers (call once the link has healed and settled).
    pub fn finish(mut self, pair: &Pair) -> Verdict {
        self.stop_threads();
        let acks = self.acks();
        let nodes = [&pair.node1, &pair.node2];
        let writable_at_end: Vec<&'static str> = nodes
            .iter()
            .filter(|n| {
                psql_once(
                    10,
                    &node_conninfo(n.port),
                    "INSERT INTO checker_probes (port) VALUES (current_setting('port')::int)",
                )
                .is_some()
            })
            .map(|n| n.name)
            .collect();
        let final_primary = match writable_at_end.as_slice() {
            [one] => Some(*one),
            _ => None,
        };
        let acked: Vec<i64> = acks.iter().filter_map(|a| a.id).collect();
        let lost = match final_primary {
            Some(name) => {
                let node = nodes.iter().find(|n| n.name == name).unwrap();
                let present: HashSet<i64> = node
                    .sql("SELECT id FROM checker_writes")
                    .expect("read the acknowledged ids")
                    .lines()
                    .filter_map(|l| l.parse().ok())
                    .collect();
                acked
                    .iter()
                    .copied()
                    .filter(|id| !present.contains(id))
                    .collect()
            }
            None => Vec::new(),
        };
        let acknowledged_by = [0, 1].map(|i| {
            acks.iter()
                .filter(|a| a.id.is_some() && a.port == self.ports[i])
                .count()
        });
        Verdict {
            writable_at_end,
            final_primary,
            acknowledged: acked.len(),
            acknowledged_by,
            lost,
            overlap: overlap(&acks, self.ports),
            longest_gap: gaps(&acks, self.started)
                .iter()
                .map(|g| g.1)
                .max()
                .unwrap_or_default(),
            stalls: gaps(&acks, self.started)
                .into_iter()
                .filter(|g| g.1 > Duration::from_secs(1))
                .collect(),
        }
    }

    pub fn names(&self) -> [&'static str; 2] {
        self.names
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// The time both servers certainly accepted writes: a server's write window is taken as
/// running from its first acknowledgement (when it was certainly writable) to the start of its
/// last acknowledged write (it was still writable then), and the overlap is where the two
/// windows meet. A primary is writable over one stretch of time in these scenarios (a
/// superseded one shuts down and does not come back), so this is a lower bound on the real
/// overlap, missing at most the probes' ~300 ms resolution.
pub fn overlap(acks: &[Ack], ports: [u16; 2]) -> Duration {
    let window = |port: u16| -> Option<(Instant, Instant)> {
        let mine: Vec<&Ack> = acks.iter().filter(|a| a.port == port).collect();
        let first = mine.iter().map(|a| a.end).min()?;
        let last = mine.iter().map(|a| a.start).max()?;
        Some((first, last))
    };
    match (window(ports[0]), window(ports[1])) {
        (Some((f1, l1)), Some((f2, l2))) => {
            let from = f1.max(f2);
            let to = l1.min(l2);
            to.saturating_duration_since(from)
        }
        _ => Duration::ZERO,
    }
}

/// The times between consecutive acknowledgements of the writer: (start since `started`, length).
fn gaps(acks: &[Ack], started: Instant) -> Vec<(Duration, Duration)> {
    let mut ends: Vec<Instant> = acks
        .iter()
        .filter(|a| a.id.is_some())
        .map(|a| a.end)
        .collect();
    ends.sort();
    let mut prev = started;
    let mut out = Vec::new();
    for e in ends {
        out.push((prev - started, e.saturating_duration_since(prev)));
        prev = e;
    }
    out
}
