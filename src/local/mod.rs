//! The in-process cache: validated sessions and profiles kept in this instance's memory, in front
//! of Redis, without weakening "once a revoking call has returned, no instance accepts the token"
//! or "once UpdateProfile returned version N, no instance serves an older one".
//!
//! The protocol is checked by a model (`model/`, stateright, in `cargo test`): each step below
//! is an action of it, and each bug a review found is a flag there whose counterexample a test
//! asserts.
//!
//! # The protocol (leases, after Chubby)
//!
//! - **Lease.** An instance serves local copies only while it holds a lease: a row of
//!   `local_cache_leases` in PostgreSQL with an end (`expires_at`, PostgreSQL's clock). Its own
//!   idea of the end is measured on its own clock from *before* it asked (`CLOCK_BOOTTIME`, which
//!   also counts time the process was stopped or the machine suspended) and shortened by
//!   [`RATE_MARGIN`], so it never believes in a lease PostgreSQL thinks has ended. Every instance
//!   holds leases of one length, the fleet's (`local_cache_fleet`, see
//!   `store::LeaseRepo::fleet_lease`), so no wait outlasts what a request timeout was checked
//!   against.
//! - **Trusted no longer than Redis copies.** Copies are served only while the instance's outbox
//!   follower has completed a pass within README's bound (`Redis::followed`), exactly as its
//!   Redis copies: an instance cut off from PostgreSQL stops serving from memory as soon as it
//!   stops serving from Redis, whatever its lease says (the previous release, which waits for no
//!   one, is covered by the same bound).
//! - **Invalidation, by state.** A revoking call (Logout, RevokeSession, RevokeAllSessions,
//!   ChangePassword, DisableUser, AdminService revocations, a Login's eviction at the session cap)
//!   and UpdateProfile commit in PostgreSQL and write Redis as before, drop their own local
//!   copies, then publish the keys on the Redis channel `<prefix>local:invalidations` and —
//!   after the Redis write, so that an instance taking a lease later fills from the new state —
//!   read the lease holders. (A holder that did not get the message — not subscribed when it
//!   went out — sends no acknowledgement and is waited for until it catches up or its lease
//!   ends; one that did dropped the keys before acknowledging, whenever the ack arrives.) The keys are every session the call covers that the logs say
//!   is revoked within the wait horizon ([`LocalCache::horizon`]), *whoever* revoked it: this
//!   call, an earlier attempt whose answer was lost, another instance, the previous release. A
//!   retry therefore waits exactly as long as the first attempt would have.
//! - **The wait.** The call returns once every holder has acknowledged (it dropped the keys),
//!   or has applied the logs past the holders read (`applied_through`, see renewal), or its lease
//!   has ended: the remaining time PostgreSQL gave, lengthened by [`RATE_MARGIN`] and
//!   [`FIXED_MARGIN`], on the revoker's clock. Concurrent waits of one instance share one poll of
//!   the lease table (`poller`). A wait that would outlast the call's deadline ends it with
//!   UNAVAILABLE (retrying is safe, by the previous point), never CANCELLED.
//! - **Renewal.** Every quarter lease a holder *first* extends its lease in PostgreSQL, *then*
//!   reads the invalidation logs from where it last read (less the in-flight allowance, see
//!   `store::outbox`) and drops what they name (each row once), and only *then* moves its own
//!   idea of the lease's end. Any revocation whose revoker saw the old end committed before the
//!   extension, hence before the log read. A revocation whose revoker saw the new end waits for
//!   it (or an acknowledgement). The rows read set floors: no copy below one is kept again while
//!   the row is in the window (a fill that read Redis after the log read but before the
//!   revoker's Redis write would otherwise survive the drop). The extension also records the
//!   PostgreSQL time of the previous one (`applied_through`): a revoker whose message was lost
//!   sees a holder caught up from that.
//! - **Races with fills.** A copy read from Redis or PostgreSQL is kept only if no drop of a key
//!   of its stripe happened on this instance since before the read (a ticket, checked under the
//!   lock every drop takes): a fill that read the old state before an invalidation cannot land
//!   after it. Taking a fresh lease counts as a drop of everything.
//! - **Doubt.** An instance that is not sure it receives invalidations stops using its copies at
//!   once and drops them all: its subscriber connection reported an error or reconnected, its
//!   heartbeat (a message it publishes to itself every quarter lease) did not come back, its
//!   lease ran out (PostgreSQL unreachable, or the process was paused), or PostgreSQL changed
//!   history (a promoted standby: a new timeline). It releases its lease and takes a new one,
//!   with an empty cache, once it hears itself again.
//! - **A new PostgreSQL timeline.** An asynchronous standby may have missed the last lease
//!   extensions: for one lease after a timeline is first seen, every wait also waits for that
//!   window's end, and a wait that sees the timeline change under it does too.
//!
//! Assumed: clocks run at rates within [`RATE_MARGIN`] of each other, and PostgreSQL's clock is
//! not stepped by more than [`FIXED_MARGIN`] while leases run (lease ends, `applied_through` and
//! the revoker's `since` are PostgreSQL times). A wait never exceeds the holder's lease length
//! (stored with the lease), whatever the clock did.
//!
//! Redis losing its data does not touch local copies: they were right when filled and every
//! invalidation since reached them (or the call that made it is still waiting). Touches stay once
//! per touch interval per session: a local copy whose touch is due goes the shared way (one Redis
//! GET, which sees the other instances' touches).
mod keeper;
mod keys;
mod poller;
mod store;
mod wait;

