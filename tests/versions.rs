//! What differs between PostgreSQL majors (README "Supported PostgreSQL versions"). Run on the
//! major it concerns, with `PG_KEEPER_PG_BIN` pointing at it (bin/test does).

mod common;

use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    expect_promoted, start_and_expect_rejoined, time_until, wait_until, Node, Options, Pair,
    Sessions,
};

/// The major of the server `node` runs.
fn major(node: &Node) -> u32 {
    node.sql("SELECT current_setting('server_version_num')::int / 10000")
        .unwrap()
        .parse()
        .unwrap()
}

fn require_major(node: &Node, at_least: u32, what: &str) -> u32 {
    let m = major(node);
    assert!(
        m >= at_least,
        "{what} exists from PostgreSQL {at_least}: run this test with PG_KEEPER_PG_BIN of {at_least} or later (this is {m})"
    );
    m
}

/// Waits until `sql` on `node` gives `want`; panics with what it gave.
fn expect_sql(node: &Node, sql: &str, want: &str, timeout: Duration) {
    let ok = wait_until(timeout, || node.sql(sql).is_ok_and(|v| v == want));
    assert!(
        ok,
        "{}: {sql} gave {:?}, expected {want:?}",
        node.name,
        node.sql(sql)
    );
}

/// Column names and their types, as `format_type` writes them.
type Columns<'a> = &'a [(&'a str, &'a str)];

/// The columns, functions and values of PostgreSQL's views that the keeper's heartbeat query
/// reads on the peer (src/heartbeat.rs), and that the keeper's own readings of shared memory
/// stand for (src/server_views.rs: what it reads must agree with the views, here on this
/// major's structures): a major that renames or changes one fails here, loudly, rather than in
/// a failover. Run on every major.
#[test]
fn the_replication_views_have_the_columns_and_states_the_keeper_reads() {
    let pair = Pair::connected("views", Options::default());
    pair.create_extension();
    let (primary, standby) = (&pair.node1, &pair.node2);
    let m = major(primary);
    // Columns and their types.
    let columns: &[(&Node, &str, Columns)] = &[
        (
            primary,
            "pg_stat_replication",
            &[
                ("pid", "integer"),
                ("application_name", "text"),
                ("state", "text"),
                ("sync_state", "text"),
                ("flush_lsn", "pg_lsn"),
                ("reply_time", "timestamp with time zone"),
            ],
        ),
        (
            standby,
            "pg_stat_wal_receiver",
            &[
                ("status", "text"),
                ("last_msg_receipt_time", "timestamp with time zone"),
            ],
        ),
        (
            primary,
            "pg_stat_activity",
            &[
                ("pid", "integer"),
                ("datname", "name"),
                ("usename", "name"),
                ("application_name", "text"),
                ("backend_type", "text"),
                ("wait_event", "text"),
                ("query", "text"),
            ],
        ),
        (
            primary,
            "pg_settings",
            &[("name", "text"), ("setting", "text")],
        ),
        (primary, "pg_roles", &[("oid", "oid"), ("rolname", "name")]),
    ];
    for (node, view, want) in columns {
        for (column, ty) in *want {
            let got = node
                .sql(&format!(
                    "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
                     WHERE attrelid = 'pg_catalog.{view}'::regclass AND attname = '{column}' \
                       AND NOT attisdropped"
                ))
                .unwrap();
            assert_eq!(
                got, *ty,
                "PostgreSQL {m}: {view}.{column} is {got:?}, the keeper reads it as {ty}"
            );
        }
    }
    // The functions, called the way the keeper calls them (planned, not run).
    for (node, call) in [
        (primary, "pg_catalog.pg_is_in_recovery()"),
        (
            primary,
            "(extract(epoch FROM pg_catalog.pg_postmaster_start_time()) * 1000000)::int8",
        ),
        (
            primary,
            "('x' || substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8))::bit(32)::int8",
        ),
        (
            primary,
            "(pg_catalog.current_setting('superuser_reserved_connections')::int4, \
              pg_catalog.current_setting('reserved_connections', true)::int4, \
              pg_catalog.current_setting('is_superuser')::bool, \
              (SELECT pg_catalog.pg_has_role(oid, 'USAGE') FROM pg_catalog.pg_roles LIMIT 1))",
        ),
    ] {
        if let Err(e) = node.sql(&format!("EXPLAIN SELECT {call}")) {
            panic!("PostgreSQL {m}: the keeper's call {call} does not plan on {}: {e}", node.name);
        }
    }
    // The states: a synchronous standby streams, listed 'sync'...
    let row = "SELECT state || ' ' || sync_state FROM pg_stat_replication WHERE application_name = 'node2'";
    expect_sql(primary, row, "streaming sync", Duration::from_secs(10));
    // ... its WAL receiver streams; the keeper is a backend of type 'pg_keeper' that says whom
    // it trusts; the WAL sender of a physical standby has no database; the standby keeper's
    // heartbeat is a client.
    for (node, sql, want) in [
        (
            standby,
            "SELECT status || ' ' || (last_msg_receipt_time IS NOT NULL) FROM pg_stat_wal_receiver",
            "streaming true",
        ),
        (
            primary,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_keeper' \
             AND query = 'pg_keeper: trusts as synchronous standby: node2'",
            "1",
        ),
        (
            primary,
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'walsender' \
             AND datname IS NULL",
            "t",
        ),
        (
            primary,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND application_name = 'pg_keeper'",
            "1",
        ),
    ] {
        expect_sql(node, sql, want, Duration::from_secs(10));
    }
    // A quorum makes it 'quorum'; a standby not named is 'async', and a commit then waits with
    // wait_event 'SyncRep'. The keeper is paused meanwhile: it would switch to async.
    primary.sql("CREATE TABLE views_t (i int)").unwrap();
    primary.sql("SELECT pg_keeper_pause('2 minutes')").unwrap();
    let names = |v: &str| {
        primary
            .sql(&format!(
                "ALTER SYSTEM SET synchronous_standby_names = '{v}'"
            ))
            .unwrap();
        primary.reload();
    };
    names("ANY 1 (node1, node2)");
    expect_sql(primary, row, "streaming quorum", Duration::from_secs(10));
    names("nosuch");
    expect_sql(primary, row, "streaming async", Duration::from_secs(10));
    // The keeper's own reading of the walsenders (application name and sync_state) agrees.
    primary.expect_log(
        "standby 'node2' (async) is streaming but is not synchronous; synchronous_standby_names is 'nosuch'",
        Duration::from_secs(10),
    );
    let _commit = Sessions(vec![
        primary.sql_background("INSERT INTO views_t VALUES (1)")
    ]);
    expect_sql(
        primary,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
         AND wait_event = 'SyncRep'",
        "1",
        Duration::from_secs(10),
    );
    primary
        .sql("ALTER SYSTEM RESET synchronous_standby_names")
        .unwrap();
    primary.reload();
    expect_sql(
        primary,
        "SELECT count(*) FROM views_t",
        "1",
        Duration::from_secs(10),
    );
    expect_sql(primary, row, "streaming sync", Duration::from_secs(10));
    primary.sql("SELECT pg_keeper_resume()").unwrap();
    eprintln!("[views] PostgreSQL {m}: every column, call and state the keeper reads is there");
}

