//! Attempt limits: at most `limit` attempts in *any* window of `window` — no window edges to
//! double up on.
//!
//! Each bucket is a GCRA ("generic cell rate algorithm") state: one timestamp, the theoretical
//! arrival time of the next attempt. A bucket allows a burst of `ceil(limit / 2)` and then one
//! attempt per `window / (limit - burst + 1)`, which is exactly "at most `limit` in any window".
//! Attempts are counted *before* they are evaluated, atomically per bucket, so 200 guesses at once
//! get at most `limit` evaluations; buckets are taken in order and a refusal stops there, so a
//! refused caller creates no state for the buckets after it (a blocked address cannot fill Redis
//! with per-account keys).
//!
//! Buckets live in Redis so every instance shares them (one key each, a script that only writes
//! when it allows). When Redis refuses writes (full) the buckets are still *read* there — a bucket
//! that is exhausted in Redis stays so — and counted in process as well; when Redis is down or
//! disabled, in process only (the limits then hold per instance) — and what was counted in process
//! only is owed to Redis, written there once it takes writes again, so the other instances see
//! it. The in-process map is bounded: past [`LOCAL_MAX`] buckets a new one is refused, never
//! silently forgotten. Bucket commands go to one pooled connection (the first connected), so a
//! pool whose connections reach two servers for a while (a reconnection after a failover) does
//! not keep two counts of one bucket.
use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex},
    time::{Duration, Instant},
};

use fred::{interfaces::KeysInterface, types::scripts::Script};

use super::Redis;

/// KEYS: the bucket. ARGV: emission interval ms, burst tolerance ms, `1` to take an attempt
/// (`0`: only look). Returns 0 when allowed, else the ms until it would be. Writes only when it
/// takes an attempt, and the key expires when the bucket is full again.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "local t = redis.call('TIME')
         local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
         local interval = tonumber(ARGV[1])
         local tolerance = tonumber(ARGV[2])
         local tat = tonumber(redis.call('GET', KEYS[1]) or now)
         if tat < now then tat = now end
         local allowed_at = tat - tolerance
         if now < allowed_at then return allowed_at - now end
         if ARGV[3] == '1' then
           local next = tat + interval
           redis.call('SET', KEYS[1], next, 'PX', next - now)
         end
         return 0",
    )
});

/// The same look without taking, for a Redis that refuses writes (a script without the
/// `no-writes` flag is refused whole by a full Redis, even when it would not write).
static PEEK: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "#!lua flags=no-writes
         local t = redis.call('TIME')
         local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
         local tat = tonumber(redis.call('GET', KEYS[1]) or now)
         if tat < now then tat = now end
         local allowed_at = tat - tonumber(ARGV[2])
         if now < allowed_at then return allowed_at - now end
         return 0",
    )
});

/// KEYS: the bucket. ARGV: emission interval ms, attempts, at most how far ahead (ms). Counts
/// attempts made while Redis could not take them: as if made now, but never spending the
/// bucket further than a full one's worth (they were spread over the outage).
static CHARGE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "local t = redis.call('TIME')
         local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
         local tat = tonumber(redis.call('GET', KEYS[1]) or now)
         if tat < now then tat = now end
         local next = math.min(tat + tonumber(ARGV[1]) * tonumber(ARGV[2]), now + tonumber(ARGV[3]))
         if next > tat then redis.call('SET', KEYS[1], next, 'PX', next - now) end
         return 0",
    )
});

/// In-process buckets at most; past it a new bucket is refused (fail closed) until the sweep
/// drops full ones.
pub const LOCAL_MAX: usize = 100_000;

/// One limit on one thing (an address, an account, …).
#[derive(Debug, Clone)]
pub struct Bucket {
    /// e.g. `login_account:<sha256>`; unique per counted thing.
    pub id: String,
    pub limit: u32,
    pub window: Duration,
}

impl Bucket {
    pub fn new(kind: &str, subject: &str, limit: u32, window: Duration) -> Self {
        Self {
            id: format!("{kind}:{subject}"),
            limit,
            window,
        }
    }

