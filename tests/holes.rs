//! Real-server tests of holes the simulation (keeper-sim/tests/holes.rs) also keeps: each failed
//! on the code before its fix. Real servers and proxies, as in tests/partitions.rs.

mod common;

use std::fs;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::partition::{Mode, ProxiedPair};
use common::{wait_until, Options, Single};

/// Hole 11: a conninfo that lets libpq choose among servers, or opens a replication
/// connection, would let heartbeats or lease statements reach another server than the one
/// meant. Before the fix they were accepted; now each is refused, naming the setting and why.
#[test]
fn conninfos_that_let_libpq_choose_the_server_are_refused() {
    let other = common::free_port();
    let single = Single::start("hazardous-conninfos", "");
    let n = &single.node;
    n.append_conf(&format!(
        "pg_keeper.node1_conninfo = '{}'\npg_keeper.node2_conninfo = 'host=127.0.0.1 port={other} dbname=postgres'",
        n.conninfo()
    ));
    n.reload();
    n.expect_title("master mode", Duration::from_secs(10));
    let cases = [
        (
            "pg_keeper.node1_conninfo",
            "host=127.0.0.1,127.0.0.2 port=5432",
            "names several servers",
        ),
        (
            "pg_keeper.node2_conninfo",
            "host=127.0.0.1 port=5432,5433",
            "names several servers",
        ),
        (
            "pg_keeper.node2_conninfo",
            "host=127.0.0.1 target_session_attrs=read-write",
            "sets target_session_attrs",
        ),
        (
            "pg_keeper.node1_conninfo",
            "host=127.0.0.1 replication=database",
            "sets replication=",
        ),
        (
            "pg_keeper.witness_conninfo",
            "host=127.0.0.3,127.0.0.4 dbname=w",
            "names several servers",
        ),
    ];
    for (setting, value, why) in cases {
        let err = n
            .sql(&format!("ALTER SYSTEM SET {setting} = '{value}'"))
            .unwrap_err();
        assert!(
            err.contains(setting) && err.contains(why),
            "{setting} = '{value}': {err}"
        );
    }
    // Harmless spellings of the same keywords are accepted.
    n.sql("ALTER SYSTEM SET pg_keeper.witness_conninfo = 'host=127.0.0.3 dbname=w target_session_attrs=any'")
        .unwrap();
    n.sql("ALTER SYSTEM RESET pg_keeper.witness_conninfo")
        .unwrap();
    let auto = fs::read_to_string(n.dir.join("postgresql.auto.conf")).unwrap();
    assert!(
        !auto.contains("127.0.0.2") && !auto.contains("5433"),
        "{auto}"
    );
}

/// An idle pair through the proxies, no writer: nothing but the keepers' own traffic.
fn idle_pair(label: &str, count: u32) -> ProxiedPair {
    let pp = ProxiedPair::connected(
        label,
        Options {
            keepalive_count: count,
            ..Options::default()
        },
    );
    // Let any traffic of the set-up grow old.
    sleep(Duration::from_secs(3));
    pp
}

/// Hole 6: on an idle pair with only the standby's heartbeat path to the primary broken, the
/// guard "its WAL receiver still receives from it" lapsed (the walsender speaks only every
/// wal_sender_timeout / 2) and the standby promoted beside a live primary. The primary's keeper
/// now writes a small WAL record every tick.
#[test]
fn an_idle_standby_whose_heartbeats_alone_fail_does_not_promote() {
    let pp = idle_pair("idle-standby-heartbeats", 2);
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    pp.to_node1.set_mode(Mode::Blackhole);
    node2.expect_log(
        "WAL receiver still receives from it",
        Duration::from_secs(15),
    );
    sleep(Duration::from_secs(12));
    assert_eq!(node2.in_recovery(), Some(true), "the standby promoted");
    assert_eq!(node1.in_recovery(), Some(false));
    assert!(
        !node2.log_text().contains("promoting this standby"),
        "{}",
        node2.keeper_log().join("\n")
    );
}

