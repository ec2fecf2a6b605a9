//! Lookups that find nothing: anyone may ask for any profile id, and during the upgrade present
//! a token of the previous release (no MAC proves it was minted), and each such request costs a
//! PostgreSQL query when Redis has nothing. Each caller address (the gRPC peer, an IPv4 address
//! or IPv6 network of `RATE_LIMIT__IPV6_PREFIX`, set by `grpc::observe`) has a GCRA budget of
//! `RATE_LIMIT__UNKNOWN_LOOKUPS_PER_IP` lookups that find nothing in any
//! `RATE_LIMIT__UNKNOWN_LOOKUPS_WINDOW`, in each instance:
//!
//! - an address whose budget is untouched looks up without paying first, a burst's worth at a
//!   time (more wait their turn, within their call's deadline); once it has paid lately, each
//!   lookup takes one before it runs (refused, before any work, when none is left). So a first
//!   flood costs at most two bursts of queries, and callers asking for what exists, however many
//!   at once, are not refused;
//! - a lookup that found what it asked for costs nothing (what it took is given back); one that
//!   found nothing is paid (a cancelled one too: its query may have run); one that failed (the
//!   database away or busy) is not — an outage must not turn into refusals afterwards;
//! - what an address owes is at most one window: however large its flood, it is refused for at
//!   most `RATE_LIMIT__UNKNOWN_LOOKUPS_WINDOW` after it stops;
//! - at most [`MAX_ADDRESSES`] addresses are tracked; past that, new addresses share one of
//!   [`OVERFLOW`] buckets by hash (budgets merge; nobody is refused for the map being full).
use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::AuthError;
use crate::{config::RateLimitSettings, metrics::Metrics};

/// Addresses tracked at most, besides the overflow buckets.
pub const MAX_ADDRESSES: usize = 100_000;
/// Buckets shared by the addresses beyond [`MAX_ADDRESSES`].
pub const OVERFLOW: u64 = 1024;

struct Entry {
    /// GCRA's theoretical arrival time: the budget is untouched when it is not after now.
    tat: Instant,
    /// Places for lookups that do not pay first (a burst's worth).
    unpaid: Arc<tokio::sync::Semaphore>,
}

pub struct UnknownLookups {
    entries: Mutex<HashMap<String, Entry>>,
    limit: u32,
    window: Duration,
    ipv6_prefix: u8,
    metrics: Arc<Metrics>,
}

/// How a lookup ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// It found what it asked for: free.
    Yes,
    /// It found nothing: paid.
    No,
    /// It failed (PostgreSQL away or busy): free.
    Failed,
}

/// One lookup under way; [`Paid::settle`] says how it ended (dropped unsettled, it is paid as
/// one that found nothing).
pub struct Paid<'a> {
    owner: &'a UnknownLookups,
    key: Option<String>,
    /// It took one before it ran.
    reserved: bool,
    /// Its place among the lookups that did not pay first (given back when it ends).
    place: Option<tokio::sync::OwnedSemaphorePermit>,
    settled: bool,
}

impl Paid<'_> {
    pub fn settle(mut self, found: Found) {
        self.end(found);
    }

    fn end(&mut self, found: Found) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        if let Some(key) = &self.key {
            self.owner.end(key, self.reserved, found);
        }
        self.place = None;
    }
}

impl Drop for Paid<'_> {
    fn drop(&mut self) {
        self.end(Found::No);
    }
}

