//! The in-process cache: validated sessions and profiles kept in this instance's memory, in front
//! of Redis, without weakening "once a revoking call has returned, no instance accepts the token"
//! or "once UpdateProfile returned version N, no instance serves an older one".
//!
//! # The protocol (leases, after Chubby)
//!
//! - **Lease.** An instance serves local copies only while it holds a lease: a row of
//!   `local_cache_leases` in PostgreSQL with an end (`expires_at`, PostgreSQL's clock). Its own
//!   idea of the end is measured on its own clock from *before* it asked (`CLOCK_BOOTTIME`, which
//!   also counts time the process was stopped or the machine suspended) and shortened by
//!   [`RATE_MARGIN`], so it never believes in a lease PostgreSQL thinks has ended.
//! - **Invalidation.** A revoking call (Logout, RevokeSession, RevokeAllSessions,
//!   ChangePassword, DisableUser, AdminService revocations) and UpdateProfile commit in
//!   PostgreSQL and write Redis as before, drop their own local copies, then — after the Redis
//!   write, so that an instance taking a lease later fills from the new state — read the lease
//!   holders and publish the keys on the Redis channel `<prefix>local:invalidations`. Each holder
//!   drops them and acknowledges on the revoker's channel `<prefix>local:acks:<instance>`. (A
//!   login's eviction at the session cap is announced the same way, without waiting.)
//! - **The wait.** The call returns once every holder has acknowledged, or has applied the logs
//!   past the revocation (see renewal), or its lease has ended: the remaining time PostgreSQL
//!   gave, lengthened by [`RATE_MARGIN`] and [`FIXED_MARGIN`], on the revoker's clock.
//! - **Renewal.** Every quarter lease a holder *first* extends its lease in PostgreSQL, *then*
//!   reads the invalidation logs (`session_invalidations`, `profile_invalidations`) from where it
//!   last read (less the in-flight allowance, see `store::outbox`) and drops what they name, and
//!   only *then* moves its own idea of the lease's end. Any revocation R whose revoker saw the
//!   old end committed before R's revoker read it, hence before the extension, hence before the
//!   log read: R's keys are dropped before the holder relies on the new end. A revocation whose
//!   revoker saw the new end waits for it (or an acknowledgement). The extension also records
//!   the PostgreSQL time of the previous one (`applied_through`): a revoker whose message was lost
//!   sees a holder caught up from that.
//! - **Races with fills.** A copy read from Redis or PostgreSQL is kept only if no drop of a key
//!   of its stripe happened on this instance since before the read (a ticket, checked under the
//!   lock every drop takes): a fill that read the old state before an invalidation cannot land
//!   after it. Taking a fresh lease counts as a drop of everything: a fill begun before it may
//!   have read state older than a revocation that did not count this instance as a holder.
//! - **Doubt.** An instance that is not sure it receives invalidations stops using its copies at
//!   once and drops them all: its subscriber connection reported an error or reconnected, its
//!   heartbeat (a message it publishes to itself every quarter lease) did not come back, its
//!   lease ran out (PostgreSQL unreachable, or the process was paused). It releases its lease and
//!   takes a new one, with an empty cache, once it hears itself again.
//!
//! Assumed: clocks run at rates within [`RATE_MARGIN`] of each other, and PostgreSQL's clock is
//! not stepped by more than [`FIXED_MARGIN`] while leases run (lease ends, `applied_through` and
//! the revoker's `since` are PostgreSQL times). A wait never exceeds the holder's lease length
//! (stored with the lease), whatever the clock did.
//!
//! Redis losing its data does not touch local copies: they were right when filled and every
//! invalidation since reached them (or the call that made it is still waiting). A revoker that
//! cannot publish (its Redis cut) waits for the holders to catch up through the logs (two renewals
//! at most) or for their leases to end; if it cannot read the holders (PostgreSQL gone after the
//! commit), the call fails UNAVAILABLE rather than return early. Touches stay once per touch
//! interval per session: a local copy whose touch is due goes the shared way (one Redis GET,
//! which sees the other instances' touches).
mod keeper;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::{
    cache::Redis,
    config::LocalCacheSettings,
    metrics::Metrics,
    model::{ProfileRecord, SessionRecord, TokenHash},
    store::{Db, StoreError},
};

