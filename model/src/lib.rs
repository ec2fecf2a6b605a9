//! A model of authd's revocation protocol, checked exhaustively by
//! [stateright](https://docs.rs/stateright): PostgreSQL (the key's rows, the invalidation log,
//! the lease table, its clock and timeline, a standby), Redis (a key with generations and fill
//! leases, pub/sub that delays, reorders and drops, data loss, failover), the instances (Redis
//! cache and its follower, in-process cache, lease keeper and belief, doubt), and the callers
//! (a revoking call or UpdateProfile with its retries after partial failures and deadlines, and
//! reads), under faults: links to PostgreSQL and Redis cut and healed, instances paused, messages
//! lost, Redis flushed, restarted or failed over, PostgreSQL failed over to a standby that missed
//! commits, a mixed fleet (cache off, Redis disabled) and the previous release writing beside it.
//!
//! The properties are README's two promises and its one documented bound, stated as README
//! states them (see [`properties`]): once a change returned OK, no read begun after it answers an
//! older version, unless no attempt of the change could write Redis, and then only until the
//! bound after its commit; and no wait may outlast the lease its request timeout was checked
//! against.
//!
//! [`reader`] is a second, smaller model: the follower's reading of a log once, by ids and
//! gaps.
//!
//! Each bug a review found is behind a flag of [`config::Bugs`]; the tests assert that the checker
//! finds a counterexample with each flag on, and none with all off. Each action names the function
//! of `src/` it models ([`action::Action::origin`]; a test checks they exist).
pub mod action;
pub mod config;
pub mod reader;
pub mod state;
mod step;

use stateright::{Model, Property};

pub use action::{Action, Origin};
pub use config::{Bugs, Change, Config, Faults, Node};
pub use state::{State, Violation};

/// The protocol under one [`Config`].
#[derive(Clone, Debug)]
pub struct Protocol {
    pub cfg: Config,
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![step::initial(self)]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        // A broken promise ends the run: the path to it is the counterexample.
        if state.violation.is_none() {
            self.enabled(state, actions);
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        self.apply(last, action)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        properties::all()
    }
}

/// The names of the properties, for tests and reports.
pub mod properties {
    use stateright::Property;

    use crate::{
        Protocol,
        state::{State, Violation},
    };

    /// Promise 1 and 2 of README ("Consistency guarantees"), with its one bound.
    pub const PROMISE: &str = "no read begun after a change returned OK answers an older version";
    /// The bound README states for a writer that waits for nobody (the previous release).
    pub const BOUND: &str = "a change no one waited for is served at most the bound after it";
    /// No revoking call is cut after it committed.
    pub const TIMEOUT: &str = "no wait outlasts the lease the request timeout was checked against";
    /// Sanity: the model reaches the states it is about.
    pub const RETURNS: &str = "the change can return OK";
    pub const SERVES_FROM_MEMORY: &str = "an instance can hold a copy in memory";
    /// The properties that must never have a counterexample.
    pub const SAFETY: [&str; 3] = [PROMISE, BOUND, TIMEOUT];

    pub fn all() -> Vec<Property<Protocol>> {
        vec![
            Property::always(PROMISE, |_, s: &State| {
                !matches!(s.violation, Some(Violation::Revocation { .. }))
            }),
            Property::always(BOUND, |_, s: &State| {
                !matches!(s.violation, Some(Violation::Bound { .. }))
            }),
            Property::always(TIMEOUT, |_, s: &State| {
                !matches!(s.violation, Some(Violation::WaitOutlastsTimeout { .. }))
                    && !s.call.cancelled
            }),
            Property::sometimes(RETURNS, |_, s: &State| s.call.ok.is_some()),
            Property::sometimes(SERVES_FROM_MEMORY, |_, s: &State| {
                s.nodes.iter().any(|n| n.copy.is_some())
            }),
        ]
    }
}

/// The configurations the checker explores (`cargo test` to [`scenarios::DEPTH`], the binary
/// deeper). Each puts the fleet through one family of faults (a fault budget of its own), so that
/// every interleaving of its actors fits the depth.
pub mod scenarios {
    use crate::config::{Change, Config, Faults, Node};

    /// The depth `cargo test` explores every scenario to.
    pub const DEPTH: usize = 13;
    /// The depth `cargo run --release -p authd-model` explores by default.
    pub const DEEP_DEPTH: usize = 15;
    /// The depth `cargo test` explores the scenarios with a subscriber to: its stream adds
    /// actors, and depth 13 takes a minute each (`cargo run` goes deeper).
    pub const SUBSCRIBER_DEPTH: usize = 11;

