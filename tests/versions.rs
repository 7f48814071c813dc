//! What differs between PostgreSQL majors (README "Supported PostgreSQL versions"). Run on the
//! major it concerns, with `PG_KEEPER_PG_BIN` pointing at it (bin/test does).

mod common;

use std::time::Duration;

use common::{Options, Pair};

/// PostgreSQL 17's `allow_alter_system = off` would make the switch to async (ALTER SYSTEM)
/// fail at failover time: the keeper refuses to protect the server at once, says what to set,
/// and protects it as soon as the setting is back on (a reload).
#[test]
fn with_allow_alter_system_off_the_keeper_refuses_to_start_and_says_what_to_set() {
    let pair = Pair::start(
        "alter-system-off",
        Options {
            extra: "allow_alter_system = off\n".into(),
            ..Options::default()
        },
    );
    let major: u32 = pair
        .node1
        .sql("SELECT current_setting('server_version_num')::int / 10000")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        major >= 17,
        "allow_alter_system exists from PostgreSQL 17: run this test with PG_KEEPER_PG_BIN of 17 or later (this is {major})"
    );
    for node in [&pair.node1, &pair.node2] {
        node.expect_title("configuration error", Duration::from_secs(20));
        node.expect_log(
            "WARNING:  pg_keeper: cannot tell which node this server is: allow_alter_system is off",
            Duration::from_secs(5),
        );
        node.expect_log("HINT:  Set allow_alter_system = on", Duration::from_secs(5));
    }
    for node in [&pair.node1, &pair.node2] {
        node.append_conf("allow_alter_system = on\n");
        node.reload();
    }
    pair.node1
        .expect_title("master mode:connected", Duration::from_secs(30));
    pair.node2
        .expect_title("standby mode:connected", Duration::from_secs(30));
    // And the switch to async works: the standby is killed, the primary degrades.
    pair.wait_synchronous();
    pair.node2.kill9();
    pair.node1.expect_switch_to_async(Duration::from_secs(15));
}
