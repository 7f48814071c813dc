//! The HTTP listener on real servers: the codes of every path per role (primary, standby, after
//! a failover, a superseded old primary, an isolated primary), the metrics through `promtool`,
//! HAProxy in front of the pair as Patroni's documentation configures it, and hostile clients.
//! Each node gets a port of its own; figures are printed, not asserted tightly.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{sleep, spawn, JoinHandle};
use std::time::{Duration, Instant};

use common::partition::{Mode as Link, ProxiedPair};
use common::{free_port, time_until, wait_until, Node, Options, Pair};

/// The keeper's failover budget with the test settings (1s x 3), and room for slow machines.
const FAILOVER: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// An HTTP client with bounded waits

struct Reply {
    code: u16,
    body: String,
}

/// Sends `method path` and reads the whole answer (the listener closes after one); None when the
/// connection fails or no answer comes within 5 s.
fn request(port: u16, method: &str, path: &str) -> Option<Reply> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some(Reply { code, body })
}

fn code(port: u16, path: &str) -> Option<u16> {
    request(port, "GET", path).map(|r| r.code)
}

fn get(port: u16, path: &str) -> Reply {
    request(port, "GET", path).unwrap_or_else(|| panic!("no answer on port {port} for {path}"))
}

/// The codes of several paths, for a readable assertion.
fn codes(port: u16, paths: &[&str]) -> Vec<(String, Option<u16>)> {
    paths
        .iter()
        .map(|p| (p.to_string(), code(port, p)))
        .collect()
}

fn expect_codes(node: &str, port: u16, want: &[(&str, u16)]) {
    let got = codes(port, &want.iter().map(|(p, _)| *p).collect::<Vec<_>>());
    let want: Vec<(String, Option<u16>)> = want
        .iter()
        .map(|(p, c)| (p.to_string(), Some(*c)))
        .collect();
    assert_eq!(got, want, "{node}: codes per path (port {port})");
}

/// A metric's value in an exposition (the first sample whose name and labels match `series`).
fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
}

fn metric_of(port: u16, series: &str) -> Option<f64> {
    metric(&request(port, "GET", "/metrics")?.body, series)
}

// ---------------------------------------------------------------------------------------------
// Pairs with a listener on each node

fn with_http(port: u16, mut opts: Options) -> Options {
    opts.extra = format!("{}\npg_keeper.http_port = {port}\n", opts.extra);
    opts
}

/// node2 was made with pg_basebackup, so it has node1's `pg_keeper.http_port`, which node1
/// holds: its listener says so and the keeper runs on regardless. Then node2 gets a port of its
/// own and is restarted; waits until the pair is connected and synchronous again.
fn give_node2_its_own_port(pair: &Pair, node1_port: u16) -> u16 {
    pair.node2.expect_log(
        &format!("could not listen for HTTP on 127.0.0.1:{node1_port}"),
        Duration::from_secs(10),
    );
    let log = pair.node2.log_text();
    assert!(
        log.contains("HINT:  Free the port, or set pg_keeper.http_port to a free one"),
        "{log}"
    );
    assert!(pair.node2.title_is("standby mode:connected"));
    let port = free_port();
    pair.node2
        .append_conf(&format!("pg_keeper.http_port = {port}"));
    pair.node2.restart();
    pair.node2
        .expect_title("standby mode:connected", Duration::from_secs(30));
    pair.wait_synchronous();
    port
}

/// A connected pair with a listener on each node; returns it with the two HTTP ports.
fn http_pair(label: &str, opts: Options) -> (Pair, [u16; 2]) {
    let p1 = free_port();
    let pair = Pair::connected(label, with_http(p1, opts));
    let p2 = give_node2_its_own_port(&pair, p1);
    (pair, [p1, p2])
}

const PRIMARY_CODES: [(&str, u16); 14] = [
    ("/primary", 200),
    ("/leader", 200),
    ("/master", 200),
    ("/read-write", 200),
    ("/", 200),
    ("/replica", 503),
    ("/replica?lag=16MB", 503),
    ("/read-only", 200),
    ("/sync", 503),
    ("/async", 503),
    ("/health", 200),
    ("/liveness", 200),
    ("/metrics", 200),
    ("/no-such-path", 404),
];

const STANDBY_CODES: [(&str, u16); 14] = [
    ("/primary", 503),
    ("/leader", 503),
    ("/read-write", 503),
    ("/replica", 200),
    ("/replica?lag=16MB", 200),
    ("/replica?lag=oops", 400),
    ("/read-only", 200),
    ("/sync", 200),
    ("/synchronous", 200),
    ("/async", 503),
    ("/asynchronous", 503),
    ("/health", 200),
    ("/liveness", 200),
    ("/metrics", 200),
];

fn assert_no_secret(what: &str, text: &str) {
    for secret in ["pw-kv-secret", "pw-uri-secret", "password"] {
        assert!(!text.contains(secret), "{what} holds {secret:?}: {text}");
    }
}

