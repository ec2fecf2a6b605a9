//! Lookups that find nothing: anyone may ask for any profile id, and during the upgrade present
//! a token of the previous release (no MAC proves it was minted), and each such request costs a
//! PostgreSQL query when Redis has nothing. Each caller address (the gRPC peer, an IPv4 address
//! or IPv6 network of `RATE_LIMIT__IPV6_PREFIX`, set by `grpc::observe`) has a GCRA budget of
//! `RATE_LIMIT__UNKNOWN_LOOKUPS_PER_IP` lookups that find nothing in any
//! `RATE_LIMIT__UNKNOWN_LOOKUPS_WINDOW`, in each instance:
//!
//! - a lookup that finds nothing is paid when it ends (a cancelled one too: its query may have
//!   run); one that found what it asked for, or failed (PostgreSQL away or busy), is free — an
//!   outage must not turn into refusals afterwards;
//! - an address whose budget is spent is refused (RESOURCE_EXHAUSTED, with the time until it may
//!   look up again) before any work; at most a burst's worth of its lookups run at once, the
//!   others wait their turn (within their call's deadline) and look at the budget again. So a
//!   flood, however wide, costs at most two bursts of queries before it is refused, and any
//!   number of lookups at once that find what they ask for all run;
//! - an address owes at most one window: it is refused at most
//!   `RATE_LIMIT__UNKNOWN_LOOKUPS_WINDOW` after its flood stops, and the limit holds in every
//!   window meanwhile;
//! - at most [`MAX_ADDRESSES`] addresses are tracked; past that, new addresses share one of
//!   [`OVERFLOW`] buckets by a keyed hash (budgets merge; nobody is refused for the map being
//!   full).
use std::{
    collections::HashMap,
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
    /// GCRA's theoretical arrival time.
    tat: Instant,
    /// Places for the address' lookups under way (a burst's worth).
    places: Arc<tokio::sync::Semaphore>,
}

pub struct UnknownLookups {
    entries: Mutex<HashMap<String, Entry>>,
    /// Keys the overflow hash (an attacker cannot aim at another address' bucket).
    overflow_hasher: std::collections::hash_map::RandomState,
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
    /// Its place among the address' lookups under way (given back when it ends).
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
        if let (Some(key), Found::No) = (&self.key, found) {
            self.owner.charge(key);
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
            overflow_hasher: std::collections::hash_map::RandomState::new(),
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
        use std::hash::BuildHasher;
        format!(
            "overflow:{}",
            self.overflow_hasher.hash_one(&address) % OVERFLOW
        )
    }

    fn refused(&self, retry_after: Duration) -> AuthError {
        self.metrics
            .rate_limited
            .with_label_values(&["unknown_lookup"])
            .inc();
        AuthError::RateLimited { retry_after }
    }

    /// How long until the address may look up again (`None`: now).
    fn spent(&self, entry: &Entry) -> Option<Duration> {
        let (_, tolerance, _) = self.gcra();
        let now = Instant::now();
        let allowed_at = entry.tat.checked_sub(tolerance).unwrap_or(now);
        (allowed_at > now).then(|| allowed_at - now)
    }

    /// Refused at once when the running call's address has spent its budget (so a flood of
    /// unproven requests costs nothing more, not even a Redis read).
    pub fn open(&self) -> Result<(), AuthError> {
        if self.limit == 0 {
            return Ok(());
        }
        let entries = self.lock();
        let spent = entries.get(&self.key(&entries)).and_then(|e| self.spent(e));
        drop(entries);
        spent.map_or(Ok(()), |wait| Err(self.refused(wait)))
    }

