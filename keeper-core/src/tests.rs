//! Scenario tests of the decision core: no server, milliseconds each.

use super::*;

fn settings(count: u32) -> Settings {
    Settings {
        keepalive_count: count,
        keepalive_time_ms: 1000,
        promote_timeout_ms: 10_000,
        allow_data_loss_failover: false,
        restart_grace_ms: 0,
        auto_rejoin: false,
        me_name: "node1".into(),
        peer_name: "node2".into(),
    }
}

fn tick(now_ms: u64, in_recovery: bool, hb: Option<Heartbeat>) -> Input {
    Input::Tick(Observation {
        now_ms,
        tick_started_ms: now_ms,
        in_recovery,
        sync_configured: true,
        standby_streaming: true,
        heartbeat: hb,
        restore_wanted: false,
        standby_caught_up: false,
        standby_replies_recent: false,
        wal_receiver_recent: false,
        peer_says_synchronous: in_recovery.then_some(true),
        peer_newer_primary: false,
        peer_uses_witness: None,
        lease: Lease::NotConfigured,
        peer_announced_shutdown_ms: None,
        heartbeat_timed_out: false,
    })
}

fn no_answer() -> Option<Heartbeat> {
    Some(Heartbeat::NoAnswer("connection refused".into()))
}

fn master_connected(count: u32) -> (Keeper, Settings) {
    let s = settings(count);
    let mut k = Keeper::new();
    k.step(&Input::Identified { in_recovery: false }, &s);
    let d = k.step(&tick(0, false, None), &s);
    assert_eq!(d.to, MasterConnected);
    (k, s)
}

fn standby_connected(count: u32) -> (Keeper, Settings) {
    let s = settings(count);
    let mut k = Keeper::new();
    k.step(&Input::Identified { in_recovery: true }, &s);
    let d = k.step(&tick(0, true, Some(Heartbeat::Answered)), &s);
    assert_eq!(d.to, StandbyConnected);
    (k, s)
}

#[test]
fn starts_in_the_mode_the_recovery_state_says() {
    let s = settings(1);
    let mut k = Keeper::new();
    assert_eq!(k.mode(), Unidentified);
    assert_eq!(
        k.step(&Input::Identified { in_recovery: false }, &s).to,
        MasterWaiting
    );
    let mut k = Keeper::new();
    assert_eq!(
        k.step(&Input::Identified { in_recovery: true }, &s).to,
        StandbyWaiting
    );
}

#[test]
fn identity_problem_keeps_waiting_and_warns() {
    let s = settings(1);
    let mut k = Keeper::new();
    let d = k.step(
        &Input::IdentityProblem("neither conninfo reaches this server".into()),
        &s,
    );
    assert_eq!(d.to, Unidentified);
    assert_eq!(d.level, Level::Warning);
    assert!(d.sentence.contains("neither conninfo"));
    assert!(d.actions.is_empty());
    assert_eq!(k.title(), "configuration error");
    let again = k.step(
        &Input::IdentityProblem("neither conninfo reaches this server".into()),
        &s,
    );
    assert_eq!(again.level, Level::Debug, "the same problem is logged once");
    let other = k.step(
        &Input::IdentityProblem("node1_conninfo is not set".into()),
        &s,
    );
    assert_eq!(other.level, Level::Warning, "a new problem is logged");
    assert_eq!(
        k.step(&Input::Identified { in_recovery: true }, &s).to,
        StandbyWaiting
    );
    assert_eq!(k.title(), "standby mode");
}

#[test]
fn master_waits_for_a_streaming_standby_before_heartbeating() {
    let s = settings(1);
    let mut k = Keeper::new();
    k.step(&Input::Identified { in_recovery: false }, &s);
    let quiet = Input::Tick(Observation {
        sync_configured: true,
        ..Observation::default()
    });
    assert_eq!(k.step(&quiet, &s).to, MasterWaiting);
    // It heartbeats (to notice a newer primary) but counts no failures without a standby.
    assert!(MasterWaiting.heartbeats() && !MasterWaiting.counts_failures());
    let unanswered = Input::Tick(Observation {
        sync_configured: true,
        heartbeat: no_answer(),
        ..Observation::default()
    });
    let d = k.step(&unanswered, &s);
    assert_eq!((d.to, k.failures(), d.actions.len()), (MasterWaiting, 0, 0));
    let d = k.step(&tick(1, false, None), &s);
    assert_eq!(d.to, MasterConnected);
    assert!(d.sentence.contains("node2 connected"), "{}", d.sentence);
}

#[test]
fn master_switches_to_async_after_count_consecutive_failures_then_runs_after_command() {
    let (mut k, s) = master_connected(3);
    for n in 1..=2 {
        let d = k.step(&tick(n * 1000, false, no_answer()), &s);
        assert_eq!(d.to, MasterConnected);
        assert!(d.actions.is_empty());
        assert!(
            d.sentence.contains(&format!("({n} of 3)")),
            "{}",
            d.sentence
        );
    }
    let d = k.step(&tick(3000, false, no_answer()), &s);
    assert_eq!(d.to, MasterAsync);
    assert_eq!(
        d.actions,
        vec![
            ReleaseStandby,
            DegradeToAsync,
            RunAfterCommand(AfterEvent::Async)
        ]
    );
    assert!(d.sentence.contains("(3 of 3)"));
    assert_eq!(MasterAsync.title(), "master mode:async");
}

#[test]
fn an_answer_resets_the_count() {
    let (mut k, s) = master_connected(2);
    k.step(&tick(1, false, no_answer()), &s);
    assert_eq!(k.failures(), 1);
    k.step(&tick(2, false, Some(Heartbeat::Answered)), &s);
    assert_eq!(k.failures(), 0);
    let d = k.step(&tick(3, false, no_answer()), &s);
    assert_eq!(
        d.to, MasterConnected,
        "one failure after an answer is not two in a row"
    );
}

#[test]
fn a_peer_that_answers_but_refuses_is_alive() {
    let (mut k, s) = standby_connected(1);
    for n in 0..10 {
        let d = k.step(
            &tick(n, true, Some(Heartbeat::Refused("too many clients".into()))),
            &s,
        );
        assert_eq!(d.to, StandbyConnected);
        assert!(d.actions.is_empty());
    }
    assert_eq!(k.failures(), 0);
}

#[test]
fn losing_the_standby_with_async_replication_switches_nothing() {
    let (mut k, s) = master_connected(1);
    let input = Input::Tick(Observation {
        now_ms: 5,
        heartbeat: no_answer(),
        ..Observation::default()
    });
    let d = k.step(&input, &s);
    assert_eq!(d.event, Event::PeerLostAsync);
    assert_eq!(d.to, MasterAsync);
    assert!(
        d.actions.is_empty(),
        "nothing switched, so after_command does not run"
    );
}

#[test]
fn failed_degrade_is_retried_on_the_next_failed_heartbeat() {
    let (mut k, s) = master_connected(2);
    k.step(&tick(1, false, no_answer()), &s);
    let d = k.step(&tick(2, false, no_answer()), &s);
    assert_eq!(d.to, MasterAsync);
    let d = k.step(
        &Input::ActionFailed(DegradeToAsync, "could not write file".into()),
        &s,
    );
    assert_eq!(d.to, MasterConnected);
    assert_eq!(d.level, Level::Warning);
    let d = k.step(&tick(3, false, no_answer()), &s);
    assert_eq!(
        d.to, MasterAsync,
        "retries at once, without another full count"
    );
    assert!(d.actions.contains(&DegradeToAsync));
}

#[test]
fn standby_reconnecting_after_async_is_heartbeated_again() {
    let (mut k, s) = master_connected(1);
    k.step(&tick(1, false, no_answer()), &s);
    assert_eq!(k.mode(), MasterAsync);
    let d = k.step(&tick(2, false, None), &s);
    assert_eq!(d.to, MasterConnected);
    assert_eq!(k.failures(), 0);
}

#[test]
fn standby_promotes_after_count_failures_and_becomes_master_when_recovery_ends() {
    let (mut k, s) = standby_connected(2);
    assert_eq!(
        k.step(&tick(1000, true, no_answer()), &s).to,
        StandbyConnected
    );
    let d = k.step(&tick(2000, true, no_answer()), &s);
    assert_eq!(d.to, Promoting);
    assert_eq!(d.actions, vec![TakeLease, Promote, DegradeToAsync]);
    // Still in recovery a moment later: nothing new.
    let d = k.step(&tick(2100, true, None), &s);
    assert_eq!(d.to, Promoting);
    assert!(d.actions.is_empty());
    let d = k.step(&tick(2300, false, None), &s);
    assert_eq!(d.to, MasterAsync);
    // The switch to async once more (idempotent), then after_command.
    assert_eq!(
        d.actions,
        vec![DegradeToAsync, RunAfterCommand(AfterEvent::Promote)]
    );
    assert!(
        d.sentence
            .contains("node1 is now the master and node2 is regarded as the standby"),
        "{}",
        d.sentence
    );
}

