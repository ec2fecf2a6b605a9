//! What one run of the checker explores: the fleet, the change, the faults allowed, the time
//! bounds — and which of the bugs found in review is switched back on.

/// One authd instance's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Node {
    /// `LOCAL_CACHE__ENABLED`.
    pub local: bool,
    /// `REDIS__ENABLED`.
    pub redis: bool,
    /// `LOCAL_CACHE__LEASE`, in ticks: what this instance is configured with (the fleet's lease
    /// is what it uses, unless [`Bugs::own_lease`]).
    pub lease: u8,
}

impl Node {
    pub const CACHED: Node = Node {
        local: true,
        redis: true,
        lease: 4,
    };
    pub const REDIS_ONLY: Node = Node {
        local: false,
        redis: true,
        lease: 4,
    };
    pub const NO_REDIS: Node = Node {
        local: false,
        redis: false,
        lease: 4,
    };
}

/// What the revoking caller does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Change {
    /// Logout (and every call that revokes through the same path: RevokeSession,
    /// RevokeAllSessions, ChangePassword, DisableUser, the AdminService revocations), retried
    /// after a partial failure.
    Logout,
    /// A Login at the session cap evicting the session (not retried: a new Login evicts another).
    Eviction,
    /// UpdateProfile, retried: every attempt writes a version of its own.
    UpdateProfile,
}

/// The bugs of the review "Revocation by construction", each switched back on by its flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Bugs {
    /// Case 1: a revoking statement covers only rows that are new or logged after the revoker's
    /// log position, so a retry whose first attempt's row is behind it waits for nobody.
    pub retry_from_position: bool,
    /// Case 2: a Login's eviction at the session cap only publishes, it does not wait.
    pub eviction_without_wait: bool,
    /// Case 3: local copies are trusted on the lease and the heartbeat alone, not on the
    /// follower's freshness.
    pub local_ignores_follower: bool,
    /// Case 4: every instance holds leases of its own configured length (no fleet lease).
    pub own_lease: bool,
    /// Case 5: a renewal drops each log row once, and fills are not checked against the rows
    /// it read (a copy refilled from Redis before the revoker's write stays).
    pub rows_dropped_once: bool,
    /// No new timeline is noticed after a PostgreSQL failover: instances keep their copies and
    /// revokers trust the lease table the standby had.
    pub timeline_ignored: bool,
    /// Found arguing "Costs that do not grow with the fleet" here: a follower that skips a row
    /// another instance announced as applied also skips dropping its local copy, which the
    /// previous release (waiting for nobody) relies on within the bound.
    pub follower_drops_only_what_it_writes: bool,
    /// Found arguing "Callers validate in their own memory": a subscriber keeps a validation it
    /// fetched from authd though the stream had already shown the key changed (an instance
    /// still waited for may answer from its old copy).
    pub subscriber_fills_below_floor: bool,
    /// The host records a subscriber's `applied_through` as the time of the extension, not of
    /// the pass whose events the subscriber acknowledged.
    pub subscriber_applied_through_at_extension: bool,
    /// The host relays a revoker's message as acknowledged by a subscriber on a pass that began
    /// before the message arrived.
    pub subscriber_acks_pass_before_message: bool,
    /// A new subscription starts at the log's end: revocations of the last horizon set no
    /// floors in it.
    pub subscriber_starts_at_the_end: bool,
    /// Found checking the subscriber beside the previous release: a subscriber trusts its
    /// memory on its lease alone, however old the last pass it applied (a revocation no one
    /// waits for is served past the bound).
    pub subscriber_trusts_stale_passes: bool,
}

