//! The copies themselves: two moka caches, the counters that keep a fill from undoing a drop, the
//! floors the logs set, and this instance's belief in its lease.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use uuid::Uuid;

use super::Keys;
use crate::{
    config::LocalCacheSettings,
    model::{ProfileRecord, SessionRecord},
};

/// Drops are counted per stripe of keys, so that dropping one key rarely stops the fill of
/// another.
const STRIPES: usize = 64;

/// Taken before a read whose result may be kept (see [`Store::keep`]): the drop counters of
/// everything (`clear`) and of the key's stripe at that time.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    all: u64,
    stripe: usize,
    drops: u64,
}

/// What the renewals read in the invalidation logs, with each row's time: revoked sessions and
/// profile versions. A copy below a floor is never kept while the row is in the window: a fill
/// that read Redis after the renewal's log read but before the revoker's Redis write would
/// otherwise keep the old copy, and the next renewal, which drops each row once, would not drop
/// it again (case 5 of the review "Revocation by construction").
#[derive(Default)]
pub(super) struct Floors {
    revoked: HashMap<[u8; 32], DateTime<Utc>>,
    versions: HashMap<Uuid, (i64, DateTime<Utc>)>,
}

impl Floors {
    /// A revocation read in the log: `true` the first time.
    pub fn revoked(&mut self, hash: [u8; 32], at: DateTime<Utc>) -> bool {
        self.revoked.insert(hash, at).is_none()
    }

    /// A profile version read in the log: `true` when it raises the floor.
    pub fn version(&mut self, user_id: Uuid, version: i64, at: DateTime<Utc>) -> bool {
        match self.versions.get(&user_id) {
            Some((floor, _)) if *floor >= version => false,
            _ => {
                self.versions.insert(user_id, (version, at));
                true
            }
        }
    }

    /// Forgets the rows older than `horizon` (the next log read cannot return them).
    pub fn prune(&mut self, horizon: DateTime<Utc>) {
        self.revoked.retain(|_, at| *at >= horizon);
        self.versions.retain(|_, (_, at)| *at >= horizon);
    }

    pub fn clear(&mut self) {
        self.revoked.clear();
        self.versions.clear();
    }
}

/// A heartbeat: a message an instance publishes to itself.
#[derive(Default, Clone, Copy)]
pub(super) struct Beat {
    /// 0: none sent yet.
    pub nonce: u64,
    /// When it was sent ([`crate::clock::boot_us`]).
    pub sent: u64,
    pub back: bool,
}

pub(super) struct Store {
    /// The lease length this instance holds (the fleet's, see `store::LeaseRepo::fleet_lease`).
    pub lease: Duration,
    sessions: moka::sync::Cache<[u8; 32], Arc<SessionRecord>>,
    profiles: moka::sync::Cache<Uuid, Arc<ProfileRecord>>,
    /// Bumped, under `drops`, by every `clear`, and per stripe by every drop of a key in it.
    cleared: AtomicU64,
    stripes: [AtomicU64; STRIPES],
    /// Taken by every drop and every keep; it guards the floors too.
    pub drops: Mutex<Floors>,
    /// Where this instance believes its lease ends ([`crate::clock::boot_us`]); 0: no lease.
    pub lease_until: AtomicU64,
    /// The subscription is up and this instance's heartbeat came back.
    pub hearing: AtomicBool,
    /// Bumped by every doubt: a renewal that began before one does not set `lease_until`.
    pub epoch: AtomicU64,
    /// A doubt happened: the keeper takes a fresh lease.
    pub lost: AtomicBool,
    /// The fleet's lease was replaced while this instance ran (logged once).
    pub fleet_changed: AtomicBool,
    /// Wakes the keeper (a doubt to act on).
    pub wake: Notify,
    /// The last heartbeat sent.
    pub heartbeat: Mutex<Beat>,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A token hash is uniformly random already.
fn session_stripe(hash: &[u8; 32]) -> usize {
    usize::from(hash[0]) % STRIPES
}

fn profile_stripe(user_id: &Uuid) -> usize {
    let bytes = user_id.as_bytes();
    usize::from(bytes[15] ^ bytes[7]) % STRIPES
}

impl Store {
    pub fn new(
        settings: &LocalCacheSettings,
        lease: Duration,
        profile_ttl: Duration,
        session_recheck: Duration,
    ) -> Self {
        Store {
            lease,
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
            drops: Mutex::new(Floors::default()),
            lease_until: AtomicU64::new(0),
            hearing: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            fleet_changed: AtomicBool::new(false),
            wake: Notify::new(),
            heartbeat: Mutex::new(Beat::default()),
        }
    }

