//! Hole 12: host names in the conninfos. libpq resolves a `host` name with getaddrinfo inside
//! the connection calls, synchronously and outside the keeper's deadlines, so a DNS server that
//! never answers held the worker there: no heartbeat, no decision, SIGTERM not honoured. The
//! keeper now resolves names itself with a bound (src/resolve.rs).
//!
//! The real-server test makes DNS hang for real: a UDP socket on 127.0.0.1:53 that reads queries
//! and never answers, and the server started in a private mount namespace whose
//! /etc/resolv.conf names it (`unshare -m` and a bind mount; needs root, as every test here).
//! The pure part of the resolution (src/resolve/bounded.rs) is included and tested on its own.

mod common;

#[allow(dead_code)]
#[path = "../src/resolve/bounded.rs"]
mod bounded;

use std::fs;
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

use bounded::{name_to_resolve, Outcome, Pending};
use common::{free_port, time_until, wait_until, Node, Single, BIN};

/// A name in no /etc/hosts, so that getaddrinfo asks DNS (and not a name resolvers answer
/// themselves, as some do for `.invalid` or `.localhost`).
const NAME: &str = "peer.keeper-test.example";

// ---------------------------------------------------------------------------------------------
// The pure part
// ---------------------------------------------------------------------------------------------

#[test]
fn only_names_that_libpq_would_resolve_are_resolved() {
    assert_eq!(name_to_resolve(Some(NAME), None), Some(NAME));
    assert_eq!(
        name_to_resolve(Some("localhost"), Some("")),
        Some("localhost")
    );
    // hostaddr set: libpq never resolves.
    assert_eq!(name_to_resolve(Some(NAME), Some("10.0.0.1")), None);
    for host in [
        "",
        "127.0.0.1",
        "::1",
        "fe80::1%eth0",
        "/var/run/postgresql",
        "@abstract",
        "a.example,b.example",
    ] {
        assert_eq!(name_to_resolve(Some(host), None), None, "{host:?}");
    }
    assert_eq!(name_to_resolve(None, None), None);
}

/// A lookup that answers only when released, and counts how often it was started.
fn held_lookup(
    started: &Arc<AtomicUsize>,
    release: mpsc::Receiver<bounded::Answer>,
) -> impl FnOnce(&str) -> bounded::Answer + Send + 'static {
    let started = Arc::clone(started);
    move |_| {
        started.fetch_add(1, Ordering::SeqCst);
        release
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| Err("never released".into()))
    }
}

#[test]
fn a_late_lookup_is_given_up_at_the_deadline_and_never_started_twice() {
    let pending = Pending::new();
    let started = Arc::new(AtomicUsize::new(0));
    let (release, held) = mpsc::channel();
    let never = || false;

    let t = Instant::now();
    let first = pending.resolve(
        "slow.example",
        t + Duration::from_millis(300),
        &never,
        held_lookup(&started, held),
    );
    assert_eq!(first, Outcome::TimedOut);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(600),
        "{waited:?}"
    );
    assert_eq!(pending.outstanding(), 1);

    // Later attempts wait for the same thread: no new lookup starts.
    for _ in 0..3 {
        let (_unused, never_released) = mpsc::channel();
        let again = pending.resolve(
            "slow.example",
            Instant::now() + Duration::from_millis(100),
            &never,
            held_lookup(&started, never_released),
        );
        assert_eq!(again, Outcome::TimedOut);
    }
    assert_eq!(started.load(Ordering::SeqCst), 1);
    assert_eq!(pending.outstanding(), 1);

    // Another host is not held up by the first.
    let other = pending.resolve(
        "fast.example",
        Instant::now() + Duration::from_secs(5),
        &never,
        |_| Ok(vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))]),
    );
    assert_eq!(
        other,
        Outcome::Addresses(vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))])
    );

    // The late answer reaches the next attempt, and then nothing is under way any more.
    let address = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9));
    release.send(Ok(vec![address])).unwrap();
    let (_unused, never_released) = mpsc::channel();
    let late = pending.resolve(
        "slow.example",
        Instant::now() + Duration::from_secs(5),
        &never,
        held_lookup(&started, never_released),
    );
    assert_eq!(late, Outcome::Addresses(vec![address]));
    assert_eq!(started.load(Ordering::SeqCst), 1);
    assert_eq!(pending.outstanding(), 0);
}