/// Private memory of a process (USS: Private_Clean + Private_Dirty of smaps_rollup), in kB.
fn private_kb(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// The memory target (README "The HTTP endpoint's cost"): the keeper and the listener each
/// within 1 MB private of the checkpointer, one of PostgreSQL's own background processes; and
/// the keeper connected to no database, which is what keeps it there.
fn assert_keeper_and_listener_small(node: &Node) {
    let title = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .replace('\0', " ")
    };
    let find = |what: &str| {
        node.children()
            .into_iter()
            .find(|&p| title(p).contains(what))
            .unwrap_or_else(|| panic!("{}: no process titled {what:?}", node.name))
    };
    let checkpointer = private_kb(find("checkpointer"));
    for (what, pattern) in [("keeper", "pg_keeper ("), ("listener", "pg_keeper http")] {
        let kb = private_kb(find(pattern));
        assert!(
            kb > 0 && checkpointer > 0 && kb <= checkpointer + 1024,
            "{}: the {what} has {kb} kB private, the checkpointer {checkpointer} kB: more than 1 MB apart",
            node.name
        );
        eprintln!(
            "{}: {what} {kb} kB private, checkpointer {checkpointer} kB",
            node.name
        );
    }
    assert_eq!(
        node.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_keeper' AND datname IS NULL")
            .unwrap(),
        "1",
        "{}: the keeper should be connected to no database",
        node.name
    );
}