#[test]
fn a_standby_that_never_saw_the_primary_does_not_promote() {
    let s = settings(1);
    let mut k = Keeper::new();
    k.step(&Input::Identified { in_recovery: true }, &s);
    let first = k.step(&tick(0, true, no_answer()), &s);
    assert_eq!(first.level, Level::Log);
    for n in 1..100 {
        let d = k.step(&tick(n * 1000, true, no_answer()), &s);
        assert_eq!(d.to, StandbyWaiting);
        assert!(d.actions.is_empty());
        assert_eq!(d.level, Level::Debug, "the same reason is logged once");
    }
    assert_eq!(
        k.step(&tick(200_000, true, Some(Heartbeat::Answered)), &s)
            .to,
        StandbyConnected
    );
    assert_eq!(k.step(&tick(201_000, true, no_answer()), &s).to, Promoting);
}

#[test]
fn slow_promotion_is_requested_again_and_failed_promotion_retries() {
    let (mut k, s) = standby_connected(1);
    k.step(&tick(0, true, no_answer()), &s);
    assert_eq!(k.step(&tick(5_000, true, None), &s).actions, vec![]);
    let d = k.step(&tick(10_000, true, None), &s);
    assert_eq!(d.event, Event::PromotionSlow);
    assert_eq!(d.actions, vec![Promote]);
    // The clock restarts with the new request.
    assert_eq!(k.step(&tick(15_000, true, None), &s).actions, vec![]);
    let d = k.step(
        &Input::ActionFailed(Promote, "could not write file".into()),
        &s,
    );
    assert_eq!(d.to, StandbyConnected);
    let d = k.step(&tick(16_000, true, no_answer()), &s);
    assert_eq!(
        d.to, Promoting,
        "the count was kept, so the next failure promotes"
    );
}

#[test]
fn promotion_by_someone_else_switches_to_master_without_after_command() {
    let (mut k, s) = standby_connected(3);
    let d = k.step(&tick(1, false, Some(Heartbeat::Answered)), &s);
    assert_eq!(d.to, MasterWaiting);
    assert!(d.actions.is_empty());
}

#[test]
fn every_mode_has_a_distinct_title_that_names_its_role() {
    let mut seen = std::collections::HashSet::new();
    for m in Mode::ALL {
        assert!(seen.insert(m.title()), "duplicate title {}", m.title());
        if m.is_master() {
            assert!(m.title().starts_with("master mode"));
        }
    }
    assert_eq!(MasterWaiting.title(), "master mode");
    assert_eq!(MasterConnected.title(), "master mode:connected");
    assert_eq!(StandbyConnected.title(), "standby mode:connected");
}

#[test]
fn the_table_has_one_row_per_mode_and_event() {
    for (i, a) in TRANSITIONS.iter().enumerate() {
        for b in &TRANSITIONS[i + 1..] {
            assert!(
                !(a.from == b.from && a.on == b.on),
                "two rows for {:?} on {:?}",
                a.from,
                a.on
            );
        }
    }
}

#[test]
fn only_a_lost_peer_can_promote_or_degrade() {
    for t in TRANSITIONS {
        // A standby that took the lease to promote before a restart goes on with it.
        if t.actions.contains(&Promote) {
            assert!(
                matches!(
                    t.on,
                    Event::PeerLost | Event::PromotionSlow | Event::PromotionUnfinished
                ),
                "{t:?}"
            );
            assert!(
                matches!(t.from, StandbyConnected | Promoting)
                    || t.on == Event::PromotionUnfinished,
                "{t:?}"
            );
        }
        // After a promotion, the switch to async is made again (idempotent).
        if t.actions.contains(&DegradeToAsync) {
            assert!(
                matches!(
                    t.on,
                    Event::PeerLost | Event::PeerLostSync | Event::PromotionUnfinished
                ) || (t.from, t.on) == (Promoting, Event::RecoveryEnded),
                "{t:?}"
            );
        }
    }
}

#[test]
fn after_command_follows_the_action_it_reports() {
    for t in TRANSITIONS {
        for (i, a) in t.actions.iter().enumerate() {
            if *a == RunAfterCommand(AfterEvent::Async) {
                assert!(t.actions[..i].contains(&DegradeToAsync), "{t:?}");
            }
            if *a == RunAfterCommand(AfterEvent::Promote) {
                assert_eq!(t.from, Promoting);
                assert_eq!(t.on, Event::RecoveryEnded);
            }
        }
    }
}

#[test]
fn every_row_is_reachable_from_some_input() {
    // Drive the keeper through a broad set of inputs from each mode and record which rows fire.
    let mut fired = std::collections::HashSet::new();
    let heartbeats = [
        None,
        Some(Heartbeat::Answered),
        Some(Heartbeat::Refused("x".into())),
        Some(Heartbeat::NoAnswer("y".into())),
    ];
    let mut inputs = vec![
        Input::Identified { in_recovery: false },
        Input::Identified { in_recovery: true },
        Input::IdentityProblem("z".into()),
        Input::ActionFailed(DegradeToAsync, "a".into()),
        Input::ActionFailed(Promote, "b".into()),
        Input::ActionFailed(RunAfterCommand(AfterEvent::Async), "c".into()),
        Input::ActionFailed(RestoreSync, "d".into()),
        Input::ActionFailed(Fence, "e".into()),
        Input::ActionFailed(ReleaseStandby, "f".into()),
        Input::ActionFailed(TakeLease, "g".into()),
        Input::ActionFailed(EndWaitingCommits, "h".into()),
        Input::ActionFailed(StopServing, "i".into()),
        Input::ActionFailed(ResumeServing, "j".into()),
        Input::ActionFailed(Rejoin, "k".into()),
    ];
    let leases = [
        Lease::NotConfigured,
        Lease::Unreachable("w".into()),
        Lease::Missing,
        Lease::Held,
        Lease::Taken,
        Lease::Peer {
            newer: true,
            expired: true,
            names_me: true,
        },
        Lease::Peer {
            newer: false,
            expired: false,
            names_me: true,
        },
    ];
    for hb in &heartbeats {
        for in_recovery in [false, true] {
            for sync_configured in [false, true] {
                for standby_streaming in [false, true] {
                    for now_ms in [0, 1_000_000] {
                        for (restore, guard) in [(false, false), (true, false), (false, true)] {
                            for lease in &leases {
                                inputs.push(Input::Tick(Observation {
                                    now_ms,
                                    tick_started_ms: now_ms,
                                    in_recovery,
                                    sync_configured,
                                    standby_streaming,
                                    heartbeat: hb.clone(),
                                    restore_wanted: restore,
                                    standby_caught_up: restore,
                                    standby_replies_recent: guard,
                                    wal_receiver_recent: guard,
                                    peer_says_synchronous: None,
                                    peer_newer_primary: guard,
                                    peer_uses_witness: None,
                                    lease: lease.clone(),
                                    peer_announced_shutdown_ms: (now_ms == 0 && !restore)
                                        .then_some(0),
                                    heartbeat_timed_out: false,
                                }));
                            }
                        }
                    }
                }
            }
        }
    }
    for count in [1, 2] {
        let s = Settings {
            restart_grace_ms: 30_000,
            ..settings(count)
        };
        for mode in Mode::ALL {
            for input in &inputs {
                for (was_synchronous, peer_used_witness, last_contact_ms, restart) in [
                    (false, false, None, None),
                    (true, false, Some(0), None),
                    (true, true, Some(0), None),
                    (
                        true,
                        false,
                        Some(0),
                        Some(PeerRestart {
                            announced_ms: 0,
                            back_ms: Some(0),
                        }),
                    ),
                ] {
                    let mut k = Keeper {
                        mode,
                        failures: 0,
                        promote_requested_at: Some(0),
                        last_said: None,
                        paused: false,
                        was_synchronous,
                        peer_used_witness,
                        trust: SyncTrust::default(),
                        pending: Vec::new(),
                        last_contact_ms,
                        lease_may_name_standby: true,
                        naming_standby: false,
                        unlisted_answers: 0,
                        restart,
                    };
                    let d = k.step(input, &s);
                    fired.insert((d.from, d.event));
                }
            }
        }
    }
    for t in TRANSITIONS {
        assert!(
            fired.contains(&(t.from, t.on)),
            "row never fires: {:?} on {:?}",
            t.from,
            t.on
        );
    }
}

fn catch_up_tick(now_ms: u64, caught_up: bool) -> Input {
    Input::Tick(Observation {
        now_ms,
        tick_started_ms: now_ms,
        in_recovery: false,
        sync_configured: false,
        standby_streaming: true,
        heartbeat: Some(Heartbeat::Answered),
        restore_wanted: true,
        standby_caught_up: caught_up,
        standby_replies_recent: false,
        wal_receiver_recent: false,
        peer_says_synchronous: None,
        peer_newer_primary: false,
        peer_uses_witness: None,
        lease: Lease::NotConfigured,
        peer_announced_shutdown_ms: None,
        heartbeat_timed_out: false,
    })
}