/// Hole 5: with only the primary's heartbeat path to a healthy, streaming synchronous standby
/// broken, the primary switched to async within the budget, silently giving up durability. The
/// standby's replies on its stream now count as evidence of life, on an idle pair too.
#[test]
fn a_primary_whose_heartbeats_alone_fail_keeps_synchronous_replication() {
    let pp = idle_pair("idle-primary-heartbeats", 3);
    let node1 = &pp.pair.node1;
    pp.to_node2.set_mode(Mode::Blackhole);
    node1.expect_log(
        "its replication still confirms WAL",
        Duration::from_secs(20),
    );
    sleep(Duration::from_secs(5));
    assert!(
        !node1.log_text().contains(common::SWITCHING_TO_ASYNC),
        "{}",
        node1.keeper_log().join("\n")
    );
    assert_eq!(
        node1.sql("SHOW synchronous_standby_names").as_deref(),
        Ok("node1, node2")
    );
    // A commit is still confirmed by the standby.
    node1
        .sql("SET statement_timeout = '10s'; CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .expect("a synchronous commit completes");
}

/// Hole 13: after_command inherited the server's ignored and blocked signals (SIGPIPE ignored)
/// and its open files and sockets. Now every signal has its default action, none is blocked,
/// and only stdin, stdout and stderr are open in it.
#[test]
fn after_command_starts_with_default_signals_and_no_inherited_descriptors() {
    let root_marker = "@ROOT@/after-env";
    let pp = ProxiedPair::connected(
        "after-command-clean",
        Options {
            extra: format!(
                "pg_keeper.after_command = 'ls /proc/$$/fd > {root_marker}; exec grep -E \"^(SigBlk|SigIgn)\" /proc/self/status >> {root_marker}'"
            ),
            ..Options::default()
        },
    );
    let file = pp.pair.root.join("after-env");
    pp.pair.node2.kill9();
    let written = wait_until(Duration::from_secs(30), || {
        fs::read_to_string(&file)
            .is_ok_and(|t| t.lines().filter(|l| l.starts_with("Sig")).count() == 2)
    });
    let text = fs::read_to_string(&file).unwrap_or_default();
    assert!(
        written,
        "after_command did not run: {text:?}\n{}",
        pp.pair.node1.keeper_log().join("\n")
    );
    // As exec'd by the shell, the command has what the keeper gave the shell. Signals 32 and 33
    // are glibc's own (every program sets them up afresh); none of the standard ones (1 to 31)
    // may be blocked or ignored.
    for line in text.lines().filter(|l| l.starts_with("Sig")) {
        let mask = u64::from_str_radix(line.rsplit('\t').next().unwrap_or("").trim(), 16);
        assert!(mask.is_ok_and(|m| m & 0x7fff_ffff == 0), "{line}\n{text}");
    }
    let fds: Vec<&str> = text.lines().filter(|l| !l.starts_with("Sig")).collect();
    // The shell's own descriptors (those of `ls` belong to its own process): stdin, stdout,
    // stderr, and the one dash keeps for itself (10, also outside any server).
    let unexpected: Vec<&&str> = fds
        .iter()
        .filter(|fd| !["0", "1", "2", "10"].contains(fd))
        .collect();
    assert!(
        unexpected.is_empty(),
        "inherited descriptors {unexpected:?}\n{text}"
    );
}

/// The start of what a refused session is told (src/serving.rs).
const REFUSAL: &str = "isolated from its standby and the witness";

/// Hole 8: a primary cut off from both its standby and the witness used to go on serving:
/// clients that still reached it connected as read-write, read what the promoted standby no
/// longer had, and their commits hung. Now it refuses every new session and ends the open ones
/// (`master mode:isolated`) by its own clock before the standby may take the lease; when the cut
/// heals it learns it was superseded and fences itself.
#[test]
fn hole_8_an_isolated_primary_stops_serving_before_the_standby_takes_the_lease() {
    let pp = ProxiedPair::connected_with_witness("h8-isolated", Options::default());
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    node1.sql("CREATE TABLE t (id int)").unwrap();
    // A session open on node1 before the cut (a client that keeps its connection).
    let mut open_session = node1.sql_background("SELECT pg_sleep(60)");
    sleep(Duration::from_millis(500));
    assert_eq!(node1.sql("SELECT 1").as_deref(), Ok("1"));

    pp.isolate(node1, Mode::Blackhole);
    let cut = Instant::now();
    // Poll both: when node1 first refuses, and when the lease first names node2 as holder.
    let (mut refused_at, mut taken_at) = (None, None);
    let mut refusal = String::new();
    let done = wait_until(Duration::from_secs(30), || {
        if refused_at.is_none() {
            if let Err(e) = node1.sql("SELECT 1") {
                if e.contains(REFUSAL) {
                    refused_at = Some(cut.elapsed());
                    refusal = e;
                }
            }
        }
        if taken_at.is_none() && pp.lease().is_some_and(|l| l.0 == "node2") {
            taken_at = Some(cut.elapsed());
            // At the moment the standby holds the lease, node1 must already refuse.
            let now = node1.sql("SELECT 1");
            assert!(
                now.as_ref().is_err_and(|e| e.contains(REFUSAL)),
                "node2 took the lease while node1 still served: {now:?}"
            );
        }
        refused_at.is_some() && taken_at.is_some()
    });
    assert!(
        done,
        "refused at {refused_at:?}, lease taken at {taken_at:?}\n{}",
        node1.keeper_log().join("\n")
    );
    let (refused_at, taken_at) = (refused_at.unwrap(), taken_at.unwrap());
    eprintln!(
        "[h8-isolated] node1 refused sessions {} ms after the cut; node2 took the lease {} ms after it",
        refused_at.as_millis(),
        taken_at.as_millis()
    );
    assert!(refused_at < taken_at);
    assert!(refusal.contains("HINT"), "{refusal}");
    node1.expect_log(
        "isolated: this primary has reached neither",
        Duration::from_secs(1),
    );
    assert!(
        node1.title_is("master mode:isolated"),
        "{:?}",
        node1.title()
    );
    // The open session was ended.
    let ended = wait_until(Duration::from_secs(5), || {
        open_session.try_wait().ok().flatten().is_some()
    });
    assert!(ended, "the session open before the cut still runs on node1");
    node1.expect_log(
        "session(s): this primary is isolated",
        Duration::from_secs(1),
    );
    assert!(
        wait_until(Duration::from_secs(20), || node2.in_recovery()
            == Some(false)),
        "node2 did not promote"
    );

    // Healed: node1 finds the lease taken and fences itself.
    pp.isolate(node1, Mode::Pass);
    node1.expect_log("superseded", Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(30), || node1.postmaster_pid().is_none()),
        "the superseded primary did not shut down"
    );
    node2.sql("INSERT INTO t VALUES (1)").unwrap();
}

