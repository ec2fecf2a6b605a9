//! The checker, inside `cargo test`: every scenario exhaustively to its depth with no
//! counterexample, and every review bug, switched back on, found.
use std::time::Instant;

use authd_model::{
    Action, Bugs, Change, Config, Faults, Origin, Protocol, Violation, properties, scenarios,
    state::Wire,
};
use stateright::{Checker, HasDiscoveries, Model};

/// Checks one scenario to its depth: no counterexample, and the change returns.
fn clean(name: &str) {
    let (_, cfg) = scenarios::all()
        .into_iter()
        .find(|(n, _)| *n == name)
        .expect("a scenario of that name");
    let started = Instant::now();
    let checker = Protocol { cfg }
        .checker()
        .threads(2)
        .target_max_depth(scenarios::depth(name))
        .spawn_bfs()
        .join();
    let found = checker.discoveries();
    eprintln!(
        "{name}: depth {}, {} states ({} unique), {:.1}s",
        scenarios::depth(name),
        checker.state_count(),
        checker.unique_state_count(),
        started.elapsed().as_secs_f64()
    );
    for property in properties::SAFETY {
        if let Some(path) = found.get(property) {
            panic!(
                "{name}: counterexample to {property:?}:\n{:#?}",
                path.clone().into_actions()
            );
        }
    }
    assert!(
        found.contains_key(properties::RETURNS),
        "{name}: never returns"
    );
}