/// The clocks involved (each instance's, PostgreSQL's) run at rates within this fraction of each
/// other: a lease is believed `RATE_MARGIN` shorter than granted and waited for that much longer.
pub const RATE_MARGIN: f64 = 0.01;
/// Added to every wait for a lease's end: the time between PostgreSQL's reading of its clock and
/// the revoker's reading of the reply, which only shortens what the revoker believes is left.
pub const FIXED_MARGIN: Duration = Duration::from_millis(100);
/// Indexes of [`Shared::lookups`].
const SESSIONS: usize = 0;
const PROFILES: usize = 1;
const HIT: usize = 0;
const MISS: usize = 1;
const UNTRUSTED: usize = 2;

/// How often a revoker waiting for acknowledgements asks PostgreSQL who caught up.
const POLL: Duration = Duration::from_millis(100);

/// What an invalidation names.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Keys {
    /// Token hashes, hex.
    #[serde(rename = "s", default)]
    pub sessions: Vec<String>,
    #[serde(rename = "p", default)]
    pub profiles: Vec<Uuid>,
}

impl Keys {
    pub fn sessions<'a>(hashes: impl IntoIterator<Item = &'a [u8]>) -> Self {
        Self {
            sessions: hashes.into_iter().map(hex::encode).collect(),
            profiles: Vec::new(),
        }
    }

    pub fn profiles(user_ids: impl IntoIterator<Item = Uuid>) -> Self {
        Self {
            sessions: Vec::new(),
            profiles: user_ids.into_iter().collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.profiles.is_empty()
    }

    /// Split so that no message names more than `most` keys.
    fn chunks(self, most: usize) -> Vec<Keys> {
        let mut out: Vec<Keys> = self
            .sessions
            .chunks(most)
            .map(|c| Keys {
                sessions: c.to_vec(),
                profiles: Vec::new(),
            })
            .collect();
        out.extend(self.profiles.chunks(most).map(|c| Keys {
            sessions: Vec::new(),
            profiles: c.to_vec(),
        }));
        out
    }
}

/// Keys per message: about 35 KB of JSON, far below Redis' pub/sub output buffer limits.
const MESSAGE_KEYS: usize = 500;

/// The message on the invalidation channel.
#[derive(Serialize, Deserialize)]
struct Message {
    /// The revoker.
    #[serde(rename = "o")]
    origin: Uuid,
    #[serde(rename = "n")]
    nonce: u64,
    #[serde(flatten)]
    keys: Keys,
}

/// Taken before a read whose result may be kept (see [`LocalCache::keep_session`]): the drop
/// counters of everything (`clear`) and of the key's stripe at that time.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    all: u64,
    stripe: usize,
    drops: u64,
}

/// Drops are counted per stripe of keys, so that dropping one key rarely stops the fill of
/// another.
const STRIPES: usize = 64;

/// Cloned everywhere; one per application.
#[derive(Clone)]
pub struct LocalCache {
    shared: Arc<Shared>,
}

struct Shared {
    instance: Uuid,
    db: Arc<Db>,
    redis: Redis,
    metrics: Arc<Metrics>,
    /// `authd_local_cache_lookups_total` by cache (sessions, profiles) and result (hit, miss,
    /// untrusted), resolved once: the hot path does not look labels up.
    lookups: [[prometheus::IntCounter; 3]; 2],
    /// `None` when `LOCAL_CACHE__ENABLED` is off: this instance keeps nothing, but its
    /// revoking calls still wait for the instances that do.
    store: Option<Store>,
    /// Revoking calls of this instance waiting for acknowledgements, by nonce.
    waiters: Mutex<HashMap<u64, Arc<Waiter>>>,
    /// See `store::in_flight`.
    in_flight: chrono::TimeDelta,
}

struct Store {
    settings: LocalCacheSettings,
    sessions: moka::sync::Cache<[u8; 32], Arc<SessionRecord>>,
    profiles: moka::sync::Cache<Uuid, Arc<ProfileRecord>>,
    /// Bumped, under `drops`, by every `clear`, and per stripe by every drop of a key in it.
    cleared: AtomicU64,
    stripes: [AtomicU64; STRIPES],
    drops: Mutex<()>,
    /// Where this instance believes its lease ends ([`now_us`]); 0: no lease.
    lease_until: AtomicU64,
    /// The subscription is up and this instance's heartbeat came back.
    hearing: AtomicBool,
    /// Bumped by every doubt: a renewal that began before one does not set `lease_until`.
    epoch: AtomicU64,
    /// A doubt happened: the keeper takes a fresh lease.
    lost: AtomicBool,
    /// Wakes the keeper (a doubt to act on).
    wake: Notify,
    /// The last heartbeat sent.
    heartbeat: Mutex<Beat>,
}