/// PostgreSQL 16's `reserved_connections`: a heartbeat user that is not a superuser but a member
/// of `pg_monitor` and `pg_use_reserved_connections` gets back in when the primary's ordinary
/// slots are all taken (its heartbeat session ended to force a reconnect), so the standby keeps
/// seeing it; without the grant the keeper warns once, with the GRANT to run. Run on 16 and
/// later.
#[test]
fn a_heartbeat_user_with_a_reserved_slot_still_sees_a_full_primary() {
    let mut pair = Pair::connected(
        "reserved",
        Options {
            extra: "max_connections = 10\nsuperuser_reserved_connections = 1\nreserved_connections = 2\n".into(),
            ..Options::default()
        },
    );
    require_major(&pair.node1, 16, "reserved_connections");
    pair.create_extension();
    pair.node1
        .sql("CREATE ROLE keeper LOGIN IN ROLE pg_monitor; CREATE ROLE filler LOGIN")
        .unwrap();
    // Both keepers heartbeat as the new user.
    let conninfo = |n: &Node| n.conninfo().replace("user=postgres", "user=keeper");
    let lines = format!(
        "pg_keeper.node1_conninfo = '{}'\npg_keeper.node2_conninfo = '{}'\n",
        conninfo(&pair.node1),
        conninfo(&pair.node2)
    );
    for node in [&pair.node1, &pair.node2] {
        node.append_conf(&lines);
        node.reload();
    }
    for node in [&pair.node1, &pair.node2] {
        node.expect_log(
            "WARNING:  pg_keeper: the heartbeat's user \"keeper\" cannot use a reserved connection slot on",
            Duration::from_secs(20),
        );
        node.expect_log(
            "HINT:  Run on the primary (the grant replicates): GRANT pg_use_reserved_connections TO keeper;",
            Duration::from_secs(5),
        );
    }
    pair.node2
        .expect_title("standby mode:connected", Duration::from_secs(20));
    pair.node1
        .sql("GRANT pg_use_reserved_connections TO keeper")
        .unwrap();

    // The primary fills up while the standby's keeper has lost its heartbeat session: held
    // still, its session ended, every ordinary slot taken.
    pair.node2.freeze_keeper();
    let ended = pair
        .node1
        .sql(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE usename = 'keeper' AND backend_type = 'client backend'",
        )
        .unwrap();
    assert_eq!(ended, "1", "the standby keeper's heartbeat session");
    let mut sessions = Sessions(Vec::new());
    let reserved_for = "remaining connection slots are reserved";
    let full = wait_until(Duration::from_secs(60), || {
        match pair.node1.sql_as("filler", "SELECT 1") {
            Err(e) if e.contains(reserved_for) => true,
            _ => {
                sessions.0.push(
                    pair.node1
                        .sql_background_as("filler", "SELECT pg_sleep(120)"),
                );
                sleep(Duration::from_millis(300));
                false
            }
        }
    });
    assert!(full, "could not take the primary's ordinary slots");
    let thawed = Instant::now();
    pair.node2.thaw();
    // It is back in, through a reserved slot, and its status says the primary answered.
    expect_sql(
        &pair.node1,
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'keeper' AND backend_type = 'client backend'",
        "1",
        Duration::from_secs(10),
    );
    let answered = format!(
        "SELECT last_heartbeat_ok > now() - interval '{} ms' AND problem IS NULL FROM pg_keeper_status",
        thawed.elapsed().as_millis()
    );
    expect_sql(&pair.node2, &answered, "t", Duration::from_secs(10));
    pair.node2
        .expect_title("standby mode:connected", Duration::from_secs(5));
    let still_full = pair.node1.sql_as("filler", "SELECT 1").unwrap_err();
    assert!(still_full.contains(reserved_for), "{still_full}");
    let log = pair.node2.keeper_log().join("\n");
    assert!(!log.contains("refused the heartbeat"), "{log}");
    assert_eq!(
        log.matches("cannot use a reserved connection slot").count(),
        1,
        "warned once, not again once granted: {log}"
    );
    drop(sessions);
}

