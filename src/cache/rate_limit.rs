//! Fixed-window attempt counters for brute-force protection.
//!
//! Counters live in Redis so every instance shares them, and an attempt is counted *before* it is
//! evaluated, atomically (one Lua script per check): when 200 guesses arrive at once, only the
//! first `limit` get evaluated. A command is sent once at most (see `cache`), so an attempt is
//! never counted twice. When Redis is disabled or fails, the same counters are kept in process:
//! the limit then holds per instance, it never fails open.
use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex},
    time::{Duration, Instant},
};

use fred::types::scripts::Script;
use futures::future::join_all;

use super::Redis;

/// KEYS: one counter. ARGV: limit, window (ms). Returns 0 when the counter is within its limit,
/// else the milliseconds until its window ends. One key per script, so each bucket is atomic on
/// its own on a Redis Cluster too.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "local n = redis.call('INCR', KEYS[1])
         local ttl = redis.call('PTTL', KEYS[1])
         if ttl < 0 then
           ttl = tonumber(ARGV[2])
           redis.call('PEXPIRE', KEYS[1], ttl)
         end
         if n > tonumber(ARGV[1]) then return ttl end
         return 0",
    )
});

/// KEYS: one counter. ARGV: `reset` clears it; anything else gives one attempt back (never below
/// zero, never creating a key).
static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        "if ARGV[1] == 'reset' then
           redis.call('DEL', KEYS[1])
         elseif tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then
           redis.call('DECR', KEYS[1])
         end
         return 0",
    )
});

/// One counter: what it counts and its limit.
#[derive(Debug, Clone)]
pub struct Bucket {
    /// e.g. `login_email:<sha256>`; unique per counted thing.
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
}

struct Window {
    count: u32,
    ends: Instant,
}

pub struct RateLimiter {
    redis: Redis,
    local: Mutex<HashMap<String, Window>>,
}

/// The in-process map is swept of ended windows when it grows past this.
const LOCAL_SWEEP_AT: usize = 10_000;

impl RateLimiter {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            local: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one attempt in every bucket (limit 0 = unlimited: not counted). `Err(wait)` when
    /// any bucket is past its limit: the attempt must not be evaluated.
    pub async fn acquire(&self, buckets: &[Bucket]) -> Result<(), Duration> {
        let buckets: Vec<&Bucket> = buckets.iter().filter(|b| b.limit > 0).collect();
        if buckets.is_empty() {
            return Ok(());
        }
        let wait_ms = match self.redis_acquire(&buckets).await {
            Some(wait_ms) => wait_ms,
            None => self.local_acquire(&buckets),
        };
        match wait_ms {
            0 => Ok(()),
            ms => Err(Duration::from_millis(ms.max(1))),
        }
    }

    /// Gives back the attempt counted in these buckets (it was not a failure).
    pub async fn forgive(&self, buckets: &[Bucket]) {
        self.settle(&[], buckets).await;
    }

    /// After an attempt: clears the counters of `reset` and gives back the attempt counted in
    /// `forgive`, in one round trip.
    pub async fn settle(&self, reset: &[Bucket], forgive: &[Bucket]) {
        let reset: Vec<&Bucket> = reset.iter().filter(|b| b.limit > 0).collect();
        let forgive: Vec<&Bucket> = forgive.iter().filter(|b| b.limit > 0).collect();
        if reset.is_empty() && forgive.is_empty() {
            return;
        }
        let settled = join_all(
            (reset.iter().map(|b| (*b, "reset")))
                .chain(forgive.iter().map(|b| (*b, "forgive")))
                .map(|(bucket, how)| self.redis_run(&SETTLE, bucket, vec![how.to_owned()])),
        )
        .await;
        if settled.iter().all(Option::is_some) {
            return;
        }
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        for bucket in reset {
            local.remove(&bucket.id);
        }
        for bucket in forgive {
            if let Some(w) = local.get_mut(&bucket.id) {
                w.count = w.count.saturating_sub(1);
            }
        }
    }

    /// Counts the attempt in every bucket (each atomically, all at once); the longest wait of
    /// those past their limit. `None` when Redis did not answer for every bucket.
    async fn redis_acquire(&self, buckets: &[&Bucket]) -> Option<u64> {
        let waits = join_all(buckets.iter().map(|b| {
            let args = vec![b.limit.to_string(), b.window.as_millis().max(1).to_string()];
            self.redis_run(&ACQUIRE, b, args)
        }))
        .await;
        waits
            .into_iter()
            .map(|wait| wait.map(|ms| ms.max(0).unsigned_abs()))
            .collect::<Option<Vec<u64>>>()
            .map(|waits| waits.into_iter().max().unwrap_or(0))
    }

    async fn redis_run(&self, script: &Script, bucket: &Bucket, args: Vec<String>) -> Option<i64> {
        let key = self.redis.key("ratelimit", &bucket.id)?;
        let client = self.redis.connected()?;
        self.redis.observe(
            script
                .evalsha_with_reload::<i64, _, _>(client, vec![key], args)
                .await,
        )
    }

    fn local_acquire(&self, buckets: &[&Bucket]) -> u64 {
        let now = Instant::now();
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if local.len() > LOCAL_SWEEP_AT {
            local.retain(|_, w| w.ends > now);
        }
        let mut wait = Duration::ZERO;
        for bucket in buckets {
            let w = local.entry(bucket.id.clone()).or_insert(Window {
                count: 0,
                ends: now + bucket.window,
            });
            if w.ends <= now {
                *w = Window {
                    count: 0,
                    ends: now + bucket.window,
                };
            }
            w.count = w.count.saturating_add(1);
            if w.count > bucket.limit {
                wait = wait.max(w.ends - now);
            }
        }
        u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_process_counters_limit_reset_by_window_and_forgive() {
        let limiter = RateLimiter::new(Redis::disabled(crate::metrics::Metrics::new()));
        let b = [Bucket::new("t", "x", 2, Duration::from_millis(300))];
        assert!(limiter.acquire(&b).await.is_ok());
        assert!(limiter.acquire(&b).await.is_ok());
        let wait = limiter.acquire(&b).await.unwrap_err();
        assert!(wait <= Duration::from_millis(300) && wait > Duration::ZERO);
        limiter.forgive(&b).await;
        limiter.forgive(&b).await;
        assert!(
            limiter.acquire(&b).await.is_ok(),
            "forgiven attempts free a slot"
        );
        assert!(limiter.acquire(&b).await.is_err());
        limiter.settle(&b, &[]).await;
        assert!(
            limiter.acquire(&b).await.is_ok(),
            "a reset clears the count"
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(
            limiter.acquire(&b).await.is_ok(),
            "a new window starts empty"
        );
        assert!(limiter.acquire(&b).await.is_ok());
        assert!(limiter.acquire(&b).await.is_err());
    }

    #[tokio::test]
    async fn a_zero_limit_is_unlimited() {
        let limiter = RateLimiter::new(Redis::disabled(crate::metrics::Metrics::new()));
        let b = [Bucket::new("t", "x", 0, Duration::from_secs(1))];
        for _ in 0..100 {
            assert!(limiter.acquire(&b).await.is_ok());
        }
    }
}
