//! Prometheus metrics: one registry per application (so several instances in one process, as in
//! the tests, never mix their numbers), served as text on `METRICS__ADDR` `/metrics`.
use std::sync::Arc;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric authd exports; the names are documented in docs/operations.md (Metrics).
pub struct Metrics {
    registry: Registry,
    /// RPCs by service, method and gRPC status code.
    pub rpc_requests: IntCounterVec,
    /// RPC latency by service and method (unary: until the response; streams: until they start).
    pub rpc_duration: HistogramVec,
    /// Cache lookups by cache (`sessions`, `profiles`) and result (`hit`, `miss`, `negative`,
    /// `unavailable`).
    pub cache_lookups: IntCounterVec,
    /// Redis command failures by kind (`timeout`, `disconnected`, `error`).
    pub redis_errors: IntCounterVec,
    /// 1 while Redis answers, 0 while authd runs degraded (or has Redis disabled).
    pub redis_up: IntGauge,
    /// 1 when `REDIS__ENABLED` (an instance without Redis on purpose is not degraded).
    pub redis_enabled: IntGauge,
    /// PostgreSQL pool connections by state (`in_use`, `idle`), read at scrape time.
    pub db_connections: IntGaugeVec,
    /// Store operations waiting for a pooled connection (operations in flight beyond those
    /// holding a connection), read at scrape time.
    pub db_waiting: IntGaugeVec,
    pub db_share_timeouts: IntCounterVec,
    /// PostgreSQL queries by origin (`request`, `background`).
    pub db_queries: IntCounterVec,
    pub sessions_created: IntCounter,
    /// Sessions revoked, by reason (`logout`, `revoke`, `revoke_all`, `password_change`,
    /// `session_cap`, `admin`, `password_reset`, `user_deleted`).
    pub sessions_revoked: IntCounterVec,
    pub failed_logins: IntCounter,
    /// Requests refused by a rate limit, by operation (`login`, `register`, `change_password`,
    /// `password_reset`, `delete_account`, `unknown_lookup`).
    pub rate_limited: IntCounterVec,
    /// Accounts deleted, by whom (`user`, `operator`).
    pub accounts_deleted: IntCounterVec,
    /// Account flow calls by flow (see [`FLOWS`]), step (`start`, `complete`) and outcome
    /// (see [`FLOW_OUTCOMES`]).
    pub account_flows: IntCounterVec,
    /// Changes to accounts' second factors by action (see [`FACTOR_ACTIONS`]) and outcome
    /// (`done`, `invalid_code`, `refused`).
    pub second_factor_changes: IntCounterVec,
    /// Password-hash calls waiting for or holding a hashing slot.
    pub hash_queue_depth: IntGauge,
    /// Password-hash calls refused because the queue was full.
    pub hash_rejections: IntCounter,
    /// 1 while PostgreSQL answered within HEALTH__DB_GRACE.
    pub db_up: IntGauge,
    /// Per Redis primary (`node` = host:port), from the periodic check: reachable (1/0), memory
    /// in use, maxmemory, evicted keys (Redis' own counter), connected clients.
    pub redis_node_up: IntGaugeVec,
    pub redis_used_memory: IntGaugeVec,
    pub redis_maxmemory: IntGaugeVec,
    pub redis_evicted_keys: IntGaugeVec,
    pub redis_connected_clients: IntGaugeVec,
    /// 1 for the node's `maxmemory-policy` (label `policy`).
    pub redis_maxmemory_policy: IntGaugeVec,
    /// The generation of cached data being served (see docs/guarantees.md).
    pub redis_generation: IntGauge,
    /// New generations established after the first: Redis restarted, was restored or failed over.
    pub redis_generation_changes: IntCounter,
    /// Sessions not revoked and not expired, counted in PostgreSQL periodically.
    pub sessions_live: IntGauge,
    /// AdminService calls by method and outcome (the gRPC code), admitted or refused.
    pub admin_calls: IntCounterVec,
    /// In-process cache lookups by cache (`sessions`, `profiles`) and result (`hit`, `miss`,
    /// `untrusted`: copies not used because this instance holds no valid lease).
    pub local_lookups: IntCounterVec,
    /// Invalidation messages received from other instances (and applied).
    pub local_invalidations: IntCounter,
    /// How long revoking calls and profile updates waited for the other instances, by how the
    /// wait ended (`acked`, `caught_up`, `lease_ended`, `none`: no other holder).
    pub local_wait: HistogramVec,
    /// 1 when `LOCAL_CACHE__ENABLED` is on.
    pub local_enabled: IntGauge,
    /// 1 while this instance holds a valid lease (serves its local copies).
    pub local_lease_valid: IntGauge,
    /// Leases held in the fleet (this instance's included), counted once a minute.
    pub local_instances: IntGauge,
    /// Entries in the in-process cache, by cache, as of the last renewal.
    pub local_entries: IntGaugeVec,
    /// Event streams this instance serves, by mode (`bounded`, `strict`).
    pub event_streams: IntGaugeVec,
    /// Events sent on this instance's streams.
    pub events_sent: IntCounter,
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("a metric registered once");
    metric
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("a metric registered once");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("a metric registered once");
    metric
}