/// PostgreSQL 17's `allow_alter_system = off` would make the switch to async (ALTER SYSTEM)
/// fail at failover time: the keeper refuses to protect the server at once, says what to set,
/// and protects it as soon as the setting is back on (a reload); turned off by a reload while
/// it protects, it is noticed at once, not at the next tick.
#[test]
fn with_allow_alter_system_off_the_keeper_refuses_to_start_and_says_what_to_set() {
    let pair = Pair::start(
        "alter-system-off",
        Options {
            keepalive_time: "5s",
            keepalive_count: 1,
            extra: "allow_alter_system = off\n".into(),
            ..Options::default()
        },
    );
    require_major(&pair.node1, 17, "allow_alter_system");
    let warning =
        "WARNING:  pg_keeper: cannot tell which node this server is: allow_alter_system is off";
    let hint = "HINT:  Set allow_alter_system = on";
    for node in [&pair.node1, &pair.node2] {
        node.expect_title("configuration error", Duration::from_secs(20));
        node.expect_log(warning, Duration::from_secs(5));
        node.expect_log(hint, Duration::from_secs(5));
    }
    let allow = |on: bool| {
        for node in [&pair.node1, &pair.node2] {
            node.append_conf(&format!(
                "allow_alter_system = {}\n",
                if on { "on" } else { "off" }
            ));
            node.reload();
        }
    };
    let protecting = || {
        pair.node1
            .expect_title("master mode:connected", Duration::from_secs(30));
        pair.node2
            .expect_title("standby mode:connected", Duration::from_secs(30));
    };
    allow(true);
    protecting();

    // Turned off by a reload while protecting: noticed at once (a tick is 5 s here).
    allow(false);
    for node in [&pair.node1, &pair.node2] {
        let took = time_until(Duration::from_secs(10), || {
            node.title_is("configuration error")
        })
        .unwrap_or_else(|| panic!("{}: title {:?}", node.name, node.title()));
        assert!(
            took < Duration::from_secs(3),
            "{}: took {took:?} to see allow_alter_system off",
            node.name
        );
        eprintln!(
            "[alter-system-off] {}: allow_alter_system = off seen {} ms after the reload",
            node.name,
            took.as_millis()
        );
        assert!(
            wait_until(Duration::from_secs(5), || node
                .log_text()
                .matches(warning)
                .count()
                == 2
                && node.log_text().matches(hint).count() == 2),
            "{}: the WARNING and HINT again:\n{}",
            node.name,
            node.keeper_log().join("\n")
        );
    }
    allow(true);
    protecting();
    // And the switch to async works: the standby is killed, the primary degrades.
    pair.node2.kill9();
    pair.node1.expect_switch_to_async(Duration::from_secs(15));
}

