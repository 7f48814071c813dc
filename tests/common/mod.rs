//! Test harness: real PostgreSQL servers (15, or the major `PG_KEEPER_PG_BIN` points at), run as the `postgres` OS user, on 127.0.0.1 with free
//! ports, each pair in a fresh directory of its own. Dropping a [`Pair`] (or [`Single`]) stops
//! every server and removes the directory, also when the test panicked. Every wait is bounded.

#![allow(dead_code)]

pub mod partition;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The directory of the PostgreSQL programs the tests run: `PG_KEEPER_PG_BIN` (for another
/// major installed by `bin/setup --pg N`), else the system's PostgreSQL 15. Used as `{BIN}` in
/// paths.
pub static BIN: Bin = Bin;

pub struct Bin;

impl std::fmt::Display for Bin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        static DIR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        f.write_str(DIR.get_or_init(|| {
            std::env::var("PG_KEEPER_PG_BIN")
                .ok()
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into())
        }))
    }
}
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Polls `f` every 100ms until it is true or `timeout` passes; returns whether it became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        sleep(Duration::from_millis(100));
    }
}

/// Like [`wait_until`], and returns how long it took.
pub fn time_until(timeout: Duration, f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    wait_until(timeout, f).then(|| start.elapsed())
}

/// The keeper's line when it decides to switch to asynchronous replication (keeper-core's
/// TRANSITIONS: "standby {peer} lost; switching to asynchronous replication"). A hold, "not
/// switching to asynchronous replication: ...", does not contain it.
pub const SWITCHING_TO_ASYNC: &str = "lost; switching to asynchronous replication";

/// The keeper's line once the switch is done (synchronous_standby_names cleared).
pub const SWITCHED_TO_ASYNC: &str = "changed replication mode to asynchronous";

/// A port nothing listens on now, and never handed out before in this test process: a port
/// given for a listener that starts later (a node's HTTP port) could otherwise be given again
/// to the next server before the first binds it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind 127.0.0.1:0")
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no free port not handed out before in 1000 tries");
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A command run as the `postgres` OS user.
fn as_postgres(program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--", program]);
    c
}