#[test]
fn synchronous_replication_comes_back_once_the_standby_has_caught_up() {
    let (mut k, s) = master_connected(1);
    let d = k.step(&tick(1, false, no_answer()), &s);
    assert_eq!(d.to, MasterAsync);
    // The standby streams again but lags: heartbeated, not yet synchronous.
    assert_eq!(k.step(&catch_up_tick(2, false), &s).to, MasterConnected);
    let d = k.step(&catch_up_tick(3, false), &s);
    assert_eq!(d.event, Event::HeartbeatOk);
    assert!(d.actions.is_empty());
    let d = k.step(&catch_up_tick(4, true), &s);
    assert_eq!(d.event, Event::StandbyCaughtUp);
    assert_eq!(
        d.actions,
        vec![RestoreSync, RunAfterCommand(AfterEvent::SyncRestored)]
    );
    assert_eq!(d.to, MasterConnected);
    // A second loss degrades again.
    let d = k.step(&tick(5, false, no_answer()), &s);
    assert_eq!(
        d.actions,
        vec![
            ReleaseStandby,
            DegradeToAsync,
            RunAfterCommand(AfterEvent::Async)
        ]
    );
}

#[test]
fn nothing_is_restored_when_not_wanted_or_already_synchronous() {
    let (mut k, s) = master_connected(1);
    let mut obs = Observation {
        now_ms: 1,
        standby_streaming: true,
        heartbeat: Some(Heartbeat::Answered),
        standby_caught_up: true,
        standby_replies_recent: false,
        ..Observation::default()
    };
    assert!(k.step(&Input::Tick(obs.clone()), &s).actions.is_empty());
    obs.restore_wanted = true;
    obs.sync_configured = true;
    assert!(k.step(&Input::Tick(obs), &s).actions.is_empty());
}

#[test]
fn a_refusing_peer_is_warned_about_once_per_reason() {
    let (mut k, s) = standby_connected(3);
    let refused = |why: &str| Some(Heartbeat::Refused(why.into()));
    assert_eq!(
        k.step(&tick(1, true, refused("too many clients")), &s)
            .level,
        Level::Warning
    );
    assert_eq!(
        k.step(&tick(2, true, refused("too many clients")), &s)
            .level,
        Level::Debug
    );
    assert_eq!(
        k.step(&tick(3, true, refused("shutting down")), &s).level,
        Level::Warning
    );
    k.step(&tick(4, true, Some(Heartbeat::Answered)), &s);
    assert_eq!(
        k.step(&tick(5, true, refused("shutting down")), &s).level,
        Level::Warning
    );
}

#[test]
fn paused_keeper_heartbeats_and_counts_but_does_not_act_until_resumed() {
    let (mut k, s) = standby_connected(2);
    k.set_paused(true);
    assert_eq!(k.title(), "standby mode:connected, paused");
    assert_eq!(k.step(&tick(1, true, no_answer()), &s).to, StandbyConnected);
    let d = k.step(&tick(2, true, no_answer()), &s);
    assert_eq!(d.to, StandbyConnected);
    assert!(d.actions.is_empty());
    assert_eq!(d.level, Level::Warning);
    assert_eq!(d.history_name(), "action_held");
    assert!(
        d.sentence.starts_with("paused, so not acting on: primary"),
        "{}",
        d.sentence
    );
    let again = k.step(&tick(3, true, no_answer()), &s);
    assert_eq!(again.level, Level::Debug, "said once");
    assert_eq!(k.failures(), 3);
    k.set_paused(false);
    let d = k.step(&tick(4, true, no_answer()), &s);
    assert_eq!(d.to, Promoting);
    assert_eq!(d.actions, vec![TakeLease, Promote, DegradeToAsync]);
}

#[test]
fn a_pause_holds_the_switch_to_async_and_the_restore_but_not_reporting() {
    let (mut k, s) = master_connected(1);
    k.set_paused(true);
    let d = k.step(&tick(1, false, no_answer()), &s);
    assert_eq!(d.to, MasterConnected);
    assert!(d.actions.is_empty());
    k.set_paused(false);
    let d = k.step(&tick(2, false, no_answer()), &s);
    assert_eq!(d.to, MasterAsync);
    k.set_paused(true);
    let d = k.step(&catch_up_tick(3, true), &s);
    assert_eq!(d.to, MasterConnected, "reconnecting is not an action");
    let d = k.step(&catch_up_tick(4, true), &s);
    assert_eq!(d.event, Event::StandbyCaughtUp);
    assert!(d.actions.is_empty(), "restoring is held");
}

#[test]
fn history_names_the_outcomes() {
    let (mut k, s) = standby_connected(1);
    let d = k.step(&tick(1, true, no_answer()), &s);
    assert_eq!(d.history_name(), "primary_lost");
    let d = k.step(&tick(2, false, None), &s);
    assert_eq!(d.history_name(), "promoted");
}

fn standby_tick(
    now_ms: u64,
    hb: Option<Heartbeat>,
    wal_recent: bool,
    says_sync: Option<bool>,
) -> Input {
    Input::Tick(Observation {
        now_ms,
        tick_started_ms: now_ms,
        in_recovery: true,
        sync_configured: true,
        standby_streaming: false,
        heartbeat: hb,
        restore_wanted: false,
        standby_caught_up: false,
        standby_replies_recent: false,
        wal_receiver_recent: wal_recent,
        peer_says_synchronous: says_sync,
        peer_newer_primary: false,
        peer_uses_witness: None,
        lease: Lease::NotConfigured,
        peer_announced_shutdown_ms: None,
        heartbeat_timed_out: false,
    })
}

#[test]
fn a_standby_whose_wal_receiver_still_hears_the_primary_does_not_promote() {
    let (mut k, s) = standby_connected(2);
    for n in 1..=5 {
        let d = k.step(&standby_tick(n, no_answer(), true, None), &s);
        assert_eq!(d.to, StandbyConnected, "tick {n}");
        assert!(d.actions.is_empty());
        if n >= 2 {
            assert_eq!(d.event, Event::PeerLostButStreaming);
            assert_eq!(d.level, Level::Log, "the reason is logged each tick");
        }
    }
    // The WAL receiver falls silent too: the count is already past the limit, so it promotes.
    let d = k.step(&standby_tick(6, no_answer(), false, None), &s);
    assert_eq!(d.to, Promoting);
}

#[test]
fn an_asynchronous_standby_does_not_promote_unless_data_loss_is_allowed() {
    let mut s = settings(1);
    let mut k = Keeper::new();
    k.step(&Input::Identified { in_recovery: true }, &s);
    // The primary answered but said this standby was not synchronous.
    k.step(
        &standby_tick(0, Some(Heartbeat::Answered), false, Some(false)),
        &s,
    );
    assert_eq!(k.mode(), StandbyConnected);
    let d = k.step(&standby_tick(1, no_answer(), false, None), &s);
    assert_eq!(d.event, Event::PeerLostNotSynchronous);
    assert_eq!(d.to, StandbyConnected);
    assert_eq!(d.level, Level::Warning);
    assert!(
        d.sentence.contains("allow_data_loss_failover"),
        "{}",
        d.sentence
    );
    assert_eq!(
        k.step(&standby_tick(2, no_answer(), false, None), &s).level,
        Level::Debug
    );
    s.allow_data_loss_failover = true;
    assert_eq!(
        k.step(&standby_tick(3, no_answer(), false, None), &s).to,
        Promoting
    );
}

#[test]
fn the_last_answer_decides_whether_the_standby_was_synchronous() {
    let s = settings(1);
    let mut k = Keeper::new();
    k.step(&Input::Identified { in_recovery: true }, &s);
    k.step(
        &standby_tick(0, Some(Heartbeat::Answered), false, Some(true)),
        &s,
    );
    // An answer that says nothing of this standby keeps what was known.
    k.step(&standby_tick(1, Some(Heartbeat::Answered), false, None), &s);
    assert_eq!(
        k.step(&standby_tick(2, no_answer(), false, None), &s).to,
        Promoting
    );
    let mut k = Keeper::new();
    k.step(&Input::Identified { in_recovery: true }, &s);
    k.step(
        &standby_tick(0, Some(Heartbeat::Answered), false, Some(true)),
        &s,
    );
    k.step(
        &standby_tick(1, Some(Heartbeat::Answered), false, Some(false)),
        &s,
    );
    assert_eq!(
        k.step(&standby_tick(2, no_answer(), false, None), &s).event,
        Event::PeerLostNotSynchronous
    );
}