/// Which faults the environment may inject (each costs one of [`Config::faults`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Faults {
    /// Cut and heal an instance's link to PostgreSQL.
    pub pg_link: bool,
    /// Cut and heal an instance's link to Redis.
    pub redis_link: bool,
    /// SIGSTOP and SIGCONT an instance.
    pub pause: bool,
    /// Lose a pub/sub message (with the receiver's reconnection, or silently).
    pub message_loss: bool,
    /// FLUSHALL, a restart that loses everything.
    pub redis_data_loss: bool,
    /// A Redis failover to a replica that missed the last write.
    pub redis_failover: bool,
    /// A PostgreSQL failover to an asynchronous standby that missed the last commits.
    pub pg_failover: bool,
    /// A subscriber's event stream breaks.
    pub stream_cut: bool,
}

impl Faults {
    pub const ALL_BUT_FAILOVERS: Faults = Faults {
        pg_link: true,
        redis_link: true,
        pause: true,
        message_loss: true,
        redis_data_loss: true,
        redis_failover: false,
        pg_failover: false,
        stream_cut: true,
    };
    pub const NONE: Faults = Faults {
        pg_link: false,
        redis_link: false,
        pause: false,
        message_loss: false,
        redis_data_loss: false,
        redis_failover: false,
        pg_failover: false,
        stream_cut: false,
    };
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Instance 0 is where the first attempt of the change runs; retries may go anywhere.
    pub nodes: Vec<Node>,
    pub change: Change,
    pub bugs: Bugs,
    pub faults: Faults,
    /// How many faults one run may inject.
    pub fault_budget: u8,
    /// Attempts of the change (1: no retry).
    pub attempts: u8,
    /// Validations (or profile reads) callers may start, across the fleet.
    pub reads: u8,
    /// The instances reads are sent to (a bit each).
    pub readers: u8,
    /// Retries may go to any instance (else to the first attempt's).
    pub retry_anywhere: bool,
    /// The key is in use before the change: a copy in Redis and in every cache.
    pub warm_copies: bool,
    /// The previous release revokes (or updates) too, without waiting for anyone.
    pub legacy_writer: bool,
    /// The fleet's lease, in ticks.
    pub lease: u8,
    /// README's one bound (`SESSION__INVALIDATION_INTERVAL + REDIS__COMMAND_TIMEOUT`), in ticks:
    /// a follower pass makes copies servable for this long after it began.
    pub bound: u8,
    /// `GRPC__REQUEST_TIMEOUT`, in ticks.
    pub request_timeout: u8,
    /// A caller subscribed in strict mode (holding a lease) to the event stream of this
    /// instance, if any.
    pub subscriber: Option<u8>,
    /// Validations the subscriber may make (answered from its memory, or fetched from authd).
    pub subscriber_reads: u8,
}

impl Config {
    /// Two instances with everything on, the fault classes of the issue, one retry.
    pub fn standard(change: Change) -> Self {
        Config {
            nodes: vec![Node::CACHED, Node::CACHED],
            change,
            bugs: Bugs::default(),
            faults: Faults::ALL_BUT_FAILOVERS,
            fault_budget: 2,
            attempts: 2,
            reads: 2,
            readers: u8::MAX,
            retry_anywhere: true,
            warm_copies: false,
            legacy_writer: false,
            lease: 4,
            bound: 2,
            request_timeout: 6,
            subscriber: None,
            subscriber_reads: 0,
        }
    }

    pub fn with_bugs(mut self, bugs: Bugs) -> Self {
        self.bugs = bugs;
        self
    }

    pub(crate) fn lease_of(&self, node: usize) -> u8 {
        if self.bugs.own_lease {
            self.nodes[node].lease
        } else {
            self.lease
        }
    }

    /// The lease a node's request timeout was checked against at startup: the fleet's (or, with
    /// [`Bugs::own_lease`], its own).
    pub(crate) fn checked_lease(&self, node: usize) -> u8 {
        self.lease_of(node)
    }

    /// Ages saturate here: nothing compares durations longer than this.
    pub(crate) fn cap(&self) -> u8 {
        let longest = self.nodes.iter().map(|n| n.lease).max().unwrap_or(0);
        longest
            .max(self.lease)
            .max(self.request_timeout)
            .max(self.bound)
            + 1
    }
}