fn new_root(label: &str) -> PathBuf {
    let root = PathBuf::from(format!(
        "/tmp/pg_keeper_rs_tests/{}-{}-{label}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();
    // Only this test's directory: others may be created and removed meanwhile.
    run(Command::new("chown").args(["postgres:", "/tmp/pg_keeper_rs_tests"]));
    run(Command::new("chown").arg("-R").arg("postgres:").arg(&root));
    root
}

/// One server.
pub struct Node {
    pub name: &'static str,
    pub dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    /// Processes frozen with SIGSTOP, thawed on drop.
    frozen: Vec<i32>,
}

fn signal(pid: i32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

impl Node {
    fn new(name: &'static str, root: &Path, port: u16) -> Node {
        Node {
            name,
            dir: root.join(name),
            port,
            log: root.join(format!("{name}.log")),
            frozen: Vec::new(),
        }
    }

    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} dbname=postgres user=postgres",
            self.port
        )
    }

    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.dir.join("postmaster.pid")).ok()?;
        text.lines()
            .next()?
            .trim()
            .parse()
            .ok()
            .filter(|&p| alive(p))
    }

    pub fn children(&self) -> Vec<i32> {
        let Some(pm) = self.postmaster_pid() else {
            return Vec::new();
        };
        let out = Command::new("ps")
            .args(["-o", "pid=", "--ppid", &pm.to_string()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// The pg_keeper worker's process title, if it runs.
    pub fn title(&self) -> Option<String> {
        let pm = self.postmaster_pid()?;
        let out = Command::new("ps")
            .args(["-o", "pid=,args=", "--ppid", &pm.to_string()])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            // Not the HTTP listener ("pg_keeper http"), a worker of its own.
            .find(|l| l.contains("pg_keeper") && !l.contains("pg_keeper http"))
            .map(|l| l.trim().to_string())
    }

    pub fn keeper_pid(&self) -> Option<i32> {
        self.title()?.split_whitespace().next()?.parse().ok()
    }

    pub fn title_is(&self, state: &str) -> bool {
        self.title()
            .is_some_and(|t| t.ends_with(&format!("pg_keeper ({state})")))
    }

    pub fn wait_title(&self, state: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.title_is(state))
    }

    /// psql against this server, with bounded connect and statement times.
    fn psql(&self, sql: &str) -> Command {
        self.psql_as("postgres", sql)
    }

    /// psql as `user`.
    fn psql_as(&self, user: &str, sql: &str) -> Command {
        let mut c = self.psql_command(user);
        c.args(["-c", sql]);
        c
    }

    /// psql as `user` on this node, with no statement yet.
    fn psql_command(&self, user: &str) -> Command {
        let mut c = Command::new(format!("{BIN}/psql"));
        c.args([
            "-X",
            "-Atq",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            user,
        ])
        .args(["-d", "postgres", "-p", &self.port.to_string()])
        .env("PGCONNECT_TIMEOUT", "3")
        .env("PGOPTIONS", "-c statement_timeout=20s");
        c
    }

    /// Waits for the keeper's title to show `state`; panics with the title it has.
    pub fn expect_title(&self, state: &str, timeout: Duration) {
        let ok = self.wait_title(state, timeout);
        assert!(
            ok,
            "{}: title {:?}, expected pg_keeper ({state})",
            self.name,
            self.title()
        );
    }

    /// Waits for `needle` in the server log; panics with the log.
    pub fn expect_log(&self, needle: &str, timeout: Duration) {
        let ok = self.wait_log(needle, timeout);
        assert!(
            ok,
            "{}: log lacks {needle:?}:\n{}",
            self.name,
            self.log_text()
        );
    }

    /// Waits for the keeper's decision to switch to asynchronous replication, then for the
    /// switch itself (the decision alone can still end in a hold, when the witness cannot be
    /// told); panics with the log. The second wait gets what is left of `timeout`, at least 5 s.
    pub fn expect_switch_to_async(&self, timeout: Duration) {
        let start = Instant::now();
        self.expect_log(SWITCHING_TO_ASYNC, timeout);
        let rest = timeout.saturating_sub(start.elapsed());
        self.expect_log(SWITCHED_TO_ASYNC, rest.max(Duration::from_secs(5)));
    }

    /// Runs SQL through psql; `Err` carries psql's error output.
    pub fn sql(&self, sql: &str) -> Result<String, String> {
        self.sql_as("postgres", sql)
    }

    /// Runs SQL through psql as `user`.
    pub fn sql_as(&self, user: &str, sql: &str) -> Result<String, String> {
        let out = self
            .psql_as(user, sql)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// Starts psql in the background (for a commit that is expected to block).
    pub fn sql_background(&self, sql: &str) -> Child {
        self.sql_background_as("postgres", sql)
    }

    /// Starts a psql session that reads its statements from its stdin (write them there; it
    /// ends when stdin is closed), to hold a transaction open across other steps.
    pub fn session(&self) -> Child {
        self.psql_command("postgres")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start psql")
    }

    /// Starts psql as `user` in the background.
    pub fn sql_background_as(&self, user: &str, sql: &str) -> Child {
        self.psql_as(user, sql)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start psql")
    }

    pub fn in_recovery(&self) -> Option<bool> {
        self.sql("SELECT pg_is_in_recovery()")
            .ok()
            .map(|s| s == "t")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The pg_keeper lines of the log.
    pub fn keeper_log(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("pg_keeper"))
            .map(str::to_string)
            .collect()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log_text().contains(needle))
    }

    pub fn append_conf(&self, lines: &str) {
        let path = self.dir.join("postgresql.conf");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push('\n');
        text.push_str(lines);
        text.push('\n');
        fs::write(&path, text).unwrap();
    }

    pub fn start(&self) {
        run(as_postgres(&format!("{BIN}/pg_ctl"))
            .arg("-D")
            .arg(&self.dir)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "start"]));
    }

    /// Starts the server and returns whether pg_ctl saw it come up (a server that stops itself
    /// during start-up makes pg_ctl fail).
    pub fn try_start(&self) -> bool {
        as_postgres(&format!("{BIN}/pg_ctl"))
            .arg("-D")
            .arg(&self.dir)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn stop(&self, mode: &str) {
        run(as_postgres(&format!("{BIN}/pg_ctl"))
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", mode, "-w", "-t", "60", "stop"]));
    }

    pub fn restart(&self) {
        run(as_postgres(&format!("{BIN}/pg_ctl"))
            .arg("-D")
            .arg(&self.dir)
            .arg("-l")
            .arg(&self.log)
            .args(["-m", "fast", "-w", "-t", "60", "restart"]));
    }

    pub fn reload(&self) {
        self.sql("SELECT pg_reload_conf()").expect("reload");
    }

    /// `kill -9` of the postmaster; waits (bounded) until its children have gone too.
    pub fn kill9(&self) {
        let pm = self.postmaster_pid().expect("server is running");
        let children = self.children();
        signal(pm, "KILL");
        let gone = wait_until(Duration::from_secs(20), || {
            !alive(pm) && children.iter().all(|&c| !alive(c))
        });
        if !gone {
            for c in children {
                signal(c, "KILL");
            }
        }
    }

    /// SIGSTOP the postmaster and all its processes: the port still accepts TCP, nothing answers.
    pub fn freeze(&mut self) {
        let pm = self.postmaster_pid().expect("server is running");
        let mut pids = vec![pm];
        pids.extend(self.children());
        for &p in &pids {
            signal(p, "STOP");
        }
        self.frozen = pids;
    }

    /// SIGSTOP the keeper worker alone (thawed by [`Node::thaw`] or on drop).
    pub fn freeze_keeper(&mut self) {
        let keeper = self.keeper_pid().expect("the keeper runs");
        signal(keeper, "STOP");
        self.frozen.push(keeper);
    }

    pub fn thaw(&mut self) {
        for &p in &self.frozen {
            signal(p, "CONT");
        }
        self.frozen.clear();
    }

    /// pg_basebackup from `primary`, streaming under this node's name (and with failover slots
    /// through a slot of that name, which pg_basebackup creates), then start.
    fn make_standby_of(&self, primary: &Node, failover_slots: bool) {
        let mut cmd = as_postgres(&format!("{BIN}/pg_basebackup"));
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
        ]);
        if failover_slots {
            cmd.args(["-C", "-S", self.name]);
        }
        run(cmd.args(["-X", "stream", "-D"]).arg(&self.dir));
        self.append_conf(&node_conf(self, primary, failover_slots));
        run(as_postgres("touch").arg(self.dir.join("standby.signal")));
        self.start();
    }

    /// Starts an old primary that finds itself superseded: it fences itself, so quickly that
    /// pg_ctl may see it stop while it waits for the start. Waits (bounded) for the line and the
    /// shutdown.
    pub fn start_superseded(&self) {
        let _ = self.try_start();
        self.expect_log("superseded", Duration::from_secs(15));
        assert!(
            wait_until(Duration::from_secs(30), || self.postmaster_pid().is_none()),
            "the superseded server did not shut down"
        );
    }

    /// Ends the keeper worker with `signal` (`-9`, say) and waits, bounded, for the postmaster
    /// to start a new one.
    pub fn kill_keeper(&self, signal: &str) {
        let keeper = self.keeper_pid().expect("the keeper runs");
        let _ = Command::new("kill")
            .args([signal, &keeper.to_string()])
            .status();
        let back = wait_until(Duration::from_secs(30), || {
            self.keeper_pid().is_some_and(|p| p != keeper)
        });
        assert!(
            back,
            "{}: the keeper did not come back after kill {signal}",
            self.name
        );
    }

    /// Stops the server whatever its state; never panics.
    fn destroy(&mut self) {
        self.thaw();
        self.kill_rejoin_processes();
        let pm = self.postmaster_pid();
        let children = self.children();
        if pm.is_some() {
            let _ = as_postgres(&format!("{BIN}/pg_ctl"))
                .arg("-D")
                .arg(&self.dir)
                .args(["-m", "immediate", "-w", "-t", "20", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for p in pm.into_iter().chain(children) {
            if alive(p) {
                signal(p, "KILL");
            }
        }
    }
}

impl Node {
    /// Kills any auto_rejoin process of this node and what it runs (src/rejoin.rs gives them
    /// PGK_DATADIR in their environment), servers apart: one still at work when a test ends
    /// would otherwise start the server again after it was stopped.
    fn kill_rejoin_processes(&self) {
        let want = format!("PGK_DATADIR={}", self.dir.display());
        let Ok(entries) = fs::read_dir("/proc") else {
            return;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(env) = fs::read(e.path().join("environ")) else {
                continue;
            };
            // A server it started inherits that environment: the stop below handles it.
            let server =
                fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "postgres");
            if !server && env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
                signal(pid, "KILL");
            }
        }
    }
}