#[test]
fn every_path_answers_by_role_and_follows_a_failover_and_a_superseded_old_primary() {
    let opts = Options {
        passwords: true,
        ..Options::default()
    };
    let (pair, [h1, h2]) = http_pair("http-roles", opts);
    assert_keeper_and_listener_small(&pair.node1);
    assert_keeper_and_listener_small(&pair.node2);
    expect_codes("node1 (primary)", h1, &PRIMARY_CODES);
    expect_codes("node2 (standby)", h2, &STANDBY_CODES);

    // The methods HAProxy and others use; anything else is refused.
    let head = request(h1, "HEAD", "/primary").unwrap();
    assert_eq!((head.code, head.body.as_str()), (200, ""));
    assert_eq!(request(h1, "OPTIONS", "/primary").unwrap().code, 200);
    assert_eq!(request(h2, "OPTIONS", "/primary").unwrap().code, 503);
    assert_eq!(request(h1, "POST", "/primary").unwrap().code, 405);

    // The body: role, state, timeline, lag, lease, paused, problem; never a password.
    let body = get(h1, "/primary").body;
    for part in [
        "\"role\":\"primary\"",
        "\"state\":\"master mode:connected\"",
        "\"timeline\":1",
        "\"synchronous\":true",
        "\"lease\":null",
        "\"paused\":false",
        "\"problem\":null",
    ] {
        assert!(body.contains(part), "node1 /primary lacks {part}: {body}");
    }
    let body = get(h2, "/replica").body;
    for part in [
        "\"role\":\"standby\"",
        "\"state\":\"standby mode:connected\"",
        "\"lag_bytes\":",
    ] {
        assert!(body.contains(part), "node2 /replica lacks {part}: {body}");
    }
    for port in [h1, h2] {
        for path in ["/primary", "/replica", "/metrics"] {
            assert_no_secret(path, &get(port, path).body);
        }
    }
    assert_no_secret("node2's log", &pair.node2.keeper_log().join("\n"));

    // Failover: node2's /primary turns 200 once it is promoted, and its metrics say so.
    pair.node1.kill9();
    let took = time_until(FAILOVER, || code(h2, "/primary") == Some(200))
        .expect("node2 /primary did not answer 200 after the failover");
    println!(
        "[http-roles] node2 /primary answered 200 {} ms after kill -9 of node1",
        took.as_millis()
    );
    let body = get(h2, "/primary").body;
    assert!(body.contains("\"role\":\"primary\""), "{body}");
    assert!(body.contains("\"timeline\":2"), "{body}");
    expect_codes(
        "node2 (promoted)",
        h2,
        &[("/replica", 503), ("/sync", 503), ("/read-only", 200)],
    );
    assert!(wait_until(Duration::from_secs(10), || metric_of(
        h2,
        "pg_keeper_after_command_last_exit_code"
    ) == Some(0.0)));
    let m = get(h2, "/metrics").body;
    assert_eq!(metric(&m, "pg_keeper_failovers_total"), Some(1.0), "{m}");
    assert_eq!(
        metric(&m, "pg_keeper_role{role=\"primary\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "pg_keeper_role{role=\"standby\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(metric(&m, "pg_keeper_timeline"), Some(2.0), "{m}");

    // The old primary comes back as a primary on the old timeline and fences itself: its
    // /primary never answers 200 meanwhile (sampled every 10 ms from before its start).
    let sampler = Sampler::start(vec![h1], "/primary", Duration::from_millis(10));
    pair.node1.start_superseded();
    let samples = sampler.finish();
    let answered: Vec<u16> = samples.iter().filter_map(|s| s.codes[0]).collect();
    println!(
        "[http-roles] returning old primary: {} samples, {} answered (codes {:?})",
        samples.len(),
        answered.len(),
        answered.iter().collect::<std::collections::BTreeSet<_>>()
    );
    assert!(
        !answered.contains(&200),
        "the superseded old primary answered /primary 200"
    );

    // Started again it is a standby (fenced with standby.signal): /primary stays 503.
    pair.node1.start();
    assert!(wait_until(Duration::from_secs(10), || code(h1, "/primary")
        == Some(503)));
}

#[test]
fn a_frozen_keeper_makes_primary_and_liveness_answer_503_until_it_runs_again() {
    let (mut pair, [h1, _]) = http_pair("http-stale", Options::default());
    expect_codes("node1", h1, &[("/primary", 200), ("/liveness", 200)]);
    pair.node1.freeze_keeper();
    let frozen = Instant::now();
    // Stale after 3 keepalive_times and a second (4 s here): not before, and soon after.
    let stale = time_until(Duration::from_secs(10), || {
        code(h1, "/primary") == Some(503)
    })
    .expect("/primary still answers 200 with the keeper frozen");
    println!(
        "[http-stale] /primary answered 503 {} ms after the keeper was frozen",
        stale.as_millis()
    );
    assert!(stale >= Duration::from_millis(2500), "{stale:?}");
    expect_codes(
        "node1 (keeper frozen)",
        h1,
        &[
            ("/primary", 503),
            ("/read-only", 503),
            ("/liveness", 503),
            ("/health", 200),
        ],
    );
    let body = get(h1, "/primary").body;
    assert!(body.contains("\"keeper_running\":false"), "{body}");
    assert!(body.contains("\"role\":\"unknown\""), "{body}");
    assert_eq!(metric_of(h1, "pg_keeper_up"), Some(0.0));
    pair.node1.thaw();
    assert!(wait_until(Duration::from_secs(10), || code(h1, "/primary")
        == Some(200)));
    println!(
        "[http-stale] /primary answered 200 again {} ms after the freeze began",
        frozen.elapsed().as_millis()
    );
}

#[test]
fn an_asynchronous_standby_answers_async_and_a_paused_keeper_says_so() {
    let (pair, [h1, h2]) = http_pair("http-async", Options::default());
    pair.create_extension();
    pair.node1
        .sql("ALTER SYSTEM SET synchronous_standby_names = ''")
        .unwrap();
    pair.node1.reload();
    let listed_async = wait_until(Duration::from_secs(10), || {
        code(h2, "/async") == Some(200) && code(h2, "/sync") == Some(503)
    });
    assert!(listed_async, "node2: {:?}", codes(h2, &["/sync", "/async"]));
    assert!(get(h2, "/replica").body.contains("\"synchronous\":false"));
    assert_eq!(metric_of(h2, "pg_keeper_synchronous"), Some(0.0));

    // A pause is shown; a paused primary still takes writes, so /primary stays 200.
    pair.node1.sql("SELECT pg_keeper_pause()").unwrap();
    assert!(wait_until(Duration::from_secs(5), || get(h1, "/primary")
        .body
        .contains("\"paused\":true")));
    assert_eq!(code(h1, "/primary"), Some(200));
    assert_eq!(metric_of(h1, "pg_keeper_paused"), Some(1.0));
    pair.node1.sql("SELECT pg_keeper_resume()").unwrap();
    assert!(wait_until(Duration::from_secs(5), || metric_of(
        h1,
        "pg_keeper_paused"
    ) == Some(0.0)));
}

#[test]
fn a_listener_on_two_addresses_beside_an_unconfigured_keeper_answers_503_and_says_why() {
    let port = free_port();
    let single = common::Single::start(
        "http-addresses",
        &format!(
            "pg_keeper.http_port = {port}\npg_keeper.http_listen_addresses = '127.0.0.1, 127.0.0.2, db.example'"
        ),
    );
    // A host name is refused (never looked up), the two addresses are served.
    single.node.expect_log(
        "could not listen for HTTP on db.example:",
        Duration::from_secs(10),
    );
    assert!(single
        .node
        .log_text()
        .contains("\"db.example\" is not an IP address"));
    for ip in [[127, 0, 0, 1], [127, 0, 0, 2]] {
        let addr = SocketAddr::from((ip, port));
        let up = wait_until(Duration::from_secs(10), || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
        });
        assert!(up, "nothing listens on {addr}");
    }
    let other = {
        let mut s = TcpStream::connect(("127.0.0.2", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut raw = String::new();
        let _ = s.read_to_string(&mut raw);
        raw
    };
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    // Without node conninfos the keeper cannot tell which node it is: no role, and the
    // problem in the body.
    assert!(wait_until(Duration::from_secs(10), || single
        .node
        .title_is("configuration error")));
    let reply = get(port, "/primary");
    assert_eq!(reply.code, 503, "{}", reply.body);
    assert!(
        reply.body.contains("\"role\":\"starting\""),
        "{}",
        reply.body
    );
    assert!(
        reply.body.contains("node1_conninfo is not set"),
        "{}",
        reply.body
    );
    assert_eq!(code(port, "/replica"), Some(503));
    assert_eq!(code(port, "/liveness"), Some(200));
}

// ---------------------------------------------------------------------------------------------
// Sampling /primary on several nodes

struct Sample {
    at: Instant,
    codes: Vec<Option<u16>>,
}

/// Asks `path` of every port in turn, every `every`, until finished.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(ports: Vec<u16>, path: &'static str, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = spawn(move || {
            let mut out = Vec::new();
            // Bounded: a test that forgets to finish still ends.
            let end = Instant::now() + Duration::from_secs(180);
            while !flag.load(Ordering::Relaxed) && Instant::now() < end {
                let at = Instant::now();
                let codes = ports.iter().map(|&p| code(p, path)).collect();
                out.push(Sample { at, codes });
                sleep(every);
            }
            out
        });
        Sampler { stop, handle }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

#[test]
fn an_isolated_primary_answers_503_before_the_standby_answers_200() {
    let h1 = free_port();
    let pp =
        ProxiedPair::connected_with_witness("http-isolated", with_http(h1, Options::default()));
    let h2 = give_node2_its_own_port(&pp.pair, h1);
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    assert!(wait_until(Duration::from_secs(10), || code(h1, "/primary")
        == Some(200)));
    let body = get(h1, "/primary").body;
    assert!(body.contains("\"lease\":{\"held\":true"), "{body}");
    assert!(metric_of(h1, "pg_keeper_lease_remaining_seconds").is_some_and(|s| s > 0.0));

    let sampler = Sampler::start(vec![h1, h2], "/primary", Duration::from_millis(20));
    let cut = Instant::now();
    pp.isolate(node1, Link::Blackhole);
    node1.expect_title("master mode:isolated", Duration::from_secs(20));
    // Its /primary answers 503 by the time the title says isolated (its lease ran out first).
    assert_eq!(code(h1, "/primary"), Some(503));
    let body = get(h1, "/primary").body;
    assert!(body.contains("\"role\":\"isolated\""), "{body}");
    let promoted = wait_until(FAILOVER, || code(h2, "/primary") == Some(200));
    sleep(Duration::from_secs(1));
    let samples = sampler.finish();
    pp.isolate(node1, Link::Pass);
    assert!(
        promoted,
        "node2 /primary never answered 200 after node1 was isolated"
    );

    let last_200_on_node1 = samples
        .iter()
        .filter(|s| s.codes[0] == Some(200))
        .map(|s| s.at)
        .max();
    let first_200_on_node2 = samples
        .iter()
        .filter(|s| s.codes[1] == Some(200))
        .map(|s| s.at)
        .min()
        .expect("node2 answered 200 in the samples");
    let both = samples
        .iter()
        .filter(|s| s.codes.iter().all(|c| *c == Some(200)))
        .count();
    let ms = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(cut).as_millis());
    println!(
        "[http-isolated] after the cut: node1 /primary last 200 at {:?} ms, node2 first 200 at {:?} ms; \
         {} samples, {both} with both 200",
        ms(last_200_on_node1),
        ms(Some(first_200_on_node2)),
        samples.len()
    );
    assert_eq!(both, 0, "both nodes answered /primary 200 in one sample");
    assert!(last_200_on_node1.is_none_or(|t| t < first_200_on_node2));
    assert!(node2.title_is("master mode:async") || node2.title_is("master mode"));
}

#[test]
fn with_the_witness_down_primary_answers_503_once_the_lease_runs_out_and_200_when_it_is_back() {
    let h1 = free_port();
    let pp =
        ProxiedPair::connected_with_witness("http-witness-down", with_http(h1, Options::default()));
    let _h2 = give_node2_its_own_port(&pp.pair, h1);
    assert!(wait_until(Duration::from_secs(10), || code(h1, "/primary")
        == Some(200)));
    let witness = pp.witness.as_ref().unwrap();
    witness.stop();
    let out = time_until(Duration::from_secs(15), || {
        code(h1, "/primary") == Some(503)
    })
    .expect("/primary still answers 200 with the witness down");
    println!(
        "[http-witness-down] /primary answered 503 {} ms after the witness stopped (lease 3.2 s)",
        out.as_millis()
    );
    // The keeper goes on serving with its standby; only the load balancer's answer changed.
    assert!(pp.pair.node1.title_is("master mode:connected"));
    let body = get(h1, "/primary").body;
    assert!(body.contains("\"lease\":{\"held\":false"), "{body}");
    witness.start();
    let back = time_until(Duration::from_secs(20), || {
        code(h1, "/primary") == Some(200)
    })
    .expect("/primary did not answer 200 again once the witness was back");
    println!(
        "[http-witness-down] /primary answered 200 again {} ms after the witness started",
        back.as_millis()
    );
    // Not at the first failed renewal: when the lease renewed last (up to one keepalive_time
    // before the stop) runs out, 3.2 s after it.
    assert!(
        out >= Duration::from_millis(1500) && out < Duration::from_secs(6),
        "{out:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// Runs `promtool check metrics` on an exposition; panics with what it said when it refuses.
fn promtool_accepts(what: &str, exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool refuses {what}: {said}\n{exposition}"
    );
}

#[test]
fn promtool_accepts_the_metrics_and_they_follow_a_lost_standby() {
    let (pair, [h1, h2]) = http_pair("http-metrics", Options::default());
    promtool_accepts("node1's metrics", &get(h1, "/metrics").body);
    promtool_accepts("node2's metrics", &get(h2, "/metrics").body);
    let m = get(h1, "/metrics").body;
    for (series, value) in [
        ("pg_keeper_up", 1.0),
        ("pg_keeper_role{role=\"primary\"}", 1.0),
        ("pg_keeper_state_info{state=\"master mode:connected\"}", 1.0),
        ("pg_keeper_primary_serving", 1.0),
        ("pg_keeper_synchronous", 1.0),
        ("pg_keeper_heartbeat_failures", 0.0),
        ("pg_keeper_async_switches_total", 0.0),
        ("pg_keeper_paused", 0.0),
    ] {
        assert_eq!(metric(&m, series), Some(value), "{series}:\n{m}");
    }
    assert!(metric(&m, "pg_keeper_peer_last_answer_seconds").is_some_and(|s| s < 3.0));
    assert!(metric(&m, "pg_keeper_standby_lag_bytes").is_some());
    let m2 = get(h2, "/metrics").body;
    assert_eq!(
        metric(&m2, "pg_keeper_role{role=\"standby\"}"),
        Some(1.0),
        "{m2}"
    );
    assert!(metric(&m2, "pg_keeper_replay_lag_bytes").is_some(), "{m2}");
    assert_eq!(metric(&m2, "pg_keeper_synchronous"), Some(1.0), "{m2}");
    let failures_before = metric(&m, "pg_keeper_heartbeat_failures_total").unwrap();

    // The standby goes: failed heartbeats climb, replication turns asynchronous.
    pair.node2.kill9();
    pair.node1.expect_switch_to_async(Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(10), || metric_of(
        h1,
        "pg_keeper_async_switches_total"
    ) == Some(1.0)));
    let m = get(h1, "/metrics").body;
    promtool_accepts("node1's metrics without its standby", &m);
    let failures_after = metric(&m, "pg_keeper_heartbeat_failures_total").unwrap();
    println!(
        "[http-metrics] pg_keeper_heartbeat_failures_total {failures_before} -> {failures_after}"
    );
    assert!(failures_after >= failures_before + 3.0, "{m}");
    assert_eq!(metric(&m, "pg_keeper_synchronous"), Some(0.0), "{m}");
    assert_eq!(
        metric(&m, "pg_keeper_state_info{state=\"master mode:async\"}"),
        Some(1.0),
        "{m}"
    );
    assert!(metric(&m, "pg_keeper_peer_last_answer_seconds").is_some_and(|s| s >= 2.0));
    // A primary without a standby still takes writes.
    assert_eq!(code(h1, "/primary"), Some(200));
}

// ---------------------------------------------------------------------------------------------
// HAProxy

/// HAProxy (the Debian package) in front of the pair, configured as Patroni's documentation
/// does, with a shorter check interval so that the test is quick.
struct Haproxy {
    child: Child,
    port: u16,
    config: PathBuf,
}

/// The check interval and counts given to HAProxy (Patroni's example: 3s, fall 3, rise 2).
const CHECK_INTER_MS: u64 = 500;
const CHECK_FALL: u32 = 2;
const CHECK_RISE: u32 = 1;

impl Haproxy {
    fn start(root: &Path, servers: [(&Node, u16); 2]) -> Haproxy {
        let port = free_port();
        let config = root.join("haproxy.cfg");
        let lines: Vec<String> = servers
            .iter()
            .map(|(n, h)| {
                format!(
                    "    server {} 127.0.0.1:{} maxconn 100 check port {h}",
                    n.name, n.port
                )
            })
            .collect();
        let text = format!(
            "global
    maxconn 100

defaults
    mode tcp
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check 5s

listen primary
    bind 127.0.0.1:{port}
    option httpchk OPTIONS /primary
    http-check expect status 200
    default-server inter {CHECK_INTER_MS}ms fall {CHECK_FALL} rise {CHECK_RISE} on-marked-down shutdown-sessions
{}
",
            lines.join("\n")
        );
        std::fs::write(&config, text).unwrap();
        let log = std::fs::File::create(root.join("haproxy.log")).unwrap();
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&config)
            .arg("-db")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("haproxy (Debian package) is installed");
        let h = Haproxy {
            child,
            port,
            config,
        };
        let up = wait_until(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "haproxy does not listen on {port}");
        h
    }

    /// The port of the server a new connection through HAProxy reaches (None: none answers).
    fn routed_to(&self) -> Option<u16> {
        common::partition::query(self.port, "SHOW port").and_then(|p| p.trim().parse().ok())
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.config.with_file_name("haproxy.log");
            eprintln!(
                "---- haproxy log ----\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

/// A client writing through HAProxy, one connection per INSERT (as a pooler's new connection
/// would), recording the time and the server port of every acknowledged commit.
struct Writer {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<(Instant, u16)>>>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(haproxy_port: u16) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let (flag, out) = (stop.clone(), acks.clone());
        let handle = spawn(move || {
            let end = Instant::now() + Duration::from_secs(300);
            while !flag.load(Ordering::Relaxed) && Instant::now() < end {
                let port = common::partition::query(
                    haproxy_port,
                    "INSERT INTO t VALUES (DEFAULT) RETURNING current_setting('port')",
                )
                .and_then(|p| p.trim().parse::<u16>().ok());
                if let Some(p) = port {
                    out.lock().unwrap().push((Instant::now(), p));
                }
                sleep(Duration::from_millis(20));
            }
        });
        Writer {
            stop,
            acks,
            handle: Some(handle),
        }
    }

    fn acks(&self) -> Vec<(Instant, u16)> {
        self.acks.lock().unwrap().clone()
    }

    fn finish(mut self) -> Vec<(Instant, u16)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.acks()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The longest time without an acknowledged commit from `since` on.
fn longest_gap(acks: &[(Instant, u16)], since: Instant) -> Duration {
    let mut last = since;
    let mut longest = Duration::ZERO;
    for (t, _) in acks.iter().filter(|(t, _)| *t >= since) {
        longest = longest.max(t.duration_since(last));
        last = *t;
    }
    longest
}

/// How many commits `port` acknowledged after `since`.
fn commits_on(acks: &[(Instant, u16)], port: u16, since: Instant) -> usize {
    acks.iter()
        .filter(|(t, p)| *t > since && *p == port)
        .count()
}

/// No commit acknowledged by `old` after the first one acknowledged by `new`.
fn no_write_on_old_after_new(acks: &[(Instant, u16)], old: u16, new: u16) -> bool {
    let Some(first_new) = acks.iter().find(|(_, p)| *p == new).map(|(t, _)| *t) else {
        return true;
    };
    !acks.iter().any(|(t, p)| *p == old && *t > first_new)
}

/// HAProxy in front of the pair, routing to node1, and a writer through it that has committed.
fn writing_through_haproxy(pair: &Pair, http: [u16; 2]) -> (Haproxy, Writer) {
    pair.node1
        .sql("CREATE TABLE t (id serial PRIMARY KEY)")
        .unwrap();
    let haproxy = Haproxy::start(&pair.root, [(&pair.node1, http[0]), (&pair.node2, http[1])]);
    assert!(wait_until(Duration::from_secs(10), || haproxy.routed_to()
        == Some(pair.node1.port)));
    let writer = Writer::start(haproxy.port);
    assert!(wait_until(Duration::from_secs(10), || writer.acks().len() >= 5));
    (haproxy, writer)
}

#[test]
fn haproxy_follows_a_failover_and_never_sends_traffic_to_the_superseded_old_primary() {
    let (pair, [h1, h2]) = http_pair("http-haproxy-failover", Options::default());
    let (haproxy, writer) = writing_through_haproxy(&pair, [h1, h2]);

    let killed = Instant::now();
    pair.node1.kill9();
    let resumed = wait_until(FAILOVER + Duration::from_secs(10), || {
        writer
            .acks()
            .iter()
            .any(|(t, p)| *t > killed && *p == pair.node2.port)
    });
    assert!(
        resumed,
        "no write went through HAProxy to node2 after the failover"
    );
    sleep(Duration::from_secs(2));

    // The old primary comes back on the old timeline and fences itself; meanwhile HAProxy
    // sends no connection to it (each check would need a 200 from its /primary).
    let restarted = Instant::now();
    pair.node1.start_superseded();
    sleep(Duration::from_secs(1));
    let acks = writer.finish();
    let longest = longest_gap(&acks, killed);
    let first_on_node2 = acks
        .iter()
        .find(|(t, p)| *t > killed && *p == pair.node2.port)
        .map(|(t, _)| t.duration_since(killed))
        .unwrap();
    println!(
        "[http-haproxy-failover] writer through HAProxy (check inter {CHECK_INTER_MS}ms fall {CHECK_FALL} rise {CHECK_RISE}): \
         first commit on node2 {} ms after kill -9 of node1; longest gap between commits {} ms; \
         {} commits on node2 after the kill, {} on node1 after its return",
        first_on_node2.as_millis(),
        longest.as_millis(),
        commits_on(&acks, pair.node2.port, killed),
        commits_on(&acks, pair.node1.port, restarted),
    );
    // (A commit acknowledged just as the kill came may be counted after it: the return counts.)
    assert_eq!(
        commits_on(&acks, pair.node1.port, restarted),
        0,
        "HAProxy sent a write to the returning old primary"
    );
    assert!(no_write_on_old_after_new(
        &acks,
        pair.node1.port,
        pair.node2.port
    ));
    assert_eq!(haproxy.routed_to(), Some(pair.node2.port));
    let log = std::fs::read_to_string(pair.root.join("haproxy.log")).unwrap_or_default();
    assert!(
        !log.lines().any(|l| l.contains("node1 is UP")),
        "HAProxy marked the old primary up again:\n{log}"
    );
}

#[test]
fn haproxy_follows_a_switchover() {
    let (pair, [h1, h2]) = http_pair("http-haproxy-switchover", Options::default());
    pair.create_extension();
    let (haproxy, writer) = writing_through_haproxy(&pair, [h1, h2]);
    let started = Instant::now();
    let (ok, said) = pair.switchover();
    assert!(ok, "switchover failed:\n{said}");
    let script = started.elapsed();
    let followed = time_until(Duration::from_secs(20), || {
        haproxy.routed_to() == Some(pair.node2.port)
    });
    sleep(Duration::from_secs(2));
    let acks = writer.finish();
    println!(
        "[http-haproxy-switchover] bin/switchover took {} ms; HAProxy routed to node2 {:?} ms after it ended; \
         longest gap between commits through HAProxy {} ms; {} commits on node2",
        script.as_millis(),
        followed.map(|d| d.as_millis()),
        longest_gap(&acks, started).as_millis(),
        commits_on(&acks, pair.node2.port, started)
    );
    assert!(
        followed.is_some(),
        "HAProxy does not route to node2 after the switchover"
    );
    assert!(commits_on(&acks, pair.node2.port, started) > 0);
    assert!(no_write_on_old_after_new(
        &acks,
        pair.node1.port,
        pair.node2.port
    ));
    expect_codes(
        "node1 (now standby)",
        h1,
        &[("/primary", 503), ("/replica", 200)],
    );
    expect_codes(
        "node2 (now primary)",
        h2,
        &[("/primary", 200), ("/replica", 503)],
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile clients

/// The intervals between the heartbeat answers `node`'s keeper saw, sampled from
/// pg_keeper_status() every 50 ms for `how_long`, and the failed heartbeats counted meanwhile.
fn heartbeat_intervals(node: &Node, how_long: Duration) -> (Vec<Duration>, i64) {
    let read = || {
        node.sql(
            "SELECT extract(epoch FROM last_heartbeat_ok)::float8, failed_heartbeats FROM pg_keeper_status()",
        )
        .ok()
    };
    let end = Instant::now() + how_long;
    let mut seen: Vec<f64> = Vec::new();
    let mut failures = 0;
    while Instant::now() < end {
        if let Some(row) = read() {
            let mut f = row.split('|');
            let at: Option<f64> = f.next().and_then(|v| v.parse().ok());
            let failed: i64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            failures = failures.max(failed);
            if let Some(at) = at {
                if seen.last() != Some(&at) {
                    seen.push(at);
                }
            }
        }
        sleep(Duration::from_millis(50));
    }
    let intervals = seen
        .windows(2)
        .map(|w| Duration::from_secs_f64((w[1] - w[0]).max(0.0)))
        .collect();
    (intervals, failures)
}

/// [`heartbeat_intervals`] of both nodes at once, for 8 s.
fn both_heartbeats(pair: &Pair) -> ((Vec<Duration>, i64), (Vec<Duration>, i64)) {
    let how_long = Duration::from_secs(8);
    std::thread::scope(|s| {
        let one = s.spawn(|| heartbeat_intervals(&pair.node1, how_long));
        let two = heartbeat_intervals(&pair.node2, how_long);
        (one.join().unwrap(), two)
    })
}

fn describe(intervals: &[Duration]) -> String {
    if intervals.is_empty() {
        return "no interval".into();
    }
    let ms: Vec<u128> = intervals.iter().map(|d| d.as_millis()).collect();
    let mean = ms.iter().sum::<u128>() / ms.len() as u128;
    format!(
        "{} intervals, min {} ms, mean {mean} ms, max {} ms",
        ms.len(),
        ms.iter().min().unwrap(),
        ms.iter().max().unwrap()
    )
}

/// Sends the first half of a request and waits: the listener must drop it (408 or a close)
/// within its request time; returns how long that took.
fn half_open(port: u16) -> Option<(Duration, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let start = Instant::now();
    s.write_all(b"GET /primary HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .ok()?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    Some((
        start.elapsed(),
        String::from_utf8_lossy(&raw)
            .lines()
            .next()
            .unwrap_or("")
            .to_string(),
    ))
}

/// Sends `text` as it is; returns the status line answered (empty: none).
fn raw_request(port: u16, text: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(text.as_bytes());
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Sends a request with a 64 KiB header; returns the status line answered (the listener
/// answers after 8 KiB and closes: the rest of the write may fail).
fn huge_header(port: u16) -> String {
    raw_request(
        port,
        &format!(
            "GET /primary HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        ),
    )
}

/// What a flood of idle connections got.
struct Flood {
    connected: usize,
    /// Answered 503: dropped to make room for a newer connection.
    dropped: usize,
    /// Answered 408: dropped at the end of the request time.
    timed_out: usize,
    /// Until every connection was answered or closed.
    took: Duration,
    /// Health checks made meanwhile (one every 100 ms), and those answered 200.
    checks: usize,
    checks_ok: usize,
}

/// Opens `n` connections at once and keeps them idle, while a health check asks `/primary`
/// every 100 ms; then reads what each connection was answered.
fn flood(port: u16, n: usize) -> Flood {
    let stop = Arc::new(AtomicBool::new(false));
    let checker = {
        let stop = stop.clone();
        spawn(move || {
            let (mut made, mut ok) = (0, 0);
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                made += 1;
                ok += (code(port, "/primary") == Some(200)) as usize;
                sleep(Duration::from_millis(100));
            }
            (made, ok)
        })
    };
    let start = Instant::now();
    let mut open: Vec<TcpStream> = (0..n)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    let connected = open.len();
    let (mut dropped, mut timed_out) = (0, 0);
    for s in &mut open {
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut first = [0u8; 12];
        if s.read_exact(&mut first).is_ok() {
            dropped += (&first == b"HTTP/1.1 503") as usize;
            timed_out += (&first == b"HTTP/1.1 408") as usize;
        }
    }
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (checks, checks_ok) = checker.join().unwrap();
    Flood {
        connected,
        dropped,
        timed_out,
        took,
        checks,
        checks_ok,
    }
}

#[test]
fn hostile_clients_get_bounded_answers_and_do_not_change_the_heartbeats() {
    let (pair, [h1, _h2]) = http_pair("http-hostile", Options::default());
    pair.create_extension();

    // Each kind alone, with its bound.
    let (took, line) = half_open(h1).expect("connects");
    println!(
        "[http-hostile] half-open request dropped after {} ms with {line:?}",
        took.as_millis()
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert!(
        line.is_empty() || line.starts_with("HTTP/1.1 408"),
        "{line}"
    );
    let line = huge_header(h1);
    println!("[http-hostile] 64 KiB header answered {line:?}");
    assert!(
        line.is_empty() || line.starts_with("HTTP/1.1 431"),
        "{line}"
    );
    let many = (0..40)
        .map(|i| format!("X-H{i}: v\r\n"))
        .collect::<String>();
    let line = raw_request(
        h1,
        &format!("GET /primary HTTP/1.1\r\nHost: 127.0.0.1\r\n{many}\r\n"),
    );
    assert!(line.starts_with("HTTP/1.1 431"), "40 headers: {line}");
    let f = flood(h1, 1000);
    println!(
        "[http-hostile] 1000 idle connections: {} connected, {} dropped for room (503), {} timed out (408), \
         all answered within {} ms; health checks meanwhile: {} of {} answered 200",
        f.connected,
        f.dropped,
        f.timed_out,
        f.took.as_millis(),
        f.checks_ok,
        f.checks
    );
    assert_eq!(
        f.dropped + f.timed_out,
        f.connected,
        "every idle connection gets a bounded answer"
    );
    assert!(f.took < Duration::from_secs(15), "{:?}", f.took);
    // The flood cannot keep a health check out (a few may be late on this 2-core machine).
    assert!(
        f.checks_ok * 10 >= f.checks * 9,
        "{} of {}",
        f.checks_ok,
        f.checks
    );
    assert!(wait_until(Duration::from_secs(5), || code(h1, "/primary") == Some(200)));

    // The keepers' heartbeats, quiet and then under a steady hostile load on node1's listener.
    let (quiet1, quiet2) = both_heartbeats(&pair);
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<JoinHandle<usize>> = (0..4)
        .map(|kind| {
            let stop = stop.clone();
            spawn(move || {
                let mut rounds = 0;
                let end = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    match kind {
                        0 => {
                            flood(h1, 1000);
                        }
                        1 => drop(half_open(h1)),
                        2 => drop(huge_header(h1)),
                        // Valid requests as fast as one client can send them.
                        _ => drop(code(h1, "/metrics")),
                    }
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    let (loaded1, loaded2) = both_heartbeats(&pair);
    stop.store(true, Ordering::Relaxed);
    let rounds: Vec<usize> = load.into_iter().map(|h| h.join().unwrap()).collect();
    println!(
        "[http-hostile] node1's keeper heartbeats: quiet {}; under load {}",
        describe(&quiet1.0),
        describe(&loaded1.0)
    );
    println!(
        "[http-hostile] node2's keeper heartbeats (to node1): quiet {}; under load {}",
        describe(&quiet2.0),
        describe(&loaded2.0)
    );
    println!("[http-hostile] load rounds (floods, half-open, huge headers, /metrics): {rounds:?}");
    let listener = get(h1, "/metrics").body;
    println!(
        "[http-hostile] listener counters: rejected {:?}, timed out {:?}, bad {:?}",
        metric(&listener, "pg_keeper_http_rejected_connections_total"),
        metric(&listener, "pg_keeper_http_timeouts_total"),
        metric(&listener, "pg_keeper_http_bad_requests_total")
    );
    for (what, (intervals, failures)) in [("node1", &loaded1), ("node2", &loaded2)] {
        assert_eq!(
            *failures, 0,
            "{what}'s keeper failed a heartbeat under the HTTP load"
        );
        assert!(intervals.len() >= 4, "{what}: {}", describe(intervals));
        // keepalive_time is 1s: a heartbeat answered within two intervals of the last.
        assert!(
            intervals.iter().all(|d| *d < Duration::from_millis(2000)),
            "{what}: {}",
            describe(intervals)
        );
    }
    assert!(rounds.iter().all(|r| *r > 0));
    assert!(pair.node1.title_is("master mode:connected"));
    assert!(pair.node2.title_is("standby mode:connected"));
}

// ---------------------------------------------------------------------------------------------
// The README's examples

/// The body of the first fenced block of `lang` after `heading` in README.md.
fn readme_block(heading: &str, lang: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split_once(heading)
        .unwrap_or_else(|| panic!("README.md has no {heading:?}"))
        .1;
    let fence = format!("```{lang}\n");
    let block = section
        .split_once(&fence)
        .unwrap_or_else(|| panic!("no {lang} block after {heading:?}"))
        .1;
    block.split_once("```").unwrap().0.to_string()
}

fn check_config(program: &str, args: &[&str], file: &Path) {
    let out = Command::new(program)
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} refuses {}: {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_readme_haproxy_and_prometheus_examples_are_valid_configurations() {
    let dir = std::env::temp_dir().join(format!("pg_keeper_rs_readme_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let haproxy = dir.join("haproxy.cfg");
    let text = readme_block("### HAProxy", "haproxy");
    assert!(text.contains("option httpchk OPTIONS /primary"), "{text}");
    assert!(text.contains("on-marked-down shutdown-sessions"), "{text}");
    std::fs::write(&haproxy, text).unwrap();
    check_config("haproxy", &["-c", "-f"], &haproxy);
    let prometheus = dir.join("prometheus.yml");
    std::fs::write(&prometheus, readme_block("### Prometheus", "yaml")).unwrap();
    check_config("promtool", &["check", "config"], &prometheus);
    let _ = std::fs::remove_dir_all(&dir);
}