    /// The GCRA parameters: (emission interval, burst tolerance).
    pub fn gcra(&self) -> (Duration, Duration) {
        let limit = self.limit.max(1);
        let burst = limit.div_ceil(2);
        // In whole milliseconds (what Redis counts in), rounded up: rounded down, the last
        // attempt of a window fits just inside it (10 s / 3 = 3,333 ms lets a 5th of limit 4 in
        // at 9,999 ms).
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        let interval = Duration::from_millis(window_ms.div_ceil(u64::from(limit - burst + 1)));
        (interval, interval * (burst - 1))
    }
}

/// GCRA buckets in this process's memory, at most [`LOCAL_MAX`] of them (past it a new one is
/// refused, never silently forgotten), swept of full ones by [`LocalBuckets::sweep`].
#[derive(Default)]
struct LocalBuckets {
    map: Mutex<HashMap<String, Instant>>,
}

impl LocalBuckets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one from `bucket`: `Err(wait)` when it is exhausted (nothing taken).
    pub fn take(&self, bucket: &Bucket) -> Result<(), Duration> {
        let (interval, tolerance) = bucket.gcra();
        let now = Instant::now();
        let mut local = self.lock();
        if local.len() >= LOCAL_MAX && !local.contains_key(&bucket.id) {
            return Err(interval);
        }
        let tat = local.entry(bucket.id.clone()).or_insert(now);
        let tat_now = (*tat).max(now);
        let allowed_at = tat_now.checked_sub(tolerance).unwrap_or(now);
        if now < allowed_at {
            return Err(allowed_at - now);
        }
        *tat = tat_now + interval;
        Ok(())
    }

    /// Whether `bucket` has anything taken from it (it is not full again).
    fn spent(&self, bucket: &Bucket) -> bool {
        self.lock()
            .get(&bucket.id)
            .is_some_and(|tat| *tat > Instant::now())
    }

    /// Forgets `bucket`.
    fn remove(&self, bucket: &Bucket) {
        self.lock().remove(&bucket.id);
    }

    /// Drops buckets that are full again (they hold no information); called periodically, never
    /// on a request.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut local = self.lock();
        local.retain(|_, tat| *tat > now);
        local.shrink_to_fit();
    }

    /// Buckets held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

pub struct RateLimiter {
    redis: Redis,
    local: LocalBuckets,
    /// Attempts counted in process only (Redis did not take them), per bucket: written to Redis
    /// once it takes writes again, by a background task ([`RateLimiter::owing`] wakes it).
    owed: Mutex<HashMap<String, (Bucket, u32)>>,
    owing: tokio::sync::Notify,
}