#[test]
fn a_primary_that_finds_a_newer_primary_fences_itself() {
    let s = settings(3);
    for start in [MasterWaiting, MasterConnected, MasterAsync] {
        let mut k = Keeper {
            mode: start,
            ..Keeper::new()
        };
        let d = k.step(
            &Input::Tick(Observation {
                now_ms: 1,
                sync_configured: true,
                heartbeat: Some(Heartbeat::Answered),
                peer_newer_primary: true,
                ..Observation::default()
            }),
            &s,
        );
        assert_eq!(d.to, Fenced, "from {start:?}");
        assert_eq!(d.actions, vec![Fence]);
        assert_eq!(d.history_name(), "superseded");
        assert!(!Fenced.heartbeats());
        assert_eq!(Fenced.title(), "fenced");
    }
}

#[test]
fn a_standby_that_answers_but_does_not_stream_counts_as_a_failure_for_the_primary() {
    let (mut k, s) = master_connected(2);
    let answered_not_streaming = |now_ms| {
        Input::Tick(Observation {
            now_ms,
            tick_started_ms: now_ms,
            in_recovery: false,
            sync_configured: true,
            standby_streaming: false,
            heartbeat: Some(Heartbeat::Answered),
            restore_wanted: false,
            standby_caught_up: false,
            standby_replies_recent: false,
            wal_receiver_recent: false,
            peer_says_synchronous: None,
            peer_newer_primary: false,
            peer_uses_witness: None,
            lease: Lease::NotConfigured,
            peer_announced_shutdown_ms: None,
            heartbeat_timed_out: false,
        })
    };
    let d = k.step(&answered_not_streaming(1), &s);
    assert_eq!(d.event, Event::HeartbeatFailed);
    assert!(
        d.sentence.contains("not streaming (1 of 2)"),
        "{}",
        d.sentence
    );
    // Failures of either kind add up: a flapping link.
    let d = k.step(&tick(2, false, no_answer()), &s);
    assert_eq!(d.to, MasterAsync);
    assert_eq!(
        d.actions,
        vec![
            ReleaseStandby,
            DegradeToAsync,
            RunAfterCommand(AfterEvent::Async)
        ]
    );
}

fn with_lease(input: Input, lease: Lease) -> Input {
    match input {
        Input::Tick(obs) => Input::Tick(Observation { lease, ..obs }),
        other => other,
    }
}

fn peer_lease(expired: bool, names_me: bool) -> Lease {
    Lease::Peer {
        newer: false,
        expired,
        names_me,
    }
}

#[test]
fn a_primary_switches_to_async_only_while_it_holds_the_lease() {
    let (mut k, s) = master_connected(2);
    let unreachable = Lease::Unreachable("timeout".into());
    let d = k.step(&with_lease(tick(1, false, no_answer()), Lease::Held), &s);
    assert_eq!(d.event, Event::HeartbeatFailed);
    // The standby is lost, but the lease could not be renewed this tick: commits keep waiting.
    for (n, lease) in [
        (2, unreachable.clone()),
        (3, unreachable.clone()),
        (4, peer_lease(false, false)),
        (5, Lease::Missing),
    ] {
        let d = k.step(&with_lease(tick(n, false, no_answer()), lease), &s);
        assert_eq!(d.event, Event::PeerLostNoLease, "tick {n}");
        assert_eq!(d.to, MasterConnected);
        // Nothing switches; the sessions already waiting are ended (every tick).
        assert_eq!(d.actions, vec![EndWaitingCommits]);
        assert_eq!(d.history_name(), "async_held");
        if n == 3 {
            assert_eq!(d.level, Level::Debug, "the same reason is said once");
        } else {
            assert_eq!(d.level, Level::Warning, "{}", d.sentence);
        }
    }
    // Renewed: it records first that no standby is synchronous, then switches.
    let d = k.step(&with_lease(tick(6, false, no_answer()), Lease::Held), &s);
    assert_eq!(d.to, MasterAsync);
    assert_eq!(
        d.actions,
        vec![
            ReleaseStandby,
            DegradeToAsync,
            RunAfterCommand(AfterEvent::Async)
        ]
    );
}

#[test]
fn a_failed_release_on_the_witness_keeps_replication_synchronous_and_retries() {
    let (mut k, s) = master_connected(1);
    let d = k.step(&with_lease(tick(1, false, no_answer()), Lease::Held), &s);
    assert_eq!(d.to, MasterAsync);
    let d = k.step(
        &Input::ActionFailed(ReleaseStandby, "lease taken by node2".into()),
        &s,
    );
    assert_eq!(d.to, MasterConnected);
    assert!(d.actions.is_empty());
    assert!(
        d.sentence.contains("lease taken by node2"),
        "{}",
        d.sentence
    );
    // The perform loop stops at a mode change, so DegradeToAsync is not run; the next failure
    // tries again.
    let d = k.step(&with_lease(tick(2, false, no_answer()), Lease::Held), &s);
    assert_eq!(d.to, MasterAsync);
    assert_eq!(d.actions[0], ReleaseStandby);
}

#[test]
fn a_standby_promotes_only_after_taking_an_expired_lease_that_names_it() {
    let (mut k, s) = standby_connected(1);
    let lost = |n| standby_tick(n, no_answer(), false, None);
    for (n, lease, why) in [
        (1, peer_lease(false, true), "has not expired"),
        (2, peer_lease(true, false), "does not name this standby"),
        (3, Lease::Missing, "holds no lease"),
        (4, Lease::Unreachable("refused".into()), "cannot be reached"),
    ] {
        let d = k.step(&with_lease(lost(n), lease), &s);
        assert_eq!(d.event, Event::PeerLostLeaseWithheld, "tick {n}");
        assert_eq!(d.to, StandbyConnected);
        assert!(d.actions.is_empty());
        assert!(d.sentence.contains(why), "{}", d.sentence);
        assert_eq!(d.history_name(), "promotion_held");
    }
    let d = k.step(&with_lease(lost(5), peer_lease(true, true)), &s);
    assert_eq!(d.to, Promoting);
    assert_eq!(d.actions, vec![TakeLease, Promote, DegradeToAsync]);
    // Someone else was quicker, or the witness went away: back, and the next tick retries.
    let d = k.step(
        &Input::ActionFailed(TakeLease, "the lease was renewed".into()),
        &s,
    );
    assert_eq!(d.to, StandbyConnected);
    assert_eq!(d.event, Event::TakeFailed);
    let d = k.step(&with_lease(lost(6), Lease::Held), &s);
    assert_eq!(
        d.to, Promoting,
        "a lease this standby already holds is enough"
    );
}

#[test]
fn the_lease_does_not_override_the_other_guards() {
    let (mut k, s) = standby_connected(1);
    // The WAL receiver still hears the primary: no promotion, whatever the lease says.
    let d = k.step(
        &with_lease(
            standby_tick(1, no_answer(), true, None),
            peer_lease(true, true),
        ),
        &s,
    );
    assert_eq!(d.event, Event::PeerLostButStreaming);
    // Not synchronous at the last answer: no promotion either.
    let mut k = Keeper::new();
    k.step(&Input::Identified { in_recovery: true }, &s);
    k.step(
        &standby_tick(0, Some(Heartbeat::Answered), false, Some(false)),
        &s,
    );
    let d = k.step(
        &with_lease(
            standby_tick(1, no_answer(), false, None),
            peer_lease(true, true),
        ),
        &s,
    );
    assert_eq!(d.event, Event::PeerLostNotSynchronous);
}

#[test]
fn a_primary_whose_lease_names_the_other_node_on_a_newer_timeline_fences_itself() {
    let s = settings(3);
    for start in [MasterWaiting, MasterConnected, MasterAsync] {
        let mut k = Keeper {
            mode: start,
            ..Keeper::new()
        };
        // A stale lease of the other node (older timeline) is no reason to fence.
        let stale = Input::Tick(Observation {
            now_ms: 1,
            sync_configured: true,
            standby_streaming: true,
            lease: peer_lease(false, false),
            ..Observation::default()
        });
        assert_ne!(k.step(&stale, &s).to, Fenced, "from {start:?}");
        // No heartbeat needed: the witness alone tells it.
        let d = k.step(
            &Input::Tick(Observation {
                now_ms: 2,
                heartbeat: Some(Heartbeat::NoAnswer("cut".into())),
                lease: Lease::Peer {
                    newer: true,
                    expired: false,
                    names_me: false,
                },
                ..Observation::default()
            }),
            &s,
        );
        assert_eq!(d.to, Fenced, "from {start:?}");
        assert_eq!(d.actions, vec![Fence]);
        assert_eq!(d.event, Event::SupersededByLease);
        assert_eq!(d.history_name(), "superseded");
    }
}