/// A logical consumer of a failover slot, counting the rows of `t` it has received.
struct Consumer {
    seen: Vec<i32>,
}

impl Consumer {
    /// Receives every change of slot `sub` that `node` has not handed out yet.
    fn consume(&mut self, node: &Node) {
        let out = node
            .sql(
                "SELECT data FROM pg_logical_slot_get_changes('sub', NULL, NULL) \
                 WHERE data LIKE 'table public.t: INSERT: %'",
            )
            .unwrap_or_else(|e| panic!("{}: consuming slot sub: {e}", node.name));
        for line in out.lines() {
            let i = line.rsplit(':').next().unwrap().trim().parse().unwrap();
            self.seen.push(i);
        }
    }

    /// Moves the slot on `primary` on (a snapshot record to decode past, then consuming), so
    /// that its copy on a standby becomes ready for failover.
    fn advance(&mut self, primary: &Node) {
        primary.sql("SELECT pg_log_standby_snapshot()").unwrap();
        self.consume(primary);
    }

    /// Waits until `standby` has slot `sub` synchronized from `primary` (`synced`, not temporary:
    /// it would be dropped at a promotion) as far as the primary's consumer has confirmed.
    fn wait_synced(&mut self, primary: &Node, standby: &Node) {
        let mut advanced: Option<Instant> = None;
        let ok = wait_until(Duration::from_secs(120), || {
            let target = primary
                .sql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'sub'")
                .unwrap();
            let ready = standby.sql(&format!(
                "SELECT synced AND NOT temporary AND confirmed_flush_lsn >= '{target}' \
                 FROM pg_replication_slots WHERE slot_name = 'sub'"
            ));
            if ready.is_ok_and(|r| r == "t") {
                return true;
            }
            // The slot sync worker sleeps longer while nothing moves (up to 30 s).
            if advanced.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
                self.advance(primary);
                advanced = Some(Instant::now());
            }
            false
        });
        assert!(
            ok,
            "{} did not synchronize slot sub from {}: {:?}\n{}",
            standby.name,
            primary.name,
            standby.sql("SELECT * FROM pg_replication_slots"),
            standby.log_text()
        );
    }
}

/// Waits until `node` has `synchronized_standby_slots` = `want`.
fn expect_standby_slots(node: &Node, want: &str) {
    expect_sql(
        node,
        "SELECT current_setting('synchronized_standby_slots')",
        want,
        Duration::from_secs(10),
    );
}

fn insert(node: &Node, rows: std::ops::RangeInclusive<i32>) {
    for i in rows {
        node.sql(&format!("INSERT INTO t VALUES ({i})")).unwrap();
    }
}

/// What the keeper leaves in force on `primary`: synchronous replication and the slot its
/// standby streams through, for commits and for logical walsenders.
fn expect_sync_restored(primary: &Node, standby: &str) {
    expect_sql(
        primary,
        "SELECT current_setting('synchronous_standby_names') || ' / ' || current_setting('synchronized_standby_slots')",
        &format!("node1, node2 / {standby}"),
        Duration::from_secs(60),
    );
}