/// One wait: the (instance, message nonce) pairs not acknowledged yet.
/// A heartbeat: a message an instance publishes to itself.
#[derive(Default, Clone, Copy)]
struct Beat {
    /// 0: none sent yet.
    nonce: u64,
    /// When it was sent ([`now_us`]).
    sent: u64,
    back: bool,
}

struct Waiter {
    pending: Mutex<HashSet<(Uuid, u64)>>,
    done: Notify,
}

/// Microseconds on `CLOCK_BOOTTIME`: monotonic, and it counts time spent stopped (SIGSTOP) or
/// suspended, unlike `Instant` (`CLOCK_MONOTONIC`), which is the fallback off Linux.
pub fn now_us() -> u64 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec, and clock_gettime only writes through
        // the pointer.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        if rc == 0 {
            return ts.tv_sec.unsigned_abs() * 1_000_000 + ts.tv_nsec.unsigned_abs() / 1_000;
        }
    }
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let elapsed = START.get_or_init(std::time::Instant::now).elapsed();
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

impl LocalCache {
    pub fn new(
        settings: &LocalCacheSettings,
        profile_ttl: Duration,
        session_recheck: Duration,
        in_flight: chrono::TimeDelta,
        db: Arc<Db>,
        redis: Redis,
        metrics: Arc<Metrics>,
    ) -> Self {
        let store = (settings.enabled && redis.is_enabled()).then(|| Store {
            settings: settings.clone(),
            sessions: moka::sync::Cache::builder()
                .max_capacity(settings.max_entries)
                .time_to_live(session_recheck.max(Duration::from_secs(1)))
                .build(),
            profiles: moka::sync::Cache::builder()
                .max_capacity(settings.max_entries)
                .time_to_live(profile_ttl)
                .build(),
            cleared: AtomicU64::new(0),
            stripes: std::array::from_fn(|_| AtomicU64::new(0)),
            drops: Mutex::new(()),
            lease_until: AtomicU64::new(0),
            hearing: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            wake: Notify::new(),
            heartbeat: Mutex::new(Beat::default()),
        });
        metrics.local_lease_valid.set(0);
        metrics.local_enabled.set(i64::from(store.is_some()));
        let lookups = ["sessions", "profiles"].map(|cache| {
            ["hit", "miss", "untrusted"]
                .map(|result| metrics.local_lookups.with_label_values(&[cache, result]))
        });
        Self {
            shared: Arc::new(Shared {
                instance: Uuid::new_v4(),
                db,
                redis,
                metrics,
                lookups,
                store,
                waiters: Mutex::new(HashMap::new()),
                in_flight,
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

    /// Whether local copies may be served now.
    pub fn is_trusted(&self) -> bool {
        self.shared.store.as_ref().is_some_and(Store::trusted)
    }

    /// A cached session, when this instance may serve its copies.
    pub fn session(&self, hash: &TokenHash) -> Option<SessionRecord> {
        let key: &[u8; 32] = hash.as_bytes().try_into().ok()?;
        self.lookup(SESSIONS, |store| store.sessions.get(key))
    }

    /// A cached profile, when this instance may serve its copies.
    pub fn profile(&self, user_id: Uuid) -> Option<ProfileRecord> {
        self.lookup(PROFILES, |store| store.profiles.get(&user_id))
    }

    /// One lookup in `cache` (an index of [`Shared::lookups`]), counted by its result.
    fn lookup<V: Clone>(
        &self,
        cache: usize,
        get: impl FnOnce(&Store) -> Option<Arc<V>>,
    ) -> Option<V> {
        let store = self.shared.store.as_ref()?;
        let counters = &self.shared.lookups[cache];
        if !store.trusted() {
            counters[UNTRUSTED].inc();
            return None;
        }
        let found = get(store);
        counters[if found.is_some() { HIT } else { MISS }].inc();
        found.map(|value| V::clone(&value))
    }

    /// Taken before the read of a session whose result is to be kept.
    pub fn session_ticket(&self, hash: &TokenHash) -> Ticket {
        self.ticket(session_stripe(hash.as_bytes()))
    }

    /// Taken before the read of a profile whose result is to be kept.
    pub fn profile_ticket(&self, user_id: Uuid) -> Ticket {
        self.ticket(profile_stripe(&user_id))
    }

    fn ticket(&self, stripe: usize) -> Ticket {
        let (all, drops) = self.shared.store.as_ref().map_or((0, 0), |s| {
            let all = s.cleared.load(Ordering::Acquire);
            (all, s.stripes[stripe].load(Ordering::Acquire))
        });
        Ticket { all, stripe, drops }
    }

    /// Keeps a session read (valid) since `ticket` was taken, unless anything was dropped since.
    pub fn keep_session(&self, ticket: Ticket, hash: &TokenHash, record: &SessionRecord) {
        let Some(store) = &self.shared.store else {
            return;
        };
        let Ok(key) = <[u8; 32]>::try_from(hash.as_bytes()) else {
            return;
        };
        store.keep(ticket, || {
            store.sessions.insert(key, Arc::new(record.clone()))
        });
    }

    /// Keeps a profile read since `ticket` was taken, unless anything was dropped since.
    pub fn keep_profile(&self, ticket: Ticket, profile: &ProfileRecord) {
        let Some(store) = &self.shared.store else {
            return;
        };
        store.keep(ticket, || {
            store
                .profiles
                .insert(profile.user_id, Arc::new(profile.clone()))
        });
    }

    /// Drops this instance's copies of `keys` (no waiting).
    pub fn forget(&self, keys: &Keys) {
        if let Some(store) = &self.shared.store {
            store.forget(keys);
        }
    }

    /// Once `written` (the change's Redis write) is done, drops `keys` here and waits until no
    /// other instance can serve a copy of them (see the module comment). Call after the change
    /// committed. The lease holders are read only after `written`: an instance that takes a
    /// lease after that read fills from a Redis that has the change, and a holder's log read
    /// after it (`applied_through > since`) comes after the Redis write too.
    pub async fn invalidate(
        &self,
        keys: Keys,
        written: impl Future<Output = ()>,
    ) -> Result<(), StoreError> {
        if keys.is_empty() {
            written.await;
            return Ok(());
        }
        let started = std::time::Instant::now();
        let shared = &self.shared;
        written.await;
        // After Redis: a fill that read the old copy before this cannot keep it.
        self.forget(&keys);
        let (since, holders) = shared.db.leases().holders(shared.instance).await?;
        let asked = std::time::Instant::now();
        if holders.is_empty() {
            self.waited(started, "none");
            return Ok(());
        }
        let chunks = keys.chunks(MESSAGE_KEYS);
        let nonces: Vec<u64> = chunks.iter().map(|_| fastrand::u64(..)).collect();
        let waiter = Arc::new(Waiter {
            pending: Mutex::new(
                holders
                    .iter()
                    .flat_map(|h| nonces.iter().map(|n| (h.instance, *n)))
                    .collect(),
            ),
            done: Notify::new(),
        });
        let _registered = Registered::new(self, &nonces, &waiter);
        self.publish(chunks, &nonces).await;
        let mut deadlines: HashMap<Uuid, std::time::Instant> = holders
            .iter()
            .map(|h| (h.instance, asked + lease_wait(h.remaining)))
            .collect();
        let mut ended = "acked";
        loop {
            let now = std::time::Instant::now();
            let ended_now =
                waiter.retain(|instance| deadlines.get(instance).is_some_and(|d| *d > now));
            if ended_now {
                ended = "lease_ended";
            }
            let waiting = waiter.instances();
            if waiting.is_empty() {
                break;
            }
            deadlines.retain(|instance, _| waiting.contains(instance));
            let next_deadline = deadlines.values().min().copied().unwrap_or(now);
            let poll_at = now + POLL.min(next_deadline.saturating_duration_since(now));
            tokio::select! {
                () = waiter.done.notified() => {}
                () = tokio::time::sleep_until(poll_at.into()) => {
                    let waiting: Vec<Uuid> = waiting.into_iter().collect();
                    let leases = shared.db.leases();
                    let asking = leases.caught_up(&waiting, since);
                    // A slow PostgreSQL does not stretch the wait past the next lease's end.
                    let answer = tokio::time::timeout_at(next_deadline.into(), asking).await;
                    if let Ok(Ok(done)) = answer
                        && waiter.retain(|instance| !done.contains(instance))
                    {
                        ended = "caught_up";
                    }
                }
            }
        }
        self.waited(started, ended);
        Ok(())
    }

    /// Drops `keys` here and tells the other instances, without waiting: for changes no promise
    /// covers (a login's eviction at the session cap). A holder that misses the message drops
    /// the copies it held when its next renewal reads the log; one refilled from Redis between
    /// that read and the eviction's Redis write lives until its touch is due.
    pub async fn announce(&self, keys: Keys) {
        if keys.is_empty() {
            return;
        }
        self.forget(&keys);
        let chunks = keys.chunks(MESSAGE_KEYS);
        let nonces: Vec<u64> = chunks.iter().map(|_| fastrand::u64(..)).collect();
        self.publish(chunks, &nonces).await;
    }

    async fn publish(&self, chunks: Vec<Keys>, nonces: &[u64]) {
        let shared = &self.shared;
        let Some(channel) = shared.redis.channel(INVALIDATIONS) else {
            return;
        };
        let sends = chunks.into_iter().zip(nonces).map(|(keys, nonce)| {
            let message = Message {
                origin: shared.instance,
                nonce: *nonce,
                keys,
            };
            let text = serde_json::to_string(&message).unwrap_or_default();
            shared.redis.publish(&channel, text)
        });
        futures::future::join_all(sends).await;
    }

    fn waited(&self, started: std::time::Instant, ended: &str) {
        let wait = &self.shared.metrics.local_wait;
        let seconds = started.elapsed().as_secs_f64();
        wait.with_label_values(&[ended]).observe(seconds);
    }

    /// Starts the subscriber and the lease keeper (when enabled); they stop with `stop`, and the
    /// lease is released on the way out.
    pub fn spawn(
        &self,
        stop: tokio_util::sync::CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        keeper::spawn(self.clone(), stop)
    }
}

/// A token hash is uniformly random already.
fn session_stripe(hash: &[u8]) -> usize {
    hash.first().map_or(0, |b| usize::from(*b) % STRIPES)
}

fn profile_stripe(user_id: &Uuid) -> usize {
    let bytes = user_id.as_bytes();
    usize::from(bytes[15] ^ bytes[7]) % STRIPES
}

/// How long a revoker waits for a lease PostgreSQL said has `remaining` left.
pub fn lease_wait(remaining: Duration) -> Duration {
    remaining.mul_f64(1.0 + RATE_MARGIN) + FIXED_MARGIN
}

/// A wait's nonces in the waiters map, removed however the wait ends (a cancelled call
/// included).
struct Registered<'a> {
    cache: &'a LocalCache,
    nonces: &'a [u64],
}

impl<'a> Registered<'a> {
    fn new(cache: &'a LocalCache, nonces: &'a [u64], waiter: &Arc<Waiter>) -> Self {
        let mut waiters = lock(&cache.shared.waiters);
        for nonce in nonces {
            waiters.insert(*nonce, waiter.clone());
        }
        Self { cache, nonces }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut waiters = lock(&self.cache.shared.waiters);
        for nonce in self.nonces {
            waiters.remove(nonce);
        }
    }
}

impl Waiter {
    /// Keeps the (instance, nonce) pairs whose instance `keep` says; whether any went.
    fn retain(&self, keep: impl Fn(&Uuid) -> bool) -> bool {
        let mut pending = lock(&self.pending);
        let before = pending.len();
        pending.retain(|(instance, _)| keep(instance));
        pending.len() != before
    }

    /// The instances still owing an acknowledgement.
    fn instances(&self) -> HashSet<Uuid> {
        lock(&self.pending).iter().map(|(i, _)| *i).collect()
    }

    /// An acknowledgement of `nonce` by `instance`.
    fn acknowledged(&self, instance: Uuid, nonce: u64) {
        let mut pending = lock(&self.pending);
        if pending.remove(&(instance, nonce)) && pending.is_empty() {
            self.done.notify_one();
        }
    }
}

/// The channel every holder listens to.
const INVALIDATIONS: &str = "local:invalidations";
/// `<prefix>local:acks:<instance>`: acknowledgements and heartbeats for one instance.
fn acks_channel(redis: &Redis, instance: Uuid) -> Option<String> {
    redis.channel(&format!("local:acks:{instance}"))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Store {
    fn trusted(&self) -> bool {
        self.hearing.load(Ordering::Acquire) && now_us() < self.lease_until.load(Ordering::Acquire)
    }

    fn keep(&self, ticket: Ticket, insert: impl FnOnce()) {
        if !self.trusted() {
            return;
        }
        let _drops = lock(&self.drops);
        let unchanged = self.cleared.load(Ordering::Acquire) == ticket.all
            && self.stripes[ticket.stripe].load(Ordering::Acquire) == ticket.drops;
        if unchanged {
            insert();
        }
    }

    fn forget(&self, keys: &Keys) {
        let _drops = lock(&self.drops);
        for hash in &keys.sessions {
            if let Ok(Ok(key)) = hex::decode(hash).map(<[u8; 32]>::try_from) {
                self.stripes[session_stripe(&key)].fetch_add(1, Ordering::AcqRel);
                self.sessions.invalidate(&key);
            }
        }
        for id in &keys.profiles {
            self.stripes[profile_stripe(id)].fetch_add(1, Ordering::AcqRel);
            self.profiles.invalidate(id);
        }
    }

    /// Drops everything (and makes every fill in flight a no-op).
    fn clear(&self) {
        let _drops = lock(&self.drops);
        self.clear_locked();
    }

    /// [`Self::clear`], with `drops` held by the caller.
    fn clear_locked(&self) {
        self.cleared.fetch_add(1, Ordering::AcqRel);
        self.sessions.invalidate_all();
        self.profiles.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_invalidations_are_split_into_bounded_messages() {
        let hashes: Vec<[u8; 32]> = (0..1_201u32)
            .map(|i| {
                let mut h = [0u8; 32];
                h[..4].copy_from_slice(&i.to_be_bytes());
                h
            })
            .collect();
        let mut keys = Keys::sessions(hashes.iter().map(|h| h.as_slice()));
        keys.profiles = vec![Uuid::new_v4(), Uuid::new_v4()];
        let chunks = keys.chunks(MESSAGE_KEYS);
        assert_eq!(chunks.len(), 4);
        assert!(
            chunks
                .iter()
                .all(|c| c.sessions.len() + c.profiles.len() <= MESSAGE_KEYS)
        );
        let sessions: usize = chunks.iter().map(|c| c.sessions.len()).sum();
        assert_eq!(sessions, 1_201);
        let message = Message {
            origin: Uuid::new_v4(),
            nonce: u64::MAX,
            keys: chunks[0].clone(),
        };
        let text = serde_json::to_string(&message).unwrap();
        assert!(text.len() < 40_000, "{} bytes", text.len());
        let back: Message = serde_json::from_str(&text).unwrap();
        assert_eq!(back.keys.sessions, chunks[0].sessions);
    }

    #[test]
    fn a_wait_ends_when_every_holder_acknowledged_every_message() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let waiter = Waiter {
            pending: Mutex::new([(a, 1), (a, 2), (b, 1), (b, 2)].into_iter().collect()),
            done: Notify::new(),
        };
        waiter.acknowledged(a, 1);
        waiter.acknowledged(a, 1);
        waiter.acknowledged(b, 3);
        assert_eq!(waiter.instances(), [a, b].into_iter().collect());
        assert!(waiter.retain(|i| *i != b), "b's lease ended");
        assert!(!waiter.retain(|i| *i != b));
        waiter.acknowledged(a, 2);
        assert!(waiter.instances().is_empty());
    }

    #[test]
    fn a_revoker_waits_longer_than_a_holder_believes() {
        let lease = Duration::from_secs(3);
        let believed = lease.mul_f64(1.0 - RATE_MARGIN);
        assert!(lease_wait(lease) > believed + FIXED_MARGIN);
        assert_eq!(lease_wait(lease), Duration::from_millis(3_130));
    }

    #[test]
    fn the_lease_clock_moves_forward() {
        let first = now_us();
        std::thread::sleep(Duration::from_millis(5));
        let second = now_us();
        assert!(second >= first + 5_000, "{first} {second}");
    }
}