impl UnknownLookups {
    pub fn new(limits: &RateLimitSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            limit: limits.unknown_lookups_per_ip,
            window: limits.unknown_lookups_window,
            ipv6_prefix: limits.ipv6_prefix.min(128),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The GCRA of the budget: (emission interval, burst tolerance, burst).
    fn gcra(&self) -> (Duration, Duration, u32) {
        let bucket = crate::cache::Bucket::new("unknown_lookup", "", self.limit, self.window);
        let (interval, tolerance) = bucket.gcra();
        (interval, tolerance, self.limit.div_ceil(2))
    }

    /// The running call's address, as its bucket's key (an overflow bucket when the map is
    /// full and the address is not in it).
    fn key(&self, entries: &HashMap<String, Entry>) -> String {
        let address = match crate::store::current_work()
            .peer
            .map(|ip| super::input::network(ip, self.ipv6_prefix))
        {
            Some(IpAddr::V4(v4)) => format!("v4:{v4}"),
            Some(IpAddr::V6(network)) => format!("v6:{network}/{}", self.ipv6_prefix),
            None => "none".to_owned(),
        };
        if entries.len() < MAX_ADDRESSES || entries.contains_key(&address) {
            return address;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        address.hash(&mut hasher);
        format!("overflow:{}", hasher.finish() % OVERFLOW)
    }

    fn refused(&self, retry_after: Duration) -> AuthError {
        self.metrics
            .rate_limited
            .with_label_values(&["unknown_lookup"])
            .inc();
        AuthError::RateLimited { retry_after }
    }

    /// Refused at once when the running call's address may make no lookup now (so a flood of
    /// unproven requests costs nothing more, not even a Redis read).
    pub fn open(&self) -> Result<(), AuthError> {
        if self.limit == 0 {
            return Ok(());
        }
        let (_, tolerance, _) = self.gcra();
        let now = Instant::now();
        let entries = self.lock();
        let Some(entry) = entries.get(&self.key(&entries)) else {
            return Ok(());
        };
        let allowed_at = entry.tat.checked_sub(tolerance).unwrap_or(now);
        if entry.tat <= now || allowed_at <= now {
            Ok(())
        } else {
            Err(self.refused(allowed_at - now))
        }
    }

    /// A lookup for the running call's address, or how long until it may make one.
    pub async fn pay(&self) -> Result<Paid<'_>, AuthError> {
        let paid = |key, reserved, place| Paid {
            owner: self,
            key,
            reserved,
            place,
            settled: false,
        };
        if self.limit == 0 {
            return Ok(paid(None, false, None));
        }
        let (interval, tolerance, burst) = self.gcra();
        loop {
            // Untouched: wait for a place among those that do not pay first.
            let (key, places) = {
                let now = Instant::now();
                let mut entries = self.lock();
                let key = self.key(&entries);
                let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
                    tat: now,
                    unpaid: Arc::new(tokio::sync::Semaphore::new(burst as usize)),
                });
                if entry.tat > now {
                    let tat = entry.tat;
                    let allowed_at = tat.checked_sub(tolerance).unwrap_or(now);
                    if now < allowed_at {
                        drop(entries);
                        return Err(self.refused(allowed_at - now));
                    }
                    entry.tat = tat + interval;
                    return Ok(paid(Some(key), true, None));
                }
                (key, entry.unpaid.clone())
            };
            let Ok(place) = places.acquire_owned().await else {
                continue;
            };
            // Still untouched once a place came free (else pay first, above).
            let untouched = self
                .lock()
                .get(&key)
                .is_some_and(|entry| entry.tat <= Instant::now());
            if untouched {
                return Ok(paid(Some(key), false, Some(place)));
            }
        }
    }

    fn end(&self, key: &str, reserved: bool, found: Found) {
        let (interval, _, _) = self.gcra();
        let now = Instant::now();
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(key) else {
            return;
        };
        match (found, reserved) {
            // Give back what it took.
            (Found::Yes | Found::Failed, true) => {
                entry.tat = entry.tat.checked_sub(interval).unwrap_or(now).max(now);
            }
            // Pay now, owing at most one window.
            (Found::No, false) => {
                entry.tat = (entry.tat.max(now) + interval).min(now + self.window);
            }
            (Found::No, true) | (Found::Yes | Found::Failed, false) => {}
        }
    }

    /// Drops the buckets that hold no information (periodically, never on a request).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut entries = self.lock();
        let (_, _, burst) = self.gcra();
        entries.retain(|_, entry| {
            entry.tat > now || entry.unpaid.available_permits() < burst as usize
        });
        entries.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookups(limit: u32) -> UnknownLookups {
        let settings = RateLimitSettings {
            unknown_lookups_per_ip: limit,
            unknown_lookups_window: Duration::from_secs(10),
            ..RateLimitSettings::default()
        };
        UnknownLookups::new(&settings, Metrics::new())
    }

    /// Runs `count` lookups at once, each ending `found`; how many were let run.
    async fn at_once(unknown: &Arc<UnknownLookups>, count: usize, found: Found) -> usize {
        let lookups: Vec<_> = (0..count)
            .map(|_| {
                let unknown = unknown.clone();
                tokio::spawn(async move {
                    let paid = unknown.pay().await.ok()?;
                    tokio::task::yield_now().await;
                    paid.settle(found);
                    Some(())
                })
            })
            .collect();
        let mut ran = 0;
        for lookup in lookups {
            ran += usize::from(lookup.await.unwrap().is_some());
        }
        ran
    }

    /// Review found: 1,000 concurrent lookups from an untouched address all ran (1,000 queries),
    /// then left a debt of 901 s. Now at most two bursts run (the rest wait their turn, then must
    /// pay first, and are refused), and the debt is one window.
    #[tokio::test]
    async fn a_flood_from_an_untouched_address_costs_at_most_two_bursts_and_one_window() {
        let unknown = Arc::new(lookups(20));
        let ran = at_once(&unknown, 1000, Found::No).await;
        assert!(ran <= 20, "{ran} lookups ran");
        let entries = unknown.lock();
        let owed = entries["none"]
            .tat
            .saturating_duration_since(Instant::now());
        assert!(owed <= Duration::from_secs(10), "{owed:?}");
    }

    /// The load benchmark's warm-up found: 32 concurrent reads of existing profiles from one
    /// address were refused past the burst. Now those beyond it wait their turn.
    #[tokio::test]
    async fn many_lookups_at_once_that_find_what_they_ask_for_all_run() {
        let unknown = Arc::new(lookups(20));
        assert_eq!(at_once(&unknown, 200, Found::Yes).await, 200);
    }

    /// Review found: lookups that failed (the database locked) were paid as if they found
    /// nothing, and the caller was refused after the outage.
    #[tokio::test]
    async fn failed_and_found_lookups_cost_nothing() {
        let unknown = Arc::new(lookups(4));
        assert_eq!(at_once(&unknown, 100, Found::Failed).await, 100);
        assert_eq!(at_once(&unknown, 100, Found::Yes).await, 100);
        assert!(unknown.open().is_ok());
        for _ in 0..2 {
            unknown.pay().await.unwrap().settle(Found::No);
        }
        // The burst of 2 is spent: the next lookup must pay first, and cannot.
        assert!(unknown.open().is_err());
        assert!(unknown.pay().await.is_err());
    }

    /// Review found: past 100,000 tracked addresses every new address was refused. Now new
    /// addresses share overflow buckets.
    #[tokio::test]
    async fn a_full_map_merges_new_addresses_instead_of_refusing_them() {
        let unknown = lookups(20);
        {
            let mut entries = unknown.lock();
            let far = Instant::now() + Duration::from_secs(3600);
            for i in 0..MAX_ADDRESSES {
                let unpaid = Arc::new(tokio::sync::Semaphore::new(10));
                entries.insert(format!("v4:{i}"), Entry { tat: far, unpaid });
            }
        }
        let work = crate::store::Work {
            share: crate::store::Share::Lookups,
            peer: Some("192.0.2.1".parse().unwrap()),
        };
        let key = crate::store::as_work(work, async { unknown.pay().await.map(|p| p.key.clone()) })
            .await
            .expect("a new address may look up");
        assert!(key.unwrap().starts_with("overflow:"));
    }
}