/// Hole 8, the way back: the pair is cut apart and the witness is down, so the standby cannot
/// take over either. The primary stops serving (it cannot know that), and once the link
/// between the nodes heals it serves again by itself, synchronous as before, with the witness
/// still down.
#[test]
fn hole_8_an_isolated_primary_that_nobody_replaced_serves_again() {
    let pp = ProxiedPair::connected_with_witness("h8-back", Options::default());
    let (node1, node2) = (&pp.pair.node1, &pp.pair.node2);
    node1.sql("CREATE TABLE t (id int)").unwrap();
    pp.witness.as_ref().unwrap().stop();
    pp.link(Mode::Blackhole);
    let cut = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || node1
            .sql("SELECT 1")
            .is_err_and(|e| e.contains(REFUSAL))),
        "node1 did not stop serving:\n{}",
        node1.keeper_log().join("\n")
    );
    let stopped = cut.elapsed();
    sleep(Duration::from_secs(3));
    assert_eq!(
        node2.in_recovery(),
        Some(true),
        "node2 promoted without the lease"
    );

    pp.link(Mode::Pass);
    let healed = Instant::now();
    node1.expect_log("serving again: standby node2", Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(20), || node1.sql("SELECT 1").is_ok()),
        "node1 still refuses sessions"
    );
    let back = healed.elapsed();
    // Synchronous again: a commit on node1 is acknowledged, and node2 has it.
    pp.pair.wait_synchronous();
    node1.sql("INSERT INTO t VALUES (8)").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || node2
            .sql("SELECT count(*) FROM t WHERE id = 8")
            .is_ok_and(|n| n == "1")),
        "node2 lacks the commit"
    );
    eprintln!(
        "[h8-back] node1 stopped serving {} ms after the cut and served again {} ms after the heal",
        stopped.as_millis(),
        back.as_millis()
    );
}