/// The witness's safety rules, over every mode and a broad set of ticks: nothing switches to
/// async without a lease renewed this tick (and the release comes first), and nothing promotes
/// without a lease it may take (and the take comes first).
#[test]
fn with_a_witness_no_decision_degrades_or_promotes_without_the_lease() {
    let leases = [
        Lease::Unreachable("w".into()),
        Lease::Missing,
        Lease::Held,
        peer_lease(false, false),
        peer_lease(false, true),
        peer_lease(true, false),
        peer_lease(true, true),
    ];
    for t in TRANSITIONS {
        if let Some(i) = t.actions.iter().position(|a| *a == DegradeToAsync) {
            if t.from.is_master() {
                assert!(t.actions[..i].contains(&ReleaseStandby), "{t:?}");
            }
        }
        if let Some(i) = t.actions.iter().position(|a| *a == Promote) {
            if t.from == StandbyConnected {
                assert!(t.actions[..i].contains(&TakeLease), "{t:?}");
            }
        }
    }
    for count in [1, 3] {
        let s = settings(count);
        for mode in Mode::ALL {
            for lease in &leases {
                for in_recovery in [false, true] {
                    for hb in [None, no_answer(), Some(Heartbeat::Answered)] {
                        for failures in [0, count - 1, count + 5] {
                            let mut k = Keeper {
                                mode,
                                failures,
                                was_synchronous: true,
                                ..Keeper::new()
                            };
                            let input = Input::Tick(Observation {
                                now_ms: 1,
                                in_recovery,
                                sync_configured: true,
                                heartbeat: hb.clone(),
                                peer_says_synchronous: Some(true),
                                lease: lease.clone(),
                                ..Observation::default()
                            });
                            let d = k.step(&input, &s);
                            if d.actions.contains(&ReleaseStandby) {
                                assert_eq!(*lease, Lease::Held, "{d:?}");
                            }
                            if d.actions.contains(&TakeLease) {
                                assert!(
                                    matches!(
                                        lease,
                                        Lease::Held
                                            | Lease::Peer {
                                                expired: true,
                                                names_me: true,
                                                ..
                                            }
                                    ),
                                    "{lease:?} {d:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn a_standby_that_refuses_and_does_not_stream_counts_as_failing() {
    let (mut k, s) = master_connected(2);
    let refused = || {
        Some(Heartbeat::Refused(
            "FATAL: the database system is starting up".into(),
        ))
    };
    let mut t = tick(1000, false, refused());
    if let Input::Tick(o) = &mut t {
        o.standby_streaming = false;
    }
    assert_eq!(k.step(&t, &s).event, E::HeartbeatFailed);
    let d = k.step(&t, &s);
    assert_eq!((d.event, d.to), (E::PeerLostSync, MasterAsync));
    assert!(d
        .sentence
        .contains("refuses connections and its replication is not streaming"));
    // Refusing while it streams is alive, as before.
    let (mut k, s) = master_connected(1);
    assert_eq!(
        k.step(&tick(1000, false, refused()), &s).event,
        E::HeartbeatRefused
    );
}

fn seen(synchronous: bool, flush_lsn: u64) -> Option<StandbySeen> {
    Some(StandbySeen {
        synchronous,
        flush_lsn,
    })
}

#[test]
fn a_standby_is_trusted_only_once_it_has_flushed_what_was_acknowledged_without_it() {
    let (mut k, _) = master_connected(1);
    // Synchronous in the view but not yet in force: not trusted, and nothing remembered.
    assert!(!k.lease_names_standby(false, 100, seen(true, 100)));
    assert_eq!(k.trust(), SyncTrust::Untrusted);
    // In force at insert position 500: trusted once the flush reaches 500.
    assert!(!k.lease_names_standby(true, 500, seen(true, 300)));
    assert_eq!(k.trust(), SyncTrust::CatchingUp { until_lsn: 500 });
    // The target does not move with later inserts (they wait for the standby).
    assert!(!k.lease_names_standby(true, 900, seen(true, 499)));
    assert!(k.lease_names_standby(true, 950, seen(true, 500)));
    assert!(k.lease_names_standby(true, 990, seen(true, 600)));
    // Any look that is not synchronous and in force starts it over.
    assert!(!k.lease_names_standby(true, 1000, seen(false, 1000)));
    assert!(!k.lease_names_standby(true, 1100, seen(true, 1000)));
    assert!(!k.lease_names_standby(true, 1100, None));
    assert_eq!(k.trust(), SyncTrust::Untrusted);
}

#[test]
fn only_a_connected_primary_names_its_standby_in_the_lease() {
    for mode in Mode::ALL {
        let mut k = Keeper::new();
        k.mode = mode;
        let named = k.lease_names_standby(true, 10, seen(true, 10));
        assert_eq!(named, mode == MasterConnected, "{mode:?}");
    }
}

#[test]
fn the_keeper_owns_the_actions_of_its_decision_until_each_is_done() {
    let (mut k, s) = master_connected(1);
    let d = k.step(&tick(1000, false, no_answer()), &s);
    assert_eq!(d.actions, ASYNC);
    assert_eq!(k.next_action(), Some(ReleaseStandby));
    k.action_done(ReleaseStandby);
    assert_eq!(k.next_action(), Some(DegradeToAsync));
    // A restarted worker goes on from the memory: same mode, same action next.
    let mut resumed = Keeper::resume(&k.memory());
    assert_eq!(resumed.mode(), MasterAsync);
    assert_eq!(resumed.next_action(), Some(DegradeToAsync));
    // A failure that sends the keeper back ends the rest of the decision.
    let d = resumed.step(&Input::ActionFailed(DegradeToAsync, "no".into()), &s);
    assert_eq!(d.to, MasterConnected);
    assert_eq!(resumed.next_action(), None);
}

#[test]
fn a_failed_action_that_keeps_the_mode_lets_the_rest_go_on() {
    let (mut k, s) = standby_connected(1);
    k.step(&tick(1000, true, no_answer()), &s);
    assert_eq!(k.mode(), Promoting);
    k.action_done(TakeLease);
    k.action_done(Promote);
    assert_eq!(k.next_action(), Some(DegradeToAsync));
    k.step(&Input::ActionFailed(DegradeToAsync, "no".into()), &s);
    assert_eq!(k.mode(), Promoting);
    assert_eq!(k.next_action(), None);
}

#[test]
fn a_resumed_promotion_is_asked_for_again_and_switches_to_async_when_it_ends() {
    let (mut k, s) = standby_connected(1);
    k.step(&tick(1000, true, no_answer()), &s);
    k.action_done(TakeLease);
    k.action_done(Promote);
    // The worker restarts before the switch to async.
    let mut r = Keeper::resume(&k.memory());
    assert_eq!(r.mode(), Promoting);
    let d = r.step(&tick(20_000, true, None), &s);
    assert_eq!(
        (d.event, d.actions.as_slice()),
        (E::PromotionSlow, &[Promote][..])
    );
    r.action_done(Promote);
    let d = r.step(&tick(20_100, false, None), &s);
    assert_eq!(d.event, E::RecoveryEnded);
    assert_eq!(d.actions, AFTER_PROMOTE);
    assert!(d.actions.contains(&DegradeToAsync));
}

#[test]
fn a_standby_that_took_the_lease_before_a_restart_goes_on_with_the_promotion() {
    for armed in [false, true] {
        let s = settings(3);
        let mut k = Keeper::new();
        k.step(&Input::Identified { in_recovery: true }, &s);
        if armed {
            k.step(&tick(0, true, Some(Heartbeat::Answered)), &s);
        }
        // Even a primary that answers: it will find the lease taken and fence itself.
        let d = k.step(
            &with_lease(tick(10, true, Some(Heartbeat::Answered)), Lease::Taken),
            &s,
        );
        assert_eq!(
            (d.event, d.to),
            (E::PromotionUnfinished, Promoting),
            "{d:?}"
        );
        assert_eq!(d.actions, PROMOTE);
    }
}

#[test]
fn a_lease_row_held_by_a_standby_that_took_it_reads_as_taken() {
    let row = LeaseRow {
        holder: "node2".into(),
        epoch: 2,
        timeline: 1,
        sync_standby: None,
        expired: false,
        ms_left: 100,
        mine: false,
        promoting: true,
        system_identifier: None,
    };
    assert_eq!(row.view("node2", 1, false), Lease::Taken);
    assert_eq!(
        LeaseRow {
            promoting: false,
            ..row.clone()
        }
        .view("node2", 1, false),
        Lease::Held
    );
    // The old primary sees the other node's lease, newer: superseded.
    assert!(matches!(
        row.view("node1", 1, true),
        Lease::Peer { newer: true, .. }
    ));
}

#[test]
fn a_standby_without_the_witness_its_primary_uses_does_not_promote() {
    let (mut k, s) = standby_connected(1);
    let mut answer = tick(0, true, Some(Heartbeat::Answered));
    if let Input::Tick(o) = &mut answer {
        o.peer_uses_witness = Some(true);
    }
    k.step(&answer, &s);
    let d = k.step(&tick(1000, true, no_answer()), &s);
    assert_eq!(
        (d.event, d.to),
        (E::PeerLostWitnessMismatch, StandbyConnected)
    );
    assert!(d.actions.is_empty());
    assert!(
        d.sentence.contains("but this standby does not"),
        "{}",
        d.sentence
    );
    // With a witness of its own it goes by the lease as usual.
    let lost = with_lease(
        tick(2000, true, no_answer()),
        Lease::Peer {
            newer: false,
            expired: true,
            names_me: true,
        },
    );
    assert_eq!(k.step(&lost, &s).event, E::PeerLost);
}

#[test]
fn another_clusters_lease_row_is_foreign() {
    let row = LeaseRow {
        holder: "node1".into(),
        epoch: 1,
        timeline: 1,
        sync_standby: Some("node2".into()),
        expired: false,
        ms_left: 100,
        mine: false,
        promoting: false,
        system_identifier: Some("111".into()),
    };
    assert_eq!(row.foreign("111"), None);
    let why = row.foreign("222").expect("foreign");
    assert!(
        why.contains("another cluster") && why.contains("111") && why.contains("222"),
        "{why}"
    );
    // A row written before the identifier was recorded is this cluster's.
    assert_eq!(
        LeaseRow {
            system_identifier: None,
            ..row
        }
        .foreign("222"),
        None
    );
}

#[test]
fn what_a_peer_answer_means_depends_on_which_side_asks() {
    let from_primary = PeerAnswer {
        in_recovery: false,
        timeline: Some(3),
        sync_state_of_asker: Some("quorum".into()),
        uses_witness: Some(true),
        trusted_standby: None,
    };
    let standby = Observation {
        in_recovery: true,
        ..Observation::default()
    }
    .with_answer(Some(&from_primary), 2, "node2");
    assert_eq!(standby.peer_says_synchronous, Some(true));
    assert_eq!(standby.peer_uses_witness, Some(true));
    assert!(
        !standby.peer_newer_primary,
        "only a primary can be superseded"
    );
    let async_listed = PeerAnswer {
        sync_state_of_asker: Some("async".into()),
        ..from_primary.clone()
    };
    let unlisted = PeerAnswer {
        sync_state_of_asker: None,
        ..from_primary.clone()
    };
    for a in [async_listed, unlisted] {
        let o = Observation {
            in_recovery: true,
            ..Observation::default()
        };
        assert_eq!(
            o.with_answer(Some(&a), 2, "node2").peer_says_synchronous,
            Some(false)
        );
    }
    // A primary asking: newer only on a later timeline; nothing about synchronous.
    let primary = Observation::default().with_answer(Some(&from_primary), 2, "node2");
    assert!(primary.peer_newer_primary);
    assert_eq!(primary.peer_says_synchronous, None);
    assert!(
        !Observation::default()
            .with_answer(Some(&from_primary), 3, "node2")
            .peer_newer_primary
    );
    // No answer: nothing.
    let none = Observation {
        in_recovery: true,
        ..Observation::default()
    }
    .with_answer(None, 2, "node2");
    assert_eq!(
        (none.peer_says_synchronous, none.peer_uses_witness),
        (None, None)
    );
}

/// A primary with a witness, connected, whose last renewal (at `t`) named its standby.
fn primary_holding_lease_naming_standby(t: u64) -> (Keeper, Settings) {
    let (mut k, s) = master_connected(3);
    for _ in 0..3 {
        assert!(k.lease_names_standby(true, 10, Some(standby_at(10))));
    }
    let d = k.step(
        &with_lease(tick(t, false, Some(Heartbeat::Answered)), Lease::Held),
        &s,
    );
    assert_eq!(d.to, MasterConnected);
    (k, s)
}

fn standby_at(flush_lsn: u64) -> StandbySeen {
    StandbySeen {
        synchronous: true,
        flush_lsn,
    }
}

/// A tick that reaches neither the standby nor the witness, begun at `started`, decided at `now`.
fn cut_off(started: u64, now: u64) -> Input {
    match with_lease(
        tick(now, false, no_answer()),
        Lease::Unreachable("timeout".into()),
    ) {
        Input::Tick(obs) => Input::Tick(Observation {
            tick_started_ms: started,
            standby_streaming: false,
            ..obs
        }),
        other => other,
    }
}

#[test]
fn an_isolated_primary_stops_serving_before_the_standby_may_take_the_lease() {
    let (mut k, s) = primary_holding_lease_naming_standby(1000);
    // The lease (3 x 1000 + 200 ms from the renewal sent at 1000) may be taken from 4200 on;
    // the primary must have stopped by 4000 at the latest.
    assert_eq!(k.serve_deadline_ms(&s), Some(4000));
    for (started, now) in [(2000, 2900), (3000, 3999)] {
        let d = k.step(&cut_off(started, now), &s);
        assert_ne!(d.to, Isolated, "at {now}: {}", d.sentence);
        assert!(!d.actions.contains(&StopServing));
    }
    let d = k.step(&cut_off(3999, 4000), &s);
    assert_eq!((d.to, d.actions.clone()), (Isolated, vec![StopServing]));
    assert_eq!(d.level, Level::Warning);
    assert!(
        d.sentence.contains("no answer for 3000 ms"),
        "{}",
        d.sentence
    );
    assert_eq!(k.title(), "master mode:isolated");
    assert_eq!(d.history_name(), "isolated");
    // Every tick it ends whatever began meanwhile, quietly.
    let d = k.step(&cut_off(4000, 5000), &s);
    assert_eq!(
        (d.to, d.actions.clone(), d.level),
        (Isolated, vec![StopServing], Level::Debug)
    );
    // The witness again: it serves again and counts afresh.
    let back = with_lease(tick(6000, false, no_answer()), Lease::Held);
    let d = k.step(&back, &s);
    assert_eq!(
        (d.to, d.actions.clone()),
        (MasterConnected, vec![ResumeServing])
    );
    assert!(d.sentence.contains("witness renewed"), "{}", d.sentence);
    assert_eq!(k.failures(), 0);
}

#[test]
fn an_isolated_primary_serves_again_when_only_the_standby_answers() {
    let (mut k, s) = primary_holding_lease_naming_standby(0);
    assert_eq!(k.step(&cut_off(3000, 3100), &s).to, Isolated);
    let standby_only = with_lease(
        tick(4000, false, Some(Heartbeat::Answered)),
        Lease::Unreachable("timeout".into()),
    );
    let d = k.step(&standby_only, &s);
    assert_eq!(
        (d.to, d.actions.clone()),
        (MasterConnected, vec![ResumeServing])
    );
    assert!(
        d.sentence.contains("witness cannot be reached"),
        "{}",
        d.sentence
    );
    // Its deadline runs from that answer.
    assert_eq!(k.serve_deadline_ms(&s), Some(7000));
}

#[test]
fn an_isolated_primary_that_was_superseded_fences_itself() {
    let (mut k, s) = primary_holding_lease_naming_standby(0);
    assert_eq!(k.step(&cut_off(3000, 3100), &s).to, Isolated);
    let taken = with_lease(
        tick(5000, false, no_answer()),
        Lease::Peer {
            newer: true,
            expired: false,
            names_me: false,
        },
    );
    let d = k.step(&taken, &s);
    assert_eq!((d.to, d.actions.clone()), (Fenced, vec![Fence]));
}

#[test]
fn a_primary_whose_lease_names_no_standby_keeps_serving_when_cut_off() {
    // Released: nobody can take the lease, so serving alone cannot give two primaries.
    let (mut k, s) = primary_holding_lease_naming_standby(0);
    k.action_done(ReleaseStandby);
    assert_eq!(k.serve_deadline_ms(&s), None);
    for t in 1..10 {
        let d = k.step(&cut_off(t * 1000, t * 1000 + 900), &s);
        assert_ne!(d.to, Isolated);
    }
    // A renewal that names nobody does the same; one that names the standby, even unanswered,
    // puts the deadline back.
    let (mut k, s) = primary_holding_lease_naming_standby(0);
    assert!(!k.lease_names_standby(false, 10, None));
    k.step(&with_lease(tick(1000, false, no_answer()), Lease::Held), &s);
    assert_eq!(k.serve_deadline_ms(&s), None);
    assert!(k.lease_names_standby(true, 10, Some(standby_at(10))));
    k.step(&cut_off(2000, 2100), &s);
    assert_eq!(k.serve_deadline_ms(&s), Some(4000));
}

#[test]
fn without_a_witness_a_primary_is_never_isolated() {
    let (mut k, s) = master_connected(3);
    for t in 1..10 {
        let d = k.step(&tick(t * 1000, false, no_answer()), &s);
        assert_ne!(d.to, Isolated);
        if d.to == MasterAsync {
            break;
        }
    }
}

#[test]
fn a_primary_that_starts_cut_off_does_not_serve_until_it_reaches_one() {
    // After a restart it cannot know what the lease says, nor since when.
    let s = settings(3);
    let mut k = Keeper::new();
    k.step(&Input::Identified { in_recovery: false }, &s);
    let d = k.step(&cut_off(0, 900), &s);
    assert_eq!((d.to, d.actions.clone()), (Isolated, vec![StopServing]));
    assert!(
        d.sentence.contains("since the keeper started"),
        "{}",
        d.sentence
    );
    let mut k = Keeper::new();
    k.step(&Input::Identified { in_recovery: false }, &s);
    let answered = with_lease(
        tick(0, false, Some(Heartbeat::Answered)),
        Lease::Unreachable("down".into()),
    );
    assert_ne!(k.step(&answered, &s).to, Isolated);
    // A paused keeper stops serving too: the standby's takeover is not paused with it.
    let mut k = Keeper::new();
    k.step(&Input::Identified { in_recovery: false }, &s);
    k.set_paused(true);
    assert_eq!(k.step(&cut_off(0, 900), &s).actions, vec![StopServing]);
}

#[test]
fn a_standby_listed_sync_counts_as_synchronous_only_if_the_primary_trusts_it() {
    let answer = |trusted: Option<&str>| PeerAnswer {
        in_recovery: false,
        timeline: Some(1),
        sync_state_of_asker: Some("sync".into()),
        uses_witness: Some(false),
        trusted_standby: trusted.map(str::to_string),
    };
    let says = |trusted| {
        Observation {
            in_recovery: true,
            ..Observation::default()
        }
        .with_answer(Some(&answer(trusted)), 1, "node2")
        .peer_says_synchronous
    };
    assert_eq!(says(Some("node2")), Some(true));
    // Back from async, listed sync but not yet holding what was acknowledged without it.
    assert_eq!(says(Some("")), Some(false));
    assert_eq!(says(Some("node3")), Some(false));
    // A primary whose keeper says nothing (hidden from the heartbeat's user): sync_state alone.
    assert_eq!(says(None), Some(true));
    // The primary says so once its trust confirms the standby.
    let (mut k, _) = master_connected(3);
    assert!(!k.trusts_standby());
    let mut trusted = false;
    for _ in 0..3 {
        trusted = k.lease_names_standby(true, 10, Some(standby_at(10)));
    }
    assert!(trusted && k.trusts_standby());
}

#[test]
fn a_standby_the_primary_does_not_list_is_warned_about_after_three_answers_in_a_row() {
    let mut k = Keeper::new();
    // Answered, not listed, streaming: the first two may be a link reset.
    assert!(!k.unlisted_standby(true, false, true));
    assert!(!k.unlisted_standby(true, false, true));
    assert!(k.unlisted_standby(true, false, true));
    assert!(k.unlisted_standby(true, false, true), "and while it lasts");
    // Listed again: the count starts afresh.
    assert!(!k.unlisted_standby(true, true, true));
    assert!(!k.unlisted_standby(true, false, true));
    assert!(!k.unlisted_standby(true, false, true));
    // No answer of a primary, or a WAL receiver that does not stream, is no evidence either
    // way, and breaks the run.
    assert!(!k.unlisted_standby(false, false, true));
    assert!(!k.unlisted_standby(true, false, true));
    assert!(!k.unlisted_standby(true, false, false));
    for _ in 0..UNLISTED_BEFORE_WARNING - 1 {
        assert!(!k.unlisted_standby(true, false, true));
    }
    assert!(k.unlisted_standby(true, false, true));
}

fn row(name: &str, sync_state: &str, flush_lsn: u64) -> StandbyRow {
    StandbyRow {
        application_name: name.into(),
        sync_state: sync_state.into(),
        lag_bytes: Some(0),
        flush_lsn: Some(flush_lsn),
        reply_age_ms: Some(10),
    }
}

#[test]
fn the_peer_is_the_standby_under_its_node_name_or_a_single_one_under_another() {
    let node2 = row("node2", "sync", 20);
    let node3 = row("node3", "async", 30);
    let both = [node3.clone(), node2.clone()];
    assert_eq!(peer_row(&both, Some("node2")), Some(&node2));
    // A single standby under another name (cluster_name, walreceiver) is taken for the peer.
    let alone = std::slice::from_ref(&node3);
    assert_eq!(peer_row(alone, Some("node2")), Some(&node3));
    // Several, none under the peer's name: none is the peer.
    let others = [node3.clone(), row("node4", "sync", 40)];
    assert_eq!(peer_row(&others, Some("node2")), None);
    assert_eq!(peer_row(&[], Some("node2")), None);
}

#[test]
fn the_replication_view_says_what_the_peer_row_and_every_standby_show() {
    let mut node2 = row("node2", "async", 20);
    node2.reply_age_ms = Some(5000);
    let node3 = row("node3", "sync", 30);
    let v = ReplicationView::of(
        &[node2.clone(), node3.clone()],
        Some("node2"),
        true,
        3000,
        0,
    );
    // Streaming and caught up are said of any standby; the trust and the replies of the peer's.
    assert!(v.streaming && v.caught_up);
    assert_eq!(
        v.peer,
        Some(StandbySeen {
            synchronous: false,
            flush_lsn: 20
        })
    );
    assert!(!v.peer_replies_recent, "the peer replied 5 s ago");
    // Without synchronous_standby_names, any streaming standby counts, and none is synchronous.
    let v = ReplicationView::of(std::slice::from_ref(&node3), Some("node2"), false, 3000, 0);
    assert!(v.streaming && v.peer_replies_recent);
    assert_eq!(v.peer.map(|p| p.synchronous), Some(false));
    // A standby that has not reported a flush position yet is no peer to trust.
    node2.flush_lsn = None;
    node2.lag_bytes = None;
    let v = ReplicationView::of(&[node2], Some("node2"), true, 3000, 0);
    assert!(!v.streaming && !v.caught_up && v.peer.is_none());
}

/// A standby tick with the primary's answer, the WAL receiver's state and a clean shutdown
/// announcement (or none).
fn restart_tick(
    now_ms: u64,
    hb: Option<Heartbeat>,
    streaming: bool,
    announced: Option<u64>,
) -> Input {
    match standby_tick(now_ms, hb, streaming, Some(true)) {
        Input::Tick(obs) => Input::Tick(Observation {
            peer_announced_shutdown_ms: announced,
            heartbeat_timed_out: false,
            ..obs
        }),
        other => other,
    }
}

fn refused_as(why: &str) -> Option<Heartbeat> {
    Some(Heartbeat::Refused(why.into()))
}

fn with_grace(s: Settings, ms: u64) -> Settings {
    Settings {
        restart_grace_ms: ms,
        ..s
    }
}

#[test]
fn a_planned_restart_of_the_primary_is_not_failed_over_even_at_one_failure() {
    let (mut k, s) = standby_connected(1);
    let s = with_grace(s, 30_000);
    // The kept session was ended by a fast shutdown at 100 ms; the heartbeat finds the
    // primary shutting down, then gone, then starting up.
    let d = k.step(
        &restart_tick(150, refused_as("shutting down"), true, Some(100)),
        &s,
    );
    assert_eq!(
        (d.event, d.to, d.level),
        (E::PeerRestarting, StandbyConnected, Level::Log)
    );
    assert!(k.polls_fast(150, &s));
    let d = k.step(&restart_tick(250, no_answer(), false, None), &s);
    assert_eq!((d.event, d.to), (E::PeerRestarting, StandbyConnected));
    assert_eq!(d.level, Level::Debug, "said once per restart");
    assert_eq!(k.failures(), 0);
    let d = k.step(
        &restart_tick(350, refused_as("starting up"), false, None),
        &s,
    );
    assert_eq!((d.event, d.to), (E::PeerRestarting, StandbyConnected));
    // Back: the WAL receiver is woken at once, then every tick until it streams.
    let d = k.step(
        &restart_tick(450, Some(Heartbeat::Answered), false, None),
        &s,
    );
    assert_eq!(
        (d.event, d.actions.clone()),
        (E::PeerBack, vec![WakeWalReceiver])
    );
    assert!(
        d.sentence
            .contains("350 ms after it announced a clean shutdown"),
        "{}",
        d.sentence
    );
    let d = k.step(
        &restart_tick(550, Some(Heartbeat::Answered), false, None),
        &s,
    );
    assert_eq!(
        (d.event, d.actions),
        (E::PeerBackNotStreaming, vec![WakeWalReceiver])
    );
    assert!(k.polls_fast(550, &s));
    let d = k.step(
        &restart_tick(650, Some(Heartbeat::Answered), true, None),
        &s,
    );
    assert_eq!((d.event, d.actions), (E::HeartbeatOk, vec![]));
    assert!(!k.polls_fast(650, &s));
    // Over: the next loss is a failure again.
    let d = k.step(&restart_tick(1650, no_answer(), false, None), &s);
    assert_eq!((d.event, d.to), (E::PeerLost, Promoting));
}

#[test]
fn a_worker_restarted_during_the_grace_keeps_it() {
    let (mut k, s) = standby_connected(1);
    let s = with_grace(s, 30_000);
    k.step(&restart_tick(100, no_answer(), false, Some(100)), &s);
    // The worker restarts (its clock goes on): the new one still counts nothing.
    let mut r = Keeper::resume(&k.memory());
    assert!(r.in_restart_grace(5_000, &s));
    assert!(r.polls_fast(5_000, &s));
    let d = r.step(&restart_tick(5_000, no_answer(), false, None), &s);
    assert_eq!((d.event, d.to), (E::PeerRestarting, StandbyConnected));
    assert_eq!(r.failures(), 0);
    // Back: woken as by the first worker.
    let d = r.step(
        &restart_tick(6_000, Some(Heartbeat::Answered), false, None),
        &s,
    );
    assert_eq!((d.event, d.actions), (E::PeerBack, vec![WakeWalReceiver]));
    // A restart after the grace is over: failures count at once.
    let mut late = Keeper::resume(&k.memory());
    assert!(!late.in_restart_grace(30_100, &s));
    let d = late.step(&restart_tick(30_100, no_answer(), false, None), &s);
    assert_eq!((d.event, d.to), (E::PeerLost, Promoting));
}

#[test]
fn a_planned_stop_that_does_not_come_back_is_failed_over_after_the_grace() {
    let (mut k, s) = standby_connected(2);
    let s = with_grace(s, 30_000);
    k.step(&restart_tick(100, no_answer(), false, Some(100)), &s);
    let d = k.step(&restart_tick(29_999, no_answer(), false, None), &s);
    assert_eq!(d.event, E::PeerRestarting);
    assert!(k.polls_fast(29_999, &s));
    // After the grace: the regular count at the regular interval.
    assert!(!k.polls_fast(30_100, &s));
    let d = k.step(&restart_tick(30_100, no_answer(), false, None), &s);
    assert_eq!((d.event, d.to), (E::HeartbeatFailed, StandbyConnected));
    let d = k.step(&restart_tick(31_100, no_answer(), false, None), &s);
    assert_eq!((d.event, d.to), (E::PeerLost, Promoting));
}

#[test]
fn without_an_announcement_or_a_grace_or_on_the_primary_a_loss_counts_at_once() {
    // No announcement: a crash.
    let (mut k, s) = standby_connected(1);
    let s = with_grace(s, 30_000);
    let d = k.step(&restart_tick(100, no_answer(), false, None), &s);
    assert_eq!(d.event, E::PeerLost);
    // No grace.
    let (mut k, s) = standby_connected(1);
    let d = k.step(&restart_tick(100, no_answer(), false, Some(50)), &s);
    assert_eq!(d.event, E::PeerLost);
    // The primary does not wait for a standby that shuts down cleanly: commits would hang.
    let (mut k, s) = master_connected(1);
    let s = with_grace(s, 30_000);
    let d = match tick(100, false, no_answer()) {
        Input::Tick(obs) => k.step(
            &Input::Tick(Observation {
                standby_streaming: false,
                peer_announced_shutdown_ms: Some(50),
                heartbeat_timed_out: false,
                ..obs
            }),
            &s,
        ),
        _ => unreachable!(),
    };
    assert_eq!(d.event, E::PeerLostSync);
}

#[test]
fn a_primary_back_whose_wal_receiver_never_streams_is_woken_for_a_bounded_time() {
    let (mut k, s) = standby_connected(1);
    let s = with_grace(s, 30_000);
    k.step(&restart_tick(100, no_answer(), false, Some(100)), &s);
    let d = k.step(
        &restart_tick(200, Some(Heartbeat::Answered), false, None),
        &s,
    );
    assert_eq!(d.event, E::PeerBack);
    let d = k.step(
        &restart_tick(
            200 + WAKE_FOR_MS - 1,
            Some(Heartbeat::Answered),
            false,
            None,
        ),
        &s,
    );
    assert_eq!(d.event, E::PeerBackNotStreaming);
    let d = k.step(
        &restart_tick(200 + WAKE_FOR_MS, Some(Heartbeat::Answered), false, None),
        &s,
    );
    assert_eq!((d.event, d.actions), (E::HeartbeatOk, vec![]));
    assert!(!k.polls_fast(200 + WAKE_FOR_MS, &s));
    // And a loss after that counts at once.
    let d = k.step(
        &restart_tick(300 + WAKE_FOR_MS, no_answer(), false, None),
        &s,
    );
    assert_eq!(d.event, E::PeerLost);
}

fn superseded_tick(lease: Lease) -> Input {
    match tick(100, false, Some(Heartbeat::Answered)) {
        Input::Tick(obs) => Input::Tick(Observation {
            peer_newer_primary: true,
            lease,
            ..obs
        }),
        other => other,
    }
}

#[test]
fn with_auto_rejoin_a_superseded_primary_starts_the_rejoin_before_it_fences_itself() {
    let rejoining = |s: &Settings| Settings {
        auto_rejoin: true,
        ..s.clone()
    };
    // Off: fenced, nothing else.
    let (mut k, s) = master_connected(1);
    let d = k.step(&superseded_tick(Lease::NotConfigured), &s);
    assert_eq!((d.to, d.actions), (Fenced, vec![Fence]));
    // On: the rejoin process first (it waits for the server to stop), then the fence.
    let (mut k, s) = master_connected(1);
    let d = k.step(&superseded_tick(Lease::NotConfigured), &rejoining(&s));
    assert_eq!((d.to, d.actions), (Fenced, vec![Rejoin, Fence]));
    assert_eq!(k.next_action(), Some(Rejoin));
    // Superseded by the lease (it names the other node): the same.
    let (mut k, s) = master_connected(1);
    let by_lease = Lease::Peer {
        newer: true,
        expired: false,
        names_me: false,
    };
    let d = k.step(
        &match tick(100, false, no_answer()) {
            Input::Tick(obs) => Input::Tick(Observation {
                lease: by_lease,
                ..obs
            }),
            other => other,
        },
        &rejoining(&s),
    );
    assert_eq!(
        (d.event, d.actions),
        (E::SupersededByLease, vec![Rejoin, Fence])
    );
    // Never while the lease names this node as its holder: it may hold commits acknowledged
    // under it, which a rewind would throw away.
    for lease in [Lease::Held, Lease::Taken] {
        let (mut k, s) = master_connected(1);
        let d = k.step(&superseded_tick(lease.clone()), &rejoining(&s));
        assert_eq!((d.to, d.actions), (Fenced, vec![Fence]), "{lease:?}");
    }
    // Paused: fenced, and the operator rejoins.
    let (mut k, s) = master_connected(1);
    k.set_paused(true);
    let d = k.step(&superseded_tick(Lease::NotConfigured), &rejoining(&s));
    assert_eq!(d.actions, vec![Fence]);
}

#[test]
fn a_rejoin_process_that_cannot_start_still_fences() {
    let (mut k, s) = master_connected(1);
    let s = Settings {
        auto_rejoin: true,
        ..s
    };
    k.step(&superseded_tick(Lease::NotConfigured), &s);
    let d = k.step(&Input::ActionFailed(Rejoin, "no bash".into()), &s);
    assert_eq!(
        (d.event, d.to, d.actions),
        (E::RejoinFailed, Fenced, vec![Fence])
    );
    assert_eq!(k.next_action(), Some(Fence));
}

#[test]
fn a_heartbeat_that_times_out_ends_the_restart_grace() {
    // The kept session was ended with the words of a shutdown (pg_terminate_backend, say), but
    // the primary does not answer at all: hung, not restarting.
    let (mut k, s) = standby_connected(1);
    let s = with_grace(s, 30_000);
    let timed_out =
        |now: u64, announced: Option<u64>| match restart_tick(now, no_answer(), false, announced) {
            Input::Tick(obs) => Input::Tick(Observation {
                heartbeat_timed_out: true,
                ..obs
            }),
            other => other,
        };
    let d = k.step(&timed_out(100, Some(90)), &s);
    assert_eq!((d.event, d.to), (E::PeerLost, Promoting));
    // A refusal in the grace is forgiven, then a timeout is counted.
    let (mut k, s) = standby_connected(2);
    let s = with_grace(s, 30_000);
    let d = k.step(&restart_tick(100, no_answer(), false, Some(90)), &s);
    assert_eq!(d.event, E::PeerRestarting);
    let d = k.step(&timed_out(1100, None), &s);
    assert_eq!(d.event, E::HeartbeatFailed);
    assert!(!k.polls_fast(1100, &s));
}