#[test]
fn a_stop_request_ends_the_wait_promptly_and_failures_are_reported() {
    let pending = Pending::new();
    let started = Arc::new(AtomicUsize::new(0));
    let (_release, held) = mpsc::channel();
    let t = Instant::now();
    let stop_after = move || t.elapsed() > Duration::from_millis(200);
    let outcome = pending.resolve(
        "slow.example",
        t + Duration::from_secs(30),
        &stop_after,
        held_lookup(&started, held),
    );
    assert_eq!(outcome, Outcome::Interrupted);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );

    let never = || false;
    let failed = pending.resolve(
        "gone.example",
        Instant::now() + Duration::from_secs(5),
        &never,
        |_| Err("Name or service not known".into()),
    );
    assert_eq!(failed, Outcome::Failed("Name or service not known".into()));
    let empty = pending.resolve(
        "empty.example",
        Instant::now() + Duration::from_secs(5),
        &never,
        |_| Ok(Vec::new()),
    );
    assert!(matches!(empty, Outcome::Failed(_)), "{empty:?}");
    // The system resolver, through /etc/hosts.
    let local = bounded::system_lookup("localhost").expect("localhost resolves");
    assert!(local.iter().any(IpAddr::is_loopback), "{local:?}");
}

// ---------------------------------------------------------------------------------------------
// DNS that never answers, for real
// ---------------------------------------------------------------------------------------------