use std::{sync::Arc, time::Duration};

use uuid::Uuid;

pub use keys::Keys;
pub use store::Ticket;

use crate::{
    cache::Redis,
    clock::{FIXED_MARGIN, RATE_MARGIN, boot_us},
    config::LocalCacheSettings,
    metrics::Metrics,
    model::{ProfileRecord, SessionRecord, TokenHash},
    store::Db,
};
use store::Store;

/// The longest lease any instance may hold (`LOCAL_CACHE__LEASE`'s upper bound).
pub const LONGEST_LEASE: Duration = Duration::from_secs(60);
/// Indexes of [`Shared::lookups`].
const SESSIONS: usize = 0;
const PROFILES: usize = 1;
const HIT: usize = 0;
const MISS: usize = 1;
const UNTRUSTED: usize = 2;

/// What a [`LocalCache`] is built from.
pub struct LocalParts {
    /// This instance, as the lease tables name it.
    pub instance: Uuid,
    /// The longest lease this instance's request timeout covers (see `clock::covers`).
    pub covers: Duration,
    pub settings: LocalCacheSettings,
    /// The fleet's lease (see `store::LeaseRepo::fleet_lease`).
    pub lease: Duration,
    pub profile_ttl: Duration,
    /// Sessions are looked at in Redis at least this often (their touches).
    pub session_recheck: Duration,
    /// See `store::in_flight`.
    pub in_flight: chrono::TimeDelta,
    pub db: Arc<Db>,
    pub redis: Redis,
    pub metrics: Arc<Metrics>,
}

/// Cloned everywhere; one per application.
#[derive(Clone)]
pub struct LocalCache {
    shared: Arc<Shared>,
}

struct Shared {
    instance: Uuid,
    covers: Duration,
    db: Arc<Db>,
    redis: Redis,
    metrics: Arc<Metrics>,
    /// `authd_local_cache_lookups_total` by cache (sessions, profiles) and result (hit, miss,
    /// untrusted), resolved once: the hot path does not look labels up.
    lookups: [[prometheus::IntCounter; 3]; 2],
    /// `None` when `LOCAL_CACHE__ENABLED` is off: this instance keeps nothing, but its
    /// revoking calls still wait for the instances that do.
    store: Option<Store>,
    waits: wait::Waits,
    poller: Arc<poller::Poller>,
    /// See `store::in_flight`.
    in_flight: chrono::TimeDelta,
    /// The fleet's lease: what this instance holds, and what it takes for the event stream's
    /// strict subscribers.
    lease: Duration,
    /// Every revoker's message this instance hears: the event stream's strict subscribers
    /// acknowledge them through their host ([`LocalCache::messages`]).
    messages: tokio::sync::broadcast::Sender<Heard>,
}