fn local_wait(registry: &Registry) -> HistogramVec {
    let metric = HistogramVec::new(
        HistogramOpts::new(
            "authd_local_cache_wait_seconds",
            "How long invalidating calls waited for the other instances",
        )
        .buckets(prometheus::exponential_buckets(0.000_1, 2.0, 18).expect("valid buckets")),
        &["ended"],
    )
    .expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("a metric registered once");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("a metric registered once");
    metric
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let r = Registry::new();
        // The process' resident memory, open files and CPU (`process_*`, the names Prometheus'
        // clients share), and which build this is (`authd_build_info`, always 1).
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("a metric registered once");
        gauge_vec(
            &r,
            "authd_build_info",
            "authd's build: always 1, its version in a label",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        let rpc_duration = HistogramVec::new(
            HistogramOpts::new("authd_rpc_duration_seconds", "RPC latency").buckets(
                prometheus::exponential_buckets(0.000_05, 2.0, 18).expect("valid buckets"),
            ),
            &["service", "method"],
        )
        .expect("a valid metric");
        r.register(Box::new(rpc_duration.clone()))
            .expect("a metric registered once");
        let db_connections = gauge_vec(
            &r,
            "authd_db_connections",
            "PostgreSQL pool connections by share and state",
            &["share", "state"],
        );
        let metrics = Self {
            rpc_requests: counter_vec(
                &r,
                "authd_rpc_requests_total",
                "RPCs by service, method and status code",
                &["service", "method", "code"],
            ),
            rpc_duration,
            cache_lookups: counter_vec(
                &r,
                "authd_cache_lookups_total",
                "Cache lookups by cache and result",
                &["cache", "result"],
            ),
            admin_calls: counter_vec(
                &r,
                "authd_admin_calls_total",
                "AdminService calls by method and outcome",
                &["method", "outcome"],
            ),
            redis_errors: counter_vec(
                &r,
                "authd_redis_errors_total",
                "Redis command failures by kind",
                &["kind"],
            ),
            redis_up: gauge(
                &r,
                "authd_redis_up",
                "1 while Redis is usable, 0 while degraded",
            ),
            redis_enabled: gauge(
                &r,
                "authd_redis_enabled",
                "1 when Redis is on (REDIS__ENABLED)",
            ),
            db_connections,
            db_waiting: gauge_vec(
                &r,
                "authd_db_connections_waiting",
                "Store operations waiting for a pooled connection, by share",
                &["share"],
            ),
            db_share_timeouts: counter_vec(
                &r,
                "authd_db_share_timeouts_total",
                "Store operations that found their share of the pool busy past the acquire timeout",
                &["share"],
            ),
            db_queries: counter_vec(
                &r,
                "authd_db_queries_total",
                "PostgreSQL queries by origin",
                &["origin"],
            ),
            sessions_created: counter(&r, "authd_sessions_created_total", "Sessions created"),
            sessions_revoked: counter_vec(
                &r,
                "authd_sessions_revoked_total",
                "Sessions revoked by reason",
                &["reason"],
            ),
            accounts_deleted: counter_vec(
                &r,
                "authd_accounts_deleted_total",
                "Accounts deleted, by whom",
                &["by"],
            ),
            account_flows: counter_vec(
                &r,
                "authd_account_flows_total",
                "Account flow calls by flow, step and outcome",
                &["flow", "step", "outcome"],
            ),
            second_factor_changes: counter_vec(
                &r,
                "authd_second_factor_changes_total",
                "Changes to accounts' second factors by action and outcome",
                &["action", "outcome"],
            ),
            failed_logins: counter(
                &r,
                "authd_failed_logins_total",
                "Logins refused for bad credentials",
            ),
            rate_limited: counter_vec(
                &r,
                "authd_rate_limited_total",
                "Requests refused by a rate limit, by operation",
                &["operation"],
            ),
            hash_queue_depth: gauge(
                &r,
                "authd_password_hash_queue_depth",
                "Password-hash calls waiting for or holding a slot",
            ),
            hash_rejections: counter(
                &r,
                "authd_password_hash_rejections_total",
                "Password-hash calls refused: queue full",
            ),
            db_up: gauge(
                &r,
                "authd_db_up",
                "1 while PostgreSQL answers within HEALTH__DB_GRACE",
            ),
            redis_node_up: gauge_vec(
                &r,
                "authd_redis_node_up",
                "1 while the Redis primary answers the periodic check",
                &["node"],
            ),
            redis_used_memory: gauge_vec(
                &r,
                "authd_redis_used_memory_bytes",
                "Redis used_memory, per primary",
                &["node"],
            ),
            redis_maxmemory: gauge_vec(
                &r,
                "authd_redis_maxmemory_bytes",
                "Redis maxmemory (0 = none), per primary",
                &["node"],
            ),
            redis_evicted_keys: gauge_vec(
                &r,
                "authd_redis_evicted_keys",
                "Redis evicted_keys since the node started, per primary",
                &["node"],
            ),
            redis_connected_clients: gauge_vec(
                &r,
                "authd_redis_connected_clients",
                "Redis connected_clients, per primary",
                &["node"],
            ),
            redis_maxmemory_policy: gauge_vec(
                &r,
                "authd_redis_maxmemory_policy",
                "1 for the primary's maxmemory-policy",
                &["node", "policy"],
            ),
            redis_generation: gauge(
                &r,
                "authd_redis_generation",
                "The generation of cached data being served (0: none)",
            ),
            redis_generation_changes: counter(
                &r,
                "authd_redis_generation_changes_total",
                "New Redis generations after the first: a restart, restore or failover",
            ),
            sessions_live: gauge(
                &r,
                "authd_sessions_live",
                "Sessions neither revoked nor expired (counted in PostgreSQL)",
            ),
            local_lookups: counter_vec(
                &r,
                "authd_local_cache_lookups_total",
                "In-process cache lookups by cache and result",
                &["cache", "result"],
            ),
            local_invalidations: counter(
                &r,
                "authd_local_cache_invalidations_total",
                "Invalidation messages received from other instances",
            ),
            local_wait: local_wait(&r),
            local_enabled: gauge(
                &r,
                "authd_local_cache_enabled",
                "1 when the in-process cache is on (LOCAL_CACHE__ENABLED)",
            ),
            local_lease_valid: gauge(
                &r,
                "authd_local_cache_lease_valid",
                "1 while this instance holds a valid local-cache lease",
            ),
            local_instances: gauge(
                &r,
                "authd_local_cache_instances",
                "Local-cache leases held in the fleet, counted once a minute",
            ),
            local_entries: gauge_vec(
                &r,
                "authd_local_cache_entries",
                "Entries in the in-process cache",
                &["cache"],
            ),
            event_streams: gauge_vec(
                &r,
                "authd_event_streams",
                "Event streams (EventService.Watch) this instance serves, by mode",
                &["mode"],
            ),
            events_sent: counter(
                &r,
                "authd_events_sent_total",
                "Events sent on this instance's event streams",
            ),
            registry: r,
        };
        metrics.initialise();
        Arc::new(metrics)
    }

    /// Every documented label set at 0, so that dashboards and `rate()` alerts see 0 rather than
    /// nothing before the first event. (Per-node Redis gauges appear with the nodes.)
    fn initialise(&self) {
        for (service, method) in rpc_methods() {
            self.rpc_requests
                .with_label_values(&[&service, &method, "Ok"]);
            self.rpc_duration.with_label_values(&[&service, &method]);
            if service == "authd.v1.AdminService" {
                self.admin_calls.with_label_values(&[&method, "Ok"]);
            }
        }
        for mode in ["bounded", "strict"] {
            self.event_streams.with_label_values(&[mode]);
        }
        for action in FACTOR_ACTIONS {
            for outcome in ["done", "invalid_code", "refused"] {
                self.second_factor_changes
                    .with_label_values(&[action, outcome]);
            }
        }
        for cache in ["sessions", "profiles"] {
            for result in ["hit", "miss", "negative", "unavailable"] {
                self.cache_lookups.with_label_values(&[cache, result]);
            }
        }
        for kind in ["timeout", "disconnected", "error"] {
            self.redis_errors.with_label_values(&[kind]);
        }
        for share in crate::config::Share::ALL {
            for state in ["in_use", "idle"] {
                self.db_connections
                    .with_label_values(&[share.name(), state]);
            }
            self.db_waiting.with_label_values(&[share.name()]);
            self.db_share_timeouts.with_label_values(&[share.name()]);
        }
        for origin in ["request", "background"] {
            self.db_queries.with_label_values(&[origin]);
        }
        for reason in REVOCATION_REASONS {
            self.sessions_revoked.with_label_values(&[reason]);
        }
        for operation in [
            "login",
            "register",
            "change_password",
            "password_reset",
            "delete_account",
            "second_factor",
            "unknown_lookup",
        ] {
            self.rate_limited.with_label_values(&[operation]);
        }
        for by in ["user", "operator"] {
            self.accounts_deleted.with_label_values(&[by]);
        }
        for flow in FLOWS {
            for (step, outcome) in FLOW_OUTCOMES {
                self.account_flows.with_label_values(&[flow, step, outcome]);
            }
        }
        for cache in ["sessions", "profiles"] {
            for result in ["hit", "miss", "untrusted"] {
                self.local_lookups.with_label_values(&[cache, result]);
            }
            self.local_entries.with_label_values(&[cache]);
        }
        for ended in ["acked", "caught_up", "lease_ended", "none"] {
            self.local_wait.with_label_values(&[ended]);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%error, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The `flow` label values of `authd_account_flows_total`.
pub const FLOWS: [&str; 4] = [
    "password_reset",
    "email_verification",
    "email_change",
    "second_factor",
];

/// The `action` label values of `authd_second_factor_changes_total`: a TOTP enrolment started
/// (`enroll`), confirmed (`confirm`), removed by its owner (`remove`) or an operator
/// (`admin_remove`), and the recovery codes replaced (`regenerate`).
pub const FACTOR_ACTIONS: [&str; 5] = ["enroll", "confirm", "remove", "admin_remove", "regenerate"];

/// The `step` and `outcome` label values of `authd_account_flows_total`: a start `issued` a
/// code for an account, answered alike for an `unknown` email (or a disabled account), found the
/// address verified already (`already_verified`), or was `refused` (the owner's proof of an
/// email change failed); a completion `completed`, answered a `retried` completion as the first,
/// or was refused for an `invalid_code` (unknown, expired, used), a `weak_password` or an
/// `email_taken` (another account has the new address), or `locked` (the account refuses the
/// client: too many wrong guesses), or `change_required` (a second factor's right code, for an
/// account whose new password an operator requires: a reset code, not a session); either step
/// `rate_limited`. For `second_factor`, a start is a
/// login that answered with a challenge; a completion, CompleteSecondFactor; the second factor's
/// own changes (enrolment, removal) are `authd_second_factor_changes_total`.
pub const FLOW_OUTCOMES: [(&str, &str); 13] = [
    ("start", "issued"),
    ("start", "unknown"),
    ("start", "already_verified"),
    ("start", "refused"),
    ("start", "rate_limited"),
    ("complete", "completed"),
    ("complete", "retried"),
    ("complete", "invalid_code"),
    ("complete", "weak_password"),
    ("complete", "email_taken"),
    ("complete", "locked"),
    ("complete", "change_required"),
    ("complete", "rate_limited"),
];

/// The `reason` label values of `authd_sessions_revoked_total`.
pub const REVOCATION_REASONS: [&str; 8] = [
    "logout",
    "revoke",
    "revoke_all",
    "password_change",
    "session_cap",
    "admin",
    "password_reset",
    "user_deleted",
];

/// (service, method) of every RPC authd serves, from its descriptors (health and Envoy's
/// external authorization included).
fn rpc_methods() -> Vec<(String, String)> {
    use prost::Message;
    [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        crate::proto::ENVOY_EXT_AUTHZ_DESCRIPTOR_SET,
    ]
    .into_iter()
    .filter_map(|bytes| prost_types::FileDescriptorSet::decode(bytes).ok())
    .flat_map(|set| set.file)
    .flat_map(|file| {
        let package = file.package().to_owned();
        file.service.into_iter().flat_map(move |service| {
            let name = format!("{package}.{}", service.name());
            service
                .method
                .into_iter()
                .map(move |m| (name.clone(), m.name().to_owned()))
        })
    })
    .collect()
}