    /// The heartbeat came back and the lease is believed, at `now` ([`crate::clock::boot_us`]).
    pub fn believed(&self, now: u64) -> bool {
        self.hearing.load(Ordering::Acquire) && now < self.lease_until.load(Ordering::Acquire)
    }

    pub fn session(&self, key: &[u8; 32]) -> Option<Arc<SessionRecord>> {
        self.sessions.get(key)
    }

    pub fn profile(&self, user_id: &Uuid) -> Option<Arc<ProfileRecord>> {
        self.profiles.get(user_id)
    }

    pub fn session_ticket(&self, key: &[u8; 32]) -> Ticket {
        self.ticket(session_stripe(key))
    }

    pub fn profile_ticket(&self, user_id: &Uuid) -> Ticket {
        self.ticket(profile_stripe(user_id))
    }

    fn ticket(&self, stripe: usize) -> Ticket {
        Ticket {
            all: self.cleared.load(Ordering::Acquire),
            stripe,
            drops: self.stripes[stripe].load(Ordering::Acquire),
        }
    }

    /// Keeps `record` if nothing was dropped since `ticket` and no log row read since revoked it.
    pub fn keep_session(&self, ticket: Ticket, key: [u8; 32], record: &SessionRecord) {
        let floors = lock(&self.drops);
        if self.unchanged(ticket) && !floors.revoked.contains_key(&key) {
            self.sessions.insert(key, Arc::new(record.clone()));
        }
    }

    /// Keeps `profile` if nothing was dropped since `ticket` and it is not below the version a
    /// log row read since showed.
    pub fn keep_profile(&self, ticket: Ticket, profile: &ProfileRecord) {
        let floors = lock(&self.drops);
        let floor = floors.versions.get(&profile.user_id).map(|(v, _)| *v);
        if self.unchanged(ticket) && floor.is_none_or(|floor| profile.version >= floor) {
            self.profiles
                .insert(profile.user_id, Arc::new(profile.clone()));
        }
    }

    /// Under `drops`: nothing dropped since `ticket`.
    fn unchanged(&self, ticket: Ticket) -> bool {
        self.cleared.load(Ordering::Acquire) == ticket.all
            && self.stripes[ticket.stripe].load(Ordering::Acquire) == ticket.drops
    }

    pub fn forget(&self, keys: &Keys) {
        let _drops = lock(&self.drops);
        self.forget_locked(keys);
    }

    /// [`Self::forget`], with `drops` held by the caller.
    pub fn forget_locked(&self, keys: &Keys) {
        for key in &keys.sessions {
            self.stripes[session_stripe(key)].fetch_add(1, Ordering::AcqRel);
            self.sessions.invalidate(key);
        }
        for id in &keys.profiles {
            self.stripes[profile_stripe(id)].fetch_add(1, Ordering::AcqRel);
            self.profiles.invalidate(id);
        }
    }

    /// Drops everything (and makes every fill in flight a no-op).
    pub fn clear(&self) {
        let _drops = lock(&self.drops);
        self.clear_locked();
    }

    /// [`Self::clear`], with `drops` held by the caller.
    pub fn clear_locked(&self) {
        self.cleared.fetch_add(1, Ordering::AcqRel);
        self.sessions.invalidate_all();
        self.profiles.invalidate_all();
    }

    pub fn entries(&self) -> (u64, u64) {
        (self.sessions.entry_count(), self.profiles.entry_count())
    }
}