/// Settings of a test pair.
#[derive(Clone)]
pub struct Options {
    pub keepalive_time: &'static str,
    pub keepalive_count: u32,
    /// More lines for the shared postgresql.conf (later lines win); `@ROOT@` stands for the
    /// pair's directory.
    pub extra: String,
    /// Put passwords in the node conninfos (node1 as key=value, node2 as a URI); the servers
    /// trust local connections, so the passwords are never checked, only carried.
    pub passwords: bool,
    /// PostgreSQL 17's failover slots, set up as the README says: each node streams through a
    /// physical slot named after itself (`primary_slot_name`; the first standby's is made by
    /// pg_basebackup) with `dbname` in `primary_conninfo`, names its peer's slot in
    /// `synchronized_standby_slots`, and `wal_level = logical`, `sync_replication_slots` and
    /// `hot_standby_feedback` are on.
    pub failover_slots: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            keepalive_time: "1s",
            keepalive_count: 3,
            extra: String::new(),
            passwords: false,
            failover_slots: false,
        }
    }
}

/// A primary (node1) with synchronous replication to a standby (node2) made with
/// pg_basebackup; both with the same pg_keeper settings and an after_command that appends
/// `event node peer_conninfo` to `after_command.log`.
pub struct Pair {
    pub root: PathBuf,
    pub node1: Node,
    pub node2: Node,
    pub after_log: PathBuf,
    /// Further standbys made by [`Pair::add_standby`].
    pub extra: Vec<Node>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.node1.destroy();
        self.node2.destroy();
        for n in &mut self.extra {
            n.destroy();
        }
        if std::thread::panicking() {
            for n in [&self.node1, &self.node2] {
                eprintln!("---- {} log ----\n{}", n.name, n.log_text());
            }
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn init_primary(node: &Node, shared_conf: &str) {
    init_primary_with_hba(node, shared_conf, "");
}

/// initdb; `hba_first` lines go before the default pg_hba.conf rules.
fn init_primary_with_hba(node: &Node, shared_conf: &str, hba_first: &str) {
    run(as_postgres(&format!("{BIN}/initdb"))
        .arg("-D")
        .arg(&node.dir)
        .args(["-A", "trust", "-U", "postgres", "--no-sync"])
        .stdout(Stdio::null()));
    node.append_conf(shared_conf);
    let hba = node.dir.join("pg_hba.conf");
    let mut text = format!("{hba_first}\n{}", fs::read_to_string(&hba).unwrap());
    text.push_str("\nhost replication postgres 127.0.0.1/32 trust\n");
    fs::write(&hba, text).unwrap();
}

/// The lines of one node's own: its port and name, where it streams from as a standby, and with
/// failover slots the slots it streams through and waits for.
fn node_conf(node: &Node, peer: &Node, failover_slots: bool) -> String {
    let mut conf = format!(
        "port = {}\ncluster_name = '{}'\nprimary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={}{}'",
        node.port,
        node.name,
        peer.port,
        node.name,
        if failover_slots { " dbname=postgres" } else { "" }
    );
    if failover_slots {
        conf.push_str(&format!(
            "\nprimary_slot_name = '{}'\nsynchronized_standby_slots = '{}'",
            node.name, peer.name
        ));
    }
    conf
}

impl Pair {
    pub fn start(label: &str, opts: Options) -> Pair {
        let root = new_root(label);
        let node1 = Node::new("node1", &root, free_port());
        let mut node2 = Node::new("node2", &root, free_port());
        while node2.port == node1.port {
            node2.port = free_port();
        }
        let after_log = root.join("after_command.log");
        let pair = Pair {
            root,
            node1,
            node2,
            after_log,
            extra: Vec::new(),
        };
        let shared = format!(
            "listen_addresses = '127.0.0.1'
shared_preload_libraries = 'pg_keeper_rs'
wal_level = replica
hot_standby = on
wal_log_hints = on
wal_keep_size = '256MB'
max_wal_senders = 5
fsync = off
synchronous_standby_names = 'node1, node2'
log_line_prefix = '%m [%p] '
{}pg_keeper.node1_conninfo = '{}'
pg_keeper.node2_conninfo = '{}'
pg_keeper.keepalive_time = {}
pg_keeper.keepalive_count = {}
pg_keeper.after_command = 'echo \"$PG_KEEPER_EVENT $PG_KEEPER_NODE_NAME $PG_KEEPER_PEER_CONNINFO\" >> {}'
{}",
            if opts.failover_slots {
                "wal_level = logical\nsync_replication_slots = on\nhot_standby_feedback = on\n"
            } else {
                ""
            },
                        if opts.passwords {
                format!("{} password=pw-kv-secret", pair.node1.conninfo())
            } else {
                pair.node1.conninfo()
            },
            if opts.passwords {
                format!("postgresql://postgres:pw-uri-secret@127.0.0.1:{}/postgres", pair.node2.port)
            } else {
                pair.node2.conninfo()
            },
            opts.keepalive_time,
            opts.keepalive_count,
            pair.after_log.display(),
                        opts.extra.replace("@ROOT@", &pair.root.display().to_string())
        );
        init_primary(&pair.node1, &shared);
        pair.node1
            .append_conf(&node_conf(&pair.node1, &pair.node2, opts.failover_slots));
        pair.node1.start();
        pair.node2.make_standby_of(&pair.node1, opts.failover_slots);
        pair
    }

    /// Starts a pair and waits until both keepers show their connected titles and the standby's
    /// keeper has seen itself synchronous (it promotes only then).
    pub fn connected(label: &str, opts: Options) -> Pair {
        let pair = Pair::start(label, opts);
        pair.node1
            .expect_title("master mode:connected", Duration::from_secs(30));
        pair.node2
            .expect_title("standby mode:connected", Duration::from_secs(30));
        pair.wait_synchronous();
        pair
    }

    /// Waits until the primary shows its standby streaming (synchronously when
    /// synchronous_standby_names is set), then for the standby's keeper to have heartbeated it.
    pub fn wait_synchronous(&self) {
        let (primary, standby) = match self.node1.in_recovery() {
            Some(false) => (&self.node1, &self.node2),
            _ => (&self.node2, &self.node1),
        };
        let sql = format!(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = '{}' AND state = 'streaming' \
             AND (current_setting('synchronous_standby_names') = '' OR sync_state = 'sync')",
            standby.name
        );
        let ok = wait_until(Duration::from_secs(30), || {
            primary.sql(&sql).is_ok_and(|n| n == "1")
        });
        assert!(
            ok,
            "{} is not streaming from {}",
            standby.name, primary.name
        );
        // With synchronous replication, the primary's keeper says whom it trusts as
        // synchronous (once the standby holds everything acknowledged); the standby counts
        // itself synchronous, and so promotes, only after it has heard that.
        let trusted = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_keeper' \
             AND (current_setting('synchronous_standby_names') = '' \
                  OR query = 'pg_keeper: trusts as synchronous standby: {}')",
            standby.name
        );
        let ok = wait_until(Duration::from_secs(30), || {
            primary.sql(&trusted).is_ok_and(|n| n == "1")
        });
        assert!(
            ok,
            "{}'s keeper does not trust {} as synchronous: {:?}",
            primary.name,
            standby.name,
            primary.sql("SELECT query FROM pg_stat_activity WHERE backend_type = 'pg_keeper'")
        );
        sleep(Duration::from_millis(1500));
    }

    /// A further standby of node1 (pg_basebackup), streaming as `name`; stopped with the pair.
    pub fn add_standby(&mut self, name: &'static str) -> &Node {
        let node = Node::new(name, &self.root, free_port());
        node.make_standby_of(&self.node1, false);
        self.extra.push(node);
        self.extra.last().unwrap()
    }

    /// CREATE EXTENSION pg_keeper_rs on node1 (the primary), and waits (bounded) until the
    /// standby has it too.
    pub fn create_extension(&self) {
        self.node1.sql("CREATE EXTENSION pg_keeper_rs").unwrap();
        // Replicated to the standby (synchronously), where it is readable too.
        assert!(wait_until(Duration::from_secs(10), || self
            .node2
            .sql("SELECT count(*) FROM pg_extension WHERE extname = 'pg_keeper_rs'")
            .is_ok_and(|n| n == "1")));
    }

    /// Runs bin/switchover from node1 (the primary) to node2; returns whether it succeeded and
    /// what it said.
    pub fn switchover(&self) -> (bool, String) {
        let out = script("switchover")
            .arg("--datadir")
            .arg(&self.node1.dir)
            .args([
                "--primary",
                &self.node1.conninfo(),
                "--standby",
                &self.node2.conninfo(),
                "--name",
                "node1",
            ])
            .arg("--log")
            .arg(&self.node1.log)
            .output()
            .unwrap();
        (out.status.success(), output_text(&out))
    }

    /// The after_command log, one line per run.
    pub fn after_commands(&self) -> Vec<String> {
        fs::read_to_string(&self.after_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Waits for after_command to have run, then checks it ran exactly once; returns its line.
    pub fn the_one_after_command(&self) -> String {
        assert!(
            wait_until(Duration::from_secs(10), || !self
                .after_commands()
                .is_empty()),
            "after_command did not run"
        );
        sleep(Duration::from_secs(2));
        let runs = self.after_commands();
        assert_eq!(runs.len(), 1, "after_command should run once: {runs:?}");
        runs[0].clone()
    }
}

/// A single server with the extension loaded and the given pg_keeper settings, for
/// configuration tests.
pub struct Single {
    pub root: PathBuf,
    pub node: Node,
}

impl Single {
    pub fn start(label: &str, conf: &str) -> Single {
        Single::start_with_hba(label, conf, "")
    }

    pub fn start_with_hba(label: &str, conf: &str, hba_first: &str) -> Single {
        Single::start_on_port(label, free_port(), conf, hba_first)
    }

    /// A single server on a port chosen beforehand (so that `conf` can name it).
    pub fn start_on_port(label: &str, port: u16, conf: &str, hba_first: &str) -> Single {
        let root = new_root(label);
        let node = Node::new("node1", &root, port);
        let shared = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nshared_preload_libraries = 'pg_keeper_rs'\nfsync = off\nlog_line_prefix = '%m [%p] '\n{}",
            node.port, conf
        );
        init_primary_with_hba(&node, &shared, hba_first);
        let single = Single { root, node };
        single.node.start();
        single
    }
}

impl Drop for Single {
    fn drop(&mut self) {
        self.node.destroy();
        if std::thread::panicking() {
            eprintln!("---- log ----\n{}", self.node.log_text());
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// What a command printed: its standard output, then its standard error.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One of the project's scripts (`bin/NAME`), run with the PostgreSQL the tests run.
pub fn script(name: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(format!("{}/bin/{name}", env!("CARGO_MANIFEST_DIR")));
    // The scripts use the PostgreSQL the tests run.
    cmd.env("PGBIN", BIN.to_string());
    cmd
}

/// Runs bin/rejoin to make `old` (stopped) a standby of `new_primary`; returns its output, or
/// panics with it.
pub fn rejoin(old: &Node, new_primary: &Node) -> String {
    let out = script("rejoin")
        .arg("--datadir")
        .arg(&old.dir)
        .args(["--primary", &new_primary.conninfo(), "--name", old.name])
        .arg("--log")
        .arg(&old.log)
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "rejoin failed:\n{text}");
    text
}

/// Waits until `new` is the primary (promoted and taking writes on its own).
pub fn expect_promoted(new: &Node) {
    assert!(
        wait_until(Duration::from_secs(30), || new.in_recovery() == Some(false)),
        "{} did not promote:\n{}",
        new.name,
        new.keeper_log().join("\n")
    );
}

/// Starts `old` (an old primary after a `kill -9`; `start` false: one that is still running,
/// and stops and rejoins by itself) and waits until it has rejoined `new` by itself: in
/// recovery, streaming synchronously, and `new`'s keeper connected to it again. Returns how
/// long that took.
pub fn start_and_expect_rejoined(old: &Node, new: &Node, start: bool) -> Duration {
    let began = Instant::now();
    if start {
        // It may stop itself again before pg_ctl sees it up: that is the point.
        let _ = old.try_start();
    }
    let sql = format!(
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = '{}' \
         AND state = 'streaming' AND sync_state = 'sync'",
        old.name
    );
    let ok = wait_until(Duration::from_secs(120), || {
        old.in_recovery() == Some(true)
            && new.sql(&sql).is_ok_and(|n| n == "1")
            && new.title_is("master mode:connected")
    });
    assert!(
        ok,
        "{} did not rejoin {} as a synchronous standby by itself:\n---- {} ----\n{}\n---- {} ----\n{}",
        old.name,
        new.name,
        old.name,
        old.log_text(),
        new.name,
        new.keeper_log().join("\n")
    );
    let took = began.elapsed();
    let log = old.log_text();
    assert!(
        log.contains("auto_rejoin: started the rejoin process")
            && log.contains("pg_keeper: auto_rejoin: done: this server is a standby of"),
        "{log}"
    );
    took
}

/// Background psql sessions that are killed when dropped.
pub struct Sessions(pub Vec<Child>);

impl Drop for Sessions {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
