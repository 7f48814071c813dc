//! Operating a pair: the status view and the event history on both nodes, monitoring roles,
//! and the maintenance pause. Real servers, as in tests/failover.rs.

mod common;

use std::thread::sleep;
use std::time::Duration;

use common::{time_until, wait_until, Options, Pair};

const BUDGET: Duration = Duration::from_secs(3);
const MARGIN: Duration = Duration::from_secs(12);

const STATUS: &str = "SELECT concat_ws('|', node_name, role, state, peer_name, peer_port, \
     failed_heartbeats, keepalive_count, synchronous, timeline, paused) FROM pg_keeper_status";

fn events(node: &common::Node) -> Vec<String> {
    node.sql("SELECT event FROM pg_keeper_events()")
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn installed(label: &str, opts: Options) -> Pair {
    let pair = Pair::connected(label, opts);
    pair.create_extension();
    pair
}

#[test]
fn status_and_history_answer_on_both_nodes_from_the_same_state_as_the_title() {
    let pair = installed("status", Options::default());
    let (p1, p2) = (pair.node1.port, pair.node2.port);
    assert_eq!(
        pair.node1.sql(STATUS).unwrap(),
        format!("node1|primary|master mode:connected|node2|{p2}|0|3|t|1|f")
    );
    assert_eq!(
        pair.node2.sql(STATUS).unwrap(),
        format!("node2|standby|standby mode:connected|node1|{p1}|0|3|t|1|f")
    );
    for node in [&pair.node1, &pair.node2] {
        let state = node.sql("SELECT state FROM pg_keeper_status").unwrap();
        assert!(
            node.title_is(&state),
            "status {state:?} but title {:?}",
            node.title()
        );
        let pid = node.sql("SELECT worker_pid FROM pg_keeper_status").unwrap();
        assert_eq!(Some(pid.parse::<i32>().unwrap()), node.keeper_pid());
        assert_eq!(
            node.sql("SELECT witness FROM pg_keeper_status").unwrap(),
            "not configured"
        );
    }
    let e1 = events(&pair.node1);
    assert!(
        e1.starts_with(&["started".into(), "identified".into()]),
        "{e1:?}"
    );
    assert!(e1.contains(&"standby_connected".into()), "{e1:?}");
    assert!(events(&pair.node2).contains(&"primary_seen".into()));
    // The status's last event is the newest entry of the history.
    for node in [&pair.node1, &pair.node2] {
        let last = node.sql("SELECT last_event FROM pg_keeper_status").unwrap();
        assert_eq!(Some(&last), events(node).last());
    }

    // Monitoring roles read it; others do not.
    pair.node1
        .sql("CREATE ROLE watcher LOGIN IN ROLE pg_monitor; CREATE ROLE nobody LOGIN")
        .unwrap();
    let as_role = |role: &str, sql: &str| pair.node2.sql(&format!("SET ROLE {role}; {sql}"));
    assert!(as_role("watcher", "SELECT state FROM pg_keeper_status").is_ok());
    assert!(as_role("watcher", "SELECT count(*) FROM pg_keeper_events()").is_ok());
    let denied = as_role("nobody", "SELECT state FROM pg_keeper_status").unwrap_err();
    assert!(denied.contains("permission denied"), "{denied}");
    let denied = as_role("watcher", "SELECT pg_keeper_pause()").unwrap_err();
    assert!(denied.contains("permission denied"), "{denied}");

    // After a failover the history tells the story, and the status the outcome.
    pair.node1.kill9();
    time_until(BUDGET + MARGIN, || pair.node2.in_recovery() == Some(false)).expect("no promotion");
    pair.node2
        .expect_title("master mode:async", Duration::from_secs(5));
    assert!(wait_until(Duration::from_secs(10), || events(&pair.node2)
        .iter()
        .filter(|e| *e == "after_command")
        .count()
        == 2));
    let e2 = events(&pair.node2);
    let story: Vec<&str> = [
        "heartbeat_failed",
        "primary_lost",
        "degraded_to_async",
        "promote_requested",
        "promoted",
        "after_command",
    ]
    .into_iter()
    .filter(|e| e2.iter().any(|x| x == e))
    .collect();
    assert_eq!(story.len(), 6, "{e2:?}");
    let row = pair
        .node2
        .sql(
            "SELECT concat_ws('|', role, state, synchronous, timeline, last_failure IS NOT NULL, \
              last_failure_reason LIKE '%refused%') FROM pg_keeper_status",
        )
        .unwrap();
    assert_eq!(row, "primary|master mode:async|f|2|t|t");
    let detail = pair
        .node2
        .sql("SELECT detail FROM pg_keeper_events() WHERE event = 'promoted'")
        .unwrap();
    assert!(
        detail.contains("node2") && detail.contains("is now the master"),
        "{detail}"
    );
}

#[test]
fn a_paused_standby_does_not_promote_and_promotes_again_once_resumed() {
    let pair = installed("pause", Options::default());
    assert_eq!(pair.node2.sql("SELECT pg_keeper_pause()").unwrap(), "t");
    pair.node2
        .expect_title("standby mode:connected, paused", Duration::from_secs(5));
    assert_eq!(
        pair.node2
            .sql("SELECT paused FROM pg_keeper_status")
            .unwrap(),
        "t"
    );

    // Paused, the standby still heartbeats: let two more answers say it is trusted as
    // synchronous (the arming delay), or it would hold the promotion for that reason instead.
    sleep(Duration::from_millis(2500));
    // The primary down for longer than the budget (killed: a clean stop would get the restart
    // grace first).
    pair.node1.kill9();
    sleep(BUDGET * 2 + Duration::from_secs(1));
    assert_eq!(
        pair.node2.in_recovery(),
        Some(true),
        "a paused standby promoted"
    );
    pair.node2.expect_log(
        "paused, so not acting on: primary node1",
        Duration::from_secs(1),
    );
    assert!(events(&pair.node2).contains(&"action_held".into()));
    pair.node1.start();
    pair.node1
        .expect_title("master mode:connected", Duration::from_secs(20));

    assert_eq!(pair.node2.sql("SELECT pg_keeper_resume()").unwrap(), "t");
    pair.node2
        .expect_title("standby mode:connected", Duration::from_secs(5));
    let e = events(&pair.node2);
    assert!(
        e.contains(&"paused".into()) && e.contains(&"resumed".into()),
        "{e:?}"
    );
    pair.wait_synchronous();
    pair.node1.kill9();
    time_until(BUDGET + MARGIN, || pair.node2.in_recovery() == Some(false))
        .expect("no promotion after resume");
}

#[test]
fn a_pause_with_an_interval_ends_by_itself() {
    let pair = installed("pause-interval", Options::default());
    pair.node1
        .sql("SELECT pg_keeper_pause('2 seconds')")
        .unwrap();
    pair.node1
        .expect_title("master mode:connected, paused", Duration::from_secs(5));
    let until = pair
        .node1
        .sql("SELECT paused_until > now() FROM pg_keeper_status")
        .unwrap();
    assert_eq!(until, "t");
    pair.node1
        .expect_title("master mode:connected", Duration::from_secs(10));
    assert_eq!(
        pair.node1
            .sql("SELECT paused FROM pg_keeper_status")
            .unwrap(),
        "f"
    );
    let bad = pair
        .node1
        .sql("SELECT pg_keeper_pause('-5 seconds')")
        .unwrap_err();
    assert!(bad.contains("duration must be positive"), "{bad}");
}

fn count(node: &common::Node) -> String {
    node.sql("SELECT count(*) FROM t").unwrap()
}

#[test]
fn the_old_primary_rejoins_and_the_pair_fails_over_back_with_all_data() {
    let pair = installed("rejoin", Options::default());
    pair.node1
        .sql("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100)")
        .unwrap();

    pair.node1.kill9();
    time_until(BUDGET + MARGIN, || pair.node2.in_recovery() == Some(false)).expect("no failover");
    pair.node2
        .sql("INSERT INTO t SELECT generate_series(101, 200)")
        .unwrap();

    // A running server (here the current primary) is never touched.
    let refused = common::script("rejoin")
        .arg("--datadir")
        .arg(&pair.node2.dir)
        .args(["--primary", &pair.node1.conninfo(), "--name", "node2"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is running"),
        "{refused:?}"
    );

    let said = common::rejoin(&pair.node1, &pair.node2);
    assert!(said.contains("node1 is streaming"), "{said}");
    pair.node1
        .expect_title("standby mode:connected", Duration::from_secs(20));
    pair.node2
        .expect_title("master mode:connected", Duration::from_secs(20));
    // Fully protected again: synchronous replication is back.
    assert!(wait_until(Duration::from_secs(30), || pair
        .node2
        .sql("SHOW synchronous_standby_names")
        .is_ok_and(|v| v == "node1, node2")));
    assert_eq!(count(&pair.node1), "200");

    // And the other way.
    pair.node2
        .sql("INSERT INTO t SELECT generate_series(201, 300)")
        .unwrap();
    pair.wait_synchronous();
    pair.node2.kill9();
    time_until(BUDGET + MARGIN, || pair.node1.in_recovery() == Some(false))
        .expect("no failover back");
    assert_eq!(count(&pair.node1), "300");
    common::rejoin(&pair.node2, &pair.node1);
    pair.node2
        .expect_title("standby mode:connected", Duration::from_secs(20));
    pair.node1
        .expect_title("master mode:connected", Duration::from_secs(20));
    pair.node1.sql("INSERT INTO t VALUES (301)").unwrap();
    assert!(wait_until(Duration::from_secs(10), || count(&pair.node2) == "301"));
}

#[test]
fn a_switchover_loses_no_committed_row_and_reports_the_outage() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    let pair = installed("switchover", Options::default());
    pair.node1
        .sql("CREATE TABLE t (id int PRIMARY KEY)")
        .unwrap();
    let target = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} dbname=postgres user=postgres \
         target_session_attrs=read-write connect_timeout=2",
        pair.node1.port, pair.node2.port
    );
    // A writer through the multi-host conninfo, recording every acknowledged id.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<(i32, Instant)>::new()));
    let writer = {
        let (stop, acked, target) = (stop.clone(), acked.clone(), target.clone());
        std::thread::spawn(move || {
            let mut id = 0;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                let ok = std::process::Command::new("timeout")
                    .args([
                        "60",
                        &format!("{}/psql", common::BIN),
                        "-X",
                        "-q",
                        "-d",
                        &target,
                    ])
                    .args(["-c", &format!("INSERT INTO t VALUES ({id})")])
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    acked.lock().unwrap().push((id, Instant::now()));
                }
                sleep(Duration::from_millis(10));
            }
        })
    };
    sleep(Duration::from_secs(2));
    let (ok, said) = pair.switchover();
    assert!(ok, "switchover failed:\n{said}");
    sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();

    assert_eq!(pair.node2.in_recovery(), Some(false));
    assert_eq!(pair.node1.in_recovery(), Some(true));
    assert_eq!(
        pair.node2.sql("SHOW synchronous_standby_names").unwrap(),
        "node1, node2"
    );
    pair.node1
        .expect_title("standby mode:connected", Duration::from_secs(20));
    pair.node2
        .expect_title("master mode:connected", Duration::from_secs(20));
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "the writer hardly wrote: {}", acked.len());
    let stored: std::collections::HashSet<i32> = pair
        .node2
        .sql("SELECT id FROM t")
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let lost: Vec<i32> = acked
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !stored.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged commits lost: {lost:?}");
    let outage = acked.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap();
    eprintln!(
        "switchover: {} commits, none lost, longest write pause {outage:?}\n{said}",
        acked.len()
    );
    assert!(outage < Duration::from_secs(60));
    assert!(said.contains("commits waited"), "{said}");
}

