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
    pair.node1.sql("CREATE EXTENSION pg_keeper_rs").unwrap();
    // Replicated to the standby (synchronously), where it is readable too.
    assert!(wait_until(Duration::from_secs(10), || pair
        .node2
        .sql("SELECT count(*) FROM pg_extension WHERE extname = 'pg_keeper_rs'")
        .is_ok_and(|n| n == "1")));
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

    // A slow restart of the primary, longer than the budget.
    pair.node1.stop("fast");
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
