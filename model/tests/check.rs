//! The checker, inside `cargo test`: every scenario exhaustively to its depth with no
//! counterexample, and every review bug, switched back on, found.
use std::time::Instant;

use authd_model::{Bugs, Change, Config, Faults, Origin, Protocol, properties, scenarios};
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
        .target_max_depth(scenarios::DEPTH)
        .spawn_bfs()
        .join();
    let found = checker.discoveries();
    eprintln!(
        "{name}: depth {}, {} states ({} unique), {:.1}s",
        scenarios::DEPTH,
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