/// A DNS server on 127.0.0.1:53 that reads every query and never answers; stopped on drop.
struct SilentDns {
    stop: Arc<AtomicBool>,
    queries: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl SilentDns {
    fn start() -> SilentDns {
        let socket = UdpSocket::bind("127.0.0.1:53")
            .expect("bind 127.0.0.1:53 (the test needs root and a free DNS port)");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicUsize::new(0));
        let (s, q) = (Arc::clone(&stop), Arc::clone(&queries));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::SeqCst) {
                if socket.recv_from(&mut buf).is_ok() {
                    q.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        SilentDns {
            stop,
            queries,
            thread: Some(thread),
        }
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for SilentDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A command run in a private mount namespace whose /etc/resolv.conf is `resolv`: `script` is a
/// shell command line, `$1`... are `args`.
fn in_namespace(resolv: &Path, script: &str, args: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "-m",
        "sh",
        "-c",
        &format!("mount --bind \"$0\" /etc/resolv.conf && exec {script}"),
    ])
    .arg(resolv)
    .args(args);
    c
}

/// Checks that getaddrinfo really asks the silent server and hangs in the namespace.
fn check_that_dns_hangs(dns: &SilentDns, resolv: &Path) {
    let before = dns.queries();
    let mut getent = in_namespace(resolv, "getent hosts \"$1\"", &[NAME])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start getent in a mount namespace");
    let ended = wait_until(Duration::from_secs(3), || {
        getent.try_wait().ok().flatten().is_some()
    });
    let _ = getent.kill();
    let status = getent.wait();
    assert!(
        !ended,
        "getent hosts {NAME} did not hang in the namespace ({status:?}): the test cannot make DNS hang here"
    );
    assert!(
        dns.queries() > before,
        "getent hung without asking 127.0.0.1:53"
    );
}

/// Starts the (stopped) server in the namespace, as the postgres user.
fn start_in_namespace(node: &Node, resolv: &Path) {
    let pg_ctl = format!("{BIN}/pg_ctl");
    let out = in_namespace(
        resolv,
        "runuser -u postgres -- \"$1\" -D \"$2\" -l \"$3\" -w -t 60 start",
        &[
            &pg_ctl,
            &node.dir.display().to_string(),
            &node.log.display().to_string(),
        ],
    )
    .output()
    .expect("run pg_ctl in a mount namespace");
    assert!(
        out.status.success(),
        "pg_ctl start in the namespace failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn threads_of(pid: i32) -> Option<usize> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// The keeper, on a server whose DNS never answers: node1's conninfo names the peer by a host
/// name. The worker gives up each resolution at the heartbeat's deadline and goes on ticking
/// (it reports why, identifies itself, heartbeats and says each failure in the status), keeps
/// one resolver thread for the name however many attempts time out, and stops at once.
/// Before the fix the worker sat in getaddrinfo (the resolver's timeout here is 30 s) and
/// reported nothing within the first check's 3 s.
#[test]
fn a_peer_name_that_dns_never_answers_does_not_hang_the_worker() {
    let dns = SilentDns::start();
    let keepalive = Duration::from_secs(1);
    let (peer_port, nobody) = (free_port(), free_port());
    // Started with no node conninfos (the keeper waits for them), then stopped and configured,
    // to start again in the namespace.
    let single = Single::start("dns-hangs", "pg_keeper.keepalive_time = 1s");
    let n = &single.node;
    n.stop("fast");
    let resolv = single.root.join("resolv.conf");
    fs::write(
        &resolv,
        "nameserver 127.0.0.1\noptions timeout:30 attempts:1\n",
    )
    .unwrap();
    check_that_dns_hangs(&dns, &resolv);
    n.append_conf(&format!(
        "pg_keeper.node1_conninfo = 'host={NAME} port={peer_port} dbname=postgres user=postgres'\n\
         pg_keeper.node2_conninfo = 'host=127.0.0.1 port={nobody} dbname=postgres user=postgres'"
    ));
    let queries_before = dns.queries();
    let started = Instant::now();
    start_in_namespace(n, &resolv);

    // Identification asks node1 (the name) and node2 (nobody): neither is this server, and the
    // log says why within two heartbeat intervals (and a second for the log to be written).
    let plain_failure = format!("resolving host \"{NAME}\" took longer than the deadline");
    let said = wait_until(keepalive * 2 + Duration::from_secs(1), || {
        n.log_text()
            .lines()
            .any(|l| l.contains("neither node is this server") && l.contains(&plain_failure))
    });
    assert!(
        said,
        "no bounded resolution failure {:.1?} after the start:\n{}",
        started.elapsed(),
        n.keeper_log().join("\n")
    );
    assert!(dns.queries() > queries_before, "the worker did not ask DNS");

    // The operator points node2 at this server, by a name that resolves (/etc/hosts): it is
    // picked up on the next retry, and the keeper runs in master mode.
    n.sql(&format!(
        "ALTER SYSTEM SET pg_keeper.node2_conninfo = 'host=localhost port={} dbname=postgres user=postgres'",
        n.port
    ))
    .unwrap();
    n.reload();
    n.expect_title("master mode", Duration::from_secs(10));

    // Every heartbeat of node1 fails at its deadline, with the reason, and they go on.
    n.sql("CREATE EXTENSION pg_keeper_rs").unwrap();
    let failure_of = || {
        n.sql("SELECT last_failure, last_failure_reason FROM pg_keeper_status")
            .unwrap_or_default()
    };
    let ok = wait_until(keepalive * 2 + Duration::from_secs(1), || {
        failure_of().contains(&plain_failure)
    });
    assert!(ok, "status: {}", failure_of());
    let first = failure_of();
    let advanced = wait_until(keepalive * 3, || {
        let now = failure_of();
        now != first && now.contains(&plain_failure)
    });
    assert!(
        advanced,
        "the heartbeats stopped: {first} / {}",
        failure_of()
    );

    // One resolver thread for the name however many attempts timed out (the 30 s of the
    // resolver are far from over): the worker and at most two more threads.
    let keeper = n.keeper_pid().expect("the keeper runs");
    let mut most = 0;
    for _ in 0..30 {
        most = most.max(threads_of(keeper).unwrap_or(0));
        sleep(Duration::from_millis(100));
    }
    assert!(most <= 3, "the worker had {most} threads");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the checks above outlasted the resolver's own timeout: {:?}",
        started.elapsed()
    );

    // SIGTERM (pg_terminate_backend) ends the worker at once, in the middle of a resolution.
    n.sql(&format!("SELECT pg_terminate_backend({keeper})"))
        .unwrap();
    let gone = time_until(Duration::from_secs(20), || !alive(keeper));
    assert!(
        gone.is_some_and(|t| t < Duration::from_secs(2)),
        "the worker took {gone:?} to stop"
    );
    // Its successor is as prompt when the server stops.
    assert!(wait_until(Duration::from_secs(10), || n
        .keeper_pid()
        .is_some_and(|p| p != keeper)));
    let stop = Instant::now();
    n.stop("fast");
    assert!(
        stop.elapsed() < Duration::from_secs(5),
        "the server took {:?} to stop",
        stop.elapsed()
    );
    eprintln!(
        "worker gone {gone:?} after SIGTERM; server stopped in {:?}; {} DNS queries",
        stop.elapsed(),
        dns.queries()
    );
    let log = n.log_text();
    assert!(
        !log.contains("PANIC") && !log.contains("terminated by signal"),
        "{log}"
    );
}