macro_rules! scenario_tests {
    ($($test:ident: $name:literal),* $(,)?) => {
        $(#[test] fn $test() { clean($name) })*

        #[test]
        fn every_scenario_has_a_test() {
            let tested = [$($name),*];
            for (name, _) in scenarios::all() {
                assert!(tested.contains(&name), "scenario {name} has no test");
            }
        }
    };
}

scenario_tests! {
    retry_after_postgres_cuts: "retry-after-postgres-cuts",
    retry_while_the_key_is_in_use: "retry-while-the-key-is-in-use",
    retry_from_an_instance_without_redis: "retry-from-an-instance-without-redis",
    retry_from_an_instance_with_the_cache_off: "retry-from-an-instance-with-the-cache-off",
    paused_or_deaf_instances: "paused-or-deaf-instances",
    lost_messages: "lost-messages",
    redis_data_loss: "redis-data-loss",
    eviction_at_the_session_cap: "eviction-at-the-session-cap",
    update_profile_retried: "update-profile-retried",
    update_profile_lost_messages: "update-profile-lost-messages",
    previous_release_beside: "previous-release-beside",
    postgres_failover: "postgres-failover",
    redis_failover: "redis-failover",
    subscriber_on_the_revoker: "subscriber-on-the-revoker",
    subscriber_elsewhere_lost_messages: "subscriber-elsewhere-lost-messages",
    subscriber_stream_cut_or_paused: "subscriber-stream-cut-or-paused",
    subscriber_profile: "subscriber-profile",
    subscriber_beside_the_previous_release: "subscriber-beside-the-previous-release",
}

/// The shortest counterexample to `property` within `depth` (breadth first), printed.
fn counterexample(cfg: Config, depth: usize, property: &'static str) -> Vec<authd_model::Action> {
    let checker = Protocol { cfg }
        .checker()
        .threads(2)
        .target_max_depth(depth)
        .finish_when(HasDiscoveries::AnyFailures)
        .spawn_bfs()
        .join();
    let path = checker
        .discovery(property)
        .unwrap_or_else(|| panic!("no counterexample to {property:?} within depth {depth}"));
    let actions = path.into_actions();
    eprintln!("counterexample to {property:?}:");
    for a in &actions {
        eprintln!("  {a:?}");
    }
    actions
}

/// A holder with the key in memory, faults of one kind, retries on the same instance.
fn targeted(change: Change, faults: Faults, bugs: Bugs) -> Config {
    let mut cfg = Config::standard(change).with_bugs(bugs);
    cfg.faults = faults;
    cfg.fault_budget = 1;
    cfg.readers = 0b10;
    cfg.retry_anywhere = false;
    cfg.warm_copies = true;
    cfg
}

const LINKS: Faults = Faults {
    pg_link: true,
    ..Faults::NONE
};
const LOSSES: Faults = Faults {
    message_loss: true,
    ..Faults::NONE
};

#[test]
fn case_1_a_retry_that_covers_only_rows_after_its_log_position_is_found() {
    let bugs = Bugs {
        retry_from_position: true,
        ..Bugs::default()
    };
    counterexample(
        targeted(Change::Logout, LINKS, bugs),
        16,
        properties::PROMISE,
    );
}

#[test]
fn case_2_an_eviction_that_only_announces_is_found() {
    let bugs = Bugs {
        eviction_without_wait: true,
        ..Bugs::default()
    };
    let mut cfg = targeted(Change::Eviction, Faults::NONE, bugs);
    cfg.attempts = 1;
    counterexample(cfg, 12, properties::PROMISE);
}

#[test]
fn case_3_memory_trusted_past_the_follower_is_found() {
    let bugs = Bugs {
        local_ignores_follower: true,
        ..Bugs::default()
    };
    let mut cfg = targeted(Change::Logout, Faults::NONE, bugs);
    cfg.legacy_writer = true;
    cfg.attempts = 0;
    counterexample(cfg, 12, properties::BOUND);
}

#[test]
fn case_4_a_holder_on_a_longer_lease_is_found() {
    let bugs = Bugs {
        own_lease: true,
        ..Bugs::default()
    };
    let mut cfg = targeted(Change::Logout, Faults::NONE, bugs);
    cfg.nodes[1].lease = 6;
    counterexample(cfg, 12, properties::TIMEOUT);
}

#[test]
fn case_5_a_row_read_before_the_redis_write_and_dropped_once_is_found() {
    let bugs = Bugs {
        rows_dropped_once: true,
        ..Bugs::default()
    };
    let mut cfg = targeted(Change::Logout, LOSSES, bugs);
    cfg.attempts = 1;
    counterexample(cfg, 16, properties::PROMISE);
}

#[test]
fn a_postgres_failover_whose_timeline_goes_unnoticed_is_found() {
    let bugs = Bugs {
        timeline_ignored: true,
        ..Bugs::default()
    };
    let faults = Faults {
        pg_failover: true,
        ..Faults::NONE
    };
    let mut cfg = targeted(Change::Logout, faults, bugs);
    cfg.attempts = 1;
    counterexample(cfg, 14, properties::PROMISE);
}

#[test]
fn a_follower_that_drops_only_the_rows_it_writes_is_found() {
    let bugs = Bugs {
        follower_drops_only_what_it_writes: true,
        ..Bugs::default()
    };
    let mut cfg = targeted(Change::Logout, LINKS, bugs);
    cfg.legacy_writer = true;
    cfg.attempts = 1;
    counterexample(cfg, 13, properties::BOUND);
}

/// A strict subscriber hosted on `host`, with the key in its memory and in the other
/// instance's, no faults but the stream's.
fn subscribed(host: u8, bugs: Bugs) -> Config {
    let mut cfg = targeted(Change::Logout, Faults::NONE, bugs);
    cfg.faults.stream_cut = true;
    cfg.subscriber = Some(host);
    cfg.subscriber_reads = 2;
    cfg.reads = 0;
    cfg.attempts = 1;
    cfg
}

/// One step of a replayed path: an action, or the delivery of the first message that matches.
enum Step {
    Do(Action),
    Deliver(fn(&Wire) -> bool),
}
use Step::{Deliver, Do};

/// Replays `path` (every step must be enabled) and answers the violation it ends in. The
/// subscriber's counterexamples are 14 to 16 steps long: the checker's breadth-first search
/// to that depth does not fit the test's budget (tens of millions of states), so each is
/// replayed, with its bug on and off.
fn replay(cfg: Config, path: &[Step]) -> Option<Violation> {
    let protocol = Protocol { cfg };
    let mut state = protocol.init_states().remove(0);
    for (n, step) in path.iter().enumerate() {
        let action = match step {
            Do(action) => *action,
            Deliver(matches) => {
                let Some(k) = state.wire.iter().position(matches) else {
                    return state.violation;
                };
                Action::Deliver(k as u8)
            }
        };
        let mut enabled = Vec::new();
        protocol.actions(&state, &mut enabled);
        if !enabled.contains(&action) {
            eprintln!("step {n}: {action:?} is not enabled");
            return state.violation;
        }
        state = protocol
            .next_state(&state, action)
            .expect("a step changes the state");
    }
    state.violation
}

/// `path` breaks the promise with `bug` on, and not with it off.
fn found_only_with(bug: fn(&mut Bugs), host: u8, path: &[Step]) {
    found_in(bug, subscribed, host, path);
}

/// `path` breaks a promise in the configuration `cfg` makes with `bug` on, and not with it off.
fn found_in(bug: fn(&mut Bugs), cfg: fn(u8, Bugs) -> Config, host: u8, path: &[Step]) {
    let mut bugs = Bugs::default();
    bug(&mut bugs);
    let broken = replay(cfg(host, bugs), path);
    assert!(
        matches!(
            broken,
            Some(Violation::Revocation { .. } | Violation::Bound { .. })
        ),
        "with the bug on: {broken:?}"
    );
    let fixed = replay(cfg(host, Bugs::default()), path);
    assert_eq!(fixed, None, "with the bug off");
}

#[test]
fn a_subscriber_trusting_a_stale_pass_beside_the_previous_release_is_found() {
    // The previous release revokes and waits for nobody; the host makes no pass (stalled):
    // the subscriber answers from memory past the bound.
    let beside = |host, bugs| {
        let mut cfg = subscribed(host, bugs);
        cfg.legacy_writer = true;
        cfg.attempts = 0;
        cfg
    };
    found_in(
        |b| b.subscriber_trusts_stale_passes = true,
        beside,
        1,
        &[
            Do(Action::LegacyWrite { redis: false }),
            Do(Action::Tick),
            Do(Action::Tick),
            Do(Action::SubRead { sub: 0, via: 1 }),
        ],
    );
}

fn to_host_from_revoker(w: &Wire) -> bool {
    matches!(w, Wire::Invalidation { to: 0, .. })
}
fn to_holder(w: &Wire) -> bool {
    matches!(w, Wire::Invalidation { to: 1, .. })
}
fn holders_ack(w: &Wire) -> bool {
    matches!(w, Wire::Ack { holder: 1, .. })
}
fn subscribers_ack(w: &Wire) -> bool {
    matches!(w, Wire::Ack { holder: 2, .. })
}
fn to_subscribers_host(w: &Wire) -> bool {
    matches!(w, Wire::Invalidation { to: 1, .. })
}

#[test]
fn a_subscriber_keeping_a_fetch_below_its_floor_is_found() {
    // The stream showed the revocation; the fallback ValidateSession is answered by an
    // instance the revoker still waits for, from its old copy; the subscriber keeps it.
    found_only_with(
        |b| b.subscriber_fills_below_floor = true,
        0,
        &[
            Do(Action::CallStart(0)),
            Do(Action::CallCommit),
            Do(Action::CallRedisWrite),
            Do(Action::CallReadHolders),
            Deliver(to_host_from_revoker),
            Do(Action::SubPass(0)),
            Do(Action::SubApply(0)),
            Do(Action::SubExtend(0)),
            Do(Action::SubRead { sub: 0, via: 1 }),
            Do(Action::SubKeep(0)),
            Deliver(to_holder),
            Deliver(holders_ack),
            Deliver(subscribers_ack),
            Do(Action::CallReturn),
            Do(Action::SubRead { sub: 0, via: 1 }),
        ],
    );
}

#[test]
fn a_subscriber_lease_recording_the_extension_as_applied_is_found() {
    // A pass read before the commit is acknowledged after the holders read: the extension's
    // time, recorded as applied, ends the wait.
    found_only_with(
        |b| b.subscriber_applied_through_at_extension = true,
        1,
        &[
            Do(Action::SubPass(0)),
            Do(Action::SubApply(0)),
            Do(Action::SubPass(0)),
            Do(Action::CallStart(0)),
            Do(Action::CallCommit),
            Do(Action::CallRedisWrite),
            Do(Action::CallReadHolders),
            Deliver(to_holder),
            Deliver(holders_ack),
            Do(Action::Tick),
            Do(Action::SubExtend(0)),
            Do(Action::CallPoll),
            Do(Action::CallReturn),
            Do(Action::SubRead { sub: 0, via: 1 }),
        ],
    );
}

#[test]
fn a_host_relaying_on_a_pass_older_than_the_message_is_found() {
    // The message arrives while the acknowledgement of an older pass is on its way.
    found_only_with(
        |b| b.subscriber_acks_pass_before_message = true,
        1,
        &[
            Do(Action::SubPass(0)),
            Do(Action::SubApply(0)),
            Do(Action::CallStart(0)),
            Do(Action::CallCommit),
            Do(Action::CallRedisWrite),
            Do(Action::CallReadHolders),
            Deliver(to_subscribers_host),
            Do(Action::SubExtend(0)),
            Deliver(holders_ack),
            Deliver(subscribers_ack),
            Do(Action::CallReturn),
            Do(Action::SubRead { sub: 0, via: 1 }),
        ],
    );
}

#[test]
fn a_subscription_starting_at_the_logs_end_is_found() {
    // The stream broke; the new subscription began after the revocation committed and sets
    // no floor for it; a fetch answered from an old copy is kept.
    found_only_with(
        |b| b.subscriber_starts_at_the_end = true,
        1,
        &[
            Do(Action::SubDisconnect(0)),
            Do(Action::SubRead { sub: 0, via: 1 }),
            Do(Action::CallStart(0)),
            Do(Action::CallCommit),
            Do(Action::CallRedisWrite),
            Do(Action::CallReadHolders),
            Do(Action::Tick),
            Do(Action::Tick),
            Do(Action::Tick),
            Do(Action::SubConnect(0)),
            Do(Action::SubPass(0)),
            Do(Action::SubApply(0)),
            Do(Action::SubKeep(0)),
            Do(Action::Tick),
            Do(Action::CallReturn),
            Do(Action::SubRead { sub: 0, via: 1 }),
        ],
    );
}

#[test]
fn every_action_names_a_function_that_exists() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for action in authd_model::Action::examples() {
        if let Origin::Code(file, function) = action.origin() {
            let text = std::fs::read_to_string(root.join(file))
                .unwrap_or_else(|e| panic!("{action:?} names {file}: {e}"));
            let defined = text.contains(&format!("fn {function}("))
                || text.contains(&format!("fn {function}<"));
            assert!(
                defined,
                "{action:?} names {file}::{function}, not defined there"
            );
        }
    }
}