/// A revoker's message naming keys, as this instance heard it.
#[derive(Debug, Clone, Copy)]
pub struct Heard {
    pub origin: Uuid,
    pub nonce: u64,
    /// When this instance received it (its revoker had committed before).
    pub at: std::time::Instant,
}

impl LocalCache {
    pub fn new(parts: LocalParts) -> Self {
        let LocalParts {
            instance,
            covers,
            settings,
            lease,
            profile_ttl,
            session_recheck,
            in_flight,
            db,
            redis,
            metrics,
        } = parts;
        let store = (settings.enabled && redis.is_enabled())
            .then(|| Store::new(&settings, lease, profile_ttl, session_recheck));
        metrics.local_lease_valid.set(0);
        metrics.local_enabled.set(i64::from(store.is_some()));
        let lookups = ["sessions", "profiles"].map(|cache| {
            ["hit", "miss", "untrusted"]
                .map(|result| metrics.local_lookups.with_label_values(&[cache, result]))
        });
        Self {
            shared: Arc::new(Shared {
                instance,
                covers,
                poller: Arc::new(poller::Poller::new(db.clone())),
                db,
                redis,
                metrics,
                lookups,
                store,
                waits: wait::Waits::default(),
                in_flight,
                lease,
                messages: tokio::sync::broadcast::channel(MESSAGES).0,
            }),
        }
    }

    /// This instance's identity in the lease table and on the channels.
    pub fn instance(&self) -> Uuid {
        self.shared.instance
    }

    pub fn is_enabled(&self) -> bool {
        self.shared.store.is_some()
    }

    /// Whether local copies may be served now: the lease is believed, the heartbeat came back,
    /// and the follower completed a pass within README's bound.
    pub fn is_trusted(&self) -> bool {
        self.shared.store.as_ref().is_some_and(|store| {
            let now = boot_us();
            store.believed(now) && self.shared.redis.followed(now)
        })
    }

    /// A cached session, when this instance may serve its copies.
    pub fn session(&self, hash: &TokenHash) -> Option<SessionRecord> {
        self.lookup(SESSIONS, |store| store.session(hash.key()))
    }

    /// A cached profile, when this instance may serve its copies.
    pub fn profile(&self, user_id: Uuid) -> Option<ProfileRecord> {
        self.lookup(PROFILES, |store| store.profile(&user_id))
    }

    /// One lookup in `cache` (an index of [`Shared::lookups`]), counted by its result.
    fn lookup<V: Clone>(
        &self,
        cache: usize,
        get: impl FnOnce(&Store) -> Option<Arc<V>>,
    ) -> Option<V> {
        let store = self.shared.store.as_ref()?;
        let counters = &self.shared.lookups[cache];
        if !self.is_trusted() {
            counters[UNTRUSTED].inc();
            return None;
        }
        let found = get(store);
        counters[if found.is_some() { HIT } else { MISS }].inc();
        found.map(|value| V::clone(&value))
    }

    /// Taken before the read of a session whose result is to be kept.
    pub fn session_ticket(&self, hash: &TokenHash) -> Option<Ticket> {
        Some(self.shared.store.as_ref()?.session_ticket(hash.key()))
    }

    /// Taken before the read of a profile whose result is to be kept.
    pub fn profile_ticket(&self, user_id: Uuid) -> Option<Ticket> {
        Some(self.shared.store.as_ref()?.profile_ticket(&user_id))
    }

    /// Keeps a session read (valid) since `ticket` was taken, unless anything was dropped since
    /// or the logs showed it revoked.
    pub fn keep_session(&self, ticket: Option<Ticket>, hash: &TokenHash, record: &SessionRecord) {
        if let (Some(store), Some(ticket)) = (&self.shared.store, ticket)
            && self.is_trusted()
        {
            store.keep_session(ticket, *hash.key(), record);
        }
    }