/// Without PGBIN, bin/rejoin and bin/switchover run the programs of the data directory's major
/// (Debian's layout), and when those are missing they say so and what to set, before doing
/// anything; a primary that cannot be reached is said so, never with its password. Once they ran PostgreSQL 15's programs on any data directory: pg_rewind 15 on a
/// PostgreSQL 17 node failed with "clusters are not compatible".
#[test]
fn the_scripts_run_the_data_directorys_major_and_never_print_a_password() {
    let dir = std::env::temp_dir().join(format!("pg_keeper_rs_pgbin_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("PG_VERSION"), "99\n").unwrap();
    let datadir = dir.to_str().unwrap();
    let run = |name: &str, args: &[&str]| {
        let out = common::script(name)
            .env_remove("PGBIN")
            .args(["--datadir", datadir])
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), common::output_text(&out))
    };
    let primary = [
        "--primary",
        "host=127.0.0.1 port=1 user=postgres password=secret",
    ];
    let (ok, said) = run("rejoin", &[&primary[..], &["--name", "node1"]].concat());
    assert!(!ok, "{said}");
    assert!(
        said.contains("no pg_ctl in /usr/lib/postgresql/99/bin: set PGBIN to the bin directory of PostgreSQL 99"),
        "{said}"
    );
    let standby = ["--standby", "host=127.0.0.1 port=2 user=postgres"];
    let (ok, said) = run(
        "switchover",
        &[&primary[..], &standby[..], &["--name", "node1"]].concat(),
    );
    assert!(!ok, "{said}");
    assert!(
        said.contains("no pg_ctl in /usr/lib/postgresql/99/bin: set PGBIN to the bin directory of PostgreSQL 99"),
        "{said}"
    );
    // A major whose programs are there (Debian's 15) is taken: the script goes on to the next
    // step, and says it cannot reach the primary, without its password.
    std::fs::write(dir.join("PG_VERSION"), "15\n").unwrap();
    let (ok, said) = run(
        "switchover",
        &[&primary[..], &standby[..], &["--name", "node1"]].concat(),
    );
    assert!(!ok, "{said}");
    assert!(!said.contains("set PGBIN"), "{said}");
    assert!(
        said.contains(
            "cannot connect to the primary (host=127.0.0.1 port=1 user=postgres password=...)"
        ),
        "{said}"
    );
    assert!(!said.contains("secret"), "{said}");
    let (ok, said) = run("rejoin", &[&primary[..], &["--name", "node1"]].concat());
    assert!(!ok, "{said}");
    assert!(
        said.contains(
            "cannot connect to the new primary (host=127.0.0.1 port=1 user=postgres password=...)"
        ),
        "{said}"
    );
    assert!(!said.contains("secret"), "{said}");
    std::fs::remove_dir_all(&dir).unwrap();
}