/// PostgreSQL 17's failover slots (README "Failover slots"): a logical consumer goes on from the
/// synchronized slot on the new primary without losing a change, after a `kill -9` and a
/// promotion by the keeper, and again after a failover back; the old primary, rejoined by
/// bin/rejoin and then by auto_rejoin, synchronizes the slot again as a standby; then the same
/// across bin/switchover. Run on 17 and later.
#[test]
fn failover_slots_keep_a_logical_consumer_going_across_failovers_and_rejoins() {
    let pair = Pair::connected(
        "failover-slots",
        Options {
            failover_slots: true,
            extra: "pg_keeper.auto_rejoin = on\n".into(),
            ..Options::default()
        },
    );
    require_major(&pair.node1, 17, "sync_replication_slots");
    let (node1, node2) = (&pair.node1, &pair.node2);
    // For bin/switchover's pause of the keepers.
    pair.create_extension();
    node1.sql("CREATE TABLE t (i int)").unwrap();
    node1
        .sql(
            "SELECT pg_create_logical_replication_slot('sub', 'test_decoding', false, false, true)",
        )
        .unwrap();
    let mut consumer = Consumer { seen: Vec::new() };
    // The keeper's WAL pulse names no database, so a logical consumer of one never sees it
    // (README), while it still writes WAL every tick.
    let lsn = |n: &Node| n.sql("SELECT pg_current_wal_lsn()::text").unwrap();
    let before = lsn(node1);
    assert!(
        wait_until(Duration::from_secs(10), || lsn(node1) != before),
        "the idle primary wrote no WAL pulse"
    );
    assert_eq!(
        node1
            .sql("SELECT count(*) FROM pg_logical_slot_peek_changes('sub', NULL, NULL) WHERE data LIKE '%pg_keeper%'")
            .unwrap(),
        "0",
        "a logical consumer sees the keeper's pulse"
    );
    insert(node1, 1..=3);
    consumer.consume(node1);
    consumer.wait_synced(node1, node2);
    // Committed, not yet consumed, when the primary dies.
    insert(node1, 4..=6);
    let began = Instant::now();
    node1.kill9();
    expect_promoted(node2);
    // The keeper cleared synchronized_standby_slots: the dead node1 is waited for no more.
    expect_standby_slots(node2, "");
    consumer.consume(node2);
    assert_eq!(
        consumer.seen,
        (1..=6).collect::<Vec<_>>(),
        "after the failover"
    );
    eprintln!(
        "[failover-slots] the consumer had every change from node2 {} ms after the kill",
        began.elapsed().as_millis()
    );

    // bin/rejoin: node1 streams through its slot, which the new primary did not have.
    let said = common::rejoin(node1, node2);
    assert!(
        said.contains("created the physical replication slot 'node1' on the new primary"),
        "{said}"
    );
    expect_sync_restored(node2, "node1");
    // node1 keeps naming its own peer's slot, not the one node2's configuration names.
    expect_standby_slots(node1, "node2");
    // Logical walsenders wait for node1 again, which confirms: the consumer goes on.
    insert(node2, 7..=7);
    consumer.consume(node2);
    consumer.wait_synced(node2, node1);
    insert(node2, 8..=9);

    // A failover back (once node1 counts itself synchronous: it promotes only then), and
    // auto_rejoin.
    pair.wait_synchronous();
    node2.kill9();
    expect_promoted(node1);
    consumer.consume(node1);
    assert_eq!(
        consumer.seen,
        (1..=9).collect::<Vec<_>>(),
        "after the failover back"
    );
    start_and_expect_rejoined(node2, node1, true);
    expect_sync_restored(node1, "node2");
    insert(node1, 10..=10);
    consumer.consume(node1);
    consumer.wait_synced(node1, node2);
    assert_eq!(
        consumer.seen,
        (1..=10).collect::<Vec<_>>(),
        "after auto_rejoin"
    );

    // bin/switchover back to node2 (committed, not yet consumed, before it): the consumer goes
    // on from node2's synchronized slot, and node1, rejoined by the script, synchronizes it.
    insert(node1, 11..=11);
    let (ok, said) = pair.switchover();
    assert!(ok, "bin/switchover failed:\n{said}");
    assert_eq!(node2.in_recovery(), Some(false), "{said}");
    assert_eq!(node1.in_recovery(), Some(true), "{said}");
    expect_sync_restored(node2, "node1");
    expect_standby_slots(node1, "node2");
    consumer.consume(node2);
    insert(node2, 12..=12);
    consumer.consume(node2);
    consumer.wait_synced(node2, node1);
    assert_eq!(consumer.seen, (1..=12).collect::<Vec<_>>(), "at the end");
    eprintln!(
        "[failover-slots] PostgreSQL {}: two failovers, two rejoins, a switchover, {} changes, none lost, in {} s",
        major(node1),
        consumer.seen.len(),
        began.elapsed().as_secs()
    );
}