    /// Keeps a profile read since `ticket` was taken, unless anything was dropped since or the
    /// logs showed a newer version.
    pub fn keep_profile(&self, ticket: Option<Ticket>, profile: &ProfileRecord) {
        if let (Some(store), Some(ticket)) = (&self.shared.store, ticket)
            && self.is_trusted()
        {
            store.keep_profile(ticket, profile);
        }
    }

    /// Drops this instance's copies of `keys` (no waiting).
    pub fn forget(&self, keys: &Keys) {
        if let Some(store) = &self.shared.store {
            store.forget(keys);
        }
    }

    /// How far back the logs are read for what a revoking call covers: a revocation committed
    /// longer ago than this has been read by every live holder's renewal (each holder renewed
    /// within a lease, and its log read began after the extension before), so no holder can
    /// still serve what it revoked.
    pub fn horizon(&self) -> chrono::TimeDelta {
        let leases = LONGEST_LEASE.mul_f64(2.0 * (1.0 + RATE_MARGIN)) + FIXED_MARGIN;
        let leases = chrono::TimeDelta::from_std(leases).unwrap_or(chrono::TimeDelta::MAX);
        leases + self.shared.in_flight + chrono::TimeDelta::seconds(1)
    }

    /// Starts the subscriber, the lease keeper (when enabled) and the poller; they stop with
    /// `stop`, and the lease is released on the way out.
    pub fn spawn(
        &self,
        stop: tokio_util::sync::CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = keeper::spawn(self.clone(), stop.clone());
        tasks.push(tokio::spawn(self.shared.poller.clone().run(stop.clone())));
        tasks.push(tokio::spawn(self.clone().running(stop)));
        tasks
    }

    /// Records every [`crate::store::INSTANCE_BEAT`] that this instance runs (and what its
    /// request timeout covers), until `stop`, then that it stopped: an instance starting
    /// meanwhile neither replaces the fleet's lease under it nor sets one it cannot wait for.
    async fn running(self, stop: tokio_util::sync::CancellationToken) {
        let shared = &self.shared;
        let holds = shared.store.is_some();
        let leases = shared.db.leases();
        loop {
            let seen = leases.seen(shared.instance, holds, shared.covers);
            if let Err(error) = crate::store::in_background(seen).await {
                tracing::debug!(%error, "could not record that this instance runs");
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(crate::store::INSTANCE_BEAT) => {}
            }
        }
        let stopped = crate::store::in_background(leases.stopped(shared.instance));
        let _ = tokio::time::timeout(Duration::from_secs(2), stopped).await;
    }

    /// The fleet's lease length.
    pub fn lease(&self) -> Duration {
        self.shared.lease
    }

    /// The revokers' messages this instance hears from now on, every message that names keys. A receiver that falls [`MESSAGES`] behind loses the oldest
    /// (their revokers then wait for a catch-up through the logs, or the lease's end).
    pub fn messages(&self) -> tokio::sync::broadcast::Receiver<Heard> {
        self.shared.messages.subscribe()
    }

    /// Tells `origin` that `holder` (a lease of the lease table) dropped what its message
    /// `nonce` named.
    pub async fn acknowledge_for(&self, holder: Uuid, origin: Uuid, nonce: u64) {
        if origin == self.shared.instance {
            self.acknowledged_by(holder, nonce);
        } else if let Some(channel) = acks_channel(&self.shared.redis, origin) {
            let ack = format!("ack:{nonce}:{holder}");
            self.shared.redis.publish(&channel, ack).await;
        }
    }

    /// PostgreSQL changed history (a promoted standby): copies made before are not trusted.
    pub fn history_changed(&self) {
        self.doubt("postgresql changed timeline");
    }
}

/// Revokers' messages kept for [`LocalCache::messages`]' receivers.
const MESSAGES: usize = 1024;
/// The channel every holder listens to.
const INVALIDATIONS: &str = "local:invalidations";
/// `<prefix>local:acks:<instance>`: acknowledgements and heartbeats for one instance.
fn acks_channel(redis: &Redis, instance: Uuid) -> Option<String> {
    redis.channel(&format!("local:acks:{instance}"))
}
