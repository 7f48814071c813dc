//! Real-server tests of holes the simulation (keeper-sim/tests/holes.rs) also keeps: each failed
//! on the code before its fix. Real servers and proxies, as in tests/partitions.rs.

mod common;

use std::fs;
use std::thread::sleep;
use std::time::Duration;

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