impl RateLimiter {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            local: LocalBuckets::default(),
            owed: Mutex::new(HashMap::new()),
            owing: tokio::sync::Notify::new(),
        }
    }

    /// Takes one attempt from each bucket in order (limit 0 = unlimited, skipped), stopping at
    /// the first that is exhausted: `Err(wait)` then, and the attempt must not be evaluated.
    pub async fn acquire(&self, buckets: &[Bucket]) -> Result<(), Duration> {
        for bucket in buckets.iter().filter(|b| b.limit > 0) {
            self.take(bucket).await?;
        }
        Ok(())
    }

    async fn take(&self, bucket: &Bucket) -> Result<(), Duration> {
        let shared = match self.redis_take(bucket, true).await {
            Some(Ok(wait_ms)) => {
                // Redis takes writes again: what is owed can be written (not on this call's
                // time, which a short deadline could cut).
                if !self.owed_lock().is_empty() {
                    self.owing.notify_one();
                }
                return verdict(wait_ms);
            }
            // Redis answers but refuses writes (full): honour what it holds, and count here.
            Some(Err(())) => self.redis_take(bucket, false).await.and_then(Result::ok),
            None => None,
        };
        if let Some(wait_ms) = shared {
            verdict(wait_ms)?;
        }
        self.local.take(bucket)?;
        self.owe(bucket);
        Ok(())
    }

    fn owed_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Bucket, u32)>> {
        self.owed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An attempt Redis did not count: it will (bounded like the in-process buckets).
    fn owe(&self, bucket: &Bucket) {
        if self.redis.is_enabled() {
            let mut owed = self.owed_lock();
            if owed.len() < LOCAL_MAX || owed.contains_key(&bucket.id) {
                owed.entry(bucket.id.clone())
                    .or_insert_with(|| (bucket.clone(), 0))
                    .1 += 1;
            }
        }
    }

    /// Resolves when attempts are owed and Redis has just taken a command (the background task
    /// then [`RateLimiter::settle`]s).
    pub async fn owing(&self) {
        self.owing.notified().await;
    }

    /// Writes the attempts Redis did not count when they were made (32 buckets at a time); an
    /// entry goes only once Redis took it, so a write that fails or is cut leaves it owed.
    /// Attempts whose in-process bucket is full again (older than the bucket's memory) are
    /// dropped, and a write spends the shared bucket at most as far as a full burst would
    /// (attempts spread over a long outage must not lock the caller out for that long).
    /// Background work: a timed-out write that ran is counted twice, never fewer.
    pub async fn settle(&self) {
        use futures::StreamExt;
        let owed: Vec<(Bucket, u32)> = {
            let mut owed = self.owed_lock();
            owed.retain(|_, (bucket, _)| self.local.spent(bucket));
            owed.values().cloned().collect()
        };
        let charges = futures::stream::iter(owed)
            .map(|(bucket, attempts)| async move {
                let charged = match (self.key(&bucket), self.redis.steady()) {
                    (Some(key), Some(client)) => {
                        let (interval, tolerance) = bucket.gcra();
                        let args = vec![
                            interval.as_millis().max(1).to_string(),
                            attempts.to_string(),
                            (interval + tolerance).as_millis().to_string(),
                        ];
                        let result = CHARGE
                            .evalsha_with_reload::<i64, _, _>(client, vec![key], args)
                            .await;
                        self.redis.observe(result).is_some()
                    }
                    _ => false,
                };
                (bucket, attempts, charged)
            })
            .buffer_unordered(32);
        futures::pin_mut!(charges);
        while let Some((bucket, attempts, charged)) = charges.next().await {
            if charged {
                let mut owed = self.owed_lock();
                if let Some(entry) = owed.get_mut(&bucket.id) {
                    entry.1 = entry.1.saturating_sub(attempts);
                    if entry.1 == 0 {
                        owed.remove(&bucket.id);
                    }
                }
            }
        }
    }

    /// Forgets the bucket's history (the account's owner proved the password: its count starts
    /// over).
    pub async fn reset(&self, bucket: &Bucket) {
        if bucket.limit == 0 {
            return;
        }
        if let (Some(key), Some(client)) = (self.key(bucket), self.redis.steady()) {
            self.redis.observe(client.del::<i64, _>(key).await);
        }
        self.local.remove(bucket);
        self.owed_lock().remove(&bucket.id);
    }

    fn key(&self, bucket: &Bucket) -> Option<String> {
        self.redis.key("ratelimit", &bucket.id)
    }

    /// `Some(Ok(wait ms))` from Redis; `Some(Err(()))` when Redis answered with an error (a
    /// refused write); `None` when Redis is disabled or unreachable.
    async fn redis_take(&self, bucket: &Bucket, take: bool) -> Option<Result<u64, ()>> {
        let key = self.key(bucket)?;
        let client = self.redis.steady()?;
        let (interval, tolerance) = bucket.gcra();
        let args = vec![
            interval.as_millis().max(1).to_string(),
            tolerance.as_millis().to_string(),
            if take { "1" } else { "0" }.to_owned(),
        ];
        let script: &Script = if take { &TAKE } else { &PEEK };
        let result = script
            .evalsha_with_reload::<i64, _, _>(client, vec![key], args)
            .await;
        let refused = result
            .as_ref()
            .is_err_and(|e| e.details().contains("OOM") || e.details().contains("READONLY"));
        match self.redis.observe(result) {
            Some(wait) => Some(Ok(wait.max(0).unsigned_abs())),
            None if refused => Some(Err(())),
            None => None,
        }
    }

    /// Drops in-process buckets that are full again; called periodically, never on a request.
    pub fn sweep(&self) {
        self.local.sweep();
    }

    /// In-process buckets held now.
    pub fn local_len(&self) -> usize {
        self.local.len()
    }
}