    /// The depth `cargo test` explores scenario `name` to.
    pub fn depth(name: &str) -> usize {
        if name.starts_with("subscriber") {
            SUBSCRIBER_DEPTH
        } else {
            DEPTH
        }
    }

    /// Reads on the holder, retries on the first attempt's instance.
    fn with(change: Change, faults: Faults, budget: u8) -> Config {
        let mut cfg = Config::standard(change);
        cfg.faults = faults;
        cfg.fault_budget = budget;
        cfg.readers = 0b10;
        cfg.retry_anywhere = false;
        cfg
    }

    pub fn all() -> Vec<(&'static str, Config)> {
        let links = Faults {
            pg_link: true,
            ..Faults::NONE
        };
        let stalls = Faults {
            pause: true,
            redis_link: true,
            ..Faults::NONE
        };
        let losses = Faults {
            message_loss: true,
            ..Faults::NONE
        };
        let data = Faults {
            redis_data_loss: true,
            ..Faults::NONE
        };
        // Reads and retries anywhere: each instance is a holder for the other's attempt.
        let mut retry = with(Change::Logout, links, 2);
        retry.readers = 0b11;
        retry.retry_anywhere = true;
        let mut warm_retry = with(Change::Logout, links, 1);
        warm_retry.warm_copies = true;
        let mut without_redis = with(Change::Logout, links, 1);
        without_redis.nodes = vec![Node::NO_REDIS, Node::CACHED];
        without_redis.warm_copies = true;
        let mut cache_off = with(Change::Logout, links, 1);
        cache_off.nodes = vec![Node::REDIS_ONLY, Node::CACHED];
        cache_off.warm_copies = true;
        let mut eviction = with(Change::Eviction, losses, 1);
        eviction.attempts = 1;
        eviction.warm_copies = true;
        let mut lost = with(Change::Logout, losses, 1);
        lost.warm_copies = true;
        let mut stalled = with(Change::Logout, stalls, 1);
        stalled.warm_copies = true;
        let mut profile = with(Change::UpdateProfile, links, 1);
        profile.warm_copies = true;
        let mut profile_lost = with(Change::UpdateProfile, losses, 1);
        profile_lost.warm_copies = true;
        let mut legacy = with(Change::Logout, links, 1);
        legacy.legacy_writer = true;
        legacy.attempts = 1;
        legacy.warm_copies = true;
        let mut pg_failover = with(
            Change::Logout,
            Faults {
                pg_failover: true,
                ..Faults::NONE
            },
            1,
        );
        pg_failover.warm_copies = true;
        let mut redis_failover = with(
            Change::Logout,
            Faults {
                redis_failover: true,
                ..Faults::NONE
            },
            1,
        );
        redis_failover.warm_copies = true;
        // A caller in strict mode beside the fleet, its stream on the revoker's instance or on
        // the other one.
        let subscribed = |host: u8, faults: Faults| {
            let mut cfg = with(Change::Logout, faults, 1);
            cfg.subscriber = Some(host);
            cfg.subscriber_reads = 2;
            cfg.reads = 0;
            cfg.attempts = 1;
            cfg.warm_copies = true;
            cfg
        };
        let cuts = Faults {
            stream_cut: true,
            pause: true,
            ..Faults::NONE
        };
        let mut subscribed_profile = subscribed(1, losses);
        subscribed_profile.change = Change::UpdateProfile;
        // The previous release revokes too: its log rows reach the stream (a trigger makes them
        // events), which the model's pass reads as it reads every committed version.
        let mut subscribed_legacy = subscribed(1, links);
        subscribed_legacy.legacy_writer = true;
        vec![
            ("retry-after-postgres-cuts", retry),
            ("retry-while-the-key-is-in-use", warm_retry),
            ("retry-from-an-instance-without-redis", without_redis),
            ("retry-from-an-instance-with-the-cache-off", cache_off),
            ("paused-or-deaf-instances", stalled),
            ("lost-messages", lost),
            ("redis-data-loss", with(Change::Logout, data, 1)),
            ("eviction-at-the-session-cap", eviction),
            ("update-profile-retried", profile),
            ("update-profile-lost-messages", profile_lost),
            ("previous-release-beside", legacy),
            ("postgres-failover", pg_failover),
            ("redis-failover", redis_failover),
            ("subscriber-on-the-revoker", subscribed(0, links)),
            ("subscriber-elsewhere-lost-messages", subscribed(1, losses)),
            ("subscriber-stream-cut-or-paused", subscribed(1, cuts)),
            ("subscriber-profile", subscribed_profile),
            ("subscriber-beside-the-previous-release", subscribed_legacy),
        ]
    }
}