    /// A lookup for the running call's address, once it has a place (at most a burst's worth
    /// under way); refused when its budget is spent.
    pub async fn pay(&self) -> Result<Paid<'_>, AuthError> {
        if self.limit == 0 {
            return Ok(Paid {
                owner: self,
                key: None,
                place: None,
                settled: false,
            });
        }
        let (_, _, burst) = self.gcra();
        let (key, places) = {
            let mut entries = self.lock();
            let key = self.key(&entries);
            let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
                tat: Instant::now(),
                places: Arc::new(tokio::sync::Semaphore::new(burst as usize)),
            });
            if let Some(wait) = self.spent(entry) {
                drop(entries);
                return Err(self.refused(wait));
            }
            (key, entry.places.clone())
        };
        let place = places
            .acquire_owned()
            .await
            .map_err(|_| AuthError::Internal("the lookup places were closed".into()))?;
        // What ran while this one waited may have spent the budget.
        let spent = self.lock().get(&key).and_then(|e| self.spent(e));
        if let Some(wait) = spent {
            return Err(self.refused(wait));
        }
        Ok(Paid {
            owner: self,
            key: Some(key),
            place: Some(place),
            settled: false,
        })
    }

    /// A lookup that found nothing: one more owed, at most one window's worth in all.
    fn charge(&self, key: &str) {
        let (interval, tolerance, _) = self.gcra();
        let now = Instant::now();
        if let Some(entry) = self.lock().get_mut(key) {
            entry.tat = (entry.tat.max(now) + interval).min(now + self.window + tolerance);
        }
    }

    /// Drops the buckets that hold no information (periodically, never on a request).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut entries = self.lock();
        let (_, _, burst) = self.gcra();
        entries.retain(|_, entry| {
            entry.tat > now || entry.places.available_permits() < burst as usize
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
    /// then left a debt of 901 s. Now at most two bursts run (the rest wait their turn, see the
    /// budget spent, and are refused), and the debt is one window.
    #[tokio::test]
    async fn a_flood_costs_at_most_two_bursts_and_one_window() {
        let unknown = Arc::new(lookups(20));
        let ran = at_once(&unknown, 1000, Found::No).await;
        assert!(ran <= 20, "{ran} lookups ran");
        let entries = unknown.lock();
        let wait = unknown.spent(&entries["none"]).unwrap();
        assert!(wait <= Duration::from_secs(10), "{wait:?}");
    }

    /// The load benchmark's warm-up found: 32 concurrent reads of existing profiles from one
    /// address were refused past the burst; and a second review: after one lookup that found
    /// nothing, concurrent lookups were refused again. Now those beyond a burst wait their turn,
    /// and only a spent budget refuses.
    #[tokio::test]
    async fn many_lookups_at_once_that_find_what_they_ask_for_all_run() {
        let unknown = Arc::new(lookups(20));
        assert_eq!(at_once(&unknown, 200, Found::Yes).await, 200);
        unknown.pay().await.unwrap().settle(Found::No);
        assert_eq!(at_once(&unknown, 200, Found::Yes).await, 200);
    }

    /// A second review found: the debt was clamped to one window from *now*, which let about
    /// 1.4 times the limit into a window after a flood. Now no window holds more than the limit
    /// plus the burst that may be under way when the budget runs out.
    #[tokio::test]
    async fn the_limit_holds_in_every_window_during_a_flood() {
        let window = Duration::from_millis(400);
        let settings = RateLimitSettings {
            unknown_lookups_per_ip: 20,
            unknown_lookups_window: window,
            ..RateLimitSettings::default()
        };
        let unknown = Arc::new(UnknownLookups::new(&settings, Metrics::new()));
        let started = Instant::now();
        let mut ran = Vec::new();
        while started.elapsed() < window * 5 {
            let round: Vec<_> = (0..10)
                .map(|_| {
                    let unknown = unknown.clone();
                    tokio::spawn(async move {
                        let paid = unknown.pay().await.ok()?;
                        let at = Instant::now();
                        tokio::task::yield_now().await;
                        paid.settle(Found::No);
                        Some(at)
                    })
                })
                .collect();
            for lookup in round {
                ran.extend(lookup.await.unwrap());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ran.sort();
        for (i, at) in ran.iter().enumerate() {
            let within = ran[i..].iter().take_while(|t| **t - *at < window).count();
            assert!(within <= 30, "{within} lookups within one window");
        }
        assert!(ran.len() >= 40, "the budget refills: {} ran", ran.len());
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
                let places = Arc::new(tokio::sync::Semaphore::new(10));
                entries.insert(format!("v4:{i}"), Entry { tat: far, places });
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