fn verdict(wait_ms: u64) -> Result<(), Duration> {
    match wait_ms {
        0 => Ok(()),
        ms => Err(Duration::from_millis(ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> RateLimiter {
        RateLimiter::new(Redis::disabled(crate::metrics::Metrics::new()))
    }

    #[tokio::test]
    async fn at_most_the_limit_in_any_window_and_no_edge_doubling() {
        let limiter = limiter();
        let b = [Bucket::new("t", "x", 4, Duration::from_millis(400))];
        // A burst of half the limit, then one per window / 3.
        assert!(limiter.acquire(&b).await.is_ok());
        assert!(limiter.acquire(&b).await.is_ok());
        let wait = limiter.acquire(&b).await.unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(134),
            "{wait:?}"
        );
        // Over a long run, never more than 4 in any 400 ms.
        let start = Instant::now();
        let mut allowed = vec![start, start];
        while start.elapsed() < Duration::from_millis(1300) {
            if limiter.acquire(&b).await.is_ok() {
                allowed.push(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for (i, t) in allowed.iter().enumerate() {
            let in_window = allowed[i..]
                .iter()
                .take_while(|u| u.duration_since(*t) < Duration::from_millis(400))
                .count();
            assert!(in_window <= 4, "{in_window} attempts within one window");
        }
    }

    /// Review found: 10 s / 3 was truncated to 3,333 ms, so attempts at 0, 0, 3.333, 6.666 and
    /// 9.999 s — five within 10 s — were all allowed with a limit of 4.
    #[test]
    fn the_interval_is_rounded_up_so_the_window_holds() {
        let bucket = Bucket::new("t", "x", 4, Duration::from_secs(10));
        let (interval, tolerance) = bucket.gcra();
        assert_eq!(interval, Duration::from_millis(3334));
        assert_eq!(tolerance, Duration::from_millis(3334));
        // The earliest schedule GCRA allows: a burst of two, then one per interval.
        let fifth = interval * 3;
        assert!(fifth >= Duration::from_secs(10), "{fifth:?}");
    }

    #[tokio::test]
    async fn a_reset_starts_the_count_over_and_zero_is_unlimited() {
        let limiter = limiter();
        let b = [Bucket::new("t", "x", 1, Duration::from_secs(60))];
        assert!(limiter.acquire(&b).await.is_ok());
        assert!(limiter.acquire(&b).await.is_err());
        limiter.reset(&b[0]).await;
        assert!(limiter.acquire(&b).await.is_ok());
        let unlimited = [Bucket::new("t", "y", 0, Duration::from_secs(1))];
        for _ in 0..100 {
            assert!(limiter.acquire(&unlimited).await.is_ok());
        }
    }

    #[tokio::test]
    async fn a_refusal_stops_before_the_next_bucket() {
        let limiter = limiter();
        let address = Bucket::new("a", "1", 1, Duration::from_secs(60));
        assert!(
            limiter
                .acquire(std::slice::from_ref(&address))
                .await
                .is_ok()
        );
        for i in 0..10 {
            let account = Bucket::new("b", &i.to_string(), 5, Duration::from_secs(60));
            assert!(limiter.acquire(&[address.clone(), account]).await.is_err());
        }
        assert_eq!(limiter.local_len(), 1, "no state for the accounts");
    }

    #[test]
    fn the_map_is_bounded_and_fails_closed() {
        let limiter = limiter();
        {
            let mut local = limiter.local.lock();
            let far = Instant::now() + Duration::from_secs(3600);
            for i in 0..LOCAL_MAX {
                local.insert(i.to_string(), far);
            }
        }
        let new = Bucket::new("n", "new", 10, Duration::from_secs(60));
        assert!(limiter.local.take(&new).is_err(), "refused, not forgotten");
        limiter.local.lock().insert("gone".into(), Instant::now());
        limiter.sweep();
        assert_eq!(limiter.local_len(), LOCAL_MAX);
    }
}
